/**
 * The process-wide NBD server and its block exports, as QEMU keeps them (nbd/server.c's one
 * server, block/export/export.c's list of exports): what QMP's nbd-server-start,
 * block-export-add, block-export-del, query-block-exports and nbd-server-stop, and the daemon's
 * --nbd-server and --export, act on. Errors carry qemu-storage-daemon 7.2's texts.
 *
 * Global-state code: every function that changes the registry takes the BQL (`bql: Bql`); the
 * asynchronous ones (start, stop, delete) hold it across their awaits, so no other graph change
 * interleaves. Each export owns a BlockBackend on its node (named `nbd-export.<id>`): the node is
 * then in use, and blockdev-del refuses it ("Node x is in use", as QEMU), and the export's
 * requests go through the backend like a device's (drained sections hold them back).
 */
import { assertBql, type Bql } from '../block/bql.js';
import { blkDelete, blkNew, type BlockBackend } from '../block/backend.js';
import { BlockError } from '../block/errors.js';
import { findIOThread } from '../block/iothread.js';
import { allNodes } from '../block/registry.js';
import { NbdServer, type NbdListenAddress } from './server.js';
import { NBD_MAX_STRING_BYTES } from './protocol.js';
import { findTlsCreds } from './tls-creds.js';

/** What block-export-add (type nbd) asks for. */
export interface BlockExportOptions {
  id: string;
  nodeName: string;
  /** The NBD export name; the node name when left out. */
  name?: string;
  description?: string;
  writable?: boolean;
  allocationDepth?: boolean;
  /** Every write flushed before it is acknowledged (QEMU's writethrough). */
  writethrough?: boolean;
  /** An IOThread that must exist (QEMU moves the node there; snapstack's node keeps its own). */
  iothread?: string;
}

/** One export, as query-block-exports lists it. */
export interface BlockExportInfo {
  id: string;
  type: 'nbd';
  nodeName: string;
  shuttingDown: boolean;
}

interface ExportEntry {
  id: string;
  nodeName: string;
  name: string;
  backend: BlockBackend;
  shuttingDown: boolean;
}

/** Options of the server (QEMU's nbd-server-start / --nbd-server). */
export interface NbdServerStartOptions {
  /** Clients served at once; 0 or left out: no limit (QEMU's default). */
  maxConnections?: number;
  /** The id of a tls-creds-x509 object (endpoint=server): every client must then use TLS. */
  tlsCreds?: string;
  log?: (line: string) => void;
}

/** "No limit" for max-connections=0: more than the pending queue could ever hold. */
const UNLIMITED_CONNECTIONS = 1 << 20;

let server: NbdServer | null = null;
/** Exports in creation order (query-block-exports lists the newest first, as QEMU). */
const exports = new Map<string, ExportEntry>();

function fail(message: string, code: BlockError['code'] = 'EINVAL'): never {
  throw new BlockError(code, message);
}

/** QEMU's id_wellformed: a letter, then letters, digits, '-', '.', '_'. */
function wellFormedId(id: string): boolean {
  return /^[A-Za-z][A-Za-z0-9_.-]*$/.test(id);
}

/**
 * Starts the NBD server on `addr`; "NBD server already running" when one runs.
 * @locking global-state
 */
export async function nbdServerStart(bql: Bql, addr: NbdListenAddress, opts: NbdServerStartOptions = {}): Promise<void> {
  assertBql(bql, 'nbdServerStart');
  if (server !== null) fail('NBD server already running', 'EBUSY');
  const tls = opts.tlsCreds === undefined ? undefined : findTlsCreds(opts.tlsCreds, 'server');
  const max = opts.maxConnections ?? 0;
  if (!Number.isSafeInteger(max) || max < 0) fail("Parameter 'max-connections' expects uint32");
  const s = new NbdServer({ exports: [], maxConnections: max === 0 ? UNLIMITED_CONNECTIONS : max, ...(opts.log === undefined ? {} : { log: opts.log }), ...(tls === undefined ? {} : { tls }) });
  // claimed before the await: a second start while this one binds is refused too
  server = s;
  try {
    await s.listen(addr);
  } catch (e) {
    server = null;
    await s.close().catch(() => undefined);
    throw e;
  }
}

/**
 * True while the NBD server runs.
 * @locking common
 */
export function nbdServerRunning(): boolean {
  return server !== null;
}

/**
 * Stops the NBD server: every NBD export is removed (its clients disconnected after their
 * requests in flight), then the listener closes. Returns the ids of the exports removed (QEMU
 * emits BLOCK_EXPORT_DELETED for each). "NBD server not running" when none runs.
 * @locking global-state
 */
export async function nbdServerStop(bql: Bql): Promise<string[]> {
  assertBql(bql, 'nbdServerStop');
  const s = server;
  if (s === null) fail('NBD server not running', 'ENOENT');
  const removed: string[] = [];
  for (const e of [...exports.values()]) {
    await removeEntry(bql, s, e, 'hard');
    removed.push(e.id);
  }
  server = null;
  await s.close();
  return removed;
}

/**
 * Adds an NBD export of a node, with QEMU's checks in QEMU's order: the id, a duplicate id, the
 * node, the iothread, writable over a read-only node, the server running, the export name taken.
 * @locking global-state
 */
export function blockExportAdd(bql: Bql, o: BlockExportOptions): void {
  assertBql(bql, 'blockExportAdd');
  if (!wellFormedId(o.id)) fail('Invalid block export id');
  if (exports.has(o.id)) fail(`Block export id '${o.id}' is already in use`, 'EINVAL');
  const node = allNodes.get(o.nodeName);
  if (node === undefined) fail(`Cannot find device='' nor node-name='${o.nodeName}'`, 'ENOENT');
  if (o.iothread !== undefined) {
    try {
      findIOThread(bql, o.iothread);
    } catch {
      fail(`iothread "${o.iothread}" not found`, 'ENOENT');
    }
  }
  const writable = o.writable ?? false;
  if (writable && node.readOnly) fail('Cannot export read-only node as writable', 'EACCES');
  const s = server;
  if (s === null) fail('NBD server not running', 'ENOENT');
  const name = o.name ?? o.nodeName;
  if (Buffer.byteLength(name, 'utf8') > NBD_MAX_STRING_BYTES) fail(`export name '${name}' too long`);
  if (o.description !== undefined && Buffer.byteLength(o.description, 'utf8') > NBD_MAX_STRING_BYTES) fail(`description '${o.description}' too long`);
  if (s.findExport(name) !== undefined) fail(`NBD server already has export named '${name}'`, 'EINVAL');
  // an internal backend: query-block does not list it (as QEMU, whose export backends have no name)
  const backend = blkNew(bql, `nbd-export.${o.id}`, node, { readOnly: !writable, internal: true });
  try {
    s.addExport({ name, backend, ...(o.description === undefined ? {} : { description: o.description }), allocationDepth: o.allocationDepth ?? false, cache: o.writethrough === true ? 'writethrough' : 'writeback' });
  } catch (e) {
    blkDelete(bql, backend);
    throw e;
  }
  exports.set(o.id, { id: o.id, nodeName: o.nodeName, name, backend, shuttingDown: false });
}

async function removeEntry(bql: Bql, s: NbdServer, e: ExportEntry, mode: 'safe' | 'hard'): Promise<void> {
  e.shuttingDown = true;
  try {
    await s.removeExport(e.name, mode);
  } catch (err) {
    e.shuttingDown = false;
    throw err;
  }
  exports.delete(e.id);
  blkDelete(bql, e.backend);
}

/**
 * Removes the export `id`: `safe` (the default) refuses while clients are connected ("export 'x'
 * still in use"), `hard` disconnects them once their requests in flight have finished.
 * @locking global-state
 */
export async function blockExportDel(bql: Bql, id: string, mode: 'safe' | 'hard' = 'safe'): Promise<void> {
  assertBql(bql, 'blockExportDel');
  const e = exports.get(id);
  if (e === undefined) fail(`Export '${id}' is not found`, 'ENOENT');
  if (e.shuttingDown) fail(`Block export '${id}' is already shutting down`, 'EBUSY');
  const s = server;
  if (s === null) fail(`Export '${id}' is not found`, 'ENOENT');
  if (mode === 'safe' && s.clientsOf(e.name) > 0) fail(`export '${id}' still in use`, 'EBUSY');
  await removeEntry(bql, s, e, mode);
}

/**
 * The exports, newest first (QEMU's order).
 * @locking global-state
 */
export function queryBlockExports(bql: Bql): BlockExportInfo[] {
  assertBql(bql, 'queryBlockExports');
  // the node the export serves now: after an external snapshot of it, the new overlay (as QEMU)
  return [...exports.values()].reverse().map((e) => ({ id: e.id, type: 'nbd', nodeName: e.backend.root?.nodeName ?? e.nodeName, shuttingDown: e.shuttingDown }));
}

/**
 * Shutdown: stops the server if one runs (exports removed, requests in flight finished first);
 * the ids of the exports removed, for BLOCK_EXPORT_DELETED.
 * @locking global-state
 */
export async function closeNbdExports(bql: Bql): Promise<string[]> {
  assertBql(bql, 'closeNbdExports');
  return server !== null ? nbdServerStop(bql) : [];
}

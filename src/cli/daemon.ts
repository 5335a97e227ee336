/**
 * `snapstack daemon`: qemu-storage-daemon's command line over snapstack's block layer, with QMP
 * monitors on sockets. Main-loop code: each option is applied in order, as QSD applies them
 * (`--blockdev` opens its node under the BQL through blockdev-add's code, `--object iothread`
 * starts an IOThread, `--chardev` binds its socket, `--monitor` serves QMP on it, `--nbd-server`
 * starts the NBD server, `--export type=nbd` exports a node on it); then the
 * pidfile is written and the daemon is ready (with `--daemonize`, the parent returns then).
 *
 * Shutdown (SIGTERM, SIGINT, SIGHUP, QMP `quit`): the monitors stop accepting and let their
 * running commands finish, the NBD server stops (its clients' requests in flight finish, then
 * they are disconnected), running jobs are cancelled and waited for, devices and nodes are
 * closed (image locks released), IOThreads stopped, the pidfile and the sockets removed; exit 0.
 * qemu-storage-daemon 7.2 dies on SIGHUP without cleaning up; snapstack treats it as SIGTERM.
 *
 * `--daemonize`: Node cannot fork, so the parent spawns itself again, detached (a new session),
 * with SNAPSTACK_DAEMON_CHILD=1 and a pipe on fd 3. The child runs the startup; once its sockets
 * listen and its pidfile exists it writes `ready` to the pipe, and the parent exits 0. A child
 * that fails prints its error (relayed by the parent) and the parent exits with its status.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import { withBql, type Bql } from '../block/bql.js';
import { blkDelete, blkList } from '../block/backend.js';
import { BlockError, isBlockError } from '../block/errors.js';
import { closeNode, listNodes } from '../block/graph.js';
import { createIOThread, listIOThreads } from '../block/iothread.js';
import { listJobs } from '../block/job.js';
import '../drivers/index.js';
import { blockExportAdd, closeNbdExports, nbdServerStart, type BlockExportOptions } from '../nbd/exports.js';
import type { NbdListenAddress } from '../nbd/server.js';
import { addTlsCreds, loadTlsCredsX509 } from '../nbd/tls-creds.js';
import { blockdevAdd } from '../qmp/blockdev-options.js';
import { listenAddressOf } from '../qmp/commands/nbd-exports.js';
import { qmpCommands } from '../qmp/command-table.js';
import { emitQmpEvent } from '../qmp/events.js';
import { JsonStream } from '../qmp/json-stream.js';
import { QmpError, type QmpObject, type QmpValue } from '../qmp/types.js';
import { Chardev, CHARDEV_HELP, parseChardevOption } from './chardev.js';
import { DAEMON_USAGE, daemonVersionText, parseDaemonArgs, type DaemonOption } from './daemon-args.js';
import { writeLockedPidfile, type HeldPidfile } from './pidfile.js';
import { parseKeyval } from './keyval.js';

const P = 'snapstack daemon';
/** The environment marker of a daemonized child, and the fd of its ready pipe. */
const CHILD_ENV = 'SNAPSTACK_DAEMON_CHILD';
const READY_FD = 3;
/** How long shutdown waits for a cancelled job to conclude. */
const JOB_CANCEL_WAIT_MS = 10_000;

/** The object types qemu-storage-daemon knows (`--object help`); snapstack builds iothread. */
const QEMU_OBJECT_TYPES = ['authz-list', 'authz-list-file', 'authz-simple', 'iothread', 'main-loop', 'pr-manager-helper', 'secret', 'secret_keyring', 'tls-creds-anon', 'tls-creds-psk', 'tls-creds-x509', 'tls-cipher-suites', 'throttle-group'];
/** iothread's properties (QEMU's IOThread object); only poll-max-ns changes anything here. */
const IOTHREAD_PROPS = ['aio-max-batch', 'poll-grow', 'poll-max-ns', 'poll-shrink', 'thread-pool-max', 'thread-pool-min'];
const INT64_MAX_TEXT = '9223372036854775807';

function fail(message: string): never {
  throw new BlockError('EINVAL', message);
}

/** The text after "snapstack daemon: --opt VALUE: " for an error. */
function messageOf(e: unknown): string {
  if (e instanceof QmpError) return e.desc;
  if (isBlockError(e)) return e.message;
  return e instanceof Error ? e.message : String(e);
}

/** A string member of a keyval object (nested objects are not what these options take). */
function scalar(o: QmpObject, key: string, expected: string): string | undefined {
  const v = o[key];
  if (v === undefined) return undefined;
  if (typeof v !== 'string') fail(`Invalid parameter type for '${key}', expected: ${expected}`);
  return v;
}

/** An option's object: JSON when it starts with '{' (QMP's strict types), else keyval (strings). */
function parseStructuredOption(text: string, impliedKey: string | null): { options: QmpObject; strict: boolean } {
  if (text.startsWith('{')) {
    const stream = new JsonStream();
    const items = [...stream.push(Buffer.from(text, 'utf8')), ...stream.end()];
    const first = items[0];
    if (first === undefined) fail('JSON parse error, premature EOI');
    if (!first.ok) fail(first.error.startsWith('JSON parse error') ? first.error : `JSON parse error, ${first.error}`);
    if (items.length > 1) fail('Expecting at most one JSON value');
    const v: QmpValue = first.value;
    if (typeof v !== 'object' || v === null || Array.isArray(v)) fail('Invalid parameter type, expected: object');
    return { options: v, strict: true };
  }
  const { value, help } = parseKeyval(text, impliedKey);
  if (help) fail('Help is not available for this option');
  return { options: value, strict: false };
}

/** `--blockdev`: JSON when it starts with '{' (QMP's strict types), else keyval (strings). */
export function parseBlockdevOption(text: string): { options: QmpObject; strict: boolean } {
  return parseStructuredOption(text, 'driver');
}

/** A boolean member: on/off (and QEMU's yes/no, true/false) in keyval, a JSON boolean in JSON. */
function flag(o: QmpObject, key: string, strict: boolean): boolean | undefined {
  const v = o[key];
  if (v === undefined) return undefined;
  if (strict) {
    if (typeof v !== 'boolean') fail(`Invalid parameter type for '${key}', expected: boolean`);
    return v;
  }
  if (v === 'on' || v === 'yes' || v === 'true') return true;
  if (v === 'off' || v === 'no' || v === 'false') return false;
  return fail(`Parameter '${key}' expects 'on' or 'off'`);
}

/** What `--nbd-server` asks: the listen address and the server's options. */
export interface NbdServerRequest {
  addr: NbdListenAddress;
  maxConnections?: number;
  tlsCreds?: string;
}

/** `--nbd-server addr.type=unix,addr.path=P` or `addr.type=inet,addr.host=H,addr.port=N` (QSD's NbdServerOptions; JSON too). */
export function parseNbdServerOption(text: string): NbdServerRequest {
  const { options: o, strict } = parseStructuredOption(text, null);
  for (const key of Object.keys(o)) if (!['addr', 'max-connections', 'tls-creds', 'tls-authz'].includes(key)) fail(`Parameter '${key}' is unexpected`);
  const addr = o['addr'];
  if (addr === undefined) fail("Parameter 'addr' is missing");
  if (typeof addr !== 'object' || addr === null || Array.isArray(addr)) fail("Invalid parameter type for 'addr', expected: object");
  let listen: NbdListenAddress;
  try {
    listen = listenAddressOf(addr, 'addr');
  } catch (e) {
    fail(messageOf(e));
  }
  const req: NbdServerRequest = { addr: listen };
  const max = o['max-connections'];
  if (max !== undefined) {
    const n = strict ? max : Number(max);
    if (typeof n !== 'number' || !Number.isSafeInteger(n) || n < 0 || n > 0xffffffff || (!strict && !/^\d+$/.test(String(max)))) fail("Parameter 'max-connections' expects uint32");
    req.maxConnections = n;
  }
  const tls = scalar(o, 'tls-creds', 'string');
  if (tls !== undefined) req.tlsCreds = tls;
  if (scalar(o, 'tls-authz', 'string') !== undefined && tls === undefined) fail("'tls-authz' requires that 'tls-creds' is set");
  if (scalar(o, 'tls-authz', 'string') !== undefined) fail('tls-authz is not supported by snapstack (tls-creds with verify-peer=on accepts every client certificate the CA signed)');
  return req;
}

const EXPORT_KEYS = ['type', 'id', 'node-name', 'name', 'description', 'writable', 'writethrough', 'allocation-depth', 'iothread', 'fixed-iothread', 'bitmaps'];

/** `--export [type=]nbd,id=E,node-name=N[,name=NAME][,writable=on][,description=..][,allocation-depth=on]` (JSON too). */
export function parseExportOption(text: string): BlockExportOptions {
  const { options: o, strict } = parseStructuredOption(text, 'type');
  const type = scalar(o, 'type', 'string');
  if (type === undefined) fail("Parameter 'type' is missing");
  if (!['nbd', 'vhost-user-blk', 'fuse', 'vduse-blk'].includes(type)) fail(`Parameter 'type' does not accept value '${type}'`);
  if (type !== 'nbd') fail(`Block export type '${type}' is not supported by snapstack (nbd is)`);
  for (const key of Object.keys(o)) if (!EXPORT_KEYS.includes(key)) fail(`Parameter '${key}' is unexpected`);
  if (o['bitmaps'] !== undefined) fail('Exporting dirty bitmaps (qemu:dirty-bitmap:*) is not supported by snapstack');
  const id = scalar(o, 'id', 'string');
  if (id === undefined) fail("Parameter 'id' is missing");
  const nodeName = scalar(o, 'node-name', 'string');
  if (nodeName === undefined) fail("Parameter 'node-name' is missing");
  const out: BlockExportOptions = { id, nodeName };
  const name = scalar(o, 'name', 'string');
  if (name !== undefined) out.name = name;
  const description = scalar(o, 'description', 'string');
  if (description !== undefined) out.description = description;
  const iothread = scalar(o, 'iothread', 'string');
  if (iothread !== undefined) out.iothread = iothread;
  const writable = flag(o, 'writable', strict);
  if (writable !== undefined) out.writable = writable;
  const writethrough = flag(o, 'writethrough', strict);
  if (writethrough !== undefined) out.writethrough = writethrough;
  const depth = flag(o, 'allocation-depth', strict);
  if (depth !== undefined) out.allocationDepth = depth;
  flag(o, 'fixed-iothread', strict);
  return out;
}

/** What an --object asks: an IOThread, or help text to print. */
type ObjectRequest = { kind: 'iothread'; id: string; pollMaxNs: number | undefined } | { kind: 'tls-creds-x509'; props: Record<string, string> } | { kind: 'help'; text: string };
/** tls-creds-x509's properties (QEMU's; priority and passwordid are refused when the object is made). */
const TLS_X509_PROPS = ['dir', 'endpoint', 'verify-peer', 'sanity-check', 'loaded', 'priority', 'passwordid'];

/** `--object iothread,id=ID[,poll-max-ns=N]` (and `help`, `iothread,help`), with QEMU's messages. */
export function parseObjectOption(text: string): ObjectRequest {
  const { value: o, help } = parseKeyval(text, 'qom-type');
  const type = scalar(o, 'qom-type', 'string');
  if (help && type === undefined) return { kind: 'help', text: 'List of user creatable objects:\n  iothread\n  tls-creds-x509' };
  if (type === undefined) fail("Parameter 'qom-type' is missing");
  if (type === 'tls-creds-x509') {
    if (help) return { kind: 'help', text: `tls-creds-x509 options:\n${TLS_X509_PROPS.map((p) => `  ${p}=<${p === 'endpoint' ? 'client|server' : p === 'dir' || p === 'priority' || p === 'passwordid' ? 'str' : 'bool'}>`).join('\n')}` };
    const props: Record<string, string> = {};
    for (const key of Object.keys(o)) {
      if (key === 'qom-type') continue;
      if (key !== 'id' && !TLS_X509_PROPS.includes(key)) fail(`Parameter '${key}' is unexpected`);
      props[key] = scalar(o, key, 'string') ?? '';
    }
    if (props['id'] === undefined) fail("Parameter 'id' is missing");
    return { kind: 'tls-creds-x509', props };
  }
  if (type !== 'iothread') {
    if (QEMU_OBJECT_TYPES.includes(type)) fail(`object type '${type}' is not supported by snapstack (it has iothread and tls-creds-x509 objects only)`);
    fail(`Parameter 'qom-type' does not accept value '${type}'`);
  }
  if (help) return { kind: 'help', text: `iothread options:\n${IOTHREAD_PROPS.map((p) => `  ${p}=<int>`).join('\n')}` };
  const id = scalar(o, 'id', 'string');
  if (id === undefined) fail("Parameter 'id' is missing");
  let pollMaxNs: number | undefined;
  for (const key of Object.keys(o)) {
    if (key === 'qom-type' || key === 'id') continue;
    if (!IOTHREAD_PROPS.includes(key)) fail(`Parameter '${key}' is unexpected`);
    const v = scalar(o, key, 'integer') ?? '';
    if (!/^-?\d+$/.test(v)) fail(`Parameter '${key}' expects integer`);
    if (v.startsWith('-')) fail(`${key} value must be in range [0, ${INT64_MAX_TEXT}]`);
    if (key === 'poll-max-ns') {
      const n = Number(v);
      if (!Number.isSafeInteger(n)) fail(`${key} value must be in range [0, ${INT64_MAX_TEXT}]`);
      pollMaxNs = n;
    }
  }
  return { kind: 'iothread', id, pollMaxNs };
}

/** `--monitor [chardev=]ID[,mode=control][,pretty=off][,id=..]`: the chardev it serves. */
export function parseMonitorOption(text: string): string {
  const { value: o, help } = parseKeyval(text, 'chardev');
  if (help) fail('Help is not available for this option');
  for (const key of Object.keys(o)) if (!['id', 'mode', 'pretty', 'chardev'].includes(key)) fail(`Parameter '${key}' is unexpected`);
  const chardev = scalar(o, 'chardev', 'string');
  if (chardev === undefined) fail("Parameter 'chardev' is missing");
  const mode = scalar(o, 'mode', 'string');
  if (mode === 'readline') fail('Only QMP is supported');
  if (mode !== undefined && mode !== 'control') fail(`Parameter 'mode' does not accept value '${mode}'`);
  const pretty = scalar(o, 'pretty', 'boolean');
  if (pretty !== undefined && pretty !== 'on' && pretty !== 'off') fail("Parameter 'pretty' expects 'on' or 'off'");
  if (pretty === 'on') fail('pretty=on is not supported by snapstack (replies are one line each)');
  return chardev;
}

/** Closes every job, device and node, parents before children (what bdrv_close_all does). */
async function closeBlockLayer(): Promise<void> {
  const jobs = await withBql((bql) => {
    const running = listJobs(bql).filter((j) => !['concluded', 'null'].includes(j.status));
    for (const j of running) {
      try {
        j.cancel(bql);
      } catch {
        // a job past the point of cancelling: it concludes by itself
      }
    }
    return running;
  });
  await Promise.race([Promise.all(jobs.map((j) => j.whenConcluded())), new Promise((r) => setTimeout(r, JOB_CANCEL_WAIT_MS).unref())]);
  await withBql(async (bql) => {
    for (const blk of blkList(bql)) {
      try {
        blkDelete(bql, blk);
      } catch {
        // requests still in flight: its node stays open below and is reported
      }
    }
    await closeAllNodes(bql);
  });
}

async function closeAllNodes(bql: Bql): Promise<void> {
  // a node linked by name (backing=NODE) has its overlay as parent: roots first, then again
  for (let round = 0; round <= 64; round++) {
    const roots = listNodes(bql).filter((n) => n.parents.size === 0);
    if (roots.length === 0) return;
    for (const n of roots) await closeNode(bql, n);
  }
}

/** The daemon's state while it runs. */
class DaemonState {
  readonly chardevs = new Map<string, Chardev>();
  pidfile: string | null = null;
  /** The pidfile written and locked, released at shutdown. */
  heldPidfile: HeldPidfile | null = null;
  #stop: (why: string) => void = () => undefined;
  readonly stopped: Promise<string>;
  /** Set once a signal or QMP quit asked for the shutdown. */
  stopRequested = false;

  constructor() {
    this.stopped = new Promise((resolve) => (this.#stop = resolve));
  }

  /** Asks the daemon to shut down (a signal, QMP quit). */
  requestStop(why: string): void {
    this.stopRequested = true;
    this.#stop(why);
  }

  /** Everything the daemon opened, closed again. */
  async shutdown(): Promise<void> {
    // the NBD server first: its clients' requests in flight finish before the nodes close, and
    // the monitors still hear BLOCK_EXPORT_DELETED for each export (as qemu-storage-daemon)
    const removed = await withBql((bql) => closeNbdExports(bql)).catch(() => [] as string[]);
    for (const id of removed) emitQmpEvent('BLOCK_EXPORT_DELETED', { id });
    await new Promise<void>((resolve) => setImmediate(resolve));
    await Promise.all([...this.chardevs.values()].map((c) => c.close()));
    await closeBlockLayer();
    this.heldPidfile?.release();
    this.heldPidfile = null;
  }
}

/** Applies one option; returns help text to print and exit with, or null. */
async function applyOption(state: DaemonState, o: DaemonOption, err: (s: string) => void): Promise<string | null> {
  switch (o.name) {
    case 'help':
      return DAEMON_USAGE;
    case 'version':
      return daemonVersionText();
    case 'trace':
    case 'daemonize':
      return null;
    case 'pidfile':
      state.pidfile = o.value;
      return null;
    case 'nbd-server': {
      const req = parseNbdServerOption(o.value);
      await withBql((bql) =>
        nbdServerStart(bql, req.addr, {
          ...(req.maxConnections === undefined ? {} : { maxConnections: req.maxConnections }),
          ...(req.tlsCreds === undefined ? {} : { tlsCreds: req.tlsCreds }),
          log: (line) => err(`${P}: ${line}`),
        }),
      );
      return null;
    }
    case 'export': {
      const req = parseExportOption(o.value);
      await withBql((bql) => blockExportAdd(bql, req));
      return null;
    }
    case 'blockdev': {
      const { options, strict } = parseBlockdevOption(o.value);
      await withBql((bql) => blockdevAdd(bql, options, { strict }));
      return null;
    }
    case 'object': {
      const req = parseObjectOption(o.value);
      if (req.kind === 'help') return req.text;
      if (req.kind === 'tls-creds-x509') {
        // the files are read now, as QEMU does: a missing one fails the option, named
        addTlsCreds(loadTlsCredsX509(req.props));
        return null;
      }
      await withBql((bql) => {
        if (listIOThreads(bql).some((t) => t.id === req.id)) fail(`attempt to add duplicate property '${req.id}' to object (type 'container')`);
        createIOThread(bql, req.id, req.pollMaxNs === undefined ? {} : { pollMaxNs: req.pollMaxNs });
      });
      return null;
    }
    case 'chardev': {
      const spec = parseChardevOption(o.value);
      if (spec === null) return CHARDEV_HELP;
      if (state.chardevs.has(spec.id)) fail(`Duplicate ID '${spec.id}' for chardev`);
      state.chardevs.set(spec.id, await Chardev.open(spec, (info) => err(`${P}: ${o.text}: ${info}`), state.stopped));
      return null;
    }
    case 'monitor': {
      const id = parseMonitorOption(o.value);
      const dev = state.chardevs.get(id);
      if (dev === undefined) fail(`chardev "${id}" not found`);
      await dev.attachMonitor({ commands: qmpCommands({ machine: false }), machine: null, onQuit: () => state.requestStop('quit') });
      return null;
    }
  }
  return null;
}

/** The parent of `--daemonize`: starts the detached child and waits until it is ready or fails. */
function daemonizeParent(argv: readonly string[], err: (s: string) => void): Promise<number> {
  const bin = new URL('../../bin/snapstack.js', import.meta.url);
  const child = spawn(process.execPath, [...process.execArgv, bin.pathname, 'daemon', ...argv], {
    detached: true,
    stdio: ['ignore', 'ignore', 'pipe', 'pipe'],
    env: { ...process.env, [CHILD_ENV]: '1' },
  });
  return new Promise((resolve) => {
    let settled = false;
    const finish = (status: number): void => {
      if (settled) return;
      settled = true;
      child.stderr?.destroy();
      child.stdio[READY_FD]?.destroy();
      child.unref();
      resolve(status);
    };
    let pending = '';
    child.stderr?.setEncoding('utf8');
    child.stderr?.on('data', (chunk: string) => {
      pending += chunk;
      for (let nl = pending.indexOf('\n'); nl >= 0; nl = pending.indexOf('\n')) {
        err(pending.slice(0, nl));
        pending = pending.slice(nl + 1);
      }
    });
    const ready = child.stdio[READY_FD];
    ready?.on('data', (d: Buffer) => {
      if (d.toString('utf8').includes('ready')) finish(0);
    });
    ready?.on('error', () => undefined);
    child.on('error', (e) => {
      err(`${P}: cannot start the daemon process: ${e.message}`);
      finish(1);
    });
    child.on('exit', (code) => {
      if (pending !== '') err(pending);
      pending = '';
      finish(code ?? 1);
    });
  });
}

/** Tells the waiting parent that the daemonized child is ready, and detaches from its stderr. */
function signalReady(): void {
  try {
    fs.writeSync(READY_FD, 'ready\n');
    fs.closeSync(READY_FD);
  } catch {
    // the parent is gone: nobody waits
  }
}

/**
 * Runs `snapstack daemon ARGS` (qemu-storage-daemon's options); returns the exit status once the
 * daemon has shut down (0), or 1 when the command line or the startup fails.
 */
export async function daemonMain(argv: string[], out: (s: string) => void, err: (s: string) => void): Promise<number> {
  let options: DaemonOption[];
  try {
    options = parseDaemonArgs(argv);
  } catch (e) {
    err(`${P}: ${messageOf(e)}`);
    return 1;
  }
  const isChild = process.env[CHILD_ENV] === '1';
  const wantsText = options.some((o) => o.name === 'help' || o.name === 'version');
  if (!isChild && !wantsText && options.some((o) => o.name === 'daemonize')) return daemonizeParent(argv, err);
  let detached = false;
  const log = (s: string): void => {
    if (!detached) err(s);
  };
  if (isChild) process.stderr.on('error', () => undefined);
  const state = new DaemonState();
  const signals: NodeJS.Signals[] = ['SIGTERM', 'SIGINT', 'SIGHUP'];
  const onSignal = (sig: NodeJS.Signals): void => state.requestStop(sig);
  for (const s of signals) process.on(s, onSignal);
  try {
    for (const o of options) {
      let text: string | null;
      try {
        text = await applyOption(state, o, log);
      } catch (e) {
        // a signal during the startup (waiting for a chardev's client): a clean exit, as asked
        if (state.stopRequested) {
          await state.shutdown();
          return 0;
        }
        log(`${P}: ${o.text}: ${messageOf(e)}`);
        await state.shutdown();
        return 1;
      }
      if (text !== null) {
        out(text);
        await state.shutdown();
        return 0;
      }
    }
    if (state.stopRequested) {
      await state.shutdown();
      return 0;
    }
    if (state.pidfile !== null) {
      try {
        state.heldPidfile = writeLockedPidfile(state.pidfile);
      } catch (e) {
        log(`${P}: cannot create PID file: ${messageOf(e)}`);
        await state.shutdown();
        return 1;
      }
    }
    if (isChild) {
      signalReady();
      detached = true;
    }
    // a daemon with nothing listening (no monitor, no export) still runs until a signal or quit,
    // as qemu-storage-daemon does: the timer keeps the event loop alive while it waits
    const keepAlive = setInterval(() => undefined, 1 << 30);
    try {
      await state.stopped;
    } finally {
      clearInterval(keepAlive);
    }
    await state.shutdown();
    return 0;
  } finally {
    for (const s of signals) process.off(s, onSignal);
  }
}

/**
 * Protocol driver `nbd`: an export of an NBD server as a node (QEMU's block/nbd.c), over the
 * client in src/nbd/client.ts.
 *
 * Options, as QEMU's: `server.type=inet|unix`, `server.host`, `server.port` (default 10809),
 * `server.path`, `export` (default ''), `reconnect-delay` and `open-timeout` (seconds, default
 * 0: a lost connection fails at once, a first connection is tried once), `tls-creds=ID` (a
 * tls-creds-x509 object with endpoint=client, made by `--object`: every connection, reconnects
 * too, starts with NBD_OPT_STARTTLS) and `tls-hostname` (the name the server's certificate must
 * carry; default the inet host; a unix socket checks the CA only); or `filename=` an NBD URL
 * (`nbd://host:port/export`, `nbd+unix:///export?socket=PATH`), which may not be combined with
 * `server.*` / `export` (tls-creds may).
 *
 * The export's size is fixed: writes past it fail with ENOSPC, reads past it return zeros
 * (as the file driver's), truncate to another size is refused. A read-only export opens only
 * read-only. Block status comes from the server's base:allocation context where it has one.
 *
 * Global-state code: open and close run on the main loop with the BQL; the I/O callbacks are
 * I/O code (requests are pipelined on the one connection, any number in flight).
 */
import { assertBql, type Bql } from '../../block/bql.js';
import { assertDrained, type DrainedProof } from '../../block/drain.js';
import { registerDriver, type BlockDriver, type BlockDriverInstance, type BlockStatus, type WriteFlags, type WriteZeroesFlags } from '../../block/driver.js';
import { BlockError } from '../../block/errors.js';
import type { BlockNode } from '../../block/node.js';
import type { NodeOptions } from '../../block/options.js';
import { NBD_DEFAULT_PORT, NBD_STATE_HOLE, NBD_STATE_ZERO } from '../../nbd/client-proto.js';
import { NbdClient, type NbdAddress, type NbdWriteFlags } from '../../nbd/client.js';
import { findTlsCreds, type TlsCredsX509 } from '../../nbd/tls-creds.js';
import { formatNbdUrl, isNbdFilename, parseNbdFilename, type NbdTarget } from './url.js';

/** Options the driver knows; `aio`, `locking` and `force-share` are file options the easy API may pass on, and mean nothing here. */
/** The client's flags of a FUA write, made once. */
const FUA: NbdWriteFlags = Object.freeze({ fua: true });
const KNOWN = new Set(['filename', 'server.type', 'server.host', 'server.port', 'server.path', 'export', 'reconnect-delay', 'open-timeout', 'tls-creds', 'tls-hostname', 'aio', 'locking', 'force-share']);
/** The largest reconnect-delay / open-timeout accepted (seconds). */
const MAX_RECONNECT_DELAY_SEC = 3600;

function optError(node: BlockNode, field: string, why: string, value?: string): BlockError {
  return new BlockError('EINVAL', `${why} (driver 'nbd', node '${node.nodeName}')`, { node: node.nodeName, field, ...(value === undefined ? {} : { value }) });
}

/**
 * Works out the server and export from the node's options.
 * @locking common
 */
export function nbdTargetFromOptions(node: BlockNode, opts: NodeOptions): NbdTarget {
  for (const k of Object.keys(opts)) if (!KNOWN.has(k)) throw optError(node, k, `Invalid parameter '${k}'`, k);
  const filename = opts['filename'];
  const serverKeys = Object.keys(opts).filter((k) => k.startsWith('server.') || k === 'export');
  if (filename !== undefined && filename !== '') {
    if (serverKeys.length > 0) throw optError(node, serverKeys[0] ?? 'server', `An NBD file name ('${filename}') cannot be combined with '${serverKeys.join("', '")}'`);
    if (!isNbdFilename(filename)) throw optError(node, 'filename', `'${filename}' is not an NBD URL (nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)`, filename);
    return parseNbdFilename(filename);
  }
  const type = opts['server.type'];
  if (type === undefined) throw optError(node, 'server.type', "Parameter 'server.type' is required (inet or unix), or give an NBD URL as the file name");
  let address: NbdAddress;
  if (type === 'unix') {
    const path = opts['server.path'];
    if (path === undefined || path === '') throw optError(node, 'server.path', "Parameter 'server.path' is required for server.type=unix");
    for (const k of ['server.host', 'server.port']) if (opts[k] !== undefined) throw optError(node, k, `Parameter '${k}' is unexpected with server.type=unix`);
    address = { type: 'unix', path };
  } else if (type === 'inet') {
    const host = opts['server.host'];
    if (host === undefined || host === '') throw optError(node, 'server.host', "Parameter 'server.host' is required for server.type=inet");
    if (opts['server.path'] !== undefined) throw optError(node, 'server.path', "Parameter 'server.path' is unexpected with server.type=inet");
    const portText = opts['server.port'] ?? String(NBD_DEFAULT_PORT);
    if (!/^\d{1,5}$/.test(portText) || Number(portText) < 1 || Number(portText) > 65535) {
      throw optError(node, 'server.port', `Invalid server.port '${portText}': a number between 1 and 65535`, portText);
    }
    address = { type: 'inet', host, port: Number(portText) };
  } else {
    throw optError(node, 'server.type', `Invalid server.type '${type}': inet or unix (fd and vsock are not supported)`, type);
  }
  return { address, exportName: opts['export'] ?? '' };
}

/**
 * The TLS credentials `tls-creds` names (a client endpoint) and `tls-hostname`, or undefined.
 * @locking common
 */
export function tlsFromOptions(node: BlockNode, opts: NodeOptions): { creds: TlsCredsX509; hostname: string | undefined } | undefined {
  const id = opts['tls-creds'];
  const hostname = opts['tls-hostname'];
  if (id === undefined || id === '') {
    if (hostname !== undefined) throw optError(node, 'tls-hostname', "Parameter 'tls-hostname' needs 'tls-creds'");
    return undefined;
  }
  try {
    return { creds: findTlsCreds(id, 'client'), hostname: hostname === '' ? undefined : hostname };
  } catch (e) {
    if (e instanceof BlockError) throw new BlockError(e.code, `${e.message} (driver 'nbd', node '${node.nodeName}', option tls-creds)`, { node: node.nodeName, field: 'tls-creds', value: id });
    throw e;
  }
}

/**
 * A whole-seconds option (reconnect-delay, open-timeout): 0 when absent.
 * @locking common
 */
export function secondsOption(node: BlockNode, opts: NodeOptions, key: 'reconnect-delay' | 'open-timeout'): number {
  const text = opts[key];
  if (text === undefined) return 0;
  if (!/^\d+$/.test(text) || Number(text) > MAX_RECONNECT_DELAY_SEC) {
    throw optError(node, key, `Invalid ${key} '${text}': whole seconds from 0 to ${MAX_RECONNECT_DELAY_SEC}`, text);
  }
  return Number(text);
}

/** An open NBD node: its client. */
class NbdInstance implements BlockDriverInstance {
  constructor(
    private readonly node: BlockNode,
    readonly client: NbdClient,
    private readonly target: NbdTarget,
  ) {}

  /**
   * Reads from the export (pipelined, split at the server's maximum).
   * @locking io
   */
  preadv(offset: number, buf: Uint8Array): Promise<void> {
    return this.client.read(offset, buf);
  }

  /**
   * Writes to the export; ENOSPC past its end.
   * @locking io
   */
  pwritev(offset: number, buf: Uint8Array, flags?: WriteFlags): Promise<void> {
    return flags?.fua === true ? this.client.write(offset, buf, FUA) : this.client.write(offset, buf);
  }

  /**
   * FUA is sent as NBD_CMD_FLAG_FUA (the client flushes after the write on a server without it).
   * @locking io
   */
  readonly supportsFua = true;

  /**
   * NBD_CMD_WRITE_ZEROES (NO_HOLE unless the range may be unmapped).
   * @locking io
   */
  pwriteZeroes(offset: number, bytes: number, flags: WriteZeroesFlags): Promise<void> {
    return this.client.writeZeroes(offset, bytes, { mayUnmap: flags.mayUnmap === true, fua: flags.fua === true });
  }

  /**
   * NBD_CMD_TRIM where the server has it.
   * @locking io
   */
  pdiscard(offset: number, bytes: number): Promise<void> {
    return this.client.trim(offset, bytes);
  }

  /**
   * NBD_CMD_FLUSH where the server has it.
   * @locking io
   */
  flush(): Promise<void> {
    return this.client.flush();
  }

  /**
   * The export's size.
   * @locking io
   */
  getLength(): number {
    return this.client.sizeBytes;
  }

  /**
   * An export cannot change size: only its own size is accepted.
   * @locking io
   */
  async truncate(sizeBytes: number): Promise<void> {
    if (sizeBytes === this.client.sizeBytes) return;
    throw new BlockError('ENOTSUP', `Cannot ${sizeBytes > this.client.sizeBytes ? 'grow' : 'shrink'} NBD node '${this.node.nodeName}' (${this.client.sizeBytes} bytes) to ${sizeBytes} bytes`, {
      node: this.node.nodeName,
      op: 'truncate',
    });
  }

  /**
   * base:allocation: a hole is unallocated, a zero extent reads as zeros; data everywhere when the server has no block status.
   * @locking io
   */
  async blockStatus(offset: number, bytes: number): Promise<BlockStatus> {
    const ext = await this.client.blockStatus(offset, bytes);
    if (ext === null) return { bytes, data: true, zero: false, allocated: true, hostOffset: offset };
    const data = (ext.flags & NBD_STATE_HOLE) === 0;
    const zero = (ext.flags & NBD_STATE_ZERO) !== 0;
    return { bytes: ext.bytes, data, zero, allocated: data || zero, hostOffset: offset };
  }

  /**
   * The server, the export and what it negotiated, for query-named-block-nodes.
   * @locking io
   */
  formatSpecific(): Record<string, unknown> {
    const i = this.client.info;
    return {
      type: 'nbd',
      data: {
        url: formatNbdUrl(this.target),
        'min-block-size': i.minBlockBytes,
        'preferred-block-size': i.preferredBlockBytes,
        'max-block-size': i.maxBlockBytes,
        'structured-replies': i.structuredReplies,
        'block-status': i.baseAllocationId !== null,
      },
    };
  }

  /**
   * Sends NBD_CMD_DISC and closes the connection (the node is quiet).
   * @locking global-state
   */
  async close(bql: Bql, drained: DrainedProof): Promise<void> {
    assertDrained(bql, drained, this.node, 'nbd close');
    await this.client.close();
  }
}

/**
 * The `nbd` protocol driver. `protocolNames` are the file-name prefixes that select it (QEMU's
 * protocol_name: nbd, nbd+tcp, nbd+unix), for the block layer's file-name lookup.
 */
export const nbdDriver: BlockDriver & { readonly protocolNames: readonly string[] } = {
  formatName: 'nbd',
  kind: 'protocol',
  protocolNames: ['nbd', 'nbd+tcp', 'nbd+unix'],
  /**
   * Connects to the server and negotiates the export; a writable node needs a writable export.
   * @locking global-state
   */
  async open(bql: Bql, node: BlockNode, opts: NodeOptions): Promise<BlockDriverInstance> {
    assertBql(bql, `nbd open (node '${node.nodeName}')`);
    const target = nbdTargetFromOptions(node, opts);
    const tls = tlsFromOptions(node, opts);
    const client = await NbdClient.connect({
      address: target.address,
      exportName: target.exportName,
      ...(tls === undefined ? {} : { tls: tls.creds, ...(tls.hostname === undefined ? {} : { tlsHostname: tls.hostname }) }),
      reconnectDelaySec: secondsOption(node, opts, 'reconnect-delay'),
      openTimeoutSec: secondsOption(node, opts, 'open-timeout'),
    });
    if (client.readOnly && !node.readOnly) {
      await client.close();
      throw new BlockError('EACCES', `NBD export ${client.where} is read-only: open node '${node.nodeName}' with read-only=on`, { node: node.nodeName, field: 'read-only' });
    }
    return new NbdInstance(node, client, target);
  },
};

registerDriver(nbdDriver);

/**
 * The NBD server: exports BlockBackends to NBD clients (qemu-img, qemu-io, nbdinfo, nbdcopy, the
 * kernel's nbd-client) over unix or TCP sockets, speaking doc/proto.md's fixed newstyle protocol.
 *
 * Calling context: the main loop. Starting and stopping the server need no lock (the exports'
 * backends were made by the caller, under the BQL); every request is I/O code through the
 * export's BlockBackend (blkPread, blkPwrite, ...), so drained sections hold export requests back
 * like a device's, and snapshots and image locks apply to them.
 *
 * One connection, two phases:
 * - handshake: greeting, client flags, then options one at a time, each bounded to
 *   MAX_OPTION_BYTES (bigger: NBD_REP_ERR_TOO_BIG and the connection is dropped), at most
 *   MAX_OPTIONS of them, all within `handshakeTimeoutMs`;
 * - transmission: requests are read in order and run concurrently; each reply is written whole
 *   (header and data in one go, never interleaved with another) as its request completes, so
 *   replies come out of order. At most `maxInFlight` requests and MAX_INFLIGHT_BYTES of payload
 *   run per connection; past that, and while the socket's write side is full, the reader stops
 *   and TCP holds the client back.
 *
 * A protocol violation we cannot answer (bad request magic, unknown client flags, EOF inside a
 * request) closes that connection only. NBD_CMD_DISC and server shutdown finish the requests in
 * flight, then close.
 *
 * CAN_MULTI_CONN is advertised when more than one connection is served at once (as qemu-nbd
 * with --shared above 1): all connections to an export share one BlockBackend and so one node
 * graph and one cache, a completed write is visible to every connection's later reads, and a
 * FLUSH on any connection flushes the node (every write completed before it, from any
 * connection, is then durable) — what the spec asks of a server that sets the flag.
 *
 * TLS (`tls`, a tls-creds-x509 object for a server endpoint): QEMU's forced-TLS mode. Before
 * NBD_OPT_STARTTLS every option but STARTTLS and ABORT is answered NBD_REP_ERR_TLS_REQD (and
 * NBD_OPT_EXPORT_NAME, which has no error reply, closes the connection); STARTTLS is acknowledged
 * and the TLS handshake runs on the same socket within the handshake timeout, then haggling goes
 * on inside TLS and transmission runs over the TLS socket unchanged. A failed handshake (garbage
 * for a ClientHello, a certificate the CA did not sign) closes that connection only. Without
 * `tls`, STARTTLS is refused with NBD_REP_ERR_POLICY.
 *
 * Not built: extended headers, NBD_CMD_CACHE / NBD_CMD_RESIZE (not advertised),
 * `qemu:dirty-bitmap:*`, TLS authorization (tls-authz).
 */
import { EventEmitter } from 'node:events';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { blkFlush, blkGetLength, blkPdiscard, blkPread, blkPwrite, blkPwriteZeroes, type BlockBackend } from '../block/backend.js';
import type { WriteFlags } from '../block/driver.js';
import { BlockError, isBlockError, systemErrorText } from '../block/errors.js';
import { exportExtents, type ExtentContext } from './extents.js';
import * as P from './protocol.js';
import { MIN_POOLED_BYTES, SharedBufferPool } from './buffer-pool.js';
import { SocketReader } from './socket-reader.js';
import type { TlsCredsX509 } from './tls-creds.js';
import { tlsServerHandshake } from './tls-session.js';

/** The largest option payload accepted during the handshake. */
export const MAX_OPTION_BYTES = 64 * 1024;
/** Options one handshake may send before it is cut off. */
export const MAX_OPTIONS = 1024;
/** The largest READ/WRITE payload (the spec's portable 32 MiB), advertised as maximum block size. */
export const MAX_REQUEST_BYTES = P.NBD_MAX_PAYLOAD_BYTES;
/** Payload bytes one connection may hold in flight (reads being answered, writes being done). */
export const MAX_INFLIGHT_BYTES = 64 * 1024 * 1024;
/** Payload bytes all connections together may hold in flight (default of `maxInFlightBytes`). */
export const MAX_SERVER_INFLIGHT_BYTES = 512 * 1024 * 1024;
/** The most extents one BLOCK_STATUS reply carries. */
export const MAX_EXTENTS = 65536;
/** Reads at least this long are answered sparsely (OFFSET_HOLE for zero ranges) over structured replies. */
export const SPARSE_READ_MIN_BYTES = 64 * 1024;
/** The flags of a FUA write, made once. */
const FUA_WRITE: WriteFlags = Object.freeze({ fua: true });
/** The meta contexts and the ids this server gives them. */
const QEMU_ALLOCATION_DEPTH = 'qemu:allocation-depth';
const META_CONTEXT_IDS: Readonly<Record<ExtentContext, number>> = { 'base:allocation': 1, 'qemu:allocation-depth': 2 };

/** One export: a name and the backend its requests go through. */
export interface NbdExport {
  name: string;
  description?: string;
  backend: BlockBackend;
  /**
   * What FLUSH and FUA do: `writeback` (flush the node), `writethrough` (every write is flushed
   * before it is acknowledged), `unsafe` (flushes are acknowledged without flushing).
   */
  cache?: 'writeback' | 'writethrough' | 'unsafe';
  /** Offer the `qemu:allocation-depth` meta context (qemu-nbd's -A). */
  allocationDepth?: boolean;
}

/** Where the server listens. */
export type NbdListenAddress = { type: 'unix'; path: string } | { type: 'inet'; host: string; port: number };

/** Server options. */
export interface NbdServerOptions {
  exports: NbdExport[];
  /** Connections served at once (qemu-nbd's --shared, default 1); later ones wait to be served. */
  maxConnections?: number;
  /** Connections waiting for a free slot before new ones are refused (closed). Default 256. */
  maxPending?: number;
  /** Requests running at once per connection. Default 32. */
  maxInFlight?: number;
  /** The handshake must end within this many ms (QEMU's 10 s). */
  handshakeTimeoutMs?: number;
  /** Payload bytes in flight over all connections; past it, readers wait (default 512 MiB). */
  maxInFlightBytes?: number;
  /** Called with a line about each connection's fate (errors the client caused), for logs. */
  log?: (line: string) => void;
  /** TLS credentials (a server endpoint): every client must then use TLS (QEMU's forced mode). */
  tls?: TlsCredsX509;
}

/** Events: `client-closed` (the number of connections still open) after each connection ends. */
export class NbdServer extends EventEmitter {
  readonly #exports = new Map<string, NbdExport>();
  readonly #conns = new Set<NbdConnection>();
  readonly #pending: net.Socket[] = [];
  #server: net.Server | null = null;
  #closing = false;
  #unixPath: string | null = null;
  readonly maxConnections: number;
  readonly maxPending: number;
  readonly maxInFlight: number;
  readonly handshakeTimeoutMs: number;
  readonly maxInFlightBytes: number;
  readonly log: (line: string) => void;
  /** The TLS credentials every client must use, or null (plaintext only). */
  readonly tls: TlsCredsX509 | null;
  #inFlightBytes = 0;
  readonly #budgetWaiters = new Set<() => void>();
  /** Shared-memory buffers for large reads and writes (no staging copy in the IOThread pool). */
  readonly pool = new SharedBufferPool();

  /** Makes a server for `opts.exports`; call listen() to start it. */
  constructor(opts: NbdServerOptions) {
    super();
    for (const e of opts.exports) this.addExport(e);
    this.maxConnections = positive(opts.maxConnections ?? 1, 'maxConnections');
    this.maxPending = opts.maxPending ?? 256;
    this.maxInFlight = positive(opts.maxInFlight ?? 32, 'maxInFlight');
    this.handshakeTimeoutMs = opts.handshakeTimeoutMs ?? 10_000;
    this.maxInFlightBytes = positive(opts.maxInFlightBytes ?? MAX_SERVER_INFLIGHT_BYTES, 'maxInFlightBytes');
    this.log = opts.log ?? (() => undefined);
    if (opts.tls !== undefined && opts.tls.endpoint !== 'server') {
      throw new BlockError('EINVAL', `Expected TLS credentials for a server endpoint (tls-creds '${opts.tls.id}' is for a ${opts.tls.endpoint})`, { field: 'tls-creds', value: opts.tls.id });
    }
    this.tls = opts.tls ?? null;
  }

  /** Adds an export; new clients can choose it at once. EINVAL for a name too long or taken. */
  addExport(e: NbdExport): void {
    if (Buffer.byteLength(e.name, 'utf8') > P.NBD_MAX_STRING_BYTES) throw new BlockError('EINVAL', `NBD export name longer than ${P.NBD_MAX_STRING_BYTES} bytes`, { field: 'name' });
    if (this.#exports.has(e.name)) throw new BlockError('EINVAL', `NBD export '${e.name}' already exists`, { field: 'name', value: e.name });
    this.#exports.set(e.name, e);
  }

  /**
   * Removes the export `name` (QMP block-export-del): `safe` refuses with EBUSY while clients use
   * it; `hard` lets their requests in flight finish and closes their connections. New clients no
   * longer see it either way. Resolves once no connection uses it.
   */
  async removeExport(name: string, mode: 'safe' | 'hard' = 'safe'): Promise<void> {
    const e = this.#exports.get(name);
    if (e === undefined) throw new BlockError('ENOENT', `Export '${name}' is not found`, { field: 'id', value: name });
    const users = [...this.#conns].filter((c) => c.export === e);
    if (mode === 'safe' && users.length > 0) {
      throw new BlockError('EBUSY', `Export '${name}' has ${users.length} connection${users.length === 1 ? '' : 's'}; remove it with mode=hard to close them`, { field: 'mode', value: mode });
    }
    this.#exports.delete(name);
    await Promise.all(users.map((c) => c.shutdown()));
  }

  /** How many connections are transmitting on the export `name`. */
  clientsOf(name: string): number {
    const e = this.#exports.get(name);
    return e === undefined ? 0 : [...this.#conns].filter((c) => c.export === e).length;
  }

  /** Payload bytes in flight over all connections. */
  get inFlightBytes(): number {
    return this.#inFlightBytes;
  }

  /** True when `bytes` more fit in the server's budget (always, when nothing is in flight: progress). */
  fitsBudget(bytes: number): boolean {
    return this.#inFlightBytes === 0 || this.#inFlightBytes + bytes <= this.maxInFlightBytes;
  }

  /** Counts `bytes` in (positive) or out (negative); a release wakes the connections waiting for room. */
  chargeBudget(bytes: number): void {
    this.#inFlightBytes += bytes;
    if (this.#inFlightBytes < 0) throw new BlockError('EIO', 'NBD server: in-flight byte count went negative', { op: 'nbd' });
    if (bytes < 0 && this.#budgetWaiters.size > 0) {
      const waiters = [...this.#budgetWaiters];
      this.#budgetWaiters.clear();
      for (const w of waiters) w();
    }
  }

  /** Calls `wake` at the next release of budget. */
  waitBudget(wake: () => void): void {
    this.#budgetWaiters.add(wake);
  }

  /** Connections being served (past the wait for a slot). */
  get connectionCount(): number {
    return this.#conns.size;
  }

  /** The export called `name`, if any. */
  findExport(name: string): NbdExport | undefined {
    return this.#exports.get(name);
  }

  /** Every export, in the order given. */
  exportList(): NbdExport[] {
    return [...this.#exports.values()];
  }

  /** Starts listening; resolves with the bound address (the port, when 0 was asked for). */
  async listen(addr: NbdListenAddress): Promise<net.AddressInfo | string> {
    if (this.#server !== null) throw new BlockError('EBUSY', 'the NBD server is already listening', { op: 'nbd-server-start' });
    // half-open: a client that shuts its write side after its last request still gets the replies
    const server = net.createServer({ pauseOnConnect: true, allowHalfOpen: true }, (s) => this.accept(s));
    await new Promise<void>((resolve, reject) => {
      const fail = (e: NodeJS.ErrnoException): void => {
        // QEMU's words; Node reports a missing directory as EACCES, so look for it first
        let text = systemErrorText(e);
        if (addr.type === 'unix' && !fs.existsSync(path.dirname(addr.path))) text = 'No such file or directory';
        const message =
          addr.type === 'unix' ? `Failed to bind socket to ${addr.path}: ${text}`
          : e.code === 'EADDRINUSE' ? `Failed to find an available port: ${text}`
          : `Failed to bind socket: ${text}`;
        reject(new BlockError(e.code === 'EADDRINUSE' ? 'EBUSY' : 'EIO', message, { op: 'nbd-server-start', cause: e }));
      };
      server.once('error', fail);
      const done = (): void => {
        server.off('error', fail);
        // later listener errors (none expected once listening) go to the log, once
        server.on('error', (e) => this.log(`nbd: listener error on ${describe(addr)}: ${systemErrorText(e)}`));
        resolve();
      };
      if (addr.type === 'unix') server.listen(addr.path, done);
      else server.listen(addr.port, addr.host, done);
    });
    this.#server = server;
    if (addr.type === 'unix') this.#unixPath = addr.path;
    const bound = server.address();
    if (bound === null) throw new BlockError('EIO', `listening on ${describe(addr)} gave no address`, { op: 'nbd-server-start' });
    return bound;
  }

  private accept(s: net.Socket): void {
    if (this.#closing) {
      s.destroy();
      return;
    }
    s.on('error', () => undefined);
    if (this.#conns.size < this.maxConnections) this.serve(s);
    else if (this.#pending.length < this.maxPending) {
      this.#pending.push(s);
      s.once('close', () => {
        const i = this.#pending.indexOf(s);
        if (i >= 0) this.#pending.splice(i, 1);
      });
    } else {
      this.log(`nbd: refusing a connection: ${this.#conns.size} served and ${this.#pending.length} waiting`);
      s.destroy();
    }
  }

  private serve(s: net.Socket): void {
    s.setNoDelay(true);
    const conn = new NbdConnection(this, s);
    this.#conns.add(conn);
    void conn.run().then(
      () => this.closed(conn),
      (e: unknown) => {
        this.log(`nbd: connection failed: ${e instanceof Error ? e.message : String(e)}`);
        s.destroy();
        this.closed(conn);
      },
    );
  }

  private closed(conn: NbdConnection): void {
    if (!this.#conns.delete(conn)) return;
    const next = this.#closing ? undefined : this.#pending.shift();
    if (next !== undefined) this.serve(next);
    this.emit('client-closed', this.#conns.size);
  }

  /**
   * Stops listening, refuses the clients still waiting, lets every connection finish its requests
   * in flight (none is cut in half), closes them, and removes the unix socket.
   */
  async close(): Promise<void> {
    if (this.#closing) return;
    this.#closing = true;
    const server = this.#server;
    for (const s of this.#pending.splice(0)) s.destroy();
    const closedListener = server === null ? Promise.resolve() : new Promise<void>((resolve) => server.close(() => resolve()));
    await Promise.all([...this.#conns].map((c) => c.shutdown()));
    await closedListener;
    // net.Server removes its unix socket on close; a stale one (a crash before) is gone too
    if (this.#unixPath !== null) fs.rmSync(this.#unixPath, { force: true });
  }
}

function positive(n: number, what: string): number {
  if (!Number.isSafeInteger(n) || n < 1) throw new BlockError('EINVAL', `NBD server: ${what} must be a positive integer, not ${n}`, { field: what, value: n });
  return n;
}

function describe(addr: NbdListenAddress): string {
  return addr.type === 'unix' ? `unix socket '${addr.path}'` : `${addr.host}:${addr.port}`;
}

/** The NBD error value and message for a failed request. */
function errorReply(e: unknown): { error: number; message: string } {
  if (isBlockError(e)) return { error: P.nbdErrorFor(e.code), message: e.message };
  return { error: P.NBD_EIO, message: e instanceof Error ? e.message : String(e) };
}

/** A protocol error we answer with an error value (and a message over structured replies). */
class RequestRefused extends Error {
  constructor(
    readonly error: number,
    message: string,
  ) {
    super(message);
  }
}

/** One client connection. */
class NbdConnection {
  #reader: SocketReader;
  /** True once STARTTLS succeeded: `socket` is then the TLS socket. */
  #tlsDone = false;
  #noZeroes = false;
  #structured = false;
  /** The meta contexts SET_META_CONTEXT selected, and for which export; null when none. */
  #meta: { exportName: string; contexts: ExtentContext[] } | null = null;
  #export: NbdExport | null = null;
  #inFlight = 0;
  #inFlightBytes = 0;
  #wake: (() => void) | null = null;
  #stopping = false;
  #tlsRefusedLogged = false;

  constructor(
    private readonly server: NbdServer,
    private socket: net.Socket,
  ) {
    this.#reader = new SocketReader(socket);
    socket.resume();
  }

  /** The export this connection transmits on, or null while it haggles. */
  get export(): NbdExport | null {
    return this.#export;
  }

  /** Stops reading new requests; run() then finishes the ones in flight and closes. */
  shutdown(): Promise<void> {
    this.#stopping = true;
    const done = new Promise<void>((resolve) => {
      if (this.socket.destroyed) resolve();
      else this.socket.once('close', () => resolve());
    });
    // a connection still haggling, or idle between requests, has nothing to finish
    this.#reader.cancel();
    return done;
  }

  async run(): Promise<void> {
    const timer = setTimeout(() => {
      this.server.log('nbd: handshake timed out');
      this.socket.destroy();
    }, this.server.handshakeTimeoutMs);
    let exp: NbdExport | null;
    try {
      exp = await this.handshake();
    } finally {
      clearTimeout(timer);
    }
    if (exp === null) {
      this.close();
      return;
    }
    this.#export = exp;
    await this.transmission(exp);
    await this.idle();
    this.close();
  }

  private close(): void {
    if (this.socket.destroyed) return;
    // when the server stops (close, a hard export delete), the socket goes once our last replies
    // are out; otherwise the peer closes its side
    this.socket.end(() => {
      if (this.#stopping) this.socket.destroy();
    });
    // a peer that never reads its last replies must not hold the connection open
    setTimeout(() => this.socket.destroy(), 5000).unref();
  }

  /** Writes one reply whole; `pooled` buffers go back to the pool once the socket is done with them. */
  private send(bufs: readonly Uint8Array[], pooled: readonly Buffer[] = []): void {
    if (this.socket.destroyed || !this.socket.writable) return;
    const done = pooled.length === 0 ? undefined : (): void => pooled.forEach((b) => this.server.pool.release(b));
    if (bufs.length === 1) {
      this.socket.write(bufs[0] as Uint8Array, done);
      return;
    }
    this.socket.cork();
    bufs.forEach((b, i) => this.socket.write(b, i === bufs.length - 1 ? done : undefined));
    this.socket.uncork();
  }

  /** A buffer for a transfer of `n` bytes: shared memory from the pool when large. */
  private buffer(n: number): Buffer {
    return n >= MIN_POOLED_BYTES ? this.server.pool.get(n) : Buffer.allocUnsafe(n);
  }

  // ---- handshake ---------------------------------------------------------------------------

  /** Runs the haggling phase; the export chosen, or null when the connection is to close. */
  private async handshake(): Promise<NbdExport | null> {
    this.send([P.encodeGreeting(P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES)]);
    const cf = await this.#reader.read(4);
    if (cf === null) return null;
    const clientFlags = cf.readUInt32BE(0);
    if ((clientFlags & ~(P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES)) !== 0) {
      this.server.log(`nbd: client flags 0x${clientFlags.toString(16)} hold unknown bits; closing`);
      return null;
    }
    const fixed = (clientFlags & P.NBD_FLAG_C_FIXED_NEWSTYLE) !== 0;
    this.#noZeroes = (clientFlags & P.NBD_FLAG_C_NO_ZEROES) !== 0;
    for (let n = 0; n < MAX_OPTIONS; n++) {
      const h = await this.#reader.read(P.NBD_OPTION_HEADER_SIZE);
      if (h === null) return null;
      const { magic, option, length } = P.decodeOptionHeader(h);
      if (magic !== P.NBD_OPTS_MAGIC) {
        this.server.log('nbd: bad option magic; closing');
        return null;
      }
      if (length > MAX_OPTION_BYTES) {
        if (fixed) this.optReply(option, P.NBD_REP_ERR_TOO_BIG, `option ${P.optionName(option)} of ${length} bytes is larger than ${MAX_OPTION_BYTES}`);
        this.server.log(`nbd: ${P.optionName(option)} of ${length} bytes refused; closing`);
        return null;
      }
      const data = length === 0 ? Buffer.alloc(0) : await this.#reader.read(length);
      if (data === null) return null;
      if (!fixed && option !== P.NBD_OPT_EXPORT_NAME) {
        // plain newstyle has no error replies: the only way to refuse is to hang up
        return null;
      }
      if (this.server.tls !== null) {
        const t = await this.tlsGate(option, data);
        if (t === 'close') return null;
        if (t === 'handled') continue;
      }
      const r = this.option(option, data);
      if (r === 'close') return null;
      if (r !== 'continue') return r;
    }
    this.server.log(`nbd: more than ${MAX_OPTIONS} options; closing`);
    return null;
  }

  /**
   * Forced TLS: before TLS only STARTTLS and ABORT are honoured; STARTTLS upgrades the socket.
   * 'pass' lets option() handle the option (TLS is up, or ABORT).
   */
  private async tlsGate(option: number, data: Buffer): Promise<'handled' | 'close' | 'pass'> {
    const creds = this.server.tls;
    if (creds === null) return 'pass';
    if (this.#tlsDone) {
      if (option !== P.NBD_OPT_STARTTLS) return 'pass';
      this.optReply(option, P.NBD_REP_ERR_INVALID, 'TLS is already negotiated');
      return 'handled';
    }
    switch (option) {
      case P.NBD_OPT_ABORT:
        return 'pass';
      case P.NBD_OPT_EXPORT_NAME:
        // no error reply exists for it: hang up
        this.server.log('nbd: NBD_OPT_EXPORT_NAME before TLS (the server requires TLS); closing');
        return 'close';
      case P.NBD_OPT_STARTTLS:
        break;
      default:
        this.optReply(option, P.NBD_REP_ERR_TLS_REQD, `Option 0x${option.toString(16)} (${P.optionName(option)}) not permitted before TLS`);
        if (!this.#tlsRefusedLogged) {
          this.#tlsRefusedLogged = true;
          this.server.log(`nbd: a client sent ${P.optionName(option)} without TLS; refused with NBD_REP_ERR_TLS_REQD (the server requires TLS)`);
        }
        return 'handled';
    }
    if (data.length !== 0) {
      this.optReply(option, P.NBD_REP_ERR_INVALID, 'NBD_OPT_STARTTLS takes no data');
      return 'handled';
    }
    // nothing more is read from the plain socket: what arrives now is the ClientHello, kept in
    // the socket's own buffer (paused) for the TLS socket to take
    const raw = this.socket;
    const left = this.#reader.detach();
    raw.pause();
    if (left !== null) raw.unshift(left);
    await new Promise<void>((resolve) => raw.write(P.encodeOptionReply(option, P.NBD_REP_ACK, new Uint8Array(0)), () => resolve()));
    if (raw.destroyed) return 'close';
    let secure: net.Socket;
    try {
      secure = await tlsServerHandshake(raw, creds);
    } catch (e) {
      this.server.log(`nbd: ${e instanceof Error ? e.message : String(e)}; closing`);
      return 'close';
    }
    this.socket = secure;
    this.#reader = new SocketReader(secure);
    this.#tlsDone = true;
    return 'handled';
  }

  private optReply(option: number, type: number, payload: Uint8Array | string = new Uint8Array(0)): void {
    const data = typeof payload === 'string' ? Buffer.from(payload, 'utf8').subarray(0, P.NBD_MAX_STRING_BYTES) : payload;
    this.send([P.encodeOptionReply(option, type, data)]);
  }

  private transmissionFlags(exp: NbdExport): number {
    let f = P.NBD_FLAG_HAS_FLAGS | P.NBD_FLAG_SEND_FLUSH | P.NBD_FLAG_SEND_FUA;
    // as qemu-nbd (only with --shared above 1): a client told it may open more connections
    // (nbdcopy opens 4) would wait for ever for the ones a one-connection server never serves
    if (this.server.maxConnections > 1) f |= P.NBD_FLAG_CAN_MULTI_CONN;
    if (exp.backend.readOnly) f |= P.NBD_FLAG_READ_ONLY;
    else f |= P.NBD_FLAG_SEND_TRIM | P.NBD_FLAG_SEND_WRITE_ZEROES | P.NBD_FLAG_SEND_FAST_ZERO;
    if (this.#structured) f |= P.NBD_FLAG_SEND_DF;
    return f;
  }

  /** Handles one option: 'continue' haggling, 'close', or the export to transmit on. */
  private option(option: number, data: Buffer): 'continue' | 'close' | NbdExport {
    switch (option) {
      case P.NBD_OPT_EXPORT_NAME: {
        const exp = this.server.findExport(data.toString('utf8'));
        // EXPORT_NAME has no error reply: an unknown name can only be refused by hanging up
        if (exp === undefined) {
          this.server.log(`nbd: NBD_OPT_EXPORT_NAME for unknown export '${data.toString('utf8')}'; closing`);
          return 'close';
        }
        const b = Buffer.alloc(P.NBD_EXPORT_NAME_REPLY_SIZE + (this.#noZeroes ? 0 : P.NBD_EXPORT_NAME_ZEROES));
        b.writeUInt32BE(Math.floor(blkGetLength(exp.backend) / 0x1_0000_0000), 0);
        b.writeUInt32BE(blkGetLength(exp.backend) >>> 0, 4);
        b.writeUInt16BE(this.transmissionFlags(exp), 8);
        this.send([b]);
        return exp;
      }
      case P.NBD_OPT_ABORT:
        this.optReply(option, P.NBD_REP_ACK);
        return 'close';
      case P.NBD_OPT_LIST:
        if (data.length !== 0) {
          this.optReply(option, P.NBD_REP_ERR_INVALID, 'NBD_OPT_LIST takes no data');
          return 'continue';
        }
        for (const e of this.server.exportList()) this.optReply(option, P.NBD_REP_SERVER, P.encodeServerReply(e.name, e.description ?? ''));
        this.optReply(option, P.NBD_REP_ACK);
        return 'continue';
      case P.NBD_OPT_STARTTLS:
        this.optReply(option, P.NBD_REP_ERR_POLICY, 'TLS not configured (start the server with tls-creds)');
        return 'continue';
      case P.NBD_OPT_STRUCTURED_REPLY:
        if (data.length !== 0) this.optReply(option, P.NBD_REP_ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data');
        else if (this.#structured) this.optReply(option, P.NBD_REP_ERR_INVALID, 'structured replies are already negotiated');
        else {
          this.#structured = true;
          this.optReply(option, P.NBD_REP_ACK);
        }
        return 'continue';
      case P.NBD_OPT_INFO:
      case P.NBD_OPT_GO:
        return this.infoOrGo(option, data);
      case P.NBD_OPT_LIST_META_CONTEXT:
      case P.NBD_OPT_SET_META_CONTEXT:
        this.metaContext(option, data);
        return 'continue';
      default:
        this.optReply(option, P.NBD_REP_ERR_UNSUP, `${P.optionName(option)} is not supported`);
        return 'continue';
    }
  }

  private infoOrGo(option: number, data: Buffer): 'continue' | NbdExport {
    const req = P.decodeInfoRequest(data);
    if (req === null) {
      this.optReply(option, P.NBD_REP_ERR_INVALID, `${P.optionName(option)}: the lengths in its data do not add up`);
      return 'continue';
    }
    const exp = this.server.findExport(req.exportName);
    if (exp === undefined) {
      this.optReply(option, P.NBD_REP_ERR_UNKNOWN, `export '${req.exportName}' not present`);
      return 'continue';
    }
    const size = blkGetLength(exp.backend);
    this.optReply(option, P.NBD_REP_INFO, P.encodeInfoExport(size, this.transmissionFlags(exp)));
    if (req.infos.includes(P.NBD_INFO_NAME)) this.optReply(option, P.NBD_REP_INFO, P.encodeInfoString(P.NBD_INFO_NAME, exp.name));
    if (exp.description !== undefined && exp.description !== '') this.optReply(option, P.NBD_REP_INFO, P.encodeInfoString(P.NBD_INFO_DESCRIPTION, exp.description));
    // as QEMU: any byte alignment for a client that asked about block sizes (and so will honour
    // them); 512 for one that did not, whose requests may then be assumed sector-sized
    const asked = req.infos.includes(P.NBD_INFO_BLOCK_SIZE);
    this.optReply(option, P.NBD_REP_INFO, P.encodeInfoBlockSize({ minimum: asked ? 1 : 512, preferred: 4096, maximum: MAX_REQUEST_BYTES }));
    this.optReply(option, P.NBD_REP_ACK);
    if (option === P.NBD_OPT_INFO) return 'continue';
    // the meta context selected belongs to the export it was selected for
    if (this.#meta !== null && this.#meta.exportName !== exp.name) this.#meta = null;
    return exp;
  }

  private metaContext(option: number, data: Buffer): void {
    const set = option === P.NBD_OPT_SET_META_CONTEXT;
    const req = P.decodeMetaContextRequest(data);
    if (req === null) {
      this.optReply(option, P.NBD_REP_ERR_INVALID, `${P.optionName(option)}: the lengths in its data do not add up`);
      return;
    }
    if (!this.#structured) {
      this.optReply(option, P.NBD_REP_ERR_INVALID, `${P.optionName(option)} needs structured replies (NBD_OPT_STRUCTURED_REPLY) first`);
      return;
    }
    const exp = this.server.findExport(req.exportName);
    if (exp === undefined) {
      this.optReply(option, P.NBD_REP_ERR_UNKNOWN, `export '${req.exportName}' not present`);
      return;
    }
    const offered: ExtentContext[] = exp.allocationDepth === true ? [P.NBD_META_BASE_ALLOCATION, QEMU_ALLOCATION_DEPTH] : [P.NBD_META_BASE_ALLOCATION];
    // LIST: no query lists them all, a namespace ('base:', 'qemu:') lists its own; SET: exact names
    const matches = (ctx: ExtentContext, q: string): boolean => q === ctx || (!set && q.endsWith(':') && ctx.startsWith(q));
    const selected = offered.filter((ctx) => (!set && req.queries.length === 0) || req.queries.some((q) => matches(ctx, q)));
    if (set) this.#meta = selected.length > 0 ? { exportName: req.exportName, contexts: selected } : null;
    for (const ctx of selected) this.optReply(option, P.NBD_REP_META_CONTEXT, P.encodeMetaContextReply(set ? META_CONTEXT_IDS[ctx] : 0, ctx));
    this.optReply(option, P.NBD_REP_ACK);
  }

  // ---- transmission ------------------------------------------------------------------------

  /** Waits until a request of `bytes` payload may start (bounded in-flight count and bytes). */
  private async slot(bytes: number): Promise<void> {
    const fits = (): boolean =>
      this.#inFlight < this.server.maxInFlight &&
      (this.#inFlight === 0 || this.#inFlightBytes + bytes <= MAX_INFLIGHT_BYTES) &&
      this.server.fitsBudget(bytes) &&
      !this.socket.writableNeedDrain;
    while (!fits() && !this.socket.destroyed) {
      if (this.socket.writableNeedDrain) {
        await new Promise<void>((resolve) => {
          const done = (): void => {
            this.socket.off('drain', done);
            this.socket.off('close', done);
            resolve();
          };
          this.socket.on('drain', done);
          this.socket.on('close', done);
        });
      } else {
        // woken by this connection's own completions, or by room made by any connection
        await new Promise<void>((resolve) => {
          this.#wake = resolve;
          if (!this.server.fitsBudget(bytes)) this.server.waitBudget(resolve);
        });
      }
    }
  }

  private wakeReader(): void {
    const w = this.#wake;
    this.#wake = null;
    w?.();
  }

  /** Resolves when no request is in flight. */
  private async idle(): Promise<void> {
    while (this.#inFlight > 0) await new Promise<void>((resolve) => (this.#wake = resolve));
  }

  private async transmission(exp: NbdExport): Promise<void> {
    for (;;) {
      if (this.#stopping) return;
      // the hot path: a pipelined request is usually buffered already; read it without a promise
      const h = this.#reader.tryRead(P.NBD_REQUEST_SIZE) ?? (await this.#reader.read(P.NBD_REQUEST_SIZE));
      if (h === null) return;
      const req = P.decodeRequest(h);
      if (req === null) {
        this.server.log(`nbd: bad request magic 0x${h.readUInt32BE(0).toString(16)}; closing`);
        this.socket.destroy();
        return;
      }
      if (req.type === P.NBD_CMD_DISC) return;
      if (req.type === P.NBD_CMD_WRITE && req.length > MAX_REQUEST_BYTES) {
        // the payload cannot be trusted to be buffered: throw it away in slices, then refuse
        if (!(await this.#reader.skip(req.length))) return;
        this.reply(req, new RequestRefused(P.NBD_EINVAL, `write of ${req.length} bytes is larger than the maximum of ${MAX_REQUEST_BYTES}`));
        continue;
      }
      const bytes = req.type === P.NBD_CMD_WRITE ? req.length : req.type === P.NBD_CMD_READ ? Math.min(req.length, MAX_REQUEST_BYTES) : 0;
      // the room is taken before a write's payload is read, so that no other reader can take it meanwhile
      await this.slot(bytes);
      this.#inFlight++;
      this.#inFlightBytes += bytes;
      this.server.chargeBudget(bytes);
      let payload: Buffer | null = null;
      const done = (): void => {
        // a pooled payload is free again once its write is done (release ignores other buffers)
        if (payload !== null) this.server.pool.release(payload);
        this.#inFlight--;
        this.#inFlightBytes -= bytes;
        this.server.chargeBudget(-bytes);
        this.wakeReader();
      };
      if (req.type === P.NBD_CMD_WRITE) {
        payload = req.length === 0 ? Buffer.alloc(0) : await this.#reader.read(req.length, req.length >= MIN_POOLED_BYTES ? (n) => this.server.pool.get(n) : undefined);
        if (payload === null) {
          // EOF inside a write: nothing of it was applied
          done();
          return;
        }
      }
      void this.handle(exp, req, payload).finally(done);
    }
  }

  private checkRange(exp: NbdExport, req: P.NbdRequest, what: string): void {
    const size = blkGetLength(exp.backend);
    if (req.offset > size || req.length > size - req.offset) {
      throw new RequestRefused(P.NBD_EINVAL, `${what} of ${req.length} bytes at offset ${req.offset} runs past the end of export '${exp.name}' (${size} bytes)`);
    }
  }

  private checkWritable(exp: NbdExport, what: string): void {
    if (exp.backend.readOnly) throw new RequestRefused(P.NBD_EPERM, `${what} on read-only export '${exp.name}'`);
  }

  private async flushFor(exp: NbdExport): Promise<void> {
    if (exp.cache === 'unsafe') return;
    await blkFlush(exp.backend);
  }

  /** Runs one request and sends its reply; never throws. */
  private async handle(exp: NbdExport, req: P.NbdRequest, payload: Buffer | null): Promise<void> {
    try {
      const fua = (req.flags & P.NBD_CMD_FLAG_FUA) !== 0 || exp.cache === 'writethrough';
      switch (req.type) {
        case P.NBD_CMD_READ:
          await this.read(exp, req);
          return;
        case P.NBD_CMD_WRITE:
          this.checkWritable(exp, 'write');
          this.checkRange(exp, req, 'write');
          // FUA goes down with the write: the block layer flushes the node after it, or a driver
          // with native FUA (an NBD client below) passes it on
          await blkPwrite(exp.backend, req.offset, payload ?? Buffer.alloc(0), fua && exp.cache !== 'unsafe' ? FUA_WRITE : undefined);
          break;
        case P.NBD_CMD_FLUSH:
          await this.flushFor(exp);
          break;
        case P.NBD_CMD_TRIM:
          this.checkWritable(exp, 'trim');
          this.checkRange(exp, req, 'trim');
          await blkPdiscard(exp.backend, req.offset, req.length);
          if (fua) await this.flushFor(exp);
          break;
        case P.NBD_CMD_WRITE_ZEROES: {
          this.checkWritable(exp, 'write-zeroes');
          this.checkRange(exp, req, 'write-zeroes');
          if ((req.flags & P.NBD_CMD_FLAG_FAST_ZERO) !== 0 && !(await this.alreadyZero(exp, req))) {
            // we cannot tell in advance whether the driver zeroes by metadata or by writing, so
            // only a range that already reads as zeros is promised to be fast (nothing to do)
            throw new RequestRefused(P.NBD_ENOTSUP, 'fast zeroing is only promised for ranges that already read as zeros');
          }
          if ((req.flags & P.NBD_CMD_FLAG_FAST_ZERO) === 0) {
            await blkPwriteZeroes(exp.backend, req.offset, req.length, { mayUnmap: (req.flags & P.NBD_CMD_FLAG_NO_HOLE) === 0, fua: fua && exp.cache !== 'unsafe' });
          }
          break;
        }
        case P.NBD_CMD_BLOCK_STATUS:
          await this.blockStatus(exp, req);
          return;
        default:
          throw new RequestRefused(P.NBD_EINVAL, `unknown or unadvertised command ${req.type}`);
      }
      this.reply(req, null);
    } catch (e) {
      this.reply(req, e);
    }
  }

  private async alreadyZero(exp: NbdExport, req: P.NbdRequest): Promise<boolean> {
    if (req.length === 0) return true;
    const ext = await exportExtents(exp.backend, req.offset, req.length, 1);
    const first = ext[0];
    return ext.length === 1 && first !== undefined && first.length >= req.length && (first.flags & P.NBD_STATE_ZERO) !== 0;
  }

  /** An empty success reply or an error reply (a structured one carries the message). */
  private reply(req: P.NbdRequest, e: unknown): void {
    if (e === null) {
      if (this.#structured && req.type === P.NBD_CMD_READ) {
        this.send([P.encodeChunkHeader({ flags: P.NBD_REPLY_FLAG_DONE, type: P.NBD_REPLY_TYPE_NONE, cookie: req.cookie, length: 0 })]);
      } else this.send([P.encodeSimpleReply(0, req.cookie)]);
      return;
    }
    const { error, message } = e instanceof RequestRefused ? { error: e.error, message: e.message } : errorReply(e);
    if (!(e instanceof RequestRefused)) this.server.log(`nbd: request failed: ${message}`);
    if (this.#structured) {
      const body = P.encodeErrorChunk(error, message);
      this.send([P.encodeChunkHeader({ flags: P.NBD_REPLY_FLAG_DONE, type: P.NBD_REPLY_TYPE_ERROR, cookie: req.cookie, length: body.length }), body]);
    } else this.send([P.encodeSimpleReply(error, req.cookie)]);
  }

  private async read(exp: NbdExport, req: P.NbdRequest): Promise<void> {
    if (req.length > MAX_REQUEST_BYTES) throw new RequestRefused(P.NBD_EINVAL, `read of ${req.length} bytes is larger than the maximum of ${MAX_REQUEST_BYTES}`);
    this.checkRange(exp, req, 'read');
    if (!this.#structured) {
      // header and data in one buffer, one write
      const out = this.buffer(P.NBD_SIMPLE_REPLY_SIZE + req.length);
      try {
        await blkPread(exp.backend, req.offset, out.subarray(P.NBD_SIMPLE_REPLY_SIZE));
      } catch (e) {
        this.server.pool.release(out);
        throw e;
      }
      P.writeSimpleReply(out, 0, 0, req.cookie);
      this.send([out], [out]);
      return;
    }
    if (req.length === 0) {
      this.reply(req, null);
      return;
    }
    const sparse = req.length >= SPARSE_READ_MIN_BYTES && (req.flags & P.NBD_CMD_FLAG_DF) === 0;
    const extents = sparse ? await exportExtents(exp.backend, req.offset, req.length, 1024) : [{ length: req.length, flags: 0 }];
    // what the extents did not cover (the cap) is read as data
    const covered = extents.reduce((n, e) => n + e.length, 0);
    if (covered < req.length) extents.push({ length: req.length - covered, flags: 0 });
    const chunks: Buffer[] = [];
    const pooled: Buffer[] = [];
    let lastHeader: Buffer | null = null;
    let at = req.offset;
    for (const e of extents) {
      const len = Math.min(e.length, req.offset + req.length - at);
      if (len <= 0) break;
      if ((e.flags & P.NBD_STATE_ZERO) !== 0) {
        lastHeader = P.encodeChunkHeader({ flags: 0, type: P.NBD_REPLY_TYPE_OFFSET_HOLE, cookie: req.cookie, length: 12 });
        chunks.push(lastHeader, P.encodeOffsetHole(at, len));
      } else {
        const c = this.buffer(P.NBD_STRUCTURED_REPLY_HEADER_SIZE + 8 + len);
        pooled.push(c);
        try {
          await blkPread(exp.backend, at, c.subarray(P.NBD_STRUCTURED_REPLY_HEADER_SIZE + 8));
        } catch (e) {
          pooled.forEach((b) => this.server.pool.release(b));
          throw e;
        }
        P.writeChunkHeader(c, 0, { flags: 0, type: P.NBD_REPLY_TYPE_OFFSET_DATA, cookie: req.cookie, length: 8 + len });
        c.set(P.encodeOffset(at), P.NBD_STRUCTURED_REPLY_HEADER_SIZE);
        chunks.push(c);
        lastHeader = c;
      }
      at += len;
    }
    if (lastHeader === null) throw new BlockError('EIO', 'a read produced no chunk', { op: 'read' });
    // the last chunk carries DONE (no NONE chunk needed); the flags are bytes 4-5 of its header
    lastHeader.writeUInt16BE(P.NBD_REPLY_FLAG_DONE, 4);
    this.send(chunks, pooled);
  }

  private async blockStatus(exp: NbdExport, req: P.NbdRequest): Promise<void> {
    const meta = this.#meta;
    if (!this.#structured || meta === null || meta.exportName !== exp.name) {
      throw new RequestRefused(P.NBD_EINVAL, 'NBD_CMD_BLOCK_STATUS needs a meta context (NBD_OPT_SET_META_CONTEXT)');
    }
    if (req.length === 0) throw new RequestRefused(P.NBD_EINVAL, 'NBD_CMD_BLOCK_STATUS of length 0');
    this.checkRange(exp, req, 'block status');
    const one = (req.flags & P.NBD_CMD_FLAG_REQ_ONE) !== 0;
    // one chunk per selected context, the last one DONE, all written together
    const out: Buffer[] = [];
    for (const [i, ctx] of meta.contexts.entries()) {
      const extents = await exportExtents(exp.backend, req.offset, req.length, one ? 1 : MAX_EXTENTS, ctx);
      if (one && extents[0] !== undefined) extents[0].length = Math.min(extents[0].length, req.length);
      const body = P.encodeBlockStatus(META_CONTEXT_IDS[ctx], extents);
      const done = i === meta.contexts.length - 1 ? P.NBD_REPLY_FLAG_DONE : 0;
      out.push(P.encodeChunkHeader({ flags: done, type: P.NBD_REPLY_TYPE_BLOCK_STATUS, cookie: req.cookie, length: body.length }), body);
    }
    this.send(out);
  }
}

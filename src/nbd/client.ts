/**
 * The NBD client: one export of one NBD server, reached over TCP or a unix socket, with the
 * requests a block driver needs (read, write, write-zeroes, trim, flush, block status), split at
 * the server's maximum block size and aligned to its minimum, and with QEMU's reconnect rule.
 *
 * I/O code: every request method may be called while others are in flight (they are pipelined
 * on the one connection); `connect` and `close` are called by the driver's open and close.
 *
 * Reconnect (QEMU's `reconnect-delay`): when the connection is lost (the server went away, or
 * broke the protocol), requests in flight and new ones wait while the client connects again,
 * for `reconnectDelaySec` seconds; on success they are sent again (NBD requests are idempotent),
 * after that they, and every request until a connection succeeds, fail with EIO saying why the
 * connection was lost. The client keeps trying in the background. With a delay of 0 (the
 * default) the first loss is final. A new connection must show the same export (size and
 * read-only flag); one that does not ends the retries.
 *
 * Alignment: a server's minimum block size (NBD_INFO_BLOCK_SIZE) is honoured by reading whole
 * blocks and, for writes, by read-modify-write; an RMW holds its blocks exclusively against
 * other writes (QEMU's serialising requests), so two unaligned writes into one block cannot lose
 * each other's bytes.
 */
import net from 'node:net';
import { systemErrorText, BlockError } from '../block/errors.js';
import { NbdConnection, type ExtentReply, type NbdRequest } from './client-conn.js';
import { negotiate, type ExportInfo, type Negotiated } from './client-handshake.js';
import {
  DEFAULT_MAX_PAYLOAD_BYTES,
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
} from './client-proto.js';
import { SocketReader } from './client-reader.js';
import type { TlsCredsX509 } from './tls-creds.js';

/** Where the server listens. */
export type NbdAddress = { type: 'unix'; path: string } | { type: 'inet'; host: string; port: number };

/** How to reach an export. */
export interface NbdClientOptions {
  address: NbdAddress;
  /** The export's name ('' is the server's default export). */
  exportName: string;
  /** Seconds to wait for a lost connection to come back before requests fail (QEMU's reconnect-delay); 0: never. */
  reconnectDelaySec?: number;
  /** How long a connection and its handshake may take before the attempt fails (default 30 s). */
  connectTimeoutMs?: number;
  /**
   * Seconds during which a failing first connection is tried again (QEMU's open-timeout); 0,
   * the default: one attempt. A refusal in the handshake (no such export, TLS required) is final.
   */
  openTimeoutSec?: number;
  /**
   * TLS (QEMU's tls-creds, a client endpoint): NBD_OPT_STARTTLS right after the greeting, on
   * every connection including reconnects. The server's certificate must name `tlsHostname`
   * (default: the host of an inet address; a unix socket checks no name unless given one).
   */
  tls?: TlsCredsX509;
  tlsHostname?: string;
}

/** Flags of a write. */
export interface NbdWriteFlags {
  /** Durable when the reply comes (NBD_CMD_FLAG_FUA; a write and a flush on servers without it). */
  fua?: boolean;
}

/** Flags of a write-zeroes. */
export interface NbdZeroFlags extends NbdWriteFlags {
  /** The server may punch a hole (without it NBD_CMD_FLAG_NO_HOLE is sent). */
  mayUnmap?: boolean;
}

/**
 * Requests in flight on the connection at most; more wait in the client's queue, in order
 * (QEMU's client keeps 16; a deeper pipe keeps a fast server busy without an unbounded one).
 */
export const MAX_IN_FLIGHT = 64;
const MAX_RETRY_PAUSE_MS = 2000;
const FIRST_RETRY_PAUSE_MS = 100;
/** The longest trim / write-zeroes / block-status request (QEMU's INT_MAX, aligned down). */
const MAX_NON_PAYLOAD_BYTES = 0x7fffffff;

/** A human name for the address, as messages print it. */
export function describeAddress(a: NbdAddress): string {
  return a.type === 'unix' ? `unix:${a.path}` : `${a.host.includes(':') ? `[${a.host}]` : a.host}:${a.port}`;
}

interface WriteRange {
  start: number;
  end: number;
  exclusive: boolean;
}

type State = 'connected' | 'reconnecting' | 'failed' | 'closed';

/** A client of one NBD export. */
export class NbdClient {
  private conn: NbdConnection | null;
  private state: State = 'connected';
  private lostReason = '';
  private waiting: NbdRequest[] = [];
  private reconnecting = false;
  private deadlineTimer: NodeJS.Timeout | null = null;
  private retryTimer: NodeJS.Timeout | null = null;
  private wakeRetry: (() => void) | null = null;
  /** Writes in progress, tracked only when the server's minimum block size is above 1. */
  private readonly writes = new Set<WriteRange>();
  private writeWaiters: Array<() => void> = [];
  /** READ/WRITE size limit: the server's maximum (at most 32 MiB), a multiple of the minimum. */
  readonly maxPayloadBytes: number;
  readonly info: ExportInfo;
  readonly where: string;

  private constructor(
    private readonly opts: NbdClientOptions,
    conn: NbdConnection,
  ) {
    this.conn = conn;
    this.info = conn.info;
    this.where = `${describeAddress(opts.address)} (export '${opts.exportName}')`;
    const min = this.info.minBlockBytes;
    this.maxPayloadBytes = Math.max(min, Math.floor(Math.min(this.info.maxBlockBytes, DEFAULT_MAX_PAYLOAD_BYTES) / min) * min);
  }

  /**
   * Connects and negotiates; a failure here is final (no reconnect at open, as QEMU).
   * @locking io
   */
  static async connect(opts: NbdClientOptions): Promise<NbdClient> {
    let client: NbdClient | null = null;
    const deadline = Date.now() + (opts.openTimeoutSec ?? 0) * 1000;
    let pause = FIRST_RETRY_PAUSE_MS;
    for (;;) {
      try {
        const conn = await establish(opts, (c, reason, pending) => client?.lost(c, reason, pending));
        client = new NbdClient(opts, conn);
        return client;
      } catch (e) {
        // only a connection that failed is tried again, not a server's refusal
        const retry = e instanceof BlockError && e.code === 'EIO' && Date.now() + pause < deadline;
        if (!retry) {
          if (e instanceof BlockError && (opts.openTimeoutSec ?? 0) > 0 && e.code === 'EIO') {
            throw new BlockError('EIO', `${e.message} (still failing after open-timeout=${opts.openTimeoutSec ?? 0} s)`, { op: 'nbd-connect', cause: e });
          }
          throw e;
        }
      }
      await new Promise((r) => setTimeout(r, pause));
      pause = Math.min(MAX_RETRY_PAUSE_MS, pause * 2);
    }
  }

  /** The export's size in bytes. */
  get sizeBytes(): number {
    return this.info.sizeBytes;
  }

  /** True when the server marks the export read-only. */
  get readOnly(): boolean {
    return (this.info.flags & NBD_FLAG_READ_ONLY) !== 0;
  }

  /** True when block status comes from the server (base:allocation agreed). */
  get hasBlockStatus(): boolean {
    return this.info.baseAllocationId !== null;
  }

  /** The connection's state: connected, reconnecting (requests wait), failed (requests fail), closed. */
  get connectionState(): State {
    return this.state;
  }

  /** For tests: drops the connection as a network failure would. */
  breakConnection(reason: string): void {
    this.conn?.destroy(reason);
  }

  // ---- requests ----

  /** Requests on the wire now. */
  get inFlightCount(): number {
    return this.conn?.inFlightCount ?? 0;
  }

  /** Requests waiting in the client: behind MAX_IN_FLIGHT others, or for a reconnect. */
  get queuedCount(): number {
    return this.waiting.length;
  }

  private submit(type: number, flags: number, offset: number, length: number, data: Uint8Array | null): Promise<ExtentReply | null> {
    return new Promise<ExtentReply | null>((resolve, reject) => {
      const req: NbdRequest = {
        type,
        flags,
        offset,
        length,
        data,
        resolve: (x) => {
          resolve(x);
          this.pump();
        },
        reject: (e) => {
          reject(e);
          this.pump();
        },
        covered: 0,
        error: null,
        extent: null,
      };
      this.dispatch(req);
    });
  }

  /** Sends queued requests while the connection has room. */
  private pump(): void {
    const conn = this.conn;
    if (this.state !== 'connected' || conn === null) return;
    // a connection that dies meanwhile hands its requests back (onLost): stop feeding it
    while (this.conn === conn && conn.alive && conn.inFlightCount < MAX_IN_FLIGHT) {
      const r = this.waiting.shift();
      if (r === undefined) break;
      conn.send(r);
    }
  }

  private dispatch(req: NbdRequest): void {
    switch (this.state) {
      case 'connected':
        if (this.conn !== null && this.conn.inFlightCount < MAX_IN_FLIGHT && this.waiting.length === 0) this.conn.send(req);
        else this.waiting.push(req);
        return;
      case 'reconnecting':
        this.waiting.push(req);
        return;
      case 'failed':
        req.reject(this.lostError());
        return;
      case 'closed':
        req.reject(new BlockError('EIO', `NBD client of ${this.where} is closed`, { op: 'nbd' }));
    }
  }

  private lostError(): BlockError {
    const delay = this.opts.reconnectDelaySec ?? 0;
    const tail = delay > 0 ? `; not reconnected within reconnect-delay=${delay} s` : ' (reconnect-delay=0: no reconnect)';
    return new BlockError('EIO', `NBD server ${this.where}: connection lost: ${this.lostReason}${tail}`, { op: 'nbd' });
  }

  /** Reads one aligned piece of at most maxPayloadBytes. */
  private readPiece(offset: number, buf: Uint8Array): Promise<unknown> {
    return this.submit(NBD_CMD_READ, 0, offset, buf.length, buf);
  }

  /**
   * Reads `buf.length` bytes at `offset`; bytes past the export's end read as zeros.
   * @locking io
   */
  async read(offset: number, buf: Uint8Array): Promise<void> {
    const size = this.info.sizeBytes;
    const inside = Math.max(0, Math.min(buf.length, size - offset));
    if (inside < buf.length) buf.fill(0, inside);
    if (inside === 0) return;
    const min = this.info.minBlockBytes;
    const end = offset + inside;
    const aStart = Math.floor(offset / min) * min;
    const aEnd = Math.min(size, Math.ceil(end / min) * min);
    if (aStart === offset && aEnd === end) {
      await this.readAligned(offset, buf.subarray(0, inside));
      return;
    }
    const bounce = new Uint8Array(aEnd - aStart);
    await this.readAligned(aStart, bounce);
    buf.set(bounce.subarray(offset - aStart, end - aStart), 0);
  }

  private async readAligned(offset: number, buf: Uint8Array): Promise<void> {
    const max = this.maxPayloadBytes;
    if (buf.length <= max) {
      await this.readPiece(offset, buf);
      return;
    }
    const parts: Promise<unknown>[] = [];
    for (let o = 0; o < buf.length; o += max) parts.push(this.readPiece(offset + o, buf.subarray(o, Math.min(buf.length, o + max))));
    await Promise.all(parts);
  }

  private checkWrite(op: string, offset: number, bytes: number): void {
    if (this.readOnly) throw new BlockError('EACCES', `NBD export ${this.where} is read-only: ${op} refused`, { op });
    if (offset + bytes > this.info.sizeBytes) {
      throw new BlockError('ENOSPC', `${op} of ${bytes} bytes at offset ${offset} runs past the end of NBD export ${this.where} (${this.info.sizeBytes} bytes): an NBD export cannot grow`, {
        op,
        offset,
      });
    }
  }

  private fuaFlag(fua: boolean | undefined): number {
    return fua === true && (this.info.flags & NBD_FLAG_SEND_FUA) !== 0 ? NBD_CMD_FLAG_FUA : 0;
  }

  /** A flush that emulates FUA on servers without NBD_FLAG_SEND_FUA. */
  private async emulatedFua(fua: boolean | undefined): Promise<void> {
    if (fua === true && (this.info.flags & NBD_FLAG_SEND_FUA) === 0) await this.flush();
  }

  /**
   * Writes `buf` at `offset` (within the export: an export cannot grow).
   * @locking io
   */
  async write(offset: number, buf: Uint8Array, flags: NbdWriteFlags = {}): Promise<void> {
    this.checkWrite('write', offset, buf.length);
    if (buf.length === 0) return;
    const min = this.info.minBlockBytes;
    const end = offset + buf.length;
    if (min > 1 && (offset % min !== 0 || end % min !== 0)) {
      await this.readModifyWrite(offset, buf, flags);
      return;
    }
    const range = min > 1 ? await this.enterWrite(offset, end, false) : null;
    try {
      await this.writeAligned(offset, buf, this.fuaFlag(flags.fua));
    } finally {
      if (range !== null) this.exitWrite(range);
    }
    await this.emulatedFua(flags.fua);
  }

  private async writeAligned(offset: number, buf: Uint8Array, flags: number): Promise<void> {
    const max = this.maxPayloadBytes;
    const parts: Promise<unknown>[] = [];
    for (let o = 0; o < buf.length; o += max) {
      parts.push(this.submit(NBD_CMD_WRITE, flags, offset + o, Math.min(max, buf.length - o), buf.subarray(o, Math.min(buf.length, o + max))));
    }
    await Promise.all(parts);
  }

  /** Writes an unaligned range: reads the covering blocks, patches them, writes them back, holding them exclusively. */
  private async readModifyWrite(offset: number, buf: Uint8Array, flags: NbdWriteFlags): Promise<void> {
    const min = this.info.minBlockBytes;
    const end = offset + buf.length;
    const aStart = Math.floor(offset / min) * min;
    const aEnd = Math.min(this.info.sizeBytes, Math.ceil(end / min) * min);
    const range = await this.enterWrite(aStart, aEnd, true);
    try {
      const bounce = new Uint8Array(aEnd - aStart);
      // only the partial head and tail blocks need their old bytes
      await this.readAligned(aStart, bounce.subarray(0, Math.min(min, bounce.length)));
      if (aEnd - min > aStart) await this.readAligned(aEnd - min, bounce.subarray(bounce.length - min));
      bounce.set(buf, offset - aStart);
      await this.writeAligned(aStart, bounce, this.fuaFlag(flags.fua));
    } finally {
      this.exitWrite(range);
    }
    await this.emulatedFua(flags.fua);
  }

  private overlaps(start: number, end: number, exclusive: boolean): boolean {
    for (const w of this.writes) if (w.start < end && start < w.end && (w.exclusive || exclusive)) return true;
    return false;
  }

  private async enterWrite(start: number, end: number, exclusive: boolean): Promise<WriteRange> {
    while (this.overlaps(start, end, exclusive)) await new Promise<void>((resolve) => this.writeWaiters.push(resolve));
    const r = { start, end, exclusive };
    this.writes.add(r);
    return r;
  }

  private exitWrite(r: WriteRange): void {
    this.writes.delete(r);
    const w = this.writeWaiters;
    this.writeWaiters = [];
    for (const wake of w) wake();
  }

  /**
   * Makes `bytes` bytes at `offset` read as zeros: NBD_CMD_WRITE_ZEROES where the server has it
   * (unaligned edges by read-modify-write), written zeros where not.
   * @locking io
   */
  async writeZeroes(offset: number, bytes: number, flags: NbdZeroFlags = {}): Promise<void> {
    this.checkWrite('write-zeroes', offset, bytes);
    if (bytes === 0) return;
    const min = this.info.minBlockBytes;
    const end = offset + bytes;
    if ((this.info.flags & NBD_FLAG_SEND_WRITE_ZEROES) === 0) {
      const chunk = new Uint8Array(Math.min(bytes, this.maxPayloadBytes));
      for (let o = offset; o < end; o += chunk.length) await this.write(o, chunk.subarray(0, Math.min(chunk.length, end - o)), { fua: flags.fua });
      return;
    }
    const aStart = Math.ceil(offset / min) * min;
    const aEnd = Math.floor(end / min) * min;
    if (aStart >= aEnd) {
      await this.write(offset, new Uint8Array(bytes), { fua: flags.fua });
      return;
    }
    const edges: Promise<void>[] = [];
    if (aStart > offset) edges.push(this.write(offset, new Uint8Array(aStart - offset), { fua: flags.fua }));
    if (end > aEnd) edges.push(this.write(aEnd, new Uint8Array(end - aEnd), { fua: flags.fua }));
    const cmdFlags = this.fuaFlag(flags.fua) | (flags.mayUnmap === true ? 0 : NBD_CMD_FLAG_NO_HOLE);
    const range = min > 1 ? await this.enterWrite(aStart, aEnd, false) : null;
    try {
      const max = Math.floor(MAX_NON_PAYLOAD_BYTES / min) * min;
      const parts: Promise<unknown>[] = [...edges];
      for (let o = aStart; o < aEnd; o += max) parts.push(this.submit(NBD_CMD_WRITE_ZEROES, cmdFlags, o, Math.min(max, aEnd - o), null));
      await Promise.all(parts);
    } finally {
      if (range !== null) this.exitWrite(range);
    }
    await this.emulatedFua(flags.fua);
  }

  /**
   * Tells the server the range is unused (a hint: dropped where the server has no trim, and
   * trimmed to whole blocks of the server's minimum).
   * @locking io
   */
  async trim(offset: number, bytes: number): Promise<void> {
    this.checkWrite('trim', offset, bytes);
    if ((this.info.flags & NBD_FLAG_SEND_TRIM) === 0) return;
    const min = this.info.minBlockBytes;
    const aStart = Math.ceil(offset / min) * min;
    const aEnd = Math.floor((offset + bytes) / min) * min;
    const max = Math.floor(MAX_NON_PAYLOAD_BYTES / min) * min;
    const parts: Promise<unknown>[] = [];
    for (let o = aStart; o < aEnd; o += max) parts.push(this.submit(NBD_CMD_TRIM, 0, o, Math.min(max, aEnd - o), null));
    await Promise.all(parts);
  }

  /**
   * Makes completed writes durable (NBD_CMD_FLUSH; nothing to do where the server has no flush).
   * @locking io
   */
  async flush(): Promise<void> {
    if ((this.info.flags & NBD_FLAG_SEND_FLUSH) === 0) return;
    await this.submit(NBD_CMD_FLUSH, 0, 0, 0, null);
  }

  /**
   * The base:allocation status of the range at `offset` (NBD_CMD_BLOCK_STATUS with REQ_ONE): its
   * first extent, clipped to the range; null when the server has no block status.
   * @locking io
   */
  async blockStatus(offset: number, bytes: number): Promise<ExtentReply | null> {
    if (this.info.baseAllocationId === null) return null;
    const size = this.info.sizeBytes;
    if (offset >= size || bytes === 0) return null;
    const min = this.info.minBlockBytes;
    const aStart = Math.floor(offset / min) * min;
    const end = Math.min(size, offset + bytes);
    const aEnd = Math.min(size, Math.ceil(end / min) * min);
    const length = Math.min(aEnd - aStart, Math.floor(MAX_NON_PAYLOAD_BYTES / min) * min);
    const ext = await this.submit(NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_REQ_ONE, aStart, length, null);
    if (ext === null) return null;
    const extEnd = aStart + ext.bytes;
    // an extent that ends inside the slack before `offset` says nothing of the range: data
    if (extEnd <= offset) return { bytes: Math.min(min, end - offset), flags: 0 };
    return { bytes: Math.min(extEnd, end) - offset, flags: ext.flags };
  }

  // ---- connection ----

  private lost(conn: NbdConnection, reason: string, pending: NbdRequest[]): void {
    if (conn !== this.conn) {
      // not the current connection (one closed by close() or refused after a reconnect): what it
      // still held goes where new requests go
      for (const r of pending) this.dispatch(r);
      return;
    }
    this.conn = null;
    this.lostReason = reason;
    const delay = this.opts.reconnectDelaySec ?? 0;
    if (delay <= 0) {
      this.state = 'failed';
      for (const r of pending) r.reject(this.lostError());
      this.failWaiting();
      return;
    }
    // the current connection exists only while connected: the requests wait from here on, for
    // `delay` seconds at most, and are sent again on the next connection
    this.waiting.unshift(...pending);
    this.state = 'reconnecting';
    this.deadlineTimer = setTimeout(() => this.reconnectDeadline(), delay * 1000);
    this.deadlineTimer.unref();
    void this.reconnectLoop();
  }

  private reconnectDeadline(): void {
    this.deadlineTimer = null;
    if (this.state !== 'reconnecting') return;
    this.state = 'failed';
    this.failWaiting();
  }

  private failWaiting(): void {
    const w = this.waiting;
    this.waiting = [];
    for (const r of w) r.reject(this.lostError());
  }

  private async reconnectLoop(): Promise<void> {
    if (this.reconnecting) return;
    this.reconnecting = true;
    let pause = FIRST_RETRY_PAUSE_MS;
    try {
      while (this.conn === null && this.state !== 'closed') {
        let conn: NbdConnection | null = null;
        try {
          conn = await establish(this.opts, (c, reason, pending) => this.lost(c, reason, pending));
        } catch (e) {
          this.lostReason = `${this.lostReason.split('; reconnect: ')[0] ?? ''}; reconnect: ${e instanceof Error ? e.message : String(e)}`;
        }
        if (conn !== null) {
          if (this.isClosed()) {
            void conn.disconnect();
            return;
          }
          const mismatch = this.sameExport(conn.info);
          if (mismatch !== null) {
            void conn.disconnect();
            this.lostReason = `the server came back with a different export (${mismatch})`;
            this.state = 'failed';
            this.failWaiting();
            return; // a serious error: no more retries
          }
          this.conn = conn;
          this.state = 'connected';
          if (this.deadlineTimer !== null) clearTimeout(this.deadlineTimer);
          this.deadlineTimer = null;
          this.pump();
          return;
        }
        await new Promise<void>((resolve) => {
          this.wakeRetry = resolve;
          this.retryTimer = setTimeout(resolve, pause);
          this.retryTimer.unref();
        });
        this.retryTimer = null;
        this.wakeRetry = null;
        pause = Math.min(MAX_RETRY_PAUSE_MS, pause * 2);
      }
    } finally {
      this.reconnecting = false;
    }
  }

  private isClosed(): boolean {
    return this.state === 'closed';
  }

  private sameExport(info: ExportInfo): string | null {
    if (info.sizeBytes !== this.info.sizeBytes) return `size ${info.sizeBytes} instead of ${this.info.sizeBytes}`;
    if ((info.flags & NBD_FLAG_READ_ONLY) !== (this.info.flags & NBD_FLAG_READ_ONLY)) return 'read-only flag changed';
    if (info.minBlockBytes > this.info.minBlockBytes || info.maxBlockBytes < this.maxPayloadBytes) return 'block-size constraints changed';
    if ((info.baseAllocationId === null) !== (this.info.baseAllocationId === null) || info.structuredReplies !== this.info.structuredReplies) return 'capabilities changed';
    return null;
  }

  /**
   * Sends NBD_CMD_DISC and closes the connection; requests still waiting fail with EIO.
   * @locking io
   */
  async close(): Promise<void> {
    if (this.state === 'closed') return;
    this.state = 'closed';
    if (this.deadlineTimer !== null) clearTimeout(this.deadlineTimer);
    if (this.retryTimer !== null) clearTimeout(this.retryTimer);
    this.wakeRetry?.();
    const w = this.waiting;
    this.waiting = [];
    for (const r of w) this.dispatch(r);
    const conn = this.conn;
    this.conn = null;
    if (conn !== null) await conn.disconnect();
  }
}

/** Opens a socket to the server and runs the handshake, within the connect timeout. */
async function establish(opts: NbdClientOptions, onLost: (c: NbdConnection, reason: string, pending: NbdRequest[]) => void): Promise<NbdConnection> {
  const where = describeAddress(opts.address);
  const timeoutMs = opts.connectTimeoutMs ?? 30_000;
  const socket = opts.address.type === 'unix' ? net.connect({ path: opts.address.path }) : net.connect({ host: opts.address.host, port: opts.address.port });
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    socket.destroy();
  }, timeoutMs);
  timer.unref();
  let onError: ((e: Error) => void) | null = null;
  try {
    await new Promise<void>((resolve, reject) => {
      onError = reject;
      socket.once('connect', resolve);
      socket.once('error', reject);
    });
  } catch (e) {
    clearTimeout(timer);
    // QEMU's words: Failed to connect to '/run/x.sock': No such file or directory
    const target = opts.address.type === 'unix' ? opts.address.path : `${opts.address.host}:${opts.address.port}`;
    const msg = timedOut ? `no connection within ${timeoutMs} ms (NBD server ${where})` : systemErrorText(e);
    throw new BlockError('EIO', `Failed to connect to '${target}': ${msg}`, { op: 'nbd-connect', cause: e });
  }
  if (onError !== null) socket.off('error', onError);
  if (opts.address.type === 'inet') socket.setNoDelay(true);
  // from here on the reader reports the socket's errors (it listens for them)
  const reader = new SocketReader(socket);
  let neg: Negotiated;
  const hostname = opts.tlsHostname ?? (opts.address.type === 'inet' ? opts.address.host : undefined);
  try {
    neg = await negotiate(socket, reader, opts.exportName, where, opts.tls === undefined ? undefined : { creds: opts.tls, hostname });
  } catch (e) {
    socket.destroy();
    if (timedOut) throw new BlockError('EIO', `NBD handshake with ${where} failed: no answer within ${timeoutMs} ms`, { op: 'nbd-connect', cause: e });
    throw e;
  } finally {
    clearTimeout(timer);
  }
  const info: ExportInfo = neg.info;
  let conn: NbdConnection | null = null;
  conn = new NbdConnection(neg.socket, neg.reader, info, where, (reason, pending) => {
    if (conn !== null) onLost(conn, reason, pending);
  });
  return conn;
}

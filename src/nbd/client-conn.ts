/**
 * One NBD connection in the transmission phase: requests go out pipelined, each with its own
 * cookie (the spec's "handle"), and replies, simple or structured, are matched to them by cookie
 * in whatever order the server sends them.
 *
 * I/O code: any number of requests may be in flight; the connection has one reply loop.
 *
 * A server that breaks the protocol (a bad magic, a reply for a cookie that is not in flight, a
 * chunk outside its request or longer than the bounds, a chunk type the request cannot get)
 * ends the connection: the socket is destroyed and every request still in flight is handed to
 * `onLost` with the reason, so the client can retry them on a new connection or fail them with
 * EIO. Nothing the server sends is trusted for a length before it is checked.
 */
import type { Socket } from 'node:net';
import { BlockError } from '../block/errors.js';
import type { ExportInfo } from './client-handshake.js';
import {
  commandName,
  encodeRequest,
  MAX_CHUNK_BYTES,
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_DISC,
  NBD_CMD_READ,
  NBD_CMD_WRITE,
  NBD_ERRNO,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_ERROR,
  NBD_REPLY_TYPE_ERROR_BIT,
  NBD_REPLY_TYPE_ERROR_OFFSET,
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
  REQUEST_HEADER_BYTES,
} from './client-proto.js';
import { ReaderClosed, type SocketReader } from './client-reader.js';

/** The first extent of a block-status reply. */
export interface ExtentReply {
  bytes: number;
  flags: number;
}

/** A request as the client keeps it across connections; the per-attempt fields are reset on each send. */
export interface NbdRequest {
  readonly type: number;
  readonly flags: number;
  readonly offset: number;
  readonly length: number;
  /** The payload of a write, the destination of a read, null otherwise. */
  readonly data: Uint8Array | null;
  resolve(extent: ExtentReply | null): void;
  reject(e: BlockError): void;
  /** Bytes of a read the reply has covered so far. */
  covered: number;
  /** The first error chunk of the reply. */
  error: BlockError | null;
  extent: ExtentReply | null;
}

/** Why a connection ended and what was still in flight on it. */
export type LostHandler = (reason: string, inFlight: NbdRequest[]) => void;

class ProtocolError extends Error {
  override readonly name = 'ProtocolError';
}

/** An NBD connection in transmission. */
export class NbdConnection {
  private readonly inFlight = new Map<number, NbdRequest>();
  private nextCookie = 1;
  private dead: string | null = null;
  private disconnecting = false;
  private finished = false;
  private corked = false;
  /** Settles when the socket has closed. */
  private readonly closed: Promise<void>;

  constructor(
    private readonly socket: Socket,
    private readonly reader: SocketReader,
    readonly info: ExportInfo,
    private readonly where: string,
    private readonly onLost: LostHandler,
  ) {
    this.closed = new Promise<void>((resolve) => socket.once('close', () => resolve()));
    void this.replyLoop();
  }

  /** Requests waiting for their reply. */
  get inFlightCount(): number {
    return this.inFlight.size;
  }

  /** False once the connection ended (lost, broken by the server, or disconnected). */
  get alive(): boolean {
    return this.dead === null;
  }

  /**
   * Sends a request; its reply resolves or rejects it (or onLost gets it).
   * @locking io
   */
  send(req: NbdRequest): void {
    if (this.dead !== null) {
      this.onLost(this.dead, [req]);
      return;
    }
    req.covered = 0;
    req.error = null;
    req.extent = null;
    const cookie = this.nextCookie++;
    this.inFlight.set(cookie, req);
    const hdr = Buffer.allocUnsafe(REQUEST_HEADER_BYTES);
    encodeRequest(hdr, req.flags, req.type, cookie, req.offset, req.length);
    // requests sent in one tick leave in one writev (QEMU's plug/unplug)
    if (!this.corked) {
      this.corked = true;
      this.socket.cork();
      process.nextTick(this.uncork);
    }
    this.socket.write(hdr);
    if (req.type === NBD_CMD_WRITE && req.data !== null) this.socket.write(req.data);
  }

  private readonly uncork = (): void => {
    this.corked = false;
    this.socket.uncork();
  };

  /**
   * Sends NBD_CMD_DISC (the spec's clean close) once nothing is in flight, and ends the socket.
   * @locking io
   */
  async disconnect(): Promise<void> {
    if (this.dead === null) {
      this.disconnecting = true;
      const hdr = Buffer.allocUnsafe(REQUEST_HEADER_BYTES);
      encodeRequest(hdr, 0, NBD_CMD_DISC, this.nextCookie++, 0, 0);
      this.socket.end(hdr);
      this.dead = 'the connection was closed by the client';
    }
    // a server that keeps the socket open after DISC is not waited for long
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([this.closed, new Promise<void>((resolve) => (timer = setTimeout(resolve, 2000)))]);
    clearTimeout(timer);
    this.die(this.dead ?? 'closed');
  }

  /** Destroys the socket without a word to the server (tests, a broken server). */
  destroy(reason: string): void {
    this.die(reason);
  }

  private die(reason: string): void {
    if (this.finished) return;
    this.finished = true;
    this.dead ??= reason;
    this.reader.close(reason);
    this.socket.destroy();
    const pending = [...this.inFlight.values()];
    this.inFlight.clear();
    // a disconnect the client asked for reports the close as its reason
    this.onLost(this.disconnecting ? this.dead : reason, pending);
  }

  private async replyLoop(): Promise<void> {
    try {
      for (;;) await this.readReply();
    } catch (e) {
      const why = e instanceof ProtocolError ? `protocol error: ${e.message}` : e instanceof ReaderClosed ? e.message : e instanceof Error ? e.message : String(e);
      this.die(why);
    }
  }

  /** A read's destination (a read always has one: the client makes it so). */
  private dataOf(req: NbdRequest): Uint8Array {
    if (req.data === null) throw new ProtocolError(`internal error: ${this.reqText(req)} has no buffer`);
    return req.data;
  }

  private reqText(req: NbdRequest): string {
    return `${commandName(req.type)} of ${req.length} bytes at offset ${req.offset}`;
  }

  private serverError(req: NbdRequest, errno: number, message: string): BlockError {
    const known = NBD_ERRNO[errno];
    const text = message === '' ? '' : ` (${message})`;
    return new BlockError(known?.code ?? 'EIO', `NBD server ${this.where}: ${this.reqText(req)} failed: ${known?.name ?? `error ${errno}`}${text}`, {
      op: commandName(req.type),
      offset: req.offset,
    });
  }

  private take(cookieHi: number, cookieLo: number, keep: boolean): NbdRequest {
    const cookie = cookieHi * 0x100000000 + cookieLo;
    const req = cookieHi >= 0x200000 ? undefined : this.inFlight.get(cookie);
    if (req === undefined) throw new ProtocolError(`a reply for cookie ${cookieHi * 0x100000000 + cookieLo} that is not in flight`);
    if (!keep) this.inFlight.delete(cookie);
    return req;
  }

  private async readReply(): Promise<void> {
    // a simple reply is 16 bytes, a structured chunk header 20: take 16 at once when they are
    // there; otherwise check the magic first, so that garbage fails at once instead of waiting
    let h16: Buffer;
    if (this.reader.buffered >= 16) h16 = await this.reader.read(16);
    else {
      const m = Buffer.from(await this.reader.read(4));
      const mg = m.readUInt32BE(0);
      if (mg !== NBD_SIMPLE_REPLY_MAGIC && mg !== NBD_STRUCTURED_REPLY_MAGIC) throw new ProtocolError(`bad reply magic 0x${mg.toString(16).padStart(8, '0')}`);
      h16 = Buffer.concat([m, await this.reader.read(12)]);
    }
    const magic = h16.readUInt32BE(0);
    if (magic === NBD_SIMPLE_REPLY_MAGIC) {
      const errno = h16.readUInt32BE(4);
      const hi = h16.readUInt32BE(8);
      const lo = h16.readUInt32BE(12);
      const req = this.take(hi, lo, true);
      if (errno === 0 && req.type === NBD_CMD_READ) {
        if (this.info.structuredReplies) throw new ProtocolError(`a simple reply with data to a ${this.reqText(req)} after structured replies were agreed`);
        await this.reader.readInto(this.dataOf(req), 0, req.length);
      }
      if (errno === 0 && req.type === NBD_CMD_BLOCK_STATUS) throw new ProtocolError(`a simple reply to ${this.reqText(req)} (block status needs a structured reply)`);
      this.take(hi, lo, false);
      if (errno !== 0) req.reject(this.serverError(req, errno, ''));
      else req.resolve(null);
      return;
    }
    if (magic !== NBD_STRUCTURED_REPLY_MAGIC) throw new ProtocolError(`bad reply magic 0x${magic.toString(16).padStart(8, '0')}`);
    if (!this.info.structuredReplies) throw new ProtocolError('a structured reply although structured replies were not agreed');
    // h16 may be a view into the reader's chunk: take what is needed before the next read
    const flagsType = h16.readUInt32BE(4);
    const cookieHi = h16.readUInt32BE(8);
    const cookieLo = h16.readUInt32BE(12);
    const length = (await this.reader.read(4)).readUInt32BE(0);
    const flags = flagsType >>> 16;
    const type = flagsType & 0xffff;
    const done = (flags & NBD_REPLY_FLAG_DONE) !== 0;
    const req = this.take(cookieHi, cookieLo, true);
    const bad = (what: string): ProtocolError => new ProtocolError(`${what} in the reply to ${this.reqText(req)}`);
    if (type === NBD_REPLY_TYPE_OFFSET_DATA) {
      if (req.type !== NBD_CMD_READ) throw bad('a data chunk');
      if (length < 9 || length - 8 > req.length) throw bad(`a data chunk of ${length} bytes`);
      const off = Number((await this.reader.read(8)).readBigUInt64BE(0));
      const n = length - 8;
      if (off < req.offset || off + n > req.offset + req.length) throw bad(`a data chunk at offset ${off} (${n} bytes) past the request`);
      await this.reader.readInto(this.dataOf(req), off - req.offset, n);
      req.covered += n;
    } else if (type === NBD_REPLY_TYPE_OFFSET_HOLE) {
      if (req.type !== NBD_CMD_READ) throw bad('a hole chunk');
      if (length !== 12) throw bad(`a hole chunk of ${length} bytes`);
      const b = await this.reader.read(12);
      const off = Number(b.readBigUInt64BE(0));
      const n = b.readUInt32BE(8);
      if (n === 0 || off < req.offset || off + n > req.offset + req.length) throw bad(`a hole at offset ${off} (${n} bytes) past the request`);
      this.dataOf(req).fill(0, off - req.offset, off - req.offset + n);
      req.covered += n;
    } else if (type === NBD_REPLY_TYPE_BLOCK_STATUS) {
      if (req.type !== NBD_CMD_BLOCK_STATUS) throw bad('a block-status chunk');
      if (length < 12 || (length - 4) % 8 !== 0 || length > MAX_CHUNK_BYTES) throw bad(`a block-status chunk of ${length} bytes`);
      const b = await this.reader.read(length);
      const id = b.readUInt32BE(0);
      if (id !== this.info.baseAllocationId) throw bad(`block status for meta context ${id}, which was not agreed`);
      if (req.extent !== null) throw bad('a second block-status chunk');
      const bytes = b.readUInt32BE(4);
      if (bytes === 0) throw bad('an extent of 0 bytes');
      req.extent = { bytes: Math.min(bytes, req.length), flags: b.readUInt32BE(8) };
    } else if ((type & NBD_REPLY_TYPE_ERROR_BIT) !== 0) {
      if (length < 6 || length > MAX_CHUNK_BYTES) throw bad(`an error chunk of ${length} bytes`);
      const b = await this.reader.read(length);
      const errno = b.readUInt32BE(0);
      const msgLen = b.readUInt16BE(4);
      if (errno === 0) throw bad('an error chunk with error 0');
      if (msgLen > length - 6) throw bad(`an error message of ${msgLen} bytes in a ${length}-byte chunk`);
      if (type === NBD_REPLY_TYPE_ERROR_OFFSET && length !== 6 + msgLen + 8) throw bad('an error-offset chunk of the wrong length');
      if (type === NBD_REPLY_TYPE_ERROR && length !== 6 + msgLen) throw bad('an error chunk of the wrong length');
      const msg = b.subarray(6, 6 + msgLen).toString('utf8').replace(/[^\x20-\x7e]/g, '?').slice(0, 512);
      req.error ??= this.serverError(req, errno, msg);
    } else if (type === NBD_REPLY_TYPE_NONE) {
      if (!done || length !== 0) throw bad('a NONE chunk without the DONE flag or with a payload');
    } else {
      throw bad(`an unknown chunk type ${type}`);
    }
    if (!done) return;
    // a broken reply leaves the request in flight, so that onLost gets it with the reason
    if (req.error === null && req.type === NBD_CMD_READ && req.covered !== req.length) throw bad(`chunks covering ${req.covered} of ${req.length} bytes`);
    if (req.error === null && req.type === NBD_CMD_BLOCK_STATUS && req.extent === null) throw bad('no block-status chunk');
    this.take(cookieHi, cookieLo, false);
    if (req.error !== null) req.reject(req.error);
    else req.resolve(req.extent);
  }
}

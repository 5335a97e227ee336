/**
 * The NBD wire protocol (NetworkBlockDevice/nbd, doc/proto.md): constants and the encoding and
 * decoding of every fixed-size header, for both the server (src/nbd/server.ts) and the client.
 *
 * Common code: no lock, no calling-context rule, no I/O. Every number on the wire is big-endian.
 *
 * The conversation, in short (fixed newstyle only; oldstyle is not spoken):
 *
 *   S: "NBDMAGIC" "IHAVEOPT" u16 handshake flags (FIXED_NEWSTYLE | NO_ZEROES)
 *   C: u32 client flags
 *   C: "IHAVEOPT" u32 option u32 length [data]          (repeated; haggling)
 *   S: u64 REPLY_MAGIC u32 option u32 reply-type u32 length [data]   (one or more per option)
 *   ... until NBD_OPT_GO is acked (or NBD_OPT_EXPORT_NAME, which has its own bare reply)
 *   C: request  u32 REQUEST_MAGIC u16 flags u16 type u64 cookie u64 offset u32 length [data]
 *   S: simple   u32 SIMPLE_REPLY_MAGIC u32 error u64 cookie [data]
 *   S: chunk    u32 STRUCTURED_REPLY_MAGIC u16 flags u16 type u64 cookie u32 length [payload]
 *
 * Offsets and sizes are kept as JS numbers: an image cannot exceed 2^53 bytes, so a larger offset
 * decodes to a value that is out of range for every export and is refused as such. Cookies are
 * opaque and echoed exactly, so they are bigint.
 */
import { BlockError, type ErrorCode } from '../block/errors.js';

/** "NBDMAGIC": the first 8 bytes the server sends. */
export const NBD_INIT_MAGIC = 0x4e42444d41474943n;
/** "IHAVEOPT": the newstyle magic, and the prefix of every option the client sends. */
export const NBD_OPTS_MAGIC = 0x49484156454f5054n;
/** The magic that starts every option reply. */
export const NBD_REP_MAGIC = 0x0003e889045565a9n;
/** The magic of a transmission request. */
export const NBD_REQUEST_MAGIC = 0x25609513;
/** The magic of a simple reply. */
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
/** The magic of a structured reply chunk. */
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;

/** The well-known TCP port. */
export const NBD_DEFAULT_PORT = 10809;

/** Handshake flags (server, u16). */
export const NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_NO_ZEROES = 1 << 1;

/** Client flags (u32). */
export const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_C_NO_ZEROES = 1 << 1;

/** Transmission flags (u16, per export). */
export const NBD_FLAG_HAS_FLAGS = 1 << 0;
export const NBD_FLAG_READ_ONLY = 1 << 1;
export const NBD_FLAG_SEND_FLUSH = 1 << 2;
export const NBD_FLAG_SEND_FUA = 1 << 3;
export const NBD_FLAG_ROTATIONAL = 1 << 4;
export const NBD_FLAG_SEND_TRIM = 1 << 5;
export const NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6;
export const NBD_FLAG_SEND_DF = 1 << 7;
export const NBD_FLAG_CAN_MULTI_CONN = 1 << 8;
export const NBD_FLAG_SEND_RESIZE = 1 << 9;
export const NBD_FLAG_SEND_CACHE = 1 << 10;
export const NBD_FLAG_SEND_FAST_ZERO = 1 << 11;

/** Options (haggling phase). */
export const NBD_OPT_EXPORT_NAME = 1;
export const NBD_OPT_ABORT = 2;
export const NBD_OPT_LIST = 3;
export const NBD_OPT_PEEK_EXPORT = 4;
export const NBD_OPT_STARTTLS = 5;
export const NBD_OPT_INFO = 6;
export const NBD_OPT_GO = 7;
export const NBD_OPT_STRUCTURED_REPLY = 8;
export const NBD_OPT_LIST_META_CONTEXT = 9;
export const NBD_OPT_SET_META_CONTEXT = 10;
export const NBD_OPT_EXTENDED_HEADERS = 11;

/** Option reply types; the error ones have bit 31 set. */
export const NBD_REP_ACK = 1;
export const NBD_REP_SERVER = 2;
export const NBD_REP_INFO = 3;
export const NBD_REP_META_CONTEXT = 4;
export const NBD_REP_FLAG_ERROR = 0x80000000;
export const NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR + 1;
export const NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR + 2;
export const NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR + 3;
export const NBD_REP_ERR_PLATFORM = NBD_REP_FLAG_ERROR + 4;
export const NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR + 5;
export const NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR + 6;
export const NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR + 7;
export const NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR + 8;
export const NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR + 9;

/** NBD_REP_INFO types (also what NBD_OPT_INFO/GO may request). */
export const NBD_INFO_EXPORT = 0;
export const NBD_INFO_NAME = 1;
export const NBD_INFO_DESCRIPTION = 2;
export const NBD_INFO_BLOCK_SIZE = 3;

/** Commands (transmission phase). */
export const NBD_CMD_READ = 0;
export const NBD_CMD_WRITE = 1;
export const NBD_CMD_DISC = 2;
export const NBD_CMD_FLUSH = 3;
export const NBD_CMD_TRIM = 4;
export const NBD_CMD_CACHE = 5;
export const NBD_CMD_WRITE_ZEROES = 6;
export const NBD_CMD_BLOCK_STATUS = 7;
export const NBD_CMD_RESIZE = 8;

/** Command flags (u16). */
export const NBD_CMD_FLAG_FUA = 1 << 0;
export const NBD_CMD_FLAG_NO_HOLE = 1 << 1;
export const NBD_CMD_FLAG_DF = 1 << 2;
export const NBD_CMD_FLAG_REQ_ONE = 1 << 3;
export const NBD_CMD_FLAG_FAST_ZERO = 1 << 4;

/** Structured reply chunk flags and types. */
export const NBD_REPLY_FLAG_DONE = 1 << 0;
export const NBD_REPLY_TYPE_NONE = 0;
export const NBD_REPLY_TYPE_OFFSET_DATA = 1;
export const NBD_REPLY_TYPE_OFFSET_HOLE = 2;
export const NBD_REPLY_TYPE_BLOCK_STATUS = 5;
export const NBD_REPLY_TYPE_ERROR = (1 << 15) + 1;
export const NBD_REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2;

/** True for the structured reply types that carry an error. */
export function isErrorReplyType(type: number): boolean {
  return (type & (1 << 15)) !== 0;
}

/** The `base:allocation` meta context and its status flags. */
export const NBD_META_BASE_ALLOCATION = 'base:allocation';
export const NBD_STATE_HOLE = 1 << 0;
export const NBD_STATE_ZERO = 1 << 1;

/** Error values on the wire (the spec's list; Linux numbers). */
export const NBD_EPERM = 1;
export const NBD_EIO = 5;
export const NBD_ENOMEM = 12;
export const NBD_EINVAL = 22;
export const NBD_ENOSPC = 28;
export const NBD_EOVERFLOW = 75;
export const NBD_ENOTSUP = 95;
export const NBD_ESHUTDOWN = 108;

/** Sizes of the fixed headers, in bytes. */
export const NBD_REQUEST_SIZE = 28;
export const NBD_SIMPLE_REPLY_SIZE = 16;
export const NBD_STRUCTURED_REPLY_HEADER_SIZE = 20;
export const NBD_OPTION_HEADER_SIZE = 16;
export const NBD_OPTION_REPLY_HEADER_SIZE = 20;
/** The server's greeting: NBDMAGIC, IHAVEOPT, u16 flags. */
export const NBD_GREETING_SIZE = 18;
/** The reply to NBD_OPT_EXPORT_NAME without the 124 zero bytes: u64 size, u16 flags. */
export const NBD_EXPORT_NAME_REPLY_SIZE = 10;
export const NBD_EXPORT_NAME_ZEROES = 124;

/** The spec's bound on strings (export names, descriptions, error messages). */
export const NBD_MAX_STRING_BYTES = 4096;
/** The largest request payload the spec says every server accepts without negotiation. */
export const NBD_MAX_PAYLOAD_BYTES = 32 * 1024 * 1024;

/** A transmission request header. */
export interface NbdRequest {
  flags: number;
  type: number;
  cookie: bigint;
  offset: number;
  length: number;
}

/** A simple reply header. */
export interface NbdSimpleReply {
  error: number;
  cookie: bigint;
}

/** A structured reply chunk header. */
export interface NbdChunkHeader {
  flags: number;
  type: number;
  cookie: bigint;
  length: number;
}

/** An option the client sent (header only; `length` bytes of data follow). */
export interface NbdOptionHeader {
  magic: bigint;
  option: number;
  length: number;
}

/** An option reply header (`length` bytes of data follow). */
export interface NbdOptionReplyHeader {
  magic: bigint;
  option: number;
  type: number;
  length: number;
}

/** Reads a u64 as a number; values past 2^53 come back imprecise but larger than any image. */
function readU64(buf: Uint8Array, at: number): number {
  const v = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  return v.getUint32(at) * 0x1_0000_0000 + v.getUint32(at + 4);
}

function view(buf: Uint8Array): DataView {
  return new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
}

function need(buf: Uint8Array, at: number, size: number, what: string): void {
  if (at < 0 || buf.length - at < size) {
    throw new BlockError('EINVAL', `NBD: ${what} needs ${size} bytes, only ${Math.max(0, buf.length - at)} available`, { op: 'nbd' });
  }
}

function writeU64(v: DataView, at: number, n: number | bigint): void {
  if (typeof n === 'bigint') {
    v.setBigUint64(at, n);
    return;
  }
  if (!Number.isSafeInteger(n) || n < 0) throw new BlockError('EINVAL', `NBD: ${n} is not a valid u64`, { op: 'nbd', value: n });
  v.setUint32(at, Math.floor(n / 0x1_0000_0000));
  v.setUint32(at + 4, n >>> 0);
}

/** The server's greeting (18 bytes). */
export function encodeGreeting(handshakeFlags: number): Buffer {
  const b = Buffer.alloc(NBD_GREETING_SIZE);
  const v = view(b);
  v.setBigUint64(0, NBD_INIT_MAGIC);
  v.setBigUint64(8, NBD_OPTS_MAGIC);
  v.setUint16(16, handshakeFlags);
  return b;
}

/** Parses the greeting; EINVAL when the magic is not NBDMAGIC/IHAVEOPT (oldstyle is refused too). */
export function decodeGreeting(buf: Uint8Array, at = 0): { handshakeFlags: number } {
  need(buf, at, NBD_GREETING_SIZE, 'the greeting');
  const v = view(buf);
  if (v.getBigUint64(at) !== NBD_INIT_MAGIC) throw new BlockError('EINVAL', 'NBD: the server did not start with NBDMAGIC', { op: 'nbd' });
  if (v.getBigUint64(at + 8) !== NBD_OPTS_MAGIC) {
    throw new BlockError('ENOTSUP', 'NBD: the server is not fixed newstyle (oldstyle negotiation is not supported)', { op: 'nbd' });
  }
  return { handshakeFlags: v.getUint16(at + 16) };
}

/** An option the client sends: IHAVEOPT, option, length, data. */
export function encodeOption(option: number, data: Uint8Array = new Uint8Array(0)): Buffer {
  const b = Buffer.alloc(NBD_OPTION_HEADER_SIZE + data.length);
  const v = view(b);
  v.setBigUint64(0, NBD_OPTS_MAGIC);
  v.setUint32(8, option);
  v.setUint32(12, data.length);
  b.set(data, NBD_OPTION_HEADER_SIZE);
  return b;
}

/** Parses an option header (the caller checks the magic: a wrong one ends the session). */
export function decodeOptionHeader(buf: Uint8Array, at = 0): NbdOptionHeader {
  need(buf, at, NBD_OPTION_HEADER_SIZE, 'an option header');
  const v = view(buf);
  return { magic: v.getBigUint64(at), option: v.getUint32(at + 8), length: v.getUint32(at + 12) };
}

/** An option reply: REPLY_MAGIC, option, type, length, data. */
export function encodeOptionReply(option: number, type: number, data: Uint8Array = new Uint8Array(0)): Buffer {
  const b = Buffer.alloc(NBD_OPTION_REPLY_HEADER_SIZE + data.length);
  const v = view(b);
  v.setBigUint64(0, NBD_REP_MAGIC);
  v.setUint32(8, option);
  v.setUint32(12, type >>> 0);
  v.setUint32(16, data.length);
  b.set(data, NBD_OPTION_REPLY_HEADER_SIZE);
  return b;
}

/** Parses an option reply header. */
export function decodeOptionReplyHeader(buf: Uint8Array, at = 0): NbdOptionReplyHeader {
  need(buf, at, NBD_OPTION_REPLY_HEADER_SIZE, 'an option reply header');
  const v = view(buf);
  return { magic: v.getBigUint64(at), option: v.getUint32(at + 8), type: v.getUint32(at + 12), length: v.getUint32(at + 16) };
}

/** The NBD_INFO_EXPORT payload: u16 type, u64 size, u16 transmission flags. */
export function encodeInfoExport(sizeBytes: number, transmissionFlags: number): Buffer {
  const b = Buffer.alloc(12);
  const v = view(b);
  v.setUint16(0, NBD_INFO_EXPORT);
  writeU64(v, 2, sizeBytes);
  v.setUint16(10, transmissionFlags);
  return b;
}

/** The NBD_INFO_NAME or NBD_INFO_DESCRIPTION payload: u16 type, the UTF-8 string. */
export function encodeInfoString(type: typeof NBD_INFO_NAME | typeof NBD_INFO_DESCRIPTION, text: string): Buffer {
  const s = Buffer.from(text, 'utf8');
  const b = Buffer.alloc(2 + s.length);
  b.writeUInt16BE(type, 0);
  b.set(s, 2);
  return b;
}

/** Block size constraints, as NBD_INFO_BLOCK_SIZE carries them. */
export interface NbdBlockSize {
  minimum: number;
  preferred: number;
  maximum: number;
}

/** The NBD_INFO_BLOCK_SIZE payload: u16 type, u32 minimum, preferred, maximum. */
export function encodeInfoBlockSize(bs: NbdBlockSize): Buffer {
  const b = Buffer.alloc(14);
  const v = view(b);
  v.setUint16(0, NBD_INFO_BLOCK_SIZE);
  v.setUint32(2, bs.minimum);
  v.setUint32(6, bs.preferred);
  v.setUint32(10, bs.maximum);
  return b;
}

/** A decoded NBD_REP_INFO payload (unknown types are kept raw: clients must ignore them). */
export type NbdInfo =
  | { type: typeof NBD_INFO_EXPORT; sizeBytes: number; transmissionFlags: number }
  | { type: typeof NBD_INFO_NAME | typeof NBD_INFO_DESCRIPTION; text: string }
  | ({ type: typeof NBD_INFO_BLOCK_SIZE } & NbdBlockSize)
  | { type: number; raw: Uint8Array };

/** Parses an NBD_REP_INFO payload; EINVAL when a known type has the wrong length. */
export function decodeInfo(data: Uint8Array): NbdInfo {
  need(data, 0, 2, 'an NBD_REP_INFO payload');
  const v = view(data);
  const type = v.getUint16(0);
  const bad = (len: number): BlockError =>
    new BlockError('EINVAL', `NBD: NBD_REP_INFO type ${type} has ${data.length} bytes, expected ${len}`, { op: 'nbd', field: 'info' });
  switch (type) {
    case NBD_INFO_EXPORT:
      if (data.length !== 12) throw bad(12);
      return { type, sizeBytes: readU64(data, 2), transmissionFlags: v.getUint16(10) };
    case NBD_INFO_NAME:
    case NBD_INFO_DESCRIPTION:
      return { type, text: Buffer.from(data.buffer, data.byteOffset + 2, data.length - 2).toString('utf8') };
    case NBD_INFO_BLOCK_SIZE:
      if (data.length !== 14) throw bad(14);
      return { type, minimum: v.getUint32(2), preferred: v.getUint32(6), maximum: v.getUint32(10) };
    default:
      return { type, raw: data.subarray(2) };
  }
}

/** The payload of NBD_OPT_INFO / NBD_OPT_GO: u32 name length, name, u16 count, count × u16 info types. */
export function encodeInfoRequest(exportName: string, infos: readonly number[] = []): Buffer {
  const name = Buffer.from(exportName, 'utf8');
  const b = Buffer.alloc(4 + name.length + 2 + 2 * infos.length);
  b.writeUInt32BE(name.length, 0);
  b.set(name, 4);
  b.writeUInt16BE(infos.length, 4 + name.length);
  infos.forEach((t, i) => b.writeUInt16BE(t, 6 + name.length + 2 * i));
  return b;
}

/** Parses an NBD_OPT_INFO / NBD_OPT_GO payload; null when the lengths do not add up. */
export function decodeInfoRequest(data: Uint8Array): { exportName: string; infos: number[] } | null {
  if (data.length < 6) return null;
  const v = view(data);
  const nameLen = v.getUint32(0);
  if (nameLen > data.length - 6) return null;
  const count = v.getUint16(4 + nameLen);
  if (data.length !== 6 + nameLen + 2 * count) return null;
  const infos: number[] = [];
  for (let i = 0; i < count; i++) infos.push(v.getUint16(6 + nameLen + 2 * i));
  return { exportName: Buffer.from(data.buffer, data.byteOffset + 4, nameLen).toString('utf8'), infos };
}

/** The payload of LIST/SET_META_CONTEXT: u32 name length, name, u32 count, count × (u32 length, query). */
export function encodeMetaContextRequest(exportName: string, queries: readonly string[]): Buffer {
  const parts: Buffer[] = [];
  const name = Buffer.from(exportName, 'utf8');
  const head = Buffer.alloc(4);
  head.writeUInt32BE(name.length, 0);
  parts.push(head, name);
  const count = Buffer.alloc(4);
  count.writeUInt32BE(queries.length, 0);
  parts.push(count);
  for (const q of queries) {
    const qb = Buffer.from(q, 'utf8');
    const ql = Buffer.alloc(4);
    ql.writeUInt32BE(qb.length, 0);
    parts.push(ql, qb);
  }
  return Buffer.concat(parts);
}

/** Parses a LIST/SET_META_CONTEXT payload; null when the lengths do not add up. */
export function decodeMetaContextRequest(data: Uint8Array): { exportName: string; queries: string[] } | null {
  const v = view(data);
  if (data.length < 8) return null;
  const nameLen = v.getUint32(0);
  if (nameLen > data.length - 8) return null;
  let at = 4 + nameLen;
  const count = v.getUint32(at);
  at += 4;
  // every query takes at least its 4-byte length: bound the count by what the payload can hold
  if (count > (data.length - at) / 4) return null;
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    if (data.length - at < 4) return null;
    const len = v.getUint32(at);
    at += 4;
    if (len > data.length - at) return null;
    queries.push(Buffer.from(data.buffer, data.byteOffset + at, len).toString('utf8'));
    at += len;
  }
  if (at !== data.length) return null;
  return { exportName: Buffer.from(data.buffer, data.byteOffset + 4, nameLen).toString('utf8'), queries };
}

/** The NBD_REP_META_CONTEXT payload: u32 context id, the context's name. */
export function encodeMetaContextReply(id: number, name: string): Buffer {
  const s = Buffer.from(name, 'utf8');
  const b = Buffer.alloc(4 + s.length);
  b.writeUInt32BE(id, 0);
  b.set(s, 4);
  return b;
}

/** Parses an NBD_REP_META_CONTEXT payload. */
export function decodeMetaContextReply(data: Uint8Array): { id: number; name: string } {
  need(data, 0, 4, 'an NBD_REP_META_CONTEXT payload');
  return { id: view(data).getUint32(0), name: Buffer.from(data.buffer, data.byteOffset + 4, data.length - 4).toString('utf8') };
}

/** The NBD_REP_SERVER payload (NBD_OPT_LIST): u32 name length, name, description. */
export function encodeServerReply(exportName: string, description = ''): Buffer {
  const name = Buffer.from(exportName, 'utf8');
  const desc = Buffer.from(description, 'utf8');
  const b = Buffer.alloc(4 + name.length + desc.length);
  b.writeUInt32BE(name.length, 0);
  b.set(name, 4);
  b.set(desc, 4 + name.length);
  return b;
}

/** Parses an NBD_REP_SERVER payload. */
export function decodeServerReply(data: Uint8Array): { exportName: string; description: string } {
  need(data, 0, 4, 'an NBD_REP_SERVER payload');
  const len = view(data).getUint32(0);
  if (len > data.length - 4) throw new BlockError('EINVAL', `NBD: NBD_REP_SERVER names ${len} bytes in a ${data.length}-byte payload`, { op: 'nbd' });
  return {
    exportName: Buffer.from(data.buffer, data.byteOffset + 4, len).toString('utf8'),
    description: Buffer.from(data.buffer, data.byteOffset + 4 + len, data.length - 4 - len).toString('utf8'),
  };
}

/** Writes a request header into `out` at `at` (28 bytes). */
export function writeRequest(out: Uint8Array, at: number, req: NbdRequest): void {
  need(out, at, NBD_REQUEST_SIZE, 'a request');
  const v = view(out);
  v.setUint32(at, NBD_REQUEST_MAGIC);
  v.setUint16(at + 4, req.flags);
  v.setUint16(at + 6, req.type);
  v.setBigUint64(at + 8, req.cookie);
  writeU64(v, at + 16, req.offset);
  v.setUint32(at + 24, req.length);
}

/** A request header as a new buffer. */
export function encodeRequest(req: NbdRequest): Buffer {
  const b = Buffer.alloc(NBD_REQUEST_SIZE);
  writeRequest(b, 0, req);
  return b;
}

/** Parses a request header; null when the magic is wrong (the server then drops the connection). */
export function decodeRequest(buf: Uint8Array, at = 0): NbdRequest | null {
  need(buf, at, NBD_REQUEST_SIZE, 'a request');
  // Buffer's own readers where we can: no DataView per request on the server's hot path
  const b = Buffer.isBuffer(buf) ? buf : Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength);
  if (b.readUInt32BE(at) !== NBD_REQUEST_MAGIC) return null;
  return {
    flags: b.readUInt16BE(at + 4),
    type: b.readUInt16BE(at + 6),
    cookie: b.readBigUInt64BE(at + 8),
    offset: b.readUInt32BE(at + 16) * 0x1_0000_0000 + b.readUInt32BE(at + 20),
    length: b.readUInt32BE(at + 24),
  };
}

/** Writes a simple reply header into `out` at `at` (16 bytes). */
export function writeSimpleReply(out: Uint8Array, at: number, error: number, cookie: bigint): void {
  need(out, at, NBD_SIMPLE_REPLY_SIZE, 'a simple reply');
  const b = Buffer.isBuffer(out) ? out : Buffer.from(out.buffer, out.byteOffset, out.byteLength);
  b.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, at);
  b.writeUInt32BE(error, at + 4);
  b.writeBigUInt64BE(cookie, at + 8);
}

/** A simple reply header as a new buffer. */
export function encodeSimpleReply(error: number, cookie: bigint): Buffer {
  const b = Buffer.alloc(NBD_SIMPLE_REPLY_SIZE);
  writeSimpleReply(b, 0, error, cookie);
  return b;
}

/** Writes a structured reply chunk header into `out` at `at` (20 bytes). */
export function writeChunkHeader(out: Uint8Array, at: number, h: NbdChunkHeader): void {
  need(out, at, NBD_STRUCTURED_REPLY_HEADER_SIZE, 'a structured reply chunk');
  const v = view(out);
  v.setUint32(at, NBD_STRUCTURED_REPLY_MAGIC);
  v.setUint16(at + 4, h.flags);
  v.setUint16(at + 6, h.type);
  v.setBigUint64(at + 8, h.cookie);
  v.setUint32(at + 16, h.length);
}

/** A structured reply chunk header as a new buffer. */
export function encodeChunkHeader(h: NbdChunkHeader): Buffer {
  const b = Buffer.alloc(NBD_STRUCTURED_REPLY_HEADER_SIZE);
  writeChunkHeader(b, 0, h);
  return b;
}

/**
 * Parses the start of a reply: a simple reply (16 bytes) or a structured chunk header (20 bytes),
 * told apart by the magic. Null when fewer bytes than the header needs are present; EIO on a
 * magic that is neither (the peer is not speaking NBD any more).
 */
export function decodeReplyHeader(buf: Uint8Array, at = 0): ({ kind: 'simple' } & NbdSimpleReply) | ({ kind: 'chunk' } & NbdChunkHeader) | null {
  if (buf.length - at < 4) return null;
  const v = view(buf);
  const magic = v.getUint32(at);
  if (magic === NBD_SIMPLE_REPLY_MAGIC) {
    if (buf.length - at < NBD_SIMPLE_REPLY_SIZE) return null;
    return { kind: 'simple', error: v.getUint32(at + 4), cookie: v.getBigUint64(at + 8) };
  }
  if (magic === NBD_STRUCTURED_REPLY_MAGIC) {
    if (buf.length - at < NBD_STRUCTURED_REPLY_HEADER_SIZE) return null;
    return { kind: 'chunk', flags: v.getUint16(at + 4), type: v.getUint16(at + 6), cookie: v.getBigUint64(at + 8), length: v.getUint32(at + 16) };
  }
  throw new BlockError('EIO', `NBD: reply magic 0x${magic.toString(16).padStart(8, '0')} is neither a simple nor a structured reply`, { op: 'nbd' });
}

/** The OFFSET_DATA chunk payload header: u64 offset (the data follows). */
export function encodeOffset(offset: number): Buffer {
  const b = Buffer.alloc(8);
  writeU64(view(b), 0, offset);
  return b;
}

/** The OFFSET_HOLE chunk payload: u64 offset, u32 length. */
export function encodeOffsetHole(offset: number, length: number): Buffer {
  const b = Buffer.alloc(12);
  const v = view(b);
  writeU64(v, 0, offset);
  v.setUint32(8, length);
  return b;
}

/** Parses an OFFSET_HOLE payload, or the offset that starts an OFFSET_DATA payload. */
export function decodeOffsetHole(data: Uint8Array): { offset: number; length: number } {
  need(data, 0, 12, 'an OFFSET_HOLE chunk');
  return { offset: readU64(data, 0), length: view(data).getUint32(8) };
}

/** Parses the offset at the start of an OFFSET_DATA payload. */
export function decodeOffsetData(data: Uint8Array): number {
  need(data, 0, 8, 'an OFFSET_DATA chunk');
  return readU64(data, 0);
}

/** One extent of a BLOCK_STATUS chunk. */
export interface NbdExtent {
  length: number;
  flags: number;
}

/** The BLOCK_STATUS chunk payload: u32 context id, then (u32 length, u32 flags) per extent. */
export function encodeBlockStatus(contextId: number, extents: readonly NbdExtent[]): Buffer {
  const b = Buffer.alloc(4 + 8 * extents.length);
  const v = view(b);
  v.setUint32(0, contextId);
  extents.forEach((e, i) => {
    v.setUint32(4 + 8 * i, e.length);
    v.setUint32(8 + 8 * i, e.flags);
  });
  return b;
}

/** Parses a BLOCK_STATUS chunk payload; EINVAL when it is not 4 + 8n bytes. */
export function decodeBlockStatus(data: Uint8Array): { contextId: number; extents: NbdExtent[] } {
  if (data.length < 4 || (data.length - 4) % 8 !== 0) {
    throw new BlockError('EINVAL', `NBD: a BLOCK_STATUS chunk of ${data.length} bytes is not 4 + 8n`, { op: 'nbd' });
  }
  const v = view(data);
  const extents: NbdExtent[] = [];
  for (let at = 4; at < data.length; at += 8) extents.push({ length: v.getUint32(at), flags: v.getUint32(at + 4) });
  return { contextId: v.getUint32(0), extents };
}

/** The ERROR chunk payload: u32 error, u16 message length, message. */
export function encodeErrorChunk(error: number, message: string): Buffer {
  const msg = Buffer.from(message, 'utf8').subarray(0, NBD_MAX_STRING_BYTES);
  const b = Buffer.alloc(6 + msg.length);
  b.writeUInt32BE(error, 0);
  b.writeUInt16BE(msg.length, 4);
  b.set(msg, 6);
  return b;
}

/** Parses an ERROR or ERROR_OFFSET chunk payload (the offset is only in the latter). */
export function decodeErrorChunk(type: number, data: Uint8Array): { error: number; message: string; offset?: number } {
  need(data, 0, 6, 'an error chunk');
  const v = view(data);
  const len = v.getUint16(4);
  if (len > data.length - 6) throw new BlockError('EINVAL', `NBD: an error chunk's message of ${len} bytes overruns its ${data.length}-byte payload`, { op: 'nbd' });
  const message = Buffer.from(data.buffer, data.byteOffset + 6, len).toString('utf8');
  if (type === NBD_REPLY_TYPE_ERROR_OFFSET) {
    need(data, 6 + len, 8, 'an ERROR_OFFSET chunk');
    return { error: v.getUint32(0), message, offset: readU64(data, 6 + len) };
  }
  return { error: v.getUint32(0), message };
}

/** The NBD error to send for a block-layer error code (the spec's short list; EIO otherwise). */
export function nbdErrorFor(code: ErrorCode): number {
  switch (code) {
    case 'EPERM':
    case 'EACCES':
      return NBD_EPERM;
    case 'EINVAL':
    case 'EFBIG':
      return NBD_EINVAL;
    case 'ENOSPC':
      return NBD_ENOSPC;
    case 'ENOTSUP':
      return NBD_ENOTSUP;
    default:
      return NBD_EIO;
  }
}

/** The block-layer error code for an NBD error value a server sent (EIO for anything unknown). */
export function codeForNbdError(error: number): ErrorCode {
  switch (error) {
    case NBD_EPERM:
      return 'EPERM';
    case NBD_EINVAL:
    case NBD_EOVERFLOW:
      return 'EINVAL';
    case NBD_ENOSPC:
      return 'ENOSPC';
    case NBD_ENOTSUP:
      return 'ENOTSUP';
    default:
      return 'EIO';
  }
}

/** Names for the option numbers, for messages. */
export function optionName(option: number): string {
  const names: Record<number, string> = {
    [NBD_OPT_EXPORT_NAME]: 'NBD_OPT_EXPORT_NAME',
    [NBD_OPT_ABORT]: 'NBD_OPT_ABORT',
    [NBD_OPT_LIST]: 'NBD_OPT_LIST',
    [NBD_OPT_PEEK_EXPORT]: 'NBD_OPT_PEEK_EXPORT',
    [NBD_OPT_STARTTLS]: 'NBD_OPT_STARTTLS',
    [NBD_OPT_INFO]: 'NBD_OPT_INFO',
    [NBD_OPT_GO]: 'NBD_OPT_GO',
    [NBD_OPT_STRUCTURED_REPLY]: 'NBD_OPT_STRUCTURED_REPLY',
    [NBD_OPT_LIST_META_CONTEXT]: 'NBD_OPT_LIST_META_CONTEXT',
    [NBD_OPT_SET_META_CONTEXT]: 'NBD_OPT_SET_META_CONTEXT',
    [NBD_OPT_EXTENDED_HEADERS]: 'NBD_OPT_EXTENDED_HEADERS',
  };
  return names[option] ?? `option ${option}`;
}

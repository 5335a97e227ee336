/**
 * The client side of the NBD fixed newstyle handshake (doc/proto.md, "Newstyle negotiation"):
 * greeting, client flags, NBD_OPT_STARTTLS and the TLS handshake when the client has TLS
 * credentials (the rest then runs inside TLS), NBD_OPT_STRUCTURED_REPLY,
 * NBD_OPT_SET_META_CONTEXT base:allocation, then NBD_OPT_GO asking for NBD_INFO_BLOCK_SIZE
 * (NBD_OPT_EXPORT_NAME when the server does not know GO). What it learns is an ExportInfo.
 *
 * I/O code of one connection, run before any request is sent on it. Everything the server
 * sends is bounded and checked: a length past MAX_OPTION_REPLY_BYTES, an unknown magic, a reply
 * to another option, block-size constraints the spec forbids, all fail with a BlockError (EIO)
 * that says what the server sent. Nothing here waits for ever on a well-formed-but-silent
 * server except a read of the next reply (the connection's timeout is the caller's business).
 */
import type { Socket } from 'node:net';
import { BlockError, type ErrorCode } from '../block/errors.js';
import type { TlsCredsX509 } from './tls-creds.js';
import { tlsClientHandshake } from './tls-session.js';
import {
  BASE_ALLOCATION,
  DEFAULT_MAX_PAYLOAD_BYTES,
  encodeOption,
  MAX_OPTION_REPLIES,
  MAX_OPTION_REPLY_BYTES,
  NBD_CLISERV_MAGIC,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_NO_ZEROES,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_EXPORT,
  NBD_INIT_MAGIC,
  NBD_MAX_STRING_BYTES,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STARTTLS,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_OPTS_MAGIC,
  NBD_REP_ACK,
  NBD_REP_ERR_POLICY,
  NBD_REP_ERR_TLS_REQD,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  NBD_REP_FLAG_ERROR,
  NBD_REP_INFO,
  NBD_REP_MAGIC,
  NBD_REP_META_CONTEXT,
  optionReplyName,
} from './client-proto.js';
import { ReaderClosed, SocketReader } from './client-reader.js';

/** What the handshake learnt about the export. */
export interface ExportInfo {
  sizeBytes: number;
  /** Transmission flags (NBD_FLAG_*). */
  flags: number;
  /** Block-size constraints; 1, 4096 and DEFAULT_MAX_PAYLOAD_BYTES when the server gave none. */
  minBlockBytes: number;
  preferredBlockBytes: number;
  maxBlockBytes: number;
  structuredReplies: boolean;
  /** The id of base:allocation, or null when the server has no such context (or no structured replies). */
  baseAllocationId: number | null;
}

/** TLS for a connection: the credentials (a client endpoint) and the name the server's certificate must carry. */
export interface ClientTls {
  creds: TlsCredsX509;
  /** QEMU's tls-hostname (or the inet host); undefined: the name is not checked. */
  hostname: string | undefined;
}

/** The connection after the handshake: what was learnt, and the socket (the TLS one, with TLS) to transmit on. */
export interface Negotiated {
  info: ExportInfo;
  socket: Socket;
  reader: SocketReader;
}

/** The refusal of a server that requires TLS, to a client without credentials. */
function tlsRequired(r: OptionReply): string {
  return `the server requires TLS (${errorText(r)}); give the nbd node tls-creds=ID (a tls-creds-x509 object with endpoint=client)`;
}

/** Fails the handshake: EIO (or `code`) with the server named. */
function fail(where: string, what: string, code: ErrorCode = 'EIO', cause?: unknown): BlockError {
  return new BlockError(code, `NBD handshake with ${where} failed: ${what}`, { op: 'nbd-connect', ...(cause === undefined ? {} : { cause }) });
}

interface OptionReply {
  type: number;
  data: Buffer;
}

async function readOptionReply(reader: SocketReader, where: string, option: number): Promise<OptionReply> {
  const h = await reader.read(20);
  const magic = h.readBigUInt64BE(0);
  if (magic !== NBD_REP_MAGIC) throw fail(where, `bad option reply magic 0x${magic.toString(16)}`);
  const opt = h.readUInt32BE(8);
  const type = h.readUInt32BE(12);
  const len = h.readUInt32BE(16);
  if (opt !== option) throw fail(where, `a reply to option ${opt} came while option ${option} was asked`);
  if (len > MAX_OPTION_REPLY_BYTES) throw fail(where, `an option reply of ${len} bytes (at most ${MAX_OPTION_REPLY_BYTES} accepted)`);
  const data = Buffer.from(await reader.read(len));
  return { type, data };
}

/** The server's text of an error reply (bounded, printable). */
function errorText(r: OptionReply): string {
  const text = r.data.subarray(0, NBD_MAX_STRING_BYTES).toString('utf8').replace(/[^\x20-\x7e]/g, '?');
  return `${optionReplyName(r.type)}${text === '' ? '' : `: ${text}`}`;
}

function isPowerOf2(n: number): boolean {
  return n > 0 && (n & (n - 1)) === 0;
}

/** Checks the NBD_INFO_BLOCK_SIZE constraints as the spec states them. */
function checkBlockSizes(where: string, min: number, pref: number, max: number): void {
  if (!isPowerOf2(min) || min > 64 * 1024) throw fail(where, `minimum block size ${min} is not a power of 2 between 1 and 64 KiB`);
  if (!isPowerOf2(pref) || pref < min) throw fail(where, `preferred block size ${pref} is not a power of 2 at least the minimum ${min}`);
  if (max < min || (max !== 0xffffffff && max % min !== 0)) throw fail(where, `maximum block size ${max} is not a multiple of the minimum ${min}`);
}

/**
 * Runs the fixed newstyle handshake on a connected socket and enters transmission; resolves
 * with what was learnt and the socket to transmit on (the TLS socket, with `tls`).
 * @locking io
 */
export async function negotiate(socket: Socket, reader: SocketReader, exportName: string, where: string, tls?: ClientTls): Promise<Negotiated> {
  const nameBytes = Buffer.from(exportName, 'utf8');
  if (nameBytes.length > NBD_MAX_STRING_BYTES) {
    throw new BlockError('EINVAL', `NBD export name of ${nameBytes.length} bytes: at most ${NBD_MAX_STRING_BYTES}`, { field: 'export' });
  }
  try {
    return await negotiateInner(socket, reader, nameBytes, exportName, where, tls);
  } catch (e) {
    if (e instanceof ReaderClosed) throw fail(where, `${e.message} during the handshake`, 'EIO', e);
    throw e;
  }
}

async function negotiateInner(rawSocket: Socket, rawReader: SocketReader, nameBytes: Buffer, exportName: string, where: string, tls: ClientTls | undefined): Promise<Negotiated> {
  let socket = rawSocket;
  let reader = rawReader;
  const greeting = await reader.read(16);
  if (greeting.readBigUInt64BE(0) !== NBD_INIT_MAGIC) throw fail(where, 'not an NBD server (no NBDMAGIC greeting)');
  const second = greeting.readBigUInt64BE(8);
  if (second === NBD_CLISERV_MAGIC) throw fail(where, 'the server speaks the oldstyle protocol (no export names); only fixed newstyle is supported', 'ENOTSUP');
  if (second !== NBD_OPTS_MAGIC) throw fail(where, `bad greeting magic 0x${second.toString(16)}`);
  const hflags = (await reader.read(2)).readUInt16BE(0);
  if ((hflags & NBD_FLAG_FIXED_NEWSTYLE) === 0) throw fail(where, 'the server does not offer fixed newstyle negotiation', 'ENOTSUP');
  const noZeroes = (hflags & NBD_FLAG_NO_ZEROES) !== 0;
  const cflags = Buffer.alloc(4);
  cflags.writeUInt32BE(NBD_FLAG_C_FIXED_NEWSTYLE | (noZeroes ? NBD_FLAG_C_NO_ZEROES : 0), 0);
  socket.write(cflags);

  if (tls !== undefined) {
    socket.write(encodeOption(NBD_OPT_STARTTLS, Buffer.alloc(0)));
    const st = await readOptionReply(reader, where, NBD_OPT_STARTTLS);
    if (st.type !== NBD_REP_ACK) {
      if ((st.type & NBD_REP_FLAG_ERROR) === 0) throw fail(where, `unexpected reply ${st.type} to NBD_OPT_STARTTLS`);
      const code: ErrorCode = st.type === NBD_REP_ERR_UNSUP || st.type === NBD_REP_ERR_POLICY ? 'ENOTSUP' : 'EIO';
      throw fail(where, `the server refused NBD_OPT_STARTTLS (${errorText(st)}): it does not offer TLS, and tls-creds '${tls.creds.id}' asks for it`, code);
    }
    // the server's TLS bytes must reach the TLS socket, not this reader
    const left = reader.detach();
    socket.pause();
    if (left !== null) socket.unshift(left);
    socket = await tlsClientHandshake(socket, tls.creds, tls.hostname, where);
    reader = new SocketReader(socket);
  }

  // structured replies: sparse reads and block status need them
  socket.write(encodeOption(NBD_OPT_STRUCTURED_REPLY, Buffer.alloc(0)));
  let sr: OptionReply;
  try {
    sr = await readOptionReply(reader, where, NBD_OPT_STRUCTURED_REPLY);
  } catch (e) {
    // with TLS 1.3 a server that refuses our certificate hangs up just after the handshake
    if (tls !== undefined && e instanceof ReaderClosed) {
      throw fail(where, `${e.message} just after the TLS handshake (did it refuse the certificate of tls-creds '${tls.creds.id}'?)`, 'EIO', e);
    }
    throw e;
  }
  if (sr.type === NBD_REP_ERR_TLS_REQD) throw fail(where, tlsRequired(sr), 'ENOTSUP');
  if (sr.type !== NBD_REP_ACK && (sr.type & NBD_REP_FLAG_ERROR) === 0) throw fail(where, `unexpected reply ${sr.type} to NBD_OPT_STRUCTURED_REPLY`);
  const structuredReplies = sr.type === NBD_REP_ACK;

  let baseAllocationId: number | null = null;
  if (structuredReplies) {
    const q = Buffer.from(BASE_ALLOCATION, 'utf8');
    const payload = Buffer.alloc(4 + nameBytes.length + 4 + 4 + q.length);
    let o = payload.writeUInt32BE(nameBytes.length, 0);
    o += nameBytes.copy(payload, o);
    o = payload.writeUInt32BE(1, o);
    o = payload.writeUInt32BE(q.length, o);
    q.copy(payload, o);
    socket.write(encodeOption(NBD_OPT_SET_META_CONTEXT, payload));
    for (let i = 0; ; i++) {
      if (i > MAX_OPTION_REPLIES) throw fail(where, `more than ${MAX_OPTION_REPLIES} replies to NBD_OPT_SET_META_CONTEXT`);
      const r = await readOptionReply(reader, where, NBD_OPT_SET_META_CONTEXT);
      if (r.type === NBD_REP_ACK) break;
      if ((r.type & NBD_REP_FLAG_ERROR) !== 0) break; // no block status; reads still work
      if (r.type !== NBD_REP_META_CONTEXT || r.data.length < 4) throw fail(where, `unexpected reply ${r.type} (${r.data.length} bytes) to NBD_OPT_SET_META_CONTEXT`);
      const name = r.data.subarray(4).toString('utf8');
      if (name !== BASE_ALLOCATION) throw fail(where, `the server chose meta context '${name.slice(0, 64)}', which was not asked for`);
      baseAllocationId = r.data.readUInt32BE(0);
    }
  }

  // NBD_OPT_GO with NBD_INFO_BLOCK_SIZE
  const go = Buffer.alloc(4 + nameBytes.length + 2 + 2);
  let o = go.writeUInt32BE(nameBytes.length, 0);
  o += nameBytes.copy(go, o);
  o = go.writeUInt16BE(1, o);
  go.writeUInt16BE(NBD_INFO_BLOCK_SIZE, o);
  socket.write(encodeOption(NBD_OPT_GO, go));
  let sizeBytes: number | null = null;
  let flags = 0;
  let minBlockBytes = 1;
  let preferredBlockBytes = 4096;
  let maxBlockBytes = DEFAULT_MAX_PAYLOAD_BYTES;
  for (let i = 0; ; i++) {
    if (i > MAX_OPTION_REPLIES) throw fail(where, `more than ${MAX_OPTION_REPLIES} replies to NBD_OPT_GO`);
    const r = await readOptionReply(reader, where, NBD_OPT_GO);
    if (r.type === NBD_REP_ACK) break;
    if (r.type === NBD_REP_ERR_UNSUP) return { info: await exportNameFallback(socket, reader, nameBytes, where, noZeroes, structuredReplies, baseAllocationId), socket, reader };
    if (r.type === NBD_REP_ERR_UNKNOWN) throw fail(where, `export '${exportName}' not found (${errorText(r)})`, 'ENOENT');
    if (r.type === NBD_REP_ERR_TLS_REQD) throw fail(where, tlsRequired(r), 'ENOTSUP');
    if (r.type === NBD_REP_ERR_POLICY) throw fail(where, `export '${exportName}' refused (${errorText(r)})`, 'EACCES');
    if ((r.type & NBD_REP_FLAG_ERROR) !== 0) throw fail(where, `export '${exportName}': ${errorText(r)}`);
    if (r.type !== NBD_REP_INFO || r.data.length < 2) throw fail(where, `unexpected reply ${r.type} to NBD_OPT_GO`);
    const info = r.data.readUInt16BE(0);
    if (info === NBD_INFO_EXPORT) {
      if (r.data.length !== 12) throw fail(where, `NBD_INFO_EXPORT of ${r.data.length} bytes (12 expected)`);
      const size = r.data.readBigUInt64BE(2);
      if (size > BigInt(Number.MAX_SAFE_INTEGER)) throw fail(where, `export size ${size} is larger than 2^53 bytes`, 'EFBIG');
      sizeBytes = Number(size);
      flags = r.data.readUInt16BE(10);
    } else if (info === NBD_INFO_BLOCK_SIZE) {
      if (r.data.length !== 14) throw fail(where, `NBD_INFO_BLOCK_SIZE of ${r.data.length} bytes (14 expected)`);
      minBlockBytes = r.data.readUInt32BE(2);
      preferredBlockBytes = r.data.readUInt32BE(6);
      maxBlockBytes = r.data.readUInt32BE(10);
      checkBlockSizes(where, minBlockBytes, preferredBlockBytes, maxBlockBytes);
    }
    // other information (name, description) is not needed
  }
  if (sizeBytes === null) throw fail(where, 'NBD_OPT_GO succeeded without NBD_INFO_EXPORT (no size)');
  if ((flags & NBD_FLAG_HAS_FLAGS) === 0) flags = 0;
  return { info: { sizeBytes, flags, minBlockBytes, preferredBlockBytes, maxBlockBytes, structuredReplies, baseAllocationId }, socket, reader };
}

/** NBD_OPT_EXPORT_NAME, for servers without NBD_OPT_GO: no error reply is possible, a refusal closes. */
async function exportNameFallback(
  socket: Socket,
  reader: SocketReader,
  nameBytes: Buffer,
  where: string,
  noZeroes: boolean,
  structuredReplies: boolean,
  baseAllocationId: number | null,
): Promise<ExportInfo> {
  socket.write(encodeOption(NBD_OPT_EXPORT_NAME, nameBytes));
  const r = await reader.read(10);
  const size = r.readBigUInt64BE(0);
  if (size > BigInt(Number.MAX_SAFE_INTEGER)) throw fail(where, `export size ${size} is larger than 2^53 bytes`, 'EFBIG');
  let flags = r.readUInt16BE(8);
  if (!noZeroes) await reader.skip(124);
  if ((flags & NBD_FLAG_HAS_FLAGS) === 0) flags = 0;
  return { sizeBytes: Number(size), flags, minBlockBytes: 1, preferredBlockBytes: 4096, maxBlockBytes: DEFAULT_MAX_PAYLOAD_BYTES, structuredReplies, baseAllocationId };
}

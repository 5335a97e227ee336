/**
 * The NBD wire constants the client needs, named as the NBD specification (NetworkBlockDevice/nbd,
 * doc/proto.md) names them, and the bounds the client puts on what a server may send.
 *
 * Common code: constants and pure encoders, no I/O, no lock.
 *
 * The constants shared with the server come from src/nbd/protocol.ts (re-exported here under the
 * names the client code uses); this file adds what only the client needs.
 */

export {
  NBD_INIT_MAGIC,
  NBD_OPTS_MAGIC,
  NBD_REP_MAGIC,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_NO_ZEROES,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_ABORT,
  NBD_OPT_GO,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STARTTLS,
  NBD_REP_ACK,
  NBD_REP_INFO,
  NBD_REP_META_CONTEXT,
  NBD_REP_FLAG_ERROR,
  NBD_REP_ERR_UNSUP,
  NBD_REP_ERR_POLICY,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_PLATFORM,
  NBD_REP_ERR_TLS_REQD,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_SHUTDOWN,
  NBD_REP_ERR_BLOCK_SIZE_REQD,
  NBD_REP_ERR_TOO_BIG,
  NBD_INFO_EXPORT,
  NBD_INFO_BLOCK_SIZE,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_REQUEST_MAGIC,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
  NBD_CMD_READ,
  NBD_CMD_WRITE,
  NBD_CMD_DISC,
  NBD_CMD_FLUSH,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE_ZEROES,
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
  NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_ERROR,
  NBD_REPLY_TYPE_ERROR_OFFSET,
  NBD_STATE_HOLE,
  NBD_STATE_ZERO,
  NBD_MAX_STRING_BYTES,
  NBD_DEFAULT_PORT,
  encodeOption,
} from './protocol.js';
export {
  NBD_META_BASE_ALLOCATION as BASE_ALLOCATION,
  NBD_REQUEST_SIZE as REQUEST_HEADER_BYTES,
  NBD_MAX_PAYLOAD_BYTES as DEFAULT_MAX_PAYLOAD_BYTES,
} from './protocol.js';
import { NBD_CMD_DISC, NBD_CMD_FLUSH, NBD_CMD_READ, NBD_CMD_TRIM, NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES, NBD_CMD_BLOCK_STATUS, NBD_REP_ERR_BLOCK_SIZE_REQD, NBD_REP_ERR_INVALID, NBD_REP_ERR_PLATFORM, NBD_REP_ERR_POLICY, NBD_REP_ERR_SHUTDOWN, NBD_REP_ERR_TLS_REQD, NBD_REP_ERR_TOO_BIG, NBD_REP_ERR_UNKNOWN, NBD_REP_ERR_UNSUP, NBD_REQUEST_MAGIC } from './protocol.js';

/** The second 8 bytes of an oldstyle greeting (refused: no export names, no options). */
export const NBD_CLISERV_MAGIC = 0x00420281861253n;
/** Bit 15 of a chunk type: an error chunk (a client treats unknown ones as errors). */
export const NBD_REPLY_TYPE_ERROR_BIT = 1 << 15;

/** The longest option reply the client accepts (its payloads are a few names and numbers). */
export const MAX_OPTION_REPLY_BYTES = 64 * 1024;
/** How many option replies one option may get before the client calls the server broken. */
export const MAX_OPTION_REPLIES = 1024;
/** The longest non-data chunk accepted (errors, holes, a block-status chunk of many extents). */
export const MAX_CHUNK_BYTES = 1024 * 1024;
/** The NBD errno values (the spec's list) and the BlockError code each becomes. */
export const NBD_ERRNO: Readonly<Record<number, { name: string; code: 'EPERM' | 'EIO' | 'ENOSPC' | 'EINVAL' | 'ENOTSUP' }>> = {
  1: { name: 'EPERM', code: 'EPERM' },
  5: { name: 'EIO', code: 'EIO' },
  12: { name: 'ENOMEM', code: 'EIO' },
  22: { name: 'EINVAL', code: 'EINVAL' },
  28: { name: 'ENOSPC', code: 'ENOSPC' },
  75: { name: 'EOVERFLOW', code: 'EINVAL' },
  95: { name: 'ENOTSUP', code: 'ENOTSUP' },
  108: { name: 'ESHUTDOWN', code: 'EIO' },
};

/** A command's name for messages. */
export function commandName(type: number): string {
  switch (type) {
    case NBD_CMD_READ:
      return 'read';
    case NBD_CMD_WRITE:
      return 'write';
    case NBD_CMD_DISC:
      return 'disconnect';
    case NBD_CMD_FLUSH:
      return 'flush';
    case NBD_CMD_TRIM:
      return 'trim';
    case NBD_CMD_WRITE_ZEROES:
      return 'write-zeroes';
    case NBD_CMD_BLOCK_STATUS:
      return 'block-status';
    default:
      return `command ${type}`;
  }
}

/** An option reply type's name for messages. */
export function optionReplyName(type: number): string {
  const names: Record<number, string> = {
    [NBD_REP_ERR_UNSUP]: 'unsupported',
    [NBD_REP_ERR_POLICY]: 'denied by policy',
    [NBD_REP_ERR_INVALID]: 'invalid',
    [NBD_REP_ERR_PLATFORM]: 'not supported on this platform',
    [NBD_REP_ERR_TLS_REQD]: 'TLS required',
    [NBD_REP_ERR_UNKNOWN]: 'export unknown',
    [NBD_REP_ERR_SHUTDOWN]: 'server shutting down',
    [NBD_REP_ERR_BLOCK_SIZE_REQD]: 'block size required',
    [NBD_REP_ERR_TOO_BIG]: 'too big',
  };
  return names[type] ?? `reply type 0x${type.toString(16)}`;
}

/** Writes the 28-byte request header into `out` at 0. */
export function encodeRequest(out: Buffer, flags: number, type: number, cookie: number, offset: number, length: number): void {
  out.writeUInt32BE(NBD_REQUEST_MAGIC, 0);
  out.writeUInt16BE(flags, 4);
  out.writeUInt16BE(type, 6);
  out.writeUInt32BE(Math.floor(cookie / 0x100000000), 8);
  out.writeUInt32BE(cookie >>> 0, 12);
  out.writeUInt32BE(Math.floor(offset / 0x100000000), 16);
  out.writeUInt32BE(offset >>> 0, 20);
  out.writeUInt32BE(length, 24);
}

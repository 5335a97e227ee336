/**
 * src/nbd/protocol.ts: every header round-trips, and malformed payloads are refused rather than
 * read past their end.
 */
import { describe, expect, it } from 'vitest';
import { isBlockError } from '../src/block/errors.js';
import * as P from '../src/nbd/protocol.js';

describe('NBD protocol encoding', () => {
  it('a request round-trips, including a 64-bit cookie and an offset above 4 GiB', () => {
    const req = { type: P.NBD_CMD_WRITE, flags: P.NBD_CMD_FLAG_FUA, cookie: 0xfedcba9876543210n, offset: 5 * 2 ** 32 + 12345, length: 65536 };
    const b = P.encodeRequest(req);
    expect(b.length).toBe(P.NBD_REQUEST_SIZE);
    expect(b.readUInt32BE(0)).toBe(P.NBD_REQUEST_MAGIC);
    expect(P.decodeRequest(b)).toEqual(req);
  });

  it('a request with a wrong magic decodes to null', () => {
    const b = P.encodeRequest({ type: 0, flags: 0, cookie: 1n, offset: 0, length: 1 });
    b.writeUInt32BE(0xdeadbeef, 0);
    expect(P.decodeRequest(b)).toBeNull();
  });

  it('simple replies and structured chunk headers are told apart by their magic', () => {
    expect(P.decodeReplyHeader(P.encodeSimpleReply(P.NBD_EPERM, 7n))).toEqual({ kind: 'simple', error: P.NBD_EPERM, cookie: 7n });
    const h = { flags: P.NBD_REPLY_FLAG_DONE, type: P.NBD_REPLY_TYPE_BLOCK_STATUS, cookie: 9n, length: 12 };
    expect(P.decodeReplyHeader(P.encodeChunkHeader(h))).toEqual({ kind: 'chunk', ...h });
    expect(P.decodeReplyHeader(P.encodeSimpleReply(0, 1n).subarray(0, 10))).toBeNull();
    expect(() => P.decodeReplyHeader(Buffer.alloc(20, 0x41))).toThrow(/neither a simple nor a structured reply/);
  });

  it('the greeting carries both magics and the flags; an oldstyle server is refused', () => {
    const g = P.encodeGreeting(P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES);
    expect(g.subarray(0, 16).toString('latin1')).toBe('NBDMAGICIHAVEOPT');
    expect(P.decodeGreeting(g)).toEqual({ handshakeFlags: 3 });
    const old = Buffer.from(g);
    old.writeBigUInt64BE(0x00420281861253n, 8);
    try {
      P.decodeGreeting(old);
      expect.unreachable();
    } catch (e) {
      expect(isBlockError(e, 'ENOTSUP')).toBe(true);
    }
  });

  it('options, option replies and their payloads round-trip', () => {
    const o = P.encodeOption(P.NBD_OPT_GO, P.encodeInfoRequest('disk', [P.NBD_INFO_BLOCK_SIZE, P.NBD_INFO_NAME]));
    const h = P.decodeOptionHeader(o);
    expect(h).toEqual({ magic: P.NBD_OPTS_MAGIC, option: P.NBD_OPT_GO, length: o.length - 16 });
    expect(P.decodeInfoRequest(o.subarray(16))).toEqual({ exportName: 'disk', infos: [P.NBD_INFO_BLOCK_SIZE, P.NBD_INFO_NAME] });
    const r = P.encodeOptionReply(P.NBD_OPT_GO, P.NBD_REP_ERR_UNKNOWN, Buffer.from('no'));
    expect(P.decodeOptionReplyHeader(r)).toEqual({ magic: P.NBD_REP_MAGIC, option: P.NBD_OPT_GO, type: P.NBD_REP_ERR_UNKNOWN, length: 2 });
    expect(P.decodeInfo(P.encodeInfoExport(2 ** 40, 0x1ed))).toEqual({ type: P.NBD_INFO_EXPORT, sizeBytes: 2 ** 40, transmissionFlags: 0x1ed });
    expect(P.decodeInfo(P.encodeInfoBlockSize({ minimum: 1, preferred: 4096, maximum: 32 << 20 }))).toEqual({ type: P.NBD_INFO_BLOCK_SIZE, minimum: 1, preferred: 4096, maximum: 32 << 20 });
    expect(P.decodeInfo(P.encodeInfoString(P.NBD_INFO_DESCRIPTION, 'dïsk'))).toEqual({ type: P.NBD_INFO_DESCRIPTION, text: 'dïsk' });
    expect(P.decodeServerReply(P.encodeServerReply('a', 'b c'))).toEqual({ exportName: 'a', description: 'b c' });
    expect(P.decodeMetaContextReply(P.encodeMetaContextReply(1, 'base:allocation'))).toEqual({ id: 1, name: 'base:allocation' });
  });

  it('meta context requests round-trip, and ones whose lengths lie are refused', () => {
    const m = P.encodeMetaContextRequest('disk', ['base:allocation', 'qemu:']);
    expect(P.decodeMetaContextRequest(m)).toEqual({ exportName: 'disk', queries: ['base:allocation', 'qemu:'] });
    expect(P.decodeMetaContextRequest(m.subarray(0, m.length - 1))).toBeNull();
    const lying = Buffer.from(m);
    lying.writeUInt32BE(0xffffffff, 8); // query count
    expect(P.decodeMetaContextRequest(lying)).toBeNull();
    const longName = Buffer.from(m);
    longName.writeUInt32BE(1000, 0);
    expect(P.decodeMetaContextRequest(longName)).toBeNull();
    expect(P.decodeInfoRequest(Buffer.from([0, 0, 0, 200, 0, 0]))).toBeNull();
    expect(P.decodeInfoRequest(Buffer.concat([P.encodeInfoRequest('x', [1]), Buffer.from([0])]))).toBeNull();
  });

  it('chunk payloads (hole, data offset, block status, error) round-trip', () => {
    expect(P.decodeOffsetHole(P.encodeOffsetHole(2 ** 33, 4096))).toEqual({ offset: 2 ** 33, length: 4096 });
    expect(P.decodeOffsetData(P.encodeOffset(2 ** 34 + 1))).toBe(2 ** 34 + 1);
    const ext = [
      { length: 65536, flags: 0 },
      { length: 4096, flags: P.NBD_STATE_HOLE | P.NBD_STATE_ZERO },
    ];
    expect(P.decodeBlockStatus(P.encodeBlockStatus(1, ext))).toEqual({ contextId: 1, extents: ext });
    expect(() => P.decodeBlockStatus(Buffer.alloc(7))).toThrow(/not 4 \+ 8n/);
    expect(P.decodeErrorChunk(P.NBD_REPLY_TYPE_ERROR, P.encodeErrorChunk(P.NBD_EINVAL, 'bad'))).toEqual({ error: P.NBD_EINVAL, message: 'bad' });
    const lying = P.encodeErrorChunk(P.NBD_EIO, 'x');
    lying.writeUInt16BE(500, 4);
    expect(() => P.decodeErrorChunk(P.NBD_REPLY_TYPE_ERROR, lying)).toThrow(/overruns/);
    expect(P.isErrorReplyType(P.NBD_REPLY_TYPE_ERROR_OFFSET)).toBe(true);
    expect(P.isErrorReplyType(P.NBD_REPLY_TYPE_OFFSET_DATA)).toBe(false);
  });

  it('maps block-layer codes to NBD errors and back', () => {
    expect(P.nbdErrorFor('EACCES')).toBe(P.NBD_EPERM);
    expect(P.nbdErrorFor('ENOSPC')).toBe(P.NBD_ENOSPC);
    expect(P.nbdErrorFor('EBUSY')).toBe(P.NBD_EIO);
    expect(P.codeForNbdError(P.NBD_EOVERFLOW)).toBe('EINVAL');
    expect(P.codeForNbdError(12345)).toBe('EIO');
  });
});

/**
 * A tiny NBD server for the client's tests: a correct one over a byte array (fixed newstyle,
 * structured replies, base:allocation, GO with block sizes), which a test can make misbehave on
 * purpose (garbage replies, lies in the handshake, out-of-order replies, dropped connections).
 */
import fs from 'node:fs';
import net from 'node:net';
import {
  encodeGreeting,
  encodeInfoExport,
  encodeMetaContextReply,
  encodeOptionReply,
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_DISC,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_NO_ZEROES,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
  NBD_INFO_BLOCK_SIZE,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_ERR_TLS_REQD,
  NBD_REP_ERR_UNSUP,
  NBD_REP_INFO,
  NBD_REP_META_CONTEXT,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_ERROR,
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
} from '../src/nbd/protocol.js';
import { SocketReader } from '../src/nbd/client-reader.js';

/** What the server sends instead of a correct reply (to the first request of the kind it applies to). */
export type Misbehaviour =
  | 'none'
  | 'bad-greeting'
  | 'huge-option-reply'
  | 'go-without-export-info'
  | 'bad-block-size'
  | 'bad-reply-magic'
  | 'unknown-cookie'
  | 'chunk-past-request'
  | 'huge-error-chunk'
  | 'short-read'
  | 'error-chunk'
  | 'close-on-request'
  | 'reverse-order'
  | 'silent-handshake'
  | 'oversized-data-chunk'
  | 'wrong-context'
  | 'structured-reply-to-nothing'
  /** Knows neither structured replies nor NBD_OPT_GO: the client falls back to NBD_OPT_EXPORT_NAME and simple replies. */
  | 'old-server'
  /** Answers every option with NBD_REP_ERR_TLS_REQD. */
  | 'tls-required';

/** A fake server's state, visible to the test. */
export interface FakeServer {
  readonly socket: string;
  readonly data: Uint8Array;
  /** Requests received, by command. */
  readonly seen: number[];
  misbehave: Misbehaviour;
  /** Closes the listener and every connection. */
  stop(): Promise<void>;
  /** Drops every open connection (the listener stays). */
  dropConnections(): void;
}

const CONTEXT_ID = 7;

function simple(cookie: Buffer, errno: number): Buffer {
  const b = Buffer.alloc(16);
  b.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(errno, 4);
  cookie.copy(b, 8);
  return b;
}

function chunk(cookie: Buffer, flags: number, type: number, payload: Uint8Array, lengthOverride?: number): Buffer {
  const b = Buffer.alloc(20 + payload.length);
  b.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  cookie.copy(b, 8);
  b.writeUInt32BE(lengthOverride ?? payload.length, 16);
  b.set(payload, 20);
  return b;
}

function u64(n: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(n), 0);
  return b;
}

/** Starts a fake server on `socket` exporting `sizeBytes` bytes of memory. */
export async function startFakeServer(socket: string, sizeBytes: number, misbehave: Misbehaviour = 'none', data?: Uint8Array): Promise<FakeServer> {
  fs.rmSync(socket, { force: true });
  const conns = new Set<net.Socket>();
  const state: FakeServer = {
    socket,
    data: data ?? new Uint8Array(sizeBytes),
    seen: [],
    misbehave,
    stop: async () => {
      for (const c of conns) c.destroy();
      await new Promise<void>((r) => server.close(() => r()));
    },
    dropConnections: () => {
      for (const c of conns) c.destroy();
    },
  };
  const server = net.createServer((s) => {
    conns.add(s);
    s.on('close', () => conns.delete(s));
    s.on('error', () => undefined);
    void serve(s, state).catch(() => s.destroy());
  });
  await new Promise<void>((resolve) => server.listen(socket, resolve));
  return state;
}

async function serve(s: net.Socket, st: FakeServer): Promise<void> {
  const r = new SocketReader(s);
  if (st.misbehave === 'silent-handshake') return; // says nothing, keeps the socket open
  if (st.misbehave === 'bad-greeting') {
    s.write(Buffer.from('HTTP/1.1 400 Bad Request\r\n\r\n'));
    return;
  }
  s.write(encodeGreeting(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES));
  await r.read(4);
  const flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES;
  for (;;) {
    const h = await r.read(16);
    const opt = h.readUInt32BE(8);
    const len = h.readUInt32BE(12);
    await r.read(len);
    if (st.misbehave === 'tls-required') {
      s.write(encodeOptionReply(opt, NBD_REP_ERR_TLS_REQD, Buffer.from('TLS is required on this server')));
      continue;
    }
    if (st.misbehave === 'old-server') {
      if (opt === NBD_OPT_EXPORT_NAME) {
        const b = Buffer.alloc(10);
        b.writeBigUInt64BE(BigInt(st.data.length), 0);
        b.writeUInt16BE(flags, 8);
        s.write(b); // NO_ZEROES was agreed: no 124 zero bytes
        break;
      }
      s.write(encodeOptionReply(opt, NBD_REP_ERR_UNSUP));
      continue;
    }
    if (opt === NBD_OPT_STRUCTURED_REPLY) {
      if (st.misbehave === 'huge-option-reply') {
        const b = encodeOptionReply(opt, NBD_REP_ACK);
        b.writeUInt32BE(0x7fffffff, 16);
        s.write(b);
        return;
      }
      s.write(encodeOptionReply(opt, NBD_REP_ACK));
    } else if (opt === NBD_OPT_SET_META_CONTEXT) {
      s.write(encodeOptionReply(opt, NBD_REP_META_CONTEXT, encodeMetaContextReply(CONTEXT_ID, 'base:allocation')));
      s.write(encodeOptionReply(opt, NBD_REP_ACK));
    } else if (opt === NBD_OPT_GO) {
      if (st.misbehave !== 'go-without-export-info') s.write(encodeOptionReply(opt, NBD_REP_INFO, encodeInfoExport(st.data.length, flags)));
      const bs = Buffer.alloc(14);
      bs.writeUInt16BE(NBD_INFO_BLOCK_SIZE, 0);
      bs.writeUInt32BE(st.misbehave === 'bad-block-size' ? 3000 : 1, 2);
      bs.writeUInt32BE(4096, 6);
      bs.writeUInt32BE(1024 * 1024, 10);
      s.write(encodeOptionReply(opt, NBD_REP_INFO, bs));
      s.write(encodeOptionReply(opt, NBD_REP_ACK));
      break;
    } else {
      s.write(encodeOptionReply(opt, NBD_REP_ERR_UNSUP));
    }
  }
  const held: Buffer[] = [];
  for (;;) {
    const q = Buffer.from(await r.read(28));
    const type = q.readUInt16BE(6);
    const cookie = Buffer.from(q.subarray(8, 16));
    const off = Number(q.readBigUInt64BE(16));
    const len = q.readUInt32BE(24);
    st.seen.push(type);
    if (type === NBD_CMD_DISC) {
      s.end();
      return;
    }
    const payload = type === NBD_CMD_WRITE ? Buffer.from(await r.read(len)) : null;
    const m = st.misbehave;
    if (m === 'close-on-request') {
      s.destroy();
      return;
    }
    if (m === 'bad-reply-magic') {
      s.write(Buffer.from('deadbeefdeadbeefdeadbeef', 'hex'));
      continue;
    }
    if (m === 'unknown-cookie') {
      const other = Buffer.from(cookie);
      other.writeUInt32BE(other.readUInt32BE(4) + 1000, 4);
      s.write(simple(other, 0));
      continue;
    }
    let reply: Buffer;
    if (type === NBD_CMD_READ) {
      const bytes = st.data.subarray(off, off + len);
      if (m === 'oversized-data-chunk') reply = chunk(cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, u64(off), 0x7ffffff0);
      else if (m === 'old-server') reply = Buffer.concat([simple(cookie, 0), bytes]);
      else if (m === 'chunk-past-request') reply = chunk(cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, Buffer.concat([u64(off + 4096), bytes]));
      else if (m === 'huge-error-chunk') reply = chunk(cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, Buffer.alloc(6), 0xfffffff0);
      else if (m === 'short-read') reply = chunk(cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, Buffer.concat([u64(off), bytes.subarray(0, Math.floor(len / 2))]));
      else if (m === 'error-chunk') {
        const msg = Buffer.from('the disk is on fire');
        const p = Buffer.alloc(6 + msg.length);
        p.writeUInt32BE(5, 0);
        p.writeUInt16BE(msg.length, 4);
        msg.copy(p, 6);
        reply = Buffer.concat([chunk(cookie, 0, NBD_REPLY_TYPE_ERROR, p), chunk(cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, Buffer.alloc(0))]);
      } else {
        // two chunks, second half first: the client places each by its offset
        const half = Math.floor(len / 2);
        const parts = [chunk(cookie, 0, NBD_REPLY_TYPE_OFFSET_DATA, Buffer.concat([u64(off + half), bytes.subarray(half)]))];
        if (half > 0) parts.push(chunk(cookie, 0, NBD_REPLY_TYPE_OFFSET_DATA, Buffer.concat([u64(off), bytes.subarray(0, half)])));
        parts.push(chunk(cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, Buffer.alloc(0)));
        reply = Buffer.concat(parts);
      }
    } else if (type === NBD_CMD_WRITE && payload !== null) {
      st.data.set(payload, off);
      reply = simple(cookie, 0);
    } else if (type === NBD_CMD_WRITE_ZEROES || type === NBD_CMD_TRIM) {
      st.data.fill(0, off, off + len);
      reply = simple(cookie, 0);
    } else if (type === NBD_CMD_FLUSH) {
      // a data chunk is no answer to a flush
      reply = m === 'structured-reply-to-nothing' ? chunk(cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, Buffer.concat([u64(0), Buffer.alloc(8)])) : simple(cookie, 0);
    } else if (type === NBD_CMD_BLOCK_STATUS) {
      const p = Buffer.alloc(12);
      p.writeUInt32BE(m === 'wrong-context' ? CONTEXT_ID + 1 : CONTEXT_ID, 0);
      p.writeUInt32BE(len, 4);
      p.writeUInt32BE(st.data.subarray(off, off + len).every((b) => b === 0) ? 3 : 0, 8);
      reply = chunk(cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS, p);
    } else {
      reply = simple(cookie, 22);
    }
    if (m === 'reverse-order') {
      // hold four replies, then send them last first
      held.push(reply);
      if (held.length === 4) {
        for (const b of held.reverse()) s.write(b);
        held.length = 0;
      }
      continue;
    }
    s.write(reply);
  }
}

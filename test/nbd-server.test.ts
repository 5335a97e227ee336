/**
 * The NBD server against real NBD clients (qemu-img, qemu-io, nbdinfo, nbdcopy) and against bad
 * peers speaking raw bytes; then `snapstack nbd` as a process (exit after the first client,
 * SIGTERM cleanup, data acknowledged by FLUSH surviving SIGKILL).
 */
import { execFile, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { withBql } from '../src/block/bql.js';
import { withDrained } from '../src/block/drain.js';
import { openImage, type Image } from '../src/image.js';
import * as P from '../src/nbd/protocol.js';
import { NbdServer } from '../src/nbd/server.js';
import { SocketReader } from '../src/nbd/socket-reader.js';
import { prng } from './helpers/prng.js';
import { describeInterop } from './helpers/qemu.js';
import { toolStatus } from './helpers/tool-status.js';

const run = promisify(execFile);
const BIN = path.resolve('bin/snapstack.js');
const inCI = process.env['CI'] !== undefined && process.env['CI'] !== '' && process.env['CI'] !== 'false';
const hasLibnbd = ['nbdinfo', 'nbdcopy'].every((t) => spawnSync(t, ['--version'], { stdio: 'ignore' }).status === 0);
/** nbdinfo/nbdcopy tests: run where libnbd-bin is installed, fail in CI without it, skip otherwise. */
const itLibnbd = hasLibnbd || inCI ? it : it.skip;
if (!hasLibnbd && !inCI) console.warn('nbd-server: nbdinfo/nbdcopy tests skipped: libnbd-bin not installed (apt-get install libnbd-bin)');

/** Runs a tool without blocking the event loop (the server under test lives in this process). */
async function tool(cmd: string, args: string[]): Promise<string> {
  const r = await run(cmd, args, { encoding: 'utf8', maxBuffer: 64 * 1024 * 1024 });
  return r.stdout;
}


/** A raw NBD client for the bad-peer tests: every byte is ours to choose. */
class RawClient {
  readonly reader: SocketReader;
  closed = false;
  private constructor(readonly socket: net.Socket) {
    this.reader = new SocketReader(socket);
    socket.on('close', () => (this.closed = true));
    socket.on('error', () => undefined);
  }

  static async connect(sock: string): Promise<RawClient> {
    const s = net.connect(sock);
    await new Promise<void>((resolve, reject) => {
      s.once('connect', resolve);
      s.once('error', reject);
    });
    return new RawClient(s);
  }

  async bytes(n: number): Promise<Buffer> {
    const b = await this.reader.read(n);
    if (b === null) throw new Error(`connection closed while ${n} bytes were expected`);
    return b;
  }

  /** Greeting and client flags. */
  async hello(flags = P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES): Promise<number> {
    const g = P.decodeGreeting(await this.bytes(P.NBD_GREETING_SIZE));
    const f = Buffer.alloc(4);
    f.writeUInt32BE(flags);
    this.socket.write(f);
    return g.handshakeFlags;
  }

  async optionReply(): Promise<{ type: number; option: number; data: Buffer }> {
    const h = P.decodeOptionReplyHeader(await this.bytes(P.NBD_OPTION_REPLY_HEADER_SIZE));
    expect(h.magic).toBe(P.NBD_REP_MAGIC);
    return { type: h.type, option: h.option, data: h.length === 0 ? Buffer.alloc(0) : await this.bytes(h.length) };
  }

  /** Sends an option and collects replies up to the final one (ACK or an error). */
  async option(option: number, data: Uint8Array = new Uint8Array(0)): Promise<Array<{ type: number; data: Buffer }>> {
    this.socket.write(P.encodeOption(option, data));
    const out: Array<{ type: number; data: Buffer }> = [];
    for (;;) {
      const r = await this.optionReply();
      out.push(r);
      if (r.type === P.NBD_REP_ACK || r.type >= P.NBD_REP_FLAG_ERROR) return out;
    }
  }

  /** Handshake up to transmission on `name` (structured replies and base:allocation when asked). */
  async go(name: string, structured = false): Promise<{ size: number; flags: number }> {
    await this.hello();
    if (structured) {
      expect((await this.option(P.NBD_OPT_STRUCTURED_REPLY)).at(-1)?.type).toBe(P.NBD_REP_ACK);
      expect((await this.option(P.NBD_OPT_SET_META_CONTEXT, P.encodeMetaContextRequest(name, [P.NBD_META_BASE_ALLOCATION]))).at(-1)?.type).toBe(P.NBD_REP_ACK);
    }
    const replies = await this.option(P.NBD_OPT_GO, P.encodeInfoRequest(name, [P.NBD_INFO_BLOCK_SIZE]));
    expect(replies.at(-1)?.type).toBe(P.NBD_REP_ACK);
    for (const r of replies) {
      const info = r.type === P.NBD_REP_INFO ? P.decodeInfo(r.data) : null;
      if (info !== null && 'sizeBytes' in info) return { size: info.sizeBytes, flags: info.transmissionFlags };
    }
    throw new Error('no NBD_INFO_EXPORT in the reply to NBD_OPT_GO');
  }

  request(type: number, offset: number, length: number, cookie: bigint, flags = 0, payload?: Uint8Array): void {
    this.socket.write(P.encodeRequest({ type, flags, cookie, offset, length }));
    if (payload !== undefined) this.socket.write(payload);
  }

  /** A simple reply; `dataBytes` of data follow a successful one (reads). */
  async simpleReply(dataBytes = 0): Promise<{ error: number; cookie: bigint; data: Buffer }> {
    const h = P.decodeReplyHeader(await this.bytes(P.NBD_SIMPLE_REPLY_SIZE));
    if (h === null || h.kind !== 'simple') throw new Error('expected a simple reply');
    return { error: h.error, cookie: h.cookie, data: h.error === 0 && dataBytes > 0 ? await this.bytes(dataBytes) : Buffer.alloc(0) };
  }

  /** Structured chunks of one reply, up to the DONE one. */
  async chunks(): Promise<Array<P.NbdChunkHeader & { data: Buffer }>> {
    const out: Array<P.NbdChunkHeader & { data: Buffer }> = [];
    for (;;) {
      const h = P.decodeReplyHeader(await this.bytes(P.NBD_STRUCTURED_REPLY_HEADER_SIZE));
      if (h === null || h.kind !== 'chunk') throw new Error('expected a structured chunk');
      out.push({ ...h, data: h.length === 0 ? Buffer.alloc(0) : await this.bytes(h.length) });
      if ((h.flags & P.NBD_REPLY_FLAG_DONE) !== 0) return out;
    }
  }

  async waitClosed(ms = 5000): Promise<boolean> {
    const t0 = Date.now();
    while (!this.closed && Date.now() - t0 < ms) await new Promise((r) => setTimeout(r, 10));
    return this.closed;
  }

  end(): void {
    this.socket.destroy();
  }
}

const MiB = 1024 * 1024;

describeInterop('NBD server: real clients and bad peers', () => {
  let dir: string;
  let sock: string;
  let uri: string;
  let rwImg: Image;
  let roImg: Image;
  let mapImg: Image;
  let server: NbdServer;
  const log: string[] = [];

  beforeAll(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-nbd-'));
    sock = path.join(dir, 'nbd.sock');
    uri = `nbd+unix:///disk?socket=${sock}`;
    await tool('qemu-img', ['create', '-q', '-f', 'qcow2', path.join(dir, 'rw.qcow2'), '64M']);
    await tool('qemu-img', ['create', '-q', '-f', 'raw', path.join(dir, 'ro.raw'), '1M']);
    await tool('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 1M', path.join(dir, 'ro.raw')]);
    // data, a zero cluster, data, and unallocated space, for base:allocation
    await tool('qemu-img', ['create', '-q', '-f', 'qcow2', path.join(dir, 'map.qcow2'), '4M']);
    await tool('qemu-io', ['-f', 'qcow2', '-c', 'write -P 1 0 64k', '-c', 'write -P 2 1M 64k', '-c', 'write -z 1M 64k', '-c', 'write -P 3 2M 64k', path.join(dir, 'map.qcow2')]);
    rwImg = await openImage(path.join(dir, 'rw.qcow2'), { format: 'qcow2', name: 'nbd.disk' });
    roImg = await openImage(path.join(dir, 'ro.raw'), { format: 'raw', readOnly: true, name: 'nbd.ro' });
    mapImg = await openImage(path.join(dir, 'map.qcow2'), { format: 'qcow2', readOnly: true, name: 'nbd.map' });
    server = new NbdServer({
      exports: [
        { name: 'disk', backend: rwImg.backend, description: 'the writable one' },
        { name: 'ro', backend: roImg.backend },
        { name: 'map', backend: mapImg.backend },
      ],
      maxConnections: 200,
      log: (l) => log.push(l),
    });
    await server.listen({ type: 'unix', path: sock });
  });

  afterAll(async () => {
    await server.close();
    await rwImg.close();
    await roImg.close();
    await mapImg.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('qemu-img info reads the export size over nbd+unix', async () => {
    const info = JSON.parse(await tool('qemu-img', ['info', '--output=json', uri])) as { 'virtual-size': number; format: string };
    expect(info['virtual-size']).toBe(64 * MiB);
    expect(info.format).toBe('raw');
  });

  it('qemu-io writes a pattern that qemu-io and the block layer read back', async () => {
    const w = await tool('qemu-io', ['-f', 'raw', '-c', 'write -P 0xab 4096 128k', '-c', 'write -P 0xcd 1M 4096', uri]);
    expect(w).toContain('wrote 131072/131072 bytes');
    const r = await toolStatus('qemu-io', ['-f', 'raw', '-c', 'read -P 0xab 4096 128k', '-c', 'read -P 0xcd 1M 4096', '-c', 'read -P 0 0 4096', uri]);
    expect(r.stdout).not.toContain('Pattern verification failed');
    expect(r.stdout).toContain('read 131072/131072 bytes');
    const back = await rwImg.read(4096, 128 * 1024);
    expect(back.every((b) => b === 0xab)).toBe(true);
  });

  it('qemu-img convert into the export and compare against the reference agree, and a changed byte is caught', async () => {
    const ref = path.join(dir, 'ref.raw');
    const data = crypto.randomBytes(8 * MiB);
    fs.writeFileSync(ref, Buffer.concat([data, Buffer.alloc(56 * MiB)]));
    await tool('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', ref, uri]);
    expect((await toolStatus('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', ref, uri])).code).toBe(0);
    await rwImg.write(5 * MiB, new Uint8Array([0xff]));
    const diff = await toolStatus('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', ref, uri]);
    expect(diff.code).toBe(1);
    expect(diff.stdout).toContain('Content mismatch at offset 5242880');
  });

  itLibnbd('nbdinfo --list names the exports and their description; --map shows data, zeros and holes', async () => {
    const list = await tool('nbdinfo', ['--list', `nbd+unix:///?socket=${sock}`]);
    expect(list).toContain('export="disk"');
    expect(list).toContain('description: the writable one');
    expect(list).toContain('export="ro"');
    expect(list).toContain('base:allocation');
    const map = JSON.parse(await tool('nbdinfo', ['--map', '--json', `nbd+unix:///map?socket=${sock}`])) as Array<{ offset: number; length: number; type: number }>;
    expect(map.map((e) => [e.offset, e.length, e.type])).toEqual([
      [0, 65536, 0],
      [65536, 2 * MiB - 65536, 3],
      [2 * MiB, 65536, 0],
      [2 * MiB + 65536, 4 * MiB - 2 * MiB - 65536, 3],
    ]);
    // what qemu-nbd says about the same image
    const info = await tool('nbdinfo', [`nbd+unix:///disk?socket=${sock}`]);
    expect(info).toContain('can_multi_conn: true');
    expect(info).toContain('block_size_maximum: 33554432');
  });

  itLibnbd('nbdcopy copies into the export and out of it, byte for byte', async () => {
    const src = path.join(dir, 'copy-src.raw');
    const dst = path.join(dir, 'copy-dst.raw');
    const data = Buffer.concat([crypto.randomBytes(3 * MiB), Buffer.alloc(2 * MiB), crypto.randomBytes(MiB + 4096)]);
    fs.writeFileSync(src, Buffer.concat([data, Buffer.alloc(64 * MiB - data.length)]));
    await tool('nbdcopy', [src, uri]);
    expect(Buffer.from(await rwImg.read(0, data.length)).equals(data)).toBe(true);
    await tool('nbdcopy', [uri, dst]);
    expect(fs.readFileSync(dst).equals(fs.readFileSync(src))).toBe(true);
  });

  it('answers unknown options with ERR_UNSUP and STARTTLS with ERR_POLICY, then still serves', async () => {
    const c = await RawClient.connect(sock);
    expect((await c.hello()) & P.NBD_FLAG_FIXED_NEWSTYLE).toBe(P.NBD_FLAG_FIXED_NEWSTYLE);
    expect((await c.option(4242)).at(-1)?.type).toBe(P.NBD_REP_ERR_UNSUP);
    expect((await c.option(P.NBD_OPT_STARTTLS)).at(-1)?.type).toBe(P.NBD_REP_ERR_POLICY);
    expect((await c.option(P.NBD_OPT_GO, P.encodeInfoRequest('nope'))).at(-1)?.type).toBe(P.NBD_REP_ERR_UNKNOWN);
    expect((await c.option(P.NBD_OPT_GO, Buffer.from([0, 0, 0, 9]))).at(-1)?.type).toBe(P.NBD_REP_ERR_INVALID);
    const list = await c.option(P.NBD_OPT_LIST);
    expect(list.filter((r) => r.type === P.NBD_REP_SERVER).map((r) => P.decodeServerReply(r.data).exportName)).toEqual(['disk', 'ro', 'map']);
    expect((await c.option(P.NBD_OPT_ABORT)).at(-1)?.type).toBe(P.NBD_REP_ACK);
    expect(await c.waitClosed()).toBe(true);
  });

  it('NBD_OPT_EXPORT_NAME answers size and flags, with the 124 zero bytes only for a client without NO_ZEROES', async () => {
    for (const noZeroes of [true, false]) {
      const c = await RawClient.connect(sock);
      await c.hello(P.NBD_FLAG_C_FIXED_NEWSTYLE | (noZeroes ? P.NBD_FLAG_C_NO_ZEROES : 0));
      c.socket.write(P.encodeOption(P.NBD_OPT_EXPORT_NAME, Buffer.from('ro')));
      const r = await c.bytes(P.NBD_EXPORT_NAME_REPLY_SIZE + (noZeroes ? 0 : P.NBD_EXPORT_NAME_ZEROES));
      expect(Number(r.readBigUInt64BE(0))).toBe(MiB);
      expect(r.readUInt16BE(8) & P.NBD_FLAG_READ_ONLY).toBe(P.NBD_FLAG_READ_ONLY);
      expect(r.subarray(10).every((b) => b === 0)).toBe(true);
      // the next bytes are the reply to a request, not more padding
      c.request(P.NBD_CMD_READ, 0, 16, 77n);
      const rep = await c.simpleReply(16);
      expect(rep.cookie).toBe(77n);
      expect(rep.data.every((b) => b === 0x5a)).toBe(true);
      c.end();
    }
    // an unknown name can only be refused by hanging up
    const u = await RawClient.connect(sock);
    await u.hello();
    u.socket.write(P.encodeOption(P.NBD_OPT_EXPORT_NAME, Buffer.from('nope')));
    expect(await u.waitClosed()).toBe(true);
  });

  it('closes a connection whose client flags hold unknown bits', async () => {
    const c = await RawClient.connect(sock);
    await c.hello(P.NBD_FLAG_C_FIXED_NEWSTYLE | 0x80);
    expect(await c.waitClosed()).toBe(true);
  });

  it('refuses an oversized option with ERR_TOO_BIG and drops the connection', async () => {
    const c = await RawClient.connect(sock);
    await c.hello();
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(P.NBD_OPTS_MAGIC, 0);
    h.writeUInt32BE(P.NBD_OPT_GO, 8);
    h.writeUInt32BE(0xfffffff0, 12);
    c.socket.write(h);
    expect((await c.optionReply()).type).toBe(P.NBD_REP_ERR_TOO_BIG);
    expect(await c.waitClosed()).toBe(true);
  });

  it('closes a connection that sends garbage, in the handshake or in transmission, and no other client notices', async () => {
    const other = await RawClient.connect(sock);
    await other.go('disk');
    const g1 = await RawClient.connect(sock);
    await g1.bytes(P.NBD_GREETING_SIZE);
    g1.socket.write(Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n'));
    expect(await g1.waitClosed()).toBe(true);
    const g2 = await RawClient.connect(sock);
    await g2.go('disk');
    g2.socket.write(crypto.randomBytes(4096));
    expect(await g2.waitClosed()).toBe(true);
    other.request(P.NBD_CMD_READ, 0, 4096, 7n);
    const r = await other.simpleReply(4096);
    expect(r.error).toBe(0);
    expect(r.cookie).toBe(7n);
    other.end();
  });

  it('replies EINVAL to reads out of range or over 32 MiB, EPERM to writes on a read-only export, and keeps the connection', async () => {
    const c = await RawClient.connect(sock);
    const { size, flags } = await c.go('ro');
    expect(size).toBe(MiB);
    expect(flags & P.NBD_FLAG_READ_ONLY).toBe(P.NBD_FLAG_READ_ONLY);
    c.request(P.NBD_CMD_READ, MiB - 512, 1024, 1n);
    expect((await c.simpleReply()).error).toBe(P.NBD_EINVAL);
    // offset 2^64 - 1, as raw bytes (no JS number holds it exactly)
    const huge = P.encodeRequest({ type: P.NBD_CMD_READ, flags: 0, cookie: 2n, offset: 0, length: 512 });
    huge.writeBigUInt64BE(0xffffffffffffffffn, 16);
    c.socket.write(huge);
    expect((await c.simpleReply()).error).toBe(P.NBD_EINVAL);
    c.request(P.NBD_CMD_READ, 0, 64 * MiB, 3n);
    expect((await c.simpleReply()).error).toBe(P.NBD_EINVAL);
    c.request(P.NBD_CMD_WRITE, 0, 4096, 4n, 0, Buffer.alloc(4096, 1));
    expect((await c.simpleReply()).error).toBe(P.NBD_EPERM);
    c.request(P.NBD_CMD_WRITE_ZEROES, 0, 4096, 5n);
    expect((await c.simpleReply()).error).toBe(P.NBD_EPERM);
    c.request(P.NBD_CMD_READ, 0, 4096, 6n);
    const ok = await c.simpleReply(4096);
    expect(ok.error).toBe(0);
    expect(ok.data.every((b) => b === 0x5a)).toBe(true);
    expect(Buffer.from(await roImg.read(0, 4096)).every((b) => b === 0x5a)).toBe(true);
    c.end();
  });

  it('a write cut off by a disconnect changes nothing, and the export goes on serving', async () => {
    const before = Buffer.from(await rwImg.read(32 * MiB, MiB));
    const c = await RawClient.connect(sock);
    await c.go('disk');
    c.request(P.NBD_CMD_WRITE, 32 * MiB, MiB, 9n, 0, Buffer.alloc(MiB / 2, 0xee));
    await new Promise((r) => setTimeout(r, 50));
    c.end();
    await new Promise((r) => setTimeout(r, 50));
    expect(Buffer.from(await rwImg.read(32 * MiB, MiB)).equals(before)).toBe(true);
    const r = await toolStatus('qemu-io', ['-f', 'raw', '-c', `read -P 0 ${32 * MiB} 1M`, uri]);
    expect(r.stdout).toContain('read 1048576/1048576 bytes');
  });

  it('answers 64 pipelined requests, each with its own cookie, and structured reads are sparse', async () => {
    const c = await RawClient.connect(sock);
    await c.go('disk');
    for (let i = 0; i < 64; i++) c.request(P.NBD_CMD_WRITE, 40 * MiB + i * 4096, 4096, BigInt(1000 + i), 0, Buffer.alloc(4096, i));
    const cookies = new Set<bigint>();
    for (let i = 0; i < 64; i++) {
      const r = await c.simpleReply();
      expect(r.error).toBe(0);
      cookies.add(r.cookie);
    }
    expect(cookies.size).toBe(64);
    c.request(P.NBD_CMD_FLUSH, 0, 0, 2000n);
    expect((await c.simpleReply()).error).toBe(0);
    c.end();
    const s = await RawClient.connect(sock);
    await s.go('map', true);
    s.request(P.NBD_CMD_READ, 0, 2 * MiB + 65536, 1n);
    const chunks = await s.chunks();
    expect(chunks.map((ch) => ch.type)).toEqual([P.NBD_REPLY_TYPE_OFFSET_DATA, P.NBD_REPLY_TYPE_OFFSET_HOLE, P.NBD_REPLY_TYPE_OFFSET_DATA]);
    expect(P.decodeOffsetHole(chunks[1]?.data ?? Buffer.alloc(12))).toEqual({ offset: 65536, length: 2 * MiB - 65536 });
    expect(chunks[2]?.data.subarray(8).every((b) => b === 3)).toBe(true);
    s.request(P.NBD_CMD_BLOCK_STATUS, 0, 4 * MiB, 2n, P.NBD_CMD_FLAG_REQ_ONE);
    const [bs] = await s.chunks();
    expect(P.decodeBlockStatus(bs?.data ?? Buffer.alloc(4)).extents).toEqual([{ length: 65536, flags: 0 }]);
    s.end();
  });

  it('answers a write with a simple reply and the other commands as the spec says', async () => {
    const c = await RawClient.connect(sock);
    const { flags } = await c.go('disk', true);
    const want = P.NBD_FLAG_SEND_FUA | P.NBD_FLAG_SEND_FLUSH | P.NBD_FLAG_SEND_TRIM | P.NBD_FLAG_SEND_WRITE_ZEROES | P.NBD_FLAG_SEND_FAST_ZERO | P.NBD_FLAG_CAN_MULTI_CONN | P.NBD_FLAG_SEND_DF;
    expect(flags & want).toBe(want);
    expect(flags & P.NBD_FLAG_READ_ONLY).toBe(0);
    const base = 48 * MiB;
    c.request(P.NBD_CMD_WRITE, base, 128 * 1024, 1n, P.NBD_CMD_FLAG_FUA, Buffer.alloc(128 * 1024, 0x77));
    expect((await c.simpleReply()).error).toBe(0);
    expect(Buffer.from(await rwImg.read(base, 128 * 1024)).every((b) => b === 0x77)).toBe(true);
    // FAST_ZERO on data: refused (we cannot promise it is fast), the data stays
    c.request(P.NBD_CMD_WRITE_ZEROES, base, 65536, 2n, P.NBD_CMD_FLAG_FAST_ZERO);
    expect((await c.chunks()).map((ch) => [ch.type, P.decodeErrorChunk(ch.type, ch.data).error])).toEqual([[P.NBD_REPLY_TYPE_ERROR, P.NBD_ENOTSUP]]);
    expect((await rwImg.read(base, 1))[0]).toBe(0x77);
    c.request(P.NBD_CMD_WRITE_ZEROES, base, 65536, 3n, P.NBD_CMD_FLAG_NO_HOLE);
    expect((await c.simpleReply()).error).toBe(0);
    c.request(P.NBD_CMD_WRITE_ZEROES, base + 65536, 65536, 4n);
    expect((await c.simpleReply()).error).toBe(0);
    expect(Buffer.from(await rwImg.read(base, 128 * 1024)).every((b) => b === 0)).toBe(true);
    // FAST_ZERO on a range that already reads as zeros: nothing to do, so it is fast
    c.request(P.NBD_CMD_WRITE_ZEROES, base, 65536, 5n, P.NBD_CMD_FLAG_FAST_ZERO);
    expect((await c.simpleReply()).error).toBe(0);
    c.request(P.NBD_CMD_BLOCK_STATUS, base, 128 * 1024, 6n);
    const [bs] = await c.chunks();
    const ext = P.decodeBlockStatus(bs?.data ?? Buffer.alloc(4));
    expect(ext.contextId).toBe(1);
    expect(ext.extents.every((e) => (e.flags & P.NBD_STATE_ZERO) !== 0)).toBe(true);
    expect(ext.extents.reduce((n, e) => n + e.length, 0)).toBe(128 * 1024);
    c.request(P.NBD_CMD_TRIM, base, 65536, 7n);
    expect((await c.simpleReply()).error).toBe(0);
    // an error over structured replies carries a message
    c.request(P.NBD_CMD_READ, 64 * MiB, 1, 8n);
    const [err] = await c.chunks();
    const e = P.decodeErrorChunk(err?.type ?? 0, err?.data ?? Buffer.alloc(6));
    expect(e.error).toBe(P.NBD_EINVAL);
    expect(e.message).toContain('runs past the end');
    c.request(P.NBD_CMD_CACHE, 0, 4096, 9n);
    expect(P.decodeErrorChunk(P.NBD_REPLY_TYPE_ERROR, (await c.chunks())[0]?.data ?? Buffer.alloc(6)).error).toBe(P.NBD_EINVAL);
    c.end();
  });

  it('refuses BLOCK_STATUS without a meta context, and an oversized WRITE after throwing its payload away', async () => {
    const c = await RawClient.connect(sock);
    await c.go('disk');
    c.request(P.NBD_CMD_BLOCK_STATUS, 0, 4096, 1n);
    expect((await c.simpleReply()).error).toBe(P.NBD_EINVAL);
    const big = 33 * MiB;
    c.request(P.NBD_CMD_WRITE, 0, big, 2n, 0, Buffer.alloc(big, 0x99));
    expect((await c.simpleReply()).error).toBe(P.NBD_EINVAL);
    expect((await rwImg.read(0, 1))[0]).not.toBe(0x99);
    // the stream is still in step: the next request is understood
    c.request(P.NBD_CMD_READ, 0, 512, 3n);
    expect((await c.simpleReply(512)).cookie).toBe(3n);
    c.end();
  });

  it('holds export requests while the node is drained and answers them after', async () => {
    const c = await RawClient.connect(sock);
    await c.go('disk');
    const root = rwImg.backend.root;
    if (root === null) throw new Error('no root');
    let answered = false;
    await withBql((bql) =>
      withDrained(bql, root, async () => {
        c.request(P.NBD_CMD_READ, 0, 4096, 1n);
        void c.simpleReply(4096).then(() => (answered = true));
        await new Promise((r) => setTimeout(r, 100));
        expect(answered).toBe(false);
        expect(rwImg.backend.queuedCount).toBe(1);
      }),
    );
    for (let i = 0; i < 100 && !answered; i++) await new Promise((r) => setTimeout(r, 10));
    expect(answered).toBe(true);
    c.end();
  });

  it('a client that shuts its write side after its requests still gets every reply', async () => {
    const c = await RawClient.connect(sock);
    await c.go('ro');
    const root = roImg.backend.root;
    if (root === null) throw new Error('no root');
    // the reads wait in the drain queue until well after the server has seen the end of input
    await withBql((bql) =>
      withDrained(bql, root, async () => {
        for (let i = 0; i < 8; i++) c.request(P.NBD_CMD_READ, i * 65536, 65536, BigInt(i));
        c.socket.end();
        await new Promise((r) => setTimeout(r, 100));
      }),
    );
    for (let i = 0; i < 8; i++) {
      const r = await c.simpleReply(65536);
      expect(r.error).toBe(0);
      expect(r.data.every((b) => b === 0x5a)).toBe(true);
    }
    expect(await c.waitClosed()).toBe(true);
  });

  it('survives 200 connections that send random bytes at every phase, while a client keeps reading', async () => {
    const rnd = prng(14);
    const bytes = (n: number): Buffer => Buffer.from(Array.from({ length: n }, () => Math.floor(rnd() * 256)));
    const good = await RawClient.connect(sock);
    await good.go('ro', true);
    for (let i = 0; i < 200; i++) {
      const c = await RawClient.connect(sock);
      const phase = i % 4;
      if (phase === 0) c.socket.write(bytes(1 + Math.floor(rnd() * 64)));
      else if (phase === 1) {
        await c.hello();
        c.socket.write(Buffer.concat([P.encodeOption(Math.floor(rnd() * 16), bytes(Math.floor(rnd() * 32))), bytes(Math.floor(rnd() * 64))]));
      } else {
        await c.go(rnd() < 0.5 ? 'disk' : 'ro', rnd() < 0.5);
        // a valid header with random type, flags and range, then noise; or noise alone
        const h = P.encodeRequest({ type: Math.floor(rnd() * 12), flags: Math.floor(rnd() * 64), cookie: BigInt(i), offset: Math.floor(rnd() * 2 * MiB), length: Math.floor(rnd() * 65536) });
        c.socket.write(phase === 2 ? Buffer.concat([h, bytes(Math.floor(rnd() * 256))]) : bytes(28 + Math.floor(rnd() * 256)));
      }
      await new Promise((r) => setTimeout(r, 2));
      c.end();
      if (i % 20 === 0) {
        good.request(P.NBD_CMD_READ, 0, 4096, BigInt(i));
        const [chunk] = await good.chunks();
        expect(chunk?.type).toBe(P.NBD_REPLY_TYPE_OFFSET_DATA);
        expect(chunk?.data.subarray(8).every((b) => b === 0x5a)).toBe(true);
      }
    }
    good.end();
    // the read-only image is untouched and the server still takes new clients
    expect(Buffer.from(await roImg.read(0, MiB)).every((b) => b === 0x5a)).toBe(true);
    const info = JSON.parse(await tool('qemu-img', ['info', '--output=json', `nbd+unix:///ro?socket=${sock}`])) as { 'virtual-size': number };
    expect(info['virtual-size']).toBe(MiB);
  }, 60_000);

  it('serves 100 connections at once, each reading what the block layer holds', async () => {
    const expected = Buffer.from(await rwImg.read(0, 65536));
    const clients = await Promise.all(Array.from({ length: 100 }, () => RawClient.connect(sock)));
    await Promise.all(clients.map((c) => c.go('disk')));
    const replies = await Promise.all(
      clients.map(async (c, i) => {
        c.request(P.NBD_CMD_READ, 0, 65536, BigInt(i));
        return c.simpleReply(65536);
      }),
    );
    for (const [i, r] of replies.entries()) {
      expect(r.cookie).toBe(BigInt(i));
      expect(r.data.equals(expected)).toBe(true);
    }
    for (const c of clients) {
      c.request(P.NBD_CMD_DISC, 0, 0, 0n);
    }
    expect((await Promise.all(clients.map((c) => c.waitClosed()))).every(Boolean)).toBe(true);
  });
});

/** Starts `snapstack nbd` and waits until its socket accepts. */
async function startCli(args: string[], sock: string): Promise<{ proc: ChildProcess; stderr: () => string }> {
  let stderr = '';
  const proc = spawn(process.execPath, [BIN, 'nbd', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  proc.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
  const t0 = Date.now();
  for (;;) {
    if (proc.exitCode !== null) throw new Error(`snapstack nbd exited ${proc.exitCode}: ${stderr}`);
    if (fs.existsSync(sock)) {
      const ok = await new Promise<boolean>((resolve) => {
        const s = net.connect(sock);
        s.once('connect', () => {
          s.destroy();
          resolve(true);
        });
        s.once('error', () => resolve(false));
      });
      // that probe was a client: only a persistent server may be probed
      if (ok) return { proc, stderr: () => stderr };
    }
    if (Date.now() - t0 > 15_000) throw new Error(`snapstack nbd did not listen: ${stderr}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

function exited(proc: ChildProcess, ms = 15_000): Promise<number | null> {
  if (proc.exitCode !== null || proc.signalCode !== null) return Promise.resolve(proc.exitCode);
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error('snapstack nbd did not exit')), ms);
    proc.once('exit', (code) => {
      clearTimeout(t);
      resolve(code);
    });
  });
}

describeInterop('snapstack nbd (the command)', () => {
  let dir: string;
  beforeAll(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-nbd-cli-'));
  });
  afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

  it('without -t exits after its first client leaves, removing the socket and the pid file', async () => {
    const img = path.join(dir, 'once.qcow2');
    const sock = path.join(dir, 'once.sock');
    const pid = path.join(dir, 'once.pid');
    await tool('qemu-img', ['create', '-q', '-f', 'qcow2', img, '8M']);
    let stderr = '';
    const proc = spawn(process.execPath, [BIN, 'nbd', '-f', 'qcow2', '-x', 'd', '-k', sock, '--pid-file', pid, img], { stdio: ['ignore', 'pipe', 'pipe'] });
    proc.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
    for (let i = 0; i < 300 && !fs.existsSync(pid); i++) await new Promise((r) => setTimeout(r, 50));
    expect(fs.readFileSync(pid, 'utf8').trim()).toBe(String(proc.pid));
    const w = await toolStatus('qemu-io', ['-f', 'raw', '-c', 'write -P 0x42 0 64k', `nbd+unix:///d?socket=${sock}`]);
    expect(w.stdout + stderr).toContain('wrote 65536/65536 bytes');
    expect(await exited(proc)).toBe(0);
    expect(fs.existsSync(sock)).toBe(false);
    expect(fs.existsSync(pid)).toBe(false);
    // the image lock is gone with the process, and the write is in the image
    const r = await toolStatus('qemu-io', ['-f', 'qcow2', '-c', 'read -P 0x42 0 64k', img]);
    expect(r.stdout).toContain('read 65536/65536 bytes');
    expect(r.stdout).not.toContain('Pattern verification failed');
  });

  it('-t serves until SIGTERM; -l exports an internal snapshot read-only', async () => {
    const img = path.join(dir, 'snap.qcow2');
    const sock = path.join(dir, 'snap.sock');
    await tool('qemu-img', ['create', '-q', '-f', 'qcow2', img, '8M']);
    await tool('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 64k', img]);
    await tool('qemu-img', ['snapshot', '-c', 'tag1', img]);
    await tool('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x22 0 64k', img]);
    const { proc } = await startCli(['-t', '-f', 'qcow2', '-k', sock, '-l', 'snapshot.name=tag1', img], sock);
    const r = await toolStatus('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0x11 0 64k', `nbd+unix:///?socket=${sock}`]);
    expect(r.stdout).toContain('read 65536/65536 bytes');
    expect(r.stdout).not.toContain('Pattern verification failed');
    const w = await toolStatus('qemu-io', ['-f', 'raw', '-c', 'write -P 0x33 0 4k', `nbd+unix:///?socket=${sock}`]);
    expect(w.stdout + w.stderr).not.toContain('wrote 4096/4096');
    // still serving after two clients
    expect(proc.exitCode).toBe(null);
    proc.kill('SIGTERM');
    expect(await exited(proc)).toBe(0);
    expect(fs.existsSync(sock)).toBe(false);
    const cur = await toolStatus('qemu-io', ['-f', 'qcow2', '-c', 'read -P 0x22 0 64k', img]);
    expect(cur.stdout).not.toContain('Pattern verification failed');
  });

  it('data whose FLUSH was acknowledged survives SIGKILL of the server', async () => {
    const img = path.join(dir, 'kill.qcow2');
    const sock = path.join(dir, 'kill.sock');
    const ref = path.join(dir, 'kill-ref.raw');
    await tool('qemu-img', ['create', '-q', '-f', 'qcow2', img, '16M']);
    const { proc } = await startCli(['-t', '-f', 'qcow2', '-k', sock, img], sock);
    const data = crypto.randomBytes(4 * MiB);
    const c = await RawClient.connect(sock);
    await c.go('');
    for (let i = 0; i < 4; i++) c.request(P.NBD_CMD_WRITE, i * MiB, MiB, BigInt(i), 0, data.subarray(i * MiB, (i + 1) * MiB));
    for (let i = 0; i < 4; i++) expect((await c.simpleReply()).error).toBe(0);
    c.request(P.NBD_CMD_FLUSH, 0, 0, 99n);
    expect((await c.simpleReply()).error).toBe(0);
    proc.kill('SIGKILL');
    await exited(proc);
    c.end();
    fs.writeFileSync(ref, Buffer.concat([data, Buffer.alloc(12 * MiB)]));
    const cmp = await toolStatus('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', ref, img]);
    expect(cmp.stdout + cmp.stderr).toContain('Images are identical');
    expect(cmp.code).toBe(0);
  });

  itLibnbd('-A: qemu:allocation-depth and base:allocation of a backing chain read exactly as qemu-nbd -A serves them', async () => {
    const base = path.join(dir, 'depth-base.qcow2');
    const top = path.join(dir, 'depth-top.qcow2');
    await tool('qemu-img', ['create', '-q', '-f', 'qcow2', base, '4M']);
    await tool('qemu-io', ['-f', 'qcow2', '-c', 'write -P 1 0 64k', '-c', 'write -P 2 2M 64k', base]);
    await tool('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top, '4M']);
    await tool('qemu-io', ['-f', 'qcow2', '-c', 'write -P 3 1M 64k', '-c', 'write -P 4 2M 4k', top]);
    const maps = async (sock: string): Promise<string[]> => [
      await tool('nbdinfo', ['--map=qemu:allocation-depth', '--json', `nbd+unix:///?socket=${sock}`]),
      await tool('nbdinfo', ['--map', '--json', `nbd+unix:///?socket=${sock}`]),
      await tool('nbdinfo', ['--list', '--json', `nbd+unix:///?socket=${sock}`]).then((j) => JSON.stringify((JSON.parse(j) as { exports: Array<{ contexts: string[] }> }).exports[0]?.contexts)),
    ];
    const qs = path.join(dir, 'depth-q.sock');
    const q = spawn('qemu-nbd', ['-t', '-A', '-r', '-f', 'qcow2', '-k', qs, top], { stdio: 'ignore' });
    let want: string[];
    try {
      for (let i = 0; i < 200 && !fs.existsSync(qs); i++) await new Promise((r) => setTimeout(r, 25));
      want = await maps(qs);
    } finally {
      q.kill('SIGTERM');
      await exited(q);
    }
    const ss = path.join(dir, 'depth-s.sock');
    const { proc } = await startCli(['-t', '-A', '-r', '-f', 'qcow2', '-k', ss, top], ss);
    try {
      expect(await maps(ss)).toEqual(want);
      expect(want[0]).toContain('backing depth 2');
    } finally {
      proc.kill('SIGTERM');
      await exited(proc);
    }
  });

  it('refuses options it does not have, naming them', async () => {
    const r = spawnSync(process.execPath, [BIN, 'nbd', '--fork', 'x.img'], { encoding: 'utf8' });
    expect(r.status).toBe(1);
    expect(r.stderr).toContain('--fork is not supported');
  });
});

describeInterop('NBD server: connection limits, timeouts and shutdown', () => {
  let dir: string;
  let img: Image;
  beforeAll(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-nbd-life-'));
    img = await openImage('driver=memory,size=16M', { name: 'nbd.life' });
  });
  afterAll(async () => {
    await img.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('with maxConnections 1 a second client waits until the first leaves, then is served', async () => {
    const sock = path.join(dir, 'one.sock');
    const server = new NbdServer({ exports: [{ name: '', backend: img.backend }], maxConnections: 1 });
    await server.listen({ type: 'unix', path: sock });
    try {
      const a = await RawClient.connect(sock);
      await a.go('');
      const b = await RawClient.connect(sock);
      let greeted = false;
      const hello = b.hello().then(() => (greeted = true));
      await new Promise((r) => setTimeout(r, 100));
      expect(greeted).toBe(false);
      expect(server.connectionCount).toBe(1);
      a.request(P.NBD_CMD_DISC, 0, 0, 0n);
      await hello;
      expect(greeted).toBe(true);
      b.end();
    } finally {
      await server.close();
    }
  });

  it('drops a client that does not finish the handshake in time', async () => {
    const sock = path.join(dir, 'slow.sock');
    const server = new NbdServer({ exports: [{ name: '', backend: img.backend }], handshakeTimeoutMs: 200 });
    await server.listen({ type: 'unix', path: sock });
    try {
      const c = await RawClient.connect(sock);
      await c.bytes(P.NBD_GREETING_SIZE);
      expect(await c.waitClosed(3000)).toBe(true);
    } finally {
      await server.close();
    }
  });

  it('listens on TCP (127.0.0.1, a free port) for qemu-img', async () => {
    const server = new NbdServer({ exports: [{ name: 'tcp', backend: img.backend }] });
    const addr = await server.listen({ type: 'inet', host: '127.0.0.1', port: 0 });
    try {
      if (typeof addr === 'string') throw new Error('expected a TCP address');
      const info = JSON.parse(await tool('qemu-img', ['info', '--output=json', `nbd://127.0.0.1:${addr.port}/tcp`])) as { 'virtual-size': number };
      expect(info['virtual-size']).toBe(16 * MiB);
    } finally {
      await server.close();
    }
  });

  it('exports are added and removed while serving: safe refuses while in use, hard closes the clients', async () => {
    const sock = path.join(dir, 'exports.sock');
    const server = new NbdServer({ exports: [], maxConnections: 4 });
    await server.listen({ type: 'unix', path: sock });
    try {
      const probe = await RawClient.connect(sock);
      await probe.hello();
      expect((await probe.option(P.NBD_OPT_GO, P.encodeInfoRequest('late'))).at(-1)?.type).toBe(P.NBD_REP_ERR_UNKNOWN);
      server.addExport({ name: 'late', backend: img.backend });
      expect(() => server.addExport({ name: 'late', backend: img.backend })).toThrow(/already exists/);
      expect((await probe.option(P.NBD_OPT_GO, P.encodeInfoRequest('late'))).at(-1)?.type).toBe(P.NBD_REP_ACK);
      probe.request(P.NBD_CMD_DISC, 0, 0, 0n);
      expect(await probe.waitClosed()).toBe(true);
      const c = await RawClient.connect(sock);
      await c.go('late');
      expect(server.clientsOf('late')).toBe(1);
      await expect(server.removeExport('late', 'safe')).rejects.toThrow(/has 1 connection/);
      c.request(P.NBD_CMD_READ, 0, 512, 1n);
      expect((await c.simpleReply(512)).error).toBe(0);
      await server.removeExport('late', 'hard');
      expect(await c.waitClosed()).toBe(true);
      const d = await RawClient.connect(sock);
      await d.hello();
      expect((await d.option(P.NBD_OPT_GO, P.encodeInfoRequest('late'))).at(-1)?.type).toBe(P.NBD_REP_ERR_UNKNOWN);
      d.end();
      await expect(server.removeExport('late')).rejects.toThrow(/not found/);
    } finally {
      await server.close();
    }
  });

  it('bounds the payload bytes in flight over all connections, and every request completes', async () => {
    const sock = path.join(dir, 'budget.sock');
    const server = new NbdServer({ exports: [{ name: '', backend: img.backend }], maxConnections: 2, maxInFlightBytes: MiB });
    await server.listen({ type: 'unix', path: sock });
    try {
      const clients = [await RawClient.connect(sock), await RawClient.connect(sock)];
      for (const c of clients) await c.go('');
      const root = img.backend.root;
      if (root === null) throw new Error('no root');
      await withBql((bql) =>
        withDrained(bql, root, async () => {
          clients.forEach((c, k) => [0, 1].forEach((j) => c.request(P.NBD_CMD_WRITE, (2 * k + j) * MiB, MiB, BigInt(j), 0, Buffer.alloc(MiB, 0x40 + 2 * k + j))));
          await new Promise((r) => setTimeout(r, 200));
          // one write is let in (nothing else was in flight); the other three wait unread
          expect(server.inFlightBytes).toBe(MiB);
          expect(img.backend.queuedCount).toBe(1);
        }),
      );
      for (const c of clients) for (let j = 0; j < 2; j++) expect((await c.simpleReply()).error).toBe(0);
      expect(server.inFlightBytes).toBe(0);
      for (let i = 0; i < 4; i++) expect((await img.read(i * MiB, 1))[0]).toBe(0x40 + i);
      for (const c of clients) c.end();
    } finally {
      await server.close();
    }
  });

  it('close() answers the requests in flight before closing the connection, and removes the socket', async () => {
    const sock = path.join(dir, 'close.sock');
    const server = new NbdServer({ exports: [{ name: '', backend: img.backend }] });
    await server.listen({ type: 'unix', path: sock });
    const c = await RawClient.connect(sock);
    await c.go('');
    const root = img.backend.root;
    if (root === null) throw new Error('no root');
    // hold the write in the drain queue so that it is in flight when close() begins
    let closing: Promise<void> | null = null;
    await withBql((bql) =>
      withDrained(bql, root, async () => {
        c.request(P.NBD_CMD_WRITE, 0, 4096, 5n, 0, Buffer.alloc(4096, 0x31));
        for (let i = 0; i < 100 && img.backend.queuedCount === 0; i++) await new Promise((r) => setTimeout(r, 5));
        expect(img.backend.queuedCount).toBe(1);
        closing = server.close();
      }),
    );
    const r = await c.simpleReply();
    expect(r).toMatchObject({ error: 0, cookie: 5n });
    await closing;
    expect(await c.waitClosed()).toBe(true);
    expect(fs.existsSync(sock)).toBe(false);
    expect((await img.read(0, 1))[0]).toBe(0x31);
  });
});

describeInterop('snapstack nbd: listen and connect errors in qemu-nbd\'s words', () => {
  it('a socket in a missing directory, a port in use, and a client connecting to nothing', async () => {
    const d = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-nbd-err-'));
    try {
      const img = path.join(d, 'e.raw');
      fs.writeFileSync(img, Buffer.alloc(65536));
      const missing = path.join(d, 'nope', 's.sock');
      const ours = spawnSync(process.execPath, [BIN, 'nbd', '-t', '-f', 'raw', '-k', missing, img], { encoding: 'utf8' });
      const theirs = spawnSync('qemu-nbd', ['-t', '-f', 'raw', '-k', missing, img], { encoding: 'utf8' });
      expect(theirs.stderr).toBe(`qemu-nbd: Failed to bind socket to ${missing}: No such file or directory\n`);
      expect(ours.stderr).toBe(theirs.stderr.replace('qemu-nbd:', 'snapstack nbd:'));
      expect(ours.status).toBe(1);
      // a port somebody holds: one line, QEMU's text
      const holder = net.createServer();
      await new Promise<void>((r) => holder.listen(0, '127.0.0.1', () => r()));
      const a = holder.address();
      const port = typeof a === 'object' && a !== null ? a.port : 0;
      try {
        const busy = await promisify(execFile)(process.execPath, [BIN, 'nbd', '-t', '-f', 'raw', '-b', '127.0.0.1', '-p', String(port), img]).catch((e: { stderr: string; code: number }) => e);
        expect(busy.stderr).toBe('snapstack nbd: Failed to find an available port: Address already in use\n');
      } finally {
        holder.close();
      }
      const sock = path.join(d, 'nobody.sock');
      const info = spawnSync(process.execPath, [BIN, 'img', 'info', `nbd+unix:///?socket=${sock}`], { encoding: 'utf8' });
      expect(info.stderr).toContain(`Failed to connect to '${sock}': No such file or directory`);
    } finally {
      fs.rmSync(d, { recursive: true, force: true });
    }
  });
});

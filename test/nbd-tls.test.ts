/**
 * NBD over TLS with x509 credentials (QEMU's tls-creds-x509): our server in forced-TLS mode
 * against qemu-img, qemu-io, nbdinfo and nbdcopy; our client (driver=nbd,tls-creds=ID) against
 * qemu-nbd and qemu-storage-daemon with TLS and against our own server (a reconnect redoes the
 * handshake); and the refusals: plaintext clients, a client without credentials, a certificate
 * from another CA, bytes of garbage instead of a ClientHello (only that connection closes), the
 * option rules before and after STARTTLS. Certificates are made with openssl per run.
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import tls from 'node:tls';
import { promisify } from 'node:util';
import { afterAll, beforeAll, expect, it, vi } from 'vitest';
import { openImage, type Image } from '../src/image.js';
import '../src/drivers/nbd/driver.js';
import { NbdClient } from '../src/nbd/client.js';
import * as P from '../src/nbd/protocol.js';
import { NbdServer } from '../src/nbd/server.js';
import { SocketReader } from '../src/nbd/socket-reader.js';
import { addTlsCreds, findTlsCreds, loadTlsCredsX509 } from '../src/nbd/tls-creds.js';
import { describeNeeding } from './helpers/qemu.js';
import { firstDifference, pattern, startServer, type ServerProcess } from './nbd-client-helpers.js';
import { makeTlsDirs, type TlsDirs } from './nbd-tls-helpers.js';

const run = promisify(execFile);
const MiB = 1024 * 1024;
const SIZE = 8 * MiB;
let dir: string;
let certs: TlsDirs;
let img: Image;
let server: NbdServer;
let sock: string;
const logs: string[] = [];
const procs: ServerProcess[] = [];

async function toolStatus(cmd: string, args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const r = await run(cmd, args, { encoding: 'utf8', maxBuffer: 64 * MiB });
    return { code: 0, stdout: r.stdout, stderr: r.stderr };
  } catch (e) {
    const x = e as { code?: number; stdout?: string; stderr?: string };
    return { code: typeof x.code === 'number' ? x.code : -1, stdout: x.stdout ?? '', stderr: x.stderr ?? '' };
  }
}

async function tool(cmd: string, args: string[]): Promise<string> {
  const r = await toolStatus(cmd, args);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.code}): ${r.stderr}`);
  return r.stdout;
}

/** QEMU's client options for a TLS export on a unix socket (QEMU wants a host name to check). */
function qemuTlsArgs(credsDir: string, socket: string, exportName: string): string[] {
  return ['--object', `tls-creds-x509,id=tls0,dir=${credsDir},endpoint=client`, '--image-opts', `driver=nbd,server.type=unix,server.path=${socket},export=${exportName},tls-creds=tls0,tls-hostname=localhost`];
}

function libnbdUri(socket: string, exportName: string, credsDir: string): string {
  return `nbds+unix:///${exportName}?socket=${socket}&tls-certificates=${credsDir}`;
}

function expectSame(actual: Uint8Array, expected: Uint8Array, what: string): void {
  const d = firstDifference(actual, expected);
  expect(d, `${what}: first difference at byte ${d}`).toBe(-1);
}

/** A raw client on the plain socket: greeting and flags done, options ours to send. */
async function rawHaggle(socket: string): Promise<{ s: net.Socket; r: SocketReader; closed: () => boolean }> {
  const s = net.connect(socket);
  await new Promise<void>((resolve, reject) => {
    s.once('connect', resolve);
    s.once('error', reject);
  });
  let closed = false;
  s.on('close', () => (closed = true));
  s.on('error', () => undefined);
  const r = new SocketReader(s);
  const g = await r.read(18);
  expect(g?.subarray(0, 16).toString('latin1')).toBe('NBDMAGICIHAVEOPT');
  const f = Buffer.alloc(4);
  f.writeUInt32BE(P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES, 0);
  s.write(f);
  return { s, r, closed: () => closed };
}

async function optionReply(r: SocketReader): Promise<{ option: number; type: number; text: string }> {
  const h = await r.read(20);
  if (h === null) throw new Error('closed while an option reply was expected');
  const { option, type, length } = P.decodeOptionReplyHeader(h);
  const data = length === 0 ? Buffer.alloc(0) : await r.read(length);
  return { option, type, text: data === null ? '' : data.toString('utf8') };
}

function until(cond: () => boolean, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  return new Promise((resolve, reject) => {
    const tick = (): void => {
      if (cond()) resolve();
      else if (Date.now() > end) reject(new Error('condition not met in time'));
      else setTimeout(tick, 10);
    };
    tick();
  });
}

describeNeeding('NBD over TLS (x509)', ['qemu-img', 'qemu-io', 'qemu-nbd', 'qemu-storage-daemon', 'nbdinfo', 'nbdcopy'], 'apt-get install openssl qemu-utils qemu-system-common libnbd-bin', () => {
  const ref = new Uint8Array(SIZE);

  beforeAll(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-nbd-tls-'));
    certs = makeTlsDirs(path.join(dir, 'certs'));
    addTlsCreds(loadTlsCredsX509({ id: 'srv', dir: certs.server, endpoint: 'server' }));
    addTlsCreds(loadTlsCredsX509({ id: 'cli', dir: certs.client, endpoint: 'client' }));
    addTlsCreds(loadTlsCredsX509({ id: 'rogue', dir: certs.rogue, endpoint: 'client' }));
    addTlsCreds(loadTlsCredsX509({ id: 'nocert', dir: certs.nocert, endpoint: 'client' }));
    const file = path.join(dir, 'export.qcow2');
    await tool('qemu-img', ['create', '-q', '-f', 'qcow2', file, String(SIZE)]);
    img = await openImage(file, { format: 'qcow2', name: 'nbd.tls' });
    sock = path.join(dir, 'ours.sock');
    server = new NbdServer({ exports: [{ name: 'disk', backend: img.backend }], maxConnections: 16, log: (l) => logs.push(l), tls: findTlsCreds('srv', 'server') });
    await server.listen({ type: 'unix', path: sock });
  });
  afterAll(async () => {
    for (const p of procs) await p.stop();
    await server?.close();
    await img?.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('serves qemu-io, qemu-img, nbdinfo and nbdcopy over TLS; the data matches a reference', async () => {
    const writes: Array<[number, number, number]> = [
      [0, 65536, 0x11],
      [3 * MiB + 512, 4096, 0x22],
      [SIZE - 1024, 1024, 0x33],
    ];
    for (const [off, len, byte] of writes) {
      await tool('qemu-io', ['-c', `write -P ${byte} ${off} ${len}`, ...qemuTlsArgs(certs.client, sock, 'disk')]);
      ref.fill(byte, off, off + len);
    }
    const info = await tool('qemu-img', ['info', '--output=json', ...qemuTlsArgs(certs.client, sock, 'disk')]);
    expect(JSON.parse(info)).toMatchObject({ 'virtual-size': SIZE, format: 'nbd' });
    const map = await tool('nbdinfo', ['--map', libnbdUri(sock, 'disk', certs.client)]);
    expect(map).toMatch(/^\s*0\s+65536\s+0\s+data/m);
    expect(map).toMatch(/hole,zero/);
    // nbdinfo with TLS says so
    expect(await tool('nbdinfo', [libnbdUri(sock, 'disk', certs.client)])).toMatch(/with TLS/);
    const out = path.join(dir, 'copy.raw');
    await tool('nbdcopy', [libnbdUri(sock, 'disk', certs.client), out]);
    expectSame(fs.readFileSync(out), ref, 'nbdcopy of the TLS export');
    // and back: nbdcopy writes a pattern file into the export, qemu-img compares
    const src = path.join(dir, 'src.raw');
    const data = pattern(7, SIZE);
    fs.writeFileSync(src, data);
    await tool('nbdcopy', [src, libnbdUri(sock, 'disk', certs.client)]);
    ref.set(data);
    const back = new Uint8Array(SIZE);
    await import('../src/block/backend.js').then((b) => b.blkPread(img.backend, 0, back));
    expectSame(back, ref, 'the export after nbdcopy into it');
    const [obj, objText, imageOpts, nbdOpts] = qemuTlsArgs(certs.client, sock, 'disk') as [string, string, string, string];
    // --image-opts applies to both images
    const cmp = await toolStatus('qemu-img', ['compare', obj, objText, imageOpts, `driver=raw,file.driver=file,file.filename=${src}`, nbdOpts]);
    expect(cmp, cmp.stderr).toMatchObject({ code: 0 });
  });

  it('refuses a plaintext qemu-img with NBD_REP_ERR_TLS_REQD, and logs it', async () => {
    logs.length = 0;
    const r = await toolStatus('qemu-img', ['info', `nbd+unix:///disk?socket=${sock}`]);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/TLS negotiation required/);
    expect(r.stderr).toMatch(/not permitted before TLS/);
    await until(() => logs.some((l) => /without TLS; refused with NBD_REP_ERR_TLS_REQD/.test(l)));
  });

  it('keeps the forced-TLS option rules: TLS_REQD, STARTTLS with data, EXPORT_NAME, a second STARTTLS', async () => {
    const a = await rawHaggle(sock);
    a.s.write(P.encodeOption(P.NBD_OPT_LIST, Buffer.alloc(0)));
    expect(await optionReply(a.r)).toMatchObject({ option: P.NBD_OPT_LIST, type: P.NBD_REP_ERR_TLS_REQD });
    a.s.write(P.encodeOption(P.NBD_OPT_STARTTLS, Buffer.from([1])));
    expect(await optionReply(a.r)).toMatchObject({ option: P.NBD_OPT_STARTTLS, type: P.NBD_REP_ERR_INVALID });
    a.s.write(P.encodeOption(P.NBD_OPT_STARTTLS, Buffer.alloc(0)));
    expect(await optionReply(a.r)).toMatchObject({ option: P.NBD_OPT_STARTTLS, type: P.NBD_REP_ACK });
    a.r.detach();
    a.s.pause();
    const creds = certs.client;
    const t = tls.connect({ socket: a.s, ca: fs.readFileSync(path.join(creds, 'ca-cert.pem')), cert: fs.readFileSync(path.join(creds, 'client-cert.pem')), key: fs.readFileSync(path.join(creds, 'client-key.pem')), servername: 'localhost' });
    await new Promise<void>((resolve, reject) => {
      t.once('secureConnect', resolve);
      t.once('error', reject);
    });
    const tr = new SocketReader(t);
    t.write(P.encodeOption(P.NBD_OPT_STARTTLS, Buffer.alloc(0)));
    expect(await optionReply(tr)).toMatchObject({ option: P.NBD_OPT_STARTTLS, type: P.NBD_REP_ERR_INVALID, text: expect.stringMatching(/already/) });
    // inside TLS the export list is served
    t.write(P.encodeOption(P.NBD_OPT_LIST, Buffer.alloc(0)));
    expect(await optionReply(tr)).toMatchObject({ option: P.NBD_OPT_LIST, type: P.NBD_REP_SERVER });
    expect(await optionReply(tr)).toMatchObject({ type: P.NBD_REP_ACK });
    t.destroy();

    const b = await rawHaggle(sock);
    b.s.write(P.encodeOption(P.NBD_OPT_EXPORT_NAME, Buffer.from('disk')));
    await until(b.closed);
    expect(await b.r.read(1)).toBeNull();

    // ABORT before TLS is acknowledged
    const c = await rawHaggle(sock);
    c.s.write(P.encodeOption(P.NBD_OPT_ABORT, Buffer.alloc(0)));
    expect(await optionReply(c.r)).toMatchObject({ option: P.NBD_OPT_ABORT, type: P.NBD_REP_ACK });
    c.s.destroy();
  });

  it('closes only the connection that sends garbage after the STARTTLS ACK; a TLS client keeps reading', async () => {
    const good = await NbdClient.connect({ address: { type: 'unix', path: sock }, exportName: 'disk', tls: findTlsCreds('cli', 'client') });
    const reading = (async (): Promise<number> => {
      let n = 0;
      const buf = new Uint8Array(65536);
      for (let i = 0; i < 200; i++) {
        const off = (i * 65536) % SIZE;
        await good.read(off, buf);
        expectSame(buf, ref.subarray(off, off + 65536), `read ${i} during the garbage`);
        n++;
      }
      return n;
    })();
    logs.length = 0;
    const bad = await rawHaggle(sock);
    bad.s.write(P.encodeOption(P.NBD_OPT_STARTTLS, Buffer.alloc(0)));
    expect(await optionReply(bad.r)).toMatchObject({ type: P.NBD_REP_ACK });
    bad.r.detach();
    bad.s.write(Buffer.from('GET / HTTP/1.0\r\n\r\n this is not a ClientHello'.repeat(20)));
    await until(bad.closed);
    expect(await reading).toBe(200);
    await until(() => logs.some((l) => /TLS handshake failed/.test(l)));
    const after = new Uint8Array(4096);
    await good.read(SIZE - 4096, after);
    expectSame(after, ref.subarray(SIZE - 4096), 'read after the garbage connection');
    await good.close();
  });

  it('bounds the TLS handshake by the handshake timeout (a client silent after the ACK, or stalled in its ClientHello)', async () => {
    const slowLogs: string[] = [];
    const slow = new NbdServer({ exports: [{ name: 'disk', backend: img.backend }], maxConnections: 4, handshakeTimeoutMs: 300, log: (l) => slowLogs.push(l), tls: findTlsCreds('srv', 'server') });
    const s = path.join(dir, 'slow.sock');
    await slow.listen({ type: 'unix', path: s });
    try {
      const a = await rawHaggle(s);
      a.s.write(P.encodeOption(P.NBD_OPT_STARTTLS, Buffer.alloc(0)));
      expect(await optionReply(a.r)).toMatchObject({ type: P.NBD_REP_ACK });
      a.r.detach();
      const t0 = Date.now();
      // the first bytes of a TLS record header, then nothing
      a.s.write(Buffer.from([0x16, 0x03, 0x01]));
      await until(a.closed, 3000);
      expect(Date.now() - t0).toBeLessThan(2000);
      expect(slowLogs.some((l) => /handshake timed out/.test(l))).toBe(true);
      // a good client still gets in
      const c = await NbdClient.connect({ address: { type: 'unix', path: s }, exportName: 'disk', tls: findTlsCreds('cli', 'client') });
      const b = new Uint8Array(4096);
      await c.read(0, b);
      expectSame(b, ref.subarray(0, 4096), 'read through the slow-timeout server');
      await c.close();
    } finally {
      await slow.close();
    }
  });

  it('refuses a client certificate from another CA, and a client without a certificate', async () => {
    logs.length = 0;
    await expect(openImage(`driver=nbd,server.type=unix,server.path=${sock},export=disk,tls-creds=rogue`)).rejects.toMatchObject({ code: 'EIO', message: expect.stringMatching(/refuse the certificate of tls-creds 'rogue'/) });
    await until(() => logs.some((l) => /certificate was refused.*not signed by/.test(l)));
    await expect(openImage(`driver=nbd,server.type=unix,server.path=${sock},export=disk,tls-creds=nocert`)).rejects.toMatchObject({ code: 'EIO' });
    await until(() => logs.some((l) => /the client sent no certificate/.test(l)));
    // libnbd with the rogue certificate: refused too
    expect((await toolStatus('nbdinfo', [libnbdUri(sock, 'disk', certs.rogue)])).code).not.toBe(0);
  });

  it('over TCP our client checks the server name (the host, or tls-hostname); verify-peer=off takes clients without a certificate', async () => {
    addTlsCreds(loadTlsCredsX509({ id: 'srv-open', dir: certs.server, endpoint: 'server', 'verify-peer': 'off' }));
    const open = new NbdServer({ exports: [{ name: 'disk', backend: img.backend }], maxConnections: 4, tls: findTlsCreds('srv-open', 'server') });
    const bound = await open.listen({ type: 'inet', host: '127.0.0.1', port: 0 });
    if (typeof bound === 'string') throw new Error('not a TCP address');
    try {
      const at = `server.type=inet,server.host=127.0.0.1,server.port=${bound.port},export=disk`;
      // the certificate names IP:127.0.0.1 and localhost
      const a = await openImage(`driver=nbd,${at},tls-creds=nocert`, { readOnly: true });
      expectSame(await a.read(0, 65536), ref.subarray(0, 65536), 'read over TCP and TLS without a client certificate');
      await a.close();
      const b = await openImage(`driver=nbd,${at},tls-creds=cli,tls-hostname=localhost`, { readOnly: true });
      await b.close();
      await expect(openImage(`driver=nbd,${at},tls-creds=cli,tls-hostname=other.example`, { readOnly: true })).rejects.toMatchObject({
        code: 'EIO',
        message: expect.stringMatching(/TLS handshake with NBD server 127\.0\.0\.1:\d+.*failed:.*other\.example/),
      });
      // the server notices at once that the client hung up in mid-handshake (not at the timeout)
      await until(() => open.connectionCount === 0, 2000);
      // qemu-img over TCP, no client certificate
      const info = await toolStatus('qemu-img', ['info', '--object', `tls-creds-x509,id=tls0,dir=${certs.nocert},endpoint=client`, '--image-opts', `driver=nbd,${at},tls-creds=tls0`]);
      expect(info, info.stderr).toMatchObject({ code: 0 });
    } finally {
      await open.close();
    }
  });

  it('our client redoes the TLS handshake when it reconnects', async () => {
    const handshakes = vi.spyOn(tls, 'connect');
    const c = await NbdClient.connect({ address: { type: 'unix', path: sock }, exportName: 'disk', tls: findTlsCreds('cli', 'client'), reconnectDelaySec: 5 });
    const d = pattern(99, 8192);
    await c.write(MiB, d);
    ref.set(d, MiB);
    c.breakConnection('test: network gone');
    const back = new Uint8Array(8192);
    await c.read(MiB, back);
    expectSame(back, d, 'read after the reconnect');
    expect(c.connectionState).toBe('connected');
    // one TLS client handshake per connection
    expect(handshakes).toHaveBeenCalledTimes(2);
    handshakes.mockRestore();
    await c.close();
  });

  it('our client reads and writes qemu-nbd --tls-creds; without creds it gets a clear error', async () => {
    const file = path.join(dir, 'qnbd.raw');
    fs.writeFileSync(file, Buffer.alloc(4 * MiB));
    const s = path.join(dir, 'qnbd.sock');
    procs.push(await startServer('qemu-nbd', ['--object', `tls-creds-x509,id=tls0,dir=${certs.server},endpoint=server`, '--tls-creds', 'tls0', '-k', s, '-f', 'raw', '-x', 'q', '-t', file], s));
    const q = await openImage(`driver=nbd,server.type=unix,server.path=${s},export=q,tls-creds=cli`);
    const want = new Uint8Array(4 * MiB);
    const d = pattern(3, 3 * MiB + 7);
    await q.write(4097, d);
    want.set(d, 4097);
    await q.flush();
    expectSame(await q.read(0, 4 * MiB), want, 'read back from qemu-nbd over TLS');
    await q.close();
    expectSame(fs.readFileSync(file), want, 'the file qemu-nbd served');
    await expect(openImage(`driver=nbd,server.type=unix,server.path=${s},export=q`)).rejects.toMatchObject({
      code: 'ENOTSUP',
      message: expect.stringMatching(/requires TLS.*tls-creds=ID/),
    });
    // a plaintext qemu-nbd: a client that asks for TLS is told the server does not offer it
    const p = path.join(dir, 'plain.sock');
    procs.push(await startServer('qemu-nbd', ['-k', p, '-f', 'raw', '-x', 'q', '-t', '-r', file], p));
    await expect(openImage(`driver=nbd,server.type=unix,server.path=${p},export=q,tls-creds=cli`, { readOnly: true })).rejects.toMatchObject({
      code: 'ENOTSUP',
      message: expect.stringMatching(/refused NBD_OPT_STARTTLS.*does not offer TLS/),
    });
  });

  it('our client reads and writes qemu-storage-daemon --nbd-server tls-creds', async () => {
    const file = path.join(dir, 'qsd.qcow2');
    await tool('qemu-img', ['create', '-q', '-f', 'qcow2', file, '4M']);
    const s = path.join(dir, 'qsd.sock');
    const qsd = await startServer(
      'qemu-storage-daemon',
      [
        '--object',
        `tls-creds-x509,id=tls0,dir=${certs.server},endpoint=server`,
        '--blockdev',
        `driver=file,node-name=f,filename=${file}`,
        '--blockdev',
        'driver=qcow2,node-name=q,file=f',
        '--nbd-server',
        `addr.type=unix,addr.path=${s},tls-creds=tls0`,
        '--export',
        'type=nbd,id=e,node-name=q,name=qsd,writable=on',
      ],
      s,
    );
    procs.push(qsd);
    const q = await openImage(`driver=nbd,server.type=unix,server.path=${s},export=qsd,tls-creds=cli`);
    const d = pattern(5, 2 * MiB);
    await q.write(MiB, d);
    await q.flush();
    expectSame(await q.read(MiB, d.length), d, 'read back from qemu-storage-daemon over TLS');
    await q.close();
    await qsd.stop();
    const out = path.join(dir, 'qsd.raw');
    await tool('qemu-img', ['convert', '-O', 'raw', file, out]);
    expectSame(fs.readFileSync(out).subarray(MiB, 3 * MiB), d, 'the qcow2 image qemu-storage-daemon served');
  });

  it('names the missing file, the wrong endpoint and an unknown id', () => {
    const empty = path.join(dir, 'empty');
    fs.mkdirSync(empty, { recursive: true });
    fs.copyFileSync(path.join(certs.server, 'ca-cert.pem'), path.join(empty, 'ca-cert.pem'));
    expect(() => loadTlsCredsX509({ id: 'x', dir: empty, endpoint: 'server' })).toThrow(`Unable to access credentials ${path.join(empty, 'server-cert.pem')}: No such file or directory`);
    expect(() => loadTlsCredsX509({ id: 'x', dir: path.join(dir, 'nope'), endpoint: 'client' })).toThrow(/Unable to access credentials .*nope\/ca-cert\.pem/);
    expect(() => loadTlsCredsX509({ id: 'x', dir: certs.server, endpoint: 'server', bogus: '1' })).toThrow(/Property 'bogus' not found/);
    expect(() => findTlsCreds('cli', 'server')).toThrow(/Expected TLS credentials for a server endpoint/);
    expect(() => findTlsCreds('nope', 'client')).toThrow("No TLS credentials with id 'nope'");
    expect(() => new NbdServer({ exports: [], tls: findTlsCreds('cli', 'client') })).toThrow(/server endpoint/);
  });
});

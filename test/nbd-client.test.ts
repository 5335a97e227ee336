/**
 * The NBD client against a fake server in this process: requests pipelined and matched when the
 * server answers out of order; a server that sends garbage (in the handshake or in a reply)
 * makes the client fail with a clear EIO BlockError, never a hang or a V8 TypeError; a lost
 * connection is retried for reconnect-delay seconds and then fails saying why; and driver=nbd's
 * options and NBD file names are parsed as QEMU parses them.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { BlockError, openImage } from '../src/index.js';
import '../src/drivers/nbd/driver.js';
import { formatNbdUrl, parseNbdFilename } from '../src/drivers/nbd/url.js';
import { MAX_IN_FLIGHT, NbdClient } from '../src/nbd/client.js';
import { NBD_CMD_READ } from '../src/nbd/protocol.js';
import { startFakeServer, type FakeServer, type Misbehaviour } from './nbd-client-fake-server.js';
import { firstDifference, pattern } from './nbd-client-helpers.js';

let dir: string;
let servers: FakeServer[] = [];
let clients: NbdClient[] = [];
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-nbd-fake-'));
});
afterEach(async () => {
  for (const c of clients) await c.close();
  for (const s of servers) await s.stop().catch(() => undefined);
  clients = [];
  servers = [];
});
afterAll(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

let n = 0;
async function fake(misbehave: Misbehaviour = 'none', size = 1024 * 1024, data?: Uint8Array): Promise<FakeServer> {
  const s = await startFakeServer(path.join(dir, `fake-${n++}.sock`), size, misbehave, data);
  servers.push(s);
  return s;
}

async function connect(s: FakeServer, reconnectDelaySec = 0, connectTimeoutMs?: number): Promise<NbdClient> {
  const c = await NbdClient.connect({ address: { type: 'unix', path: s.socket }, exportName: 'e', reconnectDelaySec, ...(connectTimeoutMs === undefined ? {} : { connectTimeoutMs }) });
  clients.push(c);
  return c;
}

/** The promise's rejection, which must be an EIO BlockError (not a TypeError, not a hang). */
async function eio(p: Promise<unknown>, pattern: RegExp): Promise<BlockError> {
  const e = await p.then(
    () => null,
    (err: unknown) => err,
  );
  expect(e).toBeInstanceOf(BlockError);
  const be = e as BlockError;
  expect(be.code).toBe('EIO');
  expect(be.message).toMatch(pattern);
  expect(be.message).not.toMatch(/Cannot read properties|undefined|RangeError|TypeError/);
  return be;
}

describe('the NBD client and a well-behaved server', () => {
  it('pipelines requests and matches replies the server sends out of order (and chunks in any order)', async () => {
    const data = pattern(1, 1024 * 1024);
    const s = await fake('reverse-order', data.length, data.slice());
    const c = await connect(s);
    const offsets = [0, 4096, 100_000, 777_777];
    const bufs = offsets.map(() => new Uint8Array(5000));
    await Promise.all(offsets.map((o, i) => c.read(o, bufs[i] as Uint8Array)));
    offsets.forEach((o, i) => expect(firstDifference(bufs[i] as Uint8Array, data.subarray(o, o + 5000))).toBe(-1));
    expect(s.seen.filter((t) => t === NBD_CMD_READ)).toHaveLength(4);
  });

  it('keeps at most MAX_IN_FLIGHT requests on the wire and queues the rest in order', async () => {
    const data = pattern(8, 1024 * 1024);
    const s = await fake('none', data.length, data.slice());
    const c = await connect(s);
    const bufs = Array.from({ length: 200 }, () => new Uint8Array(512));
    const all = bufs.map((b, i) => c.read(i * 512, b));
    expect(c.inFlightCount).toBe(MAX_IN_FLIGHT);
    expect(c.queuedCount).toBe(200 - MAX_IN_FLIGHT);
    await Promise.all(all);
    bufs.forEach((b, i) => expect(firstDifference(b, data.subarray(i * 512, i * 512 + 512))).toBe(-1));
    expect(c.queuedCount).toBe(0);
  });

  it('splits a read at the maximum block size the server announced', async () => {
    const data = pattern(2, 4 * 1024 * 1024);
    const s = await fake('none', data.length, data.slice());
    const c = await connect(s);
    expect(c.maxPayloadBytes).toBe(1024 * 1024);
    const buf = new Uint8Array(3 * 1024 * 1024 + 5);
    await c.read(100, buf);
    expect(firstDifference(buf, data.subarray(100, 100 + buf.length))).toBe(-1);
    expect(s.seen.filter((t) => t === NBD_CMD_READ)).toHaveLength(4);
  });

  it('passes a server error chunk on as an error naming the request and the message, and keeps the connection', async () => {
    const s = await fake('error-chunk');
    const c = await connect(s);
    await eio(c.read(0, new Uint8Array(512)), /read of 512 bytes at offset 0 failed: EIO \(the disk is on fire\)/);
    s.misbehave = 'none';
    await c.read(0, new Uint8Array(512));
    expect(c.connectionState).toBe('connected');
  });

  it('falls back to NBD_OPT_EXPORT_NAME and simple replies on a server without NBD_OPT_GO and structured replies', async () => {
    const data = pattern(6, 1024 * 1024);
    const s = await fake('old-server', data.length, data.slice());
    const c = await connect(s);
    expect(c.info).toMatchObject({ sizeBytes: data.length, structuredReplies: false, baseAllocationId: null });
    const buf = new Uint8Array(70_000);
    await c.read(3, buf);
    expect(firstDifference(buf, data.subarray(3, 70_003))).toBe(-1);
    await c.write(5, pattern(7, 100));
    expect(firstDifference(s.data.subarray(5, 105), pattern(7, 100))).toBe(-1);
    expect(await c.blockStatus(0, 4096)).toBeNull();
  });

  it('says that the server requires TLS and names tls-creds (ENOTSUP)', async () => {
    const s = await fake('tls-required');
    await expect(connect(s)).rejects.toMatchObject({ code: 'ENOTSUP', message: expect.stringMatching(/requires TLS \(TLS required: TLS is required on this server\); give the nbd node tls-creds=ID/) });
  });

  it('refuses a write past the end of the export with ENOSPC (an export cannot grow)', async () => {
    const s = await fake();
    const c = await connect(s);
    await expect(c.write(1024 * 1024 - 10, new Uint8Array(20))).rejects.toMatchObject({ code: 'ENOSPC', message: expect.stringMatching(/cannot grow/) });
  });
});

describe('a server that answers garbage', () => {
  const cases: Array<[Misbehaviour, RegExp]> = [
    ['bad-reply-magic', /protocol error: bad reply magic 0xdeadbeef/],
    ['unknown-cookie', /protocol error: a reply for cookie \d+ that is not in flight/],
    ['chunk-past-request', /protocol error: a data chunk at offset 4096 .* past the request/],
    ['huge-error-chunk', /protocol error: an error chunk of 4294967280 bytes/],
    ['short-read', /protocol error: chunks covering 256 of 512 bytes/],
    ['close-on-request', /connection lost: the (server closed|connection closed)/],
  ];
  for (const [m, re] of cases) {
    it(`fails the request with EIO when the server sends ${m}, and later requests too`, async () => {
      const s = await fake(m);
      const c = await connect(s);
      const e = await eio(c.read(0, new Uint8Array(512)), re);
      expect(e.message).toMatch(/NBD server unix:.*export 'e'.*reconnect-delay=0/);
      await eio(c.read(0, new Uint8Array(512)), /connection lost/);
    });
  }

  it('fails with EIO when a data chunk is longer than the read, without reading it', async () => {
    const s = await fake('oversized-data-chunk');
    const c = await connect(s);
    await eio(c.read(0, new Uint8Array(512)), /protocol error: a data chunk of 2147483632 bytes in the reply to read of 512 bytes/);
  });

  it('fails with EIO when block status names a meta context that was not agreed', async () => {
    const s = await fake('wrong-context');
    const c = await connect(s);
    await eio(c.blockStatus(0, 4096), /block status for meta context 8, which was not agreed/);
  });

  it('fails with EIO when a flush gets a data chunk', async () => {
    const s = await fake('structured-reply-to-nothing');
    const c = await connect(s);
    await eio(c.flush(), /protocol error: a data chunk in the reply to flush/);
  });

  it('fails every request in flight when the connection breaks, not only the one that broke it', async () => {
    const s = await fake('bad-reply-magic');
    const c = await connect(s);
    const all = [0, 1, 2, 3].map((i) => c.read(i * 512, new Uint8Array(512)).then(() => 'ok', (e: unknown) => e));
    for (const r of await Promise.all(all)) expect(r).toMatchObject({ code: 'EIO' });
  });

  const handshakeCases: Array<[Misbehaviour, RegExp]> = [
    ['bad-greeting', /NBD handshake with unix:.* failed: not an NBD server/],
    ['huge-option-reply', /an option reply of 2147483647 bytes \(at most 65536 accepted\)/],
    ['go-without-export-info', /NBD_OPT_GO succeeded without NBD_INFO_EXPORT/],
    ['bad-block-size', /minimum block size 3000 is not a power of 2/],
  ];
  for (const [m, re] of handshakeCases) {
    it(`refuses the export when the handshake holds ${m}`, async () => {
      const s = await fake(m);
      await eio(connect(s), re);
    });
  }

  it('gives up on a server that never finishes the handshake, after the connect timeout', async () => {
    const s = await fake('silent-handshake');
    await eio(connect(s, 0, 300), /no answer within 300 ms/);
  });

  it('reports through driver=nbd: open refuses garbage with EIO naming the server', async () => {
    const s = await fake('bad-greeting');
    await expect(openImage(`driver=nbd,server.type=unix,server.path=${s.socket}`)).rejects.toMatchObject({ code: 'EIO', message: expect.stringMatching(/not an NBD server/) });
  });
});

describe('reconnect-delay', () => {
  it('waits for the server to come back and then completes the requests', async () => {
    const data = pattern(3, 1024 * 1024);
    const s = await fake('none', data.length, data);
    const c = await connect(s, 5);
    c.breakConnection('test: cable pulled');
    s.dropConnections();
    const buf = new Uint8Array(4096);
    const r = c.read(8192, buf);
    await r;
    expect(firstDifference(buf, data.subarray(8192, 8192 + 4096))).toBe(-1);
    expect(c.connectionState).toBe('connected');
  });

  it('keeps requests waiting while the server is away and sends them once it is back', async () => {
    const data = pattern(4, 1024 * 1024);
    const s = await fake('none', data.length, data);
    const c = await connect(s, 5);
    await s.stop();
    c.breakConnection('test: server gone');
    const buf = new Uint8Array(4096);
    const r = c.read(0, buf);
    await new Promise((res) => setTimeout(res, 300));
    expect(c.connectionState).toBe('reconnecting');
    const back = await startFakeServer(s.socket, data.length, 'none', data);
    servers.push(back);
    await r;
    expect(firstDifference(buf, data.subarray(0, 4096))).toBe(-1);
  });

  it('fails waiting and new requests with EIO once the delay has passed, saying why the connection was lost', async () => {
    const s = await fake();
    const c = await connect(s, 1);
    await s.stop();
    c.breakConnection('test: server gone');
    const t0 = Date.now();
    await eio(c.read(0, new Uint8Array(512)), /connection lost: test: server gone.*not reconnected within reconnect-delay=1 s/);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(900);
    await eio(c.read(0, new Uint8Array(512)), /not reconnected within reconnect-delay=1 s/);
    expect(c.connectionState).toBe('failed');
  });

  it('fails at once without reconnect-delay', async () => {
    const s = await fake();
    const c = await connect(s, 0);
    c.breakConnection('test: cable pulled');
    await eio(c.read(0, new Uint8Array(512)), /connection lost: test: cable pulled \(reconnect-delay=0: no reconnect\)/);
  });

  it('open-timeout tries the first connection again until the server listens', async () => {
    const sockPath = path.join(dir, 'late.sock');
    const late = new Promise<FakeServer>((resolve) => setTimeout(() => void startFakeServer(sockPath, 65536).then(resolve), 400));
    const img = await openImage(`driver=nbd,server.type=unix,server.path=${sockPath},open-timeout=10`);
    servers.push(await late);
    expect(img.size).toBe(65536);
    await img.close();
  });

  it('open-timeout gives up after its time with EIO saying so', async () => {
    const t0 = Date.now();
    await expect(openImage(`driver=nbd,server.type=unix,server.path=${path.join(dir, 'never.sock')},open-timeout=1`)).rejects.toMatchObject({
      code: 'EIO',
      message: expect.stringMatching(/Failed to connect.*still failing after open-timeout=1 s/),
    });
    expect(Date.now() - t0).toBeGreaterThanOrEqual(500);
  });

  it('stops retrying when the server comes back with a different export', async () => {
    const s = await fake('none', 1024 * 1024);
    const c = await connect(s, 5);
    await s.stop();
    const other = await startFakeServer(s.socket, 2 * 1024 * 1024);
    servers.push(other);
    c.breakConnection('test: server restarted');
    await eio(c.read(0, new Uint8Array(512)), /different export \(size 2097152 instead of 1048576\)/);
  });
});

describe('driver=nbd options and NBD file names', () => {
  it('parses nbd://, nbd+tcp://, nbd+unix:// and the legacy nbd: forms as QEMU does', () => {
    expect(parseNbdFilename('nbd://localhost/disk')).toEqual({ address: { type: 'inet', host: 'localhost', port: 10809 }, exportName: 'disk' });
    expect(parseNbdFilename('nbd+tcp://10.0.0.1:1234/a%20b')).toEqual({ address: { type: 'inet', host: '10.0.0.1', port: 1234 }, exportName: 'a b' });
    expect(parseNbdFilename('nbd://[::1]:99')).toEqual({ address: { type: 'inet', host: '::1', port: 99 }, exportName: '' });
    expect(parseNbdFilename('nbd+unix:///exp?socket=/tmp/s.sock')).toEqual({ address: { type: 'unix', path: '/tmp/s.sock' }, exportName: 'exp' });
    expect(parseNbdFilename('nbd:unix:/tmp/s:exportname=x')).toEqual({ address: { type: 'unix', path: '/tmp/s' }, exportName: 'x' });
    expect(parseNbdFilename('nbd:host:10810')).toEqual({ address: { type: 'inet', host: 'host', port: 10810 }, exportName: '' });
    expect(formatNbdUrl(parseNbdFilename('nbd+unix:///e?socket=/s'))).toBe('nbd+unix:///e?socket=/s');
    expect(formatNbdUrl(parseNbdFilename('nbd://h/e'))).toBe('nbd://h:10809/e');
  });

  it('refuses broken NBD file names with EINVAL saying what is wrong', () => {
    expect(() => parseNbdFilename('nbd+unix:///e')).toThrow(/needs '\?socket=PATH'/);
    expect(() => parseNbdFilename('nbd+unix://host/e?socket=/s')).toThrow(/takes no host/);
    expect(() => parseNbdFilename('nbd://h:99999/e')).toThrow(/port '99999'/);
    expect(() => parseNbdFilename('nbd://h/e?socket=/s')).toThrow(/takes no query/);
    expect(() => parseNbdFilename('nbd:///e')).toThrow(/no host/);
  });

  it("refuses an unknown tls-creds id, unknown options and a server.type without its address", async () => {
    await expect(openImage('driver=nbd,server.type=unix,server.path=/x,tls-creds=tls0')).rejects.toMatchObject({ code: 'ENOENT', message: expect.stringMatching(/No TLS credentials with id 'tls0'.*tls-creds/) });
    await expect(openImage('driver=nbd,server.type=unix')).rejects.toMatchObject({ code: 'EINVAL', message: expect.stringMatching(/server.path/) });
    await expect(openImage('driver=nbd,server.type=inet')).rejects.toMatchObject({ code: 'EINVAL', message: expect.stringMatching(/server.host/) });
    await expect(openImage('driver=nbd,server.type=vsock')).rejects.toMatchObject({ code: 'EINVAL' });
    await expect(openImage('driver=nbd,server.type=unix,server.path=/x,bogus=1')).rejects.toMatchObject({ code: 'EINVAL', message: expect.stringMatching(/bogus/) });
    await expect(openImage('driver=nbd,server.type=unix,server.path=/x,reconnect-delay=-1')).rejects.toMatchObject({ code: 'EINVAL', field: 'reconnect-delay' });
    await expect(openImage('driver=nbd,filename=nbd://h/e,export=x')).rejects.toMatchObject({ code: 'EINVAL', message: expect.stringMatching(/cannot be combined/) });
  });

  it('fails to open with EIO naming the server when nothing listens', async () => {
    await expect(openImage(`driver=nbd,server.type=unix,server.path=${path.join(dir, 'nobody.sock')}`)).rejects.toMatchObject({
      code: 'EIO',
      message: expect.stringMatching(/Failed to connect to '.*nobody.sock': No such file or directory/),
    });
  });

  it('serves an image through driver=nbd: writes reach the server, reads come back, block status reports zeros', async () => {
    const s = await fake('none', 1024 * 1024);
    const img = await openImage(`driver=nbd,filename=nbd+unix:///e?socket=${s.socket}`);
    const d = pattern(5, 10_000);
    await img.write(3, d);
    expect(firstDifference(s.data.subarray(3, 10_003), d)).toBe(-1);
    expect(firstDifference(await img.read(3, 10_000), d)).toBe(-1);
    await img.flush();
    await img.close();
    expect(s.seen.at(-1)).toBe(2); // NBD_CMD_DISC on close
  });
});

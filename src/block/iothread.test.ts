import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import '../drivers/index.js';
import { createRawFile } from '../drivers/index.js';
import { withBql, withBqlSync } from './bql.js';
import { BlockError } from './errors.js';
import { closeNode, listNodes, openNode } from './graph.js';
import { bdrvPread, bdrvPwrite, bdrvPwriteZeroes } from './io.js';
import { spawnSync } from 'node:child_process';
import { crashIOThreadForTesting, createIOThread, destroyIOThread, findIOThread, listIOThreads, shutdownIOThreads, submitRead, submitWrite, submitWriteZeroes, type IOThread } from './iothread.js';
import type { BlockNode } from './node.js';

let dir: string;
let fileCounter = 0;

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-iothread-'));
});

afterEach(async () => {
  await withBql(async (bql) => {
    for (let round = 0; round < 10 && listNodes(bql).length > 0; round++) {
      for (const node of listNodes(bql)) if (node.parents.size === 0) await closeNode(bql, node);
    }
  });
});

afterAll(async () => {
  await withBql((bql) => shutdownIOThreads(bql));
  fs.rmSync(dir, { recursive: true, force: true });
});

function tempFile(size: number): string {
  const p = path.join(dir, `f${fileCounter++}.img`);
  withBqlSync((bql) => createRawFile(bql, p, size));
  return p;
}

/** The 512-byte block number `k` of a test: every byte holds a value derived from k and the seed. */
function block(k: number, seed: number, size = 512): Uint8Array {
  return Uint8Array.from({ length: size }, (_, i) => (k * 7 + i * 13 + seed) & 0xff);
}

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && Buffer.from(a.buffer, a.byteOffset, a.length).equals(Buffer.from(b.buffer, b.byteOffset, b.length));
}

async function rejection(p: Promise<unknown> | (() => unknown)): Promise<BlockError> {
  try {
    await (typeof p === 'function' ? p() : p);
  } catch (e) {
    expect(e).toBeInstanceOf(BlockError);
    return e as BlockError;
  }
  throw new Error('expected a BlockError');
}

/** Remembers whether a promise has settled, without awaiting it. */
function tracked<T>(p: Promise<T>): { p: Promise<T>; settled: () => boolean } {
  let done = false;
  const q = p.finally(() => {
    done = true;
  });
  q.catch(() => {});
  return { p: q, settled: () => done };
}

async function openFileNode(p: string, iothread?: string): Promise<BlockNode> {
  const io = iothread === undefined ? '' : `,iothread=${iothread}`;
  return withBql((bql) => openNode(bql, `driver=file,filename=${p}${io}`));
}

describe('createIOThread', () => {
  it('creates a named IOThread that findIOThread and listIOThreads see', async () => {
    await withBql((bql) => {
      const t = createIOThread(bql, 'io-create');
      expect(t.id).toBe('io-create');
      expect(t.pending).toBe(0);
      expect(findIOThread(bql, 'io-create')).toBe(t);
      expect(listIOThreads(bql)).toContain(t);
    });
  });

  it('refuses a duplicate id with EINVAL and keeps the first IOThread', async () => {
    await withBql((bql) => {
      const t = createIOThread(bql, 'io-dup');
      let err: unknown;
      try {
        createIOThread(bql, 'io-dup');
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(BlockError);
      expect((err as BlockError).code).toBe('EINVAL');
      expect((err as BlockError).message).toContain("'io-dup'");
      expect(findIOThread(bql, 'io-dup')).toBe(t);
    });
  });

  it('refuses a malformed id with EINVAL naming it', async () => {
    await withBql(async (bql) => {
      for (const bad of ['', '0io', '-io', 'io 0', 'io/0', 'io,0', 'ïo']) {
        const err = await rejection(() => createIOThread(bql, bad));
        expect(err.code).toBe('EINVAL');
        expect(err.field).toBe('id');
        expect(err.message).toContain(`'${bad}'`);
      }
      expect(listIOThreads(bql).map((t) => t.id)).not.toContain('');
    });
  });

  it('refuses to find an IOThread that does not exist with ENOENT', async () => {
    await withBql(async (bql) => {
      const err = await rejection(() => findIOThread(bql, 'io-none'));
      expect(err.code).toBe('ENOENT');
      expect(err.message).toContain("'io-none'");
    });
  });
});

describe('transfers on an IOThread', () => {
  it('completes many concurrent writes and reads with the right data', async () => {
    const p = tempFile(0);
    await withBql((bql) => createIOThread(bql, 'io-many'));
    const node = await openFileNode(p, 'io-many');
    const t = node.ioThread as IOThread;
    expect(t.id).toBe('io-many');
    const n = 1000;
    const writes = Array.from({ length: n }, (_, k) => bdrvPwrite(node, k * 512, block(k, 1)));
    expect(t.pending).toBeGreaterThan(0);
    await Promise.all(writes);
    expect(t.pending).toBe(0);
    expect(node.inFlight).toBe(0);
    // half the reads into shared memory, half into ordinary buffers, all at once, in scrambled order
    const sab = new SharedArrayBuffer(n * 512);
    const bufs = Array.from({ length: n }, (_, k) => (k % 2 === 0 ? new Uint8Array(sab, k * 512, 512) : new Uint8Array(512)));
    const order = Array.from({ length: n }, (_, i) => (i * 389) % n);
    await Promise.all(order.map((k) => bdrvPread(node, k * 512, bufs[k] as Uint8Array)));
    for (let k = 0; k < n; k++) expect(sameBytes(bufs[k] as Uint8Array, block(k, 1)), `block ${k}`).toBe(true);
    const onDisk = new Uint8Array(fs.readFileSync(p));
    expect(onDisk.length).toBe(n * 512);
    for (let k = 0; k < n; k++) expect(sameBytes(onDisk.subarray(k * 512, k * 512 + 512), block(k, 1)), `disk block ${k}`).toBe(true);
  });

  it('completes interleaved reads, writes and write-zeroes of different sizes with the right data', async () => {
    const p = tempFile(256 * 1024);
    await withBql((bql) => createIOThread(bql, 'io-mixed'));
    const node = await openFileNode(p, 'io-mixed');
    const sizes = [1, 512, 4096, 65536, 7, 3000];
    const regions = sizes.map((size, i) => ({ offset: i * 65536 + 100, size }));
    // first round: fill every region
    await Promise.all(regions.map((r, i) => bdrvPwrite(node, r.offset, block(i, 5, r.size))));
    // second round, concurrently: read back even regions, zero odd regions
    const reads = regions.map((r) => new Uint8Array(r.size));
    await Promise.all(
      regions.map((r, i) => (i % 2 === 0 ? bdrvPread(node, r.offset, reads[i] as Uint8Array) : bdrvPwriteZeroes(node, r.offset, r.size))),
    );
    for (let i = 0; i < regions.length; i += 2) expect(sameBytes(reads[i] as Uint8Array, block(i, 5, sizes[i]))).toBe(true);
    const onDisk = new Uint8Array(fs.readFileSync(p));
    regions.forEach((r, i) => {
      const got = onDisk.subarray(r.offset, r.offset + r.size);
      if (i % 2 === 0) expect(sameBytes(got, block(i, 5, r.size))).toBe(true);
      else expect(got.every((b) => b === 0)).toBe(true);
    });
  });

  it('runs overlapping writes to one IOThread in submission order, so the last one wins', async () => {
    const p = tempFile(4096);
    await withBql((bql) => createIOThread(bql, 'io-order'));
    const node = await openFileNode(p, 'io-order');
    // 300 writes to the same sector, more than several batches' worth, none awaited before the next
    const writes = Array.from({ length: 300 }, (_, i) => bdrvPwrite(node, 512, new Uint8Array(512).fill(i & 0xff)));
    await Promise.all(writes);
    const back = new Uint8Array(512);
    await bdrvPread(node, 512, back);
    expect(back.every((b) => b === (299 & 0xff))).toBe(true);
  });

  it('reports a failing transfer as a BlockError naming the request, and keeps serving others', async () => {
    await withBql((bql) => createIOThread(bql, 'io-fail'));
    const t = await withBql((bql) => findIOThread(bql, 'io-fail'));
    // an fd that is not open: the worker's pread fails with EBADF, reported as EIO
    const bad = submitRead(t, 1_000_000, new Uint8Array(512), 0, "read 'nowhere'");
    const p = tempFile(4096);
    const fd = fs.openSync(p, 'r+');
    try {
      const good = submitWrite(t, fd, new Uint8Array(512).fill(0x61), 0, "write 'somewhere'");
      const err = await rejection(bad);
      expect(err.code).toBe('EIO');
      expect(err.message).toContain("read 'nowhere'");
      expect(await good).toBe(512);
      expect(fs.readFileSync(p)[0]).toBe(0x61);
      expect(t.pending).toBe(0);
    } finally {
      fs.closeSync(fd);
    }
  });

  it('completes a zero-length transfer that shares its batch with a non-empty staged one', async () => {
    await withBql((bql) => createIOThread(bql, 'io-zero-shared'));
    const t = await withBql((bql) => findIOThread(bql, 'io-zero-shared'));
    const p = tempFile(4096);
    const fd = fs.openSync(p, 'r');
    try {
      const results = await Promise.all([submitRead(t, fd, new Uint8Array(16), 0, 'r16'), submitRead(t, fd, new Uint8Array(0), 0, 'r0')]);
      expect(results).toEqual([16, 0]);
    } finally {
      fs.closeSync(fd);
    }
  });

  // Regression (was a bug, now fixed) (src/block/iothread.ts:128-131 with :182-183; src/block/iothread-worker.js:114-121): a batch
  // whose only staged (non-shared) requests are zero-length gets no staging buffer at all
  // (stagingBytes is 0), and the worker fails those requests with errno 14 (EFAULT) -> EIO.
  it('completes a lone zero-length read from an ordinary buffer', async () => {
    await withBql((bql) => createIOThread(bql, 'io-zero'));
    const t = await withBql((bql) => findIOThread(bql, 'io-zero'));
    const p = tempFile(4096);
    const fd = fs.openSync(p, 'r');
    try {
      expect(await submitRead(t, fd, new Uint8Array(0), 0, 'r0')).toBe(0);
    } finally {
      fs.closeSync(fd);
    }
  });

  it('lets destroyIOThread finish the pending requests first', async () => {
    const p = tempFile(0);
    await withBql((bql) => createIOThread(bql, 'io-destroy'));
    const node = await openFileNode(p, 'io-destroy');
    const writes = Array.from({ length: 100 }, (_, k) => tracked(bdrvPwrite(node, k * 512, block(k, 3))));
    await withBql(async (bql) => {
      await destroyIOThread(bql, node.ioThread as IOThread);
      expect(writes.every((w) => w.settled())).toBe(true);
      expect(listIOThreads(bql).map((t) => t.id)).not.toContain('io-destroy');
    });
    await Promise.all(writes.map((w) => w.p));
    const onDisk = new Uint8Array(fs.readFileSync(p));
    for (let k = 0; k < 100; k++) expect(sameBytes(onDisk.subarray(k * 512, k * 512 + 512), block(k, 3))).toBe(true);
  });
});

describe('the request ring', () => {
  it('queues requests beyond the ring\'s 256 slots and runs all 1000 in submission order', async () => {
    const p = tempFile(0);
    await withBql((bql) => createIOThread(bql, 'io-ring-full'));
    const node = await openFileNode(p, 'io-ring-full');
    // every block is written twice, the second time 500 requests later: the second must win
    const first = Array.from({ length: 500 }, (_, k) => bdrvPwrite(node, k * 512, block(k, 1)));
    const second = Array.from({ length: 500 }, (_, k) => bdrvPwrite(node, k * 512, block(k, 2)));
    await Promise.all([...first, ...second]);
    const onDisk = new Uint8Array(fs.readFileSync(p));
    for (let k = 0; k < 500; k++) expect(sameBytes(onDisk.subarray(k * 512, k * 512 + 512), block(k, 2)), `block ${k}`).toBe(true);
    expect(node.inFlight).toBe(0);
  });

  it('works with polling off (poll-max-ns=0): every completion wakes the main loop', async () => {
    const p = tempFile(0);
    await withBql((bql) => createIOThread(bql, 'io-no-poll', { pollMaxNs: 0 }));
    const node = await openFileNode(p, 'io-no-poll');
    for (let k = 0; k < 50; k++) await bdrvPwrite(node, k * 512, block(k, 4)); // one at a time: sleeps and wake-ups
    await Promise.all(Array.from({ length: 50 }, (_, k) => bdrvPwrite(node, (50 + k) * 512, block(50 + k, 4))));
    const back = new Uint8Array(100 * 512);
    await bdrvPread(node, 0, back);
    for (let k = 0; k < 100; k++) expect(sameBytes(back.subarray(k * 512, k * 512 + 512), block(k, 4)), `block ${k}`).toBe(true);
  });

  it('refuses a poll window that is not a non-negative integer, naming poll-max-ns', async () => {
    await withBql(async (bql) => {
      for (const bad of [-1, 1.5, Number.NaN]) {
        const e = await rejection(() => createIOThread(bql, 'io-bad-poll', { pollMaxNs: bad }));
        expect(e.code).toBe('EINVAL');
        expect(e.message).toContain('poll-max-ns');
      }
      expect(listIOThreads(bql).map((t) => t.id)).not.toContain('io-bad-poll');
    });
  });

  it('fails the in-flight requests of a crashed worker with EIO and serves later ones on a new worker', async () => {
    const devNull = fs.openSync('/dev/null', 'w');
    const t = await withBql((bql) => createIOThread(bql, 'io-crash'));
    try {
      // 1 TiB of zeros to /dev/null: a million 1 MiB writes, so the worker is still busy when it dies
      const busy = tracked(submitWriteZeroes(t, devNull, 2 ** 40, 0, 'write-zeroes to /dev/null'));
      await crashIOThreadForTesting(t);
      const e = await rejection(busy.p);
      expect(e.code).toBe('EIO');
      expect(e.message).toContain('write-zeroes to /dev/null');
      const p = tempFile(0);
      const node = await openFileNode(p, 'io-crash');
      await bdrvPwrite(node, 0, block(0, 6));
      const back = new Uint8Array(512);
      await bdrvPread(node, 0, back);
      expect(sameBytes(back, block(0, 6))).toBe(true);
    } finally {
      fs.closeSync(devNull);
    }
  });

  it('lets a process that forgot shutdownIOThreads exit once its requests are done', () => {
    const script = `
      const { openImage } = await import(${JSON.stringify(new URL('../../dist/index.js', import.meta.url).href)});
      const img = await openImage(${JSON.stringify(tempFile(65536))}, { format: 'raw' });
      await img.write(0, new Uint8Array(4096).fill(7));
      const back = await img.read(0, 4096);
      await img.close();
      console.log(back.every((b) => b === 7) ? 'ok' : 'bad');`;
    const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8', timeout: 60_000 });
    expect(r.error, 'the process did not exit').toBeUndefined();
    expect(r.stderr).toBe('');
    expect(r.stdout.trim()).toBe('ok');
    expect(r.status).toBe(0);
  });
});

describe('shutdownIOThreads', () => {
  it('waits for 200 pending writes on an IOThread before it returns', async () => {
    const p = tempFile(0);
    await withBql((bql) => createIOThread(bql, 'io-shut'));
    const node = await openFileNode(p, 'io-shut');
    const writes = Array.from({ length: 200 }, (_, k) => tracked(bdrvPwrite(node, k * 512, block(k, 9))));
    expect(writes.some((w) => w.settled())).toBe(false);
    await withBql((bql) => shutdownIOThreads(bql));
    expect(writes.every((w) => w.settled())).toBe(true);
    const results = await Promise.allSettled(writes.map((w) => w.p));
    expect(results.every((r) => r.status === 'fulfilled')).toBe(true);
    const onDisk = new Uint8Array(fs.readFileSync(p));
    expect(onDisk.length).toBe(200 * 512);
    for (let k = 0; k < 200; k++) expect(sameBytes(onDisk.subarray(k * 512, k * 512 + 512), block(k, 9)), `block ${k}`).toBe(true);
    expect(node.inFlight).toBe(0);
  });

  it('waits for 200 pending writes on the default pool before it returns', async () => {
    const p = tempFile(0);
    const node = await openFileNode(p);
    expect(node.ioThread).toBeNull();
    const writes = Array.from({ length: 200 }, (_, k) => tracked(bdrvPwrite(node, k * 512, block(k, 17))));
    await withBql((bql) => shutdownIOThreads(bql));
    expect(writes.every((w) => w.settled())).toBe(true);
    await Promise.all(writes.map((w) => w.p));
    const onDisk = new Uint8Array(fs.readFileSync(p));
    for (let k = 0; k < 200; k++) expect(sameBytes(onDisk.subarray(k * 512, k * 512 + 512), block(k, 17)), `block ${k}`).toBe(true);
  });

  it('is idempotent', async () => {
    await withBql((bql) => shutdownIOThreads(bql));
    await withBql((bql) => shutdownIOThreads(bql));
    await withBql((bql) => expect(listIOThreads(bql)).toEqual([]));
  });

  it('restarts the default pool for requests made after it', async () => {
    const p = tempFile(8192);
    const node = await openFileNode(p);
    await bdrvPwrite(node, 0, new Uint8Array(512).fill(1));
    await withBql((bql) => shutdownIOThreads(bql));
    await bdrvPwrite(node, 512, new Uint8Array(512).fill(2));
    const back = new Uint8Array(1024);
    await bdrvPread(node, 0, back);
    expect(back.subarray(0, 512).every((b) => b === 1)).toBe(true);
    expect(back.subarray(512).every((b) => b === 2)).toBe(true);
  });

  it('forgets the named IOThreads: their ids can be created again, and nodes still bound to a stopped one get EIO', async () => {
    const p = tempFile(8192);
    await withBql((bql) => createIOThread(bql, 'io-gone'));
    const node = await openFileNode(p, 'io-gone');
    await bdrvPwrite(node, 0, new Uint8Array(512).fill(5));
    await withBql((bql) => shutdownIOThreads(bql));
    await withBql(async (bql) => {
      expect((await rejection(() => findIOThread(bql, 'io-gone'))).code).toBe('ENOENT');
      const again = createIOThread(bql, 'io-gone');
      expect(again).not.toBe(node.ioThread);
    });
    const err = await rejection(bdrvPread(node, 0, new Uint8Array(512)));
    expect(err.code).toBe('EIO');
    expect(err.message).toContain("'io-gone'");
    expect(err.message).toMatch(/shut down/);
    expect(node.inFlight).toBe(0);
    // what was written before the shutdown is on disk
    expect(fs.readFileSync(p)[0]).toBe(5);
    // a node opened on the new IOThread of the same name works (locking=off: the first node still holds the image's lock)
    const fresh = await withBql((bql) => openNode(bql, `driver=file,filename=${p},iothread=io-gone,locking=off`));
    const back = new Uint8Array(512);
    await bdrvPread(fresh, 0, back);
    expect(back.every((b) => b === 5)).toBe(true);
  });
});

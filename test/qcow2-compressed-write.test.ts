/**
 * Compressed qcow2 writes (qemu-img convert -c): the descriptor layout, the byte allocator that
 * packs several compressed clusters into one host cluster, interop with qemu-img (its check is
 * clean, it reads what was written, its own convert -c images read and rewrite), the refusal of
 * already allocated clusters, and power cuts at every write and flush of a compressed run.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { blkPwriteCompressed } from '../src/block/backend.js';
import { withBql } from '../src/block/bql.js';
import { withDrained } from '../src/block/drain.js';
import { closeNode, openNode } from '../src/block/graph.js';
import { imgConvert } from '../src/cli/img-convert.js';
import { compressCluster, compressedDescriptor } from '../src/drivers/qcow2/compressed-write.js';
import { createQcow2OnNode } from '../src/drivers/qcow2/create.js';
import { compressedExtent } from '../src/drivers/qcow2/entries.js';
import { openImage, type Image } from '../src/image.js';
import { armCrash, crashDisk, crashImages, createCrashDisk, persistedBytes } from './helpers/crash-driver.js';
import { describeInterop, qemu, qemuStatus } from './helpers/qemu.js';

const KiB = 1024;
const MiB = 1024 * KiB;
let dir = '';

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-cwrite-'));
});
afterAll(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

/** A cluster that compresses well (text-like) or not at all (random), by a seed. */
function clusterData(size: number, seed: number, compressible: boolean): Uint8Array {
  if (!compressible) return new Uint8Array(crypto.randomBytes(size));
  const b = new Uint8Array(size);
  const word = `cluster ${seed} says hello; `;
  for (let i = 0; i < size; i++) b[i] = word.charCodeAt(i % word.length);
  return b;
}

function silent(): (s: string) => void {
  return () => undefined;
}

async function convert(args: string[]): Promise<{ status: number; err: string[] }> {
  const err: string[] = [];
  const status = await imgConvert(args, silent(), (l) => err.push(l), silent());
  return { status, err };
}

it('encodes descriptors that the reader decodes to the same bytes', () => {
  for (const bits of [9, 12, 16, 21]) {
    for (const [off, size] of [
      [512, 100],
      [70000, 1],
      [3 * 2 ** bits - 7, 2 ** (bits - 1)],
      [2 ** 40 + 513, 2 ** bits - 2],
    ] as const) {
      if (size > 2 ** bits) continue;
      const d = compressedDescriptor(off, size, bits);
      const e = compressedExtent(d.hi, d.lo, bits);
      expect(e.offset).toBe(off);
      // the reader takes whole sectors from the offset: it covers the fragment, ends in its last sector
      expect(e.offset + e.bytes).toBeGreaterThanOrEqual(off + size);
      expect(e.offset + e.bytes - (off + size)).toBeLessThan(512);
    }
  }
});

it('leaves a cluster that does not shrink to a normal write', () => {
  expect(compressCluster(crypto.randomBytes(65536), 65536)).toBeNull();
  expect(compressCluster(new Uint8Array(65536), 65536)?.length).toBeLessThan(100);
});

describeInterop('compressed writes against qemu-img', () => {
  /** A source image: compressible clusters, random ones, zeros, an allocated zero cluster, a short tail. */
  function makeSource(name: string, size: number): string {
    const f = path.join(dir, name);
    qemu('qemu-img', ['create', '-f', 'qcow2', f, String(size)]);
    const raw = path.join(dir, `${name}.raw`);
    const b = new Uint8Array(size);
    for (let c = 0; c * 64 * KiB < size; c++) {
      const kind = c % 5;
      const n = Math.min(64 * KiB, size - c * 64 * KiB);
      if (kind === 0 || kind === 1) b.set(clusterData(n, c, true), c * 64 * KiB);
      else if (kind === 2) b.set(crypto.randomBytes(n), c * 64 * KiB);
    }
    fs.writeFileSync(raw, b);
    qemu('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, f]);
    return f;
  }

  for (const variant of [
    { label: '64 KiB clusters', tag: 'c64k', o: [] as string[] },
    { label: '4 KiB clusters', tag: 'c4k', o: ['-o', 'cluster_size=4k'] },
    { label: '1-bit refcounts', tag: 'rc1', o: ['-o', 'refcount_bits=1'] },
    { label: 'compat=0.10', tag: 'v2', o: ['-o', 'compat=0.10'] },
  ]) {
    it(`convert -c (${variant.label}): qemu-img check clean, compare identical, smaller than without -c`, async () => {
      const src = makeSource(`src-${variant.tag}.qcow2`, 3 * MiB + 5000);
      const packed = path.join(dir, `c-${variant.tag}.qcow2`);
      const plain = path.join(dir, `p-${variant.tag}.qcow2`);
      expect(await convert(['-c', '-O', 'qcow2', ...variant.o, src, packed])).toEqual({ status: 0, err: [] });
      expect(await convert(['-O', 'qcow2', ...variant.o, src, plain])).toEqual({ status: 0, err: [] });
      expect(qemuStatus('qemu-img', ['check', packed]).status).toBe(0);
      expect(qemu('qemu-img', ['compare', src, packed])).toContain('Images are identical.');
      expect(fs.statSync(packed).size).toBeLessThanOrEqual(fs.statSync(plain).size);
      // about as small as qemu-img's own convert -c of the same source
      const theirs = path.join(dir, `q-${variant.tag}.qcow2`);
      qemu('qemu-img', ['convert', '-c', '-O', 'qcow2', ...variant.o, src, theirs]);
      expect(fs.statSync(packed).size).toBeLessThanOrEqual(fs.statSync(theirs).size + 4 * 64 * KiB);
      // qemu-img sees compressed clusters: their map entries carry no host offset
      const map = JSON.parse(qemu('qemu-img', ['map', '--output=json', packed])) as Array<{ data: boolean; offset?: number }>;
      expect(map.some((e) => e.data && e.offset === undefined)).toBe(true);
      const info = JSON.parse(qemu('qemu-img', ['check', '--output=json', packed])) as { 'compressed-clusters'?: number };
      expect(info['compressed-clusters'] ?? 0).toBeGreaterThan(0);
      // and snapstack reads it back too
      const a = await openImage(packed, { aio: 'sync', readOnly: true });
      const raw = fs.readFileSync(`${src}.raw`);
      try {
        expect(a.size).toBe(Math.ceil(raw.length / 512) * 512);
        expect(Buffer.from(await a.read(0, raw.length)).equals(raw)).toBe(true);
      } finally {
        await a.close();
      }
    });
  }

  it("reads qemu-img's own convert -c images and rewrites over compressed clusters (check clean)", async () => {
    const src = makeSource('src-q.qcow2', 2 * MiB);
    const theirs = path.join(dir, 'theirs.qcow2');
    qemu('qemu-img', ['convert', '-c', '-O', 'qcow2', src, theirs]);
    const model = new Uint8Array(fs.readFileSync(`${src}.raw`));
    const img = await openImage(theirs, { aio: 'sync' });
    try {
      expect(Buffer.from(await img.read(0, img.size)).equals(Buffer.from(model))).toBe(true);
      const patch = new Uint8Array(3000).fill(0x5a);
      for (const at of [100, 64 * KiB + 1000, 5 * 64 * KiB - 1500]) {
        await img.write(at, patch);
        model.set(patch, at);
      }
      // a compressed write over an unallocated cluster of a qemu-img -c image
      const c3 = clusterData(64 * KiB, 99, true);
      const zeroCluster = 3 * 64 * KiB; // kind 3: zeros, never allocated
      await blkPwriteCompressed(img.backend, zeroCluster, c3);
      model.set(c3, zeroCluster);
      expect(Buffer.from(await img.read(0, img.size)).equals(Buffer.from(model))).toBe(true);
    } finally {
      await img.close();
    }
    expect(qemuStatus('qemu-img', ['check', theirs]).status).toBe(0);
    fs.writeFileSync(path.join(dir, 'model.raw'), model);
    expect(qemu('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', path.join(dir, 'model.raw'), theirs])).toContain('Images are identical.');
  });

  it('a fragment that lands where a freed one lay reads as the new data, not the last decompressed cluster', async () => {
    const f = path.join(dir, 'reuse.qcow2');
    qemu('qemu-img', ['create', '-f', 'qcow2', f, '1M']);
    const C = 64 * KiB;
    const img = await openImage(f, { aio: 'sync' });
    try {
      await blkPwriteCompressed(img.backend, 0, new Uint8Array(C).fill(0x61));
      expect((await img.read(0, 512))[0]).toBe(0x61); // decompressed once: data-path keeps it
      await img.write(0, new Uint8Array(C).fill(0x33)); // the fragment is freed at the flush
      await img.flush();
      // same compressed length, so the same descriptor where the freed fragment lay
      await blkPwriteCompressed(img.backend, C, new Uint8Array(C).fill(0x62));
      expect((await img.read(C, C)).every((b) => b === 0x62)).toBe(true);
      expect((await img.read(0, C)).every((b) => b === 0x33)).toBe(true);
    } finally {
      await img.close();
    }
    expect(qemuStatus('qemu-img', ['check', f]).status).toBe(0);
    const raw = path.join(dir, 'reuse.raw');
    qemu('qemu-img', ['convert', '-O', 'raw', f, raw]);
    expect(fs.readFileSync(raw).subarray(C, 2 * C).every((b) => b === 0x62)).toBe(true);
  });

  it('refuses a compressed write over an allocated cluster (EIO, as QEMU) and changes nothing', async () => {
    const f = path.join(dir, 'alloc.qcow2');
    qemu('qemu-img', ['create', '-f', 'qcow2', f, '1M']);
    qemu('qemu-io', ['-c', 'write -P 0x11 0 64k', f]);
    const img = await openImage(f, { aio: 'sync' });
    try {
      await expect(blkPwriteCompressed(img.backend, 0, clusterData(64 * KiB, 1, true))).rejects.toMatchObject({ code: 'EIO' });
      await expect(blkPwriteCompressed(img.backend, 512, clusterData(64 * KiB, 1, true))).rejects.toMatchObject({ code: 'EINVAL' });
      expect((await img.read(0, 64 * KiB)).every((b) => b === 0x11)).toBe(true);
    } finally {
      await img.close();
    }
    expect(qemuStatus('qemu-img', ['check', f]).status).toBe(0);
  });

  it('packs compressed clusters into shared host clusters that a rewrite frees cleanly', async () => {
    const f = path.join(dir, 'pack.qcow2');
    qemu('qemu-img', ['create', '-f', 'qcow2', f, '4M']);
    const img = await openImage(f, { aio: 'sync' });
    try {
      for (let c = 0; c < 32; c++) await blkPwriteCompressed(img.backend, c * 64 * KiB, clusterData(64 * KiB, c, true));
      await img.flush();
    } finally {
      await img.close();
    }
    // 32 tiny fragments: far fewer host clusters than guest clusters
    expect(fs.statSync(f).size).toBeLessThan(6 * 64 * KiB);
    expect(qemuStatus('qemu-img', ['check', f]).status).toBe(0);
    const img2 = await openImage(f, { aio: 'sync' });
    try {
      for (let c = 0; c < 32; c += 2) await img2.write(c * 64 * KiB, new Uint8Array(64 * KiB).fill(c));
    } finally {
      await img2.close();
    }
    expect(qemuStatus('qemu-img', ['check', f]).status).toBe(0);
    const rawOut = path.join(dir, 'pack-read.raw');
    qemu('qemu-img', ['convert', '-O', 'raw', f, rawOut]);
    const got = fs.readFileSync(rawOut);
    for (let c = 0; c < 32; c++) {
      const want = c % 2 === 0 ? new Uint8Array(64 * KiB).fill(c) : clusterData(64 * KiB, c, true);
      expect(got.subarray(c * 64 * KiB, (c + 1) * 64 * KiB).equals(Buffer.from(want))).toBe(true);
    }
  });

  it('a power cut at any write or flush of a compressed run leaves qemu-img check clean or leaks only, each cluster old or new', async () => {
    const C = 4 * KiB;
    const id = 'cw0';
    createCrashDisk(id);
    await withBql(async (bql) => {
      const node = await openNode(bql, `driver=crashsim,id=${id}`);
      try {
        await withDrained(bql, node, (d) => createQcow2OnNode(bql, d, node, { sizeBytes: 256 * KiB, clusterSize: C }));
      } finally {
        await closeNode(bql, node);
      }
    });
    // before: a few compressed clusters already there (a shared host cluster with free bytes)
    const open = (): Promise<Image> => openImage(`driver=qcow2,file.driver=crashsim,file.id=${id}`);
    let img = await open();
    for (let c = 0; c < 3; c++) await blkPwriteCompressed(img.backend, c * C, clusterData(C, c, true));
    await img.close();
    const pre = persistedBytes(id);
    const news = Array.from({ length: 8 }, (_, k) => clusterData(C, 100 + k, k % 3 !== 2));
    const op = async (): Promise<void> => {
      const i = await open();
      try {
        for (let k = 0; k < news.length; k++) await blkPwriteCompressed(i.backend, (4 + k) * C, news[k] as Uint8Array);
        await i.flush();
      } finally {
        await i.close();
      }
    };
    createCrashDisk(id, pre);
    armCrash(id, Infinity);
    await op();
    const events = crashDisk(id).events;
    expect(events).toBeGreaterThan(4);
    const problems: string[] = [];
    let images = 0;
    for (let n = 0; n < events; n++) {
      createCrashDisk(id, pre);
      armCrash(id, n);
      await op().catch(() => undefined);
      for (const ci of crashImages(id, { seed: n, randomSubsets: 3, tears: 1 })) {
        images++;
        const f = path.join(dir, 'crash.qcow2');
        fs.writeFileSync(f, ci.bytes);
        const st = qemuStatus('qemu-img', ['check', f]).status;
        if (st !== 0 && st !== 3) problems.push(`cut ${n} ${ci.label}: qemu-img check exit ${st}`);
        const raw = path.join(dir, 'crash.raw');
        qemu('qemu-img', ['convert', '-O', 'raw', f, raw]);
        const got = fs.readFileSync(raw);
        for (let c = 0; c < 3; c++) if (!got.subarray(c * C, (c + 1) * C).equals(Buffer.from(clusterData(C, c, true)))) problems.push(`cut ${n} ${ci.label}: old cluster ${c} changed`);
        for (let k = 0; k < news.length; k++) {
          const part = got.subarray((4 + k) * C, (5 + k) * C);
          if (!part.equals(Buffer.from(news[k] as Uint8Array)) && !part.every((b) => b === 0)) problems.push(`cut ${n} ${ci.label}: cluster ${4 + k} is neither old nor new`);
        }
      }
    }
    expect(images).toBeGreaterThan(events);
    expect(problems).toEqual([]);
    // the complete run: everything there, check clean
    createCrashDisk(id, pre);
    armCrash(id, Infinity);
    await op();
    img = await open();
    try {
      for (let k = 0; k < news.length; k++) expect(Buffer.from(await img.read((4 + k) * C, C)).equals(Buffer.from(news[k] as Uint8Array))).toBe(true);
    } finally {
      await img.close();
    }
  }, 300_000);
});

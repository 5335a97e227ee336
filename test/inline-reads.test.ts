/**
 * Inline reads (src/drivers/file/inline-reads.ts): a small read of a `file` node with nothing else
 * of the node in flight runs on the main loop, without the hand-off to a worker. What must hold:
 * - QD1 reads go inline and return the file's bytes; reads while a write of the node is in flight
 *   go to a worker (that is what orders them); a node bound to an IOThread keeps its reads there
 *   unless `inline-reads=on` says otherwise; `inline-reads=off` turns them off;
 * - a loop of inline reads does not starve the event loop (timers still fire);
 * - against a reference model, a seeded mix of concurrent reads and writes of every size, on raw
 *   and qcow2, reads back exactly what was written (inline and handed-off reads interleaved).
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { withBql } from '../src/block/bql.js';
import { BlockError } from '../src/block/errors.js';
import { createIOThread, shutdownIOThreads } from '../src/block/iothread.js';
import { listNodes } from '../src/block/graph.js';
import { createQcow2File } from '../src/drivers/qcow2/create.js';
import { createRawFile } from '../src/drivers/file/driver.js';
import { openImage } from '../src/image.js';
import { fileReadPathStatsForTesting } from '../src/testing.js';
import type { ReadPathStats } from '../src/drivers/file/inline-reads.js';
import { prng } from './helpers/prng.js';

const SIZE = 8 << 20;
let dir: string;
let n = 0;

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-inline-reads-'));
});

afterAll(async () => {
  await withBql((bql) => shutdownIOThreads(bql));
  fs.rmSync(dir, { recursive: true, force: true });
});

/** A raw file whose every 4-byte word holds its own offset. */
function patternFile(): string {
  const p = path.join(dir, `p${n++}.raw`);
  const data = Buffer.alloc(SIZE);
  for (let i = 0; i < SIZE; i += 4) data.writeUInt32LE(i, i);
  fs.writeFileSync(p, data);
  return p;
}

/** The read-path counts of the open file node of `filename`. */
async function fileStats(filename: string): Promise<ReadPathStats | null> {
  return withBql(async (bql) => {
    const file = listNodes(bql).find((node) => node.driver.formatName === 'file' && node.filename === filename);
    if (file === undefined) throw new Error(`no file node for ${filename}`);
    return fileReadPathStatsForTesting(file);
  });
}

/** Whether `buf` holds the pattern of patternFile at `offset`. */
function isPattern(buf: Uint8Array, offset: number): boolean {
  try {
    expectPattern(buf, offset);
    return true;
  } catch {
    return false;
  }
}

function expectPattern(buf: Uint8Array, offset: number): void {
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  for (let i = 0; i < buf.length; i += 4) {
    if (view.getUint32(i, true) !== offset + i) throw new Error(`word at ${offset + i} reads ${view.getUint32(i, true)}`);
  }
}

describe('inline reads of a file node', () => {
  it('QD1 reads run inline and return the file bytes', async () => {
    const file = patternFile();
    const img = await openImage(file, { format: 'raw' });
    try {
      const r = prng(1);
      for (let i = 0; i < 500; i++) {
        const len = 512 * (1 + Math.floor(r() * 128)); // up to 64 KiB: all inline
        const off = 512 * Math.floor(r() * ((SIZE - len) / 512));
        expectPattern(await img.read(off, len), off);
      }
      const s = await fileStats(file);
      expect(s).not.toBeNull();
      expect(s?.inline).toBe(500);
      expect(s?.handedOff).toBe(0);
      // a read above the inline size goes to a worker, and reads the same bytes
      expectPattern(await img.read(0, 256 * 1024), 0);
      expect((await fileStats(file))?.handedOff).toBe(1);
    } finally {
      await img.close();
    }
  });

  it('a read while a write of the node is in flight goes to a worker, and later reads see the write', async () => {
    const file = patternFile();
    const img = await openImage(file, { format: 'raw' });
    try {
      const data = new Uint8Array(4096).fill(0xab);
      const before = (await fileStats(file))?.handedOff ?? -1;
      const [, during] = await Promise.all([img.write(8192, data), img.read(8192, 4096)]);
      const s = await fileStats(file);
      expect(s?.handedOff).toBe(before + 1);
      // in flight together: either the old bytes or the new ones
      expect(during.every((b) => b === 0xab) || isPattern(during, 8192)).toBe(true);
      const after = await img.read(8192, 4096);
      expect(after.every((b) => b === 0xab)).toBe(true);
      expect((await fileStats(file))?.inline).toBe((s?.inline ?? 0) + 1);
    } finally {
      await img.close();
    }
  });

  it('inline-reads=off hands every read to a worker; an IOThread keeps its reads unless inline-reads=on', async () => {
    const file = patternFile();
    const off = await openImage(file, { format: 'raw', nodeOptions: { 'file.inline-reads': 'off' } });
    try {
      expectPattern(await off.read(4096, 4096), 4096);
      expect(await fileStats(file)).toBeNull();
    } finally {
      await off.close();
    }
    await withBql((bql) => {
      createIOThread(bql, 'inline-io0');
    });
    const bound = await openImage(file, { format: 'raw', iothread: 'inline-io0' });
    try {
      expectPattern(await bound.read(4096, 4096), 4096);
      expect(await fileStats(file)).toBeNull();
    } finally {
      await bound.close();
    }
    const forced = await openImage(file, { format: 'raw', iothread: 'inline-io0', nodeOptions: { 'file.inline-reads': 'on' } });
    try {
      expectPattern(await forced.read(4096, 4096), 4096);
      expect((await fileStats(file))?.inline).toBe(1);
    } finally {
      await forced.close();
    }
    await expect(openImage(file, { format: 'raw', nodeOptions: { 'file.inline-reads': 'maybe' } })).rejects.toSatisfy(
      (e: unknown) => e instanceof BlockError && e.code === 'EINVAL' && /inline-reads/.test(e.message),
    );
  });

  it('a loop of inline reads lets timers run', async () => {
    const file = patternFile();
    const img = await openImage(file, { format: 'raw' });
    try {
      const buf = new Uint8Array(4096);
      let ticks = 0;
      const timer = setInterval(() => ticks++, 1);
      const start = performance.now();
      let reads = 0;
      try {
        while (performance.now() - start < 300) {
          await img.read((reads++ % 2048) * 4096, 4096, buf);
        }
      } finally {
        clearInterval(timer);
      }
      const s = await fileStats(file);
      expect(s?.inline).toBe(reads);
      // a 1 ms interval over 300 ms: starved, it would not fire at all until the loop ends
      expect(ticks).toBeGreaterThan(50);
    } finally {
      await img.close();
    }
  });

  for (const format of ['raw', 'qcow2'] as const) {
    it(`a seeded mix of concurrent reads and writes reads back what was written (${format})`, async () => {
      const file = path.join(dir, `mix${n++}.${format}`);
      await withBql((bql) => (format === 'raw' ? createRawFile(bql, file, SIZE) : createQcow2File(bql, file, { sizeBytes: SIZE, clusterSize: 4096 })));
      const img = await openImage(file, { format });
      const model = new Uint8Array(SIZE);
      try {
        const r = prng(format === 'raw' ? 7 : 8);
        for (let batch = 0; batch < 150; batch++) {
          // a batch of requests in flight together, on ranges that do not overlap (so each one's
          // result is defined whatever the order)
          const depth = 1 + Math.floor(r() * 6);
          const taken: Array<[number, number]> = [];
          const ops: Array<Promise<void>> = [];
          for (let k = 0; k < depth; k++) {
            const len = 512 * (1 + Math.floor(r() * (r() < 0.8 ? 16 : 300)));
            const off = 512 * Math.floor(r() * ((SIZE - len) / 512));
            if (taken.some(([a, b]) => off < b && a < off + len)) continue;
            taken.push([off, off + len]);
            if (r() < 0.4) {
              const data = new Uint8Array(len);
              for (let i = 0; i < len; i++) data[i] = (batch * 31 + i * 7 + k) & 0xff;
              model.set(data, off);
              ops.push(img.write(off, data));
            } else {
              const expected = model.slice(off, off + len);
              ops.push(
                img.read(off, len).then((got) => {
                  const bad = got.findIndex((b, i) => b !== expected[i]);
                  if (bad >= 0) throw new Error(`batch ${batch}: byte ${off + bad} reads ${got[bad]}, expected ${expected[bad]}`);
                }),
              );
            }
          }
          await Promise.all(ops);
        }
        const s = await fileStats(file);
        expect(s?.inline).toBeGreaterThan(20);
        expect(s?.handedOff).toBeGreaterThan(20);
      } finally {
        await img.close();
      }
    });
  }
});

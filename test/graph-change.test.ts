/**
 * Graph changes under drain-all (src/block/graph-change.ts): a node replaced in its parents (the
 * end of a commit), a backing child set or dropped (the end of a stream), refused when they would
 * make a loop or a size mismatch, and then nothing moved.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { withBql, withBqlSync } from '../src/block/bql.js';
import { withDrainedAll } from '../src/block/drain.js';
import { BlockError } from '../src/block/errors.js';
import { closeNode } from '../src/block/graph.js';
import { bdrvSetBacking, replaceNode } from '../src/block/graph-change.js';
import { shutdownIOThreads } from '../src/block/iothread.js';
import { createQcow2File } from '../src/drivers/qcow2/create.js';
import { openImage, type Image } from '../src/image.js';

let dir: string;
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-graph-change-'));
});
afterAll(async () => {
  fs.rmSync(dir, { recursive: true, force: true });
  await withBql((bql) => shutdownIOThreads(bql));
});

const C = 65536;

/** base (cluster 0: 0x11) <- mid (cluster 1: 0x22) <- top (cluster 2: 0x33), opened from the top, writable down the chain. */
async function chain(name: string, topSize = 4 * C): Promise<Image> {
  const f = (n: string): string => path.join(dir, `${name}-${n}.qcow2`);
  withBqlSync((bql) => createQcow2File(bql, f('base'), { sizeBytes: 4 * C }));
  withBqlSync((bql) => createQcow2File(bql, f('mid'), { sizeBytes: 4 * C, backingFile: `${name}-base.qcow2`, backingFormat: 'qcow2' }));
  withBqlSync((bql) => createQcow2File(bql, f('top'), { sizeBytes: topSize, backingFile: `${name}-mid.qcow2`, backingFormat: 'qcow2' }));
  for (const [n, c, v] of [['base', 0, 0x11], ['mid', 1, 0x22], ['top', 2, 0x33]] as const) {
    const img = await openImage(f(n), { aio: 'sync', noBacking: true });
    await img.write(c * C, new Uint8Array(C).fill(v));
    await img.close();
  }
  return openImage(f('top'), { aio: 'sync', nodeOptions: { 'backing.read-only': 'off', 'backing.backing.read-only': 'off' } });
}

async function firstBytes(img: Image): Promise<number[]> {
  const out: number[] = [];
  for (let c = 0; c < 4; c++) out.push((await img.read(c * C, 1))[0] ?? -1);
  return out;
}

it('replacing an intermediate node links the overlay above to the node below', async () => {
  const img = await chain('replace-mid');
  expect(await firstBytes(img)).toEqual([0x11, 0x22, 0x33, 0]);
  const top = img.backend.root;
  const mid = top?.backing;
  const base = mid?.backing;
  if (top == null || mid === undefined || base === undefined) throw new Error('chain not open');
  await withBql(async (bql) => {
    await withDrainedAll(bql, (all) => replaceNode(bql, all, mid, base));
    expect(top.backing).toBe(base);
    expect(mid.parents.size).toBe(0);
    await closeNode(bql, mid); // base keeps its parent, the overlay
  });
  expect(await firstBytes(img)).toEqual([0x11, 0, 0x33, 0]); // the mid layer's cluster is gone from the view
  expect(base.instance).not.toBeNull();
  await img.close();
});

it('replacing the device root moves the device and keeps the overlay over its backing node', async () => {
  const img = await chain('replace-root');
  const top = img.backend.root;
  const mid = top?.backing;
  if (top == null || mid === undefined) throw new Error('chain not open');
  await withBql(async (bql) => {
    await withDrainedAll(bql, (all) => replaceNode(bql, all, top, mid));
    expect(img.backend.root).toBe(mid);
    expect(top.backing).toBe(mid); // the overlay itself still uses it: not a parent to move
    await closeNode(bql, top);
  });
  expect(await firstBytes(img)).toEqual([0x11, 0x22, 0, 0]);
  await img.write(3 * C, new Uint8Array(512).fill(0x44)); // the device now writes into mid
  expect(await firstBytes(img)).toEqual([0x11, 0x22, 0, 0x44]);
  await img.close();
});

it('sets and drops a backing child, and refuses a loop or a size mismatch with nothing moved', async () => {
  const img = await chain('set-backing');
  const top = img.backend.root;
  const mid = top?.backing;
  const base = mid?.backing;
  if (top == null || mid === undefined || base === undefined) throw new Error('chain not open');
  await withBql(async (bql) => {
    await withDrainedAll(bql, async (all) => {
      const loop = (() => {
        try {
          bdrvSetBacking(bql, all, base, top);
          return null;
        } catch (e) {
          return e;
        }
      })();
      expect(loop).toBeInstanceOf(BlockError);
      expect((loop as BlockError).message).toMatch(/loop/);
      expect(base.backing).toBeUndefined();
      bdrvSetBacking(bql, all, top, null);
      expect(top.backing).toBeUndefined();
    });
  });
  expect(await firstBytes(img)).toEqual([0, 0, 0x33, 0]);
  await withBql(async (bql) => {
    await withDrainedAll(bql, (all) => bdrvSetBacking(bql, all, top, base));
    await closeNode(bql, mid);
  });
  expect(await firstBytes(img)).toEqual([0x11, 0, 0x33, 0]);
  await img.close();
  const small = await chain('mismatch', 8 * C);
  const t2 = small.backend.root;
  const m2 = t2?.backing;
  if (t2 == null || m2 === undefined) throw new Error('chain not open');
  await withBql((bql) =>
    withDrainedAll(bql, (all) => {
      expect(() => replaceNode(bql, all, t2, m2)).toThrow(/cannot replace/);
    }),
  );
  expect(small.backend.root).toBe(t2);
  await small.close();
});

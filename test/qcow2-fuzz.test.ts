/**
 * Fuzzing whole images (fast-check): random byte mutations anywhere in the metadata of a valid
 * qcow2 image with snapshots (header, L1 tables, L2 tables, refcount table and blocks, snapshot
 * table). Opening it read-only and reading everything, listing snapshots and loading each one
 * temporarily must either work or fail with a BlockError: no other exception, no hang, and not a
 * single write to the file. (Header and snapshot-table parsers have their own fuzz tests beside
 * them; this one exercises the tables as the driver walks them.)
 */
import { afterAll, beforeAll, expect, it } from 'vitest';
import fc from 'fast-check';
import { isBlockError, openImage, shutdownIOThreads, type Image } from '../src/index.js';
import { createQcow2OnNode } from '../src/drivers/qcow2/create.js';
import { withBql } from '../src/block/bql.js';
import { withDrained } from '../src/block/drain.js';
import { closeNode, openNode } from '../src/block/graph.js';
import { createCrashDisk, crashDisk, persistedBytes } from './helpers/crash-driver.js';

const C = 4096;
let pristine: Uint8Array;
/** Where the metadata lives in the pristine image: the ranges the fuzzer mutates. */
let metaRanges: Array<[number, number]> = [];

beforeAll(async () => {
  createCrashDisk('fuzz-src');
  await withBql(async (bql) => {
    const file = await openNode(bql, 'driver=crashsim,id=fuzz-src');
    await withDrained(bql, file, (d) => createQcow2OnNode(bql, d, file, { sizeBytes: 4 * 1024 * 1024, clusterSize: C }));
    await closeNode(bql, file);
  });
  const img = await openImage('driver=qcow2,file.driver=crashsim,file.id=fuzz-src');
  try {
    for (let i = 0; i < 24; i++) await img.write(((i * 37) % 1000) * C, new Uint8Array(C).fill(i + 1));
    await img.createSnapshot('a');
    for (let i = 0; i < 8; i++) await img.write(((i * 53) % 1000) * C, new Uint8Array(C).fill(100 + i));
    await img.createSnapshot('b');
    await img.write(0, new Uint8Array(3 * C).fill(7));
  } finally {
    await img.close();
  }
  pristine = persistedBytes('fuzz-src').slice();
  // metadata clusters: everything that is not guest data (a cluster full of one repeated byte)
  metaRanges = [];
  for (let off = 0; off < pristine.length; off += C) {
    const cluster = pristine.subarray(off, off + C);
    const first = cluster[0] ?? 0;
    if (!cluster.every((b) => b === first) || first === 0) metaRanges.push([off, Math.min(off + C, pristine.length)]);
  }
});

afterAll(async () => {
  await withBql((bql) => shutdownIOThreads(bql));
});

let run = 0;
const outcomes = { worked: 0, refused: 0 };

async function exercise(img: Image): Promise<void> {
  const buf = new Uint8Array(64 * 1024);
  for (let off = 0; off < img.size; off += buf.length) await img.read(off, Math.min(buf.length, img.size - off), buf.subarray(0, Math.min(buf.length, img.size - off)));
  for (const sn of await img.snapshots()) {
    await img.loadSnapshotTemporarily(sn.id);
    await img.read(0, 64 * 1024);
  }
}

it('a mutated image opened read-only: BlockErrors only, no hang, no write', async () => {
  await fc.assert(
    fc.asyncProperty(
      fc.array(fc.tuple(fc.nat(), fc.nat(4095), fc.integer({ min: 0, max: 255 })), { minLength: 1, maxLength: 6 }),
      async (mutations) => {
        const bytes = pristine.slice();
        for (const [which, at, value] of mutations) {
          const r = metaRanges[which % metaRanges.length];
          if (r === undefined) continue;
          const pos = r[0] + (at % (r[1] - r[0]));
          bytes[pos] = value;
        }
        const id = `fuzz-${run++}`;
        createCrashDisk(id, bytes);
        let img: Image | null = null;
        try {
          img = await openImage(`driver=qcow2,read-only=on,file.driver=crashsim,file.id=${id}`);
          await exercise(img);
          outcomes.worked++;
        } catch (e) {
          if (!isBlockError(e)) throw e; // anything but a typed refusal is a bug
          outcomes.refused++;
        } finally {
          await img?.close().catch((e: unknown) => {
            if (!isBlockError(e)) throw e;
          });
        }
        expect(crashDisk(id).writes).toBe(0);
      },
    ),
    { numRuns: 300, seed: 20261125 },
  );
  // the fuzzer reached both sides: damage that was refused, and damage read through
  expect(metaRanges.length).toBeGreaterThan(5);
  expect(outcomes.refused).toBeGreaterThan(20);
  expect(outcomes.worked).toBeGreaterThan(20);
}, 60_000);

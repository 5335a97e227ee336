/**
 * Fuzzing whole images opened READ/WRITE (fast-check, seeded): random byte mutations in the
 * metadata of a qemu-img-made image with two snapshots, then a read/write open, a few guest
 * writes, a snapshot and one more write. Whatever the damage:
 * - only BlockErrors come out (no V8 error, no hang);
 * - a refused open writes nothing but the header's feature fields (bytes 72..95);
 * - the header cluster changes only in the fields the operations own (l1_size .. snapshots_offset,
 *   36..71) and the feature fields: nothing is ever allocated over it;
 * - an image that opened read-only before still opens read-only after, and reads through;
 * and when the damaged image still checks consistent (no corruption; leaks allowed) and every
 * operation succeeded, the result checks consistent too, the active disk reads exactly as the
 * model says (the old contents plus the user's writes), and every snapshot, old and new, reads
 * exactly as it did: bytes change only through a write the user asked for.
 *
 * The dirty bit (byte 79, bit 0) is never set by a mutation: a dirty image is repaired on a
 * read/write open by design (QEMU's behaviour), which is a change nobody wrote.
 * A second property repairs mutated images with `check -r all`: when snapstack says the result
 * is repaired (no corruption left, no failure), qemu-img check must agree (exit 0 or 3), the
 * header must still be qcow2's, and every guest byte a read-only open showed before must read the
 * same after.
 * `SNAPSTACK_FUZZ_RUNS=N` runs N cases instead of the default 200 (100 for the repair property).
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import fc from 'fast-check';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { withBql } from '../src/block/bql.js';
import { bdrvCheck, type CheckResult } from '../src/block/check.js';
import { withDrained } from '../src/block/drain.js';
import { closeNode, openNode } from '../src/block/graph.js';
import { isBlockError, openImage, shutdownIOThreads, type Image } from '../src/index.js';
import { crashDisks, createCrashDisk, persistedBytes } from './helpers/crash-driver.js';
import { describeInterop, qemu } from './helpers/qemu.js';

const C = 4096;
const DISK = 4 * 1024 * 1024;
const RUNS = Number(process.env['SNAPSTACK_FUZZ_RUNS'] ?? '') || 200;

let dir: string;
let pristine: Uint8Array;
let metaClusters: number[] = [];

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-fuzz-rw-'));
});
afterAll(async () => {
  fs.rmSync(dir, { recursive: true, force: true });
  await withBql((bql) => shutdownIOThreads(bql));
});

/** Runs `fn`; a BlockError becomes `null`, anything else is a failure of the test. */
async function typed<T>(fn: () => Promise<T>): Promise<T | null> {
  try {
    return await fn();
  } catch (e) {
    if (!isBlockError(e)) throw e;
    return null;
  }
}

/** Closes `img`, accepting only a BlockError. */
async function closeTyped(img: Image | null): Promise<void> {
  if (img !== null) await typed(() => img.close());
}

/** What a read-only open of disk `id` shows: the active disk and every snapshot (null when refused). */
async function contents(id: string): Promise<{ active: Uint8Array; snapshots: Map<string, Uint8Array> } | null> {
  let img: Image | null = null;
  try {
    img = await openImage(`driver=qcow2,read-only=on,file.driver=crashsim,file.id=${id}`);
    const active = await img.read(0, DISK);
    const snapshots = new Map<string, Uint8Array>();
    for (const sn of await img.snapshots()) {
      await img.loadSnapshotTemporarily(sn.id);
      snapshots.set(sn.name, await img.read(0, DISK));
    }
    return { active, snapshots };
  } catch (e) {
    if (!isBlockError(e)) throw e;
    return null;
  } finally {
    await closeTyped(img);
  }
}

/** True when disk `id` checks without corruption or internal error (leaks allowed); false when refused. */
async function consistent(id: string): Promise<boolean> {
  const res = await typed(() =>
    withBql(async (bql) => {
      const node = await openNode(bql, { driver: 'qcow2', 'x-check': 'on', 'read-only': 'on', 'file.driver': 'crashsim', 'file.id': id });
      try {
        return await withDrained(bql, node, (d): Promise<CheckResult> => bdrvCheck(bql, d, node, { leaks: false, errors: false }));
      } finally {
        await closeNode(bql, node);
      }
    }),
  );
  return res !== null && res.corruptions === 0 && res.checkErrors === 0;
}

/** `a` equals `b` except in [from, to) ranges. */
function sameExcept(a: Uint8Array, b: Uint8Array, ranges: Array<[number, number]>): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) {
    if (a[i] === b[i]) continue;
    if (!ranges.some(([from, to]) => i >= from && i < to)) return false;
  }
  return true;
}

const FEATURE_FIELDS: [number, number] = [72, 96];
const OWNED_FIELDS: [number, number] = [36, 72];

let run = 0;

/** Forgets the simulated disks of earlier runs (a few MiB each; a thousand runs would exhaust memory). */
function forgetDisks(): void {
  for (const id of [...crashDisks.keys()]) if (id.startsWith('fuzzrw-') || id.startsWith('fuzzfix-')) crashDisks.delete(id);
}
const outcomes = { refusedOpen: 0, failedOp: 0, allOk: 0, consistentChecked: 0 };

describeInterop('qcow2 images opened read/write under fuzzing', () => {
  beforeAll(() => {
    const f = path.join(dir, 'base.qcow2');
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${C}`, f, String(DISK)]);
    qemu('qemu-io', ['-c', 'write -P 1 0 64k', '-c', 'write -P 2 1M 16k', '-c', 'write -P 3 3M 8k', f]);
    qemu('qemu-img', ['snapshot', '-c', 'a', f]);
    qemu('qemu-io', ['-c', 'write -P 4 8k 8k', '-c', 'write -P 5 2M 4k', f]);
    qemu('qemu-img', ['snapshot', '-c', 'b', f]);
    qemu('qemu-io', ['-c', 'write -P 6 0 4k', f]);
    pristine = new Uint8Array(fs.readFileSync(f));
    // metadata: every cluster that is not guest data (a cluster of one repeated non-zero byte)
    metaClusters = [];
    for (let off = 0; off < pristine.length; off += C) {
      const cl = pristine.subarray(off, off + C);
      const first = cl[0] ?? 0;
      if (first === 0 || !cl.every((b) => b === first)) metaClusters.push(off);
    }
  });

  it('a mutated image written to: BlockErrors only, the header never overwritten, and a consistent one changes only where the user wrote', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.tuple(fc.nat(), fc.nat(C - 1), fc.integer({ min: 0, max: 255 })), { minLength: 1, maxLength: 5 }),
        fc.array(fc.tuple(fc.nat(DISK / 512 - 1), fc.integer({ min: 1, max: 24 })), { minLength: 1, maxLength: 4 }),
        async (mutations, writes) => {
          const m = pristine.slice();
          for (const [which, at, value] of mutations) {
            const base = metaClusters[which % metaClusters.length] ?? 0;
            const pos = base + at;
            if (pos >= m.length) continue;
            m[pos] = pos === 79 ? value & 0xfe : value; // never the dirty bit
          }
          forgetDisks();
          const id = `fuzzrw-${run++}`;
          createCrashDisk(`${id}-m`, m);
          const before = await contents(`${id}-m`);
          const wasConsistent = before !== null && (await consistent(`${id}-m`));

          createCrashDisk(id, m);
          let img: Image | null = null;
          const model = before?.active.slice() ?? null;
          let allOk = true;
          let snapshotModel: Uint8Array | null = null;
          try {
            img = await typed(() => openImage(`driver=qcow2,file.driver=crashsim,file.id=${id}`));
            if (img === null) {
              outcomes.refusedOpen++;
              expect(sameExcept(persistedBytes(id), m, [FEATURE_FIELDS])).toBe(true);
              return;
            }
            const opened = img;
            const ops: Array<() => Promise<void>> = [];
            for (const [k, [sector, sectors]] of writes.entries()) {
              const off = sector * 512;
              const len = Math.min(sectors * 512, DISK - off);
              const data = new Uint8Array(len).fill(0x40 + k);
              ops.push(async () => {
                await opened.write(off, data);
                model?.set(data, off);
              });
            }
            ops.push(async () => {
              await opened.createSnapshot('fz');
              snapshotModel = model?.slice() ?? null;
            });
            const [sector0] = writes[0] ?? [0];
            const last = new Uint8Array(Math.min(4096, DISK - sector0 * 512)).fill(0x7e);
            ops.push(async () => {
              await opened.write(sector0 * 512, last);
              model?.set(last, sector0 * 512);
            });
            for (const op of ops) {
              if ((await typed(op)) === null) {
                allOk = false;
                break;
              }
            }
          } finally {
            await closeTyped(img);
          }
          if (allOk) outcomes.allOk++;
          else outcomes.failedOp++;

          const f = persistedBytes(id);
          // the header cluster: only the fields the operations own, and the feature fields
          expect(sameExcept(f.subarray(0, C), m.subarray(0, C), [OWNED_FIELDS, FEATURE_FIELDS])).toBe(true);
          const after = await contents(id);
          if (before !== null) expect(after).not.toBeNull();
          if (!wasConsistent || !allOk || after === null || model === null) return;
          outcomes.consistentChecked++;
          expect(await consistent(id)).toBe(true);
          expect(Buffer.from(after.active).equals(Buffer.from(model))).toBe(true);
          for (const [name, bytes] of before?.snapshots ?? []) {
            expect({ name, same: Buffer.from(after.snapshots.get(name) ?? []).equals(Buffer.from(bytes)) }).toEqual({ name, same: true });
          }
          expect(Buffer.from(after.snapshots.get('fz') ?? []).equals(Buffer.from(snapshotModel ?? []))).toBe(true);
        },
      ),
      { numRuns: RUNS, seed: 20261201 },
    );
    // the fuzzer reached every side: refused opens, refused operations, and consistent images checked through
    console.log(`qcow2 read/write fuzz (${RUNS} runs): ${JSON.stringify(outcomes)}`);
    expect(outcomes.refusedOpen).toBeGreaterThan(RUNS / 100);
    expect(outcomes.failedOp).toBeGreaterThan(RUNS / 100);
    expect(outcomes.failedOp + outcomes.allOk).toBeGreaterThan(RUNS / 4);
    expect(outcomes.consistentChecked).toBeGreaterThan(RUNS / 10);
  }, 600_000);

  it('check -r all on a mutated image: what it calls repaired, qemu-img finds clean, with the same guest data', async () => {
    const repairs = { repaired: 0, leftDamaged: 0, failed: 0 };
    const runs = Math.max(1, Math.floor(RUNS / 2));
    await fc.assert(
      fc.asyncProperty(fc.array(fc.tuple(fc.nat(), fc.nat(C - 1), fc.integer({ min: 0, max: 255 })), { minLength: 1, maxLength: 4 }), async (mutations) => {
        const m = pristine.slice();
        for (const [which, at, value] of mutations) {
          const pos = (metaClusters[which % metaClusters.length] ?? 0) + at;
          if (pos < m.length) m[pos] = pos === 79 ? value & 0xfe : value;
        }
        forgetDisks();
        const id = `fuzzfix-${run++}`;
        createCrashDisk(`${id}-m`, m);
        const before = await contents(`${id}-m`);
        createCrashDisk(id, m);
        const res = await typed(() =>
          withBql(async (bql) => {
            const node = await openNode(bql, { driver: 'qcow2', 'x-check': 'on', 'file.driver': 'crashsim', 'file.id': id });
            try {
              return await withDrained(bql, node, (d): Promise<CheckResult> => bdrvCheck(bql, d, node, { leaks: true, errors: true }));
            } finally {
              await closeNode(bql, node);
            }
          }),
        );
        const f = persistedBytes(id);
        // whatever happened, the header cluster changed only in the fields a repair owns
        expect(sameExcept(f.subarray(0, C), m.subarray(0, C), [OWNED_FIELDS, FEATURE_FIELDS])).toBe(true);
        if (res === null || res.failure !== null || res.checkErrors > 0) {
          repairs.failed++;
          return;
        }
        if (res.corruptions > 0) {
          repairs.leftDamaged++;
          return;
        }
        repairs.repaired++;
        const file = path.join(dir, `${id}.qcow2`);
        fs.writeFileSync(file, f);
        const q = spawnSync('qemu-img', ['check', file], { encoding: 'utf8' });
        expect({ status: q.status === 0 || q.status === 3 ? 'clean' : `${String(q.status)} ${String(q.error)} ${q.stderr}` }).toEqual({ status: 'clean' });
        fs.rmSync(file);
        if (before !== null) {
          const after = await contents(id);
          expect(after).not.toBeNull();
          expect(Buffer.from(after?.active ?? []).equals(Buffer.from(before.active))).toBe(true);
        }
      }),
      { numRuns: runs, seed: 20261202 },
    );
    console.log(`qcow2 check -r all fuzz (${runs} runs): ${JSON.stringify(repairs)}`);
    expect(repairs.repaired).toBeGreaterThan(runs / 4);
  }, 600_000);
});

/**
 * The stress harness: several submitters per disk issue random reads and writes through
 * BlockBackends bound to two IOThreads, while a controller takes drained sections (per node and
 * drain-all). A reference byte array per disk holds every completed write, and each submitter's
 * one pending write (old and new bytes) is known. Checks:
 * - every read returns what the reference holds (each submitter owns its stripes and has one
 *   request at a time, so no write to the same bytes is in flight while it reads);
 * - inside each drained section the file on the host equals the reference, except that a pending
 *   write's range holds either all its old bytes (queued, not started) or all its new ones: no
 *   torn write; and the file does not change during the section (nothing ran while drained);
 * - at the end the files equal the references: nothing lost or reordered.
 * It reports mismatches instead of throwing, so that a negative control can count them.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { blkDelete, blkNew, blkPread, blkPwrite, type BlockBackend } from '../../src/block/backend.js';
import { withBql } from '../../src/block/bql.js';
import { withDrained, withDrainedAll } from '../../src/block/drain.js';
import { closeNode, openNode } from '../../src/block/graph.js';
import { createIOThread, destroyIOThread, type IOThread } from '../../src/block/iothread.js';
import type { BlockNode } from '../../src/block/node.js';
import '../../src/drivers/index.js';
import { prng } from './prng.js';

export interface StressOptions {
  disks: number;
  submittersPerDisk: number;
  opsPerSubmitter: number;
  drainedSections: number;
  diskBytes: number;
  seed: number;
}

export interface StressResult {
  ops: number;
  sections: number;
  mismatches: string[];
}

interface PendingWrite {
  off: number;
  old: Uint8Array;
  data: Uint8Array;
}

interface Disk {
  pending: Set<PendingWrite>;
  file: string;
  node: BlockNode;
  blk: BlockBackend;
  model: Uint8Array;
  thread: IOThread;
}

function firstDiff(a: Uint8Array, b: Uint8Array): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return a.length === b.length ? -1 : n;
}

/** Runs the stress load and returns what it found. */
export async function runStress(o: StressOptions): Promise<StressResult> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-stress-'));
  const rand = prng(o.seed);
  const mismatches: string[] = [];
  const disks: Disk[] = await withBql(async (bql) => {
    const threads = [createIOThread(bql, `stress-io0-${o.seed}`), createIOThread(bql, `stress-io1-${o.seed}`)];
    const out: Disk[] = [];
    for (let d = 0; d < o.disks; d++) {
      const file = path.join(dir, `disk${d}.img`);
      fs.writeFileSync(file, new Uint8Array(o.diskBytes));
      const thread = threads[d % 2] as IOThread;
      const node = await openNode(bql, { file, driver: 'raw', iothread: thread.id });
      out.push({ pending: new Set(), file, node, blk: blkNew(bql, `stress${o.seed}-d${d}`, node), model: new Uint8Array(o.diskBytes), thread });
    }
    return out;
  });

  // guest memory: the submitters' buffers live in one SharedArrayBuffer, as guest RAM would
  const stripe = 64 * 1024;
  const ram = new Uint8Array(new SharedArrayBuffer(o.disks * o.submittersPerDisk * stripe));
  let ops = 0;
  let running = true;

  const submitter = async (disk: Disk, d: number, s: number): Promise<void> => {
    const slot = (d * o.submittersPerDisk + s) * stripe;
    // submitter s owns stripes s, s + n, s + 2n, ... of its disk
    const stripes = Math.floor(o.diskBytes / stripe / o.submittersPerDisk);
    for (let i = 0; i < o.opsPerSubmitter; i++) {
      const base = (Math.floor(rand() * stripes) * o.submittersPerDisk + s) * stripe;
      const len = 512 * (1 + Math.floor(rand() * 64)) - (rand() < 0.2 ? 512 : 0) || 512;
      const off = base + 512 * Math.floor(rand() * ((stripe - len) / 512 + 1));
      const buf = ram.subarray(slot, slot + len);
      if (rand() < 0.55) {
        const fill = Math.floor(rand() * 256);
        for (let k = 0; k < len; k++) buf[k] = (fill + k * 7 + i) & 0xff;
        const pw: PendingWrite = { off, old: disk.model.slice(off, off + len), data: buf.slice() };
        disk.pending.add(pw);
        await blkPwrite(disk.blk, off, buf);
        disk.pending.delete(pw);
        disk.model.set(pw.data, off);
      } else {
        await blkPread(disk.blk, off, buf);
        const want = disk.model.subarray(off, off + len);
        const at = firstDiff(buf, want);
        if (at >= 0) mismatches.push(`read of ${len} bytes at ${off} on disk ${d} differs from the reference at +${at}`);
      }
      ops++;
    }
  };

  const controller = async (): Promise<number> => {
    let sections = 0;
    while (running && sections < o.drainedSections) {
      await new Promise((r) => setTimeout(r, 2 + Math.floor(rand() * 5)));
      const useAll = rand() < 0.3;
      const target = disks[Math.floor(rand() * disks.length)] as Disk;
      await withBql(async (bql) => {
        const check = (label: string): Buffer[] => {
          const seen: Buffer[] = [];
          for (const [d, disk] of disks.entries()) {
            if (!useAll && disk !== target) continue;
            const onDisk = fs.readFileSync(disk.file);
            seen.push(onDisk);
            const expected = disk.model.slice();
            for (const pw of disk.pending) {
              const got = onDisk.subarray(pw.off, pw.off + pw.data.length);
              if (firstDiff(got, pw.old) < 0) continue;
              if (firstDiff(got, pw.data) < 0) expected.set(pw.data, pw.off);
              else mismatches.push(`${label}: disk ${d} holds a torn write of ${pw.data.length} bytes at ${pw.off}`);
            }
            const at = firstDiff(onDisk, expected);
            if (at >= 0) mismatches.push(`${label}: disk ${d} on the host differs from the reference at byte ${at}`);
          }
          return seen;
        };
        const inside = async (): Promise<void> => {
          const before = check(`drained section ${sections} begin`);
          await new Promise((r) => setTimeout(r, 1));
          const after = check(`drained section ${sections} end`);
          before.forEach((b, i) => {
            const a = after[i];
            if (a === undefined || firstDiff(a, b) >= 0) mismatches.push(`drained section ${sections}: a disk changed while drained`);
          });
        };
        if (useAll) await withDrainedAll(bql, inside);
        else await withDrained(bql, target.node, inside);
      });
      sections++;
    }
    return sections;
  };

  const load = Promise.all(disks.flatMap((disk, d) => Array.from({ length: o.submittersPerDisk }, (_, s) => submitter(disk, d, s))));
  const ctl = controller();
  await load;
  running = false;
  const sections = await ctl;

  await withBql(async (bql) => {
    for (const [d, disk] of disks.entries()) {
      blkDelete(bql, disk.blk);
      await closeNode(bql, disk.node);
      const at = firstDiff(fs.readFileSync(disk.file), disk.model);
      if (at >= 0) mismatches.push(`final: disk ${d} differs from the reference at byte ${at}`);
    }
    for (const t of new Set(disks.map((x) => x.thread))) await destroyIOThread(bql, t);
  });
  fs.rmSync(dir, { recursive: true, force: true });
  return { ops, sections, mismatches };
}

/**
 * FUA writes (BDRV_REQ_FUA): a write or write-zeroes made with `{ fua: true }` is durable when it
 * returns. raw passes the flag to its file; qcow2 and the protocol drivers without native FUA get
 * QEMU's emulation (the write, then a flush of the node inside the same request).
 *
 * The disk is crashsim's (test/helpers/crash-driver.ts): a returned write is only pending in a
 * volatile cache until a flush. After every FUA request the disk's durable image (what survives any
 * power cut now) is opened on its own: every FUA-written range must read back, and the image must
 * open. Writes go to disjoint slots so that each one's bytes can be judged alone. The control: a
 * plain write is not durable when it returns (the simulator's cache is real, so the test can fail).
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { withBql } from '../src/block/bql.js';
import { withDrained } from '../src/block/drain.js';
import { closeNode, openNode } from '../src/block/graph.js';
import { shutdownIOThreads } from '../src/block/iothread.js';
import { createQcow2OnNode } from '../src/drivers/qcow2/create.js';
import { openImage } from '../src/image.js';
import { createCrashDisk, crashDisks, durableBytes, persistedBytes } from './helpers/crash-driver.js';
import { prng } from './helpers/prng.js';
import { describeInterop, qemu, qemuStatus } from './helpers/qemu.js';
import { ioMain } from '../src/cli/io.js';

const SIZE = 8 * 1024 * 1024;
const SLOT = 128 * 1024;
const SLOTS = SIZE / SLOT;

afterAll(async () => {
  crashDisks.clear();
  await withBql((bql) => shutdownIOThreads(bql));
});

/** The pristine bytes of a disk holding a new image of `format`. */
async function pristine(format: 'raw' | 'qcow2', tag: string): Promise<Uint8Array> {
  const id = `${tag}-pristine`;
  createCrashDisk(id, format === 'raw' ? new Uint8Array(SIZE) : new Uint8Array(0));
  if (format === 'qcow2') {
    await withBql(async (bql) => {
      const node = await openNode(bql, `driver=crashsim,id=${id}`);
      try {
        await withDrained(bql, node, (d) => createQcow2OnNode(bql, d, node, { sizeBytes: SIZE, clusterSize: 65536 }));
      } finally {
        await closeNode(bql, node);
      }
    });
  }
  return persistedBytes(id);
}

interface Op {
  slot: number;
  offset: number;
  data: Uint8Array;
  zero: boolean;
  fua: boolean;
}

/** The ops of one run: each in its own slot, at a random place in it, data or zeros, FUA or not. */
function plan(seed: number, count: number): Op[] {
  const rnd = prng(seed);
  const slots = [...Array(SLOTS).keys()];
  for (let i = slots.length - 1; i > 0; i--) {
    const j = Math.floor(rnd() * (i + 1));
    [slots[i], slots[j]] = [slots[j] as number, slots[i] as number];
  }
  const ops: Op[] = [];
  for (let i = 0; i < count; i++) {
    const slot = slots[i] as number;
    const len = 512 * (1 + Math.floor(rnd() * 64));
    const within = 512 * Math.floor(rnd() * ((SLOT - len) / 512));
    const zero = rnd() < 0.25;
    const data = new Uint8Array(len);
    if (!zero) for (let b = 0; b < len; b++) data[b] = 1 + Math.floor(rnd() * 255);
    ops.push({ slot, offset: slot * SLOT + within, data, zero, fua: i === 0 ? false : rnd() < 0.5 });
  }
  return ops;
}

/** Opens `bytes` as a disk of `format` read-only and reads `op`'s range. */
async function readDurable(format: 'raw' | 'qcow2', id: string, bytes: Uint8Array, op: Op): Promise<Uint8Array> {
  createCrashDisk(id, bytes);
  const img = await openImage(`driver=${format},file.driver=crashsim,file.id=${id}`, { readOnly: true });
  try {
    return await img.read(op.offset, op.data.length);
  } finally {
    await img.close();
    crashDisks.delete(id);
  }
}

function same(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

describe.each(['raw', 'qcow2'] as const)('FUA writes on %s', (format) => {
  it.each([1, 2, 3])('every FUA write is durable when it returns; a plain one is not (seed %i)', async (seed) => {
    const tag = `fua-${format}-${seed}`;
    const base = await pristine(format, tag);
    const id = `${tag}-disk`;
    createCrashDisk(id, base);
    // the first op (never FUA) is filled with non-zero bytes, so its absence is visible
    const ops = plan(seed, 24);
    const first = ops[0];
    if (first === undefined) throw new Error('empty plan');
    if (first.zero) {
      first.zero = false;
      first.data.fill(0x5a);
    }
    const img = await openImage(`driver=${format},file.driver=crashsim,file.id=${id}`);
    const lost: string[] = [];
    let plainPending = false;
    try {
      const done: Op[] = [];
      for (const [k, op] of ops.entries()) {
        if (op.zero) await img.writeZeroes(op.offset, op.data.length, { fua: op.fua });
        else await img.write(op.offset, op.data, { fua: op.fua });
        done.push(op);
        const durable = durableBytes(id);
        if (k === 0) {
          const got = await readDurable(format, `${tag}-d0`, durable, op);
          plainPending = !same(got, op.data);
          continue;
        }
        if (!op.fua) continue;
        for (const d of done) {
          if (!d.fua) continue;
          const got = await readDurable(format, `${tag}-d${k}`, durable, d);
          if (!same(got, d.data)) lost.push(`after op ${k}: FUA ${d.zero ? 'write-zeroes' : 'write'} of ${d.data.length} bytes at ${d.offset} is not durable`);
        }
      }
    } finally {
      await img.close();
      crashDisks.delete(id);
    }
    expect(plainPending, 'a plain write must still be pending in the cache when it returns').toBe(true);
    expect(lost).toEqual([]);
  });
});

describeInterop('qemu-io write -f (FUA)', () => {
  it('`snapstack io` takes -f as qemu-io does, prints the same, and writes the same bytes', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-fua-'));
    try {
      const cmds = ['write -f -P 0x11 0 4k', 'write -f -z 8k 4k', 'write -f -z -u 64k 64k', 'write -P 0x22 -f 1M 512'];
      const results: string[] = [];
      for (const [who, file] of [['qemu-io', 'theirs.qcow2'], ['snapstack', 'ours.qcow2']] as const) {
        const f = path.join(dir, file);
        qemu('qemu-img', ['create', '-q', '-f', 'qcow2', f, '4M']);
        const args = ['-f', 'qcow2', ...cmds.flatMap((c) => ['-c', c]), f];
        if (who === 'qemu-io') results.push(qemu('qemu-io', args));
        else {
          const out: string[] = [];
          const status = await ioMain(args, (s) => out.push(s), (s) => out.push(`stderr: ${s}`));
          expect(status).toBe(0);
          results.push(out.map((l) => `${l}\n`).join(''));
        }
      }
      const strip = (s: string): string => s.replace(/\(.*\)/g, '(T)').replace(/[\d.]+ (sec|ops)/g, 'N $1');
      expect(strip(results[1] ?? '')).toBe(strip(results[0] ?? ''));
      expect(qemuStatus('qemu-img', ['compare', '-q', path.join(dir, 'theirs.qcow2'), path.join(dir, 'ours.qcow2')]).status).toBe(0);
      expect(qemuStatus('qemu-img', ['check', '-q', path.join(dir, 'ours.qcow2')]).status).toBe(0);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

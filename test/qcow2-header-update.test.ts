/**
 * The crash-safe header rewrite (src/drivers/qcow2/header-update.ts) under the power-loss
 * simulator (test/helpers/crash-driver.ts: between flushes any subset of the writes persists, each
 * torn at 512-byte sectors). Images made by qemu-img (whose v3 header with the feature-name table
 * fills sector 0 exactly) get their backing file name and format changed by updateBackingInHeader
 * with a power cut at every write and flush; every image the disk may hold afterwards must pass
 * `qemu-img check` clean, show the old or the new header in `qemu-img info`, and read the old or
 * the new contents (`qemu-img compare` against a reference). A plain one-write rewrite of the
 * header area (the negative control) must fail the same sweep.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { withBql } from '../src/block/bql.js';
import { shutdownIOThreads } from '../src/block/iothread.js';
import { EXT_FEATURE_TABLE } from '../src/drivers/qcow2/constants.js';
import { headerBackingFileOffset, newHeader, serializeHeader, setHeaderBacking } from '../src/drivers/qcow2/header.js';
import { planHeaderRewrite, updateBackingInHeader } from '../src/drivers/qcow2/header-update.js';
import { Qcow2Instance } from '../src/drivers/qcow2/instance.js';
import { withMetadataLock } from '../src/drivers/qcow2/metadata-lock.js';
import type { Qcow2State } from '../src/drivers/qcow2/state.js';
import { openImage } from '../src/image.js';
import { armCrash, crashDisk, crashImages, createCrashDisk } from './helpers/crash-driver.js';
import { describeInterop, qemu, qemuStatus } from './helpers/qemu.js';

let dir = '';
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-hdr-'));
});
afterAll(async () => {
  if (dir !== '') fs.rmSync(dir, { recursive: true, force: true });
  await withBql((bql) => shutdownIOThreads(bql));
});

type Op = (s: Qcow2State) => Promise<void>;

/** Opens crashsim disk `id` (its backing file not opened), runs `op` on its qcow2 state, closes; BlockErrors after a cut are ignored. */
async function runOn(id: string, op: Op): Promise<void> {
  const img = await openImage(`driver=qcow2,file.driver=crashsim,file.id=${id},backing=null`);
  try {
    const inst = img.backend.root?.instance;
    if (!(inst instanceof Qcow2Instance)) throw new Error('not a qcow2 image');
    await op(inst.state);
  } finally {
    await img.close();
  }
}

/** What qemu-img info says about a header: the fields a header rewrite may change. */
function headerView(file: string): string {
  const info = JSON.parse(qemu('qemu-img', ['info', '--output=json', file])) as Record<string, unknown>;
  return JSON.stringify([info['virtual-size'], info['backing-filename'] ?? null, info['backing-filename-format'] ?? null, info['format-specific']]);
}

/**
 * Runs `op` on a copy of `before` with a power cut at every event; every crash image must be clean,
 * show the old or the new header and read the old or the new contents. Returns the bad images.
 */
async function sweep(name: string, before: Uint8Array, op: Op): Promise<{ bad: string[]; images: number; events: number }> {
  const oldFile = path.join(dir, `${name}-old.qcow2`);
  fs.writeFileSync(oldFile, before);
  createCrashDisk(`${name}-ref`, before);
  armCrash(`${name}-ref`, Infinity);
  await runOn(`${name}-ref`, op);
  const events = crashDisk(`${name}-ref`).events;
  const ref = crashDisk(`${name}-ref`);
  const newFile = path.join(dir, `${name}-new.qcow2`);
  fs.writeFileSync(newFile, ref.durable.slice(0, ref.durableLength));
  const views = new Map([
    [headerView(oldFile), oldFile],
    [headerView(newFile), newFile],
  ]);
  expect(views.size).toBe(2);
  const bad: string[] = [];
  let images = 0;
  for (let n = 0; n <= events; n++) {
    const id = `${name}-${n}`;
    createCrashDisk(id, before);
    armCrash(id, n);
    try {
      await runOn(id, op);
    } catch {
      // a failure after the cut is allowed: the images decide
    }
    for (const c of crashImages(id, { seed: 100 + n, tears: 8, exhaustiveUpTo: 5 })) {
      images++;
      const f = path.join(dir, `${name}-crash.qcow2`);
      fs.writeFileSync(f, c.bytes);
      const where = `cut at event ${n} of ${events}, ${c.label}`;
      const check = qemuStatus('qemu-img', ['check', f]);
      if (check.status !== 0) {
        bad.push(`${where}: check exit ${check.status}: ${check.stderr.trim()}`);
        continue;
      }
      let view = '';
      try {
        view = headerView(f);
      } catch (e) {
        bad.push(`${where}: info failed: ${String(e)}`);
        continue;
      }
      const refFile = views.get(view);
      if (refFile === undefined) {
        bad.push(`${where}: header neither old nor new: ${view}`);
        continue;
      }
      const cmp = qemuStatus('qemu-img', ['compare', '-q', refFile, f]);
      if (cmp.status !== 0) bad.push(`${where}: contents differ from ${path.basename(refFile)}`);
    }
  }
  return { bad, images, events };
}

/** The plain rewrite: the whole new area in one write, then a flush (what the negative control does). */
function plainBackingRewrite(filename: string | null, format: string | null): Op {
  return async (s) => {
    const next = { ...s.header, extensions: s.header.extensions.slice() };
    setHeaderBacking(next, filename, format);
    const bytes = serializeHeader(next, s.clusterSize);
    const end = headerBackingFileOffset(next) + (filename === null ? 0 : Buffer.byteLength(filename));
    await s.writeMeta(0, bytes.subarray(0, Math.max(end, 512)), 'header (plain rewrite)');
    await s.flushFile('plain rewrite');
  };
}

function backingOp(filename: string | null, format: string | null): Op {
  return (s) => withMetadataLock(s, (locked) => updateBackingInHeader(locked, s, filename, format));
}

const LONG_NAME = `${'./'.repeat(300)}base2.qcow2`;

describe('planHeaderRewrite', () => {
  const C = 65536;
  const fresh = (): ReturnType<typeof newHeader> => newHeader({ sizeBytes: 1 << 26, clusterBits: 16, refcountOrder: 4, version: 3, lazyRefcounts: false });

  it('writes sector 0 alone when the new area fits in it', () => {
    const old = fresh();
    const next = fresh();
    next.size = 1 << 27;
    const p = planHeaderRewrite(old, next, C, 't');
    expect(p.intermediate).toBeNull();
    expect(p.tail.length).toBe(0);
  });

  it('writes the tail first when the old area stays in sector 0', () => {
    const old = fresh();
    const next = fresh();
    setHeaderBacking(next, 'base.raw', 'raw');
    const p = planHeaderRewrite(old, next, C, 't');
    expect(p.intermediate).toBeNull();
    expect(p.tail.length).toBeGreaterThan(0);
  });

  it('goes through an intermediate header without the feature table, its name outside both areas, when the areas overlap past sector 0', () => {
    const old = fresh();
    setHeaderBacking(old, 'base.raw', 'raw');
    old.backingFileOffset = headerBackingFileOffset(old);
    const next = fresh();
    setHeaderBacking(next, LONG_NAME, 'qcow2');
    const p = planHeaderRewrite(old, next, C, 't');
    const i = p.intermediate;
    expect(i).not.toBeNull();
    if (i === null) return;
    expect(i.header.extensions.some((e) => e.type === EXT_FEATURE_TABLE)).toBe(false);
    expect(i.header.backingFile).toBe('base.raw');
    // the short name fits in sector 0 beside the intermediate header
    expect(i.nameAt).toBe(0);
    expect(i.header.backingFileOffset + 8).toBeLessThanOrEqual(512);
  });

  it('moves a long name of the intermediate header outside both areas', () => {
    const old = fresh();
    setHeaderBacking(old, LONG_NAME, 'qcow2');
    old.backingFileOffset = headerBackingFileOffset(old);
    const next = fresh();
    setHeaderBacking(next, `${LONG_NAME}x`, 'raw');
    const p = planHeaderRewrite(old, next, C, 't');
    const i = p.intermediate;
    expect(i).not.toBeNull();
    if (i === null) return;
    expect(i.header.backingFile).toBe(LONG_NAME);
    const oldEnd = old.backingFileOffset + LONG_NAME.length;
    expect(i.nameAt).toBeGreaterThanOrEqual(Math.max(512 + p.tail.length, oldEnd));
  });

  it('refuses when no intermediate header fits in sector 0', () => {
    const old = fresh();
    old.extensions.push({ type: 0x12345678, data: new Uint8Array(600) });
    const next = fresh();
    next.extensions.push({ type: 0x12345678, data: new Uint8Array(640) });
    expect(() => planHeaderRewrite(old, next, C, 't.qcow2')).toThrow(/cannot rewrite the header crash-safely/);
  });
});

describeInterop('crash-safe header rewrite', () => {
  let plain = new Uint8Array(0);
  let withBacking = new Uint8Array(0);
  let withLong = new Uint8Array(0);

  beforeAll(() => {
    qemu('qemu-img', ['create', '-q', '-f', 'raw', path.join(dir, 'base.raw'), '4M']);
    qemu('qemu-io', ['-f', 'raw', '-c', 'write -P 7 0 4M', path.join(dir, 'base.raw')]);
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', path.join(dir, 'base2.qcow2'), '4M']);
    qemu('qemu-io', ['-c', 'write -P 9 0 4M', path.join(dir, 'base2.qcow2')]);
    const top = path.join(dir, 'top.qcow2');
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', top, '4M']);
    qemu('qemu-io', ['-c', 'write -P 1 64k 64k', top]);
    plain = new Uint8Array(fs.readFileSync(top)); // a copy: crash-driver's slice() of a Buffer would alias it
    qemu('qemu-img', ['rebase', '-u', '-b', 'base.raw', '-F', 'raw', top]);
    withBacking = new Uint8Array(fs.readFileSync(top)); // a copy: crash-driver's slice() of a Buffer would alias it
    qemu('qemu-img', ['rebase', '-u', '-b', LONG_NAME, '-F', 'qcow2', top]);
    withLong = new Uint8Array(fs.readFileSync(top)); // a copy: crash-driver's slice() of a Buffer would alias it
  });

  it('adding a backing file to a qemu-img image (area past sector 0): every crash state is the old or the new header', async () => {
    const r = await sweep('add', plain, backingOp('base.raw', 'raw'));
    expect(r.bad).toEqual([]);
    expect(r.images).toBeGreaterThan(r.events);
  }, 300_000);

  it('replacing a short backing name by a 611-byte one (the areas overlap past sector 0: the intermediate header)', async () => {
    const r = await sweep('long', withBacking, backingOp(LONG_NAME, 'qcow2'));
    expect(r.bad).toEqual([]);
    expect(r.images).toBeGreaterThan(r.events);
  }, 300_000);

  it('replacing a long backing name by another long one (the intermediate header names the old file from a spot past both areas)', async () => {
    const r = await sweep('long2', withLong, backingOp(`${'./'.repeat(290)}base.raw`, 'raw'));
    expect(r.bad).toEqual([]);
    expect(r.images).toBeGreaterThan(r.events);
  }, 300_000);

  it('replacing a long backing name by a short one, and removing it (one sector-0 write)', async () => {
    const a = await sweep('short', withLong, backingOp('base.raw', 'raw'));
    expect(a.bad).toEqual([]);
    const b = await sweep('remove', withLong, backingOp(null, null));
    expect(b.bad).toEqual([]);
  }, 300_000);

  it('the new header matches what qemu-img rebase -u writes', async () => {
    createCrashDisk('match', plain);
    await runOn('match', backingOp('base.raw', 'raw'));
    const d = crashDisk('match');
    const ours = d.durable.slice(0, d.durableLength);
    const diff: number[] = [];
    for (let i = 0; i < 1024; i++) if (ours[i] !== withBacking[i]) diff.push(i);
    expect(diff).toEqual([]);
  }, 60_000);

  it('negative control: a plain rewrite of the area fails the same sweep', async () => {
    const r = await sweep('plain', withBacking, plainBackingRewrite(LONG_NAME, 'qcow2'));
    expect(r.bad.length).toBeGreaterThan(0);
  }, 300_000);
});

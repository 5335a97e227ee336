/**
 * savevm, loadvm and delvm all or nothing under 1 to 3 write failures at any write of any disk
 * (a qcow2 disk holding the VM state, a second qcow2 disk and a raw disk whose snapshot store
 * sits below the fault filter). Each case counts the operation's writes on every disk with a dry
 * run, then fails a seeded choice of 1 to 3 of them (some carried out before their error, as a
 * lost acknowledgement; in a quarter of the cases one disk dies for good) and checks against a
 * reference model (one byte array per disk and per
 * snapshot, and a marker in guest RAM):
 * - every tag on all disks or on none, and one savevm per tag;
 * - each disk's active contents are the state before or the state after, as the error says;
 * - undo snapshots are present exactly where the error says they are;
 * - the next operation (the recovery it runs first) works and leaves the invariants true;
 * - `qemu-img check` of the qcow2 images exits 0 or 3 (leaks only) after every case.
 * A seeded subset runs by default; SNAPSTACK_LONG_SWEEPS=1 runs every single fault and many more
 * combinations.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { bdrvSnapshotList, blkPread, blkPwrite, shutdownIOThreads, withBql } from '../src/index.js';
import type { SnapshotInfo } from '../src/block/driver.js';
import { sameSavevm } from '../src/block/snapshot-group.js';
import { createQcow2File } from '../src/drivers/qcow2/create.js';
import { Machine } from '../src/machine/machine.js';
import { delVm, loadVm, recoverVmSnapshots, saveVm, UNDO_PREFIX, VmSnapshotError } from '../src/machine/savevm.js';
import { faultSwitch, planFaults, type FaultSwitch } from './helpers/faulty-driver.js';
import { describeInterop, qemuStatus } from './helpers/qemu.js';
import { prng as rng } from './helpers/prng.js';

const LONG = process.env['SNAPSTACK_LONG_SWEEPS'] === '1';
const KiB = 1024;
const MiB = 1024 * KiB;
const DISK_BYTES = 256 * KiB;
/** Where the marker of guest RAM sits (in the pattern area past the workload's tables). */
const RAM_MARK = 1 * MiB - 8;

let dir: string;
beforeAll(() => {
  const base = fs.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir();
  dir = fs.mkdtempSync(path.join(base, 'snapstack-savevm-faults-'));
});
afterAll(async () => {
  fs.rmSync(dir, { recursive: true, force: true });
  await withBql((bql) => shutdownIOThreads(bql));
});

type Op = 'savevm-replace' | 'savevm-new' | 'loadvm' | 'delvm';

interface Fault {
  disk: string;
  index: number;
  lostAck: boolean;
  /** The disk fails every write from this one on (a disk that died): retries cannot help. */
  persistent?: boolean;
}

/** The machine under test, its fault switches and the reference model. */
class Rig {
  readonly m: Machine;
  readonly files: Record<string, string> = {};
  readonly sw = new Map<string, FaultSwitch>();
  /** Active contents of each disk, as they must be. */
  readonly model = new Map<string, Uint8Array>();
  /** Per tag: each disk's contents and the RAM marker when it was saved. */
  readonly snaps = new Map<string, { disks: Map<string, Uint8Array>; mark: number }>();
  private mark = 1;
  private constructor(
    m: Machine,
    readonly names: string[],
  ) {
    this.m = m;
  }

  static async create(prefix: string): Promise<Rig> {
    const m = new Machine({ guest: false, vcpus: 1, ramBytes: 1 * MiB });
    const rig = new Rig(m, ['q', 'q2', 'r']);
    await withBql(async (bql) => {
      for (const id of rig.names) {
        const f = path.join(dir, `${prefix}-${id}.${id === 'r' ? 'raw' : 'qcow2'}`);
        rig.files[id] = f;
        if (id === 'r') fs.writeFileSync(f, Buffer.alloc(DISK_BYTES));
        else createQcow2File(bql, f, { sizeBytes: DISK_BYTES });
        const tag = `${prefix}-${id}`;
        rig.sw.set(id, faultSwitch(tag));
        const fmt = id === 'r' ? 'raw' : 'qcow2';
        await m.addDrive(bql, `driver=${fmt},file.driver=faulty,file.tag=${tag},file.file.driver=file,file.file.filename=${f},file.file.aio=sync,id=${id}`);
        rig.model.set(id, new Uint8Array(DISK_BYTES));
      }
      await m.start(bql);
      await m.stop(bql);
    });
    return rig;
  }

  /** The guest writes: a few random 4 KiB blocks of every disk, and a new RAM marker. */
  async scribble(r: () => number): Promise<void> {
    for (const id of this.names) {
      const disk = this.m.disks.find((d) => d.id === id);
      const want = this.model.get(id);
      if (disk === undefined || want === undefined) throw new Error(`no disk ${id}`);
      for (let i = 0; i < 3; i++) {
        const off = Math.floor(r() * (DISK_BYTES / 4096)) * 4096;
        const buf = new Uint8Array(4096).fill(Math.floor(r() * 255) + 1);
        buf[0] = this.mark & 0xff;
        await blkPwrite(disk.blk, off, buf);
        want.set(buf, off);
      }
    }
    this.mark++;
    new DataView(this.m.ram).setFloat64(RAM_MARK, this.mark);
  }

  ramMark(): number {
    return new DataView(this.m.ram).getFloat64(RAM_MARK);
  }

  async contents(id: string): Promise<Uint8Array> {
    const disk = this.m.disks.find((d) => d.id === id);
    if (disk === undefined) throw new Error(`no disk ${id}`);
    const buf = new Uint8Array(DISK_BYTES);
    await blkPread(disk.blk, 0, buf);
    return buf;
  }

  async lists(): Promise<Map<string, SnapshotInfo[]>> {
    return withBql(async (bql) => {
      const out = new Map<string, SnapshotInfo[]>();
      for (const d of this.m.disks) out.set(d.id, await bdrvSnapshotList(bql, d.node));
      return out;
    });
  }

  /** Every tag on all disks or none, one savevm each; returns the tags present. */
  async expectTagsWhole(label: string): Promise<Set<string>> {
    const lists = await this.lists();
    const tags = new Set<string>();
    for (const l of lists.values()) for (const s of l) if (!s.name.startsWith(UNDO_PREFIX)) tags.add(s.name);
    for (const t of tags) {
      const per = [...lists].map(([d, l]) => [d, l.filter((s) => s.name === t)] as const);
      for (const [d, l] of per) expect(l.length, `${label}: tag '${t}' on disk '${d}' (${JSON.stringify([...lists].map(([x, y]) => [x, y.map((s) => s.name)]))})`).toBe(1);
      const first = per[0]?.[1][0];
      if (first !== undefined) for (const [d, l] of per) expect(sameSavevm(l[0] as SnapshotInfo, first), `${label}: tag '${t}' on '${d}' is another savevm's`).toBe(true);
    }
    return tags;
  }

  async undoSnapshots(): Promise<string[]> {
    const out: string[] = [];
    for (const [d, l] of await this.lists()) for (const s of l) if (s.name.startsWith(UNDO_PREFIX)) out.push(`${d}:${s.id}`);
    return out.sort();
  }

  async expectContents(label: string, want: Map<string, Uint8Array> | null, ids: string[] = this.names): Promise<void> {
    for (const id of ids) {
      const exp = want === null ? this.model.get(id) : want.get(id);
      const got = await this.contents(id);
      expect(exp !== undefined && Buffer.compare(Buffer.from(got), Buffer.from(exp)) === 0, `${label}: contents of '${id}'`).toBe(true);
    }
  }

  /** The number of writes each disk sees during `run` (no fault fires: the plan is empty). */
  async countWrites(run: () => Promise<unknown>): Promise<Map<string, number>> {
    for (const s of this.sw.values()) planFaults(s, []);
    try {
      await run();
    } finally {
      for (const s of this.sw.values()) s.plan = null;
    }
    return new Map([...this.sw].map(([d, s]) => [d, s.seen]));
  }

  arm(faults: Fault[]): void {
    for (const [d, s] of this.sw) {
      const mine = faults.filter((f) => f.disk === d);
      planFaults(
        s,
        mine.flatMap((f) => (f.persistent === true ? Array.from({ length: 2000 }, (_, k) => f.index + k) : [f.index])),
        mine.filter((f) => f.lostAck).map((f) => f.index),
      );
    }
  }

  disarm(): number {
    let fired = 0;
    for (const s of this.sw.values()) {
      if (s.plan !== null) fired += [...s.plan].filter((i) => i < s.seen).length;
      s.plan = null;
    }
    return fired;
  }

  async shutdown(): Promise<void> {
    this.disarm();
    await withBql((bql) => this.m.shutdown(bql));
  }

  /** qemu-img check on the qcow2 images: 0 (clean) or 3 (leaks only). */
  expectImagesClean(label: string): void {
    for (const id of ['q', 'q2']) {
      const f = this.files[id] as string;
      const chk = qemuStatus('qemu-img', ['check', '-U', f]);
      expect(chk.status === 0 || chk.status === 3, `${label}: qemu-img check ${id}: ${chk.stdout}${chk.stderr}`).toBe(true);
    }
  }

  /** Snapshot model bookkeeping after a savevm of `tag` that took effect. */
  recordSave(tag: string): void {
    this.snaps.set(tag, { disks: new Map([...this.model].map(([d, b]) => [d, b.slice()])), mark: this.ramMark() });
  }
}

/** Runs `op` with no faults (to set up the baseline or as "the next operation"). */
async function plain(rig: Rig, op: Op, tag: string): Promise<void> {
  const m = rig.m;
  if (op === 'loadvm') {
    await withBql((bql) => loadVm(bql, m, tag));
    const s = rig.snaps.get(tag);
    if (s === undefined) throw new Error(`no model for ${tag}`);
    for (const [d, b] of s.disks) rig.model.set(d, b.slice());
  } else if (op === 'delvm') {
    expect(await withBql((bql) => delVm(bql, m, tag))).toEqual([]);
    rig.snaps.delete(tag);
  } else {
    await withBql((bql) => saveVm(bql, m, tag));
    rig.recordSave(tag);
  }
}

/** One case: `op` with `faults` armed; asserts every invariant, then that the next operation works. */
async function runCase(rig: Rig, op: Op, faults: Fault[], label: string, r: () => number): Promise<{ failed: boolean; fired: number }> {
  const m = rig.m;
  const tag = op === 'savevm-new' ? 'B' : 'A';
  const before = new Map([...rig.model].map(([d, b]) => [d, b.slice()]));
  const markBefore = rig.ramMark();
  const listsBefore = await rig.lists();
  rig.arm(faults);
  let error: unknown = null;
  let okResult: unknown = null;
  try {
    if (op === 'loadvm') okResult = await withBql((bql) => loadVm(bql, m, tag));
    else if (op === 'delvm') okResult = await withBql((bql) => delVm(bql, m, tag));
    else okResult = await withBql((bql) => saveVm(bql, m, tag));
  } catch (e) {
    error = e;
  }
  const fired = rig.disarm();
  const failedDelvm = op === 'delvm' && Array.isArray(okResult) && okResult.length > 0;
  const failed = error !== null || failedDelvm;
  if (error !== null) {
    expect(error, `${label}: ${String(error)}`).toBeInstanceOf(VmSnapshotError);
    expect(String(error)).not.toMatch(/RangeError|TypeError|at .*\.js:/);
  }
  const detail = error instanceof VmSnapshotError ? error.detail : null;

  if (op === 'loadvm') {
    const undo = await rig.undoSnapshots();
    if (error === null) {
      await rig.expectContents(`${label} (loaded)`, rig.snaps.get(tag)?.disks ?? null);
      expect(rig.ramMark(), `${label}: RAM loaded`).toBe(rig.snaps.get(tag)?.mark);
      const warnings = (okResult as { warnings: string[] }).warnings;
      if (warnings.length === 0) expect(undo, `${label}: no undo snapshot after success`).toEqual([]);
      else {
        // the warning names every undo snapshot that remains, and the next operation deletes them
        for (const u of undo) expect(warnings.join('\n'), label).toMatch(new RegExp(`\\(ID ${u.split(':')[1] ?? ''}\\) on '${u.split(':')[0] ?? ''}'`));
        expect(undo.length, `${label}: the warning names undo snapshots that remain`).toBeGreaterThan(0);
        expect(await withBql((bql) => recoverVmSnapshots(bql, m))).toHaveLength(1);
      }
      const s = rig.snaps.get(tag);
      if (s !== undefined) for (const [d, b] of s.disks) rig.model.set(d, b.slice());
    } else {
      if (detail === null) throw new Error('unreachable');
      expect(rig.ramMark(), `${label}: RAM untouched`).toBe(markBefore);
      // undo snapshots are present exactly where the error says
      expect(undo, `${label}: undo snapshots vs the error: ${String(error)}`).toEqual(detail.undoKept.map((u) => `${u.disk}:${u.id}`).sort());
      const settled = [...detail.disks].filter(([, s]) => s !== 'unknown').map(([d]) => d);
      await rig.expectContents(`${label} (put back)`, before, settled);
      if (detail.pending) {
        expect(m.runState).toBe('paused');
        // recovery: every disk back at the state before loadvm, no undo left
        const lines = await withBql((bql) => recoverVmSnapshots(bql, m));
        expect(lines.length, label).toBe(1);
      } else expect(undo).toEqual([]);
      await rig.expectContents(`${label} (after recovery)`, before);
      expect(await rig.undoSnapshots(), `${label}: undo snapshots after recovery`).toEqual([]);
    }
  } else if (op === 'delvm') {
    await rig.expectContents(`${label} (delvm changes no contents)`, before);
    if (!failed) {
      rig.snaps.delete(tag);
      const tags = await rig.expectTagsWhole(label);
      expect(tags.has(tag), `${label}: deleted`).toBe(false);
    } else {
      const lists = await rig.lists();
      const holders = [...lists].filter(([, l]) => l.some((s) => s.name === tag)).map(([d]) => d);
      const text = (okResult as string[]).join('\n');
      if (holders.length === rig.names.length) expect(text, label).toMatch(/nothing was deleted/);
      else for (const h of holders) expect(text, `${label}: the error names '${h}'`).toMatch(new RegExp(`on '${h}'`));
      // the next operation finishes it
      await withBql((bql) => recoverVmSnapshots(bql, m));
      const after = await rig.lists();
      const still = [...after].filter(([, l]) => l.some((s) => s.name === tag)).map(([d]) => d);
      if (holders.length === rig.names.length) expect(still.length === 0 || still.length === rig.names.length).toBe(true);
      else expect(still, `${label}: delvm finished by the next operation`).toEqual([]);
      if (still.length === 0) rig.snaps.delete(tag);
    }
  } else {
    await rig.expectContents(`${label} (savevm changes no contents)`, before);
    const newer = (l: SnapshotInfo[]): SnapshotInfo[] => l.filter((s) => s.name === tag && !(listsBefore.get('q') ?? []).some((o) => o.name === tag && sameSavevm(o, s)));
    const lists = await rig.lists();
    if (error === null) {
      rig.recordSave(tag);
      for (const [d, l] of lists) expect(l.filter((s) => s.name === tag).length, `${label}: one '${tag}' on '${d}'`).toBe(1);
    } else {
      if (detail === null) throw new Error('unreachable');
      if (detail.committed) {
        rig.recordSave(tag);
        for (const [d, l] of lists) expect(newer(l).length, `${label}: committed savevm on '${d}'`).toBe(1);
      } else {
        // no disk holds the new snapshot except those the error names
        const withNew = [...lists].filter(([, l]) => newer(l).length > 0).map(([d]) => d).sort();
        expect(withNew, `${label}: leftovers vs the error: ${String(error)}`).toEqual(detail.leftovers.map((x) => x.disk).sort());
        // the older snapshot of the tag is intact everywhere
        for (const [d, l] of lists) expect(l.filter((s) => s.name === tag).length - newer(l).length, `${label}: old '${tag}' on '${d}'`).toBe(op === 'savevm-replace' ? 1 : 0);
      }
      if (detail.pending) await withBql((bql) => recoverVmSnapshots(bql, m));
    }
  }
  // whatever happened: every tag whole, no undo left, the images sound, and the next operation works
  const tags = await rig.expectTagsWhole(`${label} (after)`);
  expect(await rig.undoSnapshots(), `${label}: no undo snapshot left`).toEqual([]);
  rig.expectImagesClean(label);
  for (const t of tags) expect(rig.snaps.has(t), `${label}: tag '${t}' is one the model knows`).toBe(true);
  for (const t of rig.snaps.keys()) expect(tags.has(t), `${label}: tag '${t}' the model knows is there`).toBe(true);
  if (tags.has('A')) {
    await rig.scribble(r);
    await plain(rig, 'loadvm', 'A');
    await rig.expectContents(`${label}: the next loadvm`, null);
    expect(rig.ramMark()).toBe(rig.snaps.get('A')?.mark);
  }
  // back to the baseline: tag A present, tag B absent
  if (tags.has('B')) await plain(rig, 'delvm', 'B');
  if (!rig.snaps.has('A')) await plain(rig, 'savevm-replace', 'A');
  await rig.scribble(r);
  return { failed, fired };
}

/** The fault combinations of one sweep: every single fault when long, seeded samples of 1 to 3. */
function combos(counts: Map<string, number>, r: () => number, samples: number): Fault[][] {
  const points: Array<[string, number]> = [];
  for (const [d, n] of counts) for (let i = 0; i < n + 4; i++) points.push([d, i]);
  const out: Fault[][] = [];
  if (LONG) for (const [d, i] of points) out.push([{ disk: d, index: i, lostAck: false }], [{ disk: d, index: i, lostAck: true }]);
  for (let k = 0; k < samples; k++) {
    const n = 1 + (k % 3);
    const chosen: Fault[] = [];
    for (let j = 0; j < n; j++) {
      const p = points[Math.floor(r() * points.length)];
      if (p === undefined) continue;
      if (chosen.some((c) => c.disk === p[0] && c.index === p[1])) continue;
      const lost = r() < 0.3;
      // a quarter of the cases lose one disk for good: half of them early in the operation (before
      // its commit point), half anywhere (so that putting a disk back fails too)
      if (k % 4 === 3 && j === 0) chosen.push({ disk: p[0], index: k % 8 === 3 ? Math.floor(r() * Math.min(3, p[1] + 1)) : p[1], lostAck: false, persistent: true });
      else chosen.push({ disk: p[0], index: p[1], lostAck: lost });
    }
    out.push(chosen);
  }
  return out;
}

const OPS: Op[] = ['savevm-replace', 'savevm-new', 'loadvm', 'delvm'];
const SAMPLES = LONG ? 400 : 24;

describeInterop('savevm, loadvm and delvm under 1 to 3 write faults on qcow2 and raw disks', () => {
  for (const [n, op] of OPS.entries()) {
    it(`${op} is all or nothing at every fault combination tried, and the next operation works`, { timeout: LONG ? 3_600_000 : 240_000 }, async () => {
      const rig = await Rig.create(`sweep-${op}`);
      const r = rng(0x5eed + n * 7919);
      let tried = 0;
      let failedCases = 0;
      let firedFaults = 0;
      try {
        await rig.scribble(r);
        await plain(rig, 'savevm-replace', 'A');
        await rig.scribble(r);
        // the writes of one fault-free run of the operation on each disk
        const counts = await rig.countWrites(() => plain(rig, op, op === 'savevm-new' ? 'B' : 'A'));
        if (op === 'delvm') await plain(rig, 'savevm-replace', 'A');
        if (op === 'savevm-new') await plain(rig, 'delvm', 'B');
        await rig.scribble(r);
        expect([...counts.values()].reduce((a, b) => a + b, 0)).toBeGreaterThan(0);
        for (const faults of combos(counts, r, SAMPLES)) {
          const label = `${op} with faults ${JSON.stringify(faults)}`;
          const res = await runCase(rig, op, faults, label, r);
          tried++;
          if (res.failed) failedCases++;
          firedFaults += res.fired;
        }
      } finally {
        await rig.shutdown();
      }
      // the sweep must have made the operation fail, not only passed by it
      // (delvm retries a failed delete and counts one that took effect, so only a disk that died fails it)
      expect(failedCases).toBeGreaterThan(op === 'delvm' ? 0 : tried / 8);
      expect(firedFaults).toBeGreaterThan(tried / 2);
      console.log(`savevm-faults ${op}: ${tried} fault combinations, ${failedCases} failed operations, ${firedFaults} faults fired, 0 invariant violations`);
    });
  }
});

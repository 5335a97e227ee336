/**
 * The raw-snapshot store (src/drivers/file/snapshot-store.ts) under the power-loss simulator
 * (test/helpers/power-loss-fs.ts): a crash at every operation of snapshot create, goto (to a
 * different disk size) and delete, and after each crash every file system the disk may then hold
 * (every subset of the pending writes and name operations when they are few, seeded-random
 * subsets when many, and torn writes). After each crash the store is reopened and must show:
 * the image holding the old or the new contents, whole; every listed snapshot complete (its disk
 * and VM state byte for byte); the old snapshot list or the new one; the new state when the
 * operation had returned; no write that was flushed before the operation lost; and a store that
 * still takes a new snapshot.
 *
 * SNAPSTACK_CRASH_FULL=1 widens the random part (more subsets per crash point).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { withBql } from '../src/block/bql.js';
import { withDrained } from '../src/block/drain.js';
import type { SnapshotInfo } from '../src/block/driver.js';
import { closeNode, openNode } from '../src/block/graph.js';
import type { BlockNode } from '../src/block/node.js';
import '../src/drivers/index.js';
import { FileSnapshotStore } from '../src/drivers/file/snapshot-store.js';
import { PowerLossFs } from './helpers/power-loss-fs.js';

const IMG = '/sim/disk.img';
const PENDING = '/sim/disk.img.snapshots/pending.vmstate';
const FULL = process.env['SNAPSTACK_CRASH_FULL'] === '1';
const RANDOM = FULL ? 512 : 48;

function pattern(sectors: number, seed: number): Uint8Array {
  const b = new Uint8Array(sectors * 512);
  for (let i = 0; i < b.length; i++) b[i] = (seed + i * 7 + (i >> 9)) & 0xff;
  return b;
}

const A = pattern(4, 0xa1); // the image when s1 is taken
const B = pattern(6, 0xb2); // when s2 is taken
const C = pattern(8, 0xc3); // the image, flushed, when the operation under test starts
const V1 = pattern(3, 0x11); // s1's VM state
const V3 = pattern(2, 0x33); // the VM state saved for s3

let node: BlockNode;

beforeAll(async () => {
  node = await withBql((bql) => openNode(bql, 'driver=memory,size=1M'));
});
afterAll(async () => {
  await withBql((bql) => closeNode(bql, node));
});

function info(name: string, vmStateSize: number): SnapshotInfo {
  return { id: '', name, vmStateSize, dateSec: 1, dateNsec: 0, vmClockNsec: 0, icount: -1 };
}

async function drained<T>(fn: (bql: Parameters<Parameters<typeof withBql>[0]>[0], d: Parameters<Parameters<typeof withDrained>[2]>[0]) => T): Promise<T> {
  return withBql((bql) => withDrained(bql, node, (d) => fn(bql, d)));
}

/** Writes `data` as the whole image and flushes it (an acknowledged, flushed user write). */
function writeImage(fs: PowerLossFs, fd: number, data: Uint8Array): void {
  fs.write(fd, data, 0);
  fs.fsync(fd);
}

/** Saves VM state into the pending sidecar (not flushed: the store must flush it). */
function saveVm(fs: PowerLossFs, store: FileSnapshotStore, data: Uint8Array): void {
  const fd = store.openPendingForWrite();
  fs.write(fd, data, 0);
  fs.close(fd);
}

/**
 * The starting point of every run: s1 (A, V1) and s2 (B) taken, the image holding C, flushed, all
 * settled; with `empty`, only the image holding A (no store yet).
 */
async function base(empty = false): Promise<{ fs: PowerLossFs; store: FileSnapshotStore; fd: number }> {
  const fs = new PowerLossFs(['/sim']);
  const store = new FileSnapshotStore(node, IMG, fs);
  const fd = fs.open(IMG, 'w');
  fs.fsyncDir('/sim');
  writeImage(fs, fd, A);
  if (empty) {
    fs.settle();
    return { fs, store, fd };
  }
  saveVm(fs, store, V1);
  await drained((bql, d) => store.create(bql, d, fd, info('s1', V1.length)));
  writeImage(fs, fd, B);
  await drained((bql, d) => store.create(bql, d, fd, info('s2', 0)));
  writeImage(fs, fd, C);
  fs.settle();
  return { fs, store, fd };
}

interface Expect {
  /** The contents the image may hold after a crash (the first: the old one). */
  images: Uint8Array[];
  /** The image once the operation returned. */
  imageAfter: Uint8Array;
  /** Snapshots that may be listed, with their disk and VM state. */
  snapshots: Record<string, { disk: Uint8Array; vm: Uint8Array | null }>;
  /** Lists that may be seen (in order); the last is the one once the operation returned. */
  lists: string[][];
  /** Checked on the file system after a returned operation (e.g. the pending VM state). */
  afterReturn?: (fs: PowerLossFs) => void;
}

function same(a: Uint8Array | undefined, b: Uint8Array): boolean {
  return a !== undefined && a.length === b.length && Buffer.compare(Buffer.from(a), Buffer.from(b)) === 0;
}

/** Everything the reopened store must show after a crash; returns a description of the first violation. */
async function verify(st: PowerLossFs, ex: Expect, returned: boolean): Promise<string | null> {
  const image = st.contents(IMG);
  if (image === undefined) return 'the image is gone';
  const allowed = returned ? [ex.imageAfter] : ex.images;
  if (!allowed.some((x) => same(image, x))) return `the image holds neither the old nor the new contents (${image.length} bytes)`;
  const store = new FileSnapshotStore(node, IMG, st);
  let names: string[];
  try {
    names = (await withBql((bql) => store.list(bql))).map((s) => s.name);
  } catch (e) {
    return `the store cannot be read: ${(e as Error).message}`;
  }
  const okLists = returned ? ex.lists.slice(-1) : ex.lists;
  if (!okLists.some((l) => l.join(',') === names.join(','))) return `snapshot list [${names.join(',')}] is neither of [${okLists.map((l) => l.join(',')).join('] [')}]`;
  for (const name of names) {
    const want = ex.snapshots[name];
    if (want === undefined) return `unexpected snapshot ${name}`;
    let r;
    try {
      r = await withBql((bql) => store.openForLoadTmp(bql, null, name));
    } catch (e) {
      return `snapshot ${name} is listed but incomplete: ${(e as Error).message}`;
    }
    const disk = st.fdContents(r.fd);
    st.close(r.fd);
    if (!same(disk, want.disk)) return `snapshot ${name}'s disk differs`;
    if (want.vm !== null) {
      const vm = r.vmStatePath === null ? undefined : st.contents(r.vmStatePath);
      if (!same(vm, want.vm)) return `snapshot ${name}'s VM state differs (${vm?.length ?? 'none'} bytes)`;
    }
  }
  if (returned && ex.afterReturn !== undefined) {
    try {
      ex.afterReturn(st);
    } catch (e) {
      return (e as Error).message;
    }
  }
  // and the store goes on working: a new snapshot after the crash is taken and listed
  try {
    const fd = st.open(IMG, 'r+');
    await drained((bql, d) => store.create(bql, d, fd, info('after-crash', 0)));
    const again = (await withBql((bql) => store.list(bql))).map((s) => s.name);
    if (again[again.length - 1] !== 'after-crash') return `a snapshot taken after the crash is not listed ([${again.join(',')}])`;
  } catch (e) {
    return `the store refuses a snapshot after the crash: ${(e as Error).message}`;
  }
  return null;
}

type Op = (w: { fs: PowerLossFs; store: FileSnapshotStore; fd: number }) => Promise<unknown>;

/** Crashes `op` at every operation it makes; returns the number of crash points and states tried. */
async function sweep(label: string, prepare: Op | null, op: Op, ex: Expect, empty = false): Promise<{ points: number; states: number }> {
  const dry = await base(empty);
  if (prepare !== null) await prepare(dry);
  const before = dry.fs.ops;
  await op(dry);
  const total = dry.fs.ops - before;
  expect(total).toBeGreaterThan(3);
  let states = 0;
  for (let k = 0; k <= total; k++) {
    const w = await base(empty);
    if (prepare !== null) await prepare(w);
    w.fs.armCrash(k);
    let returned = true;
    try {
      await op(w);
    } catch {
      returned = false;
    }
    // a crash in a best-effort step after the commit (removing a dropped file) may still return
    if (k === total) expect(returned, `${label}: the operation without a crash`).toBe(true);
    const survivors = w.fs.crashStates({ seed: 1000 + k, random: RANDOM });
    for (const st of survivors) {
      const bad = await verify(st, ex, returned);
      if (bad !== null) throw new Error(`${label}: crash at operation ${k} of ${total} (${w.fs.log[w.fs.log.length - 1] ?? 'start'} was the last done; ${w.fs.pendingCount()} pending): ${bad}\noperations: ${dry.fs.log.slice(before).join(' | ')}`);
      states++;
    }
  }
  return { points: total + 1, states };
}

const S1 = { disk: A, vm: V1 };
const S2 = { disk: B, vm: null };

describe('raw-snapshot store under power loss', () => {
  it('survives a crash at every operation of a snapshot create with VM state', async () => {
    const r = await sweep(
      'create s3',
      async (w) => saveVm(w.fs, w.store, V3),
      async (w) => drained((bql, d) => w.store.create(bql, d, w.fd, info('s3', V3.length))),
      { images: [C], imageAfter: C, snapshots: { s1: S1, s2: S2, s3: { disk: C, vm: V3 } }, lists: [['s1', 's2'], ['s1', 's2', 's3']] },
    );
    console.log(`create: ${r.points} crash points, ${r.states} crash states, 0 violations`);
  });

  it('survives a crash at every operation of a goto to a snapshot of a smaller disk, its VM state included', async () => {
    const goto: Op = async (w) => {
      const res = await drained((bql, d) => w.store.goto(bql, d, w.fd, 's1'));
      if (res.lateError !== null) throw res.lateError; // what the driver does with it: not acknowledged
    };
    const r = await sweep('goto s1', null, goto, {
      images: [C, A],
      imageAfter: A,
      snapshots: { s1: S1, s2: S2 },
      lists: [['s1', 's2']],
      afterReturn: (st) => {
        if (!same(st.contents(PENDING), V1)) throw new Error("after a returned goto the pending VM state is not s1's");
      },
    });
    console.log(`goto: ${r.points} crash points, ${r.states} crash states, 0 violations`);
  });

  it('survives a crash at every operation of a snapshot delete', async () => {
    const r = await sweep('delete s1', null, async (w) => drained((bql, d) => w.store.delete(bql, d, null, 's1')), {
      images: [C],
      imageAfter: C,
      snapshots: { s1: S1, s2: S2 },
      lists: [['s1', 's2'], ['s2']],
    });
    console.log(`delete: ${r.points} crash points, ${r.states} crash states, 0 violations`);
  });

  it('survives a crash at every operation of the first snapshot of an image (the store directory is created)', async () => {
    const r = await sweep(
      'first create s1',
      async (w) => saveVm(w.fs, w.store, V1),
      async (w) => drained((bql, d) => w.store.create(bql, d, w.fd, info('s1', V1.length))),
      { images: [A], imageAfter: A, snapshots: { s1: S1 }, lists: [[], ['s1']] },
      true,
    );
    console.log(`first create: ${r.points} crash points, ${r.states} crash states, 0 violations`);
  });

  it('survives a crash at every operation of a goto to a snapshot of a larger disk without VM state', async () => {
    const D = pattern(2, 0xd4);
    const r = await sweep(
      'goto s2',
      async (w) => {
        // the image shrunk to D and flushed, VM state saved since: the goto must drop that VM state
        const fd = w.fs.open(IMG, 'w');
        writeImage(w.fs, fd, D);
        w.fs.close(fd);
        saveVm(w.fs, w.store, V3);
      },
      async (w) => {
        const res = await drained((bql, d) => w.store.goto(bql, d, w.fd, 's2'));
        if (res.lateError !== null) throw res.lateError;
      },
      {
        images: [D, B],
        imageAfter: B,
        snapshots: { s1: S1, s2: S2 },
        lists: [['s1', 's2']],
        afterReturn: (st) => {
          if (st.contents(PENDING) !== undefined) throw new Error('after a returned goto to a snapshot without VM state a pending VM state is left');
        },
      },
    );
    console.log(`goto larger: ${r.points} crash points, ${r.states} crash states, 0 violations`);
  });

  it('survives a crash at every operation of a delete of the newest snapshot', async () => {
    const r = await sweep('delete s2', null, async (w) => drained((bql, d) => w.store.delete(bql, d, null, 's2')), {
      images: [C],
      imageAfter: C,
      snapshots: { s1: S1, s2: S2 },
      lists: [['s1', 's2'], ['s1']],
    });
    console.log(`delete newest: ${r.points} crash points, ${r.states} crash states, 0 violations`);
  });

  it('finds a store whose operations never sync anything (the simulator can fail)', async () => {
    // the same create on a file system whose fsyncs do nothing must be caught
    const w = await base();
    saveVm(w.fs, w.store, V3);
    w.fs.fsync = () => {};
    w.fs.fdatasync = () => {};
    w.fs.fsyncDir = () => {};
    await drained((bql, d) => w.store.create(bql, d, w.fd, info('s3', V3.length)));
    const ex: Expect = { images: [C], imageAfter: C, snapshots: { s1: S1, s2: S2, s3: { disk: C, vm: V3 } }, lists: [['s1', 's2'], ['s1', 's2', 's3']] };
    const bad: string[] = [];
    for (const st of w.fs.crashStates({ seed: 7, random: 32 })) {
      const v = await verify(st, ex, true);
      if (v !== null) bad.push(v);
    }
    expect(bad.length).toBeGreaterThan(0);
  });
});

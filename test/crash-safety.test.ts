/**
 * Crash safety of qcow2 metadata updates (issue requirement: "a crash at any write leaves an image
 * that qemu-img check reports with at most leaked clusters, never corruption, and a snapshot that
 * either fully exists or does not").
 *
 * Each scenario builds a pre-operation image with the library on a `crashsim` disk (a power-loss
 * simulator in the style of SQLite's test6.c, test/helpers/crash-driver.ts: writes are held in a
 * volatile cache until a flush, and a crash keeps any subset of them, torn at sectors), runs the
 * operation once without a crash to count its events E (writes and flushes), then for every N in
 * 0..E restores the pre-operation bytes, cuts the power at event N, runs the operation again (it
 * may "succeed": dropped writes look successful), and hands every crash image (the durable bytes
 * plus a subset of the pending writes: exhaustive for up to 3, else none, all, all but each one,
 * random and torn ones; more with SNAPSTACK_LONG_SWEEPS=1) to qemu-img. Two tests per scenario
 * share that one run:
 *
 * - data safety: `qemu-img snapshot -l` lists the old snapshots or the new ones; the active disk
 *   (`qemu-img convert`) holds the old or the new contents, whole (sector by sector for a guest
 *   request not yet flushed), and the new ones once the operation returned; every listed snapshot holds
 *   exactly its contents (a new one: the active contents it was taken from), so a snapshot fully
 *   exists or does not; snapstack reads the same active contents; and `qemu-img check` reports no
 *   harmful error (a refcount below its references, a COPIED flag set on a shared cluster, anything
 *   but leaks and benign COPIED mismatches; see classifyCheck). A harmful COPIED flag is also
 *   demonstrated: a qemu-io write on a copy of the crashed image changes a snapshot.
 * - the issue's wording: `qemu-img check` exits 0 (clean) or 3 (leaks only) at every crash point.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { withBql } from '../src/block/bql.js';
import { withDrained } from '../src/block/drain.js';
import { closeNode, openNode } from '../src/block/graph.js';
import { shutdownIOThreads } from '../src/block/iothread.js';
import { createQcow2OnNode, type Qcow2CreateOptions } from '../src/drivers/qcow2/create.js';
import { l2ForRead, l2Offset, splitGuestOffset } from '../src/drivers/qcow2/cluster-map.js';
import { entryHi, entryLo, entryOffset } from '../src/drivers/qcow2/entries.js';
import { Qcow2Instance } from '../src/drivers/qcow2/instance.js';
import { allocClusters, getRefcount, refblockOffset } from '../src/drivers/qcow2/refcount.js';
import { flushMetadata } from '../src/drivers/qcow2/writeback.js';
import { bdrvCheck } from '../src/block/check.js';
import { bdrvPwrite } from '../src/block/io.js';
import type { Qcow2State } from '../src/drivers/qcow2/state.js';
import { openImage, type Image } from '../src/image.js';
import { setWritebackBarriersDisabledForTesting } from '../src/testing.js';
import { armCrash, crashDisk, crashImages, createCrashDisk, durableBytes, persistedBytes, type CrashImageOptions } from './helpers/crash-driver.js';
import { describeInterop, qemu, qemuStatus } from './helpers/qemu.js';

const MiB = 1024 * 1024;
const KiB = 1024;
/** Virtual size: small, since each crash point reads the active disk and every snapshot whole. */
const VSIZE = 4 * MiB;

let dir = '';
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-crash-'));
});
afterAll(async () => {
  if (dir !== '') fs.rmSync(dir, { recursive: true, force: true });
  await withBql((bql) => shutdownIOThreads(bql));
});

// ---------------------------------------------------------------------------------------------
// library side: images on crashsim disks

function openDisk(id: string, readOnly = false): Promise<Image> {
  return openImage(`driver=qcow2,file.driver=crashsim,file.id=${id}`, { readOnly });
}

/** The qcow2 state behind an open image (read-only inspection: the geometry for the fill loops). */
function stateOf(img: Image): Qcow2State {
  const inst = img.backend.root?.instance;
  if (!(inst instanceof Qcow2Instance)) throw new Error(`image '${img.name}' is not an open qcow2 image`);
  return inst.state;
}

/** Formats a fresh crashsim disk `id` as qcow2, runs `prep` on it and returns the persisted bytes. */
async function buildImage(id: string, create: Qcow2CreateOptions, prep: (img: Image) => Promise<void>): Promise<Uint8Array> {
  createCrashDisk(id);
  await withBql(async (bql) => {
    const node = await openNode(bql, `driver=crashsim,id=${id}`);
    try {
      await withDrained(bql, node, (d) => createQcow2OnNode(bql, d, node, create));
    } finally {
      await closeNode(bql, node);
    }
  });
  const img = await openDisk(id);
  try {
    await prep(img);
  } finally {
    await img.close();
  }
  return persistedBytes(id);
}

function fill(bytes: number, value: number): Uint8Array {
  return new Uint8Array(bytes).fill(value);
}

/** A buffer whose bytes vary (so that a misplaced sector shows), derived from `seed`. */
function pattern(bytes: number, seed: number): Uint8Array {
  const b = new Uint8Array(bytes);
  for (let i = 0; i < bytes; i++) b[i] = (seed * 31 + i * 7 + (i >> 9)) & 0xff;
  return b;
}

/**
 * The lowest cluster index from `from` on with refcount 0: where the next single-cluster
 * allocation lands when no cluster below `from` is free. The scenarios' checkPath confirms on the
 * complete run that the operation took the path meant.
 */
async function nextFreeCluster(s: Qcow2State, from = 0): Promise<number> {
  for (let ci = from; ; ci++) if ((await getRefcount(s, ci)) === 0) return ci;
}

/**
 * Writes whole clusters one at a time at guest clusters `fromCluster`, `fromCluster + 1`, ... (each
 * write allocates one data cluster, plus an L2 table when it starts a new one, and nothing is freed)
 * until `done` holds for the next free host cluster. Returns the next guest cluster not written.
 */
async function fillUntil(img: Image, fromCluster: number, done: (nextFree: number) => boolean): Promise<number> {
  const s = stateOf(img);
  const C = s.clusterSize;
  let g = fromCluster;
  let free = 0;
  for (let guard = 0; guard < 20000; guard++) {
    free = await nextFreeCluster(s, free); // only allocations happen here: the first free cluster only moves up
    if (done(free)) return g;
    await img.write(g * C, pattern(C, g));
    g++;
  }
  throw new Error('fillUntil did not reach its target');
}

/** The number of refcount blocks the image has. */
function refblockCount(s: Qcow2State): number {
  let n = 0;
  for (let b = 0; b < s.reftable.length / 8; b++) if (refblockOffset(s, b) !== 0) n++;
  return n;
}

// ---------------------------------------------------------------------------------------------
// qemu side: what an image holds

interface SnapshotId {
  id: string;
  name: string;
}

interface ImageState {
  /** `ID:TAG` of every snapshot, in table order, as qemu-img snapshot -l lists them. */
  snapshots: string[];
  /** sha256 of the active disk, read by qemu-img convert. */
  active: string;
  /** sha256 of each listed snapshot's disk, by `ID:TAG`. */
  snapshotData: Map<string, string>;
  /** The active disk's bytes. */
  activeBytes: Uint8Array;
}

function key(sn: SnapshotId): string {
  return `${sn.id}:${sn.name}`;
}

function listSnapshots(file: string): SnapshotId[] {
  const out = qemu('qemu-img', ['snapshot', '-l', file]);
  const lines = out.split('\n').filter((l) => l.trim() !== '');
  if (lines.length === 0) return [];
  if (lines[0] !== 'Snapshot list:' || !(lines[1] ?? '').startsWith('ID')) throw new Error(`unexpected qemu-img snapshot -l output:\n${out}`);
  return lines.slice(2).map((l) => {
    const [id, name] = l.trim().split(/\s+/);
    if (id === undefined || name === undefined) throw new Error(`unexpected snapshot line '${l}'`);
    return { id, name };
  });
}

function sha256File(file: string): string {
  return crypto.createHash('sha256').update(fs.readFileSync(file)).digest('hex');
}

function sha256(bytes: Uint8Array): string {
  return crypto.createHash('sha256').update(bytes).digest('hex');
}

/** Reads the active disk (or a snapshot's, `-l snapshot.id=ID`) through qemu-img convert. */
function qemuDiskBytes(file: string, snapshotId?: string): Uint8Array {
  const out = `${file}.${snapshotId === undefined ? 'active' : `sn${snapshotId}`}.raw`;
  const args = ['convert', '-f', 'qcow2', '-O', 'raw'];
  if (snapshotId !== undefined) args.push('-l', `snapshot.id=${snapshotId}`);
  qemu('qemu-img', [...args, file, out]);
  try {
    return fs.readFileSync(out);
  } finally {
    fs.rmSync(out, { force: true });
  }
}

/**
 * The hash of the first VSIZE bytes of a snapshot's disk: qemu-img 7.2 reads a snapshot at the
 * image's current virtual size (load-tmp keeps it), so the same snapshot reads longer or shorter
 * as the active disk is resized. Every scenario's snapshots hold at least VSIZE bytes; the part of
 * a larger one past VSIZE is checked through the active disk after a goto to it.
 */
function snapshotHash(file: string, snapshotId: string): string {
  const b = qemuDiskBytes(file, snapshotId);
  const head = new Uint8Array(VSIZE);
  head.set(b.subarray(0, VSIZE));
  return sha256(head);
}

function qemuState(file: string): ImageState {
  const sns = listSnapshots(file);
  const snapshotData = new Map<string, string>();
  for (const sn of sns) snapshotData.set(key(sn), snapshotHash(file, sn.id));
  const activeBytes = qemuDiskBytes(file);
  return { snapshots: sns.map(key), active: sha256(activeBytes), activeBytes, snapshotData };
}

/**
 * For a guest request that had not been flushed when the power went: whether every 512-byte
 * sector of the active disk holds its old or its new contents (a multi-sector request may tear,
 * as on any disk; nothing else may appear).
 */
function tornBetween(cur: Uint8Array, old: Uint8Array, next: Uint8Array): boolean {
  if (cur.length !== old.length && cur.length !== next.length) return false;
  for (let off = 0; off < cur.length; off += 512) {
    const c = cur.subarray(off, off + 512);
    const same = (x: Uint8Array): boolean => off + c.length <= x.length && Buffer.compare(c, x.subarray(off, off + c.length)) === 0;
    if (!same(old) && !same(next)) return false;
  }
  return true;
}

/** What snapstack reads from the image's active disk. */
async function libraryDiskHash(id: string): Promise<string> {
  const img = await openDisk(id, true);
  try {
    const h = crypto.createHash('sha256');
    for (let off = 0; off < img.size; off += MiB) h.update(await img.read(off, Math.min(MiB, img.size - off)));
    return h.digest('hex');
  } finally {
    await img.close();
  }
}

// ---------------------------------------------------------------------------------------------
// scenarios

interface Scenario {
  name: string;
  create: Qcow2CreateOptions;
  /** Builds the pre-operation image. */
  prep(img: Image): Promise<void>;
  /** The operation under test. */
  op(img: Image): Promise<void>;
  /** Checks, on the completed run (before close), that the operation took the path meant. */
  checkPath?(before: PathFacts, after: PathFacts): void;
  /** qemu-img check's exit status expected before the operation (default 0: clean; 3: leaks). */
  preCheck?: number;
  /** The operation repairs metadata and leaves every guest byte as it was. */
  keepsContents?: boolean;
  /** Guest offset whose L1 entry checkPath looks at. */
  watch?: number;
  /** Guest ranges [offset, bytes] holding data: where the harm demonstration writes. */
  guestRanges: Array<[number, number]>;
  /**
   * A guest request spanning several clusters: until its flush returns, a crash may leave each
   * sector old or new (a torn request), as on any disk; a snapshot operation is never torn.
   */
  torn?: boolean;
}

/** Facts about the metadata, read from the library's state around the completed run. */
interface PathFacts {
  refblocks: number;
  reftableEntries: number;
  /** Host offset of the L2 table that maps the watched guest offset (0: none). */
  l2ForWatch: number;
  /** Host offset of the data cluster that holds the watched guest offset (0: none). */
  dataForWatch: number;
}

async function pathFacts(img: Image, watch: number): Promise<PathFacts> {
  const s = stateOf(img);
  const { l1Index, l2Index } = splitGuestOffset(s, watch);
  const t = await l2ForRead(s, l1Index);
  return {
    refblocks: refblockCount(s),
    reftableEntries: s.reftable.length / 8,
    l2ForWatch: l2Offset(s, l1Index),
    dataForWatch: t === null ? 0 : entryOffset(entryHi(t.view, l2Index), entryLo(t.view, l2Index)),
  };
}

/**
 * The common pre-operation image: data in several L2 tables (several for 512-byte clusters), two
 * snapshots, and active data that differs from both (so clusters are shared 1, 2 and 3 ways, and
 * the active L2 table of [64K, 96K) is the active image's own).
 */
async function commonPrep(img: Image): Promise<void> {
  await img.write(0, fill(80 * KiB, 0x11));
  await img.write(1 * MiB, pattern(8 * KiB, 2));
  await img.write(2 * MiB + 4 * KiB, pattern(36 * KiB, 3));
  await img.createSnapshot('base');
  await img.write(32 * KiB, fill(16 * KiB, 0x44));
  await img.write(3 * MiB, pattern(4 * KiB, 5));
  await img.createSnapshot('second');
  await img.write(64 * KiB, fill(8 * KiB, 0x66));
}

const COMMON_RANGES: Array<[number, number]> = [
  [0, 128 * KiB],
  [1 * MiB, 64 * KiB],
  [2 * MiB, 64 * KiB],
  [3 * MiB, 64 * KiB],
];

function snapshotScenarios(clusterSize: number): Scenario[] {
  const create: Qcow2CreateOptions = { sizeBytes: VSIZE, clusterSize };
  // a free cluster in the active image's own L2 table (the one table of a 64 KiB-cluster image;
  // the table of [64K, 96K) with 512-byte clusters)
  const allocAt = clusterSize >= 65536 ? 3.5 * MiB + 100 : 88 * KiB + 100;
  const cowAt = 4 * KiB + 100;
  const tag = clusterSize >= 1024 ? `${clusterSize / 1024} KiB clusters` : `${clusterSize}-byte clusters`;
  return [
    {
      name: `snapshot create (${tag})`,
      create,
      guestRanges: COMMON_RANGES,
      prep: commonPrep,
      op: async (img) => {
        await img.createSnapshot('third', { dateSec: 1_700_000_000, dateNsec: 0 });
      },
    },
    {
      name: `snapshot delete of the oldest, shared snapshot (${tag})`,
      create,
      guestRanges: COMMON_RANGES,
      prep: commonPrep,
      op: async (img) => {
        await img.deleteSnapshot('base');
      },
    },
    {
      name: `snapshot delete of the newest snapshot (${tag})`,
      create,
      guestRanges: COMMON_RANGES,
      prep: commonPrep,
      op: async (img) => {
        await img.deleteSnapshot('second');
      },
    },
    {
      name: `snapshot goto (${tag})`,
      create,
      guestRanges: COMMON_RANGES,
      prep: commonPrep,
      op: async (img) => {
        await img.gotoSnapshot('base');
      },
    },
    {
      name: `allocating write into a new cluster of an existing L2 table (${tag})`,
      create,
      guestRanges: COMMON_RANGES,
      prep: commonPrep,
      watch: allocAt,
      op: async (img) => {
        await img.write(allocAt, pattern(200, 7)); // partial: zeros are written around it
        await img.flush();
      },
      checkPath: (before, after) => {
        expect(before.l2ForWatch).not.toBe(0);
        expect(after.l2ForWatch).toBe(before.l2ForWatch);
        expect(before.dataForWatch).toBe(0);
        expect(after.dataForWatch).not.toBe(0);
      },
    },
    {
      name: `write that copies clusters shared with snapshots (${tag})`,
      create,
      guestRanges: COMMON_RANGES,
      prep: commonPrep,
      watch: cowAt,
      op: async (img) => {
        // clusters shared with both snapshots: two 512-byte clusters (in an L2 table shared too,
        // so it is copied first), or part of one 64 KiB cluster (its L2 table is the active's own)
        await img.write(cowAt, pattern(600, 8));
        await img.flush();
      },
      checkPath: (before, after) => {
        expect(before.dataForWatch).not.toBe(0);
        expect(after.dataForWatch).not.toBe(before.dataForWatch);
        if (clusterSize === 512) expect(after.l2ForWatch).not.toBe(before.l2ForWatch);
        else expect(after.l2ForWatch).toBe(before.l2ForWatch);
      },
    },
  ];
}

/**
 * A 512-byte-cluster image whose next free host cluster is `offsetInBlock` clusters into a range
 * no refcount block covers yet (-1: the last cluster the current block covers), with a snapshot.
 */
function refblockScenario(offsetInBlock: -1 | 0): Scenario {
  const watch = 3.5 * MiB + 512;
  return {
    name:
      offsetInBlock === -1
        ? 'write needing a new L2 table and, for its data cluster, a new refcount block (512-byte clusters)'
        : 'write whose new L2 table needs a new refcount block (512-byte clusters)',
    create: { sizeBytes: VSIZE, clusterSize: 512 },
    watch,
    guestRanges: [[0, 256 * KiB]],
    prep: async (img) => {
      await img.write(0, fill(20 * KiB, 0x21));
      await img.createSnapshot('base');
      const s = stateOf(img);
      const E = s.refblockEntries;
      await fillUntil(img, 64, (free) => {
        const next = free + (offsetInBlock === -1 ? 1 : 0);
        return next % E === 0 && refblockOffset(s, next / E) === 0;
      });
    },
    op: async (img) => {
      await img.write(watch, pattern(1024, 9));
      await img.flush();
    },
    checkPath: (before, after) => {
      expect(before.l2ForWatch).toBe(0);
      expect(after.l2ForWatch).not.toBe(0);
      expect(after.refblocks).toBe(before.refblocks + 1);
    },
  };
}

/**
 * Operations that zero, discard, resize and revert across disk sizes, on 512-byte clusters (many
 * L2 tables, a multi-cluster L1 table): each is one request followed by a flush, or one snapshot
 * operation, so a crash leaves the old or the new state.
 */
function moreScenarios(): Scenario[] {
  const create: Qcow2CreateOptions = { sizeBytes: VSIZE, clusterSize: 512 };
  const grownPrep = async (img: Image): Promise<void> => {
    await commonPrep(img);
    await img.truncate(2 * VSIZE); // v3 grows with snapshots: the L1 table grows too
    await img.write(VSIZE + 512 * KiB, pattern(8 * KiB, 21));
  };
  return [
    {
      name: 'discard of clusters shared with snapshots and of the active image\'s own (512-byte clusters)',
      create,
      torn: true,
      guestRanges: COMMON_RANGES,
      prep: commonPrep,
      op: async (img) => {
        await img.discard(16 * KiB, 96 * KiB);
        await img.flush();
      },
    },
    {
      name: 'write-zeroes over allocated clusters (512-byte clusters)',
      create,
      torn: true,
      guestRanges: COMMON_RANGES,
      prep: commonPrep,
      op: async (img) => {
        await img.writeZeroes(1 * MiB, 8 * KiB);
        await img.writeZeroes(2 * MiB + 4 * KiB, 4 * KiB);
        await img.flush();
      },
    },
    {
      name: 'truncate that grows the disk and its L1 table (512-byte clusters)',
      create,
      guestRanges: COMMON_RANGES,
      prep: commonPrep,
      op: async (img) => {
        await img.truncate(2 * VSIZE);
        await img.flush();
      },
    },
    {
      name: 'truncate that shrinks a disk without snapshots (512-byte clusters)',
      create,
      guestRanges: [[0, 128 * KiB]],
      prep: async (img) => {
        await img.write(0, pattern(64 * KiB, 31));
        await img.write(3 * MiB, pattern(64 * KiB, 32));
      },
      op: async (img) => {
        await img.truncate(VSIZE / 2);
        await img.flush();
      },
    },
    {
      name: 'snapshot goto from a grown disk to a snapshot of the smaller size (512-byte clusters)',
      create,
      guestRanges: COMMON_RANGES,
      prep: grownPrep,
      op: async (img) => {
        await img.gotoSnapshot('second');
      },
    },
    {
      name: 'snapshot goto to a snapshot of a larger disk (512-byte clusters)',
      create,
      guestRanges: COMMON_RANGES,
      prep: async (img) => {
        await grownPrep(img);
        await img.createSnapshot('big');
        await img.gotoSnapshot('base');
        await img.write(8 * KiB, pattern(4 * KiB, 22));
      },
      op: async (img) => {
        await img.gotoSnapshot('big');
      },
    },
  ];
}

/**
 * `check -r leaks` through the block layer (bdrvCheck, as `img check -r leaks` runs it) on an image
 * with leaked clusters: a crash during the repair leaves the leaks or fewer, never a corruption.
 */
function repairScenario(clusterSize: number): Scenario {
  return {
    name: `check -r leaks frees leaked clusters (${clusterSize >= 1024 ? `${clusterSize / 1024} KiB` : `${clusterSize}-byte`} clusters)`,
    create: { sizeBytes: VSIZE, clusterSize },
    guestRanges: COMMON_RANGES,
    preCheck: 3,
    keepsContents: true,
    prep: async (img) => {
      await commonPrep(img);
      const s = stateOf(img);
      await s.lock.run(async () => {
        const off = await allocClusters(s, 5); // referenced by nothing: five leaked clusters
        await bdrvPwrite(s.file, off, new Uint8Array(5 * s.clusterSize).fill(0x99)); // inside the file, where check counts them
        await flushMetadata(s);
      });
    },
    op: async (img) => {
      const node = img.backend.root;
      if (node === null) throw new Error('no root node');
      // the complete run's image must then check clean (runCrashMatrix): the leaks were repaired
      await withBql((bql) => withDrained(bql, node, (d) => bdrvCheck(bql, d, node, { leaks: true, errors: false })));
    },
  };
}

/** 512-byte clusters with 64-bit refcounts: one refcount table cluster covers 4096 clusters (2 MiB). */
function reftableGrowthScenario(): Scenario {
  const watch = 3.5 * MiB;
  return {
    name: 'write that grows the refcount table (512-byte clusters, 64-bit refcounts)',
    create: { sizeBytes: VSIZE, clusterSize: 512, refcountBits: 64 },
    watch,
    guestRanges: [[0, 64 * KiB]],
    prep: async (img) => {
      // in 4 KiB pieces, so that the single-cluster fill below has small holes to plug
      for (let off = 0; off < 1792 * KiB; off += 4 * KiB) await img.write(off, pattern(4 * KiB, off / 512));
      await img.createSnapshot('base');
      const s = stateOf(img);
      const E = s.refblockEntries;
      const covered = (s.reftable.length / 8) * E;
      await fillUntil(img, (1792 * KiB) / 512, (free) => free === covered - 1);
    },
    op: async (img) => {
      await img.write(watch, pattern(512, 12));
      await img.flush();
    },
    checkPath: (before, after) => {
      expect(before.l2ForWatch).toBe(0);
      expect(after.l2ForWatch).not.toBe(0);
      expect(after.reftableEntries).toBeGreaterThan(before.reftableEntries);
    },
  };
}

// ---------------------------------------------------------------------------------------------
// reading qemu-img check's verdict

/**
 * What `qemu-img check` said about one image, sorted into what the issue allows (leaks), what
 * cannot harm data (COPIED flag mismatches in the safe direction) and what can.
 */
interface CheckVerdict {
  status: number;
  output: string;
  /**
   * OFLAG_COPIED errors that cannot harm data: the flag is clear on a cluster with refcount 1
   * (the next write copies it needlessly), or set on a cluster whose extra refcount is a leak (only
   * one L1 table reaches it, so writing it in place is what should happen). `qemu-img check` still
   * counts both as corruptions (exit 2), and `-r all` repairs them.
   */
  benign: string[];
  /**
   * Everything else: a refcount below the cluster's references (the cluster can be reallocated
   * while in use), COPIED set on a cluster that several L1 tables reach (the next guest write lands
   * in place and changes a snapshot), any other error, or a check that could not run.
   */
  harmful: string[];
}

const OFFSET_MASK = 0x00fffffffffffe00n;

function classifyCheck(status: number, output: string, clusterSize: number): CheckVerdict {
  const v: CheckVerdict = { status, output, benign: [], harmful: [] };
  if (status !== 0 && status !== 2 && status !== 3) v.harmful.push(`qemu-img check exit ${status} (it could not check the image)`);
  const lines = output.split('\n').map((l) => l.trim());
  // references qemu-img computed for clusters whose refcount is wrong (for the others they are equal)
  const references = new Map<number, number>();
  for (const l of lines) {
    const m = /^(?:Leaked cluster|ERROR cluster) (\d+) refcount=(\d+) reference=(\d+)/.exec(l);
    if (m !== null) references.set(Number(m[1]), Number(m[3]));
  }
  for (const l of lines) {
    if (l.startsWith('ERROR cluster')) {
      v.harmful.push(`${l} (refcount below the references: the cluster can be handed out again while in use)`);
      continue;
    }
    const m = /^ERROR OFLAG_COPIED (?:L2|data) cluster: .*(?:l1_entry|l2_entry)=([0-9a-f]+) refcount=(\d+)$/.exec(l);
    if (m !== null) {
      const entry = BigInt(`0x${m[1] ?? '0'}`);
      const copied = (entry >> 63n) === 1n;
      const cluster = Number(entry & OFFSET_MASK) / clusterSize;
      const refs = references.get(cluster) ?? Number(m[2]);
      if (copied && refs > 1) v.harmful.push(`${l} (COPIED set on a cluster ${refs} L1 tables reach: a guest write would change a snapshot)`);
      else v.benign.push(l);
      continue;
    }
    if (/^ERROR/.test(l) || /^Warning/i.test(l)) v.harmful.push(l);
  }
  if (status === 2 && v.benign.length === 0 && v.harmful.length === 0) v.harmful.push('corruption reported without an ERROR line');
  return v;
}

// ---------------------------------------------------------------------------------------------
// the crash loop

/**
 * How many images each crash point yields (test/helpers/crash-driver.ts crashImages): in `npm test`
 * every subset of up to 3 pending writes, else none, all, all but each one, 2 random subsets and a
 * torn one; with SNAPSTACK_LONG_SWEEPS=1 every subset of up to 6, each write alone too, 12 random
 * subsets and 4 torn ones.
 */
const LONG_SWEEPS = process.env['SNAPSTACK_LONG_SWEEPS'] === '1';
function subsetOptions(seed: number): CrashImageOptions {
  return LONG_SWEEPS ? { seed, exhaustiveUpTo: 6, randomSubsets: 12, tears: 4, eachAlone: true } : { seed, exhaustiveUpTo: 3, randomSubsets: 2, tears: 1 };
}

interface CrashPoint {
  /** Events (writes and flushes) that happened before the power cut. */
  n: number;
  /** Which pending writes persisted in this image. */
  label: string;
  verdict: CheckVerdict;
  /** Violations of the data-safety invariants (old or new contents, whole snapshots, no harmful error). */
  unsafe: string[];
}

interface CrashReport {
  events: number;
  /** Events the operation itself made (a crash at or after this point follows its return). */
  opEvents: number;
  /** The events of the complete run, in order. */
  log: string[];
  points: CrashPoint[];
  /** Crash images examined, and how many were distinct. */
  images: number;
  distinct: number;
}

function sameList(a: string[], b: string[]): boolean {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

/**
 * Writes a pattern over the scenario's guest ranges of a copy of a crashed image with qemu-io, and
 * lists the snapshots whose contents that changed: the demonstration that a harmful COPIED flag
 * does corrupt a snapshot.
 */
function snapshotsChangedByAGuestWrite(file: string, sc: Scenario, st: ImageState): string[] {
  const copy = `${file}.demo.qcow2`;
  fs.copyFileSync(file, copy);
  try {
    const cmds = sc.guestRanges.flatMap(([off, len]) => ['-c', `write -P 0xee ${off} ${len}`]);
    const w = qemuStatus('qemu-io', ['-f', 'qcow2', ...cmds, copy]);
    if (w.status !== 0) return [`(qemu-io could not write: ${w.stderr.trim()})`];
    const after = qemuState(copy);
    return [...st.snapshotData].filter(([k, h]) => after.snapshotData.get(k) !== h).map(([k]) => k);
  } finally {
    fs.rmSync(copy, { force: true });
  }
}

/** What one crash image holds, judged once per distinct image. */
interface ImageJudgement {
  verdict: CheckVerdict;
  st: ImageState | null;
  /** Problems independent of the crash point (harmful check errors, unreadable image). */
  problems: string[];
}

async function judgeImage(sc: Scenario, id: string, bytes: Uint8Array, C: number): Promise<ImageJudgement> {
  const problems: string[] = [];
  const file = path.join(dir, `${id}-crash.qcow2`);
  fs.writeFileSync(file, bytes);
  try {
    const chk = qemuStatus('qemu-img', ['check', '-f', 'qcow2', file]);
    const verdict = classifyCheck(chk.status, (chk.stdout + chk.stderr).trim(), C);
    problems.push(...verdict.harmful);
    let st: ImageState | null = null;
    try {
      st = qemuState(file);
    } catch (e) {
      problems.push(`qemu-img cannot read the image: ${String(e)}`);
    }
    if (st !== null) {
      if (verdict.harmful.some((h) => h.includes('COPIED'))) {
        const changed = snapshotsChangedByAGuestWrite(file, sc, st);
        if (changed.length > 0) problems.push(`confirmed: a qemu-io write to the crashed image changed snapshot(s) ${changed.join(', ')}`);
      }
      const checkId = `${id}-chk`;
      createCrashDisk(checkId, bytes);
      try {
        const mine = await libraryDiskHash(checkId);
        if (mine !== st.active) problems.push('snapstack reads other active contents than qemu-img from the crashed image');
      } catch (e) {
        problems.push(`snapstack cannot open or read the crashed image: ${String(e)}`);
      }
    }
    return { verdict, st, problems };
  } finally {
    fs.rmSync(file, { force: true });
  }
}

async function runCrashMatrix(sc: Scenario, id: string): Promise<CrashReport> {
  const pre = await buildImage(id, sc.create, sc.prep);
  const C = sc.create.clusterSize ?? 65536;
  const preFile = path.join(dir, `${id}-pre.qcow2`);
  fs.writeFileSync(preFile, pre);
  const preCheck = qemuStatus('qemu-img', ['check', '-f', 'qcow2', preFile]);
  expect(preCheck.status, `pre-operation image is not as the scenario made it:\n${preCheck.stdout}${preCheck.stderr}`).toBe(sc.preCheck ?? 0);
  const oldState = qemuState(preFile);

  // the complete run: count the events, and record the new state
  createCrashDisk(id, pre);
  let opEvents = 0;
  {
    const img = await openDisk(id);
    try {
      const before = sc.checkPath === undefined ? null : await pathFacts(img, sc.watch ?? 0);
      armCrash(id, Infinity);
      await sc.op(img);
      opEvents = crashDisk(id).events;
      if (sc.checkPath !== undefined && before !== null) sc.checkPath(before, await pathFacts(img, sc.watch ?? 0));
    } finally {
      await img.close();
    }
  }
  const E = crashDisk(id).events;
  const log = [...crashDisk(id).log];
  const postFile = path.join(dir, `${id}-post.qcow2`);
  fs.writeFileSync(postFile, durableBytes(id));
  const postCheck = qemuStatus('qemu-img', ['check', '-f', 'qcow2', postFile]);
  expect(postCheck.status, `completed operation leaves an unclean image:\n${postCheck.stdout}${postCheck.stderr}`).toBe(0);
  const newState = qemuState(postFile);
  expect(E).toBeGreaterThan(0);
  expect(crashDisk(id).flushes, 'the operation and close never flush').toBeGreaterThan(0);
  const unchanged = sameList(oldState.snapshots, newState.snapshots) && oldState.active === newState.active;
  expect(unchanged, sc.keepsContents === true ? 'the repair changed guest data' : 'the operation changes nothing').toBe(sc.keepsContents === true);

  // a snapshot's contents never change; a new one holds what the active disk held
  const expectedSnapshot = new Map<string, string>(oldState.snapshotData);
  for (const [k, h] of newState.snapshotData) {
    const old = expectedSnapshot.get(k);
    if (old === undefined) expect(h, `new snapshot ${k} does not hold the pre-operation active contents`).toBe(oldState.active);
    else expect(h, `snapshot ${k} changed contents in the completed run`).toBe(old);
    expectedSnapshot.set(k, h);
  }

  const report: CrashReport = { events: E, opEvents, log, points: [], images: 0, distinct: 0 };
  const judged = new Map<string, ImageJudgement>();
  for (let n = 0; n <= E; n++) {
    const runProblems: string[] = [];
    createCrashDisk(id, pre);
    const img = await openDisk(id);
    armCrash(id, n);
    try {
      await sc.op(img);
    } catch (e) {
      // once the disk is gone, the driver may read back stale metadata and give up: that is fine
      if (!crashDisk(id).crashed) runProblems.push(`the operation failed before the crash: ${String(e)}`);
    }
    try {
      await img.close();
    } catch (e) {
      if (!crashDisk(id).crashed) runProblems.push(`close failed before the crash: ${String(e)}`);
    }
    if (n < E && !crashDisk(id).crashed) runProblems.push('the disk never crashed: the operation took another path than the complete run');
    for (const ci of crashImages(id, subsetOptions(n * 7919 + 17))) {
      report.images++;
      const h = sha256(ci.bytes);
      let j = judged.get(h);
      if (j === undefined) {
        j = await judgeImage(sc, id, ci.bytes, C);
        judged.set(h, j);
      }
      const unsafe = [...runProblems, ...j.problems];
      const st = j.st;
      if (st !== null) {
        if (n >= opEvents) {
          // the operation returned before the power cut: it must be durable
          if (!sameList(st.snapshots, newState.snapshots)) unsafe.push(`the operation returned, yet the snapshot list is [${st.snapshots.join(', ')}], not the new [${newState.snapshots.join(', ')}]`);
          if (st.active !== newState.active) unsafe.push('the operation returned (and flushed), yet the active disk does not hold the new contents');
        } else {
          if (!sameList(st.snapshots, oldState.snapshots) && !sameList(st.snapshots, newState.snapshots)) {
            unsafe.push(`snapshot list [${st.snapshots.join(', ')}] is neither the old [${oldState.snapshots.join(', ')}] nor the new [${newState.snapshots.join(', ')}]`);
          }
          const whole = st.active === oldState.active || st.active === newState.active;
          if (!whole && !(sc.torn === true && tornBetween(st.activeBytes, oldState.activeBytes, newState.activeBytes))) {
            unsafe.push(`the active disk holds neither the old nor the new contents${sc.torn === true ? ' (not even sector by sector)' : ''}`);
          }
        }
        for (const [k, hh] of st.snapshotData) {
          if (expectedSnapshot.get(k) !== hh) unsafe.push(`snapshot ${k} does not hold its contents`);
        }
      }
      report.points.push({ n, label: ci.label, verdict: j.verdict, unsafe });
    }
  }
  report.distinct = judged.size;
  fs.rmSync(preFile, { force: true });
  fs.rmSync(postFile, { force: true });
  return report;
}

/** Where the crash happened: the last persisted write and the first lost one. */
function where(r: CrashReport, p: CrashPoint): string {
  const last = p.n === 0 ? 'none' : (r.log[p.n - 1] ?? '?');
  const next = p.n >= r.events ? 'none' : (r.log[p.n] ?? '?');
  return `power cut at event ${p.n}/${r.events} (last done ${last}, first lost ${next}), pending writes kept ${p.label}`;
}

// ---------------------------------------------------------------------------------------------

/*
 * The issue asks for "at most leaked clusters" from qemu-img check after every crash. qemu-img
 * check counts a COPIED flag that disagrees with the stored refcount as a corruption in both
 * directions, and snapshot create and delete change both, in different clusters (refcount blocks,
 * L1/L2 tables). With in-place updates there is always a write between the two (the four strict
 * tests failed until snapshot create and delete became one metadata transaction committed by a
 * single header write: src/drivers/qcow2/metadata-tx.ts); every scenario passes both tests now,
 * and none is expected to fail.
 *
 * Fixed bug, kept as a regression scenario: gotoSnapshot used to read the snapshot's L1 table
 * before the +1 pass, so the active L1 was written with stale COPIED bits; a crash before the final
 * COPIED pass let the next guest write change the snapshots. Both goto scenarios pass now.
 */

const scenarios: Scenario[] = [
  ...snapshotScenarios(65536),
  ...snapshotScenarios(512),
  ...moreScenarios(),
  repairScenario(65536),
  repairScenario(512),
  refblockScenario(-1),
  refblockScenario(0),
  reftableGrowthScenario(),
];

describeInterop('qcow2 crash safety: a crash after any write of an operation leaves the old or the new image', () => {
  it('the oracle notices a corrupt image (the checks can fail)', async () => {
    const pre = await buildImage('oracle', { sizeBytes: VSIZE, clusterSize: 65536 }, async (img) => {
      await img.write(0, fill(64 * KiB, 0x5a));
    });
    const bad = pre.slice();
    // the first refcount block is cluster 2 (after the header and the refcount table): zero it
    bad.fill(0, 2 * 65536, 3 * 65536);
    const file = path.join(dir, 'oracle.qcow2');
    fs.writeFileSync(file, bad);
    const chk = qemuStatus('qemu-img', ['check', '-f', 'qcow2', file]);
    expect(chk.status).toBe(2);
    const v = classifyCheck(chk.status, chk.stdout + chk.stderr, 65536);
    expect(v.harmful.length).toBeGreaterThan(0);
    expect(classifyCheck(2, 'ERROR OFLAG_COPIED data cluster: l2_entry=c0000 refcount=1', 65536).benign).toHaveLength(1);
    expect(classifyCheck(2, 'ERROR OFLAG_COPIED L2 cluster: l1_index=0 l1_entry=8000000000040000 refcount=2', 65536).harmful).toHaveLength(1);
    expect(
      classifyCheck(2, 'Leaked cluster 4 refcount=2 reference=1\nERROR OFLAG_COPIED L2 cluster: l1_index=0 l1_entry=8000000000040000 refcount=2', 65536).benign,
    ).toHaveLength(1);
  });

  const reports = new Map<string, Promise<CrashReport>>();
  const reportFor = (sc: Scenario, i: number): Promise<CrashReport> => {
    let r = reports.get(sc.name);
    if (r === undefined) {
      r = runCrashMatrix(sc, `sc${i}`);
      reports.set(sc.name, r);
    }
    return r;
  };

  scenarios.forEach((sc, i) => {
    it(`${sc.name}: every crash point keeps the old or new contents and whole snapshots, with no harmful check error`, async () => {
      const r = await reportFor(sc, i);
      const counts = { clean: 0, leaks: 0, benignOnly: 0, harmful: 0 };
      for (const p of r.points) {
        if (p.verdict.harmful.length > 0) counts.harmful++;
        else if (p.verdict.status === 0) counts.clean++;
        else if (p.verdict.status === 3) counts.leaks++;
        else counts.benignOnly++;
      }
      console.log(
        `${sc.name}: ${r.events} events (${r.opEvents} by the operation), ${r.events + 1} power cuts, ${r.images} crash images (${r.distinct} distinct): ${counts.clean} clean, ${counts.leaks} leaks only, ` +
          `${counts.benignOnly} benign COPIED errors, ${counts.harmful} harmful`,
      );
      const failures = r.points.filter((p) => p.unsafe.length > 0).map((p) => `${where(r, p)}:\n  ${p.unsafe.join('\n  ')}`);
      expect(failures, `${failures.length} failing crash images; the first:\n${failures.slice(0, 12).join('\n\n')}`).toEqual([]);
    });
    it(`${sc.name}: qemu-img check finds at most leaked clusters after every crash (issue requirement)`, async () => {
      const r = await reportFor(sc, i);
      const failures = r.points
        .filter((p) => p.verdict.status !== 0 && p.verdict.status !== 3)
        .map((p) => `${where(r, p)}: qemu-img check exit ${p.verdict.status}:\n${p.verdict.output.split('\n').filter((l) => l.startsWith('ERROR')).join('\n')}`);
      expect(failures, `${failures.length} failing crash images; the first:\n${failures.slice(0, 12).join('\n\n')}`).toEqual([]);
    });
  });
});

/*
 * The negative control: the sweep must be able to fail when a flush is missing. With the barriers
 * of the metadata write-back skipped (test-only switch), the same sweep over an allocating write
 * that needs a new L2 table and refcount block must find crash images that are corrupt or lose
 * data.
 */
describeInterop('qcow2 crash safety: the sweep notices a missing flush', () => {
  it('finds harmful crash images once the write-back barriers are skipped', async () => {
    const sc = scenarios.find((x) => x.name.startsWith('write needing a new L2 table'));
    if (sc === undefined) throw new Error('scenario missing');
    setWritebackBarriersDisabledForTesting(true);
    try {
      const r = await runCrashMatrix(sc, 'nobarrier');
      const bad = r.points.filter((p) => p.unsafe.length > 0);
      console.log(`barriers skipped: ${bad.length} of ${r.images} crash images harmful, e.g. ${bad[0]?.unsafe[0] ?? 'none'}`);
      expect(bad.length).toBeGreaterThan(0);
    } finally {
      setWritebackBarriersDisabledForTesting(false);
    }
  });
});

/*
 * Regression (fixed): with 64-bit refcounts a refcount block covers C/8 clusters, as many as one
 * L2 table maps; allocClusters used to put each new refcount block on the first cluster of its
 * range and search again, so a run that long never fitted (EIO after growing the file by ~31 MiB).
 * New refcount blocks now go in front of the run. The disk is capped so a regression shows at once.
 */
it('allocates a run of clusters as long as a refcount block covers (64-bit refcounts, 512-byte clusters)', async () => {
  const pre = await buildImage('alloc64', { sizeBytes: VSIZE, clusterSize: 512, refcountBits: 64 }, async (img) => {
    crashDisk('alloc64').maxLength = 4 * MiB;
    await img.write(0, pattern(32 * KiB, 1));
  });
  // header, refcount table, refcount block, 8 L1 clusters, an L2 table, 64 data clusters, a refcount block
  expect(pre.length).toBeLessThanOrEqual(48 * KiB);
});

/**
 * A protocol driver for power-loss tests, in the style of SQLite's crash simulator (src/test6.c):
 * `driver=crashsim,id=NAME`. It keeps a "disk" in memory (registered under NAME in `crashDisks`, so
 * that a test can seed it before opening and fetch it afterwards) and models a volatile write cache
 * in front of it.
 *
 * What it guarantees (the model the qcow2 and raw-snapshot code must survive):
 * - Reads see every write made so far (the page cache), whether or not it is durable yet.
 * - A write (pwritev, pwriteZeroes, truncate) that returned is only *pending*: held in the cache.
 *   A flush that returned made every write before it durable, in the disk's durable image.
 * - At a crash, any subset of the pending writes may have reached the disk, in any combination
 *   (not just a prefix: the cache and the disk reorder writes between flushes), and a multi-sector
 *   write may be torn at 512-byte sectors (each sector is atomic). `crashImages` builds such
 *   images: exhaustively when the pending set is small, else the extremes (none, all, all but each
 *   one, optionally each alone) and seeded-random subsets, some torn.
 * What it does not model: a torn sector (a 512-byte sector is all old or all new), reordering of
 *   writes to the same sector (the latest write of a sector wins when both persist, as the cache
 *   holds only the latest), or a lying flush.
 *
 * Events: every write, zero-write, truncate and flush counts as one event. `armCrash(id, n)` makes
 * event n (counted from the arm, 0-based) the crash: that event and every later one is dropped
 * (it reports success, as a dying machine's cache would); the writes pending at that moment are
 * kept for `crashImages`. `maxLength` models a full disk: a write past it fails with ENOSPC (and
 * still counts). `log` lists the events, for failure messages.
 *
 *   createCrashDisk('d0', seedBytes);
 *   const img = await openImage('driver=qcow2,file.driver=crashsim,file.id=d0');
 *   armCrash('d0', 5);              // events 0..4 happen, the 6th is the power cut
 *   await img.createSnapshot('s1'); await img.close();
 *   crashImages('d0', { seed: 1 })  // every image the disk may hold after the cut
 */
import type { Bql } from '../../src/block/bql.js';
import type { DrainedProof } from '../../src/block/drain.js';
import { registerDriver, type BlockDriver, type BlockDriverInstance, type WriteZeroesFlags } from '../../src/block/driver.js';
import { BlockError } from '../../src/block/errors.js';
import type { BlockNode } from '../../src/block/node.js';
import type { NodeOptions } from '../../src/block/options.js';
import { prng } from './prng.js';

const SECTOR = 512;

/** A write held in the volatile cache: bytes at an offset (zeros are stored as bytes) or a truncate. */
export interface PendingWrite {
  kind: 'write' | 'truncate';
  offset: number;
  /** The bytes written (kind 'write'); empty for a truncate. */
  data: Uint8Array;
  /** The new length (kind 'truncate'). */
  length: number;
  /** The event number of the write since the arm (for messages). */
  event: number;
}

/** The controlling object of one simulated disk. */
export interface CrashDisk {
  /** What reads see (durable plus pending); only the first `length` bytes are meaningful. */
  bytes: Uint8Array;
  /** Length as reads see it. */
  length: number;
  /** The durable image: what survives any crash. */
  durable: Uint8Array;
  durableLength: number;
  /** Writes since the last completed flush, in issue order. */
  pending: PendingWrite[];
  /** Events still performed before the crash; Infinity: never crash; 0: crashed. */
  eventsLeft: number;
  /** True once the crash happened. */
  crashed: boolean;
  /** The writes that were pending at the crash (what `crashImages` chooses from). */
  pendingAtCrash: PendingWrite[];
  /** Durable image at the crash. */
  durableAtCrash: Uint8Array;
  /** Every write request seen since the arm (performed or dropped): writes, zero-writes, truncates. */
  writes: number;
  /** Flushes seen since the arm. */
  flushes: number;
  /** Events seen since the arm (writes + flushes). */
  events: number;
  /** Events dropped because the disk had crashed. */
  dropped: number;
  /** Every event since the arm: `w@OFFSET+BYTES`, `z@...`, `t@SIZE`, `f`. */
  log: string[];
  /** The disk's capacity: a write or truncate past it fails with ENOSPC (Infinity: none). */
  maxLength: number;
  /** The power supply this disk shares with others (armCrashGroup), or null: its own counter. */
  group: CrashGroup | null;
}

/** Disks on one power supply: one event counter over all of them, one cut for all. */
export interface CrashGroup {
  /** Events still performed (over every member) before the cut. */
  eventsLeft: number;
  /** Events seen since the arm, over every member. */
  events: number;
  members: string[];
  /** Called at the instant of the cut (e.g. to keep what else was durable then). */
  onCrash: (() => void) | null;
  crashed: boolean;
}

/** Every simulated disk, by id. */
export const crashDisks = new Map<string, CrashDisk>();

const RESOLVED = Promise.resolve();

/**
 * Creates (or replaces) the disk `id` holding a durable copy of `initial`, with no crash armed.
 * @locking common
 */
export function createCrashDisk(id: string, initial: Uint8Array = new Uint8Array(0)): CrashDisk {
  const bytes = new Uint8Array(Math.max(initial.length, 4096));
  bytes.set(initial);
  const disk: CrashDisk = {
    bytes,
    length: initial.length,
    durable: Uint8Array.prototype.slice.call(initial),
    durableLength: initial.length,
    pending: [],
    eventsLeft: Infinity,
    crashed: false,
    pendingAtCrash: [],
    durableAtCrash: new Uint8Array(0),
    writes: 0,
    flushes: 0,
    events: 0,
    dropped: 0,
    log: [],
    maxLength: Infinity,
    group: null,
  };
  crashDisks.set(id, disk);
  return disk;
}

/** Cuts the power of one disk now: what is pending is kept for crashImages, later events are dropped. */
function cut(disk: CrashDisk): void {
  if (disk.crashed) return;
  disk.crashed = true;
  disk.eventsLeft = 0;
  disk.pendingAtCrash = disk.pending.slice();
  disk.durableAtCrash = disk.durable.slice(0, disk.durableLength);
}

/**
 * Puts disks `ids` on one power supply: events 0..n-1, counted over all of them in the order they
 * happen, are performed; at event n every disk loses power at once and `onCrash` runs. Each
 * disk's own counters restart.
 * @locking common
 */
export function armCrashGroup(ids: string[], n: number, onCrash: (() => void) | null = null): CrashGroup {
  const group: CrashGroup = { eventsLeft: n, events: 0, members: [...ids], onCrash, crashed: false };
  for (const id of ids) {
    armCrash(id, Infinity);
    crashDisk(id).group = group;
  }
  return group;
}

/**
 * The disk `id`; throws when there is none.
 * @locking common
 */
export function crashDisk(id: string): CrashDisk {
  const disk = crashDisks.get(id);
  if (disk === undefined) throw new Error(`no crashsim disk '${id}'`);
  return disk;
}

/**
 * What reads of disk `id` see now (exactly `length` bytes): every write made, durable or not.
 * A test that closed the image cleanly (close flushes) gets the durable image.
 * @locking common
 */
export function persistedBytes(id: string): Uint8Array {
  const disk = crashDisk(id);
  return disk.bytes.slice(0, disk.length);
}

/**
 * Only the durable bytes of disk `id`: what survives a crash now whatever the cache does.
 * @locking common
 */
export function durableBytes(id: string): Uint8Array {
  const disk = crashDisk(id);
  return disk.durable.slice(0, disk.durableLength);
}

/**
 * Arms the crash: events 0..n-1 happen, event n is the power cut; counters restart.
 * @locking common
 */
export function armCrash(id: string, n: number): void {
  const disk = crashDisk(id);
  disk.group = null;
  disk.eventsLeft = n;
  disk.crashed = false;
  disk.pendingAtCrash = [];
  disk.writes = 0;
  disk.flushes = 0;
  disk.events = 0;
  disk.dropped = 0;
  disk.log = [];
}

/** Grows a byte array so that it holds at least `end` bytes (new capacity reads as zeros). */
function reserve(bytes: Uint8Array, used: number, end: number): Uint8Array {
  if (end <= bytes.length) return bytes;
  let cap = Math.max(bytes.length, 4096);
  while (cap < end) cap *= 2;
  const next = new Uint8Array(cap);
  next.set(bytes.subarray(0, used));
  return next;
}

/** Applies one write (or a part of it: only the sectors in `sectors`, when given) to an image. */
function applyWrite(img: { bytes: Uint8Array; length: number }, w: PendingWrite, sectors?: ReadonlySet<number>): void {
  if (w.kind === 'truncate') {
    if (w.length < img.length) img.bytes.fill(0, w.length, img.length);
    else img.bytes = reserve(img.bytes, img.length, w.length);
    img.length = w.length;
    return;
  }
  const end = w.offset + w.data.length;
  img.bytes = reserve(img.bytes, img.length, end);
  if (sectors === undefined) {
    img.bytes.set(w.data, w.offset);
    img.length = Math.max(img.length, end);
    return;
  }
  // a torn write: each 512-byte sector of the disk it touches is either all written or untouched
  const firstSector = Math.floor(w.offset / SECTOR);
  let top = img.length;
  for (const k of sectors) {
    const from = Math.max(w.offset, (firstSector + k) * SECTOR);
    const to = Math.min(end, (firstSector + k + 1) * SECTOR);
    if (from >= to) continue;
    img.bytes.set(w.data.subarray(from - w.offset, to - w.offset), from);
    top = Math.max(top, to);
  }
  img.length = top;
}

/** The number of disk sectors a write touches. */
function sectorsOf(w: PendingWrite): number {
  if (w.kind === 'truncate' || w.data.length === 0) return 1;
  return Math.floor((w.offset + w.data.length - 1) / SECTOR) - Math.floor(w.offset / SECTOR) + 1;
}

/** One image the disk may hold after the crash, and how it was made. */
export interface CrashImage {
  /** Which pending writes persisted: `{3,5}` (event numbers), `~` marking a torn one. */
  label: string;
  bytes: Uint8Array;
}

/** How many images `crashImages` builds. */
export interface CrashImageOptions {
  /** Seed for the random subsets and tears. */
  seed: number;
  /** Enumerate every subset when there are at most this many pending writes (default 4: 16 images). */
  exhaustiveUpTo?: number;
  /** Random subsets besides the extremes when the set is larger (default 6). */
  randomSubsets?: number;
  /** Torn variants: random subsets in which one multi-sector write is torn (default 2). */
  tears?: number;
  /** Also each pending write alone (default false; all but each one is always built). */
  eachAlone?: boolean;
}

/**
 * Every image disk `id` may hold after its crash (or, if it has not crashed, after a crash now):
 * the durable image plus a subset of the pending writes applied in issue order. Exhaustive for a
 * small pending set; otherwise none, all, all but each write (so every "B persisted without A"),
 * optionally each write alone, and seeded-random subsets; plus a few with one write torn at sector
 * boundaries.
 * @locking common
 */
export function crashImages(id: string, opts: CrashImageOptions): CrashImage[] {
  const disk = crashDisk(id);
  const pending = disk.crashed ? disk.pendingAtCrash : disk.pending;
  const base = disk.crashed ? disk.durableAtCrash : disk.durable.slice(0, disk.durableLength);
  const k = pending.length;
  const rnd = prng(opts.seed);
  const subsets: Array<{ keep: boolean[]; tear: number }> = [];
  const all = (v: boolean): boolean[] => pending.map(() => v);
  if (k <= (opts.exhaustiveUpTo ?? 4)) {
    for (let m = 0; m < 2 ** k; m++) subsets.push({ keep: pending.map((_, i) => ((m >> i) & 1) === 1), tear: -1 });
  } else {
    subsets.push({ keep: all(false), tear: -1 }, { keep: all(true), tear: -1 });
    for (let i = 0; i < k; i++) {
      const allBut = all(true);
      allBut[i] = false;
      subsets.push({ keep: allBut, tear: -1 });
      if (opts.eachAlone === true) {
        const alone = all(false);
        alone[i] = true;
        subsets.push({ keep: alone, tear: -1 });
      }
    }
    for (let r = 0; r < (opts.randomSubsets ?? 6); r++) subsets.push({ keep: pending.map(() => rnd() < 0.5), tear: -1 });
  }
  const multi = pending.map((w, i) => (sectorsOf(w) > 1 ? i : -1)).filter((i) => i >= 0);
  for (let t = 0; t < (opts.tears ?? 2) && multi.length > 0; t++) {
    const victim = multi[Math.floor(rnd() * multi.length)] as number;
    const keep = pending.map(() => rnd() < 0.5);
    keep[victim] = true;
    subsets.push({ keep, tear: victim });
  }
  const images: CrashImage[] = [];
  for (const { keep, tear } of subsets) {
    const img = { bytes: base.slice(), length: base.length };
    const parts: string[] = [];
    pending.forEach((w, i) => {
      if (keep[i] !== true) return;
      if (i === tear) {
        const n = sectorsOf(w);
        const sectors = new Set<number>();
        for (let s = 0; s < n; s++) if (rnd() < 0.5) sectors.add(s);
        applyWrite(img, w, sectors);
        parts.push(`~${w.event}`);
      } else {
        applyWrite(img, w);
        parts.push(String(w.event));
      }
    });
    images.push({ label: `{${parts.join(',')}} of ${k} pending`, bytes: img.bytes.slice(0, img.length) });
  }
  return images;
}

/** An open crashsim node. */
class CrashInstance implements BlockDriverInstance {
  constructor(
    private readonly nodeName: string,
    private readonly id: string,
  ) {}

  private get disk(): CrashDisk {
    const disk = crashDisks.get(this.id);
    if (disk === undefined) {
      throw new BlockError('ENOMEDIUM', `crashsim node '${this.nodeName}': disk '${this.id}' was removed`, { node: this.nodeName, field: 'id', value: this.id });
    }
    return disk;
  }

  /** Counts an event; true when it happens, false once the disk has crashed (the crash is taken here). */
  private admit(what: string, isWrite: boolean): number {
    const disk = this.disk;
    const event = disk.events++;
    if (isWrite) disk.writes++;
    else disk.flushes++;
    disk.log.push(what);
    const group = disk.group;
    if (group !== null) {
      group.events++;
      if (!group.crashed && group.eventsLeft <= 0) {
        group.crashed = true;
        for (const m of group.members) {
          const d = crashDisks.get(m);
          if (d !== undefined) cut(d);
        }
        group.onCrash?.();
      }
      if (!group.crashed) group.eventsLeft--;
    }
    if (disk.crashed || disk.eventsLeft <= 0) {
      cut(disk);
      disk.dropped++;
      return -1;
    }
    disk.eventsLeft--;
    return event;
  }

  /** ENOSPC when `end` lies past the disk's capacity. */
  private checkCapacity(end: number, op: string): void {
    const max = this.disk.maxLength;
    if (end > max) {
      throw new BlockError('ENOSPC', `${op} on crashsim node '${this.nodeName}': no space left (${end} bytes needed, capacity ${max})`, {
        node: this.nodeName,
        op,
        value: end,
      });
    }
  }

  /** Applies a write to what reads see and holds it as pending. */
  private perform(w: PendingWrite): void {
    const disk = this.disk;
    const view = { bytes: disk.bytes, length: disk.length };
    applyWrite(view, w);
    disk.bytes = view.bytes;
    disk.length = view.length;
    disk.pending.push(w);
  }

  /**
   * Copies what reads see at `offset` into `buf`; bytes past the end read as zeros.
   * @locking io
   */
  preadv(offset: number, buf: Uint8Array): Promise<void> {
    const disk = this.disk;
    const end = Math.min(disk.length, offset + buf.length);
    if (offset >= end) buf.fill(0);
    else {
      buf.set(disk.bytes.subarray(offset, end));
      buf.fill(0, end - offset);
    }
    return RESOLVED;
  }

  /**
   * Holds `buf` at `offset` in the cache (pending until a flush) unless the disk has crashed.
   * @locking io
   */
  pwritev(offset: number, buf: Uint8Array): Promise<void> {
    const event = this.admit(`w@${offset}+${buf.length}`, true);
    if (event < 0) return RESOLVED;
    this.checkCapacity(offset + buf.length, 'write');
    this.perform({ kind: 'write', offset, data: buf.slice(), length: 0, event });
    return RESOLVED;
  }

  /**
   * Holds zeros over the range in the cache unless the disk has crashed.
   * @locking io
   */
  pwriteZeroes(offset: number, bytes: number, _flags: WriteZeroesFlags): Promise<void> {
    const event = this.admit(`z@${offset}+${bytes}`, true);
    if (event < 0) return RESOLVED;
    this.checkCapacity(offset + bytes, 'write-zeroes');
    this.perform({ kind: 'write', offset, data: new Uint8Array(bytes), length: 0, event });
    return RESOLVED;
  }

  /**
   * A hint: ignored (the bytes keep their contents), and not counted as an event.
   * @locking io
   */
  pdiscard(_offset: number, _bytes: number): Promise<void> {
    return RESOLVED;
  }

  /**
   * Makes every pending write durable (unless the disk has crashed: then nothing happens).
   * @locking io
   */
  flush(): Promise<void> {
    const event = this.admit('f', false);
    if (event < 0) return RESOLVED;
    const disk = this.disk;
    const img = { bytes: disk.durable, length: disk.durableLength };
    for (const w of disk.pending) applyWrite(img, w);
    disk.durable = img.bytes;
    disk.durableLength = img.length;
    disk.pending = [];
    return RESOLVED;
  }

  /**
   * The length reads see.
   * @locking io
   */
  getLength(): number {
    return this.disk.length;
  }

  /**
   * Changes the length (pending until a flush) unless the disk has crashed; bytes cut off are
   * zeroed, so that growing again reads zeros.
   * @locking io
   */
  truncate(sizeBytes: number): Promise<void> {
    const event = this.admit(`t@${sizeBytes}`, true);
    if (event < 0) return RESOLVED;
    this.checkCapacity(sizeBytes, 'truncate');
    this.perform({ kind: 'truncate', offset: 0, data: new Uint8Array(0), length: sizeBytes, event });
    return RESOLVED;
  }

  /**
   * Nothing to release: the disk stays registered for the test to inspect.
   * @locking global-state
   */
  async close(_bql: Bql, _drained: DrainedProof): Promise<void> {}

  /**
   * Figures for query-named-block-nodes.
   * @locking io
   */
  formatSpecific(): Record<string, unknown> {
    const disk = this.disk;
    return { type: 'crashsim', data: { id: this.id, writes: disk.writes, flushes: disk.flushes, dropped: disk.dropped, pending: disk.pending.length } };
  }
}

const KNOWN_OPTIONS = new Set(['id', 'filename']);

/** The `crashsim` protocol driver. */
export const crashsimDriver: BlockDriver = {
  formatName: 'crashsim',
  kind: 'protocol',
  /**
   * Opens the disk registered under option `id` (required; create it with createCrashDisk).
   * @locking global-state
   */
  async open(_bql: Bql, node: BlockNode, opts: NodeOptions): Promise<BlockDriverInstance> {
    for (const key of Object.keys(opts)) {
      if (!KNOWN_OPTIONS.has(key)) {
        throw new BlockError('EINVAL', `Invalid parameter '${key}' for driver 'crashsim' (node '${node.nodeName}')`, { node: node.nodeName, field: key });
      }
    }
    const id = opts['id'];
    if (id === undefined) {
      throw new BlockError('EINVAL', `Parameter 'id' is required for driver 'crashsim' (node '${node.nodeName}')`, { node: node.nodeName, field: 'id' });
    }
    if (!crashDisks.has(id)) {
      throw new BlockError('ENOENT', `crashsim node '${node.nodeName}': no disk '${id}' (createCrashDisk first)`, { node: node.nodeName, field: 'id', value: id });
    }
    return new CrashInstance(node.nodeName, id);
  },
};

registerDriver(crashsimDriver);

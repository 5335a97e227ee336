/**
 * A protocol driver for crash-safety tests: `driver=crashsim,id=NAME`. It keeps a "disk" in memory
 * (a growable byte array registered under NAME in `crashDisks`, so that a test can seed it before
 * opening and fetch it afterwards) and simulates a power cut after a given number of writes.
 *
 * Model: every pwritev, pwriteZeroes and truncate counts as one write. While `writesLeft` is above
 * zero a write is persisted and decrements it; once it reaches zero the disk has "crashed": every
 * later write is counted in `writes` and `dropped` but silently discarded (it reports success, as a
 * write into a cache that is never flushed would). Reads always return the persisted bytes (zeros
 * past the end), so the persisted image is exactly what was written before the crash: a prefix of
 * the write sequence. flush is a no-op (writes are persisted in order); discard is a hint and is
 * ignored. `maxLength` models a full disk: a write that would persist past it fails with ENOSPC
 * (and still counts as a write). `log` lists the writes, for failure messages.
 *
 *   createCrashDisk('d0', seedBytes);
 *   const img = await openImage('driver=qcow2,file.driver=crashsim,file.id=d0');
 *   armCrash('d0', 5);              // the 6th write and every later one are lost
 *   await img.createSnapshot('s1'); await img.close();
 *   persistedBytes('d0')            // what survived the crash
 */
import type { Bql } from '../../src/block/bql.js';
import type { DrainedProof } from '../../src/block/drain.js';
import { registerDriver, type BlockDriver, type BlockDriverInstance, type WriteZeroesFlags } from '../../src/block/driver.js';
import { BlockError } from '../../src/block/errors.js';
import type { BlockNode } from '../../src/block/node.js';
import type { NodeOptions } from '../../src/block/options.js';

/** The controlling object of one simulated disk. */
export interface CrashDisk {
  /** Persisted contents; only the first `length` bytes are meaningful (the rest is spare capacity, kept zero). */
  bytes: Uint8Array;
  /** Length of the disk in bytes. */
  length: number;
  /** Writes still persisted before the crash; Infinity: never crash; 0: crashed. */
  writesLeft: number;
  /** Every write request seen (persisted or dropped). */
  writes: number;
  /** Write requests dropped because the disk had crashed. */
  dropped: number;
  /** Every write request since the counters were last reset: `w@OFFSET+BYTES`, `z@...`, `t@SIZE`. */
  log: string[];
  /** The disk's capacity: a persisted write or truncate past it fails with ENOSPC (Infinity: none). */
  maxLength: number;
}

/** Every simulated disk, by id. */
export const crashDisks = new Map<string, CrashDisk>();

const RESOLVED = Promise.resolve();

/**
 * Creates (or replaces) the disk `id` holding a copy of `initial`, with no crash armed.
 * @locking common
 */
export function createCrashDisk(id: string, initial: Uint8Array = new Uint8Array(0)): CrashDisk {
  const bytes = new Uint8Array(Math.max(initial.length, 4096));
  bytes.set(initial);
  const disk: CrashDisk = { bytes, length: initial.length, writesLeft: Infinity, writes: 0, dropped: 0, log: [], maxLength: Infinity };
  crashDisks.set(id, disk);
  return disk;
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
 * A copy of the persisted bytes of disk `id` (exactly `length` bytes).
 * @locking common
 */
export function persistedBytes(id: string): Uint8Array {
  const disk = crashDisk(id);
  return disk.bytes.slice(0, disk.length);
}

/**
 * Arms the crash: the next `n` writes persist, every later one is dropped; counters restart.
 * @locking common
 */
export function armCrash(id: string, n: number): void {
  const disk = crashDisk(id);
  disk.writesLeft = n;
  disk.writes = 0;
  disk.dropped = 0;
  disk.log = [];
}

/** Grows the backing array so that it holds at least `end` bytes (new capacity reads as zeros). */
function reserve(disk: CrashDisk, end: number): void {
  if (end <= disk.bytes.length) return;
  let cap = disk.bytes.length;
  while (cap < end) cap *= 2;
  const next = new Uint8Array(cap);
  next.set(disk.bytes.subarray(0, disk.length));
  disk.bytes = next;
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

  /** Counts a write; true when it is to be persisted, false once the disk has crashed. */
  private admit(what: string): boolean {
    const disk = this.disk;
    disk.writes++;
    disk.log.push(what);
    if (disk.writesLeft <= 0) {
      disk.dropped++;
      return false;
    }
    disk.writesLeft--;
    return true;
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

  /**
   * Copies the persisted bytes at `offset` into `buf`; bytes past the end read as zeros.
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
   * Persists `buf` at `offset` (growing the disk) unless the disk has crashed.
   * @locking io
   */
  pwritev(offset: number, buf: Uint8Array): Promise<void> {
    if (!this.admit(`w@${offset}+${buf.length}`)) return RESOLVED;
    const disk = this.disk;
    this.checkCapacity(offset + buf.length, 'write');
    reserve(disk, offset + buf.length);
    disk.bytes.set(buf, offset);
    disk.length = Math.max(disk.length, offset + buf.length);
    return RESOLVED;
  }

  /**
   * Persists zeros over the range (growing the disk) unless the disk has crashed.
   * @locking io
   */
  pwriteZeroes(offset: number, bytes: number, _flags: WriteZeroesFlags): Promise<void> {
    if (!this.admit(`z@${offset}+${bytes}`)) return RESOLVED;
    const disk = this.disk;
    this.checkCapacity(offset + bytes, 'write-zeroes');
    reserve(disk, offset + bytes);
    disk.bytes.fill(0, offset, offset + bytes);
    disk.length = Math.max(disk.length, offset + bytes);
    return RESOLVED;
  }

  /**
   * A hint: ignored (the bytes keep their contents), and not counted as a write.
   * @locking io
   */
  pdiscard(_offset: number, _bytes: number): Promise<void> {
    return RESOLVED;
  }

  /**
   * Writes are persisted in order when they complete: nothing to do.
   * @locking io
   */
  flush(): Promise<void> {
    return RESOLVED;
  }

  /**
   * The persisted length.
   * @locking io
   */
  getLength(): number {
    return this.disk.length;
  }

  /**
   * Changes the persisted length unless the disk has crashed; bytes cut off are zeroed, so that
   * growing again reads zeros.
   * @locking io
   */
  truncate(sizeBytes: number): Promise<void> {
    if (!this.admit(`t@${sizeBytes}`)) return RESOLVED;
    const disk = this.disk;
    this.checkCapacity(sizeBytes, 'truncate');
    if (sizeBytes < disk.length) disk.bytes.fill(0, sizeBytes, disk.length);
    else reserve(disk, sizeBytes);
    disk.length = sizeBytes;
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
    return { type: 'crashsim', data: { id: this.id, writes: disk.writes, dropped: disk.dropped, writesLeft: disk.writesLeft } };
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

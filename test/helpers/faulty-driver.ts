/**
 * A filter driver for fault-injection tests, like QEMU's blkdebug: `driver=faulty,tag=NAME` over
 * a `file` child (`driver=qcow2,file.driver=faulty,file.tag=d1,file.file.filename=PATH`). It
 * forwards everything to its child until the test arms it: `faults.get(NAME).failWrites = true`
 * makes every later write, write-zeroes and truncate fail with EIO (reads and flushes still pass),
 * until it is disarmed. `failAfterWrites = N` arms it after N more successful writes, and
 * `failCount = K` (with either) disarms it again after K failed writes: a transient fault.
 *
 * For sweeps: `plan = new Set([i, j, ...])` fails exactly the writes with those indexes, counted
 * from 0 at the moment the plan is set (`seen` counts them), and `lostAckAt` names planned writes
 * that are carried out before their error is reported (a completed write whose
 * acknowledgement is lost). Snapshot create, goto and delete and VM-state saves that reach the
 * filter (a raw disk's snapshot store below it) count as writes too, so a raw disk's snapshot
 * operations fail on command as well as a qcow2 disk's table writes.
 */
import type { Bql } from '../../src/block/bql.js';
import type { DrainedProof } from '../../src/block/drain.js';
import { registerDriver, type BlockDriver, type BlockDriverInstance, type SnapshotInfo, type WriteZeroesFlags } from '../../src/block/driver.js';
import { BlockError } from '../../src/block/errors.js';
import { bdrvFlush, bdrvGetLength, bdrvLoadVmstate, bdrvPdiscard, bdrvPread, bdrvPwrite, bdrvPwriteZeroes, bdrvSaveVmstate, bdrvTruncate } from '../../src/block/io.js';
import { bdrvSnapshotCreate, bdrvSnapshotDelete, bdrvSnapshotGoto, bdrvSnapshotList } from '../../src/block/snapshot.js';
import type { BlockNode } from '../../src/block/node.js';
import type { NodeOptions } from '../../src/block/options.js';

/** The switch of one faulty node. */
export interface FaultSwitch {
  failWrites: boolean;
  /** When set, the switch arms itself after this many more successful writes. */
  failAfterWrites: number | null;
  /** When set, the switch disarms itself after this many more failed writes. */
  failCount: number | null;
  /** Writes that failed because of the switch. */
  failed: number;
  /** Writes that passed. */
  passed: number;
  /** Indexes of the writes to fail, counted from when the plan was set; null: no plan. */
  plan: Set<number> | null;
  /** Planned writes that are carried out before they fail (the acknowledgement is lost). */
  lostAckAt: Set<number>;
  /** Writes seen since the plan was set. */
  seen: number;
}

/**
 * Sets a plan on the switch: the writes with these indexes from now on fail (those in `lostAck`
 * after they were carried out); `null` removes the plan.
 */
export function planFaults(sw: FaultSwitch, indexes: Iterable<number> | null, lostAck: Iterable<number> = []): void {
  sw.plan = indexes === null ? null : new Set(indexes);
  sw.lostAckAt = new Set(lostAck);
  sw.seen = 0;
}

/** Every faulty node's switch, by tag. */
export const faults = new Map<string, FaultSwitch>();

/** The switch for `tag` (created disarmed). */
export function faultSwitch(tag: string): FaultSwitch {
  let f = faults.get(tag);
  if (f === undefined) {
    f = { failWrites: false, failAfterWrites: null, failCount: null, failed: 0, passed: 0, plan: null, lostAckAt: new Set(), seen: 0 };
    faults.set(tag, f);
  }
  return f;
}

class FaultyInstance implements BlockDriverInstance {
  constructor(
    private readonly file: BlockNode,
    private readonly sw: FaultSwitch,
    private readonly tag: string,
  ) {}

  /** Runs a write `op` under the switch: before it fails (or after, for a lost acknowledgement). */
  private async guarded<T>(op: string, run: () => Promise<T>): Promise<T> {
    const sw = this.sw;
    if (sw.plan !== null) {
      const i = sw.seen++;
      if (sw.plan.has(i)) {
        sw.failed++;
        if (sw.lostAckAt.has(i)) await run();
        throw new BlockError('EIO', `faulty '${this.tag}': injected ${op} failure (write ${i}${sw.lostAckAt.has(i) ? ', carried out' : ''})`, { op });
      }
      sw.passed++;
      return run();
    }
    this.check(op);
    return run();
  }

  private check(op: string): void {
    if (this.sw.failAfterWrites !== null) {
      if (this.sw.failAfterWrites <= 0) {
        this.sw.failWrites = true;
        this.sw.failAfterWrites = null;
      } else this.sw.failAfterWrites--;
    }
    if (this.sw.failWrites) {
      this.sw.failed++;
      if (this.sw.failCount !== null && --this.sw.failCount <= 0) {
        this.sw.failWrites = false;
        this.sw.failCount = null;
      }
      throw new BlockError('EIO', `faulty '${this.tag}': injected ${op} failure`, { op });
    }
    this.sw.passed++;
  }

  /** @locking io */
  preadv(offset: number, buf: Uint8Array): Promise<void> {
    return bdrvPread(this.file, offset, buf);
  }

  /** @locking io */
  pwritev(offset: number, buf: Uint8Array): Promise<void> {
    return this.guarded('write', () => bdrvPwrite(this.file, offset, buf));
  }

  /** @locking io */
  pwriteZeroes(offset: number, bytes: number, flags: WriteZeroesFlags): Promise<void> {
    return this.guarded('write-zeroes', () => bdrvPwriteZeroes(this.file, offset, bytes, flags));
  }

  /** @locking io */
  pdiscard(offset: number, bytes: number): Promise<void> {
    return bdrvPdiscard(this.file, offset, bytes);
  }

  /** @locking io */
  flush(): Promise<void> {
    return bdrvFlush(this.file);
  }

  /** @locking io */
  getLength(): number {
    return bdrvGetLength(this.file);
  }

  /** @locking io */
  truncate(sizeBytes: number): Promise<void> {
    return this.guarded('truncate', () => bdrvTruncate(this.file, sizeBytes));
  }

  /** @locking io */
  saveVmstate(buf: Uint8Array, pos: number): Promise<void> {
    return this.guarded('save-vmstate', () => bdrvSaveVmstate(this.file, buf, pos));
  }

  /** @locking io */
  loadVmstate(buf: Uint8Array, pos: number): Promise<void> {
    return bdrvLoadVmstate(this.file, buf, pos);
  }

  /** @locking global-state */
  snapshotCreate(bql: Bql, drained: DrainedProof, info: SnapshotInfo): Promise<SnapshotInfo> {
    return this.guarded('snapshot-create', () => bdrvSnapshotCreate(bql, drained, this.file, info));
  }

  /** @locking global-state */
  snapshotGoto(bql: Bql, drained: DrainedProof, idOrName: string): Promise<void> {
    return this.guarded('snapshot-goto', () => bdrvSnapshotGoto(bql, drained, this.file, idOrName));
  }

  /** @locking global-state */
  snapshotDelete(bql: Bql, drained: DrainedProof, id: string | null, name: string | null): Promise<SnapshotInfo> {
    return this.guarded('snapshot-delete', () => bdrvSnapshotDelete(bql, drained, this.file, id, name));
  }

  /** @locking global-state */
  snapshotList(bql: Bql): Promise<SnapshotInfo[]> {
    return bdrvSnapshotList(bql, this.file);
  }

  /** @locking global-state */
  async close(_bql: Bql, _drained: DrainedProof): Promise<void> {}
}

/** The `faulty` filter driver. */
export const faultyDriver: BlockDriver = {
  formatName: 'faulty',
  kind: 'filter',
  /**
   * Opens the filter over its `file` child.
   * @locking global-state
   */
  async open(_bql: Bql, node: BlockNode, opts: NodeOptions): Promise<BlockDriverInstance> {
    const file = node.file;
    const tag = opts['tag'];
    if (file === undefined || tag === undefined) throw new BlockError('EINVAL', "driver 'faulty' needs a file child and a tag", { node: node.nodeName });
    return new FaultyInstance(file, faultSwitch(tag), tag);
  },
};

registerDriver(faultyDriver);

/**
 * A filter driver for fault-injection tests, like QEMU's blkdebug: `driver=faulty,tag=NAME` over
 * a `file` child (`driver=qcow2,file.driver=faulty,file.tag=d1,file.file.filename=PATH`). It
 * forwards everything to its child until the test arms it: `faults.get(NAME).failWrites = true`
 * makes every later write, write-zeroes and truncate fail with EIO (reads and flushes still pass),
 * until it is disarmed. `failAfterWrites = N` arms it after N more successful writes, and
 * `failCount = K` (with either) disarms it again after K failed writes: a transient fault.
 */
import type { Bql } from '../../src/block/bql.js';
import type { DrainedProof } from '../../src/block/drain.js';
import { registerDriver, type BlockDriver, type BlockDriverInstance, type WriteZeroesFlags } from '../../src/block/driver.js';
import { BlockError } from '../../src/block/errors.js';
import { bdrvFlush, bdrvGetLength, bdrvPdiscard, bdrvPread, bdrvPwrite, bdrvPwriteZeroes, bdrvTruncate } from '../../src/block/io.js';
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
}

/** Every faulty node's switch, by tag. */
export const faults = new Map<string, FaultSwitch>();

/** The switch for `tag` (created disarmed). */
export function faultSwitch(tag: string): FaultSwitch {
  let f = faults.get(tag);
  if (f === undefined) {
    f = { failWrites: false, failAfterWrites: null, failCount: null, failed: 0, passed: 0 };
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
  async pwritev(offset: number, buf: Uint8Array): Promise<void> {
    this.check('write');
    await bdrvPwrite(this.file, offset, buf);
  }

  /** @locking io */
  async pwriteZeroes(offset: number, bytes: number, flags: WriteZeroesFlags): Promise<void> {
    this.check('write-zeroes');
    await bdrvPwriteZeroes(this.file, offset, bytes, flags);
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
  async truncate(sizeBytes: number): Promise<void> {
    this.check('truncate');
    await bdrvTruncate(this.file, sizeBytes);
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

/**
 * Format driver `raw`: the guest sees the protocol child's bytes as they are.
 *
 * Every request goes to the `file` child unchanged. It has no snapshot callbacks of its own: the
 * generic layer forwards snapshot operations to the child (QEMU's fallback), so a raw node
 * snapshots when its protocol node can.
 */
import { assertBql, type Bql } from '../block/bql.js';
import { assertDrained, type DrainedProof } from '../block/drain.js';
import { probingDrivers, registerDriver, type BlockDriver, type BlockDriverInstance, type BlockStatus, type WriteFlags, type WriteZeroesFlags } from '../block/driver.js';
import { BlockError } from '../block/errors.js';
import { bdrvBlockStatus, bdrvFlush, bdrvGetLength, bdrvPdiscard, bdrvPread, bdrvPwrite, bdrvPwriteZeroes, bdrvTruncate } from '../block/io.js';
import type { BlockNode } from '../block/node.js';
import { CoMutex } from '../block/co-mutex.js';
import { blockWarning } from '../block/warnings.js';
import type { NodeOptions } from '../block/options.js';

/** Bytes at the start of a probed raw image that no write may turn into another format's header (QEMU's BLOCK_PROBE_BUF_SIZE). */
export const PROBE_GUARD_BYTES = 512;

/**
 * QEMU's raw_open warning for a writable image whose format was guessed (word for word, so that
 * scripts grepping QEMU's output find it).
 * @locking common
 */
export function probedRawWarning(filename: string): string {
  return (
    `WARNING: Image format was not specified for '${filename}' and probing guessed raw.\n` +
    '         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n' +
    "         Specify the 'raw' format explicitly to remove the restrictions."
  );
}

/** An open raw node: a pass-through to its file child. */
class RawInstance implements BlockDriverInstance {
  /** Set when the format was probed and the node is writable: writes to block 0 are checked. */
  private readonly guardBlock0: boolean;
  /** Serialises guarded writes to block 0, so that two of them cannot build a header between them. */
  private readonly block0 = new CoMutex();

  constructor(
    private readonly node: BlockNode,
    private readonly file: BlockNode,
  ) {
    this.guardBlock0 = node.probed && !node.readOnly;
  }

  /** Reads from the child at the same offset. */
  preadv(offset: number, buf: Uint8Array): Promise<void> {
    return bdrvPread(this.file, offset, buf);
  }

  /** FUA goes down with the request: the child's own write path honours or emulates it. */
  readonly supportsFua = true;

  /**
   * Writes to the child at the same offset, with the request's flags. On a probed raw image a
   * write into block 0 that would make the image probe as another format is refused (EPERM), as
   * QEMU's raw_co_pwritev does: a guest writing a qcow2 header there would otherwise make the
   * next open read its disk as a qcow2 image naming any host file as its backing file.
   */
  pwritev(offset: number, buf: Uint8Array, flags?: WriteFlags): Promise<void> {
    if (!this.guardBlock0 || offset >= PROBE_GUARD_BYTES || buf.length === 0) return bdrvPwrite(this.file, offset, buf, flags);
    return this.block0.run(async () => {
      await this.checkBlock0(offset, buf);
      await bdrvPwrite(this.file, offset, buf, flags);
    });
  }

  /** EPERM when block 0 after writing `buf` at `offset` would probe as a format other than raw. */
  private async checkBlock0(offset: number, buf: Uint8Array): Promise<void> {
    const sector = new Uint8Array(PROBE_GUARD_BYTES);
    const end = Math.min(PROBE_GUARD_BYTES, offset + buf.length);
    if (offset > 0 || end < PROBE_GUARD_BYTES) {
      const have = Math.min(PROBE_GUARD_BYTES, bdrvGetLength(this.file));
      if (have > 0) await bdrvPread(this.file, 0, sector.subarray(0, have));
    }
    sector.set(buf.subarray(0, end - offset), offset);
    let best: BlockDriver = rawDriver;
    let bestScore = 0;
    for (const drv of probingDrivers()) {
      const score = drv.probe?.(sector, this.file.filename) ?? 0;
      if (score > bestScore) {
        best = drv;
        bestScore = score;
      }
    }
    if (best !== rawDriver) {
      throw new BlockError(
        'EPERM',
        `write to block 0 of node '${this.node.nodeName}' (${this.file.filename}) refused: it would make the image, whose format was probed as raw, probe as ${best.formatName}; open it with format=raw to write it`,
        { node: this.node.nodeName, op: 'write', offset },
      );
    }
  }

  /** Write-zeroes on the child. */
  pwriteZeroes(offset: number, bytes: number, flags: WriteZeroesFlags): Promise<void> {
    return bdrvPwriteZeroes(this.file, offset, bytes, flags);
  }

  /** Discard on the child. */
  pdiscard(offset: number, bytes: number): Promise<void> {
    return bdrvPdiscard(this.file, offset, bytes);
  }

  /** Flush on the child. */
  flush(): Promise<void> {
    return bdrvFlush(this.file);
  }

  /** The child's length. */
  getLength(): number {
    return bdrvGetLength(this.file);
  }

  /**
   * The child's status at the same offset (a protocol's holes and zeros show through raw).
   * @locking io
   */
  blockStatus(offset: number, bytes: number): Promise<BlockStatus> {
    return bdrvBlockStatus(this.file, offset, bytes);
  }

  /** Resizes the child. */
  truncate(sizeBytes: number): Promise<void> {
    return bdrvTruncate(this.file, sizeBytes);
  }

  /**
   * Nothing of its own to release (the generic layer closes the child); checks that the node is quiet.
   * @locking global-state
   */
  async close(bql: Bql, drained: DrainedProof): Promise<void> {
    assertDrained(bql, drained, this.node, 'raw close');
  }
}

/** The `raw` format driver. */
export const rawDriver: BlockDriver = {
  formatName: 'raw',
  kind: 'format',
  /** Raw matches anything, with the lowest score, so any other format wins. */
  probe(): number {
    return 1;
  },
  /**
   * Opens a raw node over its already attached `file` child.
   * @locking global-state
   */
  async open(bql: Bql, node: BlockNode, opts: NodeOptions): Promise<BlockDriverInstance> {
    assertBql(bql, `raw open (node '${node.nodeName}')`);
    const file = node.file;
    if (file === undefined) {
      throw new BlockError('EINVAL', `Driver 'raw' needs a 'file' child (node '${node.nodeName}')`, { node: node.nodeName, field: 'file' });
    }
    const unknown = Object.keys(opts);
    if (unknown.length > 0) {
      throw new BlockError('EINVAL', `Invalid parameter '${unknown[0]}' for driver 'raw' (node '${node.nodeName}')`, {
        node: node.nodeName,
        field: unknown[0],
      });
    }
    if (node.probed && !node.readOnly) blockWarning(probedRawWarning(file.filename));
    return new RawInstance(node, file);
  },
};

registerDriver(rawDriver);

/**
 * Format driver `raw`: the guest sees the protocol child's bytes as they are.
 *
 * Every request goes to the `file` child unchanged. It has no snapshot callbacks of its own: the
 * generic layer forwards snapshot operations to the child (QEMU's fallback), so a raw node
 * snapshots when its protocol node can.
 */
import { assertBql, type Bql } from '../block/bql.js';
import { assertDrained, type DrainedProof } from '../block/drain.js';
import { registerDriver, type BlockDriver, type BlockDriverInstance, type BlockStatus, type WriteFlags, type WriteZeroesFlags } from '../block/driver.js';
import { BlockError } from '../block/errors.js';
import { bdrvBlockStatus, bdrvFlush, bdrvGetLength, bdrvPdiscard, bdrvPread, bdrvPwrite, bdrvPwriteZeroes, bdrvTruncate } from '../block/io.js';
import type { BlockNode } from '../block/node.js';
import type { NodeOptions } from '../block/options.js';

/** An open raw node: a pass-through to its file child. */
class RawInstance implements BlockDriverInstance {
  constructor(
    private readonly node: BlockNode,
    private readonly file: BlockNode,
  ) {}

  /** Reads from the child at the same offset. */
  preadv(offset: number, buf: Uint8Array): Promise<void> {
    return bdrvPread(this.file, offset, buf);
  }

  /** FUA goes down with the request: the child's own write path honours or emulates it. */
  readonly supportsFua = true;

  /** Writes to the child at the same offset, with the request's flags. */
  pwritev(offset: number, buf: Uint8Array, flags?: WriteFlags): Promise<void> {
    return bdrvPwrite(this.file, offset, buf, flags);
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
    return new RawInstance(node, file);
  },
};

registerDriver(rawDriver);

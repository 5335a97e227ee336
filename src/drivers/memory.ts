/**
 * Protocol driver `memory`: a RAM-backed disk for tests and the demo (`driver=memory,size=64M`).
 *
 * Storage is sparse: 1 MiB chunks of SharedArrayBuffer memory are allocated on first write, so a
 * large virtual size costs nothing until written; unwritten bytes read as zeros. Transfers are
 * memory copies on the calling thread (there is no blocking syscall to move off the main loop).
 */
import type { Bql } from '../block/bql.js';
import type { DrainedProof } from '../block/drain.js';
import { registerDriver, type BlockDriver, type BlockDriverInstance, type WriteZeroesFlags } from '../block/driver.js';
import { BlockError } from '../block/errors.js';
import type { BlockNode } from '../block/node.js';
import { parseSize, type NodeOptions } from '../block/options.js';

const CHUNK_BITS = 20;
const CHUNK_SIZE = 1 << CHUNK_BITS;
const RESOLVED = Promise.resolve();

/** An open memory node: its chunks and its length. */
class MemoryInstance implements BlockDriverInstance {
  private readonly chunks = new Map<number, Uint8Array>();

  constructor(
    private readonly nodeName: string,
    private sizeBytes: number,
  ) {}

  /** Copies `buf.length` bytes at `offset` into `buf`; holes and bytes past the end read as zeros. */
  preadv(offset: number, buf: Uint8Array): Promise<void> {
    this.forEachChunk(offset, buf.length, (chunk, chunkOff, bufOff, n) => {
      if (chunk === undefined) buf.fill(0, bufOff, bufOff + n);
      else buf.set(chunk.subarray(chunkOff, chunkOff + n), bufOff);
    });
    return RESOLVED;
  }

  /** Copies `buf` into the chunks at `offset`; the node grows when written past its end. */
  pwritev(offset: number, buf: Uint8Array): Promise<void> {
    this.forEachChunk(offset, buf.length, (_chunk, chunkOff, bufOff, n, index) => {
      this.chunkFor(index).set(buf.subarray(bufOff, bufOff + n), chunkOff);
    });
    this.sizeBytes = Math.max(this.sizeBytes, offset + buf.length);
    return RESOLVED;
  }

  /** Zeroes the range; whole chunks are dropped instead of filled. */
  pwriteZeroes(offset: number, bytes: number, _flags: WriteZeroesFlags): Promise<void> {
    this.forEachChunk(offset, bytes, (chunk, chunkOff, _bufOff, n, index) => {
      if (chunk === undefined) return;
      if (n === CHUNK_SIZE) this.chunks.delete(index);
      else chunk.fill(0, chunkOff, chunkOff + n);
    });
    this.sizeBytes = Math.max(this.sizeBytes, offset + bytes);
    return RESOLVED;
  }

  /** Discard drops whole chunks (their bytes then read as zeros) and leaves partial ones. */
  pdiscard(offset: number, bytes: number): Promise<void> {
    this.forEachChunk(offset, bytes, (_chunk, _chunkOff, _bufOff, n, index) => {
      if (n === CHUNK_SIZE) this.chunks.delete(index);
    });
    return RESOLVED;
  }

  /** Memory needs no flush. */
  flush(): Promise<void> {
    return RESOLVED;
  }

  /** The node's length. */
  getLength(): number {
    return this.sizeBytes;
  }

  /** Shrinking drops the bytes past the new end, so that growing again reads zeros there. */
  truncate(sizeBytes: number): Promise<void> {
    if (sizeBytes < this.sizeBytes) {
      const old = this.sizeBytes;
      this.sizeBytes = sizeBytes;
      this.forEachChunk(sizeBytes, old - sizeBytes, (chunk, chunkOff, _bufOff, n, index) => {
        if (chunk === undefined) return;
        if (chunkOff === 0) this.chunks.delete(index);
        else chunk.fill(0, chunkOff, chunkOff + n);
      });
    }
    this.sizeBytes = sizeBytes;
    return RESOLVED;
  }

  /** Frees the chunks. */
  async close(_bql: Bql, _drained: DrainedProof): Promise<void> {
    this.chunks.clear();
  }

  formatSpecific(): Record<string, unknown> {
    return { allocatedBytes: this.chunks.size * CHUNK_SIZE };
  }

  private chunkFor(index: number): Uint8Array {
    let chunk = this.chunks.get(index);
    if (chunk === undefined) {
      chunk = new Uint8Array(new SharedArrayBuffer(CHUNK_SIZE));
      this.chunks.set(index, chunk);
    }
    return chunk;
  }

  private forEachChunk(
    offset: number,
    bytes: number,
    fn: (chunk: Uint8Array | undefined, chunkOff: number, bufOff: number, n: number, index: number) => void,
  ): void {
    let done = 0;
    while (done < bytes) {
      const pos = offset + done;
      const index = Math.floor(pos / CHUNK_SIZE);
      const chunkOff = pos - index * CHUNK_SIZE;
      const n = Math.min(bytes - done, CHUNK_SIZE - chunkOff);
      fn(this.chunks.get(index), chunkOff, done, n, index);
      done += n;
    }
  }

  toString(): string {
    return `memory node '${this.nodeName}'`;
  }
}

/** The `memory` protocol driver. */
export const memoryDriver: BlockDriver = {
  formatName: 'memory',
  kind: 'protocol',
  /**
   * Opens a memory node of `size` bytes (required).
   * @locking global-state
   */
  async open(_bql: Bql, node: BlockNode, opts: NodeOptions): Promise<BlockDriverInstance> {
    const size = opts['size'];
    if (size === undefined) {
      throw new BlockError('EINVAL', `Parameter 'size' is required for driver 'memory' (node '${node.nodeName}')`, {
        node: node.nodeName,
        field: 'size',
      });
    }
    return new MemoryInstance(node.nodeName, parseSize(size));
  },
};

registerDriver(memoryDriver);

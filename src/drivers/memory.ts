/**
 * Protocol driver `memory`: a RAM-backed disk for tests and the demo (`driver=memory,size=64M`).
 *
 * Storage is sparse: 1 MiB chunks of SharedArrayBuffer memory are allocated on first write, so a
 * large virtual size costs nothing until written; unwritten bytes read as zeros. Transfers are
 * memory copies on the calling thread (there is no blocking syscall to move off the main loop).
 *
 * Internal snapshots are kept in memory too (memory-snapshots.ts): a snapshot copies the chunks,
 * goto copies them back, and saved VM state lives in a chunk map of its own. They live as long
 * as the node: a new node starts with none.
 */
import { assertBql, type Bql } from '../block/bql.js';
import { assertDrained, type DrainedProof } from '../block/drain.js';
import { registerDriver, type BlockDriver, type BlockDriverInstance, type SnapshotInfo, type WriteZeroesFlags } from '../block/driver.js';
import { BlockError } from '../block/errors.js';
import type { BlockNode } from '../block/node.js';
import { parseSize, type NodeOptions } from '../block/options.js';
import { CHUNK_SIZE, copyChunks, forEachChunk, readChunks, takeMemorySnapshot, writeChunks, type ChunkMap, type MemorySnapshot } from './memory-snapshots.js';
import { findByIdAndName, findByIdOrName, findForLoadTmp } from './snapshot-lookup.js';

const RESOLVED = Promise.resolve();

/** An open memory node: its chunks, its length, its snapshots and its VM state. */
class MemoryInstance implements BlockDriverInstance {
  /** The node's bytes; goto and load-tmp replace the map (the node is drained or read-only). */
  private chunks: ChunkMap = new Map();
  /** The VM state saved since the last snapshot took it (or the one goto restored). */
  private vmState: ChunkMap = new Map();
  private readonly snapshots: MemorySnapshot[] = [];
  /** The snapshot shown by load-tmp, or null. */
  private tmpSnapshot: string | null = null;

  constructor(
    private readonly node: BlockNode,
    private sizeBytes: number,
  ) {}

  private get nodeName(): string {
    return this.node.nodeName;
  }

  /**
   * Copies `buf.length` bytes at `offset` into `buf`; holes and bytes past the end read as zeros.
   * @locking io
   */
  preadv(offset: number, buf: Uint8Array): Promise<void> {
    readChunks(this.chunks, offset, buf);
    return RESOLVED;
  }

  /**
   * Copies `buf` into the chunks at `offset`; the node grows when written past its end.
   * @locking io
   */
  pwritev(offset: number, buf: Uint8Array): Promise<void> {
    writeChunks(this.chunks, offset, buf);
    this.sizeBytes = Math.max(this.sizeBytes, offset + buf.length);
    return RESOLVED;
  }

  /**
   * Zeroes the range; whole chunks are dropped instead of filled.
   * @locking io
   */
  pwriteZeroes(offset: number, bytes: number, _flags: WriteZeroesFlags): Promise<void> {
    const chunks = this.chunks;
    forEachChunk(chunks, offset, bytes, (chunk, chunkOff, _bufOff, n, index) => {
      if (chunk === undefined) return;
      if (n === CHUNK_SIZE) chunks.delete(index);
      else chunk.fill(0, chunkOff, chunkOff + n);
    });
    this.sizeBytes = Math.max(this.sizeBytes, offset + bytes);
    return RESOLVED;
  }

  /**
   * Discard drops whole chunks (their bytes then read as zeros) and leaves partial ones.
   * @locking io
   */
  pdiscard(offset: number, bytes: number): Promise<void> {
    const chunks = this.chunks;
    forEachChunk(chunks, offset, bytes, (_chunk, _chunkOff, _bufOff, n, index) => {
      if (n === CHUNK_SIZE) chunks.delete(index);
    });
    return RESOLVED;
  }

  /**
   * Memory needs no flush.
   * @locking io
   */
  flush(): Promise<void> {
    return RESOLVED;
  }

  /**
   * The node's length.
   * @locking io
   */
  getLength(): number {
    return this.sizeBytes;
  }

  /**
   * Shrinking drops the bytes past the new end, so that growing again reads zeros there.
   * @locking io
   */
  truncate(sizeBytes: number): Promise<void> {
    if (sizeBytes < this.sizeBytes) {
      const old = this.sizeBytes;
      const chunks = this.chunks;
      this.sizeBytes = sizeBytes;
      forEachChunk(chunks, sizeBytes, old - sizeBytes, (chunk, chunkOff, _bufOff, n, index) => {
        if (chunk === undefined) return;
        if (chunkOff === 0) chunks.delete(index);
        else chunk.fill(0, chunkOff, chunkOff + n);
      });
    }
    this.sizeBytes = sizeBytes;
    return RESOLVED;
  }

  /**
   * Writes VM state at `pos` (kept in memory until a snapshot takes it).
   * @locking io
   */
  saveVmstate(buf: Uint8Array, pos: number): Promise<void> {
    if (this.tmpSnapshot !== null) {
      return Promise.reject(
        new BlockError('EPERM', `${this.toString()} shows snapshot '${this.tmpSnapshot}' temporarily and refuses save-vmstate`, { node: this.nodeName, op: 'save-vmstate' }),
      );
    }
    writeChunks(this.vmState, pos, buf);
    return RESOLVED;
  }

  /**
   * Reads VM state at `pos`; zeros where none was saved.
   * @locking io
   */
  loadVmstate(buf: Uint8Array, pos: number): Promise<void> {
    readChunks(this.vmState, pos, buf);
    return RESOLVED;
  }

  /**
   * Snapshots the node: a copy of its chunks, and its VM state when `info.vmStateSize > 0`.
   * @locking global-state
   */
  async snapshotCreate(bql: Bql, drained: DrainedProof, info: SnapshotInfo): Promise<SnapshotInfo> {
    this.enterDrained(bql, drained, 'snapshot-create');
    const sn = takeMemorySnapshot(this.snapshots, info, this.chunks, this.sizeBytes, this.vmState);
    this.snapshots.push(sn);
    if (sn.vmState !== null) this.vmState = new Map(); // the snapshot owns it now
    return { ...sn.info };
  }

  /**
   * Reverts the node to a copy of the snapshot with this ID or name (ID first), VM state included.
   * @locking global-state
   */
  async snapshotGoto(bql: Bql, drained: DrainedProof, idOrName: string): Promise<void> {
    this.enterDrained(bql, drained, 'snapshot-goto');
    const sn = findByIdOrName(this.snapshots.map((s) => s.info), idOrName);
    const found = sn === undefined ? undefined : this.snapshots.find((s) => s.info === sn);
    if (found === undefined) {
      throw new BlockError('ENOENT', `Snapshot '${idOrName}' not found in ${this.toString()}`, { node: this.nodeName, value: idOrName, op: 'snapshot-goto' });
    }
    this.chunks = copyChunks(found.chunks);
    this.sizeBytes = found.diskSize;
    this.vmState = found.vmState === null ? new Map() : copyChunks(found.vmState);
  }

  /**
   * Deletes the first snapshot matching `id` and `name` (a null one is not compared).
   * @locking global-state
   */
  async snapshotDelete(bql: Bql, drained: DrainedProof, id: string | null, name: string | null): Promise<SnapshotInfo> {
    this.enterDrained(bql, drained, 'snapshot-delete');
    const info = findByIdAndName(this.snapshots.map((s) => s.info), id, name);
    const i = this.snapshots.findIndex((s) => s.info === info);
    const sn = this.snapshots[i];
    if (sn === undefined) {
      throw new BlockError('ENOENT', `Can't find the snapshot (id ${id ?? 'any'}, name ${name ?? 'any'}) in ${this.toString()}`, {
        node: this.nodeName,
        value: name ?? id ?? '',
        op: 'snapshot-delete',
      });
    }
    this.snapshots.splice(i, 1);
    return { ...sn.info };
  }

  /**
   * The node's snapshots in creation order.
   * @locking global-state
   */
  async snapshotList(bql: Bql): Promise<SnapshotInfo[]> {
    assertBql(bql, 'memory snapshot-list');
    return this.snapshots.map((s) => ({ ...s.info }));
  }

  /**
   * On a read-only node: reads (and VM-state reads) show a copy of a snapshot from now on.
   * @locking global-state
   */
  async snapshotLoadTmp(bql: Bql, id: string | null, name: string | null): Promise<void> {
    assertBql(bql, 'memory snapshot-load-tmp');
    if (!this.node.readOnly) {
      throw new BlockError('EINVAL', `Device '${this.nodeName}' is not read-only: a snapshot can only be loaded temporarily on a read-only node`, {
        node: this.nodeName,
        op: 'snapshot-load-tmp',
      });
    }
    const info = findForLoadTmp(this.snapshots.map((s) => s.info), id, name);
    const sn = this.snapshots.find((s) => s.info === info);
    if (sn === undefined) {
      throw new BlockError('ENOENT', `Can't find snapshot '${name ?? id ?? ''}' in ${this.toString()}`, { node: this.nodeName, value: name ?? id ?? '', op: 'snapshot-load-tmp' });
    }
    this.chunks = copyChunks(sn.chunks);
    this.sizeBytes = sn.diskSize;
    this.vmState = sn.vmState === null ? new Map() : copyChunks(sn.vmState);
    this.tmpSnapshot = sn.info.name;
  }

  /**
   * Frees the chunks, the VM state and the snapshots (the node must be quiet: its own proof).
   * @locking global-state
   */
  async close(bql: Bql, drained: DrainedProof): Promise<void> {
    assertDrained(bql, drained, this.node, 'memory close');
    this.chunks.clear();
    this.vmState.clear();
    this.snapshots.length = 0;
  }

  /**
   * Bytes allocated for the node's own chunks (snapshots not counted).
   * @locking io
   */
  formatSpecific(): Record<string, unknown> {
    return { allocatedBytes: this.chunks.size * CHUNK_SIZE };
  }

  private enterDrained(bql: Bql, drained: DrainedProof, op: string): void {
    assertBql(bql, `memory ${op}`);
    assertDrained(bql, drained, this.node, `memory ${op}`);
    if (this.node.readOnly) throw new BlockError('EACCES', `${op} on ${this.toString()}: the node is read-only`, { node: this.nodeName, op });
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
  async open(bql: Bql, node: BlockNode, opts: NodeOptions): Promise<BlockDriverInstance> {
    assertBql(bql, `memory open (node '${node.nodeName}')`);
    const size = opts['size'];
    if (size === undefined) {
      throw new BlockError('EINVAL', `Parameter 'size' is required for driver 'memory' (node '${node.nodeName}')`, {
        node: node.nodeName,
        field: 'size',
      });
    }
    return new MemoryInstance(node, parseSize(size));
  },
};

registerDriver(memoryDriver);

/**
 * Sparse chunked byte storage and internal snapshots for the `memory` driver: a snapshot holds a
 * copy of the node's chunks (and of its VM state when it has one), so later writes to either side
 * never show on the other. IDs and lookups follow qcow2 (snapshot-lookup.ts).
 *
 * The chunk helpers are I/O code (pure memory copies); the snapshot table is changed only by the
 * driver's global-state callbacks.
 */
import type { SnapshotInfo } from '../block/driver.js';
import { nextSnapshotId } from './snapshot-lookup.js';

const CHUNK_BITS = 20;
/** Bytes per chunk; a chunk is allocated on first write. */
export const CHUNK_SIZE = 1 << CHUNK_BITS;

/** Sparse bytes: chunk index -> CHUNK_SIZE bytes (absent chunks read as zeros). */
export type ChunkMap = Map<number, Uint8Array>;

/**
 * Calls `fn` for each chunk-sized piece of [offset, offset + bytes).
 * @locking io
 */
export function forEachChunk(
  chunks: ChunkMap,
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
    fn(chunks.get(index), chunkOff, done, n, index);
    done += n;
  }
}

/**
 * The chunk at `index`, allocated (zeroed, in shared memory) when absent.
 * @locking io
 */
export function chunkFor(chunks: ChunkMap, index: number): Uint8Array {
  let chunk = chunks.get(index);
  if (chunk === undefined) {
    chunk = new Uint8Array(new SharedArrayBuffer(CHUNK_SIZE));
    chunks.set(index, chunk);
  }
  return chunk;
}

/**
 * Copies `buf.length` bytes at `offset` of `chunks` into `buf`; holes read as zeros.
 * @locking io
 */
export function readChunks(chunks: ChunkMap, offset: number, buf: Uint8Array): void {
  forEachChunk(chunks, offset, buf.length, (chunk, chunkOff, bufOff, n) => {
    if (chunk === undefined) buf.fill(0, bufOff, bufOff + n);
    else buf.set(chunk.subarray(chunkOff, chunkOff + n), bufOff);
  });
}

/**
 * Copies `buf` into `chunks` at `offset`, allocating chunks as needed.
 * @locking io
 */
export function writeChunks(chunks: ChunkMap, offset: number, buf: Uint8Array): void {
  forEachChunk(chunks, offset, buf.length, (_chunk, chunkOff, bufOff, n, index) => {
    chunkFor(chunks, index).set(buf.subarray(bufOff, bufOff + n), chunkOff);
  });
}

/**
 * A deep copy of `chunks` (each chunk copied into new shared memory).
 * @locking io
 */
export function copyChunks(chunks: ChunkMap): ChunkMap {
  const out: ChunkMap = new Map();
  for (const [index, chunk] of chunks) {
    const copy = new Uint8Array(new SharedArrayBuffer(CHUNK_SIZE));
    copy.set(chunk);
    out.set(index, copy);
  }
  return out;
}

/** One snapshot of a memory node. */
export interface MemorySnapshot {
  info: SnapshotInfo;
  /** The node's length when it was taken. */
  diskSize: number;
  /** Its own copy of the node's chunks. */
  chunks: ChunkMap;
  /** Its VM state, or null when it has none (reads as zeros after goto). */
  vmState: ChunkMap | null;
}

/**
 * A new snapshot of `chunks` (copied) with the ID qcow2 would assign in `table`; `vmState` is
 * taken as it is (the caller gives up the map) when `info.vmStateSize > 0`.
 * @locking common
 */
export function takeMemorySnapshot(table: readonly MemorySnapshot[], info: SnapshotInfo, chunks: ChunkMap, diskSize: number, vmState: ChunkMap): MemorySnapshot {
  const id = nextSnapshotId(table.map((s) => s.info));
  return {
    info: { ...info, id },
    diskSize,
    chunks: copyChunks(chunks),
    vmState: info.vmStateSize > 0 ? vmState : null,
  };
}

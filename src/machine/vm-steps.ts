/**
 * How a VM snapshot operation (savevm, loadvm, delvm) runs its steps, and the streamed VM-state
 * transfer that lies between them.
 *
 * One body serves two callers: one that holds the BQL for the whole operation (the library's
 * saveVm(bql, ...)), and a holder of the snapshot lock (snapshot-lock.ts) that takes the BQL for
 * each global-state step and moves the VM state in chunks without it, so that other monitors,
 * queries and I/O to other disks go on meanwhile. The VM state moves in 1 MiB chunks through one
 * reused buffer, with a running CRC, and a job's pause point between chunks.
 */
import zlib from 'node:zlib';
import { assertBql, withBql, type Bql } from '../block/bql.js';
import { runDrainedIo, runInDrainedSection, type DrainedProof } from '../block/drain.js';
import { BlockError } from '../block/errors.js';
import { bdrvFlush, bdrvLoadVmstate, bdrvSaveVmstate } from '../block/io.js';
import type { BlockNode } from '../block/node.js';
import { assertSnapshotLocked, claimNodes, type SnapshotLocked } from '../block/snapshot-lock.js';
import { VMSTATE_TRAILER_BYTES } from './vmstate.js';

/** The VM state moves in pieces of this size (the BQL-free steps of a snapshot job). */
export const VMSTATE_CHUNK_BYTES = 1 << 20;

/** The step runner of one VM snapshot operation. */
export interface VmSteps {
  /** Runs a global-state step with the BQL. */
  gs<T>(fn: (bql: Bql) => Promise<T> | T): Promise<T>;
  /** Runs node-level I/O as the owner of `proof`'s sections (without the BQL when snapshot-locked). */
  io<T>(proof: DrainedProof, fn: () => Promise<T>): Promise<T>;
  /** Between chunks: reports progress, yields, and throws ECANCELED once the operation was cancelled. */
  progress(done: number, total: number): Promise<void>;
  /**
   * Called (BQL held) right before the operation makes its change final: throws ECANCELED when it
   * was cancelled; after it, a cancel is refused (the job's point of no return).
   */
  commit(bql: Bql): void;
  /**
   * Called (BQL held) once the nodes are drained: for the snapshot lock's holder, claims them
   * (snapshot-lock.ts claimNodes) so that no graph change touches them between its steps; a
   * caller that holds the BQL throughout needs no claim.
   */
  claim(bql: Bql, nodes: readonly BlockNode[]): void;
}

/** What a job gives the steps: where progress goes and whether it was cancelled. */
export interface VmStepHooks {
  onProgress?(done: number, total: number): void;
  /** Resolves at the job's pause point; true once the job is cancelled. */
  pausePoint?(): Promise<boolean>;
  /** The job's point of no return (Job.enterCommit): false when it was cancelled first. */
  enterCommit?(bql: Bql): boolean;
}

/**
 * Steps for a caller that holds the BQL for the whole operation.
 * @locking global-state
 */
export function heldBqlSteps(bql: Bql): VmSteps {
  assertBql(bql, 'heldBqlSteps');
  return {
    gs: async (fn) => fn(bql),
    io: (proof, fn) => runInDrainedSection(bql, proof, fn),
    progress: async () => {},
    commit: () => {},
    claim: () => {},
  };
}

/**
 * Steps for the snapshot lock's holder: the BQL for each global-state step only, VM-state I/O
 * without it, and the job's pause point between chunks.
 * @locking common
 */
export function snapshotLockSteps(snap: SnapshotLocked, op: string, hooks: VmStepHooks = {}): VmSteps {
  return {
    gs: (fn) => {
      assertSnapshotLocked(snap, op);
      return withBql(fn);
    },
    io: (proof, fn) => runDrainedIo(snap, proof, fn),
    progress: async (done, total) => {
      hooks.onProgress?.(done, total);
      if (hooks.pausePoint === undefined) return;
      if (await hooks.pausePoint()) throw new BlockError('ECANCELED', `${op}: cancelled`, { op });
    },
    commit: (bql) => {
      if (hooks.enterCommit !== undefined && !hooks.enterCommit(bql)) throw new BlockError('ECANCELED', `${op}: cancelled`, { op });
    },
    claim: (bql, nodes) => {
      assertBql(bql, op);
      claimNodes(snap, nodes);
    },
  };
}

/**
 * Streams a VM state (vmstate.ts vmStateLayout: prefix, RAM, then the CRC it computes on the way)
 * to `node`'s VM-state area from position 0; returns the bytes written.
 * @locking common
 */
export async function writeVmStateStream(
  steps: VmSteps,
  proof: DrainedProof,
  node: BlockNode,
  layout: { prefix: Uint8Array; ram: Uint8Array; total: number },
): Promise<number> {
  // two buffers: the next chunk is copied (and its CRC computed) while the last one is written
  const size = Math.min(VMSTATE_CHUNK_BYTES, layout.total);
  const bufs = [new Uint8Array(size), new Uint8Array(size)] as const;
  let cur = 0;
  let buf: Uint8Array = bufs[0];
  let fill = 0;
  let pos = 0;
  let crc = 0;
  let inflight: Promise<void> | null = null;
  const writeOut = async (): Promise<void> => {
    const piece = buf.subarray(0, fill);
    const at = pos;
    pos += fill;
    fill = 0;
    // the previous chunk's write must be done: its buffer is the one filled next
    if (inflight !== null) await inflight;
    inflight = null;
    await steps.progress(at, layout.total);
    const w = steps.io(proof, () => bdrvSaveVmstate(node, piece, at));
    w.catch(() => undefined); // awaited below; not an unhandled rejection meanwhile
    inflight = w;
    cur ^= 1;
    buf = bufs[cur] as Uint8Array;
  };
  for (const seg of [layout.prefix, layout.ram]) {
    for (let off = 0; off < seg.length; ) {
      const n = Math.min(buf.length - fill, seg.length - off);
      buf.set(seg.subarray(off, off + n), fill);
      fill += n;
      off += n;
      if (fill === buf.length) {
        crc = zlib.crc32(buf, crc);
        await writeOut();
      }
    }
  }
  crc = zlib.crc32(buf.subarray(0, fill), crc);
  if (buf.length - fill < VMSTATE_TRAILER_BYTES) await writeOut();
  new DataView(buf.buffer, buf.byteOffset).setUint32(fill, crc);
  fill += VMSTATE_TRAILER_BYTES;
  await writeOut();
  if (inflight !== null) await inflight;
  await steps.progress(pos, layout.total);
  // written back here, outside the BQL: the snapshot's commit flushes again, and finds little left
  await steps.io(proof, () => bdrvFlush(node));
  return pos;
}

/**
 * Reads `size` bytes of `node`'s VM-state area in chunks into a new buffer, and the CRC-32 of all
 * but its last 4 bytes (the trailer a VM state ends with), computed on the way.
 * @locking common
 */
export async function readVmStateStream(steps: VmSteps, proof: DrainedProof, node: BlockNode, size: number): Promise<{ bytes: Uint8Array; crc: number }> {
  const out = new Uint8Array(size);
  const body = Math.max(0, size - VMSTATE_TRAILER_BYTES);
  let crc = 0;
  for (let pos = 0; pos < size; ) {
    const n = Math.min(VMSTATE_CHUNK_BYTES, size - pos);
    const piece = out.subarray(pos, pos + n);
    const at = pos;
    await steps.io(proof, () => bdrvLoadVmstate(node, piece, at));
    if (at < body) crc = zlib.crc32(out.subarray(at, Math.min(at + n, body)), crc);
    pos += n;
    await steps.progress(pos, size);
  }
  return { bytes: out, crc };
}

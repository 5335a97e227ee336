/**
 * The data half of a safe rebase (qemu-img rebase without -u): every range that the overlay does
 * not allocate itself and where the old backing chain and the new backing file read differently
 * is written into the overlay, so that after the header names the new backing file the guest
 * reads the same bytes. As qemu-img 7.2: 2 MiB steps, 512-byte sectors compared. Unlike it,
 * zeros (where the old chain ends before the overlay does) are written as data: snapstack's
 * qcow2 write-zeroes leaves an unallocated cluster alone where nothing shows through yet.
 *
 * I/O code: ordinary requests on the overlay's backend and on the two backing nodes.
 */
import { blkGetLength, blkPwrite, type BlockBackend } from './backend.js';
import { allocatedAbove } from './commit.js';
import { BlockError } from './errors.js';
import { bdrvBlockStatus, bdrvGetLength, bdrvPread } from './io.js';
import type { BlockNode } from './node.js';

/** qemu-img's IO_BUF_SIZE. */
export const REBASE_STEP = 2 * 1024 * 1024;
const SECTOR = 512;

/**
 * Length of the run of whole sectors from `from` (the last may be short) whose "differs" state
 * equals that of the first sector, and that state (QEMU's compare_buffers).
 * @locking common
 */
export function compareRun(a: Uint8Array, b: Uint8Array, from: number, end: number): { differs: boolean; bytes: number } {
  const sectorDiffers = (at: number): boolean => {
    const stop = Math.min(at + SECTOR, end);
    for (let i = at; i < stop; i++) if (a[i] !== b[i]) return true;
    return false;
  };
  const differs = sectorDiffers(from);
  let at = from + SECTOR;
  while (at < end && sectorDiffers(at) === differs) at += SECTOR;
  return { differs, bytes: Math.min(at, end) - from };
}

/** What rebaseCopy reads and reports. */
export interface RebaseCopy {
  /** The overlay's device: written where the chains differ. */
  overlay: BlockBackend;
  /** The overlay's current backing chain (its backing child), or null when it has none. */
  oldBacking: BlockNode | null;
  /** The new backing file's node, or null to make the overlay standalone. */
  newBacking: BlockNode | null;
  /**
   * The image of the old chain that the new backing file is, when it is one (QEMU's
   * prefix_chain_bs): ranges that no image between the overlay and it allocates are skipped.
   */
  prefixInChain?: BlockNode | null;
  /** Called after each step that was compared, with the step's share of 100 (qemu-img's meter). */
  onStep?: (percent: number) => void;
}

/**
 * Copies into the overlay what the new backing file would change (see the file comment).
 * Errors of the writes are EIO-like BlockErrors naming the overlay and offset.
 * @locking io
 */
export async function rebaseCopy(req: RebaseCopy): Promise<void> {
  const root = req.overlay.root;
  if (root === null) throw new BlockError('ENOMEDIUM', `rebase: device '${req.overlay.name}' has no medium`, { node: req.overlay.name });
  const size = blkGetLength(req.overlay);
  const oldSize = req.oldBacking === null ? 0 : bdrvGetLength(req.oldBacking);
  const newSize = req.newBacking === null ? 0 : bdrvGetLength(req.newBacking);
  const stepShare = size === 0 ? 0 : 100 / Math.floor(size / Math.min(size, REBASE_STEP));
  const bufOld = new Uint8Array(REBASE_STEP);
  const bufNew = new Uint8Array(REBASE_STEP);
  for (let offset = 0; offset < size; ) {
    let n = Math.min(REBASE_STEP, size - offset);
    const st = await bdrvBlockStatus(root, offset, n);
    n = Math.min(n, st.bytes);
    if (st.allocated) {
      offset += n;
      continue;
    }
    const prefix = req.prefixInChain ?? null;
    if (prefix !== null && req.oldBacking !== null) {
      const above = await allocatedAbove(req.oldBacking, prefix, offset, n);
      n = above.bytes;
      if (!above.allocated) {
        offset += n;
        continue;
      }
    }
    if (offset >= oldSize || req.oldBacking === null) bufOld.fill(0, 0, n);
    else {
      n = Math.min(n, oldSize - offset);
      await bdrvPread(req.oldBacking, offset, bufOld.subarray(0, n));
    }
    if (offset >= newSize || req.newBacking === null) bufNew.fill(0, 0, n);
    else {
      n = Math.min(n, newSize - offset);
      await bdrvPread(req.newBacking, offset, bufNew.subarray(0, n));
    }
    for (let done = 0; done < n; ) {
      const run = compareRun(bufOld, bufNew, done, n);
      if (run.differs) {
        // zeros as data, not write-zeroes: qcow2 skips unallocated clusters past its current
        // backing file's end (they read as zeros now), which the new backing file would show
        await blkPwrite(req.overlay, offset + done, bufOld.slice(done, done + run.bytes));
      }
      done += run.bytes;
    }
    req.onStep?.(stepShare);
    offset += n;
  }
}

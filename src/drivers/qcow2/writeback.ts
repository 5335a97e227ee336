/**
 * qcow2 metadata write-back: the one place where changed metadata reaches the disk, in the order
 * that makes any crash safe (QEMU gets the same from its write-back caches and the dependencies
 * between them, block/qcow2-cache.c).
 *
 * I/O code, called with the qcow2 lock held. The power-loss model (test/helpers/crash-driver.ts):
 * between two flushes the disk may keep any subset of the writes, torn at 512-byte sectors; a
 * flush that returned made everything before it durable. So every dependency below is a flush:
 *
 *   1. refcount blocks (new ones and changed ranges), then, behind a flush, refcount-table
 *      entries that point at new blocks                      (writeDirtyRefcounts)
 *   2. a flush: the refcounts, and the guest data that new L2 entries point at, are durable
 *   3. the changed L2 tables
 *   4. a flush (only when the L1 changed): the L2 tables the L1 will point at are durable
 *   5. the changed L1 entries
 *   6. a flush: the caller's flush, and the point after which every pointer dropped before the
 *      flush began is gone from the disk
 *   7. the deferred frees (pendingFrees) lower their refcounts; those refcount blocks are written
 *      and flushed in a second round. A cluster is therefore never reused while a durable pointer
 *      to it may remain, and a crash in between only leaks it.
 *
 * A guest flush with no metadata change costs one flush (step 6); after allocating writes, two;
 * when clusters were freed (copy on write of shared clusters, discard), three.
 */
import { freeClusters, writeDirtyRefcounts } from './refcount.js';
import type { Qcow2State } from './state.js';

/** Dirty tables allowed before an allocating request flushes the metadata itself (per cache). */
const DIRTY_TABLE_FRACTION = 2;
/** Deferred frees allowed before an allocating request flushes the metadata itself. */
const MAX_PENDING_FREES = 4096;

/**
 * Writes every metadata change in dependency order and flushes the file (steps 1-7 above), then,
 * when frees were applied, writes their refcount changes and flushes once more, so that the image
 * on disk says exactly what memory says (no transient leak for `qemu-img check -U` to see): it
 * repeats until nothing is dirty (frees make no frees, so two rounds are the most it needs).
 * @locking io
 */
export async function flushMetadata(s: Qcow2State): Promise<void> {
  for (let round = 0; round < 4; round++) {
    const frees = s.pendingFrees;
    s.pendingFrees = [];
    try {
      await writeOrdered(s);
    } catch (e) {
      // nothing changed in memory: the dirty tables stay dirty and the frees wait for the next
      // flush, which writes everything again in the same order (a failed flush, though, refuses
      // every later metadata write: see barrier)
      s.pendingFrees = frees.concat(s.pendingFrees);
      throw e;
    }
    await applyFrees(s, frees);
    if (!s.metadataDirty) return;
  }
}

/** Test-only: when set, the barriers between the groups of writes are skipped (the last flush stays). */
let barriersDisabled = false;

/**
 * Test-only negative control: skips the ordering barriers of the metadata flush (steps 2 and 4),
 * so that a power-loss test can show it notices a missing flush. Never use outside tests.
 * @locking common
 */
export function setWritebackBarriersDisabledForTesting(disabled: boolean): void {
  barriersDisabled = disabled;
}

/**
 * A flush of the file. When it fails, which writes before it reached the disk is unknown (a failed
 * fsync may have dropped any of them, and retrying does not bring them back): every later metadata
 * write is refused until the image is reopened.
 */
function barrier(s: Qcow2State): Promise<void> {
  return s.flushFile('metadata write-back');
}

/** Steps 1-6: the writes, each group behind the flush that makes what it relies on durable. */
async function writeOrdered(s: Qcow2State): Promise<void> {
  const wroteRefcounts = await writeDirtyRefcounts(s);
  const l1Dirty = s.l1DirtyLo < s.l1DirtyHi;
  if (s.l2Cache.hasDirty || l1Dirty) {
    if ((wroteRefcounts || s.l2NeedsDataBarrier) && !barriersDisabled) await barrier(s);
    s.l2NeedsDataBarrier = false;
    if (s.l2Cache.hasDirty) {
      await s.writeMetaAll(s.l2Cache.dirtyWrites('L2 table'));
      s.l2Cache.markClean();
      if (l1Dirty && !barriersDisabled) await barrier(s);
    }
    if (l1Dirty) {
      const lo = s.l1DirtyLo;
      const hi = Math.min(s.l1DirtyHi, s.l1Size);
      if (lo < hi) await s.writeMeta(s.header.l1TableOffset + lo * 8, s.l1.subarray(lo * 8, hi * 8), 'L1 table entries');
      s.l1DirtyLo = Infinity;
      s.l1DirtyHi = 0;
    }
  }
  await barrier(s);
}

/** Step 7: lowers the refcounts of clusters whose last pointer is now gone from the disk. */
async function applyFrees(s: Qcow2State, frees: Array<[number, number]>): Promise<void> {
  if (frees.length === 0) return;
  const quiet = s.whenNoInPlaceWrites();
  if (quiet !== undefined) await quiet; // a data write in flight must land before its cluster is reused
  for (const [offset, bytes] of frees) {
    // past the point of no return: a refused update (a damaged refcount) only leaks the cluster
    await freeClusters(s, offset, bytes).catch(() => undefined);
  }
}

/**
 * Called by allocating requests (lock held) after they changed metadata: flushes when the dirty
 * tables or the deferred frees grow past their bounds, so memory stays bounded without a guest
 * flush.
 * @locking io
 */
export async function boundDirtyMetadata(s: Qcow2State): Promise<void> {
  if (
    s.l2Cache.dirtyCount * DIRTY_TABLE_FRACTION > s.l2Cache.maxTables ||
    s.refblockCache.dirtyCount * DIRTY_TABLE_FRACTION > s.refblockCache.maxTables ||
    s.pendingFrees.length > MAX_PENDING_FREES
  ) {
    await flushMetadata(s);
  }
}

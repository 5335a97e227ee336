/**
 * A metadata transaction committed by one header write: the way snapshot create and delete
 * change refcounts and COPIED flags together, so that no crash can ever show one without the
 * other (qemu-img check counts a COPIED flag that disagrees with its refcount as corruption, and
 * the two live in different clusters, so no in-place order avoids the window).
 *
 * I/O code, called with the qcow2 lock held by a snapshot operation (Bql + drained) that flushed
 * every dirty change first. While a transaction is open:
 * - nothing is written in place: new L1 and L2 tables and the snapshot table are staged for fresh
 *   clusters; every refcount block that changes (an existing one) moves to a fresh cluster too, and
 *   the refcount table is rewritten whole in fresh clusters;
 * - every refcount decrease is deferred (`release`) until all allocations are done, so no cluster
 *   of the old state is handed out again before the commit;
 * - the commit writes all of it, flushes, then writes header bytes 36..71 (l1_size,
 *   l1_table_offset, refcount_table_offset, refcount_table_clusters, nb_snapshots,
 *   snapshots_offset: adjacent, inside one 512-byte sector, so one atomic write) and flushes.
 * A crash before the header write leaves the old state, untouched (the new clusters were free in
 * it: not even a leak); after it, the new state, complete. A failure before the commit reads the
 * tables back from the file, which still holds the old state.
 */
import { bdrvGetLength } from '../../block/io.js';
import { BlockError } from '../../block/errors.js';
import { entryHi, entryLo, entryOffset, headerFields, setEntry } from './entries.js';
import { allocClusters, refblockOffset, reserveRefcountTable, updateRefcount } from './refcount.js';
import { flushMetadata } from './writeback.js';
import type { Qcow2State } from './state.js';
import type { SnapshotEntry } from './types.js';

/** The new state a transaction commits. */
export interface TxCommit {
  l1Offset: number;
  l1Size: number;
  l1Bytes: Uint8Array;
  snapshots: SnapshotEntry[];
  snapshotsOffset: number;
  snapshotBytes: Uint8Array;
}

/** An open transaction. */
export interface MetadataTx {
  readonly s: Qcow2State;
  /** The refcount table as on disk when the transaction began. */
  readonly oldReftable: Uint8Array;
  /** Tables to write into fresh clusters: L2 copies. */
  readonly tables: Array<{ offset: number; bytes: Uint8Array }>;
  /** Refcount decreases deferred to the commit: [offset, bytes], each -1. */
  readonly released: Array<[number, number]>;
  /** Refcount block index -> the fresh cluster it moves to. */
  readonly moved: Map<number, number>;
}

/** The refcount-table entry `b` as it was on disk when the transaction began (0: none). */
function oldBlockOffset(tx: MetadataTx, b: number): number {
  if (b * 8 >= tx.oldReftable.length) return 0;
  const v = new DataView(tx.oldReftable.buffer, tx.oldReftable.byteOffset, tx.oldReftable.byteLength);
  return entryOffset(entryHi(v, b), entryLo(v, b));
}

/**
 * Opens a transaction. `extraClusters` bounds the clusters it may allocate (tables it may copy,
 * the L1 and snapshot tables, the moved refcount blocks and table): the refcount table is grown
 * beforehand if needed. The metadata must be clean (flushed).
 * @locking io
 */
export async function beginMetadataTx(s: Qcow2State, extraClusters: number): Promise<MetadataTx> {
  if (s.metadataDirty) throw new BlockError('EIO', `qcow2 '${s.filename}': internal error: a metadata transaction needs flushed metadata`, { node: s.node.nodeName });
  // no allocation inside may grow the refcount table (that writes in place): grow it first if
  // the fresh clusters could run past what it covers, as an ordinary crash-safe operation
  const blocks = s.reftable.length / 8;
  const end = Math.max(Math.ceil(bdrvGetLength(s.file) / s.clusterSize), s.allocatedEnd);
  await reserveRefcountTable(s, end + extraClusters + blocks + s.header.refcountTableClusters + 16);
  if (s.metadataDirty) await flushMetadata(s);
  s.inMetadataTx = true;
  return { s, oldReftable: s.reftable.slice(), tables: [], released: [], moved: new Map() };
}

/**
 * Defers a refcount decrease of every cluster [offset, offset + bytes) touches to the commit.
 * @locking io
 */
export function txRelease(tx: MetadataTx, offset: number, bytes: number): void {
  if (bytes > 0) tx.released.push([offset, bytes]);
}

/** Moves every existing refcount block that changed, or that a deferred decrease will change, to a fresh cluster. */
async function moveChangedRefblocks(tx: MetadataTx): Promise<void> {
  const s = tx.s;
  const C = s.clusterSize;
  const E = s.refblockEntries;
  for (let round = 0; round < 1000; round++) {
    const needed = new Set<number>();
    for (let b = 0; b < tx.oldReftable.length / 8; b++) {
      const old = oldBlockOffset(tx, b);
      if (old !== 0 && !tx.moved.has(b) && s.refblockCache.isDirty(old)) needed.add(b);
    }
    for (const [off, bytes] of tx.released) {
      for (let b = Math.floor(off / C / E); b <= Math.floor((off + bytes - 1) / C / E); b++) {
        if (oldBlockOffset(tx, b) !== 0 && !tx.moved.has(b)) needed.add(b);
      }
    }
    if (needed.size === 0) return;
    for (const b of needed) {
      const old = oldBlockOffset(tx, b);
      const t = await s.refblockCache.get(old);
      s.refblockCache.markDirty(old, 0, C); // pinned: it must not be evicted while the allocation below waits
      const fresh = await allocClusters(s, 1); // may change this very block: it is still cached at `old`
      setEntry(s.reftableView, b, fresh, false);
      s.refblockGeneration++;
      s.refblockCache.insert(fresh, t.bytes);
      s.refblockCache.markDirty(fresh, 0, C);
      s.refblockCache.drop(old);
      tx.moved.set(b, fresh);
      tx.released.push([old, C]);
    }
  }
  throw new BlockError('EIO', `qcow2 '${s.filename}': moving the refcount blocks did not converge`, { node: s.node.nodeName });
}

/**
 * Commits the transaction: the moved refcount blocks, the deferred decreases, every staged table
 * and the new refcount table are written to their fresh clusters and flushed; then one header
 * write switches to the new state, flushed. Returns once the new state is the image's.
 * @locking io
 */
export async function commitMetadataTx(tx: MetadataTx, c: TxCommit): Promise<void> {
  const s = tx.s;
  const C = s.clusterSize;
  const reftableClusters = s.header.refcountTableClusters;
  const reftableOff = await allocClusters(s, reftableClusters);
  txRelease(tx, s.header.refcountTableOffset, reftableClusters * C);
  await moveChangedRefblocks(tx);
  // every allocation is done: the decreases can no longer hand out a cluster of the old state
  for (const [off, bytes] of tx.released) await updateRefcount(s, off, bytes, -1);
  // nothing may be written in place: every dirty block is a moved one or a new one
  for (let b = 0; b < s.reftable.length / 8; b++) {
    const cur = refblockOffset(s, b);
    const old = oldBlockOffset(tx, b);
    if (cur !== 0 && cur === old && s.refblockCache.isDirty(cur)) {
      throw new BlockError('EIO', `qcow2 '${s.filename}': internal error: refcount block ${b} would be written in place`, { node: s.node.nodeName });
    }
  }
  const writes: Array<{ offset: number; data: Uint8Array; what: string }> = [
    ...tx.tables.map((t) => ({ offset: t.offset, data: t.bytes, what: 'L2 table (copy)' })),
    ...s.refblockCache.dirtyWrites('refcount block (moved)'),
    { offset: reftableOff, data: s.reftable, what: 'refcount table (new)' },
  ];
  if (c.l1Size > 0) writes.push({ offset: c.l1Offset, data: c.l1Bytes, what: 'L1 table (new)' });
  if (c.snapshotBytes.length > 0) writes.push({ offset: c.snapshotsOffset, data: c.snapshotBytes, what: 'snapshot table (new)' });
  await s.writeMetaAll(writes);
  await s.flushFile('a snapshot transaction before its commit');
  // the commit point: one write inside one sector
  const header = headerFields([
    [4, c.l1Size],
    [8, c.l1Offset],
    [8, reftableOff],
    [4, reftableClusters],
    [4, c.snapshots.length],
    [8, c.snapshotsOffset],
  ]);
  // one sector: after a reported failure the file holds the old header or the new one, and what
  // it shows decides (not committed: the caller aborts, the old state stands)
  await s.commitHeader(36, header, 'header (L1, refcount and snapshot table pointers)');
  s.header.l1Size = c.l1Size;
  s.header.l1TableOffset = c.l1Offset;
  s.header.refcountTableOffset = reftableOff;
  s.header.nbSnapshots = c.snapshots.length;
  s.header.snapshotsOffset = c.snapshotsOffset;
  s.setL1(c.l1Bytes);
  s.snapshots = c.snapshots;
  s.refblockCache.markClean();
  for (const t of tx.tables) s.l2Cache.insert(t.offset, t.bytes);
  s.forgetDirtyMetadata();
  s.refblockGeneration++;
  s.inMetadataTx = false;
  await s.flushFile('after committing a snapshot operation');
}

/**
 * Abandons the transaction: the file still holds the old state (nothing was written in place),
 * so the caches are dropped and the refcount table taken back as it was on disk.
 * @locking io
 */
export function abortMetadataTx(tx: MetadataTx): void {
  const s = tx.s;
  s.inMetadataTx = false;
  s.l2Cache.clear();
  s.refblockCache.clear();
  s.forgetDirtyMetadata();
  s.setReftable(tx.oldReftable);
  s.refblockGeneration++;
  s.freeClusterHint = 0;
}

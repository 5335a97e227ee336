/**
 * qcow2 internal snapshots: create, goto (revert), delete, list, load-temporary, and writing the
 * snapshot table, following QEMU's algorithms (block/qcow2-snapshot.c) and their crash-safe order.
 *
 * Called by the driver's snapshot callbacks, which take `Bql` and a drained proof: nothing else
 * runs on the node meanwhile. The functions here also take the qcow2 lock, since they change
 * metadata. Each operation starts by flushing every dirty metadata change (writeback.ts), so its
 * walks start from clean caches, and ends clean too. A crash at any point, whatever subset of the
 * writes since the last flush reached the disk, leaves the old state or the new one, plus at most
 * leaked clusters: every commit point (snapshot table switch, L1 switch) is one header write inside
 * one sector, behind a flush of everything it points at.
 */
import { assertBql, type Bql } from '../../block/bql.js';
import { assertDrained, type DrainedProof } from '../../block/drain.js';
import { BlockError } from '../../block/errors.js';
import { MAX_L1_BYTES, MAX_SNAPSHOTS, MAX_SNAPSHOTS_SIZE } from './constants.js';
import { ClusterType, compressedExtent, entryHi, entryLo, entryOffset, headerFields, isCopied, l2EntryType, setEntry, setEntryRaw } from './entries.js';
import { growL1, l2Offset } from './cluster-map.js';
import { abortMetadataTx, beginMetadataTx, commitMetadataTx, txRelease } from './metadata-tx.js';
import { assertMetadataLocked, withMetadataLock, type MetadataLocked } from './metadata-lock.js';
import { zeroClustersLocked } from './data-path.js';
import { allocClusters, discardDirtyRefcounts, peekRefcount, freeClusters, getRefcount, updateRefcount, writeDirtyRefcounts } from './refcount.js';
import { flushMetadata } from './writeback.js';
import { serializeSnapshotTable } from './snapshot-table.js';
import { snapshotTableBytesOnDisk } from './snapshot-extent.js';
import type { Qcow2State } from './state.js';
import type { Table } from './table-cache.js';
import type { SnapshotEntry } from './types.js';
import type { SnapshotInfo } from '../../block/driver.js';
import { findByIdAndName, findByIdOrName, findForLoadTmp, nextSnapshotId } from '../snapshot-lookup.js';


/** Sets or clears bit 63 in the high half of an entry. */
function withCopied(hi: number, copied: boolean): number {
  return copied ? (hi | 0x80000000) >>> 0 : hi & 0x7fffffff;
}

/**
 * The table's bytes as 32-bit words, for finding used entries fast (a zero test does not depend
 * on byte order). Tables are read into fresh buffers, so the view is normally aligned; an
 * unaligned one is scanned through a copy.
 */
function tableWords(t: Table): Uint32Array {
  const b = t.bytes;
  if (b.byteOffset % 4 === 0) return new Uint32Array(b.buffer, b.byteOffset, b.byteLength >>> 2);
  return new Uint32Array(b.slice().buffer);
}

/** Index of the first entry at or after `j` that is not all zero (`entries` when none). */
function nextUsedEntry(words: Uint32Array, j: number, entries: number): number {
  let i = j;
  while (i < entries && (words[2 * i] as number) === 0 && (words[2 * i + 1] as number) === 0) i++;
  return i;
}

/** Entry indexes whose COPIED bit a pass will flip, with the new value in bit 0 (reused: the pass never awaits). */
let copiedScratch = new Uint32Array(0);

/**
 * The clusters an L2 table references: runs of host-contiguous data clusters [offset, count] and
 * compressed extents [offset, bytes]. Synchronous: one pass over the table.
 */
function collectReferences(s: Qcow2State, t: Table, l2Off: number): { runs: Array<[number, number]>; compressed: Array<[number, number]> } {
  const C = s.clusterSize;
  const words = tableWords(t);
  const runs: Array<[number, number]> = [];
  const compressed: Array<[number, number]> = [];
  let runStart = 0;
  let runLen = 0;
  for (let j = nextUsedEntry(words, 0, s.l2Entries); j < s.l2Entries; j = nextUsedEntry(words, j + 1, s.l2Entries)) {
    const hi = entryHi(t.view, j);
    const lo = entryLo(t.view, j);
    const type = l2EntryType(hi, lo, s.v3);
    if (type === ClusterType.Compressed) {
      const { offset, bytes } = compressedExtent(hi, lo, s.clusterBits);
      const start = offset - (offset % 512);
      compressed.push([start, offset + bytes - start]);
    } else if (type === ClusterType.Normal || type === ClusterType.ZeroAlloc) {
      const d = entryOffset(hi, lo);
      if (d % C !== 0) throw s.corrupt(`Cluster allocation offset ${d} unaligned (L2 offset: ${l2Off}, L2 index: ${j})`, 'l2_table');
      if (runLen > 0 && d === runStart + runLen * C) runLen++;
      else {
        if (runLen > 0) runs.push([runStart, runLen]);
        runStart = d;
        runLen = 1;
      }
    }
  }
  if (runLen > 0) runs.push([runStart, runLen]);
  return { runs, compressed };
}

/**
 * Sets the COPIED bits of an L2 table's entries from refcounts already in memory; returns whether
 * anything changed, or null (nothing changed yet) when some refcount block is not in memory.
 */
function copiedPassCached(s: Qcow2State, t: Table): boolean | null {
  const C = s.clusterSize;
  const words = tableWords(t);
  if (copiedScratch.length < s.l2Entries) copiedScratch = new Uint32Array(s.l2Entries);
  const flips = copiedScratch;
  let n = 0;
  for (let j = nextUsedEntry(words, 0, s.l2Entries); j < s.l2Entries; j = nextUsedEntry(words, j + 1, s.l2Entries)) {
    const hi = entryHi(t.view, j);
    const lo = entryLo(t.view, j);
    const type = l2EntryType(hi, lo, s.v3);
    let want = false;
    if (type === ClusterType.Normal || type === ClusterType.ZeroAlloc) {
      const rc = peekRefcount(s, entryOffset(hi, lo) / C);
      if (rc < 0) return null;
      want = rc === 1;
    }
    if (isCopied(hi) !== want) flips[n++] = j * 2 + (want ? 1 : 0);
  }
  for (let k = 0; k < n; k++) {
    const f = flips[k] as number;
    const j = f >>> 1;
    setEntryRaw(t.view, j, withCopied(entryHi(t.view, j), (f & 1) === 1), entryLo(t.view, j));
  }
  return n > 0;
}

/** L2 tables read ahead of the one being walked (bounded to a quarter of the cache). */
const L2_READAHEAD = 8;

/** An L1 table to walk: the active one from memory, a snapshot's from the file. */
interface L1Walk {
  active: boolean;
  l1: Uint8Array;
  l1v: DataView;
  /** Entries to walk. */
  n: number;
  /** The L2 table offset in entry `i` (0: none), refusing an unaligned one. */
  l2At: (i: number) => number;
}

async function openL1Walk(s: Qcow2State, l1Offset: number, l1Size: number): Promise<L1Walk> {
  const active = l1Offset === s.header.l1TableOffset;
  const l1 = active ? s.l1 : await s.readMeta(l1Offset, l1Size * 8, 'snapshot L1 table');
  const l1v = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
  const l2At = (i: number): number => {
    const off = entryOffset(entryHi(l1v, i), entryLo(l1v, i));
    if (off % s.clusterSize !== 0) throw s.corrupt(`L2 table offset ${off} unaligned (L1 index: ${i})`, 'l1_table');
    return off;
  };
  return { active, l1, l1v, n: Math.min(l1Size, l1.length / 8), l2At };
}

/**
 * QEMU's qcow2_update_snapshot_refcount, for snapshot operations (the node drained, its metadata
 * lock held: `locked`): adds `addend` (-1, 0, +1) to the refcount of every L2 table and data
 * cluster reachable from the L1 table at `l1Offset`, then recomputes the COPIED bits. The active
 * L1 is taken from memory. Refcounts are written (and flushed) before any L2 or L1 table that
 * relies on them.
 * @locking global-state
 */
export async function updateSnapshotRefcount(bql: Bql, drained: DrainedProof, locked: MetadataLocked, s: Qcow2State, l1Offset: number, l1Size: number, addend: number): Promise<void> {
  assertDrained(bql, drained, s.node, 'qcow2 update snapshot refcount');
  assertMetadataLocked(locked, s, 'update snapshot refcount');
  await addSnapshotRefs(s, l1Offset, l1Size, addend);
  await recomputeCopied(s, l1Offset, l1Size, addend);
}

/**
 * The first half of updateSnapshotRefcount: adds `addend` to every cluster the L1 table reaches,
 * in one batch that is written only when the whole walk succeeded (an overflow writes nothing).
 * @locking io
 */
export async function addSnapshotRefs(s: Qcow2State, l1Offset: number, l1Size: number, addend: number): Promise<void> {
  const C = s.clusterSize;
  const { n, l2At } = await openL1Walk(s, l1Offset, l1Size);
  if (addend !== 0) {
    // the caller started from clean metadata: every dirty refcount now is this walk's
    try {
      // read ahead: the next few L2 tables load while this one is walked
      const ahead = Math.min(L2_READAHEAD, s.l2Cache.maxTables >> 2);
      let next = 1; // the first entry not read ahead yet
      for (let i = 0; i < n; i++) {
        for (; ahead > 0 && next < n && next <= i + ahead; next++) {
          const nextOff = l2At(next);
          if (nextOff !== 0) s.l2Cache.prefetch(nextOff);
        }
        const off = l2At(i);
        if (off === 0) continue;
        const t = await s.l2Cache.get(off);
        const { runs, compressed } = collectReferences(s, t, off);
        for (const [start, len] of runs) await updateRefcount(s, start, len * C, addend);
        for (const [start, bytes] of compressed) await updateRefcount(s, start, bytes, addend);
        await updateRefcount(s, off, C, addend);
      }
    } catch (e) {
      await discardDirtyRefcounts(s); // a refused walk (overflow, corruption) writes no refcount at all
      throw e;
    }
    await writeDirtyRefcounts(s); // not flushed: the caller's next barrier comes before anything relies on them
  }
}

/**
 * The second half of updateSnapshotRefcount: sets the COPIED bits of the L1 table's entries and
 * of its L2 tables' entries from the refcounts. The changed L2 tables (and active L1 entries) are
 * marked dirty and written by the metadata flush, behind the barrier that makes the refcounts
 * durable first; a snapshot's L1 is written after them.
 * @locking io
 */
export async function recomputeCopied(s: Qcow2State, l1Offset: number, l1Size: number, addend: number): Promise<void> {
  const C = s.clusterSize;
  const { active, l1, l1v, n, l2At } = await openL1Walk(s, l1Offset, l1Size);
  let l1Changed = false;
  for (let i = 0; i < n; i++) {
    const off = l2At(i);
    if (off === 0) continue;
    const l2rc = await getRefcount(s, off / C);
    if (l2rc === 0) continue; // freed by this walk: never write it again
    const t = await s.l2Cache.get(off);
    let changed = copiedPassCached(s, t);
    if (changed === null) {
      changed = false;
      for (let j = 0; j < s.l2Entries; j++) {
        const hi = entryHi(t.view, j);
        const lo = entryLo(t.view, j);
        if (hi === 0 && lo === 0) continue;
        const type = l2EntryType(hi, lo, s.v3);
        let want = false;
        if (type === ClusterType.Normal || type === ClusterType.ZeroAlloc) want = (await getRefcount(s, entryOffset(hi, lo) / C)) === 1;
        if (isCopied(hi) !== want) {
          setEntryRaw(t.view, j, withCopied(hi, want), lo);
          changed = true;
        }
      }
    }
    // the walk only reads refcount blocks (no L2 table is loaded while `t` changes), so `t` is
    // still the cached table here
    if (changed) s.l2Cache.markDirty(off, 0, C);
    const l1hi = entryHi(l1v, i);
    const want = l2rc === 1;
    if (isCopied(l1hi) !== want && (addend >= 0 || !active)) {
      setEntryRaw(l1v, i, withCopied(l1hi, want), entryLo(l1v, i));
      if (active) s.markL1Dirty(i);
      l1Changed = true;
    }
  }
  await flushMetadata(s);
  if (!active && addend >= 0 && l1Changed) {
    await s.writeMeta(l1Offset, l1.subarray(0, n * 8), 'snapshot L1 table');
    await s.flushFile('snapshot L1 table');
  }
}

/**
 * Writes the snapshot list as a new table in fresh clusters, then switches the header to it in
 * one 12-byte write (nb_snapshots and snapshots_offset are adjacent), then frees the old table;
 * the caller holds the metadata lock (`locked`). Used by check's repair of incomplete entries
 * (snapshot create and delete commit their table with the rest of their metadata transaction).
 * @locking io
 */
export async function writeSnapshotTable(locked: MetadataLocked, s: Qcow2State, entries: SnapshotEntry[]): Promise<void> {
  assertMetadataLocked(locked, s, 'write the snapshot table');
  const bytes = serializeSnapshotTable(entries);
  if (bytes.length > MAX_SNAPSHOTS_SIZE) {
    throw new BlockError('EFBIG', `qcow2 '${s.filename}': the snapshot table would exceed 64 MiB`, { node: s.node.nodeName, field: 'snapshots' });
  }
  const clusters = Math.ceil(bytes.length / s.clusterSize);
  const newOff = clusters === 0 ? 0 : await allocClusters(s, clusters);
  try {
    // the new table's refcount (and every other refcount change so far) is durable before the
    // header can point at it
    await writeDirtyRefcounts(s);
    await s.flushFile('refcounts of a new snapshot table');
    if (clusters > 0) await s.writeMeta(newOff, bytes, 'snapshot table');
    await s.flushFile('new snapshot table');
    await s.commitHeader(60, headerFields([[4, entries.length], [8, newOff]]), 'header (snapshot table pointer)'); // the commit point
  } catch (e) {
    if (clusters > 0) await freeClusters(s, newOff, clusters * s.clusterSize).catch(() => undefined);
    throw e;
  }
  // committed: from here on nothing may undo it (a caller's rollback would corrupt the image)
  const oldOff = s.header.snapshotsOffset;
  const oldBytes = snapshotTableBytesOnDisk(s, () => serializeSnapshotTable(s.snapshots).length);
  s.header.nbSnapshots = entries.length;
  s.header.snapshotsOffset = newOff;
  s.snapshots = entries;
  let durable = true;
  await s.flushFile('after switching the snapshot table').catch(() => {
    // the switch may not be on disk: the old table must stay allocated (it only leaks), and no
    // later metadata write may rely on either state (flushFile refuses them from now on)
    durable = false;
  });
  // past the commit point a failure may only leak: the new table is in place whatever happens
  if (durable && oldOff !== 0 && oldBytes > 0) await freeClusters(s, oldOff, Math.ceil(oldBytes / s.clusterSize) * s.clusterSize).catch(() => undefined);
}

/** Refuses a snapshot whose L1 table cannot be right (QEMU's checks before goto, delete, load). */
function checkSnapshotL1(s: Qcow2State, sn: SnapshotEntry): void {
  if (sn.l1Size * 8 > MAX_L1_BYTES) {
    throw new BlockError('EFBIG', `Snapshot L1 table too large (snapshot '${sn.name}' in '${s.filename}')`, { node: s.node.nodeName, field: 'l1_size' });
  }
  if (sn.l1TableOffset % s.clusterSize !== 0 || (sn.l1Size > 0 && sn.l1TableOffset === 0)) {
    throw new BlockError('EINVAL', `Snapshot L1 table offset invalid (snapshot '${sn.name}' in '${s.filename}')`, { node: s.node.nodeName, field: 'l1_table_offset' });
  }
}

/**
 * After a failed snapshot operation: one more try at writing the metadata still dirty (the
 * failure may have been a flush of earlier changes at its start), so that the image on disk says
 * what memory says; a second failure is left to the next flush.
 */
async function retryFlushAfterFailure(s: Qcow2State): Promise<void> {
  if (!s.metadataDirty || s.broken !== null) return;
  await s.lock.run(() => flushMetadata(s)).catch(() => undefined);
}

/** The L1 index from which the guest offsets lie in the VM-state area. */
function vmStateL1Index(s: Qcow2State): number {
  return Math.ceil(s.sizeBytes / (s.clusterSize * s.l2Entries));
}

/** True when some entry of the table has its COPIED bit set. */
function hasCopiedEntry(s: Qcow2State, t: Table): boolean {
  const words = tableWords(t);
  for (let j = nextUsedEntry(words, 0, s.l2Entries); j < s.l2Entries; j = nextUsedEntry(words, j + 1, s.l2Entries)) {
    if (isCopied(entryHi(t.view, j))) return true;
  }
  return false;
}

/** The number of L1 entries that point at an L2 table. */
function usedL1Entries(s: Qcow2State): number {
  let n = 0;
  for (let i = 0; i < s.l1Size; i++) if (l2Offset(s, i) !== 0) n++;
  return n;
}

/** Serializes a snapshot list, refusing one over QEMU's 64 MiB. */
function snapshotTableBytes(s: Qcow2State, entries: SnapshotEntry[]): Uint8Array {
  const bytes = serializeSnapshotTable(entries);
  if (bytes.length > MAX_SNAPSHOTS_SIZE) {
    throw new BlockError('EFBIG', `qcow2 '${s.filename}': the snapshot table would exceed 64 MiB`, { node: s.node.nodeName, field: 'snapshots' });
  }
  return bytes;
}

/**
 * Creates a snapshot of the active state in one metadata transaction (metadata-tx.ts):
 * - the active L1 table, where it lies, becomes the snapshot's L1 (nothing is copied for it);
 * - the new active L1 goes to fresh clusters; each L2 table the active image owns alone and that
 *   has COPIED entries is copied (COPIED cleared, as its clusters become shared) so that no table
 *   reachable from the old state changes; the others are shared (+1);
 * - every data cluster reachable gains a reference (+1); with VM state, the VM-state area is left
 *   out of the new active L1 (the snapshot owns it, as QEMU's discard after create gives);
 * - the new snapshot table in fresh clusters; one header write commits it all.
 * A crash leaves the old image or the new one, never a window with a refcount and a COPIED flag
 * that disagree.
 * @locking global-state
 */
export async function createSnapshot(bql: Bql, drained: DrainedProof, s: Qcow2State, info: Omit<SnapshotInfo, 'id'>): Promise<SnapshotEntry> {
  assertDrained(bql, drained, s.node, 'qcow2 snapshot create');
  return s.lock.run(async () => {
    if (s.snapshots.length >= MAX_SNAPSHOTS) {
      throw new BlockError('EFBIG', `qcow2 '${s.filename}': too many snapshots (${s.snapshots.length})`, { node: s.node.nodeName, field: 'nb_snapshots' });
    }
    await flushMetadata(s);
    const C = s.clusterSize;
    const n = s.l1Size;
    const l1Clusters = Math.ceil((n * 8) / C);
    const entry: SnapshotEntry = {
      l1TableOffset: n === 0 ? 0 : s.header.l1TableOffset,
      l1Size: n,
      id: nextSnapshotId(s.snapshots),
      name: info.name,
      dateSec: info.dateSec,
      dateNsec: info.dateNsec,
      vmClockNsec: info.vmClockNsec,
      vmStateSize: info.vmStateSize,
      diskSize: s.sizeBytes,
      icount: info.icount,
      extraDataSize: 24,
      unknownExtraData: new Uint8Array(0),
    };
    const entries = [...s.snapshots, entry];
    const table = snapshotTableBytes(s, entries);
    const tableClusters = Math.ceil(table.length / C);
    const tx = await beginMetadataTx(s, usedL1Entries(s) + l1Clusters + tableClusters);
    try {
      const l1 = new Uint8Array(n * 8);
      const l1v = new DataView(l1.buffer);
      const vmFrom = info.vmStateSize > 0 ? vmStateL1Index(s) : Infinity;
      const ahead = Math.min(L2_READAHEAD, s.l2Cache.maxTables >> 2);
      for (let i = 0; i < Math.min(n, vmFrom); i++) {
        for (let k = i + 1; k <= i + ahead && k < n; k++) {
          const o = l2Offset(s, k);
          if (o !== 0) s.l2Cache.prefetch(o);
        }
        const off = l2Offset(s, i);
        if (off === 0) continue;
        const t = await s.l2Cache.get(off);
        const { runs, compressed } = collectReferences(s, t, off);
        for (const [start, len] of runs) await updateRefcount(s, start, len * C, 1);
        for (const [start, bytes] of compressed) await updateRefcount(s, start, bytes, 1);
        if ((await getRefcount(s, off / C)) === 1 && hasCopiedEntry(s, t)) {
          const copy = new Uint8Array(t.bytes);
          const cv = new DataView(copy.buffer);
          for (let j = 0; j < s.l2Entries; j++) {
            const hi = entryHi(cv, j);
            if (isCopied(hi)) setEntryRaw(cv, j, withCopied(hi, false), entryLo(cv, j));
          }
          const at = await allocClusters(s, 1);
          tx.tables.push({ offset: at, bytes: copy });
          setEntry(l1v, i, at, true);
        } else {
          await updateRefcount(s, off, C, 1);
          setEntry(l1v, i, off, false);
        }
      }
      const l1Off = n === 0 ? 0 : await allocClusters(s, l1Clusters);
      const tableOff = tableClusters === 0 ? 0 : await allocClusters(s, tableClusters);
      if (s.header.nbSnapshots > 0) txRelease(tx, s.header.snapshotsOffset, roundUpClusters(s, snapshotTableBytesOnDisk(s, () => serializeSnapshotTable(s.snapshots).length)));
      await commitMetadataTx(tx, { l1Offset: l1Off, l1Size: n, l1Bytes: l1, snapshots: entries, snapshotsOffset: tableOff, snapshotBytes: table });
    } catch (e) {
      if (s.inMetadataTx) abortMetadataTx(tx);
      throw e;
    }
    return entry;
  }).catch(async (e: unknown) => {
    await retryFlushAfterFailure(s);
    throw e;
  });
}

/** Bytes rounded up to whole clusters. */
function roundUpClusters(s: Qcow2State, bytes: number): number {
  return Math.ceil(bytes / s.clusterSize) * s.clusterSize;
}

/**
 * Reverts the active state to a snapshot. QEMU's qcow2_snapshot_goto overwrites the active L1
 * in place and resizes the disk before it (a failure in between loses the data past the smaller
 * size, and a torn L1 write mixes the two states). Here the new active L1 goes to fresh clusters
 * and one header write inside one sector switches the disk size and the L1 together:
 *   1. flush every dirty change; the snapshot's state gains a reference (+1), its COPIED bits are
 *      corrected (its tables are only the snapshot's or shared, so nothing active changes)
 *   2. the new L1 (the snapshot's, zero-padded to the larger size) in fresh clusters, flushed
 *      with its refcount
 *   3. the commit: size, l1_size and l1_table_offset (header bytes 24..47) in one write, flushed
 *   4. the old active state loses its reference (-1), its L1 clusters are freed, and the COPIED
 *      bits of the new active state are recomputed. A crash before 3 leaves the old state (plus
 *      leaks); after it, the new state (plus leaks).
 * @locking global-state
 */
export async function gotoSnapshot(bql: Bql, drained: DrainedProof, s: Qcow2State, idOrName: string): Promise<SnapshotEntry> {
  assertDrained(bql, drained, s.node, 'qcow2 snapshot goto');
  return withMetadataLock(s, async (locked) => {
    const sn = findByIdOrName(s.snapshots, idOrName);
    if (sn === undefined) {
      throw new BlockError('ENOENT', `Snapshot '${idOrName}' not found in '${s.filename}'`, { node: s.node.nodeName, value: idOrName });
    }
    checkSnapshotL1(s, sn);
    const C = s.clusterSize;
    const span = C * s.l2Entries;
    const newL1Size = Math.max(s.l1Size, sn.l1Size, Math.ceil(sn.diskSize / span));
    if (newL1Size * 8 > MAX_L1_BYTES) {
      throw new BlockError('EFBIG', `qcow2 '${s.filename}': snapshot '${sn.name}' needs an L1 table over 32 MiB`, { node: s.node.nodeName, field: 'l1_size' });
    }
    await flushMetadata(s);
    // 1.
    await updateSnapshotRefcount(bql, drained, locked, s, sn.l1TableOffset, sn.l1Size, 1);
    const l1Clusters = Math.ceil((newL1Size * 8) / C);
    let newOff = 0;
    const buf = new Uint8Array(newL1Size * 8);
    try {
      if (sn.l1Size > 0) buf.set(await s.readMeta(sn.l1TableOffset, sn.l1Size * 8, 'snapshot L1 table'));
      // 2.
      newOff = await allocClusters(s, l1Clusters);
      await s.writeMeta(newOff, buf, 'L1 table');
      await writeDirtyRefcounts(s);
      await s.flushFile('new L1 table of a goto');
      // 3. the commit point (read back after a reported failure: commitHeader)
      await s.commitHeader(24, headerFields([[8, sn.diskSize], [4, s.header.cryptMethod], [4, newL1Size], [8, newOff]]), 'header (size and L1 table pointer)');
    } catch (e) {
      // not committed: give the +1 and the new clusters back in memory (memory is what the
      // image must become; a failed write changed nothing there), unless a flush failed
      if (s.broken === null) {
        await addSnapshotRefs(s, sn.l1TableOffset, sn.l1Size, -1).catch(() => undefined);
        if (newOff !== 0) await freeClusters(s, newOff, l1Clusters * C).catch(() => undefined);
        await flushMetadata(s).catch(() => undefined);
      }
      throw e;
    }
    const oldOff = s.header.l1TableOffset;
    const oldSize = s.l1Size;
    s.header.size = sn.diskSize;
    s.header.l1TableOffset = newOff;
    s.header.l1Size = newL1Size;
    s.setL1(buf);
    // the cache stays: it is keyed by host offset and holds what the file holds (the old state's
    // tables leave it as their refcounts reach 0)
    let durable = true;
    await s.flushFile('after switching the L1 table').catch(() => {
      durable = false; // broken now: every later metadata write is refused
    });
    if (!durable) return sn; // switched in memory; the old state's clusters stay allocated (leak)
    // 4. past the commit point a failure only leaks
    let dropError: unknown = null;
    try {
      await addSnapshotRefs(s, oldOff, oldSize, -1);
      const oldClusters = Math.ceil((oldSize * 8) / C);
      if (oldOff !== 0 && oldClusters > 0) await freeClusters(s, oldOff, oldClusters * C);
    } catch (e) {
      dropError = e;
    }
    await recomputeCopied(s, s.header.l1TableOffset, s.l1Size, 0).catch((e: unknown) => {
      dropError ??= e;
    });
    await flushMetadata(s).catch((e: unknown) => {
      dropError ??= e;
    });
    if (dropError !== null) throw dropError;
    return sn;
  });
}

/**
 * Deletes a snapshot in one metadata transaction (metadata-tx.ts): every reference the
 * snapshot's L1 table held is dropped (deferred to the commit), the active tables whose COPIED
 * bits must change (clusters back to one reference) are copied with the bits set, a new active L1
 * points at them, and the new snapshot table; one header write commits it all, so the COPIED bits
 * and the refcounts never disagree on disk.
 * @locking global-state
 */
export async function deleteSnapshot(bql: Bql, drained: DrainedProof, s: Qcow2State, id: string | null, name: string | null): Promise<SnapshotEntry> {
  assertDrained(bql, drained, s.node, 'qcow2 snapshot delete');
  return s.lock.run(async () => {
    const sn = findByIdAndName(s.snapshots, id, name);
    if (sn === undefined) {
      throw new BlockError('ENOENT', `Can't find the snapshot (id ${id ?? 'any'}, name ${name ?? 'any'}) in '${s.filename}'`, {
        node: s.node.nodeName,
        value: name ?? id ?? '',
      });
    }
    checkSnapshotL1(s, sn);
    await flushMetadata(s);
    const C = s.clusterSize;
    const entries = s.snapshots.filter((x) => x !== sn);
    const table = snapshotTableBytes(s, entries);
    const tableClusters = Math.ceil(table.length / C);
    const n = s.l1Size;
    const l1Clusters = Math.ceil((n * 8) / C);
    const tx = await beginMetadataTx(s, usedL1Entries(s) + l1Clusters + tableClusters);
    try {
      // 1. every reference of the snapshot goes (deferred), counted per cluster for the COPIED pass
      const lost = new Map<number, number>();
      const release = (off: number, bytes: number): void => {
        txRelease(tx, off, bytes);
        for (let c = Math.floor(off / C); c <= Math.floor((off + bytes - 1) / C); c++) lost.set(c, (lost.get(c) ?? 0) + 1);
      };
      const walk = await openL1Walk(s, sn.l1TableOffset, sn.l1Size);
      for (let i = 0; i < walk.n; i++) {
        const off = walk.l2At(i);
        if (off === 0) continue;
        const t = await s.l2Cache.get(off);
        const { runs, compressed } = collectReferences(s, t, off);
        for (const [start, len] of runs) release(start, len * C);
        for (const [start, bytes] of compressed) release(start, bytes);
        release(off, C);
      }
      if (sn.l1Size > 0) release(sn.l1TableOffset, roundUpClusters(s, sn.l1Size * 8));
      const after = async (cluster: number): Promise<number> => (await getRefcount(s, cluster)) - (lost.get(cluster) ?? 0);
      // 2. the active tables whose COPIED bits change are copied (never changed in place)
      const l1 = new Uint8Array(s.l1);
      const l1v = new DataView(l1.buffer);
      for (let i = 0; i < n; i++) {
        const off = l2Offset(s, i);
        if (off === 0) continue;
        const tableRefs = await after(off / C);
        const t = await s.l2Cache.get(off);
        let copy: Uint8Array | null = null;
        if (tableRefs === 1) {
          const words = tableWords(t);
          for (let j = nextUsedEntry(words, 0, s.l2Entries); j < s.l2Entries; j = nextUsedEntry(words, j + 1, s.l2Entries)) {
            const hi = entryHi(t.view, j);
            const lo = entryLo(t.view, j);
            const type = l2EntryType(hi, lo, s.v3);
            const want = (type === ClusterType.Normal || type === ClusterType.ZeroAlloc) && (await after(entryOffset(hi, lo) / C)) === 1;
            if (isCopied(hi) !== want) {
              copy ??= new Uint8Array(t.bytes);
              const cv = new DataView(copy.buffer);
              setEntryRaw(cv, j, withCopied(hi, want), lo);
            }
          }
        }
        if (copy !== null) {
          const at = await allocClusters(s, 1);
          tx.tables.push({ offset: at, bytes: copy });
          setEntry(l1v, i, at, true);
          txRelease(tx, off, C); // the active image's reference moves to the copy
        } else {
          setEntryRaw(l1v, i, withCopied(entryHi(l1v, i), tableRefs === 1), entryLo(l1v, i));
        }
      }
      const l1Off = n === 0 ? 0 : await allocClusters(s, l1Clusters);
      if (n > 0) txRelease(tx, s.header.l1TableOffset, l1Clusters * C);
      const tableOff = tableClusters === 0 ? 0 : await allocClusters(s, tableClusters);
      txRelease(tx, s.header.snapshotsOffset, roundUpClusters(s, snapshotTableBytesOnDisk(s, () => serializeSnapshotTable(s.snapshots).length)));
      await commitMetadataTx(tx, { l1Offset: l1Off, l1Size: n, l1Bytes: l1, snapshots: entries, snapshotsOffset: tableOff, snapshotBytes: table });
    } catch (e) {
      if (s.inMetadataTx) abortMetadataTx(tx);
      throw e;
    }
    return sn;
  }).catch(async (e: unknown) => {
    await retryFlushAfterFailure(s);
    throw e;
  });
}

/**
 * Shows a snapshot's state instead of the active one, without writing anything (read-only node).
 * @locking global-state
 */
export async function loadSnapshotTemporarily(bql: Bql, s: Qcow2State, id: string | null, name: string | null): Promise<SnapshotEntry> {
  assertBql(bql, 'qcow2 snapshot load-tmp');
  return s.lock.run(async () => {
    const sn = findForLoadTmp(s.snapshots, id, name);
    if (sn === undefined) {
      throw new BlockError('ENOENT', `Can't find snapshot '${name ?? id ?? ''}' in '${s.filename}'`, { node: s.node.nodeName, value: name ?? id ?? '' });
    }
    checkSnapshotL1(s, sn);
    const bytes = sn.l1Size === 0 ? new Uint8Array(0) : await s.readMeta(sn.l1TableOffset, sn.l1Size * 8, 'snapshot L1 table');
    s.setL1(bytes);
    s.header.l1TableOffset = sn.l1TableOffset;
    s.header.l1Size = sn.l1Size;
    s.tmpSnapshot = sn.name;
    s.l2Cache.clear();
    return sn;
  });
}

/**
 * Changes the virtual size in the header (growing the L1 table first when needed); the caller
 * holds the metadata lock (`locked`). A smaller size is made durable first, then the data past it is discarded (a
 * crash in between leaves allocated clusters past the end, which read as nothing); a larger one
 * is written only once the grown L1 table it needs is durable.
 * @locking io
 */
export async function setDiskSize(locked: MetadataLocked, s: Qcow2State, sizeBytes: number): Promise<void> {
  assertMetadataLocked(locked, s, 'set disk size');
  const span = s.clusterSize * s.l2Entries;
  const needL1 = Math.ceil(sizeBytes / span);
  if (needL1 * 8 > MAX_L1_BYTES) {
    throw new BlockError('EFBIG', `qcow2 '${s.filename}': a size of ${sizeBytes} bytes needs an L1 table over 32 MiB`, { node: s.node.nodeName, field: 'size' });
  }
  if (sizeBytes < s.sizeBytes) {
    const oldSize = s.sizeBytes;
    await s.commitHeader(24, headerFields([[8, sizeBytes]]), 'header (size)');
    s.header.size = sizeBytes; // the file holds the smaller size now (commitHeader read it back)
    await s.flushFile('the smaller size before the data past it goes');
    const firstCluster = Math.ceil(sizeBytes / s.clusterSize);
    const lastCluster = Math.ceil(oldSize / s.clusterSize);
    if (lastCluster > firstCluster) await zeroClustersLocked(s, firstCluster * s.clusterSize, lastCluster - firstCluster, true, true);
    return;
  }
  if (needL1 > s.l1Size) {
    await growL1(s, needL1);
    await s.flushFile('the grown L1 table before the larger size');
  }
  await s.commitHeader(24, headerFields([[8, sizeBytes]]), 'header (size)');
  s.header.size = sizeBytes;
}

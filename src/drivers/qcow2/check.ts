/**
 * qcow2 consistency check and repair, as `qemu-img check` 7.2 does it (qcow2_co_check_locked and
 * qcow2_check_refcounts): compute every cluster's reference count from the metadata
 * (check-refcounts.ts), compare it with the stored refcounts, repair what was asked for, rebuild
 * the refcount structure at fresh locations when it cannot be repaired in place
 * (rebuild-refcounts.ts), then check the COPIED flags of the active tables. Leaks (stored >
 * computed) waste space; errors (stored < computed, bad flags, bad offsets) corrupt.
 *
 * I/O code: the caller (the driver's `check` callback) holds the BQL and has drained the node, so
 * no request runs beside it; it also takes the qcow2 lock. Without a repair nothing is written.
 * Repairs never allocate through the ordinary allocator (which trusts the stored refcounts):
 * in-place repairs change refcounts whose refcount block exists, and a rebuild allocates from the
 * computed refcounts, which cover the header and every table.
 */
import { assertBql, type Bql } from '../../block/bql.js';
import { BlockError } from '../../block/errors.js';
import { bdrvFlush, bdrvGetLength } from '../../block/io.js';
import { INCOMPAT_CORRUPT, INCOMPAT_DIRTY } from './constants.js';
import {
  calculateRefcounts,
  compareRefcounts,
  emptyResult,
  hex64,
  Imrt,
  MAX_CHECK_CLUSTERS,
  readZeroPadded,
  storedRefcount,
  type Qcow2CheckResult,
  type RepairMode,
} from './check-refcounts.js';
import { ClusterType, entryHi, entryLo, entryOffset, isCopied, l2EntryType, setEntryRaw } from './entries.js';
import { metadataRanges } from './overlap.js';
import { rebuildRefcountStructure } from './rebuild-refcounts.js';
import { readSnapshotTableForCheck } from './snapshot-table-check.js';
import { writeSnapshotTable } from './snapshots.js';
import { withMetadataLock, type MetadataLocked } from './metadata-lock.js';
import type { Qcow2State } from './state.js';
import { flushMetadata } from './writeback.js';

export type { Qcow2CheckResult, RepairMode } from './check-refcounts.js';

const NO_FIX: RepairMode = { leaks: false, errors: false };

/** The counts of a result (messages shared), to set aside and restore as QEMU does. */
function counts(r: Qcow2CheckResult): Qcow2CheckResult {
  return { ...r };
}

function restoreCounts(into: Qcow2CheckResult, from: Qcow2CheckResult): void {
  const messages = into.messages;
  Object.assign(into, from);
  into.messages = messages;
}

/**
 * Checks the image behind `s` and, when `repair` asks, fixes what it found; returns the figures
 * of the final state (after a repair, of the double check qemu-img makes) with the repair counts.
 * @locking io
 */
export async function checkQcow2(s: Qcow2State, repair: RepairMode = NO_FIX): Promise<Qcow2CheckResult> {
  return withMetadataLock(s, async (locked) => {
    // what the check reads on disk must be all there is: write back what is still in memory
    if (!s.node.readOnly) await flushMetadata(s);
    const first = emptyResult();
    if (!(await checkStopping(locked, s, repair, first))) return first;
    if (first.leaksFixed === 0 && first.corruptionsFixed === 0) return first;
    await bdrvFlush(s.file);
    const second = emptyResult();
    second.messages = first.messages;
    await checkStopping(locked, s, NO_FIX, second);
    second.leaksFixed = first.leaksFixed;
    second.corruptionsFixed = first.corruptionsFixed;
    return second;
  });
}

/** Runs one check into `res`; a BlockError that stops it is kept as `res.failure` (false then). */
async function checkStopping(locked: MetadataLocked, s: Qcow2State, fix: RepairMode, res: Qcow2CheckResult): Promise<boolean> {
  try {
    await checkOnce(locked, s, fix, res);
    return true;
  } catch (e) {
    if (!(e instanceof BlockError)) throw e;
    res.failure = e;
    return false;
  }
}

/** One bdrv_check: qcow2_check_refcounts, the COPIED check, then marking the image clean. */
async function checkOnce(locked: MetadataLocked, s: Qcow2State, fix: RepairMode, res: Qcow2CheckResult): Promise<void> {
  const C = s.clusterSize;
  res.totalClusters = Math.ceil(s.sizeBytes / C);
  const nbClusters = Math.ceil(bdrvGetLength(s.file) / C);
  if (nbClusters > MAX_CHECK_CLUSTERS) {
    throw new BlockError('EFBIG', `qcow2 '${s.filename}': File too large: ${nbClusters} clusters are more than a check can count`, { file: s.filename, field: 'nb_clusters' });
  }
  // the open may have refused the table (check mode keeps none then): read it as qemu-img check does
  const table = await readSnapshotTableForCheck(s, res, fix);
  const incomplete = checkSnapshotTable(s, res, fix);
  const imrt = new Imrt(nbClusters);
  let rebuild = await calculateRefcounts(s, res, fix, imrt);
  // the comparison is made once without repairs; a repair run repeats it from these counts
  const pre = counts(res);
  let cmp = await compareRefcounts(s, res, NO_FIX, imrt);
  rebuild ||= cmp.rebuild;
  if (rebuild && fix.errors) {
    const old = counts(res);
    res.messages.push('Rebuilding refcount structure');
    await rebuildRefcountStructure(s, imrt);
    res.corruptions = 0;
    res.leaks = 0;
    // the old structure is gone from the header: count the references again
    imrt.clear();
    const after = emptyResult();
    after.messages = res.messages;
    await calculateRefcounts(s, after, NO_FIX, imrt);
    res.corruptions += after.corruptions;
    res.leaks += after.leaks;
    res.checkErrors += after.checkErrors;
    let freshLeaks = 0;
    if (fix.leaks) {
      // the old structure is leaked now: free it; leaks left here are the rebuild's own
      const r3 = emptyResult();
      r3.messages = res.messages;
      cmp = await compareRefcounts(s, r3, { leaks: true, errors: false }, imrt);
      await flushMetadata(s);
      if (cmp.rebuild) res.messages.push('ERROR rebuilt refcount structure is still broken');
      freshLeaks = r3.leaks;
      res.checkErrors += r3.checkErrors;
    }
    if (res.corruptions < old.corruptions) res.corruptionsFixed += old.corruptions - res.corruptions;
    if (res.leaks < old.leaks) res.leaksFixed += old.leaks - res.leaks;
    res.leaks += freshLeaks;
  } else if (fix.leaks || fix.errors) {
    if (rebuild) {
      res.messages.push('ERROR need to rebuild refcount structures');
      res.checkErrors++;
      throw new BlockError('EIO', `qcow2 '${s.filename}': Input/output error: the refcount structure must be rebuilt (run 'snapstack img check -r all')`, {
        file: s.filename,
        field: 'refcount_table',
        corrupt: true,
      });
    }
    if (res.leaks > 0 || res.corruptions > 0) {
      restoreCounts(res, pre);
      cmp = await compareRefcounts(s, res, fix, imrt);
      await flushMetadata(s);
    }
  }
  await checkOflagCopied(s, res, fix);
  await fixSnapshotTable(locked, s, res, fix, incomplete, table.extraDataDropped);
  res.imageEndOffset = (cmp.highest + 1) * C;
  if ((fix.leaks || fix.errors) && res.checkErrors === 0 && res.corruptions === 0) await markCleanAndConsistent(s);
}

/**
 * QEMU's qcow2_check_read_snapshot_table, for what the open lets through: a v3 entry with less
 * than the 16 bytes of extra data the format requires is incomplete. Returns how many are.
 */
function checkSnapshotTable(s: Qcow2State, res: Qcow2CheckResult, fix: RepairMode): number {
  if (!s.v3) return 0;
  let incomplete = 0;
  for (const [i, sn] of s.snapshots.entries()) {
    if (sn.extraDataSize >= 16) continue;
    res.messages.push(`${fix.errors ? 'Repairing' : 'ERROR'} snapshot table entry ${i} is incomplete`);
    incomplete++;
  }
  return incomplete;
}

/**
 * QEMU's qcow2_check_fix_snapshot_table: with -r all, incomplete entries and entries whose extra
 * data was cut to 1024 bytes (`dropped`) are
 * repaired by writing the table again (complete entries, fresh clusters, one header switch). Only
 * once the refcounts are right (the new table's clusters come from the ordinary allocator);
 * otherwise they stay counted as corruptions.
 */
async function fixSnapshotTable(locked: MetadataLocked, s: Qcow2State, res: Qcow2CheckResult, fix: RepairMode, incomplete: number, dropped: number): Promise<void> {
  if (incomplete === 0 && dropped === 0) return;
  if (!fix.errors || res.corruptions > 0 || res.checkErrors > 0) {
    res.corruptions += incomplete + dropped;
    return;
  }
  try {
    // the table is written with QEMU's 24 bytes of known extra data (plus what is kept unknown)
    await writeSnapshotTable(locked, s, s.snapshots.map((sn) => ({ ...sn, extraDataSize: 24 + sn.unknownExtraData.length })));
    await flushMetadata(s);
  } catch (e) {
    res.messages.push(`ERROR failed to update snapshot table: ${e instanceof Error ? e.message : String(e)}`);
    res.checkErrors++;
    res.corruptions += incomplete + dropped;
    return;
  }
  res.corruptionsFixed += incomplete + dropped;
}

/** QEMU's check_oflag_copied: COPIED must be set exactly where the refcount is 1 (active tables). */
async function checkOflagCopied(s: Qcow2State, res: Qcow2CheckResult, fix: RepairMode): Promise<void> {
  const C = s.clusterSize;
  // with -r leaks only, repairing the flags is safe only when the refcounts are right now
  const repair = fix.errors || (fix.leaks && res.checkErrors === 0 && res.corruptions === 0 && res.leaks === 0);
  for (let i = 0; i < s.l1Size; i++) {
    const hi = entryHi(s.l1View, i);
    const lo = entryLo(s.l1View, i);
    const l2Offset = entryOffset(hi, lo);
    if (l2Offset === 0) continue;
    const rc = await storedRefcount(s, Math.floor(l2Offset / C));
    if (typeof rc === 'string') continue;
    if ((rc === 1) !== isCopied(hi)) {
      res.corruptions++;
      res.messages.push(`${repair ? 'Repairing' : 'ERROR'} OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${hex64(hi, lo)} refcount=${rc}`);
      if (repair) {
        setEntryRaw(s.l1View, i, rc === 1 ? (hi | 0x80000000) >>> 0 : hi & 0x7fffffff, lo);
        await s.writeMeta(s.header.l1TableOffset + i * 8, s.l1.subarray(i * 8, i * 8 + 8), 'L1 entry (COPIED flag repair)');
        res.corruptions--;
        res.corruptionsFixed++;
      }
    }
    let l2: Uint8Array;
    try {
      l2 = await readZeroPadded(s, l2Offset, C);
    } catch (e) {
      res.messages.push(`ERROR: Could not read L2 table: ${e instanceof Error ? e.message : String(e)}`);
      res.checkErrors++;
      return;
    }
    const v = new DataView(l2.buffer);
    let dirty = 0;
    for (let j = 0; j < s.l2Entries; j++) {
      const eh = entryHi(v, j);
      const el = entryLo(v, j);
      const type = l2EntryType(eh, el, true);
      if (type !== ClusterType.Normal && type !== ClusterType.ZeroAlloc) continue;
      const drc = await storedRefcount(s, Math.floor(entryOffset(eh, el) / C));
      if (typeof drc === 'string') continue;
      if ((drc === 1) === isCopied(eh)) continue;
      res.corruptions++;
      // an L2 table at an unaligned offset straddles two clusters: never write it back
      const fixThis = repair && l2Offset % C === 0;
      res.messages.push(`${fixThis ? 'Repairing' : 'ERROR'} OFLAG_COPIED data cluster: l2_entry=${hex64(eh, el)} refcount=${drc}`);
      if (fixThis) {
        setEntryRaw(v, j, drc === 1 ? (eh | 0x80000000) >>> 0 : eh & 0x7fffffff, el);
        dirty++;
      }
    }
    if (dirty === 0) continue;
    const hit = metadataRanges(s).find((r) => r.start < l2Offset + C && r.end > l2Offset);
    if (hit !== undefined || l2Offset < C) {
      res.messages.push('ERROR: Could not write L2 table; metadata overlap check failed: Input/output error');
      res.checkErrors++;
      return;
    }
    try {
      await s.writeMeta(l2Offset, l2, 'L2 table (COPIED flag repair)');
    } catch (e) {
      res.messages.push(`ERROR: Could not write L2 table: ${e instanceof Error ? e.message : String(e)}`);
      res.checkErrors++;
      return;
    }
    s.l2Cache.drop(l2Offset);
    res.corruptions -= dirty;
    res.corruptionsFixed += dirty;
  }
}

/** QEMU's qcow2_mark_clean + qcow2_mark_consistent: clears the dirty and corrupt bits. */
async function markCleanAndConsistent(s: Qcow2State): Promise<void> {
  const bits = BigInt(INCOMPAT_DIRTY | INCOMPAT_CORRUPT);
  if ((s.header.incompatibleFeatures & bits) !== 0n) await clearIncompatibleBits(s, INCOMPAT_DIRTY | INCOMPAT_CORRUPT);
}

/** Clears bits of incompatible_features in the header (offset 72, 8 bytes), flushed on both sides. */
async function clearIncompatibleBits(s: Qcow2State, bits: number): Promise<void> {
  const next = s.header.incompatibleFeatures & ~BigInt(bits);
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, next);
  await bdrvFlush(s.file);
  await s.writeMeta(72, b, 'header (incompatible features)');
  await bdrvFlush(s.file);
  s.header.incompatibleFeatures = next;
}

/**
 * Repairs the refcounts of an image left dirty (lazy refcounts, crash) and clears the dirty bit,
 * as QEMU does when it opens such an image read/write: global state, from the driver's open
 * (the node is not yet in use, so nothing runs beside it).
 * @locking global-state
 */
export async function repairDirtyImage(bql: Bql, s: Qcow2State): Promise<Qcow2CheckResult> {
  assertBql(bql, 'qcow2 repairDirtyImage');
  const res = await checkQcow2(s, { leaks: true, errors: true });
  if (res.failure !== null) throw res.failure;
  if (res.corruptions > 0 || res.checkErrors > 0) {
    throw s.corrupt(`the dirty image still has ${res.corruptions + res.checkErrors} errors after its refcounts were rebuilt; run 'snapstack img check -r all'`, 'incompatible_features');
  }
  if ((s.header.incompatibleFeatures & BigInt(INCOMPAT_DIRTY)) !== 0n) await s.lock.run(() => clearIncompatibleBits(s, INCOMPAT_DIRTY));
  return res;
}

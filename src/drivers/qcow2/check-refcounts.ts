/**
 * The refcount half of `qemu-img check` (QEMU 7.2's qcow2_check_refcounts and its helpers):
 * compute every cluster's reference count from the metadata into an in-memory refcount table
 * (the "IMRT"), note what is damaged on the way, then compare it with the refcounts stored in the
 * image. The messages are qemu-img's, word for word, so that both tools can be compared.
 *
 * I/O code, run with the qcow2 lock held by check.ts. Nothing here writes except the repairs the
 * caller asked for; a repair never allocates a cluster: a refcount that is 0 on disk for a cluster
 * in use cannot be raised in place (its refcount block may be missing, and placing one would trust
 * the damaged refcounts), so it asks for a rebuild of the whole structure instead
 * (rebuild-refcounts.ts), which allocates from the IMRT.
 */
import { BlockError } from '../../block/errors.js';
import { bdrvFlush, bdrvGetLength, bdrvPread, bdrvTruncate } from '../../block/io.js';
import { AUTOCLEAR_BITMAPS, EXT_BITMAPS, L1_HI_RESERVED, L1_LO_RESERVED, L2_HI_RESERVED, L2_LO_RESERVED, LO_ZERO, MAX_L1_BYTES, REFT_LO_RESERVED } from './constants.js';
import { ClusterType, compressedExtent, entryHi, entryLo, entryOffset, l2EntryType } from './entries.js';
import { overlappingMetadata } from './overlap.js';
import { readSlot, updateRefcount } from './refcount.js';
import { snapshotTableSize } from './snapshot-table.js';
import { snapshotTableBytesOnDisk } from './snapshot-extent.js';
import type { Qcow2State } from './state.js';
import type { CheckResult } from '../../block/check.js';

/** QEMU's limit on the clusters a check may count (nb_clusters > INT_MAX fails with EFBIG). */
export const MAX_CHECK_CLUSTERS = 0x7fffffff;

/** What a check found: the block layer's CheckResult (QEMU's BdrvCheckResult plus the fragmentation figures). */
export type Qcow2CheckResult = CheckResult;

/** Which problems to repair: `-r leaks` or `-r all`. */
export interface RepairMode {
  leaks: boolean;
  errors: boolean;
}

/**
 * A result with everything zero.
 * @locking common
 */
export function emptyResult(): Qcow2CheckResult {
  return {
    corruptions: 0,
    leaks: 0,
    checkErrors: 0,
    corruptionsFixed: 0,
    leaksFixed: 0,
    imageEndOffset: 0,
    totalClusters: 0,
    allocatedClusters: 0,
    fragmentedClusters: 0,
    compressedClusters: 0,
    messages: [],
    failure: null,
  };
}

/**
 * Hex without a prefix, as QEMU's %lx prints (exact for any 64-bit entry given as halves).
 * @locking common
 */
export function hex64(hi: number, lo: number): string {
  return ((BigInt(hi >>> 0) << 32n) | BigInt(lo >>> 0)).toString(16);
}

/**
 * The in-memory refcount table: one counter per host cluster, growing in whole steps and never
 * past what the caller allowed (the file's clusters plus the one QEMU tolerates, plus what a
 * rebuild allocates), so no value read from the image can size it.
 */
export class Imrt {
  private data: Uint32Array;
  /** Clusters covered (QEMU's nb_clusters). */
  size: number;

  constructor(clusters: number) {
    this.size = clusters;
    this.data = new Uint32Array(Math.max(clusters, 1));
  }

  get(ci: number): number {
    return ci < this.size ? (this.data[ci] ?? 0) : 0;
  }

  set(ci: number, v: number): void {
    this.ensure(ci + 1);
    this.data[ci] = v;
  }

  /** Grows to cover `clusters` clusters (new ones count 0). */
  ensure(clusters: number): void {
    if (clusters <= this.size) return;
    if (clusters > MAX_CHECK_CLUSTERS) throw new BlockError('EFBIG', `qcow2 check: ${clusters} clusters are more than a check can count`, { field: 'nb_clusters', value: clusters });
    if (clusters > this.data.length) {
      const next = new Uint32Array(Math.min(MAX_CHECK_CLUSTERS, Math.max(clusters, this.data.length * 2)));
      next.set(this.data);
      this.data = next;
    }
    this.size = clusters;
  }

  /** Sets every counter back to 0. */
  clear(): void {
    this.data.fill(0);
  }
}

/** The context one computation of the IMRT needs. */
interface Walk {
  s: Qcow2State;
  res: Qcow2CheckResult;
  imrt: Imrt;
  fileLength: number;
  /** Largest count a refcount entry can hold (a higher one is an overflow). */
  max: number;
}

/**
 * Reads `bytes` at `offset` of the file; what lies past its end reads as zeros (as QEMU's file
 * driver does), so a table that runs off the end is still walked, and its damage reported.
 * @locking io
 */
export async function readZeroPadded(s: Qcow2State, offset: number, bytes: number): Promise<Uint8Array> {
  const buf = new Uint8Array(bytes);
  const fileLength = bdrvGetLength(s.file);
  const n = Math.max(0, Math.min(bytes, fileLength - offset));
  if (n > 0) await bdrvPread(s.file, offset, buf.subarray(0, n));
  return buf;
}

/** QEMU's qcow2_inc_refcounts_imrt: counts one reference to each cluster of a byte range. */
function incRefcounts(w: Walk, offset: number, size: number): void {
  if (size <= 0) return;
  const C = w.s.clusterSize;
  // the last cluster may be half allocated, so up to one cluster past the end is tolerated
  if (offset + size - w.fileLength > C) {
    w.res.messages.push(`ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x${offset.toString(16)} size 0x${size.toString(16)}`);
    w.res.corruptions++;
    return;
  }
  const first = Math.floor(offset / C);
  const last = Math.floor((offset + size - 1) / C);
  w.imrt.ensure(last + 1);
  for (let ci = first; ci <= last; ci++) {
    const rc = w.imrt.get(ci);
    if (rc >= w.max) {
      w.res.messages.push(`ERROR: overflow cluster offset=0x${(ci * C).toString(16)}`);
      w.res.messages.push('Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing');
      w.res.corruptions++;
      continue;
    }
    w.imrt.set(ci, rc + 1);
  }
}

/** QEMU's check_refcounts_l2: counts the clusters one L2 table references; checks its entries. */
async function checkRefcountsL2(w: Walk, l2Offset: number, active: boolean, fix: RepairMode): Promise<void> {
  const { s, res } = w;
  const C = s.clusterSize;
  let l2: Uint8Array;
  try {
    l2 = await readZeroPadded(s, l2Offset, C);
  } catch {
    res.messages.push('ERROR: I/O error in check_refcounts_l2');
    res.checkErrors++;
    return;
  }
  const v = new DataView(l2.buffer);
  let nextContiguous = 0;
  for (let i = 0; i < s.l2Entries; i++) {
    const hi = entryHi(v, i);
    const lo = entryLo(v, i);
    const type = l2EntryType(hi, lo, true);
    if (type !== ClusterType.Compressed && ((hi & L2_HI_RESERVED) !== 0 || (lo & L2_LO_RESERVED) !== 0)) {
      res.messages.push(`ERROR found l2 entry with reserved bits set: ${hex64(hi, lo)}`);
      res.corruptions++;
    }
    if (type === ClusterType.Compressed) {
      const { offset, bytes } = compressedExtent(hi, lo, s.clusterBits);
      if ((hi & 0x80000000) !== 0) {
        res.messages.push(`ERROR: coffset=0x${offset.toString(16)}: copied flag must never be set for compressed clusters`);
        res.corruptions++;
      }
      incRefcounts(w, offset, bytes);
      if (active) {
        res.allocatedClusters++;
        res.compressedClusters++;
        res.fragmentedClusters++;
      }
    } else if (type === ClusterType.Normal || type === ClusterType.ZeroAlloc) {
      const offset = entryOffset(hi, lo);
      if (offset % C !== 0) {
        res.corruptions++;
        if ((lo & LO_ZERO) !== 0) {
          // a preallocated zero cluster holds no data: repair makes it a plain zero cluster
          res.messages.push(`${fix.errors ? 'Repairing' : 'ERROR'} offset=${offset.toString(16)}: Preallocated cluster is not properly aligned; L2 entry corrupted.`);
          if (fix.errors && (await repairUnalignedZeroCluster(w, l2Offset + i * 8))) continue;
        } else {
          res.messages.push(`ERROR offset=${offset.toString(16)}: Data cluster is not properly aligned; L2 entry corrupted.`);
        }
      }
      if (active) {
        res.allocatedClusters++;
        if (nextContiguous !== 0 && offset !== nextContiguous) res.fragmentedClusters++;
        nextContiguous = offset + C;
      }
      incRefcounts(w, offset, C);
    }
  }
}

/** Rewrites one L2 entry as a plain zero cluster, synchronously; true when it was written. */
async function repairUnalignedZeroCluster(w: Walk, at: number): Promise<boolean> {
  const { s, res } = w;
  if (overlappingMetadata(s, at, 8) !== null) {
    res.messages.push('ERROR: Overlap check failed');
    res.checkErrors++;
    return false;
  }
  const entry = new Uint8Array(8);
  entry[7] = LO_ZERO;
  try {
    await s.writeMeta(at, entry, 'L2 entry (unaligned preallocated zero cluster)');
    await bdrvFlush(s.file);
  } catch (e) {
    res.messages.push(`ERROR: Failed to overwrite L2 table entry: ${e instanceof Error ? e.message : String(e)}`);
    res.checkErrors++;
    return false;
  }
  s.l2Cache.drop(at - (at % s.clusterSize));
  res.corruptions--;
  res.corruptionsFixed++;
  return true;
}

/** QEMU's check_refcounts_l1: the L1 table, its L2 tables and what they reference. */
async function checkRefcountsL1(w: Walk, l1Offset: number, l1Size: number, active: boolean, fix: RepairMode): Promise<void> {
  const { s, res } = w;
  const bytes = l1Size * 8;
  incRefcounts(w, l1Offset, bytes);
  if (bytes === 0) return;
  let l1: Uint8Array;
  try {
    l1 = await readZeroPadded(s, l1Offset, bytes);
  } catch {
    res.messages.push('ERROR: I/O error in check_refcounts_l1');
    res.checkErrors++;
    return;
  }
  const v = new DataView(l1.buffer);
  for (let i = 0; i < l1Size; i++) {
    const hi = entryHi(v, i);
    const lo = entryLo(v, i);
    if (hi === 0 && lo === 0) continue;
    if ((hi & L1_HI_RESERVED) !== 0 || (lo & L1_LO_RESERVED) !== 0) {
      res.messages.push(`ERROR found L1 entry with reserved bits set: ${hex64(hi, lo)}`);
      res.corruptions++;
    }
    const l2Offset = entryOffset(hi, lo);
    incRefcounts(w, l2Offset, s.clusterSize);
    if (l2Offset % s.clusterSize !== 0) {
      res.messages.push(`ERROR l2_offset=${l2Offset.toString(16)}: Table is not cluster aligned; L1 entry corrupted`);
      res.corruptions++;
    }
    if (l2Offset === 0) continue; // only flag bits: nothing to walk
    if (l2Offset >= w.fileLength + s.clusterSize) continue; // already reported as past the end
    await checkRefcountsL2(w, l2Offset, active, fix);
  }
}

/**
 * A stored refcount, or an error text when it cannot be read (QEMU's qcow2_get_refcount).
 * @locking io
 */
export async function storedRefcount(s: Qcow2State, ci: number): Promise<number | string> {
  const b = Math.floor(ci / s.refblockEntries);
  if (b >= s.reftable.length / 8) return 0;
  const off = entryOffset(entryHi(s.reftableView, b), entryLo(s.reftableView, b));
  if (off === 0) return 0;
  if (off % s.clusterSize !== 0) return 'Input/output error';
  let t = s.refblockCache.peek(off);
  if (t === undefined) {
    try {
      const bytes = await readZeroPadded(s, off, s.clusterSize);
      t = s.refblockCache.insert(off, bytes);
    } catch (e) {
      return e instanceof Error ? e.message : String(e);
    }
  }
  return readSlot(t, ci - b * s.refblockEntries, s.refcountBits);
}

/**
 * How far past its end `-r all` grows the file to take in a refcount block that lies outside it
 * (QEMU grows it by any amount); farther, the structure is rebuilt without that block.
 */
const MAX_REPAIR_GROWTH_BYTES = 256 * 1024 * 1024;

/**
 * QEMU's check_refblocks: counts each refcount block and says whether the structure must be
 * rebuilt. A block outside the image is repaired (with -r all) by growing the file to hold it,
 * as QEMU does, when that takes at most MAX_REPAIR_GROWTH_BYTES.
 */
async function checkRefblocks(w: Walk, fix: RepairMode): Promise<boolean> {
  const { s, res } = w;
  const C = s.clusterSize;
  let rebuild = false;
  for (let i = 0; i < s.reftable.length / 8; i++) {
    const hi = entryHi(s.reftableView, i);
    const lo = entryLo(s.reftableView, i);
    const offset = entryOffset(hi, lo);
    const cluster = Math.floor(offset / C);
    if ((lo & REFT_LO_RESERVED) !== 0 || (hi & 0xff000000) !== 0) {
      res.messages.push(`ERROR refcount table entry ${i} has reserved bits set`);
      res.corruptions++;
      rebuild = true;
      continue;
    }
    if (offset % C !== 0) {
      res.messages.push(`ERROR refcount block ${i} is not cluster aligned; refcount table entry corrupted`);
      res.corruptions++;
      rebuild = true;
      continue;
    }
    if (cluster >= w.imrt.size) {
      res.corruptions++;
      res.messages.push(`${fix.errors ? 'Repairing' : 'ERROR'} refcount block ${i} is outside image`);
      if (fix.errors) {
        if (offset + C - w.fileLength > MAX_REPAIR_GROWTH_BYTES) {
          // a damaged entry must not make the file gigabytes long: the rebuild drops the entry instead
          res.messages.push('ERROR could not resize image: File too large');
          rebuild = true;
          continue;
        }
        try {
          await bdrvTruncate(s.file, offset + C);
        } catch (e) {
          res.messages.push(`ERROR could not resize image: ${e instanceof Error ? e.message : String(e)}`);
          rebuild = true;
          continue;
        }
        w.fileLength = bdrvGetLength(s.file);
        w.imrt.ensure(Math.ceil(w.fileLength / C));
        s.refblockCache.drop(offset);
        res.corruptions--;
        res.corruptionsFixed++;
        incRefcounts(w, offset, C);
      }
      continue;
    }
    if (offset !== 0) {
      incRefcounts(w, offset, C);
      if (w.imrt.get(cluster) !== 1) {
        res.messages.push(`ERROR refcount block ${i} refcount=${w.imrt.get(cluster)}`);
        res.corruptions++;
        rebuild = true;
      }
    }
  }
  return rebuild;
}

/** QEMU's limit on the bitmap directory (BME_MAX_PHYS_SIZE is 64 MiB; the directory is far smaller). */
const MAX_BITMAP_DIRECTORY_BYTES = 64 * 1024 * 1024;
/** QEMU's BME_MAX_TABLE_SIZE: entries of one bitmap table. */
const MAX_BITMAP_TABLE_ENTRIES = 0x8000000;

/**
 * QEMU's qcow2_check_bitmaps_refcounts: the persistent dirty bitmaps' directory, tables and data
 * clusters are in use too. Only while the autoclear bit says the bitmaps are consistent (otherwise
 * QEMU ignores the extension, and so does the check).
 */
async function checkBitmaps(w: Walk): Promise<void> {
  const { s, res } = w;
  if ((s.header.autoclearFeatures & BigInt(AUTOCLEAR_BITMAPS)) === 0n) return;
  const ext = s.header.extensions.find((e) => e.type === EXT_BITMAPS);
  if (ext === undefined || ext.data.length < 24) return;
  const ev = new DataView(ext.data.buffer, ext.data.byteOffset, ext.data.byteLength);
  const nbBitmaps = ev.getUint32(0);
  if (nbBitmaps === 0) return;
  const dirSize = ev.getUint32(8) * 2 ** 32 + ev.getUint32(12);
  const dirOffset = ev.getUint32(16) * 2 ** 32 + ev.getUint32(20);
  incRefcounts(w, dirOffset, dirSize);
  if (dirSize > MAX_BITMAP_DIRECTORY_BYTES || dirOffset % s.clusterSize !== 0 || dirOffset + dirSize > w.fileLength) {
    res.messages.push(`ERROR bitmap directory (offset 0x${dirOffset.toString(16)}, ${dirSize} bytes) is invalid`);
    res.corruptions++;
    return;
  }
  const dir = await readZeroPadded(s, dirOffset, dirSize);
  const dv = new DataView(dir.buffer);
  let at = 0;
  for (let i = 0; i < nbBitmaps; i++) {
    if (at + 24 > dir.length) {
      res.messages.push(`ERROR bitmap directory entry ${i} runs past the directory`);
      res.corruptions++;
      return;
    }
    const tableOffset = dv.getUint32(at) * 2 ** 32 + dv.getUint32(at + 4);
    const tableSize = dv.getUint32(at + 8);
    const nameSize = dv.getUint16(at + 18);
    const extraSize = dv.getUint32(at + 20);
    at += Math.ceil((24 + extraSize + nameSize) / 8) * 8;
    incRefcounts(w, tableOffset, tableSize * 8);
    if (tableSize > MAX_BITMAP_TABLE_ENTRIES || tableOffset % s.clusterSize !== 0 || tableOffset + tableSize * 8 > w.fileLength) {
      res.messages.push(`ERROR bitmap ${i}: its table (offset 0x${tableOffset.toString(16)}, ${tableSize} entries) is invalid`);
      res.corruptions++;
      break;
    }
    const table = await readZeroPadded(s, tableOffset, tableSize * 8);
    const tv = new DataView(table.buffer);
    for (let j = 0; j < tableSize; j++) {
      const hi = entryHi(tv, j);
      const lo = entryLo(tv, j);
      const off = entryOffset(hi, lo);
      // reserved bits 1..8 and 56..63; bit 0 (all ones) only without an offset; offsets cluster aligned
      if ((hi & 0xff000000) !== 0 || (lo & 0x1fe) !== 0 || (off !== 0 && (lo & 1) !== 0) || off % s.clusterSize !== 0) {
        res.corruptions++;
        continue;
      }
      if (off !== 0) incRefcounts(w, off, s.clusterSize);
    }
  }
}

/**
 * QEMU's calculate_refcounts: fills `imrt` with the references the metadata makes (header, active
 * and snapshot L1/L2 tables and data, snapshot table, refcount table and blocks); returns whether
 * the refcount structure must be rebuilt.
 * @locking io
 */
export async function calculateRefcounts(s: Qcow2State, res: Qcow2CheckResult, fix: RepairMode, imrt: Imrt): Promise<boolean> {
  const w: Walk = { s, res, imrt, fileLength: bdrvGetLength(s.file), max: Math.min(s.refcountMax, 0xffffffff) };
  incRefcounts(w, 0, s.clusterSize); // header
  await checkRefcountsL1(w, s.header.l1TableOffset, s.header.l1Size, true, fix);
  for (const sn of s.snapshots) {
    if (sn.l1TableOffset % s.clusterSize !== 0) {
      res.messages.push(`ERROR snapshot ${sn.id} (${sn.name}) l1_offset=0x${sn.l1TableOffset.toString(16)}: L1 table is not cluster aligned; snapshot table entry corrupted`);
      res.corruptions++;
      continue;
    }
    if (sn.l1Size * 8 > MAX_L1_BYTES) {
      res.messages.push(`ERROR snapshot ${sn.id} (${sn.name}) l1_size=0x${sn.l1Size.toString(16)}: L1 table is too large; snapshot table entry corrupted`);
      res.corruptions++;
      continue;
    }
    await checkRefcountsL1(w, sn.l1TableOffset, sn.l1Size, false, fix);
  }
  if (s.header.nbSnapshots > 0) incRefcounts(w, s.header.snapshotsOffset, snapshotTableBytesOnDisk(s, () => snapshotTableSize(s.snapshots)));
  incRefcounts(w, s.header.refcountTableOffset, s.reftable.length);
  await checkBitmaps(w);
  return checkRefblocks(w, fix);
}

/**
 * QEMU's compare_refcounts: compares the stored refcounts with the IMRT, repairing what `fix`
 * allows where the refcount block exists (never allocating); returns whether a rebuild is needed
 * (a cluster in use with a stored refcount of 0) and the highest cluster in use.
 * @locking io
 */
export async function compareRefcounts(s: Qcow2State, res: Qcow2CheckResult, fix: RepairMode, imrt: Imrt): Promise<{ rebuild: boolean; highest: number }> {
  const C = s.clusterSize;
  let rebuild = false;
  let highest = 0;
  for (let ci = 0; ci < imrt.size; ci++) {
    const stored = await storedRefcount(s, ci);
    if (typeof stored === 'string') {
      res.messages.push(`Can't get refcount for cluster ${ci}: ${stored}`);
      res.checkErrors++;
      continue;
    }
    const want = imrt.get(ci);
    if (stored > 0 || want > 0) highest = ci;
    if (stored === want) continue;
    let fixed: 'leaks' | 'errors' | null = null;
    if (stored === 0) rebuild = true;
    else if (stored > want && fix.leaks) fixed = 'leaks';
    else if (stored < want && fix.errors) fixed = 'errors';
    res.messages.push(`${fixed !== null ? 'Repairing' : stored < want ? 'ERROR' : 'Leaked'} cluster ${ci} refcount=${stored} reference=${want}`);
    if (fixed !== null) {
      try {
        await updateRefcount(s, ci * C, C, want - stored);
        if (fixed === 'leaks') res.leaksFixed++;
        else res.corruptionsFixed++;
        continue;
      } catch (e) {
        res.messages.push(`ERROR could not update the refcount of cluster ${ci}: ${e instanceof Error ? e.message : String(e)}`);
      }
    }
    if (stored < want) res.corruptions++;
    else res.leaks++;
  }
  return { rebuild, highest };
}

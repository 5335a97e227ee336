/**
 * qcow2 consistency check and repair, as `qemu-img check` does it: recompute every cluster's
 * reference count from the metadata (header, L1 tables of the active state and of every snapshot,
 * L2 tables, data clusters, the refcount structures, the snapshot table), compare with the stored
 * refcounts, and check the COPIED flags. Leaks (stored > computed) waste space; errors (stored <
 * computed, bad flags, bad offsets) corrupt. Repair changes refcounts and flags only when asked.
 *
 * I/O code: run it on a node nobody else uses (the CLI opens the file for itself); it takes the
 * qcow2 lock while it runs.
 */
import { bdrvFlush, bdrvGetLength } from '../../block/io.js';
import { INCOMPAT_CORRUPT, INCOMPAT_DIRTY, TWO32 } from './constants.js';
import { ClusterType, compressedExtent, entryHi, entryLo, entryOffset, isCopied, l2EntryType, setEntryRaw } from './entries.js';
import { checkNoMetadataOverlap } from './overlap.js';
import { readSlot, refblockOffset, updateRefcount } from './refcount.js';
import { snapshotTableSize } from './snapshot-table.js';
import type { Qcow2State } from './state.js';

/** What a check found (QEMU's BdrvCheckResult plus the fragmentation figures). */
export interface Qcow2CheckResult {
  corruptions: number;
  leaks: number;
  checkErrors: number;
  corruptionsFixed: number;
  leaksFixed: number;
  imageEndOffset: number;
  totalClusters: number;
  allocatedClusters: number;
  fragmentedClusters: number;
  compressedClusters: number;
  /** One line per problem, in the words qemu-img prints to stderr. */
  messages: string[];
}

/** Which problems to repair: `-r leaks` or `-r all`. */
export interface RepairMode {
  leaks: boolean;
  errors: boolean;
}


/** Reference counts computed from the metadata, growing when something points past the end. */
class Counts {
  data: Float64Array;
  constructor(n: number) {
    this.data = new Float64Array(Math.max(n, 1));
  }
  inc(ci: number): void {
    if (ci >= this.data.length) {
      const next = new Float64Array(Math.max(ci + 1, this.data.length * 2));
      next.set(this.data);
      this.data = next;
    }
    this.data[ci] = (this.data[ci] ?? 0) + 1;
  }
  get(ci: number): number {
    return ci < this.data.length ? (this.data[ci] ?? 0) : 0;
  }
}

function emptyResult(): Qcow2CheckResult {
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
  };
}

/** Walks the metadata and counts references; records corruptions it meets on the way. */
async function computeRefcounts(s: Qcow2State, res: Qcow2CheckResult, repair: RepairMode): Promise<{ counts: Counts; copiedErrors: Array<() => Promise<void>> }> {
  const C = s.clusterSize;
  const fileLength = bdrvGetLength(s.file);
  const counts = new Counts(Math.ceil(fileLength / C));
  const incRange = (offset: number, bytes: number): void => {
    if (bytes <= 0) return;
    const last = Math.floor((offset + bytes - 1) / C);
    for (let ci = Math.floor(offset / C); ci <= last; ci++) counts.inc(ci);
  };
  incRange(0, C); // header
  try {
    checkNoMetadataOverlap(s);
  } catch (e) {
    res.messages.push(`ERROR ${e instanceof Error ? e.message : String(e)}`);
    res.corruptions++;
  }
  const copiedFixes: Array<() => Promise<void>> = [];
  const l2Seen = new Set<number>();
  const walkL1 = async (l1Offset: number, l1Size: number, active: boolean, label: string): Promise<void> => {
    if (l1Size === 0) return;
    incRange(l1Offset, l1Size * 8);
    if (l1Offset % C !== 0 || l1Offset + l1Size * 8 > fileLength) {
      res.messages.push(`ERROR ${label} L1 table at offset ${l1Offset} is unaligned or past the end of the image`);
      res.corruptions++;
      return;
    }
    const l1 = active ? s.l1 : await s.readMeta(l1Offset, l1Size * 8, `${label} L1 table`);
    const l1v = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
    let nextContiguous = 0;
    for (let i = 0; i < l1Size; i++) {
      const hi = entryHi(l1v, i);
      const lo = entryLo(l1v, i);
      const l2Off = entryOffset(hi, lo);
      if (l2Off === 0) continue;
      incRange(l2Off, C);
      if (l2Off % C !== 0) {
        res.messages.push(`ERROR l2_offset=${l2Off}: Table is not cluster aligned; L1 entry corrupted`);
        res.corruptions++;
        continue;
      }
      if (l2Off + C > fileLength) {
        res.messages.push(`ERROR l2_offset=${l2Off}: L2 table is outside the image`);
        res.corruptions++;
        continue;
      }
      if (active) {
        const l1Index = i;
        copiedFixes.push(async () => {
          const rc = await storedRefcount(s, l2Off / C);
          if ((rc === 1) !== isCopied(hi)) {
            res.messages.push(`ERROR OFLAG_COPIED L2 cluster: l1_index=${l1Index} l1_entry=${hex(hi, lo)} refcount=${rc}`);
            if (repair.errors) {
              setEntryRaw(s.l1View, l1Index, rc === 1 ? (hi | 0x80000000) >>> 0 : hi & 0x7fffffff, lo);
              await s.writeMeta(s.header.l1TableOffset + l1Index * 8, s.l1.subarray(l1Index * 8, l1Index * 8 + 8), 'L1 entry (COPIED flag repair)');
              res.corruptionsFixed++;
            } else res.corruptions++;
          }
        });
      }
      const l2 = await s.readMeta(l2Off, C, `${label} L2 table`);
      const v = new DataView(l2.buffer);
      const firstVisit = !l2Seen.has(l2Off);
      l2Seen.add(l2Off);
      for (let j = 0; j < s.l2Entries; j++) {
        const eh = entryHi(v, j);
        const el = entryLo(v, j);
        const type = l2EntryType(eh, el, s.v3);
        if (type === ClusterType.Compressed) {
          const { offset, bytes } = compressedExtent(eh, el, s.clusterBits);
          if (isCopied(eh)) {
            res.messages.push(`ERROR: coffset=0x${offset.toString(16)}: copied flag must never be set for compressed clusters`);
            res.corruptions++;
          }
          incRange(offset - (offset % 512), bytes + (offset % 512));
          if (active) {
            res.allocatedClusters++;
            res.compressedClusters++;
            res.fragmentedClusters++;
          }
        } else if (type === ClusterType.Normal || type === ClusterType.ZeroAlloc) {
          const d = entryOffset(eh, el);
          if (d % C !== 0) {
            res.messages.push(`ERROR offset=${d}: Cluster is not properly aligned; L2 entry corrupted`);
            res.corruptions++;
            continue;
          }
          incRange(d, C);
          if (active) {
            res.allocatedClusters++;
            if (nextContiguous !== 0 && d !== nextContiguous) res.fragmentedClusters++;
            nextContiguous = d + C;
            if (firstVisit) {
              const at = l2Off + j * 8;
              copiedFixes.push(async () => {
                const rc = await storedRefcount(s, d / C);
                if ((rc === 1) !== isCopied(eh)) {
                  res.messages.push(`ERROR OFLAG_COPIED data cluster: l2_entry=${hex(eh, el)} refcount=${rc}`);
                  if (!repair.errors) res.corruptions++;
                  else {
                    const b = new Uint8Array(8);
                    setEntryRaw(new DataView(b.buffer), 0, rc === 1 ? (eh | 0x80000000) >>> 0 : eh & 0x7fffffff, el);
                    await s.writeMeta(at, b, 'L2 entry (COPIED flag repair)');
                    s.l2Cache.drop(l2Off);
                    res.corruptionsFixed++;
                  }
                }
              });
            }
          }
        }
      }
    }
  };
  await walkL1(s.header.l1TableOffset, s.header.l1Size, true, 'active');
  for (const sn of s.snapshots) await walkL1(sn.l1TableOffset, sn.l1Size, false, `snapshot '${sn.name}'`);
  if (s.header.nbSnapshots > 0) incRange(s.header.snapshotsOffset, snapshotTableSize(s.snapshots));
  incRange(s.header.refcountTableOffset, s.header.refcountTableClusters * C);
  for (let b = 0; b < s.reftable.length / 8; b++) {
    const off = entryOffset(entryHi(s.reftableView, b), entryLo(s.reftableView, b));
    if (off === 0) continue;
    if (off % C !== 0) {
      res.messages.push(`ERROR refcount block ${b} is not cluster aligned; refcount table entry corrupted`);
      res.corruptions++;
      continue;
    }
    if (off >= fileLength) {
      res.messages.push(`ERROR refcount block ${b} is outside image`);
      res.corruptions++;
      continue;
    }
    incRange(off, C);
  }
  return { counts, copiedErrors: copiedFixes };
}

function hex(hi: number, lo: number): string {
  return (hi * TWO32 + lo).toString(16);
}

/** The refcount stored on disk for a cluster (0 when no refcount block covers it). */
async function storedRefcount(s: Qcow2State, ci: number): Promise<number> {
  const b = Math.floor(ci / s.refblockEntries);
  const off = refblockOffset(s, b);
  if (off === 0 || off % s.clusterSize !== 0 || off >= bdrvGetLength(s.file)) return 0;
  const t = s.refblockCache.peek(off) ?? (await s.refblockCache.get(off));
  return readSlot(t, ci - b * s.refblockEntries, s.refcountBits);
}

/**
 * Checks the image behind `s` and, when `repair` asks, fixes what it found; returns the figures
 * of the final state (after a repair, of the double check) with the repair counts.
 * @locking io
 */
export async function checkQcow2(s: Qcow2State, repair: RepairMode = { leaks: false, errors: false }): Promise<Qcow2CheckResult> {
  return s.lock.run(async () => {
    const first = await checkOnce(s, repair);
    if (first.leaksFixed === 0 && first.corruptionsFixed === 0) return first;
    await bdrvFlush(s.file);
    const second = await checkOnce(s, { leaks: false, errors: false });
    second.leaksFixed = first.leaksFixed;
    second.corruptionsFixed = first.corruptionsFixed;
    second.messages = [...first.messages, ...second.messages];
    return second;
  });
}

async function checkOnce(s: Qcow2State, repair: RepairMode): Promise<Qcow2CheckResult> {
  const res = emptyResult();
  const C = s.clusterSize;
  res.totalClusters = Math.ceil(s.sizeBytes / C);
  {
    const { counts, copiedErrors } = await computeRefcounts(s, res, repair);
    const fileClusters = Math.ceil(bdrvGetLength(s.file) / C);
    const n = Math.max(fileClusters, counts.data.length);
    let highest = -1;
    for (let ci = 0; ci < n; ci++) {
      const want = counts.get(ci);
      const have = ci < fileClusters || want > 0 ? await storedRefcount(s, ci) : 0;
      if (have > 0 || want > 0) highest = ci;
      if (have === want) continue;
      const leak = have > want;
      const fix = leak ? repair.leaks : repair.errors;
      res.messages.push(`${fix ? 'Repairing' : leak ? 'Leaked' : 'ERROR'} cluster ${ci} refcount=${have} reference=${want}`);
      if (fix) {
        await updateRefcount(s, ci * C, C, want - have);
        if (leak) res.leaksFixed++;
        else res.corruptionsFixed++;
      } else if (leak) res.leaks++;
      else res.corruptions++;
    }
    for (const f of copiedErrors) await f();
    res.imageEndOffset = (highest + 1) * C;
  }
  // a repaired image is consistent again: QEMU's qcow2_mark_clean / qcow2_mark_consistent
  let clear = 0;
  if ((repair.leaks || repair.errors) && res.corruptions === 0) clear |= INCOMPAT_DIRTY;
  if (repair.errors && res.corruptions === 0) clear |= INCOMPAT_CORRUPT;
  if ((s.header.incompatibleFeatures & BigInt(clear)) !== 0n) await clearIncompatibleBits(s, clear);
  return res;
}

/** Clears bits of incompatible_features in the header (offset 72, 8 bytes). */
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
 * as QEMU does when it opens such an image read/write.
 * @locking io
 */
export async function repairDirtyImage(s: Qcow2State): Promise<Qcow2CheckResult> {
  const res = await checkQcow2(s, { leaks: true, errors: true });
  if (res.corruptions > 0) {
    throw s.corrupt(`the dirty image still has ${res.corruptions} errors after its refcounts were rebuilt; run 'snapstack img check -r all'`, 'incompatible_features');
  }
  if ((s.header.incompatibleFeatures & BigInt(INCOMPAT_DIRTY)) !== 0n) await s.lock.run(() => clearIncompatibleBits(s, INCOMPAT_DIRTY));
  return res;
}

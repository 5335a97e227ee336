/**
 * qcow2 guest-to-host mapping: looking up the L2 entry of a guest cluster, and getting an L2 table
 * that may be written (allocating it, or copying it when a snapshot shares it: COPIED clear).
 *
 * I/O code, called with the qcow2 lock held when anything may change. Changes are write-back
 * (writeback.ts orders them): a new L2 table is dirty in the cache, the L1 entry that points at it
 * is dirty, and the flush writes the table's refcount, the table, then the L1 entry, each behind a
 * barrier; a shared L2 table loses the active image's reference only once the L1 entry that moved
 * to the copy is on disk (pendingFrees).
 */
import { L1_HI_RESERVED, L1_LO_RESERVED } from './constants.js';
import { entryHi, entryLo, entryOffset, headerFields, isCopied, setEntry } from './entries.js';
import { allocClusters, freeClusters } from './refcount.js';
import { flushMetadata } from './writeback.js';
import type { Qcow2State } from './state.js';
import type { Table } from './table-cache.js';

/**
 * The L1 index and L2 index of a guest offset.
 * @locking io
 */
export function splitGuestOffset(s: Qcow2State, guestOffset: number): { l1Index: number; l2Index: number } {
  const cluster = Math.floor(guestOffset / s.clusterSize);
  const l1Index = Math.floor(cluster / s.l2Entries);
  return { l1Index, l2Index: cluster - l1Index * s.l2Entries };
}

/**
 * The L2 table offset held in L1 entry `i` (0: not allocated), checking alignment.
 * @locking io
 */
export function l2Offset(s: Qcow2State, l1Index: number): number {
  if (l1Index >= s.l1Size) return 0;
  const hi = entryHi(s.l1View, l1Index);
  const lo = entryLo(s.l1View, l1Index);
  const off = entryOffset(hi, lo);
  if (off % s.clusterSize !== 0) throw s.corrupt(`L2 table offset ${off} unaligned (L1 index: ${l1Index})`, 'l1_table');
  if ((hi & L1_HI_RESERVED) !== 0 || (lo & L1_LO_RESERVED) !== 0) {
    throw s.corrupt(`L1 entry ${l1Index} has reserved bits set`, 'l1_table');
  }
  return off;
}

/**
 * The L2 table for reading the guest cluster at `l1Index`, or null when none is allocated.
 * @locking io
 */
export async function l2ForRead(s: Qcow2State, l1Index: number): Promise<Table | null> {
  const off = l2Offset(s, l1Index);
  if (off === 0) return null;
  return s.l2Cache.peek(off) ?? (await s.l2Cache.get(off));
}

/**
 * The L2 table covering `l1Index`, ready to be changed in place: allocated when missing, copied
 * when shared with a snapshot. The L1 table is grown first when too small.
 * @locking io
 */
export async function l2ForWrite(s: Qcow2State, l1Index: number): Promise<Table> {
  if (l1Index >= s.l1Size) await growL1(s, l1Index + 1);
  const off = l2Offset(s, l1Index);
  if (off !== 0 && isCopied(entryHi(s.l1View, l1Index))) return s.l2Cache.peek(off) ?? (await s.l2Cache.get(off));
  const newOff = await allocClusters(s, 1);
  let bytes: Uint8Array;
  if (off === 0) bytes = new Uint8Array(s.clusterSize);
  else {
    // a shared table: copy it; its entries keep COPIED clear, so their clusters are copied on write
    const old = s.l2Cache.peek(off) ?? (await s.l2Cache.get(off));
    bytes = old.bytes.slice();
  }
  const t = s.l2Cache.insert(newOff, bytes);
  s.l2Cache.markDirty(newOff, 0, s.clusterSize);
  setEntry(s.l1View, l1Index, newOff, true);
  s.markL1Dirty(l1Index);
  if (off !== 0) s.pendingFrees.push([off, s.clusterSize]);
  return t;
}

/**
 * Grows the active L1 table to at least `minEntries` entries: every metadata change is flushed
 * first (the new table's refcount, and every L2 table the L1 points at), then the new table is
 * written and flushed before the header points at it; the old one is freed once that switch is
 * on disk.
 * @locking io
 */
export async function growL1(s: Qcow2State, minEntries: number): Promise<void> {
  if (minEntries <= s.l1Size) return;
  const clusters = Math.ceil((minEntries * 8) / s.clusterSize);
  const newOff = await allocClusters(s, clusters);
  try {
    await flushMetadata(s);
    const bytes = new Uint8Array(minEntries * 8);
    bytes.set(s.l1);
    await s.writeMeta(newOff, bytes, 'L1 table');
    await s.flushFile('new L1 table');
    await s.commitHeader(36, headerFields([[4, minEntries], [8, newOff]]), 'header (L1 table pointer)');
    const oldOff = s.header.l1TableOffset;
    const oldClusters = Math.ceil((s.l1Size * 8) / s.clusterSize);
    s.header.l1TableOffset = newOff;
    s.header.l1Size = minEntries;
    s.setL1(bytes);
    s.l1DirtyLo = Infinity; // the new table holds every entry
    s.l1DirtyHi = 0;
    if (oldOff !== 0 && oldClusters > 0) s.pendingFrees.push([oldOff, oldClusters * s.clusterSize]);
  } catch (e) {
    // the header does not point at the new clusters (commitHeader read it back): give them back
    if (s.header.l1TableOffset !== newOff && s.broken === null) await freeClusters(s, newOff, clusters * s.clusterSize).catch(() => undefined);
    throw e;
  }
}

/**
 * Metadata overlap checks (QEMU's qcow2_check_metadata_overlap, "constant" + refcount blocks):
 * the host ranges that hold the header, the active L1 table, the refcount table and its blocks,
 * the snapshot table and the snapshots' L1 tables. At open they must not overlap each other; a
 * guest data write must never land on one of them, whatever a damaged L2 entry says.
 *
 * I/O code: the ranges are rebuilt lazily after any change that moves a table.
 */
import { entryHi, entryLo, entryOffset } from './entries.js';
import { snapshotTableBytesOnDisk } from './snapshot-extent.js';
import { snapshotTableSize } from './snapshot-table.js';
import type { Qcow2State } from './state.js';

/** One metadata area: [start, end) in host bytes, and what it is. */
export interface MetaRange {
  start: number;
  end: number;
  what: string;
}

/** The ranges, and what they were computed from (compared field by field: no key to build per write). */
interface CachedRanges {
  l1TableOffset: number;
  l1Size: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  refblockGeneration: number;
  snapshots: readonly unknown[];
  ranges: MetaRange[];
}

const cache = new WeakMap<Qcow2State, CachedRanges>();

function roundUp(n: number, c: number): number {
  return Math.ceil(n / c) * c;
}

/**
 * Every metadata range of the image, sorted by start.
 * @locking io
 */
export function metadataRanges(s: Qcow2State): MetaRange[] {
  const h = s.header;
  const hit = cache.get(s);
  // the snapshot list is replaced (never changed in place) whenever the table is rewritten, so
  // its identity also stands for the snapshot table's offset and size
  if (
    hit !== undefined &&
    hit.snapshots === s.snapshots &&
    hit.l1TableOffset === h.l1TableOffset &&
    hit.l1Size === h.l1Size &&
    hit.refcountTableOffset === h.refcountTableOffset &&
    hit.refcountTableClusters === h.refcountTableClusters &&
    hit.refblockGeneration === s.refblockGeneration
  ) {
    return hit.ranges;
  }
  const C = s.clusterSize;
  const ranges: MetaRange[] = [{ start: 0, end: C, what: 'header' }];
  if (h.l1Size > 0) ranges.push({ start: h.l1TableOffset, end: h.l1TableOffset + roundUp(h.l1Size * 8, C), what: 'active L1 table' });
  ranges.push({ start: h.refcountTableOffset, end: h.refcountTableOffset + h.refcountTableClusters * C, what: 'refcount table' });
  for (let b = 0; b < s.reftable.length / 8; b++) {
    const off = entryOffset(entryHi(s.reftableView, b), entryLo(s.reftableView, b));
    if (off !== 0) ranges.push({ start: off, end: off + C, what: `refcount block ${b}` });
  }
  if (h.nbSnapshots > 0) ranges.push({ start: h.snapshotsOffset, end: h.snapshotsOffset + roundUp(snapshotTableBytesOnDisk(s, () => snapshotTableSize(s.snapshots)), C), what: 'snapshot table' });
  for (const sn of s.snapshots) {
    if (sn.l1Size > 0) ranges.push({ start: sn.l1TableOffset, end: sn.l1TableOffset + roundUp(sn.l1Size * 8, C), what: `L1 table of snapshot '${sn.name}'` });
  }
  ranges.sort((a, b) => a.start - b.start);
  cache.set(s, {
    l1TableOffset: h.l1TableOffset,
    l1Size: h.l1Size,
    refcountTableOffset: h.refcountTableOffset,
    refcountTableClusters: h.refcountTableClusters,
    refblockGeneration: s.refblockGeneration,
    snapshots: s.snapshots,
    ranges,
  });
  return ranges;
}

/**
 * The metadata range that [offset, offset + bytes) touches, or null.
 * @locking io
 */
export function overlappingMetadata(s: Qcow2State, offset: number, bytes: number): MetaRange | null {
  const ranges = metadataRanges(s);
  let lo = 0;
  let hi = ranges.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if ((ranges[mid] as MetaRange).end <= offset) lo = mid + 1;
    else hi = mid;
  }
  for (let i = lo; i < ranges.length; i++) {
    const r = ranges[i] as MetaRange;
    if (r.start >= offset + bytes) break;
    if (r.end > offset) return r;
  }
  return null;
}

/**
 * Refuses an image whose metadata areas overlap one another (found at open, before any write);
 * snapshots may share their L1 table with nothing but themselves.
 * @locking io
 */
export function checkNoMetadataOverlap(s: Qcow2State): void {
  const ranges = metadataRanges(s);
  let prev: MetaRange | null = null;
  for (const r of ranges) {
    if (prev !== null && r.start < prev.end) {
      throw s.corrupt(`the ${r.what} (offset ${r.start}) overlaps the ${prev.what} (offset ${prev.start})`, 'metadata_overlap');
    }
    if (prev === null || r.end > prev.end) prev = r;
  }
}

/**
 * Throws (EIO, image corrupt) when a guest data write would land on metadata.
 * @locking io
 */
export function refuseDataOnMetadata(s: Qcow2State, host: number, bytes: number, guest: number): void {
  const r = overlappingMetadata(s, host, bytes);
  if (r !== null) {
    throw s.corrupt(`the L2 entry for guest offset ${guest} points into the ${r.what} (host offset ${host}); refusing to write there`, 'l2_table');
  }
}

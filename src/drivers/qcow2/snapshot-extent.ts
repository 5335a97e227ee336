/**
 * How many bytes of the file the snapshot table in memory takes on disk. A table read from an
 * image may take more (or fewer) bytes than the same entries written again: an older writer's 16
 * bytes of extra data, extra data a check cut to 1024 bytes, an id or a name cut at a NUL byte.
 * Freeing the old table must free what it took, as QEMU frees s->snapshots_size: never a cluster
 * past it (that may be someone else's), never fewer (they would leak).
 *
 * Common code: a record per state, kept beside it, tied to the entries array and the header's
 * pointer it was taken for, so that it goes stale by itself when the table is written again.
 */
import type { Qcow2State } from './state.js';
import type { SnapshotEntry } from './types.js';

const extents = new WeakMap<Qcow2State, { entries: SnapshotEntry[]; offset: number; bytes: number }>();

/**
 * Records that the table now in `s.snapshots`, at the header's pointer, took `bytes` bytes on disk.
 * @locking common
 */
export function recordSnapshotTableExtent(s: Qcow2State, bytes: number): void {
  extents.set(s, { entries: s.snapshots, offset: s.header.snapshotsOffset, bytes });
}

/**
 * The bytes the table in `s.snapshots` takes on disk: the extent recorded when it was read, else
 * (a table this process wrote) `serialized()`, the length its entries serialize to.
 * @locking common
 */
export function snapshotTableBytesOnDisk(s: Qcow2State, serialized: () => number): number {
  const e = extents.get(s);
  if (e !== undefined && e.entries === s.snapshots && e.offset === s.header.snapshotsOffset) return e.bytes;
  return serialized();
}

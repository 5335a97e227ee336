/**
 * Snapshot IDs and lookups shared by the protocol drivers that keep snapshots of their own (`file`
 * and `memory`), with qcow2's rules: a new ID is one more than the largest numeric ID; names may
 * repeat; goto looks up by ID first, then by name; delete and load-temporary match an (id, name)
 * pair where a null member is not compared.
 *
 * Common code: pure functions over a list, no lock, no I/O.
 */
import type { SnapshotInfo } from '../block/driver.js';

/** What a lookup needs of a snapshot. */
export interface NamedSnapshot {
  readonly id: string;
  readonly name: string;
}

/**
 * The ID for a new snapshot: the largest numeric ID plus one (non-numeric IDs count as 0).
 * @locking common
 */
export function nextSnapshotId(list: readonly NamedSnapshot[]): string {
  let max = 0;
  for (const sn of list) {
    const v = /^\d+$/.test(sn.id) ? Number(sn.id) : 0;
    if (v > max) max = v;
  }
  return String(max + 1);
}

/**
 * The snapshot with this ID, else the first with this name (goto's lookup).
 * @locking common
 */
export function findByIdOrName<T extends NamedSnapshot>(list: readonly T[], idOrName: string): T | undefined {
  return list.find((sn) => sn.id === idOrName) ?? list.find((sn) => sn.name === idOrName);
}

/**
 * The first snapshot whose ID and name match; a null member is not compared (delete's lookup).
 * @locking common
 */
export function findByIdAndName<T extends NamedSnapshot>(list: readonly T[], id: string | null, name: string | null): T | undefined {
  return list.find((sn) => (id === null || sn.id === id) && (name === null || sn.name === name));
}

/**
 * Load-temporary's lookup, as qcow2's: (id, name) first; an ID alone may also name a snapshot.
 * @locking common
 */
export function findForLoadTmp<T extends NamedSnapshot>(list: readonly T[], id: string | null, name: string | null): T | undefined {
  return findByIdAndName(list, id, name) ?? (id !== null && name === null ? findByIdOrName(list, id) : undefined);
}

/**
 * The block layer's view of a driver's snapshot entry: the SnapshotInfo fields, nothing else.
 * @locking common
 */
export function toSnapshotInfo(e: SnapshotInfo): SnapshotInfo {
  return { id: e.id, name: e.name, vmStateSize: e.vmStateSize, dateSec: e.dateSec, dateNsec: e.dateNsec, vmClockNsec: e.vmClockNsec, icount: e.icount };
}

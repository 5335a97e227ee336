/**
 * savevm, loadvm and delvm on a machine: VM state and every disk's snapshot as one unit, QEMU's
 * flow (migration/savevm.c) made safer:
 * - savevm is all or nothing, and an older snapshot of the same tag is deleted only once the new
 *   one exists on every disk (QEMU deletes it first and may lose both);
 * - loadvm keeps a temporary snapshot of the current state on every disk until all disks are
 *   reverted and the VM state is loaded, and puts the disks back when a step fails (QEMU leaves
 *   them half reverted);
 * - delvm reports every disk where deleting failed.
 *
 * Global-state code: each call takes `Bql`, stops the vCPUs where QEMU does, and drains all disks
 * itself before calling the group operations (which require the drain-all proof).
 */
import { type Bql } from '../block/bql.js';
import { withDrainedAll } from '../block/drain.js';
import type { SnapshotInfo } from '../block/driver.js';
import { BlockError, isBlockError } from '../block/errors.js';
import { bdrvLoadVmstate, bdrvSaveVmstate } from '../block/io.js';
import { bdrvCanSnapshot, bdrvSnapshotList } from '../block/snapshot.js';
import {
  bdrvAllCanSnapshot,
  bdrvAllCreateSnapshot,
  bdrvAllDeleteSnapshot,
  bdrvAllFindSnapshots,
  bdrvAllFindVmstateDisk,
  bdrvAllGotoSnapshot,
  type GroupDisk,
} from '../block/snapshot-group.js';
import type { Machine } from './machine.js';

/** What savevm did. */
export interface SavevmResult {
  name: string;
  vmStateSize: number;
  vmstateDisk: string;
  /** Older snapshots of the same tag that were replaced, by disk. */
  replaced: number;
  /** Disks where an older snapshot of the tag could not be deleted (the new one exists). */
  warnings: string[];
}

function two(n: number): string {
  return String(n).padStart(2, '0');
}

/**
 * QEMU's default tag: `vm-YYYYMMDDhhmmss` in local time.
 * @locking common
 */
export function defaultSnapshotTag(d: Date): string {
  return `vm-${d.getFullYear()}${two(d.getMonth() + 1)}${two(d.getDate())}${two(d.getHours())}${two(d.getMinutes())}${two(d.getSeconds())}`;
}

function groupDisks(m: Machine): GroupDisk[] {
  return m.disks.map((d) => ({ name: d.id, node: d.node, readOnly: d.readOnly }));
}

function message(e: unknown): string {
  return isBlockError(e) || e instanceof Error ? e.message : String(e);
}

/**
 * Saves the VM state and snapshots every writable disk under `tag` (default vm-<date>).
 * @locking global-state
 */
export async function saveVm(bql: Bql, m: Machine, tag?: string, opts: { vmstate?: string } = {}): Promise<SavevmResult> {
  const name = tag ?? defaultSnapshotTag(new Date());
  if (name === '') throw new BlockError('EINVAL', 'savevm: the tag must not be empty', { field: 'tag' });
  const disks = groupDisks(m);
  bdrvAllCanSnapshot(bql, disks);
  const vmDisk = bdrvAllFindVmstateDisk(bql, disks, opts.vmstate);
  const wasRunning = m.runState === 'running';
  await m.stop(bql);
  try {
    return await withDrainedAll(bql, async (drained) => {
      const older = await bdrvAllFindSnapshots(bql, disks, name);
      const state = m.saveState(bql);
      await bdrvSaveVmstate(vmDisk.node, state, 0);
      const now = Date.now();
      const info: SnapshotInfo = {
        id: '',
        name,
        vmStateSize: state.length,
        dateSec: Math.floor(now / 1000),
        dateNsec: (now % 1000) * 1e6,
        vmClockNsec: Math.round(m.vmClockNsec),
        icount: -1,
      };
      await bdrvAllCreateSnapshot(bql, drained, disks, info, vmDisk);
      // the new snapshot exists on every disk: only now do older ones of the same tag go
      const failures = await bdrvAllDeleteSnapshot(bql, drained, disks, name, older);
      let replaced = 0;
      for (const l of older.values()) replaced += l.length;
      return { name, vmStateSize: state.length, vmstateDisk: vmDisk.name, replaced, warnings: failures.map((f) => f.message) };
    });
  } finally {
    if (wasRunning) m.cont(bql);
  }
}

/**
 * Reverts every writable disk to the snapshot `tag` and loads its VM state; on a failure the
 * disks are put back as they were and the machine keeps its state (and keeps running if it was).
 * @locking global-state
 */
export async function loadVm(bql: Bql, m: Machine, tag: string): Promise<void> {
  const disks = groupDisks(m);
  bdrvAllCanSnapshot(bql, disks);
  const found = await bdrvAllFindSnapshots(bql, disks, tag);
  const missing = [...found].filter(([, l]) => l.length === 0).map(([d]) => d);
  if (missing.length > 0) {
    throw new BlockError('ENOENT', `Snapshot '${tag}' does not exist in one or more devices (${missing.join(', ')})`, { value: tag });
  }
  const vmDisk = bdrvAllFindVmstateDisk(bql, disks);
  const sn = found.get(vmDisk.name)?.[0];
  if (sn === undefined) throw new BlockError('ENOENT', 'Snapshot can not be found', { node: vmDisk.name, value: tag });
  if (sn.vmStateSize === 0) throw new BlockError('EINVAL', 'This is a disk-only snapshot. Revert to it  offline using qemu-img', { node: vmDisk.name, value: tag });
  const ids = new Map<string, string>();
  for (const [disk, list] of found) {
    const first = list[0];
    if (first !== undefined) ids.set(disk, first.id);
  }
  const wasRunning = m.runState === 'running';
  await m.stop(bql);
  try {
    await withDrainedAll(bql, async (drained) => {
      // the current state of every disk, kept until everything has succeeded
      const undoName = `snapstack-loadvm-undo-${process.pid}-${Date.now()}`;
      const now = Date.now();
      let undo: Awaited<ReturnType<typeof bdrvAllCreateSnapshot>>;
      try {
        undo = await bdrvAllCreateSnapshot(
          bql,
          drained,
          disks,
          { id: '', name: undoName, vmStateSize: 0, dateSec: Math.floor(now / 1000), dateNsec: 0, vmClockNsec: 0, icount: -1 },
          null,
        );
      } catch (e) {
        throw new BlockError(isBlockError(e) ? e.code : 'EIO', `loadvm '${tag}': could not keep the current state, no disk was changed: ${message(e)}`, { cause: e });
      }
      const undoIds = new Map(undo.map((u) => [u.disk, u.snapshot.id]));
      const putBack = async (names: string[]): Promise<string> => {
        const back = await bdrvAllGotoSnapshot(
          bql,
          drained,
          disks.filter((d) => names.includes(d.name)),
          undoName,
          undoIds,
        );
        if (back.failed !== null) return `; putting '${back.failed.disk}' back failed too: ${back.failed.error.message}`;
        return `; every disk was put back as it was (${names.join(', ')})`;
      };
      try {
        const r = await bdrvAllGotoSnapshot(bql, drained, disks, tag, ids);
        if (r.failed !== null) {
          // the failing disk may have switched before its error: it goes back too
          const tail = await putBack([...r.reverted, r.failed.disk]);
          throw new BlockError(r.failed.error.code, `${r.failed.error.message}${tail}`, { node: r.failed.disk, cause: r.failed.error });
        }
        try {
          const buf = new Uint8Array(sn.vmStateSize);
          await bdrvLoadVmstate(vmDisk.node, buf, 0);
          m.loadState(bql, buf);
        } catch (e) {
          const tail = await putBack(r.reverted);
          throw new BlockError(isBlockError(e) ? e.code : 'EIO', `Error while loading VM state of '${tag}' from '${vmDisk.name}': ${message(e)}${tail}`, {
            node: vmDisk.name,
            cause: e,
          });
        }
      } finally {
        const byDisk = new Map<string, SnapshotInfo[]>(undo.map((u) => [u.disk, [u.snapshot]]));
        await bdrvAllDeleteSnapshot(bql, drained, disks, undoName, byDisk);
      }
    });
  } finally {
    if (wasRunning) m.cont(bql);
  }
}

/**
 * Deletes the snapshot `tag` on every writable disk that has it (the first of that name on each);
 * returns the failures, each naming its disk. The VM keeps running (as in QEMU).
 * @locking global-state
 */
export async function delVm(bql: Bql, m: Machine, tag: string): Promise<string[]> {
  const disks = groupDisks(m);
  bdrvAllCanSnapshot(bql, disks);
  const failures = await withDrainedAll(bql, (drained) => bdrvAllDeleteSnapshot(bql, drained, disks, tag));
  return failures.map((f) => f.message);
}

/** One row of `info snapshots`: the snapshot, and the ID to show (`--` for whole-VM ones). */
export interface SnapshotRow {
  id: string;
  info: SnapshotInfo;
}

/** What `info snapshots` shows: the VM snapshots, and per disk the partial ones. */
export interface SnapshotReport {
  /** Snapshots of the VM-state disk whose name exists on every disk. */
  complete: SnapshotInfo[];
  /** Per disk, its snapshots whose name is missing somewhere. */
  partial: Array<{ disk: string; snapshots: SnapshotInfo[] }>;
}

/**
 * The data of `info snapshots` (QEMU's algorithm): throws "no block device can store vmstate for
 * snapshot" when no disk could.
 * @locking global-state
 */
export async function listVmSnapshots(bql: Bql, m: Machine): Promise<SnapshotReport> {
  const disks = groupDisks(m);
  const vmDisk = bdrvAllFindVmstateDisk(bql, disks);
  const lists = new Map<string, SnapshotInfo[]>();
  for (const d of disks) if (!d.readOnly && bdrvCanSnapshot(bql, d.node)) lists.set(d.name, await bdrvSnapshotList(bql, d.node));
  const everywhere = (name: string): boolean => [...lists.values()].every((l) => l.some((s) => s.name === name));
  const complete = (lists.get(vmDisk.name) ?? []).filter((s) => everywhere(s.name));
  const partial: SnapshotReport['partial'] = [];
  for (const [disk, l] of lists) {
    const left = l.filter((s) => !everywhere(s.name));
    if (left.length > 0) partial.push({ disk, snapshots: left });
  }
  return { complete, partial };
}

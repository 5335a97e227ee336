/**
 * Group snapshot operations: the same snapshot call on a set of disks (all of a machine's, or a
 * chosen list), as QEMU's bdrv_all_* helpers. Every one of them takes `Bql` and a drain-all
 * proof or a set proof whose sections cover every disk (checked per disk): none drains by itself and none can be called undrained (QEMU moved the drain out of
 * bdrv_all_delete_snapshot in 2024 for exactly this reason). Failures name the disk.
 *
 * Global-state code.
 */
import { assertBql, type Bql } from './bql.js';
import { assertDrained, type GroupDrained } from './drain.js';
import type { SnapshotInfo } from './driver.js';
import { BlockError, isBlockError } from './errors.js';
import { bdrvCanStoreVmstate } from './io.js';
import type { BlockNode } from './node.js';
import { bdrvCanSnapshot, bdrvSnapshotCreate, bdrvSnapshotDelete, bdrvSnapshotGoto, bdrvSnapshotList } from './snapshot.js';

/** A disk taking part in a group operation: its device name and root node. */
export interface GroupDisk {
  name: string;
  node: BlockNode;
  readOnly: boolean;
}

/** What a group operation did on one disk. */
export interface GroupResult {
  disk: string;
  snapshot: SnapshotInfo;
}

function why(e: unknown): string {
  return isBlockError(e) || e instanceof Error ? e.message : String(e);
}

function rewrap(e: unknown, message: string, disk: GroupDisk): BlockError {
  const code = isBlockError(e) ? e.code : 'EIO';
  return new BlockError(code, `${message}: ${why(e)}`, { node: disk.name, cause: e });
}

/**
 * Throws when a writable disk cannot hold snapshots ("Device '%s' is writable but does not
 * support snapshots"); read-only disks do not take part.
 * @locking global-state
 */
export function bdrvAllCanSnapshot(bql: Bql, disks: GroupDisk[]): void {
  assertBql(bql, 'bdrvAllCanSnapshot');
  for (const d of disks) {
    if (d.readOnly) continue;
    if (!bdrvCanSnapshot(bql, d.node)) {
      throw new BlockError('ENOTSUP', `Device '${d.name}' is writable but does not support snapshots`, { node: d.name, op: 'snapshot' });
    }
  }
}

/**
 * The disk that stores the VM state: the one named, else the first writable disk that can
 * snapshot and hold VM state (QEMU's choice); throws with QEMU's messages when there is none.
 * @locking global-state
 */
export function bdrvAllFindVmstateDisk(bql: Bql, disks: GroupDisk[], name?: string): GroupDisk {
  assertBql(bql, 'bdrvAllFindVmstateDisk');
  if (name !== undefined) {
    const d = disks.find((x) => x.name === name);
    if (d === undefined) throw new BlockError('ENOENT', `vmstate block device '${name}' does not exist`, { node: name });
    if (d.readOnly || !bdrvCanSnapshot(bql, d.node) || !bdrvCanStoreVmstate(d.node)) {
      throw new BlockError('ENOTSUP', `vmstate block device '${name}' does not support snapshots`, { node: name });
    }
    return d;
  }
  const d = disks.find((x) => !x.readOnly && bdrvCanSnapshot(bql, x.node) && bdrvCanStoreVmstate(x.node));
  if (d === undefined) throw new BlockError('ENOTSUP', 'no block device can store vmstate for snapshot', { op: 'savevm' });
  return d;
}

/**
 * Every snapshot named `name` on each writable disk (in table order), by disk name.
 * @locking global-state
 */
export async function bdrvAllFindSnapshots(bql: Bql, disks: GroupDisk[], name: string): Promise<Map<string, SnapshotInfo[]>> {
  assertBql(bql, 'bdrvAllFindSnapshots');
  const found = new Map<string, SnapshotInfo[]>();
  for (const d of disks) {
    if (d.readOnly) continue;
    let list: SnapshotInfo[];
    try {
      list = await bdrvSnapshotList(bql, d.node);
    } catch (e) {
      throw rewrap(e, `Could not check snapshot '${name}' on '${d.name}'`, d);
    }
    found.set(
      d.name,
      list.filter((s) => s.name === name),
    );
  }
  return found;
}

/** A snapshot a failed group create made and could not remove again. */
export interface GroupLeftover {
  disk: string;
  snapshot: SnapshotInfo;
  /** Why removing it failed. */
  error: BlockError;
}

/**
 * The error of a group create that failed on one disk: `leftovers` lists the snapshots this call
 * created on other disks and could not delete again (empty when the undo was complete), so that
 * no undo failure is swallowed; the message names each of them.
 */
export class GroupCreateError extends BlockError {
  constructor(
    cause: BlockError,
    readonly failedDisk: string,
    readonly leftovers: GroupLeftover[],
  ) {
    const tail =
      leftovers.length === 0
        ? ''
        : `; removing it again failed on ${leftovers.map((l) => `'${l.disk}' (ID ${l.snapshot.id}: ${l.error.message})`).join(', ')}, so it is still there`;
    super(cause.code, `${cause.message}${tail}`, { node: failedDisk, op: 'snapshot-create', cause });
  }
}

/**
 * Creates the snapshot `info` on every writable disk; the VM-state disk records `vmStateSize`,
 * the others 0. All or nothing: when one disk fails, the snapshots already created by this call
 * are deleted again (by ID, newest first) and a `GroupCreateError` names the disk and every
 * snapshot that could not be deleted again.
 * @locking global-state
 */
export async function bdrvAllCreateSnapshot(bql: Bql, drained: GroupDrained, disks: GroupDisk[], info: SnapshotInfo, vmstateDisk: GroupDisk | null): Promise<GroupResult[]> {
  assertBql(bql, 'bdrvAllCreateSnapshot');
  const done: Array<{ disk: GroupDisk; snapshot: SnapshotInfo }> = [];
  for (const d of disks) {
    if (d.readOnly) continue;
    assertDrained(bql, drained, d.node, 'bdrvAllCreateSnapshot');
    try {
      const sn = await bdrvSnapshotCreate(bql, drained, d.node, { ...info, vmStateSize: d === vmstateDisk ? info.vmStateSize : 0 });
      done.push({ disk: d, snapshot: sn });
    } catch (e) {
      const failure = rewrap(e, `Could not create snapshot '${info.name}' on '${d.name}'`, d);
      // the failing disk may have made its snapshot before reporting the error: it is undone too
      const undo = [...done.reverse()];
      const mine = await madeBy(bql, d.node, info);
      if (mine !== undefined) undo.push({ disk: d, snapshot: mine });
      const leftovers: GroupLeftover[] = [];
      for (const u of undo) {
        try {
          await bdrvSnapshotDelete(bql, drained, u.disk.node, u.snapshot.id, u.snapshot.name);
        } catch (de) {
          leftovers.push({ disk: u.disk.name, snapshot: u.snapshot, error: rewrap(de, `Could not delete snapshot '${u.snapshot.name}' on '${u.disk.name}'`, u.disk) });
        }
      }
      throw new GroupCreateError(failure, d.name, leftovers);
    }
  }
  return done.map((x) => ({ disk: x.disk.name, snapshot: x.snapshot }));
}

/** The snapshot with `info`'s name and identity on `node`, if a failed create made it anyway. */
async function madeBy(bql: Bql, node: BlockNode, info: SnapshotInfo): Promise<SnapshotInfo | undefined> {
  try {
    return (await bdrvSnapshotList(bql, node)).find((s) => s.name === info.name && sameSavevm(s, info));
  } catch {
    return undefined;
  }
}

/**
 * True when two disks' snapshots come from one savevm: every disk's entry of one savevm carries
 * the same date (seconds and nanoseconds) and VM clock, as QEMU's do (one QEMUSnapshotInfo is
 * written to every disk), and these fields are what qemu-img 7.2 reads and shows.
 * @locking common
 */
export function sameSavevm(a: SnapshotInfo, b: SnapshotInfo): boolean {
  return a.dateSec === b.dateSec && a.dateNsec === b.dateNsec && a.vmClockNsec === b.vmClockNsec;
}

/** How a tag resolved over the disks: the one snapshot of one savevm on each disk. */
export interface ResolvedTag {
  byDisk: Map<string, SnapshotInfo>;
  /** Snapshots of the same name that belong to another savevm (partial leftovers), by disk. */
  others: Map<string, SnapshotInfo[]>;
}

/**
 * Finds the savevm a tag names: on every writable disk exactly one snapshot with that name and
 * the same identity (`sameSavevm`). ENOENT with QEMU's message when a disk lacks the name;
 * EINVAL naming every disk's candidates when no single savevm is present everywhere (the tag is
 * ambiguous or its snapshots come from different savevms): a tag is never guessed.
 * @locking global-state
 */
export async function bdrvAllResolveSnapshot(bql: Bql, disks: GroupDisk[], name: string): Promise<ResolvedTag> {
  assertBql(bql, 'bdrvAllResolveSnapshot');
  const found = await bdrvAllFindSnapshots(bql, disks, name);
  const missing = [...found].filter(([, l]) => l.length === 0).map(([d]) => d);
  if (missing.length > 0) {
    throw new BlockError('ENOENT', `Snapshot '${name}' does not exist in one or more devices (${missing.join(', ')})`, { value: name, op: 'snapshot-find' });
  }
  const lists = [...found.values()];
  const first = lists[0] ?? [];
  const complete = first.filter((c) => lists.every((l) => l.filter((s) => sameSavevm(s, c)).length === 1));
  if (complete.length !== 1) {
    const seen = [...found].map(([d, l]) => `'${d}' has ${l.map((s) => `ID ${s.id} (${identityText(s)})`).join(', ')}`).join('; ');
    const why = complete.length === 0 ? 'no single savevm made it on every disk' : `${complete.length} savevms made it on every disk`;
    throw new BlockError('EINVAL', `Snapshot '${name}' is ambiguous: ${why} (${seen}); refusing to guess. Delete it with 'delvm ${name}' or rename the extra ones with qemu-img`, {
      value: name,
      op: 'snapshot-find',
    });
  }
  const chosen = complete[0] as SnapshotInfo;
  const byDisk = new Map<string, SnapshotInfo>();
  const others = new Map<string, SnapshotInfo[]>();
  for (const [d, l] of found) {
    const mine = l.find((s) => sameSavevm(s, chosen));
    if (mine !== undefined) byDisk.set(d, mine);
    const rest = l.filter((s) => !sameSavevm(s, chosen));
    if (rest.length > 0) others.set(d, rest);
  }
  return { byDisk, others };
}

/**
 * The identity of a snapshot as text (date in seconds.nanoseconds, VM clock), for messages.
 * @locking common
 */
export function identityText(s: SnapshotInfo): string {
  return `date ${s.dateSec}.${String(s.dateNsec).padStart(9, '0')}, vm clock ${s.vmClockNsec} ns`;
}

/**
 * Reverts every writable disk to the snapshot with the ID given for it (`ids` by disk name, or
 * the first snapshot named `name`). Stops at the first failure and reports which disks were
 * already reverted (QEMU does not roll back; the caller decides).
 * @locking global-state
 */
export async function bdrvAllGotoSnapshot(
  bql: Bql,
  drained: GroupDrained,
  disks: GroupDisk[],
  name: string,
  ids?: Map<string, string>,
): Promise<{ reverted: string[]; failed: { disk: string; error: BlockError } | null }> {
  assertBql(bql, 'bdrvAllGotoSnapshot');
  const reverted: string[] = [];
  for (const d of disks) {
    if (d.readOnly) continue;
    assertDrained(bql, drained, d.node, 'bdrvAllGotoSnapshot');
    try {
      const id = ids?.get(d.name);
      if (id !== undefined) await bdrvSnapshotGoto(bql, drained, d.node, id);
      else {
        const list = await bdrvSnapshotList(bql, d.node);
        const sn = list.find((s) => s.name === name);
        if (sn === undefined) throw new BlockError('ENOENT', `Snapshot '${name}' does not exist`, { node: d.name });
        await bdrvSnapshotGoto(bql, drained, d.node, sn.id);
      }
      reverted.push(d.name);
    } catch (e) {
      return { reverted, failed: { disk: d.name, error: rewrap(e, `Could not load snapshot '${name}' on '${d.name}'`, d) } };
    }
  }
  return { reverted, failed: null };
}

/**
 * Deletes, on every writable disk, the snapshots listed for it in `which` (by ID), or the first
 * one named `name` when `which` is absent; disks without it are skipped. Goes on after a failure
 * and returns every failure, naming the disk.
 * @locking global-state
 */
export async function bdrvAllDeleteSnapshot(bql: Bql, drained: GroupDrained, disks: GroupDisk[], name: string, which?: Map<string, SnapshotInfo[]>): Promise<BlockError[]> {
  assertBql(bql, 'bdrvAllDeleteSnapshot');
  const failures: BlockError[] = [];
  for (const d of disks) {
    if (d.readOnly) continue;
    assertDrained(bql, drained, d.node, 'bdrvAllDeleteSnapshot');
    try {
      let targets = which?.get(d.name);
      if (targets === undefined) {
        const first = (await bdrvSnapshotList(bql, d.node)).find((s) => s.name === name);
        targets = first === undefined ? [] : [first];
      }
      for (const sn of targets) await bdrvSnapshotDelete(bql, drained, d.node, sn.id, sn.name);
    } catch (e) {
      failures.push(rewrap(e, `Could not delete snapshot '${name}' on '${d.name}'`, d));
    }
  }
  return failures;
}

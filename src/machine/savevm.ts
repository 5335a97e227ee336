/**
 * savevm, loadvm and delvm on a machine: VM state and every disk's snapshot as one unit, QEMU's
 * flow (migration/savevm.c) made all or nothing under any number of faults and crashes:
 * - savevm creates the new snapshot on every disk (removed again from all if one disk fails) and
 *   only then deletes older snapshots of the same tag (QEMU deletes them first and may lose both);
 *   every disk's entry of one savevm carries the same identity (date and VM clock, as QEMU's do),
 *   distinct from every other snapshot of that tag, so that loadvm never mixes two savevms;
 * - loadvm keeps an undo snapshot of the current state on every disk until all disks are
 *   reverted and the VM state is loaded; on a failure it puts back every disk it touched, and
 *   deletes an undo snapshot only on a disk confirmed put back (or once loadvm succeeded);
 * - delvm deletes every snapshot of the tag on every disk; once one is gone the deletion is
 *   finished by the next operation if it could not be finished now.
 * An intent record (vm-intent.ts) is kept while an operation is in progress, so that the next
 * operation, or the next start of the machine after a crash, rolls it back or finishes it.
 * A tag that does not name exactly one savevm on every disk is refused, never guessed.
 *
 * Global-state code: each call takes `Bql`, stops the vCPUs where QEMU does, and drains the
 * machine's disks itself (a drained section on each: I/O to other nodes goes on) before calling
 * the group operations. Every operation holds the snapshot lock (snapshot-lock.ts): saveVm,
 * loadVm and delVm take it beside the caller's BQL (EBUSY while a snapshot job holds it); the
 * *Locked variants run for its holder and take the BQL for their short global-state steps only,
 * moving the VM state in chunks without it (vm-steps.ts).
 */
import { type Bql } from '../block/bql.js';
import { drainedBeginSet, drainedEndSet, runInDrainedSection, withDrainedAll, withDrainedSet, type DrainedSet, type GroupDrained } from '../block/drain.js';
import type { SnapshotInfo } from '../block/driver.js';
import { BlockError, isBlockError, type ErrorCode } from '../block/errors.js';
import { releaseSnapshotLock, trySnapshotLock, type SnapshotLocked } from '../block/snapshot-lock.js';
import { bdrvCanSnapshot, bdrvSnapshotCreate, bdrvSnapshotDelete, bdrvSnapshotGoto, bdrvSnapshotList } from '../block/snapshot.js';
import {
  bdrvAllCanSnapshot,
  bdrvAllCreateSnapshot,
  bdrvAllFindSnapshots,
  bdrvAllFindVmstateDisk,
  bdrvAllResolveSnapshot,
  GroupCreateError,
  sameSavevm,
  type GroupDisk,
} from '../block/snapshot-group.js';
import type { Machine } from './machine.js';
import type { SavevmIdentity, VmIntent } from './vm-intent.js';
import { heldBqlSteps, readVmStateStream, snapshotLockSteps, writeVmStateStream, type VmStepHooks, type VmSteps } from './vm-steps.js';
import { MIN_VMSTATE_BYTES } from './vmstate.js';

/** How often a clean-up or put-back step is tried before it is reported as left to do. */
const ATTEMPTS = 3;
/** Prefix of loadvm's undo snapshots. */
export const UNDO_PREFIX = 'snapstack-loadvm-undo-';
/**
 * The name prefix of the disk-only snapshot that keeps the state a recovery found after a crash
 * before it puts the disks back (another program may have written to them meanwhile).
 */
export const FOUND_PREFIX = 'snapstack-found-';

/** What savevm did. */
export interface SavevmResult {
  name: string;
  vmStateSize: number;
  vmstateDisk: string;
  /** Older snapshots of the same tag that were replaced. */
  replaced: number;
  /** Kept for callers of the earlier API: always empty (a failed clean-up is an error now). */
  warnings: string[];
}

/** What loadvm did. */
export interface LoadvmResult {
  name: string;
  vmstateDisk: string;
  /** Undo snapshots that could not be deleted after success (the next operation deletes them). */
  warnings: string[];
}

/** A snapshot left on a disk by a failed operation. */
export interface LeftSnapshot {
  disk: string;
  id: string;
  name: string;
}

/** Where a disk stands after a failed loadvm. */
export type DiskState = 'unchanged' | 'put back' | 'unknown';

/**
 * The error of a failed savevm / loadvm / delvm, saying exactly what is left: `undoKept` (loadvm's
 * undo snapshots still on disks, each holding that disk's state from before loadvm), `leftovers`
 * (snapshots of a failed savevm or an unfinished delvm still on disks), `disks` (loadvm: each
 * disk's state), `committed` (savevm: the new snapshot exists on every disk) and `pending` (an
 * intent record remains; the next operation or start finishes it).
 */
export class VmSnapshotError extends BlockError {
  constructor(
    code: ErrorCode,
    message: string,
    readonly detail: { undoKept: LeftSnapshot[]; leftovers: LeftSnapshot[]; disks: Map<string, DiskState>; committed: boolean; pending: boolean },
    cause?: unknown,
  ) {
    super(code, message, { op: 'vm-snapshot', cause });
  }
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

function writableOf(disks: GroupDisk[]): GroupDisk[] {
  return disks.filter((d) => !d.readOnly);
}

function groupDisks(m: Machine): GroupDisk[] {
  return m.disks.map((d) => ({ name: d.id, node: d.node, readOnly: d.readOnly }));
}

function writable(m: Machine): GroupDisk[] {
  return groupDisks(m).filter((d) => !d.readOnly);
}

/**
 * The disks an operation works on: all of the machine's, or those `devices` names (disk ids),
 * each once; an unknown name is refused before anything changes.
 */
function chosenDisks(m: Machine, devices: readonly string[] | undefined): GroupDisk[] {
  const all = groupDisks(m);
  if (devices === undefined) return all;
  const out: GroupDisk[] = [];
  for (const name of devices) {
    const d = all.find((x) => x.name === name);
    if (d === undefined) throw new BlockError('ENOENT', `No block device node '${name}'`, { node: name, field: 'devices' });
    if (!out.includes(d)) out.push(d);
  }
  if (out.length === 0) throw new BlockError('EINVAL', 'At least one device is required for snapshot', { field: 'devices' });
  return out;
}

/** What a VM snapshot operation may be told beside its tag. */
export interface VmSnapshotOptions {
  /** The disk (id) that holds the VM state: savevm writes it there, loadvm reads it from there. */
  vmstate?: string;
  /** Only these disks (ids; QMP's `devices`), instead of every disk of the machine. */
  devices?: readonly string[];
  /** savevm: replace the snapshots of the same tag (HMP's savevm, the default) or refuse (QMP's snapshot-save). */
  overwrite?: boolean;
}

function message(e: unknown): string {
  return isBlockError(e) || e instanceof Error ? e.message : String(e);
}

function codeOf(e: unknown): ErrorCode {
  return isBlockError(e) ? e.code : 'EIO';
}

function listText(l: LeftSnapshot[]): string {
  return l.map((x) => `'${x.name}' (ID ${x.id}) on '${x.disk}'`).join(', ');
}

/** Resumes the machine if it was running and may run (not while disks wait to be put back). */
function resume(bql: Bql, m: Machine, wasRunning: boolean): void {
  if (!wasRunning) return;
  try {
    m.cont(bql);
  } catch (e) {
    if (!isBlockError(e, 'EBUSY')) throw e;
  }
}

/** Deletes one snapshot by ID, trying again; a snapshot that is gone counts as deleted. */
async function deleteConfirmed(bql: Bql, drained: GroupDrained, disk: GroupDisk, sn: SnapshotInfo): Promise<BlockError | null> {
  let last: unknown = null;
  for (let i = 0; i < ATTEMPTS; i++) {
    try {
      await bdrvSnapshotDelete(bql, drained, disk.node, sn.id, sn.name);
      return null;
    } catch (e) {
      last = e;
      // the delete may have happened before its error was reported: look
      const still = await bdrvSnapshotList(bql, disk.node).then(
        (l) => l.some((s) => s.id === sn.id && s.name === sn.name),
        () => true,
      );
      if (!still) return null;
    }
  }
  return new BlockError(codeOf(last), `Could not delete snapshot '${sn.name}' (ID ${sn.id}) on '${disk.name}': ${message(last)}`, { node: disk.name, cause: last });
}

/** Deletes on each disk the snapshots `pick` chooses from its list; returns what is left. */
async function deleteWhere(bql: Bql, drained: GroupDrained, disks: GroupDisk[], pick: (s: SnapshotInfo) => boolean): Promise<{ left: LeftSnapshot[]; errors: BlockError[]; deleted: number }> {
  const left: LeftSnapshot[] = [];
  const errors: BlockError[] = [];
  let deleted = 0;
  for (const d of disks) {
    let list: SnapshotInfo[];
    try {
      list = await bdrvSnapshotList(bql, d.node);
    } catch (e) {
      errors.push(new BlockError(codeOf(e), `Could not list the snapshots of '${d.name}': ${message(e)}`, { node: d.name, cause: e }));
      left.push({ disk: d.name, id: '?', name: '?' });
      continue;
    }
    for (const sn of list.filter(pick)) {
      const err = await deleteConfirmed(bql, drained, d, sn);
      if (err === null) deleted++;
      else {
        errors.push(err);
        left.push({ disk: d.name, id: sn.id, name: sn.name });
      }
    }
  }
  return { left, errors, deleted };
}

/** Reverts one disk to a snapshot by ID, trying again. */
async function gotoConfirmed(bql: Bql, drained: GroupDrained, disk: GroupDisk, id: string): Promise<BlockError | null> {
  let last: unknown = null;
  for (let i = 0; i < ATTEMPTS; i++) {
    try {
      await bdrvSnapshotGoto(bql, drained, disk.node, id);
      return null;
    } catch (e) {
      last = e;
    }
  }
  return new BlockError(codeOf(last), message(last), { node: disk.name, cause: last });
}

/** Removes the intent record; a failure to remove it leaves a record whose recovery is a no-op. */
function clearIntent(bql: Bql, m: Machine): string {
  try {
    m.intents(bql).clear();
    return '';
  } catch (e) {
    return `; the intent record could not be removed (${message(e)}), the next operation removes it`;
  }
}

/** Rolls back or finishes one intent record on the drained disks; returns what it did. */
async function recoverIntent(bql: Bql, drained: GroupDrained, m: Machine, rec: VmIntent, afterCrash: boolean): Promise<string> {
  // only the disks the operation ran on: a machine opened with other disks keeps theirs
  const disks = writable(m).filter((d) => rec.disks.includes(d.name) && bdrvCanSnapshot(bql, d.node));
  const tag = rec.tag;
  if (rec.op === 'loadvm') {
    const undo = rec.undoName ?? '';
    if (rec.phase === 'started') {
      // The disks go back to the undo snapshots. Another program may have written to them since
      // the crash (the image locks died with the process), and going back would throw that away:
      // the state found now is kept first, as a snapshot on every disk of the operation (one tag,
      // whole), when any disk goes back.
      const reverting: Array<{ d: GroupDisk; id: string }> = [];
      for (const d of disks) {
        const sn = (await bdrvSnapshotList(bql, d.node)).find((s) => s.name === undo);
        if (sn !== undefined) reverting.push({ d, id: sn.id });
      }
      const keptName = `${FOUND_PREFIX}${undo.slice(UNDO_PREFIX.length)}`;
      const now = Date.now();
      for (const d of reverting.length > 0 && afterCrash ? disks : []) {
        if ((await bdrvSnapshotList(bql, d.node)).some((s) => s.name === keptName)) continue; // kept by an earlier try
        try {
          await bdrvSnapshotCreate(bql, drained, d.node, {
            id: '',
            name: keptName,
            dateSec: Math.floor(now / 1000),
            dateNsec: (now % 1000) * 1e6,
            vmClockNsec: 0,
            vmStateSize: 0,
            icount: -1,
          });
        } catch (e) {
          throw new BlockError(codeOf(e), `could not keep the state of '${d.name}' (snapshot '${keptName}') before putting it back after loadvm '${tag}': ${message(e)}; nothing was changed`, { node: d.name, cause: e });
        }
      }
      const back: string[] = [];
      for (const { d, id } of reverting) {
        const err = await gotoConfirmed(bql, drained, d, id);
        if (err !== null) throw new BlockError(err.code, `could not put '${d.name}' back to '${undo}' (ID ${id}) after loadvm '${tag}': ${err.message}; nothing was deleted`, { node: d.name, cause: err });
        back.push(d.name);
      }
      m.intents(bql).write({ ...rec, phase: 'cleanup' });
      const r = await deleteWhere(bql, drained, disks, (s) => s.name === undo);
      if (r.left.length > 0) throw new BlockError(r.errors[0]?.code ?? 'EIO', `loadvm '${tag}' was rolled back on ${back.join(', ') || 'no disk'}, but undo snapshots remain: ${listText(r.left)}`);
      const kept = reverting.length > 0 && afterCrash ? `; the state found at start-up is kept as snapshot '${keptName}' (delete it with delvm when it is not needed)` : '';
      return `loadvm '${tag}' was interrupted: every disk is back at its state from before it (${back.join(', ') || 'none had changed'})${kept}${clearIntent(bql, m)}`;
    }
    const r = await deleteWhere(bql, drained, disks, (s) => s.name === undo);
    if (r.left.length > 0) throw new BlockError(r.errors[0]?.code ?? 'EIO', `the undo snapshots of loadvm '${tag}' remain: ${listText(r.left)}`);
    return `loadvm '${tag}' had finished; its ${r.deleted} undo snapshot(s) were deleted${clearIntent(bql, m)}`;
  }
  if (rec.op === 'savevm') {
    const id = rec.identity as SavevmIdentity;
    const mine = (s: SnapshotInfo): boolean => s.name === tag && sameSavevm(s, { ...id, id: '', name: tag, vmStateSize: 0, icount: -1 });
    if (rec.phase === 'started') {
      const r = await deleteWhere(bql, drained, disks, mine);
      if (r.left.length > 0) throw new BlockError(r.errors[0]?.code ?? 'EIO', `the partial snapshots of savevm '${tag}' remain: ${listText(r.left)}`);
      return `savevm '${tag}' was interrupted: its partial snapshot was removed (${r.deleted} disk(s)); older snapshots of the tag are kept${clearIntent(bql, m)}`;
    }
    const r = await deleteWhere(bql, drained, disks, (s) => s.name === tag && !mine(s));
    if (r.left.length > 0) throw new BlockError(r.errors[0]?.code ?? 'EIO', `older snapshots of tag '${tag}' remain beside the new one: ${listText(r.left)}`);
    return `savevm '${tag}' had saved every disk; the ${r.deleted} older snapshot(s) of the tag were deleted${clearIntent(bql, m)}`;
  }
  // only the snapshots the interrupted delvm meant: a snapshot of the same name made after the
  // crash (by qemu-img, say) has another identity and stays (an old record without identities
  // falls back to the name)
  const ids = rec.identities;
  const meant = (s: SnapshotInfo): boolean =>
    s.name === tag && (ids === undefined || ids.some((id) => sameSavevm(s, { ...id, id: '', name: tag, vmStateSize: 0, icount: -1 })));
  const r = await deleteWhere(bql, drained, disks, meant);
  if (r.left.length > 0) throw new BlockError(r.errors[0]?.code ?? 'EIO', `delvm '${tag}' is still unfinished: ${listText(r.left)}`);
  return `delvm '${tag}' was finished: ${r.deleted} snapshot(s) deleted${clearIntent(bql, m)}`;
}

/**
 * Rolls back or finishes a savevm / loadvm / delvm that a failure or a crash interrupted (its
 * intent record is on disk or in memory); returns one line per record handled, empty when there
 * was none. Called by the machine's start and at the start of every savevm, loadvm and delvm.
 * @locking global-state
 */
export async function recoverVmSnapshots(bql: Bql, m: Machine): Promise<string[]> {
  const store = m.intents(bql);
  // a record this process wrote: the images stayed locked by it since; one left by an earlier
  // process: other programs may have written to the images after the crash
  const ours = store.pending;
  const rec = ours ?? store.load();
  if (rec === null) return [];
  return withDrainedAll(bql, async (drained) => [await recoverIntent(bql, drained, m, rec, ours === null)]);
}

/** Runs the recovery before an operation; an unfinished one refuses the operation. */
async function recoverFirst(bql: Bql, m: Machine, op: string): Promise<void> {
  try {
    await recoverVmSnapshots(bql, m);
  } catch (e) {
    throw new BlockError(codeOf(e), `${op}: an earlier savevm, loadvm or delvm could not be finished: ${message(e)}`, { op, cause: e });
  }
}

/** A savevm identity that no snapshot of the tag on any disk has yet. */
function freshIdentity(now: number, vmClockNsec: number, taken: SnapshotInfo[]): SavevmIdentity {
  const id: SavevmIdentity = { dateSec: Math.floor(now / 1000), dateNsec: (now % 1000) * 1e6, vmClockNsec: Math.round(vmClockNsec) };
  const clash = (): boolean => taken.some((s) => s.dateSec === id.dateSec && s.dateNsec === id.dateNsec && s.vmClockNsec === id.vmClockNsec);
  for (let i = 0; i < 1_000_000 && clash(); i++) {
    id.dateNsec += 1000;
    if (id.dateNsec >= 1e9) {
      id.dateNsec -= 1e9;
      id.dateSec++;
    }
  }
  return id;
}

/**
 * Saves the VM state and snapshots every writable disk under `tag` (default vm-<date>); the
 * VM state goes to the disk named by `opts.vmstate` or QEMU's default. Throws a
 * `VmSnapshotError` saying what is left when it fails. The caller's BQL is held throughout; the
 * snapshot lock must be free (EBUSY while a snapshot job runs). saveVmLocked does the same without
 * holding the BQL for the whole run.
 * @locking global-state
 */
export async function saveVm(bql: Bql, m: Machine, tag?: string, opts: VmSnapshotOptions = {}): Promise<SavevmResult> {
  const snap = trySnapshotLock(`savevm '${tag ?? ''}'`, 'savevm');
  try {
    return await saveVmWith(heldBqlSteps(bql), m, tag, opts);
  } finally {
    releaseSnapshotLock(snap);
  }
}

/**
 * saveVm for the snapshot lock's holder: the BQL is taken for the short global-state steps only
 * (stopping the vCPUs and draining the machine's disks; creating the snapshots), and the VM state
 * is written in chunks without it, with the job's pause point (cancel) between chunks. Other
 * disks' I/O and every monitor go on meanwhile; `cont` is refused until it ends.
 * @locking snapshot
 */
export async function saveVmLocked(snap: SnapshotLocked, m: Machine, tag?: string, opts: VmSnapshotOptions = {}, hooks: VmStepHooks = {}): Promise<SavevmResult> {
  return saveVmWith(snapshotLockSteps(snap, 'savevm', hooks), m, tag, opts);
}

/** The stopped, drained machine of a running snapshot operation, and how to let it go. */
interface HeldMachine {
  disks: GroupDisk[];
  drained: DrainedSet;
  wasRunning: boolean;
  release: () => void;
}

/** Stops the vCPUs, keeps them stopped and drains the machine's disks (one global-state step). */
async function holdMachine(bql: Bql, m: Machine, disks: GroupDisk[], what: string): Promise<HeldMachine> {
  const wasRunning = m.runState === 'running';
  await m.stop(bql, { flush: false });
  m.takeStopRequest(bql); // a stop from before this operation is not one made during it
  const release = m.holdPaused(bql, what);
  try {
    const drained = await drainedBeginSet(bql, disks.map((d) => d.node));
    return { disks, drained, wasRunning, release };
  } catch (e) {
    release();
    resume(bql, m, wasRunning);
    throw e;
  }
}

/** Ends what holdMachine began: the drained sections, the hold, and resumes a machine that ran. */
async function letMachineGo(bql: Bql, m: Machine, h: HeldMachine): Promise<void> {
  drainedEndSet(bql, h.drained);
  h.release();
  // a user's stop during the operation is honoured now: the machine stays stopped and its disks
  // are flushed (as QEMU runs the stop after the operation)
  if (m.takeStopRequest(bql)) await m.flushDisks(bql);
  else resume(bql, m, h.wasRunning);
}

async function saveVmWith(steps: VmSteps, m: Machine, tag: string | undefined, opts: VmSnapshotOptions): Promise<SavevmResult> {
  const name = tag ?? defaultSnapshotTag(new Date());
  if (name === '') throw new BlockError('EINVAL', 'savevm: the tag must not be empty', { field: 'tag' });
  if (name.startsWith(UNDO_PREFIX)) throw new BlockError('EINVAL', `savevm: tags starting with '${UNDO_PREFIX}' are loadvm's own`, { field: 'tag', value: name });
  const start = await steps.gs(async (bql) => {
    await recoverFirst(bql, m, 'savevm');
    const all = chosenDisks(m, opts.devices);
    bdrvAllCanSnapshot(bql, all);
    const vmDisk = bdrvAllFindVmstateDisk(bql, all, opts.vmstate);
    if (opts.overwrite === false) {
      const found = await bdrvAllFindSnapshots(bql, all, name);
      if ([...found.values()].some((l) => l.length > 0)) throw new BlockError('EINVAL', `Snapshot '${name}' already exists in one or more devices`, { value: name, op: 'savevm' });
    }
    const held = await holdMachine(bql, m, all, `savevm '${name}'`);
    try {
      steps.claim(bql, held.disks.map((d) => d.node));
      const older = await runInDrainedSection(bql, held.drained, () => bdrvAllFindSnapshots(bql, held.disks, name));
      return { held, vmDisk, olderAll: [...older.values()].flat(), layout: m.saveStateLayout(bql) };
    } catch (e) {
      await letMachineGo(bql, m, held);
      throw e;
    }
  });
  const { held, vmDisk, olderAll, layout } = start;
  const drained = held.drained;
  try {
    try {
      await writeVmStateStream(steps, drained, vmDisk.node, layout);
    } catch (e) {
      const why = isBlockError(e, 'ECANCELED') ? 'cancelled while saving the VM state' : `could not save the VM state on '${vmDisk.name}': ${message(e)}`;
      throw nothingSaved(name, why, e);
    }
    return await steps.gs((bql) => {
      try {
        steps.commit(bql);
      } catch (e) {
        throw nothingSaved(name, 'cancelled before its commit', e);
      }
      return runInDrainedSection(bql, drained, () => commitSavevm(bql, drained, m, name, held.disks, vmDisk, olderAll, layout.total));
    });
  } finally {
    await steps.gs((bql) => letMachineGo(bql, m, held));
  }
}

/** The error of a savevm that stopped before its commit: nothing was made, nothing is left. */
function nothingSaved(name: string, why: string, cause: unknown): VmSnapshotError {
  return new VmSnapshotError(codeOf(cause), `savevm '${name}': ${why}; no snapshot was made, the older ones of the tag are kept`, {
    undoKept: [],
    leftovers: [],
    disks: new Map(),
    committed: false,
    pending: false,
  }, cause);
}

/** savevm's commit on the drained disks once the VM state is written: create, then drop older ones. */
async function commitSavevm(
  bql: Bql,
  drained: GroupDrained,
  m: Machine,
  name: string,
  disks: GroupDisk[],
  vmDisk: GroupDisk,
  olderAll: SnapshotInfo[],
  vmStateSize: number,
): Promise<SavevmResult> {
  const identity = freshIdentity(Date.now(), m.vmClockNsec, olderAll);
  const info: SnapshotInfo = { id: '', name, vmStateSize, ...identity, icount: -1 };
  const store = m.intents(bql);
  const mine = writableOf(disks);
  const rec: VmIntent = { op: 'savevm', phase: 'started', tag: name, identity, disks: mine.map((d) => d.name) };
  store.write(rec);
  try {
    await bdrvAllCreateSnapshot(bql, drained, disks, info, vmDisk);
  } catch (e) {
    throw await savevmFailed(bql, drained, m, mine, e, name, info);
  }
  try {
    store.write({ ...rec, phase: 'cleanup' });
  } catch (e) {
    // not committed: the new snapshot goes again
    const r = await deleteWhere(bql, drained, mine, (s) => s.name === name && sameSavevm(s, info));
    const tail = r.left.length === 0 ? `; the new snapshot was removed from every disk${clearIntent(bql, m)}` : `; the new snapshot remains on ${listText(r.left)} and is removed by the next operation`;
    throw new VmSnapshotError(codeOf(e), `savevm '${name}': ${message(e)}${tail}`, { undoKept: [], leftovers: r.left, disks: new Map(), committed: false, pending: r.left.length > 0 }, e);
  }
  // the new snapshot exists on every disk: only now do the older ones of the tag go
  const r = await deleteWhere(bql, drained, mine, (s) => s.name === name && !sameSavevm(s, info));
  if (r.left.length > 0) {
    const why = r.errors.map((x) => x.message).join('; ');
    throw new VmSnapshotError(
      r.errors[0]?.code ?? 'EIO',
      `savevm '${name}' saved the VM and every disk, but older snapshots of the tag could not be deleted: ${listText(r.left)} (${why}); loadvm '${name}' loads the new one, and the next savevm, loadvm or delvm deletes the older ones`,
      { undoKept: [], leftovers: r.left, disks: new Map(), committed: true, pending: true },
    );
  }
  const tail = clearIntent(bql, m);
  return { name, vmStateSize, vmstateDisk: vmDisk.name, replaced: olderAll.length, warnings: tail === '' ? [] : [tail.slice(2)] };
}

/** The error of a savevm whose group create failed: what is left, the record kept if needed. */
async function savevmFailed(bql: Bql, drained: GroupDrained, m: Machine, mine: GroupDisk[], e: unknown, name: string, info: SnapshotInfo): Promise<VmSnapshotError> {
  let left: LeftSnapshot[] = [];
  if (e instanceof GroupCreateError && e.leftovers.length > 0) {
    // try once more to remove what the group create could not
    const r = await deleteWhere(bql, drained, mine, (s) => s.name === name && sameSavevm(s, info));
    left = r.left;
  }
  const tail =
    left.length === 0
      ? `; no disk has the new snapshot, the older ones of the tag are kept${clearIntent(bql, m)}`
      : `; the new snapshot remains on ${listText(left)} and is removed by the next savevm, loadvm, delvm or start`;
  return new VmSnapshotError(codeOf(e), `${message(e)}${tail}`, { undoKept: [], leftovers: left, disks: new Map(), committed: false, pending: left.length > 0 }, e);
}

/** The disk whose snapshot holds the VM state: the one named, else QEMU's default, else the one that has it. */
function chooseVmDisk(bql: Bql, disks: GroupDisk[], byDisk: Map<string, SnapshotInfo>, vmstate: string | undefined): GroupDisk {
  if (vmstate !== undefined) return bdrvAllFindVmstateDisk(bql, disks, vmstate);
  const def = bdrvAllFindVmstateDisk(bql, disks);
  if ((byDisk.get(def.name)?.vmStateSize ?? 0) > 0) return def;
  const holders = disks.filter((d) => (byDisk.get(d.name)?.vmStateSize ?? 0) > 0);
  return holders.length === 1 ? (holders[0] as GroupDisk) : def;
}

/**
 * Reverts every writable disk to the savevm `tag` names and loads its VM state (from the disk
 * named by `opts.vmstate`, else from the one that holds it). On a failure every disk it touched is
 * put back and the machine keeps its state (and keeps running if it was); a disk that could not
 * be put back keeps its undo snapshot, the machine stays paused, and the `VmSnapshotError` says
 * which disks are where and which undo snapshots remain.
 * @locking global-state
 */
export async function loadVm(bql: Bql, m: Machine, tag: string, opts: VmSnapshotOptions = {}): Promise<LoadvmResult> {
  const snap = trySnapshotLock(`loadvm '${tag}'`, 'loadvm');
  try {
    return await loadVmWith(heldBqlSteps(bql), m, tag, opts);
  } finally {
    releaseSnapshotLock(snap);
  }
}

/**
 * loadVm for the snapshot lock's holder: the disks are reverted in one global-state step, the VM
 * state is read in chunks without the BQL (a cancel there puts every disk back), and it is loaded
 * into the machine in a last step.
 * @locking snapshot
 */
export async function loadVmLocked(snap: SnapshotLocked, m: Machine, tag: string, opts: VmSnapshotOptions = {}, hooks: VmStepHooks = {}): Promise<LoadvmResult> {
  return loadVmWith(snapshotLockSteps(snap, 'loadvm', hooks), m, tag, opts);
}

async function loadVmWith(steps: VmSteps, m: Machine, tag: string, opts: VmSnapshotOptions): Promise<LoadvmResult> {
  const start = await steps.gs(async (bql) => {
    await recoverFirst(bql, m, 'loadvm');
    const disks = chosenDisks(m, opts.devices);
    bdrvAllCanSnapshot(bql, disks);
    const { byDisk } = await bdrvAllResolveSnapshot(bql, disks, tag);
    const vmDisk = chooseVmDisk(bql, disks, byDisk, opts.vmstate);
    const sn = byDisk.get(vmDisk.name);
    if (sn === undefined) throw new BlockError('ENOENT', 'Snapshot can not be found', { node: vmDisk.name, value: tag });
    if (sn.vmStateSize === 0) throw new BlockError('EINVAL', 'This is a disk-only snapshot. Revert to it  offline using qemu-img', { node: vmDisk.name, value: tag });
    const limit = m.vmStateLimitBytes;
    if (!Number.isSafeInteger(sn.vmStateSize) || sn.vmStateSize < MIN_VMSTATE_BYTES || sn.vmStateSize > limit) {
      throw new BlockError(
        'EINVAL',
        `loadvm '${tag}': snapshot ID ${sn.id} on '${vmDisk.name}' records a VM state of ${sn.vmStateSize} bytes (vm_state_size); a VM state of this machine takes ${MIN_VMSTATE_BYTES} to ${limit} bytes`,
        { node: vmDisk.name, field: 'vm_state_size', value: sn.vmStateSize },
      );
    }
    const held = await holdMachine(bql, m, disks, `loadvm '${tag}'`);
    try {
      steps.claim(bql, held.disks.map((d) => d.node));
      const reverted = await runInDrainedSection(bql, held.drained, () => revertDisks(bql, held.drained, m, writableOf(disks), tag, byDisk));
      return { held, vmDisk, sn, reverted };
    } catch (e) {
      await letMachineGo(bql, m, held);
      throw e;
    }
  });
  const { held, vmDisk, sn, reverted } = start;
  const drained = held.drained;
  try {
    let buf: { bytes: Uint8Array; crc: number } | null = null;
    if (reverted.failure === null) {
      try {
        buf = await readVmStateStream(steps, drained, vmDisk.node, sn.vmStateSize);
      } catch (e) {
        const why = isBlockError(e, 'ECANCELED') ? 'cancelled while reading it' : message(e);
        reverted.failure = new BlockError(codeOf(e), `Error while loading VM state of '${tag}' from '${vmDisk.name}': ${why}`, { node: vmDisk.name, cause: e });
      }
    }
    return await steps.gs((bql) => {
      if (reverted.failure === null) {
        try {
          steps.commit(bql);
        } catch (e) {
          reverted.failure = new BlockError(codeOf(e), `loadvm '${tag}': cancelled before the VM state was loaded`, { node: vmDisk.name, cause: e });
        }
      }
      return runInDrainedSection(bql, drained, () => finishLoad(bql, drained, m, tag, vmDisk, reverted, buf));
    });
  } finally {
    await steps.gs((bql) => letMachineGo(bql, m, held));
  }
}

/** loadvm's first half on the drained disks: the undo snapshots, then every disk reverted. */
interface Reverted {
  disks: GroupDisk[];
  rec: VmIntent;
  undo: Map<string, SnapshotInfo>;
  touched: GroupDisk[];
  failure: BlockError | null;
}

/** Keeps the current state as undo snapshots, then reverts every writable disk (see loadVm). */
async function revertDisks(bql: Bql, drained: GroupDrained, m: Machine, disks: GroupDisk[], tag: string, byDisk: Map<string, SnapshotInfo>): Promise<Reverted> {
  const store = m.intents(bql);
  const undoName = `${UNDO_PREFIX}${process.pid}-${Date.now()}`;
  const rec: VmIntent = { op: 'loadvm', phase: 'started', tag, undoName, disks: disks.map((d) => d.name) };
  store.write(rec);
  const now = Date.now();
  let undo: Map<string, SnapshotInfo>;
  try {
    const made = await bdrvAllCreateSnapshot(bql, drained, disks, { id: '', name: undoName, vmStateSize: 0, dateSec: Math.floor(now / 1000), dateNsec: 0, vmClockNsec: 0, icount: -1 }, null);
    undo = new Map(made.map((u) => [u.disk, u.snapshot]));
  } catch (e) {
    // no disk was reverted: only undo snapshots can be left, and the record may only delete them
    store.write({ ...rec, phase: 'cleanup' });
    const r = await deleteWhere(bql, drained, disks, (s) => s.name === undoName);
    const tail = r.left.length === 0 ? clearIntent(bql, m) : `; undo snapshots remain (${listText(r.left)}) and are deleted by the next operation`;
    const states = new Map<string, DiskState>(disks.map((d) => [d.name, 'unchanged']));
    throw new VmSnapshotError(codeOf(e), `loadvm '${tag}': could not keep the current state, no disk was changed: ${message(e)}${tail}`, {
      undoKept: r.left,
      leftovers: [],
      disks: states,
      committed: false,
      pending: r.left.length > 0,
    }, e);
  }
  const touched: GroupDisk[] = [];
  let failure: BlockError | null = null;
  for (const d of disks) {
    const target = byDisk.get(d.name);
    touched.push(d); // a goto that fails may have switched before its error: it goes back too
    try {
      if (target === undefined) throw new BlockError('ENOENT', `Snapshot '${tag}' does not exist`, { node: d.name });
      await bdrvSnapshotGoto(bql, drained, d.node, target.id);
    } catch (e) {
      failure = new BlockError(codeOf(e), `Could not load snapshot '${tag}' on '${d.name}': ${message(e)}`, { node: d.name, cause: e });
      break;
    }
  }
  return { disks, rec, undo, touched, failure };
}

/** loadvm's second half: load the VM state read, then drop the undo snapshots; or put every disk back. */
async function finishLoad(bql: Bql, drained: GroupDrained, m: Machine, tag: string, vmDisk: GroupDisk, rv: Reverted, buf: { bytes: Uint8Array; crc: number } | null): Promise<LoadvmResult> {
  const { disks, rec, undo, touched } = rv;
  let failure = rv.failure;
  if (failure === null && buf !== null) {
    try {
      m.loadState(bql, buf.bytes, buf.crc);
    } catch (e) {
      failure = new BlockError(codeOf(e), `Error while loading VM state of '${tag}' from '${vmDisk.name}': ${message(e)}`, { node: vmDisk.name, cause: e });
    }
  }
  if (failure !== null) throw await putBack(bql, drained, m, tag, disks, touched, undo, rec, failure);
  const store = m.intents(bql);
  const undoName = rec.undoName ?? '';
  // loaded: from here on the record may only delete the undo snapshots
  let warnings: string[] = [];
  try {
    store.write({ ...rec, phase: 'cleanup' });
    const r = await deleteWhere(bql, drained, disks, (s) => s.name === undoName);
    if (r.left.length > 0) warnings = [`loadvm '${tag}': undo snapshots could not be deleted yet: ${listText(r.left)}; the next savevm, loadvm or delvm deletes them`];
    else {
      const tail = clearIntent(bql, m);
      if (tail !== '') warnings = [tail.slice(2)];
    }
  } catch (e) {
    warnings = [`loadvm '${tag}': ${message(e)}; the undo snapshots '${undoName}' remain`];
  }
  return { name: tag, vmstateDisk: vmDisk.name, warnings };
}

/** Puts every touched disk back to its undo snapshot after a failed loadvm; the error says what is left. */
async function putBack(
  bql: Bql,
  drained: GroupDrained,
  m: Machine,
  tag: string,
  disks: GroupDisk[],
  touched: GroupDisk[],
  undo: Map<string, SnapshotInfo>,
  rec: VmIntent,
  failure: BlockError,
): Promise<VmSnapshotError> {
  const states = new Map<string, DiskState>(disks.map((d) => [d.name, 'unchanged']));
  const notBack: Array<{ disk: GroupDisk; error: BlockError }> = [];
  for (const d of touched) {
    const u = undo.get(d.name);
    const err = u === undefined ? new BlockError('ENOENT', 'no undo snapshot', { node: d.name }) : await gotoConfirmed(bql, drained, d, u.id);
    if (err === null) states.set(d.name, 'put back');
    else {
      states.set(d.name, 'unknown');
      notBack.push({ disk: d, error: err });
    }
  }
  const undoName = rec.undoName ?? '';
  const allUndo = disks.flatMap((d) => {
    const u = undo.get(d.name);
    return u === undefined ? [] : [{ disk: d.name, id: u.id, name: u.name }];
  });
  if (notBack.length > 0) {
    // nothing is deleted: every disk keeps its copy of the state from before loadvm, and the
    // record ('started') makes the next operation (or start) put them back; the vCPUs stay paused
    const where = [...states].map(([d, s]) => `'${d}' ${s === 'unknown' ? 'may be at snapshot ' + `'${tag}' or partly reverted` : s === 'put back' ? 'is put back' : 'is unchanged'}`).join(', ');
    const why = notBack.map((n) => `'${n.disk.name}': ${n.error.message}`).join('; ');
    return new VmSnapshotError(
      failure.code,
      `${failure.message}; putting the disks back failed on ${why}. Now ${where}; the state from before loadvm is kept in the undo snapshots ${listText(allUndo)}; the machine stays paused until the next savevm, loadvm, delvm or cont puts every disk back`,
      { undoKept: allUndo, leftovers: [], disks: states, committed: false, pending: true },
      failure,
    );
  }
  // every disk is as it was: the undo snapshots may go
  let left: LeftSnapshot[] = allUndo;
  let tail: string;
  try {
    m.intents(bql).write({ ...rec, phase: 'cleanup' });
    const r = await deleteWhere(bql, drained, disks, (s) => s.name === undoName);
    left = r.left;
    tail = r.left.length === 0 ? clearIntent(bql, m) : `; undo snapshots remain (${listText(r.left)}) and are deleted by the next operation`;
  } catch (e) {
    tail = `; ${message(e)}: the undo snapshots remain (${listText(allUndo)}) and the machine stays paused until the next operation deletes them`;
  }
  const names = touched.map((d) => d.name).join(', ');
  return new VmSnapshotError(failure.code, `${failure.message}; every disk was put back as it was (${names})${tail}`, {
    undoKept: left,
    leftovers: [],
    disks: states,
    committed: false,
    pending: left.length > 0,
  }, failure);
}

/**
 * Deletes every snapshot of `tag` on every writable disk; returns the failures, each naming its
 * disk and what is left (the next savevm, loadvm or delvm finishes the deletion). Nothing to delete
 * is no error, as in QEMU. The VM keeps running (as in QEMU).
 * @locking global-state
 */
export async function delVm(bql: Bql, m: Machine, tag: string, opts: VmSnapshotOptions = {}): Promise<string[]> {
  const snap = trySnapshotLock(`delvm '${tag}'`, 'delvm');
  try {
    return await delVmHeld(bql, m, tag, opts);
  } finally {
    releaseSnapshotLock(snap);
  }
}

/**
 * delVm for the snapshot lock's holder (its one global-state step takes the BQL).
 * @locking snapshot
 */
export async function delVmLocked(snap: SnapshotLocked, m: Machine, tag: string, opts: VmSnapshotOptions = {}, hooks: VmStepHooks = {}): Promise<string[]> {
  const steps = snapshotLockSteps(snap, 'delvm', hooks);
  return steps.gs((bql) => {
    steps.commit(bql);
    return delVmHeld(bql, m, tag, opts);
  });
}

async function delVmHeld(bql: Bql, m: Machine, tag: string, opts: VmSnapshotOptions): Promise<string[]> {
  await recoverFirst(bql, m, 'delvm');
  const disks = chosenDisks(m, opts.devices);
  const mine = writableOf(disks);
  bdrvAllCanSnapshot(bql, disks);
  return withDrainedSet(bql, disks.map((d) => d.node), async (drained) => {
    const found = await bdrvAllFindSnapshots(bql, disks, tag);
    const before = [...found.values()].reduce((n, l) => n + l.length, 0);
    if (before === 0) return [];
    const store = m.intents(bql);
    const identities = [...found.values()].flat().map((s) => ({ dateSec: s.dateSec, dateNsec: s.dateNsec, vmClockNsec: s.vmClockNsec }));
    store.write({ op: 'delvm', phase: 'cleanup', tag, disks: mine.map((d) => d.name), identities });
    const r = await deleteWhere(bql, drained, mine, (s) => s.name === tag);
    if (r.left.length === 0) {
      const tail = clearIntent(bql, m);
      return tail === '' ? [] : [tail.slice(2)];
    }
    if (r.deleted === 0) {
      // nothing changed: the tag stays whole and nothing is left to finish
      const tail = clearIntent(bql, m);
      return r.errors.map((e) => `Could not delete snapshot '${tag}' on '${e.node ?? '?'}': ${e.message}; nothing was deleted${tail}`);
    }
    return r.errors.map((e) => `${e.message}; the snapshot is still on ${listText(r.left)} (no longer loadable), the next savevm, loadvm or delvm deletes it`);
  });
}

/** One row of `info snapshots`: the snapshot, and the ID to show (`--` for whole-VM ones). */
export interface SnapshotRow {
  id: string;
  info: SnapshotInfo;
}

/** What `info snapshots` shows: the VM snapshots, and per disk the partial ones. */
export interface SnapshotReport {
  /** Snapshots of the VM-state disk whose name and identity exist on every disk. */
  complete: SnapshotInfo[];
  /** Per disk, its snapshots that are not part of a complete one. */
  partial: Array<{ disk: string; snapshots: SnapshotInfo[] }>;
}

/**
 * The data of `info snapshots` (QEMU's algorithm, with snapshots matched by name and savevm
 * identity): throws "no block device can store vmstate for snapshot" when no disk could.
 * @locking global-state
 */
export async function listVmSnapshots(bql: Bql, m: Machine): Promise<SnapshotReport> {
  const disks = groupDisks(m);
  const vmDisk = bdrvAllFindVmstateDisk(bql, disks);
  const lists = new Map<string, SnapshotInfo[]>();
  for (const d of disks) if (!d.readOnly && bdrvCanSnapshot(bql, d.node)) lists.set(d.name, await bdrvSnapshotList(bql, d.node));
  const everywhere = (sn: SnapshotInfo): boolean => [...lists.values()].every((l) => l.some((s) => s.name === sn.name && sameSavevm(s, sn)));
  const complete = (lists.get(vmDisk.name) ?? []).filter(everywhere);
  const partial: SnapshotReport['partial'] = [];
  for (const [disk, l] of lists) {
    const left = l.filter((s) => !everywhere(s));
    if (left.length > 0) partial.push({ disk, snapshots: left });
  }
  return { complete, partial };
}

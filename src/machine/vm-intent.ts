/**
 * The intent record of a VM snapshot operation: what savevm, loadvm or delvm was doing, kept
 * until the operation is complete, so that one interrupted by a failure or by a crash (kill -9,
 * power loss) is rolled back or finished by the next operation or the next start of the machine.
 *
 * For disks backed by host files the record is a small JSON file beside the VM-state disk's image
 * (`<image>.snapstack-vm.json`), written to a temporary name, flushed, renamed over the old one and
 * the directory flushed, so a crash leaves the old record or the new one, never a torn one. For a
 * machine without host files (memory disks) it lives in memory only: there is no crash to outlive.
 *
 * Phases (what recovery does with a record it finds):
 * - savevm `started`: the new snapshots are being created; roll back: delete the snapshots of the
 *   tag with the record's identity on every disk.
 * - savevm `cleanup`: the new snapshot exists on every disk; finish: delete the tag's snapshots
 *   of any other identity.
 * - loadvm `started`: undo snapshots exist or are being made and disks may be reverted; roll back:
 *   goto the undo snapshot on every disk that has it, then delete it.
 * - loadvm `cleanup`: every disk is where it must stay; finish: delete the undo snapshots.
 * - delvm `cleanup`: finish: delete the snapshots of the tag with the recorded identities (one
 *   made under the same name after the crash stays).
 * A loadvm rolled back at recovery first keeps the disks' state as it found them (a snapshot on
 * every disk, reported): after the crash another program may have written to them.
 *
 * Common code (plain file system calls, synchronous so that a record is on disk before the next
 * step starts).
 */
import fs from 'node:fs';
import path from 'node:path';
import { BlockError } from '../block/errors.js';

/** The identity of one savevm: what every disk's entry of it carries. */
export interface SavevmIdentity {
  dateSec: number;
  dateNsec: number;
  vmClockNsec: number;
}

/** A VM snapshot operation in progress. */
export interface VmIntent {
  op: 'savevm' | 'loadvm' | 'delvm';
  phase: 'started' | 'cleanup';
  tag: string;
  /** savevm: the new snapshot's identity. */
  identity?: SavevmIdentity;
  /** loadvm: the name of the undo snapshots. */
  undoName?: string;
  /**
   * delvm: the identities of the snapshots of the tag it deletes, so that a recovery deletes
   * those and never a snapshot of the same name made after the crash.
   */
  identities?: SavevmIdentity[];
  /** The disks taking part, by device name. */
  disks: string[];
}

/** Suffix of the record file beside an image. */
export const INTENT_SUFFIX = '.snapstack-vm.json';
/** A record is a few hundred bytes; anything larger is not one of ours. */
const MAX_INTENT_BYTES = 64 * 1024;

function bad(file: string, why: string): never {
  throw new BlockError(
    'EINVAL',
    `VM snapshot intent record '${file}': ${why}; it is not one snapstack wrote: check the disks' snapshots (qemu-img snapshot -l) and remove the file`,
    { file, op: 'recover' },
  );
}

function isIdentity(v: unknown): v is SavevmIdentity {
  if (typeof v !== 'object' || v === null) return false;
  const o = v as Record<string, unknown>;
  return ['dateSec', 'dateNsec', 'vmClockNsec'].every((k) => Number.isSafeInteger(o[k]) && (o[k] as number) >= 0);
}

/**
 * Parses a record, refusing anything that is not a complete, valid one (typed error naming the file).
 * @locking common
 */
export function parseIntent(text: string, file: string): VmIntent {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch {
    bad(file, 'not valid JSON');
  }
  if (typeof v !== 'object' || v === null) bad(file, 'not an object');
  const o = v as Record<string, unknown>;
  if (o['op'] !== 'savevm' && o['op'] !== 'loadvm' && o['op'] !== 'delvm') bad(file, `unknown op ${JSON.stringify(o['op'])}`);
  if (o['phase'] !== 'started' && o['phase'] !== 'cleanup') bad(file, `unknown phase ${JSON.stringify(o['phase'])}`);
  if (typeof o['tag'] !== 'string') bad(file, 'the tag is missing');
  if (!Array.isArray(o['disks']) || !o['disks'].every((d) => typeof d === 'string')) bad(file, 'the disk list is missing');
  const intent: VmIntent = { op: o['op'], phase: o['phase'], tag: o['tag'], disks: o['disks'] as string[] };
  if (o['identity'] !== undefined) {
    if (!isIdentity(o['identity'])) bad(file, 'the identity is not valid');
    intent.identity = o['identity'];
  }
  if (o['undoName'] !== undefined) {
    if (typeof o['undoName'] !== 'string' || o['undoName'] === '') bad(file, 'the undo snapshot name is not valid');
    intent.undoName = o['undoName'];
  }
  if (o['identities'] !== undefined) {
    const ids = o['identities'];
    if (!Array.isArray(ids) || ids.length > 4096 || !ids.every(isIdentity)) bad(file, 'the identities are not valid');
    intent.identities = ids;
  }
  if (intent.op === 'savevm' && intent.identity === undefined) bad(file, 'a savevm record needs the identity');
  if (intent.op === 'loadvm' && intent.undoName === undefined) bad(file, 'a loadvm record needs the undo snapshot name');
  return intent;
}

function fsyncDir(dir: string): void {
  let fd: number | null = null;
  try {
    fd = fs.openSync(dir, 'r');
    fs.fsyncSync(fd);
  } catch {
    // some file systems refuse fsync on a directory; the rename is still atomic there
  } finally {
    if (fd !== null) fs.closeSync(fd);
  }
}

function ioError(file: string, what: string, e: unknown): BlockError {
  const why = e instanceof Error ? e.message : String(e);
  return new BlockError('EIO', `VM snapshot intent record '${file}': could not ${what}: ${why}`, { file, op: 'intent', cause: e });
}

/** Where one machine keeps its record: a file, or memory. */
export class IntentStore {
  private current: VmIntent | null = null;

  /** `file` is the record's path, or null to keep it in memory. */
  constructor(readonly file: string | null) {}

  /**
   * The record in progress, if any.
   * @locking common
   */
  get pending(): VmIntent | null {
    return this.current;
  }

  /**
   * Records `intent` durably (file: write, flush, rename, flush the directory).
   * @locking common
   */
  write(intent: VmIntent): void {
    if (this.file !== null) {
      const tmp = `${this.file}.tmp`;
      try {
        const fd = fs.openSync(tmp, 'w');
        try {
          fs.writeSync(fd, `${JSON.stringify(intent)}\n`);
          fs.fsyncSync(fd);
        } finally {
          fs.closeSync(fd);
        }
        fs.renameSync(tmp, this.file);
        fsyncDir(path.dirname(this.file));
      } catch (e) {
        throw ioError(this.file, 'write it', e);
      }
    }
    this.current = { ...intent };
  }

  /**
   * Removes the record: the operation is complete.
   * @locking common
   */
  clear(): void {
    if (this.file !== null) {
      try {
        fs.rmSync(this.file, { force: true });
        fsyncDir(path.dirname(this.file));
      } catch (e) {
        throw ioError(this.file, 'remove it', e);
      }
    }
    this.current = null;
  }

  /**
   * Reads a record left on disk by an earlier run (null when there is none).
   * @locking common
   */
  load(): VmIntent | null {
    if (this.file === null) return this.current;
    let text: string;
    try {
      const st = fs.statSync(this.file, { throwIfNoEntry: false });
      if (st === undefined) return null;
      if (st.size > MAX_INTENT_BYTES) bad(this.file, `${st.size} bytes, a record is at most ${MAX_INTENT_BYTES}`);
      text = fs.readFileSync(this.file, 'utf8');
    } catch (e) {
      if (e instanceof BlockError) throw e;
      throw ioError(this.file, 'read it', e);
    }
    this.current = parseIntent(text, this.file);
    return this.current;
  }
}

/**
 * Internal snapshots of host files: the store behind the `file` driver's snapshot callbacks (a raw
 * node reaches them through the generic fallback). QEMU refuses snapshots on raw images;
 * snapstack keeps them in a directory beside the image:
 *
 *   <image>.snapshots/index.json        the list of snapshots: versioned JSON, the commit point
 *   <image>.snapshots/<id>.img          each snapshot's disk: a clone of the image (reflink where
 *                                       the filesystem can, a copy where not)
 *   <image>.snapshots/<id>.vmstate      its VM state, when it has one
 *   <image>.snapshots/pending.vmstate   VM state saved (saveVmstate) and not yet in a snapshot
 *
 * `<image>` is the image's real path (symlinks resolved once, on first use), so every name that
 * leads to one image finds the same store.
 *
 * Crash safety: the index is written to `index.json.tmp`, fsynced, renamed over `index.json`, and
 * the directory fsynced; a snapshot exists exactly when the index lists it. Every file an
 * operation needs is written and fsynced before the index switches, and files an operation drops
 * are unlinked after, so a crash leaves at worst orphan files: they are never listed and are
 * removed (best-effort) by the next create or delete. Goto replaces the image by renaming a fsynced
 * clone over it, so the image holds the old or the new contents, whole. An index that cannot be
 * read, is damaged or has an unknown version is refused (EINVAL naming the file and the field)
 * and never rewritten, and no file of its store is touched.
 *
 * Global-state code (BQL held; create, goto and delete on a drained node), except the VM-state
 * descriptor lookups, which the I/O callbacks make. The work is synchronous file-system calls on
 * the main loop: the node is drained, so nothing waits on its requests meanwhile.
 */
import fs from 'node:fs';
import path from 'node:path';
import { assertBql, type Bql } from '../block/bql.js';
import { assertDrained, type DrainedProof } from '../block/drain.js';
import type { SnapshotInfo } from '../block/driver.js';
import { BlockError, fromSystemError } from '../block/errors.js';
import type { BlockNode } from '../block/node.js';
import { findByIdAndName, findByIdOrName, findForLoadTmp, nextSnapshotId, toSnapshotInfo } from './snapshot-lookup.js';

/** The `format` member every index carries. */
export const INDEX_FORMAT = 'snapstack-raw-snapshots';
/** The only index version this code reads and writes. */
export const INDEX_VERSION = 1;
/** Suffix of the store directory beside the image. */
export const STORE_SUFFIX = '.snapshots';
const INDEX_NAME = 'index.json';
const INDEX_TMP = 'index.json.tmp';
const PENDING_NAME = 'pending.vmstate';
const PENDING_TMP = 'pending.vmstate.tmp';
/** The clone a goto renames over the image, beside it (same directory, so the rename is atomic). */
const GOTO_TMP_SUFFIX = '.snapstack-goto.tmp';
/** Names the store itself uses: no snapshot file may take one. */
const RESERVED = new Set([INDEX_NAME, INDEX_TMP, PENDING_NAME, PENDING_TMP]);
/** Files of ours that an index may leave unreferenced after a crash: removed by the cleanup. */
const ORPHAN_PATTERN = /\.(img|vmstate|tmp)$/;
const VMSTATE_MODE = 0o600;

/** One snapshot as the index records it. */
export interface RawSnapshotEntry extends SnapshotInfo {
  /** Its disk: a file name inside the store directory. */
  file: string;
  /** Its VM state (a file name inside the store directory), or null when it has none. */
  vmStateFile: string | null;
  /** The image's length when the snapshot was taken. */
  diskSize: number;
}

/** An entry with the members this version does not know, kept so that a rewrite preserves them. */
interface StoredEntry extends RawSnapshotEntry {
  extra: Record<string, unknown>;
}

/** The parsed index. */
interface StoredIndex {
  snapshots: StoredEntry[];
  extra: Record<string, unknown>;
}

/** Where the store lives. */
interface StorePaths {
  /** The image's real path. */
  image: string;
  /** The store directory. */
  dir: string;
  /** The index inside it. */
  index: string;
}

/** What a goto hands back to the instance: the descriptor of the new image and its length. */
export interface GotoResult {
  fd: number;
  sizeBytes: number;
  info: SnapshotInfo;
  /**
   * A failure after the switch (a directory fsync, the VM state): the image already shows the
   * snapshot, so the caller must take the new descriptor before throwing it.
   */
  lateError: BlockError | null;
}

/** What load-temporary hands back: a read-only descriptor of the snapshot's disk. */
export interface LoadTmpResult {
  fd: number;
  sizeBytes: number;
  info: SnapshotInfo;
  /** The snapshot's VM-state file, or null when it has none (VM-state reads are then zeros). */
  vmStatePath: string | null;
}

const ENTRY_KEYS = ['id', 'name', 'file', 'vmStateFile', 'vmStateSize', 'dateSec', 'dateNsec', 'vmClockNsec', 'icount', 'diskSize'] as const;
const INDEX_KEYS = ['format', 'version', 'snapshots'] as const;

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function sysCode(e: unknown): string {
  return typeof e === 'object' && e !== null && 'code' in e ? String((e as { code: unknown }).code) : '';
}

function describe(v: unknown): string {
  const s = JSON.stringify(v);
  return s === undefined ? String(v) : s.length > 60 ? `${s.slice(0, 57)}...` : s;
}

function extraMembers(obj: Record<string, unknown>, known: readonly string[]): Record<string, unknown> {
  const extra: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(obj)) if (!known.includes(k)) extra[k] = v;
  return extra;
}

/**
 * Parses and validates an index document; EINVAL naming `indexPath` and the offending field.
 * @locking common
 */
export function parseSnapshotIndex(text: string, indexPath: string, nodeName?: string): { snapshots: RawSnapshotEntry[] } {
  return parseIndex(text, indexPath, nodeName);
}

function parseIndex(text: string, indexPath: string, nodeName: string | undefined): StoredIndex {
  const bad = (field: string, why: string): BlockError =>
    new BlockError('EINVAL', `Snapshot index '${indexPath}' is damaged: ${field === '' ? 'the document' : `field '${field}'`} ${why}; it is refused and left as it is`, {
      node: nodeName,
      file: indexPath,
      field: field === '' ? 'index' : field,
      op: 'snapshot-index',
    });
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch (e) {
    throw bad('', `is not valid JSON (${e instanceof Error ? e.message : String(e)})`);
  }
  if (!isRecord(doc)) throw bad('', 'must be a JSON object');
  if (doc['format'] !== INDEX_FORMAT) throw bad('format', `must be ${describe(INDEX_FORMAT)} (it is ${describe(doc['format'])})`);
  const version = doc['version'];
  if (typeof version !== 'number' || !Number.isSafeInteger(version)) throw bad('version', `must be an integer (it is ${describe(version)})`);
  if (version !== INDEX_VERSION) {
    throw new BlockError('EINVAL', `Snapshot index '${indexPath}' has unsupported version ${version} (field 'version'; this snapstack reads version ${INDEX_VERSION}); it is refused and left as it is`, {
      node: nodeName,
      file: indexPath,
      field: 'version',
      value: version,
      op: 'snapshot-index',
    });
  }
  const list = doc['snapshots'];
  if (!Array.isArray(list)) throw bad('snapshots', `must be an array (it is ${describe(list)})`);
  const snapshots: StoredEntry[] = [];
  const ids = new Map<string, number>();
  const files = new Map<string, string>();
  list.forEach((raw: unknown, i) => {
    const at = `snapshots[${i}]`;
    if (!isRecord(raw)) throw bad(at, 'must be an object');
    const str = (k: string, nonEmpty: boolean): string => {
      const v = raw[k];
      if (typeof v !== 'string' || (nonEmpty && v === '')) throw bad(`${at}.${k}`, `must be a ${nonEmpty ? 'non-empty ' : ''}string (it is ${describe(v)})`);
      return v;
    };
    const int = (k: string, min: number, max = Number.MAX_SAFE_INTEGER): number => {
      const v = raw[k];
      if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min || v > max) {
        throw bad(`${at}.${k}`, `must be an integer from ${min} to ${max} (it is ${describe(v)})`);
      }
      return v;
    };
    const fileName = (k: string, v: string): string => {
      if (v === '.' || v === '..' || /[/\\\0]/.test(v) || RESERVED.has(v)) {
        throw bad(`${at}.${k}`, `must name a file inside the store directory (it is ${describe(v)})`);
      }
      const owner = files.get(v);
      if (owner !== undefined) throw bad(`${at}.${k}`, `names ${describe(v)}, which ${owner} names too`);
      files.set(v, `${at}.${k}`);
      return v;
    };
    const id = str('id', true);
    const seen = ids.get(id);
    if (seen !== undefined) throw bad(`${at}.id`, `repeats the ID ${describe(id)} of snapshots[${seen}]`);
    ids.set(id, i);
    const name = str('name', false);
    const file = fileName('file', str('file', true));
    const vmStateSize = int('vmStateSize', 0);
    const vmRaw = raw['vmStateFile'];
    let vmStateFile: string | null;
    if (vmRaw === null) {
      if (vmStateSize > 0) throw bad(`${at}.vmStateFile`, `is null but vmStateSize is ${vmStateSize}`);
      vmStateFile = null;
    } else {
      vmStateFile = fileName('vmStateFile', str('vmStateFile', true));
      if (vmStateSize === 0) throw bad(`${at}.vmStateFile`, `must be null when vmStateSize is 0 (it is ${describe(vmRaw)})`);
    }
    snapshots.push({
      id,
      name,
      file,
      vmStateFile,
      vmStateSize,
      dateSec: int('dateSec', 0),
      dateNsec: int('dateNsec', 0, 999_999_999),
      vmClockNsec: int('vmClockNsec', 0),
      icount: int('icount', -1),
      diskSize: int('diskSize', 0),
      extra: extraMembers(raw, ENTRY_KEYS),
    });
  });
  return { snapshots, extra: extraMembers(doc, INDEX_KEYS) };
}

function serializeIndex(index: StoredIndex): string {
  const doc = {
    format: INDEX_FORMAT,
    version: INDEX_VERSION,
    snapshots: index.snapshots.map((e) => ({
      id: e.id,
      name: e.name,
      file: e.file,
      vmStateFile: e.vmStateFile,
      vmStateSize: e.vmStateSize,
      dateSec: e.dateSec,
      dateNsec: e.dateNsec,
      vmClockNsec: e.vmClockNsec,
      icount: e.icount,
      diskSize: e.diskSize,
      ...e.extra,
    })),
    ...index.extra,
  };
  return `${JSON.stringify(doc, null, 2)}\n`;
}

function unlinkQuiet(p: string): void {
  try {
    fs.unlinkSync(p);
  } catch {
    // best-effort: an orphan left here is removed by the next create or delete
  }
}

function closeQuiet(fd: number): void {
  try {
    fs.closeSync(fd);
  } catch {
    // the descriptor is gone either way
  }
}

/** fsync of a directory, so that the entries created or renamed in it are durable. */
function fsyncDir(dir: string): void {
  let fd: number;
  try {
    fd = fs.openSync(dir, 'r');
  } catch (e) {
    if (sysCode(e) === 'EISDIR') return; // platforms that cannot open directories
    throw e;
  }
  try {
    fs.fsyncSync(fd);
  } catch (e) {
    const c = sysCode(e);
    if (c !== 'EINVAL' && c !== 'ENOTSUP') throw e; // filesystems without directory fsync
  } finally {
    fs.closeSync(fd);
  }
}

function fsyncPath(p: string): void {
  const fd = fs.openSync(p, 'r+');
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/** Clones `src` to `dst` (reflink where the filesystem can, a copy otherwise); `dst` is replaced. */
function cloneFile(src: string, dst: string): void {
  fs.copyFileSync(src, dst, fs.constants.COPYFILE_FICLONE);
}

/** `<base><suffix>`, or `<base>-N<suffix>` when that name is taken. */
function freeName(base: string, suffix: string, taken: ReadonlySet<string>): string {
  let name = `${base}${suffix}`;
  for (let n = 1; taken.has(name) || RESERVED.has(name); n++) name = `${base}-${n}${suffix}`;
  return name;
}

function referencedNames(index: StoredIndex): Set<string> {
  const names = new Set<string>();
  for (const e of index.snapshots) {
    names.add(e.file);
    if (e.vmStateFile !== null) names.add(e.vmStateFile);
  }
  return names;
}

/**
 * Removes a host file's snapshot store (the files of ours in it, then the directory when empty):
 * an image created anew over an old one must not inherit the old one's snapshots.
 * @locking common
 */
export function discardSnapshotStore(filename: string): void {
  let image: string;
  try {
    image = fs.realpathSync(filename);
  } catch {
    image = path.resolve(filename);
  }
  const dir = image + STORE_SUFFIX;
  let names: string[];
  try {
    names = fs.readdirSync(dir);
  } catch {
    return;
  }
  for (const n of names) if (RESERVED.has(n) || ORPHAN_PATTERN.test(n)) unlinkQuiet(path.join(dir, n));
  try {
    fs.rmdirSync(dir);
  } catch {
    // files not ours remain: the directory stays with them
  }
  unlinkQuiet(image + GOTO_TMP_SUFFIX);
}

/** The snapshot store of one `file` node. */
export class FileSnapshotStore {
  private paths: StorePaths | null = null;

  /**
   * A store for `node`, whose image was opened as `filename`; nothing is read until first use.
   * @locking common
   */
  constructor(
    private readonly node: BlockNode,
    private readonly filename: string,
  ) {}

  /**
   * The snapshots in index order; none when the image has no store.
   * @locking global-state
   */
  list(bql: Bql): SnapshotInfo[] {
    assertBql(bql, 'file snapshot-list');
    return this.readIndex(this.where()).snapshots.map(toSnapshotInfo);
  }

  /**
   * Snapshots the image (open as `fd`): flush, clone, VM state, then the index (the commit point).
   * @locking global-state
   */
  create(bql: Bql, drained: DrainedProof, fd: number, info: SnapshotInfo): SnapshotInfo {
    this.enter(bql, drained, 'snapshot-create');
    const w = this.where();
    const index = this.readIndex(w);
    this.ensureDir(w);
    this.removeOrphans(w, index);
    this.checkSameFile(fd, w.image, 'snapshot-create');
    let diskSize: number;
    try {
      fs.fdatasyncSync(fd);
      diskSize = fs.fstatSync(fd).size;
    } catch (e) {
      throw this.fsError(e, 'snapshot-create (flush)', this.filename);
    }
    const id = nextSnapshotId(index.snapshots);
    const taken = referencedNames(index);
    const file = freeName(id, '.img', taken);
    taken.add(file);
    const pending = path.join(w.dir, PENDING_NAME);
    const created: string[] = [];
    let pendingTaken = false;
    let entry: StoredEntry;
    let step = 'clone the image';
    let stepFile = path.join(w.dir, file);
    try {
      const dst = path.join(w.dir, file);
      unlinkQuiet(dst);
      created.push(dst);
      cloneFile(w.image, dst);
      fsyncPath(dst);
      let vmStateFile: string | null = null;
      if (info.vmStateSize > 0) {
        vmStateFile = freeName(id, '.vmstate', taken);
        const vmDst = path.join(w.dir, vmStateFile);
        step = 'keep the VM state';
        stepFile = vmDst;
        unlinkQuiet(vmDst);
        created.push(vmDst);
        pendingTaken = this.takePending(pending, vmDst);
      }
      entry = {
        id,
        name: info.name,
        file,
        vmStateFile,
        vmStateSize: info.vmStateSize,
        dateSec: info.dateSec,
        dateNsec: info.dateNsec,
        vmClockNsec: info.vmClockNsec,
        icount: info.icount,
        diskSize,
        extra: {},
      };
      step = 'write the index';
      stepFile = w.index;
      this.writeIndexFile(w, { snapshots: [...index.snapshots, entry], extra: index.extra });
    } catch (e) {
      for (const p of created) unlinkQuiet(p);
      unlinkQuiet(path.join(w.dir, INDEX_TMP));
      throw this.fsError(e, `snapshot-create (${step})`, stepFile);
    }
    // committed: the pending VM state now belongs to the snapshot
    if (pendingTaken) unlinkQuiet(pending);
    const late = this.syncDirLate(w.dir, 'snapshot-create');
    if (late !== null) throw late;
    return toSnapshotInfo(entry);
  }

  /**
   * Replaces the image (open as `fd`) with a snapshot's clone, renamed over it; returns the new
   * image's descriptor. The snapshot's VM state becomes the pending VM state (none: no pending).
   * @locking global-state
   */
  goto(bql: Bql, drained: DrainedProof, fd: number, idOrName: string): GotoResult {
    this.enter(bql, drained, 'snapshot-goto');
    const w = this.where();
    const index = this.readIndex(w);
    const sn = findByIdOrName(index.snapshots, idOrName);
    if (sn === undefined) {
      throw new BlockError('ENOENT', `Snapshot '${idOrName}' not found in '${this.filename}' (index '${w.index}')`, {
        node: this.node.nodeName,
        file: w.index,
        value: idOrName,
        op: 'snapshot-goto',
      });
    }
    this.checkSameFile(fd, w.image, 'snapshot-goto');
    const src = path.join(w.dir, sn.file);
    let srcSize: number | undefined;
    try {
      srcSize = fs.statSync(src, { throwIfNoEntry: false })?.size;
    } catch (e) {
      throw this.fsError(e, 'snapshot-goto', src);
    }
    this.checkDiskFile(w, sn, index.snapshots.indexOf(sn), srcSize, src);
    const tmp = w.image + GOTO_TMP_SUFFIX;
    const pendingTmp = path.join(w.dir, PENDING_TMP);
    let newFd: number | null = null;
    let stepFile = tmp;
    try {
      unlinkQuiet(tmp);
      cloneFile(src, tmp);
      newFd = fs.openSync(tmp, 'r+');
      fs.fsyncSync(newFd);
      if (sn.vmStateFile !== null) {
        stepFile = pendingTmp;
        unlinkQuiet(pendingTmp);
        cloneFile(path.join(w.dir, sn.vmStateFile), pendingTmp);
        fsyncPath(pendingTmp);
      }
      stepFile = w.image;
      fs.renameSync(tmp, w.image); // the commit point
    } catch (e) {
      if (newFd !== null) closeQuiet(newFd);
      unlinkQuiet(tmp);
      unlinkQuiet(pendingTmp);
      throw this.fsError(e, 'snapshot-goto', stepFile);
    }
    let late = this.syncDirLate(path.dirname(w.image), 'snapshot-goto');
    const pending = path.join(w.dir, PENDING_NAME);
    try {
      if (sn.vmStateFile !== null) fs.renameSync(pendingTmp, pending);
      else fs.rmSync(pending, { force: true });
      fsyncDir(w.dir);
    } catch (e) {
      unlinkQuiet(pendingTmp);
      late ??= this.fsError(e, `snapshot-goto (the image shows snapshot '${sn.id}', its VM state could not be restored)`, pending);
    }
    return { fd: newFd, sizeBytes: sn.diskSize, info: toSnapshotInfo(sn), lateError: late };
  }

  /**
   * Deletes the first snapshot matching `id` and `name`: the index first, its files after.
   * @locking global-state
   */
  delete(bql: Bql, drained: DrainedProof, id: string | null, name: string | null): SnapshotInfo {
    this.enter(bql, drained, 'snapshot-delete');
    const w = this.where();
    const index = this.readIndex(w);
    const sn = findByIdAndName(index.snapshots, id, name);
    if (sn === undefined) {
      throw new BlockError('ENOENT', `Can't find the snapshot (id ${id ?? 'any'}, name ${name ?? 'any'}) in '${this.filename}' (index '${w.index}')`, {
        node: this.node.nodeName,
        file: w.index,
        value: name ?? id ?? '',
        op: 'snapshot-delete',
      });
    }
    const rest: StoredIndex = { snapshots: index.snapshots.filter((x) => x !== sn), extra: index.extra };
    try {
      this.writeIndexFile(w, rest);
    } catch (e) {
      unlinkQuiet(path.join(w.dir, INDEX_TMP));
      throw this.fsError(e, 'snapshot-delete (write the index)', w.index);
    }
    const late = this.syncDirLate(w.dir, 'snapshot-delete');
    unlinkQuiet(path.join(w.dir, sn.file));
    if (sn.vmStateFile !== null) unlinkQuiet(path.join(w.dir, sn.vmStateFile));
    this.removeOrphans(w, rest);
    if (late !== null) throw late;
    return toSnapshotInfo(sn);
  }

  /**
   * Opens a snapshot's disk read-only, for a read-only node to show instead of the image.
   * @locking global-state
   */
  openForLoadTmp(bql: Bql, id: string | null, name: string | null): LoadTmpResult {
    assertBql(bql, 'file snapshot-load-tmp');
    const w = this.where();
    const index = this.readIndex(w);
    const sn = findForLoadTmp(index.snapshots, id, name);
    if (sn === undefined) {
      throw new BlockError('ENOENT', `Can't find snapshot '${name ?? id ?? ''}' in '${this.filename}' (index '${w.index}')`, {
        node: this.node.nodeName,
        file: w.index,
        value: name ?? id ?? '',
        op: 'snapshot-load-tmp',
      });
    }
    const src = path.join(w.dir, sn.file);
    let fd: number;
    let size: number;
    try {
      fd = fs.openSync(src, 'r');
    } catch (e) {
      throw this.fsError(e, 'snapshot-load-tmp', src);
    }
    try {
      size = fs.fstatSync(fd).size;
      this.checkDiskFile(w, sn, index.snapshots.indexOf(sn), size, src);
    } catch (e) {
      closeQuiet(fd);
      throw this.fsError(e, 'snapshot-load-tmp', src);
    }
    return { fd, sizeBytes: size, info: toSnapshotInfo(sn), vmStatePath: sn.vmStateFile === null ? null : path.join(w.dir, sn.vmStateFile) };
  }

  /**
   * The pending VM-state file (it may not exist yet).
   * @locking io
   */
  pendingPath(): string {
    return path.join(this.where().dir, PENDING_NAME);
  }

  /**
   * Opens the pending VM-state file for writing, creating it (and the store directory) on demand.
   * @locking io
   */
  openPendingForWrite(): number {
    const w = this.where();
    const p = path.join(w.dir, PENDING_NAME);
    try {
      fs.mkdirSync(w.dir, { recursive: true });
      return fs.openSync(p, fs.constants.O_RDWR | fs.constants.O_CREAT, VMSTATE_MODE);
    } catch (e) {
      throw this.fsError(e, 'save-vmstate (open)', p);
    }
  }

  /**
   * Opens a VM-state file for reading (read-write when `writable`); null when it does not exist.
   * @locking io
   */
  openVmStateForRead(p: string, writable: boolean): number | null {
    try {
      return fs.openSync(p, writable ? 'r+' : 'r');
    } catch (e) {
      const c = sysCode(e);
      if (c === 'ENOENT' || c === 'ENOTDIR') return null;
      throw this.fsError(e, 'load-vmstate (open)', p);
    }
  }

  private enter(bql: Bql, drained: DrainedProof, op: string): void {
    assertBql(bql, `file ${op}`);
    assertDrained(bql, drained, this.node, `file ${op}`);
    if (this.node.readOnly) {
      throw new BlockError('EACCES', `${op} on node '${this.node.nodeName}': '${this.filename}' is open read-only`, {
        node: this.node.nodeName,
        file: this.filename,
        op,
      });
    }
  }

  /** The image's real path and its store, resolved on first use. */
  private where(): StorePaths {
    if (this.paths === null) {
      let image: string;
      try {
        image = fs.realpathSync(path.resolve(this.filename));
      } catch (e) {
        throw this.fsError(e, 'snapshot store (resolve the image path)', this.filename);
      }
      const dir = image + STORE_SUFFIX;
      this.paths = { image, dir, index: path.join(dir, INDEX_NAME) };
    }
    return this.paths;
  }

  /** The index; an empty one when there is no store. Refuses a damaged index before anything is written. */
  private readIndex(w: StorePaths): StoredIndex {
    let text: string;
    try {
      text = fs.readFileSync(w.index, 'utf8');
    } catch (e) {
      const c = sysCode(e);
      if (c === 'ENOENT') return { snapshots: [], extra: {} };
      if (c === 'ENOTDIR') {
        throw new BlockError('EINVAL', `Snapshot store '${w.dir}' of '${this.filename}' is not a directory`, { node: this.node.nodeName, file: w.dir, op: 'snapshot-index' });
      }
      throw this.fsError(e, 'snapshot-index (read)', w.index);
    }
    return parseIndex(text, w.index, this.node.nodeName);
  }

  /** Temp file, fsync, rename over the index: the commit point (the directory fsync comes after). */
  private writeIndexFile(w: StorePaths, index: StoredIndex): void {
    const tmp = path.join(w.dir, INDEX_TMP);
    const fd = fs.openSync(tmp, 'w', 0o644);
    try {
      fs.writeFileSync(fd, serializeIndex(index));
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    fs.renameSync(tmp, w.index);
  }

  /** fsync of a directory after a commit: a failure is reported, not rolled back. */
  private syncDirLate(dir: string, op: string): BlockError | null {
    try {
      fsyncDir(dir);
      return null;
    } catch (e) {
      return this.fsError(e, `${op} (committed; syncing the directory failed)`, dir);
    }
  }

  /** Creates the store directory and makes its entry durable. */
  private ensureDir(w: StorePaths): void {
    try {
      fs.mkdirSync(w.dir, { recursive: true });
      if (!fs.statSync(w.dir).isDirectory()) {
        throw new BlockError('EINVAL', `Snapshot store '${w.dir}' of '${this.filename}' is not a directory`, { node: this.node.nodeName, file: w.dir, op: 'snapshot-create' });
      }
      fsyncDir(path.dirname(w.dir));
    } catch (e) {
      throw this.fsError(e, 'snapshot-create (store directory)', w.dir);
    }
  }

  /** Best-effort: removes files of ours that `index` does not reference (left by a crash). */
  private removeOrphans(w: StorePaths, index: StoredIndex): void {
    unlinkQuiet(w.image + GOTO_TMP_SUFFIX);
    let names: string[];
    try {
      names = fs.readdirSync(w.dir);
    } catch {
      return;
    }
    const keep = referencedNames(index);
    for (const n of names) {
      if (n === INDEX_NAME || n === PENDING_NAME || keep.has(n) || !ORPHAN_PATTERN.test(n)) continue;
      unlinkQuiet(path.join(w.dir, n));
    }
  }

  /** Moves the pending VM state to `dst` (a hard link, so a failure leaves it in place); true if there was one. */
  private takePending(pending: string, dst: string): boolean {
    let had = true;
    try {
      fsyncPath(pending);
    } catch (e) {
      if (sysCode(e) !== 'ENOENT') throw e;
      had = false;
    }
    if (had) {
      try {
        fs.linkSync(pending, dst);
      } catch {
        cloneFile(pending, dst); // filesystems without hard links
        fsyncPath(dst);
      }
    } else {
      fs.closeSync(fs.openSync(dst, 'wx', VMSTATE_MODE)); // VM state never saved: it reads as zeros
      fsyncPath(dst);
    }
    return had;
  }

  /** The image must still be the file the node opened: goto and create work through its path. */
  private checkSameFile(fd: number, image: string, op: string): void {
    let same: boolean;
    try {
      const a = fs.fstatSync(fd);
      const b = fs.statSync(image);
      same = a.ino === b.ino && a.dev === b.dev;
    } catch (e) {
      throw this.fsError(e, op, image);
    }
    if (!same) {
      throw new BlockError('EIO', `${op} on node '${this.node.nodeName}': '${image}' is no longer the file the node opened (replaced by another program?)`, {
        node: this.node.nodeName,
        file: image,
        op,
      });
    }
  }

  /** A snapshot's disk must exist and have the length its index entry records. */
  private checkDiskFile(w: StorePaths, sn: StoredEntry, i: number, size: number | undefined, file: string): void {
    if (size === undefined) {
      throw new BlockError('ENOENT', `Snapshot '${sn.id}' of '${this.filename}': its disk '${file}' is missing (field 'snapshots[${i}].file' of '${w.index}')`, {
        node: this.node.nodeName,
        file,
        field: `snapshots[${i}].file`,
      });
    }
    if (size !== sn.diskSize) {
      throw new BlockError('EINVAL', `Snapshot '${sn.id}' of '${this.filename}': '${file}' holds ${size} bytes but field 'snapshots[${i}].diskSize' of '${w.index}' records ${sn.diskSize}`, {
        node: this.node.nodeName,
        file,
        field: `snapshots[${i}].diskSize`,
        value: size,
      });
    }
  }

  private fsError(e: unknown, op: string, file: string): BlockError {
    return fromSystemError(e, op, { node: this.node.nodeName, file });
  }
}

/**
 * The VM-state file a `file` node reads and writes: the pending one, or, after load-temporary,
 * the shown snapshot's (read-only). Its descriptor is opened on first use and kept.
 */
export class VmStateSidecar {
  private fd: number | null = null;
  /** undefined: the pending file; a path: a snapshot's VM state (load-tmp); null: none (zeros). */
  private shown: string | null | undefined = undefined;

  /**
   * The VM state of `store`'s image; `readOnly` nodes never create or write it.
   * @locking common
   */
  constructor(
    private readonly store: FileSnapshotStore,
    private readonly readOnly: boolean,
  ) {}

  /**
   * The descriptor VM-state reads use, or null when there is no file (the bytes read as zeros).
   * @locking io
   */
  readFd(): number | null {
    if (this.fd !== null) return this.fd;
    const p = this.shown === undefined ? this.store.pendingPath() : this.shown;
    if (p === null) return null;
    this.fd = this.store.openVmStateForRead(p, !this.readOnly && this.shown === undefined);
    return this.fd;
  }

  /**
   * The descriptor VM-state writes use: the pending file, created on demand.
   * @locking io
   */
  writeFd(): number {
    if (this.readOnly || this.shown !== undefined) {
      throw new BlockError('EPERM', `save-vmstate: the VM state of '${this.store.pendingPath()}' is read-only on this node`, { op: 'save-vmstate', file: this.store.pendingPath() });
    }
    if (this.fd === null) this.fd = this.store.openPendingForWrite();
    return this.fd;
  }

  /**
   * Forgets the open descriptor (the next access reopens the file); returns it for the caller to close.
   * @locking global-state
   */
  release(bql: Bql): number | null {
    assertBql(bql, 'file vmstate release');
    const fd = this.fd;
    this.fd = null;
    return fd;
  }

  /**
   * Makes VM-state reads come from a snapshot's file (null: zeros); returns the old descriptor.
   * @locking global-state
   */
  show(bql: Bql, vmStatePath: string | null): number | null {
    const fd = this.release(bql);
    this.shown = vmStatePath;
    return fd;
  }
}

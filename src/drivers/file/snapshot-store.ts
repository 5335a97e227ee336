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
 * leads to one image finds the same store. The index format is snapshot-index.ts.
 *
 * Crash safety (proven under the power-loss simulator, test/raw-snapshot-crash.test.ts): the index
 * is written to `index.json.tmp`, fsynced, renamed over `index.json`, and the directory fsynced; a
 * snapshot exists exactly when the index lists it. Every file an operation needs is written and
 * fsynced, and the directory holding its name fsynced, before the index switches; files an
 * operation drops are unlinked after, so a crash leaves at worst orphan files: they are never
 * listed and are removed (best-effort) by the next create or delete. Goto replaces the image by
 * renaming a fsynced clone over it, so the image holds the old or the new contents, whole. An
 * index that cannot be read, is damaged or has an unknown version is refused (EINVAL naming the
 * file and the field) and never rewritten, and no file of its store is touched.
 *
 * Global-state code (BQL held; create, goto and delete on a drained node), except the VM-state
 * descriptor lookups, which the I/O callbacks make. The work is synchronous file-system calls
 * (through StoreFs) on the main loop: the node is drained, so nothing waits on its requests.
 */
import path from 'node:path';
import { assertBql, type Bql } from '../../block/bql.js';
import { assertDrained, type DrainedProof } from '../../block/drain.js';
import type { SnapshotInfo } from '../../block/driver.js';
import { BlockError, fromSystemError } from '../../block/errors.js';
import type { BlockNode } from '../../block/node.js';
import { findByIdAndName, findByIdOrName, findForLoadTmp, nextSnapshotId, toSnapshotInfo } from '../snapshot-lookup.js';
import {
  freeName,
  GOTO_TMP_SUFFIX,
  INDEX_NAME,
  INDEX_TMP,
  ORPHAN_PATTERN,
  parseIndex,
  PENDING_NAME,
  PENDING_TMP,
  referencedNames,
  RESERVED,
  serializeIndex,
  STORE_SUFFIX,
  VMSTATE_MODE,
  type StoredEntry,
  type StoredIndex,
} from './snapshot-index.js';
import { hostStoreFs, systemErrorCode, type StoreFs } from './store-fs.js';

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

function unlinkQuiet(sfs: StoreFs, p: string): void {
  try {
    sfs.unlink(p);
  } catch {
    // best-effort: an orphan left here is removed by the next create or delete
  }
}

function closeQuiet(sfs: StoreFs, fd: number): void {
  try {
    sfs.close(fd);
  } catch {
    // the descriptor is gone either way
  }
}

function fsyncPath(sfs: StoreFs, p: string): void {
  const fd = sfs.open(p, 'r+');
  try {
    sfs.fsync(fd);
  } finally {
    sfs.close(fd);
  }
}

/**
 * Removes a host file's snapshot store (the files of ours in it, then the directory when empty):
 * an image created anew over an old one must not inherit the old one's snapshots.
 * @locking global-state
 */
export function discardSnapshotStore(bql: Bql, filename: string, sfs: StoreFs = hostStoreFs): void {
  assertBql(bql, 'discardSnapshotStore');
  let image: string;
  try {
    image = sfs.realpath(filename);
  } catch {
    image = path.resolve(filename);
  }
  const dir = image + STORE_SUFFIX;
  let names: string[];
  try {
    names = sfs.readdir(dir);
  } catch {
    return;
  }
  for (const n of names) if (RESERVED.has(n) || ORPHAN_PATTERN.test(n)) unlinkQuiet(sfs, path.join(dir, n));
  try {
    sfs.rmdir(dir);
  } catch {
    // files not ours remain: the directory stays with them
  }
  unlinkQuiet(sfs, image + GOTO_TMP_SUFFIX);
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
    /** The file system it works on: the host's, or a power-loss simulator in tests. */
    private readonly sfs: StoreFs = hostStoreFs,
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
      this.sfs.fdatasync(fd);
      diskSize = this.sfs.fstat(fd).size;
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
      unlinkQuiet(this.sfs, dst);
      created.push(dst);
      this.sfs.clone(w.image, dst);
      fsyncPath(this.sfs, dst);
      let vmStateFile: string | null = null;
      if (info.vmStateSize > 0) {
        vmStateFile = freeName(id, '.vmstate', taken);
        const vmDst = path.join(w.dir, vmStateFile);
        step = 'keep the VM state';
        stepFile = vmDst;
        unlinkQuiet(this.sfs, vmDst);
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
      // the names of the clone and the VM-state file must be durable before the index lists them
      // (found by the power-loss simulator: without it a crash could keep the index's rename and
      // lose the clone's name, leaving a listed snapshot without its disk)
      step = 'sync the store directory';
      stepFile = w.dir;
      this.sfs.fsyncDir(w.dir);
      step = 'write the index';
      stepFile = w.index;
      this.writeIndexFile(w, { snapshots: [...index.snapshots, entry], extra: index.extra });
    } catch (e) {
      for (const p of created) unlinkQuiet(this.sfs, p);
      unlinkQuiet(this.sfs, path.join(w.dir, INDEX_TMP));
      throw this.fsError(e, `snapshot-create (${step})`, stepFile);
    }
    // committed: the pending VM state now belongs to the snapshot
    if (pendingTaken) unlinkQuiet(this.sfs, pending);
    const late = this.syncDirLate(w.dir, 'snapshot-create');
    if (late !== null) throw late;
    return toSnapshotInfo(entry);
  }

  /**
   * Replaces the image (open as `fd`) with a snapshot's clone, renamed over it; returns the new
   * image's descriptor. The snapshot's VM state becomes the pending VM state (none: no pending).
   * `beforeCommit` runs on the finished clone just before it is renamed over the image (the
   * image lock moves to it there, so the new file is never visible unlocked); a throw aborts.
   * @locking global-state
   */
  goto(bql: Bql, drained: DrainedProof, fd: number, idOrName: string, beforeCommit?: (clonePath: string) => void): GotoResult {
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
      srcSize = this.sfs.stat(src)?.size;
    } catch (e) {
      throw this.fsError(e, 'snapshot-goto', src);
    }
    this.checkDiskFile(w, sn, index.snapshots.indexOf(sn), srcSize, src);
    const tmp = w.image + GOTO_TMP_SUFFIX;
    const pendingTmp = path.join(w.dir, PENDING_TMP);
    let newFd: number | null = null;
    let stepFile = tmp;
    try {
      unlinkQuiet(this.sfs, tmp);
      this.sfs.clone(src, tmp);
      newFd = this.sfs.open(tmp, 'r+');
      this.sfs.fsync(newFd);
      if (sn.vmStateFile !== null) {
        stepFile = pendingTmp;
        unlinkQuiet(this.sfs, pendingTmp);
        this.sfs.clone(path.join(w.dir, sn.vmStateFile), pendingTmp);
        fsyncPath(this.sfs, pendingTmp);
      }
      stepFile = tmp;
      beforeCommit?.(tmp);
      stepFile = w.image;
      this.sfs.rename(tmp, w.image); // the commit point
    } catch (e) {
      if (newFd !== null) closeQuiet(this.sfs, newFd);
      unlinkQuiet(this.sfs, tmp);
      unlinkQuiet(this.sfs, pendingTmp);
      throw this.fsError(e, 'snapshot-goto', stepFile);
    }
    let late = this.syncDirLate(path.dirname(w.image), 'snapshot-goto');
    const pending = path.join(w.dir, PENDING_NAME);
    try {
      if (sn.vmStateFile !== null) this.sfs.rename(pendingTmp, pending);
      else if (this.sfs.stat(pending) !== undefined) this.sfs.unlink(pending);
      this.sfs.fsyncDir(w.dir);
    } catch (e) {
      unlinkQuiet(this.sfs, pendingTmp);
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
      unlinkQuiet(this.sfs, path.join(w.dir, INDEX_TMP));
      throw this.fsError(e, 'snapshot-delete (write the index)', w.index);
    }
    const late = this.syncDirLate(w.dir, 'snapshot-delete');
    unlinkQuiet(this.sfs, path.join(w.dir, sn.file));
    if (sn.vmStateFile !== null) unlinkQuiet(this.sfs, path.join(w.dir, sn.vmStateFile));
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
      fd = this.sfs.open(src, 'r');
    } catch (e) {
      throw this.fsError(e, 'snapshot-load-tmp', src);
    }
    try {
      size = this.sfs.fstat(fd).size;
      this.checkDiskFile(w, sn, index.snapshots.indexOf(sn), size, src);
    } catch (e) {
      closeQuiet(this.sfs, fd);
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
   * @host-files the first saveVmstate (an I/O callback) creates the pending VM-state file; no index refers to it until a snapshot create, under the BQL, takes it
   */
  openPendingForWrite(): number {
    const w = this.where();
    const p = path.join(w.dir, PENDING_NAME);
    try {
      this.sfs.mkdirp(w.dir);
      return this.sfs.open(p, 'rw-create', VMSTATE_MODE);
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
      return this.sfs.open(p, writable ? 'r+' : 'r');
    } catch (e) {
      const c = systemErrorCode(e);
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
        image = this.sfs.realpath(path.resolve(this.filename));
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
      text = this.sfs.readText(w.index);
    } catch (e) {
      const c = systemErrorCode(e);
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
    const fd = this.sfs.open(tmp, 'w', 0o644);
    try {
      this.sfs.write(fd, Buffer.from(serializeIndex(index), 'utf8'), 0);
      this.sfs.fsync(fd);
    } finally {
      this.sfs.close(fd);
    }
    this.sfs.rename(tmp, w.index);
  }

  /** fsync of a directory after a commit: a failure is reported, not rolled back. */
  private syncDirLate(dir: string, op: string): BlockError | null {
    try {
      this.sfs.fsyncDir(dir);
      return null;
    } catch (e) {
      return this.fsError(e, `${op} (committed; syncing the directory failed)`, dir);
    }
  }

  /** Creates the store directory and makes its entry durable. */
  private ensureDir(w: StorePaths): void {
    try {
      this.sfs.mkdirp(w.dir);
      if (this.sfs.stat(w.dir)?.isDirectory !== true) {
        throw new BlockError('EINVAL', `Snapshot store '${w.dir}' of '${this.filename}' is not a directory`, { node: this.node.nodeName, file: w.dir, op: 'snapshot-create' });
      }
      this.sfs.fsyncDir(path.dirname(w.dir));
    } catch (e) {
      throw this.fsError(e, 'snapshot-create (store directory)', w.dir);
    }
  }

  /** Best-effort: removes files of ours that `index` does not reference (left by a crash). */
  private removeOrphans(w: StorePaths, index: StoredIndex): void {
    unlinkQuiet(this.sfs, w.image + GOTO_TMP_SUFFIX);
    let names: string[];
    try {
      names = this.sfs.readdir(w.dir);
    } catch {
      return;
    }
    const keep = referencedNames(index);
    for (const n of names) {
      if (n === INDEX_NAME || n === PENDING_NAME || keep.has(n) || !ORPHAN_PATTERN.test(n)) continue;
      unlinkQuiet(this.sfs, path.join(w.dir, n));
    }
  }

  /** Moves the pending VM state to `dst` (a hard link, so a failure leaves it in place); true if there was one. */
  private takePending(pending: string, dst: string): boolean {
    let had = true;
    try {
      fsyncPath(this.sfs, pending);
    } catch (e) {
      if (systemErrorCode(e) !== 'ENOENT') throw e;
      had = false;
    }
    if (had) {
      try {
        this.sfs.link(pending, dst);
      } catch {
        this.sfs.clone(pending, dst); // filesystems without hard links
        fsyncPath(this.sfs, dst);
      }
    } else {
      this.sfs.close(this.sfs.open(dst, 'wx', VMSTATE_MODE)); // VM state never saved: it reads as zeros
      fsyncPath(this.sfs, dst);
    }
    return had;
  }

  /** The image must still be the file the node opened: goto and create work through its path. */
  private checkSameFile(fd: number, image: string, op: string): void {
    let same: boolean;
    try {
      const a = this.sfs.fstat(fd);
      const b = this.sfs.stat(image);
      same = b !== undefined && a.ino === b.ino && a.dev === b.dev;
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


/**
 * Protocol driver `file`: a host file. The main loop opens it; the blocking transfers (pread,
 * pwrite, fdatasync, ftruncate) run on the node's IOThread or the default pool, directly into
 * and out of the caller's memory when it is shared.
 *
 * Option `aio=threads` (default) or `aio=sync`: with `sync` the transfers run on the main loop
 * itself (blocking syscalls, no thread handoff), which suits one-shot tools such as `snapstack
 * img` where nothing else waits on the loop and a worker's start-up would dominate.
 *
 * Reads past the end of the file return zeros and writes past it grow the file, as QEMU's
 * file-posix does. Discard is accepted and ignored (Node has no hole punching); it is a hint.
 *
 * Internal snapshots (which QEMU refuses on raw images) live beside the image, in
 * `<image>.snapshots/` (file-snapshots.ts): create clones the image there, goto renames a clone
 * of the snapshot over the image and reopens the node's descriptor on it, load-tmp points a
 * read-only node's descriptor at the snapshot's clone. VM state goes to a sidecar file there.
 * A raw node reaches all of this through the generic snapshot fallback.
 */
import fs from 'node:fs';
import { assertBql, type Bql } from '../block/bql.js';
import { assertDrained, type DrainedProof } from '../block/drain.js';
import { registerDriver, type BlockDriver, type BlockDriverInstance, type SnapshotInfo, type WriteZeroesFlags } from '../block/driver.js';
import { BlockError, fromSystemError } from '../block/errors.js';
import { submitFlush, submitRead, submitTruncate, submitWrite, submitWriteZeroes, type IOThread } from '../block/iothread.js';
import type { BlockNode } from '../block/node.js';
import type { NodeOptions } from '../block/options.js';
import { discardSnapshotStore, FileSnapshotStore, VmStateSidecar } from './file-snapshots.js';

/** An open file node. */
class FileInstance implements BlockDriverInstance {
  private what: { read: string; write: string; zero: string; flush: string; truncate: string; vmSave: string; vmLoad: string };
  /** Transfers this instance submitted to a worker and that have not completed. */
  private active = 0;
  /** Descriptors replaced while a transfer may still use them: closed once none is active. */
  private readonly retired: number[] = [];
  /** The internal snapshots kept beside the image. */
  private readonly store: FileSnapshotStore;
  /** Where saveVmstate / loadVmstate go. */
  protected readonly vm: VmStateSidecar;

  constructor(
    protected readonly node: BlockNode,
    /** The image's descriptor; goto and load-tmp replace it (the node is drained or read-only). */
    protected fd: number,
    protected readonly filename: string,
    private readonly ioThread: IOThread | null,
    private sizeBytes: number,
  ) {
    this.what = labels(`'${filename}'`);
    this.store = new FileSnapshotStore(node, filename);
    this.vm = new VmStateSidecar(this.store, node.readOnly);
  }

  /**
   * pread on the IOThread; zeros past the end of the file.
   * @locking io
   */
  async preadv(offset: number, buf: Uint8Array): Promise<void> {
    this.active++;
    try {
      await submitRead(this.ioThread, this.fd, buf, offset, this.what.read);
    } finally {
      this.settle();
    }
  }

  /**
   * pwrite on the IOThread; the file grows when written past its end.
   * @locking io
   */
  async pwritev(offset: number, buf: Uint8Array): Promise<void> {
    const end = offset + buf.length;
    if (buf.length > 0 && end > this.sizeBytes) this.sizeBytes = end;
    this.active++;
    try {
      await submitWrite(this.ioThread, this.fd, buf, offset, this.what.write);
    } finally {
      this.settle();
    }
  }

  /**
   * Writes zeros (from a buffer the worker keeps) on the IOThread.
   * @locking io
   */
  async pwriteZeroes(offset: number, bytes: number, _flags: WriteZeroesFlags): Promise<void> {
    const end = offset + bytes;
    if (bytes > 0 && end > this.sizeBytes) this.sizeBytes = end;
    this.active++;
    try {
      await submitWriteZeroes(this.ioThread, this.fd, bytes, offset, this.what.zero);
    } finally {
      this.settle();
    }
  }

  /**
   * A hint that Node cannot act on (no fallocate): accepted, nothing changes.
   * @locking io
   */
  pdiscard(_offset: number, _bytes: number): Promise<void> {
    return Promise.resolve();
  }

  /**
   * fdatasync on the IOThread.
   * @locking io
   */
  async flush(): Promise<void> {
    this.active++;
    try {
      await submitFlush(this.ioThread, this.fd, this.what.flush);
    } finally {
      this.settle();
    }
  }

  /** Grows the recorded length after a transfer of `bytes` at `offset` (none for empty ones). */
  protected noteEnd(offset: number, bytes: number): void {
    if (bytes > 0 && offset + bytes > this.sizeBytes) this.sizeBytes = offset + bytes;
  }

  /** Records a new length (after a truncate). */
  protected setLength(sizeBytes: number): void {
    this.sizeBytes = sizeBytes;
  }

  /**
   * The file's length as this node last set or saw it.
   * @locking io
   */
  getLength(): number {
    return this.sizeBytes;
  }

  /**
   * ftruncate on the IOThread.
   * @locking io
   */
  async truncate(sizeBytes: number): Promise<void> {
    this.active++;
    try {
      await submitTruncate(this.ioThread, this.fd, sizeBytes, this.what.truncate);
    } finally {
      this.settle();
    }
    this.sizeBytes = sizeBytes;
  }

  /**
   * Writes VM state at `pos` of the pending sidecar file (`<image>.snapshots/pending.vmstate`).
   * @locking io
   */
  async saveVmstate(buf: Uint8Array, pos: number): Promise<void> {
    const fd = this.vm.writeFd();
    this.active++;
    try {
      await submitWrite(this.ioThread, fd, buf, pos, this.what.vmSave);
    } finally {
      this.settle();
    }
  }

  /**
   * Reads VM state at `pos` of the pending sidecar file (a shown snapshot's after load-tmp); zeros where none was saved.
   * @locking io
   */
  async loadVmstate(buf: Uint8Array, pos: number): Promise<void> {
    const fd = this.vm.readFd();
    if (fd === null) {
      buf.fill(0);
      return;
    }
    this.active++;
    try {
      await submitRead(this.ioThread, fd, buf, pos, this.what.vmLoad);
    } finally {
      this.settle();
    }
  }

  /**
   * Snapshots the image into its store beside it (clone, VM state, index); the node is drained.
   * @locking global-state
   */
  async snapshotCreate(bql: Bql, drained: DrainedProof, info: SnapshotInfo): Promise<SnapshotInfo> {
    this.enterDrained(bql, drained, 'snapshot-create');
    this.retire(this.vm.release(bql)); // the pending VM state becomes the snapshot's
    return this.store.create(bql, drained, this.fd, info);
  }

  /**
   * Replaces the image with a snapshot's clone (atomic rename) and reopens it; the node is drained.
   * @locking global-state
   */
  async snapshotGoto(bql: Bql, drained: DrainedProof, idOrName: string): Promise<void> {
    this.enterDrained(bql, drained, 'snapshot-goto');
    this.retire(this.vm.release(bql)); // the snapshot's VM state becomes the pending one
    const r = this.store.goto(bql, drained, this.fd, idOrName);
    this.retire(this.fd);
    this.fd = r.fd;
    this.sizeBytes = r.sizeBytes;
    if (r.lateError !== null) throw r.lateError;
  }

  /**
   * Deletes the first snapshot matching `id` and `name` (index first, then its files).
   * @locking global-state
   */
  async snapshotDelete(bql: Bql, drained: DrainedProof, id: string | null, name: string | null): Promise<SnapshotInfo> {
    this.enterDrained(bql, drained, 'snapshot-delete');
    return this.store.delete(bql, drained, id, name);
  }

  /**
   * The snapshots in the store's index, in order (none without a store).
   * @locking global-state
   */
  async snapshotList(bql: Bql): Promise<SnapshotInfo[]> {
    assertBql(bql, 'file snapshot-list');
    return this.store.list(bql);
  }

  /**
   * On a read-only node: reads (and VM-state reads) come from a snapshot's files from now on.
   * @locking global-state
   */
  async snapshotLoadTmp(bql: Bql, id: string | null, name: string | null): Promise<void> {
    assertBql(bql, 'file snapshot-load-tmp');
    if (!this.node.readOnly) {
      throw new BlockError('EINVAL', `Device '${this.node.nodeName}' is not read-only: a snapshot of '${this.filename}' can only be loaded temporarily on a read-only node`, {
        node: this.node.nodeName,
        file: this.filename,
        op: 'snapshot-load-tmp',
      });
    }
    const r = this.store.openForLoadTmp(bql, id, name);
    // reads may be in flight (the node is not drained): the old descriptors close when they end
    this.retire(this.fd);
    this.fd = r.fd;
    this.sizeBytes = r.sizeBytes;
    this.retire(this.vm.show(bql, r.vmStatePath));
    this.what = labels(`'${this.filename}' (snapshot '${r.info.name}')`);
  }

  /**
   * Closes the file descriptors; the node is drained, so no transfer uses them.
   * @locking global-state
   */
  async close(bql: Bql, _drained: DrainedProof): Promise<void> {
    for (const fd of this.retired.splice(0)) closeQuiet(fd);
    const vmFd = this.vm.release(bql);
    if (vmFd !== null) closeQuiet(vmFd);
    try {
      fs.closeSync(this.fd);
    } catch (e) {
      throw fromSystemError(e, 'close', { node: this.node.nodeName, file: this.filename });
    }
  }

  private enterDrained(bql: Bql, drained: DrainedProof, op: string): void {
    assertBql(bql, `file ${op}`);
    assertDrained(bql, drained, this.node, `file ${op}`);
  }

  /** One worker transfer ended: close the retired descriptors when none is left. */
  private settle(): void {
    if (--this.active === 0 && this.retired.length > 0) for (const fd of this.retired.splice(0)) closeQuiet(fd);
  }

  /** Closes `fd` now, or when the transfers still in flight have ended. */
  private retire(fd: number | null): void {
    if (fd === null) return;
    if (this.active === 0) closeQuiet(fd);
    else this.retired.push(fd);
  }
}

function labels(where: string): { read: string; write: string; zero: string; flush: string; truncate: string; vmSave: string; vmLoad: string } {
  return {
    read: `read ${where}`,
    write: `write ${where}`,
    zero: `write-zeroes ${where}`,
    flush: `flush ${where}`,
    truncate: `truncate ${where}`,
    vmSave: `save-vmstate ${where}`,
    vmLoad: `load-vmstate ${where}`,
  };
}

function closeQuiet(fd: number): void {
  try {
    fs.closeSync(fd);
  } catch {
    // a descriptor that was replaced: nothing more to do with it
  }
}

/** Reads `buf.length` bytes at `offset` of `fd`; zeros past the end of the file. */
function readFully(fd: number, buf: Uint8Array, offset: number): void {
  let done = 0;
  while (done < buf.length) {
    const n = fs.readSync(fd, buf, done, buf.length - done, offset + done);
    if (n === 0) break;
    done += n;
  }
  if (done < buf.length) buf.fill(0, done);
}

/** Writes all of `buf` at `offset` of `fd`. */
function writeFully(fd: number, buf: Uint8Array, offset: number): void {
  for (let done = 0; done < buf.length; ) done += fs.writeSync(fd, buf, done, buf.length - done, offset + done);
}

/** A file node whose transfers run synchronously on the main loop (`aio=sync`). */
class SyncFileInstance extends FileInstance {
  private zeroChunk: Uint8Array | null = null;

  constructor(node: BlockNode, fd: number, filename: string, sizeBytes: number) {
    super(node, fd, filename, null, sizeBytes);
  }

  private fail(e: unknown, op: string): BlockError {
    return fromSystemError(e, op, { file: this.filename, op });
  }

  /**
   * pread on the main loop; zeros past the end of the file.
   * @locking io
   */
  override async preadv(offset: number, buf: Uint8Array): Promise<void> {
    try {
      readFully(this.fd, buf, offset);
    } catch (e) {
      throw this.fail(e, 'read');
    }
  }

  /**
   * pwrite on the main loop.
   * @locking io
   */
  override async pwritev(offset: number, buf: Uint8Array): Promise<void> {
    try {
      writeFully(this.fd, buf, offset);
    } catch (e) {
      throw this.fail(e, 'write');
    }
    this.noteEnd(offset, buf.length);
  }

  /**
   * Writes zeros from a reused buffer on the main loop.
   * @locking io
   */
  override async pwriteZeroes(offset: number, bytes: number, _flags: WriteZeroesFlags): Promise<void> {
    const chunk = (this.zeroChunk ??= new Uint8Array(1 << 20));
    try {
      for (let done = 0; done < bytes; ) {
        const n = Math.min(chunk.length, bytes - done);
        done += fs.writeSync(this.fd, chunk, 0, n, offset + done);
      }
    } catch (e) {
      throw this.fail(e, 'write-zeroes');
    }
    this.noteEnd(offset, bytes);
  }

  /**
   * fdatasync on the main loop.
   * @locking io
   */
  override async flush(): Promise<void> {
    try {
      fs.fdatasyncSync(this.fd);
    } catch (e) {
      throw this.fail(e, 'flush');
    }
  }

  /**
   * ftruncate on the main loop.
   * @locking io
   */
  override async truncate(sizeBytes: number): Promise<void> {
    try {
      fs.ftruncateSync(this.fd, sizeBytes);
    } catch (e) {
      throw this.fail(e, 'truncate');
    }
    this.setLength(sizeBytes);
  }

  /**
   * Writes VM state into the pending sidecar file on the main loop.
   * @locking io
   */
  override async saveVmstate(buf: Uint8Array, pos: number): Promise<void> {
    const fd = this.vm.writeFd();
    try {
      writeFully(fd, buf, pos);
    } catch (e) {
      throw this.fail(e, 'save-vmstate');
    }
  }

  /**
   * Reads VM state from the pending sidecar file (or a shown snapshot's) on the main loop.
   * @locking io
   */
  override async loadVmstate(buf: Uint8Array, pos: number): Promise<void> {
    const fd = this.vm.readFd();
    if (fd === null) {
      buf.fill(0);
      return;
    }
    try {
      readFully(fd, buf, pos);
    } catch (e) {
      throw this.fail(e, 'load-vmstate');
    }
  }
}

/** The `file` protocol driver. */
export const fileDriver: BlockDriver = {
  formatName: 'file',
  kind: 'protocol',
  /**
   * Opens `filename` read-write (or read-only) on the main loop.
   * @locking global-state
   */
  async open(_bql: Bql, node: BlockNode, opts: NodeOptions): Promise<BlockDriverInstance> {
    const filename = opts['filename'];
    if (filename === undefined || filename === '') {
      throw new BlockError('EINVAL', `Parameter 'filename' is required for driver 'file' (node '${node.nodeName}')`, {
        node: node.nodeName,
        field: 'filename',
      });
    }
    let fd: number;
    try {
      fd = fs.openSync(filename, node.readOnly ? 'r' : 'r+');
    } catch (e) {
      const err = fromSystemError(e, 'open', { node: node.nodeName, file: filename });
      throw new BlockError(err.code, `Could not open '${filename}': ${describeErrno(e)}`, { node: node.nodeName, file: filename, op: 'open', cause: e });
    }
    let size: number;
    try {
      const st = fs.fstatSync(fd);
      if (st.isDirectory()) throw new BlockError('EINVAL', `Could not open '${filename}': it is a directory`, { node: node.nodeName, file: filename });
      size = st.size;
    } catch (e) {
      fs.closeSync(fd);
      throw fromSystemError(e, 'open', { node: node.nodeName, file: filename });
    }
    const aio = opts['aio'] ?? 'threads';
    if (aio === 'sync') {
      if (node.ioThread !== null) {
        fs.closeSync(fd);
        throw new BlockError('EINVAL', `aio=sync runs on the main loop and cannot be bound to IOThread '${node.ioThread.id}' (node '${node.nodeName}')`, {
          node: node.nodeName,
          field: 'aio',
        });
      }
      return new SyncFileInstance(node, fd, filename, size);
    }
    if (aio !== 'threads') {
      fs.closeSync(fd);
      throw new BlockError('EINVAL', `Invalid value '${aio}' for option 'aio' of driver 'file' (threads or sync)`, { node: node.nodeName, field: 'aio', value: aio });
    }
    return new FileInstance(node, fd, filename, node.ioThread, size);
  },
};

function describeErrno(e: unknown): string {
  const code = typeof e === 'object' && e !== null && 'code' in e ? String((e as { code: unknown }).code) : '';
  switch (code) {
    case 'ENOENT':
      return 'No such file or directory';
    case 'EACCES':
      return 'Permission denied';
    case 'EISDIR':
      return 'Is a directory';
    default:
      return e instanceof Error ? e.message : String(e);
  }
}

/**
 * Creates (or truncates) a host file of `sizeBytes` bytes, sparse, as `qemu-img create -f raw`.
 * The snapshots of an image it replaces (the `<file>.snapshots` store) are removed with it.
 * @locking common
 */
export function createRawFile(filename: string, sizeBytes: number): void {
  try {
    const fd = fs.openSync(filename, 'w');
    try {
      fs.ftruncateSync(fd, sizeBytes);
    } finally {
      fs.closeSync(fd);
    }
  } catch (e) {
    throw fromSystemError(e, 'create', { file: filename });
  }
  discardSnapshotStore(filename);
}

registerDriver(fileDriver);

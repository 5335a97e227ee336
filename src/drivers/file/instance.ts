/**
 * The `file` driver's open node with aio=threads: the blocking transfers (pread, pwrite,
 * fdatasync, ftruncate) run on the node's IOThread or the default pool, directly into and out of
 * the caller's memory when it is shared. Snapshot callbacks go to the store beside the image
 * (snapshot-store.ts), VM state to its sidecar (vmstate-sidecar.ts); the image lock
 * (image-lock.ts) is held from open to close and follows the image through a goto.
 *
 * Small reads may run on the main loop itself when nothing else of the node is in flight
 * (`inline-reads`, inline-reads.ts): no hand-off, as io_uring completes a cached read inline.
 *
 * I/O callbacks (preadv, pwritev, ...) run alongside each other; snapshot callbacks and close are
 * global-state code on a drained node.
 */
import fs from 'node:fs';
import { assertBql, type Bql } from '../../block/bql.js';
import { assertDrained, type DrainedProof } from '../../block/drain.js';
import type { BlockDriverInstance, SnapshotInfo, WriteZeroesFlags } from '../../block/driver.js';
import { BlockError, fromSystemError } from '../../block/errors.js';
import { submitFlush, submitRead, submitTruncate, submitWrite, submitWriteZeroes, type IOThread } from '../../block/iothread.js';
import { mainTurnBudgetLeft, yieldMainTurn } from '../../block/main-turn.js';
import type { BlockNode } from '../../block/node.js';
import { readFullySync } from '../../block/sync-transfer.js';
import type { ImageLock, LockMove } from './image-lock.js';
import { InlineReadPolicy, type ReadPathStats } from './inline-reads.js';
import { FileSnapshotStore, type GotoResult } from './snapshot-store.js';
import { VmStateSidecar } from './vmstate-sidecar.js';

/** An open file node. */
export class FileInstance implements BlockDriverInstance {
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
    /** The image's lock bytes (null with locking=off); moved to the new file by goto. */
    private readonly lock: ImageLock | null,
    /** When small reads run on the main loop (null: every read goes to a worker). */
    private readonly inline: InlineReadPolicy | null = null,
  ) {
    this.what = labels(`'${filename}'`);
    this.store = new FileSnapshotStore(node, filename);
    this.vm = new VmStateSidecar(this.store, node.readOnly);
  }

  /**
   * pread on the IOThread, or on the main loop when the inline-read policy allows it; zeros past
   * the end of the file.
   * @locking io
   */
  async preadv(offset: number, buf: Uint8Array): Promise<void> {
    const inline = this.inline;
    if (inline !== null) {
      if (this.active === 0 && inline.mayInline(buf.length)) return this.preadInline(inline, offset, buf);
      if (this.active > 0) inline.handedOff();
    }
    this.active++;
    try {
      await submitRead(this.ioThread, this.fd, buf, offset, this.what.read);
    } finally {
      this.settle();
    }
  }

  /** A read on the main loop (nothing else of the node in flight), timed for the policy. */
  private async preadInline(inline: InlineReadPolicy, offset: number, buf: Uint8Array): Promise<void> {
    // in flight from here: a request that arrives meanwhile goes to a worker, behind this one
    this.active++;
    try {
      if (!mainTurnBudgetLeft()) await yieldMainTurn();
      const start = inline.now();
      try {
        readFullySync(this.fd, buf, 0, buf.length, offset);
      } catch (e) {
        throw fromSystemError(e, 'read', { node: this.node.nodeName, file: this.filename, op: 'read', offset });
      }
      const end = inline.now();
      inline.observe(end - start, end);
    } finally {
      this.settle();
    }
  }

  /**
   * How this node's reads went (inline or to a worker); null when inline reads are off.
   * @locking io
   */
  readPathStats(): ReadPathStats | null {
    return this.inline === null ? null : { ...this.inline.stats };
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
    let move: LockMove | null = null;
    let r: GotoResult;
    try {
      r = this.store.goto(bql, drained, this.fd, idOrName, (clone) => {
        if (this.lock !== null) move = this.lock.prepareMove(bql, clone);
      });
    } catch (e) {
      (move as LockMove | null)?.abort();
      throw e;
    }
    (move as LockMove | null)?.commit();
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
  async close(bql: Bql, drained: DrainedProof): Promise<void> {
    this.enterDrained(bql, drained, 'close');
    for (const fd of this.retired.splice(0)) closeQuiet(fd);
    const vmFd = this.vm.release(bql);
    if (vmFd !== null) closeQuiet(vmFd);
    try {
      fs.closeSync(this.fd);
    } catch (e) {
      throw fromSystemError(e, 'close', { node: this.node.nodeName, file: this.filename });
    } finally {
      this.lock?.release(bql);
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

/**
 * The operation labels of the messages of a node showing `where`.
 * @locking common
 */
export function labels(where: string): { read: string; write: string; zero: string; flush: string; truncate: string; vmSave: string; vmLoad: string } {
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

/**
 * Closes a descriptor, ignoring a failure (it was replaced or already closed).
 * @locking common
 */
export function closeQuiet(fd: number): void {
  try {
    fs.closeSync(fd);
  } catch {
    // a descriptor that was replaced: nothing more to do with it
  }
}


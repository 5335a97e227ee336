/**
 * The VM-state sidecar of a `file` node: where saveVmstate / loadVmstate go. The pending file
 * lives in the node's snapshot store (snapshot-store.ts) until a snapshot takes it.
 *
 * I/O code for the descriptor lookups (the I/O callbacks make them), global-state code to swap
 * the descriptor (goto, load-tmp, close).
 */
import { assertBql, type Bql } from '../../block/bql.js';
import { BlockError } from '../../block/errors.js';
import type { FileSnapshotStore } from './snapshot-store.js';

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

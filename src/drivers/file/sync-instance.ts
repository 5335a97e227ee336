/**
 * The `file` driver's synchronous path (`aio=sync`): the transfers run on the main loop itself
 * (blocking syscalls, no thread handoff), which suits one-shot tools such as `snapstack img` where
 * nothing else waits on the loop and a worker's start-up would dominate. The transfers are the
 * ones the IOThread workers run (src/block/sync-transfer.js), so both paths behave alike.
 *
 * I/O callbacks; everything else is FileInstance's.
 */
import fs from 'node:fs';
import type { WriteZeroesFlags } from '../../block/driver.js';
import { BlockError, fromSystemError } from '../../block/errors.js';
import type { BlockNode } from '../../block/node.js';
import { readFullySync, writeFullySync, writeZeroesSync } from '../../block/sync-transfer.js';
import type { ImageLock } from './image-lock.js';
import { FileInstance } from './instance.js';

/** A file node whose transfers run synchronously on the main loop (`aio=sync`). */
export class SyncFileInstance extends FileInstance {
  constructor(node: BlockNode, fd: number, filename: string, sizeBytes: number, lock: ImageLock | null) {
    super(node, fd, filename, null, sizeBytes, lock);
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
      readFullySync(this.fd, buf, 0, buf.length, offset);
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
      writeFullySync(this.fd, buf, 0, buf.length, offset);
    } catch (e) {
      throw this.fail(e, 'write');
    }
    this.noteEnd(offset, buf.length);
  }

  /**
   * Writes zeros (from the reused buffer of sync-transfer.js) on the main loop.
   * @locking io
   */
  override async pwriteZeroes(offset: number, bytes: number, _flags: WriteZeroesFlags): Promise<void> {
    try {
      writeZeroesSync(this.fd, bytes, offset);
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
      writeFullySync(fd, buf, 0, buf.length, pos);
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
      readFullySync(fd, buf, 0, buf.length, pos);
    } catch (e) {
      throw this.fail(e, 'load-vmstate');
    }
  }
}


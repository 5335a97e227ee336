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
 */
import fs from 'node:fs';
import type { Bql } from '../block/bql.js';
import type { DrainedProof } from '../block/drain.js';
import { registerDriver, type BlockDriver, type BlockDriverInstance, type WriteZeroesFlags } from '../block/driver.js';
import { BlockError, fromSystemError } from '../block/errors.js';
import { submitFlush, submitRead, submitTruncate, submitWrite, submitWriteZeroes, type IOThread } from '../block/iothread.js';
import type { BlockNode } from '../block/node.js';
import type { NodeOptions } from '../block/options.js';

/** An open file node. */
class FileInstance implements BlockDriverInstance {
  private readonly what: { read: string; write: string; zero: string; flush: string; truncate: string };

  constructor(
    private readonly node: BlockNode,
    private readonly fd: number,
    private readonly filename: string,
    private readonly ioThread: IOThread | null,
    private sizeBytes: number,
  ) {
    const where = `'${filename}'`;
    this.what = { read: `read ${where}`, write: `write ${where}`, zero: `write-zeroes ${where}`, flush: `flush ${where}`, truncate: `truncate ${where}` };
  }

  /** pread on the IOThread; zeros past the end of the file. */
  async preadv(offset: number, buf: Uint8Array): Promise<void> {
    await submitRead(this.ioThread, this.fd, buf, offset, this.what.read);
  }

  /** pwrite on the IOThread; the file grows when written past its end. */
  async pwritev(offset: number, buf: Uint8Array): Promise<void> {
    const end = offset + buf.length;
    if (buf.length > 0 && end > this.sizeBytes) this.sizeBytes = end;
    await submitWrite(this.ioThread, this.fd, buf, offset, this.what.write);
  }

  /** Writes zeros (from a buffer the worker keeps) on the IOThread. */
  async pwriteZeroes(offset: number, bytes: number, _flags: WriteZeroesFlags): Promise<void> {
    const end = offset + bytes;
    if (bytes > 0 && end > this.sizeBytes) this.sizeBytes = end;
    await submitWriteZeroes(this.ioThread, this.fd, bytes, offset, this.what.zero);
  }

  /** A hint that Node cannot act on (no fallocate): accepted, nothing changes. */
  pdiscard(_offset: number, _bytes: number): Promise<void> {
    return Promise.resolve();
  }

  /** fdatasync on the IOThread. */
  async flush(): Promise<void> {
    await submitFlush(this.ioThread, this.fd, this.what.flush);
  }

  /** Grows the recorded length after a transfer of `bytes` at `offset` (none for empty ones). */
  protected noteEnd(offset: number, bytes: number): void {
    if (bytes > 0 && offset + bytes > this.sizeBytes) this.sizeBytes = offset + bytes;
  }

  /** Records a new length (after a truncate). */
  protected setLength(sizeBytes: number): void {
    this.sizeBytes = sizeBytes;
  }

  /** The file's length as this node last set or saw it. */
  getLength(): number {
    return this.sizeBytes;
  }

  /** ftruncate on the IOThread. */
  async truncate(sizeBytes: number): Promise<void> {
    await submitTruncate(this.ioThread, this.fd, sizeBytes, this.what.truncate);
    this.sizeBytes = sizeBytes;
  }

  /** Closes the file descriptor; the node is drained, so no transfer uses it. */
  async close(_bql: Bql, _drained: DrainedProof): Promise<void> {
    try {
      fs.closeSync(this.fd);
    } catch (e) {
      throw fromSystemError(e, 'close', { node: this.node.nodeName, file: this.filename });
    }
  }
}

/** A file node whose transfers run synchronously on the main loop (`aio=sync`). */
class SyncFileInstance extends FileInstance {
  private zeroChunk: Uint8Array | null = null;

  constructor(
    node: BlockNode,
    private readonly syncFd: number,
    private readonly syncName: string,
    sizeBytes: number,
  ) {
    super(node, syncFd, syncName, null, sizeBytes);
  }

  private fail(e: unknown, op: string): BlockError {
    return fromSystemError(e, op, { file: this.syncName, op });
  }

  /** pread on the main loop; zeros past the end of the file. */
  override async preadv(offset: number, buf: Uint8Array): Promise<void> {
    let done = 0;
    try {
      while (done < buf.length) {
        const n = fs.readSync(this.syncFd, buf, done, buf.length - done, offset + done);
        if (n === 0) break;
        done += n;
      }
    } catch (e) {
      throw this.fail(e, 'read');
    }
    if (done < buf.length) buf.fill(0, done);
  }

  /** pwrite on the main loop. */
  override async pwritev(offset: number, buf: Uint8Array): Promise<void> {
    try {
      for (let done = 0; done < buf.length; ) done += fs.writeSync(this.syncFd, buf, done, buf.length - done, offset + done);
    } catch (e) {
      throw this.fail(e, 'write');
    }
    this.noteEnd(offset, buf.length);
  }

  /** Writes zeros from a reused buffer on the main loop. */
  override async pwriteZeroes(offset: number, bytes: number, _flags: WriteZeroesFlags): Promise<void> {
    const chunk = (this.zeroChunk ??= new Uint8Array(1 << 20));
    try {
      for (let done = 0; done < bytes; ) {
        const n = Math.min(chunk.length, bytes - done);
        done += fs.writeSync(this.syncFd, chunk, 0, n, offset + done);
      }
    } catch (e) {
      throw this.fail(e, 'write-zeroes');
    }
    this.noteEnd(offset, bytes);
  }

  /** fdatasync on the main loop. */
  override async flush(): Promise<void> {
    try {
      fs.fdatasyncSync(this.syncFd);
    } catch (e) {
      throw this.fail(e, 'flush');
    }
  }

  /** ftruncate on the main loop. */
  override async truncate(sizeBytes: number): Promise<void> {
    try {
      fs.ftruncateSync(this.syncFd, sizeBytes);
    } catch (e) {
      throw this.fail(e, 'truncate');
    }
    this.setLength(sizeBytes);
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
}

registerDriver(fileDriver);

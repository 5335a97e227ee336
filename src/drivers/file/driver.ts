/**
 * Protocol driver `file`: a host file. The main loop opens it; the transfers run on an IOThread
 * (instance.ts, `aio=threads`, the default) or on the main loop (sync-instance.ts, `aio=sync`).
 *
 * Reads past the end of the file return zeros and writes past it grow the file, as QEMU's
 * file-posix does. Discard is accepted and ignored (Node has no hole punching); it is a hint.
 *
 * Options: `filename`, `aio=threads|sync`, `locking=auto|on|off` (QEMU's image locks, see
 * image-lock.ts), `force-share=on|off` (`-U`: read-only, sharing every permission) and, with
 * aio=threads, `inline-reads=on|off` (small reads on the main loop when nothing else of the node is
 * in flight, see inline-reads.ts; on by default unless the node is bound to an IOThread, whose
 * thread the user asked to do the transfers).
 *
 * Internal snapshots (which QEMU refuses on raw images) live beside the image, in
 * `<image>.snapshots/` (snapshot-store.ts); VM state goes to a sidecar file there
 * (vmstate-sidecar.ts). A raw node reaches all of this through the generic snapshot fallback.
 *
 * Global-state code: open runs on the main loop with the BQL held; the driver registers itself
 * on import.
 */
import fs from 'node:fs';
import { assertBql, type Bql } from '../../block/bql.js';
import { registerDriver, type BlockDriver, type BlockDriverInstance } from '../../block/driver.js';
import { BlockError, fromSystemError, systemErrorText } from '../../block/errors.js';
import type { BlockNode } from '../../block/node.js';
import type { NodeOptions } from '../../block/options.js';
import { filePerms, ImageLock, openForCreate, type LockingMode } from './image-lock.js';
import { InlineReadPolicy } from './inline-reads.js';
import { FileInstance } from './instance.js';
import { discardSnapshotStore } from './snapshot-store.js';
import { SyncFileInstance } from './sync-instance.js';

const describeErrno = systemErrorText;

function lockingMode(node: BlockNode, opts: NodeOptions): LockingMode {
  const v = opts['locking'] ?? 'auto';
  if (v === 'on' || v === 'off' || v === 'auto') return v;
  throw new BlockError('EINVAL', `Invalid value '${v}' for option 'locking' of driver 'file' (on, off or auto; node '${node.nodeName}')`, {
    node: node.nodeName,
    field: 'locking',
    value: v,
  });
}

function forceShare(node: BlockNode, opts: NodeOptions): boolean {
  const v = opts['force-share'] ?? 'off';
  if (v !== 'on' && v !== 'off') {
    throw new BlockError('EINVAL', `Invalid value '${v}' for option 'force-share' of driver 'file' (on or off; node '${node.nodeName}')`, {
      node: node.nodeName,
      field: 'force-share',
      value: v,
    });
  }
  if (v === 'on' && !node.readOnly) {
    throw new BlockError('EINVAL', `force-share=on can only be used with read-only images (node '${node.nodeName}')`, { node: node.nodeName, field: 'force-share' });
  }
  return v === 'on';
}

/** Whether small reads may run on the main loop (`inline-reads`; default: on without an IOThread). */
function inlineReads(node: BlockNode, opts: NodeOptions): boolean {
  const v = opts['inline-reads'];
  if (v === undefined) return node.ioThread === null;
  if (v === 'on' || v === 'off') return v === 'on';
  throw new BlockError('EINVAL', `Invalid value '${v}' for option 'inline-reads' of driver 'file' (on or off; node '${node.nodeName}')`, {
    node: node.nodeName,
    field: 'inline-reads',
    value: v,
  });
}

/** The `file` protocol driver. */
export const fileDriver: BlockDriver = {
  formatName: 'file',
  kind: 'protocol',
  /**
   * Opens `filename` read-write (or read-only) on the main loop and takes its image lock.
   * @locking global-state
   */
  async open(bql: Bql, node: BlockNode, opts: NodeOptions): Promise<BlockDriverInstance> {
    assertBql(bql, 'file open');
    const filename = opts['filename'];
    if (filename === undefined || filename === '') {
      throw new BlockError('EINVAL', `Parameter 'filename' is required for driver 'file' (node '${node.nodeName}')`, {
        node: node.nodeName,
        field: 'filename',
      });
    }
    const aio = opts['aio'] ?? 'threads';
    if (aio !== 'threads' && aio !== 'sync') {
      throw new BlockError('EINVAL', `Invalid value '${aio}' for option 'aio' of driver 'file' (threads or sync)`, { node: node.nodeName, field: 'aio', value: aio });
    }
    if (aio === 'sync' && node.ioThread !== null) {
      throw new BlockError('EINVAL', `aio=sync runs on the main loop and cannot be bound to IOThread '${node.ioThread.id}' (node '${node.nodeName}')`, {
        node: node.nodeName,
        field: 'aio',
      });
    }
    const mode = lockingMode(node, opts);
    const share = forceShare(node, opts);
    const inline = inlineReads(node, opts);
    let fd: number;
    try {
      fd = fs.openSync(filename, node.readOnly ? 'r' : 'r+');
    } catch (e) {
      const err = fromSystemError(e, 'open', { node: node.nodeName, file: filename });
      throw new BlockError(err.code, `Could not open '${filename}': ${describeErrno(e)}`, { node: node.nodeName, file: filename, op: 'open', cause: e });
    }
    let size: number;
    let lock: ImageLock | null;
    try {
      const st = fs.fstatSync(fd);
      if (st.isDirectory()) throw new BlockError('EINVAL', `Could not open '${filename}': it is a directory`, { node: node.nodeName, file: filename });
      size = st.size;
      lock = ImageLock.acquire(bql, filename, node.nodeName, filePerms(node.readOnly, share), mode);
    } catch (e) {
      fs.closeSync(fd);
      throw fromSystemError(e, 'open', { node: node.nodeName, file: filename });
    }
    return aio === 'sync' ? new SyncFileInstance(node, fd, filename, size, lock) : new FileInstance(node, fd, filename, node.ioThread, size, lock, inline ? new InlineReadPolicy() : null);
  },
};

/**
 * Creates (or truncates) a host file of `sizeBytes` bytes, sparse, as `qemu-img create -f raw`.
 * As qemu-img does, it takes the image's write lock before it truncates anything: an image that
 * another user (a QEMU, a snapstack monitor) holds is refused with EBUSY and left untouched. The
 * snapshots of an image it replaces (the `<file>.snapshots` store) are removed with it.
 * @locking global-state
 */
export function createRawFile(bql: Bql, filename: string, sizeBytes: number): void {
  assertBql(bql, 'createRawFile');
  let created: { fd: number; release: () => void };
  try {
    created = openForCreate(bql, filename);
  } catch (e) {
    throw fromSystemError(e, 'create', { file: filename });
  }
  try {
    fs.ftruncateSync(created.fd, sizeBytes);
  } catch (e) {
    throw fromSystemError(e, 'create', { file: filename });
  } finally {
    fs.closeSync(created.fd);
    created.release();
  }
  discardSnapshotStore(bql, filename);
}

registerDriver(fileDriver);

/**
 * `snapshot_blkdev` (HMP) / blockdev-snapshot-sync (QMP): create a qcow2 overlay file whose
 * backing file is a device's current image, open it, and put it on top of the device while the
 * device runs (src/block/external-snapshot.ts does the graph change). The overlay names its
 * backing file by absolute path, so it opens from any directory.
 */
import fs from 'node:fs';
import path from 'node:path';
import { blkFind } from '../block/backend.js';
import { assertBql, type Bql } from '../block/bql.js';
import { BlockError } from '../block/errors.js';
import { refuseIfSnapshotClaimed } from '../block/snapshot-lock.js';
import { blockdevSnapshot } from '../block/external-snapshot.js';
import { closeNode, openNode } from '../block/graph.js';
import { bdrvGetLength } from '../block/io.js';
import { createQcow2File } from '../drivers/qcow2/create.js';

/** Makes a new file's contents and its directory entry durable. */
function syncNewFile(file: string): void {
  for (const [target, flags] of [
    [file, 'r+'],
    [path.dirname(path.resolve(file)), 'r'],
  ] as const) {
    const fd = fs.openSync(target, flags);
    try {
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
  }
}

/** What an external snapshot needs. */
export interface SnapshotBlkdevOptions {
  /** The device (BlockBackend name). */
  device: string;
  /** The overlay file to create (it must not exist). */
  snapshotFile: string;
  /** The overlay's format: only qcow2 holds a backing file. */
  format?: string;
  /** A node name for the overlay. */
  nodeName?: string;
}

/**
 * Creates `snapshotFile` as a qcow2 overlay of device `device`'s image and switches the device
 * to it; the old image becomes read-through backing data that no longer changes. On failure the
 * device is unchanged and the new file is removed.
 * @locking global-state
 */
export async function snapshotBlkdev(bql: Bql, o: SnapshotBlkdevOptions): Promise<void> {
  assertBql(bql, 'snapshotBlkdev');
  const format = o.format ?? 'qcow2';
  if (format !== 'qcow2') throw new BlockError('ENOTSUP', `Format '${format}' cannot hold a backing file (use qcow2)`, { field: 'format', value: format });
  const blk = blkFind(bql, o.device);
  const root = blk.root;
  if (root === null) throw new BlockError('ENOMEDIUM', `Device '${o.device}' has no medium`, { node: o.device });
  refuseIfSnapshotClaimed(root, 'snapshot_blkdev'); // before a file is made
  if (root.filename === '') {
    throw new BlockError('ENOTSUP', `Device '${o.device}': node '${root.nodeName}' has no file name an overlay could name as its backing file`, { node: root.nodeName });
  }
  if (fs.existsSync(o.snapshotFile)) {
    throw new BlockError('EINVAL', `Could not create '${o.snapshotFile}': the file exists (an overlay is always a new file)`, { file: o.snapshotFile, field: 'snapshot-file' });
  }
  createQcow2File(bql, o.snapshotFile, { sizeBytes: bdrvGetLength(root), backingFile: path.resolve(root.filename), backingFormat: root.driver.formatName });
  let overlay;
  try {
    // the guest's flushed writes will live in this file: it and its name must survive a power cut
    syncNewFile(o.snapshotFile);
    const opts: Record<string, string> = { driver: 'qcow2', file: o.snapshotFile, backing: 'null' };
    if (o.nodeName !== undefined) opts['node-name'] = o.nodeName;
    if (root.ioThread !== null) opts['iothread'] = root.ioThread.id;
    if (blk.readOnly) opts['read-only'] = 'on';
    overlay = await openNode(bql, opts);
  } catch (e) {
    fs.rmSync(o.snapshotFile, { force: true });
    throw e;
  }
  try {
    await blockdevSnapshot(bql, blk, overlay);
  } catch (e) {
    await closeNode(bql, overlay);
    fs.rmSync(o.snapshotFile, { force: true });
    throw e;
  }
}

/**
 * Changing a qcow2 image's virtual size (`img resize`, a node's truncate).
 */
import { BlockError } from '../../block/errors.js';
import { withMetadataLock } from './metadata-lock.js';
import { setDiskSize } from './snapshots.js';
import type { Qcow2State } from './state.js';

/**
 * Changes the virtual size to `sizeBytes` (QEMU's rules: a multiple of 512; no shrinking, and no
 * resizing of a v2 image, with internal snapshots).
 * UNFINISHED: shrinking does not yet free the clusters past the new end.
 * @locking io
 */
export async function qcow2Truncate(s: Qcow2State, sizeBytes: number): Promise<void> {
  const nodeName = s.node.nodeName;
  if (sizeBytes % 512 !== 0) {
    throw new BlockError('EINVAL', `qcow2 node '${nodeName}': the size must be a multiple of 512 (size: ${sizeBytes})`, { node: nodeName, field: 'size', value: sizeBytes });
  }
  if (s.snapshots.length > 0 && (!s.v3 || sizeBytes < s.sizeBytes)) {
    const why = s.v3 ? "Can't shrink an image with internal snapshots" : "Can't resize a v2 image which has internal snapshots";
    throw new BlockError('ENOTSUP', `qcow2 node '${nodeName}': ${why}`, { node: nodeName, field: 'size', value: sizeBytes });
  }
  await withMetadataLock(s, (locked) => setDiskSize(locked, s, sizeBytes));
}

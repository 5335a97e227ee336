/**
 * External snapshots on a running device (QMP blockdev-snapshot): an overlay node is put on top of
 * the device's root, which becomes the overlay's backing child and stops changing; the device's
 * requests go on against the overlay. The graph changes in one drained-all section, so no request
 * sees half of it, and a failure leaves the graph as it was.
 *
 * Global-state code: takes the BQL; it drains by itself.
 */
import { blkReplaceRoot, type BlockBackend } from './backend.js';
import { assertBql, type Bql } from './bql.js';
import { withDrainedAll } from './drain.js';
import { BlockError } from './errors.js';
import { attachChild, detachChild } from './graph.js';
import type { BlockNode } from './node.js';

/**
 * Puts the open node `overlay` (a format node with no backing child and no user) on top of the
 * root of device `blk`: the old root becomes its backing child and the device's new root.
 * @locking global-state
 */
export async function blockdevSnapshot(bql: Bql, blk: BlockBackend, overlay: BlockNode): Promise<void> {
  assertBql(bql, 'blockdevSnapshot');
  const old = blk.root;
  if (old === null) throw new BlockError('ENOMEDIUM', `Device '${blk.name}' has no medium`, { node: blk.name, op: 'blockdev-snapshot' });
  if (overlay.backing !== undefined) {
    throw new BlockError('EINVAL', `The overlay '${overlay.nodeName}' already has a backing image (${overlay.backing.nodeName})`, { node: overlay.nodeName, op: 'blockdev-snapshot' });
  }
  if (overlay.parents.size > 0) {
    throw new BlockError('EBUSY', `The overlay '${overlay.nodeName}' is already in use`, { node: overlay.nodeName, op: 'blockdev-snapshot' });
  }
  if (overlay.drv.backingFile === undefined) {
    throw new BlockError('ENOTSUP', `The overlay '${overlay.nodeName}' (format '${overlay.driver.formatName}') does not support backing files`, {
      node: overlay.nodeName,
      op: 'blockdev-snapshot',
    });
  }
  await withDrainedAll(bql, async (drained) => {
    const edge = attachChild(bql, overlay, 'backing', old);
    try {
      blkReplaceRoot(bql, drained, blk, overlay);
    } catch (e) {
      detachChild(bql, drained, edge);
      throw e;
    }
  });
}

/**
 * Changing the backing file an image records (QEMU's bdrv_change_backing_file): the name and
 * format in the image's metadata, not the graph (graph-change.ts's bdrvSetBacking links nodes).
 * The driver's changeBackingFile callback does the crash-safe rewrite (qcow2: header-update.ts).
 *
 * Global-state code: takes `Bql` and a drained proof of the node.
 */
import { assertBql, type Bql } from './bql.js';
import { assertDrained, type DrainedProof } from './drain.js';
import { BlockError } from './errors.js';
import type { BlockNode } from './node.js';

/**
 * Records `filename` (null: none, the image becomes standalone) and its `format` as the backing
 * file of `node`'s image. ENOTSUP when the driver keeps no backing file name, EACCES when the
 * node is read-only, EINVAL for a name without a format when `requireFormat` (qemu-img's rule).
 * @locking global-state
 */
export async function changeBackingFile(
  bql: Bql,
  drained: DrainedProof,
  node: BlockNode,
  filename: string | null,
  format: string | null,
  requireFormat = false,
): Promise<void> {
  assertBql(bql, 'changeBackingFile');
  assertDrained(bql, drained, node, 'changeBackingFile');
  const name = filename === '' ? null : filename;
  if (name !== null && format === null && requireFormat) {
    throw new BlockError('EINVAL', 'backing format must be specified', { node: node.nodeName, field: 'backing_fmt' });
  }
  const cb = node.drv.changeBackingFile;
  if (cb === undefined) {
    throw new BlockError('ENOTSUP', `Driver '${node.driver.formatName}' cannot record a backing file (node '${node.nodeName}')`, {
      node: node.nodeName,
      field: 'backing_file',
    });
  }
  if (node.readOnly) {
    throw new BlockError('EACCES', `Node '${node.nodeName}' is read-only: its backing file cannot change`, { node: node.nodeName, field: 'backing_file' });
  }
  await cb.call(node.drv, bql, drained, name, name === null ? null : format);
}

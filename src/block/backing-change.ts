/**
 * Changing the backing file an image records (QEMU's bdrv_change_backing_file): the name and
 * format in the image's metadata, not the graph (graph-change.ts's bdrvSetBacking links nodes).
 * The driver's changeBackingFile callback does the crash-safe rewrite (qcow2: header-update.ts).
 *
 * Global-state code: takes `Bql` and a drained proof of the node.
 */
import path from 'node:path';
import { isOwnBackingFile } from './backing.js';
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
  if (name !== null && node.filename !== '' && isOwnBackingFile(node.filename, name)) {
    throw new BlockError('EINVAL', `${node.filename}: an image cannot be its own backing file ('${name}')`, { node: node.nodeName, field: 'backing_file', value: name });
  }

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

/**
 * The name under which `overlay`'s image should record `base` as its backing file: `base`'s
 * file name relative to the overlay's directory when it lies there or below (names are resolved
 * against it when opened), else its absolute path; a URL, or any name of an overlay without a
 * file name, as it is.
 * @locking common
 */
export function backingNameFor(overlay: BlockNode, base: BlockNode): string {
  const name = base.filename;
  if (name === '' || /^[A-Za-z][A-Za-z0-9+.-]*:/.test(name) || overlay.filename === '') return name;
  const rel = path.relative(path.dirname(path.resolve(overlay.filename)), path.resolve(name));
  // below the overlay's directory: relative (the pair can move together); elsewhere absolute
  return rel !== '' && !rel.startsWith('..') && !path.isAbsolute(rel) ? rel : path.resolve(name);
}

/**
 * qcow2's part of committing to a backing file: emptying the overlay (QEMU's bdrv_make_empty,
 * qcow2_make_empty): every cluster of the active L1/L2 tables becomes unallocated, so the
 * overlay reads through to its backing file again; the freed clusters lose their references.
 *
 * Global-state code: Bql and a drained proof of the node; the change runs under the metadata
 * lock like any discard and is flushed before it returns.
 * UNFINISHED: reached through qcow2Of (a narrow accessor) until the driver interface has a
 * makeEmpty callback (see the H3 report).
 */
import { assertBql, type Bql } from '../../block/bql.js';
import { assertDrained, type DrainedProof } from '../../block/drain.js';
import { BlockError } from '../../block/errors.js';
import { bdrvFlush } from '../../block/io.js';
import type { BlockNode } from '../../block/node.js';
import { qcow2ZeroClusters } from './data-path.js';
import { Qcow2Instance } from './instance.js';
import type { Qcow2State } from './state.js';

/** The qcow2 state of `node`, or null when the node is not a qcow2 node. */
function qcow2Of(node: BlockNode): Qcow2State | null {
  const drv = node.drv;
  return drv instanceof Qcow2Instance ? drv.state : null;
}

/**
 * Makes every guest cluster of the qcow2 node unallocated (internal snapshots keep theirs) and
 * flushes; ENOTSUP for other formats, EACCES for a read-only node.
 * @locking global-state
 */
export async function qcow2MakeEmpty(bql: Bql, drained: DrainedProof, node: BlockNode): Promise<void> {
  assertBql(bql, 'qcow2 make-empty');
  assertDrained(bql, drained, node, 'qcow2 make-empty');
  const s = qcow2Of(node);
  if (s === null) {
    throw new BlockError('ENOTSUP', `Node '${node.nodeName}' (${node.driver.formatName}) cannot be emptied`, { node: node.nodeName, op: 'make-empty' });
  }
  if (node.readOnly) throw new BlockError('EACCES', `Node '${node.nodeName}' is read-only and cannot be emptied`, { node: node.nodeName, op: 'make-empty' });
  const clusters = Math.ceil(s.sizeBytes / s.clusterSize);
  await qcow2ZeroClusters(s, 0, clusters, true, true, true);
  await bdrvFlush(node);
}

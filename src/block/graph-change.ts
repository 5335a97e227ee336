/**
 * Changing the graph of running devices: a node's backing child set or dropped (block-stream's
 * end, rebase), and a node replaced by another in every parent (QEMU's bdrv_replace_node: an
 * active commit's end puts the base under the device; an intermediate commit's end links the
 * overlay above to the base). The graph is drained-all meanwhile, so no request crosses an edge
 * that changes; each function either completes or leaves the graph as it was.
 *
 * Global-state code: every function takes `Bql` and the DrainedAll proof.
 */
import { blkReplaceRoot, BlockBackend } from './backend.js';
import { assertBql, type Bql } from './bql.js';
import { assertDrained, type DrainedAll } from './drain.js';
import { BlockError } from './errors.js';
import { attachChild, detachChild } from './graph.js';
import { BdrvChild, type BlockNode } from './node.js';

/** True when `node` is `top` or lies below it (any child edge, any depth). */
function isAtOrBelow(node: BlockNode, top: BlockNode): boolean {
  const stack = [top];
  const seen = new Set<BlockNode>();
  while (stack.length > 0) {
    const n = stack.pop() as BlockNode;
    if (n === node) return true;
    if (seen.has(n)) continue;
    seen.add(n);
    for (const c of n.children) stack.push(c.child);
  }
  return false;
}

/**
 * Makes `backing` the backing child of `node` (null: no backing child); the old backing node
 * stays open for the caller to close. EINVAL for a node whose driver has no backing files or a
 * change that would make a loop. The image's own record of its backing file is the caller's
 * (a driver callback), so that the graph and the header are changed in the same drained section.
 * @locking global-state
 */
export function bdrvSetBacking(bql: Bql, drained: DrainedAll, node: BlockNode, backing: BlockNode | null): void {
  assertBql(bql, 'bdrvSetBacking');
  assertDrained(bql, drained, node, 'bdrvSetBacking');
  if (node.drv.backingFile === undefined) {
    throw new BlockError('EINVAL', `Driver '${node.driver.formatName}' does not support backing files (node '${node.nodeName}')`, { node: node.nodeName, field: 'backing' });
  }
  const old = node.children.find((c) => c.role === 'backing') ?? null;
  if (old !== null && old.child === backing) return;
  if (backing !== null) {
    assertDrained(bql, drained, backing, 'bdrvSetBacking');
    if (isAtOrBelow(node, backing)) {
      throw new BlockError('EINVAL', `Making '${backing.nodeName}' the backing file of '${node.nodeName}' would create a loop`, { node: node.nodeName, field: 'backing' });
    }
  }
  if (old !== null) detachChild(bql, drained, old);
  if (backing === null) return;
  try {
    attachChild(bql, node, 'backing', backing);
  } catch (e) {
    if (old !== null) attachChild(bql, node, 'backing', old.child);
    throw e;
  }
}

/**
 * Replaces `from` by `to` for every parent of `from` (devices and parent nodes), except parents
 * at or below `to` (`to` itself may use `from`, as an overlay uses its backing file). `from`
 * stays open, without those parents, for the caller to close. EINVAL when sizes differ or a
 * writable parent would sit on a read-only node; on failure no parent has moved.
 * @locking global-state
 */
export function replaceNode(bql: Bql, drained: DrainedAll, from: BlockNode, to: BlockNode): void {
  assertBql(bql, 'replaceNode');
  assertDrained(bql, drained, from, 'replaceNode');
  assertDrained(bql, drained, to, 'replaceNode');
  if (from === to) return;
  const edges: BdrvChild[] = [];
  const backends: BlockBackend[] = [];
  for (const p of from.parents) {
    if (p instanceof BdrvChild) {
      if (!isAtOrBelow(p.parent, to)) edges.push(p);
    } else if (p instanceof BlockBackend) {
      backends.push(p);
    } else {
      throw new BlockError('EBUSY', `Node '${from.nodeName}' is used by '${p.parentName}', which cannot be moved to '${to.nodeName}'`, { node: from.nodeName });
    }
  }
  const moved: Array<{ undo: () => void }> = [];
  try {
    for (const blk of backends) {
      blkReplaceRoot(bql, drained, blk, to);
      moved.push({ undo: () => blkReplaceRoot(bql, drained, blk, from) });
    }
    for (const e of edges) {
      detachChild(bql, drained, e);
      let fresh: BdrvChild;
      try {
        fresh = attachChild(bql, e.parent, e.role, to);
      } catch (err) {
        attachChild(bql, e.parent, e.role, from);
        throw err;
      }
      moved.push({
        undo: () => {
          detachChild(bql, drained, fresh);
          attachChild(bql, e.parent, e.role, from);
        },
      });
    }
  } catch (e) {
    for (const m of moved.reverse()) m.undo();
    throw e;
  }
}

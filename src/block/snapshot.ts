/**
 * Per-node internal snapshot operations: create, goto, delete, list, load-temporary, and whether a
 * node can snapshot at all.
 *
 * Global-state code. create, goto and delete change what every later request sees, so they take
 * `Bql` and a drained proof covering the node (a node's own section, or drain-all); none of them
 * drains by itself. A driver without snapshot callbacks forwards to its primary (`file`) child
 * when it has no other data-bearing child, as QEMU's `bdrv_snapshot_fallback_child` does, so a
 * raw node forwards to its protocol node.
 */
import { assertBql, type Bql } from './bql.js';
import { assertDrained, type DrainedProof } from './drain.js';
import type { BlockDriverInstance, SnapshotInfo } from './driver.js';
import { BlockError } from './errors.js';
import { BdrvChild, type BlockNode } from './node.js';

type SnapshotCallback = 'snapshotCreate' | 'snapshotGoto' | 'snapshotDelete' | 'snapshotList' | 'snapshotLoadTmp';

/**
 * Refuses a snapshot operation that would change what `node` holds (create, goto, delete) on a
 * read-only node or one an overlay uses as its backing file: the overlay's unallocated clusters
 * read through to it, so reverting it (or deleting what it holds) would change the overlay's disk
 * under it (how virt-manager users lost their overlays).
 */
function refuseUnchangeable(node: BlockNode, op: string): void {
  if (node.readOnly) throw new BlockError('EACCES', `Node '${node.nodeName}' is read only`, { node: node.nodeName, op });
  for (const p of node.parents) {
    if (p instanceof BdrvChild && p.role === 'backing') {
      throw new BlockError('EBUSY', `Node '${node.nodeName}' is the backing file of '${p.parent.nodeName}': its snapshots cannot change while an overlay uses it`, {
        node: node.nodeName,
        op,
      });
    }
  }
}

/** The node whose driver implements `cb`: the node itself or, following the fallback, a child. */
function snapshotTarget(node: BlockNode, cb: SnapshotCallback, what: string): { node: BlockNode; drv: BlockDriverInstance } {
  let cur: BlockNode | undefined = node;
  for (let depth = 0; cur !== undefined && depth < 16; depth++) {
    const drv = cur.drv;
    if (drv[cb] !== undefined) return { node: cur, drv };
    const others = cur.children.filter((c) => c.role !== 'file');
    if (others.length > 0) break;
    cur = cur.file;
  }
  throw new BlockError('ENOTSUP', `Block format '${node.driver.formatName}' used by node '${node.nodeName}' does not support ${what}`, {
    node: node.nodeName,
    op: cb,
  });
}

/**
 * True when `node` is writable and its driver (or its fallback child) can hold snapshots.
 * @locking global-state
 */
export function bdrvCanSnapshot(bql: Bql, node: BlockNode): boolean {
  assertBql(bql, 'bdrvCanSnapshot');
  if (node.instance === null) return false;
  try {
    refuseUnchangeable(node, 'snapshot-create');
    snapshotTarget(node, 'snapshotCreate', 'internal snapshots');
    return true;
  } catch {
    return false;
  }
}

/**
 * Creates an internal snapshot on a drained node; returns it with the ID the driver assigned.
 * @locking global-state
 */
export async function bdrvSnapshotCreate(bql: Bql, drained: DrainedProof, node: BlockNode, info: SnapshotInfo): Promise<SnapshotInfo> {
  assertBql(bql, 'bdrvSnapshotCreate');
  assertDrained(bql, drained, node, 'bdrvSnapshotCreate');
  refuseUnchangeable(node, 'snapshot-create');
  const t = snapshotTarget(node, 'snapshotCreate', 'internal snapshots');
  if (t.node !== node) refuseUnchangeable(t.node, 'snapshot-create');
  assertDrained(bql, drained, t.node, 'bdrvSnapshotCreate');
  const create = t.drv.snapshotCreate;
  if (create === undefined) throw new BlockError('ENOTSUP', `node '${t.node.nodeName}' lost its snapshot support`, { node: t.node.nodeName });
  return create.call(t.drv, bql, drained, info);
}

/**
 * Reverts a drained node to the snapshot with this ID or name (ID first).
 * @locking global-state
 */
export async function bdrvSnapshotGoto(bql: Bql, drained: DrainedProof, node: BlockNode, idOrName: string): Promise<void> {
  assertBql(bql, 'bdrvSnapshotGoto');
  assertDrained(bql, drained, node, 'bdrvSnapshotGoto');
  refuseUnchangeable(node, 'snapshot-goto');
  const t = snapshotTarget(node, 'snapshotGoto', 'internal snapshots');
  if (t.node !== node) refuseUnchangeable(t.node, 'snapshot-goto');
  assertDrained(bql, drained, t.node, 'bdrvSnapshotGoto');
  const go = t.drv.snapshotGoto;
  if (go === undefined) throw new BlockError('ENOTSUP', `node '${t.node.nodeName}' lost its snapshot support`, { node: t.node.nodeName });
  await go.call(t.drv, bql, drained, idOrName);
}

/**
 * Deletes the first snapshot of a drained node matching `id` and `name` (a null one matches any).
 * @locking global-state
 */
export async function bdrvSnapshotDelete(bql: Bql, drained: DrainedProof, node: BlockNode, id: string | null, name: string | null): Promise<SnapshotInfo> {
  assertBql(bql, 'bdrvSnapshotDelete');
  assertDrained(bql, drained, node, 'bdrvSnapshotDelete');
  if (id === null && name === null) {
    throw new BlockError('EINVAL', `snapshot_id and name are both NULL (node '${node.nodeName}')`, { node: node.nodeName, op: 'snapshot-delete' });
  }
  refuseUnchangeable(node, 'snapshot-delete');
  const t = snapshotTarget(node, 'snapshotDelete', 'internal snapshot deletion');
  if (t.node !== node) refuseUnchangeable(t.node, 'snapshot-delete');
  assertDrained(bql, drained, t.node, 'bdrvSnapshotDelete');
  const del = t.drv.snapshotDelete;
  if (del === undefined) throw new BlockError('ENOTSUP', `node '${t.node.nodeName}' lost its snapshot support`, { node: t.node.nodeName });
  return del.call(t.drv, bql, drained, id, name);
}

/**
 * Lists the node's snapshots in table order.
 * @locking global-state
 */
export async function bdrvSnapshotList(bql: Bql, node: BlockNode): Promise<SnapshotInfo[]> {
  assertBql(bql, 'bdrvSnapshotList');
  const t = snapshotTarget(node, 'snapshotList', 'internal snapshots');
  const list = t.drv.snapshotList;
  if (list === undefined) throw new BlockError('ENOTSUP', `node '${t.node.nodeName}' lost its snapshot support`, { node: t.node.nodeName });
  return list.call(t.drv, bql);
}

/**
 * Makes a read-only node show a snapshot instead of its active state (qemu-img convert -l).
 * @locking global-state
 */
export async function bdrvSnapshotLoadTmp(bql: Bql, node: BlockNode, id: string | null, name: string | null): Promise<void> {
  assertBql(bql, 'bdrvSnapshotLoadTmp');
  if (id === null && name === null) {
    throw new BlockError('EINVAL', `snapshot_id and name are both NULL (node '${node.nodeName}')`, { node: node.nodeName, op: 'snapshot-load-tmp' });
  }
  if (!node.readOnly) throw new BlockError('EINVAL', `Device '${node.nodeName}' is not readonly`, { node: node.nodeName, op: 'snapshot-load-tmp' });
  const t = snapshotTarget(node, 'snapshotLoadTmp', 'temporarily loading internal snapshots');
  const load = t.drv.snapshotLoadTmp;
  if (load === undefined) throw new BlockError('ENOTSUP', `node '${t.node.nodeName}' lost its snapshot support`, { node: t.node.nodeName });
  await load.call(t.drv, bql, id, name);
}

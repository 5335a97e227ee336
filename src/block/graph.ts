/**
 * Building and tearing down the block graph: opening nodes from QEMU-style options, linking
 * children, closing nodes, finding them by name.
 *
 * Global-state code: every function takes the `Bql` proof; removing a node or an edge also takes
 * a drained proof, because no request may be in flight across an edge that disappears.
 */
import { assertBql, type Bql } from './bql.js';
import { assertDrained, drainedBegin, drainedEnd, type DrainedProof } from './drain.js';
import { findDriver, probingDrivers, type BlockDriver } from './driver.js';
import { BlockError } from './errors.js';
import { bdrvPread } from './io.js';
import { findIOThread, type IOThread } from './iothread.js';
import { BdrvChild, BlockNode, type ChildRole } from './node.js';
import { parseBool, parseOptions, subOptions, type NodeOptions } from './options.js';
import { allNodes, drainAllState } from './registry.js';

let autoNameCounter = 0;
const NODE_NAME_RE = /^[A-Za-z][A-Za-z0-9_.-]{0,127}$/;
/** Options the generic layer consumes; the rest go to the driver. */
const GENERIC_OPTIONS = new Set(['driver', 'format', 'node-name', 'read-only', 'readonly', 'iothread', 'file']);

/**
 * Finds the node `name`; ENOENT if there is none.
 * @locking global-state
 */
export function findNode(bql: Bql, name: string): BlockNode {
  assertBql(bql, 'findNode');
  const node = allNodes.get(name);
  if (node === undefined) throw new BlockError('ENOENT', `Cannot find node '${name}'`, { node: name, field: 'node-name', value: name });
  return node;
}

/**
 * Every open node, in creation order.
 * @locking global-state
 */
export function listNodes(bql: Bql): BlockNode[] {
  assertBql(bql, 'listNodes');
  return [...allNodes.values()];
}

/**
 * Links `child` under `parent` in `role`. The child must not be drained less than the parent: a
 * new edge inherits the parent's quiesce state so that drain counters stay balanced.
 * @locking global-state
 */
export function attachChild(bql: Bql, parent: BlockNode, role: ChildRole, child: BlockNode): BdrvChild {
  assertBql(bql, 'attachChild');
  if (parent === child) throw new BlockError('EINVAL', `Node '${parent.nodeName}' cannot be its own child`, { node: parent.nodeName });
  if (isAncestor(child, parent)) {
    throw new BlockError('EINVAL', `Making '${child.nodeName}' a child of '${parent.nodeName}' would create a cycle`, { node: parent.nodeName });
  }
  if (parent.children.some((c) => c.role === role && role !== 'data')) {
    throw new BlockError('EINVAL', `Node '${parent.nodeName}' already has a '${role}' child`, { node: parent.nodeName, field: role });
  }
  const edge = new BdrvChild(parent, role, child);
  parent.children.push(edge);
  child.parents.add(edge);
  // a quiesced child quiesces its new parent, as if the parent had been there at drained_begin
  if (child.quiesceCounter > 0) for (let i = 0; i < child.quiesceCounter; i++) parent.quiesce();
  return edge;
}

/**
 * Unlinks an edge; the parent must be drained (no request may cross the edge meanwhile).
 * @locking global-state
 */
export function detachChild(bql: Bql, drained: DrainedProof, edge: BdrvChild): void {
  assertBql(bql, 'detachChild');
  assertDrained(bql, drained, edge.parent, 'detachChild');
  const i = edge.parent.children.indexOf(edge);
  if (i < 0) throw new BlockError('ENOENT', `Node '${edge.parent.nodeName}' has no such '${edge.role}' child`, { node: edge.parent.nodeName });
  edge.parent.children.splice(i, 1);
  edge.child.parents.delete(edge);
  for (let k = 0; k < edge.child.quiesceCounter; k++) edge.parent.unquiesce();
}

function isAncestor(candidate: BlockNode, node: BlockNode): boolean {
  const stack = [node];
  const seen = new Set<BlockNode>();
  while (stack.length > 0) {
    const n = stack.pop() as BlockNode;
    if (n === candidate) return true;
    if (seen.has(n)) continue;
    seen.add(n);
    for (const p of n.parents) if (p instanceof BdrvChild) stack.push(p.parent);
  }
  return false;
}

function nodeNameFor(opts: NodeOptions): string {
  const given = opts['node-name'];
  if (given !== undefined) {
    if (!NODE_NAME_RE.test(given)) {
      throw new BlockError('EINVAL', `Invalid node-name '${given}': it must start with a letter and hold at most 128 letters, digits, '-', '.', '_'`, {
        field: 'node-name',
        value: given,
      });
    }
    if (allNodes.has(given)) throw new BlockError('EINVAL', `Duplicate nodes with node-name='${given}'`, { field: 'node-name', value: given });
    return given;
  }
  let name: string;
  do name = `#block${String(++autoNameCounter).padStart(3, '0')}`;
  while (allNodes.has(name));
  return name;
}

function driverOptions(opts: NodeOptions): NodeOptions {
  const out: NodeOptions = {};
  for (const [k, v] of Object.entries(opts)) if (!GENERIC_OPTIONS.has(k) && !k.startsWith('file.')) out[k] = v;
  return out;
}

async function instantiate(bql: Bql, drv: BlockDriver, opts: NodeOptions, readOnly: boolean, ioThread: IOThread | null, filename: string, file: BlockNode | null): Promise<BlockNode> {
  const node = new BlockNode(nodeNameFor(opts), drv, opts, readOnly, ioThread, filename);
  if (file !== null) attachChild(bql, node, 'file', file);
  node.quiesceCounter += drainAllState.count;
  allNodes.set(node.nodeName, node);
  try {
    node.instance = await drv.open(bql, node, driverOptions(opts));
  } catch (e) {
    allNodes.delete(node.nodeName);
    if (file !== null) {
      const edge = node.children[0];
      if (edge !== undefined) {
        node.children.length = 0;
        file.parents.delete(edge);
      }
    }
    throw e;
  }
  return node;
}

async function probeFormat(bql: Bql, file: BlockNode): Promise<BlockDriver> {
  const header = new Uint8Array(Math.min(2048, Math.max(0, file.drv.getLength())));
  if (header.length > 0) await bdrvPread(file, 0, header);
  let best: BlockDriver | null = null;
  let bestScore = 0;
  for (const drv of probingDrivers()) {
    const score = drv.probe?.(header, file.filename) ?? 0;
    if (score > bestScore) {
      best = drv;
      bestScore = score;
    }
  }
  return best ?? findDriver('raw');
}

/**
 * Opens a node (and its protocol child) from QEMU-style options, as `blockdev-add` and `-drive`
 * do: `driver=memory,size=64M`; `file=disk.img,format=raw`; `driver=raw,file.driver=memory,
 * file.size=1M`; with `node-name=`, `read-only=on`, `iothread=ID`. Without a format the image is
 * probed (raw when nothing matches).
 * @locking global-state
 */
export async function openNode(bql: Bql, options: NodeOptions | string): Promise<BlockNode> {
  assertBql(bql, 'openNode');
  const opts = typeof options === 'string' ? parseOptions(options, 'driver') : { ...options };
  const readOnly = parseBool(opts, 'read-only', parseBool(opts, 'readonly', false));
  const ioThreadId = opts['iothread'];
  const ioThread = ioThreadId === undefined ? null : findIOThread(bql, ioThreadId);
  const driverName = opts['driver'] ?? opts['format'];
  if (opts['driver'] !== undefined && opts['format'] !== undefined && opts['driver'] !== opts['format']) {
    throw new BlockError('EINVAL', `Options 'driver=${opts['driver']}' and 'format=${opts['format']}' disagree`, { field: 'format' });
  }
  const drv = driverName === undefined ? null : findDriver(driverName);
  if (drv !== null && drv.kind === 'protocol') {
    const filename = opts['filename'] ?? opts['file'] ?? '';
    if (opts['file'] !== undefined && opts['filename'] === undefined) opts['filename'] = opts['file'];
    return instantiate(bql, drv, opts, readOnly, ioThread, filename, null);
  }
  // a format node (or one to probe): open its protocol child first
  const fileOpts = subOptions(opts, 'file');
  const fileName = opts['file'];
  if (fileName !== undefined) fileOpts['filename'] ??= fileName;
  fileOpts['driver'] ??= 'file';
  if (fileOpts['filename'] === undefined && fileOpts['driver'] === 'file') {
    throw new BlockError('EINVAL', `A '${driverName ?? 'format'}' node needs a file: give file=PATH or file.driver=...`, { field: 'file' });
  }
  const childOpts: NodeOptions = { ...fileOpts, 'read-only': readOnly ? 'on' : 'off' };
  if (ioThreadId !== undefined) childOpts['iothread'] = ioThreadId;
  const file = await openNode(bql, childOpts);
  try {
    const formatDrv = drv ?? (await probeFormat(bql, file));
    if (formatDrv.kind === 'protocol') {
      throw new BlockError('EINVAL', `Driver '${formatDrv.formatName}' is a protocol driver, not a format`, { field: 'format', value: formatDrv.formatName });
    }
    const nodeOpts = { ...opts, driver: formatDrv.formatName };
    return await instantiate(bql, formatDrv, nodeOpts, readOnly, ioThread, file.filename, file);
  } catch (e) {
    await closeNode(bql, file);
    throw e;
  }
}

/**
 * Closes `node`: drains it, closes its driver, unlinks its children and closes those left without
 * a parent. EBUSY while a backend or another node still uses it.
 * @locking global-state
 */
export async function closeNode(bql: Bql, node: BlockNode): Promise<void> {
  assertBql(bql, 'closeNode');
  if (node.parents.size > 0) {
    const users = [...node.parents].map((p) => `'${p.parentName}'`).join(', ');
    throw new BlockError('EBUSY', `Node '${node.nodeName}' is in use by ${users}`, { node: node.nodeName, op: 'close' });
  }
  if (allNodes.get(node.nodeName) !== node) return;
  const drained = await drainedBegin(bql, node);
  try {
    if (node.instance !== null) await node.instance.close(bql, drained);
  } finally {
    node.instance = null;
    const orphans: BlockNode[] = [];
    for (const edge of [...node.children]) {
      detachChild(bql, drained, edge);
      if (edge.child.parents.size === 0) orphans.push(edge.child);
    }
    drainedEnd(bql, drained);
    allNodes.delete(node.nodeName);
    for (const child of orphans) await closeNode(bql, child);
  }
}

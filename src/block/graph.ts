/**
 * Building and tearing down the block graph: opening nodes from QEMU-style options, linking
 * children, closing nodes, finding them by name.
 *
 * Global-state code: every function takes the `Bql` proof; removing a node or an edge also takes
 * a drained proof, because no request may be in flight across an edge that disappears.
 */
import { refuseIfSnapshotClaimed } from './snapshot-lock.js';
import { backingChoice } from './backing.js';
import { assertBql, type Bql } from './bql.js';
import { assertDrained, callDrainedCallback, drainedBegin, drainedEnd, type DrainedProof } from './drain.js';
import { findDriver, findProtocolDriver, probingDrivers, type BlockDriver, type BlockDriverInstance } from './driver.js';
import { BlockError } from './errors.js';
import { bdrvPread } from './io.js';
import { findIOThread, type IOThread } from './iothread.js';
import { BdrvChild, BlockNode, nodeLinkEdge, nodeQuiesce, nodeReachedOnlyThrough, nodeSetInstance, nodeUnlinkEdge, nodeUnquiesce, type ChildRole } from './node.js';
import { parseBool, parseOptions, subOptions, type NodeOptions } from './options.js';
import { allNodes, drainAllState } from './registry.js';
import { gateKick, gateRunAsOwner } from './request-gate.js';

let autoNameCounter = 0;
/**
 * Nodes a parent linked by name (`backing=NODE`): their owner opened them and closes them, so
 * they stay open when that parent goes away (closeNode closes other children left parentless).
 */
const referencedNodes = new WeakSet<BlockNode>();
/** Nodes whose driver closeNode is closing now: the only time a sealed `close` runs. */
const closing = new WeakSet<BlockNode>();
const NODE_NAME_RE = /^[A-Za-z][A-Za-z0-9_.-]{0,127}$/;
/** Options the generic layer consumes; the rest go to the driver. */
const GENERIC_OPTIONS = new Set(['driver', 'format', 'node-name', 'read-only', 'readonly', 'iothread', 'file', 'file-node', 'backing']);
/** How many backing files deep a chain may go (a loop of names would otherwise never end). */
const MAX_BACKING_DEPTH = 64;

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
  refuseIfSnapshotClaimed(parent, 'attachChild');
  refuseIfSnapshotClaimed(child, 'attachChild');
  if (parent === child) throw new BlockError('EINVAL', `Node '${parent.nodeName}' cannot be its own child`, { node: parent.nodeName });
  if (isAncestor(child, parent)) {
    throw new BlockError('EINVAL', `Making '${child.nodeName}' a child of '${parent.nodeName}' would create a cycle`, { node: parent.nodeName });
  }
  if (parent.children.some((c) => c.role === role && role !== 'data')) {
    throw new BlockError('EINVAL', `Node '${parent.nodeName}' already has a '${role}' child`, { node: parent.nodeName, field: role });
  }
  const edge = new BdrvChild(parent, role, child);
  nodeLinkEdge(bql, edge);
  // a quiesced child quiesces its new parent once, as its 0 -> 1 transition did for the parents it
  // had then (and its 1 -> 0 transition will end that one quiesce)
  if (child.quiesceCounter > 0) nodeQuiesce(bql, parent);
  return edge;
}

/**
 * Unlinks an edge; the parent must be drained (no request may cross the edge meanwhile).
 * @locking global-state
 */
export function detachChild(bql: Bql, drained: DrainedProof, edge: BdrvChild): void {
  assertBql(bql, 'detachChild');
  assertDrained(bql, drained, edge.parent, 'detachChild');
  refuseIfSnapshotClaimed(edge.parent, 'detachChild');
  refuseIfSnapshotClaimed(edge.child, 'detachChild');
  if (!edge.parent.children.includes(edge)) {
    throw new BlockError('ENOENT', `Node '${edge.parent.nodeName}' has no such '${edge.role}' child`, { node: edge.parent.nodeName });
  }
  nodeUnlinkEdge(bql, edge);
  if (edge.child.quiesceCounter > 0) nodeUnquiesce(bql, edge.parent);
  // the child may no longer be covered by a section of the parent: stray requests may go
  gateKick();
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
  for (const [k, v] of Object.entries(opts)) if (!GENERIC_OPTIONS.has(k) && !k.startsWith('file.') && !k.startsWith('backing.')) out[k] = v;
  return out;
}

async function instantiate(bql: Bql, drv: BlockDriver, opts: NodeOptions, readOnly: boolean, ioThread: IOThread | null, filename: string, file: BlockNode | null, probed = false): Promise<BlockNode> {
  const node = new BlockNode(nodeNameFor(opts), drv, opts, readOnly, ioThread, filename, probed);
  if (file !== null) attachChild(bql, node, 'file', file);
  // nodes opened inside drain-all start quiesced (the new node has no parents to pass it on to)
  for (let i = 0; i < drainAllState.count; i++) nodeQuiesce(bql, node);
  allNodes.set(node.nodeName, node);
  try {
    // the open is the new node's owner: its own I/O (header reads, a repair) reaches it and
    // its file child even inside drain-all, while nobody else can reach them yet
    const opening = { done: false };
    try {
      assertBql(bql, `open (node '${node.nodeName}')`);
      const inst = await gateRunAsOwner(
        (n) => !opening.done && nodeReachedOnlyThrough(node, n),
        () => drv.open(bql, node, driverOptions(opts)),
      );
      nodeSetInstance(bql, node, inst);
      sealProofCallbacks(node, inst);
    } finally {
      opening.done = true;
    }
  } catch (e) {
    allNodes.delete(node.nodeName);
    for (const edge of [...node.children]) nodeUnlinkEdge(bql, edge);
    throw e;
  }
  return node;
}

async function probeFormat(bql: Bql, file: BlockNode): Promise<BlockDriver> {
  assertBql(bql, 'probe');
  const header = new Uint8Array(Math.min(2048, Math.max(0, file.drv.getLength())));
  // the opener reads the header of a child nobody else holds yet (it may be drained by drain-all)
  if (header.length > 0) await gateRunAsOwner((n) => n === file, () => bdrvPread(file, 0, header));
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
 * probed (raw when nothing matches). A format node whose image names a backing file gets it
 * opened (read-only) and linked as its `backing` child, down the whole chain; `backing=null`
 * opens none, `backing=NODE` links an open node, `backing.*` options open it differently.
 * @locking global-state
 */
export async function openNode(bql: Bql, options: NodeOptions | string): Promise<BlockNode> {
  assertBql(bql, 'openNode');
  return openNodeAt(bql, options, 0);
}

/** Links (or opens and links) the backing child that the options and the image name. */
async function openBacking(bql: Bql, node: BlockNode, opts: NodeOptions, depth: number): Promise<void> {
  const named = node.drv.backingFile?.() ?? null;
  const choice = backingChoice(opts, named, { filename: node.filename, nodeName: node.nodeName });
  if (choice.kind === 'none') return;
  if (node.drv.backingFile === undefined) {
    throw new BlockError('EINVAL', `Driver '${node.driver.formatName}' does not support backing files (node '${node.nodeName}')`, { node: node.nodeName, field: 'backing' });
  }
  if (choice.kind === 'node') {
    const named = findNode(bql, choice.nodeName);
    attachChild(bql, node, 'backing', named);
    referencedNodes.add(named);
    return;
  }
  if (depth >= MAX_BACKING_DEPTH) {
    throw new BlockError('EINVAL', `Backing file chain of node '${node.nodeName}' is more than ${MAX_BACKING_DEPTH} images deep`, { node: node.nodeName, field: 'backing' });
  }
  let backing: BlockNode;
  try {
    backing = await openNodeAt(bql, choice.options, depth + 1);
  } catch (e) {
    const inner = e instanceof BlockError ? e : null;
    throw new BlockError(inner?.code ?? 'EIO', `Could not open backing file: ${e instanceof Error ? e.message : String(e)}`, {
      node: node.nodeName,
      file: choice.options['file'] ?? node.filename,
      field: 'backing',
      cause: e,
    });
  }
  try {
    attachChild(bql, node, 'backing', backing);
  } catch (e) {
    await closeNode(bql, backing);
    throw e;
  }
}

async function openNodeAt(bql: Bql, options: NodeOptions | string, depth: number): Promise<BlockNode> {
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
  // a format node (or one to probe): its protocol child is an open node (`file-node=NAME`, as
  // blockdev-add's `"file": "NAME"`) or is opened first from the file options
  const fileNode = opts['file-node'];
  let file: BlockNode;
  if (fileNode !== undefined) {
    if (opts['file'] !== undefined || Object.keys(subOptions(opts, 'file')).length > 0) {
      throw new BlockError('EINVAL', `Option 'file-node=${fileNode}' cannot be combined with 'file' options`, { field: 'file-node' });
    }
    file = findNode(bql, fileNode);
    if (file.parents.size > 0) {
      // two format nodes over one file would each keep their own metadata: corruption
      const users = [...file.parents].map((p) => `'${p.parentName}'`).join(', ');
      throw new BlockError('EBUSY', `Node '${fileNode}' is already in use by ${users}: a file node serves one parent`, { node: fileNode, field: 'file-node' });
    }
    if (!readOnly && file.readOnly) {
      throw new BlockError('EACCES', `Node '${fileNode}' is read-only: a writable node cannot use it as its file`, { node: fileNode, field: 'file-node' });
    }
  } else {
    const fileOpts = subOptions(opts, 'file');
    const fileName = opts['file'];
    if (fileName !== undefined) fileOpts['filename'] ??= fileName;
    // a file name with a protocol prefix (nbd://, nbd+unix://) selects its protocol driver
    const protocol = fileOpts['driver'] === undefined && fileOpts['filename'] !== undefined ? findProtocolDriver(fileOpts['filename']) : null;
    if (protocol !== null) fileOpts['driver'] = protocol.formatName;
    fileOpts['driver'] ??= 'file';
    if (fileOpts['filename'] === undefined && fileOpts['driver'] === 'file') {
      throw new BlockError('EINVAL', `A '${driverName ?? 'format'}' node needs a file: give file=PATH or file.driver=...`, { field: 'file' });
    }
    const childOpts: NodeOptions = { ...fileOpts, 'read-only': readOnly ? 'on' : 'off' };
    if (ioThreadId !== undefined) childOpts['iothread'] = ioThreadId;
    file = await openNode(bql, childOpts);
  }
  let node: BlockNode;
  try {
    const formatDrv = drv ?? (await probeFormat(bql, file));
    if (formatDrv.kind === 'protocol') {
      throw new BlockError('EINVAL', `Driver '${formatDrv.formatName}' is a protocol driver, not a format`, { field: 'format', value: formatDrv.formatName });
    }
    const nodeOpts = { ...opts, driver: formatDrv.formatName };
    node = await instantiate(bql, formatDrv, nodeOpts, readOnly, ioThread, file.filename, file, drv === null);
  } catch (e) {
    if (fileNode === undefined) await closeNode(bql, file);
    throw e;
  }
  // a node linked by name stays open when this one closes: its owner closes it
  if (fileNode !== undefined) referencedNodes.add(file);
  try {
    await openBacking(bql, node, opts, depth);
  } catch (e) {
    await closeNode(bql, node);
    throw e;
  }
  return node;
}

/**
 * Closes `node`: drains it, closes its driver, unlinks its children and closes those left without
 * a parent (except nodes linked by name, `backing=NODE`, which their owner closes). EBUSY while
 * a backend or another node still uses it.
 * @locking global-state
 */
export async function closeNode(bql: Bql, node: BlockNode): Promise<void> {
  assertBql(bql, 'closeNode');
  refuseIfSnapshotClaimed(node, 'closeNode');
  if (node.parents.size > 0) {
    const users = [...node.parents].map((p) => `'${p.parentName}'`).join(', ');
    throw new BlockError('EBUSY', `Node '${node.nodeName}' is in use by ${users}`, { node: node.nodeName, op: 'close' });
  }
  if (allNodes.get(node.nodeName) !== node) return;
  const drained = await drainedBegin(bql, node);
  try {
    const inst = node.instance;
    closing.add(node);
    try {
      if (inst !== null) await inst.close(bql, drained);
    } finally {
      closing.delete(node);
    }
  } finally {
    nodeSetInstance(bql, node, null);
    const orphans: BlockNode[] = [];
    for (const edge of [...node.children]) {
      detachChild(bql, drained, edge);
      if (edge.child.parents.size === 0 && !referencedNodes.has(edge.child)) orphans.push(edge.child);
    }
    drainedEnd(bql, drained);
    allNodes.delete(node.nodeName);
    for (const child of orphans) await closeNode(bql, child);
  }
}

/** Instance callbacks whose first parameters are the BQL and a drained proof. */
type DrainedCallbackName = {
  [K in keyof BlockDriverInstance]-?: NonNullable<BlockDriverInstance[K]> extends (...args: infer A) => Promise<unknown> ? (A extends [Bql, DrainedProof, ...unknown[]] ? K : never) : never;
}[keyof BlockDriverInstance];
/** Instance callbacks that take the BQL but no drained proof. */
type BqlCallbackName = Exclude<
  {
    [K in keyof BlockDriverInstance]-?: NonNullable<BlockDriverInstance[K]> extends (...args: infer A) => Promise<unknown> ? (A extends [Bql, ...unknown[]] ? K : never) : never;
  }[keyof BlockDriverInstance],
  DrainedCallbackName
>;

const DRAINED_CALLBACKS = ['close', 'snapshotCreate', 'snapshotGoto', 'snapshotDelete', 'checkImage', 'changeBackingFile', 'makeEmpty'] as const satisfies readonly DrainedCallbackName[];
const BQL_CALLBACKS = ['snapshotList', 'snapshotLoadTmp'] as const satisfies readonly BqlCallbackName[];
// a proof-taking callback added to BlockDriverInstance and not sealed below does not compile
const sealedEveryDrainedCallback: [Exclude<DrainedCallbackName, (typeof DRAINED_CALLBACKS)[number]>] extends [never] ? true : never = true;
const sealedEveryBqlCallback: [Exclude<BqlCallbackName, (typeof BQL_CALLBACKS)[number]>] extends [never] ? true : never = true;
void sealedEveryDrainedCallback;
void sealedEveryBqlCallback;

type AnyProofCallback = (bql: Bql, ...rest: unknown[]) => Promise<unknown>;

/**
 * Seals the proof-taking callbacks of a freshly opened instance: each is replaced by a wrapper,
 * bound to `node`, that asserts the proofs before the driver runs (the BQL live and owned; a
 * drained proof live, covering this node, with nothing in flight) and runs a drained callback as
 * the section's owner. Whoever calls the callback (the block layer, or code holding
 * `node.instance`), a driver is never called with a stale proof or with another node's.
 */
function sealProofCallbacks(node: BlockNode, inst: BlockDriverInstance): void {
  const slots = inst as unknown as Record<string, AnyProofCallback | undefined>;
  for (const name of DRAINED_CALLBACKS) {
    const cb = slots[name];
    if (cb === undefined) continue;
    const op = `${name} (node '${node.nodeName}')`;
    slots[name] = (bql: Bql, ...rest: unknown[]) => {
      const drained = rest[0] as DrainedProof;
      return callDrainedCallback(bql, drained, node, op, () => {
        // closing a driver while its node stays in the graph would leave requests on a closed fd
        if (name === 'close' && !closing.has(node)) {
          throw new BlockError('EPERM', `${op}: only closeNode closes a node's driver (it drains, closes and unlinks the node)`, { node: node.nodeName, op: 'close' });
        }
        return cb.call(inst, bql, ...rest);
      });
    };
  }
  for (const name of BQL_CALLBACKS) {
    const cb = slots[name];
    if (cb === undefined) continue;
    const op = `${name} (node '${node.nodeName}')`;
    slots[name] = (bql: Bql, ...rest: unknown[]) => {
      assertBql(bql, op);
      return cb.call(inst, bql, ...rest);
    };
  }
}

/** Nodes a user holds (the monitor's blockdev-add): a job that drops them from a chain leaves them open. */
const retainedNodes = new WeakSet<BlockNode>();

/**
 * Marks `node` as held by a user (QMP's blockdev-add: the monitor's reference): a block job that
 * takes it out of a chain leaves it open for the user's blockdev-del, as QEMU keeps such nodes.
 * @locking global-state
 */
export function retainNode(bql: Bql, node: BlockNode): void {
  assertBql(bql, 'retainNode');
  retainedNodes.add(node);
}

/**
 * Ends a user's hold on `node` (blockdev-del).
 * @locking global-state
 */
export function releaseNode(bql: Bql, node: BlockNode): void {
  assertBql(bql, 'releaseNode');
  retainedNodes.delete(node);
}

/**
 * Closes `node` once nothing uses it and no user holds it: what a job does with the images it took
 * out of a chain.
 * @locking global-state
 */
export async function closeNodeIfUnused(bql: Bql, node: BlockNode): Promise<void> {
  assertBql(bql, 'closeNodeIfUnused');
  if (node.parents.size === 0 && !retainedNodes.has(node) && allNodes.get(node.nodeName) === node) await closeNode(bql, node);
}

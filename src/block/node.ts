/**
 * BlockNode: one node of the block graph (a driver instance with its options, children and
 * counters), and BdrvChild, the edge from a parent node to a child.
 *
 * The objects are global state: they are created, linked and unlinked under the BQL (graph.ts).
 * Their counters (`inFlight`, `quiesceCounter`) are touched by the request path and by drain;
 * both run on the main loop, so plain numbers are enough and assertions keep them honest.
 *
 * Everything that drain and the request path rely on (the counters, the parent set, the child
 * list, the driver instance) is readonly to the rest of the program: private fields behind
 * getters (and `ReadonlySet` / `ReadonlyArray` views). Only this module changes them, through the
 * `node*` functions below, which the block layer's own modules call (io.ts counts requests,
 * drain.ts quiesces, graph.ts and backend.ts link edges); src/index.ts exports none of them.
 */
import type { Bql } from './bql.js';
import type { BlockDriver, BlockDriverInstance } from './driver.js';
import { BlockError } from './errors.js';
import type { IOThread } from './iothread.js';
import type { NodeOptions } from './options.js';

/** The role of a child edge (QEMU's BdrvChildRole, reduced to what snapstack uses). */
export type ChildRole = 'file' | 'backing' | 'data';

/**
 * What a node's parent must do when the node is drained (QEMU's BdrvChildClass drain callbacks):
 * stop submitting new requests, and report whether it still has requests of its own in flight.
 */
export interface DrainParent {
  /** Human-readable name for messages (node name or backend name). */
  readonly parentName: string;
  /** The node stopped accepting requests from this parent: quiesce. */
  parentDrainedBegin(bql: Bql): void;
  /** The node is no longer drained: resume. */
  parentDrainedEnd(bql: Bql): void;
  /** True while this parent (or one above it) still has requests in flight that must finish first. */
  parentDrainedPoll(): boolean;
  /**
   * True while this parent itself has a request in flight: a request it makes on the node now
   * may be made on behalf of one (a nested request), which the request gate lets through.
   */
  parentHasRequestInFlight(): boolean;
}

/** An edge from `parent` to `child` in the role `role`. */
export class BdrvChild implements DrainParent {
  constructor(
    readonly parent: BlockNode,
    readonly role: ChildRole,
    readonly child: BlockNode,
  ) {}

  get parentName(): string {
    return this.parent.nodeName;
  }

  parentDrainedBegin(bql: Bql): void {
    nodeQuiesce(bql, this.parent);
  }

  parentDrainedEnd(bql: Bql): void {
    nodeUnquiesce(bql, this.parent);
  }

  parentDrainedPoll(): boolean {
    return this.parent.isBusy();
  }

  parentHasRequestInFlight(): boolean {
    return this.parent.inFlight > 0;
  }
}

/**
 * A read-only view of a set: what `BlockNode.parents` hands out, so that even a cast cannot add
 * or remove a parent behind drain's back (the view has no add, delete or clear).
 */
class ReadonlySetView<T> implements ReadonlySet<T> {
  constructor(private readonly set: Set<T>) {}
  get size(): number {
    return this.set.size;
  }
  has(value: T): boolean {
    return this.set.has(value);
  }
  forEach(fn: (value: T, key: T, set: ReadonlySet<T>) => void): void {
    for (const v of this.set) fn(v, v, this);
  }
  entries(): SetIterator<[T, T]> {
    return this.set.entries();
  }
  keys(): SetIterator<T> {
    return this.set.keys();
  }
  values(): SetIterator<T> {
    return this.set.values();
  }
  [Symbol.iterator](): SetIterator<T> {
    return this.set[Symbol.iterator]();
  }
}

/** The module-private mutators of BlockNode's private state (set in the class's static block). */
interface NodeMutators {
  addInFlight(node: BlockNode, delta: number): number;
  addQuiesce(node: BlockNode, delta: number): number;
  setInstance(node: BlockNode, inst: BlockDriverInstance | null): void;
  children(node: BlockNode): BdrvChild[];
  childrenChanged(node: BlockNode): void;
  parents(node: BlockNode): Set<DrainParent>;
}
let mut: NodeMutators;

/** A node of the block graph. */
export class BlockNode {
  #inFlight = 0;
  #quiesceCounter = 0;
  #instance: BlockDriverInstance | null = null;
  readonly #children: BdrvChild[] = [];
  /** A frozen copy of #children, renewed when an edge is linked or unlinked (rare, under the BQL). */
  #childrenView: readonly BdrvChild[] = Object.freeze([]);
  readonly #parents = new Set<DrainParent>();
  readonly #parentsView = new ReadonlySetView(this.#parents);

  constructor(
    readonly nodeName: string,
    readonly driver: BlockDriver,
    readonly options: NodeOptions,
    readonly readOnly: boolean,
    /** The IOThread that runs this node's transfers (null: the main loop's default pool). */
    readonly ioThread: IOThread | null,
    /** The host file behind the node, for display (`info block`); '' when there is none. */
    readonly filename: string,
    /** The format was guessed by probing, not given (QEMU's bs->probed): raw then guards block 0. */
    readonly probed: boolean = false,
  ) {}

  /** Requests that entered this node and have not completed. */
  get inFlight(): number {
    return this.#inFlight;
  }

  /** How many drained sections cover this node (0 = requests flow). */
  get quiesceCounter(): number {
    return this.#quiesceCounter;
  }

  /** The driver's instance; null before open completes and after close. */
  get instance(): BlockDriverInstance | null {
    return this.#instance;
  }

  /** The edges to this node's children (graph.ts links and unlinks them). */
  get children(): readonly BdrvChild[] {
    return this.#childrenView;
  }

  /** Who submits requests to this node: parent edges and backends (drain quiesces them). */
  get parents(): ReadonlySet<DrainParent> {
    return this.#parentsView;
  }

  /** The driver instance, or ENOMEDIUM naming the node when it is closed. */
  get drv(): BlockDriverInstance {
    const inst = this.#instance;
    if (inst === null) throw new BlockError('ENOMEDIUM', `node '${this.nodeName}' is closed`, { node: this.nodeName });
    return inst;
  }

  /** The child in role `file`, if any. */
  get file(): BlockNode | undefined {
    return this.#children.find((c) => c.role === 'file')?.child;
  }

  /** The child in role `backing` (the image this one is an overlay of), if any. */
  get backing(): BlockNode | undefined {
    return this.#children.find((c) => c.role === 'backing')?.child;
  }

  /** True while this node or any of its parents has requests in flight. */
  isBusy(): boolean {
    if (this.#inFlight > 0) return true;
    for (const p of this.#parents) if (p.parentDrainedPoll()) return true;
    return false;
  }

  static {
    mut = {
      addInFlight: (node, delta) => (node.#inFlight += delta),
      addQuiesce: (node, delta) => (node.#quiesceCounter += delta),
      setInstance: (node, inst) => {
        node.#instance = inst;
      },
      children: (node) => node.#children,
      childrenChanged: (node) => {
        node.#childrenView = Object.freeze([...node.#children]);
      },
      parents: (node) => node.#parents,
    };
  }
}

/**
 * @internal A request enters `node`: one more in flight (io.ts).
 * @locking io
 */
export function nodeRequestBegin(node: BlockNode): void {
  mut.addInFlight(node, 1);
}

/**
 * @internal A request on `node` completed; returns the requests still in flight. EIO (and the
 * counter kept at 0) if it would go negative.
 * @locking io
 */
export function nodeRequestEnd(node: BlockNode): number {
  const left = mut.addInFlight(node, -1);
  if (left < 0) {
    mut.addInFlight(node, -left);
    throw new BlockError('EIO', `node '${node.nodeName}': in-flight counter went negative`, { node: node.nodeName });
  }
  return left;
}

/**
 * @internal Quiesces `node` and, on the first quiesce, all its parents (drain goes upward).
 * @locking global-state
 */
export function nodeQuiesce(bql: Bql, node: BlockNode): void {
  if (mut.addQuiesce(node, 1) === 1) {
    for (const p of mut.parents(node)) p.parentDrainedBegin(bql);
  }
}

/**
 * @internal Ends one quiesce of `node`; on the last one its parents end theirs. EINVAL without a
 * matching quiesce.
 * @locking global-state
 */
export function nodeUnquiesce(bql: Bql, node: BlockNode): void {
  if (node.quiesceCounter <= 0) {
    throw new BlockError('EINVAL', `node '${node.nodeName}': drained end without a matching begin`, { node: node.nodeName });
  }
  if (mut.addQuiesce(node, -1) === 0) {
    for (const p of mut.parents(node)) p.parentDrainedEnd(bql);
  }
}

/**
 * @internal Links `edge` into its parent's children and its child's parents (graph.ts).
 * @locking global-state
 */
export function nodeLinkEdge(_bql: Bql, edge: BdrvChild): void {
  mut.children(edge.parent).push(edge);
  mut.childrenChanged(edge.parent);
  mut.parents(edge.child).add(edge);
}

/**
 * @internal Unlinks `edge` from both ends; false when the parent did not have it (graph.ts).
 * @locking global-state
 */
export function nodeUnlinkEdge(_bql: Bql, edge: BdrvChild): boolean {
  const children = mut.children(edge.parent);
  const i = children.indexOf(edge);
  if (i >= 0) children.splice(i, 1);
  mut.childrenChanged(edge.parent);
  mut.parents(edge.child).delete(edge);
  return i >= 0;
}

/**
 * @internal Adds (or removes) a non-node parent of `node`: a backend (backend.ts).
 * @locking global-state
 */
export function nodeSetParent(_bql: Bql, node: BlockNode, parent: DrainParent, attached: boolean): void {
  if (attached) mut.parents(node).add(parent);
  else mut.parents(node).delete(parent);
}

/**
 * @internal Sets the node's driver instance after open, or null once closed (graph.ts).
 * @locking global-state
 */
export function nodeSetInstance(_bql: Bql, node: BlockNode, inst: BlockDriverInstance | null): void {
  mut.setInstance(node, inst);
}

/**
 * True when `node` is `root` or is reached only through it: every parent of `node` is an edge
 * from a node reached only through `root` (a backend parent, or none at all, breaks the chain).
 * This is what a drained section of `root` covers.
 * @locking common
 */
export function nodeReachedOnlyThrough(root: BlockNode, node: BlockNode): boolean {
  return reachedOnlyThrough(root, node, 0);
}

function reachedOnlyThrough(root: BlockNode, node: BlockNode, depth: number): boolean {
  if (node === root) return true;
  if (depth > 64 || node.parents.size === 0) return false;
  for (const p of node.parents) {
    if (!(p instanceof BdrvChild) || !reachedOnlyThrough(root, p.parent, depth + 1)) return false;
  }
  return true;
}

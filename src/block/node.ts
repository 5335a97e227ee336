/**
 * BlockNode: one node of the block graph (a driver instance with its options, children and
 * counters), and BdrvChild, the edge from a parent node to a child.
 *
 * The objects are global state: they are created, linked and unlinked under the BQL (graph.ts).
 * Their counters (`inFlight`, `quiesceCounter`) are touched by the request path and by drain;
 * both run on the main loop, so plain numbers are enough and assertions keep them honest.
 */
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
  parentDrainedBegin(): void;
  /** The node is no longer drained: resume. */
  parentDrainedEnd(): void;
  /** True while this parent still has requests in flight that must finish first. */
  parentDrainedPoll(): boolean;
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

  parentDrainedBegin(): void {
    this.parent.quiesce();
  }

  parentDrainedEnd(): void {
    this.parent.unquiesce();
  }

  parentDrainedPoll(): boolean {
    return this.parent.isBusy();
  }
}

/** A node of the block graph. */
export class BlockNode {
  /** Requests that entered this node and have not completed. */
  inFlight = 0;
  /** How many drained sections cover this node (0 = requests flow). */
  quiesceCounter = 0;
  /** The driver's instance; null before open completes and after close. */
  instance: BlockDriverInstance | null = null;
  readonly children: BdrvChild[] = [];
  readonly parents = new Set<DrainParent>();

  constructor(
    readonly nodeName: string,
    readonly driver: BlockDriver,
    readonly options: NodeOptions,
    readonly readOnly: boolean,
    /** The IOThread that runs this node's transfers (null: the main loop's default pool). */
    readonly ioThread: IOThread | null,
    /** The host file behind the node, for display (`info block`); '' when there is none. */
    readonly filename: string,
  ) {}

  /** The driver instance, or EIO naming the node when it is closed. */
  get drv(): BlockDriverInstance {
    const inst = this.instance;
    if (inst === null) throw new BlockError('ENOMEDIUM', `node '${this.nodeName}' is closed`, { node: this.nodeName });
    return inst;
  }

  /** The child in role `file`, if any. */
  get file(): BlockNode | undefined {
    return this.children.find((c) => c.role === 'file')?.child;
  }

  /** Quiesces this node and, on the first quiesce, all its parents (drain goes upward). */
  quiesce(): void {
    if (this.quiesceCounter++ === 0) {
      for (const p of this.parents) p.parentDrainedBegin();
    }
  }

  /** Ends one quiesce; on the last one, the parents end theirs in child-to-parent order. */
  unquiesce(): void {
    if (this.quiesceCounter <= 0) {
      throw new BlockError('EINVAL', `node '${this.nodeName}': drained end without a matching begin`, { node: this.nodeName });
    }
    if (--this.quiesceCounter === 0) {
      for (const p of this.parents) p.parentDrainedEnd();
    }
  }

  /** True while this node or any of its parents has requests in flight. */
  isBusy(): boolean {
    if (this.inFlight > 0) return true;
    for (const p of this.parents) if (p.parentDrainedPoll()) return true;
    return false;
  }
}

/**
 * Drained sections: quiesce a node (and its parents, upward, as QEMU 8+ does) and wait until
 * nothing is in flight; drain-all does the same for every node.
 *
 * Global-state code (BQL held). A section hands out a proof (`Drained<N>` or `DrainedAll`) that
 * functions needing a quiet node take as a parameter; ending the section revokes it, and any use
 * of a revoked or forged proof throws. Never drain from inside a request that holds an in-flight
 * reference on the same node: it would wait for itself.
 */
import { aioWaitWhile } from './aio-wait.js';
import { assertBql, type Bql } from './bql.js';
import { BlockError } from './errors.js';
import { BdrvChild, type BlockNode } from './node.js';
import { allNodes, drainAllState } from './registry.js';

let mintDrained: <N extends BlockNode>(node: N) => Drained<N>;
let mintDrainedAll: () => DrainedAll;

/** Proof that `node` is inside a drained section: quiesced, with nothing in flight. */
export class Drained<N extends BlockNode = BlockNode> {
  readonly node: N;
  #live = true;

  private constructor(node: N) {
    this.node = node;
  }

  /** False once the section ended. */
  get live(): boolean {
    return this.#live;
  }

  /** @internal Ends the proof's validity; only drainedEnd calls it. */
  revoke(): void {
    this.#live = false;
  }

  /** Brand check: true only for proofs a drained section minted. */
  static isIssued(value: unknown): value is Drained<BlockNode> {
    return typeof value === 'object' && value !== null && #live in value;
  }

  static {
    mintDrained = <N extends BlockNode>(node: N): Drained<N> => new Drained(node);
  }
}

/** Proof that every node is inside a drain-all section. */
export class DrainedAll {
  #live = true;

  private constructor() {}

  /** False once the section ended. */
  get live(): boolean {
    return this.#live;
  }

  /** @internal Ends the proof's validity; only drainAllEnd calls it. */
  revoke(): void {
    this.#live = false;
  }

  /** Brand check: true only for proofs a drain-all section minted. */
  static isIssued(value: unknown): value is DrainedAll {
    return typeof value === 'object' && value !== null && #live in value;
  }

  static {
    mintDrainedAll = (): DrainedAll => new DrainedAll();
  }
}

/** Either proof: what snapshot operations and close accept. */
export type DrainedProof = Drained<BlockNode> | DrainedAll;

/** Test-only switch: when set, drain neither quiesces nor waits (proves the stress test can fail). */
const testSwitch = { drainDisabled: false };

/**
 * @internal Disables draining for the stress test's negative control; never used by the library.
 * @locking common
 */
export function setDrainDisabledForTesting(disabled: boolean): void {
  testSwitch.drainDisabled = disabled;
}

/**
 * Begins a drained section on `node`: quiesces it and its parents (backends queue new requests),
 * then waits until neither it nor any parent has a request in flight. Sections nest.
 * @locking global-state
 */
export async function drainedBegin<N extends BlockNode>(bql: Bql, node: N): Promise<Drained<N>> {
  assertBql(bql, 'drainedBegin');
  if (!allNodes.has(node.nodeName) || allNodes.get(node.nodeName) !== node) {
    throw new BlockError('ENOENT', `drainedBegin: node '${node.nodeName}' is not in the graph`, { node: node.nodeName, op: 'drainedBegin' });
  }
  if (!testSwitch.drainDisabled) {
    node.quiesce();
    while (node.isBusy()) await aioWaitWhile(() => node.isBusy());
  }
  return mintDrained(node);
}

/**
 * Ends a drained section: revokes the proof, and on the node's last section restarts its parents
 * (queued backend requests resume in order). Never waits.
 * @locking global-state
 */
export function drainedEnd(bql: Bql, drained: Drained<BlockNode>): void {
  assertBql(bql, 'drainedEnd');
  assertLiveProof(drained, 'drainedEnd');
  drained.revoke();
  if (!testSwitch.drainDisabled) drained.node.unquiesce();
}

/**
 * Begins a drain-all section: quiesces every node without waiting, then waits until no node is
 * busy. Nodes opened during the section start quiesced.
 * @locking global-state
 */
export async function drainAllBegin(bql: Bql): Promise<DrainedAll> {
  assertBql(bql, 'drainAllBegin');
  if (!testSwitch.drainDisabled) {
    drainAllState.count++;
    for (const node of allNodes.values()) node.quiesce();
    const anyBusy = (): boolean => {
      for (const node of allNodes.values()) if (node.isBusy()) return true;
      return false;
    };
    while (anyBusy()) await aioWaitWhile(anyBusy);
    for (const node of allNodes.values()) {
      if (node.inFlight !== 0) {
        throw new BlockError('EBUSY', `drainAllBegin: node '${node.nodeName}' still has ${node.inFlight} requests in flight`, {
          node: node.nodeName,
        });
      }
    }
  }
  return mintDrainedAll();
}

/**
 * Ends a drain-all section and revokes its proof.
 * @locking global-state
 */
export function drainAllEnd(bql: Bql, drained: DrainedAll): void {
  assertBql(bql, 'drainAllEnd');
  assertLiveProof(drained, 'drainAllEnd');
  drained.revoke();
  if (!testSwitch.drainDisabled) {
    drainAllState.count--;
    for (const node of allNodes.values()) node.unquiesce();
  }
}

/**
 * Runs `fn` inside a drained section on `node` and ends the section afterwards, also on error.
 * @locking global-state
 */
export async function withDrained<N extends BlockNode, T>(bql: Bql, node: N, fn: (d: Drained<N>) => Promise<T> | T): Promise<T> {
  const d = await drainedBegin(bql, node);
  try {
    return await fn(d);
  } finally {
    drainedEnd(bql, d);
  }
}

/**
 * Runs `fn` inside a drain-all section and ends it afterwards, also on error.
 * @locking global-state
 */
export async function withDrainedAll<T>(bql: Bql, fn: (d: DrainedAll) => Promise<T> | T): Promise<T> {
  const d = await drainAllBegin(bql);
  try {
    return await fn(d);
  } finally {
    drainAllEnd(bql, d);
  }
}

function assertLiveProof(proof: DrainedProof, op: string): void {
  if (!Drained.isIssued(proof) && !DrainedAll.isIssued(proof)) {
    throw new BlockError('EPERM', `${op}: the drained proof is forged (not issued by a drained section)`, { op });
  }
  if (!proof.live) {
    const what = proof instanceof Drained ? `node '${proof.node.nodeName}'` : 'all nodes';
    throw new BlockError('EPERM', `${op}: the drained proof for ${what} is stale (its section has ended)`, { op });
  }
}

/** A drained proof for X also covers X's descendants whose parents are all covered. */
function covers(proof: Drained<BlockNode>, node: BlockNode, depth: number): boolean {
  if (node === proof.node) return true;
  if (depth > 64 || node.parents.size === 0) return false;
  for (const p of node.parents) {
    // a backend parent is not covered by a node's section
    if (!(p instanceof BdrvChild) || !covers(proof, p.parent, depth + 1)) return false;
  }
  return true;
}

/**
 * Throws EPERM unless `proof` is live and covers `node` (the node itself, or a child reached only
 * through it, or any node for drain-all), and asserts that the node has nothing in flight.
 * Also checks the BQL: only global-state code holds drained proofs.
 * @locking global-state
 */
export function assertDrained(bql: Bql, proof: DrainedProof, node: BlockNode, op: string): void {
  assertBql(bql, op);
  assertLiveProof(proof, op);
  if (proof instanceof Drained && !covers(proof, node, 0)) {
    throw new BlockError('EPERM', `${op}: node '${node.nodeName}' is not covered by the drained section of '${proof.node.nodeName}'`, {
      node: node.nodeName,
      op,
    });
  }
  if (!testSwitch.drainDisabled && node.inFlight !== 0) {
    throw new BlockError('EBUSY', `${op}: node '${node.nodeName}' is drained but has ${node.inFlight} requests in flight`, {
      node: node.nodeName,
      op,
    });
  }
}

/**
 * Drained sections: quiesce a node (and its parents, upward, as QEMU 8+ does) and wait until
 * nothing is in flight; drain-all does the same for every node.
 *
 * Global-state code (BQL held). A section hands out a proof (`Drained<N>` or `DrainedAll`) that
 * functions needing a quiet node take as a parameter; ending the section revokes it, and any use
 * of a revoked or forged proof throws. Never drain from inside a request that holds an in-flight
 * reference on the same node: it would wait for itself.
 *
 * While a section is live, node-level requests to the nodes it covers enter only from its owner
 * (the callback of withDrained / withDrainedAll / runInDrainedSection, and the driver callbacks
 * the block layer calls with the proof) or on behalf of a parent's in-flight request; any other
 * request waits for the section's end (request-gate.ts).
 */
import { aioWaitWhile } from './aio-wait.js';
import { assertBql, type Bql } from './bql.js';
import { BlockError } from './errors.js';
import { assertSnapshotLocked, type SnapshotLocked } from './snapshot-lock.js';
import { nodeQuiesce, nodeReachedOnlyThrough, nodeUnquiesce, type BlockNode } from './node.js';
import { allNodes, drainAllState } from './registry.js';
import { gateKick, gateRunAsOwner, gateSectionBegin, gateSectionEnd } from './request-gate.js';

let mintDrained: (node: BlockNode) => Drained;
let mintDrainedAll: () => DrainedAll;
let mintDrainedSet: (members: readonly Drained[]) => DrainedSet;
let revokeDrainedSet: (proof: DrainedSet) => void;
/** End a proof's life; module-private, so only drainedEnd / drainAllEnd can revoke a proof. */
let revokeDrained: (proof: Drained) => void;
let revokeDrainedAll: (proof: DrainedAll) => void;

/**
 * Proof that `node` is inside a drained section: quiesced, with nothing in flight.
 *
 * The proof names its node at run time only: TypeScript gives every BlockNode the same type, so
 * no type parameter could tell node A's proof from node B's (an earlier `Drained<N>` had one and
 * never used it). Every function that takes a proof checks, with `assertDrained`, that it is live
 * and covers the node it is given.
 */
export class Drained {
  readonly node: BlockNode;
  #live = true;

  private constructor(node: BlockNode) {
    this.node = node;
  }

  /** False once the section ended. */
  get live(): boolean {
    return this.#live;
  }

  /** Brand check: true only for proofs a drained section minted. */
  static isIssued(value: unknown): value is Drained {
    return typeof value === 'object' && value !== null && #live in value;
  }

  static {
    mintDrained = (node: BlockNode): Drained => new Drained(node);
    revokeDrained = (proof: Drained): void => {
      proof.#live = false;
    };
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

  /** Brand check: true only for proofs a drain-all section minted. */
  static isIssued(value: unknown): value is DrainedAll {
    return typeof value === 'object' && value !== null && #live in value;
  }

  static {
    mintDrainedAll = (): DrainedAll => new DrainedAll();
    revokeDrainedAll = (proof: DrainedAll): void => {
      proof.#live = false;
    };
  }
}

/**
 * Proof that each node of a set is inside a drained section of its own (drainedBeginSet): what a
 * group snapshot operation on some disks holds, so that I/O to the other disks goes on.
 */
export class DrainedSet {
  readonly members: readonly Drained[];
  #live = true;

  private constructor(members: readonly Drained[]) {
    this.members = members;
  }

  /** False once the sections ended. */
  get live(): boolean {
    return this.#live;
  }

  /** Brand check: true only for proofs drainedBeginSet minted. */
  static isIssued(value: unknown): value is DrainedSet {
    return typeof value === 'object' && value !== null && #live in value;
  }

  static {
    mintDrainedSet = (members) => new DrainedSet(members);
    revokeDrainedSet = (proof) => {
      proof.#live = false;
    };
  }
}

/** Any proof: what snapshot operations and close accept. */
export type DrainedProof = Drained | DrainedAll | DrainedSet;

/** What the group snapshot operations accept: every node drained, or each of theirs. */
export type GroupDrained = DrainedAll | DrainedSet;

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
 * then waits until neither it nor any parent has a request in flight. Sections nest. From then
 * on the node, and what is reached only through it, takes node-level requests only from the
 * section's owner (request-gate.ts); others wait for drainedEnd.
 * @locking global-state
 */
export async function drainedBegin(bql: Bql, node: BlockNode): Promise<Drained> {
  assertBql(bql, 'drainedBegin');
  if (!allNodes.has(node.nodeName) || allNodes.get(node.nodeName) !== node) {
    throw new BlockError('ENOENT', `drainedBegin: node '${node.nodeName}' is not in the graph`, { node: node.nodeName, op: 'drainedBegin' });
  }
  if (!testSwitch.drainDisabled) {
    nodeQuiesce(bql, node);
    while (node.isBusy()) await aioWaitWhile(() => node.isBusy());
  }
  const proof = mintDrained(node);
  if (!testSwitch.drainDisabled) gateSectionBegin(node);
  return proof;
}

/**
 * Ends a drained section: revokes the proof, and on the node's last section restarts its parents
 * (queued backend requests resume in order) and the node-level requests that waited. Never waits.
 * @locking global-state
 */
export function drainedEnd(bql: Bql, drained: Drained): void {
  assertBql(bql, 'drainedEnd');
  assertLiveProof(drained, 'drainedEnd');
  if (!(drained instanceof Drained)) throw new BlockError('EINVAL', 'drainedEnd: a drain-all proof ends with drainAllEnd', { op: 'drainedEnd' });
  revokeDrained(drained);
  if (!testSwitch.drainDisabled) {
    nodeUnquiesce(bql, drained.node);
    gateSectionEnd(drained.node);
  }
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
    for (const node of allNodes.values()) nodeQuiesce(bql, node);
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
 * Ends a drain-all section, revokes its proof and lets the waiting node-level requests go.
 * @locking global-state
 */
export function drainAllEnd(bql: Bql, drained: DrainedAll): void {
  assertBql(bql, 'drainAllEnd');
  assertLiveProof(drained, 'drainAllEnd');
  if (!(drained instanceof DrainedAll)) throw new BlockError('EINVAL', 'drainAllEnd: a node section ends with drainedEnd', { op: 'drainAllEnd' });
  revokeDrainedAll(drained);
  if (!testSwitch.drainDisabled) {
    drainAllState.count--;
    for (const node of allNodes.values()) nodeUnquiesce(bql, node);
    gateKick();
  }
}

/**
 * Begins a drained section on each of `nodes` (each once) and returns one proof for them all; if
 * one fails, the sections already begun end again.
 * @locking global-state
 */
export async function drainedBeginSet(bql: Bql, nodes: readonly BlockNode[]): Promise<DrainedSet> {
  assertBql(bql, 'drainedBeginSet');
  const members: Drained[] = [];
  try {
    for (const node of new Set(nodes)) members.push(await drainedBegin(bql, node));
  } catch (e) {
    for (const d of members.reverse()) drainedEnd(bql, d);
    throw e;
  }
  return mintDrainedSet(members);
}

/**
 * Ends every section of a set proof and revokes it.
 * @locking global-state
 */
export function drainedEndSet(bql: Bql, proof: DrainedSet): void {
  assertBql(bql, 'drainedEndSet');
  assertLiveProof(proof, 'drainedEndSet');
  revokeDrainedSet(proof);
  for (const d of [...proof.members].reverse()) drainedEnd(bql, d);
}

/**
 * Runs `fn` inside drained sections on each of `nodes`, as their owner, and ends them afterwards.
 * @locking global-state
 */
export async function withDrainedSet<T>(bql: Bql, nodes: readonly BlockNode[], fn: (d: DrainedSet) => Promise<T> | T): Promise<T> {
  const d = await drainedBeginSet(bql, nodes);
  try {
    return await gateRunAsOwner(proofAdmits(d), () => fn(d));
  } finally {
    drainedEndSet(bql, d);
  }
}

/**
 * Runs the I/O `fn` as the owner of the live section `proof` WITHOUT the BQL: the snapshot
 * lock's holder writes and reads the VM state, and flushes, on the nodes its own sections cover
 * between its global-state steps (snapshot-lock.ts). Requests `fn` makes to other quiet nodes
 * wait as anyone's do.
 * @locking snapshot
 */
export async function runDrainedIo<T>(snap: SnapshotLocked, proof: DrainedProof, fn: () => Promise<T>): Promise<T> {
  assertSnapshotLocked(snap, 'runDrainedIo');
  assertLiveProof(proof, 'runDrainedIo');
  return gateRunAsOwner(proofAdmits(proof), fn);
}

/** What a proof lets its owner reach while it is live. */
function proofAdmits(proof: DrainedProof): (node: BlockNode) => boolean {
  if (proof instanceof Drained) return (node) => proof.live && nodeReachedOnlyThrough(proof.node, node);
  if (proof instanceof DrainedSet) return (node) => proof.live && proof.members.some((d) => nodeReachedOnlyThrough(d.node, node));
  return () => proof.live;
}

/**
 * Runs `fn` as the owner of the live section `proof`: node-level requests that `fn` makes (and
 * everything it awaits) enter the nodes the proof covers although they are drained; any other
 * request to them waits for the section's end. `withDrained` / `withDrainedAll` run their
 * callback this way; callers of `drainedBegin` who do node-level I/O inside wrap it in this.
 * @locking global-state
 */
export async function runInDrainedSection<T>(bql: Bql, proof: DrainedProof, fn: () => Promise<T> | T): Promise<T> {
  assertBql(bql, 'runInDrainedSection');
  assertLiveProof(proof, 'runInDrainedSection');
  return gateRunAsOwner(proofAdmits(proof), fn);
}

/**
 * Runs `fn` inside a drained section on `node`, as its owner, and ends the section afterwards,
 * also on error.
 * @locking global-state
 */
export async function withDrained<T>(bql: Bql, node: BlockNode, fn: (d: Drained) => Promise<T> | T): Promise<T> {
  const d = await drainedBegin(bql, node);
  try {
    return await gateRunAsOwner(proofAdmits(d), () => fn(d));
  } finally {
    drainedEnd(bql, d);
  }
}

/**
 * Runs `fn` inside a drain-all section, as its owner, and ends it afterwards, also on error.
 * @locking global-state
 */
export async function withDrainedAll<T>(bql: Bql, fn: (d: DrainedAll) => Promise<T> | T): Promise<T> {
  const d = await drainAllBegin(bql);
  try {
    return await gateRunAsOwner(proofAdmits(d), () => fn(d));
  } finally {
    drainAllEnd(bql, d);
  }
}

function assertLiveProof(proof: DrainedProof, op: string): void {
  if (!Drained.isIssued(proof) && !DrainedAll.isIssued(proof) && !DrainedSet.isIssued(proof)) {
    throw new BlockError('EPERM', `${op}: the drained proof is forged (not issued by a drained section)`, { op });
  }
  if (!proof.live) {
    const what =
      proof instanceof Drained ? `node '${proof.node.nodeName}'` : proof instanceof DrainedSet ? `nodes ${proof.members.map((d) => `'${d.node.nodeName}'`).join(', ')}` : 'all nodes';
    throw new BlockError('EPERM', `${op}: the drained proof for ${what} is stale (its section has ended)`, { op });
  }
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
  if (proof instanceof Drained && !nodeReachedOnlyThrough(proof.node, node)) {
    throw new BlockError('EPERM', `${op}: node '${node.nodeName}' is not covered by the drained section of '${proof.node.nodeName}'`, {
      node: node.nodeName,
      op,
    });
  }
  if (proof instanceof DrainedSet && !proof.members.some((d) => nodeReachedOnlyThrough(d.node, node))) {
    throw new BlockError('EPERM', `${op}: node '${node.nodeName}' is not covered by the drained sections of ${proof.members.map((d) => `'${d.node.nodeName}'`).join(', ')}`, {
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

/**
 * Asserts `proof` (live, covering `node`, nothing in flight) and runs the driver callback `fn`
 * as the section's owner, so its node-level I/O reaches the drained nodes. The block layer calls
 * every proof-taking driver callback through this (graph.ts, snapshot.ts).
 * @locking global-state
 */
export async function callDrainedCallback<T>(bql: Bql, proof: DrainedProof, node: BlockNode, op: string, fn: () => Promise<T>): Promise<T> {
  assertDrained(bql, proof, node, op);
  return gateRunAsOwner(proofAdmits(proof), fn);
}

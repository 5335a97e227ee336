/**
 * The request gate: no node-level request reaches a quiet node behind its drained section's back.
 *
 * I/O code (the check runs on every node-level request; it costs two number tests while no
 * section is live anywhere). A node is *quiet* while its quiesce counter is above zero (its own
 * section, a child's, or drain-all) or while it is reached only through the root of a live
 * drained section (the file child of a drained qcow2 node). A request to a quiet node enters at
 * once only when it is
 *   1. the section owner's: it runs inside an owner scope that admits the node (the callback of
 *      `withDrained` / `withDrainedAll`, `runInDrainedSection`, the driver callbacks the block
 *      layer calls with a proof, a node's open), or
 *   2. nested: a direct parent of the node (an edge's parent node, or a backend) has a request
 *      in flight, which this one is made on behalf of (qcow2 reading L2 tables for a guest read
 *      that entered before the drain, or a backend with request queuing disabled).
 * Any other request (a stray one) waits, in arrival order, until its node is no longer
 * quiet, and is checked again then. JavaScript cannot name a function's caller, so the owner
 * scope travels with the async context (AsyncLocalStorage, enabled only while a scope runs), and
 * rule 2 is a judgement on counters: a stray request that arrives while a parent of the node
 * has a request of its own in flight gets in (the parent's requests are what a section waits
 * for, so a held section has none unless its owner made them).
 */
import { AsyncLocalStorage } from 'node:async_hooks';
import { BlockError } from './errors.js';
import { nodeReachedOnlyThrough, type BlockNode } from './node.js';

/** One owner scope; scopes nest (an inner `withDrained` inside a `withDrainedAll`). */
interface OwnerScope {
  readonly admits: (node: BlockNode) => boolean;
  readonly outer: OwnerScope | undefined;
}

const owners = new AsyncLocalStorage<OwnerScope>();
/** Owner scopes running now; the async context is tracked only while there is one. */
let activeScopes = 0;

/** Roots of the live node sections, with how many sections each has. */
const sectionRoots = new Map<BlockNode, number>();
/** Stray requests waiting, in arrival order (across nodes: released in the order they came). */
let waiting: Array<{ node: BlockNode; release: () => void }> = [];
/** A bound on waiting stray requests: past it they are refused (EBUSY) instead of queued. */
export const MAX_WAITING_REQUESTS = 65536;

/**
 * @internal Records that a drained section on `root` began (drain.ts).
 * @locking common
 */
export function gateSectionBegin(root: BlockNode): void {
  sectionRoots.set(root, (sectionRoots.get(root) ?? 0) + 1);
}

/**
 * @internal Records that a section on `root` ended and lets through the requests that may go now.
 * @locking common
 */
export function gateSectionEnd(root: BlockNode): void {
  const n = (sectionRoots.get(root) ?? 0) - 1;
  if (n > 0) sectionRoots.set(root, n);
  else sectionRoots.delete(root);
  gateKick();
}

/**
 * True while `node` is quiesced or covered by a live drained section.
 * @locking common
 */
export function nodeIsQuiet(node: BlockNode): boolean {
  if (node.quiesceCounter > 0) return true;
  for (const root of sectionRoots.keys()) if (nodeReachedOnlyThrough(root, node)) return true;
  return false;
}

function ownerAdmits(node: BlockNode): boolean {
  if (activeScopes === 0) return false;
  for (let s = owners.getStore(); s !== undefined; s = s.outer) if (s.admits(node)) return true;
  return false;
}

function nested(node: BlockNode): boolean {
  for (const p of node.parents) if (p.parentHasRequestInFlight()) return true;
  return false;
}

/**
 * Null when a request may enter `node` now (the hot path allocates nothing), else a promise that
 * resolves once it may. `op` names the request in the EBUSY refusal past MAX_WAITING_REQUESTS.
 * @locking io
 */
export function gateRequest(node: BlockNode, op: string): Promise<void> | null {
  if (node.quiesceCounter === 0 && sectionRoots.size === 0) return null;
  if (!nodeIsQuiet(node) || ownerAdmits(node) || nested(node)) return null;
  if (waiting.length >= MAX_WAITING_REQUESTS) {
    return Promise.reject(
      new BlockError('EBUSY', `${op} on node '${node.nodeName}': the node is drained and ${waiting.length} requests already wait for drained nodes`, {
        node: node.nodeName,
        op,
      }),
    );
  }
  return new Promise<void>((release) => {
    waiting.push({ node, release });
  }).then(() => recheck(node, op));
}

/** A released request checks again: a section that began meanwhile holds it once more. */
function recheck(node: BlockNode, op: string): Promise<void> | undefined {
  return gateRequest(node, op) ?? undefined;
}

/**
 * Releases the waiting requests of every node that is no longer quiet, in arrival order. Called
 * when a section ends and when the graph changes (a node may stop being covered).
 * @locking common
 */
export function gateKick(): void {
  if (waiting.length === 0) return;
  const still: typeof waiting = [];
  const go: Array<() => void> = [];
  for (const w of waiting) {
    if (nodeIsQuiet(w.node)) still.push(w);
    else go.push(w.release);
  }
  waiting = still;
  for (const release of go) release();
}

/**
 * How many stray requests wait for `node` (for diagnostics and tests).
 * @locking common
 */
export function gateWaiting(node: BlockNode): number {
  let n = 0;
  for (const w of waiting) if (w.node === node) n++;
  return n;
}

/**
 * @internal Runs `fn` in an owner scope: node-level requests made by it (and by everything it
 * awaits) enter the quiet nodes that `admits` accepts. drain.ts and graph.ts call it; each
 * `admits` checks its proof's liveness, so a request outliving its section is stray again.
 * @locking common
 */
export async function gateRunAsOwner<T>(admits: (node: BlockNode) => boolean, fn: () => Promise<T> | T): Promise<T> {
  activeScopes++;
  try {
    return await owners.run({ admits, outer: owners.getStore() }, fn);
  } finally {
    // no scope left: stop tracking the async context, so the request path pays nothing for it
    if (--activeScopes === 0) owners.disable();
  }
}

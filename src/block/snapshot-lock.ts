/**
 * The snapshot lock and its proof, `SnapshotLocked`: the lock the seed proposed, split from the
 * BQL, that serialises snapshot operations (savevm, loadvm, delvm, the internal-snapshot
 * commands) so that they need the BQL only for their short global-state steps.
 *
 * The rules (docs/locking.md, "The snapshot lock"):
 * - Lock order: the snapshot lock comes before the BQL. Wait for it (`acquireSnapshotLock`,
 *   `withSnapshotLock`) only without the BQL; a BQL holder may only try it (`trySnapshotLock`) and
 *   refuses its operation (EBUSY) when it is taken. So the two locks can never deadlock.
 * - A holder takes the BQL for each global-state step (stopping the vCPUs, beginning and ending
 *   drained sections, changing snapshot tables) and releases it in between; between steps it may
 *   do I/O to the nodes its own drained sections cover, without the BQL, as the owner of those
 *   sections (drain.ts `runDrainedIo`, which takes this proof instead of the BQL).
 * - While it is held, other code may run anything under the BQL that does not touch what the
 *   holder owns: queries, I/O to other nodes, block jobs on other nodes. Requests to the holder's
 *   drained nodes wait until its sections end; `cont` of a machine it stopped is refused; other
 *   snapshot operations wait (without the BQL) or are refused (with it).
 *
 * Common code: the lock itself needs no other lock.
 */
import { BlockError } from './errors.js';
import type { BlockNode } from './node.js';

let mintSnapshotLocked: (serial: number, owner: string) => SnapshotLocked;
let revokeSnapshotLocked: (p: SnapshotLocked) => void;

/** Proof that the caller holds the snapshot lock. Only the lock mints one; releasing revokes it. */
export class SnapshotLocked {
  /** Serial number of this acquisition. */
  readonly serial: number;
  /** Who holds it, for refusals ("savevm 'tag'", "job 'save0'"). */
  readonly owner: string;
  #live = true;

  private constructor(serial: number, owner: string) {
    this.serial = serial;
    this.owner = owner;
  }

  /** False once the lock was released with this proof. */
  get live(): boolean {
    return this.#live;
  }

  /** Brand check: true only for proofs the lock minted. */
  static isIssued(value: unknown): value is SnapshotLocked {
    return typeof value === 'object' && value !== null && #live in value;
  }

  static {
    mintSnapshotLocked = (serial, owner) => new SnapshotLocked(serial, owner);
    revokeSnapshotLocked = (p) => {
      p.#live = false;
    };
  }
}

const state = {
  holder: null as SnapshotLocked | null,
  serial: 0,
  waiters: [] as Array<{ owner: string; resolve: (p: SnapshotLocked) => void }>,
};

/**
 * Waits for the snapshot lock (FIFO). Never call it while holding the BQL: use trySnapshotLock.
 * @locking common
 */
export function acquireSnapshotLock(owner: string): Promise<SnapshotLocked> {
  if (state.holder === null) {
    const p = mintSnapshotLocked(++state.serial, owner);
    state.holder = p;
    return Promise.resolve(p);
  }
  return new Promise((resolve) => state.waiters.push({ owner, resolve }));
}

/**
 * Takes the snapshot lock if it is free; otherwise throws EBUSY naming `op` and the holder. The
 * only way a BQL holder may take it.
 * @locking common
 */
export function trySnapshotLock(owner: string, op: string): SnapshotLocked {
  if (state.holder !== null) {
    throw new BlockError('EBUSY', `${op}: a snapshot operation is in progress (${state.holder.owner}); try again when it has finished`, { op });
  }
  const p = mintSnapshotLocked(++state.serial, owner);
  state.holder = p;
  return p;
}

/**
 * Releases the snapshot lock; EPERM on a double release or a forged or foreign proof.
 * @locking snapshot
 */
export function releaseSnapshotLock(p: SnapshotLocked): void {
  if (!SnapshotLocked.isIssued(p)) throw new BlockError('EPERM', 'releaseSnapshotLock: the proof was not issued by the snapshot lock (forged)', { op: 'releaseSnapshotLock' });
  if (!p.live) throw new BlockError('EPERM', `releaseSnapshotLock: acquisition #${p.serial} was already released`, { op: 'releaseSnapshotLock' });
  if (state.holder !== p) throw new BlockError('EPERM', `releaseSnapshotLock: acquisition #${p.serial} does not hold the snapshot lock`, { op: 'releaseSnapshotLock' });
  revokeSnapshotLocked(p);
  for (const [node, holder] of claims) if (holder === p) claims.delete(node);
  const next = state.waiters.shift();
  if (next === undefined) {
    state.holder = null;
    return;
  }
  const q = mintSnapshotLocked(++state.serial, next.owner);
  state.holder = q;
  next.resolve(q);
}

/**
 * Runs `fn` with the snapshot lock held (waiting for it first) and releases it afterwards, also
 * on error. Never call it while holding the BQL.
 * @locking common
 */
export async function withSnapshotLock<T>(owner: string, fn: (snap: SnapshotLocked) => Promise<T> | T): Promise<T> {
  const p = await acquireSnapshotLock(owner);
  try {
    return await fn(p);
  } finally {
    releaseSnapshotLock(p);
  }
}

/**
 * Throws EPERM unless `p` is a live proof of the snapshot lock (a stale proof is caught here).
 * @locking snapshot
 */
export function assertSnapshotLocked(p: SnapshotLocked, op: string): void {
  if (!SnapshotLocked.isIssued(p)) throw new BlockError('EPERM', `${op}: the snapshot-lock proof is forged (not issued by the lock)`, { op });
  if (!p.live || state.holder !== p) throw new BlockError('EPERM', `${op}: the snapshot-lock proof #${p.serial} is stale (the lock was released)`, { op });
}

/**
 * Who holds the snapshot lock now, or null.
 * @locking common
 */
export function snapshotLockOwner(): string | null {
  return state.holder?.owner ?? null;
}

/** Nodes the holder works on between its BQL steps, and by which acquisition. */
const claims = new Map<BlockNode, SnapshotLocked>();

/**
 * The holder claims `nodes` and everything below them until it releases the lock: graph changes
 * that touch a claimed node (an edge to or from it, a backend's root, closing it, a block job on
 * it) are refused with EBUSY while the holder does its I/O without the BQL. Call it with the BQL
 * held, in the step that drains them.
 * @locking snapshot
 */
export function claimNodes(snap: SnapshotLocked, nodes: readonly BlockNode[]): void {
  assertSnapshotLocked(snap, 'claimNodes');
  const stack = [...nodes];
  while (stack.length > 0) {
    const n = stack.pop() as BlockNode;
    if (claims.get(n) === snap) continue;
    claims.set(n, snap);
    for (const c of n.children) stack.push(c.child);
  }
}

/**
 * Throws EBUSY when a snapshot operation has claimed `node` (claimNodes); graph changes call it.
 * @locking common
 */
export function refuseIfSnapshotClaimed(node: BlockNode, op: string): void {
  const holder = claims.get(node);
  if (holder !== undefined && holder.live) {
    throw new BlockError('EBUSY', `${op}: node '${node.nodeName}' is in use by a snapshot operation (${holder.owner})`, { node: node.nodeName, op });
  }
}

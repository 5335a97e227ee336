/**
 * The proof of holding a qcow2 node's metadata lock (QEMU's s->lock, a CoMutex): `MetadataLocked`.
 *
 * I/O code: any request of the node may take the lock. Functions that change the node's metadata
 * and are exported beyond their module take the proof as a parameter, so a call made without the
 * lock does not compile, and check it at run time, so a stale proof (the lock was released) or one
 * for another node throws EPERM. It follows the shape of the BQL's proof (src/block/bql.ts): a
 * private constructor, a brand, and revocation only by the lock itself.
 */
import { BlockError } from '../../block/errors.js';
import type { Qcow2State } from './state.js';

let mint: (s: Qcow2State) => MetadataLocked;
let revoke: (p: MetadataLocked) => void;

/** Proof that the caller holds one qcow2 node's metadata lock; only withMetadataLock creates one. */
export class MetadataLocked {
  /** The node whose lock is held. */
  readonly state: Qcow2State;
  #live = true;

  private constructor(state: Qcow2State) {
    this.state = state;
  }

  /** False once the lock was released. */
  get live(): boolean {
    return this.#live;
  }

  /** Brand check: true only for proofs the lock minted. */
  static isIssued(value: unknown): value is MetadataLocked {
    return typeof value === 'object' && value !== null && #live in value;
  }

  static {
    mint = (s: Qcow2State): MetadataLocked => new MetadataLocked(s);
    revoke = (p: MetadataLocked): void => {
      p.#live = false;
    };
  }
}

/**
 * Runs `fn` with the node's metadata lock held (FIFO), handing it the proof; the proof is revoked
 * when `fn` settles.
 * @locking io
 */
export function withMetadataLock<T>(s: Qcow2State, fn: (locked: MetadataLocked) => Promise<T>): Promise<T> {
  return s.lock.run(async () => {
    const proof = mint(s);
    try {
      return await fn(proof);
    } finally {
      revoke(proof);
    }
  });
}

/**
 * Throws EPERM unless `locked` is a live proof of holding the metadata lock of `s`.
 * @locking io
 */
export function assertMetadataLocked(locked: MetadataLocked, s: Qcow2State, op: string): void {
  if (!MetadataLocked.isIssued(locked) || !locked.live || locked.state !== s || !s.lock.isLocked) {
    const why = !MetadataLocked.isIssued(locked) ? 'a forged proof' : !locked.live ? 'a stale proof (the lock was released)' : `the proof of another node ('${locked.state.node.nodeName}')`;
    throw new BlockError('EPERM', `${op} on qcow2 node '${s.node.nodeName}' needs its metadata lock held; got ${why}`, { node: s.node.nodeName, op });
  }
}

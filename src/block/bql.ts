/**
 * The Big Lock (BQL) and its proof, `Bql`.
 *
 * Global-state code: the lock guards the block graph and every other piece of global state.
 * It is an async mutex with one owner at a time, held on the main loop (it may be held across
 * awaits, as QEMU holds the BQL while it polls). Acquiring hands out a fresh `Bql` proof; functions
 * that need the lock take that proof as a parameter, so a call made without it does not compile,
 * and they check it at run time, so a stale (released) or forged proof throws.
 */
import { BlockError } from './errors.js';

let mintBql: (serial: number) => Bql;
/** Revokes a proof; module-private, so only the lock itself (releaseBql) can end a proof's life. */
let revokeBql: (bql: Bql) => void;

/** Proof that the caller holds the Big Lock. Only `acquireBql` creates one; `releaseBql` revokes it. */
export class Bql {
  /** Serial number of this acquisition (1, 2, ...): names the owner in error messages. */
  readonly serial: number;
  #live = true;

  private constructor(serial: number) {
    this.serial = serial;
  }

  /** False once the lock was released with this proof. */
  get live(): boolean {
    return this.#live;
  }

  /** Brand check: true only for proofs the lock minted (not for Object.create(Bql.prototype) forgeries). */
  static isIssued(value: unknown): value is Bql {
    return typeof value === 'object' && value !== null && #live in value;
  }

  static {
    mintBql = (serial: number): Bql => new Bql(serial);
    revokeBql = (bql: Bql): void => {
      bql.#live = false;
    };
  }
}

interface Waiter {
  resolve: (bql: Bql) => void;
}

/** The lock's state; one per process, like QEMU's BQL. */
const lockState = {
  holder: null as Bql | null,
  serial: 0,
  waiters: [] as Waiter[],
};

/**
 * Waits for the Big Lock and returns the proof of ownership. FIFO among waiters.
 * @locking common
 */
export function acquireBql(): Promise<Bql> {
  if (lockState.holder === null) {
    const bql = mintBql(++lockState.serial);
    lockState.holder = bql;
    return Promise.resolve(bql);
  }
  return new Promise<Bql>((resolve) => lockState.waiters.push({ resolve }));
}

/**
 * Takes the Big Lock only if it is free; returns null otherwise.
 * @locking common
 */
export function tryAcquireBql(): Bql | null {
  if (lockState.holder !== null) return null;
  const bql = mintBql(++lockState.serial);
  lockState.holder = bql;
  return bql;
}

/**
 * Releases the Big Lock. Throws EPERM on a double release or a release by a non-owner.
 * @locking global-state
 */
export function releaseBql(bql: Bql): void {
  if (!Bql.isIssued(bql)) {
    throw new BlockError('EPERM', 'releaseBql: the proof is not a Bql issued by the lock (forged)', { op: 'releaseBql' });
  }
  if (!bql.live) {
    throw new BlockError('EPERM', `releaseBql: BQL acquisition #${bql.serial} was already released (double release)`, {
      op: 'releaseBql',
    });
  }
  if (lockState.holder !== bql) {
    const owner = lockState.holder === null ? 'nobody' : `acquisition #${lockState.holder.serial}`;
    throw new BlockError('EPERM', `releaseBql: acquisition #${bql.serial} does not own the BQL (owner: ${owner})`, {
      op: 'releaseBql',
    });
  }
  revokeBql(bql);
  const next = lockState.waiters.shift();
  if (next === undefined) {
    lockState.holder = null;
    return;
  }
  const nextBql = mintBql(++lockState.serial);
  lockState.holder = nextBql;
  next.resolve(nextBql);
}

/**
 * Runs `fn` with the Big Lock held and releases it afterwards, also when `fn` throws.
 * @locking common
 */
export async function withBql<T>(fn: (bql: Bql) => Promise<T> | T): Promise<T> {
  const bql = await acquireBql();
  try {
    return await fn(bql);
  } finally {
    releaseBql(bql);
  }
}

/**
 * Runs the synchronous `fn` with the Big Lock, which must be free (a synchronous caller cannot
 * wait for it): EBUSY naming the holder otherwise. For set-up code and command-line tools that
 * call a synchronous global-state function (creating an image file) outside any async flow.
 * @locking common
 */
export function withBqlSync<T>(fn: (bql: Bql) => T): T {
  const bql = tryAcquireBql();
  if (bql === null) {
    const holder = lockState.holder === null ? 'somebody' : `acquisition #${lockState.holder.serial}`;
    throw new BlockError('EBUSY', `withBqlSync: the BQL is held by ${holder}; pass its proof instead of taking the lock again`, { op: 'withBqlSync' });
  }
  try {
    return fn(bql);
  } finally {
    releaseBql(bql);
  }
}

/**
 * Throws EPERM unless `bql` is the live proof of the current owner. Every global-state function
 * calls it on entry: the types make a missing proof a compile error, this makes a stale one a
 * run-time error.
 * @locking global-state
 */
export function assertBql(bql: Bql, op: string): void {
  if (!Bql.isIssued(bql) || !bql.live || lockState.holder !== bql) {
    const why = !Bql.isIssued(bql) ? 'forged' : !bql.live ? `stale (acquisition #${bql.serial} was released)` : 'not the owner';
    throw new BlockError('EPERM', `${op}: called without the BQL: the Bql proof is ${why}`, { op });
  }
}

/**
 * True when somebody holds the Big Lock (for diagnostics and assertions in tests).
 * @locking common
 */
export function bqlIsHeld(): boolean {
  return lockState.holder !== null;
}

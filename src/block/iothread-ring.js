// @ts-check
/**
 * The shared-memory request ring between the main loop and one I/O worker (an IOThread or a
 * worker of the default pool). Plain JavaScript (checked by tsc) because the worker imports it
 * as is.
 *
 * One producer (the main loop) and one consumer (the worker). The main loop writes a request
 * descriptor into slot `head % RING_SLOTS` and publishes it by storing the new `head`; the worker
 * runs the requests in order, writes each result into its slot and publishes it by storing the new
 * `done`. A slot is reused only once `done` has passed it. Counters wrap at 2^32 (compared only
 * for equality and by difference).
 *
 * Who serves: the worker runs a serve task (a piscina task) that, once the ring is empty, polls
 * it for up to its poll window (QEMU's `poll-max-ns`), then sleeps in Atomics.wait on HEAD for up
 * to WORKER_SLEEP_MS, then returns, so that an idle worker neither burns a core nor keeps the
 * process alive. WORKER_STATE says who serves the ring:
 * - ACTIVE: a task runs or polls and will see what the main loop publishes;
 * - SLEEPING: a task sleeps on HEAD: the main loop notifies HEAD after publishing;
 * - IDLE: no task serves (or the running one is returning): the main loop moves it to CLAIMED
 *   and starts a new task, which moves it to ACTIVE.
 * A task leaving SLEEPING or returning re-reads HEAD after its state change and takes the ring
 * back (IDLE -> ACTIVE by compare-exchange) unless the main loop claimed it first, so exactly
 * one task serves the ring at a time (piscina runs the next task only after the last one).
 *
 * Completions: the main loop polls DONE for a while after publishing (see iothread.ts), and
 * otherwise sets MAIN_WAITING and waits for a message on its port; the worker, after storing DONE,
 * clears MAIN_WAITING (exchange) and, if it was set, posts one message, so one wait costs one
 * wake-up. Each side stores its own word before it reads the other side's (sequentially
 * consistent atomics), so no wake-up is lost. (Not Atomics.waitAsync: in Node 20 its wake-up from
 * another thread is delivered as a non-nestable platform task and was seen to get lost under
 * load; a MessagePort wake-up goes through libuv and always arrives.)
 *
 * Control words (Int32Array) sit on separate 64-byte lines so the two threads do not share one.
 */

/** Requests published by the main loop (main loop writes). */
export const CTL_HEAD = 0;
/** Requests completed by the worker (worker writes). */
export const CTL_DONE = 16;
/** WORKER_IDLE, WORKER_ACTIVE, WORKER_SLEEPING or WORKER_CLAIMED: who serves the ring (see above). */
export const CTL_WORKER_STATE = 32;
/** 1 while the main loop waits for DONE to move; the worker clears it when it wakes the main loop. */
export const CTL_MAIN_WAITING = 48;
/** 1 asks the worker to return once the ring is empty (main loop writes). */
export const CTL_STOP = 64;
/** Memory-region messages posted to the worker's port (main loop writes). */
export const CTL_REGION_SEQ = 80;
/** No serve task runs (or the running one is returning): the main loop must claim and start one. */
export const WORKER_IDLE = 0;
/** A serve task runs and will see what the main loop publishes. */
export const WORKER_ACTIVE = 1;
/** The main loop has started a serve task that has not begun yet. */
export const WORKER_CLAIMED = 2;
/** A serve task sleeps in Atomics.wait on HEAD: publishing must notify it. */
export const WORKER_SLEEPING = 3;
/** How long an idle serve task sleeps on HEAD before it returns (a piscina task start costs more than a wake-up). */
export const WORKER_SLEEP_MS = 50;
/** Bytes of the control area. */
export const CTL_BYTES = 96 * 4;

/** Slots in a ring (a power of two): the most requests one worker holds at once. */
export const RING_SLOTS = 256;
/** Float64 numbers per slot. */
export const SLOT_STRIDE = 8;
export const SLOT_OP = 0;
export const SLOT_FD = 1;
/** Registered memory region id of the buffer (-1: none). */
export const SLOT_REGION = 2;
export const SLOT_BUF_OFFSET = 3;
export const SLOT_LENGTH = 4;
export const SLOT_POSITION = 5;
/** Byte count, or a negative errno (worker writes). */
export const SLOT_RESULT = 6;

export const OP_READ = 1;
export const OP_WRITE = 2;
export const OP_WRITE_ZEROES = 3;
export const OP_FDATASYNC = 4;
export const OP_TRUNCATE = 5;

/** QEMU's default poll-max-ns for an IOThread: how long a side polls before it sleeps. */
export const DEFAULT_POLL_MAX_NS = 32768;

/**
 * Busy-polls `ctl[index]` until it differs from `value` or `maxNs` nanoseconds pass. Returns
 * true when it changed. Reads the clock every 32 loads only, so the poll itself stays cheap.
 * @param {Int32Array} ctl
 * @param {number} index
 * @param {number} value
 * @param {number} maxNs
 * @returns {boolean}
 */
export function pollWhileEqual(ctl, index, value, maxNs) {
  if (Atomics.load(ctl, index) !== value) return true;
  if (maxNs <= 0) return false;
  const deadline = performance.now() + maxNs / 1e6;
  for (let i = 1; ; i++) {
    if (Atomics.load(ctl, index) !== value) return true;
    if ((i & 31) === 0 && performance.now() > deadline) return Atomics.load(ctl, index) !== value;
  }
}

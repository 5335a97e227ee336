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
 * Polling adapts as QEMU's aio_poll does (util/aio-posix.c, adjust_polling_time): each side keeps
 * its own window (AdaptivePoll), which starts at 0, grows (x poll-grow, from 4 µs) while what it
 * waited for came within poll-max-ns but after the window, and shrinks (/ poll-shrink, or to 0)
 * once a wait outlasted poll-max-ns. Unlike QEMU's event sources, the two sides wait for each
 * other: a side that sleeps answers late because it must be woken first, which would make the
 * other side's window shrink too, for good. So what a side's window is fitted to is the other
 * side's own time (MAIN_THINK_NS, WORKER_SERVICE_NS: from seeing the last event to publishing the
 * next), which is what polling would have had to cover, and windows start at poll-max-ns. A poll
 * that runs its whole window in vain although the other side was awake and quick (it had no core
 * to run on: a busy host) resets the window and holds polling off for POLL_HOLD_WAITS waits, so a
 * side gives the core back within one window and sleeps instead, and tries again later.
 *
 * Who serves: the worker runs a serve task (a piscina task) that, once the ring is empty, polls
 * it for up to its window, then sleeps in Atomics.wait on HEAD for up to WORKER_SLEEP_MS, then
 * returns, so that an idle worker neither burns a core nor keeps the process alive. WORKER_STATE
 * says who serves the ring:
 * - ACTIVE: a task runs or polls and will see what the main loop publishes;
 * - SLEEPING: a task sleeps on HEAD: the main loop notifies HEAD after publishing;
 * - IDLE: no task serves (or the running one is returning): the main loop moves it to CLAIMED
 *   and starts a new task, which moves it to ACTIVE.
 * A task leaving SLEEPING or returning re-reads HEAD after its state change and takes the ring
 * back (IDLE -> ACTIVE by compare-exchange) unless the main loop claimed it first, so exactly
 * one task serves the ring at a time (piscina runs the next task only after the last one).
 *
 * Completions: the main loop polls DONE for its window after publishing (see iothread.ts), then
 * may sleep on DONE for the rest of poll-max-ns (MAIN_WAITING = MAIN_WAIT_FUTEX, then
 * Atomics.wait: the event loop is blocked no longer than a poll would block it, but the core is
 * free for the worker), and otherwise sets MAIN_WAITING = MAIN_WAIT_PORT and waits for a message
 * on its port. The worker, after storing DONE, clears MAIN_WAITING (exchange) and, by what it
 * held, notifies DONE or posts one message, so one wait costs one wake-up. Each side stores its
 * own word before it reads the other side's (sequentially consistent atomics; Atomics.wait
 * compares DONE after the main loop's store and atomically with going to sleep), so no wake-up is
 * lost: either the worker reads the main loop's word and wakes it, or the main loop reads the new
 * DONE and does not sleep. (Not Atomics.waitAsync: in Node 20 its wake-up from another thread is
 * delivered as a non-nestable platform task and was seen to get lost under load; a MessagePort
 * wake-up goes through libuv and always arrives.)
 *
 * Control words (Int32Array) sit on separate 64-byte lines so the two threads do not share one.
 */

/** Requests published by the main loop (main loop writes). */
export const CTL_HEAD = 0;
/**
 * How long (ns) the main loop took to publish the requests of this HEAD after it saw the last
 * completion, when the ring was empty in between, else 0 (main loop writes, before HEAD).
 */
export const CTL_MAIN_THINK_NS = 8;
/** 1 when the main loop saw the last completion while it polled for it (it was awake), else 0 (main loop writes, before HEAD). */
export const CTL_MAIN_SPUN = 12;
/** Requests completed by the worker (worker writes). */
export const CTL_DONE = 16;
/** How long (ns) the worker took for the request it completed last (worker writes, before DONE). */
export const CTL_WORKER_SERVICE_NS = 24;
/** WORKER_IDLE, WORKER_ACTIVE, WORKER_SLEEPING or WORKER_CLAIMED: who serves the ring (see above). */
export const CTL_WORKER_STATE = 32;
/** MAIN_WAIT_*: how the main loop waits for DONE to move; the worker clears it when it wakes the main loop. */
export const CTL_MAIN_WAITING = 48;
/** The main loop does not wait (it polls, or has nothing pending). */
export const MAIN_WAIT_NONE = 0;
/** The main loop waits for a message on its port: the worker posts one. */
export const MAIN_WAIT_PORT = 1;
/** The main loop sleeps in Atomics.wait on DONE: the worker notifies DONE. */
export const MAIN_WAIT_FUTEX = 2;
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

/** QEMU's default poll-max-ns for an IOThread: the longest a side polls before it sleeps. */
export const DEFAULT_POLL_MAX_NS = 32768;
/** QEMU's default poll-grow (0 there means 2): the factor a window grows by. */
export const DEFAULT_POLL_GROW = 2;
/** QEMU's default poll-shrink: 0 resets a window that failed to 0; N > 0 divides it by N. */
export const DEFAULT_POLL_SHRINK = 0;
/** The first window after 0 (QEMU starts polling at 4 µs). */
export const POLL_START_NS = 4000;
/**
 * A window is fitted to this many times the other side's time: a miss costs a wake-up on each
 * side (tens of µs), a few µs more of polling much less. And a miss counts as a busy host only when
 * the other side's time was at most 1/POLL_MARGIN of the window.
 */
export const POLL_MARGIN = 2;
/** Waits without polling after a poll that ran its whole window in vain. */
export const POLL_HOLD_WAITS = 16;

/**
 * A poll window that adapts as QEMU's does (util/aio-posix.c, adjust_polling_time). After each
 * wait, `adjust` is told how long the awaited event took since the wait began (polling and
 * sleeping together): within the window, nothing changes; beyond `maxNs`, the window shrinks
 * (divided by `shrink`, or to 0 when `shrink` is 0); in between, it grows (times `grow`, from
 * POLL_START_NS), up to `maxNs`.
 */
export class AdaptivePoll {
  /**
   * @param {number} maxNs poll-max-ns (0: never polls)
   * @param {number} grow poll-grow (0: 2)
   * @param {number} shrink poll-shrink (0: to 0)
   * @param {number} [startNs] the first window (default maxNs: QEMU's starts at 0, but the two sides poll well only together)
   */
  constructor(maxNs, grow = DEFAULT_POLL_GROW, shrink = DEFAULT_POLL_SHRINK, startNs = maxNs) {
    /** The current window (ns). */
    this.ns = Math.min(startNs, maxNs);
    this.maxNs = maxNs;
    this.grow = grow === 0 ? DEFAULT_POLL_GROW : grow;
    this.shrink = shrink;
    /** Waits left without polling (after a poll in vain). */
    this.hold = 0;
  }

  /** The window (ns) to poll for in this wait: 0 while polling is held off. */
  window() {
    if (this.hold > 0) {
      this.hold--;
      return 0;
    }
    return this.ns;
  }

  /** A poll ran its whole window in vain: reset the window, and do not poll for POLL_HOLD_WAITS waits. */
  failed() {
    this.ns = 0;
    this.hold = POLL_HOLD_WAITS;
  }

  /**
   * Adapts the window to a wait whose event came `blockNs` after the wait began.
   * @param {number} blockNs
   */
  adjust(blockNs) {
    if (blockNs <= this.ns) return; // the sweet spot
    if (blockNs > this.maxNs) {
      this.ns = this.shrink === 0 ? 0 : Math.floor(this.ns / this.shrink);
    } else if (this.ns < this.maxNs) {
      this.ns = this.ns === 0 ? POLL_START_NS : this.ns * this.grow;
      if (this.ns > this.maxNs) this.ns = this.maxNs;
    }
  }
}

/**
 * Busy-polls `ctl[index]` until it differs from `value` or `maxNs` nanoseconds pass. Returns
 * true when it changed. Reads the clock every 32 loads only, so the poll itself stays cheap.
 * With `stopIndex`, it also gives up (false) once `ctl[stopIndex]` is set, looked at as often as
 * the clock.
 * @param {Int32Array} ctl
 * @param {number} index
 * @param {number} value
 * @param {number} maxNs
 * @param {number} [stopIndex]
 * @returns {boolean}
 */
export function pollWhileEqual(ctl, index, value, maxNs, stopIndex = -1) {
  if (Atomics.load(ctl, index) !== value) return true;
  if (maxNs <= 0) return false;
  const deadline = performance.now() + maxNs / 1e6;
  for (let i = 1; ; i++) {
    if (Atomics.load(ctl, index) !== value) return true;
    if ((i & 31) === 0) {
      if (performance.now() > deadline || (stopIndex >= 0 && Atomics.load(ctl, stopIndex) !== 0)) return Atomics.load(ctl, index) !== value;
    }
  }
}

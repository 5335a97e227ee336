/**
 * When a `file` node reads on the main loop instead of handing the read to a worker: io_uring's
 * idea (try the read inline, punt it to a worker when it would block) without preadv2's
 * RWF_NOWAIT, which Node does not expose. A 4 KiB read from the page cache costs about 2 µs on the
 * main loop; handing it to a worker and back costs two thread wake-ups, 15–35 µs each on a small
 * VM whenever the two threads are not both polling (a busy host). So a small read goes inline when
 *
 * - nothing else of the node is in flight (the caller checks): an inline read is then ordered
 *   after every write the node completed and before every later one, exactly as through the
 *   ring, and loads with requests in parallel keep the workers, which overlap them;
 * - it is at most INLINE_READ_MAX_BYTES: a copy that fits in a few µs;
 * - the recent inline reads were fast. A read that would block (its pages not cached) cannot be
 *   refused in advance, only seen afterwards. One slow read (longer than SLOW_READ_MS) among fast
 *   ones is a blip (an interrupt, the thread preempted): nothing changes. A second one within
 *   SLOW_WINDOW inline reads stops inline reads of the node for a hold time; the read after the
 *   hold is a probe: slow, and the hold starts again, twice as long (10 ms up to 1 s); fast, and
 *   the node is back to normal. A node on a cold disk therefore blocks the main loop for at most
 *   one disk read per hold time once it has been found out (under 1% of the time at 1 s).
 *
 * I/O code: one policy per node, used by its read path only.
 */

/** Largest read done inline. */
export const INLINE_READ_MAX_BYTES = 64 * 1024;
/** An inline read slower than this one (ms) is taken for one that waited for the disk. */
export const SLOW_READ_MS = 0.1;
/** The first hold after a slow inline read (ms); doubled after each slow probe. */
export const FIRST_HOLD_MS = 10;
/** The longest hold (ms). */
export const MAX_HOLD_MS = 1000;
/** Two slow reads at most this many inline reads apart start a hold. */
export const SLOW_WINDOW = 64;

/** Counts of a node's reads by path (for tests and diagnostics). */
export interface ReadPathStats {
  /** Reads done on the main loop. */
  inline: number;
  /** Reads handed to a worker. */
  handedOff: number;
  /** Inline reads slower than SLOW_READ_MS (each one started or lengthened a hold). */
  slow: number;
}

/** The inline-read decision of one node. */
export class InlineReadPolicy {
  /** No inline read before this time (performance.now() ms); 0: no hold. */
  private holdUntil = 0;
  /** The hold the next one starts (ms). */
  private holdMs = FIRST_HOLD_MS;
  /** Whether the next inline read is the probe after a hold. */
  private probing = false;
  /** stats.inline when the last slow read ended. */
  private lastSlow = -SLOW_WINDOW - 1;
  readonly stats: ReadPathStats = { inline: 0, handedOff: 0, slow: 0 };

  /** @param now the clock (ms) the inline reads are timed with; a test passes its own */
  constructor(readonly now: () => number = () => performance.now()) {}

  /**
   * Whether a read of `bytes` bytes may run inline now (the caller has checked that nothing else
   * of the node is in flight); counts a refusal as a hand-off.
   * @locking io
   */
  mayInline(bytes: number): boolean {
    if (bytes <= INLINE_READ_MAX_BYTES && (this.holdUntil === 0 || this.now() >= this.holdUntil)) return true;
    this.stats.handedOff++;
    return false;
  }

  /**
   * Records an inline read that took `elapsedMs` and ended at `endedAt` (see the rules above).
   * @locking io
   */
  observe(elapsedMs: number, endedAt: number): void {
    const n = ++this.stats.inline;
    if (elapsedMs <= SLOW_READ_MS) {
      if (this.probing) {
        // found cached again: start afresh (a slow read before the hold is forgotten)
        this.probing = false;
        this.holdUntil = 0;
        this.holdMs = FIRST_HOLD_MS;
        this.lastSlow = -SLOW_WINDOW - 1;
      }
      return;
    }
    this.stats.slow++;
    const again = this.probing || n - this.lastSlow <= SLOW_WINDOW;
    this.lastSlow = n;
    if (!again) return;
    this.holdUntil = endedAt + this.holdMs;
    this.holdMs = Math.min(MAX_HOLD_MS, this.holdMs * 2);
    this.probing = true;
  }

  /**
   * Counts a read handed to a worker for a reason the policy did not decide (another request
   * was in flight).
   * @locking io
   */
  handedOff(): void {
    this.stats.handedOff++;
  }
}

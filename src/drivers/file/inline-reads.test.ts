import { describe, expect, it } from 'vitest';
import { FIRST_HOLD_MS, INLINE_READ_MAX_BYTES, InlineReadPolicy, MAX_HOLD_MS, SLOW_READ_MS, SLOW_WINDOW } from './inline-reads.js';

/** A policy on a clock the test moves. */
function policy(): { p: InlineReadPolicy; clock: { t: number } } {
  const clock = { t: 1000 };
  return { p: new InlineReadPolicy(() => clock.t), clock };
}

const FAST = SLOW_READ_MS / 10;
const SLOW = SLOW_READ_MS * 20;

/** One inline read that took `ms`, if the policy allows one now; returns whether it ran inline. */
function read(p: InlineReadPolicy, clock: { t: number }, ms: number, bytes = 4096): boolean {
  if (!p.mayInline(bytes)) return false;
  clock.t += ms;
  p.observe(ms, clock.t);
  return true;
}

describe('InlineReadPolicy', () => {
  it('reads small requests inline and hands larger ones to a worker', () => {
    const { p, clock } = policy();
    expect(read(p, clock, FAST, INLINE_READ_MAX_BYTES)).toBe(true);
    expect(read(p, clock, FAST, INLINE_READ_MAX_BYTES + 1)).toBe(false);
    expect(p.stats).toEqual({ inline: 1, handedOff: 1, slow: 0 });
  });

  it('takes one slow read among fast ones for a blip', () => {
    const { p, clock } = policy();
    for (let i = 0; i < 1000; i++) {
      // one slow read every SLOW_WINDOW + 1 reads: never two within the window
      expect(read(p, clock, i % (SLOW_WINDOW + 1) === 0 ? SLOW : FAST)).toBe(true);
    }
    expect(p.stats.slow).toBeGreaterThan(10);
    expect(p.stats.handedOff).toBe(0);
  });

  it('holds inline reads after two slow ones in the window, then probes once the hold is over', () => {
    const { p, clock } = policy();
    expect(read(p, clock, SLOW)).toBe(true);
    expect(read(p, clock, FAST)).toBe(true);
    expect(read(p, clock, SLOW)).toBe(true); // the second within the window: hold
    expect(read(p, clock, FAST)).toBe(false);
    clock.t += FIRST_HOLD_MS - 1;
    expect(read(p, clock, FAST)).toBe(false);
    clock.t += 1;
    expect(read(p, clock, FAST)).toBe(true); // the probe is fast: back to normal
    expect(read(p, clock, SLOW)).toBe(true); // a single slow read again is a blip
    expect(read(p, clock, FAST)).toBe(true);
    expect(p.stats).toEqual({ inline: 6, handedOff: 2, slow: 3 });
  });

  it('doubles the hold while the probes are slow (a cold disk), up to the longest hold', () => {
    const { p, clock } = policy();
    read(p, clock, SLOW);
    read(p, clock, SLOW);
    const holds: number[] = [];
    for (let probe = 0; probe < 12; probe++) {
      // wait in 1 ms steps until the policy lets a read through: that is the hold
      let waited = 0;
      while (!p.mayInline(4096)) {
        clock.t += 1;
        waited += 1;
      }
      holds.push(waited);
      clock.t += SLOW;
      p.observe(SLOW, clock.t);
    }
    expect(holds.slice(0, 4)).toEqual([FIRST_HOLD_MS, 2 * FIRST_HOLD_MS, 4 * FIRST_HOLD_MS, 8 * FIRST_HOLD_MS]);
    expect(holds.at(-1)).toBe(MAX_HOLD_MS);
    // time spent blocked on slow inline reads against the whole time, once found out: under 1%
    const total = holds.slice(-3).reduce((a, b) => a + b, 0);
    expect((3 * SLOW) / total).toBeLessThan(0.01);
    // a fast probe resets the hold to the first one
    while (!p.mayInline(4096)) clock.t += 1;
    clock.t += FAST;
    p.observe(FAST, clock.t);
    read(p, clock, SLOW);
    read(p, clock, SLOW);
    let waited = 0;
    while (!p.mayInline(4096)) {
      clock.t += 1;
      waited++;
    }
    expect(waited).toBe(FIRST_HOLD_MS);
  });
});

/**
 * The tests' one seeded PRNG (mulberry32): deterministic, so a failing sweep, fuzz or stress run
 * can be replayed from its seed. Not for anything but tests.
 */

/**
 * A generator of uniform numbers in [0, 1) from `seed`.
 * @locking common
 */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

// @ts-check
/**
 * An HDR-like latency histogram with log-linear buckets: values (nanoseconds, integers) below 256
 * are counted exactly; above, each power of two is split into 128 buckets, so a bucket is at most
 * 1/128 of its value wide and a percentile read back from a bucket's middle is within 0.4% of the
 * true value. Values are clamped at 2^32 - 1 ns (4.3 s). Recording allocates nothing: one
 * Float64Array of 3328 counters, allocated once.
 */
const SUB_BITS = 7;
const SUB = 1 << SUB_BITS; // 128 buckets per power of two
const MAX_VALUE = 0xffffffff;
const BUCKETS = (32 - SUB_BITS + 1) * SUB; // 2 x 128 linear + 24 octaves (2^8 .. 2^32) x 128

export class LatencyHistogram {
  constructor() {
    this.counts = new Float64Array(BUCKETS);
    this.count = 0;
    this.sum = 0;
    this.min = Infinity;
    this.max = 0;
  }

  reset() {
    this.counts.fill(0);
    this.count = 0;
    this.sum = 0;
    this.min = Infinity;
    this.max = 0;
  }

  /** @param {number} ns a latency in nanoseconds */
  record(ns) {
    const v = ns < 0 ? 0 : ns > MAX_VALUE ? MAX_VALUE : ns;
    const i = bucketOf(v);
    this.counts[i] = (this.counts[i] ?? 0) + 1;
    this.count++;
    this.sum += v;
    if (v < this.min) this.min = v;
    if (v > this.max) this.max = v;
  }

  /** @param {LatencyHistogram} other */
  merge(other) {
    for (let i = 0; i < BUCKETS; i++) this.counts[i] = (this.counts[i] ?? 0) + (other.counts[i] ?? 0);
    this.count += other.count;
    this.sum += other.sum;
    this.min = Math.min(this.min, other.min);
    this.max = Math.max(this.max, other.max);
  }

  /**
   * The value at percentile `p` (0..100) in nanoseconds: the middle of the bucket holding it,
   * clamped to the recorded min and max. NaN when empty.
   * @param {number} p
   */
  percentile(p) {
    if (this.count === 0) return NaN;
    const rank = Math.max(1, Math.ceil((p / 100) * this.count));
    let seen = 0;
    for (let i = 0; i < BUCKETS; i++) {
      seen += this.counts[i] ?? 0;
      if (seen >= rank) return Math.min(this.max, Math.max(this.min, bucketMiddle(i)));
    }
    return this.max;
  }

  get mean() {
    return this.count === 0 ? NaN : this.sum / this.count;
  }
}

/** @param {number} v an integer in [0, 2^32) */
export function bucketOf(v) {
  if (v < 2 * SUB) return v | 0;
  const msb = 31 - Math.clz32(v);
  const shift = msb - SUB_BITS; // v >>> shift lies in [SUB, 2 * SUB)
  return (shift + 1) * SUB + ((v >>> shift) - SUB);
}

/** @param {number} i a bucket index */
export function bucketMiddle(i) {
  if (i < 2 * SUB) return i;
  const shift = Math.floor(i / SUB) - 1;
  const low = (SUB + (i % SUB)) * 2 ** shift;
  return low + (2 ** shift - 1) / 2;
}

/**
 * Reusable SharedArrayBuffer-backed buffers for the NBD server's large transfers. Common code:
 * main loop only, no lock.
 *
 * Why: the IOThread pool moves data in SharedArrayBuffer memory without a copy and goes through a
 * staging copy for ordinary buffers (src/block/iothread.ts); a fresh 1 MiB Buffer per read also
 * costs the garbage collector. Buffers come in power-of-two classes from MIN_POOLED_BYTES; a
 * released one is kept for reuse while the free ones total at most `maxFreeBytes`, beyond that it
 * is left to the garbage collector (and the IOThread forgets its region with it).
 */

/** Below this a transfer uses an ordinary Buffer (the copy is cheaper than the bookkeeping). */
export const MIN_POOLED_BYTES = 64 * 1024;

/** A pool of SharedArrayBuffer-backed Buffers in power-of-two classes. */
export class SharedBufferPool {
  readonly #free = new Map<number, SharedArrayBuffer[]>();
  /** The free ones, so that a buffer released twice is not handed out twice. */
  readonly #isFree = new WeakSet<SharedArrayBuffer>();
  #freeBytes = 0;

  constructor(private readonly maxFreeBytes = 128 * 1024 * 1024) {}

  /** Bytes held by free buffers. */
  get freeBytes(): number {
    return this.#freeBytes;
  }

  /** A Buffer of exactly `n` bytes (contents unspecified) over shared memory. */
  get(n: number): Buffer {
    let size = MIN_POOLED_BYTES;
    while (size < n) size *= 2;
    const list = this.#free.get(size);
    const sab = list?.pop();
    if (sab !== undefined) {
      this.#isFree.delete(sab);
      this.#freeBytes -= size;
      return Buffer.from(sab, 0, n);
    }
    return Buffer.from(new SharedArrayBuffer(size), 0, n);
  }

  /** Gives back a buffer from get() once nothing uses it any more (a socket write completed). */
  release(buf: Buffer): void {
    const sab = buf.buffer;
    if (!(sab instanceof SharedArrayBuffer) || buf.byteOffset !== 0 || this.#isFree.has(sab)) return;
    const size = sab.byteLength;
    if (this.#freeBytes + size > this.maxFreeBytes) return;
    let list = this.#free.get(size);
    if (list === undefined) {
      list = [];
      this.#free.set(size, list);
    }
    list.push(sab);
    this.#isFree.add(sab);
    this.#freeBytes += size;
  }
}

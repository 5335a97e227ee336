/**
 * A bounded byte reader over a stream socket, for the NBD server's two phases (handshake and
 * transmission). Common code: main loop only, no lock.
 *
 * `read(n)` resolves with exactly n bytes, or null once the peer has closed (or the reader was
 * cancelled) before n bytes arrived. Memory is bounded: the socket is paused as soon as more than
 * `highWaterBytes` are buffered beyond what the pending read needs, so a client that floods us
 * with requests is held back by TCP, not by our heap. `skip(n)` discards n bytes in slices and
 * never holds more than one slice. `detach()` lets the socket go to TLS (NBD_OPT_STARTTLS).
 */
import type { Socket } from 'node:net';

interface Waiter {
  n: number;
  resolve: (b: Buffer | null) => void;
  alloc: ((n: number) => Buffer) | undefined;
}

/** Reads exact byte counts from a socket, with backpressure. */
export class SocketReader {
  readonly #chunks: Buffer[] = [];
  #buffered = 0;
  #waiter: Waiter | null = null;
  #ended = false;

  readonly #onData = (d: Buffer): void => {
    if (this.#ended) return;
    this.#chunks.push(d);
    this.#buffered += d.length;
    this.wake();
    if (this.#buffered > this.highWaterBytes + (this.#waiter?.n ?? 0)) this.socket.pause();
  };
  readonly #onEnd = (): void => this.cancel();

  constructor(
    private readonly socket: Socket,
    private readonly highWaterBytes = 4 * 1024 * 1024,
  ) {
    socket.on('data', this.#onData);
    socket.on('end', this.#onEnd);
    socket.on('close', this.#onEnd);
    socket.on('error', this.#onEnd);
  }

  /**
   * Stops listening to the socket (NBD_OPT_STARTTLS hands it to TLS); returns the bytes that
   * were buffered and not read (a client that sent its ClientHello before our ACK), or null.
   */
  detach(): Buffer | null {
    this.socket.off('data', this.#onData);
    this.socket.off('end', this.#onEnd);
    this.socket.off('close', this.#onEnd);
    this.socket.off('error', this.#onEnd);
    const left = this.#buffered === 0 ? null : Buffer.concat(this.#chunks);
    this.#chunks.length = 0;
    this.#buffered = 0;
    this.#ended = true;
    return left;
  }

  /** Bytes received and not yet consumed. */
  get buffered(): number {
    return this.#buffered;
  }

  /** True once the peer closed or the reader was cancelled. */
  get ended(): boolean {
    return this.#ended;
  }

  /** Ends the reader: a pending and every later read resolves with null. */
  cancel(): void {
    if (this.#ended) return;
    this.#ended = true;
    this.#chunks.length = 0;
    this.#buffered = 0;
    const w = this.#waiter;
    this.#waiter = null;
    w?.resolve(null);
  }

  /**
   * Exactly `n` bytes, or null when the stream ends first. One read at a time. When the bytes
   * span several chunks they are gathered into `alloc(n)` (a fresh Buffer by default); when they
   * lie in one chunk, a view of it comes back.
   */
  read(n: number, alloc?: (n: number) => Buffer): Promise<Buffer | null> {
    if (this.#waiter !== null) throw new Error('SocketReader: a read is already pending');
    if (this.#ended) return Promise.resolve(null);
    if (this.#buffered >= n) return Promise.resolve(this.take(n, alloc));
    return new Promise<Buffer | null>((resolve) => {
      this.#waiter = { n, resolve, alloc };
      this.socket.resume();
    });
  }

  /** Exactly `n` bytes when they are already buffered (no promise, no microtask), else null. */
  tryRead(n: number): Buffer | null {
    if (this.#waiter !== null || this.#ended || this.#buffered < n) return null;
    return this.take(n);
  }

  /** Discards `n` bytes; false when the stream ended first. */
  async skip(n: number): Promise<boolean> {
    const slice = 1024 * 1024;
    for (let left = n; left > 0; ) {
      const step = Math.min(left, slice);
      if ((await this.read(step)) === null) return false;
      left -= step;
    }
    return true;
  }

  private wake(): void {
    const w = this.#waiter;
    if (w === null || this.#buffered < w.n) return;
    this.#waiter = null;
    w.resolve(this.take(w.n, w.alloc));
  }

  /** Removes the first `n` buffered bytes (zero-copy when they lie in one chunk). */
  private take(n: number, alloc?: (n: number) => Buffer): Buffer {
    this.#buffered -= n;
    const first = this.#chunks[0];
    if (first !== undefined && first.length >= n) {
      if (first.length === n) this.#chunks.shift();
      else this.#chunks[0] = first.subarray(n);
      this.maybeResume();
      return first.subarray(0, n);
    }
    const out = alloc === undefined ? Buffer.allocUnsafe(n) : alloc(n);
    let at = 0;
    while (at < n) {
      const c = this.#chunks[0];
      if (c === undefined) throw new Error('SocketReader: buffered count out of step with chunks');
      const want = n - at;
      if (c.length <= want) {
        out.set(c, at);
        at += c.length;
        this.#chunks.shift();
      } else {
        out.set(c.subarray(0, want), at);
        this.#chunks[0] = c.subarray(want);
        at += want;
      }
    }
    this.maybeResume();
    return out;
  }

  private maybeResume(): void {
    if (this.#buffered <= this.highWaterBytes && this.socket.isPaused()) this.socket.resume();
  }
}

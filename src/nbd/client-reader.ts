/**
 * Exact-length reads from a socket for the NBD client: the handshake and the reply loop ask for
 * "the next n bytes" and get them (or an error naming why they will never come).
 *
 * I/O code of one connection: used by that connection's own loop only, never shared.
 *
 * Bytes that arrived are kept in a list of chunks until asked for. The list is bounded: when
 * more than HIGH_WATER_BYTES wait, the socket is paused (TCP back-pressure reaches the server),
 * and resumed when the consumer has caught up.
 */
import type { Socket } from 'node:net';

const HIGH_WATER_BYTES = 8 * 1024 * 1024;

/** The reader's view of why no more bytes will come. */
export class ReaderClosed extends Error {
  override readonly name = 'ReaderClosed';
}

/** Reads exact byte counts from a socket. */
export class SocketReader {
  private readonly chunks: Buffer[] = [];
  private head = 0; // offset into chunks[0]
  private avail = 0;
  private closedReason: string | null = null;
  private wake: (() => void) | null = null;
  private paused = false;

  private readonly onData = (b: Buffer): void => {
    this.chunks.push(b);
    this.avail += b.length;
    if (this.avail > HIGH_WATER_BYTES && !this.paused) {
      this.paused = true;
      this.socket.pause();
    }
    this.kick();
  };
  private readonly onEnd = (): void => this.close('the server closed the connection');
  private readonly onClose = (): void => this.close('the connection closed');
  private readonly onError = (e: Error): void => this.close(e.message);

  constructor(private readonly socket: Socket) {
    socket.on('data', this.onData);
    socket.on('end', this.onEnd);
    socket.on('close', this.onClose);
    socket.on('error', this.onError);
  }

  /**
   * Stops listening to the socket (it goes to TLS after NBD_OPT_STARTTLS); returns the bytes
   * that had arrived unread (the server's first TLS bytes, in a hurry), or null.
   */
  detach(): Buffer | null {
    this.socket.off('data', this.onData);
    this.socket.off('end', this.onEnd);
    this.socket.off('close', this.onClose);
    this.socket.off('error', this.onError);
    const first = this.chunks[0];
    const left = this.avail === 0 || first === undefined ? null : Buffer.concat([first.subarray(this.head), ...this.chunks.slice(1)]);
    this.chunks.length = 0;
    this.avail = 0;
    this.head = 0;
    return left;
  }

  /** Bytes that arrived and were not read yet. */
  get buffered(): number {
    return this.avail;
  }

  /** Marks the stream finished; waiting and later reads fail with `reason` (the first one wins). */
  close(reason: string): void {
    if (this.closedReason === null) this.closedReason = reason;
    this.kick();
  }

  private kick(): void {
    const w = this.wake;
    this.wake = null;
    w?.();
  }

  private async waitFor(n: number): Promise<void> {
    while (this.avail < n) {
      if (this.closedReason !== null) throw new ReaderClosed(this.closedReason);
      if (this.paused) {
        this.paused = false;
        this.socket.resume();
      }
      await new Promise<void>((resolve) => (this.wake = resolve));
    }
  }

  /** Copies the next `n` bytes into `dst` at `off`, consuming them. */
  async readInto(dst: Uint8Array, off: number, n: number): Promise<void> {
    let done = 0;
    while (done < n) {
      await this.waitFor(1);
      const c = this.chunks[0] as Buffer;
      const take = Math.min(c.length - this.head, n - done);
      dst.set(c.subarray(this.head, this.head + take), off + done);
      done += take;
      this.consume(take);
    }
  }

  /** The next `n` bytes as a Buffer (a view when they lie in one chunk). */
  async read(n: number): Promise<Buffer> {
    if (n === 0) return Buffer.alloc(0);
    await this.waitFor(n);
    const c = this.chunks[0];
    if (c !== undefined && c.length - this.head >= n) {
      const out = c.subarray(this.head, this.head + n);
      this.consume(n);
      return out;
    }
    const out = Buffer.allocUnsafe(n);
    await this.readInto(out, 0, n);
    return out;
  }

  /** Drops the next `n` bytes. */
  async skip(n: number): Promise<void> {
    let left = n;
    while (left > 0) {
      await this.waitFor(1);
      const c = this.chunks[0] as Buffer;
      const take = Math.min(c.length - this.head, left);
      left -= take;
      this.consume(take);
    }
  }

  private consume(n: number): void {
    this.avail -= n;
    this.head += n;
    const c = this.chunks[0];
    if (c !== undefined && this.head === c.length) {
      this.chunks.shift();
      this.head = 0;
    }
    if (this.paused && this.avail < HIGH_WATER_BYTES / 2) {
      this.paused = false;
      this.socket.resume();
    }
  }
}

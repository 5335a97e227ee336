/**
 * CoMutex: an async FIFO mutex for request code (QEMU's CoMutex), e.g. a format driver's metadata
 * lock. I/O code: any request may take it; never hold it across a drain of the same node.
 * Taking a free mutex costs no allocation.
 */
export class CoMutex {
  private locked = false;
  private readonly waiters: Array<() => void> = [];

  /** True while somebody holds the mutex. */
  get isLocked(): boolean {
    return this.locked;
  }

  /** Takes the mutex if it is free; false otherwise. */
  tryLock(): boolean {
    if (this.locked) return false;
    this.locked = true;
    return true;
  }

  /** Takes the mutex: undefined when it was free (taken at once), else a promise to await. */
  lock(): Promise<void> | void {
    if (!this.locked) {
      this.locked = true;
      return;
    }
    return new Promise<void>((resolve) => this.waiters.push(resolve));
  }

  /** Releases the mutex, handing it to the oldest waiter. */
  unlock(): void {
    const next = this.waiters.shift();
    if (next === undefined) this.locked = false;
    else next();
  }

  /** Runs `fn` with the mutex held. */
  async run<T>(fn: () => Promise<T>): Promise<T> {
    const w = this.lock();
    if (w !== undefined) await w;
    try {
      return await fn();
    } finally {
      this.unlock();
    }
  }
}

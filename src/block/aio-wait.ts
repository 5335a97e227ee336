/**
 * AioWait: how the main loop waits for a condition that in-flight requests will change.
 *
 * Common code. QEMU's AIO_WAIT_WHILE polls the event loop until a condition is false and relies
 * on `aio_wait_kick()` from whoever changes it. Here a waiter is a promise with its condition;
 * every in-flight decrement calls `aioWaitKick()`, which re-checks the waiters (there are none
 * on the hot path, so a kick costs one size test).
 */

interface AioWaiter {
  busy: () => boolean;
  resolve: () => void;
}

const waiters = new Set<AioWaiter>();

/**
 * Resolves once `busy()` is false; re-checked on every kick. Callers loop on the condition.
 * @locking common
 */
export function aioWaitWhile(busy: () => boolean): Promise<void> {
  if (!busy()) return Promise.resolve();
  return new Promise<void>((resolve) => waiters.add({ busy, resolve }));
}

/**
 * Wakes the waiters whose condition has become false.
 * @locking common
 */
export function aioWaitKick(): void {
  if (waiters.size === 0) return;
  for (const w of waiters) {
    if (!w.busy()) {
      waiters.delete(w);
      w.resolve();
    }
  }
}

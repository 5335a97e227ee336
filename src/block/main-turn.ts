/**
 * The main loop's turn budget: how long request code may go on completing requests without
 * letting the event loop turn. A request loop whose requests complete without a wake-up (the
 * ring's completions found by polling, reads done inline on the main loop) would otherwise run in
 * microtasks for ever, and timers, sockets and the monitor would starve. One budget for the whole
 * main loop: the first caller in a turn starts it, and a setImmediate ends it.
 *
 * I/O code: called from request paths; it touches only this module's two variables.
 */

/** Longest the main loop completes requests within one turn of the event loop before it yields. */
export const MAIN_TURN_BUDGET_MS = 0.5;

/** When the current turn's budget started (performance.now()), 0 when no turn is counting. */
let turnStart = 0;

const endTurn = (): void => {
  turnStart = 0;
};

/**
 * Whether this turn of the event loop has budget left; the first call of a turn starts the clock.
 * @locking io
 */
export function mainTurnBudgetLeft(): boolean {
  const now = performance.now();
  if (turnStart === 0) {
    turnStart = now;
    setImmediate(endTurn);
    return true;
  }
  return now - turnStart < MAIN_TURN_BUDGET_MS;
}

const resolveOnImmediate = (resolve: () => void): void => {
  setImmediate(resolve);
};

/**
 * Resolves after the event loop has turned once (timers and I/O callbacks have had their go).
 * @locking io
 */
export function yieldMainTurn(): Promise<void> {
  return new Promise(resolveOnImmediate);
}

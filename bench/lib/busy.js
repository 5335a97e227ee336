// @ts-check
/**
 * A busy host for the benchmarks (`--busy N` of bench/compare.js): N child processes that each
 * keep one core busy for the whole run, as another program (a compiler, a test runner, a guest)
 * does on a user's machine or a CI runner.
 *
 * Each spinner is a Node child process that burns the CPU in slices of SPIN_SLICE_MS and, between
 * two slices, lets its event loop turn once, so that it notices at once when its parent goes away
 * (the IPC channel closes: it exits) and never outlives the benchmark, even one killed with
 * SIGKILL. The parent kills them on stop(), on exit, on SIGINT and on SIGTERM.
 */
import { spawn } from 'node:child_process';

/** How long a spinner burns the CPU before it lets its event loop turn (ms). */
const SPIN_SLICE_MS = 20;

/** The spinner's program: spin, turn the loop, spin; exit when the parent's channel closes. */
const SPINNER_SOURCE = `
process.on('disconnect', () => process.exit(0));
let x = 0;
const spin = () => {
  const end = Date.now() + ${SPIN_SLICE_MS};
  while (Date.now() < end) x = (x + 1) | 0;
  setImmediate(spin);
};
process.send('ready');
spin();
`;

/** @type {Set<import('node:child_process').ChildProcess>} spinners alive in this process */
const live = new Set();
let hooked = false;

function killAll() {
  for (const c of live) {
    try {
      c.kill('SIGKILL');
    } catch {
      // already gone
    }
  }
  live.clear();
}

/** Kills the spinners when this process exits or is interrupted (installed once). */
function hookExit() {
  if (hooked) return;
  hooked = true;
  process.on('exit', killAll);
  for (const sig of /** @type {const} */ (['SIGINT', 'SIGTERM'])) {
    process.on(sig, () => {
      killAll();
      // the benchmark's own handlers (temporary files) run too; exit as the signal would
      if (process.listenerCount(sig) <= 1) process.exit(sig === 'SIGINT' ? 130 : 143);
    });
  }
}

/**
 * @typedef {object} BusyLoad
 * @property {number} count spinners running
 * @property {number[]} pids their process ids
 * @property {() => void} stop kills them (idempotent)
 */

/**
 * Starts `n` spinning child processes and resolves once each one spins. n = 0 starts nothing.
 * @param {number} n
 * @returns {Promise<BusyLoad>}
 */
export async function startBusy(n) {
  if (!(Number.isSafeInteger(n) && n >= 0)) throw new RangeError(`busy ${n}: expected a whole number >= 0`);
  /** @type {import('node:child_process').ChildProcess[]} */
  const mine = [];
  if (n > 0) hookExit();
  const started = [];
  for (let i = 0; i < n; i++) {
    const c = spawn(process.execPath, ['-e', SPINNER_SOURCE], { stdio: ['ignore', 'ignore', 'inherit', 'ipc'] });
    live.add(c);
    mine.push(c);
    started.push(
      new Promise((resolve, reject) => {
        c.once('message', () => resolve(undefined));
        c.once('error', reject);
        c.once('exit', (code, sig) => {
          live.delete(c);
          reject(new Error(`busy spinner ${i + 1} exited before it started (${sig ?? `exit ${code}`})`));
        });
      }),
    );
  }
  try {
    await Promise.all(started);
  } catch (e) {
    for (const c of mine) c.kill('SIGKILL');
    throw e;
  }
  for (const c of mine) c.removeAllListeners('exit').once('exit', () => live.delete(c));
  return {
    count: n,
    pids: mine.flatMap((c) => (c.pid === undefined ? [] : [c.pid])),
    stop: () => {
      for (const c of mine) {
        if (live.delete(c)) c.kill('SIGKILL');
      }
    },
  };
}

// @ts-check
/**
 * What the request gate (src/block/request-gate.ts) costs a node-level request, in three states:
 *   idle               no drained section anywhere: the gate is two number tests
 *   section-elsewhere  a section is live on an unrelated node: each request asks whether its node
 *                      is covered (a walk up its parents)
 *   owner-scope        the requests run inside a section owner's scope (withDrained of another
 *                      node): the async context is tracked (AsyncLocalStorage), which Node 20
 *                      pays for on every promise while a scope is open
 * 4 KiB reads at queue depth 1 on a memory node, through a backend (raw over memory) and directly.
 *
 *   npm run build && node bench/gate-cost.js [requests]
 */
import { blkNew, blkPread, bdrvPread, drainedBegin, drainedEnd, openNode, withBql, withDrained } from '../dist/index.js';

const N = Number(process.argv[2] ?? 1_000_000);
const WARMUP = Math.min(100_000, N);

/**
 * @param {(i: number) => Promise<void>} fn
 * @returns {Promise<number>} nanoseconds per request
 */
async function time(fn) {
  for (let i = 0; i < WARMUP; i++) await fn(i);
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < N; i++) await fn(i);
  return Number(process.hrtime.bigint() - t0) / N;
}

await withBql(async (bql) => {
  const node = await openNode(bql, 'driver=raw,file.driver=memory,file.size=64M');
  const file = node.file;
  if (file === undefined) throw new Error('raw node without a file child');
  const blk = blkNew(bql, 'gate-bench', node);
  const other = await openNode(bql, 'driver=memory,size=1M');
  const buf = new Uint8Array(4096);
  /** @param {string} state */
  const measure = async (state) => {
    const viaBackend = await time((i) => blkPread(blk, (i % 16000) * 4096, buf));
    const direct = await time((i) => bdrvPread(file, (i % 16000) * 4096, buf));
    console.log(`${state.padEnd(18)} blkPread ${viaBackend.toFixed(0).padStart(5)} ns   bdrvPread ${direct.toFixed(0).padStart(5)} ns`);
  };
  await measure('idle');
  const d = await drainedBegin(bql, other);
  await measure('section-elsewhere');
  drainedEnd(bql, d);
  await withDrained(bql, other, () => measure('owner-scope'));
});

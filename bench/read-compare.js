// @ts-check
/**
 * Read-path benchmark: 4 KiB random reads at queue depth 1 and 32 and 1 MiB sequential reads
 * through snapstack (raw over file, default pool and a dedicated IOThread), side by side with a
 * bare fs.readSync loop and fs.promises on the same file, in the same process, alternating the
 * peers over several rounds. Prints a table of medians and the ratios snapstack / peer.
 *
 *   npm run build && node bench/read-compare.js [--size 1G] [--seconds 2] [--rounds 3] [--file PATH] [--json]
 *
 * The file (default: a fresh file under the OS temp dir) is written in full first and read once so
 * that every peer reads from the page cache; this measures per-request overhead, not the disk.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createIOThread, openImage, parseSize, shutdownIOThreads, withBql } from '../dist/index.js';

/** @param {string} name @param {string} fallback */
function arg(name, fallback) {
  const i = process.argv.indexOf(name);
  return i >= 0 && process.argv[i + 1] !== undefined ? /** @type {string} */ (process.argv[i + 1]) : fallback;
}
const sizeBytes = parseSize(arg('--size', '1G'));
const seconds = Number(arg('--seconds', '2'));
const rounds = Number(arg('--rounds', '3'));
const asJson = process.argv.includes('--json');
const file = arg('--file', path.join(os.tmpdir(), `snapstack-bench-${sizeBytes}.img`));

function prepareFile() {
  if (fs.existsSync(file) && fs.statSync(file).size === sizeBytes) return;
  const chunk = Buffer.alloc(1 << 20);
  for (let i = 0; i < chunk.length; i++) chunk[i] = (i * 131) & 0xff;
  const fd = fs.openSync(file, 'w');
  for (let off = 0; off < sizeBytes; off += chunk.length) fs.writeSync(fd, chunk, 0, Math.min(chunk.length, sizeBytes - off), off);
  fs.closeSync(fd);
}

function warmCache() {
  const fd = fs.openSync(file, 'r');
  const buf = Buffer.allocUnsafe(1 << 20);
  for (let off = 0; off < sizeBytes; off += buf.length) fs.readSync(fd, buf, 0, buf.length, off);
  fs.closeSync(fd);
}

const BLOCKS_4K = Math.floor(sizeBytes / 4096);
let seed = 12345;
function nextBlock() {
  seed = (seed * 1103515245 + 12345) & 0x7fffffff;
  return seed % BLOCKS_4K;
}

/**
 * Runs `worker` at queue depth `qd` for `seconds`; each call does one request and returns its bytes.
 * @param {number} qd @param {(slot: number) => Promise<number>} request
 */
async function runAsync(qd, request) {
  let ops = 0;
  let bytes = 0;
  const deadline = performance.now() + seconds * 1000;
  await Promise.all(
    Array.from({ length: qd }, async (_, slot) => {
      while (performance.now() < deadline) {
        const n = await request(slot);
        bytes += n;
        ops++;
      }
    }),
  );
  return { ops, bytes, elapsed: seconds };
}

/** @param {(i: number) => number} request */
function runSync(request) {
  let ops = 0;
  let bytes = 0;
  const t0 = performance.now();
  const deadline = t0 + seconds * 1000;
  while (performance.now() < deadline) {
    for (let k = 0; k < 64; k++) {
      bytes += request(ops);
      ops++;
    }
  }
  return { ops, bytes, elapsed: (performance.now() - t0) / 1000 };
}

async function main() {
  prepareFile();
  warmCache();
  await withBql((bql) => createIOThread(bql, 'bench-io0'));
  const viaPool = await openImage(file, { format: 'raw', readOnly: true, name: 'bench-pool' });
  const viaThread = await openImage(file, { format: 'raw', readOnly: true, name: 'bench-iothread', iothread: 'bench-io0' });
  const fd = fs.openSync(file, 'r');
  const fh = await fs.promises.open(file, 'r');
  const small = Array.from({ length: 32 }, () => new Uint8Array(new SharedArrayBuffer(4096)));
  const smallPlain = Array.from({ length: 32 }, () => Buffer.allocUnsafe(4096));
  const big = Array.from({ length: 4 }, () => new Uint8Array(new SharedArrayBuffer(1 << 20)));
  const bigPlain = Array.from({ length: 4 }, () => Buffer.allocUnsafe(1 << 20));
  const MIB_BLOCKS = Math.floor(sizeBytes / (1 << 20));
  let seq = 0;
  const nextSeq = () => (seq = (seq + 1) % MIB_BLOCKS) * (1 << 20);

  /** @type {Array<{ group: string, name: string, run: () => Promise<{ops: number, bytes: number, elapsed: number}> }>} */
  const cases = [];
  for (const qd of [1, 32]) {
    const g = `4k-randread-qd${qd}`;
    if (qd === 1) cases.push({ group: g, name: 'fs.readSync', run: async () => runSync(() => fs.readSync(fd, /** @type {Buffer} */ (smallPlain[0]), 0, 4096, nextBlock() * 4096)) });
    cases.push({ group: g, name: 'fs.promises', run: () => runAsync(qd, async (s) => (await fh.read(/** @type {Buffer} */ (smallPlain[s]), 0, 4096, nextBlock() * 4096)).bytesRead) });
    cases.push({ group: g, name: 'snapstack (pool)', run: () => runAsync(qd, async (s) => (await viaPool.read(nextBlock() * 4096, 4096, small[s]), 4096)) });
    cases.push({ group: g, name: 'snapstack (iothread)', run: () => runAsync(qd, async (s) => (await viaThread.read(nextBlock() * 4096, 4096, small[s]), 4096)) });
  }
  const gs = '1m-seqread-qd1';
  cases.push({ group: gs, name: 'fs.readSync', run: async () => runSync(() => fs.readSync(fd, /** @type {Buffer} */ (bigPlain[0]), 0, 1 << 20, nextSeq())) });
  cases.push({ group: gs, name: 'fs.promises', run: () => runAsync(1, async () => (await fh.read(/** @type {Buffer} */ (bigPlain[0]), 0, 1 << 20, nextSeq())).bytesRead) });
  cases.push({ group: gs, name: 'snapstack (pool)', run: () => runAsync(1, async () => (await viaPool.read(nextSeq(), 1 << 20, big[0]), 1 << 20)) });
  cases.push({ group: gs, name: 'snapstack (iothread)', run: () => runAsync(1, async () => (await viaThread.read(nextSeq(), 1 << 20, big[0]), 1 << 20)) });
  const gs4 = '1m-seqread-qd4';
  cases.push({ group: gs4, name: 'fs.promises', run: () => runAsync(4, async (s) => (await fh.read(/** @type {Buffer} */ (bigPlain[s]), 0, 1 << 20, nextSeq())).bytesRead) });
  cases.push({ group: gs4, name: 'snapstack (pool)', run: () => runAsync(4, async (s) => (await viaPool.read(nextSeq(), 1 << 20, big[s]), 1 << 20)) });

  /** @type {Map<string, {group: string, name: string, iops: number[], mbps: number[]}>} */
  const results = new Map();
  for (let r = 0; r < rounds; r++) {
    // alternate the order each round so that no peer always runs first
    const order = r % 2 === 0 ? cases : [...cases].reverse();
    for (const c of order) {
      const m = await c.run();
      const key = `${c.group}|${c.name}`;
      const e = results.get(key) ?? { group: c.group, name: c.name, iops: [], mbps: [] };
      e.iops.push(m.ops / m.elapsed);
      e.mbps.push(m.bytes / m.elapsed / 1e6);
      results.set(key, e);
      if (!asJson && process.stderr.isTTY) process.stderr.write(`\rround ${r + 1}/${rounds} ${c.group} ${c.name}          `);
    }
  }
  if (!asJson && process.stderr.isTTY) process.stderr.write('\n');
  /** @param {number[]} xs */
  const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] ?? 0;
  const rows = [...results.values()].map((e) => ({ group: e.group, name: e.name, iops: median(e.iops), mbps: median(e.mbps), iopsMin: Math.min(...e.iops), iopsMax: Math.max(...e.iops) }));
  const find = (/** @type {string} */ g, /** @type {string} */ n) => rows.find((x) => x.group === g && x.name === n);
  const out = rows.map((row) => {
    const sync = find(row.group, 'fs.readSync');
    const prom = find(row.group, 'fs.promises');
    return {
      ...row,
      vsReadSync: sync === undefined ? null : row.iops / sync.iops,
      vsPromises: prom === undefined ? null : row.iops / prom.iops,
    };
  });
  const meta = { date: new Date().toISOString(), node: process.version, cpus: os.cpus().length, cpu: os.cpus()[0]?.model ?? '', file, sizeBytes, seconds, rounds };
  if (asJson) {
    console.log(JSON.stringify({ meta, rows: out }, null, 2));
  } else {
    console.log(`# read path, ${meta.cpus} x ${meta.cpu}, node ${meta.node}, file ${sizeBytes} bytes (page cache), ${rounds} rounds x ${seconds}s, medians`);
    console.log(`${'case'.padEnd(16)} ${'peer'.padEnd(22)} ${'IOPS'.padStart(10)} ${'MB/s'.padStart(9)}  ${'min..max IOPS'.padStart(20)}  ${'/readSync'.padStart(9)} ${'/promises'.padStart(9)}`);
    for (const r of out) {
      const ratio = (/** @type {number | null} */ x) => (x === null ? '-' : x.toFixed(2)).padStart(9);
      console.log(
        `${r.group.padEnd(16)} ${r.name.padEnd(22)} ${Math.round(r.iops).toString().padStart(10)} ${r.mbps.toFixed(0).padStart(9)}  ${`${Math.round(r.iopsMin)}..${Math.round(r.iopsMax)}`.padStart(20)}  ${ratio(r.vsReadSync)} ${ratio(r.vsPromises)}`,
      );
    }
  }
  const stamp = meta.date.replace(/[:.]/g, '-');
  fs.writeFileSync(path.join(path.dirname(new URL(import.meta.url).pathname), 'results', `read-compare-${stamp}.json`), JSON.stringify({ meta, rows: out }, null, 2));
  await viaPool.close();
  await viaThread.close();
  fs.closeSync(fd);
  await fh.close();
  await withBql((bql) => shutdownIOThreads(bql));
}

await main();

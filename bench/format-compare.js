// @ts-check
/**
 * qcow2 against raw through the stack (issue 3): the same workloads on a raw file and on a qcow2
 * image holding the same data, alternating, several rounds: 4 KiB random read and write at queue
 * depth 32, 1 MiB sequential read and write at queue depth 4 (writes overwrite allocated data).
 * Prints the medians and the qcow2/raw ratios; with --aio sync, the transfers run on the main loop.
 *
 *   npm run build && node bench/format-compare.js [--size 1G] [--seconds 1] [--rounds 3] [--aio threads|sync] [--json]
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createRawFile, openImage, parseSize, shutdownIOThreads, withBql, withBqlSync } from '../dist/index.js';
import { createQcow2File } from '../dist/drivers/qcow2/create.js';

/** @param {string} name @param {string} fallback */
function arg(name, fallback) {
  const i = process.argv.indexOf(name);
  return i >= 0 && process.argv[i + 1] !== undefined ? /** @type {string} */ (process.argv[i + 1]) : fallback;
}
const sizeBytes = parseSize(arg('--size', '1G'));
const seconds = Number(arg('--seconds', '1'));
const rounds = Number(arg('--rounds', '3'));
const aio = arg('--aio', 'threads') === 'sync' ? 'sync' : 'threads';
const asJson = process.argv.includes('--json');
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-format-bench-'));

let seed = 4242;
function rand() {
  seed = (seed * 1103515245 + 12345) & 0x7fffffff;
  return seed;
}

/** @param {import('../dist/index.js').Image} img */
async function fill(img) {
  const chunk = new Uint8Array(1 << 20);
  for (let i = 0; i < chunk.length; i++) chunk[i] = (i * 131) & 0xff;
  for (let off = 0; off < sizeBytes; off += chunk.length) await img.write(off, chunk.subarray(0, Math.min(chunk.length, sizeBytes - off)));
  await img.flush();
}

/**
 * @param {import('../dist/index.js').Image} img
 * @param {{ bs: number, qd: number, write: boolean, random: boolean }} w
 */
async function run(img, w) {
  const blocks = Math.floor(sizeBytes / w.bs);
  const bufs = Array.from({ length: w.qd }, () => new Uint8Array(w.bs).fill(7));
  let next = 0;
  let ops = 0;
  const t0 = performance.now();
  const deadline = t0 + seconds * 1000;
  await Promise.all(
    bufs.map(async (buf) => {
      while (performance.now() < deadline) {
        const block = w.random ? rand() % blocks : next++ % blocks;
        if (w.write) await img.write(block * w.bs, buf);
        else await img.read(block * w.bs, w.bs, buf);
        ops++;
      }
    }),
  );
  const elapsed = (performance.now() - t0) / 1000;
  return { iops: ops / elapsed, mbs: (ops * w.bs) / 1e6 / elapsed };
}

const workloads = [
  { name: '4k randread QD32', bs: 4096, qd: 32, write: false, random: true },
  { name: '4k randwrite QD32', bs: 4096, qd: 32, write: true, random: true },
  { name: '1M seqread QD4', bs: 1 << 20, qd: 4, write: false, random: false },
  { name: '1M seqwrite QD4', bs: 1 << 20, qd: 4, write: true, random: false },
];

/** @param {number[]} xs */
function median(xs) {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)] ?? NaN;
}

const rawFile = path.join(dir, 'disk.raw');
const qcowFile = path.join(dir, 'disk.qcow2');
withBqlSync((bql) => createRawFile(bql, rawFile, sizeBytes));
withBqlSync((bql) => createQcow2File(bql, qcowFile, { sizeBytes }));
const raw = await openImage(rawFile, { format: 'raw', aio });
const qcow = await openImage(qcowFile, { format: 'qcow2', aio });
await fill(raw);
await fill(qcow);
/** @type {Record<string, { raw: number[], qcow2: number[], unit: string }>} */
const results = {};
for (const w of workloads) results[w.name] = { raw: [], qcow2: [], unit: w.bs >= 1 << 20 ? 'MB/s' : 'IOPS' };
for (let r = 0; r < rounds; r++) {
  for (const w of workloads) {
    const res = results[w.name];
    if (res === undefined) continue;
    const a = await run(raw, w);
    const b = await run(qcow, w);
    res.raw.push(res.unit === 'MB/s' ? a.mbs : a.iops);
    res.qcow2.push(res.unit === 'MB/s' ? b.mbs : b.iops);
  }
}
await raw.close();
await qcow.close();
await withBql((bql) => shutdownIOThreads(bql));
fs.rmSync(dir, { recursive: true, force: true });

if (asJson) console.log(JSON.stringify({ sizeBytes, seconds, rounds, aio, results }, null, 2));
else {
  console.log(`median of ${rounds} rounds of ${seconds} s, ${sizeBytes / 2 ** 30} GiB images, aio=${aio}`);
  console.log(`${'workload'.padEnd(20)}${'raw'.padStart(12)}${'qcow2'.padStart(12)}${'unit'.padStart(6)}${'qcow2/raw'.padStart(11)}`);
  for (const [name, r] of Object.entries(results)) {
    const a = median(r.raw);
    const b = median(r.qcow2);
    console.log(`${name.padEnd(20)}${a.toFixed(0).padStart(12)}${b.toFixed(0).padStart(12)}${r.unit.padStart(6)}${(b / a).toFixed(2).padStart(11)}`);
  }
}

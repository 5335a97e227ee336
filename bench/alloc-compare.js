#!/usr/bin/env node
// @ts-check
/**
 * `npm run bench:alloc`: allocating writes into a fresh qcow2 image, snapstack against
 * `qemu-img bench` on the same kind of image in the same run. Every request is a 4 KiB write into
 * a cluster nothing maps yet (a 64 KiB stride), so each one allocates a data cluster (and, every
 * 8192 clusters, an L2 table): the path whose metadata ordering decides crash safety.
 *
 *   npm run build && npm run bench:alloc -- [--count 8192] [--depth 8] [--flush-interval 32] [--reps 5] [--libs dist,OTHER/dist]
 *
 * A flush goes out after every --flush-interval writes (0: only at the end), the in-flight writes
 * drained first, as `qemu-img bench --flush-interval` does. --libs takes one or more builds of
 * the library (directories holding index.js), so that two builds of snapstack (before and after
 * a change) run side by side with the peer; the order of the tools rotates from one repetition to
 * the next. Prints the IOPS medians with their spread, and each build's ratio to qemu-img (median
 * and range of the per-repetition ratios). Each image is created fresh by qemu-img create.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { readCommandLine, usageFail } from './lib/args.js';

/** @type {import('./lib/args.js').Spec} */
const SPEC = {
  count: { type: 'number', default: 8192, metavar: 'N', help: 'writes per run (each allocates a cluster)' },
  depth: { type: 'number', default: 8, metavar: 'N', help: 'queue depth' },
  'flush-interval': { type: 'number', default: 32, metavar: 'N', help: 'a flush after every N writes (0: only at the end)' },
  reps: { type: 'number', default: 5, metavar: 'N', help: 'repetitions' },
  libs: { type: 'string', default: 'dist', metavar: 'LIST', help: 'comma list of library builds to compare (directories with index.js)' },
  help: { type: 'flag', help: 'show this help' },
};

const a = readCommandLine('bench/alloc-compare.js', 'npm run bench:alloc', SPEC);
if (a === null) process.exit();
const count = Number(a['count']);
const depth = Number(a['depth']);
const flushEvery = Number(a['flush-interval']);
const reps = Number(a['reps']);
if (!(count > 0 && depth > 0 && flushEvery >= 0 && reps > 0)) {
  usageFail('bench/alloc-compare.js', 'npm run bench:alloc', SPEC, '--count, --depth and --reps must be > 0, --flush-interval >= 0');
  process.exit();
}
const libDirs = String(a['libs']).split(',').map((d) => path.resolve(d.trim()));

const BS = 4096;
const STRIDE = 65536;
const SIZE = Math.ceil((count * STRIDE) / (1 << 30)) * (1 << 30);
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-alloc-'));

/** A fresh qcow2 image made by qemu-img. @param {string} name @returns {string} */
function freshImage(name) {
  const f = path.join(dir, `${name}.qcow2`);
  fs.rmSync(f, { force: true });
  const r = spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', f, String(SIZE)], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`qemu-img create failed: ${r.stderr}`);
  return f;
}

/** qemu-img bench's IOPS on a fresh image. */
function qemuRun() {
  const f = freshImage('qemu');
  const args = ['bench', '-w', '-c', String(count), '-d', String(depth), '-s', String(BS), '-S', String(STRIDE), '-t', 'writeback', '-f', 'qcow2'];
  if (flushEvery > 0) args.push(`--flush-interval=${flushEvery}`);
  const r = spawnSync('qemu-img', [...args, f], { encoding: 'utf8' });
  const m = /Run completed in ([0-9.]+) seconds/.exec(r.stdout);
  if (r.status !== 0 || m === null) throw new Error(`qemu-img bench failed: ${r.stdout}${r.stderr}`);
  return count / Number(m[1]);
}

/**
 * One build's IOPS on a fresh image: `count` allocating writes at `depth`, a drained flush every `flushEvery`.
 * @param {{ openImage: (f: string, o: { format: string }) => Promise<{ write: (o: number, b: Uint8Array) => Promise<void>, flush: () => Promise<void>, close: () => Promise<void> }> }} lib
 * @param {string} label
 * @returns {Promise<number>}
 */
async function libRun(lib, label) {
  const f = freshImage(label);
  const img = await lib.openImage(f, { format: 'qcow2' });
  const buf = new Uint8Array(BS).fill(0xa5);
  const t0 = process.hrtime.bigint();
  try {
    let next = 0;
    while (next < count) {
      const batchEnd = flushEvery > 0 ? Math.min(count, next + flushEvery) : count;
      /** @type {Set<Promise<void>>} */
      const inflight = new Set();
      while (next < batchEnd) {
        /** @type {Promise<void>} */
        const p = img.write(next * STRIDE, buf).finally(() => inflight.delete(p));
        inflight.add(p);
        next++;
        if (inflight.size >= depth) await Promise.race(inflight);
      }
      await Promise.all(inflight);
      await img.flush();
    }
  } finally {
    await img.close();
  }
  const sec = Number(process.hrtime.bigint() - t0) / 1e9;
  return count / sec;
}

/** @param {number[]} xs @returns {number} */
function median(xs) {
  const s = [...xs].sort((x, y) => x - y);
  const m = s.length >> 1;
  return s.length % 2 === 1 ? (s[m] ?? 0) : ((s[m - 1] ?? 0) + (s[m] ?? 0)) / 2;
}

/** @type {Array<{ label: string, mod: any }>} */
const libs = [];
for (const d of libDirs) {
  const mod = await import(pathToFileURL(path.join(d, 'index.js')).href);
  libs.push({ label: path.relative(process.cwd(), d) || d, mod });
}
const tools = [{ label: 'qemu-img bench', run: async () => qemuRun() }, ...libs.map((l) => ({ label: `snapstack (${l.label})`, run: () => libRun(l.mod, l.label.replace(/\W+/g, '_')) }))];

/** @type {Record<string, number[]>} */
const iops = {};
for (const t of tools) iops[t.label] = [];
try {
  for (let r = 0; r < reps; r++) {
    for (let k = 0; k < tools.length; k++) {
      const t = tools[(k + r) % tools.length];
      if (t === undefined) continue;
      (iops[t.label] ??= []).push(await t.run());
    }
  }
} finally {
  for (const l of libs) {
    // newer builds take the BQL's proof, older ones nothing
    if (l.mod.shutdownIOThreads.length >= 1) await l.mod.withBql((/** @type {unknown} */ bql) => l.mod.shutdownIOThreads(bql));
    else await l.mod.shutdownIOThreads();
  }
  fs.rmSync(dir, { recursive: true, force: true });
}

const load = (os.loadavg()[0] ?? 0).toFixed(2);
console.log(`allocating 4 KiB writes into a fresh qcow2 (64 KiB clusters, stride 64 KiB): ${count} writes, QD${depth}, flush every ${flushEvery || 'end'}; ${reps} repetitions; load average ${load} on ${os.cpus().length} cores`);
const peer = iops['qemu-img bench'] ?? [];
for (const t of tools) {
  const xs = iops[t.label] ?? [];
  let line = `  ${t.label.padEnd(34)} ${Math.round(median(xs)).toString().padStart(8)} IOPS  (min ${Math.round(Math.min(...xs))}, max ${Math.round(Math.max(...xs))})`;
  if (t.label !== 'qemu-img bench') {
    const ratios = xs.map((x, i) => x / (peer[i] ?? NaN));
    line += `  ${median(ratios).toFixed(2)} x qemu-img (${Math.min(...ratios).toFixed(2)}-${Math.max(...ratios).toFixed(2)})`;
  }
  console.log(line);
}

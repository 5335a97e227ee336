#!/usr/bin/env node
// @ts-check
/**
 * `npm run bench:chain`: 4 KiB reads through backing chains of depth 1, 4 and 16, snapstack
 * against `qemu-img bench` on the same chain in the same run. The chain (made by qemu-img) holds
 * one cluster of data in every layer: cluster c lives in layer c % depth, so a read descends a
 * different number of images each time. Requests step one cluster (64 KiB) at a time through the
 * image, the same offsets for both tools (qemu-img bench has no random mode), at queue depth --depth.
 *
 *   npm run build && npm run bench:chain -- [--depths 1,4,16] [--count 20000] [--depth 1] [--reps 5]
 *
 * Prints the IOPS medians with their spread and the ratio to qemu-img per chain depth (median and
 * range of the per-repetition ratios); the order of the tools alternates between repetitions.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { readCommandLine, usageFail } from './lib/args.js';

/** @type {import('./lib/args.js').Spec} */
const SPEC = {
  depths: { type: 'string', default: '1,4,16', metavar: 'LIST', help: 'chain depths (images below the top)' },
  count: { type: 'number', default: 20000, metavar: 'N', help: 'reads per run' },
  depth: { type: 'number', default: 1, metavar: 'N', help: 'queue depth' },
  reps: { type: 'number', default: 5, metavar: 'N', help: 'repetitions' },
  lib: { type: 'string', default: 'dist', metavar: 'DIR', help: 'the library build (a directory with index.js)' },
  help: { type: 'flag', help: 'show this help' },
};

const a = readCommandLine('bench/chain-compare.js', 'npm run bench:chain', SPEC);
if (a === null) process.exit();
const depths = String(a['depths']).split(',').map(Number);
const count = Number(a['count']);
const qd = Number(a['depth']);
const reps = Number(a['reps']);
if (!(count > 0 && qd > 0 && reps > 0 && depths.every((d) => Number.isInteger(d) && d >= 1))) {
  usageFail('bench/chain-compare.js', 'npm run bench:chain', SPEC, '--count, --depth, --reps and each chain depth must be > 0');
  process.exit();
}
const lib = await import(pathToFileURL(path.join(path.resolve(String(a['lib'])), 'index.js')).href);

const BS = 4096;
const C = 65536;
const SIZE = 256 * 1024 * 1024;
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-chain-'));

/** @param {string} tool @param {string[]} args */
function run(tool, args) {
  const r = spawnSync(tool, args, { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`${tool} ${args.join(' ')} failed: ${r.stdout}${r.stderr}`);
  return r.stdout;
}

/** A chain `depth` images deep below its top (depth + 1 images); returns the top. @param {number} depth */
function buildChain(depth) {
  const layers = depth + 1;
  const files = [];
  for (let i = 0; i < layers; i++) {
    const f = path.join(dir, `d${depth}-${i}.qcow2`);
    if (i === 0) run('qemu-img', ['create', '-q', '-f', 'qcow2', f, String(SIZE)]);
    else run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', path.basename(files[i - 1] ?? ''), '-F', 'qcow2', f]);
    files.push(f);
  }
  // cluster c holds data in layer c % layers: one qemu-io per layer, a write per cluster it owns
  const clusters = Math.min(SIZE / C, count);
  for (let i = 0; i < layers; i++) {
    const cmds = [];
    for (let c = i; c < clusters; c += layers) cmds.push('-c', `write -P ${(i % 250) + 1} ${c * C} ${C}`);
    for (let k = 0; k < cmds.length; k += 2000) run('qemu-io', [...cmds.slice(k, k + 2000), files[i] ?? '']);
  }
  return files[files.length - 1] ?? '';
}

/** qemu-img bench's IOPS. @param {string} top */
function qemuRun(top) {
  const out = run('qemu-img', ['bench', '-c', String(count), '-d', String(qd), '-s', String(BS), '-S', String(C), '-t', 'writeback', '-f', 'qcow2', top]);
  const m = /Run completed in ([0-9.]+) seconds/.exec(out);
  if (m === null) throw new Error(`qemu-img bench printed no time: ${out}`);
  return count / Number(m[1]);
}

/** snapstack's IOPS on the same offsets. @param {string} top */
async function libRun(top) {
  const img = await lib.openImage(top, { readOnly: true });
  const bufs = Array.from({ length: qd }, () => new Uint8Array(BS));
  const clusters = SIZE / C;
  const t0 = process.hrtime.bigint();
  try {
    let next = 0;
    const worker = async (/** @type {number} */ k) => {
      const buf = bufs[k] ?? new Uint8Array(BS);
      for (let i = next++; i < count; i = next++) await img.read((i % clusters) * C, BS, buf);
    };
    await Promise.all(bufs.map((_, k) => worker(k)));
  } finally {
    await img.close();
  }
  return count / (Number(process.hrtime.bigint() - t0) / 1e9);
}

/** @param {number[]} xs */
function median(xs) {
  const s = [...xs].sort((x, y) => x - y);
  const m = s.length >> 1;
  return s.length % 2 === 1 ? (s[m] ?? 0) : ((s[m - 1] ?? 0) + (s[m] ?? 0)) / 2;
}

const load = (os.loadavg()[0] ?? 0).toFixed(2);
console.log(`4 KiB reads through backing chains (64 KiB step, ${count} reads, QD${qd}, ${reps} repetitions; load average ${load} on ${os.cpus().length} cores)`);
try {
  for (const depth of depths) {
    const top = buildChain(depth);
    /** @type {number[]} */ const q = [];
    /** @type {number[]} */ const s = [];
    for (let r = 0; r < reps; r++) {
      if (r % 2 === 0) {
        q.push(qemuRun(top));
        s.push(await libRun(top));
      } else {
        s.push(await libRun(top));
        q.push(qemuRun(top));
      }
    }
    const ratios = s.map((x, i) => x / (q[i] ?? NaN));
    const fmt = (/** @type {number[]} */ xs) => `${Math.round(median(xs)).toString().padStart(7)} IOPS (${Math.round(Math.min(...xs))}-${Math.round(Math.max(...xs))})`;
    console.log(`  depth ${String(depth).padStart(2)}: qemu-img bench ${fmt(q)}   snapstack ${fmt(s)}   ${median(ratios).toFixed(2)} x qemu-img (${Math.min(...ratios).toFixed(2)}-${Math.max(...ratios).toFixed(2)})`);
  }
} finally {
  if (lib.shutdownIOThreads.length >= 1) await lib.withBql((/** @type {unknown} */ bql) => lib.shutdownIOThreads(bql));
  else await lib.shutdownIOThreads();
  fs.rmSync(dir, { recursive: true, force: true });
}

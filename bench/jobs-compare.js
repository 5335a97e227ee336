#!/usr/bin/env node
// @ts-check
/**
 * `npm run bench:jobs`: block-stream and block-commit throughput, snapstack's jobs (the library:
 * src/block/stream.ts, src/block/jobs/block-commit.ts) against QEMU's own jobs run by
 * qemu-storage-daemon 7.2 over QMP, on copies of the same chain made by qemu-img / qemu-io:
 *
 *   base.qcow2  --base-size (1 GiB), every byte written
 *   mid.qcow2   over base: --overlay bytes (128 MiB) written, 1 MiB pieces spread over the disk
 *   top.qcow2   over mid: a sixteenth of that, at other offsets
 *   atop.qcow2  over base: --overlay bytes written (for the active commit)
 *
 * The jobs, each on fresh copies, timed from the job's start to its completion:
 *   stream   block-stream top with base=base (mid's data copied into top)
 *   commit   block-commit top=mid base=base (mid's data into base; top relinked to base)
 *   active   block-commit of atop, the active layer: to ready, then complete (atop's data into base)
 * QSD: blockdev-add of the top (its chain opens from the headers), the job over QMP, until
 * BLOCK_JOB_COMPLETED (active: BLOCK_JOB_READY, job-complete, then BLOCK_JOB_COMPLETED).
 * snapstack: openImage of the top (the base opened writable where a commit needs it), the job,
 * until it concluded. Both go through the page cache (QSD's default cache.direct=off). The first
 * repetition checks that both results read the same (qemu-img compare).
 *
 *   npm run build && npm run bench:jobs -- [--base-size 1G] [--overlay 128M] [--reps 3] [--jobs stream,commit,active]
 *
 * Prints per job the median time and range of each tool, MB/s over the bytes copied, and the
 * ratio QSD time / snapstack time (median and range of the per-repetition ratios; above 1:
 * snapstack is faster). The order of the tools alternates between repetitions.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { pathToFileURL } from 'node:url';
import { readCommandLine, usageFail } from './lib/args.js';
import { detectQsd, startQsd } from './lib/qsd.js';
import { renderTable } from './lib/table.js';

/** @type {import('./lib/args.js').Spec} */
const SPEC = {
  'base-size': { type: 'string', default: '1G', metavar: 'SIZE', help: 'size of the base image (all of it written)' },
  overlay: { type: 'string', default: '128M', metavar: 'SIZE', help: 'bytes written in the overlay a job copies' },
  reps: { type: 'number', default: 3, metavar: 'N', help: 'repetitions' },
  jobs: { type: 'string', default: 'stream,commit,active', metavar: 'LIST', help: 'which jobs' },
  lib: { type: 'string', default: 'dist', metavar: 'DIR', help: 'the library build (a directory with index.js)' },
  markdown: { type: 'flag', help: 'print the table as Markdown' },
  help: { type: 'flag', help: 'show this help' },
};

const SCRIPT = 'bench/jobs-compare.js';
const CMD = 'npm run bench:jobs';
const a = readCommandLine(SCRIPT, CMD, SPEC);
if (a === null) process.exit();

/** @param {string} s */
function parseSize(s) {
  const m = /^(\d+)([kKmMgG]?)$/.exec(s);
  if (m === null) return NaN;
  const mult = { '': 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3 }[(m[2] ?? '').toLowerCase()] ?? NaN;
  return Number(m[1]) * mult;
}

const MiB = 1024 * 1024;
const baseSize = parseSize(String(a['base-size']));
const overlay = parseSize(String(a['overlay']));
const reps = Number(a['reps']);
const jobs = String(a['jobs']).split(',');
if (!(baseSize >= 16 * MiB && baseSize % MiB === 0 && overlay >= MiB && overlay % MiB === 0 && overlay * 2 <= baseSize && reps > 0 && jobs.every((j) => ['stream', 'commit', 'active'].includes(j)))) {
  usageFail(SCRIPT, CMD, SPEC, '--base-size (a MiB multiple, at least 16M) must be at least twice --overlay (a MiB multiple), --reps > 0, --jobs of stream,commit,active');
  process.exit();
}
const qsdInfo = detectQsd();
if (!qsdInfo.available) {
  process.stderr.write(`${SCRIPT}: ${qsdInfo.version}: nothing to compare against\n`);
  process.exit(1);
}
const libDir = path.resolve(String(a['lib']));
const lib = await import(pathToFileURL(path.join(libDir, 'index.js')).href);
const { blockStream } = await import(pathToFileURL(path.join(libDir, 'block', 'stream.js')).href);
const { blockCommit } = await import(pathToFileURL(path.join(libDir, 'block', 'jobs', 'block-commit.js')).href);

/** @param {string} tool @param {string[]} args */
function run(tool, args) {
  const r = spawnSync(tool, args, { encoding: 'utf8', maxBuffer: 16 * MiB });
  if (r.status !== 0) throw new Error(`${tool} ${args.join(' ')} failed: ${r.stdout}${r.stderr}`);
  return r.stdout;
}

const root = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-jobs-'));
const tpl = path.join(root, 'tpl');
fs.mkdirSync(tpl);

/** Writes `total` bytes as 1 MiB pieces spread evenly over the disk, starting `shift` into each stride. @param {string} file @param {number} total @param {number} shift @param {number} pattern */
function spread(file, total, shift, pattern) {
  const pieces = total / MiB;
  const stride = Math.floor(baseSize / pieces / MiB) * MiB;
  const cmds = [];
  for (let i = 0; i < pieces; i++) cmds.push('-c', `write -P ${pattern} ${i * stride + shift} 1M`);
  // qemu-io takes many -c; keep each call's list bounded
  for (let i = 0; i < cmds.length; i += 512) run('qemu-io', [...cmds.slice(i, i + 512), file]);
}

function buildTemplate() {
  const f = (/** @type {string} */ n) => path.join(tpl, n);
  run('qemu-img', ['create', '-q', '-f', 'qcow2', f('base.qcow2'), String(baseSize)]);
  run('qemu-io', ['-c', `write -P 0x11 0 ${baseSize}`, f('base.qcow2')]);
  run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', f('mid.qcow2')]);
  spread(f('mid.qcow2'), overlay, 0, 0x22);
  run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', f('top.qcow2')]);
  spread(f('top.qcow2'), Math.max(MiB, Math.floor(overlay / 16 / MiB) * MiB), 2 * MiB, 0x33);
  run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', f('atop.qcow2')]);
  spread(f('atop.qcow2'), overlay, MiB, 0x44);
}

/** Fresh copies of the template's files in a new directory. @param {string} name */
function copyChain(name) {
  const d = path.join(root, name);
  fs.rmSync(d, { recursive: true, force: true });
  fs.mkdirSync(d);
  for (const f of fs.readdirSync(tpl)) fs.copyFileSync(path.join(tpl, f), path.join(d, f));
  return d;
}

/** The nodes of a snapstack image's chain, top first. @param {any} img */
function chainNodes(img) {
  const out = [];
  for (let cur = img.backend.root ?? undefined; cur !== undefined; cur = cur.backing) out.push(cur);
  return out;
}

let seq = 0;
/** Runs `kind` with snapstack's library in directory `d`; returns the seconds the job took. @param {string} kind @param {string} d */
async function ours(kind, d) {
  const top = path.join(d, kind === 'active' ? 'atop.qcow2' : 'top.qcow2');
  /** @type {Record<string, string>} */
  const nodeOptions = kind === 'commit' ? { 'backing.backing.read-only': 'off' } : kind === 'active' ? { 'backing.read-only': 'off' } : {};
  const img = await lib.openImage(top, { nodeOptions });
  try {
    const nodes = chainNodes(img);
    const id = `j${seq++}`;
    const t0 = performance.now();
    const job = await lib.withBql((/** @type {any} */ bql) => {
      if (kind === 'stream') return blockStream(bql, { jobId: id, device: img.name, base: nodes[2]?.nodeName });
      if (kind === 'commit') return blockCommit(bql, { jobId: id, device: img.name, top: nodes[1]?.nodeName, base: nodes[2]?.nodeName });
      return blockCommit(bql, { jobId: id, device: img.name });
    });
    if (kind === 'active') {
      while (job.status !== 'ready') {
        if (job.status === 'concluded' || job.status === 'null') throw new Error(`active commit ended before ready: ${job.error}`);
        await new Promise((r) => setImmediate(r));
      }
      await lib.withBql((/** @type {any} */ bql) => job.complete(bql));
    }
    await job.whenConcluded();
    const sec = (performance.now() - t0) / 1000;
    if (job.error !== null) throw new Error(`snapstack ${kind}: ${job.error}`);
    return sec;
  } finally {
    await img.close();
  }
}

/** Runs `kind` in qemu-storage-daemon in directory `d`; returns the seconds the job took. @param {string} kind @param {string} d */
async function qsd(kind, d) {
  const peer = await startQsd(d, libDir);
  const c = peer.client;
  try {
    const topFile = path.join(d, kind === 'active' ? 'atop.qcow2' : 'top.qcow2');
    await c.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'top', file: { driver: 'file', filename: topFile } });
    const nodes = /** @type {Array<Record<string, unknown>>} */ (await c.execute('query-named-block-nodes', { flat: true }));
    const byFile = (/** @type {string} */ name) => {
      const n = nodes.find((x) => x['drv'] === 'qcow2' && String(/** @type {any} */ (x['image'])?.['filename']).endsWith(name));
      if (n === undefined) throw new Error(`QSD: no node for ${name}`);
      return String(n['node-name']);
    };
    const done = c.waitEvent('BLOCK_JOB_COMPLETED', () => true, 600_000);
    const t0 = performance.now();
    if (kind === 'stream') await c.execute('block-stream', { 'job-id': 'j', device: 'top', 'base-node': byFile('base.qcow2') });
    else if (kind === 'commit') await c.execute('block-commit', { 'job-id': 'j', device: 'top', 'top-node': byFile('mid.qcow2'), 'base-node': byFile('base.qcow2') });
    else {
      const ready = c.waitEvent('BLOCK_JOB_READY', () => true, 600_000);
      await c.execute('block-commit', { 'job-id': 'j', device: 'top' });
      await ready;
      await c.execute('job-complete', { id: 'j' });
    }
    const ev = await done;
    const sec = (performance.now() - t0) / 1000;
    if (ev.data?.['error'] !== undefined) throw new Error(`QSD ${kind}: ${ev.data['error']}`);
    await c.execute('blockdev-del', { 'node-name': 'top' });
    return sec;
  } finally {
    await peer.stop();
  }
}

/** @param {number[]} xs */
function median(xs) {
  const s = [...xs].sort((x, y) => x - y);
  const m = Math.floor(s.length / 2);
  return s.length % 2 === 1 ? (s[m] ?? 0) : ((s[m - 1] ?? 0) + (s[m] ?? 0)) / 2;
}
/** @param {number[]} xs @param {number} digits */
function spreadText(xs, digits) {
  return `${Math.min(...xs).toFixed(digits)}–${Math.max(...xs).toFixed(digits)}`;
}

const load = os.loadavg()[0] ?? 0;
process.stdout.write(`jobs-compare: base ${baseSize / MiB} MiB, overlay ${overlay / MiB} MiB, ${reps} reps; ${qsdInfo.version}; ${os.cpus().length} CPUs, load ${load.toFixed(2)} at start\n`);
buildTemplate();
const rows = [];
try {
  for (const kind of jobs) {
    /** @type {number[]} */ const tOurs = [];
    /** @type {number[]} */ const tQsd = [];
    for (let r = 0; r < reps; r++) {
      const dOurs = copyChain(`ours-${kind}`);
      const dQsd = copyChain(`qsd-${kind}`);
      if (r % 2 === 0) {
        tOurs.push(await ours(kind, dOurs));
        tQsd.push(await qsd(kind, dQsd));
      } else {
        tQsd.push(await qsd(kind, dQsd));
        tOurs.push(await ours(kind, dOurs));
      }
      if (r === 0) {
        // both results read the same: the chain each job leaves behind
        const f = kind === 'active' ? 'atop.qcow2' : 'top.qcow2';
        const cmp = spawnSync('qemu-img', ['compare', '-q', path.join(dOurs, f), path.join(dQsd, f)], { encoding: 'utf8' });
        if (cmp.status !== 0) throw new Error(`${kind}: snapstack's and QSD's results differ: ${cmp.stdout}${cmp.stderr}`);
      }
      fs.rmSync(dOurs, { recursive: true, force: true });
      fs.rmSync(dQsd, { recursive: true, force: true });
    }
    const ratios = tQsd.map((q, i) => q / (tOurs[i] ?? NaN));
    const mbps = (/** @type {number} */ sec) => (overlay / 1e6 / sec).toFixed(0);
    rows.push([
      kind,
      `${median(tOurs).toFixed(3)} s (${spreadText(tOurs, 3)})`,
      mbps(median(tOurs)),
      `${median(tQsd).toFixed(3)} s (${spreadText(tQsd, 3)})`,
      mbps(median(tQsd)),
      `${median(ratios).toFixed(2)} (${spreadText(ratios, 2)})`,
    ]);
  }
} finally {
  await lib.withBql((/** @type {any} */ bql) => lib.shutdownIOThreads(bql));
  fs.rmSync(root, { recursive: true, force: true });
}
process.stdout.write(`${renderTable(['job', 'snapstack', 'MB/s', 'qemu-storage-daemon', 'MB/s', 'ratio QSD/ours'], rows, a['markdown'] === true)}\n`);
process.stdout.write(`load ${(os.loadavg()[0] ?? 0).toFixed(2)} at the end (a shared machine: compare ratios from the same run only)\n`);

#!/usr/bin/env node
// @ts-check
/**
 * `npm run bench -- [options]`: a fio-like load generator through the snapstack library API.
 *
 *   npm run build && npm run bench -- --driver qcow2 --rw randread --bs 4k --iodepth 32 --runtime 5
 *
 * Without --file it makes a fresh image under the OS temp dir, writes all of it first (so reads
 * hit allocated data, in the page cache), and removes it afterwards. Prints IOPS, MB/s, latency
 * percentiles and CPU time per request (`--json`: the same as one JSON object on stdout). A
 * progress line is drawn on stderr when it is a terminal, with a carriage return only.
 *
 * --iothreads N (N > 0) opens N nodes on the file, node i bound to IOThread i, and spreads the
 * request slots over them round-robin (slot k -> node k mod N). A snapstack node (like a QEMU 7.2
 * BlockDriverState) belongs to one IOThread, so N threads need N nodes; this is the shape of N
 * disks on one host, not of one multiqueue disk. --iothreads 1 is one node bound to one IOThread.
 * For qcow2 with writes every node keeps its own metadata, which is only safe because the bench
 * writes the whole image first (writes then never allocate); it is refused on a --file image.
 */
import { shutdownIOThreads, withBql } from '../dist/index.js';
import { formatSize, readCommandLine } from './lib/args.js';
import { DRIVERS, RW_MODES, removeTempDirs, runBenchmark, warnIfDistStale } from './lib/engine.js';

/** @type {import('./lib/args.js').Spec} */
const SPEC = {
  driver: { type: 'string', default: 'raw', choices: DRIVERS, help: 'image format' },
  rw: { type: 'string', default: 'randread', choices: RW_MODES, help: 'access pattern' },
  bs: { type: 'size', default: 4096, metavar: 'SIZE', help: 'bytes per request (4k, 64k, 1M, ...)' },
  iodepth: { type: 'number', default: 1, metavar: 'N', help: 'requests in flight' },
  iothreads: { type: 'number', default: 0, metavar: 'N', help: '0: the default pool; N > 0: N IOThreads, one node each' },
  aio: { type: 'string', default: 'threads', choices: ['threads', 'sync'], help: "the file node's transfer mode" },
  size: { type: 'size', metavar: 'SIZE', help: 'image size for a new image / region of an existing one (default 1G / all of it)' },
  runtime: { type: 'number', default: 5, metavar: 'SEC', help: 'measured seconds' },
  ramp: { type: 'number', default: 0, metavar: 'SEC', help: 'seconds run before measuring' },
  rwmixread: { type: 'number', default: 50, metavar: 'PCT', help: 'percentage of reads for randrw' },
  buffers: { type: 'string', default: 'shared', choices: ['shared', 'plain'], help: 'SharedArrayBuffer buffers (no copy) or plain ones (one copy each way)' },
  file: { type: 'string', metavar: 'PATH', help: 'use this image (created and filled if missing, never removed)' },
  json: { type: 'flag', help: 'print the result as JSON on stdout' },
  help: { type: 'flag', help: 'show this help' },
};

/** @param {number} x @param {number} [digits] */
function fmt(x, digits = 1) {
  if (!Number.isFinite(x)) return '-';
  return x >= 100 ? Math.round(x).toLocaleString('en-US') : x.toFixed(digits);
}

/** @param {import('./lib/engine.js').BenchResult} r */
function formatResult(r) {
  const lat = r.latUs;
  const lines = [
    `snapstack ${r.driver} ${r.rw} bs=${formatSize(r.bs)} iodepth=${r.iodepth} iothreads=${r.iothreads} aio=${r.aio} buffers=${r.buffers} size=${formatSize(r.size)} runtime=${r.runtime}s${r.ramp > 0 ? ` ramp=${r.ramp}s` : ''}`,
    `  file      ${r.file}${r.fileCreated ? ' (created and written in full for this run)' : ''}`,
    `  IOPS      ${fmt(r.iops)}    MB/s ${fmt(r.mbps)} (MiB/s ${fmt(r.mibps)})    ${r.ops.toLocaleString('en-US')} requests in ${r.elapsedSec.toFixed(3)} s${r.rw === 'randrw' ? ` (${r.reads} reads, ${r.writes} writes)` : ''}`,
    `  latency   p50 ${fmt(lat.p50)} us   p99 ${fmt(lat.p99)} us   p99.9 ${fmt(lat.p999)} us   (min ${fmt(lat.min)}, mean ${fmt(lat.mean)}, max ${fmt(lat.max)} us)`,
    `  CPU       ${fmt(r.cpu.usPerOp, 2)} us per request (user ${fmt(r.cpu.userUs / Math.max(1, r.ops), 2)} + system ${fmt(r.cpu.systemUs / Math.max(1, r.ops), 2)}), ${r.cpu.cores.toFixed(2)} cores busy`,
  ];
  return lines.join('\n');
}

async function main() {
  const a = readCommandLine('bench/run.js', 'npm run bench', SPEC);
  if (a === null) return;
  warnIfDistStale();
  const tty = process.stderr.isTTY === true;
  process.once('SIGINT', () => {
    removeTempDirs();
    process.exit(130);
  });
  /** @type {Partial<import('./lib/engine.js').BenchOptions>} */
  const opts = {
    driver: /** @type {import('./lib/engine.js').Driver} */ (a['driver']),
    rw: /** @type {import('./lib/engine.js').RwMode} */ (a['rw']),
    bs: /** @type {number} */ (a['bs']),
    iodepth: /** @type {number} */ (a['iodepth']),
    iothreads: /** @type {number} */ (a['iothreads']),
    aio: /** @type {'threads' | 'sync'} */ (a['aio']),
    size: /** @type {number | undefined} */ (a['size']),
    runtime: /** @type {number} */ (a['runtime']),
    ramp: /** @type {number} */ (a['ramp']),
    rwmixread: /** @type {number} */ (a['rwmixread']),
    buffers: /** @type {'shared' | 'plain'} */ (a['buffers']),
    file: /** @type {string | undefined} */ (a['file']),
  };
  let width = 0;
  /** @param {string} s */
  const status = (s) => {
    process.stderr.write(`\r${s.padEnd(width)}`);
    width = s.length;
  };
  if (tty && opts.file === undefined) status(`preparing a ${formatSize(opts.size ?? 2 ** 30)} ${opts.driver} image...`);
  let result;
  try {
    result = await runBenchmark(opts, {
      onProgress: tty
        ? (p) => status(`${p.phase === 'ramp' ? 'ramp' : 'run '} ${p.elapsedSec.toFixed(0).padStart(4)}/${p.phase === 'ramp' ? opts.ramp : opts.runtime} s  ${fmt(p.iops)} IOPS  ${p.ops.toLocaleString('en-US')} requests`)
        : undefined,
    });
  } catch (e) {
    if (tty) status('');
    if (tty) process.stderr.write('\r');
    if (e instanceof RangeError) {
      process.stderr.write(`bench/run.js: ${e.message}\n`);
      process.exitCode = 2;
      return;
    }
    throw e;
  } finally {
    await withBql((bql) => shutdownIOThreads(bql));
  }
  if (tty) {
    status('');
    process.stderr.write('\r');
  }
  if (a['json'] === true) process.stdout.write(`${JSON.stringify(result, null, 2)}\n`);
  else process.stdout.write(`${formatResult(result)}\n`);
}

await main();

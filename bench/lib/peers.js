// @ts-check
/**
 * The peers snapstack is measured against in bench/compare.js: `qemu-img bench`, `fio`, and a bare
 * fs.readSync / fs.writeSync loop in this process. Nothing is installed: a tool that is not on the
 * PATH is reported missing, with the reason, and its measurements are skipped.
 */
import { spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';

/**
 * @typedef {object} PeerMeasurement
 * @property {number} ops
 * @property {number} elapsedSec
 * @property {number} iops
 * @property {number} mbps decimal MB per second
 * @property {number | null} cpuUsPerOp CPU time (user + system) per request, microseconds
 * @property {{ p50: number, p99: number, p999: number } | null} latUs
 * @property {string} command what was run
 * @property {number | null} [fioCpuUsPerOp] fio's own account of its job's CPU time per request
 */

/**
 * @typedef {object} ToolInfo
 * @property {boolean} available
 * @property {string} version or the reason it is unavailable
 */

/** @param {string} cmd @param {string[]} args */
function run(cmd, args) {
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 64 * 1024 * 1024 });
  return { status: r.status ?? -1, stdout: r.stdout ?? '', stderr: r.stderr ?? '', error: r.error };
}

/**
 * Whether `tool` runs, and its version line.
 * @param {'qemu-img' | 'fio'} tool
 * @returns {ToolInfo}
 */
export function detectTool(tool) {
  const r = run(tool, ['--version']);
  if (r.error !== undefined || r.status !== 0) {
    const hint = tool === 'qemu-img' ? 'apt-get install qemu-utils' : 'apt-get install fio';
    return { available: false, version: `${tool} not found on the PATH (${hint}); its column is left empty` };
  }
  return { available: true, version: (r.stdout.split('\n')[0] ?? '').trim() };
}

let clockTicks = 0;
/** Clock ticks per second of /proc/<pid>/stat. */
function clkTck() {
  if (clockTicks === 0) {
    const r = run('getconf', ['CLK_TCK']);
    clockTicks = Number(r.stdout.trim()) || 100;
  }
  return clockTicks;
}

/**
 * Runs `cmd args` under `sh`, which prints its own /proc stat afterwards: the cutime and cstime
 * fields hold the CPU time of the waited-for child (all its threads), which Node cannot get from
 * spawnSync. The figure covers the whole process: start-up and image open included.
 * @param {string} cmd @param {string[]} args
 */
function runWithCpu(cmd, args) {
  const r = run('sh', ['-c', '"$@"; st=$?; echo; cat /proc/$$/stat; exit $st', 'sh', cmd, ...args]);
  const lines = r.stdout.trimEnd().split('\n');
  let cpuSec = NaN;
  if (/^\d+ \(/.test(lines[lines.length - 1] ?? '')) {
    const statLine = lines.pop() ?? '';
    const fields = statLine.slice(statLine.lastIndexOf(')') + 2).split(' ');
    // fields[0] is field 3 (state): cutime is field 16, cstime field 17
    cpuSec = (Number(fields[13]) + Number(fields[14])) / clkTck();
  }
  return { ...r, stdout: lines.join('\n'), cpuSec };
}

/**
 * The -S step qemu-img bench uses for "random" 4 KiB requests: it has no random mode (7.2), but
 * each request's offset is the previous one plus the step, modulo the image size. A step of P
 * blocks with P prime, not dividing the block count and near 0.618 of it (Fibonacci hashing) visits
 * every block once per cycle, consecutive requests far apart. Capped below 2 GiB (qemu-img's limit).
 * @param {number} size @param {number} bs
 */
export function qemuStrideBlocks(size, bs) {
  const blocks = Math.floor(size / bs);
  let p = Math.max(3, Math.min(Math.floor(blocks * 0.618), Math.floor((2 ** 31 - 1) / bs)));
  const isPrime = (/** @type {number} */ n) => {
    if (n < 2) return false;
    for (let d = 2; d * d <= n; d++) if (n % d === 0) return false;
    return true;
  };
  while (!isPrime(p) || blocks % p === 0) p++;
  return p;
}

/**
 * @typedef {object} QemuJob
 * @property {string} file
 * @property {'raw' | 'qcow2'} format
 * @property {boolean} write
 * @property {boolean} random
 * @property {number} bs
 * @property {number} iodepth
 * @property {number} size the image's virtual size
 * @property {'threads' | 'io_uring' | 'native'} aio
 */

/**
 * One `qemu-img bench` process of `count` requests.
 * @param {QemuJob} j @param {number} count
 * @returns {PeerMeasurement}
 */
export function qemuImgBenchOnce(j, count) {
  const args = ['bench', '-f', j.format, '-t', 'writeback', '-i', j.aio, '-c', String(count), '-d', String(j.iodepth), '-s', String(j.bs)];
  if (j.random) args.push('-S', String(qemuStrideBlocks(j.size, j.bs) * j.bs));
  if (j.write) args.push('-w');
  args.push(j.file);
  const r = runWithCpu('qemu-img', args);
  const m = /Run completed in ([\d.]+) seconds/.exec(r.stdout);
  if (r.status !== 0 || m === null) throw new Error(`qemu-img ${args.join(' ')} failed (exit ${r.status}): ${(r.stderr || r.stdout).trim()}`);
  const elapsedSec = Math.max(Number(m[1]), 0.0005);
  return {
    ops: count,
    elapsedSec,
    iops: count / elapsedSec,
    mbps: (count * j.bs) / 1e6 / elapsedSec,
    cpuUsPerOp: Number.isFinite(r.cpuSec) ? (r.cpuSec * 1e6) / count : null,
    latUs: null,
    command: `qemu-img ${args.join(' ')}`,
  };
}

/**
 * Whether `qemu-img bench -i io_uring` works here (kernel, seccomp, build): one tiny read.
 * @param {string} file a raw image
 * @returns {ToolInfo}
 */
export function probeQemuIoUring(file) {
  const r = run('qemu-img', ['bench', '-f', 'raw', '-t', 'writeback', '-i', 'io_uring', '-c', '16', '-d', '4', file]);
  if (r.status === 0) return { available: true, version: 'io_uring works' };
  return { available: false, version: `qemu-img bench -i io_uring fails here: ${(r.stderr || r.stdout).trim().split('\n')[0]}` };
}

/** Request-rate estimates per qemu-img job, carried from one repetition to the next. */
const qemuRates = new Map();

/**
 * Runs `qemu-img bench` for about `runtime` seconds: qemu-img takes a request count, not a time,
 * so the count comes from the job's last rate (first: from calibration runs of growing counts,
 * which also warm up the page cache).
 * @param {QemuJob} j @param {number} runtime
 */
export function qemuImgBenchTimed(j, runtime) {
  const key = JSON.stringify(j);
  let rate = qemuRates.get(key);
  if (rate === undefined) {
    const calib = Math.min(0.3, runtime / 2);
    let count = Math.max(j.iodepth, j.bs >= 65536 ? 64 : 1024);
    for (;;) {
      const m = qemuImgBenchOnce(j, count);
      rate = m.iops;
      if (m.elapsedSec >= calib || count >= 2 ** 30) break;
      count = Math.min(2 ** 30, Math.ceil(count * Math.min(20, Math.max(2, (calib * 1.3) / m.elapsedSec))));
    }
  }
  const count = Math.max(j.iodepth, Math.min(2 ** 31 - 1, Math.round(rate * runtime)));
  const m = qemuImgBenchOnce(j, count);
  qemuRates.set(key, m.iops);
  return m;
}

/**
 * @typedef {object} FioJob
 * @property {string} file a raw file
 * @property {'read' | 'write' | 'randread' | 'randwrite'} rw
 * @property {number} bs
 * @property {number} iodepth
 * @property {number} size bytes of the file covered
 * @property {string} ioengine
 * @property {number} runtime seconds
 * @property {number} ramp seconds
 */

/**
 * One fio job on a raw file: buffered (--direct=0), time based, uniform random offsets with
 * repetition (--norandommap, like snapstack's), the page cache kept (--invalidate=0).
 * @param {FioJob} j
 * @returns {PeerMeasurement}
 */
export function fioRun(j) {
  const args = [
    '--name=snapstack-compare',
    `--filename=${j.file}`,
    `--rw=${j.rw}`,
    `--bs=${j.bs}`,
    `--iodepth=${j.iodepth}`,
    `--ioengine=${j.ioengine}`,
    '--direct=0',
    '--time_based',
    `--runtime=${Math.max(1, Math.round(j.runtime * 1000))}ms`,
    ...(j.ramp > 0 ? [`--ramp_time=${Math.round(j.ramp * 1000)}ms`] : []),
    `--size=${j.size}`,
    '--norandommap',
    '--randrepeat=0',
    '--invalidate=0',
    '--allow_file_create=0',
    '--lat_percentiles=1',
    '--output-format=json',
  ];
  const r = runWithCpu('fio', args);
  if (r.status !== 0) throw new Error(`fio ${args.join(' ')} failed (exit ${r.status}): ${(r.stderr || r.stdout).trim()}`);
  // fio may print notes before the JSON document
  const json = JSON.parse(r.stdout.slice(r.stdout.indexOf('{')));
  const job = json.jobs[0];
  const d = j.rw === 'read' || j.rw === 'randread' ? job.read : job.write;
  const runtimeSec = d.runtime / 1000;
  const ops = d.total_ios;
  // total latency (submission to completion, as snapstack's) when fio reports it, else clat
  const pct = d.lat_ns?.percentile ?? d.clat_ns?.percentile ?? {};
  /** @param {string} k */
  const p = (k) => (pct[k] === undefined ? NaN : pct[k] / 1000);
  return {
    ops,
    elapsedSec: runtimeSec,
    iops: d.iops,
    mbps: d.bw_bytes / 1e6,
    // fio's own usr_cpu/sys_cpu miss work done by io_uring's kernel workers for buffered writes:
    // the whole process tree's CPU time is used instead (start-up and ramp included)
    cpuUsPerOp: ops > 0 && Number.isFinite(r.cpuSec) ? (r.cpuSec * 1e6) / ops : null,
    fioCpuUsPerOp: ops > 0 ? (((job.usr_cpu + job.sys_cpu) / 100) * runtimeSec * 1e6) / ops : null,
    latUs: { p50: p('50.000000'), p99: p('99.000000'), p999: p('99.900000') },
    command: `fio ${args.join(' ')}`,
  };
}

/**
 * The first fio engine that runs here: io_uring (the depth is real), else libaio, else psync
 * (synchronous: the depth is 1 whatever --iodepth says).
 * @param {string} file a raw file
 * @returns {{ ioengine: string | null, note: string }}
 */
export function probeFioEngine(file) {
  for (const e of ['io_uring', 'libaio', 'psync']) {
    const r = run('fio', ['--name=probe', `--filename=${file}`, '--rw=read', '--bs=4k', `--ioengine=${e}`, '--direct=0', '--size=64k', '--invalidate=0', '--allow_file_create=0', '--output-format=json']);
    if (r.status === 0 && !/error|fail/i.test(r.stderr)) return { ioengine: e, note: e === 'io_uring' ? 'io_uring works' : `io_uring fails here; using ${e}` };
  }
  return { ioengine: null, note: 'no fio I/O engine works here' };
}

/**
 * The limit for one request at a time on this machine: a bare fs.readSync / fs.writeSync loop at
 * uniform random offsets, nothing timed per request.
 * @param {{ file: string, write: boolean, bs: number, size: number, runtime: number, ramp: number }} j
 * @returns {PeerMeasurement}
 */
export function syncLoop(j) {
  const fd = fs.openSync(j.file, j.write ? 'r+' : 'r');
  const buf = Buffer.allocUnsafe(j.bs);
  crypto.randomFillSync(buf);
  const blocks = Math.floor(j.size / j.bs);
  const bs = j.bs;
  /** @param {number} seconds */
  const loop = (seconds) => {
    const deadline = performance.now() + seconds * 1000;
    let ops = 0;
    do {
      for (let k = 0; k < 256; k++) {
        const off = Math.floor(Math.random() * blocks) * bs;
        if (j.write) fs.writeSync(fd, buf, 0, bs, off);
        else fs.readSync(fd, buf, 0, bs, off);
      }
      ops += 256;
    } while (performance.now() < deadline);
    return ops;
  };
  try {
    if (j.ramp > 0) loop(j.ramp);
    const cpu0 = process.cpuUsage();
    const t0 = performance.now();
    const ops = loop(j.runtime);
    const elapsedSec = (performance.now() - t0) / 1000;
    const cpu = process.cpuUsage(cpu0);
    return {
      ops,
      elapsedSec,
      iops: ops / elapsedSec,
      mbps: (ops * bs) / 1e6 / elapsedSec,
      cpuUsPerOp: (cpu.user + cpu.system) / ops,
      latUs: null,
      command: `fs.${j.write ? 'writeSync' : 'readSync'} loop, ${bs}-byte requests at random offsets`,
    };
  } finally {
    fs.closeSync(fd);
  }
}

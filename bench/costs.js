#!/usr/bin/env node
// @ts-check
/**
 * `npm run bench:costs`: what snapshots and drained sections cost (issue 5, item 3).
 *
 *   npm run build && npm run bench:costs -- [--rounds 5] [--full] [--sections snapshot,vm,drain] [--json | --markdown]
 *
 * 1. snapshot: `snapshot create`, `goto`, `delete` on qcow2 images (64 KiB clusters, written in
 *    1 MiB chunks through snapstack, then flushed), against the virtual size (1 GiB, 64 GiB, 1 TiB
 *    sparse, with 256 MiB written, spread over the whole disk or packed at its start) and against
 *    the written data (0, 256 MiB, 1 GiB, and 4 GiB with --full, spread over a 64 GiB disk). Per
 *    image and round, in rotated order: the library on an open image (aio=threads, the default,
 *    and aio=sync, where fdatasync and the file reads and writes are counted and timed), the
 *    `snapstack img snapshot` process, and `qemu-img snapshot` on the same file; medians, and the
 *    ratios to qemu-img. Process start-up is measured on its own (`node -e 0`, `snapshot -l`).
 * 2. vm: savevm, loadvm (and delvm) through the library on a Machine (guest RAM 64 MiB, 2 vCPUs
 *    running the guest workload) with one qcow2 disk of each virtual size above (256 MiB spread,
 *    written first): the time of the saveVm / loadVm / delVm calls, the VM-state size, and two
 *    parts measured apart: stopping the vCPUs, and encoding the VM state.
 * 3. drain: on a raw and a qcow2 image (1 GiB, fully written, openImage with aio=threads), 32
 *    4 KiB random reads are kept in flight while `withBql((bql) => withDrained(bql, node, async
 *    () => {}))` is timed again and again (node = img.backend.root), a few ms apart: the section's
 *    p50 / p99 / max, the time until the node was quiet, the requests in flight when it began,
 *    and how long the requests that arrived during a section waited (queued in the backend)
 *    until it ended. The same with no load, and the request latency without sections.
 *
 * Every image is made in a temporary directory (--dir, default the OS temp dir) and removed right
 * after its measurements (at most about 4.5 GiB at a time with --full). Each run writes
 * bench/results/costs-<timestamp>.json (--out DIR to put it elsewhere); --from FILE re-prints one.
 */
import { spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  Machine,
  createQcow2File,
  delVm,
  loadVm,
  openImage,
  saveVm,
  shutdownIOThreads,
  withBql,
  withBqlSync,
  withDrained,
} from '../dist/index.js';
import { formatSize, readCommandLine, usageFail as failUsage } from './lib/args.js';
import { prepareImage, warnIfDistStale } from './lib/engine.js';
import { LatencyHistogram } from './lib/histogram.js';
import { renderTable } from './lib/table.js';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const CLI = path.join(HERE, '..', 'bin', 'snapstack.js');
const MiB = 2 ** 20;
const GiB = 2 ** 30;
const TiB = 2 ** 40;
const SECTIONS = ['snapshot', 'vm', 'drain'];

/** @type {import('./lib/args.js').Spec} */
const SPEC = {
  rounds: { type: 'number', metavar: 'N', help: 'rounds of snapshot create/goto/delete per image and tool (default 5; --quick: 1)' },
  'vm-rounds': { type: 'number', metavar: 'N', help: 'savevm/loadvm/delvm rounds per disk (default 3; --quick: 1)' },
  full: { type: 'flag', help: 'also 4 GiB written (a 4 GiB image, about 10 s more to write)' },
  quick: { type: 'flag', help: 'a smoke run: 16 MiB written instead of 256 MiB, 64 MiB instead of 1 GiB, 1 round, 0.5 s of drain' },
  sections: { type: 'string', default: SECTIONS.join(','), metavar: 'LIST', help: 'what to measure: snapshot, vm, drain' },
  process: { type: 'flag', default: true, help: 'also time the `snapstack img snapshot` process (--process=off to skip)' },
  ram: { type: 'size', metavar: 'SIZE', help: 'guest RAM of the vm section (default 64M)' },
  'vm-aio': { type: 'string', default: 'threads,sync', metavar: 'LIST', help: "the vm disk's file.aio modes to measure (threads, sync)" },
  'vm-run': { type: 'number', default: 300, metavar: 'MS', help: 'how long the guest runs before each savevm, loadvm and delvm' },
  'drain-runtime': { type: 'number', metavar: 'SEC', help: 'seconds of drained sections under load per image (default 4; --quick: 0.5)' },
  'drain-gap': { type: 'number', default: 5, metavar: 'MS', help: 'pause between two drained sections (the load refills meanwhile)' },
  'drain-size': { type: 'size', metavar: 'SIZE', help: 'size of the drain images (default 1G; --quick: 64M)' },
  iodepth: { type: 'number', default: 32, metavar: 'N', help: 'requests kept in flight in the drain section' },
  dir: { type: 'string', metavar: 'DIR', help: 'where the temporary images go (default the OS temp dir)' },
  out: { type: 'string', metavar: 'DIR', help: 'where the results JSON goes (default bench/results)' },
  markdown: { type: 'flag', help: 'print the tables as Markdown' },
  from: { type: 'string', metavar: 'FILE', help: 'measure nothing: print the tables of an earlier results JSON' },
  json: { type: 'flag', help: 'print the results JSON on stdout instead of the tables' },
  help: { type: 'flag', help: 'show this help' },
};

// --- small helpers ------------------------------------------------------------------------------

/** @param {number[]} xs */
function median(xs) {
  const s = [...xs].sort((a, b) => a - b);
  const n = s.length;
  if (n === 0) return NaN;
  return n % 2 === 1 ? /** @type {number} */ (s[(n - 1) / 2]) : (/** @type {number} */ (s[n / 2 - 1]) + /** @type {number} */ (s[n / 2])) / 2;
}

/** Exact percentile of a sample list (nearest rank). @param {number[]} xs @param {number} p */
function pct(xs, p) {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  return /** @type {number} */ (s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))]);
}

/** @param {number[]} xs */
function stats(xs) {
  return { n: xs.length, min: xs.length ? Math.min(...xs) : NaN, median: median(xs), max: xs.length ? Math.max(...xs) : NaN };
}

/** @param {number[]} xs microseconds */
function latStats(xs) {
  return { n: xs.length, p50: pct(xs, 50), p99: pct(xs, 99), max: xs.length ? Math.max(...xs) : NaN, mean: xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : NaN };
}

const now = () => performance.now();
/** @param {number} ms */
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** @param {() => Promise<unknown>} fn @returns {Promise<number>} milliseconds */
async function timeAsync(fn) {
  const t0 = now();
  await fn();
  return now() - t0;
}

/**
 * Runs a process to its end and returns its wall time in ms (fork and exec included).
 * @param {string} cmd @param {string[]} args
 */
function timeProcess(cmd, args) {
  const t0 = now();
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 16 * MiB });
  const ms = now() - t0;
  if (r.error !== undefined || r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.status}): ${r.stderr ?? r.error}`);
  return ms;
}

/** @param {number} bytes */
function sizeLabel(bytes) {
  if (bytes === 0) return '0';
  const units = /** @type {Array<[string, number]>} */ ([
    ['TiB', TiB],
    ['GiB', GiB],
    ['MiB', MiB],
  ]);
  for (const [u, m] of units) if (bytes >= m && bytes % m === 0) return `${bytes / m} ${u}`;
  return `${bytes} B`;
}

/** @param {number} v milliseconds */
function fmtMs(v) {
  if (!Number.isFinite(v)) return '';
  return v >= 100 ? Math.round(v).toString() : v >= 10 ? v.toFixed(1) : v.toFixed(2);
}

/** @param {number} v microseconds */
function fmtUs(v) {
  if (!Number.isFinite(v)) return '';
  return v >= 1000 ? Math.round(v).toLocaleString('en-US') : v >= 100 ? Math.round(v).toString() : v >= 10 ? v.toFixed(1) : v.toFixed(2);
}

/** @param {number} a @param {number} b */
function fmtRatio(a, b) {
  return Number.isFinite(a) && Number.isFinite(b) && b > 0 ? (a / b).toFixed(2) : '';
}

/** @param {string} msg */
function log(msg) {
  process.stderr.write(`${msg}\n`);
}

// --- the machine --------------------------------------------------------------------------------

/** @param {string} dir */
function machineInfo(dir) {
  const q = spawnSync('qemu-img', ['--version'], { encoding: 'utf8' });
  const fsType = spawnSync('findmnt', ['-n', '-o', 'FSTYPE,SOURCE', '--target', dir], { encoding: 'utf8' });
  const cpus = os.cpus();
  return {
    cpu: cpus[0]?.model ?? 'unknown',
    cores: cpus.length,
    memGiB: Math.round(os.totalmem() / GiB),
    kernel: `${os.type()} ${os.release()}`,
    node: process.version,
    qemuImg: q.status === 0 ? (q.stdout.split('\n')[0] ?? '').trim() : null,
    filesystem: fsType.status === 0 ? fsType.stdout.trim().replace(/\s+/g, ' on ') : 'unknown',
  };
}

// --- images -------------------------------------------------------------------------------------

/**
 * @typedef {object} ImageSpec
 * @property {string} key
 * @property {number} size virtual size
 * @property {number} written bytes written before the measurements
 * @property {'spread' | 'packed'} layout spread over the whole disk, or packed at its start
 * @property {boolean} bySize in the table against the virtual size
 * @property {boolean} byWritten in the table against the written data
 * @property {boolean} vm also used for the savevm / loadvm measurements
 */

/**
 * @param {{ written: number, sizes: number[], writtenList: number[], writtenSize: number }} m
 * @returns {ImageSpec[]}
 */
function imageSpecs(m) {
  /** @type {Map<string, ImageSpec>} */
  const specs = new Map();
  /** @param {number} size @param {number} written @param {'spread' | 'packed'} layout */
  const get = (size, written, layout) => {
    const l = written === 0 ? 'spread' : layout;
    const key = `${formatSize(size)}-${written === 0 ? '0' : formatSize(written)}-${l}`;
    let s = specs.get(key);
    if (s === undefined) {
      s = { key, size, written, layout: l, bySize: false, byWritten: false, vm: false };
      specs.set(key, s);
    }
    return s;
  };
  for (const size of m.sizes) {
    for (const layout of /** @type {const} */ (['spread', 'packed'])) {
      const s = get(size, m.written, layout);
      s.bySize = true;
      if (layout === 'spread') s.vm = true;
    }
  }
  for (const w of m.writtenList) get(m.writtenSize, w, 'spread').byWritten = true;
  return [...specs.values()].sort((a, b) => a.size - b.size || a.written - b.written || a.layout.localeCompare(b.layout));
}

/**
 * Creates the qcow2 image and writes `written` bytes in 1 MiB chunks: spread evenly over the
 * virtual size, or packed from offset 0; flushed, so that no later fdatasync writes data back.
 * @param {ImageSpec} spec @param {string} file
 */
async function prepareQcow2(spec, file) {
  const t0 = now();
  withBqlSync((bql) => createQcow2File(bql, file, { sizeBytes: spec.size }));
  const chunk = new Uint8Array(MiB);
  crypto.randomFillSync(chunk);
  const chunks = Math.floor(spec.written / MiB);
  const stride = spec.layout === 'packed' || chunks === 0 ? MiB : Math.max(MiB, Math.floor(spec.size / chunks / MiB) * MiB);
  const l2Span = 65536 * (65536 / 8); // bytes of guest disk one L2 table maps (64 KiB clusters)
  const l2 = new Set();
  const img = await openImage(file, { format: 'qcow2', aio: 'sync' });
  try {
    for (let n = 0, off = 0; n < chunks && off + MiB <= spec.size; n++, off += stride) {
      chunk[0] = n & 0xff;
      await img.write(off, chunk);
      l2.add(Math.floor(off / l2Span));
    }
    await img.flush();
  } finally {
    await img.close();
  }
  const st = fs.statSync(file);
  return { prepSec: (now() - t0) / 1000, fileBytes: st.size, allocatedBytes: st.blocks * 512, l2Tables: l2.size };
}

/** @param {string} file */
function qemuCheck(file) {
  const r = spawnSync('qemu-img', ['check', file], { encoding: 'utf8' });
  return r.status === 0 ? 'clean' : `qemu-img check exit ${r.status}: ${(r.stdout + r.stderr).trim().split('\n').slice(0, 3).join(' / ')}`;
}

// --- 1. snapshot create / goto / delete --------------------------------------------------------

const OPS = /** @type {const} */ (['create', 'goto', 'delete']);
/** @typedef {'lib-threads' | 'lib-sync' | 'process' | 'qemu-img'} SnapTool */

/**
 * Counts and times the blocking file calls the aio=sync file node makes on the main loop
 * (fs.fdatasyncSync, fs.readSync, fs.writeSync: src/drivers/file.ts calls them on the `fs`
 * default export, which is patched here for the duration of `fn` only).
 * @template T @param {() => Promise<T>} fn
 */
async function withSyscallProbe(fn) {
  const f = /** @type {Record<string, Function>} */ (/** @type {unknown} */ (fs));
  const names = ['fdatasyncSync', 'readSync', 'writeSync'];
  /** @type {Record<string, { n: number, ms: number }>} */
  const acc = {};
  /** @type {Record<string, Function>} */
  const orig = {};
  for (const name of names) {
    const o = /** @type {Function} */ (f[name]);
    orig[name] = o;
    const a = { n: 0, ms: 0 };
    acc[name] = a;
    f[name] = function (/** @type {unknown[]} */ ...args) {
      const t0 = now();
      try {
        return o.apply(fs, args);
      } finally {
        a.ms += now() - t0;
        a.n++;
      }
    };
  }
  try {
    const value = await fn();
    return { value, calls: acc };
  } finally {
    for (const name of names) f[name] = /** @type {Function} */ (orig[name]);
  }
}

/**
 * @typedef {object} SnapshotRow
 * @property {ImageSpec} spec
 * @property {{ prepSec: number, fileBytes: number, allocatedBytes: number, l2Tables: number }} image
 * @property {Record<string, Record<string, number[]>>} ms per tool, per op (create, goto, delete, open, close), one sample per round
 * @property {Record<string, { fdatasync: number[], fdatasyncMs: number[], reads: number[], writes: number[], ioMs: number[] }>} syncCalls per op, aio=sync
 * @property {{ spawn: number[], node: number[], snapstackList: number[], qemuList: number[] }} startup ms: `true` (the cost of spawning from this process), `node -e 0`, `snapstack img snapshot -l`, `qemu-img snapshot -l`
 * @property {string} check qemu-img check afterwards
 */

/**
 * @param {ImageSpec} spec @param {string} file @param {SnapshotRow['image']} image
 * @param {{ rounds: number, process: boolean, qemu: boolean }} o
 * @returns {Promise<SnapshotRow>}
 */
async function snapshotRounds(spec, file, image, o) {
  /** @type {SnapTool[]} */
  const tools = ['lib-threads', 'lib-sync'];
  if (o.process) tools.push('process');
  if (o.qemu) tools.push('qemu-img');
  /** @type {SnapshotRow['ms']} */
  const ms = {};
  for (const t of tools) ms[t] = { create: [], goto: [], delete: [], open: [], close: [] };
  /** @type {SnapshotRow['syncCalls']} */
  const syncCalls = {};
  for (const op of OPS) syncCalls[op] = { fdatasync: [], fdatasyncMs: [], reads: [], writes: [], ioMs: [] };
  const startup = { spawn: /** @type {number[]} */ ([]), node: /** @type {number[]} */ ([]), snapstackList: /** @type {number[]} */ ([]), qemuList: /** @type {number[]} */ ([]) };

  /** @param {SnapTool} tool */
  const once = async (tool) => {
    const m = /** @type {Record<string, number[]>} */ (ms[tool]);
    const push = (/** @type {string} */ op, /** @type {number} */ v) => /** @type {number[]} */ (m[op]).push(v);
    if (tool === 'lib-threads' || tool === 'lib-sync') {
      const aio = tool === 'lib-threads' ? 'threads' : 'sync';
      let t0 = now();
      const img = await openImage(file, { format: 'qcow2', aio });
      push('open', now() - t0);
      try {
        for (const op of OPS) {
          const run = () => (op === 'create' ? img.createSnapshot('bench') : op === 'goto' ? img.gotoSnapshot('bench') : img.deleteSnapshot('bench'));
          if (aio === 'threads') push(op, await timeAsync(run));
          else {
            const { value: t, calls } = await withSyscallProbe(() => timeAsync(run));
            push(op, t);
            const c = /** @type {SnapshotRow['syncCalls'][string]} */ (syncCalls[op]);
            const fd = calls['fdatasyncSync'] ?? { n: 0, ms: 0 };
            const rd = calls['readSync'] ?? { n: 0, ms: 0 };
            const wr = calls['writeSync'] ?? { n: 0, ms: 0 };
            c.fdatasync.push(fd.n);
            c.fdatasyncMs.push(fd.ms);
            c.reads.push(rd.n);
            c.writes.push(wr.n);
            c.ioMs.push(rd.ms + wr.ms);
          }
        }
      } finally {
        t0 = now();
        await img.close();
        push('close', now() - t0);
      }
      return;
    }
    const [cmd, pre] = tool === 'process' ? [process.execPath, [CLI, 'img', 'snapshot']] : ['qemu-img', ['snapshot']];
    push('create', timeProcess(cmd, [...pre, '-c', 'bench', file]));
    push('goto', timeProcess(cmd, [...pre, '-a', 'bench', file]));
    push('delete', timeProcess(cmd, [...pre, '-d', 'bench', file]));
  };

  // one untimed pass of the library first: the JIT and the page cache settle
  {
    const img = await openImage(file, { format: 'qcow2' });
    await img.createSnapshot('warm');
    await img.deleteSnapshot('warm');
    await img.close();
  }
  for (let round = 0; round < o.rounds; round++) {
    const k = round % tools.length;
    for (const tool of [...tools.slice(k), ...tools.slice(0, k)]) await once(tool);
    startup.spawn.push(timeProcess('true', []));
    startup.node.push(timeProcess(process.execPath, ['-e', '0']));
    if (o.process) startup.snapstackList.push(timeProcess(process.execPath, [CLI, 'img', 'snapshot', '-l', file]));
    if (o.qemu) startup.qemuList.push(timeProcess('qemu-img', ['snapshot', '-l', file]));
  }
  return { spec, image, ms, syncCalls, startup, check: o.qemu ? qemuCheck(file) : 'not checked (no qemu-img)' };
}

// --- 2. savevm / loadvm -------------------------------------------------------------------------

/**
 * @typedef {{ fdatasync: number[], fdatasyncMs: number[], io: number[], ioMs: number[] }} CallSamples
 *   aio=sync only: fdatasync calls and their time, file reads + writes and their time, per round
 */

/**
 * @typedef {object} VmRow
 * @property {ImageSpec} spec
 * @property {'threads' | 'sync'} aio the disk's file.aio
 * @property {number} ramBytes
 * @property {number} vcpus
 * @property {number} vmStateSize bytes
 * @property {{ savevm: number[], loadvm: number[], delvm: number[], stop: number[], encode: number[], floorWrite: number[], floorSync: number[] }} ms
 *   floorWrite / floorSync: writing the VM state's size to a fresh file beside the image with
 *   fs.writeSync in 1 MiB chunks, then one fdatasync (a floor for what savevm must write)
 * @property {Record<string, CallSamples>} calls per call (savevm, loadvm, delvm), aio=sync only
 * @property {{ writes: number, reads: number, errors: number, checked: number, mismatches: number }} guest
 * @property {string} check
 */

/**
 * Writes `bytes` to a fresh file in 1 MiB chunks, fdatasyncs it, removes it.
 * @param {string} file @param {number} bytes
 */
function ioFloor(file, bytes) {
  const chunk = new Uint8Array(MiB);
  crypto.randomFillSync(chunk);
  const fd = fs.openSync(file, 'w');
  try {
    const t0 = now();
    for (let off = 0; off < bytes; off += MiB) fs.writeSync(fd, chunk, 0, Math.min(MiB, bytes - off), off);
    const t1 = now();
    fs.fdatasyncSync(fd);
    return { writeMs: t1 - t0, syncMs: now() - t1 };
  } finally {
    fs.closeSync(fd);
    fs.rmSync(file, { force: true });
  }
}

/**
 * @param {ImageSpec} spec @param {string} file @param {'threads' | 'sync'} aio
 * @param {{ rounds: number, ram: number, runMs: number, qemu: boolean }} o
 * @returns {Promise<VmRow>}
 */
async function vmRounds(spec, file, aio, o) {
  const m = new Machine({ ramBytes: o.ram, guest: true });
  /** @type {VmRow['ms']} */
  const ms = { savevm: [], loadvm: [], delvm: [], stop: [], encode: [], floorWrite: [], floorSync: [] };
  /** @type {VmRow['calls']} */
  const calls = {};
  for (const c of ['savevm', 'loadvm', 'delvm']) calls[c] = { fdatasync: [], fdatasyncMs: [], io: [], ioMs: [] };
  /**
   * Times one call; with aio=sync also counts its blocking file calls.
   * @template T @param {'savevm' | 'loadvm' | 'delvm'} name @param {() => Promise<T>} fn
   */
  const timed = async (name, fn) => {
    if (aio === 'threads') {
      const t0 = now();
      const v = await fn();
      ms[name].push(now() - t0);
      return v;
    }
    const { value, calls: k } = await withSyscallProbe(async () => {
      const t0 = now();
      const v = await fn();
      return { v, t: now() - t0 };
    });
    ms[name].push(value.t);
    const c = /** @type {CallSamples} */ (calls[name]);
    const fd = k['fdatasyncSync'] ?? { n: 0, ms: 0 };
    const rd = k['readSync'] ?? { n: 0, ms: 0 };
    const wr = k['writeSync'] ?? { n: 0, ms: 0 };
    c.fdatasync.push(fd.n);
    c.fdatasyncMs.push(fd.ms);
    c.io.push(rd.n + wr.n);
    c.ioMs.push(rd.ms + wr.ms);
    return value.v;
  };
  let vmStateSize = 0;
  await withBql(async (bql) => {
    await m.addDrive(bql, `file=${file},format=qcow2,id=disk0,file.aio=${aio}`);
    await m.start(bql);
  });
  let guest;
  try {
    for (let round = 0; round < o.rounds; round++) {
      await sleep(o.runMs);
      // the two parts measured apart: stopping the running vCPUs, encoding the VM state
      await withBql(async (bql) => {
        let t0 = now();
        await m.stop(bql);
        ms.stop.push(now() - t0);
        t0 = now();
        m.saveState(bql);
        ms.encode.push(now() - t0);
        m.cont(bql);
      });
      await sleep(o.runMs);
      const r = await timed('savevm', () => withBql((bql) => saveVm(bql, m, 'bench')));
      vmStateSize = r.vmStateSize;
      await sleep(o.runMs);
      await timed('loadvm', () => withBql((bql) => loadVm(bql, m, 'bench')));
      await sleep(o.runMs);
      const failures = await timed('delvm', () => withBql((bql) => delVm(bql, m, 'bench')));
      if (failures.length > 0) throw new Error(`delvm: ${failures.join('; ')}`);
    }
    const c = await withBql((bql) => m.checkGuest(bql));
    guest = { writes: c.writes, reads: c.reads, errors: c.errors, checked: c.checked, mismatches: c.mismatches.length };
  } finally {
    await withBql((bql) => m.shutdown(bql));
  }
  for (let round = 0; round < o.rounds; round++) {
    const f = ioFloor(path.join(path.dirname(file), 'floor.tmp'), vmStateSize);
    ms.floorWrite.push(f.writeMs);
    ms.floorSync.push(f.syncMs);
  }
  return { spec, aio, ramBytes: o.ram, vcpus: m.vcpus, vmStateSize, ms, calls, guest, check: o.qemu ? qemuCheck(file) : 'not checked (no qemu-img)' };
}

// --- 3. drained sections under load ------------------------------------------------------------

/**
 * @typedef {object} DrainRow
 * @property {'raw' | 'qcow2'} driver
 * @property {number} size
 * @property {number} iodepth
 * @property {{ sections: number, totalUs: ReturnType<typeof latStats>, quietUs: ReturnType<typeof latStats> }} idle sections with no load
 * @property {{ iops: number, latUs: { p50: number, p99: number, max: number } }} baseline the load with no section
 * @property {{ sections: number, totalUs: ReturnType<typeof latStats>, quietUs: ReturnType<typeof latStats>, inFlightAtBegin: number, queuedPerSection: number, queuedAtEnd: number, iops: number, latUs: { p50: number, p99: number, max: number }, queued: { n: number, waitUs: ReturnType<typeof latStats>, latUs: ReturnType<typeof latStats> }, notQueuedLatUs: { p50: number, p99: number, max: number } }} loaded
 */

/** @param {LatencyHistogram} h nanoseconds, to microseconds */
function histUs(h) {
  return { p50: h.percentile(50) / 1000, p99: h.percentile(99) / 1000, max: h.max / 1000 };
}

/**
 * @param {'raw' | 'qcow2'} driver @param {string} file @param {number} size
 * @param {{ runtimeSec: number, gapMs: number, iodepth: number }} o
 * @returns {Promise<DrainRow>}
 */
async function drainRun(driver, file, size, o) {
  const img = await openImage(file, { format: driver, aio: 'threads', name: `drain-${driver}` });
  const blk = img.backend;
  const node = blk.root;
  if (node === null) throw new Error('the image has no root node');
  const blocks = Math.floor(size / 4096);

  /** Times one section; `queuedAtEnd` is read inside it, just before it ends. */
  const section = async () => {
    let quiet = 0;
    let queuedAtEnd = 0;
    const inFlight = blk.inFlight;
    const t0 = now();
    await withBql((bql) =>
      withDrained(bql, node, async () => {
        quiet = now();
        queuedAtEnd = blk.queued.length;
      }),
    );
    const t2 = now();
    return { totalUs: (t2 - t0) * 1000, quietUs: (quiet - t0) * 1000, inFlight, queuedAtEnd, end: t2 };
  };

  try {
    // idle: no request in flight
    const idleTotal = [];
    const idleQuiet = [];
    for (let i = 0; i < 20; i++) await section(); // warm-up
    for (let i = 0; i < 300; i++) {
      const s = await section();
      idleTotal.push(s.totalUs);
      idleQuiet.push(s.quietUs);
    }

    // the load: `iodepth` loops of 4 KiB random reads
    let phase = /** @type {'warm' | 'base' | 'drain' | 'stop'} */ ('warm');
    const baseHist = new LatencyHistogram();
    const drainHist = new LatencyHistogram();
    const notQueuedHist = new LatencyHistogram();
    let baseOps = 0;
    let drainOps = 0;
    let sectionId = -1;
    /** @type {Array<[number, number, number]>} section, submit ms, latency ms of the requests that queued */
    const queuedReqs = [];
    const slot = async () => {
      const buf = new Uint8Array(new SharedArrayBuffer(4096));
      while (phase !== 'stop') {
        const off = Math.floor(Math.random() * blocks) * 4096;
        const queued = blk.quiesceCounter > 0;
        const sid = sectionId;
        const p = phase;
        const t0 = now();
        await img.read(off, 4096, buf);
        const lat = now() - t0;
        if (p === 'base') {
          baseHist.record(lat * 1e6);
          baseOps++;
        } else if (p === 'drain') {
          drainHist.record(lat * 1e6);
          drainOps++;
          if (queued) queuedReqs.push([sid, t0, lat]);
          else notQueuedHist.record(lat * 1e6);
        }
      }
    };
    const loops = Array.from({ length: o.iodepth }, () => slot());
    await sleep(Math.min(500, o.runtimeSec * 250));
    phase = 'base';
    let t0 = now();
    await sleep(Math.max(200, o.runtimeSec * 500));
    const baseSec = (now() - t0) / 1000;

    phase = 'drain';
    /** @type {Array<Awaited<ReturnType<typeof section>>>} */
    const secs = [];
    t0 = now();
    const deadline = t0 + o.runtimeSec * 1000;
    while (now() < deadline) {
      await sleep(o.gapMs);
      sectionId = secs.length;
      const s = await section();
      sectionId = -1;
      secs.push(s);
    }
    const drainSec = (now() - t0) / 1000;
    phase = 'stop';
    await Promise.all(loops);

    const waits = [];
    const qLat = [];
    for (const [sid, submit, lat] of queuedReqs) {
      const s = secs[sid];
      if (s === undefined) continue;
      waits.push((s.end - submit) * 1000);
      qLat.push(lat * 1000);
    }
    return {
      driver,
      size,
      iodepth: o.iodepth,
      idle: { sections: idleTotal.length, totalUs: latStats(idleTotal), quietUs: latStats(idleQuiet) },
      baseline: { iops: baseOps / baseSec, latUs: histUs(baseHist) },
      loaded: {
        sections: secs.length,
        totalUs: latStats(secs.map((s) => s.totalUs)),
        quietUs: latStats(secs.map((s) => s.quietUs)),
        inFlightAtBegin: secs.reduce((a, s) => a + s.inFlight, 0) / Math.max(1, secs.length),
        queuedPerSection: queuedReqs.length / Math.max(1, secs.length),
        queuedAtEnd: secs.reduce((a, s) => a + s.queuedAtEnd, 0) / Math.max(1, secs.length),
        iops: drainOps / drainSec,
        latUs: histUs(drainHist),
        queued: { n: queuedReqs.length, waitUs: latStats(waits), latUs: latStats(qLat) },
        notQueuedLatUs: histUs(notQueuedHist),
      },
    };
  } finally {
    await img.close();
  }
}

// --- rendering ----------------------------------------------------------------------------------

/**
 * @typedef {object} ResultsDoc
 * @property {string} date
 * @property {string} command
 * @property {ReturnType<typeof machineInfo>} machine
 * @property {Record<string, unknown>} options
 * @property {number} wallSec
 * @property {SnapshotRow[]} snapshot
 * @property {VmRow[]} vm
 * @property {DrainRow[]} drain
 * @property {string[]} notes
 */

/** @param {ImageSpec} s */
function imageLabel(s) {
  return `${sizeLabel(s.size)}, ${s.written === 0 ? 'empty' : `${sizeLabel(s.written)} ${s.layout}`}`;
}

/** @param {SnapshotRow[]} rows @param {boolean} markdown */
function snapshotTable(rows, markdown) {
  const head = ['image', 'L2 tables', 'op', 'lib threads', 'lib sync', 'of which fdatasync (n)', 'file I/O (n)', 'snapstack img', 'qemu-img', 'qemu-img - its -l', 'lib/qemu-img', 'lib/(qemu-img - -l)', 'img/qemu-img'];
  /** @type {string[][]} */
  const out = [];
  for (const r of rows) {
    for (const op of OPS) {
      const med = (/** @type {string} */ tool) => median(r.ms[tool]?.[op] ?? []);
      const lib = med('lib-threads');
      const sync = med('lib-sync');
      const proc = med('process');
      const q = med('qemu-img');
      const c = r.syncCalls[op];
      const fd = c === undefined ? '' : `${fmtMs(median(c.fdatasyncMs))} (${median(c.fdatasync)})`;
      const io = c === undefined ? '' : `${fmtMs(median(c.ioMs))} (${median(c.reads.map((n, i) => n + (c.writes[i] ?? 0)))})`;
      const qNet = q - median(r.startup.qemuList);
      out.push([
        op === 'create' ? imageLabel(r.spec) : '',
        op === 'create' ? String(r.image.l2Tables) : '',
        op,
        fmtMs(lib),
        fmtMs(sync),
        fd,
        io,
        fmtMs(proc),
        fmtMs(q),
        fmtMs(qNet),
        fmtRatio(lib, q),
        fmtRatio(lib, qNet),
        fmtRatio(proc, q),
      ]);
    }
  }
  return renderTable(head, out, markdown, 3);
}

/** @param {SnapshotRow[]} rows @param {boolean} markdown */
function startupTable(rows, markdown) {
  const head = ['image', 'lib open (threads)', 'lib close (threads)', 'spawn true', 'node -e 0', 'snapstack img snapshot -l', 'qemu-img snapshot -l'];
  const out = rows.map((r) => [
    imageLabel(r.spec),
    fmtMs(median(r.ms['lib-threads']?.['open'] ?? [])),
    fmtMs(median(r.ms['lib-threads']?.['close'] ?? [])),
    fmtMs(median(r.startup.spawn ?? [])),
    fmtMs(median(r.startup.node)),
    fmtMs(median(r.startup.snapstackList)),
    fmtMs(median(r.startup.qemuList)),
  ]);
  return renderTable(head, out, markdown, 1);
}

/** @param {VmRow[]} rows @param {boolean} markdown */
function vmTable(rows, markdown) {
  const head = ['disk', 'aio', 'VM state', 'savevm', 'fdatasync (n)', 'file I/O (n)', 'loadvm', 'fdatasync (n)', 'file I/O (n)', 'delvm', 'stop vCPUs', 'encode state', 'floor: write + fdatasync', 'guest writes', 'check'];
  /** @param {VmRow} r @param {string} name */
  const callCells = (r, name) => {
    const c = r.calls[name];
    if (c === undefined || c.fdatasync.length === 0) return ['', ''];
    return [`${fmtMs(median(c.fdatasyncMs))} (${median(c.fdatasync)})`, `${fmtMs(median(c.ioMs))} (${median(c.io)})`];
  };
  const out = rows.map((r) => [
    imageLabel(r.spec),
    r.aio,
    `${(r.vmStateSize / MiB).toFixed(2)} MiB`,
    fmtMs(median(r.ms.savevm)),
    ...callCells(r, 'savevm'),
    fmtMs(median(r.ms.loadvm)),
    ...callCells(r, 'loadvm'),
    fmtMs(median(r.ms.delvm)),
    fmtMs(median(r.ms.stop)),
    fmtMs(median(r.ms.encode)),
    `${fmtMs(median(r.ms.floorWrite))} + ${fmtMs(median(r.ms.floorSync))}`,
    r.guest.writes.toLocaleString('en-US'),
    r.guest.errors === 0 && r.guest.mismatches === 0 && r.check === 'clean' ? 'ok' : `errors ${r.guest.errors}, mismatches ${r.guest.mismatches}, ${r.check}`,
  ]);
  return renderTable(head, out, markdown, 2);
}

/** @param {DrainRow[]} rows @param {boolean} markdown */
function drainTables(rows, markdown) {
  const head1 = ['image', 'load', 'sections', 'in flight at begin', 'section p50', 'p99', 'max', 'until quiet p50', 'p99'];
  /** @type {string[][]} */
  const out1 = [];
  for (const r of rows) {
    const img = `${r.driver} ${sizeLabel(r.size)}`;
    out1.push([img, 'none', String(r.idle.sections), '0', fmtUs(r.idle.totalUs.p50), fmtUs(r.idle.totalUs.p99), fmtUs(r.idle.totalUs.max), fmtUs(r.idle.quietUs.p50), fmtUs(r.idle.quietUs.p99)]);
    const l = r.loaded;
    out1.push([img, `QD${r.iodepth} 4k randread`, String(l.sections), l.inFlightAtBegin.toFixed(1), fmtUs(l.totalUs.p50), fmtUs(l.totalUs.p99), fmtUs(l.totalUs.max), fmtUs(l.quietUs.p50), fmtUs(l.quietUs.p99)]);
  }
  const head2 = ['image', 'queued per section', 'queued wait p50', 'p99', 'max', 'queued latency p50', 'p99', 'other requests p50 / p99', 'no sections p50 / p99', 'IOPS with / without sections'];
  const out2 = rows.map((r) => {
    const l = r.loaded;
    return [
      `${r.driver} ${sizeLabel(r.size)}`,
      l.queuedPerSection.toFixed(1),
      fmtUs(l.queued.waitUs.p50),
      fmtUs(l.queued.waitUs.p99),
      fmtUs(l.queued.waitUs.max),
      fmtUs(l.queued.latUs.p50),
      fmtUs(l.queued.latUs.p99),
      `${fmtUs(l.notQueuedLatUs.p50)} / ${fmtUs(l.notQueuedLatUs.p99)}`,
      `${fmtUs(r.baseline.latUs.p50)} / ${fmtUs(r.baseline.latUs.p99)}`,
      `${Math.round(l.iops).toLocaleString('en-US')} / ${Math.round(r.baseline.iops).toLocaleString('en-US')}`,
    ];
  });
  return `${renderTable(head1, out1, markdown, 2)}\n\n${renderTable(head2, out2, markdown, 1)}`;
}

/** @param {ResultsDoc} doc @param {boolean} markdown */
function renderText(doc, markdown) {
  const m = doc.machine;
  const parts = [
    `${doc.command}  (${doc.date}, ${Math.round(doc.wallSec)} s)`,
    `machine: ${m.cpu} x ${m.cores}, ${m.memGiB} GiB, ${m.kernel}, ${m.filesystem}; node ${m.node}; ${m.qemuImg ?? 'qemu-img not found'}`,
  ];
  const bySize = doc.snapshot.filter((r) => r.spec.bySize);
  const byWritten = doc.snapshot.filter((r) => r.spec.byWritten);
  const rounds = doc.options['rounds'];
  if (bySize.length > 0) parts.push('', `Snapshot ops against the virtual size: milliseconds, median of ${rounds} rounds`, snapshotTable(bySize, markdown));
  if (byWritten.length > 0) parts.push('', `Snapshot ops against the written data: milliseconds, median of ${rounds} rounds`, snapshotTable(byWritten, markdown));
  if (doc.snapshot.length > 0) parts.push('', 'Fixed costs: milliseconds, median', startupTable(doc.snapshot, markdown));
  if (doc.vm.length > 0) parts.push('', `savevm / loadvm / delvm: milliseconds, median of ${doc.options['vmRounds']} rounds (guest RAM ${sizeLabel(Number(doc.options['ram']))}, ${doc.vm[0]?.vcpus} vCPUs running the workload)`, vmTable(doc.vm, markdown));
  if (doc.drain.length > 0) parts.push('', 'Drained sections (withBql + withDrained, empty body): microseconds', drainTables(doc.drain, markdown));
  for (const n of doc.notes) parts.push(`note: ${n}`);
  // Markdown: a blank line between a title and its table
  return markdown ? parts.join('\n').replace(/^([^|\n][^\n]*)\n\|/gm, '$1\n\n|') : parts.join('\n');
}

// --- main ---------------------------------------------------------------------------------------

/** @param {string} msg */
function usageFail(msg) {
  failUsage('bench/costs.js', 'npm run bench:costs', SPEC, msg);
}

async function main() {
  const a = readCommandLine('bench/costs.js', 'npm run bench:costs', SPEC);
  if (a === null) return;
  const markdown = a['markdown'] === true;
  if (a['from'] !== undefined) {
    const doc = /** @type {ResultsDoc} */ (JSON.parse(fs.readFileSync(String(a['from']), 'utf8')));
    process.stdout.write(`${renderText(doc, markdown)}\n`);
    return;
  }
  const quick = a['quick'] === true;
  const full = a['full'] === true;
  const rounds = Math.max(1, Math.round(/** @type {number | undefined} */ (a['rounds']) ?? (quick ? 1 : 5)));
  const vmRoundsN = Math.max(1, Math.round(/** @type {number | undefined} */ (a['vm-rounds']) ?? (quick ? 1 : 3)));
  const sections = new Set(String(a['sections']).split(',').map((s) => s.trim()).filter((s) => s !== ''));
  for (const s of sections) if (!SECTIONS.includes(s)) return usageFail(`--sections: unknown section '${s}' (${SECTIONS.join(', ')})`);
  const ram = /** @type {number | undefined} */ (a['ram']) ?? 64 * MiB;
  const vmRunMs = /** @type {number} */ (a['vm-run']);
  const vmAio = /** @type {Array<'threads' | 'sync'>} */ (String(a['vm-aio']).split(',').map((s) => s.trim()).filter((s) => s !== ''));
  for (const x of vmAio) if (x !== 'threads' && x !== 'sync') return usageFail(`--vm-aio: '${x}' is not threads or sync`);
  const drainRuntime = /** @type {number | undefined} */ (a['drain-runtime']) ?? (quick ? 0.5 : 4);
  const drainGap = /** @type {number} */ (a['drain-gap']);
  const drainSize = /** @type {number | undefined} */ (a['drain-size']) ?? (quick ? 64 * MiB : GiB);
  const iodepth = Math.max(1, Math.round(/** @type {number} */ (a['iodepth'])));
  const doProcess = a['process'] === true;
  if (!(drainRuntime > 0)) return usageFail('--drain-runtime must be > 0');
  const baseDir = path.resolve(/** @type {string | undefined} */ (a['dir']) ?? os.tmpdir());
  const outDir = path.resolve(/** @type {string | undefined} */ (a['out']) ?? path.join(HERE, 'results'));
  warnIfDistStale();

  const written = quick ? 16 * MiB : 256 * MiB;
  const specs = imageSpecs({
    written,
    sizes: [GiB, 64 * GiB, TiB],
    writtenList: quick ? [0, 16 * MiB, 64 * MiB] : full ? [0, 256 * MiB, GiB, 4 * GiB] : [0, 256 * MiB, GiB],
    writtenSize: 64 * GiB,
  });
  const qemu = spawnSync('qemu-img', ['--version'], { stdio: 'ignore' }).status === 0;
  /** @type {string[]} */
  const notes = [];
  if (!qemu) notes.push('qemu-img not found on the PATH (apt-get install qemu-utils): its columns are empty and the images are not checked');

  const dir = fs.mkdtempSync(path.join(baseDir, 'snapstack-costs-'));
  const cleanup = () => fs.rmSync(dir, { recursive: true, force: true });
  process.once('SIGINT', () => {
    cleanup();
    process.exit(130);
  });
  const startedAt = new Date();
  const t0 = now();
  /** @type {ResultsDoc} */
  const doc = {
    date: startedAt.toISOString(),
    command: ['npm run bench:costs', ...(process.argv.length > 2 ? ['--', ...process.argv.slice(2)] : [])].join(' '),
    machine: machineInfo(dir),
    options: { rounds, vmRounds: vmRoundsN, vmAio, full, quick, sections: [...sections], process: doProcess, ram, vmRunMs, drainRuntime, drainGap, drainSize, iodepth, written },
    wallSec: 0,
    snapshot: [],
    vm: [],
    drain: [],
    notes,
  };
  try {
    /** @param {ImageSpec} spec */
    const makeImage = async (spec) => {
      const free = fs.statfsSync(dir);
      if (free.bavail * free.bsize < spec.written + 2 * GiB) throw new Error(`not enough free space in ${dir} for a ${sizeLabel(spec.written)} image`);
      const file = path.join(dir, `${spec.key}.qcow2`);
      log(`${imageLabel(spec)}: writing...`);
      return { file, image: await prepareQcow2(spec, file) };
    };
    // the snapshot section first, for every image: the vm section leaves this process with more
    // memory mapped, which makes every fork (the timed processes) a few ms slower
    /** @type {Map<ImageSpec, string>} */
    const kept = new Map();
    if (sections.has('snapshot')) {
      for (const spec of specs) {
        if (!spec.bySize && !spec.byWritten) continue;
        const { file, image } = await makeImage(spec);
        log(`${imageLabel(spec)}: snapshot create/goto/delete, ${rounds} rounds...`);
        doc.snapshot.push(await snapshotRounds(spec, file, image, { rounds, process: doProcess, qemu }));
        if (sections.has('vm') && spec.vm) kept.set(spec, file);
        else fs.rmSync(file, { force: true });
      }
    }
    if (sections.has('vm')) {
      for (const spec of specs) {
        if (!spec.vm) continue;
        const file = kept.get(spec) ?? (await makeImage(spec)).file;
        for (const aio of vmAio) {
          log(`${imageLabel(spec)}: savevm/loadvm/delvm (aio=${aio}), ${vmRoundsN} rounds...`);
          doc.vm.push(await vmRounds(spec, file, aio, { rounds: vmRoundsN, ram, runMs: vmRunMs, qemu }));
        }
        fs.rmSync(file, { force: true });
      }
    }
    if (sections.has('drain')) {
      for (const driver of /** @type {const} */ (['raw', 'qcow2'])) {
        const file = path.join(dir, `drain.${driver}`);
        log(`drain: writing the ${sizeLabel(drainSize)} ${driver} image...`);
        await prepareImage(driver, file, drainSize);
        log(`drain: ${driver}, ${drainRuntime} s of sections under QD${iodepth}...`);
        doc.drain.push(await drainRun(driver, file, drainSize, { runtimeSec: drainRuntime, gapMs: drainGap, iodepth }));
        fs.rmSync(file, { force: true });
      }
    }
  } finally {
    await withBql((bql) => shutdownIOThreads(bql));
    cleanup();
  }
  for (const r of doc.snapshot) if (r.check !== 'clean' && qemu) notes.push(`${imageLabel(r.spec)}: ${r.check}`);
  doc.wallSec = (now() - t0) / 1000;
  fs.mkdirSync(outDir, { recursive: true });
  const jsonPath = path.join(outDir, `costs-${startedAt.toISOString().replace(/[:.]/g, '-')}.json`);
  fs.writeFileSync(jsonPath, `${JSON.stringify(doc, null, 2)}\n`);
  if (a['json'] === true) process.stdout.write(`${JSON.stringify(doc, null, 2)}\n`);
  else process.stdout.write(`${renderText(doc, markdown)}\nwrote ${path.relative(process.cwd(), jsonPath)}\n`);
}

await main();

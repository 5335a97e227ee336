// @ts-check
/**
 * The load generator behind `npm run bench` (bench/run.js) and the snapstack column of
 * `npm run bench:compare` (bench/compare.js): fio-like jobs through the library API (openImage,
 * img.read / img.write), in this process.
 *
 * One job: `iodepth` request loops ("slots") share one pattern (sequential: one cursor, offsets
 * issued in order; random: uniform over the whole bs-aligned region, with repetition like fio's
 * norandommap), each with its own buffer. Every request is timed with process.hrtime.bigint()
 * from just before the call to just after its promise settles (so at depth > 1 the latency
 * includes the time queued in the library), into a preallocated log-bucket histogram: the harness
 * allocates nothing per request beyond the two BigInt time stamps.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { createIOThread, createQcow2File, destroyIOThread, openImage, withBql, withBqlSync } from '../../dist/index.js';
import { LatencyHistogram } from './histogram.js';

/** @typedef {'read' | 'write' | 'randread' | 'randwrite' | 'randrw'} RwMode */
/** @typedef {'raw' | 'qcow2'} Driver */

export const RW_MODES = /** @type {const} */ (['read', 'write', 'randread', 'randwrite', 'randrw']);
export const DRIVERS = /** @type {const} */ (['raw', 'qcow2']);
export const DEFAULT_SIZE = 1024 ** 3;

/**
 * @typedef {object} BenchOptions
 * @property {Driver} driver image format
 * @property {RwMode} rw access pattern
 * @property {number} bs bytes per request
 * @property {number} iodepth requests in flight
 * @property {number} iothreads 0: the default pool; N > 0: N named IOThreads, one image node each
 * @property {'threads' | 'sync'} aio the file node's transfer mode
 * @property {number | undefined} size bytes of the image used (default: 1 GiB for a new image, all of an existing one)
 * @property {number} runtime measured seconds
 * @property {number} ramp seconds run before measuring (not counted)
 * @property {string | undefined} file image to use (default: a fresh one under os.tmpdir(), removed afterwards)
 * @property {number} rwmixread percentage of reads for randrw
 * @property {'shared' | 'plain'} buffers SharedArrayBuffer-backed buffers (moved without a copy) or ordinary ones (staged: one copy)
 * @property {boolean} fullyWritten the caller vouches that every block of `file` is allocated (as prepareImage leaves it)
 */

/**
 * @typedef {object} LatencySummary microseconds
 * @property {number} min
 * @property {number} mean
 * @property {number} p50
 * @property {number} p99
 * @property {number} p999
 * @property {number} max
 */

/**
 * @typedef {object} BenchResult
 * @property {'snapstack'} tool
 * @property {Driver} driver
 * @property {RwMode} rw
 * @property {number} bs
 * @property {number} iodepth
 * @property {number} iothreads
 * @property {'threads' | 'sync'} aio
 * @property {'shared' | 'plain'} buffers
 * @property {string} file
 * @property {boolean} fileCreated the image was made (and fully written) for this run
 * @property {number} size bytes of the region the requests cover
 * @property {number} runtime requested seconds
 * @property {number} ramp
 * @property {number} ops requests completed in the measured window
 * @property {number} reads
 * @property {number} writes
 * @property {number} bytes
 * @property {number} elapsedSec measured wall time
 * @property {number} iops
 * @property {number} mbps decimal MB (10^6 bytes) per second
 * @property {number} mibps MiB per second
 * @property {LatencySummary} latUs every request
 * @property {LatencySummary | null} readLatUs
 * @property {LatencySummary | null} writeLatUs
 * @property {{ userUs: number, systemUs: number, usPerOp: number, cores: number }} cpu whole process (main loop and worker threads) during the measured window
 */

/**
 * Fills in the defaults and checks the values.
 * @param {Partial<BenchOptions>} o
 * @returns {BenchOptions}
 */
export function normalizeOptions(o) {
  const r = {
    driver: o.driver ?? 'raw',
    rw: o.rw ?? 'randread',
    bs: o.bs ?? 4096,
    iodepth: o.iodepth ?? 1,
    iothreads: o.iothreads ?? 0,
    aio: o.aio ?? 'threads',
    size: o.size,
    runtime: o.runtime ?? 5,
    ramp: o.ramp ?? 0,
    file: o.file,
    rwmixread: o.rwmixread ?? 50,
    buffers: o.buffers ?? 'shared',
    fullyWritten: o.fullyWritten ?? false,
  };
  if (!DRIVERS.includes(r.driver)) throw new RangeError(`driver '${r.driver}': expected ${DRIVERS.join(' or ')}`);
  if (!RW_MODES.includes(r.rw)) throw new RangeError(`rw '${r.rw}': expected one of ${RW_MODES.join(', ')}`);
  if (!Number.isSafeInteger(r.bs) || r.bs <= 0) throw new RangeError(`bs ${r.bs}: expected a positive whole number of bytes`);
  if (!Number.isSafeInteger(r.iodepth) || r.iodepth < 1 || r.iodepth > 4096) throw new RangeError(`iodepth ${r.iodepth}: expected 1..4096`);
  if (!Number.isSafeInteger(r.iothreads) || r.iothreads < 0 || r.iothreads > 64) throw new RangeError(`iothreads ${r.iothreads}: expected 0..64`);
  if (r.aio !== 'threads' && r.aio !== 'sync') throw new RangeError(`aio '${r.aio}': expected threads or sync`);
  if (r.aio === 'sync' && r.iothreads > 0) throw new RangeError('aio=sync runs the transfers on the main loop: it cannot use --iothreads');
  if (!(r.runtime > 0)) throw new RangeError(`runtime ${r.runtime}: expected a positive number of seconds`);
  if (!(r.ramp >= 0)) throw new RangeError(`ramp ${r.ramp}: expected seconds >= 0`);
  if (!(r.rwmixread >= 0 && r.rwmixread <= 100)) throw new RangeError(`rwmixread ${r.rwmixread}: expected 0..100`);
  if (r.buffers !== 'shared' && r.buffers !== 'plain') throw new RangeError(`buffers '${r.buffers}': expected shared or plain`);
  if (r.size !== undefined && (!Number.isSafeInteger(r.size) || r.size < r.bs)) throw new RangeError(`size ${r.size}: expected at least one block of ${r.bs} bytes`);
  return r;
}

/** 1 MiB of pseudo-random bytes: written over the whole image so that every read hits real data. */
function fillChunk() {
  const chunk = new Uint8Array(1 << 20);
  crypto.randomFillSync(chunk);
  return chunk;
}

/**
 * Creates `file` as a `driver` image of `size` bytes and writes all of it (a raw file with
 * fs.writeSync; a qcow2 image through snapstack, so that every cluster is allocated).
 * @param {Driver} driver @param {string} file @param {number} size
 */
export async function prepareImage(driver, file, size) {
  const chunk = fillChunk();
  if (driver === 'raw') {
    const fd = fs.openSync(file, 'w');
    try {
      for (let off = 0; off < size; off += chunk.length) fs.writeSync(fd, chunk, 0, Math.min(chunk.length, size - off), off);
      fs.ftruncateSync(fd, size);
    } finally {
      fs.closeSync(fd);
    }
    return;
  }
  withBqlSync((bql) => createQcow2File(bql, file, { sizeBytes: size }));
  const img = await openImage(file, { format: 'qcow2', aio: 'sync' });
  try {
    for (let off = 0; off < size; off += chunk.length) await img.write(off, chunk.subarray(0, Math.min(chunk.length, size - off)));
  } finally {
    await img.close();
  }
}

/** Temporary directories made by runBenchmark and not yet removed (for a signal handler). */
export const liveTempDirs = new Set();

/** Removes every temporary directory still listed (synchronous: usable from a signal handler). */
export function removeTempDirs() {
  for (const d of liveTempDirs) fs.rmSync(d, { recursive: true, force: true });
  liveTempDirs.clear();
}

let runCounter = 0;

/**
 * @typedef {object} Progress
 * @property {'ramp' | 'run'} phase
 * @property {number} elapsedSec seconds into the phase
 * @property {number} ops requests completed in the measured window so far
 * @property {number} iops over the last interval
 */

/**
 * Runs one job and returns its figures.
 * @param {Partial<BenchOptions>} options
 * @param {{ onProgress?: (p: Progress) => void, progressIntervalMs?: number }} [hooks]
 * @returns {Promise<BenchResult>}
 */
export async function runBenchmark(options, hooks = {}) {
  const o = normalizeOptions(options);
  let file = o.file;
  let tempDir = null;
  let fileCreated = false;
  if (file === undefined) {
    tempDir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-bench-'));
    liveTempDirs.add(tempDir);
    file = path.join(tempDir, `bench.${o.driver}`);
  }
  try {
    if (!fs.existsSync(file)) {
      await prepareImage(o.driver, file, o.size ?? DEFAULT_SIZE);
      fileCreated = true;
    }
    return await runOnFile(o, file, fileCreated, hooks);
  } finally {
    if (tempDir !== null) {
      fs.rmSync(tempDir, { recursive: true, force: true });
      liveTempDirs.delete(tempDir);
    }
  }
}

/**
 * @param {BenchOptions} o @param {string} file @param {boolean} fileCreated
 * @param {{ onProgress?: (p: Progress) => void, progressIntervalMs?: number }} hooks
 * @returns {Promise<BenchResult>}
 */
async function runOnFile(o, file, fileCreated, hooks) {
  const writes = o.rw === 'write' || o.rw === 'randwrite' || (o.rw === 'randrw' && o.rwmixread < 100);
  if (writes && o.driver === 'qcow2' && o.iothreads > 1 && !fileCreated && !o.fullyWritten) {
    // N qcow2 nodes on one file each keep their own metadata: safe only while no write allocates,
    // which holds for an image this run wrote in full, not for one given with --file.
    throw new RangeError('qcow2 with --iothreads > 1 opens one node per IOThread on the same file: writes are refused on a --file image, which may have unallocated clusters (use --iothreads 0 or 1, or let the bench create the image)');
  }
  const run = ++runCounter;
  /** @type {import('../../dist/index.js').IOThread[]} */
  const threads = [];
  /** @type {import('../../dist/index.js').Image[]} */
  const images = [];
  try {
    if (o.iothreads > 0) {
      await withBql((bql) => {
        for (let i = 0; i < o.iothreads; i++) threads.push(createIOThread(bql, `bench-r${run}-io${i}`));
      });
    }
    const nodes = Math.max(1, o.iothreads);
    for (let i = 0; i < nodes; i++) {
      const t = threads[i];
      images.push(
        await openImage(file, {
          format: o.driver,
          readOnly: !writes,
          aio: o.aio,
          name: `bench-r${run}-${i}`,
          ...(t === undefined ? {} : { iothread: t.id }),
          // the extra nodes on the same file share it on purpose: the image lock would refuse them
          ...(i > 0 ? { locking: 'off' } : {}),
        }),
      );
    }
    const imageSize = /** @type {import('../../dist/index.js').Image} */ (images[0]).size;
    const size = Math.min(o.size ?? imageSize, imageSize);
    if (size < o.bs) throw new RangeError(`image ${file} holds ${imageSize} bytes: less than one ${o.bs}-byte block`);
    const m = await drive(o, images, size, hooks);
    return { tool: 'snapstack', driver: o.driver, rw: o.rw, bs: o.bs, iodepth: o.iodepth, iothreads: o.iothreads, aio: o.aio, buffers: o.buffers, file, fileCreated, size, runtime: o.runtime, ramp: o.ramp, ...m };
  } finally {
    for (const img of images) await img.close();
    if (threads.length > 0) {
      await withBql(async (bql) => {
        for (const t of threads) await destroyIOThread(bql, t);
      });
    }
  }
}

/** @param {LatencyHistogram} h @returns {LatencySummary} */
function summarize(h) {
  const us = (/** @type {number} */ ns) => Math.round(ns) / 1000;
  return { min: us(h.min), mean: us(h.mean), p50: us(h.percentile(50)), p99: us(h.percentile(99)), p999: us(h.percentile(99.9)), max: us(h.max) };
}

const FAR_FUTURE = 1n << 62n;

/**
 * The request loops.
 * @param {BenchOptions} o
 * @param {import('../../dist/index.js').Image[]} images
 * @param {number} size
 * @param {{ onProgress?: (p: Progress) => void, progressIntervalMs?: number }} hooks
 */
async function drive(o, images, size, hooks) {
  const bs = o.bs;
  const blocks = Math.floor(size / bs);
  const random = o.rw === 'randread' || o.rw === 'randwrite' || o.rw === 'randrw';
  const mode = o.rw === 'read' || o.rw === 'randread' ? 0 : o.rw === 'randrw' ? 2 : 1; // 0 read, 1 write, 2 mixed
  const readFraction = o.rwmixread / 100;
  const readHist = new LatencyHistogram();
  const writeHist = new LatencyHistogram();
  /** @type {Uint8Array[]} */
  const bufs = [];
  for (let k = 0; k < o.iodepth; k++) {
    const buf = o.buffers === 'shared' ? new Uint8Array(new SharedArrayBuffer(bs)) : new Uint8Array(bs);
    crypto.randomFillSync(buf);
    bufs.push(buf);
  }

  const onProgress = hooks.onProgress;
  const progressNs = BigInt(Math.round((hooks.progressIntervalMs ?? 1000) * 1e6));
  const startNs = process.hrtime.bigint();
  let recording = o.ramp <= 0;
  let recordStartNs = startNs;
  let deadlineNs = recording ? startNs + BigInt(Math.round(o.runtime * 1e9)) : FAR_FUTURE;
  const rampEndNs = startNs + BigInt(Math.round(o.ramp * 1e9));
  let cpuStart = process.cpuUsage();
  let nextProgressNs = onProgress === undefined ? FAR_FUTURE : startNs + progressNs;
  let lastProgressNs = startNs;
  let lastProgressOps = 0;
  let ops = 0;
  let reads = 0;
  let rampOps = 0;
  let cursor = 0;
  let failed = false;

  /** @param {bigint} now */
  const progress = (now) => {
    nextProgressNs = now + progressNs;
    const done = recording ? ops : rampOps;
    const dt = Number(now - lastProgressNs) / 1e9;
    const iops = dt > 0 ? (done - lastProgressOps) / dt : 0;
    lastProgressNs = now;
    lastProgressOps = done;
    onProgress?.({ phase: recording ? 'run' : 'ramp', elapsedSec: Number(now - (recording ? recordStartNs : startNs)) / 1e9, ops, iops });
  };

  /** @param {number} k */
  const slot = async (k) => {
    const img = /** @type {import('../../dist/index.js').Image} */ (images[k % images.length]);
    const buf = /** @type {Uint8Array} */ (bufs[k]);
    try {
      while (!failed) {
        let offset;
        if (random) offset = Math.floor(Math.random() * blocks) * bs;
        else {
          offset = cursor * bs;
          cursor = cursor + 1 === blocks ? 0 : cursor + 1;
        }
        const isRead = mode === 0 || (mode === 2 && Math.random() < readFraction);
        const t0 = process.hrtime.bigint();
        if (isRead) await img.read(offset, bs, buf);
        else await img.write(offset, buf);
        const t1 = process.hrtime.bigint();
        if (recording) {
          if (isRead) {
            readHist.record(Number(t1 - t0));
            reads++;
          } else writeHist.record(Number(t1 - t0));
          ops++;
        } else {
          rampOps++;
          if (t1 >= rampEndNs) {
            // the measured window starts now, for every slot
            recording = true;
            recordStartNs = t1;
            deadlineNs = t1 + BigInt(Math.round(o.runtime * 1e9));
            cpuStart = process.cpuUsage();
            lastProgressOps = 0;
            lastProgressNs = t1;
            if (onProgress !== undefined) nextProgressNs = t1 + progressNs;
          }
        }
        if (t1 >= nextProgressNs) progress(t1);
        if (t1 >= deadlineNs) break;
      }
    } catch (e) {
      failed = true;
      throw e;
    }
  };
  const loops = [];
  for (let k = 0; k < o.iodepth; k++) loops.push(slot(k));
  await Promise.all(loops);
  const endNs = process.hrtime.bigint();
  const cpu = process.cpuUsage(cpuStart);
  const elapsedSec = Number(endNs - recordStartNs) / 1e9;
  const all = new LatencyHistogram();
  all.merge(readHist);
  all.merge(writeHist);
  const bytes = ops * bs;
  return {
    ops,
    reads,
    writes: ops - reads,
    bytes,
    elapsedSec,
    iops: ops / elapsedSec,
    mbps: bytes / 1e6 / elapsedSec,
    mibps: bytes / 2 ** 20 / elapsedSec,
    latUs: summarize(all),
    readLatUs: readHist.count > 0 ? summarize(readHist) : null,
    writeLatUs: writeHist.count > 0 ? summarize(writeHist) : null,
    cpu: { userUs: cpu.user, systemUs: cpu.system, usPerOp: ops > 0 ? (cpu.user + cpu.system) / ops : NaN, cores: (cpu.user + cpu.system) / 1e6 / elapsedSec },
  };
}

/**
 * Warns (once per process, on stderr) when dist/ is older than a source file: the bench imports
 * the built library, so a stale build measures old code.
 */
export function warnIfDistStale() {
  const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
  const distIndex = path.join(root, 'dist', 'index.js');
  let built;
  try {
    built = fs.statSync(distIndex).mtimeMs;
  } catch {
    return;
  }
  /** @param {string} dir @returns {string | null} */
  const newer = (dir) => {
    for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
      const p = path.join(dir, e.name);
      if (e.isDirectory()) {
        const n = newer(p);
        if (n !== null) return n;
      } else if (/\.(ts|js)$/.test(e.name) && !/\.test\.ts$/.test(e.name) && fs.statSync(p).mtimeMs > built) return p;
    }
    return null;
  };
  const stale = newer(path.join(root, 'src'));
  if (stale !== null) process.stderr.write(`warning: ${path.relative(root, stale)} is newer than dist/: run \`npm run build\` first, or this measures the old code\n`);
}

// @ts-check
/**
 * The body of an I/O worker: serves one request ring (iothread-ring.js) with synchronous syscalls
 * (pread, pwrite, fdatasync, ftruncate), straight into and out of shared memory. The transfers
 * themselves are sync-transfer.js, which the `file` driver's aio=sync path uses too.
 *
 * Runs on a worker thread as a piscina task that serves the ring while requests keep coming,
 * never on the main loop.
 * It touches no block-layer state: the main loop decided everything (file, offset, memory) and
 * this code only moves bytes and reports, per request, the byte count or a negative errno in the
 * request's slot. Requests run in ring order.
 */
import fs from 'node:fs';
import os from 'node:os';
import { receiveMessageOnPort } from 'node:worker_threads';
import {
  CTL_DONE,
  CTL_HEAD,
  CTL_MAIN_WAITING,
  CTL_REGION_SEQ,
  CTL_STOP,
  CTL_WORKER_STATE,
  OP_FDATASYNC,
  OP_READ,
  OP_TRUNCATE,
  OP_WRITE,
  OP_WRITE_ZEROES,
  RING_SLOTS,
  SLOT_BUF_OFFSET,
  SLOT_FD,
  SLOT_LENGTH,
  SLOT_OP,
  SLOT_POSITION,
  SLOT_REGION,
  SLOT_RESULT,
  SLOT_STRIDE,
  WORKER_ACTIVE,
  WORKER_IDLE,
  WORKER_SLEEPING,
  WORKER_SLEEP_MS,
  pollWhileEqual,
} from './iothread-ring.js';
import { readFullySync, writeFullySync, writeZeroesSync } from './sync-transfer.js';

/**
 * @param {unknown} e
 * @returns {number} a negative errno
 */
function negErrno(e) {
  if (typeof e === 'object' && e !== null && 'errno' in e && typeof e.errno === 'number') {
    return e.errno < 0 ? e.errno : -e.errno;
  }
  if (typeof e === 'object' && e !== null && 'code' in e && typeof e.code === 'string') {
    const n = /** @type {Record<string, number>} */ (os.constants.errno)[e.code];
    if (typeof n === 'number') return -n;
  }
  return -5; // EIO
}

/**
 * Runs the request in the slot at `s`; returns its result (bytes or a negative errno).
 * @param {Float64Array} ops
 * @param {number} s
 * @param {Map<number, Uint8Array>} regions
 */
function runRequest(ops, s, regions) {
  const op = ops[s + SLOT_OP] ?? 0;
  const fd = ops[s + SLOT_FD] ?? 0;
  const len = ops[s + SLOT_LENGTH] ?? 0;
  const pos = ops[s + SLOT_POSITION] ?? 0;
  try {
    switch (op) {
      case OP_READ:
      case OP_WRITE: {
        const mem = regions.get(ops[s + SLOT_REGION] ?? -1);
        if (mem === undefined) return -14; // EFAULT: a region the main loop never registered
        const off = ops[s + SLOT_BUF_OFFSET] ?? 0;
        return op === OP_READ ? readFullySync(fd, mem, off, len, pos) : writeFullySync(fd, mem, off, len, pos);
      }
      case OP_WRITE_ZEROES:
        return writeZeroesSync(fd, len, pos);
      case OP_FDATASYNC:
        fs.fdatasyncSync(fd);
        return 0;
      case OP_TRUNCATE:
        fs.ftruncateSync(fd, pos);
        return 0;
      default:
        return -22; // EINVAL
    }
  } catch (e) {
    return negErrno(e);
  }
}

/** @type {Map<number, Uint8Array>} registered shared memory regions by id (kept across serve tasks) */
const regions = new Map();
/** @type {import('node:worker_threads').MessagePort | null} the channel to the main loop (regions in, wake-ups out), sent with the first task */
let regionPort = null;
let regionSeq = 0;

/** Applies the region messages posted so far: `[id, SharedArrayBuffer]` pairs to map, ids to drop. */
function receiveRegions() {
  if (regionPort === null) return;
  for (let m = receiveMessageOnPort(regionPort); m !== undefined; m = receiveMessageOnPort(regionPort)) {
    const msg = /** @type {{ add: Array<[number, SharedArrayBuffer]>, drop: number[] }} */ (m.message);
    for (const [id, sab] of msg.add) regions.set(id, new Uint8Array(sab));
    for (const id of msg.drop) regions.delete(id);
  }
}

/**
 * Waits for a request after an idle poll window: sleeps on HEAD for up to WORKER_SLEEP_MS, then
 * gives the ring up. Returns false when a request arrived and this task still serves the ring,
 * true when the task must return (see WORKER_STATE in iothread-ring.js).
 * @param {Int32Array} ctl
 * @param {number} done
 */
function sleepOrPark(ctl, done) {
  if (Atomics.load(ctl, CTL_STOP) === 0) {
    Atomics.store(ctl, CTL_WORKER_STATE, WORKER_SLEEPING);
    Atomics.wait(ctl, CTL_HEAD, done, WORKER_SLEEP_MS);
    Atomics.store(ctl, CTL_WORKER_STATE, WORKER_ACTIVE);
    if (Atomics.load(ctl, CTL_HEAD) !== done) return false;
  }
  Atomics.store(ctl, CTL_WORKER_STATE, WORKER_IDLE);
  if (Atomics.load(ctl, CTL_HEAD) === done || Atomics.load(ctl, CTL_STOP) !== 0) return true;
  // a request came in meanwhile: keep serving unless the main loop already claimed the ring
  return Atomics.compareExchange(ctl, CTL_WORKER_STATE, WORKER_IDLE, WORKER_ACTIVE) !== WORKER_IDLE;
}

/**
 * Serves the ring until it has been empty for the poll window and the sleep after it (or CTL_STOP
 * is set). Requests run in ring order.
 * @param {{ ctl: SharedArrayBuffer, ops: SharedArrayBuffer, port: import('node:worker_threads').MessagePort | null, pollMaxNs: number }} task
 */
export default function serve(task) {
  const ctl = new Int32Array(task.ctl);
  const ops = new Float64Array(task.ops);
  if (task.port !== null) {
    regionPort = task.port;
    regions.clear();
    regionSeq = 0;
  }
  Atomics.store(ctl, CTL_WORKER_STATE, WORKER_ACTIVE);
  let done = Atomics.load(ctl, CTL_DONE);
  for (;;) {
    let head = Atomics.load(ctl, CTL_HEAD);
    if (head === done) {
      if (Atomics.load(ctl, CTL_STOP) !== 0 || !pollWhileEqual(ctl, CTL_HEAD, done, task.pollMaxNs)) {
        if (sleepOrPark(ctl, done)) return;
      }
      head = Atomics.load(ctl, CTL_HEAD);
    }
    while (done !== head) {
      // a request may name a region posted just before it was published
      const seq = Atomics.load(ctl, CTL_REGION_SEQ);
      if (seq !== regionSeq) {
        receiveRegions();
        regionSeq = seq;
      }
      const s = (done & (RING_SLOTS - 1)) * SLOT_STRIDE;
      ops[s + SLOT_RESULT] = runRequest(ops, s, regions);
      done = (done + 1) | 0;
      Atomics.store(ctl, CTL_DONE, done);
      if (Atomics.load(ctl, CTL_MAIN_WAITING) !== 0 && Atomics.exchange(ctl, CTL_MAIN_WAITING, 0) !== 0) {
        regionPort?.postMessage(0); // wakes the main loop (see iothread-ring.js)
      }
    }
  }
}

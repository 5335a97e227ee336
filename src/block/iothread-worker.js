// @ts-check
/**
 * The body of an IOThread worker: runs a batch of blocking transfers (pread, pwrite, fdatasync,
 * ftruncate) with synchronous syscalls, straight into and out of shared memory.
 *
 * Runs on a worker thread, never on the main loop. It touches no block-layer state: the main loop
 * decided everything (file, offset, memory) and this code only moves bytes and reports, per
 * request, the byte count or a negative errno in the descriptor slot it was given.
 *
 * Descriptor layout (Float64Array, OPS_STRIDE numbers per request) must match iothread.ts:
 *   [op, fd, region, bufOffset, length, position]; the worker writes the result into `position`'s
 *   neighbour slot RESULT.
 */
import fs from 'node:fs';
import os from 'node:os';

const OPS_STRIDE = 7;
const OP_READ = 1;
const OP_WRITE = 2;
const OP_WRITE_ZEROES = 3;
const OP_FDATASYNC = 4;
const OP_TRUNCATE = 5;
const RESULT = 6;

/** Zeros for write-zeroes requests, reused for every request. */
const ZERO_CHUNK = new Uint8Array(1 << 20);

/** @type {Map<number, Uint8Array>} registered shared memory regions by id */
const regions = new Map();

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
 * @param {number} fd
 * @param {Uint8Array} mem
 * @param {number} off
 * @param {number} len
 * @param {number} pos
 */
function readFully(fd, mem, off, len, pos) {
  let done = 0;
  while (done < len) {
    const n = fs.readSync(fd, mem, off + done, len - done, pos + done);
    if (n === 0) {
      // past the end of the file: a protocol node reads zeros there
      mem.fill(0, off + done, off + len);
      break;
    }
    done += n;
  }
  return len;
}

/**
 * @param {number} fd
 * @param {Uint8Array} mem
 * @param {number} off
 * @param {number} len
 * @param {number} pos
 */
function writeFully(fd, mem, off, len, pos) {
  let done = 0;
  while (done < len) done += fs.writeSync(fd, mem, off + done, len - done, pos + done);
  return len;
}

/**
 * @param {number} fd
 * @param {number} len
 * @param {number} pos
 */
function writeZeroes(fd, len, pos) {
  let done = 0;
  while (done < len) {
    const n = Math.min(len - done, ZERO_CHUNK.length);
    writeFully(fd, ZERO_CHUNK, 0, n, pos + done);
    done += n;
  }
  return len;
}

/**
 * Runs one batch. Returns the number of requests done (all of them: errors are per request).
 * @param {{ ops: Float64Array, count: number, staging: SharedArrayBuffer | null,
 *           newRegions: Array<[number, SharedArrayBuffer]> | null, deadRegions: number[] | null }} batch
 */
export default function runBatch(batch) {
  if (batch.newRegions !== null) for (const [id, sab] of batch.newRegions) regions.set(id, new Uint8Array(sab));
  if (batch.deadRegions !== null) for (const id of batch.deadRegions) regions.delete(id);
  const staging = batch.staging === null ? null : new Uint8Array(batch.staging);
  const ops = batch.ops;
  for (let i = 0; i < batch.count; i++) {
    const base = i * OPS_STRIDE;
    const op = ops[base] ?? 0;
    const fd = ops[base + 1] ?? 0;
    const region = ops[base + 2] ?? 0;
    const off = ops[base + 3] ?? 0;
    const len = ops[base + 4] ?? 0;
    const pos = ops[base + 5] ?? 0;
    try {
      const mem = region < 0 ? staging : regions.get(region);
      switch (op) {
        case OP_READ:
          if (!mem) throw Object.assign(new Error('unknown memory region'), { errno: -14 });
          ops[base + RESULT] = readFully(fd, mem, off, len, pos);
          break;
        case OP_WRITE:
          if (!mem) throw Object.assign(new Error('unknown memory region'), { errno: -14 });
          ops[base + RESULT] = writeFully(fd, mem, off, len, pos);
          break;
        case OP_WRITE_ZEROES:
          ops[base + RESULT] = writeZeroes(fd, len, pos);
          break;
        case OP_FDATASYNC:
          fs.fdatasyncSync(fd);
          ops[base + RESULT] = 0;
          break;
        case OP_TRUNCATE:
          fs.ftruncateSync(fd, pos);
          ops[base + RESULT] = 0;
          break;
        default:
          ops[base + RESULT] = -22; // EINVAL
      }
    } catch (e) {
      ops[base + RESULT] = negErrno(e);
    }
  }
  return batch.count;
}

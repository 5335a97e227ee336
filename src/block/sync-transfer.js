// @ts-check
/**
 * The synchronous transfers of a host file: read fully (zeros past the end), write fully, write
 * zeros from one reused buffer. One copy of them serves both the IOThread workers
 * (iothread-worker.js, on a worker thread) and the `file` driver's aio=sync path (on the main
 * loop), so the two cannot drift apart.
 *
 * I/O code: blocking syscalls only, no block-layer state; each function returns the byte count
 * and throws Node's system error, which the caller maps (the worker to a negative errno, the
 * driver to a BlockError).
 */
import fs from 'node:fs';

/** Zeros for write-zeroes, one buffer per thread that loads this module. */
const ZERO_CHUNK = new Uint8Array(1 << 20);

/**
 * Reads `len` bytes at file position `pos` into `mem[off..off+len)`; zeros past the end of the file.
 * @locking io
 * @param {number} fd
 * @param {Uint8Array} mem
 * @param {number} off
 * @param {number} len
 * @param {number} pos
 * @returns {number}
 */
export function readFullySync(fd, mem, off, len, pos) {
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
 * Writes `mem[off..off+len)` at file position `pos`, looping over short writes.
 * @locking io
 * @param {number} fd
 * @param {Uint8Array} mem
 * @param {number} off
 * @param {number} len
 * @param {number} pos
 * @returns {number}
 */
export function writeFullySync(fd, mem, off, len, pos) {
  let done = 0;
  while (done < len) done += fs.writeSync(fd, mem, off + done, len - done, pos + done);
  return len;
}

/**
 * Writes `len` zero bytes at file position `pos` from a reused buffer.
 * @locking io
 * @param {number} fd
 * @param {number} len
 * @param {number} pos
 * @returns {number}
 */
export function writeZeroesSync(fd, len, pos) {
  let done = 0;
  while (done < len) {
    const n = Math.min(len - done, ZERO_CHUNK.length);
    writeFullySync(fd, ZERO_CHUNK, 0, n, pos + done);
    done += n;
  }
  return len;
}

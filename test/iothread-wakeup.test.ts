/**
 * Lost wake-ups in the request ring (src/block/iothread-ring.js): each side that sleeps stores its
 * state word, the other side publishes and then reads that word and wakes it. With polling off,
 * every request must wake the worker sleeping on HEAD and every completion must post the main
 * loop's wake-up; a lost one stalls a request for WORKER_SLEEP_MS (the worker) or for ever (the
 * main loop), which over thousands of requests the per-test timeout turns into a failure. The
 * requests come one at a time and several at once, with pauses that let either side fall asleep
 * at any point.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { withBql } from '../src/block/bql.js';
import { createIOThread, destroyIOThread, submitRead, submitWrite, type IOThread, type IOThreadOptions } from '../src/block/iothread.js';

let dir: string;
let fd: number;
const FILE_BYTES = 1 << 20;

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-iothread-wakeup-'));
  const file = path.join(dir, 'ring.img');
  const data = Buffer.alloc(FILE_BYTES);
  for (let i = 0; i < FILE_BYTES; i += 4) data.writeUInt32LE(i, i);
  fs.writeFileSync(file, data);
  fd = fs.openSync(file, 'r+');
});

afterAll(() => {
  fs.closeSync(fd);
  fs.rmSync(dir, { recursive: true, force: true });
});

let counter = 0;

async function withThread(options: IOThreadOptions, body: (t: IOThread) => Promise<void>): Promise<void> {
  const t = await withBql((bql) => createIOThread(bql, `wake${counter++}`, options));
  try {
    await body(t);
  } finally {
    await withBql((bql) => destroyIOThread(bql, t));
  }
}

/** A deterministic pseudo-random sequence (so that a failure repeats). */
function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x / 2 ** 32;
  };
}

/** A pause of one of several kinds, or none: lets the other side poll, fall asleep, or give its task up. */
async function pause(r: () => number): Promise<void> {
  const k = r();
  if (k < 0.5) return;
  if (k < 0.7) return new Promise((resolve) => setImmediate(resolve));
  if (k < 0.9) {
    const end = performance.now() + r() * 0.1; // a busy main loop: up to 100 µs
    while (performance.now() < end);
    return;
  }
  return new Promise((resolve) => setTimeout(resolve, 1));
}

/** Reads 4 KiB at a random 4-byte-aligned offset and checks it. */
async function checkedRead(t: IOThread, r: () => number, buf: Uint8Array): Promise<void> {
  const pos = Math.floor(r() * (FILE_BYTES / 4 - buf.length / 4)) * 4;
  const n = await submitRead(t, fd, buf, pos, 'stress read');
  expect(n).toBe(buf.length);
  const v = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  if (v.getUint32(0, true) !== pos || v.getUint32(buf.length - 4, true) !== pos + buf.length - 4) {
    throw new Error(`read at ${pos} returned the wrong bytes`);
  }
}


describe('the request ring wakes each sleeping side (no lost wake-up)', () => {
  it('the worker never polls: each request must wake it on HEAD; the main loop waits for a message', { timeout: 20_000 }, async () => {
    await withThread({ pollMaxNs: 0 }, async (t) => {
      const r = rng(1);
      const buf = new Uint8Array(new SharedArrayBuffer(4096));
      for (let i = 0; i < 3000; i++) {
        await checkedRead(t, r, buf);
        await pause(r);
      }
    });
  });

  it('several requests in flight, staged and shared buffers, polling off, pauses anywhere: all complete', { timeout: 20_000 }, async () => {
    await withThread({ pollMaxNs: 0 }, async (t) => {
      const loops = Array.from({ length: 4 }, async (_, k) => {
        const r = rng(10 + k);
        const buf = k % 2 === 0 ? new Uint8Array(new SharedArrayBuffer(4096)) : new Uint8Array(4096);
        for (let i = 0; i < 800; i++) {
          await checkedRead(t, r, buf);
          await pause(r);
        }
      });
      await Promise.all(loops);
    });
  });

  it('the default poll window, writes and reads mixed, pauses anywhere: all complete', { timeout: 20_000 }, async () => {
    await withThread({}, async (t) => {
      const r = rng(3);
      const w = new Uint8Array(new SharedArrayBuffer(4096));
      const buf = new Uint8Array(new SharedArrayBuffer(4096));
      const v = new DataView(w.buffer);
      for (let i = 0; i < 2000; i++) {
        // rewrite a block with the bytes it already holds, so the reads keep checking
        const pos = Math.floor(r() * (FILE_BYTES / 4096)) * 4096;
        for (let j = 0; j < 4096; j += 4) v.setUint32(j, pos + j, true);
        expect(await submitWrite(t, fd, w, pos, 'stress write')).toBe(4096);
        await pause(r);
        await checkedRead(t, r, buf);
        await pause(r);
      }
    });
  });
});

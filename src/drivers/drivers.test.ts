import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { withBql, withBqlSync } from '../block/bql.js';
import { BlockError } from '../block/errors.js';
import { closeNode, listNodes, openNode } from '../block/graph.js';
import { bdrvFlush, bdrvGetLength, bdrvPdiscard, bdrvPread, bdrvPwrite, bdrvPwriteZeroes, bdrvTruncate } from '../block/io.js';
import { shutdownIOThreads } from '../block/iothread.js';
import type { BlockNode } from '../block/node.js';
import type { NodeOptions } from '../block/options.js';
import { createRawFile } from './index.js';

const MiB = 1024 * 1024;
let dir: string;
let fileCounter = 0;
const opened: BlockNode[] = [];

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-drivers-'));
});

afterEach(async () => {
  await withBql(async (bql) => {
    for (const node of opened.splice(0).reverse()) await closeNode(bql, node);
  });
});

afterAll(async () => {
  await withBql((bql) => shutdownIOThreads(bql));
  fs.rmSync(dir, { recursive: true, force: true });
});

/** Opens a node under the BQL and closes it after the test. */
async function open(options: NodeOptions | string): Promise<BlockNode> {
  const node = await withBql((bql) => openNode(bql, options));
  opened.push(node);
  return node;
}

/** A new host file of `size` bytes holding `fill` (or sparse zeros). */
function tempFile(size: number, fill?: (i: number) => number): string {
  const p = path.join(dir, `disk${fileCounter++}.img`);
  if (fill === undefined) withBqlSync((bql) => createRawFile(bql, p, size));
  else fs.writeFileSync(p, Uint8Array.from({ length: size }, (_, i) => fill(i)));
  return p;
}

function pattern(length: number, seed: number): Uint8Array {
  return Uint8Array.from({ length }, (_, i) => (i * 31 + seed) & 0xff);
}

async function readBack(node: BlockNode, offset: number, length: number, fill = 0xee): Promise<Uint8Array> {
  const buf = new Uint8Array(length).fill(fill);
  await bdrvPread(node, offset, buf);
  return buf;
}

async function rejection(p: Promise<unknown>): Promise<BlockError> {
  try {
    await p;
  } catch (e) {
    expect(e).toBeInstanceOf(BlockError);
    return e as BlockError;
  }
  throw new Error('expected the promise to reject with a BlockError');
}

function isZero(buf: Uint8Array): boolean {
  return buf.every((b) => b === 0);
}

/** Compares bytes quickly (toEqual is slow on megabytes); names the first differing offset. */
function expectBytes(actual: Uint8Array, expected: Uint8Array): void {
  expect(actual.length).toBe(expected.length);
  const a = Buffer.from(actual.buffer, actual.byteOffset, actual.length);
  const b = Buffer.from(expected.buffer, expected.byteOffset, expected.length);
  if (!a.equals(b)) {
    const at = a.findIndex((v, i) => v !== b[i]);
    expect.fail(`bytes differ first at offset ${at}: ${a[at]} != ${b[at]}`);
  }
}

describe('memory driver', () => {
  it('opens a node of the given size', async () => {
    const node = await open('driver=memory,size=1M');
    expect(node.driver.formatName).toBe('memory');
    expect(node.driver.kind).toBe('protocol');
    expect(bdrvGetLength(node)).toBe(MiB);
    expect(node.readOnly).toBe(false);
    expect(node.children).toEqual([]);
  });

  it('refuses a memory node without a size, with EINVAL', async () => {
    const err = await rejection(withBql((bql) => openNode(bql, 'driver=memory')));
    expect(err.code).toBe('EINVAL');
    expect(err.field).toBe('size');
  });

  it('reads zeros where nothing was written', async () => {
    const node = await open('driver=memory,size=1M');
    expect(isZero(await readBack(node, 0, 4096))).toBe(true);
    expect(isZero(await readBack(node, MiB - 512, 512))).toBe(true);
  });

  it('reads back what was written, and leaves the bytes around it alone', async () => {
    const node = await open('driver=memory,size=1M');
    const data = pattern(1000, 7);
    await bdrvPwrite(node, 5000, data);
    expect(await readBack(node, 5000, 1000)).toEqual(data);
    const around = await readBack(node, 4000, 3000);
    expect(isZero(around.subarray(0, 1000))).toBe(true);
    expect(around.subarray(1000, 2000)).toEqual(data);
    expect(isZero(around.subarray(2000))).toBe(true);
  });

  it('reads and writes across a 1 MiB chunk boundary', async () => {
    const node = await open('driver=memory,size=4M');
    const data = pattern(8192, 3);
    await bdrvPwrite(node, MiB - 4096, data);
    expectBytes(await readBack(node, MiB - 4096, 8192), data);
    expectBytes(await readBack(node, MiB, 4096), data.subarray(4096));
  });

  it('grows when written past its end and reads zeros past its end', async () => {
    const node = await open('driver=memory,size=1M');
    expect(isZero(await readBack(node, MiB + 100, 100))).toBe(true);
    const data = pattern(512, 1);
    await bdrvPwrite(node, MiB + 512, data);
    expect(bdrvGetLength(node)).toBe(MiB + 1024);
    expect(await readBack(node, MiB + 512, 512)).toEqual(data);
  });

  it('makes write-zeroes ranges read as zeros, partial and whole chunks alike', async () => {
    const node = await open('driver=memory,size=3M');
    const data = pattern(3 * MiB, 9);
    await bdrvPwrite(node, 0, data);
    await bdrvPwriteZeroes(node, 100, 200);
    await bdrvPwriteZeroes(node, MiB, MiB);
    const back = await readBack(node, 0, 3 * MiB);
    expectBytes(back.subarray(0, 100), data.subarray(0, 100));
    expect(isZero(back.subarray(100, 300))).toBe(true);
    expectBytes(back.subarray(300, MiB), data.subarray(300, MiB));
    expect(isZero(back.subarray(MiB, 2 * MiB))).toBe(true);
    expectBytes(back.subarray(2 * MiB), data.subarray(2 * MiB));
    expect(bdrvGetLength(node)).toBe(3 * MiB);
  });

  it('frees whole discarded chunks (they read as zeros) and keeps partially discarded data', async () => {
    const node = await open('driver=memory,size=2M');
    const data = pattern(2 * MiB, 5);
    await bdrvPwrite(node, 0, data);
    expect(node.drv.formatSpecific?.()).toEqual({ allocatedBytes: 2 * MiB });
    await bdrvPdiscard(node, 0, MiB);
    await bdrvPdiscard(node, MiB + 10, 20);
    expect(node.drv.formatSpecific?.()).toEqual({ allocatedBytes: MiB });
    expect(isZero(await readBack(node, 0, MiB))).toBe(true);
    expectBytes(await readBack(node, MiB, MiB), data.subarray(MiB));
    expect(bdrvGetLength(node)).toBe(2 * MiB);
  });

  it('reads zeros in the regrown part after shrinking and growing again', async () => {
    const node = await open('driver=memory,size=3M');
    const data = pattern(3 * MiB, 11);
    await bdrvPwrite(node, 0, data);
    const cut = MiB + 12345;
    await bdrvTruncate(node, cut);
    expect(bdrvGetLength(node)).toBe(cut);
    expectBytes(await readBack(node, 0, cut), data.subarray(0, cut));
    await bdrvTruncate(node, 3 * MiB);
    expect(bdrvGetLength(node)).toBe(3 * MiB);
    expectBytes(await readBack(node, 0, cut), data.subarray(0, cut));
    expect(isZero(await readBack(node, cut, 3 * MiB - cut))).toBe(true);
  });

  it('reads zeros after shrinking to zero and growing again', async () => {
    const node = await open('driver=memory,size=1M');
    await bdrvPwrite(node, 0, pattern(MiB, 2));
    await bdrvTruncate(node, 0);
    expect(bdrvGetLength(node)).toBe(0);
    await bdrvTruncate(node, MiB);
    expect(isZero(await readBack(node, 0, MiB))).toBe(true);
  });

  it('refuses every kind of write to a read-only node with EPERM', async () => {
    const node = await open('driver=memory,size=1M,read-only=on');
    expect(node.readOnly).toBe(true);
    for (const p of [
      bdrvPwrite(node, 0, new Uint8Array(512).fill(1)),
      bdrvPwriteZeroes(node, 0, 512),
      bdrvPdiscard(node, 0, MiB),
      bdrvTruncate(node, 2 * MiB),
    ]) {
      const err = await rejection(p);
      expect(err.code).toBe('EPERM');
      expect(err.node).toBe(node.nodeName);
      expect(err.message).toContain(node.nodeName);
    }
    expect(bdrvGetLength(node)).toBe(MiB);
    expect(node.inFlight).toBe(0);
    // reads still work
    expect(isZero(await readBack(node, 0, 512))).toBe(true);
  });
});

describe('file driver', () => {
  it('opens a host file and reports its size and name', async () => {
    const p = tempFile(64 * 1024);
    const node = await open(`driver=file,filename=${p}`);
    expect(node.driver.formatName).toBe('file');
    expect(node.filename).toBe(p);
    expect(bdrvGetLength(node)).toBe(64 * 1024);
  });

  it('reads what the file holds and writes where it is told', async () => {
    const p = tempFile(64 * 1024, (i) => i & 0xff);
    const node = await open(`driver=file,filename=${p}`);
    const back = await readBack(node, 1000, 3000);
    expect(back).toEqual(Uint8Array.from({ length: 3000 }, (_, i) => (i + 1000) & 0xff));
    const data = pattern(4096, 77);
    await bdrvPwrite(node, 8192, data);
    await bdrvFlush(node);
    const onDisk = fs.readFileSync(p);
    expect(new Uint8Array(onDisk.subarray(8192, 8192 + 4096))).toEqual(data);
    expect(onDisk[8191]).toBe(8191 & 0xff);
    expect(onDisk[8192 + 4096]).toBe((8192 + 4096) & 0xff);
  });

  it('reads zeros past the end of the file', async () => {
    const p = tempFile(4096, () => 0xab);
    const node = await open(`driver=file,filename=${p}`);
    const back = await readBack(node, 4096 - 100, 600, 0x55);
    expect(back.subarray(0, 100).every((b) => b === 0xab)).toBe(true);
    expect(isZero(back.subarray(100))).toBe(true);
    expect(isZero(await readBack(node, 1 << 20, 512, 0x55))).toBe(true);
    expect(fs.statSync(p).size).toBe(4096);
  });

  it('grows the file when written past its end', async () => {
    const p = tempFile(4096);
    const node = await open(`driver=file,filename=${p}`);
    const data = pattern(1000, 4);
    await bdrvPwrite(node, 10000, data);
    expect(bdrvGetLength(node)).toBe(11000);
    expect(fs.statSync(p).size).toBe(11000);
    expect(await readBack(node, 10000, 1000)).toEqual(data);
    expect(isZero(await readBack(node, 4096, 10000 - 4096))).toBe(true);
  });

  it('writes zeros with write-zeroes and grows the file when they run past its end', async () => {
    const p = tempFile(8192, () => 0xff);
    const node = await open(`driver=file,filename=${p}`);
    await bdrvPwriteZeroes(node, 4096, 8192);
    expect(bdrvGetLength(node)).toBe(12288);
    const onDisk = new Uint8Array(fs.readFileSync(p));
    expect(onDisk.length).toBe(12288);
    expect(onDisk.subarray(0, 4096).every((b) => b === 0xff)).toBe(true);
    expect(isZero(onDisk.subarray(4096))).toBe(true);
  });

  it('truncates the file, and reads zeros in the regrown part', async () => {
    const p = tempFile(8192, () => 0x11);
    const node = await open(`driver=file,filename=${p}`);
    await bdrvTruncate(node, 1000);
    expect(bdrvGetLength(node)).toBe(1000);
    expect(fs.statSync(p).size).toBe(1000);
    await bdrvTruncate(node, 8192);
    const back = await readBack(node, 0, 8192);
    expect(back.subarray(0, 1000).every((b) => b === 0x11)).toBe(true);
    expect(isZero(back.subarray(1000))).toBe(true);
  });

  it('accepts discard as a hint without changing the length', async () => {
    const p = tempFile(8192, () => 1);
    const node = await open(`driver=file,filename=${p}`);
    await bdrvPdiscard(node, 0, 4096);
    expect(bdrvGetLength(node)).toBe(8192);
    expect(node.inFlight).toBe(0);
  });

  it('refuses writes to a read-only file node with EPERM and leaves the file alone', async () => {
    const p = tempFile(4096, () => 0x22);
    const node = await open(`driver=file,filename=${p},read-only=on`);
    expect(node.readOnly).toBe(true);
    expect((await rejection(bdrvPwrite(node, 0, new Uint8Array(16)))).code).toBe('EPERM');
    expect((await rejection(bdrvPwriteZeroes(node, 0, 16))).code).toBe('EPERM');
    expect((await rejection(bdrvTruncate(node, 0))).code).toBe('EPERM');
    expect(new Uint8Array(fs.readFileSync(p)).every((b) => b === 0x22)).toBe(true);
    expect((await readBack(node, 0, 16)).every((b) => b === 0x22)).toBe(true);
  });

  it('accepts zero-length requests from shared memory and zero-length write-zeroes', async () => {
    const p = tempFile(4096, () => 1);
    const node = await open(`driver=file,filename=${p}`);
    await bdrvPread(node, 0, new Uint8Array(new SharedArrayBuffer(8), 0, 0));
    await bdrvPwrite(node, 0, new Uint8Array(new SharedArrayBuffer(8), 0, 0));
    await bdrvPwriteZeroes(node, 0, 0);
    expect(node.inFlight).toBe(0);
    expect(fs.statSync(p).size).toBe(4096);
  });

  // Regression (was a bug, now fixed) (src/block/iothread.ts:128-131 with :182-183, and src/block/iothread-worker.js:114-121):
  // a zero-length request from an ordinary (non-shared) buffer is given 0 bytes of staging; when
  // no other staged request shares its batch, batch.stagingBytes stays 0, so no staging buffer is
  // sent, the worker finds `mem === null` for region -1 and fails the request with errno 14
  // (EFAULT), reported as EIO. checkRequest accepts zero-length requests, and so does QEMU.
  it('accepts a zero-length read and write from an ordinary buffer', async () => {
    const p = tempFile(4096, () => 1);
    const node = await open(`driver=file,filename=${p}`);
    await bdrvPread(node, 0, new Uint8Array(0));
    await bdrvPwrite(node, 0, new Uint8Array(0));
    expect(node.inFlight).toBe(0);
  });

  // Regression (was a bug, now fixed) (src/drivers/file.ts:40-41 and :47-48): the node's length is raised to offset + length
  // before the transfer, even when the length is 0; pwrite of 0 bytes does not extend a file, so
  // the node then reports a size the host file does not have (10000 here vs 4096 on disk), and
  // the size changes back on the next open without any truncate.
  it('keeps its length equal to the host file after a zero-length write past the end', async () => {
    const p = tempFile(4096, () => 1);
    const node = await open(`driver=file,filename=${p}`);
    await bdrvPwrite(node, 10000, new Uint8Array(new SharedArrayBuffer(8), 0, 0));
    await bdrvPwriteZeroes(node, 20000, 0);
    expect(fs.statSync(p).size).toBe(4096);
    expect(bdrvGetLength(node)).toBe(fs.statSync(p).size);
  });

  it('refuses a missing file with ENOENT naming the path, and leaves no node behind', async () => {
    const missing = path.join(dir, 'does-not-exist.img');
    const before = await withBql((bql) => listNodes(bql).length);
    for (const opts of [`driver=file,filename=${missing}`, `file=${missing}`, `file=${missing},format=raw`]) {
      const err = await rejection(withBql((bql) => openNode(bql, opts)));
      expect(err.code).toBe('ENOENT');
      expect(err.message).toContain(missing);
      expect(err.file).toBe(missing);
    }
    expect(await withBql((bql) => listNodes(bql).length)).toBe(before);
  });

  it('refuses a file node without a filename with EINVAL', async () => {
    const err = await rejection(withBql((bql) => openNode(bql, 'driver=file')));
    expect(err.code).toBe('EINVAL');
    expect(err.field).toBe('filename');
  });
});

describe('raw driver', () => {
  it('opens raw over a file with file=PATH,format=raw', async () => {
    const p = tempFile(64 * 1024, (i) => (i >> 8) & 0xff);
    const node = await open(`file=${p},format=raw,node-name=rawfile`);
    expect(node.nodeName).toBe('rawfile');
    expect(node.driver.formatName).toBe('raw');
    expect(node.driver.kind).toBe('format');
    expect(node.filename).toBe(p);
    const file = node.file;
    expect(file?.driver.formatName).toBe('file');
    expect(file?.filename).toBe(p);
    expect(bdrvGetLength(node)).toBe(64 * 1024);
    expect(await readBack(node, 512, 256)).toEqual(new Uint8Array(256).fill(2));
    const data = pattern(4096, 8);
    await bdrvPwrite(node, 4096, data);
    expect(new Uint8Array(fs.readFileSync(p).subarray(4096, 8192))).toEqual(data);
  });

  it('opens raw over memory with driver=raw,file.driver=memory,file.size=1M', async () => {
    const node = await open('driver=raw,file.driver=memory,file.size=1M');
    expect(node.driver.formatName).toBe('raw');
    expect(node.file?.driver.formatName).toBe('memory');
    expect(bdrvGetLength(node)).toBe(MiB);
    const data = pattern(777, 12);
    await bdrvPwrite(node, 4000, data);
    expect(await readBack(node, 4000, 777)).toEqual(data);
    const file = node.file as BlockNode;
    const direct = new Uint8Array(777);
    await bdrvPread(file, 4000, direct);
    expect(direct).toEqual(data);
  });

  it('refuses requests past the end of a raw node with EINVAL (format nodes do not grow)', async () => {
    const node = await open('driver=raw,file.driver=memory,file.size=1M');
    const w = await rejection(bdrvPwrite(node, MiB - 10, new Uint8Array(20)));
    expect(w.code).toBe('EINVAL');
    expect(w.message).toContain(node.nodeName);
    expect((await rejection(bdrvPread(node, MiB + 1, new Uint8Array(1)))).code).toBe('EINVAL');
    expect(bdrvGetLength(node)).toBe(MiB);
    expect(node.inFlight).toBe(0);
  });

  it('chooses raw when probing a file opened without a format', async () => {
    const p = tempFile(8192, () => 0x42);
    const node = await open(`file=${p}`);
    expect(node.driver.formatName).toBe('raw');
    expect(node.file?.driver.formatName).toBe('file');
    expect((await readBack(node, 0, 16)).every((b) => b === 0x42)).toBe(true);
  });

  it('probes an empty file as raw too', async () => {
    const p = tempFile(0);
    const node = await open(`file=${p}`);
    expect(node.driver.formatName).toBe('raw');
    expect(bdrvGetLength(node)).toBe(0);
  });

  it('passes read-only=on down to the file child and refuses writes with EPERM', async () => {
    const p = tempFile(4096, () => 0x33);
    const node = await open(`file=${p},format=raw,read-only=on`);
    expect(node.readOnly).toBe(true);
    expect(node.file?.readOnly).toBe(true);
    const err = await rejection(bdrvPwrite(node, 0, new Uint8Array(512)));
    expect(err.code).toBe('EPERM');
    expect(new Uint8Array(fs.readFileSync(p)).every((b) => b === 0x33)).toBe(true);
  });

  it('refuses unknown options for raw with EINVAL', async () => {
    const err = await rejection(withBql((bql) => openNode(bql, 'driver=raw,file.driver=memory,file.size=1M,bogus=1')));
    expect(err.code).toBe('EINVAL');
    expect(err.message).toContain('bogus');
  });

  it('closes the file child together with the raw node', async () => {
    const node = await withBql((bql) => openNode(bql, 'driver=raw,node-name=rclose,file.driver=memory,file.node-name=rclose-file,file.size=1M'));
    await withBql(async (bql) => {
      expect(listNodes(bql).map((n) => n.nodeName)).toEqual(expect.arrayContaining(['rclose', 'rclose-file']));
      await closeNode(bql, node);
      const names = listNodes(bql).map((n) => n.nodeName);
      expect(names).not.toContain('rclose');
      expect(names).not.toContain('rclose-file');
    });
  });
});

describe('driver lookup', () => {
  it('refuses an unknown driver with ENOENT listing the known drivers', async () => {
    const err = await rejection(withBql((bql) => openNode(bql, 'driver=nosuchdrv,size=1M')));
    expect(err.code).toBe('ENOENT');
    expect(err.message).toContain("'nosuchdrv'");
    for (const known of ['file', 'memory', 'raw']) expect(err.message).toContain(known);
  });

  it('refuses an unknown format over a file with ENOENT and leaves no node behind', async () => {
    const p = tempFile(4096);
    const before = await withBql((bql) => listNodes(bql).length);
    const err = await rejection(withBql((bql) => openNode(bql, `file=${p},format=vmdkx`)));
    expect(err.code).toBe('ENOENT');
    expect(err.message).toContain('vmdkx');
    expect(await withBql((bql) => listNodes(bql).length)).toBe(before);
  });
});

describe('memory the data moves through', () => {
  it('reads from a file directly into a SharedArrayBuffer view at a non-zero byteOffset', async () => {
    const p = tempFile(64 * 1024, (i) => (i * 7) & 0xff);
    const node = await open(`driver=file,filename=${p}`);
    const sab = new SharedArrayBuffer(16384);
    const whole = new Uint8Array(sab).fill(0x99);
    const view = new Uint8Array(sab, 4096, 2048);
    await bdrvPread(node, 10000, view);
    const expected = Uint8Array.from({ length: 2048 }, (_, i) => ((i + 10000) * 7) & 0xff);
    expect(view).toEqual(expected);
    // the bytes landed at byteOffset 4096 of the shared memory, and nowhere else
    expect(whole.subarray(4096, 4096 + 2048)).toEqual(expected);
    expect(whole.subarray(0, 4096).every((b) => b === 0x99)).toBe(true);
    expect(whole.subarray(4096 + 2048).every((b) => b === 0x99)).toBe(true);
  });

  it('writes to a file from a SharedArrayBuffer view at a non-zero byteOffset', async () => {
    const p = tempFile(16384);
    const node = await open(`driver=file,filename=${p}`);
    const sab = new SharedArrayBuffer(8192);
    const whole = new Uint8Array(sab);
    whole.set(pattern(8192, 21));
    const view = new Uint8Array(sab, 1000, 3000);
    await bdrvPwrite(node, 512, view);
    const onDisk = new Uint8Array(fs.readFileSync(p));
    expect(onDisk.subarray(512, 3512)).toEqual(whole.subarray(1000, 4000));
    expect(isZero(onDisk.subarray(0, 512))).toBe(true);
    expect(isZero(onDisk.subarray(3512))).toBe(true);
  });

  it('reuses one SharedArrayBuffer for many reads at different offsets', async () => {
    const p = tempFile(64 * 1024, (i) => (i >> 9) & 0xff);
    const node = await open(`driver=file,filename=${p}`);
    const sab = new SharedArrayBuffer(64 * 1024);
    await Promise.all(Array.from({ length: 128 }, (_, k) => bdrvPread(node, k * 512, new Uint8Array(sab, ((k * 37) % 128) * 512, 512))));
    const whole = new Uint8Array(sab);
    for (let k = 0; k < 128; k++) {
      const slot = ((k * 37) % 128) * 512;
      expect(whole.subarray(slot, slot + 512).every((b) => b === k)).toBe(true);
    }
  });

  it('reads into and writes from non-shared buffers, including views at a non-zero byteOffset', async () => {
    const p = tempFile(16384, (i) => (i * 3) & 0xff);
    const node = await open(`driver=file,filename=${p}`);
    const ab = new ArrayBuffer(4096);
    const whole = new Uint8Array(ab).fill(0x77);
    const view = new Uint8Array(ab, 100, 1000);
    await bdrvPread(node, 2000, view);
    expect(view).toEqual(Uint8Array.from({ length: 1000 }, (_, i) => ((i + 2000) * 3) & 0xff));
    expect(whole.subarray(0, 100).every((b) => b === 0x77)).toBe(true);
    expect(whole.subarray(1100).every((b) => b === 0x77)).toBe(true);

    const src = new Uint8Array(new ArrayBuffer(2048), 1024, 512).fill(0xc3);
    await bdrvPwrite(node, 8000, src);
    const onDisk = new Uint8Array(fs.readFileSync(p));
    expect(onDisk.subarray(8000, 8512).every((b) => b === 0xc3)).toBe(true);
    expect(onDisk[7999]).toBe((7999 * 3) & 0xff);
    expect(onDisk[8512]).toBe((8512 * 3) & 0xff);
  });

  it('reads into a SharedArrayBuffer view through a raw node over memory', async () => {
    const node = await open('driver=raw,file.driver=memory,file.size=1M');
    const data = pattern(4096, 99);
    await bdrvPwrite(node, 65536, data);
    const sab = new SharedArrayBuffer(8192);
    const view = new Uint8Array(sab, 2048, 4096);
    await bdrvPread(node, 65536, view);
    expect(new Uint8Array(sab, 2048, 4096)).toEqual(data);
    expect(isZero(new Uint8Array(sab, 0, 2048))).toBe(true);
    expect(isZero(new Uint8Array(sab, 6144))).toBe(true);
  });
});

/**
 * Small tools for tests that build an image file and damage it by hand: a healthy qcow2 image with
 * a snapshot, a digest of a file, and a write of bytes at an offset.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { withBqlSync } from '../../src/block/bql.js';
import { createQcow2File } from '../../src/drivers/qcow2/create.js';
import { openImage } from '../../src/image.js';

const C = 65536;

/**
 * `dir/name.qcow2`: 16 MiB, data in guest clusters 0 and 100, snapshot s1, then cluster 0 written again.
 * @locking common
 */
export async function healthyImage(dir: string, name: string): Promise<string> {
  const f = path.join(dir, `${name}.qcow2`);
  withBqlSync((bql) => createQcow2File(bql, f, { sizeBytes: 16 * 1024 * 1024 }));
  const img = await openImage(f, { format: 'qcow2' });
  try {
    await img.write(0, new Uint8Array(C).fill(1));
    await img.write(100 * C, new Uint8Array(C).fill(2));
    await img.createSnapshot('s1');
    await img.write(0, new Uint8Array(4096).fill(3));
  } finally {
    await img.close();
  }
  return f;
}

/**
 * The sha256 of a file's bytes.
 * @locking common
 */
export function digest(f: string): string {
  return crypto.createHash('sha256').update(fs.readFileSync(f)).digest('hex');
}

/**
 * Writes `bytes` into file `f` at `at` (the damage a test makes).
 * @locking common
 */
export function poke(f: string, at: number, bytes: Uint8Array): void {
  const fd = fs.openSync(f, 'r+');
  try {
    fs.writeSync(fd, bytes, 0, bytes.length, at);
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * Damaged refcount metadata must never make the allocator hand out a cluster that the header or a
 * table occupies. Images are made by qemu-img and damaged by the test: a zeroed refcount block
 * (every cluster looks free, the header included) and a zeroed refcount-table entry (no block
 * covers the first clusters). An allocating write must fail with a corruption error, the header
 * must survive (qemu-img still reads the file as qcow2, now marked corrupt), and no byte outside
 * the header's feature field may change.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { isBlockError, openImage, shutdownIOThreads, withBql } from '../src/index.js';
import { describeInterop, qemu } from './helpers/qemu.js';
import { poke } from './helpers/image-file.js';

let dir = '';
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-allocguard-'));
});
afterAll(async () => {
  if (dir !== '') fs.rmSync(dir, { recursive: true, force: true });
  await withBql((bql) => shutdownIOThreads(bql));
});

const C = 65536;

/** A qemu-img image with data in guest clusters 0 and 1; returns its path. */
function qemuImage(name: string): string {
  const f = path.join(dir, `${name}.qcow2`);
  qemu('qemu-img', ['create', '-q', '-f', 'qcow2', f, '64M']);
  qemu('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 0 128k', f]);
  return f;
}

/** The bytes of a file with the incompatible-features field (header bytes 72..79) blanked. */
function withoutFeatures(b: Buffer): Buffer {
  const c = Buffer.from(b);
  c.fill(0, 72, 80);
  return c;
}

async function allocatingWriteFails(f: string): Promise<unknown> {
  const img = await openImage(f, { format: 'qcow2' });
  try {
    await img.write(10 * C, new Uint8Array(C).fill(0x77)); // a cluster nothing maps yet
    await img.flush();
    return null;
  } catch (e) {
    return e;
  } finally {
    await img.close().catch(() => undefined);
  }
}

describeInterop('the allocator refuses clusters that metadata occupies', () => {
  it('a zeroed refcount block: the write fails as corruption, the header survives and the image is marked corrupt', async () => {
    const f = qemuImage('zeroed-refblock');
    const raw = fs.readFileSync(f);
    const refblock = Number(raw.readBigUInt64BE(Number(raw.readBigUInt64BE(48)))) & ~0x1ff;
    poke(f, refblock, new Uint8Array(C));
    const before = fs.readFileSync(f);
    const err = await allocatingWriteFails(f);
    expect(isBlockError(err), String(err)).toBe(true);
    if (!isBlockError(err)) return;
    expect(err.corrupt).toBe(true);
    expect(err.message).toMatch(/header|refcount/);
    const after = fs.readFileSync(f);
    expect(after.subarray(0, 4).toString('latin1')).toBe('QFI\xfb');
    expect(withoutFeatures(after).equals(withoutFeatures(before))).toBe(true);
    const info = JSON.parse(qemu('qemu-img', ['info', '--output=json', f])) as { format: string; 'format-specific'?: { data?: { corrupt?: boolean } } };
    expect(info.format).toBe('qcow2');
    expect(info['format-specific']?.data?.corrupt).toBe(true);
    // QEMU refuses it read/write too, until a repair
    const w = spawnSync('qemu-io', ['-f', 'qcow2', '-c', 'write 0 512', f], { encoding: 'utf8' });
    expect(`${w.stdout}${w.stderr}`).toMatch(/corrupt/i);
  });

  it('a zeroed refcount-table entry: no refcount block is created over the header', async () => {
    const f = qemuImage('zeroed-reftable-entry');
    const raw = fs.readFileSync(f);
    const reftable = Number(raw.readBigUInt64BE(48));
    poke(f, reftable, new Uint8Array(8));
    const before = fs.readFileSync(f);
    const err = await allocatingWriteFails(f);
    expect(isBlockError(err), String(err)).toBe(true);
    if (!isBlockError(err)) return;
    expect(err.corrupt).toBe(true);
    const after = fs.readFileSync(f);
    expect(after.subarray(0, 4).toString('latin1')).toBe('QFI\xfb');
    expect(withoutFeatures(after).equals(withoutFeatures(before))).toBe(true);
    expect(JSON.parse(qemu('qemu-img', ['info', '--output=json', f])).format).toBe('qcow2');
  });
});

/**
 * Persistent bitmaps (made by qemu-img bitmap) under snapstack: read-only use keeps them; a write
 * invalidates them by the autoclear rule (QEMU then drops them, with its warning), so no bitmap
 * ever claims a region clean that snapstack wrote; the data stays intact; `img bitmap` refuses
 * and touches nothing.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { imgMain } from '../src/cli/img.js';
import { openImage, shutdownIOThreads, withBql } from '../src/index.js';
import { digest } from './helpers/image-file.js';
import { describeInterop, qemu, qemuStatus } from './helpers/qemu.js';

let dir: string;
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-bitmaps-'));
});
afterAll(async () => {
  fs.rmSync(dir, { recursive: true, force: true });
  await withBql((bql) => shutdownIOThreads(bql));
});

function bitmapNames(f: string): string[] {
  const info = JSON.parse(qemu('qemu-img', ['info', '--output=json', f])) as { 'format-specific'?: { data?: { bitmaps?: Array<{ name: string }> } } };
  return (info['format-specific']?.data?.bitmaps ?? []).map((b) => b.name);
}

describeInterop('persistent bitmaps made by qemu-img', () => {
  it('survive read-only use, are invalidated by a write, and img bitmap refuses without touching the image', async () => {
    const f = path.join(dir, 'bm.qcow2');
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', f, '4M']);
    qemu('qemu-io', ['-c', 'write -P 0x61 0 1M', f]);
    qemu('qemu-img', ['bitmap', '--add', f, 'b0']);
    expect(bitmapNames(f)).toEqual(['b0']);
    const before = digest(f);
    const out: string[] = [];
    const err: string[] = [];
    expect(await imgMain(['bitmap', '--add', f, 'b1'], (s) => out.push(s), (s) => err.push(s))).toBe(1);
    expect(err.join('\n')).toMatch(/not supported.*qemu-img bitmap/);
    for (const args of [['info', f], ['map', f], ['check', f], ['convert', '-O', 'raw', f, path.join(dir, 'bm.raw')]]) {
      expect(await imgMain(args, () => undefined, (s) => err.push(s)), args.join(' ')).toBe(0);
    }
    expect(digest(f)).toBe(before); // read-only use changed not one byte
    expect(bitmapNames(f)).toEqual(['b0']);
    const img = await openImage(f, { aio: 'sync' });
    await img.write(2 * 1024 * 1024, new Uint8Array(4096).fill(0x62));
    await img.close();
    // the bitmap missed that write: QEMU must not trust it any more
    const info = qemuStatus('qemu-img', ['info', f]);
    expect(info.stderr).toMatch(/bitmaps are now considered inconsistent/);
    expect(bitmapNames(f)).toEqual([]);
    const check = qemuStatus('qemu-img', ['check', f]);
    expect(check.status === 0 || check.status === 3, check.stdout + check.stderr).toBe(true); // the dropped bitmap's clusters leak, as QEMU leaves them
    expect(check.stdout).not.toMatch(/ERROR/);
    const raw = path.join(dir, 'after.raw');
    qemu('qemu-img', ['convert', '-O', 'raw', f, raw]);
    const bytes = fs.readFileSync(raw);
    expect(bytes[0]).toBe(0x61);
    expect(bytes[1024 * 1024 - 1]).toBe(0x61);
    expect(bytes[2 * 1024 * 1024]).toBe(0x62);
  });
});

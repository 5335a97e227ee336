/**
 * A raw image opened without a format (probed) may not have block 0 turned into another format's
 * header: QEMU's raw_co_pwritev refuses such writes with EPERM and raw_open warns once. Without the
 * guard a guest (or an NBD client of `snapstack nbd` without -f) could write a qcow2 header into its
 * own disk, and the next open would read the disk as a qcow2 image naming any host file as its
 * backing file. The sequences run through our `io` and through qemu-io on copies of one image,
 * and the same bytes must come out; the NBD case goes through `snapstack nbd` without -f.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { withBql } from '../src/block/bql.js';
import { shutdownIOThreads } from '../src/block/iothread.js';
import { setWarningSink } from '../src/block/warnings.js';
import { ioMain } from '../src/cli/io.js';
import { openImage } from '../src/image.js';
import { startServer } from './nbd-client-helpers.js';
import { describeInterop, qemu, qemuStatus } from './helpers/qemu.js';

let dir: string;
const warnings: string[] = [];
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-probe-guard-'));
  setWarningSink((t) => warnings.push(t));
});
afterAll(async () => {
  setWarningSink(null);
  fs.rmSync(dir, { recursive: true, force: true });
  await withBql((bql) => shutdownIOThreads(bql));
});

/** The first 512 bytes of a new qcow2 image made by qemu-img (a real header, backing file and all). */
function qcow2Header(): Uint8Array {
  const f = path.join(dir, `hdr-${Math.random().toString(36).slice(2)}.qcow2`);
  qemu('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', '/etc/passwd', '-F', 'raw', f, '1M']);
  const b = fs.readFileSync(f).subarray(0, 512);
  fs.rmSync(f);
  return new Uint8Array(b);
}

function rawImage(name: string, size = 1024 * 1024): string {
  const f = path.join(dir, name);
  fs.writeFileSync(f, Buffer.alloc(size, 0x11));
  return f;
}

function formatOf(file: string): string {
  const info = JSON.parse(qemu('qemu-img', ['info', '--output=json', file])) as { format: string };
  return info.format;
}

describeInterop('writes to block 0 of a probed raw image', () => {
  it('refuses a whole qcow2 header, warns once at open, and allows it past block 0 or with format=raw', async () => {
    const hdr = qcow2Header();
    const f = rawImage('whole.raw');
    warnings.length = 0;
    const img = await openImage(f);
    try {
      expect(warnings.length).toBe(1);
      expect(warnings[0]).toContain(`Image format was not specified for '${f}' and probing guessed raw.`);
      await expect(img.write(0, hdr)).rejects.toMatchObject({ code: 'EPERM' });
      // a header at another place is only data; so is a write to block 0 that probes as raw
      await img.write(512, hdr);
      await img.write(0, new Uint8Array(512).fill(0x22));
    } finally {
      await img.close();
    }
    expect(formatOf(f)).toBe('raw');
    const back = fs.readFileSync(f);
    expect(back.subarray(0, 512).every((b) => b === 0x22)).toBe(true);
    expect(Buffer.compare(back.subarray(512, 1024), Buffer.from(hdr))).toBe(0);
    // the user who names the format gets what they asked for
    warnings.length = 0;
    const explicit = await openImage(`driver=raw,file.filename=${f}`);
    try {
      expect(warnings).toEqual([]);
      await explicit.write(0, hdr);
    } finally {
      await explicit.close();
    }
    expect(fs.readFileSync(f).subarray(0, 4).toString('latin1')).toBe('QFI\u00fb');
    // read-only users of a probed image are not warned
    const g = rawImage('ro.raw');
    warnings.length = 0;
    const ro = await openImage(g, { readOnly: true });
    await ro.close();
    expect(warnings).toEqual([]);
  });

  it('refuses the byte that completes a header, and one of two racing halves', async () => {
    const hdr = qcow2Header();
    const f = rawImage('bytes.raw');
    const img = await openImage(f);
    let refusedAt = -1;
    try {
      for (let i = 0; i < 8; i++) {
        try {
          await img.write(i, hdr.subarray(i, i + 1));
        } catch (e) {
          expect(e).toMatchObject({ code: 'EPERM' });
          refusedAt = i;
          break;
        }
      }
      // the image is filled with 0x11, so the version field already reads as >= 2: the fourth
      // magic byte is the one that would make it a qcow2 image
      expect(refusedAt).toBe(3);
      // two concurrent writes, each harmless alone, together a header: one is refused
      await img.write(0, new Uint8Array(8));
      const results = await Promise.allSettled([img.write(0, hdr.subarray(0, 4)), img.write(4, hdr.subarray(4, 8))]);
      expect(results.filter((r) => r.status === 'rejected').length).toBe(1);
    } finally {
      await img.close();
    }
    expect(formatOf(f)).toBe('raw');
  });

  it('`snapstack io` without -f refuses the header as qemu-io does, and both images end the same', async () => {
    const hdr = qcow2Header();
    const cmds: string[] = [];
    for (let i = 0; i < 16; i++) cmds.push(`write -P 0x${(hdr[i] ?? 0).toString(16)} ${i} 1`);
    const ours = rawImage('io-ours.raw');
    const theirs = rawImage('io-theirs.raw');
    const q = qemuStatus('qemu-io', [...cmds.flatMap((c) => ['-c', c]), theirs]);
    const out: string[] = [];
    const status = await ioMain([...cmds.flatMap((c) => ['-c', c]), ours], (s) => out.push(s), (s) => out.push(s));
    expect(q.stdout).toContain('write failed: Operation not permitted');
    expect(out.join('\n')).toContain('write failed: Operation not permitted');
    expect(status).toBe(q.status);
    expect(Buffer.compare(fs.readFileSync(ours), fs.readFileSync(theirs))).toBe(0);
    expect(formatOf(ours)).toBe('raw');
  });
});

describeInterop('an NBD client of `snapstack nbd` without -f', () => {
  it('cannot turn the exported raw image into a qcow2 image', async () => {
    const hdr = qcow2Header();
    const f = rawImage('nbd.raw');
    const sock = path.join(dir, 'nbd.sock');
    const srv = await startServer(process.execPath, [path.resolve('bin/snapstack.js'), 'nbd', '-t', '-k', sock, f], sock);
    try {
      const hdrFile = path.join(dir, 'hdr.bin');
      fs.writeFileSync(hdrFile, hdr);
      const url = `nbd+unix:///?socket=${sock}`;
      const r = qemuStatus('qemu-io', ['-f', 'raw', '-c', `write -P 0x${(hdr[0] ?? 0).toString(16)} 0 1`, '-c', 'write -s ' + hdrFile + ' 0 512', url]);
      expect(r.stdout + r.stderr).toContain('Operation not permitted');
      // other writes still work
      const w = qemuStatus('qemu-io', ['-f', 'raw', '-c', 'write -P 0x33 4096 4096', url]);
      expect(w.status).toBe(0);
    } finally {
      await srv.stop();
    }
    expect(formatOf(f)).toBe('raw');
    expect(fs.readFileSync(f).subarray(4096, 8192).every((b) => b === 0x33)).toBe(true);
  });
});

describe('no guard where the format was named', () => {
  it('a raw image opened with format=raw takes a qcow2 magic in block 0', async () => {
    const f = rawImage('plain.raw', 64 * 1024);
    const img = await openImage(`driver=raw,file.filename=${f}`);
    try {
      await img.write(0, new Uint8Array([0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3]));
    } finally {
      await img.close();
    }
    expect(fs.readFileSync(f).subarray(0, 4).toString('latin1')).toBe('QFI\u00fb');
  });
});

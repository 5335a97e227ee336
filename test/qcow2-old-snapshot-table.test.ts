/**
 * Images written by QEMU before 5.2 carry 16 bytes of extra data per snapshot entry; snapstack
 * writes 24. The old table's extent must be taken as it is on disk, not as the entries would
 * serialize now (regressions found in review): deleting a snapshot used to free a cluster past the
 * table that guest data used (qemu-img check: "ERROR cluster N refcount=0 reference=1"), and the
 * overlap check called the free cluster after the table metadata, so the first allocating write
 * marked a valid image corrupt. The images here are made with 16-byte entries.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, expect, it } from 'vitest';
import { openImage, shutdownIOThreads, withBql, withBqlSync } from '../src/index.js';
import { createQcow2File } from '../src/drivers/qcow2/create.js';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'review-snaptab-'));
afterAll(async () => {
  fs.rmSync(dir, { recursive: true, force: true });
  await withBql((bql) => shutdownIOThreads(bql));
});

const C = 512;

function run(cmd: string, args: string[]): { status: number | null; out: string } {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  return { status: r.status, out: r.stdout + r.stderr };
}

/** An image with 8 snapshots whose table is rewritten with 16-byte extra data (one cluster instead of two). */
async function oldStyleImage(name: string): Promise<string> {
  const f = path.join(dir, `${name}.qcow2`);
  withBqlSync((bql) => createQcow2File(bql, f, { sizeBytes: 4 * 1024 * 1024, clusterSize: C }));
  const img = await openImage(f, { format: 'qcow2' });
  await img.write(0, new Uint8Array(C).fill(0x11));
  for (let k = 1; k <= 8; k++) await img.createSnapshot(`s${k}`);
  await img.close();
  const b = fs.readFileSync(f);
  const nb = b.readUInt32BE(60);
  const T = Number(b.readBigUInt64BE(64));
  // rewrite the table with 16 bytes of extra data per entry
  const out: Buffer[] = [];
  let off = T;
  let len = 0;
  for (let i = 0; i < nb; i++) {
    off = T + Math.ceil((off - T) / 8) * 8;
    const idLen = b.readUInt16BE(off + 12);
    const nameLen = b.readUInt16BE(off + 14);
    const extra = b.readUInt32BE(off + 36);
    const e = Buffer.alloc(40 + 16 + idLen + nameLen);
    b.copy(e, 0, off, off + 40);
    e.writeUInt32BE(16, 36);
    b.copy(e, 40, off + 40, off + 56);
    b.copy(e, 56, off + 40 + extra, off + 40 + extra + idLen + nameLen);
    const pad = i === nb - 1 ? 0 : (8 - ((len + e.length) % 8)) % 8;
    out.push(e, Buffer.alloc(pad));
    len += e.length + pad;
    off = off + 40 + extra + idLen + nameLen;
  }
  const table = Buffer.concat(out);
  expect(table.length).toBeLessThanOrEqual(C);
  expect(off - T).toBeGreaterThan(C); // snapstack's own table took two clusters
  const fd = fs.openSync(f, 'r+');
  fs.writeSync(fd, Buffer.alloc(2 * C), 0, 2 * C, T);
  fs.writeSync(fd, table, 0, table.length, T);
  // the table's second cluster is free now: give its refcount back (16-bit refcounts)
  const reftable = Number(b.readBigUInt64BE(48));
  const E = (C * 8) / 16;
  const ci = (T + C) / C;
  const rb = Number(b.readBigUInt64BE(reftable + Math.floor(ci / E) * 8)) & ~0x1ff;
  fs.writeSync(fd, Buffer.alloc(2), 0, 2, rb + (ci % E) * 2);
  fs.closeSync(fd);
  const chk = run('qemu-img', ['check', f]);
  expect(chk.status, chk.out).toBe(0);
  return f;
}

it('deleting a snapshot from a table with 16-byte extra data frees only the table clusters', async () => {
  const f = await oldStyleImage('delete');
  // QEMU allocates the freed cluster right after the table for guest data
  const writes = [];
  for (let k = 0; k < 6; k++) writes.push('-c', `write -P 0x77 ${(k + 100) * C} ${C}`);
  expect(run('qemu-io', ['-f', 'qcow2', ...writes, f]).status).toBe(0);
  expect(run('qemu-img', ['check', f]).status).toBe(0);
  const img = await openImage(f, { format: 'qcow2' });
  await img.deleteSnapshot('s8');
  await img.close();
  const chk = run('qemu-img', ['check', f]);
  expect(chk.out).not.toMatch(/ERROR/);
  expect(chk.status, chk.out).toBe(0);
});

it('writing guest data into such an image does not mark it corrupt', async () => {
  const f = await oldStyleImage('write');
  const img = await openImage(f, { format: 'qcow2' });
  try {
    for (let k = 0; k < 6; k++) await img.write((k + 100) * C, new Uint8Array(C).fill(0x55));
    await img.flush();
  } finally {
    await img.close().catch(() => undefined);
  }
  const chk = run('qemu-img', ['check', f]);
  expect(chk.status, chk.out).toBe(0);
});

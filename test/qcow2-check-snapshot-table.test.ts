/**
 * The snapshot table damage that only `img check` may read (snapshot-table-check.ts), on images
 * snapstack made and this file damaged: outside check mode the ordinary open still refuses it
 * without a write; `img check` and `-r leaks` fail as qemu-img's check does without a write;
 * `-r all` keeps what QEMU's repair keeps (the first 1024 bytes of extra data, the snapshots below
 * 64 MiB), leaves an image the next check finds clean and the guest data as it was, and frees
 * exactly what the old table took. (test/qcow2-check-interop.test.ts compares the same damage
 * with qemu-img 7.2 itself.) The same rule for the ordinary snapshot operations: a table an older
 * QEMU wrote (16 bytes of extra data per entry) is shorter on disk than written again, and
 * replacing it must free the clusters it took, not the next one.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { imgCheck } from '../src/cli/img-check.js';
import { isBlockError, openImage, shutdownIOThreads, withBql } from '../src/index.js';
import { digest, healthyImage, poke } from './helpers/image-file.js';

const MiB = 1024 * 1024;
const C = 65536;
let dir: string;

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-check-sntable-'));
});
afterAll(async () => {
  fs.rmSync(dir, { recursive: true, force: true });
  await withBql((bql) => shutdownIOThreads(bql));
});

function header(f: string): { nb: number; table: number; reftable: number } {
  const b = fs.readFileSync(f).subarray(0, 72);
  return { nb: b.readUInt32BE(60), table: Number(b.readBigUInt64BE(64)), reftable: Number(b.readBigUInt64BE(48)) };
}

/** Snapshot 0 rewritten in place with 24 known bytes plus `unknown` bytes of a pattern. */
function tooMuchExtraData(f: string, unknown: number): void {
  const { table } = header(f);
  const old = fs.readFileSync(f).subarray(table, table + 40);
  const extra = Buffer.alloc(24 + unknown);
  extra.writeBigUInt64BE(16n * 1024n * 1024n, 8);
  extra.writeBigInt64BE(-1n, 16);
  for (let i = 24; i < extra.length; i++) extra[i] = (i * 7) & 0xff;
  const e = Buffer.alloc(40 + extra.length + 1 + 2);
  old.copy(e, 0, 0, 12); // l1_table_offset and l1_size
  e.writeUInt16BE(1, 12);
  e.writeUInt16BE(2, 14);
  e.writeUInt32BE(extra.length, 36);
  extra.copy(e, 40);
  e.write('1s1', 40 + extra.length);
  poke(f, table, e);
}

/**
 * Moves the table to the end of the file with `extra` more snapshots (empty L1 tables, 64 KiB
 * ids and names of zeros) after the first, so that it passes 64 MiB; its clusters get refcount 1.
 * Returns how many snapshots stay below 64 MiB.
 */
function hugeTable(f: string, extra: number): number {
  const { table, reftable } = header(f);
  const file = fs.readFileSync(f);
  const first = Buffer.from(file.subarray(table, table + 40 + file.readUInt32BE(table + 36) + file.readUInt16BE(table + 12) + file.readUInt16BE(table + 14)));
  const at = Math.ceil(file.length / C) * C;
  poke(f, at, first);
  const hdr = Buffer.alloc(64);
  hdr.writeUInt16BE(0xffff, 12);
  hdr.writeUInt16BE(0xffff, 14);
  hdr.writeUInt32BE(24, 36);
  hdr.writeBigInt64BE(-1n, 56);
  // what QEMU counts: the extra data as cut, each entry 8-aligned
  let counted = 40 + Math.min(1024, first.readUInt32BE(36)) + first.readUInt16BE(12) + first.readUInt16BE(14);
  let kept = 1;
  let off = Math.ceil(first.length / 8) * 8;
  for (let i = 0; i < extra; i++) {
    poke(f, at + off, hdr);
    off = Math.ceil((off + 64 + 0x1fffe) / 8) * 8;
    counted = Math.ceil(counted / 8) * 8 + 64 + 0x1fffe;
    if (counted <= 64 * MiB) kept++;
  }
  fs.truncateSync(f, Math.ceil((at + off) / C) * C);
  const refblock = Number(fs.readFileSync(f).readBigUInt64BE(reftable) & 0x00fffffffffffe00n);
  const clusters = Math.floor((at + off - 1) / C) - at / C + 1;
  const ones = Buffer.alloc(clusters * 2);
  for (let i = 0; i < clusters; i++) ones.writeUInt16BE(1, i * 2);
  poke(f, refblock + (at / C) * 2, ones);
  const ptr = Buffer.alloc(12);
  ptr.writeUInt32BE(1 + extra, 0);
  ptr.writeBigUInt64BE(BigInt(at), 4);
  poke(f, 60, ptr);
  return kept;
}

async function check(f: string, ...args: string[]): Promise<{ status: number; out: string; err: string }> {
  const out: string[] = [];
  const err: string[] = [];
  const status = await imgCheck([...args, f], (s) => out.push(s), (s) => err.push(s));
  return { status, out: out.join('\n'), err: err.join('\n') };
}

async function guest(f: string): Promise<Buffer> {
  const img = await openImage(f, { format: 'qcow2', readOnly: true });
  try {
    return Buffer.from(await img.read(0, 16 * MiB));
  } finally {
    await img.close();
  }
}

async function openRefusal(f: string, readOnly: boolean): Promise<unknown> {
  try {
    const img = await openImage(f, { format: 'qcow2', readOnly });
    await img.close();
  } catch (e) {
    return e;
  }
  return null;
}

describe('img check reads a snapshot table the ordinary open refuses', () => {
  it('an ordinary open still refuses more than 1024 bytes of extra data, read-only or not, without a write', async () => {
    const f = await healthyImage(dir, 'strict');
    tooMuchExtraData(f, 2000);
    const before = digest(f);
    for (const readOnly of [true, false]) {
      const e = await openRefusal(f, readOnly);
      expect(isBlockError(e) && e.code).toBe('EFBIG');
      expect(e instanceof Error && e.message).toMatch(/Too much extra metadata in snapshot table entry 0/);
    }
    expect(digest(f)).toBe(before);
  });

  it('img check and -r leaks fail on too much extra data with the hint and write nothing, -r all keeps its first 1024 bytes', async () => {
    const f = await healthyImage(dir, 'extra');
    const data = await guest(f);
    tooMuchExtraData(f, 2000);
    const before = digest(f);
    for (const args of [[], ['-r', 'leaks']]) {
      const r = await check(f, ...args);
      expect(r.status).toBe(1);
      expect(r.err).toMatch(/ERROR failed to read the snapshot table: Too much extra metadata in snapshot table entry 0\nYou can force-remove this extra metadata with qemu-img check -r all/);
      expect(r.err).toMatch(/Check failed: File too large/);
      expect(digest(f)).toBe(before);
    }
    const r = await check(f, '-r', 'all', '--output=json');
    expect(r.status).toBe(0);
    expect(r.err).toMatch(/Discarding too much extra metadata in snapshot table entry 0 \(2024 > 1024\)/);
    const fixed = JSON.parse(r.out) as Record<string, number>;
    expect(fixed['corruptions-fixed']).toBe(1);
    expect(fixed['leaks-fixed'] ?? 0).toBe(0);
    expect((await check(f)).status).toBe(0);
    // the table was written again: 1024 bytes of extra data, the first 1000 unknown ones kept
    const { table, nb } = header(f);
    expect(nb).toBe(1);
    const file = fs.readFileSync(f);
    expect(file.readUInt32BE(table + 36)).toBe(1024);
    for (let i = 24; i < 1024; i++) expect(file[table + 40 + i]).toBe((i * 7) & 0xff);
    const img = await openImage(f, { format: 'qcow2', readOnly: true });
    try {
      expect((await img.snapshots()).map((s) => [s.id, s.name])).toEqual([['1', 's1']]);
    } finally {
      await img.close();
    }
    expect((await guest(f)).equals(data)).toBe(true);
  });

  it('-r all drops the snapshots past 64 MiB, frees the table the extra-data rewrite replaces, and loses no guest data', async () => {
    const f = await healthyImage(dir, 'huge');
    const data = await guest(f);
    tooMuchExtraData(f, 2000);
    const kept = hugeTable(f, 520);
    expect(kept).toBeLessThan(521);
    const before = digest(f);
    const r0 = await check(f);
    expect(r0.status).toBe(1);
    // the entry with too much extra data comes first and stops the read
    expect(r0.err).toMatch(/Too much extra metadata in snapshot table entry 0/);
    expect(digest(f)).toBe(before);
    const r = await check(f, '-r', 'all', '--output=json');
    expect(r.err).toContain(`Discarding ${521 - kept} overhanging snapshots (snapshot table is too big)`);
    expect(r.status).toBe(0);
    // the overhanging snapshots and the cut extra data: corruptions; the old tables' clusters: leaks
    expect(JSON.parse(r.out)).toMatchObject({ 'corruptions-fixed': 521 - kept + 1 });
    const after = await check(f, '--output=json');
    expect(after.status).toBe(0);
    const left = JSON.parse(after.out) as Record<string, number>;
    expect([left['leaks'] ?? 0, left['corruptions'] ?? 0]).toEqual([0, 0]);
    // the rewritten table lies where the freed clusters are, far below the old 64 MiB one
    expect(header(f).nb).toBe(kept);
    expect(header(f).table).toBeLessThan(2 * MiB);
    expect((await guest(f)).equals(data)).toBe(true);
  }, 60_000);

  it('-r all on a table over 64 MiB alone rewrites only the count and the next check is clean', async () => {
    const f = await healthyImage(dir, 'count');
    const data = await guest(f);
    const kept = hugeTable(f, 520);
    const r0 = await check(f);
    expect(r0.status).toBe(1);
    expect(r0.err).toContain(`ERROR failed to read the snapshot table: Snapshot table is too big`);
    expect(r0.err).toMatch(/You can force-remove all \d+ overhanging snapshots with qemu-img check -r all/);
    const tableBefore = header(f).table;
    const r = await check(f, '-r', 'all');
    expect(r.status).toBe(0);
    expect(header(f)).toMatchObject({ nb: kept, table: tableBefore });
    expect((await check(f)).status).toBe(0);
    expect((await guest(f)).equals(data)).toBe(true);
  }, 60_000);
});

/**
 * Rewrites the table as QEMU before 5.0 did (16 bytes of extra data per entry) at a fresh cluster
 * E, with `more` disk-only snapshots (empty L1 table, empty id and name) after s1 so that it ends
 * near the end of E while the same entries written with 24 bytes would not fit it, and moves the
 * data of guest cluster 0 (written after s1: only the active L2 table points at it) to E + 1, so
 * that the cluster after the table is in use by what no snapshot operation moves. The old table's
 * and old data cluster's clusters are freed: the image checks clean. Returns E + 1's offset.
 */
function oldQemuTable(f: string, more: number, follow: 'data' | 'l1' = 'data'): number {
  const file = fs.readFileSync(f);
  const { table, reftable } = header(f);
  const entry = (l1: Buffer, id: string, name: string): Buffer => {
    const e = Buffer.alloc(56 + id.length + name.length);
    l1.copy(e, 0, 0, 12);
    e.writeUInt16BE(id.length, 12);
    e.writeUInt16BE(name.length, 14);
    e.writeUInt32BE(1_700_000_000, 16);
    e.writeUInt32BE(16, 36);
    e.writeBigUInt64BE(16n * 1024n * 1024n, 48);
    e.write(id + name, 56);
    return e;
  };
  const parts: Buffer[] = [entry(file.subarray(table, table + 12), '1', 's1')];
  for (let i = 0; i < more; i++) parts.push(entry(Buffer.alloc(12), '', ''));
  const t = Buffer.alloc(C);
  let off = 0;
  for (const p of parts) {
    off = Math.ceil(off / 8) * 8;
    p.copy(t, off);
    off += p.length;
  }
  if (off > C) throw new Error(`test setup: the table takes ${off} bytes`);
  const E = Math.ceil(file.length / C) * C;
  fs.truncateSync(f, E + 2 * C);
  poke(f, E, t);
  const l1 = Number(file.readBigUInt64BE(40));
  const l2 = Number(file.readBigUInt64BE(l1) & 0x00fffffffffffe00n);
  // what moves to E + 1: guest cluster 0's data, or the active L1 table
  const data = follow === 'data' ? Number(file.readBigUInt64BE(l2) & 0x00fffffffffffe00n) : l1;
  poke(f, E + C, file.subarray(data, data + (follow === 'data' ? C : file.readUInt32BE(36) * 8)));
  const ptr = Buffer.alloc(8);
  ptr.writeBigUInt64BE(follow === 'data' ? (1n << 63n) | BigInt(E + C) : BigInt(E + C));
  poke(f, follow === 'data' ? l2 : 40, ptr);
  const refblock = Number(file.readBigUInt64BE(reftable) & 0x00fffffffffffe00n);
  const rc = (off: number, v: number): void => {
    const b = Buffer.alloc(2);
    b.writeUInt16BE(v);
    poke(f, refblock + (off / C) * 2, b);
  };
  rc(E, 1);
  rc(E + C, 1);
  rc(table, 0);
  rc(data, 0);
  const sn = Buffer.alloc(12);
  sn.writeUInt32BE(parts.length, 0);
  sn.writeBigUInt64BE(BigInt(E), 4);
  poke(f, 60, sn);
  return E + C;
}

/** Moves the table to the end of the file with `total - 1` disk-only snapshots (64-byte entries) after s1. */
function manySnapshots(f: string, total: number): void {
  const { table, reftable } = header(f);
  const file = fs.readFileSync(f);
  const firstLen = 40 + file.readUInt32BE(table + 36) + file.readUInt16BE(table + 12) + file.readUInt16BE(table + 14);
  const firstBytes = Math.ceil(firstLen / 8) * 8;
  const t = Buffer.alloc(firstBytes + (total - 1) * 64);
  file.copy(t, 0, table, table + firstLen);
  for (let i = 0; i < total - 1; i++) {
    const at = firstBytes + i * 64;
    t.writeUInt32BE(24, at + 36);
    t.writeBigUInt64BE(16n * 1024n * 1024n, at + 48);
    t.writeBigInt64BE(-1n, at + 56);
  }
  const at = Math.ceil(file.length / C) * C;
  poke(f, at, t);
  fs.truncateSync(f, Math.ceil((at + t.length) / C) * C);
  const refblock = Number(file.readBigUInt64BE(reftable) & 0x00fffffffffffe00n);
  const clusters = Math.ceil(t.length / C);
  const ones = Buffer.alloc(clusters * 2);
  for (let i = 0; i < clusters; i++) ones.writeUInt16BE(1, i * 2);
  poke(f, refblock + (at / C) * 2, ones);
  poke(f, refblock + (table / C) * 2, Buffer.alloc(2));
  const ptr = Buffer.alloc(12);
  ptr.writeUInt32BE(total, 0);
  ptr.writeBigUInt64BE(BigInt(at), 4);
  poke(f, 60, ptr);
}

describe('more snapshots than QEMU allows', () => {
  it('the ordinary open refuses 65540 snapshots, img check fails with the hint, -r all keeps the first 65536', async () => {
    const f = await healthyImage(dir, 'many');
    const data = await guest(f);
    manySnapshots(f, 65540);
    const before = digest(f);
    const e = await openRefusal(f, true);
    expect(isBlockError(e) && e.field).toBe('nb_snapshots');
    for (const args of [[], ['-r', 'leaks']]) {
      const r = await check(f, ...args);
      expect(r.status).toBe(1);
      expect(r.err).toContain('ERROR snapshot table too large\nYou can force-remove all 4 overhanging snapshots with qemu-img check -r all');
    }
    expect(digest(f)).toBe(before);
    const r = await check(f, '-r', 'all', '--output=json');
    expect(r.err).toContain('Discarding 4 overhanging snapshots');
    expect(r.status).toBe(0);
    expect((JSON.parse(r.out) as Record<string, number>)['corruptions-fixed']).toBe(4);
    expect(header(f).nb).toBe(65536);
    expect((await check(f)).status).toBe(0);
    const img = await openImage(f, { format: 'qcow2', readOnly: true });
    try {
      const list = await img.snapshots();
      expect(list.length).toBe(65536);
      expect(list[0]?.name).toBe('s1');
    } finally {
      await img.close();
    }
    expect((await guest(f)).equals(data)).toBe(true);
  }, 60_000);
});

describe('replacing a snapshot table frees what it took on disk', () => {
  it('an image whose table an older QEMU wrote is followed by the active L1 table opens and checks clean', async () => {
    const f = await healthyImage(dir, 'old16-l1');
    const data = await guest(f);
    oldQemuTable(f, 1100, 'l1');
    const img = await openImage(f, { format: 'qcow2' });
    await img.close();
    expect(await check(f)).toMatchObject({ status: 0, err: '' });
    expect((await guest(f)).equals(data)).toBe(true);
  });

  // 1 + 1100 entries: 61664 bytes with 16 bytes of extra data each, 70472 with 24
  for (const op of ['create', 'delete'] as const) {
    it(`a snapshot ${op} over a table an older QEMU wrote leaves the cluster after it in use`, async () => {
      const f = await healthyImage(dir, `old16-${op}`);
      const data = await guest(f);
      const moved = oldQemuTable(f, 1100);
      expect((await check(f)).status).toBe(0);
      const img = await openImage(f, { format: 'qcow2' });
      try {
        if (op === 'create') await img.createSnapshot('s2');
        else await img.deleteSnapshot('s1');
        await img.write(5 * C, new Uint8Array(C).fill(7));
      } finally {
        await img.close();
      }
      const r = await check(f);
      expect(r.err).toBe('');
      expect(r.status).toBe(0);
      // guest cluster 0 is still where the setup put it, right after the old table
      const file = fs.readFileSync(f);
      const l2 = Number(file.readBigUInt64BE(Number(file.readBigUInt64BE(40))) & 0x00fffffffffffe00n);
      expect(Number(file.readBigUInt64BE(l2) & 0x00fffffffffffe00n)).toBe(moved);
      data.fill(7, 5 * C, 6 * C);
      expect((await guest(f)).equals(data)).toBe(true);
    });
  }
});

/**
 * `snapstack img check` against `qemu-img check` 7.2 over damage to every field the check looks
 * at (docs/interop/qcow2.txt and the messages of QEMU's qcow2-refcount.c): images made by
 * qemu-img and qemu-io, damaged here by hand, checked by both tools (exit codes 0/1/2/3 and the
 * counts must agree), repaired by both with `-r leaks` / `-r all` (the same verdict again), and
 * the image snapstack repaired is checked by qemu-img itself afterwards: what snapstack calls
 * repaired, qemu-img must find clean, and the guest data must read as qemu-img's repair left it.
 */
import { spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { imgCheck } from '../src/cli/img-check.js';
import { shutdownIOThreads, withBql } from '../src/index.js';
import { describeInterop, qemu, qemuStatus } from './helpers/qemu.js';

let dir: string;
let base: string;
const C = 65536;
const MASK = 0x00fffffffffffe00n;

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-check-interop-'));
});
afterAll(async () => {
  fs.rmSync(dir, { recursive: true, force: true });
  await withBql((bql) => shutdownIOThreads(bql));
});

/** A qemu-img image: data in guest clusters 0..3 and 16, a snapshot, then a COW write to cluster 0. */
function makeBase(): string {
  const f = path.join(dir, 'base.qcow2');
  if (fs.existsSync(f)) return f;
  qemu('qemu-img', ['create', '-q', '-f', 'qcow2', f, '64M']);
  qemu('qemu-io', ['-c', 'write -P 1 0 256k', '-c', 'write -P 2 1M 64k', f]);
  qemu('qemu-img', ['snapshot', '-c', 's1', f]);
  qemu('qemu-io', ['-c', 'write -P 3 0 64k', f]);
  return f;
}

/** A compressed qemu-img image (qemu-img convert -c). */
function makeCompressed(): string {
  const f = path.join(dir, 'compressed.qcow2');
  if (fs.existsSync(f)) return f;
  const raw = path.join(dir, 'compressed.raw');
  qemu('qemu-img', ['create', '-q', '-f', 'raw', raw, '4M']);
  qemu('qemu-io', ['-f', 'raw', '-c', 'write -P 7 0 192k', raw]);
  qemu('qemu-img', ['convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', raw, f]);
  return f;
}

/** A qemu-img image with two persistent dirty bitmaps (qemu-img bitmap --add), written around them. */
function makeBitmaps(): string {
  const f = path.join(dir, 'bitmaps.qcow2');
  if (fs.existsSync(f)) return f;
  qemu('qemu-img', ['create', '-q', '-f', 'qcow2', f, '64M']);
  qemu('qemu-io', ['-c', 'write -P 1 0 1M', f]);
  qemu('qemu-img', ['bitmap', '--add', f, 'b0']);
  qemu('qemu-io', ['-c', 'write -P 2 2M 1M', f]);
  qemu('qemu-img', ['bitmap', '--add', f, 'b1']);
  return f;
}

/** Read/write helpers on the image file (big-endian, as the format). */
class Img {
  constructor(readonly f: string) {}
  u64(at: number): bigint {
    const fd = fs.openSync(this.f, 'r');
    try {
      const b = Buffer.alloc(8);
      fs.readSync(fd, b, 0, 8, at);
      return b.readBigUInt64BE(0);
    } finally {
      fs.closeSync(fd);
    }
  }
  off(at: number): number {
    return Number(this.u64(at) & MASK);
  }
  put64(at: number, v: bigint): void {
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(BigInt.asUintN(64, v));
    this.write(at, b);
  }
  put16(at: number, v: number): void {
    const b = Buffer.alloc(2);
    b.writeUInt16BE(v);
    this.write(at, b);
  }
  write(at: number, b: Buffer): void {
    const fd = fs.openSync(this.f, 'r+');
    try {
      fs.writeSync(fd, b, 0, b.length, at);
    } finally {
      fs.closeSync(fd);
    }
  }
  get l1(): number {
    return Number(this.u64(40));
  }
  get l2(): number {
    return this.off(this.l1);
  }
  /** Host offset of guest cluster `i` (through the active tables). */
  data(i: number): number {
    return this.off(this.l2 + i * 8);
  }
  get reftable(): number {
    return Number(this.u64(48));
  }
  get refblock(): number {
    return this.off(this.reftable);
  }
  /** Offset of the 16-bit refcount of the cluster at host offset `host` (first refcount block). */
  rc(host: number): number {
    return this.refblock + (host / C) * 2;
  }
  get snapshotTable(): number {
    return Number(this.u64(64));
  }
  /** Host offset of the bitmap directory (from the bitmaps header extension). */
  get bitmapDirectory(): number {
    const b = fs.readFileSync(this.f).subarray(0, C);
    for (let at = b.readUInt32BE(100); at + 8 <= b.length; ) {
      const type = b.readUInt32BE(at);
      const len = b.readUInt32BE(at + 4);
      if (type === 0) break;
      if (type === 0x23852875) return Number(b.readBigUInt64BE(at + 8 + 16));
      at += 8 + Math.ceil(len / 8) * 8;
    }
    throw new Error('no bitmaps extension');
  }
}

/** The entry layout of docs/interop/qcow2.txt, for the snapshot-table damage below. */
function snapshotEntry(o: { l1: bigint; l1Size: number; id: string; name: string; extra: Buffer }): Buffer {
  const id = Buffer.from(o.id);
  const name = Buffer.from(o.name);
  const e = Buffer.alloc(40 + o.extra.length + id.length + name.length);
  e.writeBigUInt64BE(o.l1, 0);
  e.writeUInt32BE(o.l1Size, 8);
  e.writeUInt16BE(id.length, 12);
  e.writeUInt16BE(name.length, 14);
  e.writeUInt32BE(1_700_000_000, 16);
  e.writeUInt32BE(o.extra.length, 36);
  o.extra.copy(e, 40);
  id.copy(e, 40 + o.extra.length);
  name.copy(e, 40 + o.extra.length + id.length);
  return e;
}

/** Known extra data (vm_state_size_large 0, disk_size 64 MiB, icount absent) followed by `unknown` bytes of a pattern. */
function extraData(unknown: number): Buffer {
  const b = Buffer.alloc(24 + unknown);
  b.writeBigUInt64BE(64n << 20n, 8);
  b.writeBigInt64BE(-1n, 16);
  for (let i = 24; i < b.length; i++) b[i] = (i * 7) & 0xff;
  return b;
}

/** Rewrites snapshot 0 of the base image in place with `unknown` bytes of extra data past the known 24. */
function tooMuchExtraData(m: Img, unknown: number): void {
  const at = m.snapshotTable;
  m.write(at, snapshotEntry({ l1: m.u64(at), l1Size: Number(m.u64(at + 8) >> 32n), id: '1', name: 's1', extra: extraData(unknown) }));
}

/**
 * Moves the snapshot table to the end of the file and appends `extra` snapshots with an empty L1
 * table and 64 KiB long (zero) ids and names, so that the table passes 64 MiB; the new table's
 * clusters get refcount 1, the old table's cluster leaks.
 */
function hugeSnapshotTable(m: Img, extra: number): void {
  const old = fs.readFileSync(m.f).subarray(m.snapshotTable, m.snapshotTable + C);
  const first = Buffer.from(old.subarray(0, 40 + old.readUInt32BE(36) + old.readUInt16BE(12) + old.readUInt16BE(14)));
  const at = Math.ceil(fs.statSync(m.f).size / C) * C;
  let off = Math.ceil(first.length / 8) * 8;
  m.write(at, first);
  const hdr = snapshotEntry({ l1: 0n, l1Size: 0, id: '', name: '', extra: extraData(0) });
  for (let i = 0; i < extra; i++) {
    hdr.writeUInt16BE(0xffff, 12);
    hdr.writeUInt16BE(0xffff, 14);
    m.write(at + off, hdr);
    off = Math.ceil((off + hdr.length + 0x1fffe) / 8) * 8;
  }
  fs.truncateSync(m.f, Math.ceil((at + off) / C) * C);
  const clusters = Math.floor((at + off - 1) / C) - at / C + 1;
  const ones = Buffer.alloc(clusters * 2);
  for (let i = 0; i < clusters; i++) ones.writeUInt16BE(1, i * 2);
  m.write(m.rc(at), ones);
  const ptr = Buffer.alloc(12);
  ptr.writeUInt32BE(1 + extra, 0);
  ptr.writeBigUInt64BE(BigInt(at), 4);
  m.write(60, ptr);
}

/**
 * Moves the snapshot table to the end of the file with `total - 1` disk-only snapshots (empty L1
 * table, empty id and name) after the first: more than QEMU's 65536 when `total` is; the new
 * table's clusters get refcount 1, the old table's cluster is freed.
 */
function manySnapshots(m: Img, total: number): void {
  const old = m.snapshotTable;
  const b = fs.readFileSync(m.f);
  const first = Buffer.from(b.subarray(old, old + 40 + b.readUInt32BE(old + 36) + b.readUInt16BE(old + 12) + b.readUInt16BE(old + 14)));
  const entry = snapshotEntry({ l1: 0n, l1Size: 0, id: '', name: '', extra: extraData(0) });
  const firstBytes = Math.ceil(first.length / 8) * 8;
  const table = Buffer.alloc(firstBytes + (total - 1) * entry.length);
  first.copy(table, 0);
  for (let i = 0; i < total - 1; i++) entry.copy(table, firstBytes + i * entry.length);
  const at = Math.ceil(b.length / C) * C;
  m.write(at, table);
  fs.truncateSync(m.f, Math.ceil((at + table.length) / C) * C);
  const clusters = Math.ceil(table.length / C);
  const ones = Buffer.alloc(clusters * 2);
  for (let i = 0; i < clusters; i++) ones.writeUInt16BE(1, i * 2);
  m.write(m.rc(at), ones);
  m.put16(m.rc(old), 0);
  const ptr = Buffer.alloc(12);
  ptr.writeUInt32BE(total, 0);
  ptr.writeBigUInt64BE(BigInt(at), 4);
  m.write(60, ptr);
}

/** qemu-img's stdout when it may be long (a listing of 65536 snapshots). */
function bigOutput(args: string[]): string {
  const r = spawnSync('qemu-img', args, { encoding: 'utf8', maxBuffer: 256 * 1024 * 1024 });
  expect(r.status).toBe(0);
  return r.stdout;
}

interface Verdict {
  status: number;
  corruptions: number;
  leaks: number;
  checkErrors: number;
  corruptionsFixed: number;
  leaksFixed: number;
}

function verdictOf(status: number, stdout: string): Verdict {
  const json = stdout.trim().startsWith('{') ? (JSON.parse(stdout) as Record<string, number>) : {};
  return {
    status,
    corruptions: json['corruptions'] ?? 0,
    leaks: json['leaks'] ?? 0,
    checkErrors: json['check-errors'] ?? 0,
    corruptionsFixed: json['corruptions-fixed'] ?? 0,
    leaksFixed: json['leaks-fixed'] ?? 0,
  };
}

function qemuCheck(f: string, repair?: 'leaks' | 'all'): Verdict {
  const r = qemuStatus('qemu-img', ['check', '--output=json', ...(repair === undefined ? [] : ['-r', repair]), f]);
  return verdictOf(r.status, r.stdout);
}

async function ourCheck(f: string, repair?: 'leaks' | 'all'): Promise<{ verdict: Verdict; stderr: string[] }> {
  const out: string[] = [];
  const err: string[] = [];
  const status = await imgCheck(['--output=json', ...(repair === undefined ? [] : ['-r', repair]), f], (s) => out.push(s), (s) => err.push(s));
  for (const line of err) expect(line).not.toMatch(/RangeError|TypeError|at .*\.(ts|js):\d+/);
  return { verdict: verdictOf(status, out.join('\n')), stderr: err };
}

/** Reads the whole guest disk with qemu-img (as raw) to compare the two repaired images. */
function guestBytes(f: string): Buffer {
  const raw = `${f}.raw`;
  qemu('qemu-img', ['convert', '-q', '-O', 'raw', f, raw]);
  const b = fs.readFileSync(raw);
  fs.rmSync(raw);
  return b;
}

interface Case {
  what: string;
  source?: () => string;
  damage: (img: Img) => void;
  /** Expected verdict of the unrepaired image (both tools must give it). */
  status: 0 | 1 | 2 | 3;
  /**
   * qemu-img 7.2's own `-r all` fails here (its overlap check still counts the damaged refcount
   * block as one, refuses to write the rebuilt block there and marks the image corrupt), while
   * snapstack's rebuild succeeds: then qemu-img must find snapstack's result clean, with the guest
   * data of the undamaged image.
   */
  qemuRepairFails?: boolean;
  /** After the repairs, `qemu-img snapshot -l` must list the same snapshots in both images. */
  sameSnapshots?: boolean;
  timeoutMs?: number;
}

const cases: Case[] = [
  { what: 'a zeroed refcount-table entry (clusters in use with refcount 0)', status: 2, damage: (m) => m.put64(m.reftable, 0n) },
  // the header's refcount-table fields: QEMU opens such an image for the check (an aligned offset
  // anywhere, an empty table) and -r all rebuilds the refcount structure
  { what: 'refcount_table_offset 0 (the table read from the header cluster)', status: 2, damage: (m) => m.put64(48, 0n) },
  { what: 'refcount_table_offset far past the end of the file', status: 2, damage: (m) => m.put64(48, 1n << 50n) },
  { what: 'refcount_table_clusters 0', status: 2, damage: (m) => m.write(56, Buffer.alloc(4)) },
  { what: 'a zeroed refcount block', status: 2, damage: (m) => m.write(m.refblock, Buffer.alloc(C)) },
  { what: 'the refcount of a data cluster dropped to 0', status: 2, damage: (m) => m.put16(m.rc(m.data(1)), 0) },
  { what: 'the refcount of the header dropped to 0', status: 2, damage: (m) => m.put16(m.rc(0), 0) },
  { what: 'a refcount one too high (a leak)', status: 3, damage: (m) => m.put16(m.rc(m.data(1)), 3) },
  { what: 'a refcount one too high on a COPIED cluster (a leak and a COPIED error)', status: 2, damage: (m) => m.put16(m.rc(m.data(0)), 2) },
  { what: 'a refcount one too low on a shared cluster', status: 2, damage: (m) => m.put16(m.rc(m.data(1)), 1) },
  {
    what: 'a leaked cluster at the end of the file',
    status: 3,
    damage: (m) => {
      const end = fs.statSync(m.f).size;
      fs.truncateSync(m.f, end + C);
      m.put16(m.rc(end), 1);
    },
  },
  { what: 'COPIED cleared on an L2 entry with refcount 1', status: 2, damage: (m) => m.put64(m.l2, m.u64(m.l2) & ~(1n << 63n)) },
  { what: 'COPIED set on an L2 entry with refcount 2', status: 2, damage: (m) => m.put64(m.l2 + 8, m.u64(m.l2 + 8) | (1n << 63n)) },
  { what: 'COPIED cleared on an L1 entry', status: 2, damage: (m) => m.put64(m.l1, m.u64(m.l1) & ~(1n << 63n)) },
  { what: 'reserved bits set in an L2 entry', status: 2, damage: (m) => m.put64(m.l2, m.u64(m.l2) | (1n << 60n)) },
  { what: 'reserved bits set in an L1 entry', status: 2, damage: (m) => m.put64(m.l1, m.u64(m.l1) | (1n << 57n)) },
  { what: 'an unaligned data cluster offset', status: 2, damage: (m) => m.put64(m.l2 + 16, m.u64(m.l2 + 16) + 0x200n) },
  {
    what: 'an unaligned preallocated zero cluster',
    status: 2,
    damage: (m) => m.put64(m.l2 + 40 * 8, (1n << 63n) | BigInt(m.data(1)) | 0x2a01n),
  },
  { what: 'an L2 entry past the end of the file', status: 2, damage: (m) => m.put64(m.l2 + 50 * 8, (1n << 63n) | (1n << 40n)) },
  { what: 'an L1 entry pointing at an unaligned L2 table', status: 2, damage: (m) => m.put64(m.l1, m.u64(m.l1) + 0x200n) },
  { what: 'an L1 entry past the end of the file', status: 2, damage: (m) => m.put64(m.l1, (1n << 63n) | (1n << 36n)) },
  { what: 'reserved bits set in a refcount-table entry', status: 2, qemuRepairFails: true, damage: (m) => m.put64(m.reftable, m.u64(m.reftable) | 1n) },
  { what: 'an unaligned refcount block', status: 1, qemuRepairFails: true, damage: (m) => m.put64(m.reftable, m.u64(m.reftable) + 0x200n) },
  { what: 'a refcount block outside the image', status: 2, damage: (m) => m.put64(m.reftable + 8, 1n << 26n) },
  { what: 'a refcount block that is also an L2 table', status: 2, damage: (m) => m.put64(m.reftable + 8, BigInt(m.l2)) },
  {
    what: "an unaligned snapshot L1 table offset",
    status: 2,
    damage: (m) => m.put64(m.snapshotTable, m.u64(m.snapshotTable) + 0x200n),
  },
  {
    what: 'an incomplete snapshot table entry (8 bytes of extra data in a v3 image)',
    status: 2,
    damage: (m) => {
      const b = Buffer.alloc(4);
      b.writeUInt32BE(8);
      m.write(m.snapshotTable + 36, b);
    },
  },
  { what: 'nothing: persistent bitmaps count as in use', status: 0, source: makeBitmaps, damage: () => undefined },
  { what: "the bitmap directory's refcount dropped to 0", status: 2, source: makeBitmaps, damage: (m) => m.put16(m.rc(m.bitmapDirectory), 0) },
  {
    what: 'the corrupt bit on a consistent image',
    status: 0,
    damage: (m) => m.put64(72, m.u64(72) | 2n),
  },
  {
    what: 'COPIED set on a compressed cluster',
    status: 2,
    source: makeCompressed,
    damage: (m) => m.put64(m.l2, m.u64(m.l2) | (1n << 63n)),
  },
  {
    what: 'a compressed cluster whose refcount dropped to 0',
    status: 2,
    source: makeCompressed,
    damage: (m) => m.put16(m.rc(Number(m.u64(m.l2) & ((1n << 54n) - 1n))), 0),
  },
  {
    what: 'more than 1024 bytes of extra data in a snapshot table entry',
    status: 1,
    sameSnapshots: true,
    damage: (m) => tooMuchExtraData(m, 2000),
  },
  {
    what: 'more than 1024 bytes of extra data in a snapshot table entry and a leaked cluster',
    status: 1,
    sameSnapshots: true,
    damage: (m) => {
      tooMuchExtraData(m, 1001);
      m.put16(m.rc(m.data(1)), 3);
    },
  },
  {
    what: 'a snapshot table over 64 MiB (520 snapshots with 64 KiB ids and names) and the old table leaked',
    status: 1,
    sameSnapshots: true,
    damage: (m) => hugeSnapshotTable(m, 520),
  },
  {
    what: 'a snapshot table over 64 MiB whose first entry has 2000 bytes of extra data (the table written again frees all it took)',
    status: 1,
    sameSnapshots: true,
    damage: (m) => {
      tooMuchExtraData(m, 2000);
      hugeSnapshotTable(m, 520);
    },
  },
  {
    // qemu-img needs some 30 s for its checks and listings of 65536 snapshots
    what: 'more than 65536 snapshots (65540) whose first entry has 2000 bytes of extra data, and a leaked cluster',
    status: 1,
    sameSnapshots: true,
    timeoutMs: 180_000,
    damage: (m) => {
      tooMuchExtraData(m, 2000);
      manySnapshots(m, 65540);
      m.put16(m.rc(m.data(1)), 3);
    },
  },
];

describeInterop('img check agrees with qemu-img check 7.2 on damaged qemu-img images', () => {
  for (const [i, c] of cases.entries()) {
    it(`finds and repairs ${c.what} as qemu-img does`, async () => {
      const src = (c.source ?? makeBase)();
      const ours = path.join(dir, `case${i}-ours.qcow2`);
      const theirs = path.join(dir, `case${i}-qemu.qcow2`);
      fs.copyFileSync(src, ours);
      c.damage(new Img(ours));
      fs.copyFileSync(ours, theirs);

      // 1. the verdict on the damaged image
      const q0 = qemuCheck(theirs);
      const s0 = (await ourCheck(ours)).verdict;
      expect(q0.status).toBe(c.status);
      expect(s0).toEqual(q0);

      // 2. -r leaks, then -r all: the same verdicts and repair counts
      const qLeaks = qemuCheck(theirs, 'leaks');
      expect({ mode: 'leaks', ...(await ourCheck(ours, 'leaks')).verdict }).toEqual({ mode: 'leaks', ...qLeaks });
      const qAll = qemuCheck(theirs, 'all');
      const sAll = (await ourCheck(ours, 'all')).verdict;
      if (c.qemuRepairFails === true) {
        expect(qAll.status).toBe(1);
        expect(sAll.status).toBe(0);
        expect(qemuCheck(ours).status).toBe(0);
        expect(guestBytes(ours).equals(guestBytes(src))).toBe(true);
        return;
      }
      expect({ mode: 'all', ...sAll }).toEqual({ mode: 'all', ...qAll });

      // 3. qemu-img finds what snapstack repaired as it finds its own repair
      const qAfter = qemuCheck(theirs);
      const oursByQemu = qemuCheck(ours);
      expect(oursByQemu).toEqual(qAfter);
      expect(bigOutput(['info', ours])).toMatch(/file format: qcow2/);
      if (qAfter.status === 0) expect(guestBytes(ours).equals(guestBytes(theirs))).toBe(true);
      if (c.sameSnapshots === true) {
        const list = (f: string): string => crypto.createHash('sha256').update(bigOutput(['snapshot', '-l', f])).digest('hex');
        expect(list(ours)).toEqual(list(theirs));
        expect(guestBytes(ours).equals(guestBytes(src))).toBe(true);
      }
    }, c.timeoutMs ?? 60_000);
  }
});

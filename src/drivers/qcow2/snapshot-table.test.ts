import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BlockError } from '../../block/errors.js';
import { describeInterop } from '../../../test/helpers/qemu.js';
import { parseHeader } from './header.js';
import { parseSnapshotTable, serializeSnapshotTable, snapshotTableSize } from './snapshot-table.js';
import type { SnapshotEntry } from './types.js';

const IMAGE = { version: 3 as const, sizeBytes: 64 << 20 };

function entry(over: Partial<SnapshotEntry>): SnapshotEntry {
  return {
    l1TableOffset: 0x40000,
    l1Size: 1,
    id: '1',
    name: 'snap1',
    dateSec: 1_700_000_000,
    dateNsec: 123,
    vmClockNsec: 0,
    vmStateSize: 0,
    diskSize: 64 << 20,
    icount: -1,
    extraDataSize: 24,
    unknownExtraData: new Uint8Array(0),
    ...over,
  };
}

function view(b: Uint8Array): DataView {
  return new DataView(b.buffer, b.byteOffset, b.byteLength);
}

/** Runs `f`, expecting a BlockError, and returns it. */
function blockError(f: () => unknown): BlockError {
  try {
    f();
  } catch (e) {
    expect(e).toBeInstanceOf(BlockError);
    return e as BlockError;
  }
  throw new Error('expected a BlockError, nothing was thrown');
}

/** One entry with `extra` bytes of extra data, written by hand (v2-era writers wrote less than 24). */
function rawEntry(extra: Uint8Array, vmStateU32: number, id = '7', name = 'old'): Uint8Array {
  const b = new Uint8Array(40 + extra.length + id.length + name.length);
  const v = view(b);
  v.setBigUint64(0, 0x50000n);
  v.setUint32(8, 1);
  v.setUint16(12, id.length);
  v.setUint16(14, name.length);
  v.setUint32(16, 5);
  v.setUint32(20, 6);
  v.setBigUint64(24, 77n);
  v.setUint32(32, vmStateU32);
  v.setUint32(36, extra.length);
  b.set(extra, 40);
  b.set(Buffer.from(id + name), 40 + extra.length);
  return b;
}

describe('serializeSnapshotTable', () => {
  it('writes two entries "1"/"snap1" and "2"/"snap2" in 142 bytes, the second at offset 72', () => {
    const entries = [entry({ id: '1', name: 'snap1' }), entry({ id: '2', name: 'snap2' })];
    const bytes = serializeSnapshotTable(entries);
    expect(bytes.length).toBe(142);
    expect(snapshotTableSize(entries)).toBe(142);
    const v = view(bytes);
    expect(v.getUint32(36)).toBe(24);
    expect(Buffer.from(bytes.subarray(64, 70)).toString()).toBe('1snap1');
    expect([...bytes.subarray(70, 72)]).toEqual([0, 0]);
    expect(v.getBigUint64(72)).toBe(0x40000n);
    expect(Buffer.from(bytes.subarray(136, 142)).toString()).toBe('2snap2');
    expect(parseSnapshotTable(bytes, 2, IMAGE, 't')).toEqual(entries);
  });

  it('writes an empty table as zero bytes', () => {
    expect(serializeSnapshotTable([]).length).toBe(0);
    expect(snapshotTableSize([])).toBe(0);
    expect(parseSnapshotTable(new Uint8Array(0), 0, IMAGE, 't')).toEqual([]);
  });

  it('writes the 32-bit VM state size as 0 when the size does not fit in 32 bits', () => {
    const big = entry({ vmStateSize: 2 ** 32 + 5 });
    const v = view(serializeSnapshotTable([big]));
    expect(v.getUint32(32)).toBe(0);
    expect(v.getBigUint64(40)).toBe(2n ** 32n + 5n);
    const small = view(serializeSnapshotTable([entry({ vmStateSize: 0xffffffff })]));
    expect(small.getUint32(32)).toBe(0xffffffff);
  });

  it('writes an absent icount as all ones and reads it back as -1', () => {
    const bytes = serializeSnapshotTable([entry({ icount: -1 })]);
    expect(view(bytes).getBigUint64(56)).toBe(0xffffffffffffffffn);
    expect(parseSnapshotTable(bytes, 1, IMAGE, 't')[0]?.icount).toBe(-1);
  });

  it('writes 24 known bytes of extra data followed by the unknown ones', () => {
    const e = entry({ unknownExtraData: Uint8Array.of(1, 2, 3, 4, 5, 6, 7, 8, 9), extraDataSize: 33 });
    const bytes = serializeSnapshotTable([e]);
    expect(view(bytes).getUint32(36)).toBe(33);
    expect([...bytes.subarray(64, 73)]).toEqual([1, 2, 3, 4, 5, 6, 7, 8, 9]);
    expect(bytes.length).toBe(40 + 33 + 1 + 5);
    expect(parseSnapshotTable(bytes, 1, IMAGE, 't')).toEqual([e]);
  });

  it('refuses names and ids over 65535 bytes', () => {
    const e1 = blockError(() => serializeSnapshotTable([entry({ name: 'x'.repeat(65536) })]));
    expect(e1.code).toBe('EINVAL');
    expect(e1.field).toBe('name_size');
    expect(blockError(() => serializeSnapshotTable([entry({ id: 'é'.repeat(32768) })])).field).toBe('id_str_size');
    expect(serializeSnapshotTable([entry({ name: 'x'.repeat(65535) })]).length).toBe(40 + 24 + 1 + 65535);
  });

  it('refuses a table over 64 MiB with EFBIG', () => {
    const name = 'n'.repeat(1000);
    const entries = Array.from({ length: 65536 }, (_, i) => entry({ id: String(i), name }));
    expect(blockError(() => snapshotTableSize(entries)).code).toBe('EFBIG');
    expect(blockError(() => serializeSnapshotTable(entries)).code).toBe('EFBIG');
  });

  it('round-trips random entries', () => {
    const safe = fc.nat({ max: Number.MAX_SAFE_INTEGER });
    const arbEntry = fc.record({
      l1TableOffset: safe,
      l1Size: fc.nat({ max: 0xffffffff }),
      id: fc.string({ unit: 'binary', maxLength: 300 }),
      name: fc.string({ unit: 'binary', maxLength: 300 }),
      dateSec: fc.nat({ max: 0xffffffff }),
      dateNsec: fc.nat({ max: 0xffffffff }),
      vmClockNsec: safe,
      vmStateSize: fc.oneof(safe, fc.nat({ max: 0xffffffff })),
      diskSize: safe,
      icount: fc.oneof(fc.constant(-1), safe),
      unknownExtraData: fc.uint8Array({ maxLength: 64 }),
    });
    fc.assert(
      fc.property(fc.array(arbEntry, { maxLength: 12 }), (raw) => {
        const entries: SnapshotEntry[] = raw.map((r) => ({ ...r, extraDataSize: 24 + r.unknownExtraData.length }));
        const bytes = serializeSnapshotTable(entries);
        expect(bytes.length).toBe(snapshotTableSize(entries));
        const back = parseSnapshotTable(bytes, entries.length, IMAGE, 'rt.qcow2');
        expect(back).toEqual(entries);
        // the caller may hand over more than the table (a whole cluster): same result
        const padded = new Uint8Array(bytes.length + 100);
        padded.set(bytes);
        expect(parseSnapshotTable(padded, entries.length, IMAGE, 'rt.qcow2')).toEqual(entries);
      }),
      { numRuns: 300 },
    );
  });
});

describe('parseSnapshotTable', () => {
  it('takes the VM state size from the u32 and the disk size from the image when there is no extra data', () => {
    const [e] = parseSnapshotTable(rawEntry(new Uint8Array(0), 4096), 1, IMAGE, 't');
    expect(e).toMatchObject({ id: '7', name: 'old', vmStateSize: 4096, diskSize: 64 << 20, icount: -1, extraDataSize: 0, vmClockNsec: 77 });
    expect(e?.unknownExtraData.length).toBe(0);
  });

  it('lets the 64-bit VM state size win over the u32 once there are 8 bytes of extra data', () => {
    const extra = new Uint8Array(8);
    view(extra).setBigUint64(0, 2n ** 40n);
    const [e] = parseSnapshotTable(rawEntry(extra, 4096), 1, IMAGE, 't');
    expect(e).toMatchObject({ vmStateSize: 2 ** 40, diskSize: 64 << 20, icount: -1, extraDataSize: 8 });
  });

  it('reads the disk size from 16 bytes of extra data and the icount from 24', () => {
    const extra = new Uint8Array(24);
    view(extra).setBigUint64(8, 1n << 30n);
    view(extra).setBigUint64(16, 99n);
    expect(parseSnapshotTable(rawEntry(extra.subarray(0, 16), 0), 1, IMAGE, 't')[0]).toMatchObject({ diskSize: 1 << 30, icount: -1, extraDataSize: 16 });
    expect(parseSnapshotTable(rawEntry(extra, 0), 1, IMAGE, 't')[0]).toMatchObject({ diskSize: 1 << 30, icount: 99, extraDataSize: 24 });
  });

  it('keeps extra data past the known 24 bytes', () => {
    const extra = new Uint8Array(40).fill(0xab, 24);
    const [e] = parseSnapshotTable(rawEntry(extra, 0), 1, IMAGE, 't');
    expect(e?.extraDataSize).toBe(40);
    expect([...(e?.unknownExtraData ?? [])]).toEqual(new Array(16).fill(0xab));
  });

  it('decodes an icount of 0xffffffffffffffff as -1 and refuses other values above 2^53-1', () => {
    const bytes = serializeSnapshotTable([entry({ icount: 5 })]);
    view(bytes).setBigUint64(56, 0xffffffffffffffffn);
    expect(parseSnapshotTable(bytes, 1, IMAGE, 't')[0]?.icount).toBe(-1);
    view(bytes).setBigUint64(56, 0xfffffffffffffffen);
    const e = blockError(() => parseSnapshotTable(bytes, 1, IMAGE, 't'));
    expect(e.code).toBe('EINVAL');
    expect(e.field).toBe('icount');
  });

  const tooLarge: Array<[field: string, at: number]> = [
    ['l1_table_offset', 0],
    ['vm_clock_nsec', 24],
    ['vm_state_size_large', 40],
    ['disk_size', 48],
  ];
  for (const [field, at] of tooLarge) {
    it(`refuses a ${field} of 2^53 in entry 1, naming the entry and the field`, () => {
      const bytes = serializeSnapshotTable([entry({}), entry({ id: '2' })]);
      view(bytes).setBigUint64(72 + at, 1n << 53n);
      const e = blockError(() => parseSnapshotTable(bytes, 2, IMAGE, 'big.qcow2'));
      expect(e.code).toBe('EINVAL');
      expect(e.field).toBe(field);
      expect(e.file).toBe('big.qcow2');
      expect(e.message).toContain('snapshot table entry 1');
      expect(e.message).toContain(field);
    });
  }

  it('refuses extra_data_size 2000 with EFBIG', () => {
    const bytes = new Uint8Array(4096);
    bytes.set(serializeSnapshotTable([entry({})]));
    view(bytes).setUint32(36, 2000);
    const e = blockError(() => parseSnapshotTable(bytes, 1, IMAGE, 't'));
    expect(e.code).toBe('EFBIG');
    expect(e.field).toBe('extra_data_size');
    expect(e.message).toContain('Too much extra metadata in snapshot table entry 0');
  });

  it('refuses every truncation of a table with EINVAL', () => {
    const bytes = serializeSnapshotTable([entry({ name: 'first' }), entry({ id: '2', name: 'second' })]);
    for (let n = 0; n < bytes.length; n++) {
      const e = blockError(() => parseSnapshotTable(bytes.subarray(0, n), 2, IMAGE, 't'));
      expect(e.code).toBe('EINVAL');
      expect(e.message).toMatch(/snapshot table entry [01]/);
    }
  });

  it('refuses a table whose count says more entries than it holds', () => {
    const bytes = serializeSnapshotTable([entry({})]);
    const e = blockError(() => parseSnapshotTable(bytes, 2, IMAGE, 't'));
    expect(e.field).toBe('nb_snapshots');
  });

  it('refuses entries whose id or name overrun the table', () => {
    const bytes = serializeSnapshotTable([entry({})]);
    view(bytes).setUint16(14, 500);
    expect(blockError(() => parseSnapshotTable(bytes, 1, IMAGE, 't')).field).toBe('name_size');
    view(bytes).setUint16(12, 0xffff);
    expect(blockError(() => parseSnapshotTable(bytes, 1, IMAGE, 't')).field).toBe('id_str_size');
    view(bytes).setUint32(36, 1000);
    expect(blockError(() => parseSnapshotTable(bytes, 1, IMAGE, 't')).field).toBe('extra_data_size');
  });

  it('refuses more than 65536 snapshots', () => {
    expect(blockError(() => parseSnapshotTable(new Uint8Array(64), 65537, IMAGE, 't')).code).toBe('EFBIG');
  });

  it('never throws anything but a BlockError for random bytes', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 4096 }), fc.nat({ max: 200 }), (bytes, nb) => {
        try {
          const entries = parseSnapshotTable(bytes, nb, IMAGE, 'fuzz.qcow2');
          expect(entries.length).toBe(nb);
        } catch (e) {
          if (!(e instanceof BlockError)) throw e;
        }
      }),
      { numRuns: 1000 },
    );
  });

  it('never throws anything but a BlockError for random mutations of a valid table', () => {
    const good = serializeSnapshotTable([entry({}), entry({ id: '2', name: 'two', unknownExtraData: Uint8Array.of(1, 2) }), entry({ id: '3', name: '' })]);
    fc.assert(
      fc.property(fc.array(fc.tuple(fc.nat({ max: good.length - 1 }), fc.nat({ max: 255 })), { minLength: 1, maxLength: 6 }), (muts) => {
        const bytes = Uint8Array.from(good);
        for (const [at, v] of muts) bytes[at] = v;
        try {
          const entries = parseSnapshotTable(bytes, 3, IMAGE, 'fuzz.qcow2');
          // whatever parses serializes again (or is refused with a BlockError)
          serializeSnapshotTable(entries);
        } catch (e) {
          if (!(e instanceof BlockError)) throw e;
        }
      }),
      { numRuns: 1000 },
    );
  });
});

describeInterop('qcow2 snapshot table against qemu-img 7.2', () => {
  let dir = '';
  beforeAll(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-sntable-'));
  });
  afterAll(() => {
    fs.rmSync(dir, { recursive: true, force: true });
  });

  /** Reads the snapshot table of `file` as the driver would: header first, then the table region. */
  function readTable(file: string): { offset: number; bytes: Uint8Array; entries: SnapshotEntry[] } {
    const all = fs.readFileSync(file);
    const h = parseHeader(Uint8Array.from(all.subarray(0, 2 ** all.readUInt32BE(20))), all.length, file);
    const bytes = Uint8Array.from(all.subarray(h.snapshotsOffset, Math.min(all.length, h.snapshotsOffset + 64 * 1024 * 1024)));
    return { offset: h.snapshotsOffset, bytes, entries: parseSnapshotTable(bytes, h.nbSnapshots, { version: h.version, sizeBytes: h.size }, file) };
  }

  function withSnapshots(name: string): string {
    const file = path.join(dir, name);
    execFileSync('qemu-img', ['create', '-f', 'qcow2', file, '64M'], { stdio: 'ignore' });
    execFileSync('qemu-img', ['snapshot', '-c', 's1', file], { stdio: 'ignore' });
    execFileSync('qemu-img', ['snapshot', '-c', 's2', file], { stdio: 'ignore' });
    return file;
  }

  it('parses the table qemu-img snapshot -c writes and serializes it back to the same bytes', () => {
    const { bytes, entries } = readTable(withSnapshots('two.qcow2'));
    expect(entries.map((e) => e.id)).toEqual(['1', '2']);
    expect(entries.map((e) => e.name)).toEqual(['s1', 's2']);
    for (const e of entries) {
      expect(e).toMatchObject({ extraDataSize: 24, icount: 0, vmStateSize: 0, diskSize: 64 << 20, l1Size: 1, vmClockNsec: 0 });
      expect(e.unknownExtraData.length).toBe(0);
      expect(e.l1TableOffset % 65536).toBe(0);
    }
    const out = serializeSnapshotTable(entries);
    expect(out.length).toBe(40 + 24 + 1 + 2 + 5 + 40 + 24 + 1 + 2);
    expect(Buffer.from(out).toString('hex')).toBe(Buffer.from(bytes.subarray(0, out.length)).toString('hex'));
  });

  it('writes a table qemu-img reads, and qemu-img keeps the unknown extra data when it rewrites the table', () => {
    const file = withSnapshots('rewritten.qcow2');
    const { offset, entries } = readTable(file);
    const first = entries[0];
    const second = entries[1];
    if (first === undefined || second === undefined) throw new Error('two snapshots expected');
    const mine = [
      { ...first, name: 'a1', unknownExtraData: Uint8Array.of(0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4), extraDataSize: 32 },
      { ...second, name: 'renamed two' },
    ];
    const bytes = serializeSnapshotTable(mine);
    // the table stays inside the cluster qemu-img allocated for it
    expect(bytes.length).toBeLessThan(65536);
    const fd = fs.openSync(file, 'r+');
    fs.writeSync(fd, bytes, 0, bytes.length, offset);
    fs.closeSync(fd);
    execFileSync('qemu-img', ['check', file], { stdio: 'ignore' });
    const list = execFileSync('qemu-img', ['snapshot', '-l', file], { encoding: 'utf8' });
    expect(list).toContain('a1');
    expect(list).toContain('renamed two');
    execFileSync('qemu-img', ['snapshot', '-c', 's3', file], { stdio: 'ignore' });
    const after = readTable(file).entries;
    expect(after.map((e) => e.name)).toEqual(['a1', 'renamed two', 's3']);
    expect(after[0]?.extraDataSize).toBe(32);
    expect([...(after[0]?.unknownExtraData ?? [])]).toEqual([0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4]);
  });
});

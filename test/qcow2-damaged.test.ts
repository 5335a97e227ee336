/**
 * Damaged qcow2 images: every one is refused with a BlockError that names the offending field,
 * and the file is not written at all (its bytes are compared before and after). Covers header
 * fields out of range, tables unaligned or past the end of the file, metadata overlapping,
 * absurd snapshot counts and L1 sizes, snapshot entries overrunning the table, an L2 entry that
 * points into metadata, and a refcount that would overflow.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { isBlockError, openImage, shutdownIOThreads, type BlockError, withBql, withBqlSync } from '../src/index.js';
import { createQcow2File } from '../src/drivers/qcow2/create.js';
import { imgCheck } from '../src/cli/img-check.js';
import { ioMain } from '../src/cli/io.js';
import { digest, healthyImage, poke } from './helpers/image-file.js';

let dir: string;
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-damaged-'));
});
afterAll(async () => {
  fs.rmSync(dir, { recursive: true, force: true });
  await withBql((bql) => shutdownIOThreads(bql));
});

const MiB = 1024 * 1024;
const C = 65536;

function u32(f: string, at: number): number {
  return fs.readFileSync(f).readUInt32BE(at);
}

function u64(f: string, at: number): number {
  return Number(fs.readFileSync(f).readBigUInt64BE(at));
}

function be32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0);
  return b;
}

function be64(v: number | bigint): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(v));
  return b;
}

async function refusal(p: () => Promise<unknown>): Promise<BlockError> {
  try {
    await p();
  } catch (e) {
    if (isBlockError(e)) return e;
    throw new Error(`expected a BlockError, got ${String(e)}`);
  }
  throw new Error('expected a refusal, but the operation succeeded');
}

/** Opens read/write and expects a refusal naming `field`; the file must be byte-for-byte unchanged. */
async function expectRefusedOpen(f: string, field: string | RegExp): Promise<BlockError> {
  const before = digest(f);
  const err = await refusal(async () => {
    const img = await openImage(f, { format: 'qcow2' });
    await img.close();
  });
  expect(err.field ?? '').toMatch(field);
  expect(err.message.length).toBeGreaterThan(10);
  expect(digest(f)).toBe(before);
  return err;
}

const SNAPSHOTS_OFFSET = 64;
const L1_OFFSET = 40;
const REFTABLE_OFFSET = 48;

describe('damaged qcow2 headers and tables are refused without a write', () => {
  const cases: Array<{ what: string; field: string | RegExp; damage: (f: string) => void }> = [
    { what: 'an unaligned L1 table offset', field: 'l1_table_offset', damage: (f) => poke(f, L1_OFFSET, be64(u64(f, L1_OFFSET) + 512)) },
    { what: 'an L1 table past the end of the file', field: 'l1_table_offset', damage: (f) => poke(f, L1_OFFSET, be64(1024 * C)) },
    { what: 'an absurd L1 size', field: 'l1_size', damage: (f) => poke(f, 36, be32(0x7fffffff)) },
    { what: 'an L1 size too small for the disk', field: 'l1_size', damage: (f) => poke(f, 36, be32(0)) },
    { what: 'an unaligned refcount table offset', field: 'refcount_table_offset', damage: (f) => poke(f, REFTABLE_OFFSET, be64(C + 8)) },
    { what: 'a refcount table past the end of the file', field: 'refcount_table_offset', damage: (f) => poke(f, REFTABLE_OFFSET, be64(4096 * C)) },
    { what: 'a cluster size out of range', field: 'cluster_bits', damage: (f) => poke(f, 20, be32(31)) },
    { what: 'an unknown incompatible feature', field: 'incompatible_features', damage: (f) => poke(f, 72, be64(1n << 40n)) },
    { what: 'an absurd snapshot count', field: 'nb_snapshots', damage: (f) => poke(f, 60, be32(0x7fffffff)) },
    { what: 'more snapshots than the table holds', field: /nb_snapshots|l1_table_offset|vm_clock_nsec|extra_data_size|id_str_size|name_size/, damage: (f) => poke(f, 60, be32(5000)) },
    { what: 'an unaligned snapshot table offset', field: 'snapshots_offset', damage: (f) => poke(f, SNAPSHOTS_OFFSET, be64(u64(f, SNAPSHOTS_OFFSET) + 8)) },
    {
      what: 'a snapshot name running past the end of the file',
      field: /name_size|nb_snapshots/,
      damage: (f) => {
        const table = u64(f, SNAPSHOTS_OFFSET);
        const entry = Buffer.from(fs.readFileSync(f).subarray(table, table + 80));
        // a copy of the table in a new last cluster, its name 65535 bytes long: past the file's end
        const at = Math.ceil(fs.statSync(f).size / C) * C;
        entry.writeUInt16BE(0xffff, 14);
        poke(f, at, entry);
        fs.truncateSync(f, at + C);
        poke(f, SNAPSHOTS_OFFSET, be64(at));
      },
    },
    {
      what: 'a snapshot L1 table past the end of the file',
      field: 'l1_table_offset',
      damage: (f) => poke(f, u64(f, SNAPSHOTS_OFFSET), be64(4096 * C)),
    },
    { what: 'an L1 table overlapping the refcount table', field: 'metadata_overlap', damage: (f) => poke(f, L1_OFFSET, be64(u64(f, REFTABLE_OFFSET))) },
    {
      what: "an active L1 table that is the snapshot's L1 table",
      field: 'metadata_overlap',
      damage: (f) => poke(f, L1_OFFSET, be64(u64(f, u64(f, SNAPSHOTS_OFFSET)))),
    },
  ];
  for (const c of cases) {
    it(`refuses ${c.what}`, async () => {
      const f = await healthyImage(dir, `bad-${c.what.replace(/[^a-z]/gi, '-')}`);
      c.damage(f);
      await expectRefusedOpen(f, c.field);
    });
  }

  it('refuses a corrupt-marked image read/write (EACCES) and reads it read-only', async () => {
    const f = await healthyImage(dir, 'corrupt-bit');
    poke(f, 72, be64(2));
    const err = await expectRefusedOpen(f, 'incompatible_features');
    expect(err.code).toBe('EACCES');
    const ro = await openImage(f, { format: 'qcow2', readOnly: true });
    try {
      expect((await ro.read(100 * C, 16)).every((b) => b === 2)).toBe(true);
    } finally {
      await ro.close();
    }
  });
});

describe('damage found while running is refused without a write', () => {
  it('an L2 entry pointing into the refcount table: the write is refused, the file unchanged', async () => {
    const f = await healthyImage(dir, 'l2-into-reftable');
    const l1 = u64(f, L1_OFFSET);
    const l2 = u64(f, l1) & 0x00fffffffffffe00;
    const reftable = u64(f, REFTABLE_OFFSET);
    // guest cluster 100: make its entry point at the refcount table, COPIED set (in-place write path)
    poke(f, l2 + 100 * 8, be64((1n << 63n) | BigInt(reftable)));
    const before = digest(f);
    const img = await openImage(f, { format: 'qcow2' });
    try {
      const err = await refusal(() => img.write(100 * C + 512, new Uint8Array(512).fill(9)));
      expect(err.code).toBe('EIO');
      expect(err.field).toBe('l2_table');
      expect(err.message).toMatch(/refcount table/);
    } finally {
      await img.close();
    }
    expect(digest(f)).toBe(before);
  });

  it('a refcount at its maximum: a snapshot that would overflow it is refused, nothing written', async () => {
    const f = path.join(dir, 'refcount-max.qcow2');
    withBqlSync((bql) => createQcow2File(bql, f, { sizeBytes: 16 * MiB, refcountBits: 8 }));
    const img0 = await openImage(f, { format: 'qcow2' });
    try {
      await img0.write(0, new Uint8Array(C).fill(5));
    } finally {
      await img0.close();
    }
    const l1 = u64(f, L1_OFFSET);
    const l2 = u64(f, l1) & 0x00fffffffffffe00;
    const data = u64(f, l2) & 0x00fffffffffffe00;
    const refblock = u64(f, u64(f, REFTABLE_OFFSET));
    poke(f, refblock + data / C, Buffer.from([0xff])); // 8-bit refcount of the data cluster: 255
    const before = digest(f);
    const img = await openImage(f, { format: 'qcow2' });
    try {
      const err = await refusal(() => img.createSnapshot('overflow'));
      expect(err.code).toBe('EFBIG');
      expect(err.field).toBe('refcount_bits');
      expect(await img.snapshots()).toEqual([]);
    } finally {
      await img.close();
    }
    expect(digest(f)).toBe(before);
  });
});

describe('repairs and writes never touch what they must not', () => {
  /** Guest cluster 100's L2 entry (the healthy image's only L2 table). */
  function l2EntryAt(f: string, cluster: number): number {
    const l2 = u64(f, u64(f, L1_OFFSET)) & 0x00fffffffffffe00;
    return l2 + cluster * 8;
  }

  it('an unaligned preallocated zero cluster: the write over it is refused and nothing is written', async () => {
    const f = await healthyImage(dir, 'unaligned-zero-alloc');
    // guest cluster 40: "preallocated zero" at host offset 0x2a00, inside the header's cluster
    poke(f, l2EntryAt(f, 40), be64((1n << 63n) | 0x2a01n));
    const before = digest(f);
    const img = await openImage(f, { format: 'qcow2' });
    try {
      const err = await refusal(() => img.write(40 * C, new Uint8Array(C).fill(5)));
      expect(err.code).toBe('EIO');
      expect(err.message).toMatch(/unaligned/);
    } finally {
      await img.close();
    }
    expect(digest(f)).toBe(before);
  });

  it('check -r all turns the unaligned preallocated zero cluster into a plain zero cluster; the header keeps its refcount', async () => {
    const f = await healthyImage(dir, 'unaligned-zero-alloc-repair');
    poke(f, l2EntryAt(f, 40), be64((1n << 63n) | 0x2a01n));
    const lines: string[] = [];
    expect(await imgCheck([f], () => undefined, (s) => lines.push(s))).toBe(2);
    expect(lines.join('\n')).toMatch(/ERROR offset=2a00: Preallocated cluster is not properly aligned; L2 entry corrupted\./);
    expect(await imgCheck(['-r', 'all', f], () => undefined, (s) => lines.push(s))).toBe(0);
    expect(fs.readFileSync(f).readBigUInt64BE(l2EntryAt(f, 40))).toBe(1n);
    expect(await imgCheck([f], () => undefined, () => undefined)).toBe(0);
  });

  it('check -r all over a zeroed refcount-table entry rebuilds elsewhere: cluster 0 changes only in the refcount-table pointer', async () => {
    const f = await healthyImage(dir, 'zeroed-reftable-entry');
    poke(f, u64(f, REFTABLE_OFFSET), be64(0));
    const header = Buffer.from(fs.readFileSync(f).subarray(0, C));
    const oldTable = u64(f, REFTABLE_OFFSET);
    const guest = await (async () => {
      const ro = await openImage(f, { format: 'qcow2', readOnly: true });
      try {
        return Buffer.from(await ro.read(0, 2 * 1024 * 1024));
      } finally {
        await ro.close();
      }
    })();
    const lines: string[] = [];
    expect(await imgCheck(['-r', 'all', f], () => undefined, (s) => lines.push(s))).toBe(0);
    expect(lines).toContain('Rebuilding refcount structure');
    const after = Buffer.from(fs.readFileSync(f).subarray(0, C));
    expect(u64(f, REFTABLE_OFFSET)).not.toBe(oldTable);
    expect(u64(f, REFTABLE_OFFSET) % C).toBe(0);
    // every byte of the header cluster but refcount_table_offset/clusters (48..59) is as it was
    header.copy(after, 48, 48, 60);
    expect(after.equals(header)).toBe(true);
    const img = await openImage(f, { format: 'qcow2' });
    try {
      expect(Buffer.from(await img.read(0, 2 * 1024 * 1024)).equals(guest)).toBe(true);
      await img.write(200 * C, new Uint8Array(C).fill(8)); // allocation works on the rebuilt structure
    } finally {
      await img.close();
    }
    expect(await imgCheck([f], () => undefined, () => undefined)).toBe(0);
  });

  it('check -r leaks refuses to rebuild (an error, nothing written): only -r all may', async () => {
    const f = await healthyImage(dir, 'zeroed-reftable-leaks');
    poke(f, u64(f, REFTABLE_OFFSET), be64(0));
    const before = digest(f);
    const lines: string[] = [];
    expect(await imgCheck(['-r', 'leaks', f], () => undefined, (s) => lines.push(s))).toBe(1);
    expect(lines).toContain('ERROR need to rebuild refcount structures'); // what was found is still said
    expect(lines.join('\n')).toMatch(/Check failed: .*refcount structure must be rebuilt/);
    expect(digest(f)).toBe(before);
  });

  it('check of L2 entries pointing far past the end of the file: errors counted, no V8 error, nothing allocated for them', async () => {
    const f = await healthyImage(dir, 'l2-far-past-end');
    for (const [i, off] of [[60, 1n << 54n], [61, (1n << 55n) - 0x10000n], [62, 1n << 40n]] as const) poke(f, l2EntryAt(f, i), be64(off)); // COPIED clear: refcount 0 is then no COPIED error
    const lines: string[] = [];
    const out: string[] = [];
    expect(await imgCheck(['--output=json', f], (s) => out.push(s), (s) => lines.push(s))).toBe(2);
    expect(lines.filter((l) => /exceeding the end of the file/.test(l))).toHaveLength(3);
    expect(lines.join('\n')).not.toMatch(/RangeError|TypeError|Invalid typed array/);
    expect((JSON.parse(out.join('\n')) as { corruptions: number }).corruptions).toBe(3);
  });

  it('unknown autoclear bits are cleared by a read/write open (one flushed write of the field), kept by a read-only one', async () => {
    const f = await healthyImage(dir, 'autoclear');
    poke(f, 88, be64((1n << 33n) | 1n));
    const before = fs.readFileSync(f);
    const ro = await openImage(f, { format: 'qcow2', readOnly: true });
    await ro.close();
    expect(fs.readFileSync(f).equals(before)).toBe(true);
    const img = await openImage(f, { format: 'qcow2' });
    try {
      expect(fs.readFileSync(f).readBigUInt64BE(88)).toBe(0n);
      await img.write(0, new Uint8Array(512).fill(4));
    } finally {
      await img.close();
    }
    const after = fs.readFileSync(f);
    expect(after.readBigUInt64BE(88)).toBe(0n);
    // the rest of the header is untouched
    expect(after.subarray(0, 88).equals(before.subarray(0, 88))).toBe(true);
    expect(after.subarray(96, 512).equals(before.subarray(96, 512))).toBe(true);
  });

  it("io -c 'read 0 999G' and a 3G write are refused with qemu-io's words, no V8 error", async () => {
    const f = await healthyImage(dir, 'io-huge');
    const lines: string[] = [];
    expect(await ioMain(['-c', 'read 0 999G', f], (s) => lines.push(s), (s) => lines.push(s))).toBe(1);
    expect(await ioMain(['-c', 'write 0 3G', f], (s) => lines.push(s), (s) => lines.push(s))).toBe(1);
    expect(lines).toEqual(['length cannot exceed 2147483136, given 999G', 'length cannot exceed 2147483136 without -n, given 3G']);
  });
});

import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BlockError } from '../../block/errors.js';
import { describeInterop } from '../../../test/helpers/qemu.js';
import { EXT_BACKING_FORMAT, EXT_FEATURE_TABLE } from './constants.js';
import { headerBackingFileOffset, newHeader, parseHeader, qemuFeatureTable, serializeHeader } from './header.js';
import type { Qcow2Header } from './types.js';

/** The first 112 bytes of `qemu-img create -f qcow2 x.qcow2 64M` (qemu-img 7.2). */
const QEMU_HEADER_HEX =
  '514649fb000000030000000000000000000000000000001000000000040000000000000000000001000000000003000000000000000100000000000100000000' +
  '000000000000000000000000000000000000000000000000000000000000000000000004000000700000000000000000';
/** Bytes 0x70..0x1f7 of the same image: the feature-name table extension. */
const QEMU_FEATURE_TABLE_HEX = [
  '6803f8570000018000006469727479206269740000000000000000000000000000000000000000000000000000000000',
  '00000000000000000001636f727275707420626974000000000000000000000000000000000000000000000000000000',
  '0000000000000000000265787465726e616c20646174612066696c650000000000000000000000000000000000000000',
  '00000000000000000003636f6d7072657373696f6e207479706500000000000000000000000000000000000000000000',
  '00000000000000000004657874656e646564204c3220656e747269657300000000000000000000000000000000000000',
  '000000000000000001006c617a7920726566636f756e7473000000000000000000000000000000000000000000000000',
  '000000000000000002006269746d61707300000000000000000000000000000000000000000000000000000000000000',
  '000000000000000002017261772065787465726e616c2064617461000000000000000000000000000000000000000000',
  '0000000000000000',
].join('');
/** That image's length: 3 clusters and the 8-byte L1 table. */
const FILE_LEN = 196616;
const CLUSTER = 65536;

function hex(s: string): Uint8Array {
  return Uint8Array.from(Buffer.from(s, 'hex'));
}

/** The first cluster of a fresh qemu-img 7.2 image (64 MiB, v3, 64 KiB clusters). */
function good(): Uint8Array {
  const buf = new Uint8Array(CLUSTER);
  buf.set(hex(QEMU_HEADER_HEX), 0);
  buf.set(hex(QEMU_FEATURE_TABLE_HEX), 0x70);
  return buf;
}

function view(b: Uint8Array): DataView {
  return new DataView(b.buffer, b.byteOffset, b.byteLength);
}

function setU64(b: Uint8Array, off: number, v: bigint): void {
  view(b).setBigUint64(off, v);
}

function setU32(b: Uint8Array, off: number, v: number): void {
  view(b).setUint32(off, v);
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

/** Only BlockErrors may escape `f`. */
function onlyBlockErrors(f: () => unknown): void {
  try {
    f();
  } catch (e) {
    if (!(e instanceof BlockError)) throw e;
  }
}

describe('parseHeader on a qemu-img 7.2 header', () => {
  it('reads every field of a fresh v3 image', () => {
    const h = parseHeader(good(), FILE_LEN, 'x.qcow2');
    expect(h).toMatchObject({
      version: 3,
      backingFileOffset: 0,
      backingFileSize: 0,
      clusterBits: 16,
      size: 64 * 1024 * 1024,
      cryptMethod: 0,
      l1Size: 1,
      l1TableOffset: 0x30000,
      refcountTableOffset: 0x10000,
      refcountTableClusters: 1,
      nbSnapshots: 0,
      snapshotsOffset: 0,
      incompatibleFeatures: 0n,
      compatibleFeatures: 0n,
      autoclearFeatures: 0n,
      refcountOrder: 4,
      headerLength: 112,
      compressionType: 0,
      backingFile: null,
    });
    expect(h.extensions).toHaveLength(1);
    expect(h.extensions[0]?.type).toBe(EXT_FEATURE_TABLE);
    expect(h.extensions[0]?.data).toEqual(hex(QEMU_FEATURE_TABLE_HEX).subarray(8));
  });

  it('serializes the parsed header back to the same cluster', () => {
    const buf = good();
    expect(serializeHeader(parseHeader(buf, FILE_LEN, 'x.qcow2'), CLUSTER)).toEqual(buf);
  });

  it('builds the feature-name table byte for byte as qemu-img does', () => {
    const ft = qemuFeatureTable();
    expect(ft.type).toBe(0x6803f857);
    expect(ft.data.length).toBe(8 * 48);
    const bytes = new Uint8Array(8 + ft.data.length);
    view(bytes).setUint32(0, ft.type);
    view(bytes).setUint32(4, ft.data.length);
    bytes.set(ft.data, 8);
    expect(Buffer.from(bytes).toString('hex')).toBe(QEMU_FEATURE_TABLE_HEX);
  });

  it('serializes a new header with the tables filled in exactly as qemu-img creates it', () => {
    const h = newHeader({ sizeBytes: 64 * 1024 * 1024, clusterBits: 16, refcountOrder: 4, version: 3, lazyRefcounts: false });
    expect(h.l1Size).toBe(1);
    h.l1TableOffset = 0x30000;
    h.refcountTableOffset = 0x10000;
    h.refcountTableClusters = 1;
    expect(serializeHeader(h, CLUSTER)).toEqual(good());
  });

  it('keeps the corrupt and dirty bits for the driver to decide on', () => {
    const buf = good();
    setU64(buf, 72, 3n);
    expect(parseHeader(buf, FILE_LEN, 'x.qcow2').incompatibleFeatures).toBe(3n);
  });

  it('accepts an image without extensions that ends its header area without an end marker', () => {
    const buf = good().subarray(0, 0x70);
    // only the header is present: the area after it is empty
    expect(parseHeader(buf, FILE_LEN, 'x.qcow2').extensions).toEqual([]);
  });
});

describe('newHeader and serializeHeader', () => {
  it('creates a v2 header of 72 bytes with no extensions, then an end marker', () => {
    const h = newHeader({ sizeBytes: 1 << 30, clusterBits: 16, refcountOrder: 4, version: 2, lazyRefcounts: false });
    expect(h.headerLength).toBe(72);
    expect(h.extensions).toEqual([]);
    h.l1TableOffset = 0x30000;
    h.refcountTableOffset = 0x10000;
    h.refcountTableClusters = 1;
    const bytes = serializeHeader(h, CLUSTER);
    expect(bytes.length).toBe(CLUSTER);
    expect(view(bytes).getUint32(4)).toBe(2);
    expect(bytes.subarray(72).every((b) => b === 0)).toBe(true);
    const back = parseHeader(bytes, FILE_LEN, 'v2.qcow2');
    expect(back).toEqual(h);
  });

  it('sets the lazy refcounts bit and refuses it for v2', () => {
    expect(newHeader({ sizeBytes: 0, clusterBits: 16, refcountOrder: 4, version: 3, lazyRefcounts: true }).compatibleFeatures).toBe(1n);
    expect(blockError(() => newHeader({ sizeBytes: 0, clusterBits: 16, refcountOrder: 4, version: 2, lazyRefcounts: true })).code).toBe('EINVAL');
    expect(blockError(() => newHeader({ sizeBytes: 0, clusterBits: 16, refcountOrder: 3, version: 2, lazyRefcounts: false })).code).toBe('EINVAL');
    expect(blockError(() => newHeader({ sizeBytes: 0, clusterBits: 8, refcountOrder: 4, version: 3, lazyRefcounts: false })).code).toBe('EINVAL');
  });

  it('keeps unknown extensions in order with their padding and places the backing file name after the end marker', () => {
    const h = parseHeader(good(), FILE_LEN, 'x.qcow2');
    h.extensions = [{ type: 0x12345678, data: Uint8Array.of(1, 2, 3) }, ...h.extensions, { type: 0xabcdef01, data: new Uint8Array(0) }];
    h.backingFile = 'base image ü.qcow2';
    const bytes = serializeHeader(h, CLUSTER);
    const v = view(bytes);
    expect(v.getUint32(112)).toBe(0x12345678);
    expect(v.getUint32(116)).toBe(3);
    expect([...bytes.subarray(120, 128)]).toEqual([1, 2, 3, 0, 0, 0, 0, 0]);
    const endMarker = 128 + 8 + 384 + 8;
    expect(v.getBigUint64(endMarker)).toBe(0n);
    expect(headerBackingFileOffset(h)).toBe(endMarker + 8);
    expect(Number(v.getBigUint64(8))).toBe(endMarker + 8);
    const back = parseHeader(bytes, FILE_LEN, 'x.qcow2');
    expect(back.extensions).toEqual(h.extensions);
    expect(back.backingFile).toBe('base image ü.qcow2');
    expect(back.backingFileOffset).toBe(endMarker + 8);
    expect(back.backingFileSize).toBe(Buffer.byteLength('base image ü.qcow2'));
  });

  it('reads no compression type from a 104-byte v3 header and starts the extensions at 104', () => {
    const h = parseHeader(good(), FILE_LEN, 'x.qcow2');
    h.headerLength = 104;
    const bytes = serializeHeader(h, CLUSTER);
    expect(view(bytes).getUint32(104)).toBe(EXT_FEATURE_TABLE);
    const back = parseHeader(bytes, FILE_LEN, 'x.qcow2');
    expect(back.compressionType).toBe(0);
    expect(back.headerLength).toBe(104);
    expect(back.extensions).toEqual(h.extensions);
  });

  it('refuses with EFBIG a header that does not fit in one cluster', () => {
    const h = newHeader({ sizeBytes: 1 << 20, clusterBits: 9, refcountOrder: 4, version: 3, lazyRefcounts: false });
    // 112 + 8 + 384 + 8 = 512: exactly one cluster, as qemu-img does with cluster_size=512
    expect(serializeHeader(h, 512).length).toBe(512);
    h.backingFile = 'b';
    expect(blockError(() => serializeHeader(h, 512)).code).toBe('EFBIG');
  });

  it('refuses to store v3 fields in a v2 header', () => {
    const h = newHeader({ sizeBytes: 1 << 20, clusterBits: 16, refcountOrder: 4, version: 2, lazyRefcounts: false });
    h.incompatibleFeatures = 1n;
    expect(blockError(() => serializeHeader(h, CLUSTER)).code).toBe('EINVAL');
  });
});

interface Refusal {
  what: string;
  patch: (b: Uint8Array) => void;
  code: BlockError['code'];
  field: string;
  message: string;
}

const refusals: Refusal[] = [
  { what: 'a bad magic', patch: (b) => setU32(b, 0, 0x12345678), code: 'EINVAL', field: 'magic', message: 'Image is not in qcow2 format' },
  { what: 'version 4', patch: (b) => setU32(b, 4, 4), code: 'ENOTSUP', field: 'version', message: 'Unsupported qcow2 version 4' },
  { what: 'version 1', patch: (b) => setU32(b, 4, 1), code: 'ENOTSUP', field: 'version', message: 'Unsupported qcow2 version 1' },
  { what: 'cluster_bits 8', patch: (b) => setU32(b, 20, 8), code: 'EINVAL', field: 'cluster_bits', message: 'Unsupported cluster size: 2^8' },
  { what: 'cluster_bits 22', patch: (b) => setU32(b, 20, 22), code: 'EINVAL', field: 'cluster_bits', message: 'Unsupported cluster size: 2^22' },
  { what: 'a v3 header_length of 96', patch: (b) => setU32(b, 100, 96), code: 'EINVAL', field: 'header_length', message: 'header_length' },
  { what: 'a header_length not a multiple of 8', patch: (b) => setU32(b, 100, 108), code: 'EINVAL', field: 'header_length', message: 'multiple of 8' },
  {
    what: 'a header_length larger than the cluster',
    patch: (b) => {
      setU32(b, 20, 9);
      setU32(b, 100, 520);
    },
    code: 'EINVAL',
    field: 'header_length',
    message: 'exceeds cluster size',
  },
  { what: 'refcount_order 7', patch: (b) => setU32(b, 96, 7), code: 'EINVAL', field: 'refcount_order', message: 'refcount_order' },
  {
    what: 'an unknown incompatible feature bit 8',
    patch: (b) => setU64(b, 72, 0x100n),
    code: 'ENOTSUP',
    field: 'incompatible_features',
    message: 'Unsupported qcow2 feature(s): Unknown incompatible feature: 100',
  },
  {
    what: 'an unknown incompatible feature bit 40',
    patch: (b) => setU64(b, 72, 1n << 40n),
    code: 'ENOTSUP',
    field: 'incompatible_features',
    message: 'Unknown incompatible feature: 10000000000',
  },
  {
    what: 'the external data file feature',
    patch: (b) => setU64(b, 72, 4n),
    code: 'ENOTSUP',
    field: 'incompatible_features',
    message: 'external data file',
  },
  {
    what: 'the compression type feature',
    patch: (b) => setU64(b, 72, 8n),
    code: 'ENOTSUP',
    field: 'incompatible_features',
    message: 'compression type',
  },
  {
    what: 'the extended L2 feature',
    patch: (b) => setU64(b, 72, 16n),
    code: 'ENOTSUP',
    field: 'incompatible_features',
    message: 'extended L2 entries',
  },
  { what: 'compression type zstd', patch: (b) => (b[104] = 1), code: 'ENOTSUP', field: 'compression_type', message: 'compression type' },
  { what: 'an encrypted image', patch: (b) => setU32(b, 32, 1), code: 'ENOTSUP', field: 'crypt_method', message: 'encrypted images are not supported' },
  { what: 'an L1 table over 32 MiB', patch: (b) => setU32(b, 36, 0x400001), code: 'EFBIG', field: 'l1_size', message: 'Active L1 table too large' },
  { what: 'an unaligned L1 table', patch: (b) => setU64(b, 40, 0x30200n), code: 'EINVAL', field: 'l1_table_offset', message: 'Active L1 table offset invalid' },
  { what: 'an L1 table smaller than the disk needs', patch: (b) => setU32(b, 36, 0), code: 'EINVAL', field: 'l1_size', message: 'L1 table is too small' },
  {
    what: 'a disk larger than its L1 table maps',
    patch: (b) => setU64(b, 24, (1n << 29n) + 1n),
    code: 'EINVAL',
    field: 'l1_size',
    message: 'L1 table is too small',
  },
  {
    what: 'an unaligned refcount table',
    patch: (b) => setU64(b, 48, 0x10200n),
    code: 'EINVAL',
    field: 'refcount_table_offset',
    message: 'Reference count table offset invalid',
  },
  {
    what: 'a refcount table at offset 0',
    patch: (b) => setU64(b, 48, 0n),
    code: 'EINVAL',
    field: 'refcount_table_offset',
    message: 'Reference count table offset invalid',
  },
  {
    what: 'a refcount table over 8 MiB',
    patch: (b) => setU32(b, 56, 129),
    code: 'EFBIG',
    field: 'refcount_table_clusters',
    message: 'Reference count table too large',
  },
  {
    what: 'an empty refcount table',
    patch: (b) => setU32(b, 56, 0),
    code: 'EINVAL',
    field: 'refcount_table_clusters',
    message: 'reference count table',
  },
  { what: '65537 snapshots', patch: (b) => setU32(b, 60, 65537), code: 'EFBIG', field: 'nb_snapshots', message: 'Snapshot table too large' },
  {
    what: 'an unaligned snapshot table',
    patch: (b) => {
      setU32(b, 60, 1);
      setU64(b, 64, 0x10008n);
    },
    code: 'EINVAL',
    field: 'snapshots_offset',
    message: 'Snapshot table offset invalid',
  },
  { what: 'a size of 2^53', patch: (b) => setU64(b, 24, 1n << 53n), code: 'EFBIG', field: 'size', message: 'size' },
  { what: 'an L1 table offset of 2^56', patch: (b) => setU64(b, 40, 1n << 56n), code: 'EFBIG', field: 'l1_table_offset', message: 'l1_table_offset' },
  {
    what: 'a refcount table offset of 2^63',
    patch: (b) => setU64(b, 48, 1n << 63n),
    code: 'EFBIG',
    field: 'refcount_table_offset',
    message: 'refcount_table_offset',
  },
  {
    what: 'a snapshot table offset of 2^54',
    patch: (b) => {
      setU32(b, 60, 1);
      setU64(b, 64, 1n << 54n);
    },
    code: 'EFBIG',
    field: 'snapshots_offset',
    message: 'snapshots_offset',
  },
  {
    what: 'an L1 table past the end of the file',
    patch: (b) => setU64(b, 40, 0x40000n),
    code: 'EINVAL',
    field: 'l1_table_offset',
    message: 'Active L1 table offset invalid: past the end of the file',
  },
  {
    what: 'a refcount table past the end of the file',
    patch: (b) => setU64(b, 48, 0x40000n),
    code: 'EINVAL',
    field: 'refcount_table_offset',
    message: 'Reference count table offset invalid: past the end of the file',
  },
  {
    what: 'a snapshot table past the end of the file',
    patch: (b) => {
      setU32(b, 60, 2);
      setU64(b, 64, 0x40000n);
    },
    code: 'EINVAL',
    field: 'snapshots_offset',
    message: 'Snapshot table offset invalid: past the end of the file',
  },
  {
    what: 'a backing file name of 1024 bytes',
    patch: (b) => {
      setU64(b, 8, 0x200n);
      setU32(b, 16, 1024);
    },
    code: 'EINVAL',
    field: 'backing_file_size',
    message: 'Backing file name too long',
  },
  {
    what: 'a backing file name running out of the first cluster',
    patch: (b) => {
      setU64(b, 8, 0xfff0n);
      setU32(b, 16, 100);
    },
    code: 'EINVAL',
    field: 'backing_file_offset',
    message: 'backing_file_offset',
  },
  {
    what: 'a header extension running out of the first cluster',
    patch: (b) => setU32(b, 0x74, 0x10000),
    code: 'EINVAL',
    field: 'header_extensions',
    message: '0x6803f857',
  },
  {
    what: 'a header extension running into the backing file name',
    patch: (b) => {
      setU64(b, 8, 0x100n);
      setU32(b, 16, 4);
    },
    code: 'EINVAL',
    field: 'header_extensions',
    message: '0x6803f857',
  },
];

describe('parseHeader refusals', () => {
  for (const r of refusals) {
    it(`refuses ${r.what} with ${r.code}, naming the field ${r.field}`, () => {
      const buf = good();
      r.patch(buf);
      const e = blockError(() => parseHeader(buf, FILE_LEN, 'bad.qcow2'));
      expect(e.code).toBe(r.code);
      expect(e.field).toBe(r.field);
      expect(e.file).toBe('bad.qcow2');
      expect(e.message).toContain(r.message);
      expect(e.message).toContain(r.field);
      expect(e.message).toContain('bad.qcow2');
    });
  }

  it('names an unknown incompatible bit from the feature-name table when the image has one', () => {
    const buf = good();
    // rename entry 4 ("extended L2 entries") to describe bit 9
    buf[0x78 + 4 * 48 + 1] = 9;
    setU64(buf, 72, (1n << 9n) | (1n << 8n));
    const e = blockError(() => parseHeader(buf, FILE_LEN, 'x.qcow2'));
    expect(e.code).toBe('ENOTSUP');
    expect(e.message).toContain('Unsupported qcow2 feature(s): extended L2 entries, Unknown incompatible feature: 100');
  });

  it('refuses a buffer shorter than a header', () => {
    expect(blockError(() => parseHeader(good().subarray(0, 50), 50, 'x.qcow2')).code).toBe('EINVAL');
    expect(blockError(() => parseHeader(new Uint8Array(0), 0, 'x.qcow2')).code).toBe('EINVAL');
  });

  it('never throws anything but a BlockError for random mutations of a valid header', () => {
    fc.assert(
      fc.property(
        fc.array(fc.record({ pos: fc.nat({ max: 0x1ff }), value: fc.nat({ max: 255 }) }), { minLength: 1, maxLength: 8 }),
        fc.constantFrom(FILE_LEN, 0, 1 << 20),
        (muts, fileLen) => {
          const buf = good();
          for (const m of muts) buf[m.pos] = m.value;
          onlyBlockErrors(() => parseHeader(buf, fileLen, 'fuzz.qcow2'));
        },
      ),
      { numRuns: 2000 },
    );
  });

  it('never throws anything but a BlockError for random header fields', () => {
    const fieldAt = [0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60, 64, 68, 72, 76, 80, 88, 96, 100, 104, 0x70, 0x74] as const;
    const value = fc.oneof(fc.nat({ max: 0xffffffff }), fc.nat({ max: 130 }), fc.constantFrom(0x100, 0x200, 0x1000, 0x10000, 0x30000, 0x40000));
    fc.assert(
      fc.property(fc.array(fc.tuple(fc.constantFrom(...fieldAt), value), { maxLength: 6 }), (sets) => {
        const buf = good();
        for (const [at, v] of sets) setU32(buf, at, v);
        onlyBlockErrors(() => {
          const h = parseHeader(buf, FILE_LEN, 'fuzz.qcow2');
          // whatever parses must serialize (or be refused) without anything but a BlockError
          serializeHeader(h, 2 ** h.clusterBits);
        });
      }),
      { numRuns: 2000 },
    );
  });

  it('never throws anything but a BlockError for random buffers of up to 4096 bytes', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 4096 }), fc.boolean(), fc.nat(), (bytes, withMagic, fileLen) => {
        const buf = new Uint8Array(bytes);
        if (withMagic && buf.length >= 8) {
          setU32(buf, 0, 0x514649fb);
          setU32(buf, 4, 2 + (buf[7] ?? 0) % 2);
        }
        onlyBlockErrors(() => parseHeader(buf, fileLen, 'fuzz.qcow2'));
      }),
      { numRuns: 1000 },
    );
  });
});

describeInterop('qcow2 header against qemu-img 7.2', () => {
  let dir = '';
  beforeAll(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-header-'));
  });
  afterAll(() => {
    fs.rmSync(dir, { recursive: true, force: true });
  });

  /** Creates an image with qemu-img and returns its path, length and first cluster as parsed. */
  function create(name: string, opts: string[], size = '64M'): { file: string; len: number; buf: Uint8Array; h: Qcow2Header } {
    const file = path.join(dir, name);
    execFileSync('qemu-img', ['create', '-f', 'qcow2', ...opts, file, ...(size === '' ? [] : [size])], { stdio: 'ignore' });
    const all = fs.readFileSync(file);
    const clusterBits = all.readUInt32BE(20);
    const buf = Uint8Array.from(all.subarray(0, Math.min(all.length, 2 ** clusterBits)));
    return { file, len: all.length, buf, h: parseHeader(buf, all.length, file) };
  }

  /** The bytes up to and including the extensions' end marker (and the backing file name). */
  function headerArea(h: Qcow2Header): number {
    let off = h.headerLength;
    for (const e of h.extensions) off += 8 + Math.ceil(e.data.length / 8) * 8;
    return off + 8 + h.backingFileSize;
  }

  function expectRoundTrip(buf: Uint8Array, h: Qcow2Header): void {
    const out = serializeHeader(h, 2 ** h.clusterBits);
    const n = headerArea(h);
    expect(Buffer.from(out.subarray(0, n)).toString('hex')).toBe(Buffer.from(buf.subarray(0, n)).toString('hex'));
    // a fresh image has nothing else in cluster 0 (compared as buffers: toEqual is slow on 2 MiB)
    expect(out.length).toBe(buf.length);
    expect(Buffer.from(out).equals(Buffer.from(buf))).toBe(true);
  }

  it('parses a default v3 image and writes its header back byte for byte', () => {
    const { buf, h } = create('v3.qcow2', []);
    expect(h).toMatchObject({ version: 3, clusterBits: 16, size: 64 << 20, l1Size: 1, refcountOrder: 4, headerLength: 112, compressionType: 0 });
    expect(h.extensions).toEqual([qemuFeatureTable()]);
    expect(Buffer.from(buf.subarray(0x70, 0x1f8)).toString('hex')).toBe(QEMU_FEATURE_TABLE_HEX);
    expectRoundTrip(buf, h);
  });

  it('parses a compat=0.10 (v2) image and writes its header back byte for byte', () => {
    const { buf, h } = create('v2.qcow2', ['-o', 'compat=0.10']);
    expect(h).toMatchObject({ version: 2, headerLength: 72, refcountOrder: 4, incompatibleFeatures: 0n, extensions: [], l1Size: 1 });
    expectRoundTrip(buf, h);
    const fresh = newHeader({ sizeBytes: 64 << 20, clusterBits: 16, refcountOrder: 4, version: 2, lazyRefcounts: false });
    expect({ ...fresh, l1TableOffset: h.l1TableOffset, refcountTableOffset: h.refcountTableOffset, refcountTableClusters: 1 }).toEqual(h);
  });

  it('parses 512-byte clusters with 1-bit refcounts', () => {
    const { buf, h } = create('c512.qcow2', ['-o', 'cluster_size=512,refcount_bits=1']);
    expect(h).toMatchObject({ clusterBits: 9, refcountOrder: 0, l1Size: 2048 });
    expectRoundTrip(buf, h);
  });

  it('parses 2 MiB clusters with 64-bit refcounts', () => {
    const { buf, h } = create('c2m.qcow2', ['-o', 'cluster_size=2M,refcount_bits=64']);
    expect(h).toMatchObject({ clusterBits: 21, refcountOrder: 6, l1Size: 1 });
    expectRoundTrip(buf, h);
  });

  it('parses the lazy refcounts bit', () => {
    const { buf, h } = create('lazy.qcow2', ['-o', 'lazy_refcounts=on']);
    expect(h.compatibleFeatures).toBe(1n);
    expectRoundTrip(buf, h);
    const fresh = newHeader({ sizeBytes: 64 << 20, clusterBits: 16, refcountOrder: 4, version: 3, lazyRefcounts: true });
    expect(serializeHeader({ ...fresh, l1TableOffset: h.l1TableOffset, refcountTableOffset: h.refcountTableOffset, refcountTableClusters: 1 }, CLUSTER)).toEqual(buf);
  });

  it('parses a backing file name and the backing format extension and writes them back byte for byte', () => {
    create('base.qcow2', []);
    const { buf, h } = create('overlay.qcow2', ['-b', 'base.qcow2', '-F', 'qcow2'], '');
    expect(h.backingFile).toBe('base.qcow2');
    expect(h.extensions.map((e) => e.type)).toEqual([EXT_BACKING_FORMAT, EXT_FEATURE_TABLE]);
    expect(Buffer.from(h.extensions[0]?.data ?? []).toString()).toBe('qcow2');
    expect(h.backingFileOffset).toBe(headerBackingFileOffset(h));
    expectRoundTrip(buf, h);
  });

  it('writes headers qemu-img accepts, unknown extensions included', () => {
    const { file, buf, h } = create('rewrite.qcow2', []);
    h.extensions = [{ type: 0x7a7a7a7a, data: Uint8Array.of(9, 8, 7, 6, 5) }, ...h.extensions];
    const out = serializeHeader(h, CLUSTER);
    const fd = fs.openSync(file, 'r+');
    fs.writeSync(fd, out, 0, out.length, 0);
    fs.closeSync(fd);
    execFileSync('qemu-img', ['check', file], { stdio: 'ignore' });
    const info = JSON.parse(execFileSync('qemu-img', ['info', '--output=json', file], { encoding: 'utf8' })) as { 'virtual-size': number };
    expect(info['virtual-size']).toBe(64 << 20);
    expect(buf.length).toBe(CLUSTER);
  });

  it('refuses an unknown incompatible bit with the message qemu-img gives', () => {
    const { file, buf } = create('bit8.qcow2', []);
    setU64(buf, 72, 0x100n);
    const fd = fs.openSync(file, 'r+');
    fs.writeSync(fd, buf, 0, 112, 0);
    fs.closeSync(fd);
    let qemuMsg = '';
    try {
      execFileSync('qemu-img', ['info', file], { stdio: ['ignore', 'pipe', 'pipe'] });
    } catch (e) {
      qemuMsg = String((e as { stderr: Buffer }).stderr);
    }
    expect(qemuMsg).toContain('Unsupported qcow2 feature(s): Unknown incompatible feature: 100');
    const err = blockError(() => parseHeader(buf, fs.statSync(file).size, file));
    expect(err.code).toBe('ENOTSUP');
    expect(err.message).toContain('Unsupported qcow2 feature(s): Unknown incompatible feature: 100');
  });
});

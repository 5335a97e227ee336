/**
 * The qcow2 header in cluster 0: parsing it (with every check QEMU makes on open, plus the ones
 * snapstack needs because its offsets are JS numbers), writing it back, and the header a fresh
 * image starts from.
 *
 * Common code: pure functions on bytes, no I/O, no lock, no calling-context rule. Nothing here
 * ever looks at more than one cluster of `buf` or allocates more than that, whatever the fields say.
 *
 * Layout (docs/interop/qcow2.txt): the fixed header (72 bytes for v2, `header_length` for v3),
 * then header extensions (u32 type, u32 length, data, zero padding to 8) up to an end marker of
 * type 0, then the backing file name, all inside the first cluster. All integers are big-endian.
 */
import { BlockError, type ErrorCode } from '../../block/errors.js';
import {
  COMPAT_LAZY_REFCOUNTS,
  EXT_END,
  EXT_BACKING_FORMAT,
  EXT_FEATURE_TABLE,
  INCOMPAT_COMPRESSION,
  INCOMPAT_DATA_FILE,
  INCOMPAT_EXTL2,
  INCOMPAT_KNOWN_MASK,
  MAX_CLUSTER_BITS,
  MAX_HOST_OFFSET,
  MAX_L1_BYTES,
  MAX_REFTABLE_BYTES,
  MAX_SNAPSHOTS,
  MIN_CLUSTER_BITS,
  QCOW_MAGIC,
  QEMU_V3_HEADER_LENGTH,
  TWO32,
  V2_HEADER_LENGTH,
  V3_HEADER_LENGTH,
} from './constants.js';
import type { HeaderExtension, Qcow2Header } from './types.js';

/** QEMU's limit on the backing file name (it keeps it in a 1024-byte buffer with the NUL). */
const MAX_BACKING_FILE_SIZE = 1023;
/** One entry of the feature-name table: u8 type, u8 bit, 46-byte name. */
const FEATURE_ENTRY_SIZE = 48;
const FEATURE_NAME_SIZE = 46;

const utf8 = new TextDecoder('utf-8');
const utf8Encoder = new TextEncoder();

/** Rounds up to a multiple of 8. */
function align8(n: number): number {
  return Math.ceil(n / 8) * 8;
}

/** Formats a field value for a message: hex for feature masks and magic numbers. */
function show(value: string | number | bigint): string {
  if (typeof value === 'bigint') return `0x${value.toString(16)}`;
  return String(value);
}

/** Throws the BlockError for a bad header field, naming the file and the field. */
function refuse(code: ErrorCode, filename: string, field: string, value: string | number | bigint, msg: string): never {
  throw new BlockError(code, `qcow2 '${filename}': ${msg} (${field}: ${show(value)})`, { file: filename, field, value });
}

/** A big-endian u64 as a JS number; values of 2^53 and above come out as >= 2^53 (inexact). */
function u64(view: DataView, off: number): number {
  return view.getUint32(off) * TWO32 + view.getUint32(off + 4);
}

/** Writes a whole number below 2^53 as a big-endian u64. */
function setU64(view: DataView, off: number, v: number): void {
  const hi = Math.floor(v / TWO32);
  view.setUint32(off, hi);
  view.setUint32(off + 4, v - hi * TWO32);
}

/** The names the feature-name table gives to incompatible feature bits (first entry wins). */
function incompatibleNames(extensions: HeaderExtension[]): Map<number, string> {
  const names = new Map<number, string>();
  const table = extensions.find((e) => e.type === EXT_FEATURE_TABLE);
  if (table === undefined) return names;
  const n = Math.floor(table.data.length / FEATURE_ENTRY_SIZE);
  for (let i = 0; i < n; i++) {
    const e = table.data.subarray(i * FEATURE_ENTRY_SIZE, (i + 1) * FEATURE_ENTRY_SIZE);
    const nameBytes = e.subarray(2);
    // QEMU stops at the first entry with an empty name
    if (nameBytes[0] === 0) break;
    const type = e[0];
    const bit = e[1] ?? 64;
    if (type !== 0 || bit >= 64 || names.has(bit)) continue;
    const nul = nameBytes.indexOf(0);
    names.set(bit, utf8.decode(nul < 0 ? nameBytes : nameBytes.subarray(0, nul)));
  }
  return names;
}

/** QEMU's report_unsupported_feature: named bits first (table order), then the unknown rest as hex. */
function unsupportedFeatureMessage(mask: bigint, extensions: HeaderExtension[]): string {
  const parts: string[] = [];
  let rest = mask;
  for (const [bit, name] of incompatibleNames(extensions)) {
    const b = 1n << BigInt(bit);
    if ((rest & b) !== 0n) {
      parts.push(name);
      rest &= ~b;
    }
  }
  if (rest !== 0n) parts.push(`Unknown incompatible feature: ${rest.toString(16)}`);
  return `Unsupported qcow2 feature(s): ${parts.join(', ')}`;
}

/**
 * Reads the header extensions from `start` up to `end` (exclusive), stopping at an end marker.
 * Returns what it could read and, when an extension overruns `end`, the error to throw.
 */
function readExtensions(
  buf: Uint8Array,
  view: DataView,
  start: number,
  end: number,
  filename: string,
): { extensions: HeaderExtension[]; error: BlockError | null } {
  const extensions: HeaderExtension[] = [];
  let off = start;
  while (off < end) {
    if (off + 8 > end) {
      // not even room for a type and a length: what is there must be (part of) an end marker
      const tail = buf.subarray(off, end);
      if (tail.every((b) => b === 0)) break;
      const error = new BlockError(
        'EINVAL',
        `qcow2 '${filename}': Header extension at offset ${off} runs past the end of the header area (${end} bytes) (header_extensions: ${off})`,
        { file: filename, field: 'header_extensions', value: off },
      );
      return { extensions, error };
    }
    const type = view.getUint32(off);
    const len = view.getUint32(off + 4);
    const typeHex = `0x${type.toString(16).padStart(8, '0')}`;
    if (len > end - (off + 8)) {
      const error = new BlockError(
        'EINVAL',
        `qcow2 '${filename}': Header extension ${typeHex} too large: ${len} bytes at offset ${off + 8} run past ${end} (header_extensions: ${typeHex})`,
        { file: filename, field: 'header_extensions', value: typeHex },
      );
      return { extensions, error };
    }
    if (type === EXT_END) break;
    extensions.push({ type, data: buf.slice(off + 8, off + 8 + len) });
    off += 8 + align8(len);
  }
  return { extensions, error: null };
}

/**
 * Parses and validates the header in `buf` (the start of the file: a cluster, or the whole file
 * if shorter) of a file `fileLength` bytes long; throws a BlockError naming the field otherwise.
 * @locking common
 */
export function parseHeader(buf: Uint8Array, fileLength: number, filename: string, opts: { checkMode?: boolean } = {}): Qcow2Header {
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  if (buf.length < V2_HEADER_LENGTH) {
    if (buf.length >= 4 && view.getUint32(0) !== QCOW_MAGIC) {
      refuse('EINVAL', filename, 'magic', `0x${view.getUint32(0).toString(16)}`, 'Image is not in qcow2 format');
    }
    refuse('EINVAL', filename, 'header_length', buf.length, `Image is not in qcow2 format: file too short for a header (${buf.length} bytes)`);
  }
  const magic = view.getUint32(0);
  if (magic !== QCOW_MAGIC) refuse('EINVAL', filename, 'magic', `0x${magic.toString(16)}`, 'Image is not in qcow2 format');
  const version = view.getUint32(4);
  if (version !== 2 && version !== 3) refuse('ENOTSUP', filename, 'version', version, `Unsupported qcow2 version ${version}`);
  const clusterBits = view.getUint32(20);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    refuse('EINVAL', filename, 'cluster_bits', clusterBits, `Unsupported cluster size: 2^${clusterBits}`);
  }
  const clusterSize = 2 ** clusterBits;

  let incompatibleFeatures = 0n;
  let compatibleFeatures = 0n;
  let autoclearFeatures = 0n;
  let refcountOrder = 4;
  let headerLength = V2_HEADER_LENGTH;
  let compressionType = 0;
  if (version === 3) {
    if (buf.length < V3_HEADER_LENGTH) {
      refuse('EINVAL', filename, 'header_length', buf.length, `qcow2 header too short: the file holds only ${buf.length} bytes`);
    }
    incompatibleFeatures = view.getBigUint64(72);
    compatibleFeatures = view.getBigUint64(80);
    autoclearFeatures = view.getBigUint64(88);
    refcountOrder = view.getUint32(96);
    headerLength = view.getUint32(100);
    if (headerLength < V3_HEADER_LENGTH) refuse('EINVAL', filename, 'header_length', headerLength, 'qcow2 header too short');
    if (headerLength % 8 !== 0) refuse('EINVAL', filename, 'header_length', headerLength, 'qcow2 header length is not a multiple of 8');
    if (headerLength > clusterSize) refuse('EINVAL', filename, 'header_length', headerLength, 'qcow2 header exceeds cluster size');
    if (headerLength > buf.length) {
      refuse('EINVAL', filename, 'header_length', headerLength, `qcow2 header runs past the end of the file (${buf.length} bytes)`);
    }
    if (headerLength > V3_HEADER_LENGTH) compressionType = buf[104] ?? 0;
  }

  // the area extensions and the backing file name may use: the first cluster, as far as we hold it
  const limit = Math.min(clusterSize, buf.length);

  const backingFileOffset = u64(view, 8);
  const backingFileSize = view.getUint32(16);
  let backingFile: string | null = null;
  if (backingFileOffset !== 0) {
    if (backingFileSize > MAX_BACKING_FILE_SIZE) {
      refuse('EINVAL', filename, 'backing_file_size', backingFileSize, 'Backing file name too long');
    }
    if (backingFileOffset > clusterSize || backingFileOffset + backingFileSize > clusterSize) {
      refuse('EINVAL', filename, 'backing_file_offset', backingFileOffset, 'Invalid backing file offset: the name must lie in the first cluster');
    }
    if (backingFileOffset + backingFileSize > buf.length) {
      refuse('EINVAL', filename, 'backing_file_offset', backingFileOffset, 'Invalid backing file offset: past the end of the file');
    }
    backingFile = utf8.decode(buf.subarray(backingFileOffset, backingFileOffset + backingFileSize));
  }

  // QEMU reads extensions up to the backing file name when there is one, else to the cluster's end
  const extEnd = backingFileOffset !== 0 ? Math.min(backingFileOffset, limit) : limit;
  const { extensions, error: extError } = readExtensions(buf, view, headerLength, extEnd, filename);

  const unknown = incompatibleFeatures & ~BigInt(INCOMPAT_KNOWN_MASK);
  if (unknown !== 0n) {
    refuse('ENOTSUP', filename, 'incompatible_features', incompatibleFeatures, unsupportedFeatureMessage(unknown, extensions));
  }
  if (extError !== null) throw extError;
  if ((incompatibleFeatures & BigInt(INCOMPAT_DATA_FILE)) !== 0n) {
    refuse('ENOTSUP', filename, 'incompatible_features', incompatibleFeatures, 'Unsupported qcow2 feature(s): external data file');
  }
  if ((incompatibleFeatures & BigInt(INCOMPAT_EXTL2)) !== 0n) {
    refuse('ENOTSUP', filename, 'incompatible_features', incompatibleFeatures, 'Unsupported qcow2 feature(s): extended L2 entries');
  }
  if ((incompatibleFeatures & BigInt(INCOMPAT_COMPRESSION)) !== 0n) {
    refuse('ENOTSUP', filename, 'incompatible_features', incompatibleFeatures, 'Unsupported qcow2 feature(s): compression type (only zlib is supported)');
  }
  if (compressionType !== 0) {
    refuse('ENOTSUP', filename, 'compression_type', compressionType, 'Unsupported qcow2 feature(s): compression type (only zlib is supported)');
  }
  if (refcountOrder > 6) {
    refuse('EINVAL', filename, 'refcount_order', refcountOrder, 'Reference count entry width too large; may not exceed 64 bits');
  }
  const cryptMethod = view.getUint32(32);
  if (cryptMethod !== 0) refuse('ENOTSUP', filename, 'crypt_method', cryptMethod, 'encrypted images are not supported');

  const size = u64(view, 24);
  if (size > MAX_HOST_OFFSET) refuse('EFBIG', filename, 'size', view.getBigUint64(24), 'Image is too big');

  // refcount table
  const refcountTableOffset = u64(view, 48);
  const refcountTableClusters = view.getUint32(56);
  if (refcountTableClusters * clusterSize > MAX_REFTABLE_BYTES) {
    refuse('EFBIG', filename, 'refcount_table_clusters', refcountTableClusters, 'Reference count table too large');
  }
  if (refcountTableOffset > MAX_HOST_OFFSET) {
    refuse('EFBIG', filename, 'refcount_table_offset', view.getBigUint64(48), 'Reference count table offset invalid: too large');
  }
  // QEMU's open accepts an aligned offset anywhere (0 and past the end included) and an empty
  // table; its check then reports every cluster's refcount and -r all rebuilds the structure. The
  // check-mode open does the same (`checkMode`); an ordinary open refuses them.
  const lenient = opts.checkMode === true;
  if (refcountTableOffset % clusterSize !== 0 || (refcountTableOffset === 0 && !lenient)) {
    refuse('EINVAL', filename, 'refcount_table_offset', refcountTableOffset, 'Reference count table offset invalid');
  }
  if (refcountTableClusters === 0 && !lenient) {
    refuse('EINVAL', filename, 'refcount_table_clusters', 0, 'Image does not contain a reference count table');
  }
  if (refcountTableOffset >= fileLength && !lenient) {
    refuse('EINVAL', filename, 'refcount_table_offset', refcountTableOffset, 'Reference count table offset invalid: past the end of the file');
  }

  // snapshot table (its total size is checked when it is read)
  const nbSnapshots = view.getUint32(60);
  const snapshotsOffset = u64(view, 64);
  if (nbSnapshots > MAX_SNAPSHOTS) refuse('EFBIG', filename, 'nb_snapshots', nbSnapshots, 'Snapshot table too large');
  if (snapshotsOffset > MAX_HOST_OFFSET) {
    refuse('EFBIG', filename, 'snapshots_offset', view.getBigUint64(64), 'Snapshot table offset invalid: too large');
  }
  if (nbSnapshots > 0) {
    if (snapshotsOffset % clusterSize !== 0) refuse('EINVAL', filename, 'snapshots_offset', snapshotsOffset, 'Snapshot table offset invalid');
    // a truncated file: QEMU's check reads the table there as zeros and reports its entries
    if (snapshotsOffset >= fileLength && !lenient) {
      refuse('EINVAL', filename, 'snapshots_offset', snapshotsOffset, 'Snapshot table offset invalid: past the end of the file');
    }
  }

  // active L1 table
  const l1Size = view.getUint32(36);
  const l1TableOffset = u64(view, 40);
  if (l1Size * 8 > MAX_L1_BYTES) refuse('EFBIG', filename, 'l1_size', l1Size, 'Active L1 table too large');
  if (l1TableOffset > MAX_HOST_OFFSET) {
    refuse('EFBIG', filename, 'l1_table_offset', view.getBigUint64(40), 'Active L1 table offset invalid: too large');
  }
  if (l1Size > 0) {
    if (l1TableOffset % clusterSize !== 0) refuse('EINVAL', filename, 'l1_table_offset', l1TableOffset, 'Active L1 table offset invalid');
    if (l1TableOffset >= fileLength) {
      refuse('EINVAL', filename, 'l1_table_offset', l1TableOffset, 'Active L1 table offset invalid: past the end of the file');
    }
  }
  // one L1 entry maps one L2 table: cluster_size / 8 clusters
  const bytesPerL1Entry = 2 ** (2 * clusterBits - 3);
  const minL1 = Math.ceil(size / bytesPerL1Entry);
  if (l1Size < minL1) refuse('EINVAL', filename, 'l1_size', l1Size, `L1 table is too small: ${minL1} entries are needed for ${size} bytes`);

  return {
    version,
    backingFileOffset,
    backingFileSize: backingFileOffset !== 0 ? backingFileSize : 0,
    clusterBits,
    size,
    cryptMethod,
    l1Size,
    l1TableOffset,
    refcountTableOffset,
    refcountTableClusters,
    nbSnapshots,
    snapshotsOffset,
    incompatibleFeatures,
    compatibleFeatures,
    autoclearFeatures,
    refcountOrder,
    headerLength,
    compressionType,
    extensions,
    backingFile,
  };
}

/** Refuses a header value serializeHeader cannot store. */
function badValue(field: string, value: string | number | bigint, msg: string): never {
  throw new BlockError('EINVAL', `qcow2 header: ${msg} (${field}: ${show(value)})`, { field, value });
}

/** Checks that `v` is a whole number in 0..max for field `field`. */
function checkRange(field: string, v: number, max: number): void {
  if (!Number.isSafeInteger(v) || v < 0 || v > max) badValue(field, v, `${field} out of range 0..${max}`);
}

/**
 * Serializes `h` into one cluster (zero-filled) to be written over cluster 0: the header, the
 * extensions in order, an end marker, then the backing file name right after the end marker.
 * `h.backingFileOffset` and `h.backingFileSize` are ignored: the bytes carry the computed values
 * (what QEMU does too); `headerBackingFileOffset(h)` tells where the name lands.
 * @locking common
 */
export function serializeHeader(h: Qcow2Header, clusterSize: number): Uint8Array {
  const version = h.version;
  if (version !== 2 && version !== 3) badValue('version', version, `cannot write qcow2 version ${String(version)}`);
  const headerLength = version === 2 ? V2_HEADER_LENGTH : h.headerLength;
  if (version === 3 && (headerLength < V3_HEADER_LENGTH || headerLength % 8 !== 0)) {
    badValue('header_length', headerLength, 'a v3 header length must be at least 104 and a multiple of 8');
  }
  if (version === 2) {
    if (h.incompatibleFeatures !== 0n || h.compatibleFeatures !== 0n || h.autoclearFeatures !== 0n) {
      badValue('incompatible_features', h.incompatibleFeatures, 'feature bits cannot be stored in a version 2 header');
    }
    if (h.refcountOrder !== 4) badValue('refcount_order', h.refcountOrder, 'a version 2 image has 16-bit refcounts');
    if (h.compressionType !== 0) badValue('compression_type', h.compressionType, 'a version 2 image has no compression type');
  }
  if (version === 3 && headerLength <= V3_HEADER_LENGTH && h.compressionType !== 0) {
    badValue('compression_type', h.compressionType, 'a 104-byte header has no compression type');
  }
  checkRange('cluster_bits', h.clusterBits, 63);
  checkRange('size', h.size, MAX_HOST_OFFSET);
  checkRange('crypt_method', h.cryptMethod, 0xffffffff);
  checkRange('l1_size', h.l1Size, 0xffffffff);
  checkRange('l1_table_offset', h.l1TableOffset, MAX_HOST_OFFSET);
  checkRange('refcount_table_offset', h.refcountTableOffset, MAX_HOST_OFFSET);
  checkRange('refcount_table_clusters', h.refcountTableClusters, 0xffffffff);
  checkRange('nb_snapshots', h.nbSnapshots, 0xffffffff);
  checkRange('snapshots_offset', h.snapshotsOffset, MAX_HOST_OFFSET);
  checkRange('refcount_order', h.refcountOrder, 0xffffffff);
  checkRange('compression_type', h.compressionType, 0xff);

  const backing = h.backingFile === null ? null : utf8Encoder.encode(h.backingFile);
  if (backing !== null && backing.length > MAX_BACKING_FILE_SIZE) {
    badValue('backing_file_size', backing.length, 'Backing file name too long');
  }
  const backingOffset = headerBackingFileOffset(h);
  const total = backingOffset + (backing?.length ?? 0);
  if (total > clusterSize) {
    throw new BlockError('EFBIG', `qcow2 header: header, extensions and backing file name need ${total} bytes, more than one cluster (${clusterSize})`, {
      field: 'header_extensions',
      value: total,
    });
  }

  const out = new Uint8Array(clusterSize);
  const view = new DataView(out.buffer);
  view.setUint32(0, QCOW_MAGIC);
  view.setUint32(4, version);
  if (backing !== null) {
    setU64(view, 8, backingOffset);
    view.setUint32(16, backing.length);
  }
  view.setUint32(20, h.clusterBits);
  setU64(view, 24, h.size);
  view.setUint32(32, h.cryptMethod);
  view.setUint32(36, h.l1Size);
  setU64(view, 40, h.l1TableOffset);
  setU64(view, 48, h.refcountTableOffset);
  view.setUint32(56, h.refcountTableClusters);
  view.setUint32(60, h.nbSnapshots);
  setU64(view, 64, h.snapshotsOffset);
  if (version === 3) {
    view.setBigUint64(72, BigInt.asUintN(64, h.incompatibleFeatures));
    view.setBigUint64(80, BigInt.asUintN(64, h.compatibleFeatures));
    view.setBigUint64(88, BigInt.asUintN(64, h.autoclearFeatures));
    view.setUint32(96, h.refcountOrder);
    view.setUint32(100, headerLength);
    if (headerLength > V3_HEADER_LENGTH) out[104] = h.compressionType;
  }
  let off = headerLength;
  for (const ext of h.extensions) {
    checkRange('header_extensions', ext.type, 0xffffffff);
    view.setUint32(off, ext.type);
    view.setUint32(off + 4, ext.data.length);
    out.set(ext.data, off + 8);
    off += 8 + align8(ext.data.length);
  }
  // the end marker is the 8 zero bytes at `off`; the backing file name follows it
  if (backing !== null) out.set(backing, backingOffset);
  return out;
}

/**
 * Where serializeHeader puts the backing file name of `h`: right after the extensions' end marker
 * (0 when there is no backing file).
 * @locking common
 */
export function headerBackingFileOffset(h: Qcow2Header): number {
  if (h.backingFile === null) return 0;
  let off = h.version === 2 ? V2_HEADER_LENGTH : h.headerLength;
  for (const ext of h.extensions) off += 8 + align8(ext.data.length);
  return off + 8;
}

/**
 * How many bytes of the first cluster the header of `h` uses: the fixed part, the extensions,
 * the end marker and the backing file name.
 * @locking common
 */
export function headerAreaBytes(h: Qcow2Header): number {
  let off = h.version === 2 ? V2_HEADER_LENGTH : h.headerLength;
  for (const ext of h.extensions) off += 8 + align8(ext.data.length);
  return off + 8 + (h.backingFile === null ? 0 : utf8Encoder.encode(h.backingFile).length);
}

const QEMU_FEATURES: ReadonlyArray<readonly [type: number, bit: number, name: string]> = [
  [0, 0, 'dirty bit'],
  [0, 1, 'corrupt bit'],
  [0, 2, 'external data file'],
  [0, 3, 'compression type'],
  [0, 4, 'extended L2 entries'],
  [1, 0, 'lazy refcounts'],
  [2, 0, 'bitmaps'],
  [2, 1, 'raw external data'],
];

/**
 * The feature-name table extension exactly as qemu-img 7.2 writes it for a fresh image.
 * @locking common
 */
export function qemuFeatureTable(): HeaderExtension {
  const data = new Uint8Array(QEMU_FEATURES.length * FEATURE_ENTRY_SIZE);
  QEMU_FEATURES.forEach(([type, bit, name], i) => {
    const at = i * FEATURE_ENTRY_SIZE;
    data[at] = type;
    data[at + 1] = bit;
    data.set(utf8Encoder.encode(name).subarray(0, FEATURE_NAME_SIZE), at + 2);
  });
  return { type: EXT_FEATURE_TABLE, data };
}

/**
 * The header of a fresh image: table offsets and counts zero (the creator fills them in),
 * `l1Size` the minimum the size needs, headerLength 112 for v3 (72 for v2) and, for v3,
 * QEMU's feature-name table as the only extension.
 * @locking common
 */
export function newHeader(o: { sizeBytes: number; clusterBits: number; refcountOrder: number; version: 2 | 3; lazyRefcounts: boolean }): Qcow2Header {
  if (o.version !== 2 && o.version !== 3) badValue('version', o.version, `cannot create qcow2 version ${String(o.version)}`);
  if (!Number.isInteger(o.clusterBits) || o.clusterBits < MIN_CLUSTER_BITS || o.clusterBits > MAX_CLUSTER_BITS) {
    badValue('cluster_bits', o.clusterBits, `Unsupported cluster size: 2^${o.clusterBits}`);
  }
  if (!Number.isInteger(o.refcountOrder) || o.refcountOrder < 0 || o.refcountOrder > 6) {
    badValue('refcount_order', o.refcountOrder, 'Refcount width must be a power of two and may not exceed 64 bits');
  }
  if (o.version === 2 && o.refcountOrder !== 4) {
    badValue('refcount_order', o.refcountOrder, 'Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)');
  }
  if (o.version === 2 && o.lazyRefcounts) {
    badValue('compatible_features', 'lazy_refcounts', 'Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)');
  }
  checkRange('size', o.sizeBytes, MAX_HOST_OFFSET);
  const l1Size = Math.ceil(o.sizeBytes / 2 ** (2 * o.clusterBits - 3));
  if (l1Size * 8 > MAX_L1_BYTES) {
    throw new BlockError('EFBIG', `qcow2 header: the active L1 table for ${o.sizeBytes} bytes would be too large (l1_size: ${l1Size})`, {
      field: 'l1_size',
      value: l1Size,
    });
  }
  return {
    version: o.version,
    backingFileOffset: 0,
    backingFileSize: 0,
    clusterBits: o.clusterBits,
    size: o.sizeBytes,
    cryptMethod: 0,
    l1Size,
    l1TableOffset: 0,
    refcountTableOffset: 0,
    refcountTableClusters: 0,
    nbSnapshots: 0,
    snapshotsOffset: 0,
    incompatibleFeatures: 0n,
    compatibleFeatures: o.lazyRefcounts ? BigInt(COMPAT_LAZY_REFCOUNTS) : 0n,
    autoclearFeatures: 0n,
    refcountOrder: o.refcountOrder,
    headerLength: o.version === 3 ? QEMU_V3_HEADER_LENGTH : V2_HEADER_LENGTH,
    compressionType: 0,
    extensions: o.version === 3 ? [qemuFeatureTable()] : [],
    backingFile: null,
  };
}

/** QEMU's limit on a format name (it keeps it in a 16-byte buffer with the NUL). */
const MAX_FORMAT_NAME = 15;

/**
 * The backing file's format as the header records it (the backing-format extension), or null.
 * @locking common
 */
export function headerBackingFormat(h: Qcow2Header): string | null {
  const ext = h.extensions.find((e) => e.type === EXT_BACKING_FORMAT);
  if (ext === undefined) return null;
  const end = ext.data.indexOf(0);
  return new TextDecoder().decode(end < 0 ? ext.data : ext.data.subarray(0, end));
}

/**
 * Sets (or, with null, removes) the backing file name and its format in `h`, as QEMU's
 * qcow2_update_header lays them out: the backing-format extension first, the name after the end
 * marker. EINVAL for a name or format the header cannot hold.
 * @locking common
 */
export function setHeaderBacking(h: Qcow2Header, filename: string | null, format: string | null): void {
  const others = h.extensions.filter((e) => e.type !== EXT_BACKING_FORMAT);
  if (filename === null) {
    h.backingFile = null;
    h.extensions = others;
    return;
  }
  if (filename === '') badValue('backing_file', filename, 'The backing file name must not be empty');
  if (utf8Encoder.encode(filename).length > MAX_BACKING_FILE_SIZE) badValue('backing_file_size', filename.length, 'Backing file name too long');
  h.backingFile = filename;
  if (format === null) {
    h.extensions = others;
    return;
  }
  const data = utf8Encoder.encode(format);
  if (data.length === 0 || data.length > MAX_FORMAT_NAME) badValue('backing_fmt', format, 'Invalid backing file format name');
  h.extensions = [{ type: EXT_BACKING_FORMAT, data }, ...others];
}

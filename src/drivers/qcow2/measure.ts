/**
 * qemu-img measure's arithmetic for qcow2 and raw targets (QEMU's qcow2_measure,
 * qcow2_calc_prealloc_size, qcow2_refcount_metadata_size and raw_measure): how large a new
 * image gets for a virtual size, and for a source whose data covers some clusters.
 *
 * Common code: pure functions on numbers; persistentBitmapsSize reads a source's bitmap directory
 * (I/O code).
 */
import { BlockError } from '../../block/errors.js';
import { AUTOCLEAR_BITMAPS, EXT_BITMAPS, MAX_L1_BYTES, TWO32 } from './constants.js';
import type { Qcow2State } from './state.js';

/** QEMU's limit on the bitmap directory's size (BME_MAX_PHYS_SIZE). */
const MAX_BITMAP_DIRECTORY_BYTES = 64 * 1024 * 1024;

/** What measure reports, in bytes. */
export interface MeasureResult {
  required: number;
  fullyAllocated: number;
}

/** Rounds `n` up to a multiple of `m`. */
function roundUp(n: number, m: number): number {
  return Math.ceil(n / m) * m;
}

/**
 * The refcount blocks and table clusters (in bytes) that count `clusters` clusters and
 * themselves: the fixed point QEMU's qcow2_refcount_metadata_size finds.
 * @locking common
 */
export function refcountMetadataSize(clusters: number, clusterSize: number, refcountOrder: number): number {
  const blocksPerTableCluster = clusterSize / 8;
  const refcountsPerBlock = (clusterSize * 8) / 2 ** refcountOrder;
  let table = 0;
  let blocks = 0;
  let n = 0;
  let last: number;
  do {
    last = n;
    blocks = Math.ceil((clusters + table + blocks) / refcountsPerBlock);
    table = Math.ceil(blocks / blocksPerTableCluster);
    n = clusters + blocks + table;
  } while (n !== last);
  return (blocks + table) * clusterSize;
}

/**
 * The size of a fully allocated qcow2 image of `totalSize` bytes: header cluster, every L2
 * table, the L1 table, the refcount structure and the data (QEMU's qcow2_calc_prealloc_size).
 * @locking common
 */
export function qcow2PreallocSize(totalSize: number, clusterSize: number, refcountOrder: number): number {
  const aligned = roundUp(totalSize, clusterSize);
  let meta = clusterSize; // the header
  const nl2e = roundUp(aligned / clusterSize, clusterSize / 8);
  meta += nl2e * 8;
  const nl1e = roundUp((nl2e * 8) / clusterSize, clusterSize / 8);
  meta += nl1e * 8;
  meta += refcountMetadataSize((meta + aligned) / clusterSize, clusterSize, refcountOrder);
  return meta + aligned;
}

/** The qcow2 target of a measure. */
export interface Qcow2MeasureTarget {
  clusterSize: number;
  refcountOrder: number;
  /** off and metadata count only the data needed; falloc and full count every data cluster. */
  preallocation: 'off' | 'metadata' | 'falloc' | 'full';
  /** A backing file is named: every cluster of a source counts (QEMU cannot know what it shares). */
  hasBackingFile: boolean;
}

/**
 * qemu-img measure -O qcow2: for a source of `sourceSize` bytes whose data covers
 * `dataClusters` target clusters (null: no source, `size` bytes from --size).
 * @locking common
 */
export function measureQcow2(t: Qcow2MeasureTarget, size: number, dataClusters: number | null): MeasureResult {
  const C = t.clusterSize;
  const virtualSize = roundUp(size, C);
  const l2Tables = Math.ceil(virtualSize / C / (C / 8));
  if (l2Tables * 8 > MAX_L1_BYTES) {
    throw new BlockError('EFBIG', 'The image size is too large (try using a larger cluster size)', { field: 'size', value: size });
  }
  let required = 0;
  if (dataClusters !== null) required = t.hasBackingFile ? virtualSize : dataClusters * C;
  if (t.preallocation === 'full' || t.preallocation === 'falloc') required = virtualSize;
  const fullyAllocated = qcow2PreallocSize(virtualSize, C, t.refcountOrder);
  return { required: fullyAllocated - virtualSize + required, fullyAllocated };
}

/**
 * qemu-img measure -O raw: the source's length, or `size` rounded up to 512 bytes.
 * @locking common
 */
export function measureRaw(size: number, fromSource: boolean): MeasureResult {
  const required = fromSource ? size : roundUp(size, 512);
  return { required, fullyAllocated: required };
}

/**
 * What the persistent dirty bitmaps of open image `s` take in a target of `clusterSize`-byte
 * clusters, counted as QEMU's qcow2_get_persistent_dirty_bitmap_size counts them: every bitmap
 * wholly allocated, its table, and the directory. 0 when the autoclear bit says the bitmaps are
 * not to be trusted (QEMU ignores the extension then).
 * @locking io
 */
export async function persistentBitmapsSize(s: Qcow2State, clusterSize: number): Promise<number> {
  if ((s.header.autoclearFeatures & BigInt(AUTOCLEAR_BITMAPS)) === 0n) return 0;
  const ext = s.header.extensions.find((e) => e.type === EXT_BITMAPS);
  if (ext === undefined || ext.data.length < 24) return 0;
  const ev = new DataView(ext.data.buffer, ext.data.byteOffset, ext.data.byteLength);
  const count = ev.getUint32(0);
  const dirSize = ev.getUint32(8) * TWO32 + ev.getUint32(12);
  const dirOffset = ev.getUint32(16) * TWO32 + ev.getUint32(20);
  if (count === 0 || dirSize === 0) return 0;
  if (dirSize > MAX_BITMAP_DIRECTORY_BYTES) {
    throw new BlockError('EFBIG', `qcow2 '${s.filename}': bitmap directory too large (${dirSize} bytes)`, { file: s.filename, field: 'bitmap_directory_size', value: dirSize });
  }
  const dir = await s.readMeta(dirOffset, dirSize, 'bitmap directory');
  const dv = new DataView(dir.buffer, dir.byteOffset, dir.byteLength);
  let total = 0;
  let dirBytes = 0;
  let at = 0;
  for (let i = 0; i < count; i++) {
    if (at + 24 > dir.length) throw s.corrupt(`bitmap directory entry ${i} runs past the directory`, 'bitmap_directory', dirOffset + at);
    const granularity = 2 ** (dv.getUint8(at + 17));
    const nameSize = dv.getUint16(at + 18);
    const extraSize = dv.getUint32(at + 20);
    const bytes = Math.ceil(Math.ceil(s.sizeBytes / granularity) / 8);
    const clusters = Math.ceil(bytes / clusterSize);
    total += clusters * clusterSize + roundUp(clusters * 8, clusterSize);
    dirBytes += roundUp(24 + nameSize, 8);
    at += roundUp(24 + extraSize + nameSize, 8);
  }
  return total + roundUp(dirBytes, clusterSize);
}

/**
 * Reading and writing 64-bit big-endian table entries (L1, L2, refcount table) without BigInt:
 * every entry is a high and a low 32-bit half; host offsets are whole numbers below 2^53.
 * Common code (pure functions on table bytes).
 */
import { HI_COMPRESSED, HI_COPIED, HI_OFFSET_MASK, LO_OFFSET_MASK, LO_ZERO, TWO32 } from './constants.js';


/**
 * The high 32 bits of entry `i`.
 * @locking common
 */
export function entryHi(view: DataView, i: number): number {
  return view.getUint32(i * 8);
}

/**
 * The low 32 bits of entry `i`.
 * @locking common
 */
export function entryLo(view: DataView, i: number): number {
  return view.getUint32(i * 8 + 4);
}

/**
 * Bits 9..55 of an entry: a cluster-aligned host offset.
 * @locking common
 */
export function entryOffset(hi: number, lo: number): number {
  return (hi & HI_OFFSET_MASK) * TWO32 + ((lo & LO_OFFSET_MASK) >>> 0);
}

/**
 * Writes entry `i` from a host offset and flag bits.
 * @locking common
 */
export function setEntry(view: DataView, i: number, offset: number, copied: boolean, zero = false): void {
  const hi = Math.floor(offset / TWO32);
  const lo = offset - hi * TWO32;
  view.setUint32(i * 8, (hi | (copied ? HI_COPIED : 0)) >>> 0);
  view.setUint32(i * 8 + 4, (lo | (zero ? LO_ZERO : 0)) >>> 0);
}

/**
 * Writes raw halves into entry `i`.
 * @locking common
 */
export function setEntryRaw(view: DataView, i: number, hi: number, lo: number): void {
  view.setUint32(i * 8, hi >>> 0);
  view.setUint32(i * 8 + 4, lo >>> 0);
}

/** The kinds of L2 entry QEMU distinguishes. */
export const enum ClusterType {
  Unallocated = 0,
  ZeroPlain = 1,
  ZeroAlloc = 2,
  Normal = 3,
  Compressed = 4,
}

/**
 * Classifies a standard (non-extended) L2 entry. `v3` enables the zero flag.
 * @locking common
 */
export function l2EntryType(hi: number, lo: number, v3: boolean): ClusterType {
  if ((hi & HI_COMPRESSED) !== 0) return ClusterType.Compressed;
  const off = entryOffset(hi, lo);
  if (v3 && (lo & LO_ZERO) !== 0) return off === 0 ? ClusterType.ZeroPlain : ClusterType.ZeroAlloc;
  return off === 0 ? ClusterType.Unallocated : ClusterType.Normal;
}

/**
 * True when the entry's COPIED bit (63) is set.
 * @locking common
 */
export function isCopied(hi: number): boolean {
  return (hi & HI_COPIED) !== 0;
}

/**
 * Decodes a compressed-cluster descriptor: the host byte offset and the number of bytes to read
 * (whole 512-byte sectors, as the format stores it).
 * @locking common
 */
export function compressedExtent(hi: number, lo: number, clusterBits: number): { offset: number; bytes: number } {
  const x = 62 - (clusterBits - 8);
  const v = (BigInt(hi >>> 0) << 32n) | BigInt(lo >>> 0);
  const offset = Number(v & ((1n << BigInt(x)) - 1n));
  const sectorMask = (1n << BigInt(clusterBits - 8)) - 1n;
  const nsectors = Number((v >> BigInt(x)) & sectorMask) + 1;
  return { offset, bytes: nsectors * 512 - (offset & 511) };
}

/**
 * Adjacent big-endian header fields, ready for one write: each item is a 4- or 8-byte field and
 * its value (header updates that must land together are written as one buffer).
 * @locking common
 */
export function headerFields(fields: ReadonlyArray<readonly [4 | 8, number]>): Uint8Array {
  const bytes = new Uint8Array(fields.reduce((n, [w]) => n + w, 0));
  const v = new DataView(bytes.buffer);
  let at = 0;
  for (const [width, value] of fields) {
    if (width === 8) {
      v.setUint32(at, Math.floor(value / TWO32));
      v.setUint32(at + 4, value % TWO32);
    } else v.setUint32(at, value);
    at += width;
  }
  return bytes;
}

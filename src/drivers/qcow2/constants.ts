/**
 * qcow2 on-disk constants (QEMU's docs/interop/qcow2.txt and block/qcow2.h). Common code.
 *
 * Table entries are 64-bit big-endian. snapstack decodes them as two 32-bit halves (`hi`, `lo`)
 * instead of BigInt: host offsets stay below 2^53, so they fit a JS number exactly, and the flag
 * bits all sit in the high half (bits 62, 63) or the low byte (bit 0).
 */

export const QCOW_MAGIC = 0x514649fb;
export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 21;
export const V2_HEADER_LENGTH = 72;
export const V3_HEADER_LENGTH = 104;
/** What qemu-img 7.2 writes for v3: 104 bytes, the compression-type byte and 7 bytes of padding. */
export const QEMU_V3_HEADER_LENGTH = 112;

export const INCOMPAT_DIRTY = 1 << 0;
export const INCOMPAT_CORRUPT = 1 << 1;
export const INCOMPAT_DATA_FILE = 1 << 2;
export const INCOMPAT_COMPRESSION = 1 << 3;
export const INCOMPAT_EXTL2 = 1 << 4;
export const INCOMPAT_KNOWN_MASK = 0x1f;
export const COMPAT_LAZY_REFCOUNTS = 1 << 0;
export const AUTOCLEAR_BITMAPS = 1 << 0;
export const AUTOCLEAR_DATA_FILE_RAW = 1 << 1;

/** Header extension types. */
export const EXT_END = 0x00000000;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_TABLE = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_CRYPTO = 0x0537be77;
export const EXT_DATA_FILE = 0x44415441;

/** Bit 63 of an L1/L2 entry, as a mask on the high 32 bits. */
export const HI_COPIED = 0x80000000;
/** Bit 62 of an L2 entry, as a mask on the high 32 bits. */
export const HI_COMPRESSED = 0x40000000;
/** Bit 0 of a standard L2 entry (v3): reads as zeros. */
export const LO_ZERO = 0x1;
/** Offset bits 9..55: the high half keeps bits 32..55, the low half bits 9..31. */
export const HI_OFFSET_MASK = 0x00ffffff;
export const LO_OFFSET_MASK = 0xfffffe00;
/** Reserved bits of an L1 entry: 0..8 and 56..62. */
export const L1_HI_RESERVED = 0x7f000000;
export const L1_LO_RESERVED = 0x000001ff;
/** Reserved bits of a standard L2 entry: 1..8 and 56..61. */
export const L2_HI_RESERVED = 0x3f000000;
export const L2_LO_RESERVED = 0x000001fe;
/** Reserved bits of a refcount table entry: 0..8. */
export const REFT_LO_RESERVED = 0x000001ff;

export const MAX_SNAPSHOTS = 65536;
export const MAX_SNAPSHOT_EXTRA_DATA = 1024;
export const MAX_SNAPSHOTS_SIZE = 1024 * 65536;
export const MAX_L1_BYTES = 32 * 1024 * 1024;
export const MAX_REFTABLE_BYTES = 8 * 1024 * 1024;
/** Host offsets must stay below 2^56 in the format; snapstack (JS numbers) below 2^53. */
export const MAX_HOST_OFFSET = Number.MAX_SAFE_INTEGER;

/** 2^32: 64-bit fields are handled as two 32-bit halves (offsets stay below 2^53). */
export const TWO32 = 0x100000000;

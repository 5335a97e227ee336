/**
 * The in-memory shapes of qcow2 metadata: the header with its extensions, and snapshot table
 * entries. Common code (plain data).
 */

/** A header extension kept as raw bytes (unknown ones are preserved on rewrite). */
export interface HeaderExtension {
  type: number;
  data: Uint8Array;
}

/** The qcow2 header (both versions; v2 images have the v3 fields at their defaults). */
export interface Qcow2Header {
  version: 2 | 3;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  /** Virtual disk size in bytes. */
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  /** v3 feature bits (0 on v2); kept as numbers: only the low 32 bits carry known features. */
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  /** refcount_bits = 1 << refcountOrder (v2: always 4). */
  refcountOrder: number;
  headerLength: number;
  /** 0 zlib, 1 zstd (only meaningful when header_length > 104). */
  compressionType: number;
  /** Extensions in file order, the end marker excluded; the feature table included. */
  extensions: HeaderExtension[];
  /** The backing file name, if any (its format lives in the backing-format extension). */
  backingFile: string | null;
}

/** One entry of the snapshot table, as laid out on disk. */
export interface SnapshotEntry {
  l1TableOffset: number;
  l1Size: number;
  id: string;
  name: string;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: number;
  /** The VM-state size (the 64-bit extra-data field when present, else the 32-bit one). */
  vmStateSize: number;
  /** Virtual disk size when the snapshot was taken (extra data; the image size when absent). */
  diskSize: number;
  /** -1 when absent. */
  icount: number;
  /** The extra_data_size found on disk (0 for entries built in memory). */
  extraDataSize: number;
  /** Extra data past the 24 known bytes, kept and written back unchanged. */
  unknownExtraData: Uint8Array;
}

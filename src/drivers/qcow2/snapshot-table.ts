/**
 * The qcow2 snapshot table: parsing the bytes at `snapshots_offset` into entries and writing
 * entries back the way QEMU does (block/qcow2-snapshot.c, qcow2_read_snapshots and
 * qcow2_write_snapshots).
 *
 * Common code: pure functions on bytes, no I/O, no lock, no calling-context rule. Parsing never
 * allocates more than the buffer it is given.
 *
 * Entry layout (each entry starts 8-aligned from the table start): u64 l1_table_offset,
 * u32 l1_size, u16 id_str_size, u16 name_size, u32 date_sec, u32 date_nsec, u64 vm_clock_nsec,
 * u32 vm_state_size, u32 extra_data_size; extra data (u64 vm_state_size_large, u64 disk_size,
 * u64 icount, then anything newer); the id; the name. Entries are numbered from 0 in messages,
 * as in QEMU's.
 */
import { BlockError } from '../../block/errors.js';
import { MAX_SNAPSHOTS, MAX_SNAPSHOTS_SIZE, MAX_SNAPSHOT_EXTRA_DATA, TWO32 } from './constants.js';
import type { SnapshotEntry } from './types.js';

/** The fixed part of an entry. */
const ENTRY_HEADER = 40;
/** The extra data QEMU knows today: vm_state_size_large, disk_size, icount. */
const KNOWN_EXTRA = 24;
const MAX_NAME = 0xffff;

const utf8 = new TextDecoder('utf-8');
const utf8Encoder = new TextEncoder();

/** Rounds up to a multiple of 8. */
function align8(n: number): number {
  return Math.ceil(n / 8) * 8;
}

/** Throws the BlockError for a bad field of a table entry (the message names the entry). */
function refuse(code: 'EINVAL' | 'EFBIG', filename: string, field: string, value: number | string, msg: string): never {
  throw new BlockError(code, `qcow2 '${filename}': ${msg} (${field}: ${value})`, { file: filename, field, value });
}

/** Reads the u64 at `off` of entry `i`, refusing values above 2^53-1. */
function u64(view: DataView, off: number, filename: string, i: number, field: string): number {
  const hi = view.getUint32(off);
  const lo = view.getUint32(off + 4);
  if (hi > 0x1fffff) {
    const big = (BigInt(hi) << 32n) | BigInt(lo);
    refuse('EINVAL', filename, field, `0x${big.toString(16)}`, `snapshot table entry ${i}: ${field} is too large`);
  }
  return hi * TWO32 + lo;
}

/**
 * How many bytes of `buf` the first `nb` snapshot table entries take, or -1 when `buf` ends
 * before they do (the caller reads more): what a reader needs to know to size its read.
 * @locking common
 */
export function snapshotTableExtent(buf: Uint8Array, nb: number): number {
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  let off = 0;
  for (let i = 0; i < nb; i++) {
    off = align8(off);
    if (off + ENTRY_HEADER > buf.length) return -1;
    const idSize = view.getUint16(off + 12);
    const nameSize = view.getUint16(off + 14);
    const extra = view.getUint32(off + 36);
    if (extra > MAX_SNAPSHOT_EXTRA_DATA) return off + ENTRY_HEADER; // the parser names the field
    off += ENTRY_HEADER + extra + idSize + nameSize;
    if (off > buf.length) return -1;
  }
  return off;
}

/**
 * Parses `nbSnapshots` entries from `buf` (the table region); throws a BlockError naming the entry
 * and the field for an entry that overruns the buffer or carries impossible values.
 * @locking common
 */
export function parseSnapshotTable(
  buf: Uint8Array,
  nbSnapshots: number,
  image: { version: 2 | 3; sizeBytes: number },
  filename: string,
): SnapshotEntry[] {
  if (!Number.isSafeInteger(nbSnapshots) || nbSnapshots < 0 || nbSnapshots > MAX_SNAPSHOTS) {
    throw new BlockError('EFBIG', `qcow2 '${filename}': Snapshot table too large (nb_snapshots: ${nbSnapshots})`, {
      file: filename,
      field: 'nb_snapshots',
      value: nbSnapshots,
    });
  }
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const entries: SnapshotEntry[] = [];
  let off = 0;
  for (let i = 0; i < nbSnapshots; i++) {
    off = align8(off);
    if (off + ENTRY_HEADER > buf.length) {
      refuse('EINVAL', filename, 'nb_snapshots', nbSnapshots, `snapshot table entry ${i} runs past the end of the table (${buf.length} bytes)`);
    }
    const l1TableOffset = u64(view, off, filename, i, 'l1_table_offset');
    const l1Size = view.getUint32(off + 8);
    const idSize = view.getUint16(off + 12);
    const nameSize = view.getUint16(off + 14);
    const dateSec = view.getUint32(off + 16);
    const dateNsec = view.getUint32(off + 20);
    const vmClockNsec = u64(view, off + 24, filename, i, 'vm_clock_nsec');
    let vmStateSize = view.getUint32(off + 32);
    const extraDataSize = view.getUint32(off + 36);
    if (extraDataSize > MAX_SNAPSHOT_EXTRA_DATA) {
      refuse('EFBIG', filename, 'extra_data_size', extraDataSize, `Too much extra metadata in snapshot table entry ${i}`);
    }
    const extra = off + ENTRY_HEADER;
    if (extra + extraDataSize > buf.length) {
      refuse('EINVAL', filename, 'extra_data_size', extraDataSize, `snapshot table entry ${i}: extra data runs past the end of the table (${buf.length} bytes)`);
    }
    if (extraDataSize >= 8) vmStateSize = u64(view, extra, filename, i, 'vm_state_size_large');
    const diskSize = extraDataSize >= 16 ? u64(view, extra + 8, filename, i, 'disk_size') : image.sizeBytes;
    let icount = -1;
    if (extraDataSize >= KNOWN_EXTRA) {
      const hi = view.getUint32(extra + 16);
      const lo = view.getUint32(extra + 20);
      icount = hi === 0xffffffff && lo === 0xffffffff ? -1 : u64(view, extra + 16, filename, i, 'icount');
    }
    const unknownExtraData = extraDataSize > KNOWN_EXTRA ? buf.slice(extra + KNOWN_EXTRA, extra + extraDataSize) : new Uint8Array(0);
    const idAt = extra + extraDataSize;
    if (idAt + idSize > buf.length) {
      refuse('EINVAL', filename, 'id_str_size', idSize, `snapshot table entry ${i}: id runs past the end of the table (${buf.length} bytes)`);
    }
    const nameAt = idAt + idSize;
    if (nameAt + nameSize > buf.length) {
      refuse('EINVAL', filename, 'name_size', nameSize, `snapshot table entry ${i}: name runs past the end of the table (${buf.length} bytes)`);
    }
    entries.push({
      l1TableOffset,
      l1Size,
      id: utf8.decode(buf.subarray(idAt, nameAt)),
      name: utf8.decode(buf.subarray(nameAt, nameAt + nameSize)),
      dateSec,
      dateNsec,
      vmClockNsec,
      vmStateSize,
      diskSize,
      icount,
      extraDataSize,
      unknownExtraData,
    });
    off = nameAt + nameSize;
  }
  return entries;
}

/** Refuses an entry value serializeSnapshotTable cannot store. */
function badValue(i: number, field: string, value: number, msg: string): never {
  throw new BlockError('EINVAL', `snapshot table entry ${i}: ${msg} (${field}: ${value})`, { field, value });
}

/** Checks that `v` is a whole number in 0..max. */
function checkRange(i: number, field: string, v: number, max: number): void {
  if (!Number.isSafeInteger(v) || v < 0 || v > max) badValue(i, field, v, `${field} out of range 0..${max}`);
}

/** The encoded id and name of every entry, with their lengths checked. */
function encodeStrings(entries: SnapshotEntry[]): Array<{ id: Uint8Array; name: Uint8Array }> {
  return entries.map((e, i) => {
    const id = utf8Encoder.encode(e.id);
    const name = utf8Encoder.encode(e.name);
    if (id.length > MAX_NAME) badValue(i, 'id_str_size', id.length, 'snapshot id too long');
    if (name.length > MAX_NAME) badValue(i, 'name_size', name.length, 'snapshot name too long');
    if (KNOWN_EXTRA + e.unknownExtraData.length > MAX_SNAPSHOT_EXTRA_DATA) {
      throw new BlockError('EFBIG', `Too much extra metadata in snapshot table entry ${i} (extra_data_size: ${KNOWN_EXTRA + e.unknownExtraData.length})`, {
        field: 'extra_data_size',
        value: KNOWN_EXTRA + e.unknownExtraData.length,
      });
    }
    return { id, name };
  });
}

/** The table length for the given encoded strings; EFBIG past 64 MiB. */
function tableSize(entries: SnapshotEntry[], strings: Array<{ id: Uint8Array; name: Uint8Array }>): number {
  let off = 0;
  entries.forEach((e, i) => {
    const s = strings[i];
    if (s === undefined) return;
    off = align8(off) + ENTRY_HEADER + KNOWN_EXTRA + e.unknownExtraData.length + s.id.length + s.name.length;
  });
  if (off > MAX_SNAPSHOTS_SIZE) {
    throw new BlockError('EFBIG', `Snapshot table too large: ${off} bytes, more than ${MAX_SNAPSHOTS_SIZE} (snapshots_size: ${off})`, {
      field: 'snapshots_size',
      value: off,
    });
  }
  return off;
}

/**
 * The length serializeSnapshotTable would return for `entries` (the last entry unpadded);
 * EFBIG past 64 MiB.
 * @locking common
 */
export function snapshotTableSize(entries: SnapshotEntry[]): number {
  return tableSize(entries, encodeStrings(entries));
}

/**
 * Writes `entries` as QEMU does: 24 bytes of known extra data plus the preserved unknown bytes,
 * the u32 vm_state_size only when it fits, each entry 8-aligned, the result ending right after
 * the last entry's name.
 * @locking common
 */
export function serializeSnapshotTable(entries: SnapshotEntry[]): Uint8Array {
  if (entries.length > MAX_SNAPSHOTS) {
    throw new BlockError('EFBIG', `Snapshot table too large (nb_snapshots: ${entries.length})`, { field: 'nb_snapshots', value: entries.length });
  }
  const strings = encodeStrings(entries);
  const out = new Uint8Array(tableSize(entries, strings));
  const view = new DataView(out.buffer);
  const setU64 = (at: number, v: number): void => {
    const hi = Math.floor(v / TWO32);
    view.setUint32(at, hi);
    view.setUint32(at + 4, v - hi * TWO32);
  };
  let off = 0;
  entries.forEach((e, i) => {
    const s = strings[i];
    if (s === undefined) return;
    checkRange(i, 'l1_table_offset', e.l1TableOffset, Number.MAX_SAFE_INTEGER);
    checkRange(i, 'l1_size', e.l1Size, 0xffffffff);
    checkRange(i, 'date_sec', e.dateSec, 0xffffffff);
    checkRange(i, 'date_nsec', e.dateNsec, 0xffffffff);
    checkRange(i, 'vm_clock_nsec', e.vmClockNsec, Number.MAX_SAFE_INTEGER);
    checkRange(i, 'vm_state_size', e.vmStateSize, Number.MAX_SAFE_INTEGER);
    checkRange(i, 'disk_size', e.diskSize, Number.MAX_SAFE_INTEGER);
    if (e.icount !== -1) checkRange(i, 'icount', e.icount, Number.MAX_SAFE_INTEGER);
    off = align8(off);
    const extraSize = KNOWN_EXTRA + e.unknownExtraData.length;
    setU64(off, e.l1TableOffset);
    view.setUint32(off + 8, e.l1Size);
    view.setUint16(off + 12, s.id.length);
    view.setUint16(off + 14, s.name.length);
    view.setUint32(off + 16, e.dateSec);
    view.setUint32(off + 20, e.dateNsec);
    setU64(off + 24, e.vmClockNsec);
    // older readers see a disk-only snapshot rather than a truncated VM state size
    view.setUint32(off + 32, e.vmStateSize <= 0xffffffff ? e.vmStateSize : 0);
    view.setUint32(off + 36, extraSize);
    const extra = off + ENTRY_HEADER;
    setU64(extra, e.vmStateSize);
    setU64(extra + 8, e.diskSize);
    if (e.icount === -1) {
      view.setUint32(extra + 16, 0xffffffff);
      view.setUint32(extra + 20, 0xffffffff);
    } else {
      setU64(extra + 16, e.icount);
    }
    out.set(e.unknownExtraData, extra + KNOWN_EXTRA);
    const idAt = extra + extraSize;
    out.set(s.id, idAt);
    out.set(s.name, idAt + s.id.length);
    off = idAt + s.id.length + s.name.length;
  });
  return out;
}

/**
 * The snapshot table as `qemu-img check` reads it (QEMU's qcow2_check_read_snapshot_table and the
 * repair mode of qcow2_do_read_snapshots): where the ordinary open refuses a table, the check
 * names the damage, and with `-r all` keeps what can be kept:
 * - an entry with more than 1024 bytes of extra data keeps its first 1024 (counted as one
 *   corruption; the table is written again once the refcounts are right);
 * - more than 65536 snapshots: those past the 65536th are dropped; and a table past 64 MiB (or
 *   2 GiB on disk) loses the entry that crosses the limit and all after it; the header's count is
 *   rewritten at once (one flushed 12-byte update of nb_snapshots and
 *   snapshots_offset), before the refcount check, which then frees the clusters they leaked.
 * Without `-r all` either damage fails the check (qemu-img's "Check failed: File too large").
 *
 * I/O code run by check.ts under the metadata lock on a drained node. Every read is bounded: one
 * window of at most 1 MiB (or one id or name, at most 64 KiB) at a time, and the entries kept
 * never add up to more than 64 MiB.
 */
import { BlockError } from '../../block/errors.js';
import { bdrvFlush, bdrvGetLength, bdrvPread } from '../../block/io.js';
import type { Qcow2CheckResult, RepairMode } from './check-refcounts.js';
import { MAX_SNAPSHOT_EXTRA_DATA, MAX_SNAPSHOTS, MAX_SNAPSHOTS_SIZE, TWO32 } from './constants.js';
import { recordSnapshotTableExtent } from './snapshot-extent.js';
import type { Qcow2State } from './state.js';
import type { SnapshotEntry } from './types.js';

const ENTRY_HEADER = 40;
const KNOWN_EXTRA = 24;
/** QEMU also stops where the table's extent on disk no longer fits an int. */
const INT_MAX = 0x7fffffff;
const WINDOW = 1024 * 1024;

const utf8 = new TextDecoder('utf-8');

/** What the tables as read leave for the rest of the check. */
export interface CheckedSnapshotTable {
  /** Entries whose extra data was cut to 1024 bytes (each one corruption until the table is written again; check.ts counts them). */
  extraDataDropped: number;
}

/** Reads the file in windows, zeros past its end (as a qcow2 read of a short file does). */
class WindowReader {
  private buf = new Uint8Array(0);
  private at = 0;
  constructor(private readonly s: Qcow2State) {}
  async read(offset: number, bytes: number): Promise<Uint8Array> {
    if (offset >= this.at && offset + bytes <= this.at + this.buf.length) {
      return this.buf.subarray(offset - this.at, offset - this.at + bytes);
    }
    const buf = new Uint8Array(Math.max(bytes, WINDOW));
    const n = Math.max(0, Math.min(buf.length, bdrvGetLength(this.s.file) - offset));
    if (n > 0) await bdrvPread(this.s.file, offset, buf.subarray(0, n));
    this.buf = buf;
    this.at = offset;
    return this.buf.subarray(0, bytes);
  }
}

/** A big-endian u64 that must fit a JS number (else the check fails, naming the field). */
function u64(v: DataView, at: number, s: Qcow2State, i: number, field: string): number {
  const hi = v.getUint32(at);
  const lo = v.getUint32(at + 4);
  if (hi > 0x1fffff) {
    throw new BlockError('EINVAL', `qcow2 '${s.filename}': snapshot table entry ${i}: ${field} is too large (0x${((BigInt(hi) << 32n) | BigInt(lo)).toString(16)})`, {
      file: s.filename,
      field,
    });
  }
  return hi * TWO32 + lo;
}

/** A C string as QEMU keeps it: up to the first NUL byte. */
function cString(b: Uint8Array): string {
  const nul = b.indexOf(0);
  return utf8.decode(nul < 0 ? b : b.subarray(0, nul));
}

/** Fails the check as qemu-img does when the table cannot be read without a repair. */
function fail(s: Qcow2State, res: Qcow2CheckResult, msg: string, hint: string, field: string): never {
  res.messages.push(`ERROR failed to read the snapshot table: ${msg}`);
  res.messages.push(hint);
  res.checkErrors++;
  throw new BlockError('EFBIG', `qcow2 '${s.filename}': ${msg}`, { file: s.filename, field });
}

/**
 * Reads the snapshot table at the header's pointer for a check, into `s.snapshots`; with
 * `fix.errors`, cuts what QEMU's repair cuts (see the file's comment) and writes the reduced count
 * to the header at once. Throws (after recording qemu-img's messages in `res`) where the check
 * must fail.
 * @locking io
 */
export async function readSnapshotTableForCheck(s: Qcow2State, res: Qcow2CheckResult, fix: RepairMode): Promise<CheckedSnapshotTable> {
  const repair = fix.errors;
  const start = s.header.snapshotsOffset;
  let nb = s.header.nbSnapshots;
  const entries: SnapshotEntry[] = [];
  const out: CheckedSnapshotTable = { extraDataDropped: 0 };
  const reader = new WindowReader(s);
  let offset = start;
  let tableLength = 0;
  let reduced = 0;
  if (nb > MAX_SNAPSHOTS) {
    // QEMU's limit on the count (the check-mode open let it through)
    if (!repair) {
      res.messages.push('ERROR snapshot table too large');
      res.messages.push(`You can force-remove all ${nb - MAX_SNAPSHOTS} overhanging snapshots with qemu-img check -r all`);
      res.checkErrors++;
      throw new BlockError('EFBIG', `qcow2 '${s.filename}': snapshot table too large (nb_snapshots: ${nb})`, { file: s.filename, field: 'nb_snapshots', value: nb });
    }
    res.messages.push(`Discarding ${nb - MAX_SNAPSHOTS} overhanging snapshots`);
    reduced += nb - MAX_SNAPSHOTS;
    nb = MAX_SNAPSHOTS;
  }
  for (let i = 0; i < nb; i++) {
    const before = offset;
    tableLength = Math.ceil(tableLength / 8) * 8;
    offset = Math.ceil(offset / 8) * 8;
    const h = await reader.read(offset, ENTRY_HEADER);
    const v = new DataView(h.buffer, h.byteOffset, h.byteLength);
    offset += ENTRY_HEADER;
    const l1TableOffset = u64(v, 0, s, i, 'l1_table_offset');
    const l1Size = v.getUint32(8);
    const idSize = v.getUint16(12);
    const nameSize = v.getUint16(14);
    const dateSec = v.getUint32(16);
    const dateNsec = v.getUint32(20);
    const vmClockNsec = u64(v, 24, s, i, 'vm_clock_nsec');
    let vmStateSize = v.getUint32(32);
    let extraDataSize = v.getUint32(36);
    let truncate = false;
    if (extraDataSize > MAX_SNAPSHOT_EXTRA_DATA) {
      if (!repair) {
        fail(s, res, `Too much extra metadata in snapshot table entry ${i}`, 'You can force-remove this extra metadata with qemu-img check -r all', 'extra_data_size');
      }
      res.messages.push(`Discarding too much extra metadata in snapshot table entry ${i} (${extraDataSize} > ${MAX_SNAPSHOT_EXTRA_DATA})`);
      out.extraDataDropped++;
      truncate = true;
    }
    const knownBytes = Math.min(KNOWN_EXTRA, extraDataSize);
    const known = new Uint8Array(KNOWN_EXTRA);
    known.set(await reader.read(offset, knownBytes));
    const kv = new DataView(known.buffer);
    offset += knownBytes;
    if (extraDataSize >= 8) vmStateSize = u64(kv, 0, s, i, 'vm_state_size_large');
    const diskSize = extraDataSize >= 16 ? u64(kv, 8, s, i, 'disk_size') : s.sizeBytes;
    let icount = -1;
    if (extraDataSize >= KNOWN_EXTRA && !(kv.getUint32(16) === 0xffffffff && kv.getUint32(20) === 0xffffffff)) icount = u64(kv, 16, s, i, 'icount');
    let unknownExtraData = new Uint8Array(0);
    if (extraDataSize > KNOWN_EXTRA) {
      const extraEnd = offset + extraDataSize - KNOWN_EXTRA;
      if (truncate) extraDataSize = MAX_SNAPSHOT_EXTRA_DATA;
      unknownExtraData = (await reader.read(offset, extraDataSize - KNOWN_EXTRA)).slice();
      offset = extraEnd;
    }
    const id = cString(await reader.read(offset, idSize));
    offset += idSize;
    const name = cString(await reader.read(offset, nameSize));
    offset += nameSize;
    // the extent kept counts the extra data as cut
    tableLength += ENTRY_HEADER + extraDataSize + idSize + nameSize;
    if (tableLength > MAX_SNAPSHOTS_SIZE || offset - start > INT_MAX) {
      if (!repair) {
        fail(s, res, 'Snapshot table is too big', `You can force-remove all ${nb - i} overhanging snapshots with qemu-img check -r all`, 'nb_snapshots');
      }
      res.messages.push(`Discarding ${nb - i} overhanging snapshots (snapshot table is too big)`);
      reduced += nb - i;
      nb = i;
      offset = before;
      break;
    }
    entries.push({ l1TableOffset, l1Size, id, name, dateSec, dateNsec, vmClockNsec, vmStateSize, diskSize, icount, extraDataSize, unknownExtraData });
  }
  s.snapshots = entries;
  // freeing this table later must free what it takes on disk (the cut extra data included)
  recordSnapshotTableExtent(s, offset - start);
  if (reduced > 0) {
    // QEMU counts them as corruptions and as fixed at once: the header no longer names them
    await writeSnapshotCount(s, nb);
    res.corruptionsFixed += reduced;
  }
  return out;
}

/**
 * Rewrites the header's snapshot pointer with the reduced count (the offset unchanged): the
 * metadata before it is flushed, then one 12-byte write of nb_snapshots and snapshots_offset, then
 * a flush, so that the refcount check after it counts only what the header now says.
 */
async function writeSnapshotCount(s: Qcow2State, nb: number): Promise<void> {
  const b = new Uint8Array(12);
  const v = new DataView(b.buffer);
  v.setUint32(0, nb);
  const off = s.header.snapshotsOffset;
  v.setUint32(4, Math.floor(off / TWO32));
  v.setUint32(8, off % TWO32);
  await bdrvFlush(s.file);
  await s.writeMeta(60, b, 'header (snapshot count)');
  await bdrvFlush(s.file);
  s.header.nbSnapshots = nb;
}

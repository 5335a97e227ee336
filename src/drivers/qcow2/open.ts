/**
 * Opening a qcow2 image: the header, then the active L1 table, the refcount table and the snapshot
 * table, each read in one bounded request and validated before anything trusts it. Nothing is
 * written here: a damaged image is refused without a single write.
 */
import { BlockError } from '../../block/errors.js';
import { bdrvGetLength, bdrvPread } from '../../block/io.js';
import type { BlockNode } from '../../block/node.js';
import { MAX_CLUSTER_BITS, MAX_SNAPSHOTS, MAX_SNAPSHOTS_SIZE, MIN_CLUSTER_BITS } from './constants.js';
import { parseHeader } from './header.js';
import { checkNoMetadataOverlap } from './overlap.js';
import { recordSnapshotTableExtent } from './snapshot-extent.js';
import { parseSnapshotTable, snapshotTableExtent } from './snapshot-table.js';
import { Qcow2State } from './state.js';
import type { Qcow2Header, SnapshotEntry } from './types.js';

/**
 * Reads the first cluster of `file` (or the whole file when shorter) and parses the header.
 * `checkMode`: a snapshot count over QEMU's 65536 is kept for the check to report (and with
 * `-r all` to cut), instead of refusing the image.
 * @locking io
 */
export async function readQcow2Header(file: BlockNode, filename: string, checkMode = false): Promise<{ header: Qcow2Header; fileLength: number }> {
  const fileLength = bdrvGetLength(file);
  const probe = new Uint8Array(Math.min(fileLength, 24));
  await bdrvPread(file, 0, probe);
  let clusterBits = MIN_CLUSTER_BITS;
  if (probe.length >= 24) {
    const bits = new DataView(probe.buffer).getUint32(20);
    if (bits >= MIN_CLUSTER_BITS && bits <= MAX_CLUSTER_BITS) clusterBits = bits;
  }
  const first = new Uint8Array(Math.min(fileLength, 2 ** clusterBits));
  await bdrvPread(file, 0, first);
  const nb = first.length >= 64 ? new DataView(first.buffer).getUint32(60) : 0;
  if (checkMode && nb > MAX_SNAPSHOTS) {
    // every other field is validated as usual; the count is the check's (snapshot-table-check.ts)
    new DataView(first.buffer).setUint32(60, MAX_SNAPSHOTS);
    const header = parseHeader(first, fileLength, filename, { checkMode: true });
    header.nbSnapshots = nb;
    return { header, fileLength };
  }
  return { header: parseHeader(first, fileLength, filename, { checkMode }), fileLength };
}

/**
 * Reads the snapshot table: a window that doubles until it holds all `nbSnapshots` entries,
 * bounded by the end of the file and by QEMU's 64 MiB limit. Returns the entries and the bytes
 * they take on disk (QEMU's snapshots_size).
 * @locking io
 */
export async function readSnapshotTable(
  file: BlockNode,
  header: Qcow2Header,
  fileLength: number,
  filename: string,
): Promise<{ entries: SnapshotEntry[]; bytes: number }> {
  const nb = header.nbSnapshots;
  if (nb === 0) return { entries: [], bytes: 0 };
  const start = header.snapshotsOffset;
  if (start >= fileLength) {
    throw new BlockError('EINVAL', `qcow2 '${filename}': the snapshot table (offset ${start}) lies past the end of the file (${fileLength} bytes)`, {
      file: filename,
      field: 'snapshots_offset',
      value: start,
      offset: start,
    });
  }
  const limit = Math.min(fileLength - start, MAX_SNAPSHOTS_SIZE);
  let window = Math.min(limit, Math.max(4096, nb * 128));
  for (;;) {
    const buf = new Uint8Array(window);
    await bdrvPread(file, start, buf);
    const extent = snapshotTableExtent(buf, nb);
    if (extent >= 0) {
      return { entries: parseSnapshotTable(buf.subarray(0, extent), nb, { version: header.version, sizeBytes: header.size }, filename), bytes: extent };
    }
    if (window >= limit) {
      const where = limit === MAX_SNAPSHOTS_SIZE ? 'exceeds the 64 MiB limit' : 'runs past the end of the file';
      throw new BlockError('EINVAL', `qcow2 '${filename}': the snapshot table (${nb} entries at offset ${start}) ${where}`, {
        file: filename,
        field: 'nb_snapshots',
        value: nb,
      });
    }
    window = Math.min(limit, window * 2);
  }
}

/**
 * Reads a table of `bytes` bytes at `offset`, refusing one that lies past the end of the file.
 * @locking io
 */
export async function readTable(file: BlockNode, offset: number, bytes: number, fileLength: number, filename: string, field: string): Promise<Uint8Array> {
  if (bytes > 0 && offset + bytes > fileLength) {
    throw new BlockError('EINVAL', `qcow2 '${filename}': the ${field} table (${bytes} bytes at offset ${offset}) runs past the end of the file (${fileLength} bytes)`, {
      file: filename,
      field: `${field}_offset`,
      value: offset,
    });
  }
  const buf = new Uint8Array(bytes);
  if (bytes > 0) await bdrvPread(file, offset, buf);
  return buf;
}

/** Reads `bytes` at `offset`, the part past the end of the file as zeros (for the check-mode open). */
async function readTableWithin(file: BlockNode, offset: number, bytes: number, fileLength: number): Promise<Uint8Array> {
  const buf = new Uint8Array(bytes);
  const within = Math.max(0, Math.min(bytes, fileLength - offset));
  if (within > 0) await bdrvPread(file, offset, buf.subarray(0, within));
  return buf;
}

/** Refuses snapshot entries whose L1 table cannot lie in the file (checked at open, like QEMU). */
function checkSnapshotEntries(entries: SnapshotEntry[], clusterSize: number, fileLength: number, filename: string): void {
  for (const [i, sn] of entries.entries()) {
    if (sn.l1TableOffset % clusterSize !== 0 || sn.l1TableOffset + sn.l1Size * 8 > fileLength) {
      throw new BlockError('EINVAL', `qcow2 '${filename}': snapshot ${i} ('${sn.name}') has an invalid L1 table offset ${sn.l1TableOffset}`, {
        file: filename,
        field: 'l1_table_offset',
        value: sn.l1TableOffset,
      });
    }
    if (sn.l1Size * 8 > 32 * 1024 * 1024) {
      throw new BlockError('EFBIG', `qcow2 '${filename}': snapshot ${i} ('${sn.name}') has an L1 table too large (l1_size: ${sn.l1Size})`, {
        file: filename,
        field: 'l1_size',
        value: sn.l1Size,
      });
    }
  }
}

/**
 * QEMU's default L2 cache: enough to cover the whole disk, at most 32 MiB, at least 1 MiB
 * (tables are cached as they are used, so a large limit costs nothing until then).
 * @locking common
 */
export function defaultL2CacheBytes(h: Qcow2Header): number {
  const C = 2 ** h.clusterBits;
  const tables = Math.ceil(h.size / ((C * C) / 8));
  return Math.max(1024 * 1024, Math.min(32 * 1024 * 1024, tables * C));
}

/**
 * Reads and validates all the metadata an open image keeps in memory and returns its state.
 * `refuseOverlaps: false` and `checkSnapshots: false` let the checker open an image whose tables
 * overlap or whose snapshot L1 pointers are bad, to report them (as QEMU's open does not check those);
 * with `checkSnapshots: false` a snapshot table the ordinary parser refuses is left empty in memory
 * (QEMU's open in check mode discards it too): the check reads it again its own way
 * (snapshot-table-check.ts).
 * @locking io
 */
export async function loadQcow2State(
  node: BlockNode,
  file: BlockNode,
  l2CacheBytes: number | undefined,
  opts: { refuseOverlaps?: boolean; checkSnapshots?: boolean } = {},
): Promise<Qcow2State> {
  const filename = file.filename || node.filename;
  const { header, fileLength } = await readQcow2Header(file, filename, opts.checkSnapshots === false);
  const C = 2 ** header.clusterBits;
  const l1 = await readTable(file, header.l1TableOffset, header.l1Size * 8, fileLength, filename, 'l1_table');
  const reftableBytes = header.refcountTableClusters * C;
  // check mode: a table that runs past the end of the file reads as zeros there, as QEMU reads it
  const reftable =
    opts.checkSnapshots === false
      ? await readTableWithin(file, header.refcountTableOffset, reftableBytes, fileLength)
      : await readTable(file, header.refcountTableOffset, reftableBytes, fileLength, filename, 'refcount_table');
  const table = await readSnapshotTable(file, header, fileLength, filename).catch((e: unknown) => {
    if (opts.checkSnapshots === false && e instanceof BlockError) return { entries: [], bytes: 0 };
    throw e;
  });
  const snapshots = table.entries;
  if (opts.checkSnapshots !== false) checkSnapshotEntries(snapshots, C, fileLength, filename);
  const s = new Qcow2State(node, file, filename, header, l1, reftable, snapshots, l2CacheBytes ?? defaultL2CacheBytes(header));
  // what the table takes on disk, for freeing it when it is written again
  recordSnapshotTableExtent(s, table.bytes);
  s.allocatedEnd = Math.ceil(fileLength / C);
  if (opts.refuseOverlaps !== false) checkNoMetadataOverlap(s);
  return s;
}

/**
 * Rebuilding the whole refcount structure from the in-memory refcount table (QEMU 7.2's
 * rebuild_refcount_structure), for `check -r all` when the stored refcounts cannot be trusted
 * enough to repair them in place (a cluster in use whose stored refcount is 0, a refcount block
 * that is unaligned, shared or has reserved bits).
 *
 * I/O code, run by check.ts with the qcow2 lock held. Crash-safe order: every new refcount block
 * and the new refcount table go to clusters the IMRT says are free (the header, every table and
 * every data cluster of the active state and of each snapshot are counted there, and the old
 * refcount structure too, so nothing in use is ever written over, the header least of all); they
 * are flushed before the header switches to the new table with one 12-byte write of
 * refcount_table_offset and refcount_table_clusters, which is flushed in turn. A crash before the
 * switch leaves the old structure in place (the new clusters are unreferenced); after it, the old
 * structure is merely leaked, and the check that follows frees it.
 */
import { BlockError } from '../../block/errors.js';
import { bdrvFlush } from '../../block/io.js';
import { TWO32 } from './constants.js';
import { headerFields } from './entries.js';
import { metadataRanges } from './overlap.js';
import type { Imrt } from './check-refcounts.js';
import type { Qcow2State } from './state.js';

/** The new structure as it is built: the refcount table's entries (host offsets, 0 for none). */
interface NewReftable {
  entries: number[];
  /** Entries the on-disk table will have (a whole number of clusters of 8-byte entries). */
  size: number;
}

/**
 * QEMU's alloc_clusters_imrt: `n` contiguous clusters free in the IMRT from `hint.first` on (the
 * IMRT grows past the end of the image when there are none), marked used; returns the offset.
 */
function allocInImrt(s: Qcow2State, imrt: Imrt, n: number, hint: { first: number }): number {
  let ci = hint.first;
  let run = 0;
  let firstGap = true;
  for (; ci < imrt.size && run < n; ci++) {
    if (imrt.get(ci) === 0) {
      run++;
      if (firstGap) {
        hint.first = ci;
        firstGap = false;
      }
    } else run = 0;
  }
  if (run < n) imrt.ensure(ci + n - run);
  const start = ci - run;
  for (let i = 0; i < n; i++) imrt.set(start + i, 1);
  return start * s.clusterSize;
}

/** One refcount block's bytes: the IMRT's counts for the clusters block `b` covers. */
function encodeRefblock(s: Qcow2State, imrt: Imrt, b: number): Uint8Array {
  const C = s.clusterSize;
  const E = s.refblockEntries;
  const bits = s.refcountBits;
  const out = new Uint8Array(C);
  const v = new DataView(out.buffer);
  for (let slot = 0; slot < E; slot++) {
    const rc = imrt.get(b * E + slot);
    if (rc === 0) continue;
    switch (bits) {
      case 8:
        v.setUint8(slot, rc);
        break;
      case 16:
        v.setUint16(slot * 2, rc);
        break;
      case 32:
        v.setUint32(slot * 4, rc);
        break;
      case 64:
        v.setUint32(slot * 8, Math.floor(rc / TWO32));
        v.setUint32(slot * 8 + 4, rc % TWO32);
        break;
      default: {
        const bit = slot * bits;
        out[bit >> 3] = (out[bit >> 3] ?? 0) | ((rc & ((1 << bits) - 1)) << (bit & 7));
      }
    }
  }
  return out;
}

/**
 * Refuses to write a new refcount cluster over the header or any table (the IMRT said free, so
 * this is a second line of defence). The old refcount blocks are left out: the real ones are
 * counted in the IMRT, and a damaged entry (reserved bits set) points at nothing worth keeping.
 */
function refuseOverlap(s: Qcow2State, offset: number, bytes: number, what: string): void {
  let hit: { what: string } | null = offset < s.clusterSize ? { what: 'header' } : null;
  for (const r of metadataRanges(s)) {
    if (hit !== null || r.start >= offset + bytes) break;
    if (r.end > offset && !r.what.startsWith('refcount block')) hit = r;
  }
  if (hit !== null) {
    throw new BlockError('EIO', `qcow2 '${s.filename}': ERROR writing ${what}: offset ${offset} overlaps the ${hit.what}; nothing was switched`, {
      node: s.node.nodeName,
      file: s.filename,
      field: 'refcount_table',
      offset,
      corrupt: true,
    });
  }
}

/**
 * QEMU's rebuild_refcounts_write_refblocks: a refcount block for every block of clusters in
 * [first, end) that has a cluster in use, allocated in the IMRT and written; returns whether the
 * refcount table had to grow.
 */
async function writeRefblocks(s: Qcow2State, imrt: Imrt, first: number, endCluster: number, table: NewReftable): Promise<boolean> {
  const C = s.clusterSize;
  const E = s.refblockEntries;
  const hint = { first: 0 };
  let grown = false;
  let end = endCluster;
  for (let ci = first; ci < end; ci++) {
    if (imrt.get(ci) === 0) continue;
    const b = Math.floor(ci / E);
    const blockStart = b * E;
    let off = table.entries[b] ?? 0;
    if (off === 0) {
      // never place a refcount block in a block of clusters already written
      if (hint.first < blockStart) hint.first = blockStart;
      off = allocInImrt(s, imrt, 1, hint);
      if (off / C >= end) end = off / C + 1; // the block that counts this one must be written too
      if (table.size <= b) {
        table.size = Math.ceil(((b + 1) * 8) / C) * (C / 8);
        grown = true;
      }
      table.entries[b] = off;
    }
    refuseOverlap(s, off, C, 'refblock');
    await s.writeMeta(off, encodeRefblock(s, imrt, b), 'rebuilt refcount block');
    ci = blockStart + E - 1; // this block is done
  }
  return grown;
}

/**
 * Builds a new refcount structure from `imrt` at fresh locations and switches the header to it.
 * @locking io
 */
export async function rebuildRefcountStructure(s: Qcow2State, imrt: Imrt): Promise<void> {
  const C = s.clusterSize;
  s.refblockCache.clear();
  const table: NewReftable = { entries: [], size: 0 };
  await writeRefblocks(s, imrt, 0, imrt.size, table);
  let tableOffset = -1;
  let tableClusters = 0;
  for (let round = 0; ; round++) {
    if (round > 64) throw new BlockError('EIO', `qcow2 '${s.filename}': the rebuilt refcount table did not stop growing`, { node: s.node.nodeName, file: s.filename });
    tableClusters = Math.ceil((table.size * 8) / C);
    if (table.size * 8 > 8 * 1024 * 1024) {
      throw new BlockError('EFBIG', `qcow2 '${s.filename}': the rebuilt refcount table would exceed 8 MiB`, { node: s.node.nodeName, file: s.filename, field: 'refcount_table_clusters' });
    }
    tableOffset = allocInImrt(s, imrt, tableClusters, { first: 0 });
    const start = tableOffset / C;
    if (!(await writeRefblocks(s, imrt, start, start + tableClusters, table))) break;
  }
  const bytes = new Uint8Array(tableClusters * C);
  const v = new DataView(bytes.buffer);
  for (let b = 0; b < table.size; b++) {
    const off = table.entries[b] ?? 0;
    v.setUint32(b * 8, Math.floor(off / TWO32));
    v.setUint32(b * 8 + 4, off % TWO32);
  }
  refuseOverlap(s, tableOffset, bytes.length, 'reftable');
  await s.writeMeta(tableOffset, bytes, 'rebuilt refcount table');
  // the new blocks and table are durable before the header points at them, and the switch after
  await bdrvFlush(s.file);
  await s.writeMeta(48, headerFields([[8, tableOffset], [4, tableClusters]]), 'header (rebuilt refcount table pointer)');
  await bdrvFlush(s.file);
  s.header.refcountTableOffset = tableOffset;
  s.header.refcountTableClusters = tableClusters;
  s.setReftable(bytes);
  s.refblockCache.clear();
  s.refblockGeneration++;
  s.freeClusterHint = 0;
  s.allocatedEnd = Math.max(s.allocatedEnd, imrt.size);
}

/**
 * Compressed cluster writes (qemu-img convert -c), as QEMU's qcow2 does them
 * (qcow2_co_pwritev_compressed_part, qcow2_alloc_compressed_cluster_offset, qcow2_alloc_bytes):
 * each whole guest cluster is deflated (raw deflate, 4 KiB window, as QEMU's zlib setting); a
 * cluster that does not shrink is written uncompressed. The compressed bytes are allocated at
 * byte granularity, several fragments sharing one host cluster: that cluster's refcount counts
 * one reference per fragment touching it. Only clusters without a host allocation (unallocated,
 * or zero without an offset) are written compressed; anything else is refused with EIO, as QEMU.
 *
 * I/O code, under the qcow2 lock. Crash-safe order: the data goes out first into bytes nothing
 * points at; then the refcount change and the L2 entry are made in memory (dirty) and the flush
 * writes the refcounts, a barrier, then the L2 table (writeback.ts). A crash leaves at most a leak.
 */
import zlib from 'node:zlib';
import { bdrvGetLength, bdrvPwrite, bdrvTruncate } from '../../block/io.js';
import { BlockError } from '../../block/errors.js';
import { HI_COMPRESSED, TWO32 } from './constants.js';
import { ClusterType, entryHi, entryLo, l2EntryType, setEntryRaw } from './entries.js';
import { l2ForRead, l2ForWrite, splitGuestOffset } from './cluster-map.js';
import { forgetDecompressed, qcow2Write } from './data-path.js';
import { refuseDataOnMetadata } from './overlap.js';
import { allocClusters, freeClusters, getRefcount, updateRefcount } from './refcount.js';
import type { Qcow2State } from './state.js';
import type { Table } from './table-cache.js';
import { boundDirtyMetadata } from './writeback.js';

/**
 * Where the next fragment may go (QEMU's free_byte_offset): the byte after the last fragment, in
 * a host cluster only compressed fragments use, and the entry that points at that last fragment
 * (while it still does, the cluster cannot have been freed and reused for anything else).
 */
interface FreeBytes {
  end: number;
  guest: number;
  hi: number;
  lo: number;
}

const freeBytes = new WeakMap<Qcow2State, FreeBytes>();

/**
 * Deflates one cluster as QEMU's qcow2_compress does (raw deflate, window bits 12, memLevel 9,
 * the default level); null when the result is not smaller than a cluster less one byte.
 * @locking common
 */
export function compressCluster(data: Uint8Array, clusterSize: number): Uint8Array | null {
  const out = zlib.deflateRawSync(data, { windowBits: 12, memLevel: 9, level: zlib.constants.Z_DEFAULT_COMPRESSION });
  return out.length < clusterSize - 1 ? out : null;
}

/**
 * The L2 entry halves of a compressed-cluster descriptor for `size` bytes at host byte `offset`
 * (the format stores the number of 512-byte sectors touched, less one, above the offset).
 * @locking common
 */
export function compressedDescriptor(offset: number, size: number, clusterBits: number, extraSectors = 0): { hi: number; lo: number } {
  const x = 62 - (clusterBits - 8); // bits of the host offset
  const sectors = Math.floor((offset + size - 1) / 512) - Math.floor(offset / 512) + extraSectors;
  if (sectors >= 2 ** (clusterBits - 8)) {
    throw new BlockError('EINVAL', `qcow2: ${size} compressed bytes at host offset ${offset} do not fit a descriptor`, { field: 'l2_table', offset });
  }
  const offHi = Math.floor(offset / TWO32);
  if (offset >= 2 ** x) {
    throw new BlockError('EFBIG', `qcow2: compressed data at host offset ${offset} lies beyond what a compressed descriptor can address`, { field: 'l2_table', offset });
  }
  return { hi: (HI_COMPRESSED | (sectors * 2 ** (x - 32)) | offHi) >>> 0, lo: offset - offHi * TWO32 };
}

/** True when the recorded free bytes may still be used: the last fragment is still in use and the cluster takes another reference. */
async function stillUsable(s: Qcow2State, rec: FreeBytes): Promise<boolean> {
  const { l1Index, l2Index } = splitGuestOffset(s, rec.guest);
  const t = await l2ForRead(s, l1Index);
  if (t === null || entryHi(t.view, l2Index) !== rec.hi || entryLo(t.view, l2Index) !== rec.lo) return false;
  const rc = await getRefcount(s, Math.floor(rec.end / s.clusterSize));
  return rc > 0 && rc < s.refcountMax;
}

/**
 * Allocates `size` bytes (at most a cluster) for a compressed fragment, as qcow2_alloc_bytes:
 * after the last fragment when it fits (or when the next fresh cluster follows it on the host),
 * else at the start of a fresh cluster. Every host cluster the fragment touches gains one
 * reference (in memory). Returns the host byte offset.
 */
async function allocBytes(s: Qcow2State, size: number): Promise<number> {
  const C = s.clusterSize;
  const rec = freeBytes.get(s);
  freeBytes.delete(s);
  const usable = rec !== undefined && rec.end % C !== 0 && (await stillUsable(s, rec));
  if (usable && C - (rec.end % C) >= size) {
    await updateRefcount(s, rec.end, size, 1);
    return rec.end;
  }
  const fresh = await allocClusters(s, 1); // refcount 1
  if (usable && fresh === rec.end - (rec.end % C) + C) {
    try {
      await updateRefcount(s, rec.end, 1, 1); // the tail of the old cluster: one more reference
    } catch (e) {
      await freeClusters(s, fresh, C).catch(() => undefined);
      throw e;
    }
    return rec.end;
  }
  return fresh;
}

/** Writes one compressed cluster (`packed`) for guest cluster `guest`; the qcow2 lock is held. */
async function writeOneLocked(s: Qcow2State, guest: number, packed: Uint8Array): Promise<void> {
  const { l1Index, l2Index } = splitGuestOffset(s, guest);
  const t = await l2ForWrite(s, l1Index);
  // pinned before any wait: lock-free reads could evict a clean table and lose the entry
  s.l2Cache.markDirty(t.offset, l2Index * 8, l2Index * 8 + 8);
  const type = l2EntryType(entryHi(t.view, l2Index), entryLo(t.view, l2Index), s.v3);
  if (type !== ClusterType.Unallocated && type !== ClusterType.ZeroPlain) {
    throw new BlockError('EIO', `qcow2 '${s.filename}': compressed write to guest offset ${guest}: the cluster is already allocated (compressed writes go only to unallocated clusters)`, {
      node: s.node.nodeName,
      file: s.filename,
      field: 'l2_table',
      offset: guest,
    });
  }
  const host = await allocBytes(s, packed.length);
  try {
    refuseDataOnMetadata(s, host, packed.length, guest);
    await bdrvPwrite(s.file, host, packed);
  } catch (e) {
    await freeClusters(s, host, packed.length).catch(() => undefined); // nothing points there yet
    throw e;
  }
  const d = compressedDescriptor(host, packed.length, s.clusterBits);
  setEntryRaw(t.view, l2Index, d.hi, d.lo);
  s.l2Cache.markDirty(t.offset, l2Index * 8, l2Index * 8 + 8);
  s.l2NeedsDataBarrier = true; // the entry points at data written since the last flush
  // data-path.ts caches the last decompressed cluster by its descriptor: a freed fragment's
  // descriptor may equal this new one's
  forgetDecompressed(s);
  const end = host + packed.length;
  if (end % s.clusterSize !== 0) freeBytes.set(s, { end, guest, hi: d.hi, lo: d.lo });
  await boundDirtyMetadata(s);
}

/**
 * Writes whole clusters at `offset` compressed (the last cluster of the disk may be short: it is
 * padded with zeros). A cluster that does not shrink is written as a normal cluster. A request
 * of 0 bytes rounds the file up to whole sectors, as QEMU's does at the end of convert -c.
 * @locking io
 */
export async function qcow2WriteCompressed(s: Qcow2State, offset: number, buf: Uint8Array): Promise<void> {
  const C = s.clusterSize;
  if (buf.length === 0) {
    const len = bdrvGetLength(s.file);
    if (len % 512 !== 0) await bdrvTruncate(s.file, len + 512 - (len % 512));
    return;
  }
  if (offset % C !== 0 || (buf.length % C !== 0 && offset + buf.length !== s.sizeBytes)) {
    throw new BlockError('EINVAL', `qcow2 '${s.filename}': compressed write of ${buf.length} bytes at guest offset ${offset} is not whole clusters of ${C} bytes`, {
      node: s.node.nodeName,
      file: s.filename,
      field: 'offset',
      offset,
    });
  }
  for (let done = 0; done < buf.length; done += C) {
    const n = Math.min(C, buf.length - done);
    let cluster = buf.subarray(done, done + n);
    if (n < C) {
      const padded = new Uint8Array(C);
      padded.set(cluster);
      cluster = padded;
    }
    const packed = compressCluster(cluster, C);
    if (packed === null) await qcow2Write(s, offset + done, buf.subarray(done, done + n));
    else await s.lock.run(() => writeOneLocked(s, offset + done, packed));
  }
}

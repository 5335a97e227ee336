/**
 * Changing a qcow2 image's virtual size (`img resize`, a node's truncate), as QEMU's
 * qcow2_co_truncate does it with preallocation off.
 *
 * I/O code: everything happens with the metadata lock held.
 *
 * Growing: the tail of a partial last cluster is zeroed, the L1 table grows (flushed), then the
 * size switches in one header write (setDiskSize); the new area maps nothing, so it reads zeros.
 * Shrinking: the clusters past the new end lose their references in memory (a full discard: the
 * entries become unallocated), the L2 tables wholly past the end are dropped from the L1 table,
 * the size switches (setDiskSize), the metadata flush writes it all in dependency order and frees
 * what lost its last reference only once no durable pointer to it remains, and then the file is
 * cut to the last cluster still in use. A crash anywhere leaves the old or the new size, with at
 * most leaked clusters (what was unreachable past the new end).
 */
import { BlockError } from '../../block/errors.js';
import { bdrvGetLength, bdrvTruncate } from '../../block/io.js';
import { l2ForWrite, l2Offset } from './cluster-map.js';
import { qcow2BlockStatus, qcow2Write, zeroClustersLocked } from './data-path.js';
import { ClusterType, entryHi, entryLo, isCopied, l2EntryType, setEntry, setEntryRaw } from './entries.js';
import { assertMetadataLocked, withMetadataLock, type MetadataLocked } from './metadata-lock.js';
import { getRefcount } from './refcount.js';
import { setDiskSize } from './snapshots.js';
import type { Qcow2State } from './state.js';
import { flushMetadata } from './writeback.js';

/**
 * Changes the virtual size to `sizeBytes` (QEMU's rules: a multiple of 512; a v2 image with
 * internal snapshots cannot be resized). Shrinking frees what lies past the new end and cuts the
 * file to what is still in use.
 * @locking io
 */
export async function qcow2Truncate(s: Qcow2State, sizeBytes: number): Promise<void> {
  const nodeName = s.node.nodeName;
  if (!Number.isSafeInteger(sizeBytes) || sizeBytes % 512 !== 0) {
    throw new BlockError('EINVAL', `The new size must be a multiple of 512 (qcow2 node '${nodeName}', size: ${sizeBytes})`, { node: nodeName, field: 'size', value: sizeBytes });
  }
  if (s.snapshots.length > 0 && !s.v3) {
    throw new BlockError('ENOTSUP', `Can't resize a v2 image which has snapshots (qcow2 node '${nodeName}')`, { node: nodeName, field: 'size', value: sizeBytes });
  }
  if (sizeBytes > s.sizeBytes) await zeroPartialTail(s, sizeBytes);
  await withMetadataLock(s, async (locked) => {
    if (sizeBytes >= s.sizeBytes) {
      await maskBackingPastEnd(s, sizeBytes);
      await setDiskSize(locked, s, sizeBytes);
      return;
    }
    await shrinkLocked(locked, s, sizeBytes);
  });
}

/**
 * Before growing: the bytes of the last cluster past the current size (kept by an earlier shrink
 * to a size inside the cluster, by snapstack or QEMU) would show again; they are written as zeros
 * first, so that the whole new area reads zeros (QEMU 7.2 lets the old bytes show).
 */
async function zeroPartialTail(s: Qcow2State, sizeBytes: number): Promise<void> {
  const C = s.clusterSize;
  const old = s.sizeBytes;
  const inCluster = old % C;
  if (inCluster === 0) return;
  const len = Math.min(sizeBytes, old - inCluster + C) - old;
  const st = await qcow2BlockStatus(s, old, len);
  if (st.data || (!st.allocated && s.node.backing !== undefined)) await qcow2Write(s, old, new Uint8Array(len));
}

/**
 * Before growing an overlay whose backing file reaches past the current end: the whole clusters
 * the new area shares with the backing file get the zero flag (v3), flushed before the size grows,
 * so that the new area reads zeros and never the backing file's data, even after a crash (QEMU
 * writes those zeros after the resize). The caller holds the metadata lock.
 */
async function maskBackingPastEnd(s: Qcow2State, sizeBytes: number): Promise<void> {
  const backing = s.node.backing;
  if (backing === undefined || !s.v3) return;
  const C = s.clusterSize;
  const first = Math.ceil(s.sizeBytes / C);
  const end = Math.ceil(Math.min(sizeBytes, bdrvGetLength(backing)) / C);
  if (end <= first) return;
  for (let c = first; c < end; ) {
    const l1Index = Math.floor(c / s.l2Entries);
    const stop = Math.min(end, (l1Index + 1) * s.l2Entries);
    const t = await l2ForWrite(s, l1Index);
    const lo = c - l1Index * s.l2Entries;
    for (let i = lo; i < stop - l1Index * s.l2Entries; i++) {
      if (l2EntryType(entryHi(t.view, i), entryLo(t.view, i), true) === ClusterType.Unallocated) setEntry(t.view, i, 0, false, true);
    }
    s.l2Cache.markDirty(t.offset, lo * 8, (stop - l1Index * s.l2Entries) * 8);
    c = stop;
  }
  await flushMetadata(s);
}

/**
 * Shrinks the image to `sizeBytes` (smaller than now): frees the clusters past the new end, drops
 * the L2 tables wholly past it, sets the size, flushes, then truncates the file to the last
 * cluster in use. The caller holds the metadata lock.
 * @locking io
 */
export async function shrinkLocked(locked: MetadataLocked, s: Qcow2State, sizeBytes: number): Promise<void> {
  assertMetadataLocked(locked, s, 'shrink');
  const C = s.clusterSize;
  const span = C * s.l2Entries;
  const firstCluster = Math.ceil(sizeBytes / C);
  const keepL1 = Math.ceil(sizeBytes / span);
  // the partial L2 table at the new end: its entries past the end become unallocated
  const boundary = keepL1 * s.l2Entries;
  if (firstCluster < boundary && keepL1 <= s.l1Size && l2Offset(s, keepL1 - 1) !== 0) {
    await zeroClustersLocked(s, firstCluster * C, boundary - firstCluster, true, true, true);
  }
  // the tables wholly past the end (VM state of the active image included, as QEMU drops it)
  for (let i = keepL1; i < s.l1Size; i++) {
    const off = l2Offset(s, i);
    if (off === 0) continue;
    if (isCopied(entryHi(s.l1View, i))) {
      // ours alone: its data clusters lose this reference too
      await zeroClustersLocked(s, i * span, s.l2Entries, true, true, true);
    }
    // a table shared with a snapshot keeps its data references (the snapshot still counts them)
    const now = l2Offset(s, i);
    s.l2Cache.drop(now);
    setEntryRaw(s.l1View, i, 0, 0);
    s.markL1Dirty(i);
    s.pendingFrees.push([now, C]);
  }
  await setDiskSize(locked, s, sizeBytes);
  await flushMetadata(s);
  await cutFile(s);
}

/** Truncates the file after the last cluster with a refcount (QEMU: qcow2_get_last_cluster), then flushes. */
async function cutFile(s: Qcow2State): Promise<void> {
  const C = s.clusterSize;
  const fileLength = bdrvGetLength(s.file);
  let last = Math.ceil(fileLength / C) - 1;
  while (last >= 0 && (await getRefcount(s, last)) === 0) last--;
  const end = (last + 1) * C;
  if (end >= fileLength) return;
  try {
    await bdrvTruncate(s.file, end);
    await s.flushFile('the file cut after a shrink');
  } catch (e) {
    // the image is whole without the cut: what lies past the last cluster in use is no one's
    throw new BlockError('EIO', `qcow2 '${s.filename}': the image was shrunk, but the file could not be cut to ${end} bytes: ${e instanceof Error ? e.message : String(e)}`, {
      node: s.node.nodeName,
      file: s.filename,
      offset: end,
      cause: e,
    });
  }
}

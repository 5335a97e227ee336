/**
 * qcow2 guest reads and writes: map guest clusters to host clusters, read or write the data in as
 * few file requests as possible, allocate (copy on write) where a cluster is missing, shared or
 * compressed, and zero or discard whole clusters by changing their L2 entries.
 *
 * I/O code. Reads and in-place writes take no lock: their mapping is looked up and the transfer
 * submitted without yielding in between. Allocating writes, zeroing and discarding run under the
 * qcow2 lock. An allocating write writes its data at once and changes the metadata in memory only
 * (the new cluster's refcount and the L2 entry are dirty; the old cluster's reference drop waits in
 * pendingFrees); writeback.ts puts them on disk in the crash-safe order at the next flush:
 * refcount, barrier (data and refcount durable), L2 entry, barrier, and only then the drop.
 */
import zlib from 'node:zlib';
import type { BlockStatus } from '../../block/driver.js';
import { bdrvPread, bdrvPwrite } from '../../block/io.js';
import { L2_HI_RESERVED, L2_LO_RESERVED } from './constants.js';
import { ClusterType, compressedExtent, entryHi, entryLo, entryOffset, isCopied, l2EntryType, setEntry, setEntryRaw } from './entries.js';
import { l2ForRead, l2ForWrite, splitGuestOffset } from './cluster-map.js';
import { refuseDataOnMetadata } from './overlap.js';
import { allocClusters, freeClusters } from './refcount.js';
import type { Qcow2State } from './state.js';
import type { Table } from './table-cache.js';
import { boundDirtyMetadata } from './writeback.js';

/** The last decompressed cluster, keyed by its L2 entry (sequential reads hit it). */
const lastDecompressed = new WeakMap<Qcow2State, { hi: number; lo: number; data: Uint8Array }>();

function checkNormalEntry(s: Qcow2State, hi: number, lo: number, guest: number): number {
  const off = entryOffset(hi, lo);
  if ((hi & L2_HI_RESERVED) !== 0 || (lo & L2_LO_RESERVED) !== 0) {
    throw s.corrupt(`L2 entry for guest offset ${guest} has reserved bits set`, 'l2_table');
  }
  if (off % s.clusterSize !== 0) throw s.corrupt(`Cluster allocation offset ${off} unaligned (guest offset ${guest})`, 'l2_table');
  return off;
}

/**
 * Drops the cached last decompressed cluster of `s` (a compressed write may reuse the bytes and
 * the descriptor of a freed compressed cluster).
 * @locking io
 */
export function forgetDecompressed(s: Qcow2State): void {
  lastDecompressed.delete(s);
}

/**
 * Reads guest bytes at `pos` that this image does not allocate into `dst`: from the backing node
 * as far as it reaches (and within the disk: the VM-state area never falls through), zeros past
 * it. Returns the backing read's promise, or null when nothing had to be read.
 */
function readUnallocated(s: Qcow2State, pos: number, dst: Uint8Array): Promise<void> | null {
  const backing = s.node.backing;
  const reach = backing === undefined ? 0 : Math.min(backing.drv.getLength(), s.sizeBytes) - pos;
  const n = Math.max(0, Math.min(dst.length, reach));
  if (n < dst.length) dst.fill(0, n);
  if (n === 0 || backing === undefined) return null;
  return bdrvPread(backing, pos, dst.subarray(0, n));
}

/** True when guest bytes from `pos` that this image does not allocate would come from a backing node. */
function fallsThrough(s: Qcow2State, pos: number): boolean {
  const backing = s.node.backing;
  return backing !== undefined && pos < Math.min(backing.drv.getLength(), s.sizeBytes);
}

/** How many bytes from `n` a run of unallocated entries after `l2Index` extends to, up to `limit`. */
function unallocatedBytes(s: Qcow2State, t: Table, l2Index: number, n: number, limit: number): number {
  const C = s.clusterSize;
  for (let k = l2Index + 1; n < limit && k < s.l2Entries; k++) {
    if (l2EntryType(entryHi(t.view, k), entryLo(t.view, k), s.v3) !== ClusterType.Unallocated) break;
    n = Math.min(n + C, limit);
  }
  return n;
}

async function decompressCluster(s: Qcow2State, hi: number, lo: number): Promise<Uint8Array> {
  const cached = lastDecompressed.get(s);
  if (cached !== undefined && cached.hi === hi && cached.lo === lo) return cached.data;
  const { offset, bytes } = compressedExtent(hi, lo, s.clusterBits);
  const raw = new Uint8Array(bytes);
  await bdrvPread(s.file, offset, raw);
  let data: Uint8Array;
  try {
    data = zlib.inflateRawSync(raw, { finishFlush: zlib.constants.Z_SYNC_FLUSH, maxOutputLength: s.clusterSize });
  } catch (e) {
    throw s.corrupt(`compressed cluster at host offset ${offset} does not decompress (${e instanceof Error ? e.message : String(e)})`, 'l2_table');
  }
  if (data.length < s.clusterSize) {
    throw s.corrupt(`compressed cluster at host offset ${offset} decompresses to ${data.length} bytes, not ${s.clusterSize}`, 'l2_table');
  }
  lastDecompressed.set(s, { hi, lo, data });
  return data;
}

/**
 * How many bytes from `n` (the part in the cluster at `l2Index`, at host offset `host`) a transfer
 * may cover: following entries are taken while they are normal, contiguous on the host (and, for
 * in-place writes, COPIED), up to `limit` bytes.
 */
function contiguousBytes(s: Qcow2State, t: Table, l2Index: number, host: number, n: number, limit: number, copiedOnly: boolean): number {
  const C = s.clusterSize;
  let expect = host + C;
  for (let k = l2Index + 1; n < limit && k < s.l2Entries; k++, expect += C) {
    const hi = entryHi(t.view, k);
    const lo = entryLo(t.view, k);
    if (l2EntryType(hi, lo, s.v3) !== ClusterType.Normal || (copiedOnly && !isCopied(hi)) || entryOffset(hi, lo) !== expect) break;
    n = Math.min(n + C, limit);
  }
  return n;
}

const ignore = (): void => undefined;

/**
 * Gives the transfers submitted so far (beyond the `guarded` first ones) a handler before the
 * request waits for something else, so that one failing meanwhile is not an unhandled rejection
 * (settle still reports it); returns the new count. Reads within one L2 table never get here.
 */
function guardTransfers(first: Promise<void>, more: Array<Promise<void>> | null, guarded: number): number {
  const total = 1 + (more?.length ?? 0);
  for (let k = guarded; k < total; k++) (k === 0 ? first : (more?.[k - 1] ?? first)).catch(ignore);
  return total;
}

/** Waits for the transfers a request submitted: the first one, and any others (usually none). */
async function settle(first: Promise<void> | null, more: Array<Promise<void>> | null): Promise<void> {
  if (more !== null) await Promise.all([first, ...more]);
  else if (first !== null) await first;
}

/**
 * Reads `buf.length` bytes at guest offset `offset` (which may lie in the VM-state area).
 * @locking io
 */
export async function qcow2Read(s: Qcow2State, offset: number, buf: Uint8Array): Promise<void> {
  const C = s.clusterSize;
  let done = 0;
  let first: Promise<void> | null = null; // the usual case: one transfer, no array
  let more: Array<Promise<void>> | null = null;
  let guarded = 0; // transfers given a handler: one that fails while we wait must not go unhandled
  // a damaged entry met after a transfer was submitted must not leave that transfer unawaited
  try {
    while (done < buf.length) {
      const pos = offset + done;
      const inCluster = pos % C;
      const cluster = (pos - inCluster) / C;
      const l1Index = Math.floor(cluster / s.l2Entries);
      const l2Index = cluster - l1Index * s.l2Entries;
      if (first !== null) guarded = guardTransfers(first, more, guarded);
      const t = await l2ForRead(s, l1Index);
      // everything from here to the submission is synchronous: the entries cannot change under us
      let n = Math.min(C - inCluster, buf.length - done);
      if (t === null) {
        n = Math.min((s.l2Entries - l2Index) * C - inCluster, buf.length - done);
        const p = readUnallocated(s, pos, buf.subarray(done, done + n));
        if (p !== null) {
          if (first === null) first = p;
          else (more ??= []).push(p);
        }
        done += n;
        continue;
      }
      const hi = entryHi(t.view, l2Index);
      const lo = entryLo(t.view, l2Index);
      const type = l2EntryType(hi, lo, s.v3);
      if (type === ClusterType.Normal) {
        const host = checkNormalEntry(s, hi, lo, pos);
        n = contiguousBytes(s, t, l2Index, host, n, buf.length - done, false);
        const p = bdrvPread(s.file, host + inCluster, buf.subarray(done, done + n));
        if (first === null) first = p;
        else (more ??= []).push(p);
      } else if (type === ClusterType.Compressed) {
        if (first !== null) guarded = guardTransfers(first, more, guarded);
        const data = await decompressCluster(s, hi, lo);
        buf.set(data.subarray(inCluster, inCluster + n), done);
      } else if (type === ClusterType.Unallocated) {
        n = unallocatedBytes(s, t, l2Index, n, buf.length - done);
        const p = readUnallocated(s, pos, buf.subarray(done, done + n));
        if (p !== null) {
          if (first === null) first = p;
          else (more ??= []).push(p);
        }
      } else {
        buf.fill(0, done, done + n); // a zero cluster: zeros, masking the backing file
      }
      done += n;
    }
  } finally {
    await settle(first, more);
  }
}

/** One contiguous piece of a write that maps onto clusters allocated in place. */
async function writeInPlace(s: Qcow2State, host: number, data: Uint8Array): Promise<void> {
  s.beginInPlaceWrite();
  try {
    await bdrvPwrite(s.file, host, data);
  } finally {
    s.endInPlaceWrite();
  }
}

/**
 * Writes `buf` at guest offset `offset`: in place where the cluster is allocated and not shared,
 * through allocation (copy on write) elsewhere.
 * @locking io
 */
export async function qcow2Write(s: Qcow2State, offset: number, buf: Uint8Array): Promise<void> {
  const C = s.clusterSize;
  let done = 0;
  let first: Promise<void> | null = null; // the usual case: one transfer, no array
  let more: Array<Promise<void>> | null = null;
  try {
    while (done < buf.length) {
      const pos = offset + done;
      const inCluster = pos % C;
      const cluster = (pos - inCluster) / C;
      const l1Index = Math.floor(cluster / s.l2Entries);
      const l2Index = cluster - l1Index * s.l2Entries;
      const t = await l2ForRead(s, l1Index);
      if (t !== null && !s.lock.isLocked && isCopied(entryHi(s.l1View, l1Index))) {
        const hi = entryHi(t.view, l2Index);
        const lo = entryLo(t.view, l2Index);
        if (l2EntryType(hi, lo, s.v3) === ClusterType.Normal && isCopied(hi)) {
          const host = checkNormalEntry(s, hi, lo, pos);
          const n = contiguousBytes(s, t, l2Index, host, Math.min(C - inCluster, buf.length - done), buf.length - done, true);
          refuseDataOnMetadata(s, host, n + inCluster, pos);
          const p = writeInPlace(s, host + inCluster, buf.subarray(done, done + n));
          if (first === null) first = p;
          else (more ??= []).push(p);
          done += n;
          continue;
        }
      }
      // allocation: as many clusters as the request covers within this L2 table, under the lock
      const n = Math.min((s.l2Entries - l2Index) * C - inCluster, buf.length - done);
      await s.lock.run(() => allocatingWrite(s, pos, buf.subarray(done, done + n)));
      done += n;
    }
  } finally {
    await settle(first, more);
  }
}

/**
 * Reads the current contents of the guest cluster at `guest` described by an L2 entry into
 * `into`: its data, or for an unallocated one what the backing node holds there.
 */
async function readOldCluster(s: Qcow2State, hi: number, lo: number, type: ClusterType, into: Uint8Array, guest: number): Promise<void> {
  if (type === ClusterType.Normal) await bdrvPread(s.file, entryOffset(hi, lo), into);
  else if (type === ClusterType.Compressed) into.set(await decompressCluster(s, hi, lo));
  else if (type === ClusterType.Unallocated) await readUnallocated(s, guest, into);
  else into.fill(0);
}

/**
 * Defers the references that L2 entries held (after they stopped pointing there, in memory) to
 * the next metadata flush, once the new entries are on disk: host-contiguous clusters go as one
 * range, so discarding a large area costs one refcount update per run, not one per cluster.
 */
function deferRelease(s: Qcow2State, old: Array<[number, number, ClusterType]>): void {
  const C = s.clusterSize;
  let runStart = -1;
  let runLen = 0;
  for (const [hi, lo, type] of old) {
    if (type === ClusterType.Normal || type === ClusterType.ZeroAlloc) {
      const off = entryOffset(hi, lo);
      if (off % C !== 0) continue; // a damaged entry names no cluster: leak rather than free another
      if (runLen > 0 && off === runStart + runLen * C) {
        runLen++;
        continue;
      }
      if (runLen > 0) s.pendingFrees.push([runStart, runLen * C]);
      runStart = off;
      runLen = 1;
    } else if (type === ClusterType.Compressed) {
      const { offset, bytes } = compressedExtent(hi, lo, s.clusterBits);
      const start = offset - (offset % 512);
      s.pendingFrees.push([start, offset + bytes - start]);
    }
  }
  if (runLen > 0) s.pendingFrees.push([runStart, runLen * C]);
}

/**
 * Writes `data` at guest `pos`, all within one L2 table: clusters that are allocated and not
 * shared are written in place; the others get freshly allocated clusters (contiguous on the host
 * where possible), filled with the old contents around the new data.
 */
async function allocatingWrite(s: Qcow2State, pos: number, data: Uint8Array): Promise<void> {
  const C = s.clusterSize;
  const { l1Index, l2Index } = splitGuestOffset(s, pos);
  const t = await l2ForWrite(s, l1Index);
  const first = l2Index;
  const inFirst = pos % C;
  const count = Math.ceil((inFirst + data.length) / C);
  // pinned before the first wait: a clean table may be evicted by lock-free reads meanwhile, and
  // the entries set below must land in the cached table that the flush writes
  s.l2Cache.markDirty(t.offset, first * 8, (first + count) * 8);
  // which clusters need a new host cluster
  let i = 0;
  while (i < count) {
    const hi = entryHi(t.view, first + i);
    const lo = entryLo(t.view, first + i);
    const type = l2EntryType(hi, lo, s.v3);
    const guestStart = i === 0 ? 0 : i * C - inFirst; // offset in `data` where cluster i starts
    if (type === ClusterType.Normal && isCopied(hi)) {
      const host = checkNormalEntry(s, hi, lo, pos + guestStart);
      refuseDataOnMetadata(s, host, C, pos + guestStart);
      const from = i === 0 ? 0 : guestStart;
      const to = Math.min(data.length, (i + 1) * C - inFirst);
      await bdrvPwrite(s.file, host + (i === 0 ? inFirst : 0), data.subarray(from, to));
      i++;
      continue;
    }
    // a run of clusters that all need allocation
    let run = 1;
    while (i + run < count) {
      const h2 = entryHi(t.view, first + i + run);
      const l2 = entryLo(t.view, first + i + run);
      if (l2EntryType(h2, l2, s.v3) === ClusterType.Normal && isCopied(h2)) break;
      run++;
    }
    // the entries replaced here are freed later: a damaged (unaligned) one is refused, as QEMU does
    for (let k = 0; k < run; k++) {
      const h = entryHi(t.view, first + i + k);
      const l = entryLo(t.view, first + i + k);
      const ty = l2EntryType(h, l, s.v3);
      if (ty === ClusterType.Normal || ty === ClusterType.ZeroAlloc) checkNormalEntry(s, h, l, pos - inFirst + (i + k) * C);
    }
    const newHost = await allocClusters(s, run);
    const runStartGuest = i * C; // relative to the first cluster's start
    const dataFrom = Math.max(0, runStartGuest - inFirst);
    const dataTo = Math.min(data.length, (i + run) * C - inFirst);
    const headGap = Math.max(0, inFirst - runStartGuest); // bytes of the run before the new data
    const tailGap = run * C - headGap - (dataTo - dataFrom);
    let payload: Uint8Array;
    if (headGap === 0 && tailGap === 0) payload = data.subarray(dataFrom, dataTo);
    else {
      payload = new Uint8Array(run * C);
      if (headGap > 0) {
        const h = entryHi(t.view, first + i);
        const l = entryLo(t.view, first + i);
        await readOldCluster(s, h, l, l2EntryType(h, l, s.v3), payload.subarray(0, C), pos - inFirst + i * C);
      }
      if (tailGap > 0) {
        const last = i + run - 1;
        const h = entryHi(t.view, first + last);
        const l = entryLo(t.view, first + last);
        if (!(run === 1 && headGap > 0)) await readOldCluster(s, h, l, l2EntryType(h, l, s.v3), payload.subarray((run - 1) * C, run * C), pos - inFirst + last * C);
      }
      payload.set(data.subarray(dataFrom, dataTo), headGap);
    }
    try {
      refuseDataOnMetadata(s, newHost, run * C, pos);
    } catch (e) {
      await freeClusters(s, newHost, run * C); // the allocator's mistake must not leak too
      throw e;
    }
    try {
      await bdrvPwrite(s.file, newHost, payload);
    } catch (e) {
      await freeClusters(s, newHost, run * C).catch(() => undefined); // nothing points there yet
      throw e;
    }
    const old: Array<[number, number, ClusterType]> = [];
    for (let k = 0; k < run; k++) {
      const idx = first + i + k;
      const h = entryHi(t.view, idx);
      const l = entryLo(t.view, idx);
      old.push([h, l, l2EntryType(h, l, s.v3)]);
      setEntry(t.view, idx, newHost + k * C, true);
    }
    s.l2Cache.markDirty(t.offset, (first + i) * 8, (first + i + run) * 8);
    s.l2NeedsDataBarrier = true; // the entries point at data written since the last flush
    deferRelease(s, old);
    i += run;
  }
  await boundDirtyMetadata(s);
}

/**
 * Makes whole clusters read as zeros by their L2 entries (the v3 zero flag), or with `discard`
 * releases them: a guest discard (QEMU's, not `full`) leaves zero-flagged entries on a v3 image
 * with a backing file, so that the backing file's data does not show through, and unallocated
 * ones elsewhere; a `full` discard (shrinking) always leaves them unallocated. Returns false when
 * the image cannot (a v2 image has no zero flag), so that the caller writes zeros instead.
 * @locking io
 */
export async function qcow2ZeroClusters(s: Qcow2State, offset: number, clusters: number, mayUnmap: boolean, discard: boolean, full = false): Promise<boolean> {
  if (!s.v3 && !discard) return false;
  await s.lock.run(() => zeroClustersLocked(s, offset, clusters, mayUnmap, discard, full));
  return true;
}

/**
 * qcow2ZeroClusters for callers that already hold the qcow2 lock.
 * @locking io
 */
export async function zeroClustersLocked(s: Qcow2State, offset: number, clusters: number, mayUnmap: boolean, discard: boolean, full = false): Promise<void> {
  const C = s.clusterSize;
  // a guest discard over a backing file must not let the backing file's data show through
  const zeroFlag = !discard || (!full && s.v3 && s.node.backing !== undefined);
  if (discard && zeroFlag) mayUnmap = true;
  let c = 0;
  while (c < clusters) {
    const pos = offset + c * C;
    const { l1Index, l2Index } = splitGuestOffset(s, pos);
    const n = Math.min(clusters - c, s.l2Entries - l2Index);
    const existing = await l2ForRead(s, l1Index);
    // nothing allocated there: reads as zeros already, unless a backing file shows through
    if (existing === null && !(zeroFlag && fallsThrough(s, pos))) {
      c += n;
      continue;
    }
    const t = await l2ForWrite(s, l1Index);
    const old: Array<[number, number, ClusterType]> = [];
    for (let k = 0; k < n; k++) {
      const idx = l2Index + k;
      const h = entryHi(t.view, idx);
      const l = entryLo(t.view, idx);
      const type = l2EntryType(h, l, s.v3);
      if (!zeroFlag) {
        if (type === ClusterType.Unallocated) continue;
        old.push([h, l, type]);
        setEntryRaw(t.view, idx, 0, 0);
      } else if (type === ClusterType.ZeroPlain || (type === ClusterType.Unallocated && !fallsThrough(s, pos + k * C))) {
        continue;
      } else if (type === ClusterType.Unallocated) {
        setEntry(t.view, idx, 0, false, true); // masks the backing file
      } else if (!mayUnmap && type === ClusterType.Normal && isCopied(h)) {
        setEntry(t.view, idx, entryOffset(h, l), true, true); // keep the allocation, read zeros
      } else {
        old.push([h, l, type]);
        setEntry(t.view, idx, 0, false, true);
      }
    }
    s.l2Cache.markDirty(t.offset, l2Index * 8, (l2Index + n) * 8);
    deferRelease(s, old);
    c += n;
  }
  await boundDirtyMetadata(s);
}

/**
 * The status of guest clusters from `offset`: a run of entries of one kind (and, for data,
 * contiguous on the host) within one L2 table, at most `bytes` long.
 * @locking io
 */
export async function qcow2BlockStatus(s: Qcow2State, offset: number, bytes: number): Promise<BlockStatus> {
  const C = s.clusterSize;
  const inCluster = offset % C;
  const { l1Index, l2Index } = splitGuestOffset(s, offset);
  const t = await l2ForRead(s, l1Index);
  const maxRun = Math.min(bytes, (s.l2Entries - l2Index) * C - inCluster);
  // unallocated ranges read from the backing file where it reaches: not known to be zero
  if (t === null) return { bytes: maxRun, data: false, zero: !fallsThrough(s, offset), allocated: false, hostOffset: null };
  const kind = (j: number): { type: ClusterType; host: number } => {
    const hi = entryHi(t.view, j);
    const lo = entryLo(t.view, j);
    const type = l2EntryType(hi, lo, s.v3);
    return { type, host: type === ClusterType.Normal ? entryOffset(hi, lo) : 0 };
  };
  const first = kind(l2Index);
  let n = Math.min(C - inCluster, maxRun);
  for (let j = l2Index + 1; n < maxRun && j < s.l2Entries; j++) {
    const k = kind(j);
    if (k.type !== first.type) break;
    if (first.type === ClusterType.Normal && k.host !== first.host + (j - l2Index) * C) break;
    if (first.type === ClusterType.Compressed) break;
    n = Math.min(n + C, maxRun);
  }
  switch (first.type) {
    case ClusterType.Normal:
      return { bytes: n, data: true, zero: false, allocated: true, hostOffset: first.host + inCluster };
    case ClusterType.Compressed:
      return { bytes: n, data: true, zero: false, allocated: true, hostOffset: null };
    case ClusterType.ZeroPlain:
    case ClusterType.ZeroAlloc:
      return { bytes: n, data: false, zero: true, allocated: true, hostOffset: null };
    default:
      return { bytes: n, data: false, zero: !fallsThrough(s, offset), allocated: false, hostOffset: null };
  }
}

/**
 * qcow2 refcounts: reading and changing a cluster's reference count, allocating and freeing
 * clusters, creating refcount blocks and growing the refcount table.
 *
 * I/O code, called with the qcow2 lock held. Changes stay in memory (dirty refcount blocks and
 * table entries) until writeback.ts flushes the metadata. Crash-safe order, whatever subset of the
 * writes between two flushes reaches the disk: a cluster's refcount is on disk before anything
 * that points to it (the flush writes refcount blocks, then a barrier, then L2 and L1 tables), and
 * is lowered only after the last pointer to it is on disk (pendingFrees); a new refcount block is
 * on disk before the table entry that points to it (writeDirtyRefcounts); a new refcount table and
 * the counts it relies on are written and flushed before the header switches to it, and the old
 * one is freed after that switch is on disk.
 */
import { bdrvGetLength } from '../../block/io.js';
import { BlockError } from '../../block/errors.js';
import { REFT_LO_RESERVED, TWO32 } from './constants.js';
import { entryHi, entryLo, entryOffset, headerFields, setEntry } from './entries.js';
import { overlappingMetadata } from './overlap.js';
import type { Qcow2State } from './state.js';
import type { Table } from './table-cache.js';


/**
 * Reads slot `i` of a refcount block.
 * @locking common
 */
export function readSlot(t: Table, i: number, bits: number): number {
  switch (bits) {
    case 8:
      return t.view.getUint8(i);
    case 16:
      return t.view.getUint16(i * 2);
    case 32:
      return t.view.getUint32(i * 4);
    case 64:
      return t.view.getUint32(i * 8) * TWO32 + t.view.getUint32(i * 8 + 4);
    default: {
      const bit = i * bits;
      const byte = t.bytes[bit >> 3] ?? 0;
      return (byte >> (bit & 7)) & ((1 << bits) - 1);
    }
  }
}

/** Writes slot `i` of a refcount block; returns the byte range changed. */
function writeSlot(t: Table, i: number, bits: number, value: number): [number, number] {
  switch (bits) {
    case 8:
      t.view.setUint8(i, value);
      return [i, i + 1];
    case 16:
      t.view.setUint16(i * 2, value);
      return [i * 2, i * 2 + 2];
    case 32:
      t.view.setUint32(i * 4, value);
      return [i * 4, i * 4 + 4];
    case 64: {
      const hi = Math.floor(value / TWO32);
      t.view.setUint32(i * 8, hi);
      t.view.setUint32(i * 8 + 4, value - hi * TWO32);
      return [i * 8, i * 8 + 8];
    }
    default: {
      const bit = i * bits;
      const mask = ((1 << bits) - 1) << (bit & 7);
      const byte = bit >> 3;
      t.bytes[byte] = ((t.bytes[byte] ?? 0) & ~mask) | ((value << (bit & 7)) & mask);
      return [byte, byte + 1];
    }
  }
}

/** Number of entries in the refcount table. */
function reftableEntries(s: Qcow2State): number {
  return s.reftable.length / 8;
}

/**
 * Host offset of refcount block `b`, 0 when it is not allocated (or past the table).
 * @locking io
 */
export function refblockOffset(s: Qcow2State, b: number): number {
  if (b >= reftableEntries(s)) return 0;
  const hi = entryHi(s.reftableView, b);
  const lo = entryLo(s.reftableView, b);
  if ((lo & REFT_LO_RESERVED) !== 0) throw s.corrupt(`refcount table entry ${b} has reserved bits set`, 'refcount_table');
  return entryOffset(hi, lo);
}

async function loadRefblock(s: Qcow2State, off: number, b: number): Promise<Table> {
  if (off % s.clusterSize !== 0) throw s.corrupt(`refcount block ${b} offset ${off} is not cluster aligned`, 'refcount_table');
  return s.refblockCache.peek(off) ?? (await s.refblockCache.get(off));
}

/**
 * Writes every refcount block changed in memory and, behind a flush (a table entry must never
 * reach the disk before the block it points at), the changed refcount-table entries. The blocks
 * are not flushed here: the caller puts a barrier between them and whatever relies on them.
 * Returns true when anything was written.
 * @locking io
 */
export async function writeDirtyRefcounts(s: Qcow2State): Promise<boolean> {
  if (s.inMetadataTx) {
    throw new BlockError('EIO', `qcow2 '${s.filename}': internal error: refcounts written in place inside a metadata transaction`, { node: s.node.nodeName, file: s.filename });
  }
  let wrote = false;
  if (s.refblockCache.hasDirty) {
    await s.writeMetaAll(s.refblockCache.dirtyWrites('refcount block'));
    s.refblockCache.markClean();
    wrote = true;
  }
  if (s.reftableDirtyLo < s.reftableDirtyHi) {
    const lo = s.reftableDirtyLo;
    const hi = Math.min(s.reftableDirtyHi, s.reftable.length / 8);
    await s.flushFile('refcount blocks before their table entries');
    await s.writeMeta(s.header.refcountTableOffset + lo * 8, s.reftable.subarray(lo * 8, hi * 8), 'refcount table entries');
    s.reftableDirtyLo = Infinity;
    s.reftableDirtyHi = 0;
    wrote = true;
  }
  return wrote;
}

/**
 * Drops every refcount change not yet written (a refused snapshot walk: nothing of it may reach
 * the disk); the refcount blocks and table are read from the file again. Only for callers that
 * started from clean metadata (writeback.ts flushMetadata), so nothing else is lost.
 * @locking io
 */
export async function discardDirtyRefcounts(s: Qcow2State): Promise<void> {
  s.refblockCache.discardDirty();
  if (s.reftableDirtyLo < s.reftableDirtyHi) {
    s.setReftable(await s.readMeta(s.header.refcountTableOffset, s.header.refcountTableClusters * s.clusterSize, 'refcount table'));
    s.reftableDirtyLo = Infinity;
    s.reftableDirtyHi = 0;
    s.refblockGeneration++;
  }
  s.freeClusterHint = 0;
}

/**
 * The refcount of cluster `clusterIndex` (0 when no refcount block covers it).
 * @locking io
 */
export async function getRefcount(s: Qcow2State, clusterIndex: number): Promise<number> {
  const b = Math.floor(clusterIndex / s.refblockEntries);
  const off = refblockOffset(s, b);
  if (off === 0) return 0;
  const t = await loadRefblock(s, off, b);
  return readSlot(t, clusterIndex - b * s.refblockEntries, s.refcountBits);
}

/**
 * Adds `addend` to the refcount of every cluster that [offset, offset + length) touches, in memory
 * (the changed ranges are dirty until the next metadata flush). Refcount blocks are created as
 * needed for increases; an underflow or overflow is refused before anything changes.
 * @locking io
 */
export async function updateRefcount(s: Qcow2State, offset: number, length: number, addend: number): Promise<void> {
  if (length <= 0 || addend === 0) return;
  const E = s.refblockEntries;
  const first = Math.floor(offset / s.clusterSize);
  const last = Math.floor((offset + length - 1) / s.clusterSize);
  const bFirst = Math.floor(first / E);
  const bLast = Math.floor(last / E);
  // 1. every refcount block the range needs exists (creating one may move the table) ...
  for (let b = bFirst; b <= bLast; b++) {
    if (refblockOffset(s, b) === 0) {
      if (addend < 0) throw s.corrupt(`freeing clusters ${first}..${last} that no refcount block covers`, 'refcount');
      await ensureRefblock(s, b);
    }
  }
  // 2. ... and is in memory; from here on everything is synchronous until the writes
  const tables: Table[] = [];
  const offsets: number[] = [];
  for (let b = bFirst; b <= bLast; b++) {
    const off = refblockOffset(s, b);
    offsets.push(off);
    tables.push(await loadRefblock(s, off, b));
  }
  // 3. validate every change first, so a refused update writes nothing
  for (let ci = first; ci <= last; ci++) {
    const b = Math.floor(ci / E);
    const rc = readSlot(tables[b - bFirst] as Table, ci - b * E, s.refcountBits);
    const next = rc + addend;
    if (next < 0) throw s.corrupt(`refcount of cluster ${ci} (offset ${ci * s.clusterSize}) would drop below zero`, 'refcount');
    if (next > s.refcountMax) {
      throw new BlockError('EFBIG', `qcow2 '${s.filename}': refcount of cluster ${ci} would overflow ${s.refcountBits}-bit refcounts (use a wider refcount_bits)`, {
        node: s.node.nodeName,
        file: s.filename,
        field: 'refcount_bits',
      });
    }
  }
  // 4. apply, and mark each changed byte range dirty (written by the next metadata flush)
  for (let b = bFirst; b <= bLast; b++) {
    const t = tables[b - bFirst] as Table;
    const off = offsets[b - bFirst] as number;
    const from = Math.max(first, b * E);
    const to = Math.min(last, (b + 1) * E - 1);
    let lo = Infinity;
    let hi = 0;
    for (let c = from; c <= to; c++) {
      const slot = c - b * E;
      const next = readSlot(t, slot, s.refcountBits) + addend;
      const [x, z] = writeSlot(t, slot, s.refcountBits, next);
      if (x < lo) lo = x;
      if (z > hi) hi = z;
      if (next === 0) {
        // a freed cluster may come back holding something else: forget any cached copy
        s.l2Cache.drop(c * s.clusterSize);
        if (c * s.clusterSize !== off) s.refblockCache.drop(c * s.clusterSize);
        if (c < s.freeClusterHint) s.freeClusterHint = c;
      }
    }
    if (lo < hi) s.refblockCache.markDirty(off, lo, hi);
  }
}

/**
 * The refcount of cluster `ci` when its refcount block is in memory (cached), without
 * waiting; -1 when the block must be read first (use getRefcount).
 * @locking io
 */
export function peekRefcount(s: Qcow2State, ci: number): number {
  const b = Math.floor(ci / s.refblockEntries);
  const off = refblockOffset(s, b);
  if (off === 0) return 0;
  const t = s.refblockCache.lookup(off);
  if (t === undefined) return -1;
  return readSlot(t, ci - b * s.refblockEntries, s.refcountBits);
}

/** The first run of `n` free clusters at or after the hint, and the first free cluster seen. */
async function findFreeRun(s: Qcow2State, n: number): Promise<{ start: number; firstFree: number }> {
  let start = s.freeClusterHint;
  let run = 0;
  let firstFree = -1; // the first free cluster seen, even in a gap too short for n
  for (let ci = start; run < n; ci++) {
    const cached = peekRefcount(s, ci);
    const rc = cached >= 0 ? cached : await getRefcount(s, ci);
    if (rc === 0) {
      run++;
      if (firstFree < 0) firstFree = ci;
    } else {
      run = 0;
      start = ci + 1;
    }
  }
  return { start, firstFree };
}

/** Refcount blocks that [start, start + n) needs and that do not exist yet. */
function missingRefblocks(s: Qcow2State, start: number, n: number): number[] {
  const E = s.refblockEntries;
  const missing: number[] = [];
  for (let b = Math.floor(start / E); b <= Math.floor((start + n - 1) / E); b++) if (refblockOffset(s, b) === 0) missing.push(b);
  return missing;
}

/**
 * Creates the refcount blocks `blocks` in the free clusters [at, at + blocks.length), each
 * counting those of the new clusters it covers; clusters covered by existing blocks are counted
 * there. Everything stays dirty in memory: writeDirtyRefcounts writes the blocks before (behind a
 * flush) the table entries that point at them.
 */
async function createRefblocksAt(s: Qcow2State, blocks: number[], at: number): Promise<void> {
  const E = s.refblockEntries;
  const C = s.clusterSize;
  const k = blocks.length;
  const fresh = new Map<number, Table>();
  for (const [j, b] of blocks.entries()) {
    fresh.set(b, s.refblockCache.insert((at + j) * C, new Uint8Array(C)));
    s.refblockCache.markDirty((at + j) * C, 0, C);
  }
  for (let c = at; c < at + k; c++) {
    const t = fresh.get(Math.floor(c / E));
    if (t !== undefined) writeSlot(t, c - Math.floor(c / E) * E, s.refcountBits, 1);
  }
  for (const [j, b] of blocks.entries()) {
    setEntry(s.reftableView, b, (at + j) * C, false);
    s.markReftableDirty(b);
  }
  s.refblockGeneration++;
  for (let c = at; c < at + k; c++) if (!fresh.has(Math.floor(c / E))) await updateRefcount(s, c * C, C, 1);
}

/**
 * Allocates `n` contiguous free clusters, sets their refcounts to 1 and returns the host offset.
 * Refcount blocks the run needs are created in free clusters just in front of it, so a run may
 * span any number of refcount blocks (a run as long as one block covers fits too).
 * @locking io
 */
export async function allocClusters(s: Qcow2State, n: number): Promise<number> {
  let want = n; // n clusters for the caller, plus the refcount blocks placed in front of them
  for (let attempt = 0; attempt < 100; attempt++) {
    const { start, firstFree } = await findFreeRun(s, want);
    if ((start + want) * s.clusterSize > Number.MAX_SAFE_INTEGER / 2) {
      throw new BlockError('ENOSPC', `qcow2 '${s.filename}': no room for ${n} more clusters`, { node: s.node.nodeName, file: s.filename });
    }
    const missing = missingRefblocks(s, start, want);
    if (n + missing.length !== want) {
      want = n + missing.length; // a run of another length: look again
      continue;
    }
    const last = missing[missing.length - 1];
    if (last !== undefined && last >= reftableEntries(s)) {
      await growReftable(s, last + 1); // the table moves (and may take free clusters): look again
      continue;
    }
    // damaged refcounts (a zeroed block or table entry) make used clusters look free: never hand
    // out a cluster that the header or any table occupies (QEMU's overlap check), whatever the
    // refcounts say; the image is marked corrupt instead
    const clash = overlappingMetadata(s, start * s.clusterSize, want * s.clusterSize);
    if (clash !== null) {
      throw await s.signalCorruption(
        `the refcounts call clusters ${start}..${start + want - 1} free, but the ${clash.what} (host offset ${clash.start}) is there`,
        'refcount',
        start * s.clusterSize,
      );
    }
    if (missing.length > 0) await createRefblocksAt(s, missing, start);
    const dataStart = start + missing.length;
    await updateRefcount(s, dataStart * s.clusterSize, n * s.clusterSize, 1);
    // everything before the hint is in use: it moves past this run unless a shorter gap was skipped
    s.freeClusterHint = firstFree === start ? dataStart + n : Math.max(s.freeClusterHint, firstFree);
    s.allocatedEnd = Math.max(s.allocatedEnd, dataStart + n);
    return dataStart * s.clusterSize;
  }
  throw new BlockError('EIO', `qcow2 '${s.filename}': cluster allocation did not converge`, { node: s.node.nodeName, file: s.filename });
}

/**
 * Drops one reference from every cluster [offset, offset + length) touches.
 * @locking io
 */
export function freeClusters(s: Qcow2State, offset: number, length: number): Promise<void> {
  return updateRefcount(s, offset, length, -1);
}

/** Creates refcount block `b` inside the range it covers (all free, since no block covers them); dirty in memory. */
async function ensureRefblock(s: Qcow2State, b: number): Promise<void> {
  if (b >= reftableEntries(s)) await growReftable(s, b + 1);
  if (refblockOffset(s, b) !== 0) return;
  const ci = b * s.refblockEntries;
  const off = ci * s.clusterSize;
  const clash = overlappingMetadata(s, off, s.clusterSize);
  if (clash !== null) {
    throw await s.signalCorruption(`no refcount block covers clusters from ${ci} on, yet the ${clash.what} (host offset ${clash.start}) lies there`, 'refcount_table', off);
  }
  const bytes = new Uint8Array(s.clusterSize);
  const t = s.refblockCache.insert(off, bytes);
  writeSlot(t, 0, s.refcountBits, 1);
  s.refblockCache.markDirty(off, 0, s.clusterSize);
  setEntry(s.reftableView, b, off, false);
  s.markReftableDirty(b);
  s.refblockGeneration++;
  s.allocatedEnd = Math.max(s.allocatedEnd, ci + 1);
}

/**
 * Grows the refcount table (a crash-safe operation of its own) so that it covers clusters up to
 * `endCluster`: for callers that must not let a later allocation grow it (metadata-tx.ts).
 * @locking io
 */
export async function reserveRefcountTable(s: Qcow2State, endCluster: number): Promise<void> {
  const blocks = Math.ceil(endCluster / s.refblockEntries) + 1;
  if (blocks > reftableEntries(s)) await growReftable(s, blocks);
}

/**
 * Moves the refcount table to a bigger one at the end of the file, with the new refcount blocks
 * that the area itself needs placed in front of it (QEMU's refcount area).
 */
async function growReftable(s: Qcow2State, minEntries: number): Promise<void> {
  if (s.inMetadataTx) {
    throw new BlockError('EIO', `qcow2 '${s.filename}': internal error: the refcount table would grow inside a metadata transaction`, { node: s.node.nodeName, file: s.filename });
  }
  const C = s.clusterSize;
  const E = s.refblockEntries;
  const oldEntries = reftableEntries(s);
  const fileEnd = Math.ceil(bdrvGetLength(s.file) / C);
  const a = Math.max(fileEnd, s.allocatedEnd);
  let entries = Math.max(minEntries, oldEntries * 2);
  let tableClusters = 0;
  let missing: number[] = [];
  for (let iter = 0; iter < 64; iter++) {
    tableClusters = Math.ceil((entries * 8) / C);
    const end = a + missing.length + tableClusters;
    const blocks: number[] = [];
    for (let b = Math.floor(a / E); b <= Math.floor((end - 1) / E); b++) if (refblockOffset(s, b) === 0) blocks.push(b);
    const lastBlock = blocks.length > 0 ? (blocks[blocks.length - 1] as number) : 0;
    const needEntries = Math.max(entries, lastBlock + 1);
    if (blocks.length === missing.length && needEntries === entries) {
      missing = blocks;
      break;
    }
    missing = blocks;
    entries = needEntries;
  }
  if (entries * 8 > 8 * 1024 * 1024) {
    throw new BlockError('EFBIG', `qcow2 '${s.filename}': the refcount table would exceed 8 MiB`, { node: s.node.nodeName, file: s.filename, field: 'refcount_table_clusters' });
  }
  const areaEnd = a + missing.length + tableClusters;
  const tableOff = (a + missing.length) * C;
  // 1. area clusters covered by existing refcount blocks get their references there
  for (let ci = a; ci < areaEnd; ci++) {
    const b = Math.floor(ci / E);
    if (!missing.includes(b)) await updateRefcount(s, ci * C, C, 1);
  }
  // 2. the new refcount blocks, each counting the area clusters it covers
  const table = new Uint8Array(tableClusters * C);
  table.set(s.reftable);
  const tableView = new DataView(table.buffer);
  for (const [k, b] of missing.entries()) {
    const off = (a + k) * C;
    const bytes = new Uint8Array(C);
    const t = s.refblockCache.insert(off, bytes);
    for (let ci = Math.max(a, b * E); ci < Math.min(areaEnd, (b + 1) * E); ci++) writeSlot(t, ci - b * E, s.refcountBits, 1);
    await s.writeMeta(off, bytes, 'new refcount block');
    setEntry(tableView, b, off, false);
  }
  // 3. the new table and every refcount change it relies on (the counts of the area above, dirty
  //    blocks that its entries point at), flushed before the header points at it
  await s.writeMeta(tableOff, table, 'new refcount table');
  await writeDirtyRefcounts(s);
  await s.flushFile('new refcount table');
  await s.commitHeader(48, headerFields([[8, tableOff], [4, tableClusters]]), 'header (refcount table pointer)');
  s.reftableDirtyLo = Infinity; // the new table holds every entry
  s.reftableDirtyHi = 0;
  const oldOff = s.header.refcountTableOffset;
  const oldClusters = s.header.refcountTableClusters;
  s.header.refcountTableOffset = tableOff;
  s.header.refcountTableClusters = tableClusters;
  s.setReftable(table);
  s.refblockGeneration++;
  s.allocatedEnd = Math.max(s.allocatedEnd, areaEnd);
  // 4. the old table is garbage once the header switch is on disk (the next metadata flush)
  s.pendingFrees.push([oldOff, oldClusters * C]);
}

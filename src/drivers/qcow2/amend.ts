/**
 * qemu-img amend for qcow2 (QEMU's qcow2_amend_options): compat=0.10|1.1 both ways,
 * lazy_refcounts, refcount_bits. Each change is crash-safe:
 * - the header changes go through header-update.ts (every crash state parses as old or new);
 * - a downgrade first turns every zero cluster (active and snapshot L2 tables) into what v2 can
 *   hold, each step meaning the same to a v3 reader (a zero cluster without a backing file becomes
 *   unallocated; over a backing file it gets a new cluster of zeros, flushed before the entry
 *   points at it; a preallocated one gets zeros written and flushed, then loses its flag), then
 *   switches the header;
 * - a new refcount width is written as a whole new refcount structure past the end of the file
 *   (flushed), switched to with one write of header bytes 48..100 (one sector), flushed; the old
 *   structure is counted free in the new one.
 *
 * I/O code: the caller holds the metadata lock (`MetadataLocked`); nothing else writes the image.
 * After a downgrade or a new refcount width the open state no longer describes the file: it
 * refuses further metadata writes and the image must be reopened.
 */
import { BlockError } from '../../block/errors.js';
import { bdrvGetLength } from '../../block/io.js';
import { COMPAT_LAZY_REFCOUNTS, EXT_BACKING_FORMAT, EXT_FEATURE_TABLE, MAX_REFTABLE_BYTES, QEMU_V3_HEADER_LENGTH, TWO32 } from './constants.js';
import { ClusterType, entryHi, entryLo, entryOffset, l2EntryType, setEntry, setEntryRaw } from './entries.js';
import { qemuFeatureTable } from './header.js';
import { updateHeader } from './header-update.js';
import { assertMetadataLocked, type MetadataLocked } from './metadata-lock.js';
import { allocClusters, getRefcount, refblockOffset, updateRefcount } from './refcount.js';
import { writeSnapshotTable } from './snapshots.js';
import type { Qcow2State } from './state.js';
import { flushMetadata } from './writeback.js';

/** The refcount state after which the open state must not be used again (the caller reopens). */
function retire(s: Qcow2State, why: string): void {
  s.broken ??= `${why}; reopen the image`;
}

/**
 * compat=1.1 on a v2 image: snapshot entries get v3's extra data (a new table, when any lacks it),
 * then the header becomes v3 (112 bytes, QEMU's feature-name table).
 * @locking io
 */
export async function upgradeToV3(locked: MetadataLocked, s: Qcow2State): Promise<void> {
  assertMetadataLocked(locked, s, 'amend compat=1.1');
  if (s.header.version === 3) return;
  await flushMetadata(s);
  if (s.snapshots.some((sn) => sn.extraDataSize < 16)) await writeSnapshotTable(locked, s, s.snapshots);
  await updateHeader(locked, s, (h) => {
    h.version = 3;
    h.headerLength = QEMU_V3_HEADER_LENGTH;
    h.refcountOrder = 4;
    h.incompatibleFeatures = 0n;
    h.compatibleFeatures = 0n;
    h.autoclearFeatures = 0n;
    h.compressionType = 0;
    const fmt = h.extensions.filter((e) => e.type === EXT_BACKING_FORMAT);
    const rest = h.extensions.filter((e) => e.type !== EXT_BACKING_FORMAT && e.type !== EXT_FEATURE_TABLE);
    h.extensions = [...fmt, qemuFeatureTable(), ...rest];
  });
}

/**
 * lazy_refcounts=on|off on a v3 image: the compatible feature bit (refcounts are always exact here).
 * @locking io
 */
export async function setLazyRefcounts(locked: MetadataLocked, s: Qcow2State, on: boolean): Promise<void> {
  assertMetadataLocked(locked, s, 'amend lazy_refcounts');
  const bit = BigInt(COMPAT_LAZY_REFCOUNTS);
  if (((s.header.compatibleFeatures & bit) !== 0n) === on) return;
  if (on && s.header.version !== 3) {
    throw new BlockError('EINVAL', 'Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)', { field: 'lazy_refcounts' });
  }
  await flushMetadata(s);
  await updateHeader(locked, s, (h) => {
    h.compatibleFeatures = on ? h.compatibleFeatures | bit : h.compatibleFeatures & ~bit;
  });
}

/** Every L2 table offset the active L1 and the snapshots' L1 tables name, once each. */
async function allL2Tables(s: Qcow2State): Promise<number[]> {
  const seen = new Set<number>();
  const add = (view: DataView, n: number): void => {
    for (let i = 0; i < n; i++) {
      const off = entryOffset(entryHi(view, i) & 0x00ffffff, entryLo(view, i) & 0xfffffe00);
      if (off !== 0) seen.add(off);
    }
  };
  add(s.l1View, s.l1Size);
  for (const sn of s.snapshots) {
    if (sn.l1Size === 0) continue;
    const l1 = await s.readMeta(sn.l1TableOffset, sn.l1Size * 8, `L1 table of snapshot '${sn.name}'`);
    add(new DataView(l1.buffer, l1.byteOffset, l1.byteLength), sn.l1Size);
  }
  return [...seen].sort((a, b) => a - b);
}

/**
 * compat=0.10 on a v3 image, as QEMU's qcow2_downgrade: refused with another refcount width or
 * incompatible features; zero clusters expanded (see the file comment); then the v2 header
 * (72 bytes, no feature bits, no feature-name table). The state is retired afterwards.
 * @locking io
 */
export async function downgradeToV2(locked: MetadataLocked, s: Qcow2State): Promise<void> {
  assertMetadataLocked(locked, s, 'amend compat=0.10');
  if (s.header.version === 2) return;
  const where = { node: s.node.nodeName, file: s.filename, field: 'compat' };
  if (s.header.refcountOrder !== 4) throw new BlockError('ENOTSUP', 'compat=0.10 requires refcount_bits=16', where);
  const incompat = s.header.incompatibleFeatures & ~1n; // the dirty bit is repaired by the open
  if (incompat !== 0n) throw new BlockError('ENOTSUP', `Cannot downgrade an image with incompatible features 0x${incompat.toString(16)} set`, where);
  for (const sn of s.snapshots) {
    if (sn.vmStateSize > 0xffffffff) {
      throw new BlockError('ENOTSUP', `Internal snapshot '${sn.name}' has a VM state too large for a version 2 snapshot table entry`, where);
    }
  }
  await flushMetadata(s);
  const C = s.clusterSize;
  const tables = await allL2Tables(s);
  const overBacking = s.node.backing !== undefined;
  // first the data of preallocated zero clusters become zeros, durably; over a backing file a
  // plain zero cluster gets a cluster of zeros of its own (counted as often as its table is)
  const zeroed: number[] = [];
  const fresh = new Map<string, number>(); // `${table}:${index}` -> new cluster
  for (const off of tables) {
    const t = await s.l2Cache.get(off);
    const shared = await getRefcount(s, off / C);
    for (let i = 0; i < s.l2Entries; i++) {
      const hi = entryHi(t.view, i);
      const lo = entryLo(t.view, i);
      const type = l2EntryType(hi, lo, true);
      if (type === ClusterType.ZeroAlloc) zeroed.push(entryOffset(hi, lo));
      else if (type === ClusterType.ZeroPlain && overBacking) {
        const host = await allocClusters(s, 1);
        if (shared > 1) await updateRefcount(s, host, C, shared - 1);
        fresh.set(`${off}:${i}`, host);
        zeroed.push(host);
      }
    }
  }
  const zeros = new Uint8Array(C);
  for (const host of zeroed) await s.writeMeta(host, zeros, 'zeroed cluster (downgrade)');
  if (zeroed.length > 0) await s.flushFile('zeroed clusters before their zero flags go');
  // then the entries: each change reads the same to a v3 reader (the new clusters' refcounts are
  // written before any table points at them, by the metadata flush's order)
  for (const off of tables) {
    const t = await s.l2Cache.get(off);
    const shared = await getRefcount(s, off / C);
    let changed = false;
    for (let i = 0; i < s.l2Entries; i++) {
      const hi = entryHi(t.view, i);
      const lo = entryLo(t.view, i);
      const type = l2EntryType(hi, lo, true);
      const host = fresh.get(`${off}:${i}`);
      if (host !== undefined) setEntry(t.view, i, host, shared === 1, false);
      else if (type === ClusterType.ZeroPlain) setEntryRaw(t.view, i, 0, 0);
      else if (type === ClusterType.ZeroAlloc) setEntryRaw(t.view, i, hi, (lo & ~1) >>> 0);
      else continue;
      changed = true;
    }
    if (changed) s.l2Cache.markDirty(off, 0, C);
  }
  await flushMetadata(s);
  await updateHeader(locked, s, (h) => {
    h.version = 2;
    h.headerLength = 72;
    h.incompatibleFeatures = 0n;
    h.compatibleFeatures = 0n;
    h.autoclearFeatures = 0n;
    h.compressionType = 0;
    h.extensions = h.extensions.filter((e) => e.type !== EXT_FEATURE_TABLE);
  });
  retire(s, 'the image was downgraded to version 2');
}

/** Writes refcount `rc` of slot `slot` into a refcount block of `bits`-bit entries. */
function putRefcount(out: Uint8Array, v: DataView, slot: number, bits: number, rc: number): void {
  if (bits === 8) v.setUint8(slot, rc);
  else if (bits === 16) v.setUint16(slot * 2, rc);
  else if (bits === 32) v.setUint32(slot * 4, rc);
  else if (bits === 64) {
    v.setUint32(slot * 8, Math.floor(rc / TWO32));
    v.setUint32(slot * 8 + 4, rc % TWO32);
  } else {
    const bit = slot * bits;
    out[bit >> 3] = (out[bit >> 3] ?? 0) | ((rc & ((1 << bits) - 1)) << (bit & 7));
  }
}

/**
 * refcount_bits=N on a v3 image (QEMU's qcow2_change_refcount_order): a new structure of N-bit
 * entries past the end of the file, one header switch. EINVAL when a refcount does not fit. The
 * state is retired afterwards.
 * @locking io
 */
export async function changeRefcountWidth(locked: MetadataLocked, s: Qcow2State, bits: number): Promise<void> {
  assertMetadataLocked(locked, s, 'amend refcount_bits');
  if (bits === s.refcountBits) return;
  const where = { node: s.node.nodeName, file: s.filename, field: 'refcount_bits' };
  if (s.header.version !== 3) {
    throw new BlockError('EINVAL', 'Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)', where);
  }
  await flushMetadata(s);
  const C = s.clusterSize;
  const used = Math.max(Math.ceil(bdrvGetLength(s.file) / C), s.allocatedEnd);
  const counts = new Array<number>(used).fill(0);
  for (let ci = 0; ci < used; ci++) counts[ci] = await getRefcount(s, ci);
  // the old structure is garbage once the header points at the new one
  const tableStart = s.header.refcountTableOffset / C;
  for (let i = 0; i < s.header.refcountTableClusters; i++) if (tableStart + i < used) counts[tableStart + i] = 0;
  for (let b = 0; b < s.reftable.length / 8; b++) {
    const off = refblockOffset(s, b);
    if (off !== 0 && off / C < used) counts[off / C] = 0;
  }
  const max = bits >= 53 ? Number.MAX_SAFE_INTEGER : 2 ** bits - 1;
  for (let ci = 0; ci < used; ci++) {
    const rc = counts[ci] ?? 0;
    if (rc > max) {
      throw new BlockError('EINVAL', `Cannot decrease refcount entry width to ${bits} bits: Cluster at offset 0x${(ci * C).toString(16)} has a refcount of ${rc}`, where);
    }
  }
  // the new blocks and table right past everything in use, each counting itself
  const perBlock = (C * 8) / bits;
  let blocks = 0;
  let tableClusters = 0;
  for (;;) {
    const nb = Math.ceil((used + blocks + tableClusters) / perBlock);
    const nt = Math.ceil((nb * 8) / C);
    if (nb === blocks && nt === tableClusters) break;
    blocks = nb;
    tableClusters = nt;
  }
  if (tableClusters * C > MAX_REFTABLE_BYTES) throw new BlockError('EFBIG', `qcow2 '${s.filename}': the refcount table at ${bits} bits would exceed 8 MiB`, where);
  const total = used + blocks + tableClusters;
  for (let ci = used; ci < total; ci++) counts[ci] = 1;
  const table = new Uint8Array(tableClusters * C);
  const tv = new DataView(table.buffer);
  const writes: Array<{ offset: number; data: Uint8Array; what: string }> = [];
  for (let b = 0; b < blocks; b++) {
    const off = (used + b) * C;
    const block = new Uint8Array(C);
    const bv = new DataView(block.buffer);
    for (let slot = 0; slot < perBlock; slot++) {
      const rc = counts[b * perBlock + slot] ?? 0;
      if (rc !== 0) putRefcount(block, bv, slot, bits, rc);
    }
    writes.push({ offset: off, data: block, what: `refcount block (${bits} bits)` });
    tv.setUint32(b * 8, Math.floor(off / TWO32));
    tv.setUint32(b * 8 + 4, off % TWO32);
  }
  const tableOffset = (used + blocks) * C;
  writes.push({ offset: tableOffset, data: table, what: `refcount table (${bits} bits)` });
  await s.writeMetaAll(writes);
  await s.flushFile('the new refcount structure before the header switches to it');
  const order = Math.log2(bits);
  const h = s.header;
  const sw = new Uint8Array(52);
  const v = new DataView(sw.buffer);
  v.setUint32(0, Math.floor(tableOffset / TWO32));
  v.setUint32(4, tableOffset % TWO32);
  v.setUint32(8, tableClusters);
  v.setUint32(12, h.nbSnapshots);
  v.setUint32(16, Math.floor(h.snapshotsOffset / TWO32));
  v.setUint32(20, h.snapshotsOffset % TWO32);
  v.setBigUint64(24, BigInt.asUintN(64, h.incompatibleFeatures));
  v.setBigUint64(32, BigInt.asUintN(64, h.compatibleFeatures));
  v.setBigUint64(40, BigInt.asUintN(64, h.autoclearFeatures));
  v.setUint32(48, order);
  await s.commitHeader(48, sw, 'header (refcount table and width)');
  h.refcountTableOffset = tableOffset;
  h.refcountTableClusters = tableClusters;
  h.refcountOrder = order;
  retire(s, `the refcount width changed to ${bits} bits`);
  await s.flushFile('the new refcount width');
}

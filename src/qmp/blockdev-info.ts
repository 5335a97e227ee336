/**
 * The shapes QEMU's block queries reply with, built from the graph: BlockDeviceInfo (one node, as
 * query-named-block-nodes and query-block's `inserted` give it), ImageInfo (its `image`, with the
 * backing chain nested unless `flat`), SnapshotInfo and BlockInfo (one backend).
 *
 * Global-state code: every function takes the `Bql` (it reads the graph and lists snapshots).
 * Keys are QEMU 7.2's, so that a client written for qemu-storage-daemon reads ours; what snapstack
 * does not have (I/O throttling, encryption, dirty flags) reads as QEMU's "off" values.
 */
import fs from 'node:fs';
import type { BlockBackend } from '../block/backend.js';
import { resolveBackingFilename } from '../block/backing.js';
import { assertBql, type Bql } from '../block/bql.js';
import type { SnapshotInfo } from '../block/driver.js';
import type { BlockNode } from '../block/node.js';
import { bdrvSnapshotList } from '../block/snapshot.js';
import type { QmpObject, QmpValue } from './types.js';

/** How deep a backing chain is nested in `backing-image` at most (a loop cannot happen; a bound anyway). */
const MAX_CHAIN = 256;

/**
 * One internal snapshot as QMP's SnapshotInfo (`icount` only when recorded).
 * @locking common
 */
export function snapshotInfoToQmp(s: SnapshotInfo): QmpObject {
  const out: QmpObject = {
    id: s.id,
    name: s.name,
    'vm-state-size': s.vmStateSize,
    'date-sec': s.dateSec,
    'date-nsec': s.dateNsec,
    'vm-clock-sec': Math.floor(s.vmClockNsec / 1e9),
    'vm-clock-nsec': s.vmClockNsec % 1e9,
  };
  if (s.icount >= 0) out['icount'] = s.icount;
  return out;
}

/** The bytes the node's host file occupies (st_blocks), or null without a host file. */
function actualSize(node: BlockNode): number | null {
  if (node.filename === '') return null;
  try {
    return fs.statSync(node.filename).blocks * 512;
  } catch {
    return null;
  }
}

/** The backing file the image records, or the backing child's file when it records none. */
function backingName(node: BlockNode): { name: string; format: string | null } | null {
  const recorded = node.instance?.backingFile?.() ?? null;
  if (recorded !== null) return { name: recorded.filename, format: recorded.format };
  const b = node.backing;
  return b === undefined ? null : { name: b.filename, format: b.driver.formatName };
}

async function snapshotsOf(bql: Bql, node: BlockNode): Promise<SnapshotInfo[]> {
  try {
    return await bdrvSnapshotList(bql, node);
  } catch {
    return []; // a format without snapshots lists none, as QEMU leaves the key out
  }
}

/**
 * The ImageInfo of `node` (QEMU's bdrv_query_image_info), with the backing chain nested in
 * `backing-image` unless `flat`.
 * @locking global-state
 */
export async function imageInfo(bql: Bql, node: BlockNode, flat: boolean, depth = 0): Promise<QmpObject> {
  assertBql(bql, 'imageInfo');
  const inst = node.instance;
  const info: QmpObject = {
    filename: node.filename,
    format: node.driver.formatName,
    'dirty-flag': false,
    // QEMU counts a node's length in 512-byte sectors, rounded up (a host file's odd tail too)
    'virtual-size': inst === null ? 0 : Math.ceil(inst.getLength() / 512) * 512,
  };
  const actual = actualSize(node);
  if (actual !== null) info['actual-size'] = actual;
  const cluster = inst?.clusterSize?.();
  if (cluster !== undefined) info['cluster-size'] = cluster;
  const backing = backingName(node);
  if (backing !== null) {
    info['backing-filename'] = backing.name;
    info['full-backing-filename'] = node.backing?.filename ?? resolveBackingFilename(node.filename, backing.name, node.nodeName);
    if (backing.format !== null) info['backing-filename-format'] = backing.format;
  }
  const snapshots = await snapshotsOf(bql, node);
  if (snapshots.length > 0) info['snapshots'] = snapshots.map(snapshotInfoToQmp);
  const fsData = inst?.formatSpecific?.();
  if (fsData !== undefined) info['format-specific'] = fsData as QmpValue;
  const b = node.backing;
  if (!flat && b !== undefined && depth < MAX_CHAIN) info['backing-image'] = await imageInfo(bql, b, false, depth + 1);
  return info;
}

/**
 * One node as QEMU's BlockDeviceInfo (query-named-block-nodes; query-block's `inserted`).
 * `flat`: no nested `backing-image`, and backing_file_depth 0, as QEMU 7.2 gives it.
 * @locking global-state
 */
export async function blockDeviceInfo(bql: Bql, node: BlockNode, flat: boolean): Promise<QmpObject> {
  assertBql(bql, 'blockDeviceInfo');
  let depth = 0;
  for (let b = node.backing; b !== undefined && depth < MAX_CHAIN; b = b.backing) depth++;
  const info: QmpObject = {
    file: node.filename,
    'node-name': node.nodeName,
    ro: node.readOnly,
    drv: node.driver.formatName,
  };
  // QEMU's bs->backing_file: the backing image as opened (the name the image records, resolved)
  const backing = backingName(node);
  if (backing !== null) info['backing_file'] = node.backing?.filename ?? resolveBackingFilename(node.filename, backing.name, node.nodeName);
  Object.assign(info, {
    backing_file_depth: flat ? 0 : depth,
    encrypted: false,
    detect_zeroes: 'off',
    bps: 0,
    bps_rd: 0,
    bps_wr: 0,
    iops: 0,
    iops_rd: 0,
    iops_wr: 0,
    image: await imageInfo(bql, node, flat),
    cache: { writeback: true, direct: false, 'no-flush': false },
    write_threshold: 0,
  });
  return info;
}

/**
 * One backend as QEMU's BlockInfo (query-block), as qemu-system-x86_64 7.2 gives it for a
 * virtio-blk disk: not removable, never locked, type "unknown", io-status "ok".
 * @locking global-state
 */
export async function blockInfo(bql: Bql, blk: BlockBackend): Promise<QmpObject> {
  assertBql(bql, 'blockInfo');
  // the machine's disks are virtio-blk-like devices named after their backend
  const info: QmpObject = { device: blk.name, qdev: `/machine/peripheral/${blk.name}/virtio-backend`, type: 'unknown', removable: false, locked: false };
  const root = blk.root;
  if (root !== null) info['inserted'] = await blockDeviceInfo(bql, root, false);
  info['io-status'] = 'ok';
  return info;
}

/**
 * The block graph over QMP: query-block, query-named-block-nodes, blockdev-add, blockdev-del,
 * and internal snapshots of one device (blockdev-snapshot-internal-sync,
 * blockdev-snapshot-delete-internal-sync), with qemu-storage-daemon 7.2's replies and errors.
 *
 * Each command runs on the main loop without the BQL and takes it (withBql) for its global-state
 * steps; a snapshot is made inside a drained section of its node, as HMP's commands and
 * src/block/snapshot-group.ts do, and refused by the same rules (read-only, a backing node in
 * use, a node a job works on). The internal-snapshot commands take the snapshot lock
 * (src/block/snapshot-lock.ts) before the BQL, so they wait for a running snapshot job.
 */
import { withBql, type Bql } from '../../block/bql.js';
import { withDrained } from '../../block/drain.js';
import type { SnapshotInfo } from '../../block/driver.js';
import { withDrainedAll } from '../../block/drain.js';
import { bdrvSetBacking, replaceNode } from '../../block/graph-change.js';
import { closeNode, detachChild } from '../../block/graph.js';
import { jobUsingNode } from '../../block/job.js';
import { BdrvChild, type BlockNode } from '../../block/node.js';
import { withSnapshotLock } from '../../block/snapshot-lock.js';
import { bdrvCanSnapshot, bdrvSnapshotCreate, bdrvSnapshotDelete, bdrvSnapshotList } from '../../block/snapshot.js';
import { allBackends, allNodes } from '../../block/registry.js';
import { deviceBackends } from '../../block/query.js';
import { blockdevAdd, blockdevAddFields, dropMonitorOwnership, findNodeForQmp, isMonitorOwned } from '../blockdev-options.js';
import { blockDeviceInfo, blockInfo, snapshotInfoToQmp } from '../blockdev-info.js';
import { QmpError, type QmpCommand, type QmpContext, type QmpObject } from '../types.js';
import { lookupDevice, optBool, optStr, qmpErrors, reqStr, rootNodeOf } from './util.js';

/** QEMU's op-blocker text for a node a job works on. */
function refuseJobNode(bql: Bql, node: BlockNode): void {
  const job = jobUsingNode(bql, node);
  if (job !== null) throw new QmpError('GenericError', `Node '${node.nodeName}' is busy: block device is in use by block job: ${job.type}`);
}

/** QEMU's op blockers: a node a job works on, or one an overlay uses as its backing image. */
function refuseBlockedNode(bql: Bql, node: BlockNode): void {
  refuseJobNode(bql, node);
  for (const p of node.parents) {
    if (p instanceof BdrvChild && p.role === 'backing') throw new QmpError('GenericError', `Node '${node.nodeName}' is busy: node is used as backing hd of '${p.parent.nodeName}'`);
  }
}

/** The snapshot of `node` matching `id` and `name` (a missing one is not compared). */
async function findSnapshot(bql: Bql, node: BlockNode, id: string | undefined, name: string | undefined): Promise<SnapshotInfo | undefined> {
  const list = await bdrvSnapshotList(bql, node);
  return list.find((s) => (id === undefined || s.id === id) && (name === undefined || s.name === name));
}

/** The nanoseconds of the wall clock, split as a snapshot records them. */
function now(): { dateSec: number; dateNsec: number } {
  const ms = Date.now();
  return { dateSec: Math.floor(ms / 1000), dateNsec: (ms % 1000) * 1_000_000 };
}

const queryBlock: QmpCommand = {
  name: 'query-block',
  doc: 'Lists the block devices (backends) with the node inserted in each and its image chain. The daemon has none, as qemu-storage-daemon; `snapstack monitor -qmp` lists the machine\'s disks.',
  args: [],
  example: { returns: [] },
  run: () => qmpErrors(() => withBql(async (bql) => Promise.all(deviceBackends(bql).map((blk) => blockInfo(bql, blk))))),
};

const queryNamedBlockNodes: QmpCommand = {
  name: 'query-named-block-nodes',
  doc: 'Lists every node of the block graph as QEMU\'s BlockDeviceInfo (node-name, drv, file, ro, image with virtual-size, actual-size, format-specific, snapshots, backing-image). With `flat`, backing images are not nested. Unlike QEMU, raw images (and their file nodes) list snapshots too: snapstack keeps snapshots of raw images beside them.',
  args: [{ name: 'flat', type: 'bool', optional: true }],
  example: {
    args: { flat: true },
    returns: [
      {
        file: 'disk.raw',
        'node-name': 'f0',
        ro: false,
        drv: 'file',
        backing_file_depth: 0,
        encrypted: false,
        detect_zeroes: 'off',
        bps: 0,
        bps_rd: 0,
        bps_wr: 0,
        iops: 0,
        iops_rd: 0,
        iops_wr: 0,
        image: { filename: 'disk.raw', format: 'file', 'dirty-flag': false, 'virtual-size': 1048576, 'actual-size': 4096 },
        cache: { writeback: true, direct: false, 'no-flush': false },
        write_threshold: 0,
      },
    ],
  },
  run: (_ctx: QmpContext, args: QmpObject) =>
    qmpErrors(() =>
      withBql(async (bql) => {
        const flat = optBool(args, 'flat', false);
        const out: QmpObject[] = [];
        // newest first, as QEMU 7.2 lists them
        for (const node of [...allNodes.values()].reverse()) out.push(await blockDeviceInfo(bql, node, flat));
        return out;
      }),
    ),
};

const blockdevAddCommand: QmpCommand = {
  name: 'blockdev-add',
  doc: "Opens a node (and the children its options describe) as QEMU's blockdev-add: drivers file (filename, locking, aio), nbd (server: a SocketAddress, inet or unix; export, tls-creds, tls-hostname, reconnect-delay, open-timeout), raw and qcow2 (file: nested options; qcow2's backing: null, a node name or nested options), and snapstack's memory (size). node-name is required. snapstack's extension: iothread=ID binds the node's transfers to an IOThread. Not yet: `file` given as the name of an open node (give it as nested options); cache.direct, detect-zeroes other than off, aio native/io_uring.",
  args: blockdevAddFields(),
  example: { args: { driver: 'qcow2', 'node-name': 'disk0', file: { driver: 'file', filename: 'disk.qcow2' } }, returns: {} },
  run: (_ctx, args) =>
    qmpErrors(() =>
      withBql(async (bql) => {
        await blockdevAdd(bql, args, { strict: true });
        return {};
      }),
    ),
};

const blockdevDel: QmpCommand = {
  name: 'blockdev-del',
  doc: 'Closes a node that blockdev-add created, refused while a device, a job or another node uses it.',
  args: [{ name: 'node-name', type: 'str' }],
  example: { args: { 'node-name': 'disk0' }, returns: {} },
  run: (_ctx, args) =>
    qmpErrors(() =>
      withBql(async (bql) => {
        const name = reqStr(args, 'node-name');
        const node = findNodeForQmp(bql, name);
        for (const blk of allBackends.values()) if (blk.root === node) throw new QmpError('GenericError', `Node ${name} is in use`);
        refuseBlockedNode(bql, node);
        if (!isMonitorOwned(node)) throw new QmpError('GenericError', `Node ${name} is not owned by the monitor`);
        if (node.parents.size > 0) throw new QmpError('GenericError', `Block device ${name} is in use`);
        // backing images the monitor owns too (a blockdev-snapshot base) stay open, as QEMU's monitor
        // reference keeps them (only backing edges: a format driver's close still writes to its file)
        const owned = node.children.filter((c) => c.role === 'backing' && isMonitorOwned(c.child));
        if (owned.length > 0) await withDrained(bql, node, (d) => owned.forEach((edge) => detachChild(bql, d, edge)));
        await closeNode(bql, node);
        dropMonitorOwnership(bql, node);
        return {};
      }),
    ),
};

/** An internal snapshot checked and ready to be created: the node and the snapshot's record. */
export interface InternalSnapshotPlan {
  node: BlockNode;
  info: SnapshotInfo;
}

/**
 * blockdev-snapshot-internal-sync's checks, in QEMU's order: the device's root node, its op
 * blockers, read-only, snapshot support, an empty name, a name that exists. Returns what to create.
 * @locking global-state
 */
export async function planInternalSnapshot(bql: Bql, ctx: QmpContext, device: string, name: string): Promise<InternalSnapshotPlan> {
  const node = rootNodeOf(bql, device);
  refuseJobNode(bql, node);
  if (node.readOnly) throw new QmpError('GenericError', `Device '${device}' is read only`);
  // a protocol node is not an image format: QEMU refuses it (snapstack's raw format node over a
  // file takes internal snapshots, beside the image; a bare file node does not, as in QEMU)
  if (node.driver.kind === 'protocol' || !bdrvCanSnapshot(bql, node)) throw new QmpError('GenericError', `Block format '${node.driver.formatName}' used by device '${device}' does not support internal snapshots`);
  if (name === '') throw new QmpError('GenericError', 'Name is empty');
  if ((await findSnapshot(bql, node, undefined, name)) !== undefined) {
    throw new QmpError('GenericError', `Snapshot with name '${name}' already exists on device '${device}'`);
  }
  const t = now();
  return { node, info: { id: '', name, vmStateSize: 0, dateSec: t.dateSec, dateNsec: t.dateNsec, vmClockNsec: ctx.machine?.vmClockNsec ?? 0, icount: -1 } };
}

const snapshotInternal: QmpCommand = {
  name: 'blockdev-snapshot-internal-sync',
  doc: "Creates an internal snapshot `name` of a device's root node (a backend name or a node name), inside a drained section of the node. Refused on a read-only node, a node that is not a root (a backing image), a node a job works on, and when the name exists. Unlike QEMU, raw images take internal snapshots too (kept beside the image).",
  args: [
    { name: 'device', type: 'str' },
    { name: 'name', type: 'str' },
  ],
  example: { args: { device: 'disk0', name: 'before-upgrade' }, returns: {} },
  run: (ctx, args) =>
    qmpErrors(() =>
      // the snapshot lock first (waited for without the BQL), so that a snapshot job runs alone
      withSnapshotLock(`blockdev-snapshot-internal-sync '${String(args['name'])}'`, () => withBql(async (bql) => {
        const { node, info } = await planInternalSnapshot(bql, ctx, reqStr(args, 'device'), reqStr(args, 'name'));
        await withDrained(bql, node, (d) => bdrvSnapshotCreate(bql, d, node, info));
        return {};
      })),
    ),
};

const snapshotDeleteInternal: QmpCommand = {
  name: 'blockdev-snapshot-delete-internal-sync',
  doc: "Deletes the internal snapshot of a device's root node matching `id` and/or `name` (both, when both are given), inside a drained section of the node; returns the deleted snapshot.",
  args: [
    { name: 'device', type: 'str' },
    { name: 'id', type: 'str', optional: true },
    { name: 'name', type: 'str', optional: true },
  ],
  example: {
    args: { device: 'disk0', name: 'before-upgrade' },
    returns: { id: '1', name: 'before-upgrade', 'vm-state-size': 0, 'date-sec': 1796172470, 'date-nsec': 794829000, 'vm-clock-sec': 0, 'vm-clock-nsec': 0 },
  },
  run: (_ctx, args) =>
    qmpErrors(() =>
      withSnapshotLock('blockdev-snapshot-delete-internal-sync', () => withBql(async (bql) => {
        const device = reqStr(args, 'device');
        const id = optStr(args, 'id');
        const name = optStr(args, 'name');
        const node = rootNodeOf(bql, device);
        if (id === undefined && name === undefined) throw new QmpError('GenericError', 'Name or id must be provided');
        refuseJobNode(bql, node);
        const found = await findSnapshot(bql, node, id, name);
        if (found === undefined) {
          throw new QmpError('GenericError', `Snapshot with id '${id ?? 'null'}' and name '${name ?? 'null'}' does not exist on device '${device}'`);
        }
        if (node.readOnly) throw new QmpError('GenericError', `Device '${device}' is read only`);
        const deleted = await withDrained(bql, node, (d) => bdrvSnapshotDelete(bql, d, node, found.id, found.name));
        return snapshotInfoToQmp(deleted);
      })),
    ),
};

const blockdevSnapshot: QmpCommand = {
  name: 'blockdev-snapshot',
  doc: "Puts the open node `overlay` (added with blockdev-add and `backing: null`, its image naming `node`'s file as its backing file) on top of `node`: `node` becomes the overlay's backing image and every user of `node` (a device, a parent node) moves to the overlay, in one drained section.",
  args: [
    { name: 'node', type: 'str' },
    { name: 'overlay', type: 'str' },
  ],
  example: { args: { node: 'disk0', overlay: 'overlay0' }, returns: {} },
  run: (_ctx, args) =>
    qmpErrors(() =>
      withBql(async (bql) => {
        // QEMU's order: the node, its op blockers, then the overlay
        const node = lookupDevice(bql, reqStr(args, 'node')).node;
        if (node === null) throw new QmpError('GenericError', 'Device has no medium');
        refuseBlockedNode(bql, node);
        const overlay = lookupDevice(bql, reqStr(args, 'overlay')).node;
        if (overlay === null) throw new QmpError('GenericError', 'Device has no medium');
        for (const blk of allBackends.values()) if (blk.root === overlay) throw new QmpError('GenericError', 'The overlay is already in use');
        if (overlay.backing !== undefined) throw new QmpError('GenericError', 'The overlay already has a backing image');
        if (overlay.instance?.backingFile === undefined) throw new QmpError('GenericError', 'The overlay does not support backing images');
        await withDrainedAll(bql, (d) => {
          bdrvSetBacking(bql, d, overlay, node);
          try {
            replaceNode(bql, d, node, overlay);
          } catch (e) {
            bdrvSetBacking(bql, d, overlay, null);
            throw e;
          }
        });
        return {};
      }),
    ),
};

/** The block graph commands. */
export const blockCommands: QmpCommand[] = [queryBlock, queryNamedBlockNodes, blockdevAddCommand, blockdevDel, blockdevSnapshot, snapshotInternal, snapshotDeleteInternal];

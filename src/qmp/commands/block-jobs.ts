/**
 * Block jobs and external snapshots over QMP: block-stream, block-commit (QEMU's arguments; the
 * jobs are src/block/stream.ts and src/block/jobs/block-commit.ts) and blockdev-snapshot-sync
 * (src/commands/snapshot-blkdev.ts). A job's progress and end are reported by query-jobs and the
 * JOB_STATUS_CHANGE / BLOCK_JOB_* events (commands/jobs.ts forwards them).
 *
 * The commands take the BQL only to start the job or make the snapshot; the jobs run in the
 * background. `speed` is accepted (QEMU's rate limit) and only 0 (unlimited) is honoured as such:
 * snapstack's jobs do not throttle; `on-error`, `filter-node-name` and `backing-file` are refused
 * when given, since the jobs cannot honour them.
 */
import { withBql, type Bql } from '../../block/bql.js';
import { blockCommit } from '../../block/jobs/block-commit.js';
import type { BlockNode } from '../../block/node.js';
import { allBackends, allNodes } from '../../block/registry.js';
import { blockStream } from '../../block/stream.js';
import { snapshotBlkdev } from '../../commands/snapshot-blkdev.js';
import { QmpError, type QmpCommand, type QmpField, type QmpObject } from '../types.js';
import { lookupDevice, optBool, optStr, qmpErrors, reqStr } from './util.js';

/** The job arguments every block job command has (QEMU's). */
const JOB_ARGS: readonly QmpField[] = [
  { name: 'job-id', type: 'str', optional: true },
  { name: 'speed', type: 'int', optional: true },
  { name: 'on-error', type: { enum: ['report', 'ignore', 'enospc', 'stop', 'auto'] }, optional: true },
  { name: 'filter-node-name', type: 'str', optional: true },
  { name: 'auto-finalize', type: 'bool', optional: true },
  { name: 'auto-dismiss', type: 'bool', optional: true },
];

/** Refuses the job arguments snapstack's block jobs cannot honour. */
function refuseUnsupported(args: QmpObject, extra: readonly string[]): void {
  for (const name of ['filter-node-name', ...extra]) {
    if (args[name] !== undefined) throw new QmpError('GenericError', `Parameter '${name}' is not supported by snapstack`);
  }
  const onError = optStr(args, 'on-error');
  if (onError !== undefined && onError !== 'report') throw new QmpError('GenericError', `Parameter 'on-error' value '${onError}' is not supported by snapstack (report)`);
}

/** The node a `*-node` argument names, or QEMU's "Cannot find device='' nor node-name='x'". */
function namedNode(bql: Bql, name: string): BlockNode {
  const node = allNodes.get(name);
  if (node === undefined) throw new QmpError('GenericError', `Cannot find device='' nor node-name='${name}'`);
  return node;
}

/** Where the job runs: a backend name goes as `device`, a node name as the node. */
function target(bql: Bql, device: string): { device?: string; node?: string } {
  const found = lookupDevice(bql, device);
  return found.blk !== null ? { device } : { node: device };
}

const blockStreamCommand: QmpCommand = {
  name: 'block-stream',
  doc: "Starts a stream job: the data of the backing chain (down to `base-node`, or all of it) is copied into the device's image while the guest runs; at the end the image's backing file becomes the base. `device` is a backend or a node name; the job id defaults to it.",
  // in QEMU's order (qapi/block-core.json): arguments are checked in it
  args: [
    { name: 'job-id', type: 'str', optional: true },
    { name: 'device', type: 'str' },
    { name: 'base', type: 'str', optional: true },
    { name: 'base-node', type: 'str', optional: true },
    { name: 'backing-file', type: 'str', optional: true },
    { name: 'bottom', type: 'str', optional: true },
    ...JOB_ARGS.filter((f) => f.name !== 'job-id'),
  ],
  example: { args: { device: 'disk0', 'job-id': 'stream0' }, returns: {} },
  run: (_ctx, args) =>
    qmpErrors(() =>
      withBql((bql) => {
        refuseUnsupported(args, ['backing-file', 'bottom']);
        const device = reqStr(args, 'device');
        const baseFile = optStr(args, 'base');
        const baseNode = optStr(args, 'base-node');
        if (baseFile !== undefined && baseNode !== undefined) throw new QmpError('GenericError', "'base' and 'base-node' cannot be specified at the same time");
        const t = target(bql, device);
        if (baseNode !== undefined) namedNode(bql, baseNode);
        let base = baseNode;
        if (baseFile !== undefined) {
          const top = lookupDevice(bql, device).node;
          let b = top?.backing;
          while (b !== undefined && b.filename !== baseFile) b = b.backing;
          if (b === undefined) throw new QmpError('GenericError', `Can't find '${baseFile}' in the backing chain`);
          base = b.nodeName;
        }
        const autoDismiss = optBool(args, 'auto-dismiss', true);
        blockStream(bql, { jobId: optStr(args, 'job-id') ?? device, ...t, ...(base === undefined ? {} : { base }), autoDismiss, autoFinalize: optBool(args, 'auto-finalize', true) });
        return {};
      }),
    ),
};

const blockCommitCommand: QmpCommand = {
  name: 'block-commit',
  doc: "Starts a commit job: the data of `top-node` (default: the device's active image, an active commit that becomes ready and waits for job-complete) and the images between is copied into `base-node` (default: the bottommost image of the chain, as in QEMU), which then replaces them. The base must be open writable (`backing.read-only: false`): snapstack does not reopen it (QEMU does).",
  args: [
    { name: 'device', type: 'str' },
    { name: 'base-node', type: 'str', optional: true },
    { name: 'base', type: 'str', optional: true },
    { name: 'top-node', type: 'str', optional: true },
    { name: 'top', type: 'str', optional: true },
    { name: 'backing-file', type: 'str', optional: true },
    ...JOB_ARGS,
  ],
  example: { args: { device: 'disk0', 'job-id': 'commit0' }, returns: {} },
  run: (_ctx, args) =>
    qmpErrors(() =>
      withBql((bql) => {
        refuseUnsupported(args, ['backing-file', 'base', 'top']);
        const device = reqStr(args, 'device');
        let found;
        try {
          found = lookupDevice(bql, device);
        } catch {
          throw new QmpError('DeviceNotFound', `Device '${device}' not found`);
        }
        const top = optStr(args, 'top-node') ?? (found.blk === null ? device : undefined);
        const base = optStr(args, 'base-node');
        const topNode = top === undefined ? found.node : namedNode(bql, top);
        const baseNodeFound = base === undefined ? undefined : namedNode(bql, base);
        if (topNode !== null && topNode.backing === undefined) throw new QmpError('GenericError', 'cannot commit an image into itself');
        if (topNode !== null && baseNodeFound !== undefined) {
          let b = topNode.backing;
          while (b !== undefined && b !== baseNodeFound) b = b.backing;
          if (b === undefined) throw new QmpError('GenericError', `'${baseNodeFound.nodeName}' is not in this backing file chain`);
        }
        const autoDismiss = optBool(args, 'auto-dismiss', true);
        // QEMU's default base is the bottommost image of the chain (not the top's backing file)
        let bottom = topNode?.backing;
        while (bottom?.backing !== undefined) bottom = bottom.backing;
        const baseName = base ?? bottom?.nodeName;
        blockCommit(bql, {
          jobId: optStr(args, 'job-id') ?? device,
          ...(found.blk !== null ? { device } : {}),
          ...(top === undefined ? {} : { top }),
          ...(baseName === undefined ? {} : { base: baseName }),
          autoDismiss,
          autoFinalize: optBool(args, 'auto-finalize', true),
        });
        return {};
      }),
    ),
};

const blockdevSnapshotSync: QmpCommand = {
  name: 'blockdev-snapshot-sync',
  doc: "Takes an external snapshot of a device: creates `snapshot-file` as a qcow2 overlay whose backing file is the device's current image, and puts it on top of the device while it runs.",
  args: [
    { name: 'device', type: 'str', optional: true },
    { name: 'node-name', type: 'str', optional: true },
    { name: 'snapshot-file', type: 'str' },
    { name: 'snapshot-node-name', type: 'str', optional: true },
    { name: 'format', type: 'str', optional: true },
    { name: 'mode', type: { enum: ['existing', 'absolute-paths'] }, optional: true },
  ],
  example: { args: { device: 'disk0', 'snapshot-file': 'overlay.qcow2', 'snapshot-node-name': 'overlay0' }, returns: {} },
  run: (_ctx, args) =>
    qmpErrors(() =>
      withBql(async (bql) => {
        if (optStr(args, 'mode') === 'existing') throw new QmpError('GenericError', "Parameter 'mode' value 'existing' is not supported by snapstack (absolute-paths)");
        const device = optStr(args, 'device');
        const nodeName = optStr(args, 'node-name');
        if (device === undefined && nodeName === undefined) throw new QmpError('GenericError', "Cannot find device='' nor node-name=''");
        if (device === undefined) namedNode(bql, nodeName ?? '');
        else lookupDevice(bql, device);
        if (nodeName !== undefined && optStr(args, 'snapshot-node-name') === undefined) throw new QmpError('GenericError', 'New overlay node-name missing');
        const format = optStr(args, 'format');
        if (format !== undefined && format !== 'qcow2') throw new QmpError('GenericError', `Backing file not supported for file format '${format}'`);
        const backend = device !== undefined && allBackends.has(device) ? device : backendOfNode(bql, device ?? nodeName ?? '');
        const snapshotNode = optStr(args, 'snapshot-node-name');
        await snapshotBlkdev(bql, {
          device: backend,
          snapshotFile: reqStr(args, 'snapshot-file'),
          ...(format === undefined ? {} : { format }),
          ...(snapshotNode === undefined ? {} : { nodeName: snapshotNode }),
        });
        return {};
      }),
    ),
};

/** The backend whose root is node `nodeName` (an external snapshot needs a device to switch). */
function backendOfNode(bql: Bql, nodeName: string): string {
  const node = lookupDevice(bql, nodeName).node;
  for (const blk of allBackends.values()) if (blk.root !== null && blk.root === node) return blk.name;
  throw new QmpError('GenericError', `Node '${nodeName}' is not the root of a device: snapstack takes external snapshots of devices only`);
}

/** block-stream, block-commit, blockdev-snapshot-sync. */
export const blockJobCommands: QmpCommand[] = [blockStreamCommand, blockCommitCommand, blockdevSnapshotSync];

/**
 * snapshot-save, snapshot-load and snapshot-delete as jobs (QEMU 6.0+, qapi/migration.json):
 * `job-id`, `tag`, `vmstate` (the node that holds the VM state) and `devices` (the nodes to
 * snapshot). The command returns at once; the job runs in the background, reports JOB_STATUS_CHANGE
 * created, running, (STOP, RESUME), waiting, pending, concluded, keeps its error in query-jobs and
 * stays until job-dismiss, as QEMU's do.
 *
 * Unlike QEMU, whose job runs the whole save in one main-loop callback with the BQL held (so its
 * monitor answers nothing until it is done), the job holds the snapshot lock and takes the BQL for
 * its short global-state steps only: the VM state moves in chunks without it, other monitors and
 * other disks' I/O go on, and job-cancel between two chunks leaves every disk as it was and the
 * machine running (src/machine/savevm.ts, vm-steps.ts). Also unlike QEMU, a snapshot-load that
 * fails before it changed anything leaves the machine running (QEMU leaves it stopped).
 */
import { withBql, type Bql } from '../../block/bql.js';
import { BlockError } from '../../block/errors.js';
import { jobStart, type Job } from '../../block/job.js';
import { withSnapshotLock, type SnapshotLocked } from '../../block/snapshot-lock.js';
import type { Machine } from '../../machine/machine.js';
import { delVmLocked, loadVmLocked, saveVmLocked } from '../../machine/savevm.js';
import type { VmStepHooks } from '../../machine/vm-steps.js';
import { emitQmpEvent } from '../events.js';
import { QmpError, type QmpCommand, type QmpContext, type QmpObject } from '../types.js';
import { strerror } from '../../commands/format.js';
import { machineOf, qmpErrors, reqStr } from './util.js';


/** `devices`: a list of node names, as QEMU's strList. */
function deviceList(args: QmpObject): string[] {
  const v = args['devices'];
  if (!Array.isArray(v) || !v.every((x): x is string => typeof x === 'string')) throw new QmpError('GenericError', "Invalid parameter type for 'devices', expected: array");
  return v;
}

/**
 * The machine's disk ids for the node names QMP gives (a disk may also be named by its id), and
 * the VM-state disk among them; QEMU's texts when one is not there.
 */
function resolveDisks(m: Machine, devices: readonly string[], vmstate: string | null): { devices: string[]; vmstate?: string } {
  if (devices.length === 0) throw new BlockError('EINVAL', 'At least one device is required for snapshot', { field: 'devices' });
  const idOf = (name: string): string | undefined => m.disks.find((d) => d.node.nodeName === name || d.id === name)?.id;
  const ids: string[] = [];
  for (const name of devices) {
    const id = idOf(name);
    if (id === undefined) throw new BlockError('ENOENT', `No block device node '${name}'`, { node: name, field: 'devices' });
    ids.push(id);
  }
  if (vmstate === null) return { devices: ids };
  const vm = devices.includes(vmstate) ? idOf(vmstate) : undefined;
  if (vm === undefined) throw new BlockError('ENOENT', `vmstate block device '${vmstate}' does not exist`, { node: vmstate, field: 'vmstate' });
  return { devices: ids, vmstate: vm };
}

/** Starts one snapshot job whose body runs `work` with the snapshot lock. */
function startSnapshotJob(bql: Bql, id: string, type: string, work: (job: Job) => Promise<unknown>): void {
  jobStart(
    bql,
    id,
    type,
    {
      run: async (job) => {
        try {
          await work(job);
        } finally {
          if (job.progress.total === 0) job.setProgress(1, 1); // as QEMU's: 1 of 1 once done, failed or not
        }
      },
    },
    { autoDismiss: false },
  );
}

/** What the job gives the VM snapshot operation: its progress and its pause point. */
function hooksOf(job: Job): VmStepHooks {
  return { onProgress: (done, total) => job.setProgress(done, total), pausePoint: () => job.pausePoint(), enterCommit: (bql) => job.enterCommit(bql) };
}

const snapshotArgs = [
  { name: 'job-id', type: 'str' },
  { name: 'tag', type: 'str' },
  { name: 'vmstate', type: 'str' },
  { name: 'devices', type: { array: 'str' } },
] as const;

const machineBridges = new Map<Machine, { users: number; stop: () => void }>();

/**
 * Forwards the machine's events to QMP until the returned function is called: run-state changes
 * as STOP and RESUME, a failed guest request as BLOCK_IO_ERROR (action "report", QEMU's default:
 * the error goes to the guest). Counted per machine, so two servers of one machine send each event
 * once (as retainJobEventBridge does for jobs).
 * @locking common
 */
export function forwardMachineEvents(m: Machine): () => void {
  let b = machineBridges.get(m);
  if (b === undefined) {
    const offRun = m.onRunStateChange((state) => emitQmpEvent(state === 'paused' ? 'STOP' : 'RESUME'));
    const offIo = m.onIoError((e) => {
      const data: QmpObject = { device: e.device, operation: e.operation, action: 'report', nospace: e.code === 'ENOSPC', reason: strerror(e.code) };
      if (e.nodeName !== null) data['node-name'] = e.nodeName;
      emitQmpEvent('BLOCK_IO_ERROR', data);
    });
    b = { users: 0, stop: () => (offRun(), offIo()) };
    machineBridges.set(m, b);
  }
  const bridge = b;
  bridge.users++;
  let released = false;
  return () => {
    if (released) return;
    released = true;
    if (--bridge.users === 0) {
      bridge.stop();
      machineBridges.delete(m);
    }
  };
}

/**
 * The body shared by the three commands: checks the arguments under the BQL and starts job
 * `job-id` of `type`, whose body runs `work` with the snapshot lock.
 */
function startVmSnapshotJob(
  ctx: QmpContext,
  args: QmpObject,
  type: string,
  work: (snap: SnapshotLocked, m: Machine, tag: string, devices: string[], job: Job) => Promise<unknown>,
): Promise<QmpObject> {
  return qmpErrors(() =>
    withBql((bql) => {
      const m = machineOf(ctx);
      const id = reqStr(args, 'job-id');
      const tag = reqStr(args, 'tag');
      const devices = deviceList(args);
      startSnapshotJob(bql, id, type, (job) => withSnapshotLock(`job '${id}' (${type} '${tag}')`, (snap) => work(snap, m, tag, devices, job)));
      return {};
    }),
  );
}

/** The snapshot job commands. */
export const snapshotJobCommands: QmpCommand[] = [
  {
    name: 'snapshot-save',
    doc: "Starts a job that saves the VM state to `vmstate` and snapshots every node of `devices` under `tag` (refused if a device already has it). The machine is stopped while it runs and resumed after; the job stays until job-dismiss.",
    args: snapshotArgs,
    needsMachine: true,
    example: { args: { 'job-id': 'save0', tag: 'my-snap', vmstate: 'disk0', devices: ['disk0', 'disk1'] }, returns: {} },
    run: (ctx, args) =>
      startVmSnapshotJob(ctx, args, 'snapshot-save', (snap, m, tag, devices, job) =>
        saveVmLocked(snap, m, tag, { ...resolveDisks(m, devices, reqStr(args, 'vmstate')), overwrite: false }, hooksOf(job)),
      ),
  },
  {
    name: 'snapshot-load',
    doc: 'Starts a job that reverts every node of `devices` to the snapshot `tag` and loads the VM state from `vmstate`; on any failure (or job-cancel) every disk is put back and the machine keeps its state.',
    args: snapshotArgs,
    needsMachine: true,
    example: { args: { 'job-id': 'load0', tag: 'my-snap', vmstate: 'disk0', devices: ['disk0', 'disk1'] }, returns: {} },
    run: (ctx, args) =>
      startVmSnapshotJob(ctx, args, 'snapshot-load', (snap, m, tag, devices, job) => loadVmLocked(snap, m, tag, resolveDisks(m, devices, reqStr(args, 'vmstate')), hooksOf(job))),
  },
  {
    name: 'snapshot-delete',
    doc: 'Starts a job that deletes the snapshot `tag` from every node of `devices` (nothing to delete is no error, as in QEMU).',
    args: snapshotArgs.filter((a) => a.name !== 'vmstate'),
    needsMachine: true,
    example: { args: { 'job-id': 'delete0', tag: 'my-snap', devices: ['disk0', 'disk1'] }, returns: {} },
    run: (ctx, args) =>
      startVmSnapshotJob(ctx, args, 'snapshot-delete', async (snap, m, tag, devices, job) => {
        const failures = await delVmLocked(snap, m, tag, resolveDisks(m, devices, null), hooksOf(job));
        if (failures.length > 0) throw new BlockError('EIO', failures.join('; '), { op: 'snapshot-delete', value: tag });
      }),
  },
];

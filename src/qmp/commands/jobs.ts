/**
 * Background jobs over QMP (QEMU's job-qmp.c): query-jobs and the verbs job-pause, job-resume,
 * job-cancel, job-complete, job-finalize, job-dismiss; the older block-job commands libvirt
 * drives (query-block-jobs, block-job-pause/resume/cancel/complete/finalize/dismiss/set-speed,
 * QEMU's blockdev.c), which see block jobs only; and `forwardJobEvents`, which turns the
 * jobs' status changes into QMP events (JOB_STATUS_CHANGE for every job; BLOCK_JOB_READY,
 * BLOCK_JOB_COMPLETED and BLOCK_JOB_CANCELLED for block jobs), in QEMU's order.
 *
 * Each verb takes the BQL for its one global-state step and never waits for the job. A job that
 * does not exist is "Job not found"; a verb in the wrong state is QEMU's "Job 'x' in state 'y'
 * cannot accept command verb 'z'" (src/block/job.ts follows QEMU's verb table).
 */
import { withBql, type Bql } from '../../block/bql.js';
import { listJobs, onJobEvent, type Job } from '../../block/job.js';
import { QmpError, type QmpCommand, type QmpObject } from '../types.js';
import { qmpErrors, reqStr } from './util.js';

/** Job types whose status changes also raise QEMU's BLOCK_JOB_* events. */
const BLOCK_JOB_TYPES = new Set(['stream', 'commit', 'mirror', 'backup']);

/**
 * One job as QEMU's JobInfo.
 * @locking common
 */
export function jobInfo(job: Job): QmpObject {
  const info: QmpObject = { id: job.id, type: job.type, status: job.status, 'current-progress': job.progress.current, 'total-progress': job.progress.total };
  if (job.error !== null) info['error'] = job.error;
  // QEMU reports a cancelled job as failed with ECANCELED's text
  else if (job.cancelled && (job.status === 'aborting' || job.status === 'concluded')) info['error'] = 'Operation canceled';
  return info;
}

/** The job `id` or QEMU's "Job not found". */
function jobById(bql: Bql, id: string): Job {
  const job = listJobs(bql).find((j) => j.id === id);
  if (job === undefined) throw new QmpError('GenericError', 'Job not found');
  return job;
}

/**
 * One block job as QEMU's BlockJobInfo (query-block-jobs). snapstack's jobs do not throttle:
 * speed is 0 (unlimited).
 * @locking common
 */
export function blockJobInfo(job: Job): QmpObject {
  const info: QmpObject = {
    type: job.type,
    device: job.id,
    len: job.progress.total,
    offset: job.progress.current,
    busy: ['running', 'ready', 'waiting', 'aborting'].includes(job.status) && !job.userPaused,
    paused: job.status === 'paused' || job.userPaused,
    speed: 0,
    'io-status': 'ok',
    ready: job.status === 'ready',
    status: job.status,
    'auto-finalize': job.autoFinalize,
    'auto-dismiss': job.autoDismiss,
  };
  const error = jobInfo(job)['error'];
  if (error !== undefined) info['error'] = error;
  return info;
}

/** The block job `id` or QEMU's DeviceNotActive "Block job 'x' not found". */
function blockJobById(bql: Bql, id: string): Job {
  const job = listJobs(bql).find((j) => j.id === id && BLOCK_JOB_TYPES.has(j.type));
  if (job === undefined) throw new QmpError('DeviceNotActive', `Block job '${id}' not found`);
  return job;
}

/** A block-job verb: `device` (or `id`) names the job. */
function blockVerb(name: string, member: 'device' | 'id', doc: string, apply: (bql: Bql, job: Job, args: QmpObject) => void, extra: QmpCommand['args'] = []): QmpCommand {
  return {
    name,
    doc,
    args: [{ name: member, type: 'str' }, ...extra],
    example: { args: { [member]: 'job0', ...Object.fromEntries(extra.filter((f) => f.optional !== true).map((f) => [f.name, f.type === 'int' ? 0 : f.type === 'bool' ? false : ''])) }, returns: {} },
    run: (_ctx, args) =>
      qmpErrors(() =>
        withBql((bql) => {
          apply(bql, blockJobById(bql, reqStr(args, member)), args);
          return {};
        }),
      ),
  };
}

/** A block job's data in BLOCK_JOB_* events. */
function blockJobData(job: Job): QmpObject {
  return { device: job.id, len: job.progress.total, offset: job.progress.current, speed: 0, type: job.type };
}

/**
 * Sends every job's status changes to `emit` as QMP events, until the returned function is
 * called: JOB_STATUS_CHANGE {id, status}; for block jobs also BLOCK_JOB_READY after 'ready' and,
 * before 'concluded', BLOCK_JOB_COMPLETED (with `error` when it failed) or BLOCK_JOB_CANCELLED.
 * @locking common
 */
export function forwardJobEvents(emit: (event: string, data: QmpObject) => void): () => void {
  return onJobEvent((e) => {
    const block = BLOCK_JOB_TYPES.has(e.type);
    if (block && e.status === 'concluded') {
      const data = blockJobData(e.job);
      if (e.job.cancelled && e.job.error === null) emit('BLOCK_JOB_CANCELLED', data);
      else emit('BLOCK_JOB_COMPLETED', e.job.error === null ? data : { ...data, error: e.job.error });
    }
    emit('JOB_STATUS_CHANGE', { status: e.status, id: e.id });
    if (block && e.status === 'ready') emit('BLOCK_JOB_READY', blockJobData(e.job));
  });
}

/** A verb command: finds the job and applies the verb under the BQL. */
function verb(name: string, doc: string, apply: (bql: Bql, job: Job) => void): QmpCommand {
  return {
    name,
    doc,
    args: [{ name: 'id', type: 'str' }],
    example: { args: { id: 'job0' }, returns: {} },
    run: (_ctx, args) =>
      qmpErrors(() =>
        withBql((bql) => {
          apply(bql, jobById(bql, reqStr(args, 'id')));
          return {};
        }),
      ),
  };
}

const queryJobs: QmpCommand = {
  name: 'query-jobs',
  doc: "Lists the jobs that exist (not yet dismissed) as QEMU's JobInfo: id, type, status, current-progress, total-progress, and error once one failed.",
  args: [],
  example: { returns: [{ id: 'job0', type: 'stream', status: 'running', 'current-progress': 524288, 'total-progress': 67108864 }] },
  // newest first, as QEMU lists them
  run: () => qmpErrors(() => withBql((bql) => listJobs(bql).reverse().map(jobInfo))),
};

const queryBlockJobs: QmpCommand = {
  name: 'query-block-jobs',
  doc: "Lists the block jobs (stream, commit) as QEMU's BlockJobInfo: device (the job id), type, len, offset, busy, paused, speed, io-status, ready, status, auto-finalize, auto-dismiss.",
  args: [],
  example: { returns: [{ type: 'stream', device: 'job0', len: 67108864, offset: 524288, busy: true, paused: false, speed: 0, 'io-status': 'ok', ready: false, status: 'running', 'auto-finalize': true, 'auto-dismiss': true }] },
  run: () => qmpErrors(() => withBql((bql) => listJobs(bql).reverse().filter((j) => BLOCK_JOB_TYPES.has(j.type)).map(blockJobInfo))),
};

/** The states in which QEMU's set-speed verb is accepted. */
const SET_SPEED_STATES = new Set(['created', 'running', 'paused', 'ready']);

/** The block-job commands of QEMU's blockdev.c. */
export const blockJobVerbCommands: QmpCommand[] = [
  queryBlockJobs,
  blockVerb('block-job-pause', 'device', 'Pauses a block job (as job-pause).', (bql, job) => job.pause(bql)),
  blockVerb('block-job-resume', 'device', 'Resumes a block job the user paused (as job-resume).', (bql, job) => job.resume(bql)),
  blockVerb('block-job-cancel', 'device', 'Cancels a block job (as job-cancel; `force` is accepted: every cancel is forced in snapstack).', (bql, job) => job.cancel(bql), [{ name: 'force', type: 'bool', optional: true }]),
  blockVerb('block-job-complete', 'device', 'Completes a block job that is ready (as job-complete).', (bql, job) => job.complete(bql)),
  blockVerb('block-job-finalize', 'id', 'Finalizes a pending block job (as job-finalize).', (bql, job) => job.finalize(bql)),
  blockVerb('block-job-dismiss', 'id', 'Dismisses a concluded block job (as job-dismiss).', (bql, job) => job.dismiss(bql)),
  blockVerb(
    'block-job-set-speed',
    'device',
    "Sets a block job's rate limit; snapstack's jobs do not throttle, so it is accepted in the states QEMU accepts it and has no effect.",
    (_bql, job, args) => {
      if (!SET_SPEED_STATES.has(job.status)) throw new QmpError('GenericError', `Job '${job.id}' in state '${job.status}' cannot accept command verb 'set-speed'`);
      const speed = args['speed'];
      if (typeof speed === 'number' && speed < 0) throw new QmpError('GenericError', "Parameter 'speed' expects a non-negative value");
    },
    [{ name: 'speed', type: 'int' }],
  ),
];

/** The job commands. */
export const jobCommands: QmpCommand[] = [
  queryJobs,
  verb('job-pause', 'Pauses a job at its next pause point ("Job is already paused" when the user paused it already).', (bql, job) => job.pause(bql)),
  verb('job-resume', "Resumes a job the user paused (\"Can't resume a job that was not paused\" otherwise).", (bql, job) => job.resume(bql)),
  verb('job-cancel', 'Cancels a job: it stops at its next pause point and aborts; images keep what the guest sees.', (bql, job) => job.cancel(bql)),
  verb('job-complete', 'Completes a job that is ready (an active block-commit switches the device to the base).', (bql, job) => job.complete(bql)),
  verb('job-finalize', 'Runs the graph change of a job started with auto-finalize false that waits in the pending state.', (bql, job) => job.finalize(bql)),
  verb('job-dismiss', 'Removes a concluded job started with auto-dismiss false.', (bql, job) => job.dismiss(bql)),
];

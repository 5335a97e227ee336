/**
 * Background jobs over QMP (QEMU's job-qmp.c): query-jobs and the verbs job-pause, job-resume,
 * job-cancel, job-complete, job-finalize, job-dismiss; and `forwardJobEvents`, which turns the
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
  run: () => qmpErrors(() => withBql((bql) => listJobs(bql).map(jobInfo))),
};

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

/**
 * Background jobs (QEMU's job.c and blockjob.c, reduced): a Job has an id, a type, a status,
 * progress (current/total) and an error; the monitor-like verbs pause, resume, cancel, complete
 * and dismiss; every status change is an event (QEMU's JOB_STATUS_CHANGE) for the listeners.
 *
 * Status machine (QEMU's JobSTT without standby): created -> running; running -> paused, ready,
 * waiting, aborting; paused -> running (or ready, when it was ready); ready -> paused, waiting,
 * aborting; waiting -> pending -> concluded; aborting -> concluded; concluded -> null (dismissed,
 * automatically unless `autoDismiss: false`). With `autoFinalize: false` a job that succeeded
 * stays pending until `finalize` (QEMU's job-finalize) runs its graph change, or `cancel` aborts it.
 *
 * The verbs follow QEMU's JobVerbTable: pause and resume in created/running/paused/ready (one
 * user pause at a time: "Job is already paused"), cancel until the job is aborting or concluded,
 * complete only when ready, finalize only when pending, dismiss only when concluded; otherwise
 * "Job 'x' in state 'y' cannot accept command verb 'z'".
 *
 * The job's body (JobDriver.run) runs in the background on the main loop and calls
 * `job.pausePoint()` between its steps: it yields to the event loop (guest I/O goes on), waits
 * while the job is paused, and returns true once the job is cancelled. After run: `prepare`
 * (success: the graph change) or `abort` (failure or cancel), both under the BQL.
 *
 * Global-state code for the verbs (they take `Bql`); the body is I/O code.
 */
import { refuseIfSnapshotClaimed } from './snapshot-lock.js';
import { acquireBql, assertBql, releaseBql, type Bql } from './bql.js';
import { BlockError } from './errors.js';
import type { BlockNode } from './node.js';

/** A job's status, as QEMU's JobStatus names them. */
export type JobStatus = 'created' | 'running' | 'paused' | 'ready' | 'waiting' | 'pending' | 'aborting' | 'concluded' | 'null';

/** One status change (QEMU's JOB_STATUS_CHANGE event). */
export interface JobEvent {
  id: string;
  type: string;
  status: JobStatus;
  /** The job itself (its progress, error and cancelled flag at the change). */
  job: Job;
}

/** What a job of one kind does. */
export interface JobDriver {
  /** The job's body: copies in steps, calls job.pausePoint() between them, returns when done or cancelled. */
  run(job: Job): Promise<void>;
  /** Called (BQL held) after a successful run: the graph change; a throw fails the job. */
  prepare?(bql: Bql, job: Job): Promise<void>;
  /** Called (BQL held) after a failed or cancelled run: undo what must be undone. */
  abort?(bql: Bql, job: Job): Promise<void>;
  /** Called (BQL held) when a ready job is told to complete; run then returns at its next pause point. */
  complete?(bql: Bql, job: Job): void;
}

/** Options of a new job. */
export interface JobOptions {
  /** Remove the job once it concluded (QEMU's auto-dismiss, default true). */
  autoDismiss?: boolean;
  /** The nodes the job works on: no other job may use them until it concluded (EBUSY). */
  nodes?: readonly BlockNode[];
  /** Run the graph change as soon as the job succeeded (QEMU's auto-finalize, default true). */
  autoFinalize?: boolean;
}

/** Nodes in use by a job, and by which. */
const busy = new Map<BlockNode, Job>();

const jobs = new Map<string, Job>();
const listeners = new Set<(e: JobEvent) => void>();

/** Legal transitions. */
const NEXT: Record<JobStatus, readonly JobStatus[]> = {
  created: ['running', 'aborting'],
  running: ['paused', 'ready', 'waiting', 'aborting'],
  paused: ['running', 'ready'],
  ready: ['paused', 'waiting', 'aborting'],
  waiting: ['pending', 'aborting'],
  pending: ['concluded', 'aborting'],
  aborting: ['concluded'],
  concluded: ['null'],
  null: [],
};

/** A background job; create one with jobStart. */
export class Job {
  #status: JobStatus = 'created';
  #pauseCount = 0;
  #userPaused = false;
  #autoFinalize = true;
  #finalizeRequested: (() => void) | null = null;
  #cancelled = false;
  /** Set by enterCommit: past the point of no return, cancel is refused. */
  #committed = false;
  #completing = false;
  #wasReady = false;
  #wakeUp: (() => void) | null = null;
  #done: Promise<void>;
  #resolveDone!: () => void;
  /** Bytes done and to do (QEMU's progress_current/progress_total). */
  readonly progress = { current: 0, total: 0 };
  /** Why the job failed; null while it has not. */
  error: string | null = null;

  /** @internal use jobStart */
  constructor(
    readonly id: string,
    readonly type: string,
    private readonly driver: JobDriver,
    /** Removed once concluded (QEMU's auto-dismiss). */
    readonly autoDismiss: boolean,
  ) {
    this.#done = new Promise((resolve) => (this.#resolveDone = resolve));
  }

  /** The current status. */
  get status(): JobStatus {
    return this.#status;
  }

  /** True while a user (QMP job-pause, HMP block_job_pause) has paused the job. */
  get userPaused(): boolean {
    return this.#userPaused;
  }

  /** False when the job waits in 'pending' for finalize (QEMU's auto-finalize). */
  get autoFinalize(): boolean {
    return this.#autoFinalize;
  }

  /** @internal set by jobStart */
  setAutoFinalize(v: boolean): void {
    this.#autoFinalize = v;
  }

  /** True once cancel was called. */
  get cancelled(): boolean {
    return this.#cancelled;
  }

  /**
   * The body is about to make its change final (a snapshot job's commit): returns false when the
   * job was cancelled (the body then stops without committing); otherwise marks the job past its
   * point of no return, after which job-cancel is refused, so that a job reported cancelled never
   * made its change.
   * @locking global-state
   */
  enterCommit(bql: Bql): boolean {
    assertBql(bql, 'job-commit');
    if (this.#cancelled) return false;
    this.#committed = true;
    return true;
  }

  /** True once complete was called on the ready job. */
  get completing(): boolean {
    return this.#completing;
  }

  /**
   * Settles when the job has concluded (whatever the outcome). The job takes the BQL to finish:
   * do not wait for this while holding it.
   */
  whenConcluded(): Promise<void> {
    return this.#done;
  }

  #transition(to: JobStatus): void {
    if (!NEXT[this.#status].includes(to)) {
      throw new BlockError('EINVAL', `Job '${this.id}': cannot go from ${this.#status} to ${to}`, { op: 'job', value: to });
    }
    this.#status = to;
    this.#emit(to);
  }

  #emit(to: JobStatus): void {
    const ev: JobEvent = { id: this.id, type: this.type, status: to, job: this };
    for (const l of [...listeners]) {
      try {
        l(ev);
      } catch {
        // a listener's failure is not the job's
      }
    }
  }

  /**
   * Between two steps of the body: yields to the event loop, waits while paused, and says
   * whether the body should stop (cancelled, or completing a ready job).
   * @locking io
   */
  async pausePoint(): Promise<boolean> {
    await new Promise<void>((resolve) => setImmediate(resolve));
    while (this.#pauseCount > 0 && !this.#cancelled) {
      if (this.#status === 'running' || this.#status === 'ready') {
        this.#wasReady = this.#status === 'ready';
        this.#transition('paused');
      }
      await new Promise<void>((resolve) => (this.#wakeUp = resolve));
      this.#wakeUp = null;
    }
    if (this.#status === 'paused') this.#transition(this.#wasReady ? 'ready' : 'running');
    return this.#cancelled || this.#completing;
  }

  /**
   * The body says it has caught up and waits for complete (QEMU's job_transition_to_ready).
   * @locking io
   */
  setReady(): void {
    if (this.#status === 'running') this.#transition('ready');
  }

  /** Sets the progress counters. @locking io */
  setProgress(current: number, total: number): void {
    this.progress.current = current;
    this.progress.total = total;
  }

  /**
   * Asks the job to pause at its next pause point (counted: as many resumes as pauses).
   * @locking global-state
   */
  pause(bql: Bql): void {
    assertBql(bql, 'job-pause');
    this.#refuseFinished('pause');
    if (this.#userPaused) throw new BlockError('EINVAL', 'Job is already paused', { op: 'job-pause' });
    this.#userPaused = true;
    this.#pauseCount++;
  }

  /**
   * Undoes the user's pause; the job runs on. EINVAL when it was not paused (QEMU's text).
   * @locking global-state
   */
  resume(bql: Bql): void {
    assertBql(bql, 'job-resume');
    this.#refuseFinished('resume');
    if (!this.#userPaused || this.#pauseCount === 0) throw new BlockError('EINVAL', "Can't resume a job that was not paused", { op: 'job-resume' });
    this.#userPaused = false;
    this.#pauseCount--;
    if (this.#pauseCount === 0) this.#wakeUp?.();
  }

  /**
   * Runs the graph change of a job that waits in 'pending' (auto-finalize off; QEMU's
   * job-finalize); the job then concludes in the background.
   * @locking global-state
   */
  finalize(bql: Bql): void {
    assertBql(bql, 'job-finalize');
    const go = this.#finalizeRequested;
    if (this.#status !== 'pending' || go === null) {
      throw new BlockError('EINVAL', `Job '${this.id}' in state '${this.#status}' cannot accept command verb 'finalize'`, { op: 'job-finalize' });
    }
    this.#finalizeRequested = null;
    go();
  }

  /**
   * Cancels the job: its body stops at the next pause point and the job aborts (images keep
   * what the guest sees). A paused job is woken to do so.
   * @locking global-state
   */
  cancel(bql: Bql): void {
    assertBql(bql, 'job-cancel');
    // QEMU's verb check first: a concluded job says so, whatever it did before
    if (['aborting', 'concluded', 'null'].includes(this.#status) || (this.#status === 'pending' && this.#finalizeRequested === null)) {
      throw new BlockError('EINVAL', `Job '${this.id}' in state '${this.#status}' cannot accept command verb 'cancel'`, { op: 'job-cancel' });
    }
    if (this.#committed) throw new BlockError('EINVAL', `Job '${this.id}' has passed its commit point and can no longer be cancelled`, { op: 'job-cancel' });
    this.#cancelled = true;
    this.#wakeUp?.();
    const pending = this.#finalizeRequested;
    if (pending !== null) {
      // a job waiting for finalize aborts instead
      this.#finalizeRequested = null;
      pending();
    }
  }

  /**
   * Completes a ready job (an active commit then switches the device to the base).
   * @locking global-state
   */
  complete(bql: Bql): void {
    assertBql(bql, 'job-complete');
    if (this.#status !== 'ready') {
      throw new BlockError('EINVAL', `Job '${this.id}' in state '${this.#status}' cannot accept command verb 'complete'`, { op: 'job-complete' });
    }
    this.#completing = true;
    this.driver.complete?.(bql, this);
    this.#wakeUp?.();
  }

  /**
   * Removes a concluded job (status null). EINVAL for a job that has not concluded.
   * @locking global-state
   */
  dismiss(bql: Bql): void {
    assertBql(bql, 'job-dismiss');
    if (this.#status !== 'concluded') {
      throw new BlockError('EINVAL', `Job '${this.id}' in state '${this.#status}' cannot accept command verb 'dismiss'`, { op: 'job-dismiss' });
    }
    this.#transition('null');
    jobs.delete(this.id);
  }

  #refuseFinished(verb: string): void {
    if (['waiting', 'pending', 'aborting', 'concluded', 'null'].includes(this.#status)) {
      throw new BlockError('EINVAL', `Job '${this.id}' in state '${this.#status}' cannot accept command verb '${verb}'`, { op: `job-${verb}` });
    }
  }

  /** @internal announces the new job (QEMU's 'created' event). */
  announce(): void {
    this.#emit('created');
  }

  /** @internal the background part: run, then prepare or abort, then conclude. */
  async start(): Promise<void> {
    this.#transition('running');
    let failure: unknown = null;
    try {
      await this.driver.run(this);
    } catch (e) {
      failure = e;
    }
    let bql = await acquireBql();
    try {
      if (failure === null && !this.#cancelled) {
        this.#transition('waiting');
        this.#transition('pending');
        if (!this.#autoFinalize) {
          // wait (without the BQL) for job-finalize or job-cancel
          releaseBql(bql);
          await new Promise<void>((resolve) => (this.#finalizeRequested = resolve));
          bql = await acquireBql();
        }
      }
      if (failure === null && !this.#cancelled) {
        try {
          await this.driver.prepare?.(bql, this);
        } catch (e) {
          failure = e;
        }
      }
      if (failure !== null || this.#cancelled) {
        if (failure !== null) this.error = failure instanceof Error ? failure.message : String(failure);
        this.#transition('aborting');
        try {
          await this.driver.abort?.(bql, this);
        } catch (e) {
          this.error ??= e instanceof Error ? e.message : String(e);
        }
      }
      this.#transition('concluded');
      if (this.autoDismiss) {
        this.#transition('null');
        jobs.delete(this.id);
      }
    } finally {
      releaseBql(bql);
      this.#resolveDone();
    }
  }
}

/**
 * Creates job `id` of `type` doing what `driver` says and starts it in the background (it runs
 * once the caller lets the event loop turn). EEXIST for an id in use.
 * @locking global-state
 */
export function jobStart(bql: Bql, id: string, type: string, driver: JobDriver, opts: JobOptions = {}): Job {
  assertBql(bql, 'job-start');
  if (id === '') throw new BlockError('EINVAL', 'A job needs an id', { op: 'job-start', field: 'job-id' });
  // QEMU's id_wellformed: a letter, then letters, digits, '-', '.', '_'
  if (!/^[A-Za-z][A-Za-z0-9._-]*$/.test(id)) throw new BlockError('EINVAL', `Invalid job ID '${id}'`, { op: 'job-start', field: 'job-id', value: id });
  if (jobs.has(id)) throw new BlockError('EBUSY', `Job ID '${id}' already in use`, { op: 'job-start', field: 'job-id', value: id });
  const nodes = opts.nodes ?? [];
  for (const node of nodes) refuseIfSnapshotClaimed(node, `job '${id}'`);
  for (const node of nodes) {
    const other = busy.get(node);
    if (other !== undefined) {
      throw new BlockError('EBUSY', `Node '${node.nodeName}' is busy: block device is in use by block job: ${other.type}`, { node: node.nodeName, op: 'job-start' });
    }
  }
  const job = new Job(id, type, driver, opts.autoDismiss ?? true);
  job.setAutoFinalize(opts.autoFinalize ?? true);
  jobs.set(id, job);
  for (const node of nodes) busy.set(node, job);
  void job.whenConcluded().then(() => {
    for (const node of nodes) if (busy.get(node) === job) busy.delete(node);
  });
  job.announce();
  queueMicrotask(() => void job.start());
  return job;
}

/**
 * The job with this id; ENOENT when there is none.
 * @locking global-state
 */
export function findJob(bql: Bql, id: string): Job {
  assertBql(bql, 'find-job');
  const job = jobs.get(id);
  if (job === undefined) throw new BlockError('ENOENT', `Job '${id}' not found`, { op: 'job', value: id });
  return job;
}

/**
 * The job that works on `node` (jobStart's `nodes`), or null: block commands refuse such a node
 * as QEMU's op blockers do ("Node 'x' is busy: block device is in use by block job: stream").
 * @locking global-state
 */
export function jobUsingNode(bql: Bql, node: BlockNode): Job | null {
  assertBql(bql, 'job-using-node');
  return busy.get(node) ?? null;
}

/**
 * The jobs that exist (query-jobs).
 * @locking global-state
 */
export function listJobs(bql: Bql): Job[] {
  assertBql(bql, 'query-jobs');
  return [...jobs.values()];
}

/**
 * Adds a listener for every job's status changes; returns the function that removes it.
 * @locking common
 */
export function onJobEvent(listener: (e: JobEvent) => void): () => void {
  listeners.add(listener);
  return () => listeners.delete(listener);
}

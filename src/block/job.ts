/**
 * Background jobs (QEMU's job.c and blockjob.c, reduced): a Job has an id, a type, a status,
 * progress (current/total) and an error; the monitor-like verbs pause, resume, cancel, complete
 * and dismiss; every status change is an event (QEMU's JOB_STATUS_CHANGE) for the listeners.
 *
 * Status machine (QEMU's JobSTT without standby): created -> running; running -> paused, ready,
 * waiting, aborting; paused -> running (or ready, when it was ready); ready -> paused, waiting,
 * aborting; waiting -> pending -> concluded; aborting -> concluded; concluded -> null (dismissed,
 * automatically unless `autoDismiss: false`).
 *
 * The job's body (JobDriver.run) runs in the background on the main loop and calls
 * `job.pausePoint()` between its steps: it yields to the event loop (guest I/O goes on), waits
 * while the job is paused, and returns true once the job is cancelled. After run: `prepare`
 * (success: the graph change) or `abort` (failure or cancel), both under the BQL.
 *
 * Global-state code for the verbs (they take `Bql`); the body is I/O code.
 */
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
  #cancelled = false;
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
    private readonly autoDismiss: boolean,
  ) {
    this.#done = new Promise((resolve) => (this.#resolveDone = resolve));
  }

  /** The current status. */
  get status(): JobStatus {
    return this.#status;
  }

  /** True once cancel was called. */
  get cancelled(): boolean {
    return this.#cancelled;
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
    const ev: JobEvent = { id: this.id, type: this.type, status: to };
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
    this.#pauseCount++;
  }

  /**
   * Undoes one pause; the job runs on when none is left. EINVAL when it was not paused.
   * @locking global-state
   */
  resume(bql: Bql): void {
    assertBql(bql, 'job-resume');
    if (this.#pauseCount === 0) throw new BlockError('EINVAL', `Job '${this.id}' is not paused`, { op: 'job-resume' });
    this.#pauseCount--;
    if (this.#pauseCount === 0) this.#wakeUp?.();
  }

  /**
   * Cancels the job: its body stops at the next pause point and the job aborts (images keep
   * what the guest sees). A paused job is woken to do so.
   * @locking global-state
   */
  cancel(bql: Bql): void {
    assertBql(bql, 'job-cancel');
    this.#refuseFinished('cancel');
    this.#cancelled = true;
    this.#wakeUp?.();
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
    const bql = await acquireBql();
    try {
      if (failure === null && !this.#cancelled) {
        this.#transition('waiting');
        this.#transition('pending');
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
  if (jobs.has(id)) throw new BlockError('EBUSY', `Job ID '${id}' already in use`, { op: 'job-start', field: 'job-id', value: id });
  const nodes = opts.nodes ?? [];
  for (const node of nodes) {
    const other = busy.get(node);
    if (other !== undefined) {
      throw new BlockError('EBUSY', `Node '${node.nodeName}' is busy: block device is in use by block job: ${other.type}`, { node: node.nodeName, op: 'job-start' });
    }
  }
  const job = new Job(id, type, driver, opts.autoDismiss ?? true);
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

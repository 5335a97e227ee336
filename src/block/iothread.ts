/**
 * IOThreads: worker threads (a piscina pool of one worker each) that run the blocking transfers
 * off the main loop, as QEMU's IOThreads and thread pool do.
 *
 * Submitting (`submit*`) is I/O code: any request may call it alongside others. Creating and
 * destroying IOThreads is global state (BQL). The design that keeps a 4 KiB request cheap:
 * - requests travel through a ring in shared memory (iothread-ring.js), not through messages: the
 *   main loop writes a descriptor and publishes it with one atomic store; the worker writes the
 *   result in place and publishes it the same way. Nothing is serialised or allocated per request;
 * - both sides poll before they sleep, as QEMU's IOThreads do (`poll-max-ns`): the worker keeps
 *   polling for new requests for the poll window after the last one (then sleeps on the ring,
 *   then gives its thread back to piscina), and the main loop polls for
 *   the completion of what it has just published (adaptively: after a poll that comes back empty
 *   it stops polling for a while, and it never polls for more than a bounded time per turn of the
 *   event loop, so timers and I/O callbacks still run). A wake-up across threads costs tens of µs
 *   on a small VM; a 4 KiB read from the page cache costs two;
 * - data in SharedArrayBuffer memory (guest RAM, the benchmarks' buffers) is moved by the worker
 *   directly, without a copy; each SharedArrayBuffer is sent to the worker once (a registered
 *   region) and named by id after. Ordinary buffers go through a pooled staging area: one copy
 *   each way.
 * Requests to one worker run in submission order.
 */
import os from 'node:os';
import { MessageChannel, type MessagePort } from 'node:worker_threads';
import { createRequire } from 'node:module';
import type { Piscina } from 'piscina';
import { assertBql, type Bql } from './bql.js';
import { BlockError, codeForErrno } from './errors.js';
import { mainTurnBudgetLeft } from './main-turn.js';
import {
  CTL_BYTES,
  CTL_DONE,
  CTL_HEAD,
  CTL_MAIN_WAITING,
  CTL_REGION_SEQ,
  CTL_STOP,
  CTL_WORKER_STATE,
  DEFAULT_POLL_MAX_NS,
  OP_FDATASYNC,
  OP_READ,
  OP_TRUNCATE,
  OP_WRITE,
  OP_WRITE_ZEROES,
  RING_SLOTS,
  SLOT_BUF_OFFSET,
  SLOT_FD,
  SLOT_LENGTH,
  SLOT_OP,
  SLOT_POSITION,
  SLOT_REGION,
  SLOT_RESULT,
  SLOT_STRIDE,
  WORKER_CLAIMED,
  WORKER_IDLE,
  WORKER_SLEEPING,
  pollWhileEqual,
} from './iothread-ring.js';

/** piscina is loaded on the first IOThread: one-shot tools that never start one skip its load time. */
let piscinaClass: typeof Piscina | null = null;
function loadPiscina(): typeof Piscina {
  if (piscinaClass === null) {
    const mod = createRequire(import.meta.url)('piscina') as { Piscina: typeof Piscina };
    piscinaClass = mod.Piscina;
  }
  return piscinaClass;
}

/** Most bytes of staging areas a worker keeps for reuse. */
const STAGING_POOL_BYTES = 32 * 1024 * 1024;
/** Submissions after an empty main-loop poll during which the main loop does not poll. */
const MAIN_POLL_BACKOFF = 16;
/**
 * Requests above this size are not polled for (a copy that long outlasts the poll window), nor
 * are flushes and truncations: while one is in the ring the main loop goes straight to waiting,
 * and its miss does not stop the polling for the small requests after it.
 */
const POLL_MAX_BYTES = 256 * 1024;

/**
 * Requests and bytes a default-pool worker holds before the next worker takes new ones. One
 * polling worker serves small requests from the page cache best (two would compete with the main
 * loop for the cores); more join when requests queue up behind slow transfers, or when large
 * transfers (copies that keep a core busy) are pending.
 */
const SPILL_PENDING = 64;
const SPILL_BYTES = 2 * 1024 * 1024;

const WORKER_URL = new URL('./iothread-worker.js', import.meta.url);

/** The task that serves a ring (see iothread-worker.js). */
interface ServeTask {
  ctl: SharedArrayBuffer;
  ops: SharedArrayBuffer;
  port: MessagePort | null;
  pollMaxNs: number;
}

/** A staging area for ordinary buffers: a registered SharedArrayBuffer and its view. */
interface StagingArea {
  sab: SharedArrayBuffer;
  bytes: Uint8Array;
}

/** One ring slot's completion: preallocated and reused. */
class Completion {
  resolve: ((n: number) => void) | null = null;
  reject: ((e: BlockError) => void) | null = null;
  /** For staged reads: where the bytes go when the request completes. */
  target: Uint8Array | null = null;
  staging: StagingArea | null = null;
  what = '';
  /** Bytes the request moves (counted in IoWorker.pendingBytes). */
  length = 0;
  /** Not worth polling for (counted in IoWorker.slowPending). */
  slow = false;
  /** The file a write goes to (counted in IoWorker.writesByFd), -1 for other requests. */
  writeFd = -1;
}

/** A request waiting for a free ring slot. */
interface Overflow {
  op: number;
  fd: number;
  buf: Uint8Array | null;
  length: number;
  position: number;
  what: string;
  resolve: (n: number) => void;
  reject: (e: BlockError) => void;
}

/** Settlement functions of the promise being built: set by promiseExecutor, read right after. */
let newResolve: ((n: number) => void) | null = null;
let newReject: ((e: BlockError) => void) | null = null;
const promiseExecutor = (resolve: (n: number) => void, reject: (e: BlockError) => void): void => {
  newResolve = resolve;
  newReject = reject;
};


/** Options of a worker: how long each side polls before it sleeps (0: never polls). */
export interface IOThreadOptions {
  /** Nanoseconds to poll before sleeping, QEMU's `poll-max-ns` (default 32768). */
  pollMaxNs?: number;
}

/** One worker thread with its request ring and its registered memory regions. */
class IoWorker {
  private readonly pool: Piscina<ServeTask, void>;
  private readonly ctl = new Int32Array(new SharedArrayBuffer(CTL_BYTES));
  private readonly ops = new Float64Array(new SharedArrayBuffer(RING_SLOTS * SLOT_STRIDE * 8));
  private readonly slots: Completion[] = Array.from({ length: RING_SLOTS }, () => new Completion());
  private readonly overflow: Overflow[] = [];
  private port: MessagePort;
  /** Port to send with the next serve task (the first one only). */
  private portToSend: MessagePort | null;
  private head = 0;
  private published = 0;
  private seen = 0;
  private flushQueued = false;
  private waiting = false;
  private pollBackoff = 0;
  /** Requests in the ring not worth polling for (completions come in order, so none is while one is there). */
  private slowPending = 0;
  /** The worker's poll window (ns) before it sleeps. */
  readonly pollMaxNs: number;
  /** Free staging areas by size: reused so that a request allocates (and zero-fills) none. */
  private readonly stagingPool = new Map<number, StagingArea[]>();
  private stagingPooledBytes = 0;
  private regionIds = new WeakMap<SharedArrayBuffer, number>();
  private nextRegionId = 1;
  private newRegions: Array<[number, SharedArrayBuffer]> = [];
  private deadRegions: number[] = [];
  private readonly finalizer = new FinalizationRegistry<number>((id) => this.deadRegions.push(id));
  private serving: Promise<unknown> = Promise.resolve();
  /**
   * Ref'd while a request is pending, so the process waits for its completion (the port that
   * brings the wake-up is unref'd, and a serve task may return between requests).
   */
  private readonly keepAlive = setInterval(() => undefined, 1 << 30).unref();
  /** Requests submitted and not yet completed. */
  pending = 0;
  /** Bytes those requests move. */
  pendingBytes = 0;
  /** Pending writes (and write-zeroes) by file descriptor: writes to one file stay on one worker. */
  private readonly writesByFd = new Map<number, number>();
  private closed = false;
  private idleWaiters: Array<() => void> = [];

  constructor(
    readonly label: string,
    options: IOThreadOptions = {},
  ) {
    this.pollMaxNs = options.pollMaxNs ?? DEFAULT_POLL_MAX_NS;
    const PiscinaClass = loadPiscina();
    this.pool = new PiscinaClass<ServeTask, void>({
      filename: WORKER_URL.href,
      minThreads: 1,
      maxThreads: 1,
      concurrentTasksPerWorker: 1,
      idleTimeout: Infinity,
      name: 'default',
    });
    const channel = new MessageChannel();
    this.port = channel.port1;
    this.port.on('message', this.onWake);
    this.port.unref();
    this.portToSend = channel.port2;
  }

  submit(op: number, fd: number, buf: Uint8Array | null, length: number, position: number, what: string): Promise<number> {
    if (this.closed) {
      return Promise.reject(new BlockError('EIO', `${what}: IOThread '${this.label}' is shut down`, { op: what }));
    }
    // a zero-length transfer moves nothing: complete it here rather than stage an empty buffer
    if (length === 0 && (op === OP_READ || op === OP_WRITE || op === OP_WRITE_ZEROES)) return Promise.resolve(0);
    const promise = new Promise<number>(promiseExecutor);
    const resolve = newResolve as (n: number) => void;
    const reject = newReject as (e: BlockError) => void;
    if (this.pending++ === 0) this.keepAlive.ref();
    this.pendingBytes += length;
    if (op === OP_WRITE || op === OP_WRITE_ZEROES) this.writesByFd.set(fd, (this.writesByFd.get(fd) ?? 0) + 1);
    if (this.overflow.length > 0 || this.head - this.seen === RING_SLOTS) {
      this.overflow.push({ op, fd, buf, length, position, what, resolve, reject });
    } else {
      this.fillSlot(op, fd, buf, length, position, what, resolve, reject);
    }
    if (!this.flushQueued) {
      this.flushQueued = true;
      queueMicrotask(this.flush);
    }
    return promise;
  }

  /** Whether writes to `fd` are pending on this worker. */
  hasWritesTo(fd: number): boolean {
    return this.writesByFd.has(fd);
  }

  private writeDone(fd: number): void {
    const n = (this.writesByFd.get(fd) ?? 1) - 1;
    if (n > 0) this.writesByFd.set(fd, n);
    else this.writesByFd.delete(fd);
  }

  /** Resolves when nothing is pending on this worker. */
  whenIdle(): Promise<void> {
    if (this.pending === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  /** Test hook: terminates the worker thread as a crash would (see src/testing.ts). */
  async terminateForTesting(): Promise<void> {
    await Promise.all(this.pool.threads.map((w) => w.terminate()));
  }

  async close(): Promise<void> {
    this.closed = true;
    await this.whenIdle();
    Atomics.store(this.ctl, CTL_STOP, 1);
    Atomics.notify(this.ctl, CTL_HEAD);
    clearInterval(this.keepAlive);
    await this.serving;
    this.port.close();
    this.portToSend?.close();
    await this.pool.close();
  }

  private fillSlot(
    op: number,
    fd: number,
    buf: Uint8Array | null,
    length: number,
    position: number,
    what: string,
    resolve: (n: number) => void,
    reject: (e: BlockError) => void,
  ): void {
    const slot = this.head & (RING_SLOTS - 1);
    const s = slot * SLOT_STRIDE;
    const ops = this.ops;
    const c = this.slots[slot] as Completion;
    ops[s + SLOT_OP] = op;
    ops[s + SLOT_FD] = fd;
    ops[s + SLOT_LENGTH] = length;
    ops[s + SLOT_POSITION] = position;
    ops[s + SLOT_RESULT] = 0;
    if (buf === null) {
      ops[s + SLOT_REGION] = -1;
      ops[s + SLOT_BUF_OFFSET] = 0;
    } else if (buf.buffer instanceof SharedArrayBuffer) {
      ops[s + SLOT_REGION] = this.regionId(buf.buffer);
      ops[s + SLOT_BUF_OFFSET] = buf.byteOffset;
    } else {
      const area = this.takeStaging(length);
      ops[s + SLOT_REGION] = this.regionId(area.sab);
      ops[s + SLOT_BUF_OFFSET] = 0;
      if (op === OP_WRITE) area.bytes.set(buf);
      else c.target = buf;
      c.staging = area;
    }
    c.resolve = resolve;
    c.reject = reject;
    c.what = what;
    c.length = length;
    c.slow = op === OP_FDATASYNC || op === OP_TRUNCATE || length > POLL_MAX_BYTES;
    c.writeFd = op === OP_WRITE || op === OP_WRITE_ZEROES ? fd : -1;
    if (c.slow) this.slowPending++;
    this.head = (this.head + 1) | 0;
  }

  /** Publishes what was submitted since the last flush, then polls for its completion. */
  private readonly flush = (): void => {
    this.flushQueued = false;
    if (this.head === this.published) return;
    if (this.newRegions.length > 0 || this.deadRegions.length > 0) {
      this.port.postMessage({ add: this.newRegions, drop: this.deadRegions });
      this.newRegions = [];
      this.deadRegions = [];
      Atomics.add(this.ctl, CTL_REGION_SEQ, 1);
    }
    this.published = this.head;
    Atomics.store(this.ctl, CTL_HEAD, this.head);
    // a worker that must first be woken or started answers later than a poll waits: no poll
    // then, and no back-off either, since the miss would say nothing about the requests
    const state = Atomics.load(this.ctl, CTL_WORKER_STATE);
    let awake = true;
    if (state === WORKER_SLEEPING) {
      Atomics.notify(this.ctl, CTL_HEAD, 1);
      awake = false;
    } else if (state === WORKER_IDLE) {
      this.startServing();
      awake = false;
    }
    if (awake && this.slowPending === 0 && this.mayPoll()) {
      if (pollWhileEqual(this.ctl, CTL_DONE, this.seen, this.pollMaxNs)) this.harvest();
      else this.pollBackoff = MAIN_POLL_BACKOFF;
    }
    if (this.seen !== this.head && !this.waiting) this.waitForCompletions();
  };

  /** Whether the main loop may poll now: polling is on, not backing off, and this turn's budget is left. */
  private mayPoll(): boolean {
    if (this.pollMaxNs <= 0) return false;
    if (this.pollBackoff > 0) {
      this.pollBackoff--;
      return false;
    }
    // the budget is the main loop's (main-turn.ts): collecting completions by polling and reads
    // done inline share it, so timers and I/O callbacks are not starved by a fast request loop
    return mainTurnBudgetLeft();
  }

  /** Starts a serve task unless one serves the ring already (see WORKER_STATE in iothread-ring.js). */
  private startServing(): void {
    if (Atomics.compareExchange(this.ctl, CTL_WORKER_STATE, WORKER_IDLE, WORKER_CLAIMED) !== WORKER_IDLE) return;
    const port = this.portToSend;
    this.portToSend = null;
    const task: ServeTask = { ctl: this.ctl.buffer as SharedArrayBuffer, ops: this.ops.buffer as SharedArrayBuffer, port, pollMaxNs: this.pollMaxNs };
    this.serving = this.pool.run(task, port === null ? {} : { transferList: [port] }).then(
      () => undefined,
      (e: unknown) => this.fail(e),
    );
  }

  /** Asks the worker for a wake-up (a message on the port) on its next completion. */
  private waitForCompletions(): void {
    this.waiting = true;
    Atomics.store(this.ctl, CTL_MAIN_WAITING, 1);
    // a completion stored before the flag was set would post nothing: look once more, and yield
    // to the event loop first when this turn has run long
    if (Atomics.load(this.ctl, CTL_DONE) !== this.seen && Atomics.exchange(this.ctl, CTL_MAIN_WAITING, 0) !== 0) {
      if (mainTurnBudgetLeft()) queueMicrotask(this.onWake);
      else setImmediate(this.onWake);
    }
  }

  private readonly onWake = (): void => {
    if (!this.waiting) return;
    this.waiting = false;
    this.harvest();
    if (this.seen !== this.head) this.waitForCompletions();
  };

  /** Settles every completed request, in order, and moves waiting requests into the freed slots. */
  private harvest(): void {
    const done = Atomics.load(this.ctl, CTL_DONE);
    const ops = this.ops;
    while (this.seen !== done) {
      const slot = this.seen & (RING_SLOTS - 1);
      const c = this.slots[slot] as Completion;
      const result = ops[slot * SLOT_STRIDE + SLOT_RESULT] ?? -5;
      this.seen = (this.seen + 1) | 0;
      this.settle(c, result, null);
    }
    this.afterSettle();
  }

  private settle(c: Completion, result: number, failure: unknown): void {
    const { resolve, reject, target, staging, what } = c;
    c.resolve = null;
    c.reject = null;
    c.target = null;
    c.staging = null;
    this.pending--;
    this.pendingBytes -= c.length;
    if (c.slow) this.slowPending--;
    if (c.writeFd >= 0) {
      this.writeDone(c.writeFd);
      c.writeFd = -1;
    }
    if (result < 0) {
      const code = codeForErrno(result); // the mapping aio=sync uses too (errors.ts)
      const why = failure instanceof Error ? failure.message : `errno ${-result}`;
      reject?.(new BlockError(code, `${what}: ${code} (${why})`, { op: what, cause: failure ?? undefined }));
    } else {
      if (target !== null && staging !== null) target.set(staging.bytes.subarray(0, target.length));
      resolve?.(result);
    }
    if (staging !== null) this.returnStaging(staging);
  }

  private afterSettle(): void {
    while (this.overflow.length > 0 && this.head - this.seen < RING_SLOTS) {
      const o = this.overflow.shift() as Overflow;
      this.fillSlot(o.op, o.fd, o.buf, o.length, o.position, o.what, o.resolve, o.reject);
      if (!this.flushQueued) {
        this.flushQueued = true;
        queueMicrotask(this.flush);
      }
    }
    if (this.pending === 0) {
      this.keepAlive.unref();
      if (this.idleWaiters.length > 0) for (const w of this.idleWaiters.splice(0)) w();
    }
  }

  /**
   * The serve task failed (its worker died): what it completed settles normally, the rest of the
   * ring and the waiting requests fail with EIO, and the ring starts over on a fresh channel (a
   * new worker knows no region), so later requests are served again.
   */
  private fail(e: unknown): void {
    const lost = this.overflow.splice(0); // taken first, so that harvest does not move them into the dead ring
    this.harvest();
    while (this.seen !== this.head) {
      const slot = this.seen & (RING_SLOTS - 1);
      this.seen = (this.seen + 1) | 0;
      this.settle(this.slots[slot] as Completion, -5, e);
    }
    this.ctl.fill(0);
    this.head = this.published = this.seen = 0;
    this.waiting = false;
    this.port.close();
    const channel = new MessageChannel();
    this.port = channel.port1;
    this.port.on('message', this.onWake);
    this.port.unref();
    this.portToSend = channel.port2;
    this.regionIds = new WeakMap();
    this.newRegions = [];
    this.deadRegions = [];
    for (const o of lost) {
      this.pending--;
      this.pendingBytes -= o.length;
      if (o.op === OP_WRITE || o.op === OP_WRITE_ZEROES) this.writeDone(o.fd);
      o.reject(new BlockError('EIO', `${o.what}: EIO (the I/O worker of '${this.label}' failed)`, { op: o.what, cause: e }));
    }
    this.afterSettle();
  }

  private regionId(sab: SharedArrayBuffer): number {
    let id = this.regionIds.get(sab);
    if (id === undefined) {
      id = this.nextRegionId++;
      this.regionIds.set(sab, id);
      this.finalizer.register(sab, id);
      this.newRegions.push([id, sab]);
    }
    return id;
  }

  /** A staging area of at least `bytes` bytes: a pooled one when free, else a new one (power-of-two size). */
  private takeStaging(bytes: number): StagingArea {
    let size = 4096;
    while (size < bytes) size *= 2;
    const area = this.stagingPool.get(size)?.pop();
    if (area !== undefined) {
      this.stagingPooledBytes -= size;
      return area;
    }
    const sab = new SharedArrayBuffer(size);
    return { sab, bytes: new Uint8Array(sab) };
  }

  /** Keeps a staging area for a later request (up to STAGING_POOL_BYTES in all). */
  private returnStaging(area: StagingArea): void {
    const size = area.sab.byteLength;
    if (this.stagingPooledBytes + size > STAGING_POOL_BYTES) return;
    let list = this.stagingPool.get(size);
    if (list === undefined) {
      list = [];
      this.stagingPool.set(size, list);
    }
    list.push(area);
    this.stagingPooledBytes += size;
  }
}

/**
 * Terminates the worker thread of `t` as a crash would: its in-flight requests fail with EIO and
 * later ones run on a new worker. For tests only (exported through src/testing.ts).
 * @locking common
 */
export async function crashIOThreadForTesting(t: IOThread): Promise<void> {
  await t.worker.terminateForTesting();
}

/** A named IOThread: one worker thread that runs the transfers of the nodes bound to it. */
export class IOThread {
  /** @internal */
  readonly worker: IoWorker;

  constructor(
    readonly id: string,
    options: IOThreadOptions = {},
  ) {
    this.worker = new IoWorker(id, options);
  }

  /** Requests submitted to this IOThread and not yet completed. */
  get pending(): number {
    return this.worker.pending;
  }

  /** How long (ns) its worker polls for work before it sleeps (QEMU's poll-max-ns). */
  get pollMaxNs(): number {
    return this.worker.pollMaxNs;
  }
}

const iothreads = new Map<string, IOThread>();
/** The main loop's own pool, for nodes bound to no IOThread (QEMU's default thread pool). */
let defaultPool: IoWorker[] | null = null;

/**
 * Creates the IOThread `id` (QEMU's `-object iothread,id=ID[,poll-max-ns=N]`); EINVAL if it
 * exists or the poll window is not a non-negative integer.
 * @locking global-state
 */
export function createIOThread(bql: Bql, id: string, options: IOThreadOptions = {}): IOThread {
  assertBql(bql, 'createIOThread');
  if (!/^[A-Za-z][A-Za-z0-9_.-]*$/.test(id)) {
    throw new BlockError('EINVAL', `Invalid IOThread id '${id}': it must start with a letter and hold letters, digits, '-', '.', '_'`, {
      field: 'id',
      value: id,
    });
  }
  if (iothreads.has(id)) throw new BlockError('EINVAL', `IOThread '${id}' already exists`, { field: 'id', value: id });
  const poll = options.pollMaxNs;
  if (poll !== undefined && !(Number.isSafeInteger(poll) && poll >= 0)) {
    throw new BlockError('EINVAL', `IOThread '${id}': poll-max-ns must be a non-negative integer, not ${poll}`, { field: 'poll-max-ns', value: String(poll) });
  }
  const t = new IOThread(id, options);
  iothreads.set(id, t);
  return t;
}

/**
 * Finds the IOThread `id`; ENOENT if there is none.
 * @locking global-state
 */
export function findIOThread(bql: Bql, id: string): IOThread {
  assertBql(bql, 'findIOThread');
  const t = iothreads.get(id);
  if (t === undefined) throw new BlockError('ENOENT', `IOThread '${id}' does not exist`, { field: 'iothread', value: id });
  return t;
}

/**
 * Every IOThread, in creation order.
 * @locking global-state
 */
export function listIOThreads(bql: Bql): IOThread[] {
  assertBql(bql, 'listIOThreads');
  return [...iothreads.values()];
}

/**
 * Stops the IOThread `t` after its pending requests complete. The caller must have closed or
 * moved the nodes bound to it.
 * @locking global-state
 */
export async function destroyIOThread(bql: Bql, t: IOThread): Promise<void> {
  assertBql(bql, 'destroyIOThread');
  iothreads.delete(t.id);
  await t.worker.close();
}

/**
 * Stops every IOThread and the default pool once their pending requests complete: no completion
 * is lost and no worker is left behind. Idempotent; new submissions afterwards restart the pool.
 * The IOThread table is global state: the caller holds the BQL.
 * @locking global-state
 */
export async function shutdownIOThreads(bql: Bql): Promise<void> {
  assertBql(bql, 'shutdownIOThreads');
  const workers = [...iothreads.values()].map((t) => t.worker);
  iothreads.clear();
  if (defaultPool !== null) workers.push(...defaultPool);
  defaultPool = null;
  await Promise.all(workers.map((w) => w.close()));
}

function pickWorker(t: IOThread | null): IoWorker {
  if (t !== null) return t.worker;
  if (defaultPool === null) {
    const n = Math.max(1, Math.min(4, os.availableParallelism()));
    defaultPool = Array.from({ length: n }, (_, i) => new IoWorker(`main-loop pool #${i}`));
  }
  return spillTarget(defaultPool);
}

/**
 * The default-pool worker for a write to `fd`: the one that has writes to the same file pending,
 * if any. Buffered writes to one file take its inode lock in turn (ext4, xfs): two workers writing
 * one file spin and sleep on that lock instead of copying (io_uring serialises them the same way,
 * by hashing buffered writes to one inode onto one of its workers).
 */
function pickWriteWorker(t: IOThread | null, fd: number): IoWorker {
  if (t !== null) return t.worker;
  if (defaultPool !== null) for (const w of defaultPool) if (w.hasWritesTo(fd)) return w;
  return pickWorker(null);
}

/** The pool worker for the next request (see SPILL_PENDING). */
function spillTarget(pool: IoWorker[]): IoWorker {
  // the first worker below both spill limits, else the one with the fewest bytes pending: a light
  // load stays on one warm, polling worker; the next one joins when requests queue up
  let best = pool[0] as IoWorker;
  for (const w of pool) {
    if (w.pending < SPILL_PENDING && w.pendingBytes < SPILL_BYTES) return w;
    if (w.pendingBytes < best.pendingBytes) best = w;
  }
  return best;
}

/**
 * Reads `buf.length` bytes at `position` of `fd` into `buf` on the thread `t` (null: default pool).
 * Bytes past the end of the file read as zeros.
 * @locking io
 */
export function submitRead(t: IOThread | null, fd: number, buf: Uint8Array, position: number, what: string): Promise<number> {
  return pickWorker(t).submit(OP_READ, fd, buf, buf.length, position, what);
}

/**
 * Writes `buf` at `position` of `fd` on the thread `t`.
 * @locking io
 */
export function submitWrite(t: IOThread | null, fd: number, buf: Uint8Array, position: number, what: string): Promise<number> {
  return pickWriteWorker(t, fd).submit(OP_WRITE, fd, buf, buf.length, position, what);
}

/**
 * Writes `length` zero bytes at `position` of `fd` on the thread `t`.
 * @locking io
 */
export function submitWriteZeroes(t: IOThread | null, fd: number, length: number, position: number, what: string): Promise<number> {
  return pickWriteWorker(t, fd).submit(OP_WRITE_ZEROES, fd, null, length, position, what);
}

/**
 * fdatasync(fd) on the thread `t`.
 * @locking io
 */
export function submitFlush(t: IOThread | null, fd: number, what: string): Promise<number> {
  return pickWorker(t).submit(OP_FDATASYNC, fd, null, 0, 0, what);
}

/**
 * ftruncate(fd, size) on the thread `t`.
 * @locking io
 */
export function submitTruncate(t: IOThread | null, fd: number, sizeBytes: number, what: string): Promise<number> {
  return pickWorker(t).submit(OP_TRUNCATE, fd, null, 0, sizeBytes, what);
}

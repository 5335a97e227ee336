/**
 * IOThreads: worker threads (a piscina pool each) that run the blocking transfers off the main
 * loop, as QEMU's IOThreads and thread pool do.
 *
 * Submitting (`submit*`) is I/O code: any request may call it alongside others. Creating and
 * destroying IOThreads is global state (BQL). The design that keeps a 4 KiB request cheap:
 * - submissions made while a batch is already at the worker accumulate into the next batch, and
 *   one batch carries up to MAX_BATCH requests (QEMU's plug/unplug): one message round trip is
 *   shared by every request of the batch, and the worker does the transfers back to back;
 * - descriptors live in a reused SharedArrayBuffer: the worker writes each result in place, so a
 *   completion costs no serialisation;
 * - data in SharedArrayBuffer memory (guest RAM) is moved by the worker directly, without a copy;
 *   the SharedArrayBuffer is sent to the worker once (a registered region) and named by id after.
 *   Ordinary (non-shared) buffers go through a staging area: one copy each way.
 * A worker runs its batches in order, so requests to one IOThread execute in submission order.
 */
import os from 'node:os';
import { createRequire } from 'node:module';
import type { Piscina } from 'piscina';

/** piscina is loaded on the first IOThread: one-shot tools that never start one skip its load time. */
let piscinaClass: typeof Piscina | null = null;
function loadPiscina(): typeof Piscina {
  if (piscinaClass === null) {
    const mod = createRequire(import.meta.url)('piscina') as { Piscina: typeof Piscina };
    piscinaClass = mod.Piscina;
  }
  return piscinaClass;
}
import { assertBql, type Bql } from './bql.js';
import { BlockError, ERROR_CODES, type ErrorCode } from './errors.js';

const OPS_STRIDE = 7;
/** Most bytes of staging areas an IOThread keeps for reuse. */
const STAGING_POOL_BYTES = 32 * 1024 * 1024;
const OP_READ = 1;
const OP_WRITE = 2;
const OP_WRITE_ZEROES = 3;
const OP_FDATASYNC = 4;
const OP_TRUNCATE = 5;
const RESULT = 6;
/** Requests per batch: bounds the descriptor memory and the latency of the last request. */
const MAX_BATCH = 64;
/** Batches a worker may hold at once (one running, one waiting at the worker). */
const MAX_OUTSTANDING = 2;

const WORKER_URL = new URL('./iothread-worker.js', import.meta.url);

interface BatchMessage {
  ops: Float64Array;
  count: number;
  staging: SharedArrayBuffer | null;
  newRegions: Array<[number, SharedArrayBuffer]> | null;
  deadRegions: number[] | null;
}

/** One request's completion: resolve with the byte count or reject with a typed error. */
interface Completion {
  resolve: (n: number) => void;
  reject: (e: BlockError) => void;
  /** For staged reads: where the bytes go when the request completes. */
  target: Uint8Array | null;
  stagingOffset: number;
  what: string;
}

/** A batch being filled or in flight; reused through a free list. */
class Batch {
  readonly ops = new Float64Array(new SharedArrayBuffer(MAX_BATCH * OPS_STRIDE * 8));
  readonly completions: Completion[] = [];
  count = 0;
  stagingBytes = 0;
  /** Non-shared buffers to copy into staging before sending (writes). */
  readonly stagedWrites: Array<{ src: Uint8Array; offset: number }> = [];
  newRegions: Array<[number, SharedArrayBuffer]> | null = null;

  reset(): void {
    this.count = 0;
    this.stagingBytes = 0;
    this.completions.length = 0;
    this.stagedWrites.length = 0;
    this.newRegions = null;
  }
}

const errnoToCode = new Map<number, ErrorCode>(Object.entries(ERROR_CODES).map(([k, v]) => [v, k as ErrorCode]));

/** One worker thread with its batches and its registered memory regions. */
class IoWorker {
  private readonly pool: Piscina<BatchMessage, number>;
  /** Free staging areas by size: reused so that a batch allocates (and zero-fills) none. */
  private readonly stagingPool = new Map<number, SharedArrayBuffer[]>();
  private stagingPooledBytes = 0;
  private readonly regionIds = new WeakMap<SharedArrayBuffer, number>();
  private nextRegionId = 1;
  private readonly deadRegions: number[] = [];
  private readonly finalizer = new FinalizationRegistry<number>((id) => this.deadRegions.push(id));
  private readonly freeBatches: Batch[] = [];
  private filling: Batch | null = null;
  private outstanding = 0;
  private flushQueued = false;
  /** Requests submitted and not yet completed. */
  pending = 0;
  private closed = false;
  private idleWaiters: Array<() => void> = [];

  constructor(readonly label: string) {
    const PiscinaClass = loadPiscina();
    this.pool = new PiscinaClass<BatchMessage, number>({
      filename: WORKER_URL.href,
      minThreads: 1,
      maxThreads: 1,
      concurrentTasksPerWorker: MAX_OUTSTANDING,
      idleTimeout: Infinity,
      name: 'default',
    });
  }

  submit(op: number, fd: number, buf: Uint8Array | null, length: number, position: number, what: string): Promise<number> {
    if (this.closed) {
      return Promise.reject(new BlockError('EIO', `${what}: IOThread '${this.label}' is shut down`, { op: what }));
    }
    // a zero-length transfer moves nothing: complete it here rather than stage an empty buffer
    if (length === 0 && (op === OP_READ || op === OP_WRITE || op === OP_WRITE_ZEROES)) return Promise.resolve(0);
    let batch = this.filling;
    if (batch === null || batch.count === MAX_BATCH) {
      if (batch !== null) this.sendOrQueue();
      batch = this.freeBatches.pop() ?? new Batch();
      this.filling = batch;
    }
    const base = batch.count * OPS_STRIDE;
    const ops = batch.ops;
    ops[base] = op;
    ops[base + 1] = fd;
    ops[base + 4] = length;
    ops[base + 5] = position;
    ops[base + RESULT] = 0;
    let target: Uint8Array | null = null;
    let stagingOffset = 0;
    if (buf === null) {
      ops[base + 2] = -1;
      ops[base + 3] = 0;
    } else if (buf.buffer instanceof SharedArrayBuffer) {
      ops[base + 2] = this.regionId(batch, buf.buffer);
      ops[base + 3] = buf.byteOffset;
    } else {
      stagingOffset = batch.stagingBytes;
      batch.stagingBytes += length + ((8 - (length % 8)) % 8); // 8-byte aligned, safe above 2 GiB
      ops[base + 2] = -1;
      ops[base + 3] = stagingOffset;
      if (op === OP_WRITE) batch.stagedWrites.push({ src: buf, offset: stagingOffset });
      else target = buf;
    }
    batch.count++;
    this.pending++;
    return new Promise<number>((resolve, reject) => {
      batch.completions.push({ resolve, reject, target, stagingOffset, what });
      if (!this.flushQueued) {
        this.flushQueued = true;
        queueMicrotask(this.flushFromMicrotask);
      }
    });
  }

  /** Resolves when nothing is pending on this worker. */
  whenIdle(): Promise<void> {
    if (this.pending === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  async close(): Promise<void> {
    this.closed = true;
    await this.whenIdle();
    await this.pool.close();
  }

  private readonly flushFromMicrotask = (): void => {
    this.flushQueued = false;
    if (this.outstanding < MAX_OUTSTANDING) this.sendOrQueue();
  };

  private regionId(batch: Batch, sab: SharedArrayBuffer): number {
    let id = this.regionIds.get(sab);
    if (id === undefined) {
      id = this.nextRegionId++;
      this.regionIds.set(sab, id);
      this.finalizer.register(sab, id);
      (batch.newRegions ??= []).push([id, sab]);
    }
    return id;
  }

  /** Sends the filling batch if the worker has room; otherwise it keeps filling until a batch returns. */
  private sendOrQueue(): void {
    const batch = this.filling;
    if (batch === null || batch.count === 0) return;
    if (this.outstanding >= MAX_OUTSTANDING && batch.count < MAX_BATCH) return;
    this.filling = null;
    this.outstanding++;
    let staging: SharedArrayBuffer | null = null;
    if (batch.stagingBytes > 0) {
      staging = this.takeStaging(batch.stagingBytes);
      const view = new Uint8Array(staging);
      for (const w of batch.stagedWrites) view.set(w.src, w.offset);
    }
    const dead = this.deadRegions.length > 0 ? this.deadRegions.splice(0) : null;
    const msg: BatchMessage = { ops: batch.ops, count: batch.count, staging, newRegions: batch.newRegions, deadRegions: dead };
    this.pool.run(msg).then(
      () => this.complete(batch, staging, null),
      (e: unknown) => this.complete(batch, staging, e),
    );
  }

  /** A staging area of at least `bytes` bytes: a pooled one when free, else a new one (power-of-two size). */
  private takeStaging(bytes: number): SharedArrayBuffer {
    let size = 4096;
    while (size < bytes) size *= 2;
    const free = this.stagingPool.get(size);
    const sab = free?.pop();
    if (sab !== undefined) {
      this.stagingPooledBytes -= size;
      return sab;
    }
    return new SharedArrayBuffer(size);
  }

  /** Keeps a staging area for the next batch (up to STAGING_POOL_BYTES in all). */
  private returnStaging(sab: SharedArrayBuffer): void {
    const size = sab.byteLength;
    if (this.stagingPooledBytes + size > STAGING_POOL_BYTES) return;
    let list = this.stagingPool.get(size);
    if (list === undefined) {
      list = [];
      this.stagingPool.set(size, list);
    }
    list.push(sab);
    this.stagingPooledBytes += size;
  }

  private complete(batch: Batch, staging: SharedArrayBuffer | null, failure: unknown): void {
    this.outstanding--;
    const ops = batch.ops;
    const stagingView = staging === null ? null : new Uint8Array(staging);
    const n = batch.count;
    for (let i = 0; i < n; i++) {
      const c = batch.completions[i];
      if (c === undefined) continue;
      const result = failure === null ? (ops[i * OPS_STRIDE + RESULT] ?? -5) : -5;
      if (result < 0) {
        const code = errnoToCode.get(-result) ?? 'EIO';
        const why = failure instanceof Error ? failure.message : `errno ${-result}`;
        c.reject(new BlockError(code, `${c.what}: ${code} (${why})`, { op: c.what, cause: failure ?? undefined }));
      } else {
        if (c.target !== null && stagingView !== null) {
          c.target.set(stagingView.subarray(c.stagingOffset, c.stagingOffset + c.target.length));
        }
        c.resolve(result);
      }
    }
    if (staging !== null) this.returnStaging(staging);
    this.pending -= n;
    batch.reset();
    this.freeBatches.push(batch);
    if (this.pending === 0 && this.idleWaiters.length > 0) {
      for (const w of this.idleWaiters.splice(0)) w();
    }
    // what accumulated while the worker was busy goes now, as one batch
    if (this.filling !== null && this.filling.count > 0) this.sendOrQueue();
  }
}

/** A named IOThread: one worker thread that runs the transfers of the nodes bound to it. */
export class IOThread {
  /** @internal */
  readonly worker: IoWorker;

  constructor(readonly id: string) {
    this.worker = new IoWorker(id);
  }

  /** Requests submitted to this IOThread and not yet completed. */
  get pending(): number {
    return this.worker.pending;
  }
}

const iothreads = new Map<string, IOThread>();
/** The main loop's own pool, for nodes bound to no IOThread (QEMU's default thread pool). */
let defaultPool: IoWorker[] | null = null;

/**
 * Creates the IOThread `id` (QEMU's `-object iothread,id=ID`); EINVAL if it exists.
 * @locking global-state
 */
export function createIOThread(bql: Bql, id: string): IOThread {
  assertBql(bql, 'createIOThread');
  if (!/^[A-Za-z][A-Za-z0-9_.-]*$/.test(id)) {
    throw new BlockError('EINVAL', `Invalid IOThread id '${id}': it must start with a letter and hold letters, digits, '-', '.', '_'`, {
      field: 'id',
      value: id,
    });
  }
  if (iothreads.has(id)) throw new BlockError('EINVAL', `IOThread '${id}' already exists`, { field: 'id', value: id });
  const t = new IOThread(id);
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
 * @locking common
 */
export async function shutdownIOThreads(): Promise<void> {
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
  // the least busy worker; ties go to the first one, so that a light load (queue depth 1) keeps
  // one worker warm instead of waking every worker in turn (each wake-up costs tens of µs)
  let best = defaultPool[0] as IoWorker;
  for (const w of defaultPool) if (w.pending < best.pending) best = w;
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
  return pickWorker(t).submit(OP_WRITE, fd, buf, buf.length, position, what);
}

/**
 * Writes `length` zero bytes at `position` of `fd` on the thread `t`.
 * @locking io
 */
export function submitWriteZeroes(t: IOThread | null, fd: number, length: number, position: number, what: string): Promise<number> {
  return pickWorker(t).submit(OP_WRITE_ZEROES, fd, null, length, position, what);
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

/**
 * The easy entry point: open an image file (or a memory disk), read and write it, close it,
 * without knowing about nodes, backends, the BQL or drain. Each call takes the locks it needs.
 *
 * Use it from the main thread; concurrent reads and writes on one Image are allowed (they are
 * ordinary I/O requests), and `close` waits for the requests in flight.
 *
 * The calls that need the Big Lock (open, close, snapshots, info) take it themselves. Called by
 * code that already holds it (inside `withBql`), that would wait for ever, so they accept the
 * caller's proof instead (`openImage(f, { bql })`, `img.close(bql)`, ...), and a call that waits
 * for the lock longer than `bqlWaitMs` (default 5 s) fails with EBUSY saying so, instead of
 * hanging. Read and write requests never take the lock.
 */
import { blkDelete, blkFlush, blkGetLength, blkNew, blkPdiscard, blkPread, blkPwrite, blkPwriteZeroes, blkTruncate, type BlockBackend } from './block/backend.js';
import { aioWaitWhile } from './block/aio-wait.js';
import { acquireBql, assertBql, releaseBql, tryAcquireBql, type Bql } from './block/bql.js';
import { withDrained } from './block/drain.js';
import { BlockError } from './block/errors.js';
import { closeNode, openNode } from './block/graph.js';
import type { BlockNode } from './block/node.js';
import { parseOptions, type NodeOptions } from './block/options.js';
import { queryBlock, type BackendInfo } from './block/query.js';
import { findProtocolDriver, type SnapshotInfo, type WriteFlags } from './block/driver.js';
import { bdrvSnapshotCreate, bdrvSnapshotDelete, bdrvSnapshotGoto, bdrvSnapshotList, bdrvSnapshotLoadTmp } from './block/snapshot.js';
import './drivers/index.js';

/** How to open an image. */
export interface OpenImageOptions {
  /** Image format (`raw`); probed when absent. */
  format?: string;
  /** Open read-only. */
  readOnly?: boolean;
  /** Bind the image's transfers to this IOThread (create it with `createIOThread` first). */
  iothread?: string;
  /** Device name; `disk0`, `disk1`, ... when absent. */
  name?: string;
  /**
   * How a host file does its transfers: `threads` (default: on the IOThread pool, the main loop
   * stays free) or `sync` (blocking calls on the main loop: fastest for one-shot tools).
   */
  aio?: 'threads' | 'sync';
  /**
   * Share every permission with other users of the image (qemu-img's `-U` / `--force-share`);
   * only with `readOnly`.
   */
  forceShare?: boolean;
  /** QEMU's `locking` option of the file node: `auto` (default), `on`, `off`. */
  locking?: 'auto' | 'on' | 'off';
  /** Open the image without its backing file (qemu-img info's way: unallocated clusters read as zeros). */
  noBacking?: boolean;
  /**
   * More node options, QEMU-style (`{ 'backing.read-only': 'off' }`, `{ 'l2-cache-size': '4M' }`),
   * merged over the ones the other fields give.
   */
  nodeOptions?: NodeOptions;
  /** The caller's Big Lock, when it holds it (inside `withBql`): used instead of taking it. */
  bql?: Bql;
  /** How long a call waits for the Big Lock before it fails with EBUSY (default 5000 ms). */
  bqlWaitMs?: number;
}

/** How long the easy API waits for the Big Lock before it reports a likely deadlock. */
const DEFAULT_BQL_WAIT_MS = 5000;

/**
 * Runs `fn` with the Big Lock: the caller's proof when given, else the lock taken here, waiting
 * at most `waitMs` (EBUSY after that, naming the likely cause: a call made with the lock held).
 */
async function withEasyBql<T>(op: string, given: Bql | undefined, waitMs: number, fn: (bql: Bql) => Promise<T> | T): Promise<T> {
  if (given !== undefined) {
    assertBql(given, op);
    return fn(given);
  }
  let bql = tryAcquireBql();
  if (bql === null) {
    const pending = acquireBql();
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<null>((resolve) => {
      timer = setTimeout(() => resolve(null), waitMs);
    });
    const got = await Promise.race([pending, timeout]);
    clearTimeout(timer);
    if (got === null) {
      // the lock may still come: hand it straight on, so this abandoned wait blocks nobody
      void pending.then((b) => releaseBql(b));
      throw new BlockError(
        'EBUSY',
        `${op}: the Big Lock (BQL) is still held by someone else after ${waitMs} ms. The easy API takes the BQL itself; called inside withBql (or with a Bql held) it would wait for ever: pass that proof ({ bql } to openImage, or as the last argument of the Image method), or call it outside the locked section`,
        { op, field: 'bql' },
      );
    }
    bql = got;
  }
  try {
    return await fn(bql);
  } finally {
    releaseBql(bql);
  }
}

let imageCounter = 0;

/** An open image: a BlockBackend with friendly methods. */
export class Image {
  private closed = false;

  /** @internal use openImage */
  constructor(
    readonly backend: BlockBackend,
    private readonly bqlWaitMs: number = DEFAULT_BQL_WAIT_MS,
  ) {}

  /** Device name. */
  get name(): string {
    return this.backend.name;
  }

  /** Virtual size in bytes. */
  get size(): number {
    return blkGetLength(this.backend);
  }

  /** Reads `length` bytes at `offset` into a new buffer, or into `into` when given. */
  async read(offset: number, length: number, into?: Uint8Array): Promise<Uint8Array> {
    if (!Number.isSafeInteger(length) || length < 0) {
      const shown = typeof length === 'number' ? String(length) : describeType(length);
      throw new BlockError('EINVAL', `read on device '${this.name}': the length must be a non-negative integer (got ${shown})`, { node: this.name, op: 'read', field: 'length' });
    }
    if (into !== undefined && !(into instanceof Uint8Array)) {
      throw new BlockError('EINVAL', `read on device '${this.name}': the buffer must be a Uint8Array (got ${describeType(into)})`, { node: this.name, op: 'read', field: 'buffer' });
    }
    if (into === undefined && length > this.size) {
      // refused before a buffer of that size is allocated
      throw new BlockError('EINVAL', `read on device '${this.name}': invalid range of ${length} bytes at offset ${offset} (the device has ${this.size})`, { node: this.name, op: 'read', offset });
    }
    const buf = into ?? new Uint8Array(length);
    if (buf.length !== length) {
      throw new BlockError('EINVAL', `read on device '${this.name}': buffer of ${buf.length} bytes for a ${length}-byte read`, { node: this.name, op: 'read' });
    }
    await blkPread(this.backend, offset, buf);
    return buf;
  }

  /** Writes `data` at `offset`; with `{ fua: true }` it is durable when the promise resolves. */
  write(offset: number, data: Uint8Array, flags?: WriteFlags): Promise<void> {
    if (!(data instanceof Uint8Array)) {
      return Promise.reject(new BlockError('EINVAL', `write on device '${this.name}': the data must be a Uint8Array (got ${describeType(data)})`, { node: this.name, op: 'write', field: 'data' }));
    }
    return blkPwrite(this.backend, offset, data, flags);
  }

  /** Makes `length` bytes at `offset` read as zeros (durable on return with `{ fua: true }`). */
  writeZeroes(offset: number, length: number, flags?: WriteFlags): Promise<void> {
    return blkPwriteZeroes(this.backend, offset, length, flags);
  }

  /** Discards a range (a hint). */
  discard(offset: number, length: number): Promise<void> {
    return blkPdiscard(this.backend, offset, length);
  }

  /** Makes completed writes durable. */
  flush(): Promise<void> {
    return blkFlush(this.backend);
  }

  /** Resizes the image. */
  truncate(sizeBytes: number): Promise<void> {
    return blkTruncate(this.backend, sizeBytes);
  }

  /** What `info block` shows for this image. */
  async info(bql?: Bql): Promise<BackendInfo> {
    return withEasyBql('Image.info', bql, this.bqlWaitMs, (bql) => {
      const info = queryBlock(bql).find((b) => b.device === this.name);
      if (info === undefined) throw new BlockError('ENOENT', `Device '${this.name}' is closed`, { node: this.name });
      return info;
    });
  }

  /** The image's internal snapshots, in table order. */
  async snapshots(bql?: Bql): Promise<SnapshotInfo[]> {
    return withEasyBql('Image.snapshots', bql, this.bqlWaitMs, (bql) => bdrvSnapshotList(bql, this.rootNode()));
  }

  /**
   * Takes an internal snapshot named `name` (drains the image first); returns it with its ID.
   * `vmStateSize`, dates and clocks default to what `qemu-img snapshot -c` records.
   */
  async createSnapshot(name: string, extra: Partial<Omit<SnapshotInfo, 'id' | 'name'>> = {}, bql?: Bql): Promise<SnapshotInfo> {
    const now = Date.now();
    const info: SnapshotInfo = {
      id: '',
      name,
      vmStateSize: extra.vmStateSize ?? 0,
      dateSec: extra.dateSec ?? Math.floor(now / 1000),
      dateNsec: extra.dateNsec ?? (now % 1000) * 1e6,
      vmClockNsec: extra.vmClockNsec ?? 0,
      icount: extra.icount ?? -1,
    };
    const root = this.rootNode();
    return withEasyBql('Image.createSnapshot', bql, this.bqlWaitMs, (bql) => withDrained(bql, root, (d) => bdrvSnapshotCreate(bql, d, root, info)));
  }

  /** Reverts the image to the snapshot with this ID or name (ID first). */
  async gotoSnapshot(idOrName: string, bql?: Bql): Promise<void> {
    const root = this.rootNode();
    await withEasyBql('Image.gotoSnapshot', bql, this.bqlWaitMs, (bql) => withDrained(bql, root, (d) => bdrvSnapshotGoto(bql, d, root, idOrName)));
  }

  /** Deletes the first snapshot named `name` (qemu-img snapshot -d looks up by name only). */
  async deleteSnapshot(name: string, bql?: Bql): Promise<SnapshotInfo> {
    const root = this.rootNode();
    return withEasyBql('Image.deleteSnapshot', bql, this.bqlWaitMs, (bql) => withDrained(bql, root, (d) => bdrvSnapshotDelete(bql, d, root, null, name)));
  }

  /** On a read-only image: show the snapshot `name` (or ID) instead of the current state. */
  async loadSnapshotTemporarily(idOrName: string, bql?: Bql): Promise<void> {
    const root = this.rootNode();
    await withEasyBql('Image.loadSnapshotTemporarily', bql, this.bqlWaitMs, async (bql) => {
      const list = await bdrvSnapshotList(bql, root);
      const byName = list.find((s) => s.name === idOrName);
      if (byName !== undefined) await bdrvSnapshotLoadTmp(bql, root, null, byName.name);
      else await bdrvSnapshotLoadTmp(bql, root, idOrName, null);
    });
  }

  private rootNode(): BlockNode {
    const root = this.backend.root;
    if (root === null) throw new BlockError('ENOENT', `Device '${this.name}' has no medium (closed)`, { node: this.name });
    return root;
  }

  /** Waits for requests in flight, flushes, and closes the image and its nodes. */
  async close(bql?: Bql): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const blk = this.backend;
    const root = blk.root;
    if (root === null) return;
    // requests still running or waiting in the queue complete first (as QEMU's blk_drain does)
    await aioWaitWhile(() => blk.inFlight > 0 || blk.queued.length > 0);
    // a failed flush is reported, but only once the image is closed: its nodes, descriptors and
    // image locks must not outlive the Image
    let flushError: unknown = null;
    if (!blk.readOnly) await blkFlush(blk).catch((e: unknown) => (flushError = e));
    await withEasyBql('Image.close', bql, this.bqlWaitMs, async (bql) => {
      await withDrained(bql, root, () => blkDelete(bql, blk));
      await closeNode(bql, root);
    });
    if (flushError !== null) throw flushError;
  }
}

/**
 * Opens an image file (`openImage('disk.img')`) or any QEMU-style option string
 * (`openImage('driver=memory,size=64M')`, when the argument contains `=`).
 */
export async function openImage(target: string, opts: OpenImageOptions = {}): Promise<Image> {
  const nodeOpts: NodeOptions = {};
  // an option string has '='; so may a URL (nbd+unix:///e?socket=PATH), which is a file name
  const isOptions = target.includes('=') && findProtocolDriver(target) === null;
  if (isOptions) Object.assign(nodeOpts, parseOptions(target, 'driver'));
  else nodeOpts['file'] = target;
  if (opts.format !== undefined) nodeOpts['driver'] = opts.format;
  if (opts.readOnly === true) nodeOpts['read-only'] = 'on';
  if (opts.iothread !== undefined) nodeOpts['iothread'] = opts.iothread;
  if (opts.aio !== undefined && !isOptions) nodeOpts['file.aio'] = opts.aio;
  if (opts.forceShare === true && !isOptions) nodeOpts['file.force-share'] = 'on';
  if (opts.locking !== undefined && !isOptions) nodeOpts['file.locking'] = opts.locking;
  if (opts.noBacking === true) nodeOpts['backing'] = 'null';
  if (opts.nodeOptions !== undefined) Object.assign(nodeOpts, opts.nodeOptions);
  const waitMs = opts.bqlWaitMs ?? DEFAULT_BQL_WAIT_MS;
  return withEasyBql('openImage', opts.bql, waitMs, async (bql) => {
    const node = await openNode(bql, nodeOpts);
    try {
      const name = opts.name ?? `disk${imageCounter++}`;
      return new Image(blkNew(bql, name, node, { readOnly: node.readOnly }), waitMs);
    } catch (e) {
      await closeNode(bql, node);
      throw e;
    }
  });
}

/** The type of what a caller passed, for an error message (JavaScript callers bypass the types). */
function describeType(v: unknown): string {
  if (v === null || v === undefined) return String(v);
  return typeof v === 'object' ? ((v as object).constructor?.name ?? 'object') : typeof v;
}

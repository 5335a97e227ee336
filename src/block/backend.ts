/**
 * BlockBackend: the device-facing handle on a root node, and the request path through it.
 *
 * Creating and deleting backends is global state (BQL). The request functions (`blkPread`, ...)
 * are I/O code: any device may call them at any time. While the root node is drained the
 * backend holds new requests in a FIFO queue (QEMU's `blk_wait_while_drained`) and restarts them
 * in order when the last drained section ends; a request already past the queue counts in the
 * backend's `inFlight`, which drain waits for.
 */
import { refuseIfSnapshotClaimed } from './snapshot-lock.js';
import { aioWaitKick } from './aio-wait.js';
import { assertBql, type Bql } from './bql.js';
import type { WriteFlags, WriteZeroesFlags } from './driver.js';
import { assertDrained, type DrainedAll } from './drain.js';
import { BlockError } from './errors.js';
import { bdrvFlush, bdrvGetLength, bdrvPdiscard, bdrvPread, bdrvPwrite, bdrvPwriteCompressed, bdrvPwriteZeroes, bdrvTruncate } from './io.js';
import { nodeSetParent, type BlockNode, type DrainParent } from './node.js';
import { allBackends } from './registry.js';

let attachBackend: (bql: Bql, blk: BlockBackend, root: BlockNode) => void;
let reattachBackend: (bql: Bql, blk: BlockBackend, root: BlockNode) => void;
let detachBackend: (bql: Bql, blk: BlockBackend) => void;

/** The device-facing handle: named, bound to one root node. */
export class BlockBackend implements DrainParent {
  #inFlight = 0;
  #quiesceCounter = 0;
  /** Requests held while drained, in arrival order. */
  readonly #queued: Array<() => void> = [];
  /** Requests released by drainedEnd that have not yet re-entered: later arrivals queue behind them. */
  #resuming = 0;
  #root: BlockNode | null;
  /** For internal users (jobs) whose requests must go on while drained (QEMU's disable_request_queuing). */
  disableRequestQueuing = false;

  constructor(
    readonly name: string,
    root: BlockNode | null,
    readonly readOnly: boolean,
    /**
     * Made by the block layer for its own use (an NBD export, a monitor command's temporary
     * backend), not a device: query-block and `info block` leave it out, as QEMU lists only
     * monitor-owned and attached backends.
     */
    readonly internal = false,
  ) {
    this.#root = root;
  }

  /** Requests past the drain queue and not yet completed. */
  get inFlight(): number {
    return this.#inFlight;
  }

  /** Drained sections covering this backend's root. */
  get quiesceCounter(): number {
    return this.#quiesceCounter;
  }

  /** How many requests are held while drained. */
  get queuedCount(): number {
    return this.#queued.length;
  }

  /** A frozen copy of the requests held while drained, in arrival order (for tests and diagnostics). */
  get queued(): readonly (() => void)[] {
    return Object.freeze([...this.#queued]);
  }

  /** Requests released by drainedEnd that have not yet re-entered. */
  get resuming(): number {
    return this.#resuming;
  }

  /** The root node, or null once the backend was deleted. */
  get root(): BlockNode | null {
    return this.#root;
  }

  get parentName(): string {
    return this.name;
  }

  parentDrainedBegin(_bql: Bql): void {
    this.#quiesceCounter++;
  }

  parentDrainedEnd(_bql: Bql): void {
    if (this.#quiesceCounter <= 0) {
      throw new BlockError('EINVAL', `backend '${this.name}': drained end without a matching begin`, { node: this.name });
    }
    if (--this.#quiesceCounter === 0) this.restartQueued();
  }

  parentDrainedPoll(): boolean {
    return this.#inFlight > 0;
  }

  parentHasRequestInFlight(): boolean {
    return this.#inFlight > 0;
  }

  /**
   * Releases the queued requests in arrival order. Each takes its in-flight reference now, on the
   * request's behalf, so that a drain beginning before it runs still waits for it.
   */
  private restartQueued(): void {
    const waiting = this.#queued.splice(0);
    this.#inFlight += waiting.length;
    this.#resuming += waiting.length;
    for (const wake of waiting) wake();
  }

  /**
   * Takes the backend's in-flight reference for a new request. Returns null when the request may
   * go at once (the hot path allocates nothing), else a promise that resolves, in FIFO order, once
   * the backend is no longer drained, with the reference already taken.
   */
  enter(): Promise<void> | null {
    if (this.disableRequestQueuing || (this.#quiesceCounter === 0 && this.#resuming === 0 && this.#queued.length === 0)) {
      this.#inFlight++;
      return null;
    }
    return new Promise<void>((resolve) => this.#queued.push(resolve)).then(this.resumed);
  }

  /** A restarted request runs again; the last one lets through those that queued behind it. */
  private readonly resumed = (): void => {
    if (--this.#resuming === 0 && this.#quiesceCounter === 0 && this.#queued.length > 0) this.restartQueued();
  };

  /** Drops a request's in-flight reference and wakes drain waiters when none is left. */
  leave(): void {
    if (--this.#inFlight < 0) {
      this.#inFlight = 0;
      throw new BlockError('EIO', `backend '${this.name}': in-flight counter went negative`, { node: this.name });
    }
    if (this.#inFlight === 0) aioWaitKick();
  }

  /** Attaches to `root` as a parent, starting as drained as the root is (blkNew). */
  private attach(bql: Bql, root: BlockNode): void {
    nodeSetParent(bql, root, this, true);
    // a quiesced root quiesced its parents once (on its 0 -> 1), and will end that once
    this.#quiesceCounter = root.quiesceCounter > 0 ? 1 : 0;
  }

  /**
   * Moves to `root` (blkReplaceRoot): the old root loses this parent, the new one gains it, and
   * the backend is quiesced once, as the new root's parents are (both are inside drain-all, so it
   * stays quiesced, and the section's end brings it back to 0 through the new root).
   */
  private reattach(bql: Bql, root: BlockNode): void {
    if (this.#root !== null) nodeSetParent(bql, this.#root, this, false);
    nodeSetParent(bql, root, this, true);
    this.#root = root;
    this.#quiesceCounter = root.quiesceCounter > 0 ? 1 : 0;
  }

  /** Detaches from the root (blkDelete). */
  private detach(bql: Bql): void {
    if (this.#root !== null) nodeSetParent(bql, this.#root, this, false);
    this.#root = null;
  }

  static {
    attachBackend = (bql, blk, root) => blk.attach(bql, root);
    detachBackend = (bql, blk) => blk.detach(bql);
    reattachBackend = (bql, blk, root) => blk.reattach(bql, root);
  }
}

/**
 * Creates the backend `name` on `root`; EINVAL when the name is taken or invalid.
 * @locking global-state
 */
export function blkNew(bql: Bql, name: string, root: BlockNode, opts: { readOnly?: boolean; internal?: boolean } = {}): BlockBackend {
  assertBql(bql, 'blkNew');
  if (!/^[A-Za-z][A-Za-z0-9_.-]*$/.test(name)) {
    throw new BlockError('EINVAL', `Invalid device name '${name}': it must start with a letter and hold letters, digits, '-', '.', '_'`, {
      field: 'id',
      value: name,
    });
  }
  if (allBackends.has(name)) throw new BlockError('EINVAL', `Device with id '${name}' already exists`, { field: 'id', value: name });
  const readOnly = opts.readOnly ?? root.readOnly;
  if (!readOnly && root.readOnly) {
    throw new BlockError('EACCES', `Device '${name}' cannot be writable over read-only node '${root.nodeName}'`, { node: root.nodeName });
  }
  const blk = new BlockBackend(name, root, readOnly, opts.internal === true);
  // a backend attached to a drained node starts drained, so its requests queue
  attachBackend(bql, blk, root);
  allBackends.set(name, blk);
  return blk;
}

/**
 * Finds the backend `name`; ENOENT if there is none.
 * @locking global-state
 */
export function blkFind(bql: Bql, name: string): BlockBackend {
  assertBql(bql, 'blkFind');
  const blk = allBackends.get(name);
  if (blk === undefined) throw new BlockError('ENOENT', `Device '${name}' not found`, { field: 'device', value: name });
  return blk;
}

/**
 * Every backend, in creation order.
 * @locking global-state
 */
export function blkList(bql: Bql): BlockBackend[] {
  assertBql(bql, 'blkList');
  return [...allBackends.values()];
}

/**
 * Points the backend at another root node (QEMU's bdrv_replace_node for a device: an external
 * snapshot puts the new overlay there, an active commit the base). Everything is drained, so no
 * request crosses the switch: those queued while drained go to the new root. EINVAL when the
 * sizes differ or a writable device would sit on a read-only node.
 * @locking global-state
 */
export function blkReplaceRoot(bql: Bql, drained: DrainedAll, blk: BlockBackend, root: BlockNode): void {
  assertBql(bql, 'blkReplaceRoot');
  const old = rootOf(blk, 'replace-root');
  refuseIfSnapshotClaimed(old, 'blkReplaceRoot');
  refuseIfSnapshotClaimed(root, 'blkReplaceRoot');
  assertDrained(bql, drained, old, 'blkReplaceRoot');
  assertDrained(bql, drained, root, 'blkReplaceRoot');
  if (!blk.readOnly && root.readOnly) {
    throw new BlockError('EACCES', `Device '${blk.name}' cannot be writable over read-only node '${root.nodeName}'`, { node: root.nodeName });
  }
  if (bdrvGetLength(root) !== bdrvGetLength(old)) {
    throw new BlockError('EINVAL', `Device '${blk.name}': node '${root.nodeName}' (${bdrvGetLength(root)} bytes) cannot replace '${old.nodeName}' (${bdrvGetLength(old)} bytes)`, {
      node: root.nodeName,
    });
  }
  reattachBackend(bql, blk, root);
}

/**
 * Detaches the backend from its root and forgets it. EBUSY while it has requests in flight or
 * queued: drain first. The root node stays open (close it with closeNode).
 * @locking global-state
 */
export function blkDelete(bql: Bql, blk: BlockBackend): void {
  assertBql(bql, 'blkDelete');
  if (blk.root !== null) refuseIfSnapshotClaimed(blk.root, 'blkDelete');
  if (blk.inFlight > 0 || blk.queued.length > 0) {
    throw new BlockError('EBUSY', `Device '${blk.name}' has ${blk.inFlight} requests in flight and ${blk.queued.length} queued`, {
      node: blk.name,
    });
  }
  detachBackend(bql, blk);
  allBackends.delete(blk.name);
}

function rootOf(blk: BlockBackend, op: string): BlockNode {
  const root = blk.root;
  if (root === null) throw new BlockError('ENOMEDIUM', `${op} on device '${blk.name}': no medium`, { node: blk.name, op });
  return root;
}

/** The backend-level range check (QEMU's blk_check_byte_request): inside the device. */
function checkByteRequest(blk: BlockBackend, root: BlockNode, op: string, offset: number, bytes: number, isWrite: boolean): void {
  if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(bytes) || bytes < 0) {
    throw new BlockError('EINVAL', `${op} on device '${blk.name}': invalid range of ${bytes} bytes at offset ${offset}`, {
      node: blk.name,
      op,
      field: 'offset',
      value: offset,
    });
  }
  if (isWrite && blk.readOnly) {
    throw new BlockError('EPERM', `${op} on device '${blk.name}': the device is read-only`, { node: blk.name, op });
  }
  const len = bdrvGetLength(root);
  if (offset > len || bytes > len - offset) {
    throw new BlockError('EINVAL', `${op} on device '${blk.name}': ${bytes} bytes at offset ${offset} run past the end (${len} bytes)`, {
      node: blk.name,
      op,
      field: 'offset',
      value: offset,
    });
  }
}

/**
 * Reads `buf.length` bytes at `offset` of the device into `buf`.
 * @locking io
 */
export async function blkPread(blk: BlockBackend, offset: number, buf: Uint8Array): Promise<void> {
  const wait = blk.enter();
  if (wait !== null) await wait;
  try {
    const root = rootOf(blk, 'read');
    checkByteRequest(blk, root, 'read', offset, buf.length, false);
    await bdrvPread(root, offset, buf);
  } finally {
    blk.leave();
  }
}

/**
 * Writes `buf` at `offset` of the device; with `flags.fua` it is durable when this resolves.
 * @locking io
 */
export async function blkPwrite(blk: BlockBackend, offset: number, buf: Uint8Array, flags?: WriteFlags): Promise<void> {
  const wait = blk.enter();
  if (wait !== null) await wait;
  try {
    const root = rootOf(blk, 'write');
    checkByteRequest(blk, root, 'write', offset, buf.length, true);
    await bdrvPwrite(root, offset, buf, flags);
  } finally {
    blk.leave();
  }
}

/**
 * Writes `buf` at `offset` of the device compressed: whole clusters of its format (the last one
 * of the disk may be short); 0 bytes ends a run of compressed writes.
 * @locking io
 */
export async function blkPwriteCompressed(blk: BlockBackend, offset: number, buf: Uint8Array): Promise<void> {
  const wait = blk.enter();
  if (wait !== null) await wait;
  try {
    const root = rootOf(blk, 'write-compressed');
    checkByteRequest(blk, root, 'write-compressed', offset, buf.length, true);
    await bdrvPwriteCompressed(root, offset, buf);
  } finally {
    blk.leave();
  }
}

/**
 * Makes `bytes` bytes at `offset` of the device read as zeros.
 * @locking io
 */
export async function blkPwriteZeroes(blk: BlockBackend, offset: number, bytes: number, flags: WriteZeroesFlags = {}): Promise<void> {
  const wait = blk.enter();
  if (wait !== null) await wait;
  try {
    const root = rootOf(blk, 'write-zeroes');
    checkByteRequest(blk, root, 'write-zeroes', offset, bytes, true);
    await bdrvPwriteZeroes(root, offset, bytes, flags);
  } finally {
    blk.leave();
  }
}

/**
 * Discards `bytes` bytes at `offset` of the device.
 * @locking io
 */
export async function blkPdiscard(blk: BlockBackend, offset: number, bytes: number): Promise<void> {
  const wait = blk.enter();
  if (wait !== null) await wait;
  try {
    const root = rootOf(blk, 'discard');
    checkByteRequest(blk, root, 'discard', offset, bytes, true);
    await bdrvPdiscard(root, offset, bytes);
  } finally {
    blk.leave();
  }
}

/**
 * Makes every completed write on the device durable.
 * @locking io
 */
export async function blkFlush(blk: BlockBackend): Promise<void> {
  const wait = blk.enter();
  if (wait !== null) await wait;
  try {
    const root = rootOf(blk, 'flush');
    await bdrvFlush(root);
  } finally {
    blk.leave();
  }
}

/**
 * The device's length in bytes.
 * @locking io
 */
export function blkGetLength(blk: BlockBackend): number {
  return bdrvGetLength(rootOf(blk, 'length'));
}

/**
 * Resizes the device.
 * @locking io
 */
export async function blkTruncate(blk: BlockBackend, sizeBytes: number): Promise<void> {
  const wait = blk.enter();
  if (wait !== null) await wait;
  try {
    const root = rootOf(blk, 'truncate');
    if (blk.readOnly) throw new BlockError('EPERM', `truncate on device '${blk.name}': the device is read-only`, { node: blk.name, op: 'truncate' });
    await bdrvTruncate(root, sizeBytes);
  } finally {
    blk.leave();
  }
}

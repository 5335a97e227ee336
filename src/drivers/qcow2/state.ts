/**
 * The state of one open qcow2 node, shared by the modules that each handle one concern
 * (refcount.ts, cluster-map.ts, snapshots.ts, check.ts): geometry, the in-memory L1 and refcount
 * tables, the caches, the snapshot list and the metadata lock.
 *
 * I/O code: metadata is read and written through the node's `file` child with ordinary requests;
 * every change to it happens with `lock` held (QEMU's s->lock). Metadata is write-back: changes
 * to refcount blocks, L2 tables, the L1 table and refcount-table entries are kept in memory
 * (dirty) and written by writeback.ts in dependency order; clusters that lost their last pointer
 * wait in `pendingFrees` until that loss is on disk.
 */
import { CoMutex } from '../../block/co-mutex.js';
import { BlockError } from '../../block/errors.js';
import { bdrvFlush, bdrvPread, bdrvPwrite } from '../../block/io.js';
import type { BlockNode } from '../../block/node.js';
import { TableCache } from './table-cache.js';
import type { Qcow2Header, SnapshotEntry } from './types.js';

/** Everything the qcow2 modules share about one open image. */
export class Qcow2State {
  readonly clusterBits: number;
  readonly clusterSize: number;
  /** Entries per L2 table (cluster_size / 8). */
  readonly l2Entries: number;
  readonly l2Bits: number;
  readonly refcountBits: number;
  /** Refcount entries per refcount block. */
  readonly refblockEntries: number;
  readonly refcountMax: number;
  readonly v3: boolean;
  /** The active L1 table as it is on disk (big-endian entries). */
  l1: Uint8Array;
  l1View: DataView;
  /** The refcount table as it is on disk. */
  reftable: Uint8Array;
  reftableView: DataView;
  readonly l2Cache: TableCache;
  readonly refblockCache: TableCache;
  /** The metadata lock: every metadata change happens with it held. */
  readonly lock = new CoMutex();
  snapshots: SnapshotEntry[];
  /** Lowest cluster index that may be free (allocation search starts there). */
  freeClusterHint = 0;
  /** One past the highest cluster index allocated in this session (new areas start past it). */
  allocatedEnd = 0;
  /** Active L1 entries [lo, hi) changed in memory and not yet written (lo >= hi: none). */
  l1DirtyLo = Infinity;
  l1DirtyHi = 0;
  /** Refcount-table entries [lo, hi) changed in memory and not yet written (lo >= hi: none). */
  reftableDirtyLo = Infinity;
  reftableDirtyHi = 0;
  /**
   * Set when an L2 change points at data written since the last flush (an allocating write): the
   * data must be durable before the L2 table is written.
   */
  l2NeedsDataBarrier = false;
  /**
   * Host ranges [offset, bytes] whose references were dropped from L2 tables or the L1 table in
   * memory: their refcounts go down only once a flush has put the dropped pointers on disk, so a
   * cluster is never reused while a durable pointer to it may remain.
   */
  pendingFrees: Array<[number, number]> = [];
  /** In-place data writes submitted without the lock and not yet completed. */
  inPlaceWrites = 0;
  private inPlaceIdle: Array<() => void> = [];
  /** Bumped whenever a refcount block is added (invalidates the overlap ranges). */
  refblockGeneration = 0;
  /** Set while a snapshot is loaded temporarily: the node shows that state and refuses writes. */
  tmpSnapshot: string | null = null;

  constructor(
    readonly node: BlockNode,
    readonly file: BlockNode,
    readonly filename: string,
    public header: Qcow2Header,
    l1: Uint8Array,
    reftable: Uint8Array,
    snapshots: SnapshotEntry[],
    l2CacheBytes: number,
  ) {
    this.clusterBits = header.clusterBits;
    this.clusterSize = 2 ** header.clusterBits;
    this.l2Bits = header.clusterBits - 3;
    this.l2Entries = this.clusterSize / 8;
    this.refcountBits = 2 ** header.refcountOrder;
    this.refblockEntries = (this.clusterSize * 8) / this.refcountBits;
    this.refcountMax = this.refcountBits >= 53 ? Number.MAX_SAFE_INTEGER : 2 ** this.refcountBits - 1;
    this.v3 = header.version === 3;
    this.l1 = l1;
    this.l1View = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
    this.reftable = reftable;
    this.reftableView = new DataView(reftable.buffer, reftable.byteOffset, reftable.byteLength);
    const tables = Math.max(16, Math.floor(l2CacheBytes / this.clusterSize));
    this.l2Cache = new TableCache(this, tables, 'L2 table');
    this.refblockCache = new TableCache(this, Math.max(8, tables >> 2), 'refcount block');
    this.snapshots = snapshots;
  }

  /** Counts an in-place write until `done` is called. */
  beginInPlaceWrite(): void {
    this.inPlaceWrites++;
  }

  /** Ends an in-place write; wakes those waiting for none to be left. */
  endInPlaceWrite(): void {
    if (--this.inPlaceWrites === 0) for (const w of this.inPlaceIdle.splice(0)) w();
  }

  /**
   * Resolves when no in-place write is in flight. Called with the lock held before a data cluster
   * is freed: no new in-place write starts while the lock is held, and one already submitted must
   * land before its cluster can be reused for other data.
   */
  whenNoInPlaceWrites(): Promise<void> | undefined {
    if (this.inPlaceWrites === 0) return undefined;
    return new Promise((resolve) => this.inPlaceIdle.push(resolve));
  }

  /** The virtual disk size. */
  get sizeBytes(): number {
    return this.header.size;
  }

  /** Number of entries in the active L1 table. */
  get l1Size(): number {
    return this.l1.length / 8;
  }

  /** Replaces the in-memory L1 (after growth, goto or load-tmp). */
  setL1(bytes: Uint8Array): void {
    this.l1 = bytes;
    this.l1View = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }

  /** Records that active L1 entry `i` changed in memory (written by the next metadata flush). */
  markL1Dirty(i: number): void {
    if (i < this.l1DirtyLo) this.l1DirtyLo = i;
    if (i + 1 > this.l1DirtyHi) this.l1DirtyHi = i + 1;
  }

  /** Records that refcount-table entry `i` changed in memory (written by the next metadata flush). */
  markReftableDirty(i: number): void {
    if (i < this.reftableDirtyLo) this.reftableDirtyLo = i;
    if (i + 1 > this.reftableDirtyHi) this.reftableDirtyHi = i + 1;
  }

  /** True when some metadata change or deferred free has not reached the disk yet. */
  get metadataDirty(): boolean {
    return (
      this.refblockCache.hasDirty ||
      this.l2Cache.hasDirty ||
      this.l1DirtyLo < this.l1DirtyHi ||
      this.reftableDirtyLo < this.reftableDirtyHi ||
      this.pendingFrees.length > 0
    );
  }

  /** Forgets every unwritten metadata change (after the tables were read again from the file). */
  forgetDirtyMetadata(): void {
    this.l1DirtyLo = Infinity;
    this.l1DirtyHi = 0;
    this.reftableDirtyLo = Infinity;
    this.reftableDirtyHi = 0;
    this.l2NeedsDataBarrier = false;
    this.pendingFrees = [];
  }

  /** Replaces the in-memory refcount table (after growth). */
  setReftable(bytes: Uint8Array): void {
    this.reftable = bytes;
    this.reftableView = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }

  /** Guest offset where the VM state starts: the first L1 entry that maps no guest cluster. */
  vmStateOffset(): number {
    const l1Index = Math.ceil(this.sizeBytes / (this.clusterSize * this.l2Entries));
    return l1Index * this.clusterSize * this.l2Entries;
  }

  /** Reads metadata bytes from the file. */
  async readMeta(offset: number, bytes: number, what: string): Promise<Uint8Array> {
    const buf = new Uint8Array(bytes);
    try {
      await bdrvPread(this.file, offset, buf);
    } catch (e) {
      throw this.wrap(e, `reading the ${what} at offset ${offset}`);
    }
    return buf;
  }

  /**
   * Writes metadata bytes to the file (the caller orders the writes). On a failure the tables are
   * read again from the file, unless `keepOnFailure` (the write-back flush: its dirty tables stay
   * dirty and are written again by the next flush).
   */
  async writeMeta(offset: number, data: Uint8Array, what: string, keepOnFailure = false): Promise<void> {
    if (this.node.readOnly) {
      throw new BlockError('EPERM', `qcow2 node '${this.node.nodeName}': refusing to write the ${what} of read-only image '${this.filename}'`, {
        node: this.node.nodeName,
        file: this.filename,
      });
    }
    if (this.broken !== null) {
      throw new BlockError('EIO', `qcow2 '${this.filename}': refusing to write after an earlier failure left the metadata unknown (${this.broken}); reopen the image`, {
        node: this.node.nodeName,
        file: this.filename,
      });
    }
    try {
      await bdrvPwrite(this.file, offset, data);
    } catch (e) {
      // a write-back flush keeps its dirty tables (memory stays the truth and the next flush
      // writes them again, in the same order); a write-through caller's memory is read again
      if (!keepOnFailure) await this.resyncAfterFailedWrite(what);
      throw this.wrap(e, `writing the ${what} at offset ${offset}`);
    }
  }

  /**
   * Writes several metadata ranges at once (their order does not matter: the caller flushes after
   * them): the transfers overlap instead of each waiting for the one before. Waits for every
   * write to settle, then throws the first failure.
   */
  async writeMetaAll(writes: ReadonlyArray<{ offset: number; data: Uint8Array; what: string }>, keepOnFailure = false): Promise<void> {
    const results = await Promise.allSettled(writes.map((w) => this.writeMeta(w.offset, w.data, w.what, keepOnFailure)));
    for (const r of results) if (r.status === 'rejected') throw r.reason;
  }

  /** Set when the in-memory metadata could not be brought back in line with the file. */
  broken: string | null = null;
  /** How many metadata writes failed (each one read the tables again from the file). */
  resyncs = 0;
  /** True while a metadata transaction (metadata-tx.ts) is open: nothing may be written in place. */
  inMetadataTx = false;

  /**
   * After a failed metadata write the tables in memory may hold changes the file does not: drop
   * the caches and every unwritten change, and read the L1 and refcount tables again, so that memory
   * says what the file says (an operation that failed half-way then leaves at most leaks). If
   * even that fails, every later metadata write is refused.
   */
  private async resyncAfterFailedWrite(what: string): Promise<void> {
    this.resyncs++;
    this.l2Cache.clear();
    this.refblockCache.clear();
    this.forgetDirtyMetadata();
    try {
      const h = this.header;
      this.setL1(h.l1Size === 0 ? new Uint8Array(0) : await this.readMeta(h.l1TableOffset, h.l1Size * 8, 'L1 table'));
      this.setReftable(await this.readMeta(h.refcountTableOffset, h.refcountTableClusters * this.clusterSize, 'refcount table'));
      this.refblockGeneration++;
    } catch (e) {
      this.broken = `writing the ${what} failed and re-reading the tables failed too: ${e instanceof Error ? e.message : String(e)}`;
    }
  }

  /** A BlockError EIO saying the image is corrupt, naming the file and what is wrong. */
  corrupt(message: string, field?: string, offset?: number): BlockError {
    return new BlockError('EIO', `qcow2 image '${this.filename}' is corrupt: ${message}`, {
      node: this.node.nodeName,
      file: this.filename,
      corrupt: true,
      ...(field === undefined ? {} : { field }),
      ...(offset === undefined ? {} : { offset }),
    });
  }

  /**
   * QEMU's qcow2_signal_corruption: metadata found to contradict itself while writing. Every later
   * metadata write is refused, and a v3 image gets its corrupt bit (incompatible bit 1) in one
   * header write, flushed, so that neither snapstack nor QEMU opens it read/write again before a
   * repair (`img check -r all`). Returns the error to throw.
   */
  async signalCorruption(message: string, field: string, offset: number): Promise<BlockError> {
    const err = this.corrupt(`${message}; the image is marked corrupt and further writes are refused (repair it with 'check -r all')`, field, offset);
    if (this.broken !== null) return err;
    if (this.v3 && !this.node.readOnly) {
      const features = this.header.incompatibleFeatures | 2n; // bit 1: corrupt
      const b = new Uint8Array(8);
      new DataView(b.buffer).setBigUint64(0, features);
      try {
        await bdrvPwrite(this.file, 72, b);
        await bdrvFlush(this.file);
        this.header.incompatibleFeatures = features;
      } catch {
        // the bit could not be written: the writes are refused all the same
      }
    }
    this.broken = `the image is corrupt: ${message}`;
    return err;
  }

  private wrap(e: unknown, doing: string): BlockError {
    if (e instanceof BlockError) {
      return new BlockError(e.code, `qcow2 '${this.filename}': ${doing}: ${e.message}`, { node: this.node.nodeName, file: this.filename, cause: e });
    }
    return new BlockError('EIO', `qcow2 '${this.filename}': ${doing}: ${String(e)}`, { node: this.node.nodeName, file: this.filename, cause: e });
  }
}

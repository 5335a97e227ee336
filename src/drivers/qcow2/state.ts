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

  /** Forgets the dirty marks and deferred frees (after a transaction committed them, or abandoned them and took the tables back from the file). */
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
   * Writes metadata bytes to the file (the caller orders the writes). A failed write changes
   * nothing in memory: the metadata is write-back, so what memory holds is what the image must
   * become (dirty tables stay dirty and the next flush writes them again, in the same order), and
   * a structure written aside is switched to in memory only after its write succeeded.
   */
  async writeMeta(offset: number, data: Uint8Array, what: string): Promise<void> {
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
      throw this.wrap(e, `writing the ${what} at offset ${offset}`);
    }
  }

  /**
   * Writes several metadata ranges at once (their order does not matter: the caller flushes after
   * them): the transfers overlap instead of each waiting for the one before. Waits for every
   * write to settle, then throws the first failure.
   */
  async writeMetaAll(writes: ReadonlyArray<{ offset: number; data: Uint8Array; what: string }>): Promise<void> {
    const results = await Promise.allSettled(writes.map((w) => this.writeMeta(w.offset, w.data, w.what)));
    for (const r of results) if (r.status === 'rejected') throw r.reason;
  }

  /**
   * Flushes the file. When the flush fails, which writes before it reached the disk is unknown (a
   * failed fsync may have dropped any of them, and retrying does not bring them back): every later
   * metadata write is refused until the image is reopened.
   */
  async flushFile(what: string): Promise<void> {
    try {
      await bdrvFlush(this.file);
    } catch (e) {
      this.broken ??= `a flush (${what}) failed: ${e instanceof Error ? e.message : String(e)}`;
      throw this.wrap(e, `flushing (${what})`);
    }
  }

  /**
   * Writes header bytes that switch the image to a new state (a commit point, inside one sector).
   * When the write reports a failure, the file holds the old bytes or the new ones: they are read
   * back, and the write counts as done when the new ones are there (the caller must then switch
   * its memory too, and must not free what the new header points at). Returns normally when the
   * new header is in the file; throws when it is not, or when it cannot be read back (then every
   * later metadata write is refused).
   */
  async commitHeader(offset: number, bytes: Uint8Array, what: string): Promise<void> {
    try {
      await this.writeMeta(offset, bytes, what);
    } catch (e) {
      let shown: Uint8Array | null = null;
      try {
        shown = await this.readMeta(offset, bytes.length, 'header');
      } catch {
        shown = null;
      }
      if (shown === null) {
        this.broken ??= `the header write (${what}) failed and the header cannot be read back: ${e instanceof Error ? e.message : String(e)}`;
        throw e;
      }
      if (Buffer.compare(shown, bytes) !== 0) throw e; // not written: the old state stands
    }
  }

  /** Set when the image on disk may no longer match memory (a failed flush or header read-back): later metadata writes are refused. */
  broken: string | null = null;
  /** True while a metadata transaction (metadata-tx.ts) is open: nothing may be written in place. */
  inMetadataTx = false;

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

/**
 * A bounded cache of metadata tables (L2 tables, refcount blocks), keyed by host offset, evicting
 * the least recently used clean table. The cache is write-back: a changed table is marked dirty
 * (with the byte range that changed) and stays pinned until writeback.ts writes it in dependency
 * order (refcount blocks, a barrier, L2 tables, a barrier, the L1 table); a dirty table is never
 * evicted, so the cache may hold more than its capacity until the next metadata flush. I/O code,
 * used with the qcow2 lock held for changes; lookups of cached tables are synchronous.
 */
import type { Qcow2State } from './state.js';

/** One cached table: its bytes and a view for entry access. */
export interface Table {
  readonly offset: number;
  readonly bytes: Uint8Array;
  readonly view: DataView;
}

export class TableCache {
  /** Map iteration order is insertion order: re-inserting on use keeps the LRU at the front. */
  private readonly tables = new Map<number, Table>();
  /** Reads in flight, by offset: a get() of a table being read waits for that read. */
  private readonly loading = new Map<number, Promise<Table | null>>();
  /** Tables changed in memory and not yet written: offset -> the changed byte range [lo, hi). */
  private readonly dirty = new Map<number, { lo: number; hi: number }>();

  constructor(
    private readonly s: Qcow2State,
    private readonly capacity: number,
    private readonly what: string,
  ) {}

  /** The cached table at `offset`, or undefined (no I/O). */
  peek(offset: number): Table | undefined {
    const t = this.tables.get(offset);
    if (t !== undefined) {
      this.tables.delete(offset);
      this.tables.set(offset, t);
    }
    return t;
  }

  /** The cached table at `offset` without marking it recently used (for tight loops). */
  lookup(offset: number): Table | undefined {
    return this.tables.get(offset);
  }

  /** The table at `offset`, read from the file when not cached. */
  async get(offset: number): Promise<Table> {
    const hit = this.peek(offset);
    if (hit !== undefined) return hit;
    const pending = this.loading.get(offset);
    if (pending !== undefined) {
      await pending.catch(() => null);
      const loaded = this.peek(offset);
      if (loaded !== undefined) return loaded;
      // the read failed, or the table was dropped meanwhile: read it now
    }
    const bytes = await this.s.readMeta(offset, this.s.clusterSize, this.what);
    // another request may have loaded it meanwhile: keep the first copy, which may hold changes
    const raced = this.tables.get(offset);
    if (raced !== undefined) return raced;
    return this.insert(offset, bytes);
  }

  /** Puts a table that the caller has just built or written into the cache. */
  insert(offset: number, bytes: Uint8Array): Table {
    const t: Table = { offset, bytes, view: new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength) };
    this.tables.delete(offset);
    this.tables.set(offset, t);
    this.evict();
    return t;
  }

  /** Evicts the least recently used clean tables until the cache fits (dirty ones are pinned). */
  private evict(): void {
    if (this.tables.size <= this.capacity) return;
    for (const off of this.tables.keys()) {
      if (this.tables.size <= this.capacity) return;
      if (!this.dirty.has(off)) this.tables.delete(off);
    }
  }

  /**
   * Marks bytes [lo, hi) of the cached table at `offset` as changed in memory: they are written by
   * the next metadata flush (writeback.ts), and the table stays cached until then.
   */
  markDirty(offset: number, lo: number, hi: number): void {
    const prev = this.dirty.get(offset);
    if (prev === undefined) this.dirty.set(offset, { lo, hi });
    else {
      if (lo < prev.lo) prev.lo = lo;
      if (hi > prev.hi) prev.hi = hi;
    }
  }

  /** True when the table at `offset` holds changes not yet written. */
  isDirty(offset: number): boolean {
    return this.dirty.has(offset);
  }

  /** True when some table holds changes not yet written. */
  get hasDirty(): boolean {
    return this.dirty.size > 0;
  }

  /** How many tables hold changes not yet written. */
  get dirtyCount(): number {
    return this.dirty.size;
  }

  /** The writes that put every dirty table's changed range on disk (the tables stay dirty until markClean). */
  dirtyWrites(what: string): Array<{ offset: number; data: Uint8Array; what: string }> {
    const writes: Array<{ offset: number; data: Uint8Array; what: string }> = [];
    for (const [off, { lo, hi }] of this.dirty) {
      const t = this.tables.get(off);
      if (t === undefined) continue; // dropped meanwhile: its cluster was freed
      writes.push({ offset: off + lo, data: t.bytes.subarray(lo, hi), what });
    }
    return writes;
  }

  /** Forgets that the tables were dirty (after their writes succeeded), and evicts what no longer fits. */
  markClean(): void {
    this.dirty.clear();
    this.evict();
  }

  /** Drops every dirty table (its changes were never written): the next lookup reads the file again. */
  discardDirty(): void {
    for (const off of this.dirty.keys()) this.tables.delete(off);
    this.dirty.clear();
  }

  /**
   * Starts reading the table at `offset` unless it is cached or being read, so that a later get()
   * finds it (readahead for walks over many tables). Only for tables nothing writes meanwhile: a
   * read that completes after the table was dropped is discarded. Errors surface at the get().
   */
  prefetch(offset: number): void {
    if (this.tables.has(offset) || this.loading.has(offset)) return;
    const p: Promise<Table | null> = this.s.readMeta(offset, this.s.clusterSize, this.what).then(
      (bytes) => {
        if (this.loading.get(offset) !== p) return null;
        this.loading.delete(offset);
        return this.tables.get(offset) ?? this.insert(offset, bytes);
      },
      (e: unknown) => {
        if (this.loading.get(offset) === p) this.loading.delete(offset);
        throw e;
      },
    );
    p.catch(() => undefined); // an unused failed readahead is not an unhandled rejection
    this.loading.set(offset, p);
  }

  /** Forgets the table at `offset` (its cluster was freed or reused), and any unwritten change to it. */
  drop(offset: number): void {
    this.tables.delete(offset);
    this.loading.delete(offset);
    this.dirty.delete(offset);
  }

  /** Forgets every table, dirty ones included. */
  clear(): void {
    this.tables.clear();
    this.loading.clear();
    this.dirty.clear();
  }

  /** How many tables the cache holds at most. */
  get maxTables(): number {
    return this.capacity;
  }
}

/**
 * A bounded cache of metadata tables (L2 tables, refcount blocks), keyed by host offset, evicting
 * the least recently used. Tables are written through when changed (the caller writes them), so an
 * entry is never dirty and eviction costs nothing. I/O code, used with the qcow2 lock held for
 * changes; lookups of cached tables are synchronous.
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
    while (this.tables.size > this.capacity) {
      const oldest = this.tables.keys().next();
      if (oldest.done === true) break;
      this.tables.delete(oldest.value);
    }
    return t;
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

  /** Forgets the table at `offset` (its cluster was freed or reused). */
  drop(offset: number): void {
    this.tables.delete(offset);
    this.loading.delete(offset);
  }

  /** Forgets every table. */
  clear(): void {
    this.tables.clear();
    this.loading.clear();
  }

  /** How many tables the cache holds at most. */
  get maxTables(): number {
    return this.capacity;
  }
}

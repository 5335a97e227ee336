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

  /** Forgets the table at `offset` (its cluster was freed or reused). */
  drop(offset: number): void {
    this.tables.delete(offset);
  }

  /** Forgets every table. */
  clear(): void {
    this.tables.clear();
  }
}

/**
 * A power-loss simulator under the raw-snapshot store, in the style of SQLite's test6.c: an
 * in-memory file system behind the store's StoreFs interface (src/drivers/file/store-fs.ts) that
 * remembers what is durable and what is only in the (volatile) page cache, and "crashes" at a
 * chosen operation.
 *
 * What it guarantees (the model the store must survive):
 * - Reads, stats and directory listings see everything done so far (the page cache).
 * - File data: a write or a truncate that returned is only pending on its file. An fsync or
 *   fdatasync of the file that returned made every earlier write of that file durable (data and
 *   length). At a crash ANY subset of a file's pending writes persists, applied in their order,
 *   and a write may be torn at 512-byte sectors (some of its sectors persist, others not).
 * - Names: creating a file, linking, unlinking and renaming are pending operations on their
 *   directory. Only an fsync of that directory makes them durable: a rename (or a new file's name)
 *   persists only after the directory's fsync. At a crash ANY subset of a directory's pending name
 *   operations persists, applied in order (a rename moves whatever inode it moved; a name whose
 *   creation did not persist does not exist). A file with no durable name is gone.
 * What it does not model: a lying fsync, a torn sector, cross-directory renames (refused, EXDEV),
 * symlinks, permissions.
 *
 * Operations that change something (open that creates or truncates, write, truncate, fsync,
 * fdatasync, rename, unlink, link, mkdir, rmdir, clone, directory fsync) are numbered from 0;
 * `armCrash(n)` makes operation n the power cut: it and every later call throws PowerCut, and
 * nothing it would have done happens. `crashStates()` then lists file systems the disk may hold.
 */
import path from 'node:path';
import type { StoreFs, StoreOpenMode, StoreStat } from '../../src/drivers/file/store-fs.js';
import { prng as rng } from './prng.js';

const SECTOR = 512;

/** Thrown by every operation from the armed one on. */
export class PowerCut extends Error {
  readonly code = 'EIO';
  constructor(op: string) {
    super(`power cut at ${op}`);
  }
}

type DataOp = { kind: 'write'; pos: number; data: Uint8Array } | { kind: 'truncate'; length: number };
type NameOp = { kind: 'link'; name: string; ino: number } | { kind: 'unlink'; name: string } | { kind: 'rename'; from: string; to: string; ino: number };

interface FileInode {
  kind: 'file';
  ino: number;
  /** What reads see. */
  data: Uint8Array;
  durable: Uint8Array;
  pending: DataOp[];
}

interface DirInode {
  kind: 'dir';
  ino: number;
  entries: Map<string, number>;
  durable: Map<string, number>;
  pending: NameOp[];
}

type Inode = FileInode | DirInode;

/** One pending item a crash may or may not keep (for the subset enumeration). */
interface PendingItem {
  ino: number;
  index: number;
  sectors: number;
}

function sysError(code: string, what: string): Error {
  return Object.assign(new Error(`${code}: ${what}`), { code });
}

function applyData(bytes: Uint8Array, op: DataOp, keepSector?: (i: number) => boolean): Uint8Array {
  if (op.kind === 'truncate') {
    const out = new Uint8Array(op.length);
    out.set(bytes.subarray(0, Math.min(bytes.length, op.length)));
    return out;
  }
  const end = op.pos + op.data.length;
  let out = bytes;
  if (end > bytes.length) {
    out = new Uint8Array(end);
    out.set(bytes);
  }
  if (keepSector === undefined) {
    out.set(op.data, op.pos);
    return out;
  }
  // torn: only the chosen sectors (by file offset) of this write land
  const first = Math.floor(op.pos / SECTOR);
  for (let s = first; s * SECTOR < end; s++) {
    if (!keepSector(s - first)) continue;
    const a = Math.max(op.pos, s * SECTOR);
    const b = Math.min(end, (s + 1) * SECTOR);
    out.set(op.data.subarray(a - op.pos, b - op.pos), a);
  }
  return out;
}

function sectorsOf(op: DataOp): number {
  if (op.kind === 'truncate') return 1;
  const first = Math.floor(op.pos / SECTOR);
  const last = Math.floor((op.pos + Math.max(op.data.length, 1) - 1) / SECTOR);
  return last - first + 1;
}

function applyName(entries: Map<string, number>, op: NameOp): void {
  if (op.kind === 'link') entries.set(op.name, op.ino);
  else if (op.kind === 'unlink') entries.delete(op.name);
  else {
    if (entries.get(op.from) === op.ino) entries.delete(op.from);
    entries.set(op.to, op.ino);
  }
}

/** Options of `crashStates`. */
export interface CrashStateOptions {
  /** Enumerate every subset when at most this many items are pending (default 10). */
  exhaustiveUpTo?: number;
  /** Random subsets to try beyond that, and torn variants in any case (default 64). */
  random?: number;
  seed?: number;
}

/** The in-memory file system with a volatile cache. */
export class PowerLossFs implements StoreFs {
  private inodes = new Map<number, Inode>();
  private nextIno = 2;
  private fds = new Map<number, { ino: number; writable: boolean }>();
  private nextFd = 3;
  /** Operations counted so far. */
  ops = 0;
  private crashAt = Number.POSITIVE_INFINITY;
  crashed = false;
  /** The counted operations, for failure messages. */
  readonly log: string[] = [];

  /** A file system holding the directories `dirs` (durable). */
  constructor(dirs: string[] = ['/sim']) {
    this.inodes.set(1, { kind: 'dir', ino: 1, entries: new Map(), durable: new Map(), pending: [] });
    for (const d of dirs) {
      let cur = '/';
      for (const part of d.split('/').filter((x) => x !== '')) {
        const parent = this.dirAt(cur);
        cur = path.join(cur, part);
        if (!parent.entries.has(part)) {
          const ino = this.nextIno++;
          this.inodes.set(ino, { kind: 'dir', ino, entries: new Map(), durable: new Map(), pending: [] });
          parent.entries.set(part, ino);
          parent.durable.set(part, ino);
        }
      }
    }
  }

  /** Makes operation `n` (counted from now, 0-based) the power cut. */
  armCrash(n: number): void {
    this.crashAt = this.ops + n;
  }

  /** Makes everything durable (a clean shutdown). */
  settle(): void {
    for (const n of this.inodes.values()) this.persist(n);
  }

  // --- inspection for tests -------------------------------------------------------------------

  /** The bytes of the file at `p` as reads see them; undefined when there is none. */
  contents(p: string): Uint8Array | undefined {
    const ino = this.lookup(p);
    const n = ino === undefined ? undefined : this.inodes.get(ino);
    return n?.kind === 'file' ? n.data.slice() : undefined;
  }

  /** The bytes of the file open as `fd`, as reads see them. */
  fdContents(fd: number): Uint8Array {
    return this.fdFile(fd, false).data.slice();
  }

  /** How many items are pending (writes plus name operations). */
  pendingCount(): number {
    return this.pendingItems().length;
  }

  /**
   * File systems the disk may hold after a crash now: every subset of the pending items when
   * they are few, else the extremes plus seeded-random subsets; plus seeded-random torn variants.
   */
  crashStates(opts: CrashStateOptions = {}): PowerLossFs[] {
    const items = this.pendingItems();
    const out: PowerLossFs[] = [];
    const exhaustiveUpTo = opts.exhaustiveUpTo ?? 10;
    const random = rng(opts.seed ?? 1);
    const extra = opts.random ?? 64;
    if (items.length <= exhaustiveUpTo) {
      for (let mask = 0; mask < 1 << items.length; mask++) out.push(this.survivor(items, (i) => (mask & (1 << i)) !== 0));
    } else {
      out.push(this.survivor(items, () => false), this.survivor(items, () => true));
      for (let k = 0; k < extra; k++) {
        const pick = items.map(() => random() < 0.5);
        out.push(this.survivor(items, (i) => pick[i] === true));
      }
    }
    // torn writes: some sectors of some writes
    for (let k = 0; k < Math.min(extra, items.length === 0 ? 0 : extra); k++) {
      const pick = items.map(() => random() < 0.6);
      const tear = items.map((it) => (it.sectors > 1 && random() < 0.5 ? Array.from({ length: it.sectors }, () => random() < 0.5) : null));
      out.push(this.survivor(items, (i) => pick[i] === true, (i, s) => tear[i]?.[s] ?? true));
    }
    return out;
  }

  // --- StoreFs ---------------------------------------------------------------------------------

  realpath(p: string): string {
    const abs = path.resolve(p);
    if (this.lookup(abs) === undefined) throw sysError('ENOENT', `realpath '${p}'`);
    return abs;
  }

  readText(p: string): string {
    const n = this.fileAt(p);
    return Buffer.from(n.data).toString('utf8');
  }

  open(p: string, how: StoreOpenMode, _mode?: number): number {
    const abs = path.resolve(p);
    const existing = this.lookup(abs);
    if (how === 'r' || how === 'r+') {
      if (existing === undefined) throw sysError('ENOENT', `open '${p}'`);
      const n = this.inodes.get(existing);
      if (n?.kind !== 'file') throw sysError('EISDIR', `open '${p}'`);
      return this.newFd(existing, how === 'r+');
    }
    if (how === 'wx' && existing !== undefined) throw sysError('EEXIST', `open '${p}'`);
    if (existing !== undefined) {
      const n = this.inodes.get(existing);
      if (n?.kind !== 'file') throw sysError('EISDIR', `open '${p}'`);
      if (how === 'w') {
        this.count(`truncate-open ${abs}`);
        this.dataOp(n, { kind: 'truncate', length: 0 });
      }
      return this.newFd(existing, true);
    }
    this.count(`create ${abs}`);
    const dir = this.dirAt(path.dirname(abs));
    const ino = this.newFile(new Uint8Array(0));
    this.nameOp(dir, { kind: 'link', name: path.basename(abs), ino });
    return this.newFd(ino, true);
  }

  write(fd: number, data: Uint8Array, pos: number): void {
    const f = this.fdFile(fd, true);
    this.count(`write ${f.ino} @${pos}+${data.length}`);
    this.dataOp(f, { kind: 'write', pos, data: data.slice() });
  }

  fsync(fd: number): void {
    const f = this.fdFile(fd, false);
    this.count(`fsync ${f.ino}`);
    this.persist(f);
  }

  fdatasync(fd: number): void {
    const f = this.fdFile(fd, false);
    this.count(`fdatasync ${f.ino}`);
    this.persist(f);
  }

  close(fd: number): void {
    if (!this.fds.delete(fd)) throw sysError('EBADF', `close ${fd}`);
  }

  fstat(fd: number): StoreStat {
    const f = this.fdFile(fd, false);
    return { size: f.data.length, dev: 1, ino: f.ino, isDirectory: false };
  }

  stat(p: string): StoreStat | undefined {
    const ino = this.lookup(path.resolve(p));
    const n = ino === undefined ? undefined : this.inodes.get(ino);
    if (n === undefined) return undefined;
    return { size: n.kind === 'file' ? n.data.length : 4096, dev: 1, ino: n.ino, isDirectory: n.kind === 'dir' };
  }

  rename(from: string, to: string): void {
    const a = path.resolve(from);
    const b = path.resolve(to);
    if (path.dirname(a) !== path.dirname(b)) throw sysError('EXDEV', `rename '${from}' '${to}'`);
    const dir = this.dirAt(path.dirname(a));
    const ino = dir.entries.get(path.basename(a));
    if (ino === undefined) throw sysError('ENOENT', `rename '${from}'`);
    this.count(`rename ${a} -> ${b}`);
    this.nameOp(dir, { kind: 'rename', from: path.basename(a), to: path.basename(b), ino });
  }

  unlink(p: string): void {
    const abs = path.resolve(p);
    const dir = this.dirAt(path.dirname(abs));
    const ino = dir.entries.get(path.basename(abs));
    if (ino === undefined) throw sysError('ENOENT', `unlink '${p}'`);
    if (this.inodes.get(ino)?.kind === 'dir') throw sysError('EISDIR', `unlink '${p}'`);
    this.count(`unlink ${abs}`);
    this.nameOp(dir, { kind: 'unlink', name: path.basename(abs) });
  }

  link(existing: string, newPath: string): void {
    const ino = this.lookup(path.resolve(existing));
    if (ino === undefined) throw sysError('ENOENT', `link '${existing}'`);
    const abs = path.resolve(newPath);
    const dir = this.dirAt(path.dirname(abs));
    if (dir.entries.has(path.basename(abs))) throw sysError('EEXIST', `link '${newPath}'`);
    this.count(`link ${existing} -> ${abs}`);
    this.nameOp(dir, { kind: 'link', name: path.basename(abs), ino });
  }

  mkdirp(p: string): void {
    let cur = '/';
    for (const part of path.resolve(p).split('/').filter((x) => x !== '')) {
      const parent = this.dirAt(cur);
      cur = path.join(cur, part);
      const ino = parent.entries.get(part);
      if (ino !== undefined) {
        if (this.inodes.get(ino)?.kind !== 'dir') throw sysError('ENOTDIR', `mkdir '${cur}'`);
        continue;
      }
      this.count(`mkdir ${cur}`);
      const n = this.nextIno++;
      this.inodes.set(n, { kind: 'dir', ino: n, entries: new Map(), durable: new Map(), pending: [] });
      this.nameOp(parent, { kind: 'link', name: part, ino: n });
    }
  }

  readdir(p: string): string[] {
    return [...this.dirAt(path.resolve(p)).entries.keys()];
  }

  rmdir(p: string): void {
    const abs = path.resolve(p);
    const d = this.dirAt(abs);
    if (d.entries.size > 0) throw sysError('ENOTEMPTY', `rmdir '${p}'`);
    this.count(`rmdir ${abs}`);
    this.nameOp(this.dirAt(path.dirname(abs)), { kind: 'unlink', name: path.basename(abs) });
  }

  clone(src: string, dst: string): void {
    const from = this.fileAt(src);
    const abs = path.resolve(dst);
    const dir = this.dirAt(path.dirname(abs));
    this.count(`clone ${src} -> ${abs}`);
    const ino = this.newFile(new Uint8Array(0));
    const f = this.inodes.get(ino) as FileInode;
    this.dataOp(f, { kind: 'write', pos: 0, data: from.data.slice() });
    this.nameOp(dir, { kind: 'link', name: path.basename(abs), ino });
  }

  fsyncDir(dir: string): void {
    const d = this.dirAt(path.resolve(dir));
    this.count(`fsync-dir ${dir}`);
    this.persist(d);
  }

  // --- internals -------------------------------------------------------------------------------

  private count(what: string): void {
    if (this.crashed || this.ops >= this.crashAt) {
      this.crashed = true;
      throw new PowerCut(what);
    }
    this.ops++;
    this.log.push(what);
  }

  private newFd(ino: number, writable: boolean): number {
    const fd = this.nextFd++;
    this.fds.set(fd, { ino, writable });
    return fd;
  }

  private newFile(data: Uint8Array): number {
    const ino = this.nextIno++;
    this.inodes.set(ino, { kind: 'file', ino, data, durable: new Uint8Array(0), pending: [] });
    return ino;
  }

  private dataOp(f: FileInode, op: DataOp): void {
    f.data = applyData(f.data, op);
    f.pending.push(op);
  }

  private nameOp(d: DirInode, op: NameOp): void {
    applyName(d.entries, op);
    d.pending.push(op);
  }

  private persist(n: Inode): void {
    if (n.kind === 'file') {
      n.durable = n.data.slice();
      n.pending = [];
    } else {
      n.durable = new Map(n.entries);
      n.pending = [];
    }
  }

  private fdFile(fd: number, write: boolean): FileInode {
    const e = this.fds.get(fd);
    if (e === undefined) throw sysError('EBADF', `fd ${fd}`);
    if (write && !e.writable) throw sysError('EBADF', `fd ${fd} is read-only`);
    const n = this.inodes.get(e.ino);
    if (n?.kind !== 'file') throw sysError('EBADF', `fd ${fd}`);
    return n;
  }

  private lookup(abs: string): number | undefined {
    let ino = 1;
    for (const part of abs.split('/').filter((x) => x !== '')) {
      const n = this.inodes.get(ino);
      if (n?.kind !== 'dir') return undefined;
      const next = n.entries.get(part);
      if (next === undefined) return undefined;
      ino = next;
    }
    return ino;
  }

  private dirAt(abs: string): DirInode {
    const ino = this.lookup(abs);
    const n = ino === undefined ? undefined : this.inodes.get(ino);
    if (n === undefined) throw sysError('ENOENT', `directory '${abs}'`);
    if (n.kind !== 'dir') throw sysError('ENOTDIR', `'${abs}'`);
    return n;
  }

  private fileAt(p: string): FileInode {
    const ino = this.lookup(path.resolve(p));
    const n = ino === undefined ? undefined : this.inodes.get(ino);
    if (n === undefined) throw sysError('ENOENT', `'${p}'`);
    if (n.kind !== 'file') throw sysError('EISDIR', `'${p}'`);
    return n;
  }

  private pendingItems(): PendingItem[] {
    const items: PendingItem[] = [];
    for (const n of this.inodes.values()) {
      if (n.kind === 'file') n.pending.forEach((op, index) => items.push({ ino: n.ino, index, sectors: sectorsOf(op) }));
      else n.pending.forEach((_op, index) => items.push({ ino: n.ino, index, sectors: 1 }));
    }
    return items;
  }

  /** The file system after a crash that kept the items `keep` picks (sectors `keepSector` picks of torn ones). */
  private survivor(items: PendingItem[], keep: (i: number) => boolean, keepSector?: (i: number, sector: number) => boolean): PowerLossFs {
    const chosen = new Map<string, number>();
    items.forEach((it, i) => {
      if (keep(i)) chosen.set(`${it.ino}:${it.index}`, i);
    });
    const out = new PowerLossFs([]);
    out.inodes = new Map();
    out.nextIno = this.nextIno;
    for (const n of this.inodes.values()) {
      if (n.kind === 'file') {
        let bytes: Uint8Array = n.durable.slice();
        n.pending.forEach((op, index) => {
          const i = chosen.get(`${n.ino}:${index}`);
          if (i === undefined) return;
          bytes = applyData(bytes, op, keepSector === undefined ? undefined : (s) => keepSector(i, s));
        });
        out.inodes.set(n.ino, { kind: 'file', ino: n.ino, data: bytes, durable: bytes.slice(), pending: [] });
      } else {
        const entries = new Map(n.durable);
        n.pending.forEach((op, index) => {
          if (chosen.has(`${n.ino}:${index}`)) applyName(entries, op);
        });
        out.inodes.set(n.ino, { kind: 'dir', ino: n.ino, entries, durable: new Map(entries), pending: [] });
      }
    }
    return out;
  }
}

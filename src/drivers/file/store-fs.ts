/**
 * The narrow file-system interface under the raw-snapshot store (snapshot-store.ts) and the
 * VM-state sidecar: every call that creates, writes, syncs, renames or removes a file of a store
 * goes through it, so a test can slide a power-loss simulator under the real store code
 * (test/helpers/power-loss-fs.ts), in the way SQLite's test6.c slides a crashing VFS under SQLite.
 *
 * Common code: synchronous calls, no block-layer state. Errors are Node's system errors (or
 * look-alikes with the same `code`), which the callers turn into BlockErrors.
 */
import fs from 'node:fs';

/** How a file is opened: read-only, read-write, create-or-truncate, create-new, read-write creating it if absent. */
export type StoreOpenMode = 'r' | 'r+' | 'w' | 'wx' | 'rw-create';

/** What the store needs to know of a file. */
export interface StoreStat {
  size: number;
  dev: number;
  ino: number;
  isDirectory: boolean;
}

/** The calls the store makes; `fsProvider` is the real one. */
export interface StoreFs {
  /** The path with symlinks resolved. */
  realpath(p: string): string;
  /** The whole file as UTF-8 text. */
  readText(p: string): string;
  /** Opens (or creates, for 'w', 'wx', 'rw-create', with `mode`) a file; returns its descriptor. */
  open(p: string, how: StoreOpenMode, mode?: number): number;
  /** Writes all of `data` at `pos` of `fd`. */
  write(fd: number, data: Uint8Array, pos: number): void;
  /** Makes the file's data and metadata durable. */
  fsync(fd: number): void;
  /** Makes the file's data durable. */
  fdatasync(fd: number): void;
  close(fd: number): void;
  fstat(fd: number): StoreStat;
  /** undefined when nothing is at `p`. */
  stat(p: string): StoreStat | undefined;
  rename(from: string, to: string): void;
  unlink(p: string): void;
  /** A second name for the file at `existing`. */
  link(existing: string, newPath: string): void;
  /** Creates the directory and its missing parents. */
  mkdirp(p: string): void;
  readdir(p: string): string[];
  rmdir(p: string): void;
  /** Copies `src` to `dst` (a reflink where the filesystem can), replacing `dst`. */
  clone(src: string, dst: string): void;
  /** Makes the entries created, renamed or removed in directory `dir` durable. */
  fsyncDir(dir: string): void;
}

function sysCode(e: unknown): string {
  return typeof e === 'object' && e !== null && 'code' in e ? String((e as { code: unknown }).code) : '';
}

const OPEN_FLAGS: Record<StoreOpenMode, string | number> = {
  r: 'r',
  'r+': 'r+',
  w: 'w',
  wx: 'wx',
  'rw-create': fs.constants.O_RDWR | fs.constants.O_CREAT,
};

/**
 * The host file system (node:fs).
 * @locking common
 */
export const hostStoreFs: StoreFs = {
  realpath: (p) => fs.realpathSync(p),
  readText: (p) => fs.readFileSync(p, 'utf8'),
  open: (p, how, mode) => fs.openSync(p, OPEN_FLAGS[how], mode),
  write(fd, data, pos) {
    for (let done = 0; done < data.length; ) done += fs.writeSync(fd, data, done, data.length - done, pos + done);
  },
  fsync: (fd) => fs.fsyncSync(fd),
  fdatasync: (fd) => fs.fdatasyncSync(fd),
  close: (fd) => fs.closeSync(fd),
  fstat(fd) {
    const st = fs.fstatSync(fd);
    return { size: st.size, dev: st.dev, ino: st.ino, isDirectory: st.isDirectory() };
  },
  stat(p) {
    const st = fs.statSync(p, { throwIfNoEntry: false });
    return st === undefined ? undefined : { size: st.size, dev: st.dev, ino: st.ino, isDirectory: st.isDirectory() };
  },
  rename: (from, to) => fs.renameSync(from, to),
  unlink: (p) => fs.unlinkSync(p),
  link: (existing, newPath) => fs.linkSync(existing, newPath),
  mkdirp(p) {
    fs.mkdirSync(p, { recursive: true });
  },
  readdir: (p) => fs.readdirSync(p),
  rmdir: (p) => fs.rmdirSync(p),
  clone: (src, dst) => fs.copyFileSync(src, dst, fs.constants.COPYFILE_FICLONE),
  fsyncDir(dir) {
    let fd: number;
    try {
      fd = fs.openSync(dir, 'r');
    } catch (e) {
      if (sysCode(e) === 'EISDIR') return; // platforms that cannot open directories
      throw e;
    }
    try {
      fs.fsyncSync(fd);
    } catch (e) {
      const c = sysCode(e);
      if (c !== 'EINVAL' && c !== 'ENOTSUP') throw e; // filesystems without directory fsync
    } finally {
      fs.closeSync(fd);
    }
  },
};

/**
 * The `code` of a system error ('' when it has none).
 * @locking common
 */
export function systemErrorCode(e: unknown): string {
  return sysCode(e);
}

/**
 * Image locking as QEMU 7.2's file-posix does it, so that QEMU and snapstack see each other.
 *
 * A `file` node takes shared open-file-description (OFD, F_OFD_SETLK) byte-range locks on its
 * image: byte 100 + i for each permission bit i it holds, byte 200 + i for each permission it does
 * not share with other users. Bits: 0 consistent read, 1 write, 2 write unchanged, 3 resize
 * (QEMU 7.2 has these four). A node then checks, for each permission it holds, that no other open
 * file description locks 200 + i (somebody refuses to share it: `Failed to get "write" lock`), and
 * for each permission it does not share, that none locks 100 + i (somebody holds it: `Failed to
 * get shared "write" lock`), each followed by the hint `Is another process using the image
 * [PATH]?`. Apply first, check second, as QEMU does: two openers racing both see each other.
 *
 * The locks come from fs-native-extensions (a prebuilt N-API binary inside the npm package; on
 * Linux it calls fcntl(F_OFD_SETLK), the very lock QEMU takes). It has no F_OFD_GETLK, so a byte
 * is tested by asking for an exclusive lock on it through this node's own open file description:
 * the kernel grants that only when no other description locks the byte, and converts our shared
 * lock in place (OFD locks of one description replace each other); the byte is then put back as
 * it was (shared, or unlocked). That needs a descriptor open for writing, so each lock holds its
 * own descriptor of the image, opened read-write where the file allows it. A read-only
 * descriptor (a file this user cannot write) tests by reading /proc/locks instead, which works
 * because a read-only node never tests a byte it locks itself.
 *
 * OFD locks belong to the open file description, not the process: a second open of the same file
 * in this process conflicts like any other user, and closing some other descriptor of the file
 * drops nothing (the classic POSIX-lock pitfall does not apply). On top of the kernel's check an
 * in-process table of holders (by device and inode) refuses a conflicting second open with the
 * node that holds the image named, also where the native locks are not available.
 *
 * `locking=on|off|auto` (default auto): off takes and checks nothing; on fails when the native
 * locks cannot be loaded (or the system is not Linux, where the package would take whole-file
 * flock() locks instead); auto then falls back to the in-process table alone.
 *
 * Global-state code: opened and released by the driver's open, close and snapshot goto.
 */
import fs from 'node:fs';
import { assertBql, type Bql } from '../../block/bql.js';
import { BlockError } from '../../block/errors.js';
import { ofdLocks, ofdLocksUnavailableReason, type OfdLocks } from '../../block/ofd-locks.js';

/** Permission bits, as QEMU's BLK_PERM_*. */
export const PERM_CONSISTENT_READ = 0x1;
export const PERM_WRITE = 0x2;
export const PERM_WRITE_UNCHANGED = 0x4;
export const PERM_RESIZE = 0x8;
export const PERM_ALL = 0xf;
/** QEMU's names for the bits, as its messages print them. */
const PERM_NAMES = ['consistent read', 'write', 'write unchanged', 'resize'] as const;
/** First lock byte of the held permissions, and of the permissions not shared. */
export const LOCK_PERM_BASE = 100;
export const LOCK_SHARED_BASE = 200;

/** The `locking` option of a file node. */
export type LockingMode = 'on' | 'off' | 'auto';

/** What a node holds and what it lets others hold. */
export interface LockPerms {
  perm: number;
  shared: number;
}

/**
 * The permissions a file node takes, as QEMU's for the file child of a format node: read/write
 * holds consistent read, write and resize and shares neither write nor resize; read-only holds
 * consistent read and shares neither; force-share (`-U`) shares everything.
 * @locking common
 */
export function filePerms(readOnly: boolean, forceShare: boolean): LockPerms {
  const perm = readOnly ? PERM_CONSISTENT_READ : PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE;
  const shared = forceShare ? PERM_ALL : PERM_ALL & ~(PERM_WRITE | PERM_RESIZE);
  return { perm, shared };
}

type NativeLocks = OfdLocks;
const nativeLocks = ofdLocks;

/**
 * True when OFD byte-range locks are available (fs-native-extensions loaded).
 * @locking common
 */
export function imageLocksAvailable(): boolean {
  return nativeLocks() !== null;
}

/** In-process holders by `dev:ino`. */
const holders = new Map<string, Set<ImageLock>>();

function fileKey(st: { dev: number; ino: number }): string {
  return `${st.dev}:${st.ino}`;
}

function lockError(filename: string, nodeName: string, what: string, bit: number, byte: number, heldBy: string | null): BlockError {
  const who = heldBy === null ? '' : ` (node '${heldBy}' of this process holds it)`;
  return new BlockError('EBUSY', `Failed to get ${what}"${PERM_NAMES[bit] ?? `bit ${bit}`}" lock${who}\nIs another process using the image [${filename}]?`, {
    node: nodeName,
    file: filename,
    field: 'locking',
    value: byte,
    op: 'lock',
  });
}

/** The Linux dev_t of `st.dev` as /proc/locks prints it (`MAJ:MIN` in hex). */
function procLocksDevice(dev: number): string {
  const d = BigInt(dev);
  const major = ((d >> 8n) & 0xfffn) | ((d >> 32n) & ~0xfffn);
  const minor = (d & 0xffn) | ((d >> 12n) & ~0xffn);
  return `${major.toString(16).padStart(2, '0')}:${minor.toString(16).padStart(2, '0')}`;
}

/**
 * Opens (creating it if absent) `filename` for an image create, takes its read/write lock, and
 * truncates it to 0 only once the lock is held, as qemu-img create does: an image another user
 * holds is refused (EBUSY, QEMU's message) and left untouched. Close `fd`, then `release`.
 * @locking global-state
 */
export function openForCreate(bql: Bql, filename: string): { fd: number; release: () => void } {
  assertBql(bql, 'image create');
  const fd = fs.openSync(filename, fs.constants.O_RDWR | fs.constants.O_CREAT, 0o644);
  let lock: ImageLock | null;
  try {
    lock = ImageLock.acquire(bql, filename, 'create', filePerms(false, false), 'auto');
    fs.ftruncateSync(fd, 0);
  } catch (e) {
    fs.closeSync(fd);
    throw e;
  }
  return { fd, release: () => lock?.release(bql) };
}

/** A lock being moved to a new file: exactly one of the two is called. */
export interface LockMove {
  commit(): void;
  abort(): void;
}

/** An image's lock bytes held through one descriptor of it. */
export class ImageLock {
  private fd: number;
  private key: string;
  private st: { dev: number; ino: number };
  /** Native lock bytes taken (false when only the in-process table applies). */
  private readonly useNative: boolean;
  private released = false;

  private constructor(
    fd: number,
    st: { dev: number; ino: number },
    private readonly writableFd: boolean,
    readonly perms: LockPerms,
    private readonly filename: string,
    private readonly nodeName: string,
    useNative: boolean,
  ) {
    this.fd = fd;
    this.st = st;
    this.key = fileKey(st);
    this.useNative = useNative;
  }

  /**
   * Locks `filename` for `perms` as `mode` asks; null with locking=off. EBUSY in QEMU's words when
   * another user conflicts, ENOTSUP for locking=on without native locks.
   * @locking global-state
   */
  static acquire(bql: Bql, filename: string, nodeName: string, perms: LockPerms, mode: LockingMode): ImageLock | null {
    assertBql(bql, 'image lock');
    if (mode === 'off') return null;
    const nat = nativeLocks();
    if (nat === null && mode === 'on') {
      throw new BlockError('ENOTSUP', `locking=on for '${filename}' (node '${nodeName}'): OFD locks are not available (${ofdLocksUnavailableReason()})`, {
        node: nodeName,
        file: filename,
        field: 'locking',
      });
    }
    let fd: number;
    let writable = true;
    try {
      fd = fs.openSync(filename, 'r+');
    } catch {
      writable = false;
      fd = fs.openSync(filename, 'r'); // the caller opened it already: an error here is the file's
    }
    const st = fs.fstatSync(fd);
    const lock = new ImageLock(fd, { dev: st.dev, ino: st.ino }, writable, perms, filename, nodeName, nat !== null);
    try {
      lock.checkInProcess();
      lock.applyAndCheck();
    } catch (e) {
      lock.closeFd();
      throw e;
    }
    lock.register();
    return lock;
  }

  /**
   * Locks the file at `newPath` (a clone about to be renamed over the image) through a new
   * descriptor; `commit` then lets go of the old file, `abort` of the new one.
   * @locking global-state
   */
  prepareMove(bql: Bql, newPath: string): LockMove {
    assertBql(bql, 'image lock move');
    this.assertLive();
    const fd = fs.openSync(newPath, this.writableFd ? 'r+' : 'r');
    const st = fs.fstatSync(fd);
    const next = new ImageLock(fd, { dev: st.dev, ino: st.ino }, this.writableFd, this.perms, this.filename, this.nodeName, this.useNative);
    try {
      next.applyAndCheck();
    } catch (e) {
      next.closeFd();
      throw e;
    }
    let done = false;
    return {
      commit: () => {
        if (done) return;
        done = true;
        this.unregister();
        this.closeFd();
        this.fd = next.fd;
        this.st = next.st;
        this.key = next.key;
        this.register();
      },
      abort: () => {
        if (done) return;
        done = true;
        next.closeFd();
      },
    };
  }

  /**
   * Drops the lock bytes (closing the descriptor drops them all).
   * @locking global-state
   */
  release(bql: Bql): void {
    assertBql(bql, 'image lock release');
    if (this.released) return;
    this.released = true;
    this.unregister();
    this.closeFd();
  }

  private assertLive(): void {
    if (this.released) throw new BlockError('EINVAL', `The image lock of '${this.filename}' (node '${this.nodeName}') was released`, { node: this.nodeName, file: this.filename });
  }

  private register(): void {
    let set = holders.get(this.key);
    if (set === undefined) holders.set(this.key, (set = new Set()));
    set.add(this);
  }

  private unregister(): void {
    const set = holders.get(this.key);
    if (set === undefined) return;
    set.delete(this);
    if (set.size === 0) holders.delete(this.key);
  }

  private closeFd(): void {
    try {
      fs.closeSync(this.fd);
    } catch {
      // nothing more to drop
    }
  }

  /** QEMU's rule against the other holders of this file inside the process. */
  private checkInProcess(): void {
    for (const other of holders.get(this.key) ?? []) {
      for (let bit = 0; bit < PERM_NAMES.length; bit++) {
        const m = 1 << bit;
        if ((this.perms.perm & m) !== 0 && (other.perms.shared & m) === 0) throw lockError(this.filename, this.nodeName, '', bit, LOCK_SHARED_BASE + bit, other.nodeName);
      }
      for (let bit = 0; bit < PERM_NAMES.length; bit++) {
        const m = 1 << bit;
        if ((this.perms.shared & m) === 0 && (other.perms.perm & m) !== 0) throw lockError(this.filename, this.nodeName, 'shared ', bit, LOCK_PERM_BASE + bit, other.nodeName);
      }
    }
  }

  /** The bytes this lock takes. */
  private heldBytes(): Set<number> {
    const bytes = new Set<number>();
    for (let bit = 0; bit < PERM_NAMES.length; bit++) {
      const m = 1 << bit;
      if ((this.perms.perm & m) !== 0) bytes.add(LOCK_PERM_BASE + bit);
      if ((this.perms.shared & m) === 0) bytes.add(LOCK_SHARED_BASE + bit);
    }
    return bytes;
  }

  /** raw_apply_lock_bytes then raw_check_lock_bytes, through the kernel. */
  private applyAndCheck(): void {
    const nat = this.useNative ? nativeLocks() : null;
    if (nat === null) return;
    const held = this.heldBytes();
    for (const byte of held) {
      if (!nat.tryLock(this.fd, byte, 1, { shared: true })) {
        throw new BlockError('EBUSY', `Failed to lock byte ${byte}\nIs another process using the image [${this.filename}]?`, {
          node: this.nodeName,
          file: this.filename,
          field: 'locking',
          value: byte,
          op: 'lock',
        });
      }
    }
    const taken = this.writableFd ? null : this.procLocks();
    const test = (byte: number): boolean => (taken === null ? this.othersLock(nat, byte, held.has(byte)) : taken.has(byte));
    for (let bit = 0; bit < PERM_NAMES.length; bit++) {
      if ((this.perms.perm & (1 << bit)) !== 0 && test(LOCK_SHARED_BASE + bit)) throw lockError(this.filename, this.nodeName, '', bit, LOCK_SHARED_BASE + bit, null);
    }
    for (let bit = 0; bit < PERM_NAMES.length; bit++) {
      if ((this.perms.shared & (1 << bit)) === 0 && test(LOCK_PERM_BASE + bit)) throw lockError(this.filename, this.nodeName, 'shared ', bit, LOCK_PERM_BASE + bit, null);
    }
  }

  /** True when another open file description locks `byte`; our own lock on it is put back as it was. */
  private othersLock(nat: NativeLocks, byte: number, heldHere: boolean): boolean {
    if (!nat.tryLock(this.fd, byte, 1, { shared: false })) return true;
    if (heldHere) nat.tryLock(this.fd, byte, 1, { shared: true }); // a downgrade never conflicts
    else nat.unlock(this.fd, byte, 1);
    return false;
  }

  /** The lock bytes of this file that /proc/locks shows (read-only descriptors: none of them ours). */
  private procLocks(): Set<number> {
    const out = new Set<number>();
    let text: string;
    try {
      text = fs.readFileSync('/proc/locks', 'utf8');
    } catch {
      return out; // no /proc: the in-process table is all there is
    }
    const dev = `${procLocksDevice(this.st.dev)}:${this.st.ino}`;
    for (const line of text.split('\n')) {
      const f = line.trim().split(/\s+/);
      const at = f.indexOf(dev);
      if (at < 0) continue;
      const start = Number(f[at + 1]);
      const endField = f[at + 2];
      const end = endField === 'EOF' ? Number.MAX_SAFE_INTEGER : Number(endField);
      for (let b = LOCK_PERM_BASE; b < LOCK_SHARED_BASE + PERM_NAMES.length; b++) if (b >= start && b <= end) out.add(b);
    }
    return out;
  }
}

/**
 * Open-file-description byte-range locks (fcntl F_OFD_SETLK), the locks QEMU's image locking and
 * pidfiles use, from fs-native-extensions (a prebuilt N-API binary in the npm package). Loaded
 * once; null where they are not available (not Linux, or the binary cannot be loaded), with the
 * reason kept for messages.
 *
 * Common code: the calls are synchronous system calls on a descriptor the caller owns.
 */
import { createRequire } from 'node:module';

/** The calls of fs-native-extensions used here. */
export interface OfdLocks {
  /** Takes a lock on [offset, offset+length) (length 0: to the end and beyond); false when another description holds a conflicting one. */
  tryLock(fd: number, offset: number, length: number, opts: { shared: boolean }): boolean;
  /** Drops this description's lock on the range. */
  unlock(fd: number, offset: number, length: number): void;
}

let loaded = false;
let locks: OfdLocks | null = null;
let why = '';

function isOfdLocks(m: unknown): m is OfdLocks {
  return typeof m === 'object' && m !== null && 'tryLock' in m && typeof m.tryLock === 'function' && 'unlock' in m && typeof m.unlock === 'function';
}

/**
 * The OFD lock calls, or null when this system has none.
 * @locking common
 */
export function ofdLocks(): OfdLocks | null {
  if (!loaded) {
    loaded = true;
    if (process.platform !== 'linux') {
      // elsewhere the package locks whole files with flock(), which QEMU does not see
      why = `OFD byte-range locks are Linux-only (this is ${process.platform})`;
      return null;
    }
    try {
      const m: unknown = createRequire(import.meta.url)('fs-native-extensions');
      if (isOfdLocks(m)) locks = m;
      else why = 'fs-native-extensions has no tryLock/unlock';
    } catch (e) {
      why = e instanceof Error ? e.message : String(e);
    }
  }
  return locks;
}

/**
 * Why ofdLocks() is null ('' when the locks are available or not yet loaded).
 * @locking common
 */
export function ofdLocksUnavailableReason(): string {
  return why;
}

/**
 * Pidfiles as QEMU writes them (util/oslib-posix.c qemu_write_pidfile): the file is created 0600,
 * locked for the process's lifetime with a write lock on the whole file, checked to still be the
 * file at that path (another starter may have replaced it between open and lock), truncated and
 * given `PID\n`. A second daemon or `snapstack nbd` given the same pidfile therefore fails with
 * "Cannot lock pid file: Resource temporarily unavailable", as qemu-storage-daemon and qemu-nbd
 * do, instead of overwriting the first one's file (and deleting it when it exits). The lock is an
 * OFD lock, which conflicts with QEMU's lockf(): the tools see each other's pidfiles. Where OFD
 * locks are not available the file is written without a lock.
 *
 * Process code: called by the command-line tools on the main thread.
 */
import fs from 'node:fs';
import { BlockError, systemErrorText } from '../block/errors.js';
import { ofdLocks } from '../block/ofd-locks.js';

/** A pidfile this process holds: its lock lives as long as `fd` is open. */
export interface HeldPidfile {
  readonly path: string;
  /** Unlinks the file if it still holds our pid, and drops the lock. */
  release(): void;
}

function errnoText(e: unknown): { code: string; text: string } {
  const code = typeof e === 'object' && e !== null && 'code' in e ? String((e as { code: unknown }).code) : 'EIO';
  return { code, text: systemErrorText(e) };
}

/**
 * Creates, locks and writes the pidfile `path` with this process's pid. Throws a BlockError with
 * QEMU's text: "Could not create 'PATH': ..." or "Cannot lock pid file: Resource temporarily
 * unavailable" (code EBUSY) when another live process holds it.
 * @locking common
 */
export function writeLockedPidfile(path: string): HeldPidfile {
  const locks = ofdLocks();
  for (let attempt = 0; ; attempt++) {
    let fd: number;
    try {
      fd = fs.openSync(path, fs.constants.O_CREAT | fs.constants.O_WRONLY, 0o600);
    } catch (e) {
      const { code, text } = errnoText(e);
      throw new BlockError(code === 'EACCES' ? 'EACCES' : 'EIO', `Could not create '${path}': ${text}`, { file: path, cause: e });
    }
    try {
      if (locks !== null && !locks.tryLock(fd, 0, 0, { shared: false })) {
        throw new BlockError('EBUSY', 'Cannot lock pid file: Resource temporarily unavailable', { file: path });
      }
      // the path may have been unlinked and made again since we opened it: lock the one that is there
      const opened = fs.fstatSync(fd);
      let there: fs.Stats | null = null;
      try {
        there = fs.statSync(path);
      } catch {
        there = null;
      }
      if (there === null || there.ino !== opened.ino || there.dev !== opened.dev) {
        fs.closeSync(fd);
        if (attempt < 8) continue;
        throw new BlockError('EBUSY', `Cannot lock pid file: '${path}' keeps being replaced`, { file: path });
      }
      fs.ftruncateSync(fd, 0);
      fs.writeSync(fd, `${process.pid}\n`, 0);
    } catch (e) {
      try {
        fs.closeSync(fd);
      } catch {
        // already closed above
      }
      if (e instanceof BlockError) throw e;
      const { code, text } = errnoText(e);
      throw new BlockError(code === 'ENOSPC' ? 'ENOSPC' : 'EIO', `Failed to write pid file '${path}': ${text}`, { file: path, cause: e });
    }
    const held = fd;
    let released = false;
    return {
      path,
      release(): void {
        if (released) return;
        released = true;
        try {
          if (fs.readFileSync(path, 'utf8') === `${process.pid}\n`) fs.unlinkSync(path);
        } catch {
          // removed by someone else
        }
        fs.closeSync(held);
      },
    };
  }
}

/**
 * `snapstack daemon` as a child process for tests: started in the foreground in a directory, its
 * stderr collected and its exit status a promise; the caller's list of children is what its
 * afterAll kills.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';

const BIN = path.resolve('bin/snapstack.js');

/** A daemon started in the foreground, with its output and a promise of its exit status. */
export interface Daemon {
  proc: ChildProcess;
  stderr: () => string;
  exited: Promise<number | null>;
}

/** Starts `snapstack daemon ARGS` in `cwd`, adding the process to `children`. */
export function startDaemon(args: string[], cwd: string, children: ChildProcess[]): Daemon {
  const proc = spawn(process.execPath, [BIN, 'daemon', ...args], { stdio: ['ignore', 'pipe', 'pipe'], cwd });
  children.push(proc);
  let err = '';
  proc.stderr?.on('data', (d: Buffer) => (err += d.toString()));
  proc.stdout?.resume();
  const exited = new Promise<number | null>((resolve) => proc.once('exit', (code) => resolve(code)));
  return { proc, stderr: () => err, exited };
}

/**
 * `snapstack daemon` as a child process for tests: started in the foreground in a directory, its
 * stderr collected and its exit status a promise; the caller's list of children is what its
 * afterAll kills.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
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

/** Waits until `file` exists (the pidfile is written last: the daemon is ready then); fails early if `d` exits. */
export async function waitForFile(file: string, d: Daemon | null, timeoutMs = 15_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!fs.existsSync(file)) {
    if (d !== null && d.proc.exitCode !== null) throw new Error(`the daemon exited (${d.proc.exitCode}): ${d.stderr()}`);
    if (Date.now() > deadline) throw new Error(`${file} did not appear${d === null ? '' : `: ${d.stderr()}`}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** A TCP port on 127.0.0.1 nothing listens on right now. */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen({ host: '127.0.0.1', port: 0 }, () => {
      const a = s.address();
      const port = typeof a === 'object' && a !== null ? a.port : 0;
      s.close(() => resolve(port));
    });
  });
}

/**
 * Helpers of the NBD client tests: real servers (qemu-nbd, nbdkit) on unix sockets in a
 * temporary directory, started and stopped per test, and a describe() that needs nbdkit (runs;
 * fails in CI when it is missing; skips with the reason elsewhere, like describeInterop).
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { describe, it } from 'vitest';
import { SKIP_REPORT } from './helpers/qemu.js';
import { waitForListening } from './helpers/socket.js';

/** A server process and its socket. */
export interface ServerProcess {
  socket: string;
  proc: ChildProcess;
  stop(): Promise<void>;
}

function inCI(): boolean {
  const ci = process.env['CI'];
  return ci !== undefined && ci !== '' && ci !== 'false';
}

/** A describe() whose tests need `tool`: runs, fails in CI when it is missing, or skips and says why. */
export function describeWithTool(tool: string, installHint: string, name: string, fn: () => void): void {
  if (spawnSync(tool, ['--version'], { stdio: 'ignore' }).status === 0) {
    describe(name, fn);
    return;
  }
  const why = `${tool} not found (${installHint})`;
  if (inCI()) {
    describe(name, () => {
      it(`has ${tool}, which it needs in CI`, () => {
        throw new Error(`suite '${name}' cannot run in CI: ${why}`);
      });
    });
    return;
  }
  fs.mkdirSync(path.dirname(SKIP_REPORT), { recursive: true });
  fs.appendFileSync(SKIP_REPORT, `${name}: ${why}\n`);
  describe.skip(name, fn);
}

/** SIGTERM to `proc` and its exit awaited (nothing when it has already gone). */
async function stopProcess(proc: ChildProcess): Promise<void> {
  if (proc.exitCode !== null || proc.signalCode !== null) return;
  const exited = new Promise<void>((r) => proc.once('exit', () => r()));
  proc.kill('SIGTERM');
  await exited;
}

/** Starts a server command that listens on `socket`; resolves once it accepts connections. */
export async function startServer(cmd: string, args: string[], socket: string): Promise<ServerProcess> {
  fs.rmSync(socket, { force: true });
  const proc = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  proc.stderr?.on('data', (b: Buffer) => (err += b.toString()));
  await waitForListening(socket, proc, `${cmd} ${args.join(' ')}`, () => err);
  return {
    socket,
    proc,
    stop: () => stopProcess(proc),
  };
}

/** qemu-nbd serving `file` (format `fmt`) as export `name` on `socket`, persistent, writable. */
export function startQemuNbd(file: string, fmt: 'raw' | 'qcow2', name: string, socket: string): Promise<ServerProcess> {
  return startServer('qemu-nbd', ['-k', socket, '-f', fmt, '-x', name, '-t', '--cache=writeback', file], socket);
}

/** nbdkit in the foreground on `socket` with a plugin and its arguments (filters first). */
export function startNbdkit(socket: string, args: string[]): Promise<ServerProcess> {
  return startServer('nbdkit', ['-f', '--exit-with-parent', '-U', socket, ...args], socket);
}

/** Deterministic pseudo-random bytes. */
export function pattern(seed: number, length: number): Uint8Array {
  const out = new Uint8Array(length);
  let x = (seed * 2654435761 + 1) >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}

/** The first byte where a and b differ, -1 when equal. */
export function firstDifference(a: Uint8Array, b: Uint8Array): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return a.length === b.length ? -1 : n;
}

/** qemu-nbd on TCP 127.0.0.1:`port` serving `file` (raw) as export `name`; resolves once it accepts connections. */
export async function startQemuNbdTcp(file: string, name: string, port: number): Promise<ServerProcess> {
  const proc = spawn('qemu-nbd', ['-b', '127.0.0.1', '-p', String(port), '-f', 'raw', '-x', name, '-t', file], { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  proc.stderr?.on('data', (b: Buffer) => (err += b.toString()));
  const deadline = Date.now() + 10_000;
  for (;;) {
    if (proc.exitCode !== null) throw new Error(`qemu-nbd exited with ${proc.exitCode}: ${err}`);
    const ok = await new Promise<boolean>((resolve) => {
      const s = net.connect({ host: '127.0.0.1', port }, () => {
        s.destroy();
        resolve(true);
      });
      s.on('error', () => resolve(false));
    });
    if (ok) break;
    if (Date.now() > deadline) throw new Error(`qemu-nbd did not listen on port ${port} within 10 s: ${err}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  return {
    socket: `127.0.0.1:${port}`,
    proc,
    stop: () => stopProcess(proc),
  };
}

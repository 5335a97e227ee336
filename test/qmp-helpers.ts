/**
 * Helpers of the QMP tests: a qemu-storage-daemon 7.2 started on a unix socket in a temporary
 * directory (the oracle), and describeQsd, which runs a suite when QSD is installed, fails it in
 * CI when it is not, and otherwise skips it and records the skip for `npm test`'s report.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, it } from 'vitest';
import { SKIP_REPORT } from './helpers/qemu.js';
import { waitForListening } from './helpers/socket.js';
import { QmpClient } from '../src/qmp/client.js';
import type { QmpObject, QmpValue } from '../src/qmp/types.js';

const QSD = 'qemu-storage-daemon';

function hasQsd(): boolean {
  return spawnSync(QSD, ['--version'], { stdio: 'ignore' }).status === 0;
}

function inCi(): boolean {
  const ci = process.env['CI'];
  return ci !== undefined && ci !== '' && ci !== 'false';
}

/** A describe() that needs qemu-storage-daemon: runs, fails in CI when it is missing, or skips and says so. */
export function describeQsd(name: string, fn: () => void): void {
  if (hasQsd()) {
    describe(name, fn);
    return;
  }
  const why = `${QSD} not found (apt-get install qemu-system-common)`;
  if (inCi()) {
    describe(name, () => {
      it('has the qemu-storage-daemon oracle it needs in CI', () => {
        throw new Error(`QMP suite '${name}' cannot run in CI: ${why}`);
      });
    });
    return;
  }
  fs.mkdirSync(path.dirname(SKIP_REPORT), { recursive: true });
  fs.appendFileSync(SKIP_REPORT, `${name}: ${why}\n`);
  describe.skip(name, fn);
}

/** A running qemu-storage-daemon with a QMP monitor on `socket`. */
export interface Qsd {
  socket: string;
  dir: string;
  proc: ChildProcess;
  stop(): Promise<void>;
}

/** A fresh temporary directory for one suite. */
export function tempDir(prefix: string): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

/** Starts QSD with a QMP monitor on a unix socket in `dir` (and any extra arguments); waits for the socket. */
export async function startQsd(dir: string, extraArgs: string[] = []): Promise<Qsd> {
  const socket = path.join(dir, 'qsd.sock');
  const proc = spawn(QSD, ['--chardev', `socket,id=c0,path=${socket},server=on,wait=off`, '--monitor', 'chardev=c0', ...extraArgs], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let stderr = '';
  proc.stderr?.on('data', (d: Buffer) => {
    stderr += d.toString();
  });
  try {
    await waitForListening(socket, proc, 'qemu-storage-daemon', () => stderr);
  } catch (e) {
    proc.kill('SIGKILL');
    throw e;
  }
  const exited = new Promise<void>((resolve) => {
    if (proc.exitCode !== null) resolve();
    else proc.once('exit', () => resolve());
  });
  return {
    socket,
    dir,
    proc,
    async stop() {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGTERM');
      const timer = setTimeout(() => proc.kill('SIGKILL'), 5000);
      await exited;
      clearTimeout(timer);
    },
  };
}

/** A JSON value's kind for shape comparisons: 'missing', 'null', 'array' or its typeof. */
export function kind(v: QmpValue | undefined): string {
  if (v === undefined) return 'missing';
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'array';
  return typeof v;
}

/** True for a JSON object. */
export function isObj(v: QmpValue | undefined): v is QmpObject {
  return kind(v) === 'object';
}

/**
 * Differences of shape between `a` (the peer, named `peer`) and `b` (snapstack): key sets and JSON
 * types, recursively, pushed to `out` with the path where they are.
 */
export function shapeDiff(a: QmpValue | undefined, b: QmpValue | undefined, at: string, out: string[], peer = 'QSD'): void {
  if (kind(a) !== kind(b)) {
    out.push(`${at}: ${peer} has ${kind(a)}, snapstack ${kind(b)}`);
    return;
  }
  if (Array.isArray(a) && Array.isArray(b)) {
    if (a.length !== b.length) out.push(`${at}: ${peer} has ${a.length} elements, snapstack ${b.length}`);
    for (let i = 0; i < Math.min(a.length, b.length); i++) shapeDiff(a[i], b[i], `${at}[${i}]`, out, peer);
    return;
  }
  if (isObj(a) && isObj(b)) {
    for (const k of new Set([...Object.keys(a), ...Object.keys(b)])) shapeDiff(a[k], b[k], `${at}.${k}`, out, peer);
  }
}

/**
 * Starts qemu-system-x86_64 with `args` and a QMP monitor on `sock`, connects and negotiates;
 * `stop` quits it and waits for its exit.
 */
export async function startQemuSystem(args: string[], sock: string): Promise<{ client: QmpClient; stop(): Promise<void> }> {
  const proc = spawn('qemu-system-x86_64', [...args, '-qmp', `unix:${sock},server=on,wait=off`], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  proc.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
  await waitForListening(sock, proc, 'qemu-system-x86_64', () => stderr);
  const client = await QmpClient.connect({ path: sock });
  return {
    client,
    stop: async () => {
      await client.execute('quit').catch(() => undefined);
      await client.close();
      if (proc.exitCode === null) await new Promise((r) => proc.once('exit', r));
    },
  };
}

/**
 * Pidfiles are locked for the owner's lifetime, as QEMU's qemu_write_pidfile does: a second
 * daemon or `snapstack nbd` given the same pidfile fails and leaves the first one's file alone,
 * and the lock is seen by qemu-storage-daemon and qemu-nbd (their lockf conflicts with our OFD
 * lock) both ways. Found by the new-user trial: the second start used to overwrite the file, and
 * whichever exited first deleted the pidfile the other still owned.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { writeLockedPidfile } from '../src/cli/pidfile.js';
import { startDaemon } from './helpers/daemon.js';
import { describeInterop } from './helpers/qemu.js';

let dir: string;
const children: ChildProcess[] = [];
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-pidfile-'));
});
afterAll(() => {
  for (const c of children) if (c.exitCode === null) c.kill('SIGKILL');
  fs.rmSync(dir, { recursive: true, force: true });
});

async function until(what: string, cond: () => boolean, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

function run(cmd: string, args: string[]): Promise<{ status: number | null; stderr: string }> {
  return new Promise((resolve) => {
    const p = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    p.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
    p.once('exit', (status) => resolve({ status, stderr }));
  });
}

describe('writeLockedPidfile', () => {
  it('holds the file until released: a second holder is refused, the file keeps the first pid', () => {
    const p = path.join(dir, 'unit.pid');
    const held = writeLockedPidfile(p);
    expect(fs.readFileSync(p, 'utf8')).toBe(`${process.pid}\n`);
    expect(() => writeLockedPidfile(p)).toThrow(/Cannot lock pid file: Resource temporarily unavailable/);
    expect(fs.readFileSync(p, 'utf8')).toBe(`${process.pid}\n`);
    held.release();
    expect(fs.existsSync(p)).toBe(false);
    const again = writeLockedPidfile(p);
    again.release();
  });

  it('names the path when it cannot create the file', () => {
    expect(() => writeLockedPidfile(path.join(dir, 'missing', 'x.pid'))).toThrow(`Could not create '${path.join(dir, 'missing', 'x.pid')}': No such file or directory`);
  });
});

describeInterop('pidfiles between snapstack and QEMU', () => {
  it('a second snapstack daemon on the pidfile fails, so does qemu-storage-daemon; the first keeps running and removes it at exit', async () => {
    const pid = path.join(dir, 'daemon.pid');
    const first = startDaemon(['--pidfile', pid], dir, children);
    await until('the first daemon to write its pidfile', () => fs.existsSync(pid) && fs.readFileSync(pid, 'utf8') !== '');
    expect(fs.readFileSync(pid, 'utf8')).toBe(`${first.proc.pid}\n`);
    const second = startDaemon(['--pidfile', pid], dir, children);
    expect(await second.exited).toBe(1);
    expect(second.stderr()).toContain('cannot create PID file: Cannot lock pid file: Resource temporarily unavailable');
    const qsd = await run('qemu-storage-daemon', ['--pidfile', pid]);
    expect(qsd.status).toBe(1);
    expect(qsd.stderr).toContain('Cannot lock pid file');
    expect(fs.readFileSync(pid, 'utf8')).toBe(`${first.proc.pid}\n`);
    // with nothing to serve it still runs (as QSD): it was alive through all of the above
    expect(first.proc.exitCode).toBeNull();
    first.proc.kill('SIGTERM');
    expect(await first.exited).toBe(0);
    expect(fs.existsSync(pid)).toBe(false);
  });

  it('snapstack nbd refuses a pidfile qemu-nbd holds, and qemu-nbd one snapstack nbd holds', async () => {
    const img = path.join(dir, 'img.raw');
    fs.writeFileSync(img, Buffer.alloc(1024 * 1024));
    const pid = path.join(dir, 'nbd.pid');
    const theirs = spawn('qemu-nbd', ['-t', '-r', '-f', 'raw', '-k', path.join(dir, 'q.sock'), `--pid-file=${pid}`, img], { stdio: 'ignore' });
    children.push(theirs);
    await until('qemu-nbd to write its pidfile', () => fs.existsSync(pid) && fs.readFileSync(pid, 'utf8') !== '');
    const ours = await run(process.execPath, [path.resolve('bin/snapstack.js'), 'nbd', '-t', '-r', '-f', 'raw', '-k', path.join(dir, 's.sock'), `--pid-file=${pid}`, img]);
    expect(ours.status).toBe(1);
    expect(ours.stderr).toContain('Cannot lock pid file: Resource temporarily unavailable');
    expect(fs.readFileSync(pid, 'utf8')).toBe(`${theirs.pid}\n`);
    theirs.kill('SIGTERM');
    await new Promise((r) => theirs.once('exit', r));
    const pid2 = path.join(dir, 'nbd2.pid');
    const oursServer = spawn(process.execPath, [path.resolve('bin/snapstack.js'), 'nbd', '-t', '-r', '-f', 'raw', '-k', path.join(dir, 's2.sock'), `--pid-file=${pid2}`, img], { stdio: 'ignore' });
    children.push(oursServer);
    await until('snapstack nbd to write its pidfile', () => fs.existsSync(pid2) && fs.readFileSync(pid2, 'utf8') !== '');
    const qemuNbd = await run('qemu-nbd', ['-t', '-r', '-f', 'raw', '-k', path.join(dir, 'q2.sock'), `--pid-file=${pid2}`, img]);
    expect(qemuNbd.status).toBe(1);
    expect(qemuNbd.stderr).toContain('Cannot lock pid file');
    oursServer.kill('SIGTERM');
    await new Promise((r) => oursServer.once('exit', r));
    expect(fs.existsSync(pid2)).toBe(false);
  });
});

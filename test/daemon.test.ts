/**
 * `snapstack daemon` as a process (bin/snapstack.js, built by `npm test`), driven over QMP with
 * src/qmp/client.ts: nodes and IOThreads from the command line, the pidfile, monitors on unix and
 * TCP sockets, --daemonize, clean shutdown by SIGTERM, SIGINT, SIGHUP and QMP quit (image locks
 * released: qemu-img then opens the image for writing), and bad command lines failing with
 * qemu-storage-daemon 7.2's messages and exit code.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { QmpClient } from '../src/qmp/client.js';
import { freePort, startDaemon as startDaemonIn, waitForFile, type Daemon } from './helpers/daemon.js';
import type { QmpObject } from '../src/qmp/types.js';
import { describeInterop, qemu, qemuStatus } from './helpers/qemu.js';
import { describeQsd } from './qmp-helpers.js';

const BIN = path.resolve('bin/snapstack.js');
let dir = '';
const children: ChildProcess[] = [];

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-daemon-'));
});
afterAll(() => {
  for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  // a daemonized child left behind by a failed test
  for (const f of fs.existsSync(dir) ? fs.readdirSync(dir) : []) {
    if (!f.endsWith('.pid')) continue;
    const pid = Number(fs.readFileSync(path.join(dir, f), 'utf8'));
    try {
      if (pid > 0) process.kill(pid, 'SIGKILL');
    } catch {
      // gone
    }
  }
  fs.rmSync(dir, { recursive: true, force: true });
});

const startDaemon = (args: string[]): Daemon => startDaemonIn(args, dir, children);

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** qemu-img snapshot -c opens the image for writing: refused while the daemon holds it. */
function writeOpen(img: string): { status: number; stderr: string } {
  const r = qemuStatus('qemu-img', ['snapshot', '-c', `t${Date.now()}`, img]);
  return { status: r.status, stderr: r.stderr };
}

function names(nodes: unknown): string[] {
  return (nodes as QmpObject[]).map((n) => String(n['node-name'])).sort();
}

describeInterop('snapstack daemon', () => {
  let img = '';
  let raw = '';
  beforeAll(() => {
    img = path.join(dir, 'disk.qcow2');
    raw = path.join(dir, 'disk.raw');
    qemu('qemu-img', ['create', '-f', 'qcow2', img, '16M']);
    qemu('qemu-io', ['-c', 'write -P 0x5a 0 64k', img]);
    qemu('qemu-img', ['create', '-f', 'raw', raw, '1M']);
  });

  it('serves the --blockdev nodes and --object IOThreads over QMP, writes the pidfile, and on SIGTERM closes everything and exits 0', async () => {
    const sock = path.join(dir, 'a.sock');
    const pidfile = path.join(dir, 'a.pid');
    const d = startDaemon([
      '--object', 'iothread,id=io0',
      '--blockdev', `driver=qcow2,node-name=disk0,file.driver=file,file.filename=${img}`,
      '--blockdev', JSON.stringify({ driver: 'raw', 'node-name': 'raw0', file: { driver: 'file', filename: raw } }),
      '--chardev', `socket,id=c0,path=${sock},server=on,wait=off`,
      '--monitor', 'chardev=c0',
      '--pidfile', pidfile,
    ]);
    await waitForFile(pidfile, d);
    expect(fs.readFileSync(pidfile, 'utf8')).toBe(`${d.proc.pid}\n`);
    expect(fs.statSync(sock).isSocket()).toBe(true);
    const c = await QmpClient.connect({ path: sock });
    try {
      expect(names(await c.execute('query-named-block-nodes', { flat: true }))).toEqual(expect.arrayContaining(['disk0', 'raw0']));
      const top = (await c.execute('query-named-block-nodes', { flat: true })) as QmpObject[];
      expect(top.find((n) => n['node-name'] === 'disk0')).toMatchObject({ drv: 'qcow2', image: { 'virtual-size': 16 * 1024 * 1024 } });
      expect(((await c.execute('query-iothreads')) as QmpObject[]).map((t) => t['id'])).toEqual(['io0']);
    } finally {
      await c.close();
    }
    // the daemon holds the image: qemu-img cannot open it for writing
    const busy = writeOpen(img);
    expect(busy.status).toBe(1);
    expect(busy.stderr).toContain('Failed to get "write" lock');
    d.proc.kill('SIGTERM');
    expect(await d.exited).toBe(0);
    expect(d.stderr()).toBe('');
    expect(fs.existsSync(pidfile)).toBe(false);
    expect(fs.existsSync(sock)).toBe(false);
    expect(writeOpen(img)).toMatchObject({ status: 0 });
    expect(qemuStatus('qemu-img', ['check', img]).status).toBe(0);
  });

  it('QMP quit on one of two monitors (unix and TCP) shuts it down cleanly and releases the image', async () => {
    const sock = path.join(dir, 'b.sock');
    const pidfile = path.join(dir, 'b.pid');
    const port = await freePort();
    const d = startDaemon([
      '--blockdev', `qcow2,node-name=disk0,file.driver=file,file.filename=${img}`,
      '--chardev', `socket,id=c0,path=${sock},server=on,wait=off`,
      '--chardev', `socket,id=c1,port=${port},server=on,wait=off`,
      '--monitor', 'c0',
      '--monitor', 'chardev=c1,mode=control',
      '--pidfile', pidfile,
    ]);
    await waitForFile(pidfile, d);
    const a = await QmpClient.connect({ path: sock });
    const b = await QmpClient.connect({ host: '127.0.0.1', port });
    try {
      expect(names(await a.execute('query-named-block-nodes', { flat: true }))).toContain('disk0');
      expect(names(await b.execute('query-named-block-nodes', { flat: true }))).toContain('disk0');
      expect(writeOpen(img).status).toBe(1);
      expect(await b.execute('quit')).toEqual({});
      await a.waitClosed();
    } finally {
      await a.close();
      await b.close();
    }
    expect(await d.exited).toBe(0);
    expect(fs.existsSync(pidfile)).toBe(false);
    expect(fs.existsSync(sock)).toBe(false);
    expect(writeOpen(img)).toMatchObject({ status: 0 });
  });

  for (const sig of ['SIGINT', 'SIGHUP'] as const) {
    it(`${sig} shuts it down cleanly as SIGTERM does`, async () => {
      const sock = path.join(dir, `${sig}.sock`);
      const pidfile = path.join(dir, `${sig}.pid`);
      const d = startDaemon(['--blockdev', `driver=qcow2,node-name=n,file.driver=file,file.filename=${img}`, '--chardev', `socket,id=c,path=${sock},server=on,wait=off`, '--monitor', 'c', '--pidfile', pidfile]);
      await waitForFile(pidfile, d);
      expect(writeOpen(img).status).toBe(1);
      d.proc.kill(sig);
      expect(await d.exited).toBe(0);
      expect(fs.existsSync(pidfile)).toBe(false);
      expect(fs.existsSync(sock)).toBe(false);
      expect(writeOpen(img).status).toBe(0);
    });
  }

  it('--daemonize: the parent exits 0 once the socket listens and the pidfile exists; the detached child serves QMP until quit', async () => {
    const sock = path.join(dir, 'd.sock');
    const pidfile = path.join(dir, 'd.pid');
    // pipes on every stream: the parent must return although the daemon lives on
    const r = spawnSync(process.execPath, [BIN, 'daemon', '--daemonize', '--blockdev', `driver=qcow2,node-name=disk0,file.driver=file,file.filename=${img}`, '--chardev', `socket,id=c,path=${sock},server=on,wait=off`, '--monitor', 'c', '--pidfile', pidfile], {
      encoding: 'utf8',
      timeout: 20_000,
      cwd: dir,
    });
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    expect(fs.statSync(sock).isSocket()).toBe(true);
    const pid = Number(fs.readFileSync(pidfile, 'utf8'));
    expect(pid).toBeGreaterThan(0);
    expect(pid).not.toBe(r.pid);
    expect(pidAlive(pid)).toBe(true);
    expect(writeOpen(img).status).toBe(1);
    const c = await QmpClient.connect({ path: sock });
    try {
      expect(names(await c.execute('query-named-block-nodes', { flat: true }))).toContain('disk0');
      await c.execute('quit');
    } finally {
      await c.close();
    }
    const deadline = Date.now() + 10_000;
    while (pidAlive(pid) && Date.now() < deadline) await new Promise((res) => setTimeout(res, 25));
    expect(pidAlive(pid)).toBe(false);
    expect(fs.existsSync(pidfile)).toBe(false);
    expect(fs.existsSync(sock)).toBe(false);
    expect(writeOpen(img).status).toBe(0);
  });

  it('--daemonize with a failing --blockdev: the parent prints the child\'s error and exits 1', () => {
    const pidfile = path.join(dir, 'e.pid');
    const r = spawnSync(process.execPath, [BIN, 'daemon', '--daemonize', '--blockdev', 'driver=file,node-name=f,filename=missing.img', '--pidfile', pidfile], { encoding: 'utf8', timeout: 20_000, cwd: dir });
    expect(r.status).toBe(1);
    expect(r.stderr).toBe("snapstack daemon: --blockdev driver=file,node-name=f,filename=missing.img: Could not open 'missing.img': No such file or directory\n");
    expect(fs.existsSync(pidfile)).toBe(false);
  });

  it('a failure part-way through the command line closes what the earlier options opened', async () => {
    const sock = path.join(dir, 'f.sock');
    const r = spawnSync(process.execPath, [BIN, 'daemon', '--blockdev', `driver=qcow2,node-name=n,file.driver=file,file.filename=${img}`, '--chardev', `socket,id=c,path=${sock},server=on,wait=off`, '--monitor', 'c', '--blockdev', 'driver=qcow2,node-name=n,file.driver=file,file.filename=other.qcow2'], { encoding: 'utf8', timeout: 20_000, cwd: dir });
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/^snapstack daemon: --blockdev driver=qcow2,node-name=n,file.driver=file,file.filename=other.qcow2: Duplicate nodes with node-name='n'\n$/);
    expect(fs.existsSync(sock)).toBe(false);
    expect(writeOpen(img).status).toBe(0);
  });

  it('a chardev with wait=on holds the startup until its first client, who then gets the monitor', async () => {
    const sock = path.join(dir, 'w.sock');
    const pidfile = path.join(dir, 'w.pid');
    const d = startDaemon(['--chardev', `socket,id=c,path=${sock},server=on`, '--monitor', 'c', '--pidfile', pidfile]);
    await waitForFile(sock, d);
    await new Promise((r) => setTimeout(r, 300));
    // still waiting: startup (and so the pidfile) has not gone past the chardev
    expect(fs.existsSync(pidfile)).toBe(false);
    expect(d.stderr()).toBe(`snapstack daemon: --chardev socket,id=c,path=${sock},server=on: info: waiting for connection on: disconnected:unix:${sock},server=on\n`);
    const c = await QmpClient.connect({ path: sock });
    try {
      expect(c.greeting).toMatchObject({ QMP: { capabilities: ['oob'] } });
      await waitForFile(pidfile, d);
      expect(await c.execute('query-named-block-nodes')).toEqual([]);
      await c.execute('quit');
    } finally {
      await c.close();
    }
    expect(await d.exited).toBe(0);
  });

  it('SIGTERM while a chardev waits for its first client ends the startup cleanly', async () => {
    const sock = path.join(dir, 'w2.sock');
    const d = startDaemon(['--blockdev', `driver=qcow2,node-name=n,file.driver=file,file.filename=${img}`, '--chardev', `socket,id=c,path=${sock},server=on,wait=on`, '--monitor', 'c']);
    await waitForFile(sock, d);
    expect(writeOpen(img).status).toBe(1);
    d.proc.kill('SIGTERM');
    expect(await d.exited).toBe(0);
    expect(fs.existsSync(sock)).toBe(false);
    expect(writeOpen(img).status).toBe(0);
  });

  it('SIGTERM during a block-stream cancels the job; the chain checks clean, reads as before and is free again', async () => {
    const base = path.join(dir, 'js-base.qcow2');
    const top = path.join(dir, 'js-top.qcow2');
    qemu('qemu-img', ['create', '-f', 'qcow2', base, '128M']);
    qemu('qemu-io', ['-c', 'write -P 0x61 0 128M', base]);
    qemu('qemu-img', ['create', '-f', 'qcow2', '-b', 'js-base.qcow2', '-F', 'qcow2', top]);
    qemu('qemu-io', ['-c', 'write -P 0x62 1M 1M', top]);
    const before = path.join(dir, 'js-before.raw');
    qemu('qemu-img', ['convert', '-O', 'raw', top, before]);
    const sock = path.join(dir, 'js.sock');
    const pidfile = path.join(dir, 'js.pid');
    const d = startDaemon(['--blockdev', `driver=qcow2,node-name=top,file.driver=file,file.filename=${top}`, '--chardev', `socket,id=c,path=${sock},server=on,wait=off`, '--monitor', 'c', '--pidfile', pidfile]);
    await waitForFile(pidfile, d);
    const c = await QmpClient.connect({ path: sock });
    try {
      await c.execute('block-stream', { 'job-id': 'js', device: 'top' });
      d.proc.kill('SIGTERM');
      await c.waitClosed();
    } finally {
      await c.close();
    }
    expect(await d.exited).toBe(0);
    // cancelled before the end: the overlay still names its base (a job that finished would have dropped it)
    expect(JSON.parse(qemu('qemu-img', ['info', '--output=json', top]))['backing-filename']).toBe('js-base.qcow2');
    for (const f of [top, base]) expect(qemuStatus('qemu-img', ['check', f]).status).toBe(0);
    expect(qemuStatus('qemu-img', ['compare', before, top]).stdout).toContain('Images are identical.');
    expect(writeOpen(top).status).toBe(0);
  });

  it('--help and --version print and exit 0 without starting anything', () => {
    const h = spawnSync(process.execPath, [BIN, 'daemon', '--help'], { encoding: 'utf8' });
    expect(h.status).toBe(0);
    expect(h.stdout).toMatch(/^Usage: snapstack daemon \[options\]/);
    for (const opt of ['--blockdev', '--chardev', '--daemonize', '--monitor', '--object', '--pidfile']) expect(h.stdout).toContain(opt);
    const v = spawnSync(process.execPath, [BIN, 'daemon', '-V'], { encoding: 'utf8' });
    expect(v.status).toBe(0);
    expect(v.stdout).toMatch(/^snapstack daemon version \d+\.\d+\.\d+/);
  });
});

describe('snapstack monitor -qmp', () => {
  it('serves QMP with the machine beside the REPL; quit over QMP ends the monitor', async () => {
    const sock = path.join(dir, 'm.sock');
    const disk = path.join(dir, 'm.raw');
    fs.writeFileSync(disk, Buffer.alloc(1024 * 1024));
    const proc = spawn(process.execPath, [BIN, 'monitor', '--drive', `file=${disk},format=raw,id=disk0`, '-qmp', `unix:${sock},server=on,wait=off`], { stdio: ['pipe', 'pipe', 'pipe'], cwd: dir });
    children.push(proc);
    let err = '';
    proc.stderr?.on('data', (b: Buffer) => (err += b.toString()));
    proc.stdout?.resume();
    const exited = new Promise<number | null>((resolve) => proc.once('exit', (code) => resolve(code)));
    await waitForFile(sock, null);
    const c = await QmpClient.connect({ path: sock });
    try {
      const block = (await c.execute('query-block')) as QmpObject[];
      expect(block.map((b) => b['device'])).toEqual(['disk0']);
      expect(await c.execute('human-monitor-command', { 'command-line': 'info status' })).toMatch(/VM status: running/);
      await c.execute('quit');
      // a machine's monitor announces its end, as qemu-system does (the storage daemon does not)
      expect((await c.waitEvent('SHUTDOWN')).data).toEqual({ guest: false, reason: 'host-qmp-quit' });
    } finally {
      await c.close();
    }
    expect(await exited).toBe(0);
    expect(err).toBe('');
    expect(fs.existsSync(sock)).toBe(false);
  });

  it('never lets its QMP socket disappear once it exists: connects made the moment it appears all succeed', async () => {
    // the monitor used to close the chardev's listener and bind again, so the file vanished for a
    // moment after it first appeared and a fast client got ENOENT (seen in a CI run)
    const failures: string[] = [];
    for (let round = 0; round < 4; round++) {
      const sock = path.join(dir, `race${round}.sock`);
      const proc = spawn(process.execPath, [BIN, 'daemon', '--chardev', `socket,id=c0,path=${sock},server=on,wait=off`, '--monitor', 'c0'], { stdio: ['ignore', 'ignore', 'pipe'], cwd: dir });
      children.push(proc);
      const exited = new Promise<number | null>((resolve) => proc.once('exit', (code) => resolve(code)));
      const deadline = Date.now() + 15_000;
      while (!fs.existsSync(sock)) {
        if (Date.now() > deadline) throw new Error(`${sock} did not appear`);
        await new Promise((r) => setImmediate(r));
      }
      for (let i = 0; i < 30; i++) {
        const err = await new Promise<string | null>((resolve) => {
          const c = net.connect({ path: sock }, () => {
            c.destroy();
            resolve(null);
          });
          c.on('error', (e: NodeJS.ErrnoException) => resolve(e.code ?? e.message));
        });
        // refused is allowed before listen(); a missing file after it appeared is not
        if (err === 'ENOENT') failures.push(`round ${round}, connect ${i}: ENOENT`);
      }
      proc.kill('SIGTERM');
      expect(await exited).toBe(0);
    }
    expect(failures).toEqual([]);
  });

  it('goes on serving QMP when its standard input ends, until quit', async () => {
    const sock = path.join(dir, 'm2.sock');
    const proc = spawn(process.execPath, [BIN, 'monitor', '-qmp', `unix:${sock},server=on,wait=off`], { stdio: ['pipe', 'pipe', 'pipe'], cwd: dir });
    children.push(proc);
    proc.stdout?.resume();
    const exited = new Promise<number | null>((resolve) => proc.once('exit', (code) => resolve(code)));
    await waitForFile(sock, null);
    proc.stdin?.end();
    await new Promise((r) => setTimeout(r, 300));
    expect(proc.exitCode).toBeNull();
    const c = await QmpClient.connect({ path: sock });
    try {
      expect(await c.execute('query-block')).toEqual([]);
      await c.execute('quit');
    } finally {
      await c.close();
    }
    expect(await exited).toBe(0);
  });
});

describeQsd('snapstack daemon refuses bad command lines as qemu-storage-daemon 7.2 does', () => {
  let img = '';
  beforeAll(() => {
    img = path.join(dir, 'bad.qcow2');
    qemu('qemu-img', ['create', '-f', 'qcow2', img, '1M']);
  });
  const cases: string[][] = [
    ['--foo'],
    ['-x'],
    ['extra'],
    ['--monitor'],
    ['--blockdev'],
    ['--blockdev', 'driver=file,node-name=f,filename=nonexist'],
    ['--blockdev', '{"driver":"file","node-name":"f","filename":"bad.qcow2"'],
    ['--blockdev', '{"a":}'],
    ['--blockdev', '{"a":1} {"b":2}'],
    ['--blockdev', 'driver=file,node-name=f,filename'],
    ['--blockdev', 'driver=file,node-name=f,filename=bad.qcow2,x.y=1,x=2'],
    ['--blockdev', 'driver=file,node-name=f,x.1=a'],
    ['--blockdev', 'driver=file,node-name=f,1x=2'],
    ['--blockdev', 'driver=file,node-name=f,filename=a,,b'],
    ['--blockdev', 'file,node-name=f,file,name=x'],
    ['--blockdev', 'help'],
    ['--blockdev', 'driver=file,node-name=f,filename=bad.qcow2', '--blockdev', 'driver=file,node-name=f,filename=bad.qcow2'],
    ['--blockdev', 'driver=qcow2,file.driver=file,file.filename=bad.qcow2'],
    ['--object', 'iothread'],
    ['--object', 'foo,id=x'],
    ['--object', 'iothread,id=io0,poll-max-ns=abc'],
    ['--object', 'iothread,id=io0,poll-max-ns=-1'],
    ['--object', 'iothread,id=io0,bogus=1'],
    ['--object', 'iothread,id=io0', '--object', 'iothread,id=io0'],
    ['--chardev', 'socket,path=x.sock,server=on,wait=off'],
    ['--chardev', 'id=c,path=x.sock'],
    ['--chardev', 'foo,id=c'],
    ['--chardev', 'socket,id=c,path=x.sock,server=on,wait=maybe'],
    ['--chardev', 'socket,id=c,path=x.sock,server=off,wait=off'],
    ['--chardev', 'socket,id=c,host=127.0.0.1,server=on,wait=off'],
    ['--chardev', 'socket,id=c,path=/nonexist/s.sock,server=on,wait=off'],
    ['--chardev', 'socket,id=c,path=x.sock,server=on,wait=off,bogus=1'],
    ['--monitor', 'chardev=nochr'],
    ['--monitor', 'help'],
    ['--chardev', 'socket,id=c,path=x.sock,server=on,wait=off', '--monitor', 'chardev=c,mode=readline'],
    ['--chardev', 'socket,id=c,path=x.sock,server=on,wait=off', '--monitor', 'chardev=c,foo=1'],
    ['--chardev', 'socket,id=c,path=x.sock,server=on,wait=off', '--monitor', 'c', '--monitor', 'c'],
    ['--pidfile', '/nonexist/dir/p.pid'],
  ];
  for (const args of cases) {
    it(`${args.join(' ')}`, () => {
      const q = spawnSync('qemu-storage-daemon', args, { encoding: 'utf8', timeout: 10_000, cwd: dir });
      const s = spawnSync(process.execPath, [BIN, 'daemon', ...args], { encoding: 'utf8', timeout: 20_000, cwd: dir });
      expect(q.status).toBe(1);
      expect(s.status).toBe(q.status);
      expect(s.stderr).toBe(q.stderr.replaceAll('qemu-storage-daemon: ', 'snapstack daemon: '));
    });
  }
});

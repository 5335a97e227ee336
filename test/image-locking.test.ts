/**
 * Image locking as QEMU 7.2 does it (src/drivers/file/image-lock.ts): OFD locks on bytes 100 + bit
 * (permissions held) and 200 + bit (permissions not shared). In-process rules first, then both
 * directions against the real qemu-img / qemu-io.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { withBqlSync } from '../src/block/bql.js';
import { isBlockError } from '../src/block/errors.js';
import { imgMain } from '../src/cli/img.js';
import { ioMain } from '../src/cli/io.js';
import { createRawFile } from '../src/drivers/index.js';
import { openImage, type Image } from '../src/image.js';
import { describeInterop, qemu, qemuStatus } from './helpers/qemu.js';

interface Native {
  tryLock(fd: number, offset: number, length: number, opts: { shared: boolean }): boolean;
}
const native = createRequire(import.meta.url)('fs-native-extensions') as Native;

let dir: string;
const open: Image[] = [];

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-lock-'));
});
afterEach(async () => {
  for (const img of open.splice(0)) await img.close();
});
afterAll(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

async function keep(p: Promise<Image>): Promise<Image> {
  const img = await p;
  open.push(img);
  return img;
}

async function closeKept(img: Image): Promise<void> {
  open.splice(open.indexOf(img), 1);
  await img.close();
}

function rawImage(name: string, size = 1 << 20): string {
  const p = path.join(dir, name);
  withBqlSync((bql) => createRawFile(bql, p, size));
  return p;
}

/** The OFD lock bytes /proc/locks shows for the file at `p`, sorted. */
function lockBytes(p: string): number[] {
  const st = fs.statSync(p);
  const major = Math.floor(st.dev / 256) & 0xfff;
  const minor = st.dev & 0xff;
  const key = `${major.toString(16).padStart(2, '0')}:${minor.toString(16).padStart(2, '0')}:${st.ino}`;
  const out: number[] = [];
  for (const line of fs.readFileSync('/proc/locks', 'utf8').split('\n')) {
    const f = line.trim().split(/\s+/);
    const at = f.indexOf(key);
    if (at < 0 || !line.includes('OFDLCK')) continue;
    for (let b = Number(f[at + 1]); b <= Number(f[at + 2]); b++) out.push(b);
  }
  return out.sort((a, b) => a - b);
}

/** True when some open file description other than a fresh one of ours locks `byte` of `p`. */
function lockedByOthers(p: string, byte: number): boolean {
  const fd = fs.openSync(p, 'r+');
  try {
    return !native.tryLock(fd, byte, 1, { shared: false });
  } finally {
    fs.closeSync(fd); // our probe lock (if taken) goes with this description
  }
}

async function refusal(p: Promise<unknown>): Promise<string> {
  try {
    await p;
  } catch (e) {
    expect(isBlockError(e, 'EBUSY')).toBe(true);
    return e instanceof Error ? e.message : String(e);
  }
  throw new Error('the open was not refused');
}

describe('image locks inside one process', () => {
  it('takes the bytes QEMU takes for a read/write image: 100, 101, 103 held and 201, 203 not shared', async () => {
    const p = rawImage('bytes.img');
    await keep(openImage(p, { format: 'raw' }));
    expect(lockBytes(p)).toEqual([100, 101, 103, 201, 203]);
  });

  it('takes 100 held and 201, 203 not shared for a read-only image, and only 100 with force-share', async () => {
    const p = rawImage('bytes-ro.img');
    const ro = await keep(openImage(p, { format: 'raw', readOnly: true }));
    expect(lockBytes(p)).toEqual([100, 201, 203]);
    await closeKept(ro);
    await keep(openImage(p, { format: 'raw', readOnly: true, forceShare: true }));
    expect(lockBytes(p)).toEqual([100]);
  });

  it('refuses a second read/write open of the same image with QEMU\'s message and hint', async () => {
    const p = rawImage('twice.img');
    await keep(openImage(p, { format: 'raw' }));
    const msg = await refusal(openImage(p, { format: 'raw' }));
    expect(msg).toContain('Failed to get "write" lock');
    expect(msg).toContain(`Is another process using the image [${p}]?`);
  });

  it('refuses the same file under another name (a hard link: same device and inode)', async () => {
    const p = rawImage('linked.img');
    const q = path.join(dir, 'linked-too.img');
    fs.linkSync(p, q);
    await keep(openImage(p, { format: 'raw' }));
    expect(await refusal(openImage(q, { format: 'raw' }))).toContain('"write" lock');
  });

  it('refuses a read-only open beside a writer, and force-share reads the flushed data through it', async () => {
    const p = rawImage('reader.img');
    const w = await keep(openImage(p, { format: 'raw' }));
    await w.write(0, new Uint8Array(4096).fill(0x5a));
    await w.flush();
    expect(await refusal(openImage(p, { format: 'raw', readOnly: true }))).toContain('Failed to get shared "write" lock');
    const r = await keep(openImage(p, { format: 'raw', readOnly: true, forceShare: true }));
    expect((await r.read(0, 4096)).every((b) => b === 0x5a)).toBe(true);
  });

  it('refuses to create an image over one that is open, and leaves its data and snapshots alone', async () => {
    const p = rawImage('recreate.img', 65536);
    const img = await keep(openImage(p, { format: 'raw' }));
    await img.write(0, new Uint8Array(4096).fill(0x42));
    await img.createSnapshot('keep-me');
    await img.flush();
    expect(() => withBqlSync((bql) => createRawFile(bql, p, 4096))).toThrow(/Failed to get "write" lock/);
    expect(fs.statSync(p).size).toBe(65536);
    expect(fs.readFileSync(p).subarray(0, 4096).every((b) => b === 0x42)).toBe(true);
    expect((await img.snapshots()).map((x) => x.name)).toEqual(['keep-me']);
  });

  it('refuses force-share on a read/write open', async () => {
    const p = rawImage('share-rw.img');
    await expect(openImage(p, { format: 'raw', forceShare: true })).rejects.toThrow(/force-share=on can only be used with read-only images/);
  });

  it('lets go of every byte at close, so the next read/write open succeeds', async () => {
    const p = rawImage('reopen.img');
    const a = await keep(openImage(p, { format: 'raw' }));
    await closeKept(a);
    expect(lockBytes(p)).toEqual([]);
    await keep(openImage(p, { format: 'raw' }));
    expect(lockBytes(p)).toEqual([100, 101, 103, 201, 203]);
  });

  it('keeps its locks when other descriptors of the file are closed (OFD locks, not POSIX ones)', async () => {
    const p = rawImage('ofd.img');
    await keep(openImage(p, { format: 'raw' }));
    for (let i = 0; i < 3; i++) fs.closeSync(fs.openSync(p, 'r'));
    fs.writeFileSync(p + '.other', 'x'); // unrelated descriptors come and go too
    expect(lockedByOthers(p, 101)).toBe(true);
    expect(lockedByOthers(p, 201)).toBe(true);
    expect(lockBytes(p)).toEqual([100, 101, 103, 201, 203]);
  });

  it('takes no lock with locking=off, and an image opened so does not block a locking user', async () => {
    const p = rawImage('off.img');
    await keep(openImage(p, { format: 'raw', locking: 'off' }));
    expect(lockBytes(p)).toEqual([]);
    await keep(openImage(p, { format: 'raw' }));
    expect(lockBytes(p)).toEqual([100, 101, 103, 201, 203]);
  });

  it('takes the same bytes with locking=on (OFD locks are there on Linux)', async () => {
    const p = rawImage('on.img');
    await keep(openImage(p, { format: 'raw', locking: 'on' }));
    expect(lockBytes(p)).toEqual([100, 101, 103, 201, 203]);
    expect(await refusal(openImage(p, { format: 'raw', locking: 'on' }))).toContain('Failed to get "write" lock');
  });

  it('refuses an unknown locking value', async () => {
    const p = rawImage('bad-locking.img');
    await expect(openImage(`driver=raw,file.filename=${p},file.locking=maybe`)).rejects.toThrow(/Invalid value 'maybe' for option 'locking'/);
  });

  it('moves the lock to the new file when a raw snapshot goto renames a clone over the image', async () => {
    const p = rawImage('goto.img');
    const img = await keep(openImage(p, { format: 'raw' }));
    await img.write(0, new Uint8Array(512).fill(1));
    await img.createSnapshot('s1');
    await img.write(0, new Uint8Array(512).fill(2));
    const before = fs.statSync(p).ino;
    await img.gotoSnapshot('s1');
    expect(fs.statSync(p).ino).not.toBe(before); // a new file took the image's name
    expect(lockBytes(p)).toEqual([100, 101, 103, 201, 203]);
    expect(lockedByOthers(p, 201)).toBe(true);
    expect(await refusal(openImage(p, { format: 'raw' }))).toContain('"write" lock');
    expect((await img.read(0, 512)).every((b) => b === 1)).toBe(true);
  });
});

/** Starts `qemu-io ARGS FILE` reading commands from a pipe, once it holds its locks. */
async function qemuIoHolding(file: string, args: string[], commands = '', ready: () => boolean = () => true): Promise<ChildProcess> {
  const child = spawn('qemu-io', [...args, file], { stdio: ['pipe', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
  if (commands !== '') child.stdin?.write(commands);
  const deadline = Date.now() + 10_000;
  while (lockBytes(file).length === 0) {
    if (child.exitCode !== null || Date.now() > deadline) {
      child.kill();
      throw new Error(`qemu-io did not start holding '${file}': ${stderr}`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  // let it run the commands: poll what they should have done (bounded)
  while (!ready()) {
    if (child.exitCode !== null || Date.now() > deadline) {
      child.kill();
      throw new Error(`qemu-io did not run its commands on '${file}': ${stderr}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  return child;
}

async function stop(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null) return;
  const done = new Promise((r) => child.once('exit', r));
  child.stdin?.end('quit\n');
  await done;
}

async function cli(main: (argv: string[], out: (s: string) => void, err: (s: string) => void) => Promise<number>, argv: string[]): Promise<{ status: number; out: string; err: string }> {
  const out: string[] = [];
  const err: string[] = [];
  let status: number;
  try {
    status = await main(argv, (s) => out.push(s), (s) => err.push(s));
  } catch (e) {
    err.push(e instanceof Error ? e.message : String(e));
    status = 1;
  }
  return { status, out: out.join('\n'), err: err.join('\n') };
}

describeInterop('image locks against QEMU 7.2', () => {
  it('qemu-img info, qemu-img snapshot and qemu-io refuse a qcow2 image snapstack holds read/write; -U reads through', async () => {
    const p = path.join(dir, 'held.qcow2');
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', p, '16M']);
    const img = await keep(openImage(p));
    await img.write(0, new Uint8Array(65536).fill(0x3c));
    await img.flush();
    const info = qemuStatus('qemu-img', ['info', p]);
    expect(info.status).not.toBe(0);
    expect(info.stderr).toContain('Failed to get shared "write" lock');
    expect(info.stderr).toContain(`Is another process using the image [${p}]?`);
    const snap = qemuStatus('qemu-img', ['snapshot', '-c', 'from-qemu', p]);
    expect(snap.status).not.toBe(0);
    expect(snap.stderr).toContain('Failed to get "write" lock');
    const io = qemuStatus('qemu-io', ['-c', 'write -P 0x11 0 512', p]);
    expect(io.status).not.toBe(0);
    expect(io.stderr).toContain('Failed to get "write" lock');
    expect(qemuStatus('qemu-io', ['-r', '-c', 'read 0 512', p]).stderr).toContain('Failed to get shared "write" lock');
    expect(qemuStatus('qemu-img', ['info', '-U', p]).status).toBe(0);
    const read = qemuStatus('qemu-io', ['-r', '-U', '-c', 'read -P 0x3c 0 65536', p]);
    expect(read.stdout).toContain('read 65536/65536 bytes');
    expect(read.stdout + read.stderr).not.toContain('Pattern verification failed');
    await closeKept(img);
    expect(qemuStatus('qemu-img', ['snapshot', '-c', 'after-close', p]).status).toBe(0);
  });

  it('qemu-img snapshot refuses an image a running snapstack monitor holds, and succeeds once it quits', async () => {
    const p = path.join(dir, 'monitor-held.qcow2');
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', p, '16M']);
    const mon = spawn(process.execPath, [path.resolve('bin/snapstack.js'), 'monitor', '--drive', `file=${p},format=qcow2,id=disk0`], { stdio: ['pipe', 'pipe', 'pipe'] });
    let stderr = '';
    mon.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const exited = new Promise((r) => mon.once('exit', r));
    try {
      const deadline = Date.now() + 20_000;
      while (lockBytes(p).length === 0) {
        if (mon.exitCode !== null || Date.now() > deadline) throw new Error(`the monitor did not open '${p}': ${stderr}`);
        await new Promise((r) => setTimeout(r, 50));
      }
      const snap = qemuStatus('qemu-img', ['snapshot', '-c', 'beside-the-monitor', p]);
      expect(snap.status).not.toBe(0);
      expect(snap.stderr).toContain('Failed to get "write" lock');
      expect(snap.stderr).toContain(`Is another process using the image [${p}]?`);
    } finally {
      mon.stdin.end('quit\n');
      await exited;
    }
    expect(qemuStatus('qemu-img', ['snapshot', '-c', 'after-the-monitor', p]).status).toBe(0);
    expect(qemu('qemu-img', ['snapshot', '-l', p])).toContain('after-the-monitor');
  });

  it('qemu-io refuses a raw image snapstack holds read/write', async () => {
    const p = rawImage('held.raw');
    await keep(openImage(p, { format: 'raw' }));
    const io = qemuStatus('qemu-io', ['-f', 'raw', '-c', 'write 0 512', p]);
    expect(io.status).not.toBe(0);
    expect(io.stderr).toContain('Failed to get "write" lock');
    expect(io.stderr).toContain('Is another process using the image');
  });

  it('snapstack refuses a qcow2 image qemu-io holds read/write, in the library and the CLI, and -U reads through', async () => {
    const p = path.join(dir, 'qemu-held.qcow2');
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', p, '16M']);
    const written = (): boolean => {
      const r = qemuStatus('qemu-io', ['-r', '-U', '-c', 'read -P 0xab 0 65536', p]);
      return r.stdout.includes('read 65536/65536 bytes') && !(r.stdout + r.stderr).includes('Pattern verification failed');
    };
    const holder = await qemuIoHolding(p, ['-f', 'qcow2'], 'write -P 0xab 0 64k\nflush\n', written);
    try {
      const rw = await refusal(openImage(p));
      expect(rw).toContain('Failed to get "write" lock');
      expect(rw).toContain(`Is another process using the image [${p}]?`);
      expect(await refusal(openImage(p, { readOnly: true }))).toContain('Failed to get shared "write" lock');
      const shared = await keep(openImage(p, { readOnly: true, forceShare: true }));
      expect((await shared.read(0, 65536)).every((b) => b === 0xab)).toBe(true);
      await closeKept(shared);

      const info = await cli(imgMain, ['info', p]);
      expect(info.status).not.toBe(0);
      expect(info.err).toContain('Failed to get shared "write" lock');
      expect((await cli(imgMain, ['info', '-U', p])).out).toContain('file format: qcow2');
      expect((await cli(imgMain, ['snapshot', '-c', 'x', p])).err).toContain('Failed to get "write" lock');
      expect((await cli(imgMain, ['snapshot', '-l', '--force-share', p])).status).toBe(0);
      expect((await cli(imgMain, ['map', '-U', p])).status).toBe(0);
      expect((await cli(imgMain, ['check', p])).err).toContain('Failed to get shared "write" lock');
      const check = await cli(imgMain, ['check', '-U', p]);
      expect(check.status, check.err).toBe(0);
      expect(check.out).toContain('No errors were found on the image.');
      const copy = path.join(dir, 'qemu-held-copy.raw');
      expect((await cli(imgMain, ['convert', '-U', '-O', 'raw', p, copy])).status).toBe(0);
      expect((await cli(imgMain, ['compare', '-U', p, copy])).status).toBe(0);
      expect((await cli(ioMain, ['-r', '-U', '-c', 'read -P 0xab 0 65536', p])).out).toContain('read 65536/65536 bytes');
      expect((await cli(ioMain, ['-c', 'read 0 512', p])).err).toContain('Failed to get "write" lock');
      const create = await cli(imgMain, ['create', '-f', 'raw', p, '1M']);
      expect(create.status).not.toBe(0);
      expect(create.err).toContain('Failed to get "write" lock');
      const createQcow2 = await cli(imgMain, ['create', '-f', 'qcow2', p, '1M']);
      expect(createQcow2.status).not.toBe(0);
      expect(createQcow2.err).toContain('Failed to get "write" lock');
    } finally {
      await stop(holder);
    }
    // the refused creates left qemu-io's image as it was
    expect(qemuStatus('qemu-img', ['check', p]).status).toBe(0);
    const after = qemuStatus('qemu-io', ['-c', 'read -P 0xab 0 65536', p]);
    expect(after.stdout + after.stderr).not.toContain('Pattern verification failed');
    expect(after.stdout).toContain('read 65536/65536 bytes');
    await keep(openImage(p)); // qemu-io gone: its locks went with it
  });

  it('snapstack refuses a raw image qemu-io holds read/write (QEMU shares write there; snapstack does not)', async () => {
    const p = rawImage('qemu-held.raw');
    const holder = await qemuIoHolding(p, ['-f', 'raw']);
    try {
      expect(await refusal(openImage(p, { format: 'raw' }))).toContain('Failed to get shared "write" lock');
    } finally {
      await stop(holder);
    }
  });
});

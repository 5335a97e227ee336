/**
 * NBD file names (nbd+unix:///EXPORT?socket=PATH) wherever `img` takes an image name, with
 * qemu-img 7.2 as the oracle on the same qemu-nbd exports: compare and check open them (no host
 * file need exist), and convert / create without -n format an existing export as QEMU's
 * bdrv_co_create_opts_simple does (the export must be big enough for raw, the first sector is
 * zeroed, raw is not taken to read as zeros, a failed connection says so).
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { shutdownIOThreads, withBql } from '../src/index.js';
import { cli } from './helpers/img-cli.js';
import { qemu } from './helpers/qemu.js';
import { describeWithTool, startServer, type ServerProcess } from './nbd-client-helpers.js';

const MiB = 1024 * 1024;
let dir = '';
const servers: ServerProcess[] = [];

/** qemu-img's exit status and output. */
function qemuImg(args: string[]): { status: number; out: string; err: string } {
  const r = spawnSync('qemu-img', args, { encoding: 'utf8' });
  return { status: r.status ?? -1, out: r.stdout, err: r.stderr };
}

function url(name: string): string {
  return `nbd+unix:///?socket=${path.join(dir, `${name}.sock`)}`;
}

/** Serves `file` (its bytes: -f raw) on `<name>.sock`, persistent. */
async function serve(name: string, file: string): Promise<void> {
  const sock = path.join(dir, `${name}.sock`);
  servers.push(await startServer('qemu-nbd', ['-k', sock, '-f', 'raw', '-t', '-e', '2', file], sock));
}

function fill(file: string, byte: number): void {
  fs.writeFileSync(file, new Uint8Array(fs.statSync(file).size).fill(byte));
}

describeWithTool('qemu-nbd', 'apt-get install qemu-utils', 'img on NBD file names, against qemu-img', () => {
  beforeAll(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-nbd-names-'));
    const p = (n: string): string => path.join(dir, n);
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', p('src.qcow2'), '2M']);
    qemu('qemu-io', ['-c', 'write -P 0x11 0 64k', '-c', 'write -P 0x22 1M 4k', p('src.qcow2')]);
    qemu('qemu-img', ['convert', '-O', 'raw', p('src.qcow2'), p('same.raw')]);
    qemu('qemu-img', ['create', '-q', '-f', 'raw', p('small.raw'), '1M']);
    qemu('qemu-img', ['create', '-q', '-f', 'raw', p('big.raw'), '8M']);
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', p('img.qcow2'), '4M']);
    qemu('qemu-io', ['-c', 'write -P 0x33 0 128k', p('img.qcow2')]);
    await serve('same', p('same.raw'));
    await serve('small', p('small.raw'));
    await serve('big', p('big.raw'));
    await serve('qcow', p('img.qcow2'));
  });
  afterAll(async () => {
    for (const s of servers) await s.stop();
    fs.rmSync(dir, { recursive: true, force: true });
    await withBql((bql) => shutdownIOThreads(bql));
  });

  it('compare opens an NBD file name (identical and different, as qemu-img)', async () => {
    const src = path.join(dir, 'src.qcow2');
    for (const args of [
      [url('same'), src],
      [src, url('same')],
      ['-f', 'raw', '-F', 'raw', url('same'), url('small')],
    ]) {
      const mine = await cli(['compare', ...args]);
      const theirs = qemuImg(['compare', ...args]);
      expect({ status: mine.status, out: mine.out }, args.join(' ')).toEqual({ status: theirs.status, out: theirs.out });
    }
  });

  it('check opens an NBD file name: raw has no checks (63), qcow2 through the export is checked', async () => {
    const raw = await cli(['check', url('same')]);
    const rawQ = qemuImg(['check', url('same')]);
    expect(raw.status).toBe(63);
    expect(raw.status).toBe(rawQ.status);
    expect(raw.err).toContain('This image format does not support checks');
    const q = await cli(['check', '-f', 'qcow2', url('qcow')]);
    const qQ = qemuImg(['check', '-f', 'qcow2', url('qcow')]);
    expect({ status: q.status, out: q.out }).toEqual({ status: qQ.status, out: qQ.out });
    expect(q.out).toContain('No errors were found on the image.');
    // probed, as qemu-img probes it
    const probed = await cli(['check', url('qcow')]);
    expect(probed.status).toBe(0);
    const notQcow2 = await cli(['check', '-f', 'qcow2', url('same')]);
    expect(notQcow2.status).toBe(qemuImg(['check', '-f', 'qcow2', url('same')]).status);
    // qemu-img: "Could not open 'URL': Image is not in qcow2 format" (an open failure, not "Check failed")
    expect(notQcow2.err).toContain(`Could not open '${url('same')}': `);
    expect(notQcow2.err).toContain('Image is not in qcow2 format');
  });

  it('convert -O raw onto a bigger export writes what qemu-img writes (stale bytes zeroed up to the size)', async () => {
    const big = path.join(dir, 'big.raw');
    const src = path.join(dir, 'src.qcow2');
    fill(big, 0xab);
    const theirs = qemuImg(['convert', '-O', 'raw', src, url('big')]);
    expect(theirs.status, theirs.err).toBe(0);
    const expected = fs.readFileSync(big);
    fill(big, 0xab);
    const mine = await cli(['convert', '-O', 'raw', src, url('big')]);
    expect(mine.err).toBe('');
    expect(mine.status).toBe(0);
    expect(Buffer.compare(fs.readFileSync(big), expected)).toBe(0);
    expect(fs.readFileSync(big)[2 * MiB - 1]).toBe(0);
    expect(fs.readFileSync(big)[2 * MiB]).toBe(0xab);
  });

  it('convert -O raw onto a smaller export fails as qemu-img (Cannot grow NBD nodes)', async () => {
    const args = ['convert', '-O', 'raw', path.join(dir, 'src.qcow2'), url('small')];
    const mine = await cli(args);
    const theirs = qemuImg(args);
    expect(theirs.status).toBe(1);
    expect(mine.status).toBe(1);
    expect(theirs.err).toContain(`${url('small')}: error while converting raw: Cannot grow NBD nodes`);
    expect(mine.err).toContain(`${url('small')}: error while converting raw: Cannot grow NBD nodes`);
    expect(mine.err).not.toMatch(/ENOENT|open '/);
  });

  it('convert -O qcow2 onto an export makes an image qemu-img reads back through it', async () => {
    fill(path.join(dir, 'big.raw'), 0xab);
    const mine = await cli(['convert', '-O', 'qcow2', path.join(dir, 'src.qcow2'), url('big')]);
    expect(mine.err).toBe('');
    expect(mine.status).toBe(0);
    expect(qemuImg(['compare', url('big'), path.join(dir, 'src.qcow2')]).out).toBe('Images are identical.\n');
    expect(qemuImg(['check', url('big')]).status).toBe(0);
  });

  it('create -f raw on an export: the same line, the first sector zeroed, the rest left (qemu-img)', async () => {
    const big = path.join(dir, 'big.raw');
    fill(big, 0xab);
    const theirs = qemuImg(['create', '-f', 'raw', url('big'), '1M']);
    const expected = fs.readFileSync(big);
    fill(big, 0xab);
    const mine = await cli(['create', '-f', 'raw', url('big'), '1M']);
    expect({ status: mine.status, out: mine.out }).toEqual({ status: theirs.status, out: theirs.out });
    expect(Buffer.compare(fs.readFileSync(big), expected)).toBe(0);
    expect(expected[511]).toBe(0);
    expect(expected[512]).toBe(0xab);
  });

  it('create -f raw larger than the export fails as qemu-img; qcow2 needs only room for its metadata', async () => {
    const mine = await cli(['create', '-f', 'raw', url('small'), '4M']);
    const theirs = qemuImg(['create', '-f', 'raw', url('small'), '4M']);
    expect([mine.status, mine.out]).toEqual([theirs.status, theirs.out]);
    expect(mine.err).toContain('Cannot grow NBD nodes');
    fill(path.join(dir, 'small.raw'), 0xab);
    const q = await cli(['create', '-f', 'qcow2', url('small'), '64M']);
    expect(q.status, q.err).toBe(0);
    const empty = path.join(dir, 'empty.qcow2');
    expect(q.out).toBe(qemuImg(['create', '-f', 'qcow2', empty, '64M']).out.replace(empty, url('small')));
    expect(qemuImg(['check', url('small')]).status).toBe(0);
    const info = qemuImg(['info', '--output=json', url('small')]);
    expect(JSON.parse(info.out)).toMatchObject({ format: 'qcow2', 'virtual-size': 64 * MiB });
    // the stale 0xab bytes do not show through: it reads as the fresh empty image does
    expect(qemuImg(['compare', url('small'), empty]).out).toBe('Images are identical.\n');
  });

  it('info and compare take json:{...} names of nbd nodes (top-level and as a format\'s file), as qemu-img', async () => {
    const sock = (n: string): string => path.join(dir, `${n}.sock`);
    const names = [
      `json:${JSON.stringify({ driver: 'nbd', server: { type: 'unix', path: sock('same') } })}`,
      `json:${JSON.stringify({ driver: 'raw', file: { driver: 'nbd', server: { type: 'unix', path: sock('same') } } })}`,
      `json:${JSON.stringify({ driver: 'qcow2', file: { driver: 'nbd', server: { type: 'unix', path: sock('qcow') } } })}`,
      `json:${JSON.stringify({ driver: 'qcow2', file: { driver: 'file', filename: path.join(dir, 'src.qcow2') } })}`,
    ];
    // image, file format, virtual size: the lines both print the same way for these
    const head = (text: string): string => text.split('\n').slice(0, 3).join('\n');
    for (const name of names) {
      const mine = await cli(['info', name]);
      const theirs = qemuImg(['info', name]);
      expect(theirs.status, theirs.err).toBe(0);
      expect({ status: mine.status, head: head(mine.out), err: mine.err }, name).toEqual({ status: 0, head: head(theirs.out), err: '' });
    }
    const cmp = [names[0] ?? '', path.join(dir, 'src.qcow2')];
    const mine = await cli(['compare', ...cmp]);
    expect({ status: mine.status, out: mine.out }).toEqual({ status: qemuImg(['compare', ...cmp]).status, out: qemuImg(['compare', ...cmp]).out });
    expect(mine.out).toBe('Images are identical.\n');
    // convert reads a json: source too: the same bytes as qemu-img's copy
    const a = path.join(dir, 'json-mine.raw');
    const b = path.join(dir, 'json-theirs.raw');
    expect((await cli(['convert', '-O', 'raw', names[2] ?? '', a])).status).toBe(0);
    expect(qemuImg(['convert', '-O', 'raw', names[2] ?? '', b]).status).toBe(0);
    expect(Buffer.compare(fs.readFileSync(a), fs.readFileSync(b))).toBe(0);
    for (const bad of ['json:[1]', 'json:{bad']) {
      const r = await cli(['info', bad]);
      expect(r.status).toBe(1);
      expect(r.err).toContain(qemuImg(['info', bad]).err.replace(/^qemu-img: /, '').split(': JSON parse error')[0]?.trim() ?? '');
    }
  });

  it('create and convert to an NBD server that is not there say QEMU\'s words', async () => {
    const gone = `nbd+unix:///?socket=${path.join(dir, 'nosuch.sock')}`;
    const c = await cli(['create', '-f', 'raw', gone, '1M']);
    expect(c.status).toBe(qemuImg(['create', '-f', 'raw', gone, '1M']).status);
    expect(c.err).toContain(`${gone}: Protocol driver 'nbd' does not support image creation, and opening the image failed: `);
    const v = await cli(['convert', '-O', 'raw', path.join(dir, 'src.qcow2'), gone]);
    expect(v.status).toBe(1);
    expect(v.err).toContain(`${gone}: error while converting raw: Protocol driver 'nbd' does not support image creation, and opening the image failed: `);
  });
});

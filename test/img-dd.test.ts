/**
 * img dd against qemu-img 7.2 dd on the same input: the output files byte for byte (raw) or
 * content and allocation (qcow2), the sizes it creates (7.2's count-from-zero quirk included),
 * and its messages and exit statuses for every refusal.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { imgDd } from '../src/cli/img-dd.js';
import { describeInterop, qemu, qemuStatus } from './helpers/qemu.js';

let dir = '';
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-dd-'));
});
afterAll(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

async function dd(args: string[]): Promise<{ status: number; err: string[] }> {
  const err: string[] = [];
  const status = await imgDd(args, () => undefined, (l) => err.push(...l.split('\n')));
  return { status, err };
}

function ours(stderr: string): string[] {
  return stderr
    .split('\n')
    .filter((l) => l !== '')
    .map((l) => l.replace(/^qemu-img: /, 'snapstack img: ').replace("Try 'qemu-img --help'", "Try 'snapstack img --help'"));
}

describeInterop('img dd against qemu-img dd', () => {
  let src = '';
  let rawSrc = '';
  beforeAll(() => {
    src = path.join(dir, 'src.qcow2');
    qemu('qemu-img', ['create', '-f', 'qcow2', src, '3M']);
    const data = crypto.randomBytes(300 * 1024).toString('base64');
    fs.writeFileSync(path.join(dir, 'pattern.bin'), data);
    qemu('qemu-io', ['-c', 'write -P 0x61 0 700k', '-c', 'write -P 0x62 1M 5000', '-c', 'write -P 0x63 3000k 72k', src]);
    rawSrc = path.join(dir, 'src.raw');
    fs.writeFileSync(rawSrc, Buffer.concat([crypto.randomBytes(1000 * 1024), Buffer.alloc(333)]));
  });

  const cases: string[][] = [
    [],
    ['bs=64k'],
    ['bs=4k', 'count=10'],
    ['bs=1.5k', 'skip=7'],
    ['bs=64k', 'skip=1', 'count=3'],
    ['bs=64k', 'skip=2', 'count=1'],
    ['bs=1M', 'skip=5'],
    ['count=0'],
    ['bs=0x200', 'count=1k'],
    ['bs=3000', 'skip=100'],
    ['bs=512b', 'count=3', 'count=5'],
  ];
  for (const extra of cases) {
    for (const input of ['qcow2', 'raw'] as const) {
      it(`dd ${extra.join(' ') || '(defaults)'} from ${input}: the same output file, messages and status`, async () => {
        const inFile = input === 'qcow2' ? src : rawSrc;
        const tag = `${input}-${extra.join('_').replace(/\W/g, '')}`;
        const a = path.join(dir, `q-${tag}.raw`);
        const b = path.join(dir, `s-${tag}.raw`);
        const q = qemuStatus('qemu-img', ['dd', `if=${inFile}`, `of=${a}`, ...extra]);
        const m = await dd([`if=${inFile}`, `of=${b}`, ...extra]);
        expect(m.status).toBe(q.status);
        expect(m.err).toEqual(ours(q.stderr));
        expect(fs.readFileSync(b).equals(fs.readFileSync(a))).toBe(true);
      });
    }
  }

  it('-O qcow2 -f raw -U: the same contents and allocation as qemu-img dd, check clean', async () => {
    for (const extra of [['bs=64k', 'count=7'], ['bs=4k', 'skip=3']]) {
      const a = path.join(dir, 'q-out.qcow2');
      const b = path.join(dir, 's-out.qcow2');
      fs.rmSync(a, { force: true });
      fs.rmSync(b, { force: true });
      const args = ['-U', '-f', 'raw', '-O', 'qcow2'];
      const q = qemuStatus('qemu-img', ['dd', ...args, `if=${src}`, `of=${a}`, ...extra]);
      const m = await dd([...args, `if=${src}`, `of=${b}`, ...extra]);
      expect(m).toEqual({ status: q.status, err: ours(q.stderr) });
      expect(qemu('qemu-img', ['compare', a, b])).toContain('Images are identical.');
      expect(qemuStatus('qemu-img', ['check', b]).status).toBe(0);
      const strip = (s: string): unknown => (JSON.parse(s) as Array<Record<string, unknown>>).map(({ offset: _o, ...rest }) => rest);
      expect(strip(qemu('qemu-img', ['map', '--output=json', b]))).toEqual(strip(qemu('qemu-img', ['map', '--output=json', a])));
    }
  });

  it("refusals: qemu-img's messages and exit statuses, nothing created", async () => {
    const bad: string[][] = [
      ['bs=0'],
      ['bs=abc'],
      ['bs=3G'],
      ['bs=1.5'],
      ['bs='],
      ['count=-1'],
      ['count=x'],
      ['count=9E'],
      ['skip=y'],
      ['bs=1e3'],
      ['foo=1'],
      ['foo'],
      ['-x'],
    ];
    for (const extra of bad) {
      const a = path.join(dir, 'refused-q.raw');
      const b = path.join(dir, 'refused-s.raw');
      const q = qemuStatus('qemu-img', ['dd', `if=${src}`, `of=${a}`, ...extra]);
      const m = await dd([`if=${src}`, `of=${b}`, ...extra]);
      expect({ extra, ...m }).toEqual({ extra, status: q.status, err: ours(q.stderr) });
      expect(fs.existsSync(b)).toBe(fs.existsSync(a));
    }
    for (const args of [[`of=${path.join(dir, 'x.raw')}`], [`if=${src}`], []]) {
      const q = qemuStatus('qemu-img', ['dd', ...args]);
      expect(await dd(args)).toEqual({ status: q.status, err: ours(q.stderr) });
    }
    const q = qemuStatus('qemu-img', ['dd', `if=${path.join(dir, 'nonexist')}`, `of=${path.join(dir, 'x.raw')}`]);
    const m = await dd([`if=${path.join(dir, 'nonexist')}`, `of=${path.join(dir, 'x.raw')}`]);
    expect(m.status).toBe(q.status);
    expect(m.err[0]).toMatch(/^snapstack img: Could not open '.*nonexist': /);
    const u = qemuStatus('qemu-img', ['dd', '-O', 'vmdk2', `if=${src}`, `of=${path.join(dir, 'x.raw')}`]);
    expect(await dd(['-O', 'vmdk2', `if=${src}`, `of=${path.join(dir, 'x.raw')}`])).toEqual({ status: u.status, err: ours(u.stderr) });
  });
});

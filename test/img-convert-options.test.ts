/**
 * img convert's options beyond the copy itself, against qemu-img 7.2 on the same input: -p (the
 * progress lines, byte for byte, for raw, qcow2 and compressed targets), -q, -n (into an existing
 * image: its size must suffice, -o is refused, stale data is overwritten with zeros where the
 * source has none), -c refused for raw, and that the older options keep working.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { imgConvert } from '../src/cli/img-convert.js';
import { describeInterop, qemu, qemuStatus } from './helpers/qemu.js';

let dir = '';
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-convopt-'));
});
afterAll(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

async function convert(args: string[]): Promise<{ status: number; err: string[]; progress: string }> {
  const err: string[] = [];
  let progress = '';
  const status = await imgConvert(args, () => undefined, (l) => err.push(l), (s) => (progress += s));
  return { status, err, progress };
}

/** qemu-img's stderr lines with its name replaced by ours. */
function ours(stderr: string): string[] {
  return stderr
    .split('\n')
    .filter((l) => l !== '')
    .map((l) => l.replace(/^qemu-img: /, 'snapstack img: '));
}

describeInterop('img convert options against qemu-img', () => {
  let src = '';
  beforeAll(() => {
    src = path.join(dir, 'src.qcow2');
    qemu('qemu-img', ['create', '-f', 'qcow2', src, '100M']);
    qemu('qemu-io', ['-c', 'write -P 0x41 0 10M', '-c', 'write -P 0x42 50M 10M', '-c', 'write -P 0x43 99M 300k', '-c', 'write -z 70M 1M', src]);
  });

  for (const [label, extra] of [
    ['raw', ['-O', 'raw']],
    ['qcow2', ['-O', 'qcow2']],
    ['qcow2 -c', ['-c', '-O', 'qcow2']],
    ['qcow2 -c 4k clusters', ['-c', '-O', 'qcow2', '-o', 'cluster_size=4k']],
  ] as const) {
    it(`-p prints qemu-img's progress lines (${label})`, async () => {
      const a = path.join(dir, `q-${label.replace(/\W/g, '')}`);
      const b = path.join(dir, `s-${label.replace(/\W/g, '')}`);
      const q = qemuStatus('qemu-img', ['convert', '-p', ...extra, src, a]);
      const m = await convert(['-p', ...extra, src, b]);
      expect(m.status).toBe(q.status);
      expect(m.progress).toBe(q.stdout);
      expect(q.stdout.split('\r').length).toBeGreaterThan(3);
      expect(qemu('qemu-img', ['compare', src, b])).toContain('Images are identical.');
    });
  }

  it('a raw source that ends inside a sector: the target is whole sectors, as qemu-img makes it (raw, qcow2, -c)', async () => {
    const odd = path.join(dir, 'odd.raw');
    fs.writeFileSync(odd, Buffer.concat([Buffer.alloc(200000, 0x33), Buffer.from('tail bytes that end mid-sector')]));
    for (const extra of [['-O', 'raw'], ['-O', 'qcow2'], ['-c', '-O', 'qcow2'], ['-c', '-O', 'qcow2', '-o', 'cluster_size=4k']]) {
      const a = path.join(dir, 'odd-q');
      const b = path.join(dir, 'odd-s');
      fs.rmSync(a, { force: true });
      fs.rmSync(b, { force: true });
      const q = qemuStatus('qemu-img', ['convert', '-p', '-f', 'raw', ...extra, odd, a]);
      const m = await convert(['-p', '-f', 'raw', ...extra, odd, b]);
      expect({ status: m.status, err: m.err }).toEqual({ status: q.status, err: [] });
      const fmt = extra.includes('raw') ? 'raw' : 'qcow2';
      expect(qemu('qemu-img', ['compare', '-f', fmt, '-F', fmt, a, b])).toContain('Images are identical.');
      const info = (f: string): number => (JSON.parse(qemu('qemu-img', ['info', '--output=json', '-f', fmt, f])) as { 'virtual-size': number })['virtual-size'];
      expect(info(b)).toBe(info(a));
      if (fmt === 'qcow2') expect(qemuStatus('qemu-img', ['check', b]).status).toBe(0);
    }
  });

  it('-q silences -p; without -p nothing is printed', async () => {
    expect((await convert(['-p', '-q', '-O', 'raw', src, path.join(dir, 'quiet.raw')])).progress).toBe('');
    expect((await convert(['-O', 'raw', src, path.join(dir, 'plain.raw')])).progress).toBe('');
    expect(qemuStatus('qemu-img', ['convert', '-p', '-q', '-O', 'raw', src, path.join(dir, 'quiet2.raw')]).stdout).toBe('');
  });

  it('-p on an empty image prints what qemu-img prints', async () => {
    const e = path.join(dir, 'empty.qcow2');
    qemu('qemu-img', ['create', '-f', 'qcow2', e, '1M']);
    const q = qemuStatus('qemu-img', ['convert', '-p', '-O', 'raw', e, path.join(dir, 'e1.raw')]);
    expect((await convert(['-p', '-O', 'raw', e, path.join(dir, 'e2.raw')])).progress).toBe(q.stdout);
  });

  it('-n writes into an existing image, zeroing what the source does not hold', async () => {
    for (const fmt of ['raw', 'qcow2']) {
      const t = path.join(dir, `existing.${fmt}`);
      qemu('qemu-img', ['create', '-f', fmt, t, '120M']);
      qemu('qemu-io', ['-f', fmt, '-c', 'write -P 0xff 0 100M', t]);
      const r = await convert(['-n', '-O', fmt, src, t]);
      expect(r).toMatchObject({ status: 0, err: [] });
      expect(qemu('qemu-img', ['compare', '-f', 'qcow2', '-F', fmt, src, t])).toContain('Images are identical.');
      expect(qemu('qemu-img', ['info', '-f', fmt, t])).toContain('120 MiB');
      if (fmt === 'qcow2') expect(qemuStatus('qemu-img', ['check', t]).status).toBe(0);
    }
  });

  it("-n refusals and -c for raw: qemu-img's messages and exit status", async () => {
    const small = path.join(dir, 'small.raw');
    qemu('qemu-img', ['create', '-f', 'raw', small, '1M']);
    const cases: string[][] = [
      ['-n', '-O', 'raw', src, small],
      ['-n', '-o', 'cluster_size=4k', '-O', 'qcow2', src, small],
      ['-c', '-O', 'raw', src, path.join(dir, 'c.raw')],
    ];
    for (const args of cases) {
      const q = qemuStatus('qemu-img', ['convert', ...args]);
      const m = await convert(args);
      expect(m.status).toBe(q.status);
      expect(m.err).toEqual(ours(q.stderr));
    }
    // -c -n over clusters the target already allocated: QEMU refuses the compressed write (EIO)
    const pre = path.join(dir, 'pre-q.qcow2');
    const pre2 = path.join(dir, 'pre-s.qcow2');
    for (const f of [pre, pre2]) {
      qemu('qemu-img', ['create', '-f', 'qcow2', f, '100M']);
      qemu('qemu-io', ['-c', 'write -P 1 0 1M', f]);
    }
    const qc = qemuStatus('qemu-img', ['convert', '-c', '-n', '-O', 'qcow2', src, pre]);
    const mc = await convert(['-c', '-n', '-O', 'qcow2', src, pre2]);
    expect({ status: mc.status, err: mc.err }).toEqual({ status: qc.status, err: ours(qc.stderr) });
    expect(qemuStatus('qemu-img', ['check', pre2]).status).toBe(0);
    // a missing target with -n: both refuse to open it
    const q = qemuStatus('qemu-img', ['convert', '-n', '-O', 'raw', src, path.join(dir, 'missing.raw')]);
    const m = await convert(['-n', '-O', 'raw', src, path.join(dir, 'missing.raw')]);
    expect(m.status).toBe(q.status);
    expect(m.err[0]).toMatch(/^snapstack img: Could not open '.*missing\.raw': /);
    expect(fs.existsSync(path.join(dir, 'missing.raw'))).toBe(false);
  });

  it('older options keep working: -l snapshot, -o cluster_size, -f, -U', async () => {
    const s = path.join(dir, 'snap.qcow2');
    qemu('qemu-img', ['create', '-f', 'qcow2', s, '4M']);
    qemu('qemu-io', ['-c', 'write -P 0x11 0 1M', s]);
    qemu('qemu-img', ['snapshot', '-c', 'one', s]);
    qemu('qemu-io', ['-c', 'write -P 0x22 0 1M', s]);
    const out = path.join(dir, 'snap-out.qcow2');
    expect((await convert(['-U', '-f', 'qcow2', '-l', 'snapshot.name=one', '-O', 'qcow2', '-o', 'cluster_size=4k', s, out])).status).toBe(0);
    const ref = path.join(dir, 'snap-ref.raw');
    qemu('qemu-img', ['convert', '-l', 'snapshot.name=one', '-O', 'raw', s, ref]);
    expect(qemu('qemu-img', ['compare', '-F', 'qcow2', '-f', 'raw', ref, out])).toContain('Images are identical.');
    expect(qemu('qemu-img', ['info', out])).toContain('cluster_size: 4096');
  });
});

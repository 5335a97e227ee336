/**
 * `img convert -B BACKING -F FMT` (and `-o backing_file=..,backing_fmt=..`) against qemu-img 7.2
 * on the same chains: the target names the backing file, gets only what the source's top image
 * allocates (zeros written as zeros, so the backing file never shows through them), and leaves the
 * rest unallocated. Both outputs are compared by `qemu-img map --output=json` (allocation, depth,
 * zero flags), by `qemu-img compare` with the source chain, by `qemu-img check`, and by their bytes
 * against a reference model of the chain; the refusals (messages, exit codes, files left) are
 * compared with qemu-img's.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { imgConvert } from '../src/cli/img-convert.js';
import { describeInterop, qemu, qemuStatus } from './helpers/qemu.js';

const K = 1024;
const M = 1024 * 1024;
const SIZE = 8 * M;

let dir = '';
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-convback-'));
});
afterAll(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

/** Runs our `img convert` in this process from `dir` (relative backing names resolve there). */
async function convert(args: string[]): Promise<{ status: number; err: string[]; progress: string }> {
  const err: string[] = [];
  let progress = '';
  const before = process.cwd();
  process.chdir(dir);
  try {
    const status = await imgConvert(args, () => undefined, (l) => err.push(l), (s) => (progress += s));
    return { status, err, progress };
  } finally {
    process.chdir(before);
  }
}

/** Runs qemu-img from `dir`. */
function qimg(args: string[]): { status: number; stdout: string; stderr: string } {
  const before = process.cwd();
  process.chdir(dir);
  try {
    return qemuStatus('qemu-img', args);
  } finally {
    process.chdir(before);
  }
}

/** qemu-img's stderr lines with its name replaced by ours. */
function ours(stderr: string): string[] {
  return stderr
    .split('\n')
    .filter((l) => l !== '')
    .map((l) => l.replace(/^qemu-img: /, 'snapstack img: '));
}

interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
}

/** `qemu-img map --output=json` without host offsets, adjacent equal ranges merged (layouts differ). */
function allocation(file: string): MapEntry[] {
  const raw = JSON.parse(qemu('qemu-img', ['map', '--output=json', path.join(dir, file)])) as MapEntry[];
  const res: MapEntry[] = [];
  for (const e of raw) {
    const last = res[res.length - 1];
    const cur = { start: e.start, length: e.length, depth: e.depth, present: e.present, zero: e.zero, data: e.data };
    if (last !== undefined && last.depth === cur.depth && last.present === cur.present && last.zero === cur.zero && last.data === cur.data) {
      last.length += cur.length;
    } else res.push(cur);
  }
  return res;
}

/** The bytes an image reads (its whole chain), through qemu-img convert to raw. */
function bytesOf(file: string): Buffer {
  const out = path.join(dir, `${file}.bytes.raw`);
  qemu('qemu-img', ['convert', '-O', 'raw', path.join(dir, file), out]);
  const b = fs.readFileSync(out);
  fs.rmSync(out);
  return b;
}

/** The backing file and format an image records (qemu-img info --output=json). */
function backingOf(file: string): { name: string | undefined; format: string | undefined } {
  const info = JSON.parse(qemu('qemu-img', ['info', '--output=json', path.join(dir, file)])) as Record<string, unknown>;
  return { name: info['backing-filename'] as string | undefined, format: info['backing-filename-format'] as string | undefined };
}

/** qemu-img check exits 0 and reports no errors or leaks. */
function expectClean(file: string): void {
  const r = qemuStatus('qemu-img', ['check', path.join(dir, file)]);
  expect(r.stdout + r.stderr).toContain('No errors were found on the image.');
  expect(r.status).toBe(0);
}

/** A pattern write applied to the model as qemu-io applies it. */
function fill(model: Buffer, byte: number, off: number, len: number): void {
  model.fill(byte, off, off + len);
}

describeInterop('img convert -B against qemu-img', () => {
  /** What the chain base <- top reads: the reference model. */
  const model = Buffer.alloc(SIZE);

  beforeAll(() => {
    const base = path.join(dir, 'base.qcow2');
    const top = path.join(dir, 'top.qcow2');
    qemu('qemu-img', ['create', '-f', 'qcow2', base, `${SIZE}`]);
    qemu('qemu-io', ['-c', 'write -P 0x11 0 6M', '-c', 'write -P 0x12 6M 1M', base]);
    fill(model, 0x11, 0, 6 * M);
    fill(model, 0x12, 6 * M, M);
    qemu('qemu-img', ['create', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top]);
    // data, a partial cluster (copy-on-write from base), zeros by flag, zeros as data, a discard
    // (a zero flag on a v3 overlay), data over an area the base does not have
    const writes: [string, number, number, number][] = [
      ['write -P 0x21 64k 64k', 0x21, 64 * K, 64 * K],
      ['write -P 0x22 300k 8k', 0x22, 300 * K, 8 * K],
      ['write -z 1M 256k', 0, M, 256 * K],
      ['write -P 0 2M 128k', 0, 2 * M, 128 * K],
      ['discard 3M 128k', 0, 3 * M, 128 * K],
      ['write -P 0x23 7M 192k', 0x23, 7 * M, 192 * K],
      ['write -z 7680k 64k', 0, 7680 * K, 64 * K],
    ];
    qemu('qemu-io', [...writes.flatMap(([c]) => ['-c', c]), top]);
    for (const [, byte, off, len] of writes) fill(model, byte, off, len);
    // another base with other data: a target over it shows its data wherever top allocates nothing
    const other = path.join(dir, 'other.qcow2');
    qemu('qemu-img', ['create', '-f', 'qcow2', other, `${SIZE}`]);
    qemu('qemu-io', ['-c', 'write -P 0x31 0 8M', other]);
    // a short backing file (4 MiB) and a source with zeros past its end
    qemu('qemu-img', ['create', '-f', 'qcow2', path.join(dir, 'short.qcow2'), '4M']);
    qemu('qemu-io', ['-c', 'write -P 0x41 0 4M', path.join(dir, 'short.qcow2')]);
    qemu('qemu-img', ['create', '-f', 'qcow2', '-b', 'short.qcow2', '-F', 'qcow2', path.join(dir, 'long.qcow2'), '8M']);
    qemu('qemu-io', ['-c', 'write -z 3M 2M', '-c', 'write -P 0x42 6M 64k', '-c', 'write -z 7M 64k', path.join(dir, 'long.qcow2')]);
  });

  it('the reference model reads as the source chain does', () => {
    expect(bytesOf('top.qcow2').equals(model)).toBe(true);
  });

  it('a target over the source\'s own base gets only the top\'s clusters, allocated as qemu-img allocates them', async () => {
    const q = qimg(['convert', '-O', 'qcow2', '-B', 'base.qcow2', '-F', 'qcow2', 'top.qcow2', 'q1.qcow2']);
    expect(q.status).toBe(0);
    const m = await convert(['-O', 'qcow2', '-B', 'base.qcow2', '-F', 'qcow2', 'top.qcow2', 's1.qcow2']);
    expect(m.err).toEqual([]);
    expect(m.status).toBe(0);
    const ma = allocation('s1.qcow2');
    expect(ma).toEqual(allocation('q1.qcow2'));
    // the top's own ranges are at depth 0, everything else reads from the base (depth 1)
    expect(ma.some((e) => e.depth === 1)).toBe(true);
    expect(ma.filter((e) => e.depth === 0 && e.zero).length).toBeGreaterThanOrEqual(3);
    expect(backingOf('s1.qcow2')).toEqual({ name: 'base.qcow2', format: 'qcow2' });
    expect(qemu('qemu-img', ['compare', path.join(dir, 's1.qcow2'), path.join(dir, 'top.qcow2')])).toContain('Images are identical.');
    expectClean('s1.qcow2');
    expect(bytesOf('s1.qcow2').equals(model)).toBe(true);
    // and far smaller than a full copy: only the top's data clusters
    const full = await convert(['-O', 'qcow2', 'top.qcow2', 'full.qcow2']);
    expect(full.status).toBe(0);
    expect(fs.statSync(path.join(dir, 's1.qcow2')).size).toBeLessThan(fs.statSync(path.join(dir, 'full.qcow2')).size / 4);
  });

  it('-o backing_file=..,backing_fmt=.. makes the same target as -B and -F', async () => {
    const q = qimg(['convert', '-O', 'qcow2', '-o', 'backing_file=base.qcow2,backing_fmt=qcow2', 'top.qcow2', 'q2.qcow2']);
    expect(q.status).toBe(0);
    const m = await convert(['-O', 'qcow2', '-o', 'backing_file=base.qcow2,backing_fmt=qcow2', 'top.qcow2', 's2.qcow2']);
    expect(m.status).toBe(0);
    expect(allocation('s2.qcow2')).toEqual(allocation('q2.qcow2'));
    expect(allocation('s2.qcow2')).toEqual(allocation('s1.qcow2'));
    expectClean('s2.qcow2');
  });

  it('-B and -F win over -o backing_file and backing_fmt, as in qemu-img', async () => {
    const args = ['-O', 'qcow2', '-B', 'base.qcow2', '-F', 'qcow2', '-o', 'backing_file=other.qcow2,backing_fmt=raw', 'top.qcow2'];
    expect(qimg(['convert', ...args, 'q3.qcow2']).status).toBe(0);
    expect((await convert([...args, 's3.qcow2'])).status).toBe(0);
    expect(backingOf('s3.qcow2')).toEqual(backingOf('q3.qcow2'));
    expect(backingOf('s3.qcow2')).toEqual({ name: 'base.qcow2', format: 'qcow2' });
  });

  it('a target over another backing file shows that file wherever the source\'s top allocates nothing', async () => {
    expect(qimg(['convert', '-O', 'qcow2', '-B', 'other.qcow2', '-F', 'qcow2', 'top.qcow2', 'q4.qcow2']).status).toBe(0);
    expect((await convert(['-O', 'qcow2', '-B', 'other.qcow2', '-F', 'qcow2', 'top.qcow2', 's4.qcow2'])).status).toBe(0);
    expect(allocation('s4.qcow2')).toEqual(allocation('q4.qcow2'));
    expect(qemu('qemu-img', ['compare', path.join(dir, 's4.qcow2'), path.join(dir, 'q4.qcow2')])).toContain('Images are identical.');
    // the reference: top's own ranges from the model, the rest from other (0x31); the zeros of
    // top (flags, zero data, the discard) stay zeros and do not show other's data
    const want = Buffer.alloc(SIZE, 0x31);
    for (const [off, len] of [
      [64 * K, 64 * K],
      [256 * K, 64 * K], // the partial write made cluster 4 (256k..320k) the top's
      [M, 256 * K],
      [2 * M, 128 * K],
      [3 * M, 128 * K],
      [7 * M, 192 * K],
      [7680 * K, 64 * K],
    ] as const) {
      model.copy(want, off, off, off + len);
    }
    expect(bytesOf('s4.qcow2').equals(want)).toBe(true);
    expectClean('s4.qcow2');
  });

  it('zeros past the end of a short target backing file are left unallocated, as qemu-img leaves them', async () => {
    expect(qimg(['convert', '-O', 'qcow2', '-B', 'short.qcow2', '-F', 'qcow2', 'long.qcow2', 'q5.qcow2']).status).toBe(0);
    expect((await convert(['-O', 'qcow2', '-B', 'short.qcow2', '-F', 'qcow2', 'long.qcow2', 's5.qcow2'])).status).toBe(0);
    const a = allocation('s5.qcow2');
    expect(a).toEqual(allocation('q5.qcow2'));
    // 3M..4M is a zero flag (the backing file reaches it), 4M..6M (zeros past it) is nothing at all
    expect(a.find((e) => e.start === 3 * M)).toMatchObject({ length: M, depth: 0, present: true, zero: true, data: false });
    expect(a.find((e) => e.start === 4 * M)).toMatchObject({ length: 2 * M, present: false, zero: true });
    expect(qemu('qemu-img', ['compare', path.join(dir, 's5.qcow2'), path.join(dir, 'long.qcow2')])).toContain('Images are identical.');
    expectClean('s5.qcow2');
  });

  it('a source without a backing file is copied whole onto the target\'s backing file', async () => {
    expect(qimg(['convert', '-O', 'qcow2', '-B', 'other.qcow2', '-F', 'qcow2', 'base.qcow2', 'q6.qcow2']).status).toBe(0);
    expect((await convert(['-O', 'qcow2', '-B', 'other.qcow2', '-F', 'qcow2', 'base.qcow2', 's6.qcow2'])).status).toBe(0);
    const a = allocation('s6.qcow2');
    expect(a).toEqual(allocation('q6.qcow2'));
    // base's unallocated last MiB is written as zeros: other's 0x31 must not show through
    expect(a[a.length - 1]).toMatchObject({ depth: 0, zero: true });
    expect(qemu('qemu-img', ['compare', path.join(dir, 's6.qcow2'), path.join(dir, 'base.qcow2')])).toContain('Images are identical.');
    expectClean('s6.qcow2');
  });

  it('-c -B writes the top\'s clusters compressed over the backing file', async () => {
    expect(qimg(['convert', '-c', '-O', 'qcow2', '-B', 'base.qcow2', '-F', 'qcow2', 'top.qcow2', 'q7.qcow2']).status).toBe(0);
    expect((await convert(['-c', '-O', 'qcow2', '-B', 'base.qcow2', '-F', 'qcow2', 'top.qcow2', 's7.qcow2'])).status).toBe(0);
    expect(allocation('s7.qcow2')).toEqual(allocation('q7.qcow2'));
    expect(bytesOf('s7.qcow2').equals(model)).toBe(true);
    expectClean('s7.qcow2');
  });

  it('a compat=0.10 target (no zero flags) over a backing file gets the zeros as data', async () => {
    const args = ['-O', 'qcow2', '-o', 'compat=0.10', '-B', 'base.qcow2', '-F', 'qcow2', 'top.qcow2'];
    expect(qimg(['convert', ...args, 'q8.qcow2']).status).toBe(0);
    expect((await convert([...args, 's8.qcow2'])).status).toBe(0);
    expect(allocation('s8.qcow2')).toEqual(allocation('q8.qcow2'));
    expect(bytesOf('s8.qcow2').equals(model)).toBe(true);
    expectClean('s8.qcow2');
  });

  it('-n -B writes into an existing image only what the source\'s top allocates', async () => {
    for (const f of ['q9.qcow2', 's9.qcow2']) qemu('qemu-img', ['create', '-f', 'qcow2', '-b', 'other.qcow2', '-F', 'qcow2', path.join(dir, f)]);
    // qemu-img takes -B's word for the target's backing file and needs no -F with -n
    expect(qimg(['convert', '-n', '-O', 'qcow2', '-B', 'base.qcow2', 'top.qcow2', 'q9.qcow2']).status).toBe(0);
    const m = await convert(['-n', '-O', 'qcow2', '-B', 'base.qcow2', 'top.qcow2', 's9.qcow2']);
    expect(m.err).toEqual([]);
    expect(m.status).toBe(0);
    expect(allocation('s9.qcow2')).toEqual(allocation('q9.qcow2'));
    expect(backingOf('s9.qcow2').name).toBe('other.qcow2');
    expect(qemu('qemu-img', ['compare', path.join(dir, 's9.qcow2'), path.join(dir, 'q9.qcow2')])).toContain('Images are identical.');
    expectClean('s9.qcow2');
  });

  it('-p counts only what is copied (the top\'s ranges), printing qemu-img\'s progress lines', async () => {
    const q = qimg(['convert', '-p', '-O', 'qcow2', '-B', 'base.qcow2', '-F', 'qcow2', 'top.qcow2', 'q10.qcow2']);
    const m = await convert(['-p', '-O', 'qcow2', '-B', 'base.qcow2', '-F', 'qcow2', 'top.qcow2', 's10.qcow2']);
    expect(m.status).toBe(q.status);
    expect(m.progress).toBe(q.stdout);
    expect(q.stdout.split('\r').length).toBeGreaterThan(3);
  });

  for (const [label, args] of [
    ['-B without -F', ['-O', 'qcow2', '-B', 'base.qcow2', 'top.qcow2']],
    ['-o backing_file without backing_fmt', ['-O', 'qcow2', '-o', 'backing_file=base.qcow2', 'top.qcow2']],
    ['-F without -B', ['-O', 'qcow2', '-F', 'qcow2', 'top.qcow2']],
    ['-o backing_fmt without backing_file', ['-O', 'qcow2', '-o', 'backing_fmt=qcow2', 'top.qcow2']],
    ['a raw target with -B', ['-O', 'raw', '-B', 'base.qcow2', '-F', 'qcow2', 'top.qcow2']],
    ['a raw target with -F', ['-O', 'raw', '-F', 'qcow2', 'top.qcow2']],
    ['several sources with -B', ['-O', 'qcow2', '-B', 'base.qcow2', '-F', 'qcow2', 'top.qcow2', 'top.qcow2']],
    ['-B naming a missing file', ['-O', 'qcow2', '-B', 'missing.qcow2', '-F', 'qcow2', 'top.qcow2']],
    ['-B with a missing snapshot', ['-O', 'qcow2', '-B', 'base.qcow2', '-F', 'qcow2', '-l', 'snapshot.name=nope', 'top.qcow2']],
  ] as const) {
    it(`refuses ${label} as qemu-img does (message, exit code, file left behind)`, async () => {
      const tag = label.replace(/\W/g, '');
      const q = qimg(['convert', ...args, `rq-${tag}.qcow2`]);
      const m = await convert([...args, `rs-${tag}.qcow2`]);
      expect(q.status).toBe(1);
      expect(m.status).toBe(q.status);
      expect(m.err).toEqual(ours(q.stderr.replaceAll(`rq-${tag}`, `rs-${tag}`)));
      expect(fs.existsSync(path.join(dir, `rs-${tag}.qcow2`))).toBe(fs.existsSync(path.join(dir, `rq-${tag}.qcow2`)));
    });
  }
});

/**
 * Backing chains against qemu-img / qemu-io 7.2, with a reference model (the guest bytes the top
 * of the chain must show) as the oracle: chains 1 to 8 deep, each overlay created and written by
 * qemu or by snapstack in turn (cluster sizes, v2 and v3 layers mixed); after every step
 * qemu-img check is clean on every image, qemu-img convert of the top equals the model, snapstack
 * reads the same bytes, and `img map` / `img info --backing-chain` print what qemu-img prints.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { imgMain } from '../src/cli/img.js';
import { openImage, shutdownIOThreads, withBql } from '../src/index.js';
import { describeInterop, qemu, qemuStatus } from './helpers/qemu.js';
import { prng } from './helpers/prng.js';

let dir: string;
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-interop-backing-'));
});
afterAll(async () => {
  fs.rmSync(dir, { recursive: true, force: true });
  await withBql((bql) => shutdownIOThreads(bql));
});

const KiB = 1024;
const MiB = 1024 * 1024;

/** Runs `snapstack img ARGS` in-process; returns the exit status and what it printed. */
async function snapImg(args: string[]): Promise<{ status: number; out: string; err: string }> {
  const out: string[] = [];
  const err: string[] = [];
  const status = await imgMain(args, (s) => out.push(s), (s) => err.push(s));
  return { status, out: out.join('\n'), err: err.join('\n') };
}

function expectCheckClean(file: string): void {
  const r = qemuStatus('qemu-img', ['check', file]);
  expect(`${file}: ${r.stdout}${r.stderr}`.trim() + `\nexit ${r.status}`).toMatch(/No errors were found on the image\.[\s\S]*exit 0$/);
}

function qemuContents(file: string): Buffer {
  const out = path.join(dir, `convert-${Math.random().toString(36).slice(2)}.raw`);
  qemu('qemu-img', ['convert', '-U', '-O', 'raw', file, out]);
  try {
    return fs.readFileSync(out);
  } finally {
    fs.rmSync(out, { force: true });
  }
}

async function snapContents(file: string): Promise<Uint8Array> {
  const img = await openImage(file, { readOnly: true, aio: 'sync' });
  try {
    return await img.read(0, img.size);
  } finally {
    await img.close();
  }
}

function firstDifference(a: Uint8Array, b: Uint8Array): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return a.length === b.length ? -1 : n;
}

function expectSameBytes(actual: Uint8Array, expected: Uint8Array, what: string): void {
  const d = firstDifference(actual, expected);
  expect(d, `${what}: first difference at byte ${d}`).toBe(-1);
}

/** One guest operation on the top image, applied by qemu-io or by snapstack and to the model. */
interface Op {
  kind: 'write' | 'zero' | 'discard';
  offset: number;
  bytes: number;
  pattern: number;
}

function applyToModel(model: Uint8Array, op: Op): void {
  model.fill(op.kind === 'write' ? op.pattern : 0, op.offset, op.offset + op.bytes);
}

function qemuIoCommand(op: Op): string {
  if (op.kind === 'write') return `write -P ${op.pattern} ${op.offset} ${op.bytes}`;
  if (op.kind === 'zero') return `write -z ${op.offset} ${op.bytes}`;
  return `discard ${op.offset} ${op.bytes}`;
}

async function snapApply(file: string, ops: Op[]): Promise<void> {
  const img = await openImage(file, { aio: 'sync' });
  try {
    for (const op of ops) {
      if (op.kind === 'write') await img.write(op.offset, new Uint8Array(op.bytes).fill(op.pattern));
      else if (op.kind === 'zero') await img.writeZeroes(op.offset, op.bytes);
      else await img.discard(op.offset, op.bytes);
    }
  } finally {
    await img.close();
  }
}

/** Random operations: unaligned writes and zeroes; discards whole top clusters (v3 only). */
function randomOps(rand: () => number, size: number, cluster: number, v3: boolean, n: number): Op[] {
  const ops: Op[] = [];
  for (let i = 0; i < n; i++) {
    const r = rand();
    const kind: Op['kind'] = r < 0.6 ? 'write' : r < 0.8 || !v3 ? 'zero' : 'discard';
    if (kind === 'discard') {
      const clusters = 1 + Math.floor(rand() * Math.min(3, size / cluster));
      const first = Math.floor(rand() * (size / cluster - clusters + 1));
      ops.push({ kind, offset: first * cluster, bytes: clusters * cluster, pattern: 0 });
      continue;
    }
    const bytes = 512 * (1 + Math.floor(rand() * 300));
    const offset = 512 * Math.floor(rand() * ((size - bytes) / 512));
    ops.push({ kind, offset, bytes, pattern: 1 + Math.floor(rand() * 254) });
  }
  return ops;
}

function expectSameOutput(ours: { status: number; out: string }, theirs: string, what: string, ignore: RegExp | null = null): void {
  expect(ours.status, what).toBe(0);
  const drop = (s: string): string =>
    s
      .split('\n')
      .filter((l) => ignore === null || !ignore.test(l))
      .join('\n')
      .trim();
  expect(drop(ours.out), what).toBe(drop(theirs));
}

describeInterop('backing chains against qemu-img 7.2', () => {
  it('chains 1 to 8 deep, made and written by both tools in turn, read the same as the model', async () => {
    const rand = prng(20261201);
    const size = 4 * MiB;
    const model = new Uint8Array(size);
    const base = path.join(dir, 'chain-0.qcow2');
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', base, String(size)]);
    qemu('qemu-io', ['-c', `write -P 17 0 ${size / 2}`, base]);
    model.fill(17, 0, size / 2);
    const files = [base];
    const layouts = [
      { cluster: 65536, compat: '1.1' },
      { cluster: 4096, compat: '1.1' },
      { cluster: 65536, compat: '0.10' },
      { cluster: 16384, compat: '1.1' },
      { cluster: 512, compat: '1.1' },
      { cluster: 65536, compat: '1.1' },
      { cluster: 2 * MiB, compat: '1.1' },
      { cluster: 8192, compat: '0.10' },
    ];
    for (let depth = 1; depth <= 8; depth++) {
      const layout = layouts[depth - 1] ?? { cluster: 65536, compat: '1.1' };
      const file = path.join(dir, `chain-${depth}.qcow2`);
      const backing = path.basename(files[files.length - 1] ?? base); // relative: resolved against the overlay's directory
      const o = `cluster_size=${layout.cluster},compat=${layout.compat}`;
      const createdBySnapstack = depth % 2 === 1;
      if (createdBySnapstack) {
        const r = await snapImg(['create', '-q', '-f', 'qcow2', '-o', o, '-b', backing, '-F', 'qcow2', file]);
        expect(r.status, r.err).toBe(0);
      } else {
        qemu('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', o, '-b', backing, '-F', 'qcow2', file]);
      }
      files.push(file);
      const v3 = layout.compat === '1.1';
      // the top is written by the other tool than the one that created it, then by the first
      const first = randomOps(rand, size, layout.cluster, v3, 6);
      const second = randomOps(rand, size, layout.cluster, v3, 6);
      const byQemu = createdBySnapstack ? first : second;
      const bySnap = createdBySnapstack ? second : first;
      const runQemu = (): void => void qemu('qemu-io', byQemu.flatMap((op) => ['-c', qemuIoCommand(op)]).concat([file]));
      if (createdBySnapstack) {
        runQemu();
        await snapApply(file, bySnap);
      } else {
        await snapApply(file, bySnap);
        runQemu();
      }
      for (const op of first) applyToModel(model, op);
      for (const op of second) applyToModel(model, op);
      for (const f of files) expectCheckClean(f);
      expectSameBytes(qemuContents(file), model, `qemu-img convert of the top at depth ${depth}`);
      expectSameBytes(await snapContents(file), model, `snapstack read of the top at depth ${depth}`);
      expectSameOutput(await snapImg(['map', '--output=json', file]), qemu('qemu-img', ['map', '--output=json', file]), `img map --output=json at depth ${depth}`);
      expectSameOutput(await snapImg(['map', file]), qemu('qemu-img', ['map', file]), `img map at depth ${depth}`);
    }
    const top = files[files.length - 1] ?? base;
    expectSameOutput(await snapImg(['info', '--backing-chain', top]), qemu('qemu-img', ['info', '--backing-chain', top]), 'img info --backing-chain', /^disk size:/);
    expectSameOutput(
      await snapImg(['info', '--backing-chain', '--output=json', top]),
      qemu('qemu-img', ['info', '--backing-chain', '--output=json', top]),
      'img info --backing-chain --output=json',
      /"actual-size"/,
    );
  });

  it('an overlay larger than its backing file reads zeros past it and copies on write across its end', async () => {
    const base = path.join(dir, 'short-base.qcow2');
    const top = path.join(dir, 'long-top.qcow2');
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', base, String(1 * MiB + 64 * KiB)]);
    qemu('qemu-io', ['-c', `write -P 0x5a 0 ${1 * MiB + 64 * KiB}`, base]);
    expect((await snapImg(['create', '-q', '-f', 'qcow2', '-b', 'short-base.qcow2', '-F', 'qcow2', top, '3M'])).status).toBe(0);
    const model = new Uint8Array(3 * MiB);
    model.fill(0x5a, 0, 1 * MiB + 64 * KiB);
    // a partial write into the cluster holding the backing file's end, and one past it
    const ops: Op[] = [
      { kind: 'write', offset: 1 * MiB + 60 * KiB, bytes: 8 * KiB, pattern: 0x11 },
      { kind: 'write', offset: 2 * MiB + 512, bytes: 1024, pattern: 0x22 },
    ];
    await snapApply(top, ops);
    for (const op of ops) applyToModel(model, op);
    expectCheckClean(top);
    expectSameBytes(qemuContents(top), model, 'qemu-img convert of the long overlay');
    expectSameBytes(await snapContents(top), model, 'snapstack read of the long overlay');
    expectSameOutput(await snapImg(['map', '--output=json', top]), qemu('qemu-img', ['map', '--output=json', top]), 'img map past the backing end');
  });

  it('img create with a backing file: size taken from it, qemu-img refusals, the Formatting line', async () => {
    const base = path.join(dir, 'cr-base.qcow2');
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', base, '3M']);
    const ours = await snapImg(['create', '-f', 'qcow2', '-b', 'cr-base.qcow2', '-F', 'qcow2', path.join(dir, 'cr-a.qcow2')]);
    const theirs = qemu('qemu-img', ['create', '-f', 'qcow2', '-b', 'cr-base.qcow2', '-F', 'qcow2', path.join(dir, 'cr-b.qcow2')]);
    expect(ours.out.replace('cr-a', 'cr-b')).toBe(theirs.trim());
    const info = JSON.parse(qemu('qemu-img', ['info', '--output=json', path.join(dir, 'cr-a.qcow2')])) as Record<string, unknown>;
    expect(info['virtual-size']).toBe(3 * MiB);
    expect(info['backing-filename']).toBe('cr-base.qcow2');
    expect(info['backing-filename-format']).toBe('qcow2');
    // the refusals qemu-img 7.2 makes, each with exit status 1 and no file left behind
    const cases: Array<[string[], RegExp]> = [
      [['-f', 'qcow2', '-b', 'cr-base.qcow2', path.join(dir, 'cr-c.qcow2')], /Backing file specified without backing format/],
      [['-f', 'raw', '-b', 'cr-base.qcow2', '-F', 'qcow2', path.join(dir, 'cr-c.qcow2'), '1M'], /Backing file not supported for file format 'raw'/],
      [['-f', 'qcow2', '-u', '-b', 'cr-base.qcow2', '-F', 'qcow2', path.join(dir, 'cr-c.qcow2')], /Image creation needs a size parameter/],
      [['-f', 'qcow2', '-b', 'missing.qcow2', '-F', 'qcow2', path.join(dir, 'cr-c.qcow2')], /Could not open backing image/],
      [['-f', 'qcow2', '-F', 'qcow2', path.join(dir, 'cr-c.qcow2'), '1M'], /Backing format cannot be used without backing file/],
    ];
    for (const [args, msg] of cases) {
      const r = await snapImg(['create', ...args]);
      expect(r.status, args.join(' ')).toBe(1);
      expect(r.err, args.join(' ')).toMatch(msg);
      expect(qemuStatus('qemu-img', ['create', '-q', ...args]).status, `qemu-img also refuses: ${args.join(' ')}`).toBe(1);
      expect(fs.existsSync(path.join(dir, 'cr-c.qcow2')), args.join(' ')).toBe(false);
    }
    // an image never becomes its own backing file: by its name, another spelling of it, or a hard link
    const own = path.join(dir, 'cr-base.qcow2');
    fs.linkSync(own, path.join(dir, 'cr-link.qcow2'));
    const before = fs.readFileSync(own);
    for (const [b, target] of [
      ['cr-base.qcow2', own],
      ['./cr-base.qcow2', own],
      [own, path.join(dir, '.', 'cr-base.qcow2')],
      ['cr-link.qcow2', own],
    ] as const) {
      for (const u of [[], ['-u']]) {
        const r = await snapImg(['create', '-q', '-f', 'qcow2', ...u, '-b', b, '-F', 'qcow2', target, '3M']);
        expect(r.status, `${b} over ${target} ${u.join('')}`).toBe(1);
        expect(r.err).toMatch(/same filename as the backing file/);
      }
    }
    expect(Buffer.compare(fs.readFileSync(own), before)).toBe(0);
    // qemu-img 7.2 compares the two names as strings only (so the other spellings above would destroy
    // the image there); the identical string it refuses too
    expect(qemuStatus('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', own, '-F', 'qcow2', own]).status).toBe(1);
    expect(Buffer.compare(fs.readFileSync(own), before)).toBe(0);
    // convert onto a target with a backing file copies only what the top allocates (test/img-convert-backing.test.ts)
    const conv = await snapImg(['convert', '-O', 'qcow2', '-o', 'backing_file=cr-base.qcow2,backing_fmt=qcow2', path.join(dir, 'cr-a.qcow2'), path.join(dir, 'cr-conv.qcow2')]);
    expect(conv.status, conv.err).toBe(0);
    expect(qemu('qemu-img', ['compare', path.join(dir, 'cr-a.qcow2'), path.join(dir, 'cr-conv.qcow2')])).toContain('Images are identical.');
    // -u: the backing file need not exist; the image names it all the same
    expect((await snapImg(['create', '-q', '-f', 'qcow2', '-u', '-b', 'missing.qcow2', '-F', 'qcow2', path.join(dir, 'cr-u.qcow2'), '1M'])).status).toBe(0);
    expect(JSON.parse(qemu('qemu-img', ['info', '--output=json', path.join(dir, 'cr-u.qcow2')]))['backing-filename']).toBe('missing.qcow2');
  });
});

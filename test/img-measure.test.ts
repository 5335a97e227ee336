/**
 * `img measure` against qemu-img 7.2 measure on the same inputs: --size for raw and qcow2 targets
 * over a seeded table of sizes and -o options (cluster_size, refcount_bits, compat,
 * preallocation), real sources of several shapes (empty, partly written, full, 4 KiB clusters,
 * a raw file, an internal snapshot with -l, an overlay), human and JSON output, and the refusals.
 * The unit tests pin QEMU's formulas on values qemu-img printed.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cli } from './helpers/img-cli.js';
import { measureQcow2, qcow2PreallocSize } from '../src/drivers/qcow2/measure.js';
import { shutdownIOThreads, withBql } from '../src/index.js';
import { prng } from './helpers/prng.js';
import { describeInterop, qemu, qemuStatus } from './helpers/qemu.js';

let dir = '';
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-measure-'));
});
afterAll(async () => {
  if (dir !== '') fs.rmSync(dir, { recursive: true, force: true });
  await withBql((bql) => shutdownIOThreads(bql));
});

/** Both tools with the same arguments: the same status and stdout, and qemu-img's stderr lines as prefixes of ours. */
async function same(args: string[]): Promise<void> {
  const mine = await cli(['measure', ...args]);
  const theirs = qemuStatus('qemu-img', ['measure', ...args]);
  const where = `measure ${args.join(' ')}`;
  expect({ where, status: mine.status, out: mine.out }).toEqual({ where, status: theirs.status, out: theirs.stdout });
  const want = theirs.stderr
    .split('\n')
    .filter((l) => l !== '' && !l.startsWith('Try '))
    .map((l) => l.replace(/^qemu-img: /, 'snapstack img: '));
  const got = mine.err.split('\n').filter((l) => l !== '' && !l.startsWith('Try '));
  expect({ where, got: got.map((l, i) => l.slice(0, (want[i] ?? l).length)) }).toEqual({ where, got: want });
}

describe('measure formulas', () => {
  it('match what qemu-img 7.2 printed', () => {
    const t = { clusterSize: 65536, refcountOrder: 4, preallocation: 'off' as const, hasBackingFile: false };
    expect(measureQcow2(t, 1 << 30, null)).toEqual({ required: 393216, fullyAllocated: 1074135040 });
    expect(qcow2PreallocSize(1 << 30, 4096, 0)).toBe(1075888128);
    expect(measureQcow2({ ...t, clusterSize: 4096, refcountOrder: 0 }, 1 << 30, null).required).toBe(2146304);
  });
});

describeInterop('img measure against qemu-img measure', () => {
  const sources: string[][] = [];

  beforeAll(() => {
    const f = (n: string): string => path.join(dir, n);
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', f('empty.qcow2'), '64M']);
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', f('part.qcow2'), '100M']);
    qemu('qemu-io', ['-c', 'write -P 1 0 1M', '-c', 'write -P 2 5000k 3k', '-c', 'write -P 3 64M 64k', '-c', 'write -z 70M 1M', '-c', 'write -P 4 99M 1M', f('part.qcow2')]);
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', f('full.qcow2'), '16M']);
    qemu('qemu-io', ['-c', 'write -P 5 0 16M', f('full.qcow2')]);
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', f('small.qcow2'), '3000k']);
    qemu('qemu-io', ['-c', 'write -P 6 4k 4k', '-c', 'write -P 7 100k 1k', '-c', 'write -P 8 2M 300k', f('small.qcow2')]);
    qemu('qemu-img', ['create', '-q', '-f', 'raw', f('sparse.raw'), '10M']);
    // data in the first block: qemu-img create allocates it (file-posix's allocate_first_block),
    // so QEMU counts it as data even when it holds zeros, and snapstack cannot see holes (see img-measure.ts)
    qemu('qemu-io', ['-f', 'raw', '-c', 'write -P 9 0 512', '-c', 'write -P 9 1M 8k', '-c', 'write -P 9 5M 100k', f('sparse.raw')]);
    qemu('qemu-img', ['create', '-q', '-f', 'raw', f('dense.raw'), '2M']);
    qemu('qemu-io', ['-f', 'raw', '-c', 'write -P 10 0 2M', f('dense.raw')]);
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', f('snap.qcow2'), '32M']);
    qemu('qemu-io', ['-c', 'write -P 11 0 8M', f('snap.qcow2')]);
    qemu('qemu-img', ['snapshot', '-c', 's1', f('snap.qcow2')]);
    qemu('qemu-io', ['-c', 'write -P 12 16M 1M', f('snap.qcow2')]);
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'part.qcow2', '-F', 'qcow2', f('over.qcow2')]);
    qemu('qemu-io', ['-c', 'write -P 13 30M 2M', f('over.qcow2')]);
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', f('bitmaps.qcow2'), '1G']);
    qemu('qemu-io', ['-c', 'write -P 16 0 1M', f('bitmaps.qcow2')]);
    qemu('qemu-img', ['bitmap', '--add', '-g', '64k', f('bitmaps.qcow2'), 'b0']);
    qemu('qemu-img', ['bitmap', '--add', '-g', '512', f('bitmaps.qcow2'), 'a-longer-bitmap-name']);
    sources.push(
      [f('bitmaps.qcow2')],
      [f('empty.qcow2')],
      [f('part.qcow2')],
      ['-f', 'qcow2', f('full.qcow2')],
      [f('small.qcow2')],
      ['-f', 'raw', f('sparse.raw')],
      ['-f', 'raw', f('dense.raw')],
      ['-l', 'snapshot.name=s1', f('snap.qcow2')],
      [f('snap.qcow2')],
      [f('over.qcow2')],
    );
  });

  const OPTIONS = [
    [],
    ['-o', 'cluster_size=4k'],
    ['-o', 'cluster_size=512'],
    ['-o', 'cluster_size=2M'],
    ['-o', 'refcount_bits=1'],
    ['-o', 'refcount_bits=64,cluster_size=16k'],
    ['-o', 'compat=0.10'],
    ['-o', 'preallocation=full'],
    ['-o', 'preallocation=metadata,cluster_size=128k'],
  ];

  it('--size N: the same numbers for a seeded table of sizes and options, raw and qcow2, human and JSON', async () => {
    const rnd = prng(1201);
    const sizes = ['0', '1', '512', '1000', '1M', '1G', '1T', '3000k', '17G', '100M'];
    for (let i = 0; i < 40; i++) {
      const size = sizes[Math.floor(rnd() * sizes.length)] as string;
      const opts = OPTIONS[Math.floor(rnd() * OPTIONS.length)] as string[];
      const out = rnd() < 0.5 ? ['--output=json'] : [];
      const fmt = rnd() < 0.2 ? ['-O', 'raw'] : ['-O', 'qcow2'];
      await same([...out, ...fmt, ...(fmt[1] === 'raw' ? [] : opts), '--size', size]);
    }
    await same(['--size', '5G']);
  }, 120_000);

  it('real sources: the same numbers for every source shape under each option set', async () => {
    for (const src of sources) {
      for (const opts of OPTIONS) await same(['-O', 'qcow2', ...opts, ...src]);
      await same(['--output=json', '-O', 'qcow2', ...src]);
      await same(['-O', 'raw', ...src]);
    }
    await same(['-O', 'qcow2', '-o', `backing_file=${path.join(dir, 'part.qcow2')}`, path.join(dir, 'over.qcow2')]);
  }, 300_000);

  it('refuses as qemu-img does', async () => {
    await same([]);
    await same(['--size', '1G', path.join(dir, 'empty.qcow2')]);
    await same(['-O', 'foo', '--size', '1G']);
    await same(['-O', 'qcow2', '-o', 'foo=1', '--size', '1G']);
    await same(['-O', 'raw', '-o', 'cluster_size=4k', '--size', '1G']);
    await same(['-O', 'qcow2', '-o', 'cluster_size=1000', '--size', '1G']);
    await same(['-O', 'qcow2', '-o', 'compat=0.10,refcount_bits=8', '--size', '1G']);
    await same(['-O', 'qcow2', '--size', 'abc']);
  }, 60_000);
});

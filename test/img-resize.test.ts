/**
 * `img resize` against qemu-img 7.2 resize on copies of the same images: output lines and exit
 * codes for every refusal, sizes, `qemu-img check`, the file length after a shrink and the
 * contents (`qemu-img compare`, snapshots included) for raw and qcow2; and a qcow2 shrink under
 * the power-loss simulator: every crash image is clean or only leaks, has the old or the new
 * size and keeps the data before the new end.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { cli } from './helpers/img-cli.js';
import { openImage, shutdownIOThreads, withBql } from '../src/index.js';
import { armCrash, crashDisk, crashImages, createCrashDisk } from './helpers/crash-driver.js';
import { describeInterop, qemu, qemuStatus } from './helpers/qemu.js';

const MiB = 1024 * 1024;
let dir = '';
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-resize-'));
});
afterAll(async () => {
  if (dir !== '') fs.rmSync(dir, { recursive: true, force: true });
  await withBql((bql) => shutdownIOThreads(bql));
});

/** Two copies of `src`: one for qemu-img, one for snapstack. */
function copies(src: string, tag: string): [string, string] {
  const ext = path.extname(src);
  const q = path.join(dir, `${tag}-qemu${ext}`);
  const s = path.join(dir, `${tag}-ours${ext}`);
  fs.copyFileSync(src, q);
  fs.copyFileSync(src, s);
  return [q, s];
}

function virtualSize(file: string, fmt: string): number {
  return (JSON.parse(qemu('qemu-img', ['info', '-f', fmt, '--output=json', file])) as { 'virtual-size': number })['virtual-size'];
}

function expectClean(file: string): void {
  const r = qemuStatus('qemu-img', ['check', file]);
  expect({ file, status: r.status, out: r.stdout + r.stderr }).toMatchObject({ file, status: 0 });
}

/** Runs the same resize with both tools; the outputs must agree (qemu-img's lines are prefixes of ours). */
async function both(src: string, tag: string, args: string[], fmt: string): Promise<[string, string]> {
  const [q, s] = copies(src, tag);
  const mine = await cli(['resize', '-f', fmt, ...args.map((a) => (a === 'FILE' ? s : a))]);
  const theirs = qemuStatus('qemu-img', ['resize', '-f', fmt, ...args.map((a) => (a === 'FILE' ? q : a))]);
  const where = `resize ${args.join(' ')}`;
  expect({ where, status: mine.status, out: mine.out }).toEqual({ where, status: theirs.status, out: theirs.stdout });
  const theirLines = theirs.stderr.split('\n').filter((l) => l !== '' && !l.startsWith('Try '));
  const myLines = mine.err.split('\n').filter((l) => l !== '' && !l.startsWith('Try '));
  expect({ where, n: myLines.length }).toEqual({ where, n: theirLines.length });
  theirLines.forEach((l, i) => {
    const want = l.replace(/^qemu-img: /, 'snapstack img: ');
    expect({ where, line: (myLines[i] ?? '').slice(0, want.length) }).toEqual({ where, line: want });
  });
  return [q, s];
}

describeInterop('img resize against qemu-img resize', () => {
  let q4k = '';
  let raw = '';
  let snap = '';
  let v2snap = '';

  beforeAll(() => {
    q4k = path.join(dir, 'src4k.qcow2');
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', q4k, '64M']);
    qemu('qemu-io', ['-c', 'write -P 1 0 1M', '-c', 'write -P 2 10M 300k', '-c', 'write -P 3 12M 8k', '-c', 'write -P 4 40M 1M', '-c', 'write -P 5 63M 1M', q4k]);
    raw = path.join(dir, 'src.raw');
    qemu('qemu-img', ['create', '-q', '-f', 'raw', raw, '16M']);
    qemu('qemu-io', ['-f', 'raw', '-c', 'write -P 6 0 16M', raw]);
    snap = path.join(dir, 'snap.qcow2');
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', snap, '32M']);
    qemu('qemu-io', ['-c', 'write -P 7 0 32M', snap]);
    qemu('qemu-img', ['snapshot', '-c', 's1', snap]);
    qemu('qemu-io', ['-c', 'write -P 8 20M 4M', snap]);
    v2snap = path.join(dir, 'v2snap.qcow2');
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', v2snap, '8M']);
    qemu('qemu-img', ['snapshot', '-c', 's1', v2snap]);
  });

  it('prints what qemu-img prints, with its exit codes, for every refusal', async () => {
    const cases: string[][] = [
      ['FILE', '32M'],
      ['FILE', '-10M'],
      ['FILE', '--', '-10M'],
      ['FILE', '0'],
      ['FILE', '-200M'],
      ['FILE', 'abc'],
      ['FILE', '+abc'],
      ['--shrink', 'FILE', '1000'],
      ['--preallocation=bogus', 'FILE', '+1M'],
      ['FILE', '+1M', 'extra'],
      ['FILE'],
      ['-q', 'FILE', '+1M'],
      ['FILE', '+0'],
    ];
    for (const [i, c] of cases.entries()) await both(q4k, `msg${i}`, c, 'qcow2');
    await both(raw, 'rawmsg', ['FILE', '8M'], 'raw');
    await both(v2snap, 'v2snap', ['FILE', '+8M'], 'qcow2');
    const missing = await cli(['resize', path.join(dir, 'nonexist.qcow2'), '1M']);
    expect(missing.status).toBe(1);
    expect(missing.err).toMatch(/^snapstack img: Could not open '.*nonexist\.qcow2': /);
  }, 120_000);

  it('shrinks a qcow2 image as qemu-img does: size, clean check, file cut to the same length, same contents; growing back reads zeros', async () => {
    for (const size of ['12583424', '2M', '3000k']) {
      const [q, s] = await both(q4k, `shrink-${size}`, ['--shrink', 'FILE', size], 'qcow2');
      expect(virtualSize(s, 'qcow2')).toBe(virtualSize(q, 'qcow2'));
      expectClean(s);
      // the same length, except where QEMU's discard allocates an empty L2 table for the partial
      // range at the new end (3000k: L2 table 1 did not exist) and so keeps one cluster more
      const ours = fs.statSync(s).size;
      const theirs = fs.statSync(q).size;
      expect({ size, ok: ours === theirs || (size === '3000k' && ours < theirs) }).toEqual({ size, ok: true });
      expect(qemuStatus('qemu-img', ['compare', q, s]).status).toBe(0);
      await both(s, `regrow-${size}`, ['FILE', '64M'], 'qcow2');
      const [, regrown] = copies(path.join(dir, `regrow-${size}-ours.qcow2`), `regrown-${size}`);
      expectClean(regrown);
      // qemu-img compare of the shrunk qemu image against the regrown one: the extra part must be zeros
      expect(qemuStatus('qemu-img', ['compare', q, regrown]).status).toBe(0);
    }
  }, 120_000);

  it('grows a qcow2 image (L1 growth included) as qemu-img does', async () => {
    for (const size of ['+1M', '1G', '+3T']) {
      const [q, s] = await both(q4k, `grow-${size}`, ['FILE', size], 'qcow2');
      expect(virtualSize(s, 'qcow2')).toBe(virtualSize(q, 'qcow2'));
      expectClean(s);
      expect(qemuStatus('qemu-img', ['compare', q, s]).status).toBe(0);
    }
  }, 120_000);

  it('shrinks a v3 image with an internal snapshot as qemu-img 7.2 does: the snapshot keeps its contents', async () => {
    const [q, s] = await both(snap, 'snapshrink', ['--shrink', 'FILE', '-20M'], 'qcow2');
    expectClean(s);
    expect(qemuStatus('qemu-img', ['compare', q, s]).status).toBe(0);
    const qs = path.join(dir, 'snap-q.raw');
    const ss = path.join(dir, 'snap-s.raw');
    qemu('qemu-img', ['convert', '-O', 'raw', '-l', 'snapshot.name=s1', q, qs]);
    qemu('qemu-img', ['convert', '-O', 'raw', '-l', 'snapshot.name=s1', s, ss]);
    expect(fs.readFileSync(ss).equals(fs.readFileSync(qs))).toBe(true);
    expect(fs.readFileSync(ss).subarray(0, 32 * MiB).every((b) => b === 7)).toBe(true);
  }, 120_000);

  it('grows an overlay whose backing file is larger: the new area reads zeros, as with qemu-img', async () => {
    const base = path.join(dir, 'base8.qcow2');
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', base, '8M']);
    qemu('qemu-io', ['-c', 'write -P 9 0 8M', base]);
    for (const [i, size] of ['4M', '4194816'].entries()) {
      const over = path.join(dir, `over${i}.qcow2`);
      qemu('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base8.qcow2', '-F', 'qcow2', over, size]);
      qemu('qemu-io', ['-c', 'write -P 1 1M 64k', over]);
      const [q, s] = await both(over, `overlay${i}`, ['FILE', '8M'], 'qcow2');
      expectClean(s);
      expect(virtualSize(s, 'qcow2')).toBe(8 * MiB);
      expect(qemuStatus('qemu-img', ['compare', q, s]).status).toBe(0);
      const old = Number(size.replace('4M', String(4 * MiB)));
      const r = qemuStatus('qemu-io', ['-r', '-c', `read -P 0 ${old} ${8 * MiB - old}`, s]);
      expect({ size, out: r.stdout }).not.toMatchObject({ out: expect.stringContaining('Pattern verification failed') });
      expect(r.status).toBe(0);
    }
  }, 120_000);

  it('resizes raw images as qemu-img does', async () => {
    for (const args of [['--shrink', 'FILE', '-1M'], ['FILE', '+3M'], ['--shrink', 'FILE', '1000']]) {
      const [q, s] = await both(raw, `raw-${args.join('')}`, args, 'raw');
      expect(fs.statSync(s).size).toBe(fs.statSync(q).size);
      expect(fs.readFileSync(s).equals(fs.readFileSync(q))).toBe(true);
    }
  }, 120_000);

  /** Shrinks a copy of `src` to `newSize` with a power cut at every event; checks every crash image. */
  async function shrinkSweep(src: string, tag: string, newSize: number, snapshot: string | null): Promise<void> {
    const before = new Uint8Array(fs.readFileSync(src));
    const oldSize = virtualSize(src, 'qcow2');
    const ref = path.join(dir, `${tag}-ref.raw`);
    qemu('qemu-img', ['convert', '-O', 'raw', src, ref]);
    const refBytes = fs.readFileSync(ref);
    let snapBytes: Buffer | null = null;
    if (snapshot !== null) {
      const sref = path.join(dir, `${tag}-snap.raw`);
      qemu('qemu-img', ['convert', '-O', 'raw', '-l', `snapshot.name=${snapshot}`, src, sref]);
      snapBytes = fs.readFileSync(sref);
    }
    const run = async (id: string): Promise<void> => {
      try {
        const img = await openImage(`driver=qcow2,file.driver=crashsim,file.id=${id}`);
        try {
          await img.truncate(newSize);
        } finally {
          await img.close();
        }
      } catch {
        // after the cut anything may fail; the images decide
      }
    };
    createCrashDisk(`${tag}-count`, before);
    await run(`${tag}-count`);
    const events = crashDisk(`${tag}-count`).events;
    expect(events).toBeGreaterThan(4);
    let images = 0;
    let leaky = 0;
    const sizes = new Set<number>();
    for (let n = 0; n <= events; n++) {
      const id = `${tag}-${n}`;
      createCrashDisk(id, before);
      armCrash(id, n);
      await run(id);
      for (const c of crashImages(id, { seed: 300 + n })) {
        images++;
        const f = path.join(dir, `${tag}-crash.qcow2`);
        fs.writeFileSync(f, c.bytes);
        const where = `${tag}: cut at event ${n} of ${events}, ${c.label}`;
        const check = qemuStatus('qemu-img', ['check', f]);
        const ok = check.status === 0 || check.status === 3;
        expect({ where, ok, out: ok ? '' : check.stdout + check.stderr }).toEqual({ where, ok: true, out: '' });
        if (check.status === 3) leaky++;
        const size = virtualSize(f, 'qcow2');
        sizes.add(size);
        expect({ where, size: size === oldSize || size === newSize }).toEqual({ where, size: true });
        const out = path.join(dir, `${tag}-crash.raw`);
        qemu('qemu-img', ['convert', '-O', 'raw', f, out]);
        expect({ where, same: fs.readFileSync(out).subarray(0, newSize).equals(refBytes.subarray(0, newSize)) }).toEqual({ where, same: true });
        if (snapshot !== null && snapBytes !== null) {
          // applied (on a copy), the snapshot comes back whole at its own size, data past the new end included
          const g = path.join(dir, `${tag}-applied.qcow2`);
          fs.copyFileSync(f, g);
          qemu('qemu-img', ['snapshot', '-a', snapshot, g]);
          qemu('qemu-img', ['convert', '-O', 'raw', g, out]);
          expect({ where, snapshot: fs.readFileSync(out).equals(snapBytes) }).toEqual({ where, snapshot: true });
        }
      }
    }
    console.log(`${tag}: ${events} events, ${images} crash images, ${leaky} with leaks, sizes seen: ${[...sizes].join(', ')}`);
    expect(sizes.size).toBe(2);
  }

  it('a power cut at any write or flush of a qcow2 shrink leaves the old or the new size, at most leaks, and the data before the new end', async () => {
    await shrinkSweep(q4k, 'shrink', 11 * MiB + 512, null);
  }, 300_000);

  it('the same for a shrink of an image with an internal snapshot (shared L2 tables and data): the snapshot stays whole', async () => {
    const src = path.join(dir, 'snap4k.qcow2');
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', src, '8M']);
    qemu('qemu-io', ['-c', 'write -P 1 0 1M', '-c', 'write -P 2 3M 100k', '-c', 'write -P 3 6M 1M', src]);
    qemu('qemu-img', ['snapshot', '-c', 's1', src]);
    qemu('qemu-io', ['-c', 'write -P 4 512k 8k', '-c', 'write -P 5 7M 8k', src]);
    await shrinkSweep(src, 'snapshrink', 3 * MiB + 4096 + 512, 's1');
  }, 300_000);
});

/**
 * `img amend` against qemu-img 7.2 amend on copies of images qemu-img made: the refusals (by name,
 * with qemu-img's lines and exit codes), and compat=0.10|1.1 both ways (zero clusters and
 * preallocated zero clusters, snapshots), lazy_refcounts, refcount_bits and size: afterwards
 * `qemu-img check` is clean, `qemu-img info` shows what qemu-img's own amend shows, and the data
 * (active and snapshots) is unchanged (`qemu-img compare` against the original). Then a power cut
 * at every write and flush of a downgrade, an upgrade and a refcount width change: every crash
 * image is clean, shows the old or the new header and holds the original data.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { cli } from './helpers/img-cli.js';
import { changeRefcountWidth, downgradeToV2, upgradeToV3 } from '../src/drivers/qcow2/amend.js';
import { Qcow2Instance } from '../src/drivers/qcow2/instance.js';
import { withMetadataLock, type MetadataLocked } from '../src/drivers/qcow2/metadata-lock.js';
import type { Qcow2State } from '../src/drivers/qcow2/state.js';
import { openImage, shutdownIOThreads, withBql } from '../src/index.js';
import { armCrash, crashDisk, crashImages, createCrashDisk } from './helpers/crash-driver.js';
import { describeInterop, qemu, qemuStatus } from './helpers/qemu.js';

let dir = '';
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-amend-'));
});
afterAll(async () => {
  if (dir !== '') fs.rmSync(dir, { recursive: true, force: true });
  await withBql((bql) => shutdownIOThreads(bql));
});

let n = 0;
/** Two copies of `src`: one for qemu-img, one for snapstack. */
function copies(src: string): [string, string] {
  n++;
  const q = path.join(dir, `c${n}-qemu.qcow2`);
  const s = path.join(dir, `c${n}-ours.qcow2`);
  fs.copyFileSync(src, q);
  fs.copyFileSync(src, s);
  return [q, s];
}

/** The same amend with both tools: same status and stdout, qemu-img's stderr lines as prefixes of ours. */
async function both(src: string, args: string[]): Promise<[string, string, number]> {
  const [q, s] = copies(src);
  const mine = await cli(['amend', ...args.map((a) => (a === 'FILE' ? s : a))]);
  const theirs = qemuStatus('qemu-img', ['amend', ...args.map((a) => (a === 'FILE' ? q : a))]);
  const where = `amend ${args.join(' ')} on ${path.basename(src)}`;
  expect({ where, status: mine.status, out: mine.out }).toEqual({ where, status: theirs.status, out: theirs.stdout });
  const want = theirs.stderr
    .split('\n')
    .filter((l) => l !== '' && !l.startsWith('Try '))
    .map((l) => l.replace(/^qemu-img: /, 'snapstack img: '));
  const got = mine.err.split('\n').filter((l) => l !== '' && !l.startsWith('Try '));
  expect({ where, got: got.map((l, i) => l.slice(0, (want[i] ?? l).length)) }).toEqual({ where, got: want });
  return [q, s, theirs.status];
}

function info(file: string): { size: number; specific: unknown } {
  const j = JSON.parse(qemu('qemu-img', ['info', '--output=json', file])) as { 'virtual-size': number; 'format-specific': unknown };
  return { size: j['virtual-size'], specific: j['format-specific'] };
}

function expectClean(file: string, where: string, leaksOk = false): void {
  const r = qemuStatus('qemu-img', ['check', file]);
  const ok = r.status === 0 || (leaksOk && r.status === 3);
  expect({ where, ok, out: ok ? '' : r.stdout + r.stderr }).toEqual({ where, ok: true, out: '' });
}

function snapshotNames(file: string): string[] {
  const out = qemu('qemu-img', ['snapshot', '-l', file]);
  return out
    .split('\n')
    .slice(2)
    .filter((l) => l.trim() !== '')
    .map((l) => l.split(/\s+/)[1] ?? '');
}

/** The data of `file` (and of each snapshot) equals that of `orig`. */
function expectSameData(orig: string, file: string, where: string): void {
  expect({ where, compare: qemuStatus('qemu-img', ['compare', orig, file]).status }).toEqual({ where, compare: 0 });
  for (const name of snapshotNames(orig)) {
    const a = path.join(dir, 'sa.raw');
    const b = path.join(dir, 'sb.raw');
    qemu('qemu-img', ['convert', '-O', 'raw', '-l', `snapshot.name=${name}`, orig, a]);
    qemu('qemu-img', ['convert', '-O', 'raw', '-l', `snapshot.name=${name}`, file, b]);
    expect({ where, name, same: fs.readFileSync(a).equals(fs.readFileSync(b)) }).toEqual({ where, name, same: true });
  }
}

describeInterop('img amend against qemu-img amend', () => {
  const f = (x: string): string => path.join(dir, x);
  beforeAll(() => {
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', f('v3.qcow2'), '64M']);
    // data, zero clusters (plain), preallocated zero clusters (data then write -z keeps the allocation)
    qemu('qemu-io', ['-c', 'write -P 1 0 1M', '-c', 'write -z 2M 1M', '-c', 'write -P 2 4M 256k', '-c', 'write -z 4M 128k', '-c', 'write -P 3 60M 64k', f('v3.qcow2')]);
    fs.copyFileSync(f('v3.qcow2'), f('v3snap.qcow2'));
    qemu('qemu-img', ['snapshot', '-c', 's1', f('v3snap.qcow2')]);
    qemu('qemu-io', ['-c', 'write -P 4 0 64k', '-c', 'write -z 8M 64k', f('v3snap.qcow2')]);
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', f('v2.qcow2'), '32M']);
    qemu('qemu-io', ['-c', 'write -P 5 0 2M', '-c', 'write -P 6 20M 1M', f('v2.qcow2')]);
    qemu('qemu-img', ['snapshot', '-c', 'old', f('v2.qcow2')]);
    qemu('qemu-io', ['-c', 'write -P 7 1M 64k', f('v2.qcow2')]);
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'refcount_bits=8,cluster_size=4k', f('r8.qcow2'), '16M']);
    qemu('qemu-io', ['-c', 'write -P 8 0 3M', f('r8.qcow2')]);
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on', f('lazy.qcow2'), '16M']);
    qemu('qemu-io', ['-c', 'write -P 9 0 1M', f('lazy.qcow2')]);
    qemu('qemu-img', ['create', '-q', '-f', 'raw', f('r.raw'), '1M']);
    fs.copyFileSync(f('v3.qcow2'), f('shared.qcow2'));
    qemu('qemu-img', ['snapshot', '-c', 'a', f('shared.qcow2')]);
    qemu('qemu-img', ['snapshot', '-c', 'b', f('shared.qcow2')]);
    // an overlay: plain zero clusters over the backing file's data, one table shared with a snapshot
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', f('base.qcow2'), '8M']);
    qemu('qemu-io', ['-c', 'write -P 14 0 8M', f('base.qcow2')]);
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', f('over.qcow2')]);
    qemu('qemu-io', ['-c', 'write -z 1M 128k', '-c', 'write -P 15 4M 64k', f('over.qcow2')]);
    fs.copyFileSync(f('over.qcow2'), f('oversnap.qcow2'));
    qemu('qemu-img', ['snapshot', '-c', 's1', f('oversnap.qcow2')]);
    qemu('qemu-io', ['-c', 'write -z 6M 64k', f('oversnap.qcow2')]);
  });

  it('refuses what qemu-img refuses, with its lines and exit codes', async () => {
    const v3 = f('v3.qcow2');
    const cases: Array<[string, string[]]> = [
      [v3, ['FILE']],
      [v3, ['-o', 'compat=2.0', 'FILE']],
      [v3, ['-o', 'refcount_bits=3', 'FILE']],
      [v3, ['-o', 'cluster_size=4k', 'FILE']],
      [v3, ['-o', 'preallocation=full', 'FILE']],
      [v3, ['-o', 'foo=1', 'FILE']],
      [v3, ['-o', 'lazy_refcounts=maybe', 'FILE']],
      [v3, ['-o', 'encryption=on', 'FILE']],
      [v3, ['-o', 'extended_l2=on', 'FILE']],
      [v3, ['-o', 'compression_type=zlib', 'FILE']],
      [v3, ['-o', 'data_file=x', 'FILE']],
      [v3, ['-o', 'backing_file=base.raw,backing_fmt=raw', 'FILE']],
      [v3, ['-o', 'compat=0.10,refcount_bits=8', 'FILE']],
      [v3, ['-o', 'compat=1.1', 'FILE', 'extra']],
      [f('v2.qcow2'), ['-o', 'lazy_refcounts=on', 'FILE']],
      [f('v2.qcow2'), ['-o', 'refcount_bits=8', 'FILE']],
      [f('v2.qcow2'), ['-o', 'size=64M', 'FILE']],
      [f('r8.qcow2'), ['-o', 'compat=0.10', 'FILE']],
      [f('shared.qcow2'), ['-o', 'refcount_bits=1', 'FILE']],
      [f('r.raw'), ['-f', 'raw', '-o', 'size=2M', 'FILE']],
    ];
    for (const [src, args] of cases) {
      const [, ours] = await both(src, args);
      // a refusal writes nothing
      expect({ args, same: fs.readFileSync(ours).equals(fs.readFileSync(src)) }).toEqual({ args, same: true });
    }
    const missing = await cli(['amend', '-o', 'compat=1.1', f('nonexist.qcow2')]);
    expect(missing.status).toBe(1);
    expect(missing.err).toMatch(/^snapstack img: Could not open '.*nonexist\.qcow2': /);
  }, 120_000);

  it('changes what qemu-img changes: check clean, the same info, the data unchanged', async () => {
    const cases: Array<[string, string]> = [
      ['v3.qcow2', 'compat=0.10'],
      ['v3snap.qcow2', 'compat=0.10'],
      ['v3.qcow2', 'lazy_refcounts=on'],
      ['lazy.qcow2', 'lazy_refcounts=off'],
      ['lazy.qcow2', 'compat=0.10,lazy_refcounts=off'],
      ['v2.qcow2', 'compat=1.1'],
      ['v2.qcow2', 'compat=v3,lazy_refcounts=on'],
      ['v2.qcow2', 'compat=1.1,refcount_bits=64'],
      ['v3.qcow2', 'refcount_bits=1'],
      ['v3.qcow2', 'refcount_bits=8'],
      ['v3snap.qcow2', 'refcount_bits=2'],
      ['v3snap.qcow2', 'refcount_bits=32'],
      ['r8.qcow2', 'refcount_bits=16'],
      ['r8.qcow2', 'refcount_bits=16,compat=0.10'],
      ['v3.qcow2', 'size=128M'],
      ['v3.qcow2', 'size=32M'],
      ['v3.qcow2', 'compat=1.1'],
      ['v3.qcow2', `backing_file=`],
      ['over.qcow2', 'compat=0.10'],
      ['oversnap.qcow2', 'compat=0.10'],
      ['over.qcow2', 'backing_file=base.qcow2,backing_fmt=qcow2'],
    ];
    for (const [src, opts] of cases) {
      const orig = f(src);
      const [q, s, status] = await both(orig, ['-o', opts, 'FILE']);
      const where = `amend -o ${opts} ${src}`;
      if (status !== 0) continue; // a refusal, compared above
      expectClean(s, where);
      expect({ where, info: info(s) }).toEqual({ where, info: info(q) });
      if (!opts.startsWith('size=')) expectSameData(orig, s, where);
      else expect({ where, compare: qemuStatus('qemu-img', ['compare', q, s]).status }).toEqual({ where, compare: 0 });
    }
  }, 300_000);

  type Step = (l: MetadataLocked, s: Qcow2State) => Promise<void>;

  async function runOn(id: string, step: Step, backing: string | null): Promise<void> {
    try {
      const b = backing === null ? '' : `,backing.driver=qcow2,backing.file.driver=file,backing.file.filename=${backing}`;
      const img = await openImage(`driver=qcow2,file.driver=crashsim,file.id=${id}${b}`);
      try {
        const inst = img.backend.root?.instance;
        if (!(inst instanceof Qcow2Instance)) throw new Error('not qcow2');
        const s = inst.state;
        await withMetadataLock(s, (l) => step(l, s));
      } finally {
        await img.close();
      }
    } catch {
      // after the cut anything may fail; the images decide
    }
  }

  it('a power cut at any write or flush of a downgrade, an upgrade or a refcount width change leaves the old or the new image, clean, with the data', async () => {
    const sweeps: Array<[string, Step, string | null]> = [
      ['v3snap.qcow2', (l, s) => downgradeToV2(l, s), null],
      ['v2.qcow2', (l, s) => upgradeToV3(l, s), null],
      ['v3snap.qcow2', (l, s) => changeRefcountWidth(l, s, 4), null],
      ['r8.qcow2', (l, s) => changeRefcountWidth(l, s, 64), null],
      // the zero clusters over the backing file get new clusters: a cut after their refcounts
      // and before the tables point at them leaks them (no harm), as QEMU's expansion would
      ['oversnap.qcow2', (l, s) => downgradeToV2(l, s), f('base.qcow2')],
    ];
    for (const [k, [src, step, backing]] of sweeps.entries()) {
      const orig = f(src);
      const before = new Uint8Array(fs.readFileSync(orig));
      createCrashDisk(`amend-ref-${k}`, before);
      await runOn(`amend-ref-${k}`, step, backing);
      const ref = crashDisk(`amend-ref-${k}`);
      const newFile = f(`amend-new-${k}.qcow2`);
      fs.writeFileSync(newFile, ref.durable.slice(0, ref.durableLength));
      expectClean(newFile, `sweep ${k} without a cut`);
      const views = new Set([JSON.stringify(info(orig)), JSON.stringify(info(newFile))]);
      expect(views.size).toBe(2);
      const events = ref.events;
      let images = 0;
      for (let cut = 0; cut <= events; cut++) {
        const id = `amend-${k}-${cut}`;
        createCrashDisk(id, before);
        armCrash(id, cut);
        await runOn(id, step, backing);
        for (const c of crashImages(id, { seed: 77 + cut, tears: 3 })) {
          images++;
          const file = f('amend-crash.qcow2');
          fs.writeFileSync(file, c.bytes);
          const where = `${src} sweep ${k}: cut at event ${cut} of ${events}, ${c.label}`;
          expectClean(file, where, backing !== null);
          expect({ where, header: views.has(JSON.stringify(info(file))) }).toEqual({ where, header: true });
          expectSameData(orig, file, where);
        }
      }
      expect(images).toBeGreaterThan(events);
    }
  }, 600_000);
});

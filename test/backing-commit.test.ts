/**
 * `img commit` against qemu-img 7.2 commit on copies of the same chains: the same exit status,
 * output and messages; afterwards every image of the chain passes `qemu-img check`, and each
 * image equals (`qemu-img compare`) the one qemu-img's commit left, so FILE still reads what it
 * read before. Then a power cut at every write and flush of a commit: base and FILE read as before.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { commitAll, growBaseForCommit } from '../src/block/commit.js';
import { withDrained } from '../src/block/drain.js';
import { bdrvFlush } from '../src/block/io.js';
import { cliIn } from './helpers/img-cli.js';
import { qcow2MakeEmpty } from '../src/drivers/qcow2/backing-file.js';
import { imgCommit } from '../src/cli/img-commit.js';
import { openImage, shutdownIOThreads, withBql } from '../src/index.js';
import { armCrashGroup, crashDisk, crashImages, createCrashDisk } from './helpers/crash-driver.js';
import { describeInterop, qemu, qemuStatus } from './helpers/qemu.js';

let dir = '';
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-commit-'));
});
afterAll(async () => {
  if (dir !== '') fs.rmSync(dir, { recursive: true, force: true });
  await withBql((bql) => shutdownIOThreads(bql));
});

let n = 0;
const IMAGES = ['base.qcow2', 'mid.qcow2', 'top.qcow2'];

/** base (4M) <- mid (6M) <- top, relative names, data and zero clusters in each layer. */
function qemuChain(): string {
  const d = path.join(dir, `chain${n++}`);
  fs.mkdirSync(d);
  const f = (x: string): string => path.join(d, x);
  qemu('qemu-img', ['create', '-q', '-f', 'qcow2', f('base.qcow2'), '4M']);
  qemu('qemu-io', ['-c', 'write -P 1 0 1M', '-c', 'write -P 2 3M 512k', f('base.qcow2')]);
  qemu('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', f('mid.qcow2'), '6M']);
  qemu('qemu-io', ['-c', 'write -P 3 512k 1M', '-c', 'write -z 3M 64k', '-c', 'write -P 4 4M 100k', f('mid.qcow2')]);
  qemu('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', f('top.qcow2')]);
  qemu('qemu-io', ['-c', 'write -P 5 0 64k', '-c', 'write -P 6 700k 3k', '-c', 'write -z 3M 128k', '-c', 'write -P 7 5M 64k', f('top.qcow2')]);
  return d;
}

function run(cwd: string, args: string[]): { status: number; stdout: string; stderr: string } {
  try {
    return { status: 0, stdout: execFileSync('qemu-img', args, { cwd, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }), stderr: '' };
  } catch (e) {
    const x = e as { status: number; stdout: string; stderr: string };
    return { status: x.status, stdout: x.stdout, stderr: x.stderr };
  }
}

/** What the guest of `file` reads. */
function guestBytes(file: string): Buffer {
  const raw = path.join(dir, `g${n++}.raw`);
  qemu('qemu-img', ['convert', '-O', 'raw', file, raw]);
  const b = fs.readFileSync(raw);
  fs.rmSync(raw);
  return b;
}

/** The same commit with both tools on copies of `d` (cwd: the copy); compares what they print. */
async function both(d: string, args: string[]): Promise<{ q: string; s: string; status: number }> {
  const q = `${d}-q${n++}`;
  const s = `${d}-s${n++}`;
  fs.cpSync(d, q, { recursive: true });
  fs.cpSync(d, s, { recursive: true });
  const theirs = run(q, ['commit', ...args]);
  const mine = await cliIn(s, ['commit', ...args]);
  const where = `commit ${args.join(' ')}`;
  expect({ where, status: mine.status, out: mine.out }).toEqual({ where, status: theirs.status, out: theirs.stdout });
  const want = theirs.stderr
    .split('\n')
    .filter((l) => l !== '' && !l.startsWith('Try '))
    .map((l) => l.replace(/^qemu-img: /, 'snapstack img: '));
  const got = mine.err.split('\n').filter((l) => l !== '' && !l.startsWith('Try '));
  expect({ where, got }).toEqual({ where, got: want });
  return { q, s, status: theirs.status };
}

describeInterop('img commit against qemu-img commit', () => {
  let chain = '';
  beforeAll(() => {
    chain = qemuChain();
  });

  for (const args of [['top.qcow2'], ['-d', 'top.qcow2'], ['-b', 'base.qcow2', 'top.qcow2'], ['-b', 'mid.qcow2', 'top.qcow2'], ['-q', 'mid.qcow2'], ['-b', 'base.qcow2', '-d', '-q', 'top.qcow2']]) {
    it(`commit ${args.join(' ')}: every image as qemu-img leaves it, check clean, same guest data`, async () => {
      const file = args[args.length - 1] as string;
      const before = guestBytes(path.join(chain, file));
      const { q, s, status } = await both(chain, args);
      expect(status).toBe(0);
      for (const img of IMAGES) {
        const r = qemuStatus('qemu-img', ['check', path.join(s, img)]);
        expect({ img, status: r.status, out: r.status === 0 ? '' : r.stdout }).toEqual({ img, status: 0, out: '' });
        // each image alone (without its backing file) holds what qemu-img's commit left in it
        const alone = (f: string): string => `json:${JSON.stringify({ driver: 'qcow2', file: { driver: 'file', filename: f }, backing: null })}`;
        const c = qemuStatus('qemu-img', ['compare', alone(path.join(q, img)), alone(path.join(s, img))]);
        expect({ img, c: c.status, out: c.stdout }).toEqual({ img, c: 0, out: 'Images are identical.\n' });
      }
      expect(guestBytes(path.join(s, file)).equals(before)).toBe(true);
    });
  }

  it('refusals: the same messages and exit codes, nothing written', async () => {
    for (const args of [[], ['a', 'b'], ['base.qcow2'], ['-b', 'nonexist', 'top.qcow2'], ['-b', 'top.qcow2', 'top.qcow2'], ['-f', 'raw', 'top.qcow2'], ['nofile.qcow2']]) {
      const { s, status } = await both(chain, args);
      expect({ args, status }).toEqual({ args, status: 1 });
      for (const img of IMAGES) expect(fs.readFileSync(path.join(s, img)).equals(fs.readFileSync(path.join(chain, img)))).toBe(true);
    }
  });

  it('-p ends with the 100% line and a newline, as qemu-img', async () => {
    const s = `${chain}-p${n++}`;
    fs.cpSync(chain, s, { recursive: true });
    let progress = '';
    const out: string[] = [];
    const status = await imgCommit([path.join(s, 'top.qcow2'), '-p'], (t) => out.push(t), () => undefined, (t) => (progress += t));
    expect(status).toBe(0);
    expect(out).toEqual(['Image committed.']);
    expect(progress.startsWith('    (0.00/100%)\r')).toBe(true);
    expect(progress.endsWith('    (100.00/100%)\r\n')).toBe(true);
  });
});

describeInterop('img commit under power loss', () => {
  it('a power cut at every write and flush of a commit (base and FILE on one power supply) leaves both clean (or leaking) and FILE reading as before', async () => {
    const d = path.join(dir, `pl${n++}`);
    fs.mkdirSync(d);
    const f = (x: string): string => path.join(d, x);
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', f('base.qcow2'), '2M']);
    qemu('qemu-io', ['-c', 'write -P 1 0 2M', f('base.qcow2')]);
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', f('top.qcow2'), '3M']);
    qemu('qemu-io', ['-c', 'write -P 2 64k 128k', '-c', 'write -z 1M 64k', '-c', 'write -P 3 2M 100k', f('top.qcow2')]);
    const preBase = new Uint8Array(fs.readFileSync(f('base.qcow2')));
    const preTop = new Uint8Array(fs.readFileSync(f('top.qcow2')));
    const want = guestBytes(f('top.qcow2'));
    const op = async (): Promise<void> => {
      const img = await openImage(
        'driver=qcow2,file.driver=crashsim,file.id=ct,backing.driver=qcow2,backing.read-only=off,backing.file.driver=crashsim,backing.file.id=cb',
      );
      try {
        const top = img.backend.root;
        const base = top?.backing;
        if (top === null || top === undefined || base === undefined) throw new Error('no chain');
        await growBaseForCommit(top, base);
        await commitAll(top, base);
        await bdrvFlush(base);
        await withBql((bql) => withDrained(bql, top, (dr) => qcow2MakeEmpty(bql, dr, top)));
      } finally {
        await img.close().catch(() => undefined);
      }
    };
    const fresh = (): void => {
      createCrashDisk('cb', preBase);
      createCrashDisk('ct', preTop);
    };
    fresh();
    armCrashGroup(['cb', 'ct'], Infinity);
    await op();
    const E = crashDisk('cb').events + crashDisk('ct').events;
    expect(E).toBeGreaterThan(3);
    const out = path.join(d, 'crash');
    fs.mkdirSync(out);
    let images = 0;
    for (let k = 0; k <= E; k++) {
      fresh();
      armCrashGroup(['cb', 'ct'], k);
      await op().catch((e: unknown) => {
        if (!crashDisk('cb').crashed && !crashDisk('ct').crashed) throw e;
      });
      const opts = { seed: k * 17 + 3, exhaustiveUpTo: 2, randomSubsets: 1, tears: 1 };
      const bases = crashImages('cb', opts).slice(0, 3);
      const tops = crashImages('ct', opts).slice(0, 3);
      for (const b of bases) {
        for (const t of tops) {
          fs.writeFileSync(path.join(out, 'base.qcow2'), b.bytes);
          fs.writeFileSync(path.join(out, 'top.qcow2'), t.bytes);
          const problems: string[] = [];
          for (const img of ['base.qcow2', 'top.qcow2']) {
            const c = qemuStatus('qemu-img', ['check', path.join(out, img)]);
            if (c.status !== 0 && c.status !== 3) problems.push(`${img}: check ${c.status} ${c.stdout}`);
          }
          if (problems.length === 0 && !guestBytes(path.join(out, 'top.qcow2')).equals(want)) problems.push('FILE reads differently');
          images++;
          expect({ k, base: b.label, top: t.label, problems }).toEqual({ k, base: b.label, top: t.label, problems: [] });
        }
      }
    }
    expect(images).toBeGreaterThan(E);
  }, 180_000);
});

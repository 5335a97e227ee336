/**
 * `img rebase` against qemu-img 7.2 rebase on copies of the same chains (built by qemu-img and by
 * snapstack): the same exit status, output and messages; afterwards `qemu-img check` is clean,
 * `qemu-img info` names the same backing file, and `qemu-img compare` finds our result equal to
 * qemu-img's and to the chain before (a safe rebase keeps the guest data).
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { changeBackingFile } from '../src/block/backing-change.js';
import { withDrained } from '../src/block/drain.js';
import { compareRun, rebaseCopy } from '../src/block/rebase.js';
import { cli, cliIn } from './helpers/img-cli.js';
import { imgRebase } from '../src/cli/img-rebase.js';
import { openImage, shutdownIOThreads, withBql } from '../src/index.js';
import { armCrash, crashDisk, crashImages, createCrashDisk } from './helpers/crash-driver.js';
import { describeInterop, qemu, qemuStatus } from './helpers/qemu.js';

let dir = '';
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-rebase-'));
});
afterAll(async () => {
  if (dir !== '') fs.rmSync(dir, { recursive: true, force: true });
  await withBql((bql) => shutdownIOThreads(bql));
});

let n = 0;
/** Builds a chain in a fresh directory: base <- mid <- top (names relative), each with its own data. */
function qemuChain(): string {
  const d = path.join(dir, `chain${n++}`);
  fs.mkdirSync(path.join(d, 'sub'), { recursive: true });
  const f = (x: string): string => path.join(d, x);
  qemu('qemu-img', ['create', '-q', '-f', 'qcow2', f('base.qcow2'), '4M']);
  qemu('qemu-io', ['-c', 'write -P 1 0 1M', '-c', 'write -P 2 3M 512k', f('base.qcow2')]);
  qemu('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', f('mid.qcow2'), '6M']);
  qemu('qemu-io', ['-c', 'write -P 3 512k 1M', '-c', 'write -z 3M 64k', '-c', 'write -P 4 4M 100k', f('mid.qcow2')]);
  qemu('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', f('top.qcow2')]);
  qemu('qemu-io', ['-c', 'write -P 5 0 64k', '-c', 'write -P 6 700k 3k', '-c', 'write -P 7 5M 64k', f('top.qcow2')]);
  qemu('qemu-img', ['create', '-q', '-f', 'qcow2', f('other.qcow2'), '2M']);
  qemu('qemu-io', ['-c', 'write -P 8 0 2M', '-c', 'write -P 1 0 512k', f('other.qcow2')]);
  qemu('qemu-img', ['create', '-q', '-f', 'qcow2', f('sub/new.qcow2'), '6M']);
  qemu('qemu-io', ['-c', 'write -P 9 1M 1M', '-c', 'write -P 10 4608k 1M', f('sub/new.qcow2')]);
  return d;
}

/** A copy of chain directory `d` for one tool. */
function copyDir(d: string, tag: string): string {
  const to = `${d}-${tag}`;
  fs.cpSync(d, to, { recursive: true });
  return to;
}

/** What the guest of `file` reads, as raw bytes. */
function guestBytes(file: string): Buffer {
  const raw = `${file}.${n++}.raw`;
  qemu('qemu-img', ['convert', '-O', 'raw', file, raw]);
  const b = fs.readFileSync(raw);
  fs.rmSync(raw);
  return b;
}

function backingOf(file: string): { name: string | undefined; fmt: string | undefined } {
  const j = JSON.parse(qemu('qemu-img', ['info', '--output=json', file])) as { 'backing-filename'?: string; 'backing-filename-format'?: string };
  return { name: j['backing-filename'], fmt: j['backing-filename-format'] };
}

function expectClean(file: string, where: string): void {
  const r = qemuStatus('qemu-img', ['check', file]);
  expect({ where, status: r.status, out: r.status === 0 ? '' : r.stdout + r.stderr }).toEqual({ where, status: 0, out: '' });
}

/**
 * Runs the same rebase with both tools on copies of chain `d` (FILE and names relative to it,
 * the working directory being the copy); checks status, stdout, messages; returns both dirs.
 */
async function both(d: string, args: string[]): Promise<{ q: string; s: string; status: number }> {
  const q = copyDir(d, `q${n++}`);
  const s = copyDir(d, `s${n++}`);
  const theirs = (() => {
    try {
      return { status: 0, stdout: execFileSync('qemu-img', ['rebase', ...args], { cwd: q, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }), stderr: '' };
    } catch (e) {
      const x = e as { status: number; stdout: string; stderr: string };
      return { status: x.status, stdout: x.stdout, stderr: x.stderr };
    }
  })();
  const mine = await cliIn(s, ['rebase', ...args]);
  const where = `rebase ${args.join(' ')}`;
  expect({ where, status: mine.status, out: mine.out }).toEqual({ where, status: theirs.status, out: theirs.stdout });
  const want = theirs.stderr
    .split('\n')
    .filter((l) => l !== '' && !l.startsWith('Try ') && !/^(WARNING| {9})/.test(l))
    .map((l) => l.replace(/^qemu-img: /, 'snapstack img: '));
  const got = mine.err.split('\n').filter((l) => l !== '' && !l.startsWith('Try ') && !l.startsWith('usage'));
  expect({ where, got: got.slice(0, want.length) }).toEqual({ where, got: want });
  return { q, s, status: theirs.status };
}

describe('compareRun (qemu-img compare_buffers)', () => {
  it('splits into runs of 512-byte sectors that differ or not', () => {
    const a = new Uint8Array(2048);
    const b = new Uint8Array(2048);
    b[600] = 1;
    b[1100] = 1;
    expect(compareRun(a, b, 0, 2048)).toEqual({ differs: false, bytes: 512 });
    expect(compareRun(a, b, 512, 2048)).toEqual({ differs: true, bytes: 1024 });
    expect(compareRun(a, b, 1536, 2000)).toEqual({ differs: false, bytes: 464 });
  });
});

describeInterop('img rebase against qemu-img rebase', () => {
  let chain = '';
  beforeAll(() => {
    chain = qemuChain();
  });

  const cases: Array<{ name: string; args: string[] }> = [
    { name: 'safe, onto the base below the backing file', args: ['-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2'] },
    { name: 'safe, standalone', args: ['-b', '', 'top.qcow2'] },
    { name: 'safe, onto an unrelated smaller image', args: ['-b', 'other.qcow2', '-F', 'qcow2', 'top.qcow2'] },
    { name: 'safe, onto an image in a subdirectory (relative name)', args: ['-b', 'sub/new.qcow2', '-F', 'qcow2', 'top.qcow2'] },
    { name: 'safe, an intermediate image onto nothing', args: ['-b', '', 'mid.qcow2'] },
    { name: 'safe, a standalone image onto a backing file', args: ['-b', 'other.qcow2', '-F', 'qcow2', 'base.qcow2'] },
    { name: 'safe, past the end of the old backing file onto a longer one', args: ['-b', 'sub/new.qcow2', '-F', 'qcow2', 'mid.qcow2'] },
    { name: 'safe, FILE in a subdirectory: BACKING relative to it', args: ['-b', '../base.qcow2', '-F', 'qcow2', 'sub/new.qcow2'] },
    { name: 'safe, -q and -U accepted', args: ['-q', '-U', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2'] },
  ];
  for (const c of cases) {
    it(`${c.name}: same data, same header, check clean`, async () => {
      const before = guestBytes(path.join(chain, c.args[c.args.length - 1] as string));
      const { q, s, status } = await both(chain, c.args);
      expect(status).toBe(0);
      const file = c.args[c.args.length - 1] as string;
      expectClean(path.join(s, file), c.name);
      expect(backingOf(path.join(s, file))).toEqual(backingOf(path.join(q, file)));
      expect(qemuStatus('qemu-img', ['compare', path.join(q, file), path.join(s, file)]).status).toBe(0);
      expect(guestBytes(path.join(s, file)).equals(before)).toBe(true);
    });
  }

  it('unsafe: only the header changes (also to a missing file, and to none)', async () => {
    for (const args of [['-u', '-b', 'other.qcow2', '-F', 'qcow2', 'top.qcow2'], ['-u', '-b', 'nonexist', '-F', 'raw', 'top.qcow2'], ['-u', 'top.qcow2'], ['-u', '-b', '', 'top.qcow2']]) {
      const { q, s } = await both(chain, args);
      if (!args.includes('nonexist')) expectClean(path.join(s, 'top.qcow2'), args.join(' '));
      expect(backingOf(path.join(s, 'top.qcow2'))).toEqual(backingOf(path.join(q, 'top.qcow2')));
      // the overlay's own clusters are untouched
      const alone = (f: string): string => `json:${JSON.stringify({ driver: 'qcow2', file: { driver: 'file', filename: f }, backing: null })}`;
      expect(qemuStatus('qemu-img', ['compare', alone(path.join(q, 'top.qcow2')), alone(path.join(s, 'top.qcow2'))]).status).toBe(0);
      expect(qemuStatus('qemu-img', ['compare', alone(path.join(chain, 'top.qcow2')), alone(path.join(s, 'top.qcow2'))]).status).toBe(0);
    }
  });

  it('refusals: the same messages and exit codes, nothing written', async () => {
    qemu('qemu-img', ['create', '-q', '-f', 'raw', path.join(chain, 'r.raw'), '1M']);
    const refusals = [
      ['top.qcow2'],
      ['-b', 'base.qcow2'],
      ['-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2', 'extra'],
      ['-b', 'base.qcow2', 'top.qcow2'],
      ['-u', '-b', 'mid.qcow2', 'top.qcow2'],
      ['-b', 'nonexist.qcow2', '-F', 'qcow2', 'top.qcow2'],
      ['-b', 'base.qcow2', '-F', 'foo', 'top.qcow2'],
      ['-b', 'base.qcow2', '-F', 'qcow2', 'nofile.qcow2'],
      ['-b', 'base.qcow2', '-F', 'qcow2', '-f', 'raw', 'r.raw'],
      ['-b', 'base.qcow2', '-F', 'qcow2', '-f', 'foo', 'top.qcow2'],
    ];
    for (const args of refusals) {
      const { s, status } = await both(chain, args);
      expect({ args, status }).toEqual({ args, status: 1 });
      expect(fs.readFileSync(path.join(s, 'top.qcow2')).equals(fs.readFileSync(path.join(chain, 'top.qcow2')))).toBe(true);
    }
  });

  it('-p prints the progress lines qemu-img prints', async () => {
    for (const args of [['-p', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2'], ['-p', '-u', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2'], ['-p', '-b', 'x.qcow2', '-F', 'qcow2', 'top.qcow2']]) {
      const q = copyDir(chain, `pq${n++}`);
      const s = copyDir(chain, `ps${n++}`);
      const theirs = qemuStatus('qemu-img', ['rebase', ...args.map((a) => (a.endsWith('top.qcow2') ? path.join(q, a) : a))]);
      let progress = '';
      const status = await imgRebase(
        args.map((a) => (a.endsWith('top.qcow2') ? path.join(s, a) : a)),
        () => undefined,
        () => undefined,
        (t) => (progress += t),
      );
      expect({ args, status, progress }).toEqual({ args, status: theirs.status, progress: theirs.stdout });
    }
  });

  it('a chain snapstack built rebases as qemu-img rebases it', async () => {
    const d = path.join(dir, `ours${n++}`);
    fs.mkdirSync(d);
    const f = (x: string): string => path.join(d, x);
    expect((await cli(['create', '-q', '-f', 'qcow2', f('a.qcow2'), '2M'])).status).toBe(0);
    qemu('qemu-io', ['-c', 'write -P 1 0 2M', f('a.qcow2')]);
    expect((await cli(['create', '-q', '-f', 'qcow2', '-b', 'a.qcow2', '-F', 'qcow2', f('b.qcow2')])).status).toBe(0);
    qemu('qemu-io', ['-c', 'write -P 2 64k 64k', f('b.qcow2')]);
    expect((await cli(['create', '-q', '-f', 'qcow2', '-b', 'b.qcow2', '-F', 'qcow2', f('c.qcow2')])).status).toBe(0);
    qemu('qemu-io', ['-c', 'write -P 3 1M 4k', f('c.qcow2')]);
    const { q, s } = await both(d, ['-b', 'a.qcow2', '-F', 'qcow2', 'c.qcow2']);
    expectClean(path.join(s, 'c.qcow2'), 'ours');
    expect(qemuStatus('qemu-img', ['compare', path.join(q, 'c.qcow2'), path.join(s, 'c.qcow2')]).status).toBe(0);
    expect(qemuStatus('qemu-img', ['compare', f('c.qcow2'), path.join(s, 'c.qcow2')]).status).toBe(0);
  });
});

describeInterop('safe rebase under power loss', () => {
  it('a power cut at every write and flush of a rebase leaves FILE clean (or leaking), naming the old or the new backing file, with the same guest data', async () => {
    const d = qemuChain();
    const top = path.join(d, 'top.qcow2');
    const pre = new Uint8Array(fs.readFileSync(top));
    const want = guestBytes(top);
    const op = async (): Promise<void> => {
      const img = await openImage(`driver=qcow2,file.driver=crashsim,file.id=rb,backing.driver=qcow2,backing.file.driver=file,backing.file.filename=${path.join(d, 'mid.qcow2')}`);
      const nb = await openImage(path.join(d, 'base.qcow2'), { readOnly: true });
      try {
        const root = img.backend.root;
        if (root === null || root.backing === undefined) throw new Error('no chain');
        await rebaseCopy({ overlay: img.backend, oldBacking: root.backing, newBacking: nb.backend.root, prefixInChain: root.backing.backing ?? null });
        await img.flush();
        await withBql((bql) => withDrained(bql, root, (dr) => changeBackingFile(bql, dr, root, 'base.qcow2', 'qcow2')));
      } finally {
        await nb.close();
        await img.close().catch(() => undefined);
      }
    };
    createCrashDisk('rb', pre);
    armCrash('rb', Infinity);
    await op();
    const E = crashDisk('rb').events;
    expect(E).toBeGreaterThan(3);
    const judged = new Map<string, string>();
    const crashFile = path.join(d, 'crash.qcow2');
    let images = 0;
    for (let k = 0; k <= E; k++) {
      createCrashDisk('rb', pre);
      armCrash('rb', k);
      await op().catch((e: unknown) => {
        if (!crashDisk('rb').crashed) throw e;
      });
      for (const ci of crashImages('rb', { seed: k * 31 + 7, exhaustiveUpTo: 2, randomSubsets: 2, tears: 1 })) {
        const key = Buffer.from(ci.bytes).toString('base64');
        let verdict = judged.get(key);
        if (verdict === undefined) {
          fs.writeFileSync(crashFile, ci.bytes);
          const c = qemuStatus('qemu-img', ['check', crashFile]);
          const name = backingOf(crashFile).name;
          const same = guestBytes(crashFile).equals(want);
          verdict = c.status !== 0 && c.status !== 3 ? `check ${c.status}: ${c.stdout}` : name !== 'mid.qcow2' && name !== 'base.qcow2' ? `backing ${String(name)}` : !same ? 'guest data changed' : 'ok';
          if (k >= E && name !== 'base.qcow2') verdict = 'the rebase returned, yet the header names the old file';
          judged.set(key, verdict);
        }
        images++;
        expect({ k, label: ci.label, verdict }).toEqual({ k, label: ci.label, verdict: 'ok' });
      }
    }
    expect(images).toBeGreaterThan(E);
  }, 120_000);
});

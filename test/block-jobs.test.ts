/**
 * Jobs: the status machine and its events (pause, resume, cancel, complete, dismiss), then
 * block-stream and block-commit (intermediate and active) on chains qemu-img built, while a
 * writer writes through the device: the guest data always equals a reference model, qemu-img
 * check is clean on every image afterwards, the headers name what the graph became, and the
 * result equals what qemu-img's offline rebase/commit makes of a copy of the same chain.
 * Cancels at seeded random points leave every image consistent with the same guest data.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { blockCommit } from '../src/block/jobs/block-commit.js';
import { blockStream } from '../src/block/stream.js';
import { findJob, jobStart, onJobEvent, type Job, type JobEvent } from '../src/block/job.js';
import type { BlockNode } from '../src/block/node.js';
import { openImage, shutdownIOThreads, withBql, type Image } from '../src/index.js';
import { armCrash, crashDisk, crashImages, createCrashDisk } from './helpers/crash-driver.js';
import { prng } from './helpers/prng.js';
import { describeInterop, qemu, qemuStatus } from './helpers/qemu.js';

let dir = '';
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-jobs-'));
});
afterAll(async () => {
  if (dir !== '') fs.rmSync(dir, { recursive: true, force: true });
  await withBql((bql) => shutdownIOThreads(bql));
});

function record(id: string): { events: string[]; stop: () => void } {
  const events: string[] = [];
  const stop = onJobEvent((e: JobEvent) => {
    if (e.id === id) events.push(e.status);
  });
  return { events, stop };
}

const tick = (): Promise<void> => new Promise((r) => setImmediate(r));

describe('job status machine', () => {
  it('runs created -> running -> waiting -> pending -> concluded -> null, with progress', async () => {
    const rec = record('j1');
    let steps = 0;
    const job = await withBql((bql) =>
      jobStart(bql, 'j1', 'test', {
        async run(j: Job) {
          for (let i = 0; i < 5; i++) {
            if (await j.pausePoint()) return;
            steps++;
            j.setProgress(i + 1, 5);
          }
        },
      }),
    );
    await job.whenConcluded();
    rec.stop();
    expect(steps).toBe(5);
    expect(job.progress).toEqual({ current: 5, total: 5 });
    expect(rec.events).toEqual(['created', 'running', 'waiting', 'pending', 'concluded', 'null']);
    await withBql((bql) => expect(() => findJob(bql, 'j1')).toThrow(/not found/));
  });

  it('pauses at a pause point, resumes, cancels (aborting), and dismisses when asked', async () => {
    const rec = record('j2');
    let steps = 0;
    let aborted = false;
    const job = await withBql((bql) =>
      jobStart(
        bql,
        'j2',
        'test',
        {
          async run(j: Job) {
            for (;;) {
              if (await j.pausePoint()) return;
              steps++;
            }
          },
          async abort() {
            aborted = true;
          },
        },
        { autoDismiss: false },
      ),
    );
    for (let i = 0; i < 5; i++) await tick();
    await withBql((bql) => job.pause(bql));
    for (let i = 0; i < 5; i++) await tick();
    expect(job.status).toBe('paused');
    const at = steps;
    for (let i = 0; i < 5; i++) await tick();
    expect(steps).toBe(at);
    await withBql((bql) => job.resume(bql));
    for (let i = 0; i < 5; i++) await tick();
    expect(steps).toBeGreaterThan(at);
    await withBql((bql) => {
      expect(() => job.complete(bql)).toThrow(/cannot accept command verb 'complete'/);
      expect(() => job.dismiss(bql)).toThrow(/cannot accept command verb 'dismiss'/);
      job.cancel(bql);
    });
    await job.whenConcluded();
    expect(aborted).toBe(true);
    expect(job.status).toBe('concluded');
    await withBql((bql) => {
      expect(() => jobStart(bql, 'j2', 'test', { run: async () => undefined })).toThrow(/already in use/);
      job.dismiss(bql);
    });
    rec.stop();
    expect(rec.events).toEqual(['created', 'running', 'paused', 'running', 'aborting', 'concluded', 'null']);
  });

  it('a ready job waits for complete; a failing body concludes with its error', async () => {
    const rec = record('j3');
    const job = await withBql((bql) =>
      jobStart(bql, 'j3', 'test', {
        async run(j: Job) {
          j.setReady();
          while (!(await j.pausePoint())) await new Promise((r) => setTimeout(r, 1));
        },
      }, { autoDismiss: false }),
    );
    for (let i = 0; i < 20 && job.status !== 'ready'; i++) await tick();
    expect(job.status).toBe('ready');
    await withBql((bql) => job.complete(bql));
    await job.whenConcluded();
    expect(job.error).toBe(null);
    rec.stop();
    expect(rec.events).toEqual(['created', 'running', 'ready', 'waiting', 'pending', 'concluded']);
    const bad = await withBql((bql) =>
      jobStart(bql, 'j4', 'test', { run: async () => Promise.reject(new Error('disk on fire')) }, { autoDismiss: false }),
    );
    await bad.whenConcluded();
    expect(bad.error).toBe('disk on fire');
    await withBql((bql) => {
      job.dismiss(bql);
      bad.dismiss(bql);
    });
  });
});

let n = 0;
const MiB = 1024 * 1024;
const SIZE = 8 * MiB;

/** base <- mid <- top (8 MiB, relative names, 64 KiB clusters), data and zero clusters in each. */
function chain(): string {
  const d = path.join(dir, `c${n++}`);
  fs.mkdirSync(d);
  const f = (x: string): string => path.join(d, x);
  qemu('qemu-img', ['create', '-q', '-f', 'qcow2', f('base.qcow2'), '8M']);
  qemu('qemu-io', ['-c', 'write -P 1 0 3M', '-c', 'write -P 2 6M 1M', f('base.qcow2')]);
  qemu('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', f('mid.qcow2')]);
  qemu('qemu-io', ['-c', 'write -P 3 1M 2M', '-c', 'write -z 6M 128k', '-c', 'write -P 4 7M 200k', f('mid.qcow2')]);
  qemu('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', f('top.qcow2')]);
  qemu('qemu-io', ['-c', 'write -P 5 0 64k', '-c', 'write -P 6 2M 1M', '-c', 'write -P 7 5M 64k', f('top.qcow2')]);
  return d;
}

function guestBytes(file: string): Buffer {
  const raw = path.join(dir, `g${n++}.raw`);
  qemu('qemu-img', ['convert', '-O', 'raw', file, raw]);
  const b = fs.readFileSync(raw);
  fs.rmSync(raw);
  return b;
}

function expectClean(file: string): void {
  const r = qemuStatus('qemu-img', ['check', file]);
  expect({ file: path.basename(file), status: r.status, out: r.status === 0 ? '' : r.stdout + r.stderr }).toEqual({ file: path.basename(file), status: 0, out: '' });
}

function backingName(file: string): string | null {
  const j = JSON.parse(qemu('qemu-img', ['info', '--output=json', file])) as { 'backing-filename'?: string };
  return j['backing-filename'] ?? null;
}

/**
 * Three writers writing seeded random data through the device until stopped (the model follows
 * each completed write); most writes land just ahead of `hot()` (where the job copies now). Each
 * writer keeps to its own 64 KiB blocks (block index mod 3), so no two writes in flight overlap
 * (the order of overlapping writes in flight is undefined on any disk).
 */
function writer(img: Image, model: Uint8Array, seed: number, hot: () => number = () => 0): { stop: () => Promise<number> } {
  const rnd = prng(seed);
  const BLOCK = 64 * 1024;
  const blocks = SIZE / BLOCK;
  let stopped = false;
  let writes = 0;
  const one = async (lane: number): Promise<void> => {
    while (!stopped) {
      const near = Math.floor((hot() + rnd() * 512 * 1024) / BLOCK);
      let block = rnd() < 0.7 ? near : Math.floor(rnd() * blocks);
      block = Math.min(blocks - 3, block) - (Math.min(blocks - 3, block) % 3) + lane;
      const len = 512 * (1 + Math.floor(rnd() * 128));
      const off = block * BLOCK + 512 * Math.floor(rnd() * ((BLOCK - len) / 512 + 1));
      const data = new Uint8Array(len).fill(1 + Math.floor(rnd() * 250));
      data[0] = writes & 0xff;
      await img.write(off, data);
      model.set(data, off);
      writes++;
      await new Promise((r) => setImmediate(r));
    }
  };
  const done = Promise.all([one(0), one(1), one(2)]);
  return {
    stop: async () => {
      stopped = true;
      await done;
      return writes;
    },
  };
}

async function expectModel(img: Image, model: Uint8Array, where: string): Promise<void> {
  const got = await img.read(0, SIZE);
  expect({ where, same: Buffer.from(got).equals(Buffer.from(model)) }).toEqual({ where, same: true });
}

/** The chain's nodes from the device's root down. */
function nodes(img: Image): BlockNode[] {
  const out: BlockNode[] = [];
  for (let cur = img.backend.root ?? undefined; cur !== undefined; cur = cur.backing) out.push(cur);
  return out;
}

describeInterop('block-stream and block-commit while a writer writes', () => {
  it('stream to base, then stream of the rest: data as the model, header and graph follow, same as qemu-img rebase', async () => {
    const d = chain();
    const q = `${d}-q`;
    fs.cpSync(d, q, { recursive: true });
    qemu('qemu-img', ['rebase', '-b', 'base.qcow2', '-F', 'qcow2', path.join(q, 'top.qcow2')]);
    // without a writer: the same guest data and allocation outcome as qemu-img's safe rebase
    const quiet = await openImage(path.join(d, 'top.qcow2'));
    const [, , baseNode] = nodes(quiet);
    const job = await withBql((bql) => blockStream(bql, { jobId: 's0', device: quiet.name, base: baseNode?.nodeName }));
    await job.whenConcluded();
    expect(job.error).toBe(null);
    expect(nodes(quiet).map((x) => path.basename(x.filename))).toEqual(['top.qcow2', 'base.qcow2']);
    await quiet.close();
    expectClean(path.join(d, 'top.qcow2'));
    expect(backingName(path.join(d, 'top.qcow2'))).toBe('base.qcow2');
    expect(qemuStatus('qemu-img', ['compare', path.join(q, 'top.qcow2'), path.join(d, 'top.qcow2')]).status).toBe(0);

    // with a writer: stream everything (no base)
    const img = await openImage(path.join(d, 'top.qcow2'));
    const model = new Uint8Array(await img.read(0, SIZE));
    let j2: Job | null = null;
    const w = writer(img, model, 11, () => j2?.progress.current ?? 0);
    const rec = record('s1');
    j2 = await withBql((bql) => blockStream(bql, { jobId: 's1', device: img.name }));
    await j2.whenConcluded();
    const writes = await w.stop();
    rec.stop();
    expect(j2.status).toBe('null');
    expect(j2.error).toBe(null);
    expect(writes).toBeGreaterThan(0);
    expect(rec.events).toEqual(['created', 'running', 'waiting', 'pending', 'concluded', 'null']);
    expect(nodes(img).length).toBe(1);
    await expectModel(img, model, 'after stream');
    await img.close();
    expectClean(path.join(d, 'top.qcow2'));
    expect(backingName(path.join(d, 'top.qcow2'))).toBe(null);
    expect(guestBytes(path.join(d, 'top.qcow2')).equals(Buffer.from(model))).toBe(true);
  });

  it('intermediate commit mid into base: the top records base, data as the model, same as qemu-img commit', async () => {
    const d = chain();
    const q = `${d}-q`;
    fs.cpSync(d, q, { recursive: true });
    qemu('qemu-img', ['commit', '-q', path.join(q, 'mid.qcow2')]);
    const img = await openImage(path.join(d, 'top.qcow2'), { nodeOptions: { 'backing.backing.read-only': 'off' } });
    const [, mid, base] = nodes(img);
    const model = new Uint8Array(await img.read(0, SIZE));
    const w = writer(img, model, 12);
    const job = await withBql((bql) => blockCommit(bql, { jobId: 'c1', device: img.name, top: mid?.nodeName, base: base?.nodeName }));
    await job.whenConcluded();
    await w.stop();
    expect(job.error).toBe(null);
    expect(nodes(img).map((x) => path.basename(x.filename))).toEqual(['top.qcow2', 'base.qcow2']);
    await expectModel(img, model, 'after commit');
    await img.close();
    for (const f of ['top.qcow2', 'base.qcow2']) expectClean(path.join(d, f));
    expect(backingName(path.join(d, 'top.qcow2'))).toBe('base.qcow2');
    expect(guestBytes(path.join(d, 'top.qcow2')).equals(Buffer.from(model))).toBe(true);
    // base holds what qemu-img's commit put there
    expect(qemuStatus('qemu-img', ['compare', path.join(q, 'base.qcow2'), path.join(d, 'base.qcow2')]).status).toBe(0);
  });

  it('active commit top into mid: ready, complete switches the device to mid, data as the model', async () => {
    const d = chain();
    const img = await openImage(path.join(d, 'top.qcow2'), { nodeOptions: { 'backing.read-only': 'off' } });
    const model = new Uint8Array(await img.read(0, SIZE));
    const w = writer(img, model, 13);
    const rec = record('a1');
    const job = await withBql((bql) => blockCommit(bql, { jobId: 'a1', device: img.name }));
    for (let i = 0; i < 2000 && job.status !== 'ready'; i++) await new Promise((r) => setTimeout(r, 2));
    expect(job.status).toBe('ready');
    await new Promise((r) => setTimeout(r, 30));
    await withBql((bql) => job.complete(bql));
    await job.whenConcluded();
    expect(job.error).toBe(null);
    expect(nodes(img).map((x) => path.basename(x.filename))).toEqual(['mid.qcow2', 'base.qcow2']);
    // the device goes on writing, into mid now
    await new Promise((r) => setTimeout(r, 20));
    await w.stop();
    rec.stop();
    expect(rec.events).toEqual(['created', 'running', 'ready', 'waiting', 'pending', 'concluded', 'null']);
    await expectModel(img, model, 'after active commit');
    await img.close();
    for (const f of ['top.qcow2', 'mid.qcow2', 'base.qcow2']) expectClean(path.join(d, f));
    expect(guestBytes(path.join(d, 'mid.qcow2')).equals(Buffer.from(model))).toBe(true);
  });

  for (const seed of [1, 2, 3, 4, 5, 6]) {
    it(`a job cancelled at a seeded random point (seed ${seed}) leaves every image consistent with the same data`, async () => {
      const rnd = prng(seed * 7919);
      const kind = (['stream', 'commit', 'active'] as const)[seed % 3] as 'stream' | 'commit' | 'active';
      const d = chain();
      const opts: Record<string, string> = kind === 'commit' ? { 'backing.backing.read-only': 'off' } : kind === 'active' ? { 'backing.read-only': 'off' } : {};
      const img = await openImage(path.join(d, 'top.qcow2'), { nodeOptions: opts });
      const [top, mid, base] = nodes(img);
      const model = new Uint8Array(await img.read(0, SIZE));
      const w = writer(img, model, seed);
      const job = await withBql((bql) =>
        kind === 'stream'
          ? blockStream(bql, { jobId: `x${seed}`, device: img.name, base: base?.nodeName })
          : kind === 'commit'
            ? blockCommit(bql, { jobId: `x${seed}`, device: img.name, top: mid?.nodeName, base: base?.nodeName })
            : blockCommit(bql, { jobId: `x${seed}`, device: img.name, top: top?.nodeName }),
      );
      const turns = Math.floor(rnd() * 40);
      for (let i = 0; i < turns; i++) await new Promise((r) => setImmediate(r));
      if (rnd() < 0.5) {
        await withBql((bql) => job.pause(bql));
        await new Promise((r) => setTimeout(r, 5));
      }
      await withBql((bql) => job.cancel(bql));
      await job.whenConcluded();
      await w.stop();
      expect(job.error).toBe(null);
      // cancelled: the graph is as it was
      expect(nodes(img).map((x) => path.basename(x.filename))).toEqual(['top.qcow2', 'mid.qcow2', 'base.qcow2']);
      await expectModel(img, model, `cancelled ${kind}`);
      await img.close();
      for (const f of ['top.qcow2', 'mid.qcow2', 'base.qcow2']) expectClean(path.join(d, f));
      expect(backingName(path.join(d, 'top.qcow2'))).toBe('mid.qcow2');
      expect(guestBytes(path.join(d, 'top.qcow2')).equals(Buffer.from(model))).toBe(true);
    });
  }
});

describeInterop('block-stream past the end of a short intermediate image', () => {
  it('the data of the base beyond a shorter image in between stays hidden after the stream', async () => {
    const d = path.join(dir, `short${n++}`);
    fs.mkdirSync(d);
    const f = (x: string): string => path.join(d, x);
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', f('base.qcow2'), '8M']);
    qemu('qemu-io', ['-c', 'write -P 1 0 8M', f('base.qcow2')]);
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', f('mid.qcow2'), '4M']);
    qemu('qemu-io', ['-c', 'write -P 2 1M 64k', f('mid.qcow2')]);
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', f('top.qcow2'), '8M']);
    qemu('qemu-io', ['-c', 'write -P 3 7M 64k', f('top.qcow2')]);
    const before = guestBytes(f('top.qcow2'));
    const img = await openImage(f('top.qcow2'));
    const [, , base] = nodes(img);
    const job = await withBql((bql) => blockStream(bql, { jobId: 'short', device: img.name, base: base?.nodeName }));
    await job.whenConcluded();
    expect(job.error).toBe(null);
    await img.close();
    expectClean(f('top.qcow2'));
    expect(backingName(f('top.qcow2'))).toBe('base.qcow2');
    expect(guestBytes(f('top.qcow2')).equals(before)).toBe(true);
  });
});

describeInterop('jobs refuse what they cannot do', () => {
  it('a second job on a node in use, a base outside the chain, a read-only base: refused by name; the node is free again once the job concluded', async () => {
    const d = chain();
    const img = await openImage(path.join(d, 'top.qcow2'));
    const [top, mid, base] = nodes(img);
    const job = await withBql((bql) => blockStream(bql, { jobId: 'b1', device: img.name }));
    await withBql((bql) => {
      expect(() => blockStream(bql, { jobId: 'b2', node: top?.nodeName })).toThrow(/Node '.*' is busy: block device is in use by block job: stream/);
      expect(() => blockCommit(bql, { jobId: 'b3', device: img.name, top: mid?.nodeName })).toThrow(/read-only/);
      expect(() => blockStream(bql, { jobId: 'b4', node: mid?.nodeName, base: top?.nodeName })).toThrow(/not a backing image/);
      job.cancel(bql);
    });
    await job.whenConcluded();
    const again = await withBql((bql) => blockStream(bql, { jobId: 'b5', node: top?.nodeName, base: base?.nodeName }));
    await again.whenConcluded();
    expect(again.error).toBe(null);
    await img.close();
    expectClean(path.join(d, 'top.qcow2'));
  });
});

describeInterop('block-stream on a chain snapstack built', () => {
  it('streams a chain made by snapstack img create as qemu-img rebase makes it standalone', async () => {
    const { imgMain } = await import('../src/cli/img.js');
    const d = path.join(dir, `ours${n++}`);
    fs.mkdirSync(d);
    const f = (x: string): string => path.join(d, x);
    const quiet = (): void => undefined;
    expect(await imgMain(['create', '-q', '-f', 'qcow2', f('a.qcow2'), '8M'], quiet, quiet)).toBe(0);
    expect(await imgMain(['create', '-q', '-f', 'qcow2', '-b', 'a.qcow2', '-F', 'qcow2', f('b.qcow2')], quiet, quiet)).toBe(0);
    const a = await openImage(f('a.qcow2'));
    await a.write(0, new Uint8Array(3 * MiB).fill(0x21));
    await a.close();
    const b = await openImage(f('b.qcow2'));
    await b.write(MiB, new Uint8Array(64 * 1024).fill(0x22));
    await b.writeZeroes(2 * MiB, 128 * 1024);
    await b.close();
    const q = `${d}-q`;
    fs.cpSync(d, q, { recursive: true });
    qemu('qemu-img', ['rebase', '-b', '', path.join(q, 'b.qcow2')]);
    // without a writer: what qemu-img's rebase to nothing makes of it
    const s0 = `${d}-s0`;
    fs.cpSync(d, s0, { recursive: true });
    const still = await openImage(path.join(s0, 'b.qcow2'));
    const j0 = await withBql((bql) => blockStream(bql, { jobId: 'o0', device: still.name }));
    await j0.whenConcluded();
    expect(j0.error).toBe(null);
    await still.close();
    expectClean(path.join(s0, 'b.qcow2'));
    expect(qemuStatus('qemu-img', ['compare', path.join(q, 'b.qcow2'), path.join(s0, 'b.qcow2')]).status).toBe(0);
    expect(backingName(path.join(s0, 'b.qcow2'))).toBe(null);
    // with a writer
    const img = await openImage(f('b.qcow2'));
    const model = new Uint8Array(await img.read(0, SIZE));
    let job: Job | null = null;
    const w = writer(img, model, 21, () => job?.progress.current ?? 0);
    job = await withBql((bql) => blockStream(bql, { jobId: 'o1', device: img.name }));
    await job.whenConcluded();
    await w.stop();
    expect(job.error).toBe(null);
    await expectModel(img, model, 'ours after stream');
    await img.close();
    expectClean(f('b.qcow2'));
    expect(backingName(f('b.qcow2'))).toBe(null);
    expect(guestBytes(f('b.qcow2')).equals(Buffer.from(model))).toBe(true);
  });
});

describeInterop('block-stream under power loss', () => {
  it('a power cut at every write and flush of a stream leaves the node clean (or leaking), naming the old or the new backing file, with the same guest data', async () => {
    const d = chain();
    const top = path.join(d, 'top.qcow2');
    const pre = new Uint8Array(fs.readFileSync(top));
    const want = guestBytes(top);
    const op = async (): Promise<void> => {
      const img = await openImage(`driver=qcow2,file.driver=crashsim,file.id=sp,backing.driver=qcow2,backing.file.driver=file,backing.file.filename=${path.join(d, 'mid.qcow2')}`);
      try {
        const [, , base] = nodes(img);
        const job = await withBql((bql) => blockStream(bql, { jobId: `sp${n++}`, device: img.name, base: base?.nodeName }));
        await job.whenConcluded();
      } finally {
        await img.close().catch(() => undefined);
      }
    };
    createCrashDisk('sp', pre);
    armCrash('sp', Infinity);
    await op();
    const E = crashDisk('sp').events;
    expect(E).toBeGreaterThan(3);
    const crashFile = path.join(d, 'crash.qcow2');
    const judged = new Map<string, string>();
    const names = new Set<string | null>();
    for (let k = 0; k <= E; k++) {
      createCrashDisk('sp', pre);
      armCrash('sp', k);
      await op();
      for (const ci of crashImages('sp', { seed: k * 13 + 5, exhaustiveUpTo: 2, randomSubsets: 2, tears: 1 })) {
        const key = Buffer.from(ci.bytes).toString('base64');
        let verdict = judged.get(key);
        if (verdict === undefined) {
          fs.writeFileSync(crashFile, ci.bytes);
          const c = qemuStatus('qemu-img', ['check', crashFile]);
          const name = backingName(crashFile);
          names.add(name);
          verdict =
            c.status !== 0 && c.status !== 3
              ? `check ${c.status}: ${c.stdout}`
              : name !== 'mid.qcow2' && name !== path.join(d, 'base.qcow2')
                ? `backing ${String(name)}`
                : !guestBytes(crashFile).equals(want)
                  ? 'guest data changed'
                  : 'ok';
          judged.set(key, verdict);
        }
        expect({ k, label: ci.label, verdict }).toEqual({ k, label: ci.label, verdict: 'ok' });
      }
    }
    // the sweep saw both sides of the switch
    expect([...names].sort()).toEqual([path.join(d, 'base.qcow2'), 'mid.qcow2'].sort());
  }, 180_000);
});

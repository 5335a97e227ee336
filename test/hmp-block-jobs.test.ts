/**
 * The monitor's block job commands on a running machine: snapshot_blkdev, block_stream,
 * block_commit (an active commit: ready, then block_job_complete), block_job_pause / resume /
 * cancel and info block-jobs, with the self-checking guest writing throughout; qemu-img checks
 * every image afterwards and the guest's checksums must agree with its disk.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { shutdownIOThreads, withBql } from '../src/index.js';
import { listJobs } from '../src/block/job.js';
import { Machine } from '../src/machine/machine.js';
import { Monitor } from '../src/monitor/hmp.js';
import { describeInterop, qemu, qemuStatus } from './helpers/qemu.js';

let dir: string;
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-hmp-jobs-'));
});
afterAll(async () => {
  fs.rmSync(dir, { recursive: true, force: true });
  await withBql((bql) => shutdownIOThreads(bql));
});

const MiB = 1024 * 1024;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function until(what: string, cond: () => Promise<boolean> | boolean): Promise<void> {
  for (let i = 0; i < 1000; i++) {
    if (await cond()) return;
    await sleep(10);
  }
  throw new Error(`timed out waiting for ${what}`);
}

describeInterop('block jobs from the monitor', () => {
  it('streams, pauses, resumes, commits actively and completes while the guest writes', async () => {
    const base = path.join(dir, 'base.qcow2');
    const top = path.join(dir, 'top.qcow2');
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', base, String(8 * MiB)]);
    qemu('qemu-io', ['-c', `write -P 0x44 0 ${4 * MiB}`, base]);
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top]);
    const lines: string[] = [];
    const m = new Machine({ guest: true, vcpus: 1, ramBytes: 8 * MiB });
    await withBql(async (bql) => {
      await m.addDrive(bql, `file=${top},id=d0`);
      await m.start(bql);
    });
    const mon = new Monitor((l) => lines.push(l), m);
    const run = async (cmd: string): Promise<string[]> => {
      const from = lines.length;
      await mon.execute(cmd);
      return lines.slice(from);
    };
    try {
      expect(await run('info block-jobs')).toEqual(['No active jobs']);
      // stream the base into top: top becomes standalone
      expect(await run('block_stream d0')).toEqual([]);
      await run('block_job_pause d0');
      await until('the stream to pause', async () => (await withBql((bql) => listJobs(bql)))[0]?.status === 'paused');
      expect((await run('info block-jobs')).join('\n')).toMatch(/^Type stream, device d0: Completed \d+ of \d+ bytes, speed limit 0 bytes\/s \(paused\)$/);
      await run('block_job_resume d0');
      await until('the stream to end', async () => (await withBql((bql) => listJobs(bql))).length === 0);
      expect((await run('info block')).join('\n')).not.toMatch(/Backing file/);
      // an external snapshot, then an active commit of it back into top
      const ov = path.join(dir, 'overlay.qcow2');
      expect(await run(`snapshot_blkdev d0 ${ov}`)).toEqual([]);
      expect((await run('info block')).join('\n')).toMatch(/Backing file: .*top\.qcow2 \(chain depth: 1\)/);
      // top was the device's writable image, so it can take the active commit of the overlay
      expect(await run('block_commit d0')).toEqual([]);
      await until('the commit to be ready', async () => (await withBql((bql) => listJobs(bql)))[0]?.status === 'ready');
      expect((await run('info block-jobs')).join('\n')).toMatch(/^Type commit, device d0: .* \(ready\)$/);
      expect(await run('block_job_complete d0')).toEqual([]);
      await until('the commit to end', async () => (await withBql((bql) => listJobs(bql))).length === 0);
      const info = (await run('info block')).join('\n');
      expect(info).toMatch(/top\.qcow2/);
      expect(info).not.toMatch(/overlay\.qcow2|Backing file/);
      expect(await run('block_job_cancel nosuchjob')).toEqual([expect.stringMatching(/^Error: .*nosuchjob/)]);
      const r = await withBql((bql) => m.checkGuest(bql));
      expect(r.mismatches).toEqual([]);
    } finally {
      await withBql((bql) => m.shutdown(bql));
    }
    for (const f of [base, top, path.join(dir, 'overlay.qcow2')]) {
      const c = qemuStatus('qemu-img', ['check', f]);
      expect(`${f}: ${c.stdout}${c.stderr}`).toMatch(/No errors were found/);
    }
    expect(JSON.parse(qemu('qemu-img', ['info', '--output=json', top]))['backing-filename']).toBeUndefined();
  });
});

/**
 * kill -9 during savevm / loadvm / delvm: a child process (the `snapstack monitor` with the guest
 * workload on a qcow2 and a raw disk in a temporary directory) runs a loop of VM snapshot
 * commands and is killed with SIGKILL after a seeded random delay. Then the images are reopened
 * by the library and checked:
 * - the machine's start rolls back or finishes what was interrupted and reports it once (a
 *   second start reports nothing);
 * - every tag is on all disks or on none, one savevm each, and no undo snapshot is left;
 * - loading a tag gives disks that agree with the restored guest RAM (the guest's checksums);
 * - `qemu-img check` exits 0 or 3 (leaks only).
 * A handful of points by default; SNAPSTACK_LONG_SWEEPS=1 tries many more.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { bdrvSnapshotList, shutdownIOThreads, withBql, withBqlSync, withDrainedAll } from '../src/index.js';
import type { SnapshotInfo } from '../src/block/driver.js';
import { sameSavevm } from '../src/block/snapshot-group.js';
import { createQcow2File } from '../src/drivers/qcow2/create.js';
import { Machine } from '../src/machine/machine.js';
import { FOUND_PREFIX, loadVm, saveVm, UNDO_PREFIX } from '../src/machine/savevm.js';
import { INTENT_SUFFIX } from '../src/machine/vm-intent.js';
import { describeInterop, qemuStatus } from './helpers/qemu.js';
import { prng as rng } from './helpers/prng.js';

const LONG = process.env['SNAPSTACK_LONG_SWEEPS'] === '1';
const POINTS = LONG ? 40 : 5;
const MiB = 1024 * 1024;
const RAM = '8M';
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

let dir: string;
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-savevm-kill-'));
});
afterAll(async () => {
  fs.rmSync(dir, { recursive: true, force: true });
  await withBql((bql) => shutdownIOThreads(bql));
});

/** The commands the child runs, over and over, until it is killed. */
const LOOP = ['savevm s1', 'loadvm s1', 'savevm s2', 'loadvm s1', 'delvm s2', 'savevm s1', 'loadvm s1', 'savevm s3', 'delvm s3'];

/** Runs the monitor on the images and kills it with SIGKILL `delayMs` after its first prompt. */
async function runAndKill(drives: string[], delayMs: number): Promise<string> {
  const args = [path.resolve('bin/snapstack.js'), 'monitor', ...drives.flatMap((d) => ['--drive', d]), '-m', RAM, '--guest'];
  const child = spawn(process.execPath, args, { stdio: ['pipe', 'pipe', 'pipe'] });
  let out = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr.on('data', (d: Buffer) => (out += d.toString()));
  const closed = new Promise<void>((resolve) => child.on('close', () => resolve()));
  for (let i = 0; i < 200 && !out.includes('(qemu)') && !out.includes('monitor'); i++) await sleep(25);
  for (let round = 0; round < 20; round++) child.stdin.write(`${LOOP.join('\n')}\n`);
  await sleep(delayMs);
  child.kill('SIGKILL');
  await closed;
  return out;
}

async function lists(m: Machine): Promise<Map<string, SnapshotInfo[]>> {
  return withBql(async (bql) => {
    const r = new Map<string, SnapshotInfo[]>();
    for (const d of m.disks) r.set(d.id, await bdrvSnapshotList(bql, d.node));
    return r;
  });
}

async function openMachine(drives: string[]): Promise<{ m: Machine; report: string[] }> {
  const m = new Machine({ guest: false, vcpus: 2, ramBytes: 8 * MiB });
  const report = await withBql(async (bql) => {
    for (const d of drives) await m.addDrive(bql, d);
    await m.start(bql);
    await m.stop(bql);
    return m.takeRecoveryReport(bql);
  });
  return { m, report };
}

/** Runs the monitor on the images with `lines` on stdin; returns what it printed. */
async function monitorOnce(drives: string[], lines: string[]): Promise<string> {
  const args = [path.resolve('bin/snapstack.js'), 'monitor', ...drives.flatMap((d) => ['--drive', d]), '-m', RAM];
  const child = spawn(process.execPath, args, { stdio: ['pipe', 'pipe', 'pipe'] });
  let out = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr.on('data', (d: Buffer) => (out += d.toString()));
  child.stdin.end(`${lines.join('\n')}\n`);
  await new Promise<void>((resolve) => child.on('close', () => resolve()));
  return out;
}

describeInterop('savevm, loadvm and delvm killed with SIGKILL at random points', () => {
  it('the monitor reports a recovered savevm once: the partial snapshot is gone, the next start says nothing', async () => {
    const sub = fs.mkdtempSync(path.join(dir, 'once-'));
    const qa = path.join(sub, 'a.qcow2');
    const qb = path.join(sub, 'b.qcow2');
    withBqlSync((bql) => {
      createQcow2File(bql, qa, { sizeBytes: 4 * MiB });
      createQcow2File(bql, qb, { sizeBytes: 4 * MiB });
    });
    const drives = [`file=${qa},format=qcow2,id=a`, `file=${qb},format=qcow2,id=b`];
    // a savevm that a crash cut short: the snapshot on 'a' only, and its intent record beside 'a'
    const first = await openMachine(drives);
    await withBql((bql) => saveVm(bql, first.m, 'cut'));
    const sn = (await lists(first.m)).get('a')?.find((x) => x.name === 'cut');
    await withBql(async (bql) => {
      const b = first.m.disks[1];
      if (b === undefined) throw new Error('b');
      const { bdrvSnapshotDelete } = await import('../src/block/snapshot.js');
      await withDrainedAll(bql, (drained) => bdrvSnapshotDelete(bql, drained, b.node, null, 'cut'));
    });
    await withBql((bql) => first.m.shutdown(bql));
    if (sn === undefined) throw new Error('no snapshot');
    const rec = { op: 'savevm', phase: 'started', tag: 'cut', identity: { dateSec: sn.dateSec, dateNsec: sn.dateNsec, vmClockNsec: sn.vmClockNsec }, disks: ['a', 'b'] };
    fs.writeFileSync(`${qa}${INTENT_SUFFIX}`, JSON.stringify(rec));
    const out = await monitorOnce(drives, ['info snapshots', 'quit']);
    expect(out).toMatch(/savevm 'cut' was interrupted: its partial snapshot was removed \(1 disk\(s\)\); older snapshots of the tag are kept/);
    expect(out).toMatch(/There is no snapshot available\./);
    expect(fs.existsSync(`${qa}${INTENT_SUFFIX}`)).toBe(false);
    const again = await monitorOnce(drives, ['quit']);
    expect(again).not.toMatch(/interrupted|recovery/);
    for (const f of [qa, qb]) {
      expect(qemuStatus('qemu-img', ['snapshot', '-l', f]).stdout).toBe('');
      expect(qemuStatus('qemu-img', ['check', f]).status).toBe(0);
    }
  });


  it('after every kill the next start finds each tag on all disks or none, finishes or rolls back an interrupted operation once, and qemu-img check passes', { timeout: LONG ? 3_600_000 : 240_000 }, async () => {
    const r = rng(0xdead);
    const recovered = new Map<string, number>();
    let loadsChecked = 0;
    let blocksChecked = 0;
    for (let p = 0; p < POINTS; p++) {
      const sub = fs.mkdtempSync(path.join(dir, `p${p}-`));
      const qa = path.join(sub, 'a.qcow2');
      const rb = path.join(sub, 'b.raw');
      withBqlSync((bql) => createQcow2File(bql, qa, { sizeBytes: 16 * MiB }));
      fs.writeFileSync(rb, Buffer.alloc(8 * MiB));
      const drives = [`file=${qa},format=qcow2,id=a`, `file=${rb},format=raw,id=b`];
      const delay = 200 + Math.floor(r() * 2500);
      const out = await runAndKill(drives, delay);
      const label = `point ${p} (killed ${delay} ms after the first prompt)`;
      const first = await openMachine(drives);
      try {
        for (const line of first.report) {
          const kind = /^(savevm|loadvm|delvm) .* (was interrupted|had finished|had saved|was finished)/.exec(line);
          const key = kind === null ? line : `${kind[1]} ${kind[2]}`;
          recovered.set(key, (recovered.get(key) ?? 0) + 1);
        }
        expect(first.report.every((l) => !/failed/.test(l)), `${label}: ${first.report.join('; ')}`).toBe(true);
        expect(fs.existsSync(`${qa}${INTENT_SUFFIX}`), `${label}: the intent record is gone after recovery`).toBe(false);
        const l = await lists(first.m);
        const tags = new Set<string>();
        for (const s of l.values()) for (const x of s) tags.add(x.name);
        for (const t of tags) {
          expect(t.startsWith(UNDO_PREFIX), `${label}: undo snapshot ${t} left`).toBe(false);
          const per = [...l].map(([d, s]) => [d, s.filter((x) => x.name === t)] as const);
          for (const [d, s] of per) expect(s.length, `${label}: tag ${t} on ${d}: ${out.slice(-400)}`).toBe(1);
          const a = per[0]?.[1][0];
          if (a !== undefined) for (const [, s] of per) expect(sameSavevm(s[0] as SnapshotInfo, a), `${label}: tag ${t} mixes savevms`).toBe(true);
        }
        // a tag that survived loads, and its disks agree with the guest RAM it restores (the
        // disk-only state a rolled-back loadvm kept is no VM snapshot)
        const vmTags = [...tags].filter((t) => !t.startsWith(FOUND_PREFIX));
        const pick = vmTags[Math.floor(r() * vmTags.length)];
        if (pick !== undefined) {
          await withBql((bql) => loadVm(bql, first.m, pick));
          const v = await first.m.verifyDisks();
          expect(v.mismatches, `${label}: disks after loadvm ${pick} disagree with its RAM`).toEqual([]);
          blocksChecked += v.checked;
          loadsChecked++;
        }
      } finally {
        await withBql((bql) => first.m.shutdown(bql));
      }
      const chk = qemuStatus('qemu-img', ['check', qa]);
      expect(chk.status === 0 || chk.status === 3, `${label}: qemu-img check: ${chk.stdout}${chk.stderr}`).toBe(true);
      // reported once: the next start has nothing to report
      const second = await openMachine(drives);
      await withBql((bql) => second.m.shutdown(bql));
      expect(second.report, label).toEqual([]);
    }
    // the oracle compared real blocks (the guest had written before the snapshots it loaded)
    expect(blocksChecked).toBeGreaterThan(0);
    console.log(`savevm-kill: ${POINTS} kill points, recovery by kind ${JSON.stringify(Object.fromEntries(recovered))}, ${loadsChecked} loads checked against guest RAM (${blocksChecked} blocks), 0 violations`);
  });
});

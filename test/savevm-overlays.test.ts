/**
 * savevm / loadvm / delvm on disks that are overlays, and mixed with an external snapshot taken
 * while the machine runs (QEMU's rules: internal snapshots live in each device's top image, so a
 * tag saved before snapshot_blkdev is no longer on that device and loadvm of it is refused, with
 * nothing changed). The self-checking guest is the data oracle; qemu-img checks every image.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { shutdownIOThreads, withBql } from '../src/index.js';
import { snapshotBlkdev } from '../src/commands/snapshot-blkdev.js';
import { Machine } from '../src/machine/machine.js';
import { delVm, listVmSnapshots, loadVm, saveVm } from '../src/machine/savevm.js';
import { expectGuestConsistent, waitForWrites } from './helpers/guest.js';
import { describeInterop, qemu, qemuStatus } from './helpers/qemu.js';

let dir: string;
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-savevm-overlays-'));
});
afterAll(async () => {
  fs.rmSync(dir, { recursive: true, force: true });
  await withBql((bql) => shutdownIOThreads(bql));
});

const MiB = 1024 * 1024;

describeInterop('savevm and loadvm on overlays and across an external snapshot', () => {
  it('saves and loads on an overlay disk, refuses a tag left below a live overlay, and keeps every image clean', async () => {
    const base = path.join(dir, 'base.qcow2');
    const top = path.join(dir, 'top.qcow2');
    const plain = path.join(dir, 'plain.qcow2');
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', base, String(16 * MiB)]);
    qemu('qemu-io', ['-c', `write -P 0x33 0 ${8 * MiB}`, base]);
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top]);
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', plain, String(16 * MiB)]);
    const live = path.join(dir, 'live-overlay.qcow2');
    const m = new Machine({ guest: true, vcpus: 2, ramBytes: 8 * MiB });
    await withBql(async (bql) => {
      await m.addDrive(bql, `file=${top},id=d0`);
      await m.addDrive(bql, `file=${plain},id=d1`);
      await m.start(bql);
    });
    try {
      await waitForWrites(m, 100);
      await withBql((bql) => saveVm(bql, m, 'before'));
      await waitForWrites(m, 100);
      await withBql((bql) => loadVm(bql, m, 'before'));
      await expectGuestConsistent(m);
      // an external snapshot of d0 while the guest runs: d0's top is now a new overlay
      await withBql((bql) => snapshotBlkdev(bql, { device: 'd0', snapshotFile: live }));
      await waitForWrites(m, 100);
      await expectGuestConsistent(m);
      // 'before' lives in top.qcow2, now below the overlay: loadvm refuses it and changes nothing
      const writes = m.guestCounters().writes;
      const refused = await withBql((bql) => loadVm(bql, m, 'before')).then(
        () => null,
        (e: unknown) => String(e),
      );
      expect(refused).toMatch(/before/);
      expect(m.runState).toBe('running');
      await waitForWrites(m, 50);
      expect(m.guestCounters().writes).toBeGreaterThan(writes);
      await expectGuestConsistent(m);
      await withBql((bql) => saveVm(bql, m, 'after'));
      await waitForWrites(m, 100);
      await withBql((bql) => loadVm(bql, m, 'after'));
      await expectGuestConsistent(m);
      const report = await withBql((bql) => listVmSnapshots(bql, m));
      expect(report.complete.map((s) => s.name)).toEqual(['after']);
      expect(await withBql((bql) => delVm(bql, m, 'after'))).toEqual([]);
    } finally {
      await withBql((bql) => m.shutdown(bql));
    }
    for (const f of [base, top, plain, live]) {
      const r = qemuStatus('qemu-img', ['check', f]);
      expect(`${f}: ${r.stdout}${r.stderr}`).toMatch(/No errors were found/);
    }
    const chain = JSON.parse(qemu('qemu-img', ['info', '--backing-chain', '--output=json', live])) as Array<{ filename: string; snapshots?: Array<{ name: string }> }>;
    expect(chain.map((c) => path.basename(c.filename))).toEqual(['live-overlay.qcow2', 'top.qcow2', 'base.qcow2']);
    expect((chain[1]?.snapshots ?? []).map((s) => s.name)).toEqual(['before']);
  });
});

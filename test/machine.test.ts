/**
 * The machine and savevm / loadvm / delvm: through the library and through the monitor on piped
 * stdin, with qemu-img as the oracle for the images, fault injection (a filter that fails writes
 * on command), and many rounds under load. The self-checking guest is the data oracle: after
 * loadvm, the checksums in the restored guest RAM must agree with every disk.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createIOThread, shutdownIOThreads, withBql, withBqlSync } from '../src/index.js';
import { createQcow2File } from '../src/drivers/qcow2/create.js';
import { Machine } from '../src/machine/machine.js';
import { delVm, listVmSnapshots, loadVm, saveVm } from '../src/machine/savevm.js';
import { decodeVmState } from '../src/machine/vmstate.js';
import { faultSwitch } from './helpers/faulty-driver.js';
import { expectGuestConsistent, waitForWrites } from './helpers/guest.js';
import { describeInterop, qemu, qemuStatus } from './helpers/qemu.js';

let dir: string;
beforeAll(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-machine-'));
  await withBql((bql) => {
    createIOThread(bql, 'mt-io0');
    createIOThread(bql, 'mt-io1');
  });
});
afterAll(async () => {
  fs.rmSync(dir, { recursive: true, force: true });
  await withBql((bql) => shutdownIOThreads(bql));
});

const MiB = 1024 * 1024;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function image(name: string, size = 32 * MiB): string {
  const f = path.join(dir, name);
  withBqlSync((bql) => createQcow2File(bql, f, { sizeBytes: size }));
  return f;
}

/** A running machine with the guest workload on two qcow2 disks, each on its own IOThread. */
async function machineWith(drives: string[], opts: { vcpus?: number; ramBytes?: number } = {}): Promise<Machine> {
  const m = new Machine({ guest: true, vcpus: opts.vcpus ?? 2, ramBytes: opts.ramBytes ?? 8 * MiB });
  await withBql(async (bql) => {
    for (const d of drives) await m.addDrive(bql, d);
    await m.start(bql);
  });
  return m;
}

describe('the machine', () => {
  it('runs the guest workload, stops without losing a request, and its disks agree with guest RAM', async () => {
    const m = await machineWith([`file=${image('run-a.qcow2')},format=qcow2,id=a,iothread=mt-io0`, `file=${image('run-b.qcow2')},format=qcow2,id=b,iothread=mt-io1`]);
    try {
      await waitForWrites(m, 200);
      for (let i = 0; i < 5; i++) {
        await withBql((bql) => m.stop(bql));
        const frozen = m.guestCounters().writes;
        await sleep(30);
        expect(m.guestCounters().writes).toBe(frozen); // paused vCPUs issue nothing
        expect(m.runState).toBe('paused');
        await expectGuestConsistent(m);
        await withBql((bql) => m.cont(bql));
        await waitForWrites(m, 20);
      }
    } finally {
      await withBql((bql) => m.shutdown(bql));
    }
  });

  it('refuses a VM state that does not fit, naming the field, and changes nothing', async () => {
    const m = new Machine({ vcpus: 2, ramBytes: 4 * MiB });
    const other = new Machine({ vcpus: 1, ramBytes: 4 * MiB });
    await withBql(async (bql) => {
      await m.start(bql);
      await other.start(bql);
      await m.stop(bql);
      await other.stop(bql);
      const state = m.saveState(bql);
      expect(() => other.loadState(bql, state)).toThrow(/vCPU/);
      const damaged = state.slice();
      damaged[damaged.length - 100] = (damaged[damaged.length - 100] ?? 0) ^ 0xff;
      expect(() => m.loadState(bql, damaged)).toThrow(/checksum/);
      const newer = state.slice();
      new DataView(newer.buffer).setUint32(8, 99);
      expect(() => m.loadState(bql, newer)).toThrow(/version 99/);
      expect(() => decodeVmState(state.subarray(0, 10), { ramBytes: 4 * MiB, vcpus: 2, cpuBytes: 32, deviceBytes: 64 })).toThrow(/too short/);
      m.loadState(bql, state);
      await m.shutdown(bql);
      await other.shutdown(bql);
    });
  });
});

describeInterop('savevm, loadvm, delvm', () => {
  it('savevm; the guest keeps writing; loadvm restores RAM and disks together; delvm; qemu-img agrees', async () => {
    const fa = image('vm-a.qcow2');
    const fb = image('vm-b.qcow2');
    const m = await machineWith([`file=${fa},format=qcow2,id=a,iothread=mt-io0`, `file=${fb},format=qcow2,id=b,iothread=mt-io1`]);
    try {
      await waitForWrites(m, 100);
      const saved = await withBql((bql) => saveVm(bql, m, 's1'));
      expect(saved.vmstateDisk).toBe('a');
      expect(m.runState).toBe('running');
      const writesAtSave = m.guestCounters().writes;
      await waitForWrites(m, 300);
      await withBql((bql) => loadVm(bql, m, 's1'));
      expect(m.runState).toBe('running');
      await expectGuestConsistent(m);
      expect(m.guestCounters().writes).toBeLessThan(writesAtSave + 300); // RAM went back in time
      const report = await withBql((bql) => listVmSnapshots(bql, m));
      expect(report.complete.map((s) => s.name)).toEqual(['s1']);
      await withBql(async (bql) => {
        await m.stop(bql);
      });
      // qemu-img sees the snapshot on both disks, with VM state only on the VM-state disk
      for (const [f, withState] of [
        [fa, true],
        [fb, false],
      ] as const) {
        const info = JSON.parse(qemu('qemu-img', ['info', '--output=json', '-U', f])) as { snapshots: Array<{ name: string; 'vm-state-size': number }> };
        expect(info.snapshots.map((s) => s.name)).toEqual(['s1']);
        expect((info.snapshots[0]?.['vm-state-size'] ?? 0) > 0).toBe(withState);
        expect(qemuStatus('qemu-img', ['check', '-U', f]).status).toBe(0);
      }
      await withBql(async (bql) => {
        m.cont(bql);
        expect(await delVm(bql, m, 's1')).toEqual([]);
        expect(await delVm(bql, m, 'nosuch')).toEqual([]); // like QEMU: nothing to delete is no error
        const after = await listVmSnapshots(bql, m);
        expect(after.complete).toEqual([]);
      });
    } finally {
      await withBql((bql) => m.shutdown(bql));
    }
    for (const f of [fa, fb]) {
      expect(qemuStatus('qemu-img', ['check', f]).status).toBe(0);
      expect(qemu('qemu-img', ['snapshot', '-l', f])).toBe('');
    }
  });

  it('a machine with a raw and a qcow2 disk saves and loads both (raw snapshots beside the image)', async () => {
    const fq = image('mixed.qcow2');
    const fr = path.join(dir, 'mixed.raw');
    fs.writeFileSync(fr, Buffer.alloc(16 * MiB));
    const m = await machineWith([`file=${fq},format=qcow2,id=q,iothread=mt-io0`, `file=${fr},format=raw,id=r`]);
    try {
      await waitForWrites(m, 100);
      await withBql((bql) => saveVm(bql, m, 'mixed'));
      await waitForWrites(m, 200);
      await withBql((bql) => loadVm(bql, m, 'mixed'));
      await expectGuestConsistent(m);
      const report = await withBql((bql) => listVmSnapshots(bql, m));
      expect(report.complete.map((x) => x.name)).toEqual(['mixed']);
      expect(await withBql((bql) => delVm(bql, m, 'mixed'))).toEqual([]);
    } finally {
      await withBql((bql) => m.shutdown(bql));
    }
    expect(qemuStatus('qemu-img', ['check', fq]).status).toBe(0);
  });

  it('a disk failing at any write of savevm: no new snapshot on any disk, the old one of the same tag kept, images never corrupt', async () => {
    const fa = image('fault-a.qcow2');
    const fb = image('fault-b.qcow2');
    const sw = faultSwitch('fault-b');
    const m = await machineWith([`file=${fa},format=qcow2,id=a`, `driver=qcow2,file.driver=faulty,file.tag=fault-b,file.file.filename=${fb},id=b`]);
    let failures = 0;
    const leaks = new Map<string, number>();
    try {
      await waitForWrites(m, 50);
      await withBql((bql) => saveVm(bql, m, 'tag'));
      for (let n = 0; n < 40; n++) {
        await waitForWrites(m, 10);
        const before = await withBql((bql) => listVmSnapshots(bql, m));
        await withBql((bql) => m.stop(bql)); // so that the failing write is one of savevm's
        sw.failAfterWrites = n; // the (n+1)-th write of disk b from now on fails, once
        sw.failCount = 1;
        const failed = await withBql((bql) => saveVm(bql, m, 'tag')).then(
          () => false,
          (e: unknown) => {
            expect(String(e)).toMatch(/Could not create snapshot 'tag' on 'b'|b/);
            return true;
          },
        );
        sw.failAfterWrites = null;
        sw.failCount = null;
        sw.failWrites = false;
        expect(m.runState).toBe('paused'); // it was stopped: savevm leaves it so, failed or not
        await withBql((bql) => m.cont(bql));
        const after = await withBql((bql) => listVmSnapshots(bql, m));
        expect(after.partial, `step ${n}`).toEqual([]);
        expect(after.complete.map((s) => s.name)).toEqual(['tag']);
        if (failed) {
          failures++;
          expect(after.complete[0]?.vmClockNsec, `step ${n}: the old snapshot is kept`).toBe(before.complete[0]?.vmClockNsec);
        }
        await withBql((bql) => m.stop(bql));
        for (const f of [fa, fb]) {
          // never corrupt; a failed savevm leaves nothing behind, a write failing after a commit
          // point (the older snapshot's cleanup) can only leak
          const chk = qemuStatus('qemu-img', ['check', '-U', f]);
          expect(chk.status === 0 || chk.status === 3, `step ${n}, ${f}: ${chk.stdout}${chk.stderr}`).toBe(true);
          const leaked = Number(/(\d+) leaked clusters were found/.exec(chk.stdout)?.[1] ?? 0);
          if (failed) expect(leaked, `step ${n}, ${f}: a savevm that failed leaked`).toBe(leaks.get(f) ?? 0);
          leaks.set(f, leaked);
        }
        await withBql((bql) => m.cont(bql));
      }
      expect(failures).toBeGreaterThan(3);
      // a savevm that succeeded but whose cleanup write failed (deleting the older snapshot past
      // its commit point) leaks that snapshot's clusters, as QEMU does; `img check -r leaks` frees them
      // the surviving snapshot loads, and RAM and disks agree
      await withBql((bql) => loadVm(bql, m, 'tag'));
      await expectGuestConsistent(m);
    } finally {
      sw.failWrites = false;
      await withBql((bql) => m.shutdown(bql));
    }
  });

  it('a disk failing at any write of loadvm: every disk as it was, RAM untouched, the machine running', async () => {
    const fa = image('lfault-a.qcow2');
    const fb = image('lfault-b.qcow2');
    const sw = faultSwitch('lfault-b');
    const m = await machineWith([`file=${fa},format=qcow2,id=a`, `driver=qcow2,file.driver=faulty,file.tag=lfault-b,file.file.filename=${fb},id=b`]);
    let failures = 0;
    try {
      await waitForWrites(m, 50);
      await withBql((bql) => saveVm(bql, m, 'old'));
      for (let n = 0; n < 40; n++) {
        await waitForWrites(m, 20);
        await withBql((bql) => m.stop(bql));
        const countersBefore = m.guestCounters();
        await withBql((bql) => m.cont(bql));
        sw.failAfterWrites = n;
        sw.failCount = 1;
        const failed = await withBql((bql) => loadVm(bql, m, 'old')).then(
          () => false,
          (e: unknown) => {
            expect(String(e)).toMatch(/put back|no disk was changed/);
            return true;
          },
        );
        sw.failAfterWrites = null;
        sw.failCount = null;
        sw.failWrites = false;
        expect(m.runState).toBe('running');
        await withBql((bql) => m.stop(bql));
        if (failed) {
          failures++;
          expect(m.guestCounters().writes, `step ${n}: RAM untouched`).toBeGreaterThanOrEqual(countersBefore.writes);
        }
        await expectGuestConsistent(m); // disks agree with RAM: all put back, or all loaded
        for (const f of [fa, fb]) {
          const chk = qemuStatus('qemu-img', ['check', '-U', f]);
          expect(chk.status === 0 || chk.status === 3, `step ${n}, ${f}: ${chk.stdout}${chk.stderr}`).toBe(true); // a failed write may leak, never corrupt
        }
        await withBql((bql) => m.cont(bql));
      }
      expect(failures).toBeGreaterThan(3);
    } finally {
      sw.failWrites = false;
      await withBql((bql) => m.shutdown(bql));
    }
  });

  it('many savevm/loadvm rounds while vCPUs and two IOThreads are busy: no lost request, no deadlock, no mismatch', async () => {
    const fa = image('rounds-a.qcow2');
    const fb = image('rounds-b.qcow2');
    const m = await machineWith([`file=${fa},format=qcow2,id=a,iothread=mt-io0`, `file=${fb},format=qcow2,id=b,iothread=mt-io1`], { vcpus: 4 });
    try {
      for (let round = 0; round < 8; round++) {
        await waitForWrites(m, 30);
        await withBql((bql) => saveVm(bql, m, `r${round % 3}`));
        await waitForWrites(m, 30);
        await withBql((bql) => loadVm(bql, m, `r${round % 3}`));
        if (round % 2 === 1) await expectGuestConsistent(m);
      }
      await expectGuestConsistent(m);
      const report = await withBql((bql) => listVmSnapshots(bql, m));
      expect(report.complete.map((s) => s.name).sort()).toEqual(['r0', 'r1', 'r2']); // replaced, not piled up
    } finally {
      await withBql((bql) => m.shutdown(bql));
    }
    for (const f of [fa, fb]) {
      const chk = qemuStatus('qemu-img', ['check', f]);
      expect(chk.status, `${f}: ${chk.stdout}${chk.stderr}`).toBe(0);
    }
  });
});

/** A step that re-sends `send` every 100 ms until the output so far matches `until` (10 s at most). */
interface WaitStep {
  send: string;
  until: RegExp;
}

/** Runs the monitor on piped stdin, feeding one line at a time with pauses; returns stdout. */
async function monitorSession(args: string[], lines: Array<string | number | WaitStep>): Promise<{ stdout: string; stderr: string; code: number | null }> {
  const child = spawn(process.execPath, [path.resolve('bin/snapstack.js'), 'monitor', ...args], { stdio: ['pipe', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  for (const l of lines) {
    if (typeof l === 'number') await sleep(l);
    else if (typeof l === 'string') child.stdin.write(`${l}\n`);
    else {
      for (let i = 0; i < 100 && !l.until.test(stdout); i++) {
        child.stdin.write(`${l.send}\n`);
        await sleep(100);
      }
    }
  }
  child.stdin.end();
  const code = await new Promise<number | null>((resolve) => child.on('close', resolve));
  return { stdout, stderr, code };
}

describeInterop('the monitor, end to end on piped stdin', () => {
  it('savevm, guest writes, loadvm, info guest agrees, delvm, info snapshots before and after', async () => {
    const fa = image('mon-a.qcow2');
    const fb = image('mon-b.qcow2');
    const r = await monitorSession(
      ['--object', 'iothread,id=io0', '--drive', `file=${fa},format=qcow2,id=disk0,iothread=io0`, '--drive', `file=${fb},format=qcow2,id=disk1`, '-m', '16M', '--guest'],
      // savevm once the guest has written (its start-up takes a while on a loaded machine)
      [{ send: 'info guest', until: /writes [1-9]/ }, 'info status', 'savevm s1', 300, 'info snapshots', 'loadvm s1', 'info guest', 'delvm s1', 'info snapshots', 'quit'],
    );
    expect(r.code).toBe(0);
    expect(r.stderr).toBe('');
    const out = r.stdout;
    expect(out).not.toMatch(/\x1b\[/); // no escape codes on a pipe
    expect(out).toMatch(/VM status: running/);
    expect(out).toMatch(/List of snapshots present on all disks:\nID {8}TAG {15}VM SIZE {16}DATE {5}VM CLOCK {5}ICOUNT\n-- {8}s1 {10,}/);
    const checks = out.match(/^disks: .*$/gm) ?? [];
    expect(checks[checks.length - 1]).toMatch(/^disks: [1-9]\d* blocks checked, 0 mismatches$/); // the check after loadvm
    expect(out).toMatch(/self-check errors 0/);
    expect(out).toMatch(/There is no snapshot available\.\s*$/);
    for (const f of [fa, fb]) expect(qemuStatus('qemu-img', ['check', f]).status).toBe(0);
  });

  it('bad commands and arguments: one clear line each, and the monitor keeps running', async () => {
    const fa = image('bad-a.qcow2');
    const r = await monitorSession(['--drive', `file=${fa},format=qcow2,id=disk0`], [
      'frobnicate',
      'loadvm',
      'loadvm nosuch',
      'savevm a b',
      'info nosuch',
      'qemu-io nosuchdisk "read 0 4k"',
      'qemu-io disk0 "read -P 0x01 0 4k"',
      'info status',
      'quit',
    ]);
    expect(r.code).toBe(0);
    const lines = r.stdout.split('\n');
    expect(lines).toContain("unknown command: 'frobnicate'");
    expect(lines).toContain("Error: loadvm: Parameter 'name' is missing");
    expect(lines.some((l) => /^Error: Snapshot 'nosuch' does not exist in one or more devices/.test(l))).toBe(true);
    expect(lines).toContain('Error: savevm: too many arguments (one tag)');
    expect(lines.some((l) => l.startsWith("info: subcommand 'nosuch' not found"))).toBe(true);
    expect(lines.some((l) => /^Error: .*nosuchdisk/.test(l))).toBe(true);
    expect(lines.some((l) => /Pattern verification failed/.test(l))).toBe(true);
    expect(lines).toContain('VM status: running');
  });
});

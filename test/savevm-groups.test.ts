/**
 * The rules of the VM snapshot group that the sweeps rely on, one case each: a tag names one
 * savevm (by the identity every disk's entry of it carries) or loadvm refuses it; loadvm honours
 * savevm's `vmstate` choice; a vm-state-size read from an image is bounded before it sizes a
 * buffer; an undo failure inside the group create is reported, not swallowed; savevm does not
 * report success while a disk keeps two snapshots of the tag.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { bdrvSnapshotCreate, bdrvSnapshotList, blkPread, blkPwrite, shutdownIOThreads, withBql, withDrainedAll, withBqlSync } from '../src/index.js';
import type { SnapshotInfo } from '../src/block/driver.js';
import { isBlockError } from '../src/block/errors.js';
import { bdrvAllCreateSnapshot, GroupCreateError } from '../src/block/snapshot-group.js';
import { createQcow2File } from '../src/drivers/qcow2/create.js';
import { Machine } from '../src/machine/machine.js';
import { delVm, listVmSnapshots, loadVm, saveVm, VmSnapshotError } from '../src/machine/savevm.js';
import { faultSwitch, planFaults } from './helpers/faulty-driver.js';
import { describeInterop, qemuStatus } from './helpers/qemu.js';

const MiB = 1024 * 1024;
let dir: string;
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-savevm-groups-'));
});
afterAll(async () => {
  fs.rmSync(dir, { recursive: true, force: true });
  await withBql((bql) => shutdownIOThreads(bql));
});

async function machine(drives: string[]): Promise<Machine> {
  const m = new Machine({ guest: false, vcpus: 1, ramBytes: 1 * MiB });
  await withBql(async (bql) => {
    for (const d of drives) await m.addDrive(bql, d);
    await m.start(bql);
  });
  return m;
}

async function fill(m: Machine, id: string, value: number): Promise<void> {
  const d = m.disks.find((x) => x.id === id);
  if (d === undefined) throw new Error(id);
  await blkPwrite(d.blk, 0, new Uint8Array(4096).fill(value));
}

async function firstByte(m: Machine, id: string): Promise<number> {
  const d = m.disks.find((x) => x.id === id);
  if (d === undefined) throw new Error(id);
  const b = new Uint8Array(4096);
  await blkPread(d.blk, 0, b);
  return b[0] ?? -1;
}

async function caught(p: Promise<unknown>): Promise<unknown> {
  return p.then(
    () => null,
    (e: unknown) => e,
  );
}

/** A snapshot made on one disk by hand (as another tool or an old leftover would). */
async function handMade(m: Machine, id: string, info: Partial<SnapshotInfo> & { name: string }): Promise<SnapshotInfo> {
  const d = m.disks.find((x) => x.id === id);
  if (d === undefined) throw new Error(id);
  return withBql((bql) =>
    withDrainedAll(bql, (drained) => bdrvSnapshotCreate(bql, drained, d.node, { id: '', vmStateSize: 0, dateSec: 1_700_000_000, dateNsec: 5, vmClockNsec: 7, icount: -1, ...info })),
  );
}

describe('a tag names one savevm', () => {
  it('refuses to load a tag whose snapshots come from different savevms, and changes nothing', async () => {
    const m = await machine(['driver=memory,size=1M,id=a', 'driver=memory,size=1M,id=b']);
    try {
      await fill(m, 'a', 1);
      await fill(m, 'b', 1);
      await withBql((bql) => saveVm(bql, m, 't'));
      await withBql((bql) => delVm(bql, m, 't'));
      // a savevm on disk a only, and a disk-only snapshot of the same name on b from another time
      await withBql((bql) => saveVm(bql, m, 't'));
      const b = m.disks[1];
      if (b === undefined) throw new Error('b');
      const listB = await withBql((bql) => bdrvSnapshotList(bql, b.node));
      await withBql((bql) => withDrainedAll(bql, async (drained) => {
        const { bdrvSnapshotDelete } = await import('../src/block/snapshot.js');
        await bdrvSnapshotDelete(bql, drained, b.node, listB[0]?.id ?? '', 't');
      }));
      await handMade(m, 'b', { name: 't' });
      await fill(m, 'a', 2);
      await fill(m, 'b', 2);
      const e = await caught(withBql((bql) => loadVm(bql, m, 't')));
      expect(isBlockError(e, 'EINVAL')).toBe(true);
      expect(String(e)).toMatch(/Snapshot 't' is ambiguous: no single savevm made it on every disk .*'a' has ID \d+ \(date .*'b' has ID \d+.*refusing to guess/);
      expect(await firstByte(m, 'a')).toBe(2);
      expect(await firstByte(m, 'b')).toBe(2);
      // info snapshots does not show it as a VM snapshot
      const report = await withBql((bql) => listVmSnapshots(bql, m));
      expect(report.complete).toEqual([]);
      expect(report.partial.map((p) => p.disk).sort()).toEqual(['a', 'b']);
    } finally {
      await withBql((bql) => m.shutdown(bql));
    }
  });

  it('refuses a tag that two complete savevms share, and loads the one savevm when the other is a leftover on one disk', async () => {
    const m = await machine(['driver=memory,size=1M,id=a', 'driver=memory,size=1M,id=b']);
    try {
      await fill(m, 'a', 3);
      await fill(m, 'b', 3);
      await withBql((bql) => saveVm(bql, m, 'x'));
      // a leftover of another savevm with the same tag on disk b only: the tag still names one savevm
      await handMade(m, 'b', { name: 'x' });
      await fill(m, 'a', 4);
      await fill(m, 'b', 4);
      await withBql((bql) => loadVm(bql, m, 'x'));
      expect(await firstByte(m, 'a')).toBe(3);
      expect(await firstByte(m, 'b')).toBe(3);
      // the same identity on every disk twice over: two savevms share the tag
      await handMade(m, 'a', { name: 'x', vmStateSize: 0 });
      const e = await caught(withBql((bql) => loadVm(bql, m, 'x')));
      expect(String(e)).toMatch(/Snapshot 'x' is ambiguous: 2 savevms made it on every disk/);
    } finally {
      await withBql((bql) => m.shutdown(bql));
    }
  });

  it('every disk entry of one savevm carries the same date and VM clock, unlike every older snapshot of the tag', async () => {
    const m = await machine(['driver=memory,size=1M,id=a', 'driver=memory,size=1M,id=b', 'driver=memory,size=1M,id=c']);
    try {
      const seen: string[] = [];
      for (let i = 0; i < 5; i++) {
        await withBql((bql) => saveVm(bql, m, 'same'));
        const per = await withBql(async (bql) => Promise.all(m.disks.map(async (d) => (await bdrvSnapshotList(bql, d.node)).filter((s) => s.name === 'same'))));
        for (const l of per) expect(l).toHaveLength(1);
        const ids = per.map((l) => `${l[0]?.dateSec}.${l[0]?.dateNsec}/${l[0]?.vmClockNsec}`);
        expect(new Set(ids).size).toBe(1);
        expect(seen).not.toContain(ids[0]);
        seen.push(ids[0] ?? '');
      }
    } finally {
      await withBql((bql) => m.shutdown(bql));
    }
  });
});

describe('loadvm and the VM-state disk', () => {
  it("honours savevm's vmstate choice: loads from the disk that holds the state, or the one named", async () => {
    const m = await machine(['driver=memory,size=1M,id=a', 'driver=memory,size=1M,id=b']);
    try {
      await fill(m, 'a', 5);
      const saved = await withBql((bql) => saveVm(bql, m, 'v', { vmstate: 'b' }));
      expect(saved.vmstateDisk).toBe('b');
      await fill(m, 'a', 6);
      expect((await withBql((bql) => loadVm(bql, m, 'v'))).vmstateDisk).toBe('b');
      expect(await firstByte(m, 'a')).toBe(5);
      expect((await withBql((bql) => loadVm(bql, m, 'v', { vmstate: 'b' }))).vmstateDisk).toBe('b');
      const e = await caught(withBql((bql) => loadVm(bql, m, 'v', { vmstate: 'a' })));
      expect(String(e)).toMatch(/This is a disk-only snapshot. Revert to it {2}offline using qemu-img/);
      const none = await caught(withBql((bql) => loadVm(bql, m, 'v', { vmstate: 'nosuch' })));
      expect(String(none)).toMatch(/vmstate block device 'nosuch' does not exist/);
    } finally {
      await withBql((bql) => m.shutdown(bql));
    }
  });

  it('refuses a vm-state-size beyond what this machine can hold before allocating anything, with a typed error naming the field', async () => {
    const m = await machine(['driver=memory,size=1M,id=a']);
    try {
      for (const size of [2 ** 53 - 1, 2 ** 40, m.vmStateLimitBytes + 1, 3]) {
        await handMade(m, 'a', { name: `big${size}`, vmStateSize: size, dateNsec: size % 1e9 });
        const e = await caught(withBql((bql) => loadVm(bql, m, `big${size}`)));
        expect(isBlockError(e, 'EINVAL'), String(e)).toBe(true);
        expect(isBlockError(e) ? e.field : '').toBe('vm_state_size');
        expect(String(e)).toMatch(new RegExp(`records a VM state of ${size} bytes \\(vm_state_size\\); a VM state of this machine takes \\d+ to ${m.vmStateLimitBytes} bytes`));
      }
      expect(m.runState).toBe('running');
    } finally {
      await withBql((bql) => m.shutdown(bql));
    }
  });
});

describeInterop('a vm-state-size taken from a qcow2 image', () => {
  it('a snapshot table entry patched to a 1 TiB VM state is refused by loadvm with a typed error; the image stays clean', async () => {
    const f = path.join(dir, 'huge-vmstate.qcow2');
    withBqlSync((bql) => createQcow2File(bql, f, { sizeBytes: 4 * MiB }));
    const m = await machine([`file=${f},format=qcow2,id=a`]);
    await withBql((bql) => saveVm(bql, m, 'h'));
    await withBql((bql) => m.shutdown(bql));
    // patch the entry's 64-bit vm_state_size (extra data +0) and the 32-bit one to 0
    const fd = fs.openSync(f, 'r+');
    const hdr = Buffer.alloc(72);
    fs.readSync(fd, hdr, 0, 72, 0);
    const table = Number(hdr.readBigUInt64BE(64));
    const entry = Buffer.alloc(48);
    fs.readSync(fd, entry, 0, 48, table);
    expect(entry.readUInt32BE(36)).toBeGreaterThanOrEqual(8); // extra data holds vm_state_size_large
    entry.writeUInt32BE(0, 32);
    entry.writeBigUInt64BE(2n ** 40n, 40);
    fs.writeSync(fd, entry, 0, 48, table);
    fs.closeSync(fd);
    const info = JSON.parse(qemuStatus('qemu-img', ['info', '--output=json', f]).stdout) as { snapshots: Array<{ 'vm-state-size': number }> };
    expect(info.snapshots[0]?.['vm-state-size']).toBe(2 ** 40);
    const m2 = await machine([`file=${f},format=qcow2,id=a`]);
    try {
      const e = await caught(withBql((bql) => loadVm(bql, m2, 'h')));
      expect(isBlockError(e, 'EINVAL'), String(e)).toBe(true);
      expect(String(e)).toMatch(/snapshot ID 1 on 'a' records a VM state of 1099511627776 bytes \(vm_state_size\)/);
      expect(String(e)).not.toMatch(/RangeError|Invalid typed array length/);
    } finally {
      await withBql((bql) => m2.shutdown(bql));
    }
    const chk = qemuStatus('qemu-img', ['check', f]);
    expect(chk.status, chk.stdout + chk.stderr).toBe(0);
  });
});

describe('failures of the group create and of the older snapshot of a tag', () => {
  const raw = (tag: string, id: string): string => `driver=raw,file.driver=faulty,file.tag=${tag},file.file.driver=memory,file.file.size=1M,id=${id}`;

  it('an undo that fails inside the group create is reported with the snapshot it leaves, not swallowed', async () => {
    const m = await machine([raw('gc-a', 'a'), raw('gc-b', 'b')]);
    const a = faultSwitch('gc-a');
    const b = faultSwitch('gc-b');
    try {
      await withBql((bql) =>
        withDrainedAll(bql, async (drained) => {
          planFaults(a, [1]); // a: the create passes, the undo (delete) fails
          planFaults(b, [0]); // b: the create fails
          const disks = m.disks.map((d) => ({ name: d.id, node: d.node, readOnly: false }));
          const e = await caught(bdrvAllCreateSnapshot(bql, drained, disks, { id: '', name: 'g', vmStateSize: 0, dateSec: 1, dateNsec: 2, vmClockNsec: 3, icount: -1 }, null));
          planFaults(a, null);
          planFaults(b, null);
          expect(e).toBeInstanceOf(GroupCreateError);
          const ge = e as GroupCreateError;
          expect(ge.failedDisk).toBe('b');
          expect(ge.leftovers.map((l) => [l.disk, l.snapshot.name])).toEqual([['a', 'g']]);
          expect(ge.message).toMatch(/Could not create snapshot 'g' on 'b': .*; removing it again failed on 'a' \(ID 1: .*injected snapshot-delete failure.*\), so it is still there/);
        }),
      );
    } finally {
      await withBql((bql) => m.shutdown(bql));
    }
  });

  it('loadvm puts back every disk it can even after one fails, keeps every undo snapshot, stays paused, and says where each disk is', async () => {
    const m = await machine([raw('pb-a', 'a'), raw('pb-b', 'b'), raw('pb-c', 'c')]);
    const a = faultSwitch('pb-a');
    const b = faultSwitch('pb-b');
    try {
      for (const id of ['a', 'b', 'c']) await fill(m, id, 1);
      await withBql((bql) => saveVm(bql, m, 'p'));
      for (const id of ['a', 'b', 'c']) await fill(m, id, 2);
      // a: undo (write 0) and goto (1) pass, then a dies, so it cannot be put back;
      // b: undo passes, its goto fails once, putting it back works
      planFaults(a, Array.from({ length: 50 }, (_, i) => i + 2));
      planFaults(b, [1]);
      const e = await caught(withBql((bql) => loadVm(bql, m, 'p')));
      planFaults(a, null);
      planFaults(b, null);
      expect(e).toBeInstanceOf(VmSnapshotError);
      const ve = e as VmSnapshotError;
      expect(Object.fromEntries(ve.detail.disks)).toEqual({ a: 'unknown', b: 'put back', c: 'unchanged' });
      expect(ve.detail.undoKept.map((u) => u.disk)).toEqual(['a', 'b', 'c']);
      expect(ve.detail.pending).toBe(true);
      expect(ve.message).toMatch(/Could not load snapshot 'p' on 'b': .*putting the disks back failed on 'a': .*Now 'a' may be at snapshot 'p' or partly reverted, 'b' is put back, 'c' is unchanged; the state from before loadvm is kept in the undo snapshots 'snapstack-loadvm-undo-\S+' \(ID 2\) on 'a', .* on 'b', .* on 'c'; the machine stays paused/);
      expect(await firstByte(m, 'b')).toBe(2);
      expect(await firstByte(m, 'c')).toBe(2);
      expect(m.runState).toBe('paused');
      expect(() => withBqlSync((bql) => m.cont(bql))).toThrow(/the machine stays paused: loadvm 'p' did not finish/);
      // the next operation puts 'a' back first and deletes the undo snapshots
      expect(await withBql((bql) => delVm(bql, m, 'nosuch'))).toEqual([]);
      for (const id of ['a', 'b', 'c']) expect(await firstByte(m, id)).toBe(2);
      const left = await withBql(async (bql) => Promise.all(m.disks.map(async (d) => (await bdrvSnapshotList(bql, d.node)).map((s) => s.name))));
      expect(left).toEqual([['p'], ['p'], ['p']]);
      withBqlSync((bql) => m.cont(bql));
      expect(m.runState).toBe('running');
    } finally {
      await withBql((bql) => m.shutdown(bql));
    }
  });

  it('savevm whose leftover cannot be removed says so, and the next operation removes it', async () => {
    const m = await machine([raw('sl-a', 'a'), raw('sl-b', 'b')]);
    const a = faultSwitch('sl-a');
    const b = faultSwitch('sl-b');
    try {
      // a: vmstate save (two 1 MiB chunks: 1 MiB of RAM and the header) and create pass, every
      // later write fails; b: its create fails
      planFaults(a, Array.from({ length: 50 }, (_, i) => i + 3));
      planFaults(b, [0]);
      const e = await caught(withBql((bql) => saveVm(bql, m, 'l')));
      planFaults(a, null);
      planFaults(b, null);
      expect(e).toBeInstanceOf(VmSnapshotError);
      const ve = e as VmSnapshotError;
      expect(ve.detail.committed).toBe(false);
      expect(ve.detail.pending).toBe(true);
      expect(ve.detail.leftovers.map((l) => l.disk)).toEqual(['a']);
      expect(ve.message).toMatch(/the new snapshot remains on 'l' \(ID 1\) on 'a' and is removed by the next savevm, loadvm, delvm or start/);
      // the next operation (here a delvm of another tag) first removes the leftover
      expect(await withBql((bql) => delVm(bql, m, 'other'))).toEqual([]);
      const report = await withBql((bql) => listVmSnapshots(bql, m));
      expect(report.complete).toEqual([]);
      expect(report.partial).toEqual([]);
    } finally {
      await withBql((bql) => m.shutdown(bql));
    }
  });

  it('savevm does not report success while a disk keeps the older snapshot of the tag; loadvm then loads the new one', async () => {
    const m = await machine([raw('od-a', 'a'), raw('od-b', 'b')]);
    const b = faultSwitch('od-b');
    try {
      await fill(m, 'a', 7);
      await fill(m, 'b', 7);
      await withBql((bql) => saveVm(bql, m, 'o'));
      await fill(m, 'a', 8);
      await fill(m, 'b', 8);
      // b: the create passes (write 0), deleting the older snapshot fails for good
      planFaults(b, Array.from({ length: 50 }, (_, i) => i + 1));
      const e = await caught(withBql((bql) => saveVm(bql, m, 'o')));
      planFaults(b, null);
      expect(e).toBeInstanceOf(VmSnapshotError);
      const ve = e as VmSnapshotError;
      expect(ve.detail.committed).toBe(true);
      expect(ve.message).toMatch(/savevm 'o' saved the VM and every disk, but older snapshots of the tag could not be deleted: 'o' \(ID 1\) on 'b'/);
      expect(m.runState).toBe('running');
      await fill(m, 'a', 9);
      await fill(m, 'b', 9);
      await withBql((bql) => loadVm(bql, m, 'o'));
      expect(await firstByte(m, 'a')).toBe(8);
      expect(await firstByte(m, 'b')).toBe(8);
      const per = await withBql(async (bql) => Promise.all(m.disks.map(async (d) => (await bdrvSnapshotList(bql, d.node)).filter((s) => s.name === 'o').length)));
      expect(per).toEqual([1, 1]); // the next operation deleted the older one
    } finally {
      await withBql((bql) => m.shutdown(bql));
    }
  });
});

describe('the intent record', () => {
  it('a damaged record refuses the next operation with a typed error naming the file, and nothing is changed', async () => {
    const { IntentStore, parseIntent } = await import('../src/machine/vm-intent.js');
    const f = path.join(dir, 'bad.snapstack-vm.json');
    for (const text of ['{', '[]', '{"op":"format","phase":"started","tag":"t","disks":[]}', '{"op":"savevm","phase":"started","tag":"t","disks":["a"]}', '{"op":"loadvm","phase":"cleanup","tag":"t","disks":["a"],"undoName":""}']) {
      expect(() => parseIntent(text, f)).toThrow(/VM snapshot intent record '.*bad\.snapstack-vm\.json': .*remove the file/);
    }
    fs.writeFileSync(f, Buffer.alloc(100 * 1024, 0x20));
    expect(() => new IntentStore(f).load()).toThrow(/102400 bytes, a record is at most 65536/);
    const ok = { op: 'delvm' as const, phase: 'cleanup' as const, tag: 't', disks: ['a'] };
    const store = new IntentStore(f);
    store.write(ok);
    expect(new IntentStore(f).load()).toEqual(ok);
    store.clear();
    expect(new IntentStore(f).load()).toBeNull();
  });
});

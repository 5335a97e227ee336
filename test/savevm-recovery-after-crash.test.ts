/**
 * The start-up recovery of an interrupted loadvm or delvm must not destroy what other programs did
 * to the images after the crash (the image locks died with the process), as a new user found:
 * - an interrupted loadvm is rolled back, but the disks' state found at start-up (here: a write made
 *   by another program after the crash) is kept first, as a disk-only snapshot on every disk;
 * - an interrupted delvm finishes by deleting the snapshots it meant (by savevm identity), never a
 *   snapshot of the same name made after the crash.
 * The crash is staged: the intent record the operation would have left is written beside the
 * first disk, as the process would have written it, and the image is changed with the library.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { bdrvSnapshotList, shutdownIOThreads, withBql, withBqlSync } from '../src/index.js';
import { createQcow2File } from '../src/drivers/qcow2/create.js';
import { Machine } from '../src/machine/machine.js';
import { FOUND_PREFIX, saveVm, UNDO_PREFIX } from '../src/machine/savevm.js';
import { INTENT_SUFFIX } from '../src/machine/vm-intent.js';
import { openImage } from '../src/image.js';

let dir = '';
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-recovery-'));
});
afterAll(async () => {
  if (dir !== '') fs.rmSync(dir, { recursive: true, force: true });
  await withBql((bql) => shutdownIOThreads(bql));
});

const KiB = 1024;
const SIZE = 4096 * KiB;

function images(name: string): string[] {
  return ['a', 'b'].map((d) => {
    const f = path.join(dir, `${name}-${d}.qcow2`);
    withBqlSync((bql) => createQcow2File(bql, f, { sizeBytes: SIZE }));
    return f;
  });
}

async function machine(files: string[]): Promise<{ m: Machine; report: string[] }> {
  const m = new Machine({ guest: false, vcpus: 1, ramBytes: 1024 * KiB });
  const report = await withBql(async (bql) => {
    for (const [i, f] of files.entries()) await m.addDrive(bql, `file=${f},format=qcow2,id=${i === 0 ? 'a' : 'b'}`);
    await m.start(bql);
    await m.stop(bql);
    return m.takeRecoveryReport(bql);
  });
  return { m, report };
}

async function names(m: Machine): Promise<string[][]> {
  return withBql((bql) => Promise.all(m.disks.map(async (d) => (await bdrvSnapshotList(bql, d.node)).map((s) => s.name))));
}

async function writeWith(file: string, off: number, byte: number): Promise<void> {
  const img = await openImage(file, { format: 'qcow2' });
  try {
    await img.write(off, new Uint8Array(64 * KiB).fill(byte));
  } finally {
    await img.close();
  }
}

async function byteAt(file: string, off: number): Promise<number> {
  const img = await openImage(file, { format: 'qcow2', readOnly: true });
  try {
    return (await img.read(off, 1))[0] ?? -1;
  } finally {
    await img.close();
  }
}

describe('recovery at start-up after a crash, when other programs changed the images meanwhile', () => {
  it('an interrupted loadvm goes back to its undo snapshot but first keeps the state it found, with the write made after the crash', async () => {
    const files = images('loadvm');
    const undo = `${UNDO_PREFIX}1-1`;
    {
      const { m } = await machine(files);
      await withBql((bql) => saveVm(bql, m, 's1'));
      await withBql((bql) => m.shutdown(bql));
    }
    // loadvm 's1' crashed after taking its undo snapshots: stage them and its record
    for (const f of files) {
      const img = await openImage(f, { format: 'qcow2' });
      await img.createSnapshot(undo);
      await img.close();
    }
    fs.writeFileSync(`${files[0]}${INTENT_SUFFIX}`, `${JSON.stringify({ op: 'loadvm', phase: 'started', tag: 's1', undoName: undo, disks: ['a', 'b'] })}\n`);
    // after the crash another program writes to disk a
    await writeWith(files[0] as string, 1024 * KiB, 0xee);
    const { m, report } = await machine(files);
    try {
      expect(report.join(' ')).toMatch(/loadvm 's1' was interrupted: every disk is back at its state from before it.*kept as snapshot 'snapstack-found-/);
      const lists = await names(m);
      for (const l of lists) {
        expect(l.some((n) => n.startsWith(UNDO_PREFIX))).toBe(false);
        expect(l.filter((n) => n.startsWith(FOUND_PREFIX))).toHaveLength(1);
      }
    } finally {
      await withBql((bql) => m.shutdown(bql));
    }
    // the write made after the crash is in the kept snapshot, not lost
    const found = (await names2(files[0] as string)).find((n) => n.startsWith(FOUND_PREFIX));
    expect(found).toBeDefined();
    const img = await openImage(files[0] as string, { format: 'qcow2', readOnly: true });
    try {
      await img.loadSnapshotTemporarily(found as string);
      expect((await img.read(1024 * KiB, 1))[0]).toBe(0xee);
    } finally {
      await img.close();
    }
    expect(fs.existsSync(`${files[0]}${INTENT_SUFFIX}`)).toBe(false);
  });

  it('an interrupted delvm deletes only the snapshots it meant, not one of the same name made after the crash', async () => {
    const files = images('delvm');
    let identity: { dateSec: number; dateNsec: number; vmClockNsec: number } | null = null;
    {
      const { m } = await machine(files);
      await withBql((bql) => saveVm(bql, m, 's2'));
      const disk = m.disks[0];
      if (disk === undefined) throw new Error('no disk');
      const sn = await withBql(async (bql) => (await bdrvSnapshotList(bql, disk.node)).find((s) => s.name === 's2'));
      if (sn === undefined) throw new Error('no s2');
      identity = { dateSec: sn.dateSec, dateNsec: sn.dateNsec, vmClockNsec: sn.vmClockNsec };
      await withBql((bql) => m.shutdown(bql));
    }
    // delvm 's2' crashed after its record, having deleted s2 on disk b only
    fs.writeFileSync(`${files[0]}${INTENT_SUFFIX}`, `${JSON.stringify({ op: 'delvm', phase: 'cleanup', tag: 's2', disks: ['a', 'b'], identities: [identity, identity] })}\n`);
    {
      const img = await openImage(files[1] as string, { format: 'qcow2' });
      await img.deleteSnapshot('s2');
      await img.close();
    }
    // after the crash another program replaces s2 on disk a by a snapshot of its own
    {
      const img = await openImage(files[0] as string, { format: 'qcow2' });
      await img.deleteSnapshot('s2');
      await img.write(0, new Uint8Array(4096).fill(0x42));
      await img.createSnapshot('s2', { dateSec: 1_700_000_123, dateNsec: 0 });
      await img.close();
    }
    const { m, report } = await machine(files);
    try {
      expect(report.join(' ')).toMatch(/delvm 's2' was finished: 0 snapshot\(s\) deleted/);
      expect(await names(m)).toEqual([['s2'], []]);
    } finally {
      await withBql((bql) => m.shutdown(bql));
    }
    expect(await byteAt(files[0] as string, 0)).toBe(0x42);
  });
});

async function names2(file: string): Promise<string[]> {
  const img = await openImage(file, { format: 'qcow2', readOnly: true });
  try {
    return (await img.snapshots()).map((s) => s.name);
  } finally {
    await img.close();
  }
}

/**
 * qcow2 interop against Debian's qemu-img / qemu-io 7.2, with a reference model (one byte array
 * per state) as the oracle: images we write must check clean and convert (per snapshot) to the
 * model in qemu-img; images qemu writes (plain, compressed, zeroed, snapshotted) must read the
 * same in snapstack, and our goto/delete on them must keep qemu-img check clean.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import fc from 'fast-check';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { openImage, shutdownIOThreads, type Image, withBql, withBqlSync } from '../src/index.js';
import { createQcow2File } from '../src/drivers/qcow2/create.js';
import { describeInterop, qemu, qemuStatus } from './helpers/qemu.js';

let dir: string;
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-interop-qcow2-'));
});
afterAll(async () => {
  fs.rmSync(dir, { recursive: true, force: true });
  await withBql((bql) => shutdownIOThreads(bql));
});

const MiB = 1024 * 1024;

/** qemu-img check must report a clean image (exit 0); the output is shown otherwise. */
function expectCheckClean(file: string): void {
  const r = qemuStatus('qemu-img', ['check', file]);
  expect(`${r.stdout}${r.stderr}`.trim() + `\nexit ${r.status}`).toMatch(/No errors were found on the image\.[\s\S]*exit 0$/);
}

/** Snapshot names as qemu-img lists them (JSON). */
function qemuSnapshotNames(file: string): string[] {
  const info = JSON.parse(qemu('qemu-img', ['info', '--output=json', '-U', file])) as { snapshots?: Array<{ name: string }> };
  return (info.snapshots ?? []).map((s) => s.name);
}

/** The guest contents qemu-img sees: the active state, or a snapshot's. */
function qemuContents(file: string, snapshot?: string): Buffer {
  const out = path.join(dir, `convert-${process.pid}-${Math.random().toString(36).slice(2)}.raw`);
  const args = ['convert', '-O', 'raw', ...(snapshot === undefined ? [] : ['-l', `snapshot.name=${snapshot}`]), file, out];
  qemu('qemu-img', args);
  try {
    return fs.readFileSync(out);
  } finally {
    fs.rmSync(out, { force: true });
  }
}

function firstDifference(a: Uint8Array, b: Uint8Array): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return a.length === b.length ? -1 : n;
}

function expectSameBytes(actual: Uint8Array, expected: Uint8Array, what: string): void {
  const d = firstDifference(actual, expected);
  expect(d, `${what}: first difference at byte ${d}`).toBe(-1);
}

async function readAll(img: Image): Promise<Uint8Array> {
  return img.read(0, img.size);
}

/** Deterministic pseudo-random bytes for a write (seeded). */
function pattern(seed: number, length: number): Uint8Array {
  const out = new Uint8Array(length);
  let x = seed * 2654435761 + 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}

interface WriteOp {
  offset: number;
  length: number;
  seed: number;
}

const OPTION_SPACE: Array<{ label: string; opts: string[]; clusterSize: number; refcountBits: number; compat: '0.10' | '1.1' }> = [
  { label: '64k clusters, 16-bit refcounts, v3', opts: [], clusterSize: 65536, refcountBits: 16, compat: '1.1' },
  { label: '512-byte clusters, 4-bit refcounts', opts: ['-o', 'cluster_size=512,refcount_bits=4'], clusterSize: 512, refcountBits: 4, compat: '1.1' },
  { label: '4k clusters, 8-bit refcounts', opts: ['-o', 'cluster_size=4096,refcount_bits=8'], clusterSize: 4096, refcountBits: 8, compat: '1.1' },
  { label: '2M clusters, 64-bit refcounts', opts: ['-o', 'cluster_size=2M,refcount_bits=64'], clusterSize: 2 * MiB, refcountBits: 64, compat: '1.1' },
  { label: 'v2 (compat=0.10)', opts: ['-o', 'compat=0.10'], clusterSize: 65536, refcountBits: 16, compat: '0.10' },
];

describeInterop('qcow2 images snapstack writes, checked by qemu-img', () => {
  for (const variant of OPTION_SPACE) {
    it(`${variant.label}: check clean, same snapshots, every snapshot converts to the model`, async () => {
      const size = 8 * MiB;
      const f = path.join(dir, `ours-${variant.clusterSize}-${variant.refcountBits}-${variant.compat}.qcow2`);
      withBqlSync((bql) => createQcow2File(bql, f, { sizeBytes: size, clusterSize: variant.clusterSize, refcountBits: variant.refcountBits, compat: variant.compat }));
      expectCheckClean(f);
      const ops = fc.sample(
        fc.record({ offset: fc.integer({ min: 0, max: size - 1 }), length: fc.integer({ min: 1, max: 200_000 }), seed: fc.integer({ min: 1, max: 1 << 30 }) }),
        { numRuns: 24, seed: variant.clusterSize + variant.refcountBits },
      );
      const model = new Uint8Array(size);
      const snapshots = new Map<string, Uint8Array>();
      const img = await openImage(f, { format: 'qcow2' });
      try {
        for (const [i, op] of ops.entries()) {
          const length = Math.min(op.length, size - op.offset);
          const data = pattern(op.seed, length);
          await img.write(op.offset, data);
          model.set(data, op.offset);
          if (i % 8 === 7) {
            const name = `s${i}`;
            await img.createSnapshot(name);
            snapshots.set(name, model.slice());
          }
        }
        await img.writeZeroes(3 * MiB, 2 * MiB);
        model.fill(0, 3 * MiB, 5 * MiB);
        expectSameBytes(await readAll(img), model, 'snapstack read-back');
      } finally {
        await img.close();
      }
      expectCheckClean(f);
      expect(qemuSnapshotNames(f)).toEqual([...snapshots.keys()]);
      expectSameBytes(qemuContents(f), model, 'qemu-img convert of the active state');
      for (const [name, bytes] of snapshots) expectSameBytes(qemuContents(f, name), bytes, `qemu-img convert -l snapshot.name=${name}`);
      const info = JSON.parse(qemu('qemu-img', ['info', '--output=json', f])) as { 'virtual-size': number; 'cluster-size': number };
      expect(info['virtual-size']).toBe(size);
      expect(info['cluster-size']).toBe(variant.clusterSize);
    });
  }

  it('1-bit refcounts cannot count a snapshot: create is refused with a clear error and the image stays clean', async () => {
    const f = path.join(dir, 'one-bit.qcow2');
    withBqlSync((bql) => createQcow2File(bql, f, { sizeBytes: 2 * MiB, clusterSize: 512, refcountBits: 1 }));
    const img = await openImage(f, { format: 'qcow2' });
    const data = pattern(3, 100_000);
    try {
      await img.write(4096, data);
      await expect(img.createSnapshot('too-many')).rejects.toMatchObject({ code: 'EFBIG', message: expect.stringMatching(/overflow 1-bit refcounts/) });
      expect(await img.snapshots()).toEqual([]);
      expectSameBytes(await img.read(4096, data.length), data, 'data after the refused snapshot');
    } finally {
      await img.close();
    }
    expectCheckClean(f);
    expect(qemuSnapshotNames(f)).toEqual([]);
  });

  it('goto and delete: qemu-img sees the reverted state and the remaining snapshots; check stays clean', async () => {
    const size = 4 * MiB;
    const f = path.join(dir, 'goto-delete.qcow2');
    withBqlSync((bql) => createQcow2File(bql, f, { sizeBytes: size }));
    const img = await openImage(f, { format: 'qcow2' });
    const a = pattern(1, size);
    const b = pattern(2, size / 2);
    try {
      await img.write(0, a);
      await img.createSnapshot('a');
      await img.write(size / 4, b);
      await img.createSnapshot('b');
      await img.write(0, new Uint8Array(65536).fill(9));
      await img.gotoSnapshot('a');
      expectSameBytes(await readAll(img), a, 'after goto a');
      await img.deleteSnapshot('a');
      expect((await img.snapshots()).map((s) => s.name)).toEqual(['b']);
    } finally {
      await img.close();
    }
    expectCheckClean(f);
    expectSameBytes(qemuContents(f), a, 'qemu-img: active state after goto a');
    expect(qemuSnapshotNames(f)).toEqual(['b']);
    const expectedB = a.slice();
    expectedB.set(b, size / 4);
    expectSameBytes(qemuContents(f, 'b'), expectedB, 'qemu-img: snapshot b');
  });

  it('VM state saved into a snapshot is where qemu-img counts it (vm-state-size) and reads back', async () => {
    const f = path.join(dir, 'vmstate.qcow2');
    withBqlSync((bql) => createQcow2File(bql, f, { sizeBytes: 4 * MiB }));
    const img = await openImage(f, { format: 'qcow2' });
    const state = pattern(7, 300_000);
    try {
      const root = img.backend.root;
      expect(root).not.toBeNull();
      const inst = root?.instance;
      if (inst?.saveVmstate === undefined || inst.loadVmstate === undefined) throw new Error('qcow2 must save VM state');
      await inst.saveVmstate(state, 0);
      await img.createSnapshot('with-state', { vmStateSize: state.length });
      const back = new Uint8Array(state.length);
      await img.gotoSnapshot('with-state');
      await inst.loadVmstate(back, 0);
      expectSameBytes(back, state, 'VM state after goto');
    } finally {
      await img.close();
    }
    expectCheckClean(f);
    const info = JSON.parse(qemu('qemu-img', ['info', '--output=json', f])) as { snapshots: Array<{ name: string; 'vm-state-size': number }> };
    expect(info.snapshots[0]?.['vm-state-size']).toBe(state.length);
  });
});

describeInterop('qcow2 images qemu-img and qemu-io write, read and changed by snapstack', () => {
  const variants = [
    { label: 'default v3', create: [] as string[] },
    { label: '512-byte clusters, refcount_bits=8', create: ['-o', 'cluster_size=512,refcount_bits=8'] },
    { label: '1M clusters, lazy refcounts', create: ['-o', 'cluster_size=1M,lazy_refcounts=on'] },
    { label: 'compat=0.10', create: ['-o', 'compat=0.10'] },
  ];
  for (const v of variants) {
    it(`${v.label}: same bytes (plain, compressed, zeroed), same snapshots; goto and delete keep check clean`, async () => {
      const f = path.join(dir, `theirs-${v.label.replace(/[^a-z0-9]/gi, '_')}.qcow2`);
      qemu('qemu-img', ['create', '-q', '-f', 'qcow2', ...v.create, f, '16M']);
      qemu('qemu-io', ['-c', 'write -P 0x11 0 1M', '-c', 'write -P 0x22 5M 300k', '-c', 'write -c -P 0x33 8M 1M', f]);
      qemu('qemu-img', ['snapshot', '-c', 'first', f]);
      const first = qemuContents(f);
      qemu('qemu-io', ['-c', 'write -P 0x44 512k 1M', '-c', 'write -z 5M 64k', '-c', 'write -P 0x55 15M 1M', f]);
      qemu('qemu-img', ['snapshot', '-c', 'second', f]);
      const second = qemuContents(f);
      qemu('qemu-io', ['-c', 'write -P 0x66 0 4k', '-c', 'discard 8M 1M', f]);
      const active = qemuContents(f);

      let img = await openImage(f, { readOnly: true });
      try {
        expect(img.backend.root?.driver.formatName).toBe('qcow2');
        expectSameBytes(await readAll(img), active, 'active state');
        expect((await img.snapshots()).map((s) => [s.id, s.name])).toEqual([
          ['1', 'first'],
          ['2', 'second'],
        ]);
      } finally {
        await img.close();
      }
      for (const [name, bytes] of [
        ['first', first],
        ['second', second],
      ] as const) {
        const ro = await openImage(f, { readOnly: true });
        try {
          await ro.loadSnapshotTemporarily(name);
          expectSameBytes(await readAll(ro), bytes, `snapshot ${name} loaded temporarily`);
        } finally {
          await ro.close();
        }
      }
      img = await openImage(f);
      try {
        await img.gotoSnapshot('first');
        expectSameBytes(await readAll(img), first, 'after goto first');
      } finally {
        await img.close();
      }
      expectCheckClean(f);
      expectSameBytes(qemuContents(f), first, 'qemu-img after our goto');
      img = await openImage(f);
      try {
        await img.deleteSnapshot('first');
        await img.write(8 * MiB + 4096, pattern(9, 70_000)); // rewrite inside a compressed cluster
      } finally {
        await img.close();
      }
      expectCheckClean(f);
      expect(qemuSnapshotNames(f)).toEqual(['second']);
      const expected = first.slice();
      expected.set(pattern(9, 70_000), 8 * MiB + 4096);
      expectSameBytes(qemuContents(f), expected, 'qemu-img after our delete and write over compressed data');
      expectSameBytes(qemuContents(f, 'second'), second, 'qemu-img: snapshot second untouched');
    });
  }
});

describeInterop('check and repair against qemu-img check', () => {
  /** An image qemu-io left dirty: lazy refcounts, then `abort` before the refcounts were written. */
  function lazyCrashedImage(name: string): string {
    const f = path.join(dir, name);
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on', f, '16M']);
    qemuStatus('qemu-io', ['-c', 'write -P 7 0 1M', '-c', 'write -P 8 4M 64k', '-c', 'abort', f]);
    return f;
  }

  function ours(args: string[]): { status: number; stdout: string; stderr: string } {
    const r = spawnSync(process.execPath, [path.resolve('bin/snapstack.js'), ...args], { encoding: 'utf8' });
    return { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr.replace(/^snapstack img: /gm, '') };
  }

  it('reports what qemu-img check reports on a dirty image, with the same exit code (2)', () => {
    const f = lazyCrashedImage('lazy-crashed.qcow2');
    const theirs = qemuStatus('qemu-img', ['check', f]);
    const mine = ours(['img', 'check', f]);
    expect(theirs.status).toBe(2);
    expect(mine.status).toBe(theirs.status);
    expect(mine.stdout).toBe(theirs.stdout);
    expect(mine.stderr).toBe(theirs.stderr);
    const json = JSON.parse(ours(['img', 'check', '--output=json', f]).stdout) as Record<string, number>;
    const theirJson = JSON.parse(qemuStatus('qemu-img', ['check', '--output=json', f]).stdout) as Record<string, number>;
    for (const k of ['corruptions', 'leaks', 'check-errors', 'total-clusters', 'allocated-clusters', 'image-end-offset']) expect(json[k], k).toBe(theirJson[k]);
  });

  it('check -r all repairs it so that qemu-img check is clean and the data is intact', () => {
    const f = lazyCrashedImage('lazy-repair.qcow2');
    const before = qemuContents(f);
    const r = ours(['img', 'check', '-r', 'all', f]);
    expect(r.stdout).toMatch(/The following inconsistencies were found and repaired:\n\n {4}0 leaked clusters\n {4}17 corruptions/);
    expect(r.stdout).toMatch(/Double checking the fixed image now\.\.\.\nNo errors were found on the image\./);
    expect(r.status).toBe(0);
    expectCheckClean(f);
    expect(fs.readFileSync(f).readBigUInt64BE(72) & 1n).toBe(0n); // dirty bit cleared
    expectSameBytes(qemuContents(f), before, 'data after repair');
  });

  it('opening the dirty image read/write repairs its refcounts first, as QEMU does', async () => {
    const f = lazyCrashedImage('lazy-open.qcow2');
    const before = qemuContents(f);
    const img = await openImage(f);
    try {
      await img.write(8 * MiB, new Uint8Array(65536).fill(4));
    } finally {
      await img.close();
    }
    expectCheckClean(f);
    before.fill(4, 8 * MiB, 8 * MiB + 65536);
    expectSameBytes(qemuContents(f), before, 'data after the repairing open and a write');
  });

  it('img map prints what qemu-img map prints (human and JSON)', () => {
    const f = path.join(dir, 'map.qcow2');
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', f, '16M']);
    qemu('qemu-io', ['-c', 'write -P 1 0 128k', '-c', 'write -P 2 1M 64k', '-c', 'write -z 2M 64k', '-c', 'write -P 3 4M 192k', '-c', 'write -P 4 3M 64k', f]);
    expect(ours(['img', 'map', f]).stdout).toBe(qemu('qemu-img', ['map', f]));
    expect(ours(['img', 'map', '--output=json', f]).stdout).toBe(qemu('qemu-img', ['map', '--output=json', f]));
  });

  it('finds leaks (exit 3) and repairs them with -r leaks', async () => {
    const f = path.join(dir, 'leaky.qcow2');
    withBqlSync((bql) => createQcow2File(bql, f, { sizeBytes: 4 * MiB }));
    // leak two clusters: raise their refcounts behind the image's back (refcount block at 2*64k)
    fs.truncateSync(f, 16 * 65536);
    const fd = fs.openSync(f, 'r+');
    fs.writeSync(fd, Buffer.from([0, 1, 0, 1]), 0, 4, 2 * 65536 + 2 * 10);
    fs.closeSync(fd);
    const theirs = qemuStatus('qemu-img', ['check', f]);
    const mine = ours(['img', 'check', f]);
    expect(mine.status).toBe(3);
    expect(mine.stdout).toBe(theirs.stdout);
    expect(mine.stderr).toBe(theirs.stderr);
    expect(ours(['img', 'check', '-r', 'leaks', f]).status).toBe(0);
    expectCheckClean(f);
  });
});

describeInterop('long alternating runs: qemu-io/qemu-img and snapstack on one image', () => {
  it('random writes and snapshot operations, tools alternating, checked against the model after every step', async () => {
    const size = 8 * MiB;
    const f = path.join(dir, 'alternating.qcow2');
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', f, String(size)]);
    const model = new Uint8Array(size);
    const snaps = new Map<string, Uint8Array>();
    const rnd = fc.sample(fc.tuple(fc.integer({ min: 0, max: 9 }), fc.integer({ min: 0, max: size / 512 - 1 }), fc.integer({ min: 1, max: 256 }), fc.integer({ min: 1, max: 255 })), {
      numRuns: 40,
      seed: 4242,
    });
    let n = 0;
    for (const [step, [kind, sector, sectors, byte]] of rnd.entries()) {
      const ours = step % 2 === 0;
      const offset = sector * 512;
      const length = Math.min(sectors * 512, size - offset);
      const names = [...snaps.keys()];
      const pick = names[byte % Math.max(1, names.length)];
      if (kind <= 5 || (kind >= 8 && pick === undefined)) {
        if (ours) {
          const img = await openImage(f, { format: 'qcow2' });
          try {
            await img.write(offset, new Uint8Array(length).fill(byte));
          } finally {
            await img.close();
          }
        } else qemu('qemu-io', ['-c', `write -P ${byte} ${offset} ${length}`, f]);
        model.fill(byte, offset, offset + length);
      } else if (kind <= 7) {
        const name = `t${n++}`;
        if (ours) {
          const img = await openImage(f, { format: 'qcow2' });
          try {
            await img.createSnapshot(name);
          } finally {
            await img.close();
          }
        } else qemu('qemu-img', ['snapshot', '-c', name, f]);
        snaps.set(name, model.slice());
      } else if (kind === 8 && pick !== undefined) {
        if (ours) {
          const img = await openImage(f, { format: 'qcow2' });
          try {
            await img.gotoSnapshot(pick);
          } finally {
            await img.close();
          }
        } else qemu('qemu-img', ['snapshot', '-a', pick, f]);
        model.set(snaps.get(pick) ?? model);
      } else if (pick !== undefined) {
        if (ours) {
          const img = await openImage(f, { format: 'qcow2' });
          try {
            await img.deleteSnapshot(pick);
          } finally {
            await img.close();
          }
        } else qemu('qemu-img', ['snapshot', '-d', pick, f]);
        snaps.delete(pick);
      }
      expectCheckClean(f);
      expect(qemuSnapshotNames(f)).toEqual([...snaps.keys()]);
      const ro = await openImage(f, { readOnly: true });
      try {
        expectSameBytes(await readAll(ro), model, `snapstack view after step ${step}`);
      } finally {
        await ro.close();
      }
    }
    expectSameBytes(qemuContents(f), model, 'qemu-img view at the end');
    for (const [name, bytes] of snaps) expectSameBytes(qemuContents(f, name), bytes, `snapshot ${name} at the end`);
  });
});

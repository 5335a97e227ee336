/**
 * The backing child in the block graph: the node options that choose it (`backing=null`,
 * `backing=NODE`, `backing.*`), the refusals that protect a backing image in use (no writes, no
 * snapshot changes), failed opens that leave no node behind, internal snapshots of an overlay, and
 * the live external snapshot (snapshot_blkdev) taken while a writer runs, checked by qemu-img.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { withBql, withBqlSync } from '../src/block/bql.js';
import { withDrained } from '../src/block/drain.js';
import { BlockError } from '../src/block/errors.js';
import { attachChild, closeNode, listNodes, openNode } from '../src/block/graph.js';
import { bdrvPread, bdrvPwrite } from '../src/block/io.js';
import { shutdownIOThreads } from '../src/block/iothread.js';
import { bdrvSnapshotCreate, bdrvSnapshotDelete, bdrvSnapshotGoto } from '../src/block/snapshot.js';
import { snapshotBlkdev } from '../src/commands/snapshot-blkdev.js';
import { changeBackingFile } from '../src/block/backing-change.js';
import { createQcow2File } from '../src/drivers/qcow2/create.js';
import { openImage } from '../src/image.js';
import { describeInterop, qemu, qemuStatus } from './helpers/qemu.js';
import { prng } from './helpers/prng.js';

let dir: string;
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-backing-graph-'));
});
afterAll(async () => {
  fs.rmSync(dir, { recursive: true, force: true });
  await withBql((bql) => shutdownIOThreads(bql));
});

const MiB = 1024 * 1024;

/** A base image holding 0x5a in its first MiB and an empty overlay over it (named relatively). */
async function baseAndOverlay(name: string): Promise<{ base: string; top: string }> {
  const base = path.join(dir, `${name}-base.qcow2`);
  const top = path.join(dir, `${name}-top.qcow2`);
  withBqlSync((bql) => createQcow2File(bql, base, { sizeBytes: 2 * MiB }));
  const b = await openImage(base, { aio: 'sync' });
  await b.write(0, new Uint8Array(MiB).fill(0x5a));
  await b.close();
  withBqlSync((bql) => createQcow2File(bql, top, { sizeBytes: 2 * MiB, backingFile: path.basename(base), backingFormat: 'qcow2' }));
  return { base, top };
}

async function expectCode(p: Promise<unknown>, code: string, msg: RegExp): Promise<void> {
  const e = await p.then(
    () => null,
    (err: unknown) => err,
  );
  expect(e).toBeInstanceOf(BlockError);
  expect((e as BlockError).code).toBe(code);
  expect((e as BlockError).message).toMatch(msg);
}

describe('the backing child of a format node', () => {
  it('opens the named backing file, or none with backing=null, or an open node with backing=NODE', async () => {
    const { base, top } = await baseAndOverlay('opts');
    const withChain = await openImage(top, { readOnly: true, aio: 'sync' });
    expect(Array.from((await withChain.read(0, 4)).values())).toEqual([0x5a, 0x5a, 0x5a, 0x5a]);
    expect(withChain.backend.root?.backing?.filename).toBe(base);
    expect(withChain.backend.root?.backing?.readOnly).toBe(true);
    await withChain.close();
    const alone = await openImage(top, { readOnly: true, aio: 'sync', noBacking: true });
    expect(Array.from((await alone.read(0, 4)).values())).toEqual([0, 0, 0, 0]);
    expect(alone.backend.root?.backing).toBeUndefined();
    await alone.close();
    await withBql(async (bql) => {
      const b = await openNode(bql, { driver: 'raw', 'file.driver': 'memory', 'file.size': String(2 * MiB), 'node-name': 'mem-base' });
      await bdrvPwrite(b, 0, new Uint8Array(512).fill(7));
      const t = await openNode(bql, { driver: 'qcow2', file: top, backing: 'mem-base', 'read-only': 'on' });
      const buf = new Uint8Array(512);
      await bdrvPread(t, 0, buf);
      expect(buf[0]).toBe(7);
      expect(t.backing).toBe(b);
      await closeNode(bql, t);
      expect(listNodes(bql).includes(b)).toBe(true); // a node linked by name stays open for its owner
      await closeNode(bql, b);
    });
  });

  it('refuses writes and snapshot changes on a backing node in use, and says why', async () => {
    const { top } = await baseAndOverlay('refuse');
    const img = await openImage(top, { aio: 'sync' });
    const base = img.backend.root?.backing;
    expect(base).toBeDefined();
    if (base === undefined) return;
    await expectCode(bdrvPwrite(base, 0, new Uint8Array(512)), 'EPERM', /read-only/);
    const info = { id: '', name: 's', vmStateSize: 0, dateSec: 0, dateNsec: 0, vmClockNsec: 0, icount: -1 };
    await withBql((bql) =>
      withDrained(bql, base, async (d) => {
        await expectCode(bdrvSnapshotCreate(bql, d, base, info), 'EACCES', /read only/);
        await expectCode(bdrvSnapshotGoto(bql, d, base, 's'), 'EACCES', /read only/);
        await expectCode(bdrvSnapshotDelete(bql, d, base, null, 's'), 'EACCES', /read only/);
      }),
    );
    await img.close();
    // opened writable as a backing file (as commit does), its snapshots still cannot change under the overlay
    const rw = await openImage(top, { aio: 'sync', nodeOptions: { 'backing.read-only': 'off' } });
    const wb = rw.backend.root?.backing;
    if (wb === undefined) throw new Error('no backing node');
    await withBql((bql) => withDrained(bql, wb, (d) => expectCode(bdrvSnapshotCreate(bql, d, wb, info), 'EBUSY', /backing file of/)));
    await rw.close();
  });

  it('a missing or looping backing file fails the open with the reason and leaves no node open', async () => {
    const missing = path.join(dir, 'missing-top.qcow2');
    withBqlSync((bql) => createQcow2File(bql, missing, { sizeBytes: MiB, backingFile: 'nowhere.qcow2', backingFormat: 'qcow2' }));
    // a loop of two images (an image naming itself is refused at create)
    const loop = path.join(dir, 'loop-a.qcow2');
    withBqlSync((bql) => createQcow2File(bql, loop, { sizeBytes: MiB, backingFile: 'loop-b.qcow2', backingFormat: 'qcow2' }));
    withBqlSync((bql) => createQcow2File(bql, path.join(dir, 'loop-b.qcow2'), { sizeBytes: MiB, backingFile: 'loop-a.qcow2', backingFormat: 'qcow2' }));
    const before = await withBql((bql) => listNodes(bql).length);
    await expectCode(openImage(missing, { aio: 'sync' }), 'ENOENT', /Could not open backing file: .*nowhere\.qcow2/);
    const e = await openImage(loop, { aio: 'sync' }).then(
      () => null,
      (err: unknown) => err,
    );
    expect(e).toBeInstanceOf(BlockError);
    expect((e as BlockError).message).toMatch(/Could not open backing file/);
    expect(await withBql((bql) => listNodes(bql).length)).toBe(before);
    // -U style: the overlay still opens without its backing file
    const alone = await openImage(missing, { aio: 'sync', readOnly: true, noBacking: true });
    await alone.close();
  });

  it('a child drained twice over quiesces a parent linked meanwhile once, and lets it go at the end', async () => {
    await withBql(async (bql) => {
      const child = await openNode(bql, { driver: 'memory', size: String(MiB), 'node-name': 'nested-child' });
      const parent = await openNode(bql, { driver: 'raw', 'file.driver': 'memory', 'file.size': String(MiB), 'node-name': 'nested-parent' });
      await withDrained(bql, child, () =>
        withDrained(bql, child, () => {
          expect(child.quiesceCounter).toBe(2);
          attachChild(bql, parent, 'data', child);
          expect(parent.quiesceCounter).toBe(1);
        }),
      );
      expect(child.quiesceCounter).toBe(0);
      expect(parent.quiesceCounter).toBe(0); // was left at 1 (the parent drained for ever) before the fix
      await closeNode(bql, parent);
    });
  });

  it('internal snapshots of an overlay keep the backing file read-through', async () => {
    const { top } = await baseAndOverlay('intsnap');
    const img = await openImage(top, { aio: 'sync' });
    await img.write(4096, new Uint8Array(4096).fill(1));
    await img.createSnapshot('before');
    await img.write(0, new Uint8Array(2 * 65536).fill(2));
    await img.gotoSnapshot('before');
    const got = await img.read(0, 3 * 4096);
    expect(got[0]).toBe(0x5a);
    expect(got[4096]).toBe(1);
    expect(got[8192]).toBe(0x5a);
    await img.close();
  });
});

describeInterop('snapshot_blkdev on a running device', () => {
  it('switches a device with a writer running to a new overlay: nothing lost, the base frozen at one point', async () => {
    const base = path.join(dir, 'live-base.qcow2');
    const overlay = path.join(dir, 'live-overlay.qcow2');
    withBqlSync((bql) => createQcow2File(bql, base, { sizeBytes: 4 * MiB }));
    const img = await openImage(base, { name: 'live0' }); // aio=threads: requests really are in flight
    const rand = prng(7);
    const writes: Array<{ offset: number; pattern: number }> = [];
    for (let i = 0; i < 120; i++) writes.push({ offset: 512 * Math.floor(rand() * (4 * MiB / 512 - 16)), pattern: 1 + (i % 250) });
    let completed = 0;
    let submittedAtSwitch = -1;
    let completedAtCall = -1;
    const writer = (async () => {
      for (const w of writes) {
        // two requests in flight at a time, so the switch drains real I/O
        await Promise.all([img.write(w.offset, new Uint8Array(4096).fill(w.pattern)), img.flush()]);
        completed++;
      }
    })();
    while (completed < 40) await new Promise((r) => setTimeout(r, 1));
    completedAtCall = completed;
    await withBql((bql) => snapshotBlkdev(bql, { device: 'live0', snapshotFile: overlay }));
    submittedAtSwitch = completed + 1;
    // a second overlay onto an existing file is refused and changes nothing
    const rootBefore = img.backend.root;
    await expectCode(withBql((bql) => snapshotBlkdev(bql, { device: 'live0', snapshotFile: overlay })), 'EINVAL', /exists/);
    expect(img.backend.root).toBe(rootBefore);
    await writer;
    await img.close();
    // the model: the overlay shows every write; the base shows exactly a prefix of them
    const model = (n: number): Uint8Array => {
      const m = new Uint8Array(4 * MiB);
      for (const w of writes.slice(0, n)) m.fill(w.pattern, w.offset, w.offset + 4096);
      return m;
    };
    for (const f of [base, overlay]) {
      const r = qemuStatus('qemu-img', ['check', f]);
      expect(`${f}: ${r.stdout}${r.stderr}`).toMatch(/No errors were found/);
    }
    const info = JSON.parse(qemu('qemu-img', ['info', '--output=json', overlay])) as Record<string, unknown>;
    expect(info['backing-filename']).toBe(path.resolve(base));
    const raw = path.join(dir, 'live.raw');
    qemu('qemu-img', ['convert', '-O', 'raw', overlay, raw]);
    expect(Buffer.compare(fs.readFileSync(raw), Buffer.from(model(writes.length)))).toBe(0);
    qemu('qemu-img', ['convert', '-O', 'raw', base, raw]);
    const baseBytes = fs.readFileSync(raw);
    let prefix = -1;
    for (let n = completedAtCall; n <= Math.min(writes.length, submittedAtSwitch); n++) if (Buffer.compare(baseBytes, Buffer.from(model(n))) === 0) prefix = n;
    expect(prefix, `the base holds the first k writes for some k in ${completedAtCall}..${submittedAtSwitch}`).toBeGreaterThanOrEqual(completedAtCall);
  });
});

describeInterop('changing the backing file an image records', () => {
  it('changeBackingFile rewrites the name and format (qemu-img reads them), refused on a read-only node', async () => {
    const { top } = await baseAndOverlay('cbf');
    const other = path.join(dir, 'cbf-other.raw');
    fs.writeFileSync(other, new Uint8Array(2 * MiB).fill(0x77));
    const img = await openImage(top, { aio: 'sync', noBacking: true });
    const node = img.backend.root;
    if (node === null) throw new Error('no root');
    await img.write(0, new Uint8Array(512).fill(1)); // dirty metadata: flushed before the header changes
    await withBql((bql) => withDrained(bql, node, (d) => node.drv.changeBackingFile?.(bql, d, 'cbf-other.raw', 'raw')));
    await img.close();
    const info = JSON.parse(qemu('qemu-img', ['info', '--output=json', top])) as Record<string, unknown>;
    expect(info['backing-filename']).toBe('cbf-other.raw');
    expect(info['backing-filename-format']).toBe('raw');
    expect(qemuStatus('qemu-img', ['check', top]).status).toBe(0);
    const again = await openImage(top, { aio: 'sync', readOnly: true });
    const got = await again.read(0, 2 * 65536);
    expect([got[0], got[600], got[65536]]).toEqual([1, 0, 0x77]); // the written cluster was filled (no backing then); the next reads through
    const ro = again.backend.root;
    if (ro === null) throw new Error('no root');
    await expectCode(withBql((bql) => withDrained(bql, ro, async (d) => ro.drv.changeBackingFile?.(bql, d, null, null))), 'EACCES', /read-only/);
    await again.close();
    const rw = await openImage(top, { aio: 'sync', noBacking: true });
    const n2 = rw.backend.root;
    if (n2 === null) throw new Error('no root');
    await withBql((bql) => withDrained(bql, n2, (d) => n2.drv.changeBackingFile?.(bql, d, null, null)));
    await rw.close();
    expect(JSON.parse(qemu('qemu-img', ['info', '--output=json', top]))['backing-filename']).toBeUndefined();
    // an image never names itself (here through a hard link) as its backing file: it could never open again
    fs.linkSync(top, path.join(dir, 'cbf-link.qcow2'));
    const self = await openImage(top, { aio: 'sync' });
    const n3 = self.backend.root;
    if (n3 === null) throw new Error('no root');
    for (const name of [path.basename(top), 'cbf-link.qcow2']) {
      await expectCode(withBql((bql) => withDrained(bql, n3, (d) => changeBackingFile(bql, d, n3, name, 'qcow2'))), 'EINVAL', /own backing file/);
    }
    await self.close();
    expect(JSON.parse(qemu('qemu-img', ['info', '--output=json', top]))['backing-filename']).toBeUndefined();
  });
});

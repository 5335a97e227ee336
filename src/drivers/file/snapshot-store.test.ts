/**
 * Internal snapshots on raw images (the `file` driver's store beside the image, reached through
 * the raw node's fallback) and on memory nodes: create, list, goto, delete, load-tmp, VM state,
 * a damaged index, crash leftovers, both aio modes, and a model-based run against a reference.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import fc from 'fast-check';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { withBql, withBqlSync } from '../../block/bql.js';
import { withDrained } from '../../block/drain.js';
import { BlockError } from '../../block/errors.js';
import { bdrvLoadVmstate, bdrvSaveVmstate } from '../../block/io.js';
import { shutdownIOThreads } from '../../block/iothread.js';
import type { BlockNode } from '../../block/node.js';
import { bdrvSnapshotCreate, bdrvSnapshotDelete, bdrvSnapshotGoto, bdrvSnapshotList, bdrvSnapshotLoadTmp } from '../../block/snapshot.js';
import { openImage, type Image } from '../../image.js';
import { parseSnapshotIndex } from './snapshot-index.js';
import { createRawFile } from '../index.js';

const KiB = 1024;
const MiB = 1024 * KiB;
let dir: string;
let fileCounter = 0;
const opened: Image[] = [];

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-rawsnap-'));
});

afterEach(async () => {
  for (const img of opened.splice(0).reverse()) await img.close();
});

afterAll(async () => {
  await withBql((bql) => shutdownIOThreads(bql));
  fs.rmSync(dir, { recursive: true, force: true });
});

/** A new host file of `size` bytes (sparse zeros). */
function tempImage(size: number): string {
  const p = path.join(dir, `disk${fileCounter++}.img`);
  withBqlSync((bql) => createRawFile(bql, p, size));
  return p;
}

function storeOf(file: string): string {
  return `${file}.snapshots`;
}

function pattern(length: number, seed: number): Uint8Array {
  return Uint8Array.from({ length }, (_, i) => (i * 31 + seed * 7 + 1) & 0xff);
}

/** Compares bytes quickly; names the first differing offset. */
function expectBytes(actual: Uint8Array, expected: Uint8Array): void {
  expect(actual.length).toBe(expected.length);
  const a = Buffer.from(actual.buffer, actual.byteOffset, actual.length);
  const b = Buffer.from(expected.buffer, expected.byteOffset, expected.length);
  if (!a.equals(b)) {
    const at = a.findIndex((v, i) => v !== b[i]);
    expect.fail(`bytes differ first at offset ${at}: ${a[at]} != ${b[at]}`);
  }
}

async function rejection(p: Promise<unknown>): Promise<BlockError> {
  try {
    await p;
  } catch (e) {
    expect(e).toBeInstanceOf(BlockError);
    return e as BlockError;
  }
  throw new Error('expected the promise to reject with a BlockError');
}

function rootOf(img: Image): BlockNode {
  const root = img.backend.root;
  if (root === null) throw new Error(`image ${img.name} has no root`);
  return root;
}

async function track(p: Promise<Image>): Promise<Image> {
  const img = await p;
  opened.push(img);
  return img;
}

async function closeTracked(img: Image): Promise<void> {
  const i = opened.indexOf(img);
  if (i >= 0) opened.splice(i, 1);
  await img.close();
}

function saveVm(img: Image, buf: Uint8Array, pos: number): Promise<void> {
  return bdrvSaveVmstate(rootOf(img), buf, pos);
}

async function loadVm(img: Image, pos: number, length: number): Promise<Uint8Array> {
  const buf = new Uint8Array(length).fill(0xee);
  await bdrvLoadVmstate(rootOf(img), buf, pos);
  return buf;
}

const VALID_ENTRY = {
  id: '1',
  name: 'a',
  file: '1.img',
  vmStateFile: null,
  vmStateSize: 0,
  dateSec: 1,
  dateNsec: 0,
  vmClockNsec: 0,
  icount: -1,
  diskSize: 65536,
};

describe.each([['sync' as const], ['threads' as const]])('raw snapshots on a file (aio=%s)', (aio) => {
  const openRaw = (file: string, readOnly = false): Promise<Image> => track(openImage(file, { format: 'raw', aio, readOnly }));

  it('creates two snapshots (IDs 1 and 2), lists them, and goto brings back each one', async () => {
    const file = tempImage(256 * KiB);
    const img = await openRaw(file);
    const A = pattern(64 * KiB, 1);
    const B = pattern(64 * KiB, 2);
    const C = pattern(64 * KiB, 3);
    await img.write(0, A);
    const s1 = await img.createSnapshot('first');
    expect(s1.id).toBe('1');
    expect(s1.name).toBe('first');
    await img.write(0, B);
    const s2 = await img.createSnapshot('second', { vmClockNsec: 5, icount: 7 });
    expect(s2.id).toBe('2');
    await img.write(0, C);

    const list = await img.snapshots();
    expect(list.map((s) => [s.id, s.name])).toEqual([
      ['1', 'first'],
      ['2', 'second'],
    ]);
    expect(list[1]).toMatchObject({ vmStateSize: 0, vmClockNsec: 5, icount: 7 });
    const store = storeOf(file);
    expect(fs.readdirSync(store).sort()).toEqual(['1.img', '2.img', 'index.json']);
    const index = parseSnapshotIndex(fs.readFileSync(path.join(store, 'index.json'), 'utf8'), 'index.json');
    expect(index.snapshots.map((s) => [s.file, s.vmStateFile, s.diskSize])).toEqual([
      ['1.img', null, 256 * KiB],
      ['2.img', null, 256 * KiB],
    ]);
    expectBytes(await img.read(0, 64 * KiB), C);

    await img.gotoSnapshot('first');
    expectBytes(await img.read(0, 64 * KiB), A);
    await img.gotoSnapshot('2');
    expectBytes(await img.read(0, 64 * KiB), B);
    // the node writes to the new image file, and the snapshots stay as they were
    const D = pattern(4 * KiB, 4);
    await img.write(8 * KiB, D);
    await img.flush();
    expectBytes(fs.readFileSync(file).subarray(8 * KiB, 12 * KiB), D);
    await img.gotoSnapshot('1');
    expectBytes(await img.read(0, 64 * KiB), A);
    await img.gotoSnapshot('2');
    expectBytes(await img.read(0, 64 * KiB), B);

    await closeTracked(img);
    const again = await openRaw(file);
    expectBytes(await again.read(0, 64 * KiB), B);
    expect((await again.snapshots()).map((s) => s.id)).toEqual(['1', '2']);
  });

  it('looks up goto by ID first, then by name; names may repeat', async () => {
    const img = await openRaw(tempImage(64 * KiB));
    await img.write(0, pattern(512, 10));
    await img.createSnapshot('x'); // id 1
    await img.write(0, pattern(512, 11));
    await img.createSnapshot('1'); // id 2, named like the first one's ID
    await img.write(0, pattern(512, 12));
    await img.createSnapshot('x'); // id 3, a repeated name
    expect((await img.snapshots()).map((s) => `${s.id}:${s.name}`)).toEqual(['1:x', '2:1', '3:x']);
    await img.gotoSnapshot('1');
    expectBytes(await img.read(0, 512), pattern(512, 10));
    await img.gotoSnapshot('x'); // the first named x
    expectBytes(await img.read(0, 512), pattern(512, 10));
    await img.gotoSnapshot('3');
    expectBytes(await img.read(0, 512), pattern(512, 12));
    const err = await rejection(img.gotoSnapshot('nope'));
    expect(err.code).toBe('ENOENT');
    expect(err.message).toContain("'nope'");
  });

  it('deletes by name (the first match), then unlinks the files; IDs follow qcow2', async () => {
    const file = tempImage(64 * KiB);
    const img = await openRaw(file);
    await img.createSnapshot('a');
    await img.createSnapshot('b');
    await img.createSnapshot('a');
    const gone = await img.deleteSnapshot('a');
    expect(gone.id).toBe('1');
    expect((await img.snapshots()).map((s) => `${s.id}:${s.name}`)).toEqual(['2:b', '3:a']);
    expect(fs.existsSync(path.join(storeOf(file), '1.img'))).toBe(false);
    expect((await img.createSnapshot('c')).id).toBe('4');
    await img.deleteSnapshot('c');
    expect((await img.createSnapshot('d')).id).toBe('4'); // max + 1, as qcow2
    // the block-layer call matches (id, name) with null meaning "any"
    await withBql(async (bql) => {
      const root = rootOf(img);
      await withDrained(bql, root, async (d) => {
        expect((await rejection(bdrvSnapshotDelete(bql, d, root, '2', 'a'))).code).toBe('ENOENT');
        expect((await bdrvSnapshotDelete(bql, d, root, '3', null)).name).toBe('a');
        expect((await bdrvSnapshotDelete(bql, d, root, null, 'b')).id).toBe('2');
      });
    });
    expect((await img.snapshots()).map((s) => s.id)).toEqual(['4']);
    expect(fs.readdirSync(storeOf(file)).sort()).toEqual(['4.img', 'index.json']);
    expect((await rejection(img.deleteSnapshot('zzz'))).code).toBe('ENOENT');
  });

  it('goto restores the length the image had', async () => {
    const img = await openRaw(tempImage(64 * KiB));
    await img.write(0, pattern(KiB, 5));
    await img.createSnapshot('small');
    await img.truncate(192 * KiB);
    await img.write(128 * KiB, pattern(KiB, 6));
    expect(img.size).toBe(192 * KiB);
    await img.gotoSnapshot('small');
    expect(img.size).toBe(64 * KiB);
    expectBytes(await img.read(0, KiB), pattern(KiB, 5));
  });

  it('lists nothing when the image has no store, and creates none by listing', async () => {
    const file = tempImage(64 * KiB);
    const img = await openRaw(file);
    expect(await img.snapshots()).toEqual([]);
    expect(fs.existsSync(storeOf(file))).toBe(false);
  });

  it('loads a snapshot temporarily on a read-only open, and only there', async () => {
    const file = tempImage(128 * KiB);
    const rw = await openRaw(file);
    await rw.write(0, pattern(64 * KiB, 21));
    await rw.createSnapshot('a');
    await rw.write(0, pattern(64 * KiB, 22));
    await rw.truncate(64 * KiB);
    await rw.createSnapshot('b');
    await rw.write(0, pattern(64 * KiB, 23));
    const notRo = await rejection(rw.loadSnapshotTemporarily('a'));
    expect(notRo.code).toBe('EINVAL');
    expect(notRo.message).toMatch(/read-?only/);
    await closeTracked(rw);

    const ro = await openRaw(file, true);
    expectBytes(await ro.read(0, 64 * KiB), pattern(64 * KiB, 23));
    await ro.loadSnapshotTemporarily('a');
    expect(ro.size).toBe(128 * KiB);
    expectBytes(await ro.read(0, 64 * KiB), pattern(64 * KiB, 21));
    await ro.loadSnapshotTemporarily('2'); // by ID
    expect(ro.size).toBe(64 * KiB);
    expectBytes(await ro.read(0, 64 * KiB), pattern(64 * KiB, 22));
    expect((await rejection(ro.write(0, new Uint8Array(512)))).code).toMatch(/EPERM|EACCES/);
    expect((await rejection(ro.loadSnapshotTemporarily('nope'))).code).toBe('ENOENT');
    // a read-only node neither reverts nor deletes
    expect((await rejection(ro.gotoSnapshot('a'))).code).toBe('EACCES');
    expect((await rejection(ro.deleteSnapshot('a'))).code).toBe('EACCES');
    await closeTracked(ro);
    // the image itself is untouched
    expectBytes(fs.readFileSync(file).subarray(0, 64 * KiB), pattern(64 * KiB, 23));
  });

  it('lets reads in flight finish on the old descriptor when load-tmp switches it', async () => {
    // large reads, so that the worker is still at them when the main loop switches descriptors
    const size = 32 * MiB;
    const file = tempImage(size);
    const rw = await openRaw(file);
    await rw.write(0, new Uint8Array(size).fill(25));
    await rw.createSnapshot('a');
    await rw.write(0, new Uint8Array(size).fill(26));
    await closeTracked(rw);
    const ro = await openRaw(file, true);
    const reads = Array.from({ length: 16 }, (_, i) => ro.read(i * 2 * MiB, 2 * MiB));
    await withBql((bql) => bdrvSnapshotLoadTmp(bql, rootOf(ro), null, 'a'));
    const before = await Promise.all(reads);
    for (const buf of before) expect(buf.every((b) => b === 26)).toBe(true);
    expect((await ro.read(0, 2 * MiB)).every((b) => b === 25)).toBe(true);
  });

  it.skipIf(!fs.existsSync('/proc/self/fd'))('closes every descriptor it replaces', async () => {
    const fdCount = (): number => fs.readdirSync('/proc/self/fd').length;
    const file = tempImage(64 * KiB);
    const warm = await openRaw(file); // starts the worker pool, which keeps its own descriptors
    await warm.read(0, 512);
    await closeTracked(warm);
    const before = fdCount();
    const img = await openRaw(file);
    await img.write(0, pattern(KiB, 27));
    await saveVm(img, pattern(KiB, 28), 0);
    await img.createSnapshot('a', { vmStateSize: KiB });
    await img.gotoSnapshot('a');
    await loadVm(img, 0, KiB);
    await img.gotoSnapshot('a');
    await img.read(0, KiB);
    await closeTracked(img);
    const ro = await openRaw(file, true);
    await loadVm(ro, 0, KiB);
    await ro.loadSnapshotTemporarily('a');
    await ro.read(0, KiB);
    await loadVm(ro, 0, KiB);
    await ro.loadSnapshotTemporarily('a');
    await closeTracked(ro);
    expect(fdCount()).toBe(before);
  });

  it('keeps VM state: saved, taken by the snapshot, restored by goto', async () => {
    const file = tempImage(64 * KiB);
    const img = await openRaw(file);
    const root = rootOf(img);
    const vmA = pattern(8 * KiB, 31);
    const tail = pattern(KiB, 32);
    await saveVm(img, vmA, 0);
    await saveVm(img, tail, 2 * MiB); // sparse: the gap reads as zeros
    expectBytes(await loadVm(img, 0, 8 * KiB), vmA);
    const store = storeOf(file);
    expect(fs.existsSync(path.join(store, 'pending.vmstate'))).toBe(true);

    const vmSize = 2 * MiB + KiB;
    const sn = await withBql((bql) =>
      withDrained(bql, root, (d) =>
        bdrvSnapshotCreate(bql, d, root, { id: '', name: 'with-vm', vmStateSize: vmSize, dateSec: 10, dateNsec: 20, vmClockNsec: 30, icount: 40 }),
      ),
    );
    expect(sn).toMatchObject({ id: '1', name: 'with-vm', vmStateSize: vmSize, dateSec: 10, dateNsec: 20, vmClockNsec: 30, icount: 40 });
    // the snapshot took the pending state: the active VM state is empty again
    expect(fs.existsSync(path.join(store, 'pending.vmstate'))).toBe(false);
    expect(fs.existsSync(path.join(store, '1.vmstate'))).toBe(true);
    expectBytes(await loadVm(img, 0, KiB), new Uint8Array(KiB));

    const vmB = pattern(8 * KiB, 33);
    await saveVm(img, vmB, 0);
    await img.createSnapshot('no-vm'); // vmStateSize 0: the pending state stays
    expectBytes(await loadVm(img, 0, 8 * KiB), vmB);

    await withBql((bql) => withDrained(bql, root, (d) => bdrvSnapshotGoto(bql, d, root, 'with-vm')));
    expectBytes(await loadVm(img, 0, 8 * KiB), vmA);
    expectBytes(await loadVm(img, 2 * MiB, KiB), tail);
    expectBytes(await loadVm(img, MiB, KiB), new Uint8Array(KiB));
    // writes after goto change the pending copy, not the snapshot's
    await saveVm(img, pattern(KiB, 34), 0);
    await img.gotoSnapshot('with-vm');
    expectBytes(await loadVm(img, 0, 8 * KiB), vmA);
    await img.gotoSnapshot('no-vm');
    expectBytes(await loadVm(img, 0, KiB), new Uint8Array(KiB));

    // a read-only node shows a snapshot's VM state after load-tmp and refuses to write any
    await closeTracked(img);
    const ro = await openRaw(file, true);
    expectBytes(await loadVm(ro, 0, KiB), new Uint8Array(KiB));
    await withBql((bql) => bdrvSnapshotLoadTmp(bql, rootOf(ro), '1', null));
    expectBytes(await loadVm(ro, 0, 8 * KiB), vmA);
    expect((await rejection(saveVm(ro, new Uint8Array(16), 0))).code).toBe('EPERM');
    expect((await withBql((bql) => bdrvSnapshotList(bql, rootOf(ro)))).map((s) => s.name)).toEqual(['with-vm', 'no-vm']);
  });

  it('creates a VM-state snapshot with nothing saved: its state reads as zeros', async () => {
    const file = tempImage(64 * KiB);
    const img = await openRaw(file);
    await img.createSnapshot('empty-vm', { vmStateSize: 4096 });
    await saveVm(img, pattern(KiB, 40), 0);
    await img.gotoSnapshot('empty-vm');
    expectBytes(await loadVm(img, 0, KiB), new Uint8Array(KiB));
  });

  describe('a damaged index', () => {
    const cases: Array<[string, string, RegExp]> = [
      ['not JSON', '{"format": "snapstack-raw-snap', /not valid JSON/],
      ['an unknown version', JSON.stringify({ format: 'snapstack-raw-snapshots', version: 2, snapshots: [] }), /version 2.*field 'version'/],
      ['another format', JSON.stringify({ format: 'qcow2', version: 1, snapshots: [] }), /field 'format'/],
      ['a missing name', JSON.stringify({ format: 'snapstack-raw-snapshots', version: 1, snapshots: [{ ...VALID_ENTRY, name: undefined }] }), /field 'snapshots\[0\]\.name'/],
      ['a path outside the store', JSON.stringify({ format: 'snapstack-raw-snapshots', version: 1, snapshots: [{ ...VALID_ENTRY, file: '../other.img' }] }), /field 'snapshots\[0\]\.file'/],
      [
        'a repeated ID',
        JSON.stringify({ format: 'snapstack-raw-snapshots', version: 1, snapshots: [VALID_ENTRY, { ...VALID_ENTRY, name: 'b', file: '2.img' }] }),
        /field 'snapshots\[1\]\.id'/,
      ],
      ['VM state without a file', JSON.stringify({ format: 'snapstack-raw-snapshots', version: 1, snapshots: [{ ...VALID_ENTRY, vmStateSize: 10 }] }), /snapshots\[0\]\.vmStateFile/],
    ];

    it.each(cases)('is refused (%s) and never rewritten', async (_what, text, message) => {
      const file = tempImage(64 * KiB);
      const img = await openRaw(file);
      await img.write(0, pattern(KiB, 50));
      await img.createSnapshot('keep');
      const store = storeOf(file);
      const indexPath = path.join(store, 'index.json');
      fs.writeFileSync(indexPath, text);
      fs.writeFileSync(path.join(store, '7.img'), 'orphan-looking'); // must survive: no cleanup on a bad index
      const before = fs.readdirSync(store).sort();
      const attempts: Array<() => Promise<unknown>> = [() => img.snapshots(), () => img.createSnapshot('new'), () => img.gotoSnapshot('keep'), () => img.deleteSnapshot('keep')];
      for (const attempt of attempts) {
        const err = await rejection(attempt());
        expect(err.code).toBe('EINVAL');
        expect(err.message).toContain(fs.realpathSync(indexPath));
        expect(err.message).toMatch(message);
        expect(err.file).toBe(fs.realpathSync(indexPath));
        expect(err.field).toBeTruthy();
      }
      expect(fs.readFileSync(indexPath, 'utf8')).toBe(text);
      expect(fs.readdirSync(store).sort()).toEqual(before);
      expectBytes(await img.read(0, KiB), pattern(KiB, 50));
    });

    it('refuses a snapshot whose disk does not match its entry', async () => {
      const file = tempImage(64 * KiB);
      const img = await openRaw(file);
      await img.createSnapshot('a');
      fs.truncateSync(path.join(storeOf(file), '1.img'), 1000);
      const err = await rejection(img.gotoSnapshot('a'));
      expect(err.code).toBe('EINVAL');
      expect(err.field).toBe('snapshots[0].diskSize');
      expect(err.message).toContain('1.img');
      fs.rmSync(path.join(storeOf(file), '1.img'));
      const missing = await rejection(img.gotoSnapshot('a'));
      expect(missing.code).toBe('ENOENT');
      expect(missing.field).toBe('snapshots[0].file');
    });
  });

  it('ignores the leftovers of a crash before the commit, and the next create cleans them', async () => {
    const file = tempImage(64 * KiB);
    const img = await openRaw(file);
    await img.write(0, pattern(KiB, 60));
    await img.createSnapshot('a');
    const store = storeOf(file);
    // a create that crashed after writing its files but before renaming the index
    const committed = fs.readFileSync(path.join(store, 'index.json'), 'utf8');
    fs.writeFileSync(path.join(store, '2.img'), new Uint8Array(64 * KiB).fill(0x99));
    fs.writeFileSync(path.join(store, '2.vmstate'), 'stale vm state');
    fs.writeFileSync(path.join(store, 'index.json.tmp'), committed.replace('"snapshots": [', '"snapshots": [ {"broken": true},'));
    fs.writeFileSync(`${fs.realpathSync(file)}.snapstack-goto.tmp`, 'half a goto');
    fs.writeFileSync(path.join(store, 'notes.txt'), 'not ours');
    expect((await img.snapshots()).map((s) => s.id)).toEqual(['1']);

    await img.write(0, pattern(KiB, 61));
    const sn = await img.createSnapshot('b');
    expect(sn.id).toBe('2');
    expect(fs.readdirSync(store).sort()).toEqual(['1.img', '2.img', 'index.json', 'notes.txt']);
    expect(fs.existsSync(`${fs.realpathSync(file)}.snapstack-goto.tmp`)).toBe(false);
    await img.write(0, pattern(KiB, 62));
    await img.gotoSnapshot('b');
    expectBytes(await img.read(0, KiB), pattern(KiB, 61));
    await img.gotoSnapshot('a');
    expectBytes(await img.read(0, KiB), pattern(KiB, 60));
    // a delete that crashed after the commit leaves its file behind: the next delete removes it
    fs.writeFileSync(path.join(store, '9.img'), 'deleted but not unlinked');
    await img.deleteSnapshot('b');
    expect(fs.readdirSync(store).sort()).toEqual(['1.img', 'index.json', 'notes.txt']);
  });

  it('keeps the store beside the real file when opened through a symlink', async () => {
    const file = tempImage(64 * KiB);
    const link = path.join(dir, `link${fileCounter++}.img`);
    fs.symlinkSync(file, link);
    const img = await openRaw(link);
    await img.write(0, pattern(KiB, 70));
    await img.createSnapshot('a');
    await img.write(0, pattern(KiB, 71));
    await img.gotoSnapshot('a');
    expect(fs.lstatSync(link).isSymbolicLink()).toBe(true);
    expect(fs.existsSync(storeOf(file))).toBe(true);
    expect(fs.existsSync(storeOf(link))).toBe(false);
    expectBytes(fs.readFileSync(file).subarray(0, KiB), pattern(KiB, 70));
  });

  it('forgets the snapshots of an image that createRawFile replaces', async () => {
    const file = tempImage(64 * KiB);
    const img = await openRaw(file);
    await img.createSnapshot('old');
    await closeTracked(img);
    withBqlSync((bql) => createRawFile(bql, file, 64 * KiB));
    expect(fs.existsSync(storeOf(file))).toBe(false);
    const fresh = await openRaw(file);
    expect(await fresh.snapshots()).toEqual([]);
  });
});

describe.each([
  ['memory', 'driver=memory,size=256K'],
  ['raw over memory', 'driver=raw,file.driver=memory,file.size=256K'],
])('snapshots on %s', (_what, target) => {
  const openMem = (readOnly = false): Promise<Image> => track(openImage(target, { readOnly }));

  it('creates, lists, goes back to and deletes snapshots', async () => {
    const img = await openMem();
    await img.write(0, pattern(64 * KiB, 1));
    expect((await img.createSnapshot('a')).id).toBe('1');
    await img.write(0, pattern(64 * KiB, 2));
    expect((await img.createSnapshot('b')).id).toBe('2');
    await img.write(0, pattern(64 * KiB, 3));
    expect((await img.snapshots()).map((s) => `${s.id}:${s.name}`)).toEqual(['1:a', '2:b']);
    await img.gotoSnapshot('a');
    expectBytes(await img.read(0, 64 * KiB), pattern(64 * KiB, 1));
    await img.write(0, pattern(KiB, 9)); // does not reach the snapshot
    await img.gotoSnapshot('2');
    expectBytes(await img.read(0, 64 * KiB), pattern(64 * KiB, 2));
    await img.gotoSnapshot('1');
    expectBytes(await img.read(0, 64 * KiB), pattern(64 * KiB, 1));
    expect((await img.deleteSnapshot('a')).id).toBe('1');
    expect((await img.snapshots()).map((s) => s.id)).toEqual(['2']);
    expect((await rejection(img.gotoSnapshot('a'))).code).toBe('ENOENT');
    expect((await rejection(img.deleteSnapshot('a'))).code).toBe('ENOENT');
    expect((await img.createSnapshot('c')).id).toBe('3');
  });

  it('goto restores the length', async () => {
    const img = await openMem();
    await img.createSnapshot('small');
    await img.truncate(3 * MiB);
    await img.write(2 * MiB, pattern(KiB, 4));
    await img.gotoSnapshot('small');
    expect(img.size).toBe(256 * KiB);
    await img.truncate(3 * MiB);
    expectBytes(await img.read(2 * MiB, KiB), new Uint8Array(KiB));
  });

  it('keeps VM state per snapshot', async () => {
    const img = await openMem();
    await saveVm(img, pattern(4 * KiB, 5), MiB - 100);
    await img.createSnapshot('vm', { vmStateSize: MiB + 4 * KiB });
    expectBytes(await loadVm(img, MiB - 100, 4 * KiB), new Uint8Array(4 * KiB));
    await saveVm(img, pattern(KiB, 6), 0);
    await img.createSnapshot('plain');
    await img.gotoSnapshot('vm');
    expectBytes(await loadVm(img, MiB - 100, 4 * KiB), pattern(4 * KiB, 5));
    await saveVm(img, pattern(4 * KiB, 7), MiB - 100);
    await img.gotoSnapshot('vm');
    expectBytes(await loadVm(img, MiB - 100, 4 * KiB), pattern(4 * KiB, 5));
    await img.gotoSnapshot('plain');
    expectBytes(await loadVm(img, 0, KiB), new Uint8Array(KiB));
  });

  it('loads temporarily only on a read-only node', async () => {
    const rw = await openMem();
    await rw.createSnapshot('a');
    expect((await rejection(rw.loadSnapshotTemporarily('a'))).code).toBe('EINVAL');
    const ro = await openMem(true);
    expect(await ro.snapshots()).toEqual([]); // a new memory node has none
    expect((await rejection(ro.loadSnapshotTemporarily('a'))).code).toBe('ENOENT');
  });
});

// ---------------------------------------------------------------------------------------------
// Model-based: random writes, creates, gotos, deletes and resizes against a reference

type Op =
  | { t: 'write'; offset: number; length: number; seed: number }
  | { t: 'create'; name: string; vm: boolean }
  | { t: 'goto'; pick: number }
  | { t: 'delete'; pick: number }
  | { t: 'truncate'; size: number }
  | { t: 'vm'; seed: number };

const MODEL_SIZE = 64 * KiB;
const VM_LEN = 2 * KiB;

const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 4, arbitrary: fc.record({ t: fc.constant('write' as const), offset: fc.nat(MODEL_SIZE - 1), length: fc.integer({ min: 1, max: 8 * KiB }), seed: fc.nat(255) }) },
  { weight: 3, arbitrary: fc.record({ t: fc.constant('create' as const), name: fc.constantFrom('a', 'b', 'c'), vm: fc.boolean() }) },
  { weight: 3, arbitrary: fc.record({ t: fc.constant('goto' as const), pick: fc.nat(20) }) },
  { weight: 2, arbitrary: fc.record({ t: fc.constant('delete' as const), pick: fc.nat(20) }) },
  { weight: 1, arbitrary: fc.record({ t: fc.constant('truncate' as const), size: fc.constantFrom(32 * KiB, 64 * KiB, 96 * KiB) }) },
  { weight: 1, arbitrary: fc.record({ t: fc.constant('vm' as const), seed: fc.nat(255) }) },
);

interface ModelSnapshot {
  id: string;
  name: string;
  data: Uint8Array;
  vm: Uint8Array | null;
}

/** Runs `ops` on `img` and on the model side by side, checking the disk and list after each. */
async function runModel(img: Image, ops: Op[]): Promise<{ disk: Uint8Array; snapshots: Map<string, ModelSnapshot> }> {
  let disk: Uint8Array = new Uint8Array(img.size);
  let vm: Uint8Array = new Uint8Array(VM_LEN);
  const snaps: ModelSnapshot[] = [];
  const root = rootOf(img);
  for (const op of ops) {
    switch (op.t) {
      case 'write': {
        const length = Math.min(op.length, disk.length - op.offset);
        if (length <= 0) break;
        const data = pattern(length, op.seed);
        await img.write(op.offset, data);
        disk.set(data, op.offset);
        break;
      }
      case 'create': {
        const sn = await img.createSnapshot(op.name, { vmStateSize: op.vm ? VM_LEN : 0 });
        const expectedId = String(snaps.reduce((m, s) => Math.max(m, Number(s.id)), 0) + 1);
        expect(sn.id).toBe(expectedId);
        snaps.push({ id: sn.id, name: op.name, data: disk.slice(), vm: op.vm ? vm : null });
        if (op.vm) vm = new Uint8Array(VM_LEN);
        break;
      }
      case 'goto': {
        const sn = snaps[op.pick % Math.max(1, snaps.length)];
        if (sn === undefined) {
          expect((await rejection(img.gotoSnapshot('99'))).code).toBe('ENOENT');
          break;
        }
        await img.gotoSnapshot(sn.id);
        disk = sn.data.slice();
        vm = sn.vm === null ? new Uint8Array(VM_LEN) : sn.vm.slice();
        break;
      }
      case 'delete': {
        const sn = snaps[op.pick % Math.max(1, snaps.length)];
        if (sn === undefined) break;
        const first = snaps.find((s) => s.name === sn.name) as ModelSnapshot;
        expect((await img.deleteSnapshot(sn.name)).id).toBe(first.id);
        snaps.splice(snaps.indexOf(first), 1);
        break;
      }
      case 'truncate': {
        await img.truncate(op.size);
        const next = new Uint8Array(op.size);
        next.set(disk.subarray(0, Math.min(op.size, disk.length)));
        disk = next;
        break;
      }
      case 'vm': {
        const data = pattern(VM_LEN, op.seed);
        await bdrvSaveVmstate(root, data, 0);
        vm = data;
        break;
      }
    }
    expect(img.size).toBe(disk.length);
    expectBytes(await img.read(0, disk.length), disk);
    const vmNow = new Uint8Array(VM_LEN);
    await bdrvLoadVmstate(root, vmNow, 0);
    expectBytes(vmNow, vm);
    expect((await img.snapshots()).map((s) => `${s.id}:${s.name}`)).toEqual(snaps.map((s) => `${s.id}:${s.name}`));
  }
  return { disk, snapshots: new Map(snaps.map((s) => [s.id, s])) };
}

describe('model-based snapshot sequences', () => {
  const opsArb = fc.array(opArb, { minLength: 1, maxLength: 24 });

  it.each([
    ['sync' as const, 60],
    ['threads' as const, 30],
  ])('file, aio=%s: every state matches the model, and survives a reopen', async (aio, numRuns) => {
    await fc.assert(
      fc.asyncProperty(opsArb, async (ops) => {
        const file = tempImage(MODEL_SIZE);
        const img = await openImage(file, { format: 'raw', aio });
        let result: { disk: Uint8Array; snapshots: Map<string, ModelSnapshot> };
        try {
          result = await runModel(img, ops);
        } finally {
          await img.close();
        }
        // what was committed is on disk: reopen and read the image and every snapshot back
        const ro = await openImage(file, { format: 'raw', aio, readOnly: true });
        try {
          expectBytes(await ro.read(0, ro.size), result.disk);
          for (const sn of result.snapshots.values()) {
            await ro.loadSnapshotTemporarily(sn.id);
            expectBytes(await ro.read(0, ro.size), sn.data);
          }
        } finally {
          await ro.close();
        }
        fs.rmSync(storeOf(file), { recursive: true, force: true });
        fs.rmSync(file, { force: true });
      }),
      { numRuns },
    );
  });

  it('memory: every state matches the model', async () => {
    await fc.assert(
      fc.asyncProperty(opsArb, async (ops) => {
        const img = await openImage(`driver=memory,size=${MODEL_SIZE}`);
        try {
          await runModel(img, ops);
        } finally {
          await img.close();
        }
      }),
      { numRuns: 100 },
    );
  });
});

/**
 * qemu-system-x86_64 7.2 as the oracle of the device-facing queries, which qemu-storage-daemon
 * cannot answer (it has no devices): a q35 machine (stopped, TCG) with one virtio-blk disk on a
 * qcow2 overlay of a qcow2 base, and snapstack's machine with the same disk under `snapstack
 * monitor -qmp`'s command table, each on its own copy of the images. query-block and
 * query-named-block-nodes must have the same shapes and agree on device, node names, drivers,
 * sizes and the chain; internal snapshots made by device name must land alike.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { withBql } from '../src/block/bql.js';
import { shutdownIOThreads } from '../src/block/iothread.js';
import { Machine } from '../src/machine/machine.js';
import { QmpClient } from '../src/qmp/client.js';
import { qmpCommands } from '../src/qmp/command-table.js';
import { QmpServer } from '../src/qmp/server.js';
import type { QmpObject, QmpValue } from '../src/qmp/types.js';
import { describeNeeding, qemu } from './helpers/qemu.js';
import { isObj, shapeDiff as peerShapeDiff, startQemuSystem, tempDir } from './qmp-helpers.js';

const shapeDiff = (a: QmpValue | undefined, b: QmpValue | undefined, at: string, out: string[]): void => peerShapeDiff(a, b, at, out, 'QEMU');

const QEMU = 'qemu-system-x86_64';
const describeQemuSystem = (name: string, fn: () => void): void => describeNeeding(name, [QEMU, 'qemu-img'], 'apt-get install qemu-system-x86 qemu-utils', fn);


function normalise(v: QmpValue, dir: string): QmpValue {
  if (typeof v === 'string') return v.split(dir).join('<dir>');
  if (Array.isArray(v)) return v.map((x) => normalise(x, dir));
  if (isObj(v)) return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, normalise(x, dir)]));
  return v;
}

/** What must agree in a BlockDeviceInfo: names, drivers, files, sizes, the chain, snapshot names. */
function agreed(n: QmpValue | undefined): QmpValue {
  if (!isObj(n)) return null;
  const image = (img: QmpValue | undefined): QmpValue =>
    isObj(img)
      ? {
          filename: img['filename'] ?? null,
          format: img['format'] ?? null,
          'virtual-size': img['virtual-size'] ?? null,
          'backing-filename': img['backing-filename'] ?? null,
          snapshots: Array.isArray(img['snapshots']) ? img['snapshots'].map((s) => (isObj(s) ? (s['name'] ?? null) : null)) : null,
          'backing-image': image(img['backing-image']),
        }
      : null;
  return {
    'node-name': String(n['node-name']).startsWith('#') ? '#auto' : (n['node-name'] ?? null),
    drv: n['drv'] ?? null,
    file: n['file'] ?? null,
    ro: n['ro'] ?? null,
    backing_file: n['backing_file'] ?? null,
    backing_file_depth: n['backing_file_depth'] ?? null,
    image: image(n['image']),
  };
}

interface Peer {
  client: QmpClient;
  dir: string;
  stop(): Promise<void>;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function startQemu(dir: string): Promise<Peer> {
  const q = await startQemuSystem(
    ['-machine', 'q35', '-S', '-nodefaults', '-display', 'none', '-accel', 'tcg', '-drive', `if=none,id=d0,file=${path.join(dir, 'top.qcow2')},format=qcow2,node-name=n0`, '-device', 'virtio-blk-pci,drive=d0,id=d0'],
    path.join(dir, 'qemu.sock'),
  );
  return { ...q, dir };
}

async function startOurs(dir: string): Promise<Peer> {
  const m = new Machine({ guest: false, vcpus: 1, ramBytes: 4 * 1024 * 1024 });
  await withBql((bql) => m.addDrive(bql, `file=${path.join(dir, 'top.qcow2')},format=qcow2,id=d0,node-name=n0`));
  const sock = path.join(dir, 'ours.sock');
  const server = await QmpServer.listen({ type: 'unix', path: sock }, { commands: qmpCommands({ machine: true }), machine: m, onQuit: () => undefined });
  const client = await QmpClient.connect({ path: sock });
  return {
    client,
    dir,
    stop: async () => {
      await client.close();
      await server.close();
      await withBql((bql) => m.shutdown(bql));
    },
  };
}

describeQemuSystem('device queries compared with qemu-system-x86_64 7.2', () => {
  let root = '';
  let theirs: Peer | null = null;
  let ours: Peer | null = null;

  async function both(name: string, args: QmpObject = {}): Promise<{ q: QmpValue; o: QmpValue }> {
    if (theirs === null || ours === null) throw new Error('a peer is not running');
    const q = normalise(await theirs.client.execute(name, args), theirs.dir);
    const o = normalise(await ours.client.execute(name, args), ours.dir);
    return { q, o };
  }

  beforeAll(async () => {
    root = tempDir('snapstack-system-cmp-');
    const seed = path.join(root, 'seed');
    fs.mkdirSync(seed);
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', path.join(seed, 'base.qcow2'), '4M']);
    qemu('qemu-io', ['-c', 'write -P 0x11 0 128k', path.join(seed, 'base.qcow2')]);
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', path.join(seed, 'top.qcow2'), '4M']);
    qemu('qemu-img', ['snapshot', '-c', 'first', path.join(seed, 'top.qcow2')]);
    for (const side of ['qemu', 'ours']) {
      fs.mkdirSync(path.join(root, side));
      for (const f of fs.readdirSync(seed)) fs.copyFileSync(path.join(seed, f), path.join(root, side, f));
    }
    theirs = await startQemu(path.join(root, 'qemu'));
    ours = await startOurs(path.join(root, 'ours'));
  });

  afterAll(async () => {
    await theirs?.stop();
    await ours?.stop();
    await withBql((bql) => shutdownIOThreads(bql));
    if (root !== '') fs.rmSync(root, { recursive: true, force: true });
  });

  it('query-block: the same BlockInfo for the virtio-blk disk', async () => {
    const { q, o } = await both('query-block');
    const diffs: string[] = [];
    shapeDiff(q, o, 'query-block', diffs);
    expect(diffs).toEqual([]);
    const pick = (v: QmpValue): QmpValue =>
      Array.isArray(v) ? v.map((b) => (isObj(b) ? { device: b['device'] ?? null, qdev: b['qdev'] ?? null, type: b['type'] ?? null, removable: b['removable'] ?? null, locked: b['locked'] ?? null, 'io-status': b['io-status'] ?? null, inserted: agreed(b['inserted']) } : null)) : null;
    expect(pick(o)).toEqual(pick(q));
  });

  it('query-named-block-nodes: the same nodes of the disk\'s chain', async () => {
    const { q, o } = await both('query-named-block-nodes');
    const key = (n: QmpObject): string => (String(n['node-name']).startsWith('#') ? `${String(n['drv'])}:${String(n['file'])}` : String(n['node-name']));
    const toMap = (v: QmpValue): Map<string, QmpObject> => new Map((Array.isArray(v) ? v : []).filter(isObj).map((n) => [key(n), n]));
    const qm = toMap(q);
    const om = toMap(o);
    expect([...om.keys()].sort()).toEqual([...qm.keys()].sort());
    for (const [k, qn] of qm) {
      const diffs: string[] = [];
      shapeDiff(qn, om.get(k), k, diffs);
      expect(diffs, `shape of ${k}`).toEqual([]);
      // a protocol node's size is its host file's length, which each side's allocations decide
      const a = agreed(qn);
      const b = agreed(om.get(k));
      if (isObj(a) && isObj(b) && a['drv'] === 'file' && isObj(a['image']) && isObj(b['image'])) b['image']['virtual-size'] = a['image']['virtual-size'] ?? null;
      expect(b, `values of ${k}`).toEqual(a);
    }
  });

  it('internal snapshots by device name land alike, and the same refusals', async () => {
    if (theirs === null || ours === null) throw new Error('a peer is not running');
    const t = theirs;
    const u = ours;
    expect(await both('blockdev-snapshot-internal-sync', { device: 'd0', name: 'second' })).toEqual({ q: {}, o: {} });
    for (const args of [{ device: 'd0', name: 'first' }, { device: 'n0', name: 'x' }] as QmpObject[]) {
      const q = await t.client.request('blockdev-snapshot-internal-sync', args);
      const o = await u.client.request('blockdev-snapshot-internal-sync', args);
      expect(o['error']).toEqual(q['error']);
    }
    const { q, o } = await both('query-block');
    const inserted = (v: QmpValue): QmpValue => (Array.isArray(v) && isObj(v[0]) ? agreed(v[0]['inserted']) : null);
    expect(inserted(o)).toEqual(inserted(q));
    expect(JSON.stringify(inserted(o))).toContain('"second"');
    const del = await both('blockdev-snapshot-delete-internal-sync', { device: 'd0', name: 'second' });
    expect(isObj(del.o) ? del.o['name'] : null).toBe('second');
    expect(Object.keys(isObj(del.o) ? del.o : {}).sort()).toEqual(Object.keys(isObj(del.q) ? del.q : {}).sort());
  });
});

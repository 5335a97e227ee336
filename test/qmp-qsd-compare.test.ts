/**
 * qemu-storage-daemon 7.2 as the oracle of the QMP commands: the same command sequence goes to
 * QSD and to snapstack's QMP server (each over its unix socket, with the same client), each on
 * its own copy of the same images
 * (a raw image, a qcow2 overlay on a qcow2 base with internal snapshots, all made by qemu-img).
 * The replies are compared by shape (key sets and JSON types, recursively; error classes) and by
 * value where the two must agree: sizes, node names, drivers, formats, read-only flags, chain
 * depths, snapshot lists, and the error texts snapstack copies from QEMU. qemu-img then checks
 * and lists both copies, which must agree too.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { withBql } from '../src/block/bql.js';
import { shutdownIOThreads } from '../src/block/iothread.js';
import { QmpClient } from '../src/qmp/client.js';
import { qmpCommands } from '../src/qmp/command-table.js';
import { QmpServer } from '../src/qmp/server.js';
import type { QmpObject, QmpValue } from '../src/qmp/types.js';
import { qemu } from './helpers/qemu.js';
import { describeQsd, isObj, shapeDiff, startQsd, tempDir, type Qsd } from './qmp-helpers.js';

/** One side's reply: the `return` value, or the error's class and text. */
type Reply = { ok: true; value: QmpValue } | { ok: false; errorClass: string; desc: string };

async function reply(client: QmpClient, name: string, args: QmpObject = {}): Promise<Reply> {
  const reply = await client.request(name, args);
  const err = reply['error'];
  if (typeof err === 'object' && err !== null && !Array.isArray(err)) return { ok: false, errorClass: String(err['class']), desc: String(err['desc']) };
  return { ok: true, value: reply['return'] ?? null };
}

/** Replaces each side's directory by <dir> in every string, so that file names compare. */
function normalise(v: QmpValue, dir: string): QmpValue {
  if (typeof v === 'string') return v.split(dir).join('<dir>');
  if (Array.isArray(v)) return v.map((x) => normalise(x, dir));
  if (isObj(v)) return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, normalise(x, dir)]));
  return v;
}

/** A node's identity across the two sides: its name, or (automatic names differ) driver and file. */
function nodeKey(n: QmpObject): string {
  const name = String(n['node-name']);
  return name.startsWith('#') ? `auto:${String(n['drv'])}:${String(plainFilename(n['file']))}` : name;
}

/**
 * A QEMU `json:{...}` pseudo-filename (what QEMU reports for a node whose backing was given by
 * node name) as the host file it names: snapstack reports the plain file name there.
 */
function plainFilename(v: QmpValue | undefined): QmpValue {
  if (typeof v !== 'string' || !v.startsWith('json:')) return v ?? null;
  const parsed: unknown = JSON.parse(v.slice('json:'.length));
  const file = typeof parsed === 'object' && parsed !== null && 'file' in parsed ? (parsed as { file: unknown }).file : null;
  const name = typeof file === 'object' && file !== null && 'filename' in file ? (file as { filename: unknown }).filename : null;
  return typeof name === 'string' ? name : v;
}

/** The values both sides must agree on for one BlockDeviceInfo (and its image chain). */
function mustAgree(n: QmpObject, containerSizes: boolean): QmpObject {
  const image = (img: QmpValue | undefined): QmpValue => {
    if (!isObj(img)) return null;
    const snaps = Array.isArray(img['snapshots']) ? img['snapshots'].map((s) => (isObj(s) ? { id: s['id'] ?? null, name: s['name'] ?? null, 'vm-state-size': s['vm-state-size'] ?? null } : null)) : null;
    return {
      filename: plainFilename(img['filename']),
      format: img['format'] ?? null,
      // a protocol node's size is its host file's length: where qcow2 places new clusters
      // and tables is each implementation's own, so it agrees only until the image is changed
      'virtual-size': n['drv'] === 'file' && !containerSizes ? 'not compared' : (img['virtual-size'] ?? null),
      'cluster-size': img['cluster-size'] ?? null,
      'backing-filename': img['backing-filename'] ?? null,
      'format-specific': img['format-specific'] ?? null,
      snapshots: snaps,
      'backing-image': image(img['backing-image']),
    };
  };
  return {
    'node-name': String(n['node-name']).startsWith('#') ? '#auto' : (n['node-name'] ?? null),
    drv: n['drv'] ?? null,
    file: plainFilename(n['file']),
    ro: n['ro'] ?? null,
    backing_file: n['backing_file'] ?? null,
    backing_file_depth: n['backing_file_depth'] ?? null,
    image: image(n['image']),
  };
}

describeQsd('QMP replies compared with qemu-storage-daemon 7.2', () => {
  let root = '';
  let qsdDir = '';
  let ourDir = '';
  let qsd: Qsd | null = null;
  let client: QmpClient | null = null;
  let server: QmpServer | null = null;
  let ourClient: QmpClient | null = null;

  /** snapstack's reply, through its QMP server. */
  async function ours(name: string, args: QmpObject = {}): Promise<Reply> {
    if (ourClient === null) throw new Error('our QMP server is not running');
    return reply(ourClient, name, args);
  }

  /** Runs one command on both sides (each with its own directory in the arguments). */
  async function both(name: string, args: (dir: string) => QmpObject = () => ({})): Promise<{ q: Reply; o: Reply }> {
    if (client === null) throw new Error('QSD is not running');
    const q = await reply(client, name, args(qsdDir));
    const o = await ours(name, args(ourDir));
    const norm = (r: Reply, dir: string): Reply => (r.ok ? { ok: true, value: normalise(r.value, dir) } : { ...r, desc: r.desc.split(dir).join('<dir>') });
    return { q: norm(q, qsdDir), o: norm(o, ourDir) };
  }

  /** Both succeed with replies of the same shape; returns the two values. */
  async function sameShape(name: string, args: (dir: string) => QmpObject = () => ({})): Promise<{ q: QmpValue; o: QmpValue }> {
    const { q, o } = await both(name, args);
    expect(q.ok ? 'ok' : `${q.errorClass}: ${q.desc}`, `QSD's ${name}`).toBe('ok');
    expect(o.ok ? 'ok' : `${o.errorClass}: ${o.desc}`, `snapstack's ${name}`).toBe('ok');
    if (!q.ok || !o.ok) throw new Error('unreachable');
    return { q: q.value, o: o.value };
  }

  /** Both fail with the same class and text. */
  async function sameError(name: string, args: (dir: string) => QmpObject): Promise<void> {
    const { q, o } = await both(name, args);
    expect(q.ok, `QSD's ${name} should fail`).toBe(false);
    expect(o.ok ? { ok: true } : { errorClass: o.errorClass, desc: o.desc }).toEqual(q.ok ? { ok: true } : { errorClass: q.errorClass, desc: q.desc });
  }

  /** query-named-block-nodes on both, as maps from node identity to node. */
  async function nodes(flat: boolean): Promise<{ q: Map<string, QmpObject>; o: Map<string, QmpObject> }> {
    const r = await sameShape('query-named-block-nodes', () => ({ flat }));
    const toMap = (v: QmpValue): Map<string, QmpObject> => new Map((Array.isArray(v) ? v : []).filter(isObj).map((n) => [nodeKey(n), n]));
    return { q: toMap(r.q), o: toMap(r.o) };
  }

  async function compareNodes(flat: boolean, containerSizes = false, roDiffers: readonly string[] = []): Promise<void> {
    const { q, o } = await nodes(flat);
    // the same nodes, in the same order (QEMU lists the newest first)
    expect([...o.keys()]).toEqual([...q.keys()]);
    for (const [key, qn] of q) {
      const on = o.get(key);
      if (on === undefined) continue;
      const diffs: string[] = [];
      shapeDiff(qn, on, key, diffs);
      expect(diffs, `shape of node ${key}${flat ? ' (flat)' : ''}`).toEqual([]);
      const a = mustAgree(on, containerSizes);
      const b = mustAgree(qn, containerSizes);
      if (roDiffers.includes(key)) {
        a['ro'] = 'not compared';
        b['ro'] = 'not compared';
      }
      expect(a, `values of node ${key}${flat ? ' (flat)' : ''}`).toEqual(b);
    }
  }

  beforeAll(async () => {
    root = tempDir('snapstack-qsd-cmp-');
    const seed = path.join(root, 'seed');
    fs.mkdirSync(seed);
    qemu('qemu-img', ['create', '-q', '-f', 'raw', path.join(seed, 'disk.raw'), '1M']);
    qemu('qemu-img', ['create', '-q', '-f', 'raw', path.join(seed, 'other.raw'), '1M']);
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', path.join(seed, 'base.qcow2'), '4M']);
    qemu('qemu-io', ['-c', 'write -P 0x11 0 128k', path.join(seed, 'base.qcow2')]);
    // a relative backing name, so that each copy of the directory is a chain of its own
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', path.join(seed, 'top.qcow2'), '4M']);
    qemu('qemu-io', ['-c', 'write -P 0x22 64k 64k', path.join(seed, 'top.qcow2')]);
    qemu('qemu-img', ['snapshot', '-c', 's1', path.join(seed, 'top.qcow2')]);
    qemu('qemu-io', ['-c', 'write -P 0x33 0 64k', path.join(seed, 'top.qcow2')]);
    qemu('qemu-img', ['snapshot', '-c', 's2', path.join(seed, 'top.qcow2')]);
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', path.join(seed, 'rbase.qcow2'), '2M']);
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'rbase.qcow2', '-F', 'qcow2', path.join(seed, 'rtop.qcow2'), '2M']);
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', path.join(seed, 'ta.qcow2'), '1M']);
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', path.join(seed, 'tb.qcow2'), '1M']);
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', path.join(seed, 'xbase.qcow2'), '2M']);
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'xbase.qcow2', '-F', 'qcow2', path.join(seed, 'xov.qcow2'), '2M']);
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', path.join(seed, 'sbase.qcow2'), '8M']);
    qemu('qemu-io', ['-c', 'write -P 0x44 0 3M', path.join(seed, 'sbase.qcow2')]);
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'sbase.qcow2', '-F', 'qcow2', path.join(seed, 'stop.qcow2'), '8M']);
    qsdDir = path.join(root, 'qsd');
    ourDir = path.join(root, 'ours');
    for (const d of [qsdDir, ourDir]) {
      fs.mkdirSync(d);
      for (const f of fs.readdirSync(seed)) fs.copyFileSync(path.join(seed, f), path.join(d, f));
    }
    qsd = await startQsd(root);
    client = await QmpClient.connect({ path: qsd.socket });
    const ourSocket = path.join(root, 'snapstack.sock');
    server = await QmpServer.listen({ type: 'unix', path: ourSocket }, { commands: qmpCommands({ machine: false }), machine: null, onQuit: () => undefined });
    ourClient = await QmpClient.connect({ path: ourSocket });
  });

  afterAll(async () => {
    await client?.close();
    await ourClient?.close();
    await server?.close();
    await qsd?.stop();
    await withBql((bql) => shutdownIOThreads(bql));
    if (root !== '') fs.rmSync(root, { recursive: true, force: true });
  });

  it('query-version has the same shape, and query-block and query-jobs are empty on both', async () => {
    const v = await sameShape('query-version');
    const diffs: string[] = [];
    shapeDiff(v.q, v.o, 'version', diffs);
    expect(diffs).toEqual([]);
    expect(await sameShape('query-block')).toEqual({ q: [], o: [] });
    expect(await sameShape('query-jobs')).toEqual({ q: [], o: [] });
  });

  it('blockdev-add of a raw image and a qcow2 chain succeeds on both, and the nodes agree', async () => {
    expect(await sameShape('blockdev-add', (d) => ({ driver: 'raw', 'node-name': 'disk', file: { driver: 'file', 'node-name': 'disk-file', filename: path.join(d, 'disk.raw') } }))).toEqual({ q: {}, o: {} });
    expect(await sameShape('blockdev-add', (d) => ({ driver: 'qcow2', 'node-name': 'top', file: { driver: 'file', 'node-name': 'top-file', filename: path.join(d, 'top.qcow2') } }))).toEqual({ q: {}, o: {} });
    await compareNodes(false, true);
    await compareNodes(true, true);
  });

  it('blockdev-add links a backing node given by name, and blockdev-del refuses it while the overlay uses it', async () => {
    expect(await sameShape('blockdev-add', (d) => ({ driver: 'qcow2', 'node-name': 'rb', 'read-only': true, file: { driver: 'file', filename: path.join(d, 'rbase.qcow2') } }))).toEqual({ q: {}, o: {} });
    expect(await sameShape('blockdev-add', (d) => ({ driver: 'qcow2', 'node-name': 'rt', backing: 'rb', file: { driver: 'file', filename: path.join(d, 'rtop.qcow2') } }))).toEqual({ q: {}, o: {} });
    await compareNodes(false, true);
    await sameError('blockdev-del', () => ({ 'node-name': 'rb' }));
    expect(await sameShape('blockdev-del', () => ({ 'node-name': 'rt' }))).toEqual({ q: {}, o: {} });
    expect(await sameShape('blockdev-del', () => ({ 'node-name': 'rb' }))).toEqual({ q: {}, o: {} });
    await compareNodes(false, true);
  });

  it('blockdev-snapshot puts an overlay on a node: the same graph, refusals, and deletes', async () => {
    expect(await sameShape('blockdev-add', (d) => ({ driver: 'qcow2', 'node-name': 'xb', file: { driver: 'file', filename: path.join(d, 'xbase.qcow2') } }))).toEqual({ q: {}, o: {} });
    expect(await sameShape('blockdev-add', (d) => ({ driver: 'qcow2', 'node-name': 'xo', backing: null, file: { driver: 'file', filename: path.join(d, 'xov.qcow2') } }))).toEqual({ q: {}, o: {} });
    await sameError('blockdev-snapshot-sync', (d) => ({ 'snapshot-file': path.join(d, 'never.qcow2') }));
    await sameError('blockdev-snapshot-sync', (d) => ({ 'node-name': 'nosuch', 'snapshot-file': path.join(d, 'never.qcow2') }));
    await sameError('blockdev-snapshot-sync', (d) => ({ 'node-name': 'xb', 'snapshot-file': path.join(d, 'never.qcow2') }));
    await sameError('blockdev-snapshot-sync', (d) => ({ 'node-name': 'xb', 'snapshot-file': path.join(d, 'never.qcow2'), 'snapshot-node-name': 'nv', format: 'raw' }));
    expect(fs.existsSync(path.join(ourDir, 'never.qcow2'))).toBe(false);
    await sameError('blockdev-snapshot', () => ({ node: 'nosuch', overlay: 'xo' }));
    await sameError('blockdev-snapshot', () => ({ node: 'xb', overlay: 'nosuch' }));
    expect(await sameShape('blockdev-snapshot', () => ({ node: 'xb', overlay: 'xo' }))).toEqual({ q: {}, o: {} });
    // QEMU reopens the old node read-only; snapstack keeps it writable (a later block-commit writes into it)
    await compareNodes(false, true, ['xb', 'auto:file:<dir>/xbase.qcow2']);
    const after = await nodes(false);
    expect({ qsd: after.q.get('xb')?.['ro'], snapstack: after.o.get('xb')?.['ro'] }).toEqual({ qsd: true, snapstack: false });
    await sameError('blockdev-snapshot', () => ({ node: 'xb', overlay: 'xo' }));
    await sameError('blockdev-del', () => ({ 'node-name': 'xb' }));
    expect(await sameShape('blockdev-del', () => ({ 'node-name': 'xo' }))).toEqual({ q: {}, o: {} });
    await compareNodes(false, true, ['xb', 'auto:file:<dir>/xbase.qcow2']);
    expect(await sameShape('blockdev-del', () => ({ 'node-name': 'xb' }))).toEqual({ q: {}, o: {} });
  });

  it('transaction: internal snapshots on two nodes all or nothing, with the same errors', async () => {
    for (const n of ['ta', 'tb']) {
      expect(await sameShape('blockdev-add', (d) => ({ driver: 'qcow2', 'node-name': n, file: { driver: 'file', filename: path.join(d, `${n}.qcow2`) } }))).toEqual({ q: {}, o: {} });
    }
    const snap = (device: string, name: string): QmpObject => ({ type: 'blockdev-snapshot-internal-sync', data: { device, name } });
    await sameError('transaction', () => ({ actions: [snap('ta', 't1'), { type: 'abort', data: {} }] }));
    expect(await sameShape('transaction', () => ({ actions: [snap('ta', 't1'), snap('tb', 't1')] }))).toEqual({ q: {}, o: {} });
    await sameError('transaction', () => ({ actions: [snap('ta', 't2'), snap('tb', 't1')] }));
    await sameError('transaction', () => ({ actions: [snap('ta', 't4'), snap('ta', 't4')] }));
    await sameError('transaction', () => ({ actions: [{ type: 'frob', data: {} }] }));
    await sameError('transaction', () => ({ actions: [{ type: 'abort' }] }));
    await sameError('transaction', () => ({ actions: [{ type: 'blockdev-snapshot-internal-sync', data: { device: 'ta' } }] }));
    await sameError('transaction', () => ({ actions: [snap('ta', 't3')], properties: { 'completion-mode': 'grouped' } }));
    await sameError('transaction', () => ({ actions: [snap('nosuch', 't3')] }));
    expect(await sameShape('transaction', () => ({ actions: [] }))).toEqual({ q: {}, o: {} });
    await compareNodes(false);
    for (const n of ['ta', 'tb']) expect(await sameShape('blockdev-del', () => ({ 'node-name': n }))).toEqual({ q: {}, o: {} });
    const names = (f: string): string[] =>
      qemu('qemu-img', ['snapshot', '-l', f])
        .split('\n')
        .slice(2)
        .map((l) => l.trim().split(/\s+/)[1] ?? '')
        .filter((x) => x !== '');
    for (const n of ['ta', 'tb']) {
      expect(names(path.join(ourDir, `${n}.qcow2`))).toEqual(names(path.join(qsdDir, `${n}.qcow2`)));
      expect(names(path.join(ourDir, `${n}.qcow2`))).toEqual(['t1']);
      qemu('qemu-img', ['check', '-q', path.join(ourDir, `${n}.qcow2`)]);
    }
  });

  it('blockdev-add refuses bad options with the same errors', async () => {
    await sameError('blockdev-add', (d) => ({ driver: 'file', 'node-name': 5, filename: path.join(d, 'disk.raw') }));
    await sameError('blockdev-del', () => ({}));
    await sameError('blockdev-del', () => ({ 'node-name': 'x', extra: 1 }));
    await sameError('query-named-block-nodes', () => ({ flat: 'yes' }));
    await sameError('frob', () => ({}));
    await sameError('blockdev-add', (d) => ({ driver: 'file', 'node-name': 'disk', filename: path.join(d, 'disk.raw') }));
    // an internal snapshot of a bare protocol node: QEMU's refusal (a raw format node over it is our extension)
    await sameError('blockdev-snapshot-internal-sync', () => ({ device: 'disk-file', name: 'x' }));
    await sameError('blockdev-add', (d) => ({ driver: 'nope', 'node-name': 'x', filename: path.join(d, 'disk.raw') }));
    await sameError('blockdev-add', (d) => ({ driver: 'file', filename: path.join(d, 'disk.raw') }));
    await sameError('blockdev-add', (d) => ({ 'node-name': 'x', file: { driver: 'file', filename: path.join(d, 'disk.raw') } }));
    await sameError('blockdev-add', (d) => ({ driver: 'file', 'node-name': 'x', filename: path.join(d, 'disk.raw'), bogus: 1 }));
    await sameError('blockdev-add', () => ({ driver: 'file', 'node-name': 'x', filename: 5 }));
    await sameError('blockdev-add', (d) => ({ driver: 'file', 'node-name': 'x', filename: path.join(d, 'disk.raw'), 'read-only': 'on' }));
    await sameError('blockdev-add', (d) => ({ driver: 'file', 'node-name': '3x', filename: path.join(d, 'disk.raw') }));
    await sameError('blockdev-add', (d) => ({ driver: 'file', 'node-name': 'x', filename: path.join(d, 'missing.raw') }));
    await sameError('blockdev-add', (d) => ({ driver: 'raw', 'node-name': 'x', file: { filename: path.join(d, 'disk.raw') } }));
    // the image is open read-write: a second writer is refused by the image lock
    await sameError('blockdev-add', (d) => ({ driver: 'qcow2', 'node-name': 'x', file: { driver: 'file', filename: path.join(d, 'top.qcow2') } }));
    // (an image nobody holds: QEMU checks the format before it takes the image locks, snapstack's
    // file driver locks at open, so with a held image the lock error would come first here)
    await sameError('blockdev-add', (d) => ({ driver: 'qcow2', 'node-name': 'x', file: { driver: 'file', filename: path.join(d, 'other.raw') } }));
    await sameError('blockdev-add', (d) => ({ driver: 'qcow2', 'node-name': 'x', backing: 'nonode', file: { driver: 'file', filename: path.join(d, 'base.qcow2'), locking: 'off' }, 'read-only': true }));
  });

  it('internal snapshots: the same refusals, and the same snapshot lists after create and delete', async () => {
    await sameError('blockdev-snapshot-internal-sync', () => ({ device: 'top', name: 's1' }));
    await sameError('blockdev-snapshot-internal-sync', () => ({ device: 'top', name: '' }));
    await sameError('blockdev-snapshot-internal-sync', () => ({ device: 'nosuch', name: 'x' }));
    await sameError('blockdev-snapshot-internal-sync', () => ({ device: 'top-file', name: 'x' }));
    expect(await sameShape('blockdev-snapshot-internal-sync', () => ({ device: 'top', name: 's3' }))).toEqual({ q: {}, o: {} });
    await compareNodes(false);
    await sameError('blockdev-snapshot-delete-internal-sync', () => ({ device: 'top' }));
    await sameError('blockdev-snapshot-delete-internal-sync', () => ({ device: 'top', name: 'nosuch' }));
    await sameError('blockdev-snapshot-delete-internal-sync', () => ({ device: 'top', id: '9', name: 's1' }));
    await sameError('blockdev-snapshot-delete-internal-sync', () => ({ device: 'nosuch', name: 's1' }));
    for (const args of [{ device: 'top', name: 's3' }, { device: 'top', id: '1' }] as QmpObject[]) {
      const r = await sameShape('blockdev-snapshot-delete-internal-sync', () => args);
      const diffs: string[] = [];
      shapeDiff(r.q, r.o, 'deleted', diffs);
      expect(diffs).toEqual([]);
      const pick = (v: QmpValue): QmpValue => (isObj(v) ? { id: v['id'] ?? null, name: v['name'] ?? null, 'vm-state-size': v['vm-state-size'] ?? null } : null);
      expect(pick(r.o)).toEqual(pick(r.q));
    }
    await compareNodes(false);
  });

  it('block-stream: the same job events, JobInfo and verb refusals once concluded, and the same chain after', async () => {
    if (client === null || ourClient === null) throw new Error('QSD or snapstack is not running');
    expect(await sameShape('blockdev-add', (d) => ({ driver: 'qcow2', 'node-name': 'stop', file: { driver: 'file', filename: path.join(d, 'stop.qcow2') } }))).toEqual({ q: {}, o: {} });
    const seenBefore = client.events.length;
    const ourBefore = ourClient.events.length;
    await sameError('block-stream', () => ({ device: 'nosuch' }));
    await sameError('block-stream', () => ({ device: 'stop', 'base-node': 'nosuch' }));
    await sameError('block-stream', () => ({ device: 'stop', base: 'nofile.qcow2' }));
    await sameError('block-stream', () => ({ device: 'stop', base: 'x', 'base-node': 'disk' }));
    await sameError('block-stream', () => ({ device: 'stop', 'base-node': 'disk' }));
    await sameError('block-commit', () => ({ device: 'nosuch' }));
    await sameError('block-commit', () => ({ device: 'stop', 'base-node': 'disk' }));
    await sameError('block-commit', () => ({ device: 'stop', 'top-node': 'nosuch' }));
    await sameError('block-commit', () => ({ device: 'disk' }));
    expect(await sameShape('block-stream', () => ({ device: 'stop', 'job-id': 'st', 'auto-dismiss': false }))).toEqual({ q: {}, o: {} });
    await client.waitEvent('JOB_STATUS_CHANGE', (e) => e.data?.['status'] === 'concluded', 20_000);
    await ourClient.waitEvent('JOB_STATUS_CHANGE', (e) => e.data?.['status'] === 'concluded', 20_000);
    const ourEvents = ourClient.events.slice(ourBefore).filter((e) => e.event.startsWith('JOB') || e.event.startsWith('BLOCK_JOB'));
    const seq = (list: Array<{ event: string; data?: QmpObject }>): string[] => list.map((e) => (e.event === 'JOB_STATUS_CHANGE' ? String(e.data?.['status']) : e.event));
    const theirEvents = client.events.slice(seenBefore).filter((e) => e.event.startsWith('JOB') || e.event.startsWith('BLOCK_JOB'));
    expect(seq(ourEvents)).toEqual(seq(theirEvents));
    const done = (list: Array<{ event: string; data?: QmpObject }>): QmpValue => {
      const d = list.find((e) => e.event === 'BLOCK_JOB_COMPLETED')?.data;
      return d === undefined ? null : { keys: Object.keys(d).sort(), len: d['len'] ?? null, offset: d['offset'] ?? null, type: d['type'] ?? null, device: d['device'] ?? null };
    };
    expect(done(ourEvents)).toEqual(done(theirEvents));
    const jobs = await sameShape('query-jobs');
    const diffs: string[] = [];
    shapeDiff(jobs.q, jobs.o, 'jobs', diffs);
    expect(diffs).toEqual([]);
    expect(jobs.o).toEqual(jobs.q);
    const bjobs = await sameShape('query-block-jobs');
    const bdiffs: string[] = [];
    shapeDiff(bjobs.q, bjobs.o, 'block-jobs', bdiffs);
    expect(bdiffs).toEqual([]);
    expect(bjobs.o).toEqual(bjobs.q);
    await sameError('block-job-pause', () => ({ device: 'st' }));
    await sameError('block-job-set-speed', () => ({ device: 'st', speed: 0 }));
    await sameError('block-job-cancel', () => ({ device: 'st' }));
    await sameError('job-pause', () => ({ id: 'st' }));
    await sameError('job-complete', () => ({ id: 'st' }));
    await sameError('job-finalize', () => ({ id: 'st' }));
    await sameError('job-cancel', () => ({ id: 'st' }));
    expect(await sameShape('job-dismiss', () => ({ id: 'st' }))).toEqual({ q: {}, o: {} });
    await compareNodes(false);
    expect(await sameShape('blockdev-del', () => ({ 'node-name': 'stop' }))).toEqual({ q: {}, o: {} });
  });

  it('jobs and blockdev-del: the same refusals, then both close every node', async () => {
    expect(await sameShape('query-block-jobs')).toEqual({ q: [], o: [] });
    for (const verb of ['block-job-pause', 'block-job-resume', 'block-job-cancel', 'block-job-complete']) await sameError(verb, () => ({ device: 'nope' }));
    for (const verb of ['block-job-finalize', 'block-job-dismiss']) await sameError(verb, () => ({ id: 'nope' }));
    await sameError('block-job-set-speed', () => ({ device: 'nope', speed: 0 }));
    await sameError('job-cancel', () => ({ id: 'nope' }));
    await sameError('job-dismiss', () => ({ id: 'nope' }));
    await sameError('job-pause', () => ({ id: 'nope' }));
    await sameError('blockdev-del', () => ({ 'node-name': 'nosuch' }));
    await sameError('blockdev-del', () => ({ 'node-name': 'disk-file' }));
    const auto = [...(await nodes(false)).q.values()].find((n) => String(n['node-name']).startsWith('#'));
    expect(auto).toBeDefined();
    if (client === null || auto === undefined) return;
    // an automatic name differs between the two sides: look each one up on its own side
    const ourAuto = [...(await nodes(false)).o.values()].find((n) => nodeKey(n) === nodeKey(auto));
    const q = await reply(client, 'blockdev-del', { 'node-name': String(auto['node-name']) });
    const o = await ours('blockdev-del', { 'node-name': String(ourAuto?.['node-name']) });
    expect(o.ok ? 'ok' : o.desc.replace(/#block\d+/, '#auto')).toBe(q.ok ? 'ok' : q.desc.replace(/#block\d+/, '#auto'));
    for (const name of ['disk', 'top']) expect(await sameShape('blockdev-del', () => ({ 'node-name': name }))).toEqual({ q: {}, o: {} });
    expect(await sameShape('query-named-block-nodes')).toEqual({ q: [], o: [] });
    // qemu-img reads both copies the same way
    for (const d of [qsdDir, ourDir]) qemu('qemu-img', ['check', '-q', path.join(d, 'top.qcow2')]);
    const list = (d: string): string[] =>
      qemu('qemu-img', ['snapshot', '-l', path.join(d, 'top.qcow2')])
        .split('\n')
        .slice(2)
        .filter((l) => l.trim() !== '')
        .map((l) => l.trim().split(/\s+/).slice(0, 2).join(' '));
    expect(list(ourDir)).toEqual(list(qsdDir));
    expect(list(ourDir)).toEqual(['2 s2']);
  });
});

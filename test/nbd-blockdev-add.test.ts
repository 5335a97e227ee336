/**
 * blockdev-add with driver=nbd (QAPI's BlockdevOptionsNbd: `server` a SocketAddress object,
 * `export`, `tls-creds`, `reconnect-delay`, ...), top-level and as a qcow2 node's file, with
 * qemu-storage-daemon 7.2 as the oracle: the same blockdev-add goes to QSD and to snapstack's QMP
 * server against the same qemu-nbd export; the replies must agree (success, or the same error
 * class and text) and so must the shape of query-named-block-nodes.
 */
import type { ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { withBql } from '../src/block/bql.js';
import { shutdownIOThreads } from '../src/block/iothread.js';
import { blockdevOptionsToNodeOptions } from '../src/qmp/blockdev-options.js';
import { QmpClient } from '../src/qmp/client.js';
import { qmpCommands } from '../src/qmp/command-table.js';
import { QmpServer } from '../src/qmp/server.js';
import type { QmpObject, QmpValue } from '../src/qmp/types.js';
import { startDaemon } from './helpers/daemon.js';
import { qemu } from './helpers/qemu.js';
import { describeWithTool, startServer, type ServerProcess } from './nbd-client-helpers.js';
import { describeQsd, isObj, shapeDiff, startQsd, tempDir, type Qsd } from './qmp-helpers.js';

/**
 * Where snapstack's nbd node still differs from QEMU 7.2's (which has neither: block/nbd.c has no
 * bdrv_get_info nor bdrv_get_specific_info): the fix is in src/qmp/blockdev-info.ts and
 * src/drivers/nbd/driver.ts, owned elsewhere.
 */
const KNOWN_SHAPE_DIFFS = ['.image.format-specific: QSD has missing', '.image.dirty-flag: QSD has missing'];

type Reply = { ok: true; value: QmpValue } | { ok: false; errorClass: string; desc: string };

async function reply(client: QmpClient, name: string, args: QmpObject = {}): Promise<Reply> {
  const r = await client.request(name, args);
  const err = r['error'];
  if (isObj(err)) return { ok: false, errorClass: String(err['class']), desc: String(err['desc']) };
  return { ok: true, value: r['return'] ?? null };
}

describe('blockdev-add driver=nbd: translation to node options', () => {
  it('takes server as a SocketAddress object and writes dotted keys (unix and inet)', () => {
    expect(blockdevOptionsToNodeOptions({ driver: 'nbd', 'node-name': 'n', server: { type: 'unix', path: '/s' }, export: 'e', 'reconnect-delay': 3 }, { strict: true })).toEqual({
      driver: 'nbd',
      'node-name': 'n',
      'server.type': 'unix',
      'server.path': '/s',
      export: 'e',
      'reconnect-delay': '3',
    });
    expect(blockdevOptionsToNodeOptions({ driver: 'nbd', 'node-name': 'n', 'server.type': 'inet', 'server.host': 'h', 'server.port': '10809' })).toMatchObject({
      'server.type': 'inet',
      'server.host': 'h',
      'server.port': '10809',
    });
  });

  it('nests it under a format node (file.driver=nbd in the key syntax)', () => {
    expect(blockdevOptionsToNodeOptions({ driver: 'qcow2', 'node-name': 'q', 'file.driver': 'nbd', 'file.server.type': 'unix', 'file.server.path': '/s' })).toEqual({
      driver: 'qcow2',
      'node-name': 'q',
      'file.driver': 'nbd',
      'file.server.type': 'unix',
      'file.server.path': '/s',
    });
  });

  it('refuses what the NBD client cannot do, by name', () => {
    expect(() => blockdevOptionsToNodeOptions({ driver: 'nbd', 'node-name': 'n', server: { type: 'vsock', cid: '3', port: '1' } }, { strict: true })).toThrow(/server\.type.*vsock.*inet or unix/);
    expect(() => blockdevOptionsToNodeOptions({ driver: 'nbd', 'node-name': 'n', server: { type: 'unix', path: '/s' }, 'x-dirty-bitmap': 'b' }, { strict: true })).toThrow(/x-dirty-bitmap/);
  });
});

describeQsd('blockdev-add driver=nbd against qemu-storage-daemon', () => {
  let root = '';
  let qsd: Qsd | null = null;
  let qsdClient: QmpClient | null = null;
  let server: QmpServer | null = null;
  let ourClient: QmpClient | null = null;
  let rawNbd: ServerProcess | null = null;
  let qcowNbd: ServerProcess | null = null;
  let rawSock = '';
  let qcowSock = '';

  async function both(name: string, args: QmpObject): Promise<{ q: Reply; o: Reply }> {
    if (qsdClient === null || ourClient === null) throw new Error('not started');
    return { q: await reply(qsdClient, name, args), o: await reply(ourClient, name, args) };
  }

  /** Both fail with the same class and text. */
  async function sameError(args: QmpObject): Promise<void> {
    const { q, o } = await both('blockdev-add', args);
    expect(q.ok, `QSD's blockdev-add ${JSON.stringify(args)} should fail`).toBe(false);
    expect(o.ok ? { ok: true } : { errorClass: o.errorClass, desc: o.desc }).toEqual(q.ok ? { ok: true } : { errorClass: q.errorClass, desc: q.desc });
  }

  /** Both succeed; the named nodes then have the same shape and the same driver, size and read-only flag. */
  async function sameNodes(args: QmpObject, names: string[]): Promise<void> {
    const { q, o } = await both('blockdev-add', args);
    expect(q.ok ? 'ok' : `${q.errorClass}: ${q.desc}`, "QSD's blockdev-add").toBe('ok');
    expect(o.ok ? 'ok' : `${o.errorClass}: ${o.desc}`, "snapstack's blockdev-add").toBe('ok');
    const list = await both('query-named-block-nodes', { flat: true });
    if (!list.q.ok || !list.o.ok) throw new Error('query-named-block-nodes failed');
    const byName = (v: QmpValue): Map<string, QmpObject> => new Map((Array.isArray(v) ? v : []).filter(isObj).map((n) => [String(n['node-name']), n]));
    const qn = byName(list.q.value);
    const on = byName(list.o.value);
    for (const name of names) {
      const a = qn.get(name);
      const b = on.get(name);
      expect(b, `snapstack lists node ${name}`).toBeDefined();
      expect(a, `QSD lists node ${name}`).toBeDefined();
      const diffs: string[] = [];
      shapeDiff(a, b, name, diffs);
      expect(
        diffs.filter((d) => !KNOWN_SHAPE_DIFFS.some((k) => d.startsWith(`${name}${k}`))),
        `shape of node ${name}`,
      ).toEqual([]);
      const pick = (n: QmpObject | undefined): QmpObject => {
        const img = n?.['image'];
        return { drv: n?.['drv'] ?? null, ro: n?.['ro'] ?? null, size: isObj(img) ? (img['virtual-size'] ?? null) : null, format: isObj(img) ? (img['format'] ?? null) : null };
      };
      expect(pick(b), `values of node ${name}`).toEqual(pick(a));
    }
    const del = await both('blockdev-del', { 'node-name': names[0] ?? '' });
    expect([del.q.ok, del.o.ok]).toEqual([true, true]);
  }

  beforeAll(async () => {
    root = tempDir('snapstack-nbd-bdadd-');
    const raw = path.join(root, 'disk.raw');
    const qcow = path.join(root, 'disk.qcow2');
    qemu('qemu-img', ['create', '-q', '-f', 'raw', raw, '2M']);
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', qcow, '4M']);
    qemu('qemu-io', ['-c', 'write -P 0x5a 0 64k', qcow]);
    rawSock = path.join(root, 'raw.sock');
    qcowSock = path.join(root, 'qcow.sock');
    // -e 4: QSD and snapstack are connected at the same time; the qcow2 file is served as its bytes
    rawNbd = await startServer('qemu-nbd', ['-k', rawSock, '-f', 'raw', '-t', '-e', '4', raw], rawSock);
    qcowNbd = await startServer('qemu-nbd', ['-k', qcowSock, '-f', 'raw', '-t', '-e', '4', '-x', 'q', qcow], qcowSock);
    qsd = await startQsd(root);
    qsdClient = await QmpClient.connect({ path: qsd.socket });
    const ourSocket = path.join(root, 'ours.sock');
    server = await QmpServer.listen({ type: 'unix', path: ourSocket }, { commands: qmpCommands({ machine: false }), machine: null, onQuit: () => undefined });
    ourClient = await QmpClient.connect({ path: ourSocket });
  });

  afterAll(async () => {
    await ourClient?.close();
    await server?.close();
    await qsdClient?.close();
    await qsd?.stop();
    await rawNbd?.stop();
    await qcowNbd?.stop();
    await withBql(async (bql) => shutdownIOThreads(bql));
    fs.rmSync(root, { recursive: true, force: true });
  });

  it('opens an nbd node over a unix socket, as QSD does', async () => {
    await sameNodes({ driver: 'nbd', 'node-name': 'n0', server: { type: 'unix', path: rawSock } }, ['n0']);
  });

  it('opens a qcow2 node over an nbd file node (nested options)', async () => {
    await sameNodes({ driver: 'qcow2', 'node-name': 'q0', file: { driver: 'nbd', 'node-name': 'q0f', server: { type: 'unix', path: qcowSock }, export: 'q' } }, ['q0', 'q0f']);
  });

  it('opens a qcow2 node over an nbd node given by name, read-only', async () => {
    const f = await both('blockdev-add', { driver: 'nbd', 'node-name': 'f1', server: { type: 'unix', path: qcowSock }, export: 'q', 'read-only': true });
    expect([f.q.ok, f.o.ok]).toEqual([true, true]);
    await sameNodes({ driver: 'qcow2', 'node-name': 'q1', file: 'f1', 'read-only': true }, ['q1', 'f1']);
    const del = await both('blockdev-del', { 'node-name': 'f1' });
    expect([del.q.ok, del.o.ok]).toEqual([true, true]);
  });

  it('checks the members as QEMU does', async () => {
    await sameError({ driver: 'nbd', 'node-name': 'e0' });
    await sameError({ driver: 'nbd', 'node-name': 'e0', server: 'x' });
    await sameError({ driver: 'nbd', 'node-name': 'e0', server: {} });
    await sameError({ driver: 'nbd', 'node-name': 'e0', server: { type: 'unix' } });
    await sameError({ driver: 'nbd', 'node-name': 'e0', server: { type: 'unix', path: 7 } });
    await sameError({ driver: 'nbd', 'node-name': 'e0', server: { type: 'unix', path: rawSock, host: 'h' } });
    await sameError({ driver: 'nbd', 'node-name': 'e0', server: { type: 'inet', host: '127.0.0.1' } });
    await sameError({ driver: 'nbd', 'node-name': 'e0', server: { type: 'inet', host: '127.0.0.1', port: 10809 } });
    await sameError({ driver: 'nbd', 'node-name': 'e0', server: { type: 'unix', path: rawSock }, export: 3 });
    await sameError({ driver: 'nbd', 'node-name': 'e0', server: { type: 'unix', path: rawSock }, 'reconnect-delay': '1' });
    await sameError({ driver: 'nbd', 'node-name': 'e0', server: { type: 'unix', path: rawSock }, 'reconnect-delay': -1 });
    await sameError({ driver: 'nbd', 'node-name': 'e0', server: { type: 'unix', path: rawSock }, 'reconnect-delay': 1.5 });
    await sameError({ driver: 'nbd', 'node-name': 'e0', server: { type: 'unix', path: rawSock }, 'open-timeout': 2 ** 32 });
    await sameError({ driver: 'nbd', 'node-name': 'e0', server: { type: 'bogus', path: rawSock } });
    await sameError({ driver: 'nbd', 'node-name': 'e0', server: { type: 5 } });
    await sameError({ driver: 'nbd', 'node-name': 'e0', server: { type: 'unix', path: rawSock }, 'force-share': true });
    await sameError({ driver: 'nbd', 'node-name': 'e0', server: { type: 'unix', path: rawSock }, filename: 'nbd+unix:///?socket=x' });
    await sameError({ driver: 'nbd', server: { type: 'unix', path: rawSock } });
  });

  it('fails to open a missing export or socket, as QSD does (same class)', async () => {
    const cases: QmpObject[] = [
      { driver: 'nbd', 'node-name': 'm0', server: { type: 'unix', path: rawSock }, export: 'nosuch' },
      { driver: 'nbd', 'node-name': 'm0', server: { type: 'unix', path: path.join(root, 'nosuch.sock') } },
    ];
    for (const args of cases) {
      const { q, o } = await both('blockdev-add', args);
      expect(q.ok ? 'ok' : q.errorClass).toBe('GenericError');
      expect(o.ok ? 'ok' : o.errorClass, o.ok ? '' : o.desc).toBe('GenericError');
    }
  });
});

describeWithTool('qemu-nbd', 'apt-get install qemu-utils', 'snapstack daemon --blockdev driver=nbd (dist/: npm run build first)', () => {
  const children: ChildProcess[] = [];
  let dir = '';
  let nbd: ServerProcess | null = null;
  beforeAll(() => {
    dir = tempDir('snapstack-nbd-daemon-');
  });
  afterAll(async () => {
    for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
    await nbd?.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('opens nbd nodes from the key syntax and from JSON (a qcow2 over an nbd file), as QSD takes them', async () => {
    const qcow = path.join(dir, 'disk.qcow2');
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', qcow, '3M']);
    const sock = path.join(dir, 'nbd.sock');
    nbd = await startServer('qemu-nbd', ['-k', sock, '-f', 'raw', '-t', '-e', '4', qcow], sock);
    const pidfile = path.join(dir, 'd.pid');
    const mon = path.join(dir, 'qmp.sock');
    const d = startDaemon(
      [
        '--blockdev',
        `driver=nbd,node-name=n0,server.type=unix,server.path=${sock},read-only=on`,
        '--blockdev',
        JSON.stringify({ driver: 'qcow2', 'node-name': 'q0', file: { driver: 'nbd', server: { type: 'unix', path: sock } } }),
        '--chardev',
        `socket,id=c0,path=${mon},server=on,wait=off`,
        '--monitor',
        'chardev=c0',
        '--pidfile',
        pidfile,
      ],
      dir,
      children,
    );
    const deadline = Date.now() + 15_000;
    while (!fs.existsSync(pidfile)) {
      if (d.proc.exitCode !== null) throw new Error(`the daemon exited (${d.proc.exitCode}): ${d.stderr()}`);
      if (Date.now() > deadline) throw new Error(`the daemon did not start: ${d.stderr()}`);
      await new Promise((r) => setTimeout(r, 25));
    }
    const c = await QmpClient.connect({ path: mon });
    const r = await reply(c, 'query-named-block-nodes', { flat: true });
    await c.close();
    d.proc.kill('SIGTERM');
    expect(await d.exited).toBe(0);
    if (!r.ok) throw new Error(r.desc);
    const list = (Array.isArray(r.value) ? r.value : []).filter(isObj);
    const byName = new Map(list.map((n) => [String(n['node-name']), n]));
    expect(byName.get('n0')).toMatchObject({ drv: 'nbd', ro: true, image: { 'virtual-size': Math.ceil(fs.statSync(qcow).size / 512) * 512 } });
    expect(byName.get('q0')).toMatchObject({ drv: 'qcow2', ro: false, image: { format: 'qcow2', 'virtual-size': 3 * 1024 * 1024 } });
  });
});

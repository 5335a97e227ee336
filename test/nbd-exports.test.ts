/**
 * NBD exports of `snapstack daemon` (bin/snapstack.js, built by `npm run build`): from the command
 * line (--blockdev, --nbd-server, --export) and over QMP (nbd-server-start, block-export-add,
 * query-block-exports, block-export-del safe/hard, nbd-server-stop), read and written by qemu-io
 * and qemu-img through `nbd+unix://`; the error replies compared with qemu-storage-daemon 7.2's;
 * after SIGTERM the image checks clean and is unlocked.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseExportOption, parseNbdServerOption } from '../src/cli/daemon.js';
import { QmpClient } from '../src/qmp/client.js';
import { freePort, startDaemon as startDaemonIn, waitForFile, type Daemon } from './helpers/daemon.js';
import type { QmpObject, QmpValue } from '../src/qmp/types.js';
import { describeNeeding, qemu, qemuStatus } from './helpers/qemu.js';
import { startQsd, tempDir } from './qmp-helpers.js';

const BIN = path.resolve('bin/snapstack.js');
let dir = '';
const children: ChildProcess[] = [];

beforeAll(() => {
  dir = tempDir('snapstack-nbd-exports-');
});
afterAll(() => {
  for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  fs.rmSync(dir, { recursive: true, force: true });
});

const startDaemon = (args: string[]): Daemon => startDaemonIn(args, dir, children);

function url(name: string, socket: string): string {
  return `nbd+unix:///${name}?socket=${socket}`;
}

/** A qcow2 image and a raw twin (the reference) with the same pattern written by qemu-io. */
function makeImage(name: string): { img: string; ref: string } {
  const img = path.join(dir, `${name}.qcow2`);
  const ref = path.join(dir, `${name}.ref.raw`);
  qemu('qemu-img', ['create', '-q', '-f', 'qcow2', img, '4M']);
  qemu('qemu-img', ['create', '-q', '-f', 'raw', ref, '4M']);
  for (const f of [[img, 'qcow2'], [ref, 'raw']] as const) qemu('qemu-io', ['-f', f[1], '-c', 'write -P 0x11 0 1M', f[0]]);
  return { img, ref };
}

/** The same writes, to the export and to the reference. */
function writeBoth(target: string, ref: string): void {
  const cmds = ['-c', 'write -P 0xa5 512k 1M', '-c', 'write -z 3M 64k', '-c', 'write -P 0x3c 4032k 64k'];
  qemu('qemu-io', ['-f', 'raw', ...cmds, target]);
  qemu('qemu-io', ['-f', 'raw', ...cmds, ref]);
}

function errorOf(reply: QmpObject): { class: QmpValue; desc: QmpValue } | null {
  const e = reply['error'];
  if (typeof e !== 'object' || e === null || Array.isArray(e)) return null;
  return { class: e['class'] ?? null, desc: e['desc'] ?? null };
}

describe('the daemon options --nbd-server and --export', () => {
  it('reads a unix and an inet address in keyval and JSON', () => {
    expect(parseNbdServerOption('addr.type=unix,addr.path=/tmp/x.sock')).toEqual({ addr: { type: 'unix', path: '/tmp/x.sock' } });
    expect(parseNbdServerOption('addr.type=inet,addr.host=127.0.0.1,addr.port=10809,max-connections=4')).toEqual({ addr: { type: 'inet', host: '127.0.0.1', port: 10809 }, maxConnections: 4 });
    expect(parseNbdServerOption('{"addr":{"type":"unix","path":"/s"},"max-connections":2}')).toEqual({ addr: { type: 'unix', path: '/s' }, maxConnections: 2 });
  });

  it('refuses a missing address, an unknown key and a bad port with a message naming it', () => {
    expect(() => parseNbdServerOption('max-connections=1')).toThrow("Parameter 'addr' is missing");
    expect(() => parseNbdServerOption('addr.type=unix,addr.path=/s,bogus=1')).toThrow("Parameter 'bogus' is unexpected");
    expect(() => parseNbdServerOption('addr.type=unix')).toThrow("Parameter 'addr.path' is missing");
    expect(() => parseNbdServerOption('addr.type=inet,addr.host=h,addr.port=99999')).toThrow("'addr.port'");
    expect(() => parseNbdServerOption('addr.type=unix,addr.path=/s,max-connections=-1')).toThrow("Parameter 'max-connections' expects uint32");
  });

  it('reads an export with type implied, writable and a name', () => {
    expect(parseExportOption('nbd,id=e0,node-name=d0,name=disk,writable=on,allocation-depth=on')).toEqual({ id: 'e0', nodeName: 'd0', name: 'disk', writable: true, allocationDepth: true });
    expect(parseExportOption('{"type":"nbd","id":"e0","node-name":"d0","writable":false}')).toEqual({ id: 'e0', nodeName: 'd0', writable: false });
    expect(() => parseExportOption('type=fuse,id=e0,node-name=d0')).toThrow("Block export type 'fuse' is not supported");
    expect(() => parseExportOption('type=nbd,node-name=d0')).toThrow("Parameter 'id' is missing");
    expect(() => parseExportOption('type=nbd,id=e0,node-name=d0,writable=maybe')).toThrow("Parameter 'writable' expects 'on' or 'off'");
  });
});

describeNeeding('NBD exports of snapstack daemon, with qemu-io, qemu-img and qemu-storage-daemon', ['qemu-img', 'qemu-io', 'qemu-storage-daemon'], 'apt-get install qemu-utils qemu-system-common', () => {
  it('exports a node from the command line: qemu-io writes, qemu-img compare matches, SIGTERM leaves it clean and unlocked', async () => {
    const { img, ref } = makeImage('cli');
    const nbd = path.join(dir, 'cli-nbd.sock');
    const pidfile = path.join(dir, 'cli.pid');
    const d = startDaemon([
      '--blockdev', `driver=file,filename=${img},node-name=f0`,
      '--blockdev', 'driver=qcow2,file=f0,node-name=d0',
      '--nbd-server', `addr.type=unix,addr.path=${nbd}`,
      '--export', 'type=nbd,id=e0,node-name=d0,name=disk,writable=on',
      '--pidfile', pidfile,
    ]);
    await waitForFile(pidfile, d);
    writeBoth(url('disk', nbd), ref);
    expect(qemuStatus('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', url('disk', nbd), ref])).toMatchObject({ status: 0 });
    // the daemon holds the image's lock while it runs
    expect(qemuStatus('qemu-io', ['-c', 'write 0 512', img]).status).not.toBe(0);
    d.proc.kill('SIGTERM');
    expect(await d.exited).toBe(0);
    expect(d.stderr()).toBe('');
    expect(fs.existsSync(nbd)).toBe(false);
    expect(qemuStatus('qemu-img', ['check', img]).status).toBe(0);
    expect(qemuStatus('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', img, ref])).toMatchObject({ status: 0 });
    expect(qemuStatus('qemu-io', ['-c', 'write 0 512', img]).status).toBe(0);
  });

  it('a read-only export (writable left out) refuses qemu-io writes and serves reads', async () => {
    const { img, ref } = makeImage('ro');
    const nbd = path.join(dir, 'ro-nbd.sock');
    const pidfile = path.join(dir, 'ro.pid');
    const d = startDaemon(['--blockdev', `qcow2,node-name=d0,file.driver=file,file.filename=${img}`, '--nbd-server', `{"addr":{"type":"unix","path":"${nbd}"}}`, '--export', 'nbd,id=e0,node-name=d0', '--pidfile', pidfile]);
    await waitForFile(pidfile, d);
    const w = qemuStatus('qemu-io', ['-f', 'raw', '-c', 'write 0 512', url('d0', nbd)]);
    expect(w.status).not.toBe(0);
    expect(w.stderr).toContain('Permission denied');
    expect(qemuStatus('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', url('d0', nbd), ref])).toMatchObject({ status: 0 });
    d.proc.kill('SIGTERM');
    expect(await d.exited).toBe(0);
  });

  it('serves over TCP with addr.type=inet: qemu-img compare through nbd://127.0.0.1:PORT/NAME', async () => {
    const { img, ref } = makeImage('inet');
    const port = await freePort();
    const pidfile = path.join(dir, 'inet.pid');
    const d = startDaemon(['--blockdev', `qcow2,node-name=d0,file.driver=file,file.filename=${img}`, '--nbd-server', `addr.type=inet,addr.host=127.0.0.1,addr.port=${port}`, '--export', 'nbd,id=e0,node-name=d0,name=tcp,writable=on', '--pidfile', pidfile]);
    await waitForFile(pidfile, d);
    writeBoth(`nbd://127.0.0.1:${port}/tcp`, ref);
    expect(qemuStatus('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', `nbd://127.0.0.1:${port}/tcp`, ref])).toMatchObject({ status: 0 });
    d.proc.kill('SIGTERM');
    expect(await d.exited).toBe(0);
    expect(qemuStatus('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', img, ref])).toMatchObject({ status: 0 });
  });

  it('SIGTERM with a client connected closes the NBD server before the nodes: exit 0, the image clean and holding the client\'s writes', async () => {
    const { img, ref } = makeImage('term');
    const nbd = path.join(dir, 'term-nbd.sock');
    const pidfile = path.join(dir, 'term.pid');
    const d = startDaemon(['--blockdev', `qcow2,node-name=d0,file.driver=file,file.filename=${img}`, '--nbd-server', `addr.type=unix,addr.path=${nbd}`, '--export', 'nbd,id=e0,node-name=d0,writable=on', '--pidfile', pidfile]);
    await waitForFile(pidfile, d);
    qemu('qemu-io', ['-f', 'raw', '-c', 'write -P 0x77 1M 1M', ref]);
    const client = spawn('qemu-io', ['-f', 'raw', '-c', 'write -P 0x77 1M 1M', '-c', 'flush', '-c', 'sleep 20000', url('d0', nbd)], { stdio: 'ignore' });
    children.push(client);
    // qemu-io's own output is buffered in a pipe: a second client sees when the write landed
    const deadline = Date.now() + 15_000;
    for (;;) {
      const r = qemuStatus('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0x77 1M 1M', url('d0', nbd)]);
      if (r.status === 0 && r.stdout.includes('read 1048576/1048576')) break;
      if (Date.now() > deadline) throw new Error(`the client's write did not land: ${r.stdout}${r.stderr}`);
      await new Promise((res) => setTimeout(res, 50));
    }
    d.proc.kill('SIGTERM');
    expect(await d.exited).toBe(0);
    client.kill('SIGKILL');
    expect(qemuStatus('qemu-img', ['check', img]).status).toBe(0);
    expect(qemuStatus('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', img, ref])).toMatchObject({ status: 0 });
    expect(qemuStatus('qemu-io', ['-c', 'write 0 512', img]).status).toBe(0);
  });

  it('fails the startup with the reason when --export comes before --nbd-server', async () => {
    const { img } = makeImage('order');
    const d = startDaemon(['--blockdev', `qcow2,node-name=d0,file.driver=file,file.filename=${img}`, '--export', 'nbd,id=e0,node-name=d0', '--nbd-server', `addr.type=unix,addr.path=${path.join(dir, 'order.sock')}`]);
    expect(await d.exited).toBe(1);
    expect(d.stderr()).toBe('snapstack daemon: --export nbd,id=e0,node-name=d0: NBD server not running\n');
    expect(qemuStatus('qemu-io', ['-c', 'write 0 512', img]).status).toBe(0);
  });

  it('over QMP: start, export, query, blockdev-del refused, safe delete refused with a client, hard delete disconnects it, stop', async () => {
    const { img, ref } = makeImage('qmp');
    const mon = path.join(dir, 'qmp-mon.sock');
    const nbd = path.join(dir, 'qmp-nbd.sock');
    const pidfile = path.join(dir, 'qmp.pid');
    const d = startDaemon(['--blockdev', `driver=file,filename=${img},node-name=f0`, '--blockdev', 'driver=qcow2,file=f0,node-name=d0', '--chardev', `socket,id=c0,path=${mon},server=on,wait=off`, '--monitor', 'c0', '--pidfile', pidfile]);
    await waitForFile(pidfile, d);
    const c = await QmpClient.connect({ path: mon });
    try {
      expect(await c.execute('nbd-server-start', { addr: { type: 'unix', data: { path: nbd } } })).toEqual({});
      expect(await c.execute('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'd0', writable: true, name: 'disk' })).toEqual({});
      expect(await c.execute('query-block-exports')).toEqual([{ id: 'e0', type: 'nbd', 'node-name': 'd0', 'shutting-down': false }]);
      expect(errorOf(await c.request('blockdev-del', { 'node-name': 'd0' }))).toEqual({ class: 'GenericError', desc: 'Node d0 is in use' });
      writeBoth(url('disk', nbd), ref);
      expect(qemuStatus('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', url('disk', nbd), ref])).toMatchObject({ status: 0 });

      // a client that stays connected
      const holder = spawn('qemu-io', ['-f', 'raw', '-c', 'sleep 20000', url('disk', nbd)], { stdio: 'ignore' });
      children.push(holder);
      // give it time to connect: a retry below that removes the export under a connecting client would fail it
      await new Promise((r) => setTimeout(r, 400));
      let safe: QmpObject = {};
      for (let i = 0; i < 200; i++) {
        safe = await c.request('block-export-del', { id: 'e0', mode: 'safe' });
        if (errorOf(safe) !== null) break;
        // the client had not connected yet: the export is gone, add it back and try again
        await c.execute('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'd0', writable: true, name: 'disk' });
        await new Promise((r) => setTimeout(r, 25));
      }
      expect(errorOf(safe)).toEqual({ class: 'GenericError', desc: "export 'e0' still in use" });
      expect(await c.execute('query-block-exports')).toHaveLength(1);
      const deleted = c.waitEvent('BLOCK_EXPORT_DELETED', (e) => e.data?.['id'] === 'e0');
      expect(await c.execute('block-export-del', { id: 'e0', mode: 'hard' })).toEqual({});
      await deleted;
      // qemu-io notices the disconnect only after its sleep: it is not waited for
      holder.kill('SIGKILL');
      expect(await c.execute('query-block-exports')).toEqual([]);
      expect(qemuStatus('qemu-io', ['-f', 'raw', '-c', 'read 0 512', url('disk', nbd)]).status).not.toBe(0);

      // nbd-server-stop removes the exports left
      expect(await c.execute('block-export-add', { type: 'nbd', id: 'e1', 'node-name': 'd0' })).toEqual({});
      const gone = c.waitEvent('BLOCK_EXPORT_DELETED', (e) => e.data?.['id'] === 'e1');
      expect(await c.execute('nbd-server-stop')).toEqual({});
      await gone;
      expect(await c.execute('query-block-exports')).toEqual([]);
      expect(fs.existsSync(nbd)).toBe(false);
      expect(await c.execute('blockdev-del', { 'node-name': 'd0' })).toEqual({});
    } finally {
      await c.close();
    }
    d.proc.kill('SIGTERM');
    expect(await d.exited).toBe(0);
    expect(qemuStatus('qemu-img', ['check', img]).status).toBe(0);
    expect(qemuStatus('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', img, ref])).toMatchObject({ status: 0 });
  });

  it('answers a sequence of export commands with the replies and errors of qemu-storage-daemon 7.2', async () => {
    const sequence = (nbd: string): Array<[string, QmpObject | undefined]> => [
      ['block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'd0' }],
      ['nbd-server-stop', undefined],
      ['block-export-del', { id: 'e0' }],
      ['block-export-add', { type: 'nbd', id: 'e9', 'node-name': 'ro', writable: true }],
      ['block-export-add', { type: 'nbd', id: 'e9', 'node-name': 'nope' }],
      ['nbd-server-start', { addr: { type: 'unix', path: nbd } }],
      ['nbd-server-start', { addr: { type: 'unix', data: { path: nbd } }, 'tls-creds': 'x' }],
      ['nbd-server-start', { addr: { type: 'unix', data: { path: nbd } } }],
      ['nbd-server-start', { addr: { type: 'unix', data: { path: `${nbd}.2` } } }],
      ['block-export-add', { type: 'nbd', id: 'bad id', 'node-name': 'd0' }],
      ['block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'nope' }],
      ['block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'd0', writable: true }],
      ['block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'ro' }],
      ['block-export-add', { type: 'nbd', id: 'e1', 'node-name': 'd0' }],
      ['block-export-add', { type: 'nbd', id: 'e2', 'node-name': 'ro', writable: true }],
      ['block-export-add', { type: 'nbd', id: 'e3', 'node-name': 'ro', iothread: 'nope' }],
      ['block-export-add', { type: 'nbd', id: 'e4', 'node-name': 'ro', name: 'other', description: 'a disk' }],
      ['query-block-exports', undefined],
      ['blockdev-del', { 'node-name': 'd0' }],
      ['block-export-del', { id: 'nope' }],
      ['block-export-del', { id: 'e4', mode: 'safe' }],
      ['query-block-exports', undefined],
      ['nbd-server-stop', undefined],
      ['query-block-exports', undefined],
      ['nbd-server-stop', undefined],
    ];
    const run = async (socket: string, nbd: string): Promise<QmpValue[]> => {
      const c = await QmpClient.connect({ path: socket });
      try {
        const out: QmpValue[] = [];
        for (const [cmd, args] of sequence(nbd)) {
          const reply = await c.request(cmd, args);
          out.push(errorOf(reply) ?? reply['return'] ?? null);
        }
        return out;
      } finally {
        await c.close();
      }
    };
    const blockdevs = (tag: string): string[] => {
      const { img } = makeImage(`seq-${tag}`);
      const raw = path.join(dir, `seq-${tag}.raw`);
      qemu('qemu-img', ['create', '-q', '-f', 'raw', raw, '1M']);
      return ['--blockdev', `driver=file,filename=${img},node-name=f0`, '--blockdev', 'driver=qcow2,file=f0,node-name=d0', '--blockdev', `driver=file,filename=${raw},node-name=ro,read-only=on`];
    };
    const qdir = tempDir('snapstack-nbd-exports-qsd-');
    const qsd = await startQsd(qdir, blockdevs('qsd'));
    let theirs: QmpValue[];
    try {
      theirs = await run(qsd.socket, path.join(qdir, 'n.sock'));
    } finally {
      await qsd.stop();
      fs.rmSync(qdir, { recursive: true, force: true });
    }
    const mon = path.join(dir, 'seq-mon.sock');
    const pidfile = path.join(dir, 'seq.pid');
    const d = startDaemon([...blockdevs('ours'), '--chardev', `socket,id=c0,path=${mon},server=on,wait=off`, '--monitor', 'c0', '--pidfile', pidfile]);
    await waitForFile(pidfile, d);
    const ours = await run(mon, path.join(dir, 'seq-n.sock'));
    d.proc.kill('SIGTERM');
    expect(await d.exited).toBe(0);
    expect(ours).toEqual(theirs);
    // what the sequence pins down, in case both change together
    expect(theirs[0]).toEqual({ class: 'GenericError', desc: 'NBD server not running' });
    expect(theirs[18]).toEqual({ class: 'GenericError', desc: 'Node d0 is in use' });
  });

  it('sends BLOCK_EXPORT_DELETED for block-export-del, nbd-server-stop and the exports left at quit, as qemu-storage-daemon 7.2 does', async () => {
    const lines = (nbd: string): string[] => [
      { execute: 'qmp_capabilities' },
      { execute: 'nbd-server-start', arguments: { addr: { type: 'unix', data: { path: nbd } } } },
      { execute: 'block-export-add', arguments: { type: 'nbd', id: 'e0', 'node-name': 'f0' } },
      { execute: 'block-export-del', arguments: { id: 'e0' } },
      { execute: 'block-export-add', arguments: { type: 'nbd', id: 'e1', 'node-name': 'f0' } },
      { execute: 'block-export-del', arguments: { id: 'e1', mode: 'hard' } },
      { execute: 'block-export-add', arguments: { type: 'nbd', id: 'e2', 'node-name': 'f0' } },
      { execute: 'nbd-server-stop' },
      { execute: 'nbd-server-start', arguments: { addr: { type: 'unix', data: { path: nbd } } } },
      { execute: 'block-export-add', arguments: { type: 'nbd', id: 'e3', 'node-name': 'f0' } },
      { execute: 'quit' },
    ].map((o) => JSON.stringify(o));
    /** Sends the lines one at a time (each after the previous reply) and lists what came back until the close. */
    const session = (socket: string, nbd: string): Promise<string[]> =>
      new Promise((resolve, reject) => {
        const todo = lines(nbd);
        const got: string[] = [];
        let buf = '';
        const c = net.connect({ path: socket });
        c.setEncoding('utf8');
        // a peer that quits may reset the connection instead of closing it: after quit, that is the end
        c.on('error', (e) => (todo.length === 0 ? resolve(got) : reject(e)));
        c.on('data', (d: string) => {
          buf += d;
          for (let i = buf.indexOf('\n'); i >= 0; i = buf.indexOf('\n')) {
            const msg = JSON.parse(buf.slice(0, i)) as QmpObject;
            buf = buf.slice(i + 1);
            if ('QMP' in msg) got.push('greeting');
            else if ('event' in msg) got.push(`event ${String(msg['event'])} ${JSON.stringify(msg['data'] ?? null)}`);
            else got.push('error' in msg ? 'error' : 'return');
            if (!('event' in msg)) {
              const next = todo.shift();
              if (next !== undefined) c.write(`${next}\n`);
            }
          }
        });
        c.on('close', () => resolve(got));
      });
    const raw = (tag: string): string => {
      const f = path.join(dir, `ev-${tag}.raw`);
      qemu('qemu-img', ['create', '-q', '-f', 'raw', f, '1M']);
      return f;
    };
    const qdir = tempDir('snapstack-nbd-exports-qsd-');
    const qsd = await startQsd(qdir, ['--blockdev', `driver=file,node-name=f0,filename=${raw('qsd')}`]);
    const theirs = await session(qsd.socket, path.join(qdir, 'n.sock'));
    await qsd.stop().catch(() => undefined);
    fs.rmSync(qdir, { recursive: true, force: true });
    const mon = path.join(dir, 'ev-mon.sock');
    const pidfile = path.join(dir, 'ev.pid');
    const d = startDaemon(['--blockdev', `driver=file,node-name=f0,filename=${raw('ours')}`, '--chardev', `socket,id=c0,path=${mon},server=on,wait=off`, '--monitor', 'c0', '--pidfile', pidfile]);
    await waitForFile(pidfile, d);
    const ours = await session(mon, path.join(dir, 'ev-n.sock'));
    expect(await d.exited).toBe(0);
    // QEMU deletes an export in a bottom half, so whether its event comes before or after the
    // command's reply depends on timing there (paced like this, QSD sends a safe delete's event
    // first; batched, after): the replies and the events are compared each in their own order
    const replies = (l: string[]): string[] => l.filter((x) => !x.startsWith('event'));
    const events = (l: string[]): string[] => l.filter((x) => x.startsWith('event'));
    expect(replies(ours)).toEqual(replies(theirs));
    expect(events(ours)).toEqual(events(theirs));
    expect(events(theirs).length).toBe(4);
    // ours: always after the reply of the command that removed the export
    expect(ours.indexOf('event BLOCK_EXPORT_DELETED {"id":"e0"}')).toBe(5);
  });

  it('keeps exports out of query-block and names the overlay after blockdev-snapshot, as qemu-storage-daemon 7.2', async () => {
    const sequence = (nbd: string, overlay: string): Array<[string, QmpObject | undefined]> => [
      ['nbd-server-start', { addr: { type: 'unix', data: { path: nbd } } }],
      ['block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'd0', writable: true }],
      ['query-block', undefined],
      ['blockdev-add', { driver: 'qcow2', 'node-name': 'ov0', file: { driver: 'file', filename: overlay }, backing: null }],
      ['blockdev-snapshot', { node: 'd0', overlay: 'ov0' }],
      ['query-block-exports', undefined],
      ['query-block', undefined],
      ['block-export-del', { id: 'e0', mode: 'hard' }],
      ['nbd-server-stop', undefined],
    ];
    const run = async (socket: string, nbd: string, overlay: string): Promise<QmpValue[]> => {
      const c = await QmpClient.connect({ path: socket });
      try {
        const out: QmpValue[] = [];
        for (const [cmd, args] of sequence(nbd, overlay)) {
          const reply = await c.request(cmd, args);
          out.push(errorOf(reply) ?? reply['return'] ?? null);
        }
        return out;
      } finally {
        await c.close();
      }
    };
    const setUp = (tag: string): { args: string[]; overlay: string } => {
      const { img } = makeImage(`snap-${tag}`);
      const overlay = path.join(dir, `snap-${tag}-ov.qcow2`);
      qemu('qemu-img', ['create', '-q', '-f', 'qcow2', overlay, '4M']);
      return { args: ['--blockdev', `driver=file,filename=${img},node-name=f0`, '--blockdev', 'driver=qcow2,file=f0,node-name=d0'], overlay };
    };
    const qdir = tempDir('snapstack-nbd-exports-qsd-');
    const q = setUp('qsd');
    const qsd = await startQsd(qdir, q.args);
    let theirs: QmpValue[];
    try {
      theirs = await run(qsd.socket, path.join(qdir, 'n.sock'), q.overlay);
    } finally {
      await qsd.stop();
      fs.rmSync(qdir, { recursive: true, force: true });
    }
    const o = setUp('ours');
    const mon = path.join(dir, 'snap-mon.sock');
    const pidfile = path.join(dir, 'snap.pid');
    const d = startDaemon([...o.args, '--chardev', `socket,id=c0,path=${mon},server=on,wait=off`, '--monitor', 'c0', '--pidfile', pidfile]);
    await waitForFile(pidfile, d);
    const ours = await run(mon, path.join(dir, 'snap-n.sock'), o.overlay);
    d.proc.kill('SIGTERM');
    expect(await d.exited).toBe(0);
    expect(ours).toEqual(theirs);
    expect(theirs[2]).toEqual([]);
    expect(theirs[5]).toEqual([{ id: 'e0', type: 'nbd', 'node-name': 'ov0', 'shutting-down': false }]);
  });
});

/**
 * NBD over TLS from the command lines: `snapstack nbd --object tls-creds-x509,... --tls-creds ID`
 * (qemu-nbd's spelling) and `snapstack daemon --object tls-creds-x509,... --nbd-server
 * ...,tls-creds=ID`, and QMP nbd-server-start with tls-creds, read and written by qemu-img and
 * qemu-io with TLS; plaintext clients refused (and logged); the option errors name what is wrong.
 * Runs bin/snapstack.js on dist/ (npm run build first).
 */
import { spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { QmpClient } from '../src/qmp/client.js';
import { startDaemon } from './helpers/daemon.js';
import { describeNeeding } from './helpers/qemu.js';
import { waitForListening } from './helpers/socket.js';
import { startServer, type ServerProcess } from './nbd-client-helpers.js';
import { makeTlsDirs, type TlsDirs } from './nbd-tls-helpers.js';
import { toolStatus } from './helpers/tool-status.js';

const BIN = path.resolve('bin/snapstack.js');
let dir: string;
let certs: TlsDirs;
const procs: ServerProcess[] = [];
const children: ChildProcess[] = [];


function tlsImageOpts(socket: string, exportName: string): string[] {
  return ['--object', `tls-creds-x509,id=tls0,dir=${certs.client},endpoint=client`, '--image-opts', `driver=nbd,server.type=unix,server.path=${socket},export=${exportName},tls-creds=tls0,tls-hostname=localhost`];
}

function snapstack(args: string[]): { status: number | null; stderr: string } {
  const r = spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8', timeout: 20_000 });
  return { status: r.status, stderr: r.stderr };
}

describeNeeding('NBD over TLS from the command line', ['qemu-img', 'qemu-io', 'nbdcopy'], 'apt-get install qemu-utils libnbd-bin', () => {
  beforeAll(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-nbd-tls-cli-'));
    certs = makeTlsDirs(path.join(dir, 'certs'));
  });
  afterAll(async () => {
    for (const p of procs) await p.stop();
    for (const c of children) if (c.exitCode === null) c.kill('SIGKILL');
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('snapstack nbd --object tls-creds-x509 --tls-creds serves qemu-io over TLS and refuses plaintext', async () => {
    const file = path.join(dir, 'nbd.qcow2');
    expect(spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', file, '4M']).status).toBe(0);
    const s = path.join(dir, 'nbd.sock');
    const srv = await startServer(process.execPath, [BIN, 'nbd', '--object', `tls-creds-x509,id=tls0,dir=${certs.server},endpoint=server`, '--tls-creds', 'tls0', '-t', '-f', 'qcow2', '-x', 'e', '-k', s, file], s);
    procs.push(srv);
    let err = '';
    srv.proc.stderr?.on('data', (b: Buffer) => (err += b.toString()));
    const w = await toolStatus('qemu-io', ['-c', 'write -P 0x6b 4096 65536', '-c', 'read -P 0x6b 4096 65536', ...tlsImageOpts(s, 'e')]);
    expect(w, w.stderr).toMatchObject({ code: 0 });
    expect(w.stdout).toMatch(/read 65536\/65536 bytes/);
    // snapstack io and img as the TLS clients (qemu-io's and qemu-img's --object / --image-opts)
    const ours = ['--object', `tls-creds-x509,id=c0,dir=${certs.client},endpoint=client`, '--image-opts', `driver=nbd,server.type=unix,server.path=${s},export=e,tls-creds=c0`];
    const io = await toolStatus(process.execPath, [BIN, 'io', ...ours, '-c', 'read -P 0x6b 4096 65536', '-c', 'write -P 0x6c 131072 4096']);
    expect(io, io.stderr).toMatchObject({ code: 0 });
    const info = await toolStatus(process.execPath, [BIN, 'img', 'info', ...ours]);
    expect(info, info.stderr).toMatchObject({ code: 0, stdout: expect.stringMatching(/virtual size: 4 MiB/) });
    const noCreds = await toolStatus(process.execPath, [BIN, 'io', `nbd+unix:///e?socket=${s}`, '-c', 'read 0 512']);
    expect(noCreds.stderr).toMatch(/requires TLS.*tls-creds=ID/);
    const plain = await toolStatus('qemu-img', ['info', `nbd+unix:///e?socket=${s}`]);
    expect(plain.code).not.toBe(0);
    expect(plain.stderr).toMatch(/TLS negotiation required/);
    await new Promise((r) => setTimeout(r, 100));
    expect(err).toMatch(/without TLS; refused with NBD_REP_ERR_TLS_REQD/);
    // nbdcopy over TLS from a one-connection server (qemu-nbd's default --shared=1: no
    // CAN_MULTI_CONN, so nbdcopy does not wait for connections the server would not serve)
    const copy = path.join(dir, 'nbd-copy.raw');
    const cp = await toolStatus('timeout', ['20', 'nbdcopy', `nbds+unix:///e?socket=${s}&tls-certificates=${certs.client}`, copy]);
    expect(cp, cp.stderr).toMatchObject({ code: 0 });
    expect(fs.readFileSync(copy).subarray(4096, 4096 + 65536).every((b) => b === 0x6b)).toBe(true);
    await srv.stop();
    // the data is in the image
    const check = spawnSync('qemu-io', ['-f', 'qcow2', '-c', 'read -P 0x6b 4096 65536', '-c', 'read -P 0x6c 131072 4096', file], { encoding: 'utf8' });
    expect(check.stdout).toMatch(/read 65536\/65536 bytes/);
    expect(check.stdout).toMatch(/read 4096\/4096 bytes/);
  });

  it('snapstack nbd names a missing certificate file, an unknown id, a client endpoint, and refuses --tls-authz', () => {
    const img = path.join(dir, 'x.raw');
    fs.writeFileSync(img, Buffer.alloc(65536));
    const empty = path.join(dir, 'empty');
    fs.mkdirSync(empty, { recursive: true });
    const s = path.join(dir, 'never.sock');
    expect(snapstack(['nbd', '--object', `tls-creds-x509,id=t,dir=${empty},endpoint=server`, '--tls-creds', 't', '-k', s, img])).toMatchObject({ status: 1, stderr: expect.stringContaining(`Unable to access credentials ${empty}/ca-cert.pem: No such file or directory`) });
    expect(snapstack(['nbd', '--tls-creds', 'nope', '-k', s, img])).toMatchObject({ status: 1, stderr: expect.stringContaining("No TLS credentials with id 'nope'") });
    expect(snapstack(['nbd', '--object', `tls-creds-x509,id=t,dir=${certs.client},endpoint=client`, '--tls-creds', 't', '-k', s, img])).toMatchObject({ status: 1, stderr: expect.stringContaining('Expected TLS credentials for a server endpoint') });
    expect(snapstack(['nbd', '--tls-authz', 'a', '-k', s, img])).toMatchObject({ status: 1, stderr: expect.stringContaining('--tls-authz is not supported') });
    expect(snapstack(['nbd', '--help']).status).toBe(0);
    expect(spawnSync(process.execPath, [BIN, 'nbd', '--help'], { encoding: 'utf8' }).stdout).toMatch(/--tls-creds=ID/);
  });

  it('the daemon serves a TLS export from --object and --nbd-server tls-creds; QMP object-add/-del and nbd-server-start take tls-creds', async () => {
    const file = path.join(dir, 'd.qcow2');
    expect(spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', file, '4M']).status).toBe(0);
    const nbd = path.join(dir, 'd-nbd.sock');
    const qmp = path.join(dir, 'd-qmp.sock');
    const d = startDaemon(
      [
        '--object',
        `tls-creds-x509,id=tls0,dir=${certs.server},endpoint=server`,
        '--blockdev',
        `driver=file,node-name=f,filename=${file}`,
        '--blockdev',
        'driver=qcow2,node-name=q,file=f',
        '--nbd-server',
        `addr.type=unix,addr.path=${nbd},tls-creds=tls0`,
        '--export',
        'type=nbd,id=e,node-name=q,name=disk,writable=on',
        '--chardev',
        `socket,id=c0,path=${qmp},server=on,wait=off`,
        '--monitor',
        'chardev=c0',
      ],
      dir,
      children,
    );
    await waitForListening(nbd, d.proc, 'snapstack daemon', d.stderr);
    const w = await toolStatus('qemu-io', ['-c', 'write -P 0x3c 0 8192', '-c', 'read -P 0x3c 0 8192', ...tlsImageOpts(nbd, 'disk')]);
    expect(w, w.stderr + d.stderr()).toMatchObject({ code: 0 });
    expect((await toolStatus('qemu-img', ['info', `nbd+unix:///disk?socket=${nbd}`])).stderr).toMatch(/TLS negotiation required/);
    // QMP: stop, start again with tls-creds, export again
    await waitForListening(qmp, d.proc, 'snapstack daemon QMP', d.stderr);
    const c = await QmpClient.connect({ path: qmp });
    await c.execute('nbd-server-stop');
    await expect(c.execute('nbd-server-start', { addr: { type: 'unix', data: { path: nbd } }, 'tls-creds': 'nope' })).rejects.toThrow("No TLS credentials with id 'nope'");
    await expect(c.execute('nbd-server-start', { addr: { type: 'unix', data: { path: nbd } }, 'tls-creds': 'tls0', 'tls-authz': 'a' })).rejects.toThrow(/tls-authz is not supported/);
    // object-add / object-del of TLS credentials
    await expect(c.execute('object-add', { 'qom-type': 'tls-creds-x509', id: 'tls1', dir: path.join(dir, 'nowhere'), endpoint: 'server' })).rejects.toThrow(/Unable to access credentials .*nowhere\/ca-cert\.pem/);
    await expect(c.execute('object-add', { 'qom-type': 'secret', id: 's0' })).rejects.toThrow(/not supported/);
    await c.execute('object-add', { 'qom-type': 'tls-creds-x509', id: 'tls1', dir: certs.server, endpoint: 'server', 'verify-peer': true });
    await expect(c.execute('object-add', { 'qom-type': 'tls-creds-x509', id: 'tls1', dir: certs.server, endpoint: 'server' })).rejects.toThrow(/duplicate/);
    await c.execute('object-del', { id: 'tls0' });
    await expect(c.execute('object-del', { id: 'tls0' })).rejects.toThrow("object 'tls0' not found");
    await expect(c.execute('nbd-server-start', { addr: { type: 'unix', data: { path: nbd } }, 'tls-creds': 'tls0' })).rejects.toThrow("No TLS credentials with id 'tls0'");
    await c.execute('nbd-server-start', { addr: { type: 'unix', data: { path: nbd } }, 'tls-creds': 'tls1' });
    await c.execute('block-export-add', { type: 'nbd', id: 'e2', 'node-name': 'q', name: 'disk' });
    const r = await toolStatus('qemu-io', ['-r', '-c', 'read -P 0x3c 0 8192', ...tlsImageOpts(nbd, 'disk')]);
    expect(r, r.stderr + d.stderr()).toMatchObject({ code: 0 });
    expect((await toolStatus('qemu-img', ['info', `nbd+unix:///disk?socket=${nbd}`])).stderr).toMatch(/TLS negotiation required/);
    await c.execute('quit').catch(() => undefined);
    await c.close();
    expect(await d.exited).toBe(0);
  });

  it('the daemon names a missing certificate file of --object tls-creds-x509', async () => {
    const d = startDaemon(['--object', `tls-creds-x509,id=t,dir=${path.join(dir, 'nowhere')},endpoint=server`], dir, children);
    expect(await d.exited).toBe(1);
    expect(d.stderr()).toContain(`Unable to access credentials ${path.join(dir, 'nowhere')}/ca-cert.pem: No such file or directory`);
  });
});

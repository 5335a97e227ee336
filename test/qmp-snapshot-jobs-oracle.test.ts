/**
 * snapshot-save / snapshot-load / snapshot-delete against QEMU 7.2 itself: Debian's
 * qemu-system-x86_64 (`-machine none`, two qcow2 blockdevs, QMP on a unix socket) and our QMP
 * server over a machine with two disks get the same command sequence on copies of the same
 * images. Compared: the events each job raises (JOB_STATUS_CHANGE statuses, STOP, RESUME) in
 * order, query-jobs' JobInfo shapes and error texts, command errors; afterwards qemu-img lists the
 * same snapshots on both sets of images and checks them clean.
 *
 * One deliberate difference is asserted as such: a snapshot-load whose tag does not exist leaves
 * QEMU's machine stopped (STOP and no RESUME); ours changed nothing and keeps running.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { shutdownIOThreads, withBql } from '../src/index.js';
import { Machine } from '../src/machine/machine.js';
import { QmpClient, type QmpEvent } from '../src/qmp/client.js';
import { qmpCommands } from '../src/qmp/command-table.js';
import { QmpServer } from '../src/qmp/server.js';
import type { QmpObject, QmpValue } from '../src/qmp/types.js';
import { describeNeeding } from './helpers/qemu.js';
import { startQemuSystem } from './qmp-helpers.js';

const QEMU = 'qemu-system-x86_64';
const describeQemuSystem = (name: string, fn: () => void): void => describeNeeding(name, [QEMU, 'qemu-img'], 'apt-get install qemu-system-x86 qemu-utils', fn);

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** One peer under test: its client, and what to do at the end. */
interface Peer {
  client: QmpClient;
  dir: string;
  stop(): Promise<void>;
}

async function startQemu(dir: string): Promise<Peer> {
  const blockdevs = ['a', 'b'].flatMap((n) => ['-blockdev', `driver=file,node-name=f${n},filename=${path.join(dir, `${n}.qcow2`)}`, '-blockdev', `driver=qcow2,node-name=${n},file=f${n}`]);
  const q = await startQemuSystem(['-machine', 'none', '-nodefaults', '-display', 'none', '-accel', 'tcg', ...blockdevs], path.join(dir, 'qemu.sock'));
  return { ...q, dir };
}

async function startOurs(dir: string): Promise<Peer> {
  const m = new Machine({ guest: false, vcpus: 1, ramBytes: 4 * 1024 * 1024 });
  await withBql(async (bql) => {
    for (const n of ['a', 'b']) await m.addDrive(bql, `file=${path.join(dir, `${n}.qcow2`)},format=qcow2,id=${n},node-name=${n}`);
    await m.start(bql);
  });
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

/** The events from `since` on, as `EVENT` or `JOB_STATUS_CHANGE:status`, for one job (or the machine). */
function trace(events: readonly QmpEvent[], jobId: string): string[] {
  return events
    .filter((e) => e.event !== 'JOB_STATUS_CHANGE' || (e.data?.['id'] ?? null) === jobId)
    .filter((e) => ['JOB_STATUS_CHANGE', 'STOP', 'RESUME'].includes(e.event))
    .map((e) => (e.event === 'JOB_STATUS_CHANGE' ? `status:${String(e.data?.['status'])}` : e.event));
}

/** The value's shape: object keys (sorted) with their shapes, element shapes, JSON types. */
function shape(v: QmpValue): unknown {
  if (Array.isArray(v)) return v.map(shape);
  if (v !== null && typeof v === 'object') return Object.fromEntries(Object.keys(v).sort().map((k) => [k, shape(v[k] ?? null)]));
  return v === null ? 'null' : typeof v;
}

/** Runs one job command and waits for its job to conclude; returns its events and JobInfo. */
async function runJob(peer: Peer, command: string, args: QmpObject): Promise<{ events: string[]; info: QmpObject; error: string | null }> {
  const id = String(args['job-id']);
  const from = peer.client.events.length;
  const seen = (): QmpEvent[] => peer.client.events.slice(from);
  await peer.client.execute(command, args);
  for (let i = 0; i < 1000; i++) {
    if (seen().some((e) => e.event === 'JOB_STATUS_CHANGE' && e.data?.['id'] === id && e.data['status'] === 'concluded')) break;
    await sleep(10);
  }
  await sleep(50); // a late RESUME
  const jobs = (await peer.client.execute('query-jobs')) as QmpObject[];
  const info = jobs.find((j) => j['id'] === id);
  if (info === undefined) throw new Error(`no job ${id}`);
  await peer.client.execute('job-dismiss', { id });
  return { events: trace(seen(), id), info, error: typeof info['error'] === 'string' ? info['error'] : null };
}

function snapshotNames(file: string): string[] {
  const r = spawnSync('qemu-img', ['snapshot', '-l', '-U', file], { encoding: 'utf8' });
  return r.stdout
    .split('\n')
    .slice(2)
    .map((l) => l.trim().split(/\s+/)[1] ?? '')
    .filter((n) => n !== '');
}

describeQemuSystem('snapshot jobs against qemu-system-x86_64 7.2', () => {
  let base: string;
  const peers: Record<'qemu' | 'ours', Peer | null> = { qemu: null, ours: null };
  beforeAll(async () => {
    base = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-qmp-snapjobs-'));
    for (const who of ['qemu', 'ours'] as const) {
      const dir = path.join(base, who);
      fs.mkdirSync(dir);
      for (const n of ['a', 'b']) spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', path.join(dir, `${n}.qcow2`), '64M']);
    }
    peers.qemu = await startQemu(path.join(base, 'qemu'));
    peers.ours = await startOurs(path.join(base, 'ours'));
  });
  afterAll(async () => {
    for (const p of Object.values(peers)) await p?.stop();
    await withBql((bql) => shutdownIOThreads(bql));
    fs.rmSync(base, { recursive: true, force: true });
  });

  const steps: Array<[string, string, QmpObject]> = [
    ['save', 'snapshot-save', { 'job-id': 's1', tag: 't1', vmstate: 'a', devices: ['a', 'b'] }],
    ['save over an existing tag', 'snapshot-save', { 'job-id': 's2', tag: 't1', vmstate: 'a', devices: ['a'] }],
    ['save to an unknown device', 'snapshot-save', { 'job-id': 'e1', tag: 'x', vmstate: 'a', devices: ['nosuch'] }],
    ['save with vmstate outside devices', 'snapshot-save', { 'job-id': 'e2', tag: 'x', vmstate: 'a', devices: ['b'] }],
    ['save with an unknown vmstate', 'snapshot-save', { 'job-id': 'e3', tag: 'x', vmstate: 'zz', devices: ['a'] }],
    ['save a second tag on one disk', 'snapshot-save', { 'job-id': 's3', tag: 't2', vmstate: 'b', devices: ['b'] }],
    ['load', 'snapshot-load', { 'job-id': 'l1', tag: 't1', vmstate: 'a', devices: ['a', 'b'] }],
    ['delete', 'snapshot-delete', { 'job-id': 'd1', tag: 't1', devices: ['a', 'b'] }],
    ['delete a tag that is not there', 'snapshot-delete', { 'job-id': 'd2', tag: 'nosuch', devices: ['a'] }],
  ];

  for (const [what, command, args] of steps) {
    it(`${what}: the same events, JobInfo shape and error`, async () => {
      const q = await runJob(peers.qemu as Peer, command, args);
      const o = await runJob(peers.ours as Peer, command, args);
      expect(o.events).toEqual(q.events);
      expect(shape(o.info)).toEqual(shape(q.info));
      expect(o.info['type']).toBe(q.info['type']);
      expect(o.info['status']).toBe('concluded');
      expect(o.error).toBe(q.error);
    });
  }

  it('a load of a missing tag: QEMU stops its machine and leaves it stopped; ours changes nothing and keeps running', async () => {
    const args = { 'job-id': 'l2', tag: 'nosuch', vmstate: 'a', devices: ['a'] };
    const q = await runJob(peers.qemu as Peer, 'snapshot-load', args);
    const o = await runJob(peers.ours as Peer, 'snapshot-load', args);
    expect(q.events).toEqual(['status:created', 'status:running', 'STOP', 'status:aborting', 'status:concluded', 'status:null']);
    expect(o.events).toEqual(['status:created', 'status:running', 'status:aborting', 'status:concluded', 'status:null']);
    expect(q.error).toBe("Snapshot 'nosuch' does not exist in one or more devices");
    // ours names the disks that lack it
    expect(o.error).toBe(`${q.error ?? ''} (a)`);
    await (peers.qemu as Peer).client.execute('cont');
  });

  it('command errors: a job id in use, a missing argument', async () => {
    for (const who of ['qemu', 'ours'] as const) {
      const c = (peers[who] as Peer).client;
      await c.execute('snapshot-delete', { 'job-id': 'busy', tag: 'zz', devices: ['a'] });
      await sleep(200);
      await expect(c.execute('snapshot-delete', { 'job-id': 'busy', tag: 'zz', devices: ['a'] }), who).rejects.toMatchObject({ errorClass: 'GenericError', desc: "Job ID 'busy' already in use" });
      await expect(c.execute('snapshot-save', { 'job-id': 'm', tag: 'zz', vmstate: 'a' }), who).rejects.toMatchObject({ errorClass: 'GenericError', desc: "Parameter 'devices' is missing" });
      await c.execute('job-dismiss', { id: 'busy' });
    }
  });

  it('qemu-img lists the same snapshots on both sets of images and checks them clean', async () => {
    for (const n of ['a', 'b']) {
      const ours = path.join(base, 'ours', `${n}.qcow2`);
      expect(snapshotNames(ours)).toEqual(snapshotNames(path.join(base, 'qemu', `${n}.qcow2`)));
      const r = spawnSync('qemu-img', ['check', '-U', ours], { encoding: 'utf8' });
      expect(r.status, r.stdout + r.stderr).toBe(0);
    }
  });
});

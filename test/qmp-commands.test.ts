/**
 * The QMP commands called directly (run(ctx, args), no server): blockdev-add's checking and
 * translation (JSON types and key=value strings), the block queries' shapes, blockdev-del's
 * refusals, internal snapshots, human-monitor-command, query-iothreads and the job verbs with
 * their events, on images qemu-img made.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { blkDelete, blkFind, blkNew } from '../src/block/backend.js';
import { withBql } from '../src/block/bql.js';
import { createIOThread, shutdownIOThreads } from '../src/block/iothread.js';
import { jobStart, type Job } from '../src/block/job.js';
import { qmpCommands } from '../src/qmp/command-table.js';
import { blockdevAdd, blockdevOptionsToNodeOptions } from '../src/qmp/blockdev-options.js';
import { forwardJobEvents } from '../src/qmp/commands/jobs.js';
import { qmpVersionInfo } from '../src/qmp/commands/misc.js';
import { Machine } from '../src/machine/machine.js';
import { QmpError, type QmpCommand, type QmpContext, type QmpObject, type QmpValue } from '../src/qmp/types.js';
import { describeInterop, qemu } from './helpers/qemu.js';

let dir = '';
const commands = qmpCommands({ machine: false });
const events: Array<{ event: string; data: QmpObject }> = [];
let quitRequested = false;
const ctx: QmpContext = {
  machine: null,
  requestQuit: () => {
    quitRequested = true;
  },
  emitEvent: (event, data) => events.push({ event, data: data ?? {} }),
  commands,
};

/** Runs command `name` as the server would after checking its arguments. */
async function run(name: string, args: QmpObject = {}): Promise<QmpValue> {
  const cmd = commands.find((c) => c.name === name);
  if (cmd === undefined) throw new Error(`no command ${name}`);
  return cmd.run(ctx, args);
}

/** The QmpError a command fails with (fails the test when it succeeds or throws another error). */
async function qmpFailure(name: string, args: QmpObject = {}): Promise<QmpError> {
  try {
    await run(name, args);
  } catch (e) {
    if (e instanceof QmpError) return e;
    throw e;
  }
  throw new Error(`${name} succeeded`);
}

function obj(v: QmpValue | undefined): QmpObject {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new Error(`not an object: ${JSON.stringify(v)}`);
  return v;
}

function arr(v: QmpValue | undefined): QmpValue[] {
  if (!Array.isArray(v)) throw new Error(`not an array: ${JSON.stringify(v)}`);
  return v;
}

async function nodeInfo(name: string, flat = false): Promise<QmpObject> {
  const all = arr(await run('query-named-block-nodes', { flat })).map(obj);
  const found = all.find((n) => n['node-name'] === name);
  if (found === undefined) throw new Error(`no node ${name}`);
  return found;
}

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-qmp-cmd-'));
});
afterAll(async () => {
  await withBql((bql) => shutdownIOThreads(bql));
  if (dir !== '') fs.rmSync(dir, { recursive: true, force: true });
});

describe('blockdev-add options', () => {
  it('translates nested objects to dotted node options and booleans to on/off', () => {
    const o = blockdevOptionsToNodeOptions(
      { driver: 'qcow2', 'node-name': 'q0', 'read-only': true, file: { driver: 'file', filename: 'a.qcow2', locking: 'off' }, backing: null },
      { strict: true },
    );
    expect(o).toEqual({ driver: 'qcow2', 'node-name': 'q0', 'read-only': 'on', 'file.driver': 'file', 'file.filename': 'a.qcow2', 'file.locking': 'off', backing: 'null' });
  });

  it('accepts the key=value syntax: strings for booleans and numbers, dotted keys', () => {
    const o = blockdevOptionsToNodeOptions({ driver: 'raw', 'node-name': 'r0', 'read-only': 'on', 'file.driver': 'memory', 'file.size': '1M' });
    expect(o).toEqual({ driver: 'raw', 'node-name': 'r0', 'read-only': 'on', 'file.driver': 'memory', 'file.size': '1048576' });
  });

  it('takes dotted keys as members of nested objects only in the key syntax', () => {
    expect(() => blockdevOptionsToNodeOptions({ driver: 'raw', 'node-name': 'r0', 'file.driver': 'memory', 'file.size': 512 }, { strict: true })).toThrow("Parameter 'file' is missing");
    expect(blockdevOptionsToNodeOptions({ driver: 'raw', 'node-name': 'r0', 'file.driver': 'memory', 'file.size': 512 })['file.size']).toBe('512');
  });

  it('links an open node given by name as the file (QSD\'s --blockdev ...,file=NODE); one parent per file node; the file outlives its user', async () => {
    await run('blockdev-add', { driver: 'memory', 'node-name': 'ref-target', size: 4096 });
    await run('blockdev-add', { driver: 'raw', 'node-name': 'ref-user', file: 'ref-target' });
    const nodes = (await run('query-named-block-nodes', { flat: true })) as QmpObject[];
    expect(nodes.map((n) => n['node-name'])).toEqual(expect.arrayContaining(['ref-user', 'ref-target']));
    // a second format node over the same file would keep metadata of its own: refused
    expect((await qmpFailure('blockdev-add', { driver: 'raw', 'node-name': 'ref-user2', file: 'ref-target' })).desc).toMatch(/Node 'ref-target' is already in use by 'ref-user'/);
    expect((await qmpFailure('blockdev-add', { driver: 'raw', 'node-name': 'ref-user', file: 'nosuch' })).desc).toBe("Cannot find device='nosuch' nor node-name='nosuch'");
    expect((await qmpFailure('blockdev-del', { 'node-name': 'ref-target' })).desc).toMatch(/ref-target/);
    await run('blockdev-del', { 'node-name': 'ref-user' });
    await run('blockdev-del', { 'node-name': 'ref-target' });
  });

  it('refuses strings for booleans when strict (QMP), with QEMU\'s text', () => {
    expect(() => blockdevOptionsToNodeOptions({ driver: 'file', 'node-name': 'f', filename: 'x', 'read-only': 'on' }, { strict: true })).toThrow(
      "Invalid parameter type for 'read-only', expected: boolean",
    );
  });

  it.each([
    [{ driver: 'nope', 'node-name': 'x' }, "Parameter 'driver' does not accept value 'nope'"],
    [{ 'node-name': 'x', filename: 'f' }, "Parameter 'driver' is missing"],
    [{ driver: 'file', filename: 'f' }, "'node-name' must be specified for the root node"],
    [{ driver: 'file', 'node-name': 'x' }, "Parameter 'filename' is missing"],
    [{ driver: 'file', 'node-name': 'x', filename: 'f', bogus: 1 }, "Parameter 'bogus' is unexpected"],
    [{ driver: 'file', 'node-name': 'x', filename: 5 }, "Invalid parameter type for 'filename', expected: string"],
    [{ driver: 'file', 'node-name': '3x', filename: 'f' }, "Invalid node-name: '3x'"],
    [{ driver: 'raw', 'node-name': 'x', file: { filename: 'f' } }, "Parameter 'file.driver' is missing"],
    [{ driver: 'raw', 'node-name': 'x', file: { driver: 'file', filename: 'f', frob: true } }, "Parameter 'file.frob' is unexpected"],
    [{ driver: 'memory', 'node-name': 'x', size: -1 }, "Invalid parameter type for 'size', expected: integer"],
  ] as Array<[QmpObject, string]>)('refuses %j: %s', (options, message) => {
    let err: unknown = null;
    try {
      blockdevOptionsToNodeOptions(options, { strict: true });
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(QmpError);
    expect((err as QmpError).errorClass).toBe('GenericError');
    expect((err as QmpError).desc).toBe(message);
  });
});

describe('query-version and query-iothreads', () => {
  it('says qemu 7.2.0 and snapstack as the package', async () => {
    const v = obj(await run('query-version'));
    expect(v).toEqual(qmpVersionInfo());
    expect(obj(v['qemu'])).toEqual({ major: 7, minor: 2, micro: 0 });
    expect(String(v['package'])).toMatch(/^snapstack \d+\.\d+\.\d+/);
  });

  it('lists IOThreads with QEMU\'s IOThreadInfo keys and their poll window', async () => {
    await withBql((bql) => createIOThread(bql, 'qmpio0', { pollMaxNs: 1000 }));
    const list = arr(await run('query-iothreads')).map(obj);
    const t = list.find((x) => x['id'] === 'qmpio0');
    expect(t).toBeDefined();
    expect(Object.keys(t ?? {}).sort()).toEqual(['aio-max-batch', 'id', 'poll-grow', 'poll-max-ns', 'poll-shrink', 'thread-id']);
    expect(t?.['poll-max-ns']).toBe(1000);
  });
});

describe('blockdev-add, the queries and blockdev-del on memory nodes', () => {
  it('adds a raw node over a memory node and lists both as BlockDeviceInfo', async () => {
    expect(await run('blockdev-add', { driver: 'raw', 'node-name': 'm-raw', file: { driver: 'memory', 'node-name': 'm-mem', size: 1048576 } })).toEqual({});
    const raw = await nodeInfo('m-raw');
    expect(raw['drv']).toBe('raw');
    expect(raw['ro']).toBe(false);
    expect(obj(raw['image'])['virtual-size']).toBe(1048576);
    expect(obj(raw['image'])['format']).toBe('raw');
    expect(obj(raw['cache'])).toEqual({ writeback: true, direct: false, 'no-flush': false });
    const mem = await nodeInfo('m-mem');
    expect(mem['drv']).toBe('memory');
  });

  it('refuses a duplicate node name and a node in use, then deletes parent before child', async () => {
    expect((await qmpFailure('blockdev-add', { driver: 'memory', 'node-name': 'm-raw', size: 512 })).desc).toBe("Duplicate nodes with node-name='m-raw'");
    expect((await qmpFailure('blockdev-del', { 'node-name': 'm-mem' })).desc).toBe('Node m-mem is not owned by the monitor');
    expect((await qmpFailure('blockdev-del', { 'node-name': 'nosuch' })).desc).toBe("Failed to find node with node-name='nosuch'");
    await run('blockdev-add', { driver: 'memory', 'node-name': 'm-solo', size: 4096 });
    expect(await run('blockdev-del', { 'node-name': 'm-raw' })).toEqual({});
    expect(await run('blockdev-del', { 'node-name': 'm-solo' })).toEqual({});
    const names = arr(await run('query-named-block-nodes')).map((n) => obj(n)['node-name']);
    expect(names).not.toContain('m-raw');
    expect(names).not.toContain('m-mem');
    expect(names).not.toContain('m-solo');
  });

  it('takes key=value strings through blockdevAdd (the daemon\'s --blockdev)', async () => {
    const node = await withBql((bql) => blockdevAdd(bql, { driver: 'memory', 'node-name': 'kv0', size: '64k', 'read-only': 'off' }));
    expect(node.readOnly).toBe(false);
    expect(obj((await nodeInfo('kv0'))['image'])['virtual-size']).toBe(65536);
    await run('blockdev-del', { 'node-name': 'kv0' });
  });

  it('query-block lists no devices in the daemon', async () => {
    expect(await run('query-block')).toEqual([]);
  });
});

describe('human-monitor-command', () => {
  it('returns the HMP output with lines ended by \\r\\n, and an unknown command as QEMU prints it', async () => {
    const text = await run('human-monitor-command', { 'command-line': 'info iothreads' });
    expect(typeof text).toBe('string');
    expect(String(text)).toMatch(/^qmpio0:\r\n {4}pending requests=\d+\r\n/);
    expect(await run('human-monitor-command', { 'command-line': 'frob' })).toBe("unknown command: 'frob'\r\n");
    expect(await run('human-monitor-command', { 'command-line': '' })).toBe('');
  });

  it('runs qemu-io on a node name (as QEMU\'s HMP); writes only to a node nothing else uses', async () => {
    await run('blockdev-add', { driver: 'memory', 'node-name': 'hio-f', size: 1048576 });
    await run('blockdev-add', { driver: 'raw', 'node-name': 'hio', file: 'hio-f' });
    const out = String(await run('human-monitor-command', { 'command-line': 'qemu-io hio "write -P 0x5a 0 64k"' }));
    expect(out).toMatch(/wrote 65536\/65536 bytes at offset 0/);
    expect(String(await run('human-monitor-command', { 'command-line': 'qemu-io hio "read -P 0x5a 0 64k"' }))).toMatch(/read 65536\/65536 bytes/);
    // the file node is used by 'hio': read, never written behind its back
    expect(String(await run('human-monitor-command', { 'command-line': 'qemu-io hio-f "read -P 0x5a 0 64k"' }))).toMatch(/read 65536\/65536 bytes/);
    expect(String(await run('human-monitor-command', { 'command-line': 'qemu-io hio-f "write -P 1 0 4k"' }))).not.toMatch(/wrote/);
    expect(String(await run('human-monitor-command', { 'command-line': 'qemu-io hio "read -P 0x5a 0 4k"' }))).toMatch(/read 4096\/4096 bytes/);
    expect(String(await run('human-monitor-command', { 'command-line': 'qemu-io nosuch "read 0 4k"' }))).toMatch(/Device 'nosuch' not found/);
    // no backend is left behind
    expect(arr(await run('query-block')).map(obj).map((b) => String(b['device']))).not.toContain(expect.stringMatching(/^qemu-io-node/));
    await run('blockdev-del', { 'node-name': 'hio' });
    await run('blockdev-del', { 'node-name': 'hio-f' });
  });

  it('refuses a cpu-index without a machine', async () => {
    expect((await qmpFailure('human-monitor-command', { 'command-line': 'info iothreads', 'cpu-index': 0 })).desc).toBe("Parameter 'cpu-index' expects a CPU number");
  });

  it('passes HMP quit on as a quit request', async () => {
    quitRequested = false;
    await run('human-monitor-command', { 'command-line': 'quit' });
    expect(quitRequested).toBe(true);
  });
});

describe('jobs', () => {
  /** A job whose body waits until released; returns the job and its release. */
  async function heldJob(id: string, opts: { autoFinalize?: boolean; autoDismiss?: boolean } = {}): Promise<{ job: Job; release: () => void; prepared: () => boolean }> {
    let release = (): void => undefined;
    const gate = new Promise<void>((r) => (release = r));
    let didPrepare = false;
    const job = await withBql((bql) =>
      jobStart(
        bql,
        id,
        'test',
        {
          async run(j: Job): Promise<void> {
            j.setProgress(0, 10);
            await gate;
            await j.pausePoint();
            j.setProgress(10, 10);
          },
          async prepare(): Promise<void> {
            didPrepare = true;
          },
        },
        opts,
      ),
    );
    return { job, release, prepared: () => didPrepare };
  }

  it('lists a job as JobInfo and refuses verbs in the wrong state with QEMU\'s texts', async () => {
    const stop = forwardJobEvents(ctx.emitEvent);
    events.length = 0;
    const { job, release } = await heldJob('qj1', { autoDismiss: false });
    await new Promise((r) => setImmediate(r));
    const info = arr(await run('query-jobs')).map(obj).find((j) => j['id'] === 'qj1');
    expect(info).toEqual({ id: 'qj1', type: 'test', status: 'running', 'current-progress': 0, 'total-progress': 10 });
    expect((await qmpFailure('job-complete', { id: 'qj1' })).desc).toBe("Job 'qj1' in state 'running' cannot accept command verb 'complete'");
    expect((await qmpFailure('job-finalize', { id: 'qj1' })).desc).toBe("Job 'qj1' in state 'running' cannot accept command verb 'finalize'");
    expect((await qmpFailure('job-dismiss', { id: 'qj1' })).desc).toBe("Job 'qj1' in state 'running' cannot accept command verb 'dismiss'");
    expect((await qmpFailure('job-resume', { id: 'qj1' })).desc).toBe("Can't resume a job that was not paused");
    await run('job-pause', { id: 'qj1' });
    expect((await qmpFailure('job-pause', { id: 'qj1' })).desc).toBe('Job is already paused');
    await run('job-resume', { id: 'qj1' });
    release();
    await job.whenConcluded();
    expect(obj(arr(await run('query-jobs')).map(obj).find((j) => j['id'] === 'qj1'))['status']).toBe('concluded');
    await run('job-dismiss', { id: 'qj1' });
    expect((await qmpFailure('job-cancel', { id: 'qj1' })).desc).toBe('Job not found');
    stop();
    const statuses = events.filter((e) => e.event === 'JOB_STATUS_CHANGE' && e.data['id'] === 'qj1').map((e) => e.data['status']);
    expect(statuses).toEqual(['created', 'running', 'waiting', 'pending', 'concluded', 'null']);
  });

  it('shows a block job in query-block-jobs as BlockJobInfo, paused and resumed through block-job-*', async () => {
    let release = (): void => undefined;
    const gate = new Promise<void>((r) => (release = r));
    const job = await withBql((bql) =>
      jobStart(bql, 'bj1', 'stream', {
        async run(j: Job): Promise<void> {
          j.setProgress(0, 100);
          while (!(await j.pausePoint())) {
            if (await Promise.race([gate.then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), 5))])) break;
          }
          j.setProgress(100, 100);
        },
      }),
    );
    await new Promise((r) => setImmediate(r));
    const list = async (): Promise<QmpObject[]> => arr(await run('query-block-jobs')).map(obj);
    expect(await list()).toEqual([{ type: 'stream', device: 'bj1', len: 100, offset: 0, busy: true, paused: false, speed: 0, 'io-status': 'ok', ready: false, status: 'running', 'auto-finalize': true, 'auto-dismiss': true }]);
    expect((await qmpFailure('block-job-pause', { device: 'nosuch' })).errorClass).toBe('DeviceNotActive');
    await run('block-job-pause', { device: 'bj1' });
    expect(obj((await list())[0])['paused']).toBe(true);
    expect((await qmpFailure('block-job-complete', { device: 'bj1' })).desc).toMatch(/cannot accept command verb 'complete'/);
    await run('block-job-set-speed', { device: 'bj1', speed: 1000 });
    await run('block-job-resume', { device: 'bj1' });
    release();
    await job.whenConcluded();
    expect(await list()).toEqual([]);
  });

  it('keeps a job with auto-finalize off pending until job-finalize, and cancel then aborts another', async () => {
    const a = await heldJob('qj2', { autoFinalize: false });
    a.release();
    for (let i = 0; i < 50 && a.job.status !== 'pending'; i++) await new Promise((r) => setTimeout(r, 5));
    expect(a.job.status).toBe('pending');
    expect(a.prepared()).toBe(false);
    await run('job-finalize', { id: 'qj2' });
    await a.job.whenConcluded();
    expect(a.prepared()).toBe(true);

    const b = await heldJob('qj3', { autoFinalize: false, autoDismiss: false });
    b.release();
    for (let i = 0; i < 50 && b.job.status !== 'pending'; i++) await new Promise((r) => setTimeout(r, 5));
    await run('job-cancel', { id: 'qj3' });
    await b.job.whenConcluded();
    expect(b.prepared()).toBe(false);
    expect(b.job.status).toBe('concluded');
    // as QEMU: a cancelled job reads as failed with ECANCELED's text
    expect(arr(await run('query-jobs')).map(obj).find((j) => j['id'] === 'qj3')).toEqual({ id: 'qj3', type: 'test', status: 'concluded', 'current-progress': 10, 'total-progress': 10, error: 'Operation canceled' });
    await run('job-dismiss', { id: 'qj3' });
  });
});

describeInterop('QMP commands on images qemu-img made', () => {
  let base = '';
  let top = '';
  let raw = '';
  beforeAll(() => {
    base = path.join(dir, 'base.qcow2');
    top = path.join(dir, 'top.qcow2');
    raw = path.join(dir, 'disk.raw');
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', base, '1M']);
    qemu('qemu-io', ['-c', 'write -P 1 0 64k', base]);
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top, '1M']);
    qemu('qemu-img', ['snapshot', '-c', 's1', top]);
    qemu('qemu-img', ['create', '-q', '-f', 'raw', raw, '1M']);
  });

  it('opens a qcow2 chain and shows it nested, and flat', async () => {
    await run('blockdev-add', { driver: 'qcow2', 'node-name': 'top', file: { driver: 'file', filename: top } });
    const info = await nodeInfo('top');
    expect(info['backing_file']).toBe(base);
    expect(info['backing_file_depth']).toBe(1);
    const image = obj(info['image']);
    expect(image['cluster-size']).toBe(65536);
    expect(image['backing-filename']).toBe(base);
    expect(obj(image['backing-image'])['format']).toBe('qcow2');
    expect(arr(image['snapshots']).map((s) => obj(s)['name'])).toEqual(['s1']);
    expect(obj(image['format-specific'])['type']).toBe('qcow2');
    const flat = await nodeInfo('top', true);
    expect(flat['backing_file_depth']).toBe(0);
    expect(obj(flat['image'])['backing-image']).toBeUndefined();
  });

  it('refuses a second writer of the same image with QEMU\'s lock text, and a missing file', async () => {
    expect((await qmpFailure('blockdev-add', { driver: 'qcow2', 'node-name': 'again', file: { driver: 'file', filename: top } })).desc).toBe('Failed to get "write" lock');
    const missing = path.join(dir, 'missing.raw');
    expect((await qmpFailure('blockdev-add', { driver: 'file', 'node-name': 'gone', filename: missing })).desc).toBe(`Could not open '${missing}': No such file or directory`);
  });

  it('makes and deletes internal snapshots with QEMU\'s refusals', async () => {
    expect((await qmpFailure('blockdev-snapshot-internal-sync', { device: 'top', name: 's1' })).desc).toBe("Snapshot with name 's1' already exists on device 'top'");
    expect((await qmpFailure('blockdev-snapshot-internal-sync', { device: 'top', name: '' })).desc).toBe('Name is empty');
    expect((await qmpFailure('blockdev-snapshot-internal-sync', { device: 'nosuch', name: 'x' })).desc).toBe("Cannot find device='nosuch' nor node-name='nosuch'");
    const backingNode = String((await nodeInfo('top'))['node-name']) === 'top' ? arr(await run('query-named-block-nodes')).map(obj).find((n) => n['file'] === base && n['drv'] === 'qcow2') : undefined;
    expect((await qmpFailure('blockdev-snapshot-internal-sync', { device: String(backingNode?.['node-name']), name: 'x' })).desc).toBe('Need a root block node');
    expect(await run('blockdev-snapshot-internal-sync', { device: 'top', name: 's2' })).toEqual({});
    const deleted = obj(await run('blockdev-snapshot-delete-internal-sync', { device: 'top', name: 's2' }));
    expect(deleted['name']).toBe('s2');
    expect(Object.keys(deleted).sort()).toEqual(['date-nsec', 'date-sec', 'id', 'name', 'vm-clock-nsec', 'vm-clock-sec', 'vm-state-size']);
    expect((await qmpFailure('blockdev-snapshot-delete-internal-sync', { device: 'top', name: 's2' })).desc).toBe("Snapshot with id 'null' and name 's2' does not exist on device 'top'");
    expect((await qmpFailure('blockdev-snapshot-delete-internal-sync', { device: 'top' })).desc).toBe('Name or id must be provided');
    await run('blockdev-del', { 'node-name': 'top' });
    expect(qemu('qemu-img', ['snapshot', '-l', top])).toMatch(/\bs1\b/);
    expect(qemu('qemu-img', ['snapshot', '-l', top])).not.toMatch(/\bs2\b/);
    qemu('qemu-img', ['check', top]);
  });

  it('refuses a snapshot of a read-only node', async () => {
    await run('blockdev-add', { driver: 'qcow2', 'node-name': 'ro', 'read-only': true, file: { driver: 'file', filename: base } });
    expect((await qmpFailure('blockdev-snapshot-internal-sync', { device: 'ro', name: 'x' })).desc).toBe("Device 'ro' is read only");
    await run('blockdev-del', { 'node-name': 'ro' });
  });

  it('streams the chain into the top with block-stream, with JOB_STATUS_CHANGE and BLOCK_JOB_COMPLETED', async () => {
    const stop = forwardJobEvents(ctx.emitEvent);
    events.length = 0;
    await run('blockdev-add', { driver: 'qcow2', 'node-name': 'top', file: { driver: 'file', filename: top } });
    await run('block-stream', { device: 'top', 'job-id': 'st0' });
    for (let i = 0; i < 400 && !events.some((e) => e.event === 'JOB_STATUS_CHANGE' && e.data['status'] === 'null'); i++) await new Promise((r) => setTimeout(r, 10));
    stop();
    const names = events.map((e) => (e.event === 'JOB_STATUS_CHANGE' ? String(e.data['status']) : e.event));
    expect(names).toEqual(['created', 'running', 'waiting', 'pending', 'BLOCK_JOB_COMPLETED', 'concluded', 'null']);
    const done = events.find((e) => e.event === 'BLOCK_JOB_COMPLETED');
    expect(done?.data).toEqual({ device: 'st0', len: 1048576, offset: 1048576, speed: 0, type: 'stream' });
    expect((await nodeInfo('top'))['backing_file']).toBeUndefined();
    await run('blockdev-del', { 'node-name': 'top' });
    expect(qemu('qemu-img', ['info', top])).not.toMatch(/backing file:/);
    qemu('qemu-img', ['check', top]);
  });

  it('an active commit of a node the monitor added keeps that node for blockdev-del (as QSD does), into the bottommost image by default', async () => {
    const acBase = path.join(dir, 'ac-base.qcow2');
    const acMid = path.join(dir, 'ac-mid.qcow2');
    const acTop = path.join(dir, 'ac-top.qcow2');
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', acBase, '1M']);
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', acBase, '-F', 'qcow2', acMid]);
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', acMid, '-F', 'qcow2', acTop]);
    qemu('qemu-io', ['-c', 'write -P 5 0 64k', acMid]);
    qemu('qemu-io', ['-c', 'write -P 6 64k 64k', acTop]);
    const file = (f: string) => ({ driver: 'file', filename: f });
    await run('blockdev-add', {
      driver: 'qcow2', 'node-name': 'ac', file: file(acTop),
      backing: { driver: 'qcow2', 'node-name': 'acm', 'read-only': false, file: file(acMid), backing: { driver: 'qcow2', 'node-name': 'acb', 'read-only': false, file: file(acBase) } },
    });
    const stop = forwardJobEvents(ctx.emitEvent);
    events.length = 0;
    await run('block-commit', { device: 'ac', 'job-id': 'acj' });
    for (let i = 0; i < 400 && !events.some((e) => e.event === 'BLOCK_JOB_READY'); i++) await new Promise((r) => setTimeout(r, 10));
    await run('job-complete', { id: 'acj' });
    for (let i = 0; i < 400 && !events.some((e) => e.event === 'JOB_STATUS_CHANGE' && e.data['status'] === 'null'); i++) await new Promise((r) => setTimeout(r, 10));
    stop();
    expect(events.find((e) => e.event === 'BLOCK_JOB_COMPLETED')?.data['error']).toBeUndefined();
    const names = arr(await run('query-named-block-nodes', { flat: true })).map(obj).map((n) => n['node-name']);
    expect(names).toContain('ac');
    await run('blockdev-del', { 'node-name': 'ac' });
    // both images' data went into the bottommost one (QEMU's default base), not just into the mid one
    expect(qemu('qemu-io', ['-c', 'read -P 5 0 64k', '-c', 'read -P 6 64k 64k', acBase])).not.toMatch(/Pattern verification failed/);
    qemu('qemu-img', ['check', '-q', acBase]);
  });

  it('adds a raw image over a file node and deletes it', async () => {
    await run('blockdev-add', { driver: 'raw', 'node-name': 'r0', file: { driver: 'file', filename: raw } });
    const info = await nodeInfo('r0');
    expect(obj(info['image'])['virtual-size']).toBe(1048576);
    expect(typeof obj(info['image'])['actual-size']).toBe('number');
    await run('blockdev-del', { 'node-name': 'r0' });
  });
});

describeInterop('QMP commands on a device (a backend, as the machine has)', () => {
  let base = '';
  let top = '';
  beforeAll(() => {
    base = path.join(dir, 'dev-base.qcow2');
    top = path.join(dir, 'dev-top.qcow2');
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', base, '2M']);
    qemu('qemu-io', ['-c', 'write -P 7 0 128k', base]);
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top, '2M']);
    qemu('qemu-io', ['-c', 'write -P 8 1M 64k', top]);
  });

  it('query-block lists the device as BlockInfo; its node is in use; snapshots take the device name', async () => {
    await withBql(async (bql) => {
      const node = await blockdevAdd(bql, { driver: 'qcow2', 'node-name': 'devtop', file: { driver: 'file', filename: top }, backing: { driver: 'qcow2', 'node-name': 'devbase', 'read-only': false, file: { driver: 'file', filename: base } } });
      blkNew(bql, 'vd0', node);
    });
    const list = arr(await run('query-block')).map(obj);
    expect(list).toHaveLength(1);
    const b = obj(list[0]);
    // the keys qemu-system-x86_64 7.2 gives for a virtio-blk disk
    expect(Object.keys(b).sort()).toEqual(['device', 'inserted', 'io-status', 'locked', 'qdev', 'removable', 'type']);
    expect(b['device']).toBe('vd0');
    const inserted = obj(b['inserted']);
    expect(inserted['node-name']).toBe('devtop');
    expect(inserted['backing_file_depth']).toBe(1);
    expect(obj(obj(inserted['image'])['backing-image'])['filename']).toBe(base);
    expect((await qmpFailure('blockdev-del', { 'node-name': 'devtop' })).desc).toBe('Node devtop is in use');
    expect((await qmpFailure('blockdev-del', { 'node-name': 'devbase' })).desc).toBe("Node 'devbase' is busy: node is used as backing hd of 'devtop'");
    expect(await run('blockdev-snapshot-internal-sync', { device: 'vd0', name: 'viadev' })).toEqual({});
    expect(obj(await run('blockdev-snapshot-delete-internal-sync', { device: 'vd0', name: 'viadev' }))['name']).toBe('viadev');
  });

  it('blockdev-snapshot-sync puts an overlay on the device, and block-commit (active) merges it back after job-complete', async () => {
    const overlay = path.join(dir, 'dev-overlay.qcow2');
    expect(await run('blockdev-snapshot-sync', { device: 'vd0', 'snapshot-file': overlay, 'snapshot-node-name': 'devov' })).toEqual({});
    const inserted = obj(obj(arr(await run('query-block')).map(obj)[0])['inserted']);
    expect(inserted['node-name']).toBe('devov');
    expect(inserted['backing_file_depth']).toBe(2);
    const stop = forwardJobEvents(ctx.emitEvent);
    events.length = 0;
    await run('block-commit', { device: 'vd0', 'job-id': 'cm0', 'base-node': 'devtop' });
    for (let i = 0; i < 400 && !events.some((e) => e.event === 'BLOCK_JOB_READY'); i++) await new Promise((r) => setTimeout(r, 10));
    expect(obj(arr(await run('query-jobs')).map(obj).find((j) => j['id'] === 'cm0'))['status']).toBe('ready');
    await run('job-complete', { id: 'cm0' });
    for (let i = 0; i < 400 && !events.some((e) => e.event === 'JOB_STATUS_CHANGE' && e.data['status'] === 'null'); i++) await new Promise((r) => setTimeout(r, 10));
    stop();
    expect(events.map((e) => (e.event === 'JOB_STATUS_CHANGE' ? String(e.data['status']) : e.event))).toEqual([
      'created', 'running', 'ready', 'BLOCK_JOB_READY', 'waiting', 'pending', 'BLOCK_JOB_COMPLETED', 'concluded', 'null',
    ]);
    expect(obj(obj(arr(await run('query-block')).map(obj)[0])['inserted'])['node-name']).toBe('devtop');
    await withBql(async (bql) => {
      blkDelete(bql, blkFind(bql, 'vd0'));
    });
    await run('blockdev-del', { 'node-name': 'devtop' });
    qemu('qemu-img', ['check', '-q', top]);
    expect(qemu('qemu-io', ['-c', 'read -P 8 1M 64k', '-c', 'read -P 7 0 128k', top])).not.toMatch(/Pattern verification failed/);
  });
});

describe('a monitor with a machine (snapstack monitor -qmp)', () => {
  it('lists the machine\'s disks in query-block and runs HMP with a valid cpu-index', async () => {
    const machine = new Machine({ vcpus: 2, ramBytes: 4 * 1024 * 1024 });
    await withBql((bql) => machine.addDrive(bql, 'driver=memory,size=1M,id=mdisk0'));
    const mctx: QmpContext = { ...ctx, machine, commands: qmpCommands({ machine: true }) };
    const cmd = (name: string): QmpCommand => {
      const c = mctx.commands.find((x) => x.name === name);
      if (c === undefined) throw new Error(`no command ${name}`);
      return c;
    };
    try {
      const blocks = arr(await cmd('query-block').run(mctx, {})).map(obj);
      expect(blocks.map((b) => b['device'])).toEqual(['mdisk0']);
      expect(obj(obj(blocks[0])['inserted'])['drv']).toBe('memory');
      expect(await cmd('human-monitor-command').run(mctx, { 'command-line': 'info status', 'cpu-index': 1 })).toBe('VM status: paused\r\n');
      await expect(cmd('human-monitor-command').run(mctx, { 'command-line': 'info status', 'cpu-index': 2 })).rejects.toThrow("Parameter 'cpu-index' expects a CPU number");
      const name = String(obj(obj(blocks[0])['inserted'])['node-name']);
      await expect(cmd('blockdev-del').run(mctx, { 'node-name': name })).rejects.toThrow(`Node ${name} is in use`);
    } finally {
      await withBql((bql) => machine.shutdown(bql));
    }
  });
});

describe('commands from several clients at once', () => {
  it('serialise on the BQL: concurrent blockdev-add, queries and blockdev-del leave a consistent graph', async () => {
    const names = Array.from({ length: 24 }, (_, i) => `cc${i}`);
    const adds = names.map((n, i) => run('blockdev-add', i % 2 === 0 ? { driver: 'memory', 'node-name': n, size: 65536 } : { driver: 'raw', 'node-name': n, file: { driver: 'memory', size: 65536 } }));
    const queries = names.map(() => run('query-named-block-nodes', { flat: true }));
    const dup = run('blockdev-add', { driver: 'memory', 'node-name': 'cc0', size: 512 }).then(
      () => 'added',
      (e: unknown) => (e instanceof QmpError ? e.desc : String(e)),
    );
    await Promise.all([...adds, ...queries]);
    expect(await dup).toBe("Duplicate nodes with node-name='cc0'");
    const listed = new Set(arr(await run('query-named-block-nodes')).map((n) => String(obj(n)['node-name'])));
    for (const n of names) expect(listed.has(n)).toBe(true);
    await Promise.all(names.map((n) => run('blockdev-del', { 'node-name': n })));
    const after = arr(await run('query-named-block-nodes')).map((n) => String(obj(n)['node-name']));
    expect(after.filter((n) => n.startsWith('cc'))).toEqual([]);
    // the raw nodes' anonymous memory children went with them
    expect(after.filter((n) => n.startsWith('#'))).toEqual([]);
  });
});

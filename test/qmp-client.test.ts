/**
 * The QMP client against the real peer, qemu-storage-daemon 7.2: greeting, negotiation, replies
 * matched by id, error replies as QmpError, raw lines, events, and a bounded reply line.
 */
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { QmpClient, QmpClientError } from '../src/qmp/client.js';
import { QmpError } from '../src/qmp/types.js';
import { describeQsd, startQsd, tempDir, type Qsd } from './qmp-helpers.js';

describeQsd('QMP client against qemu-storage-daemon', () => {
  let dir = '';
  let qsd: Qsd;
  beforeAll(async () => {
    dir = tempDir('snapstack-qmp-client-');
    qsd = await startQsd(dir);
  });
  afterAll(async () => {
    await qsd?.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('reads_the_greeting_and_negotiates', async () => {
    const c = await QmpClient.connect({ path: qsd.socket });
    const qmp = c.greeting['QMP'] as { version: { qemu: { major: number } }; capabilities: string[] };
    expect(qmp.version.qemu.major).toBe(7);
    expect(qmp.capabilities).toEqual(['oob']);
    const v = (await c.execute('query-version')) as { qemu: { major: number; minor: number } };
    expect(v.qemu).toMatchObject({ major: 7, minor: 2 });
    await c.close();
  });

  it('rejects_an_error_reply_with_a_QmpError_of_qemus_class', async () => {
    const c = await QmpClient.connect({ path: qsd.socket });
    const e = await c.execute('no-such-command').catch((x: unknown) => x);
    expect(e).toBeInstanceOf(QmpError);
    expect(e).toMatchObject({ errorClass: 'CommandNotFound', desc: 'The command no-such-command has not been found' });
    await c.close();
  });

  it('without_negotiation_commands_are_refused', async () => {
    const c = await QmpClient.connect({ path: qsd.socket }, { negotiate: false });
    await expect(c.execute('query-version')).rejects.toMatchObject({ errorClass: 'CommandNotFound' });
    await c.execute('qmp_capabilities');
    await expect(c.execute('query-version')).resolves.toBeTypeOf('object');
    await c.close();
  });

  it('queues_replies_without_its_id_for_readRawLine', async () => {
    const c = await QmpClient.connect({ path: qsd.socket });
    c.sendRaw('{"execute": "query-version", "id": 7}\n');
    const pending = c.execute('query-version');
    const raw = JSON.parse(await c.readRawLine()) as { id: number };
    expect(raw.id).toBe(7);
    await expect(pending).resolves.toBeTypeOf('object');
    c.sendRaw('[]\n');
    expect(await c.readMessage()).toMatchObject({ error: { class: 'GenericError', desc: 'QMP input must be a JSON object' } });
    await c.close();
  });

  it('collects_events_and_waits_for_one', async () => {
    const c = await QmpClient.connect({ path: qsd.socket });
    const img = path.join(dir, 'ev.img');
    fs.writeFileSync(img, Buffer.alloc(1 << 20));
    await c.execute('blockdev-add', { driver: 'file', filename: img, 'node-name': 'ev0' });
    await c.execute('blockdev-add', { driver: 'raw', file: 'ev0', 'node-name': 'ev1' });
    const tgt = path.join(dir, 'ev-copy.img');
    fs.writeFileSync(tgt, Buffer.alloc(1 << 20));
    await c.execute('blockdev-add', { driver: 'file', filename: tgt, 'node-name': 'tg0' });
    await c.execute('blockdev-backup', { 'job-id': 'j1', device: 'ev1', target: 'tg0', sync: 'full' });
    const done = await c.waitEvent('JOB_STATUS_CHANGE', (e) => e.data?.['status'] === 'null', 10_000);
    expect(done.data).toEqual({ status: 'null', id: 'j1' });
    expect(done.timestamp.seconds).toBeGreaterThan(1_600_000_000);
    expect(c.events.some((e) => e.event === 'BLOCK_JOB_COMPLETED')).toBe(true);
    await c.close();
  });

  it('a_reply_line_longer_than_the_bound_is_an_error_not_a_hang', async () => {
    const sock = path.join(dir, 'fake.sock');
    const server = net.createServer((s) => {
      s.write('{"QMP": {"version": {}, "capabilities": []}}\r\n');
      s.write('x'.repeat(4096));
      s.write('x'.repeat(4096));
    });
    await new Promise<void>((r) => server.listen(sock, r));
    const c = await QmpClient.connect({ path: sock }, { negotiate: false, maxLineBytes: 4096 });
    const e = await c.readRawLine(5000).catch((x: unknown) => x);
    expect(e).toBeInstanceOf(QmpClientError);
    expect(e).toMatchObject({ code: 'line-too-long' });
    await c.close();
    await new Promise<void>((r) => server.close(() => r()));
  });
});

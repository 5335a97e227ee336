/**
 * QMP sessions over a real unix socket (src/qmp/session.ts, server.ts, events.ts), driven with
 * the client: greeting, negotiation, the request checks in QEMU's order and with its texts, `id`
 * echoed, one command at a time per session but sessions concurrent, events only to negotiated
 * sessions (job status changes among them), quit, the session cap, the socket file's handling,
 * half-closed clients and close() waiting for a running command.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { withBql } from '../src/block/bql.js';
import { jobStart } from '../src/block/job.js';
import { QmpClient } from '../src/qmp/client.js';
import { sessionCommands } from '../src/qmp/commands/session.js';
import { QMP_PROTOCOL_DOC, QmpServer } from '../src/qmp/server.js';
import { QmpError, type QmpCommand, type QmpObject } from '../src/qmp/types.js';

let dir = '';
const servers: QmpServer[] = [];
const clients: QmpClient[] = [];

/** Gates for the 'wait' command: each call waits until the test opens its gate. */
const gates = new Map<string, { open: () => void; promise: Promise<void>; started: boolean }>();
function gate(name: string): { open: () => void; promise: Promise<void>; started: boolean } {
  let g = gates.get(name);
  if (g === undefined) {
    let open: () => void = () => undefined;
    const promise = new Promise<void>((r) => {
      open = r;
    });
    g = { open, promise, started: false };
    gates.set(name, g);
  }
  return g;
}
const order: string[] = [];

const testCommands: QmpCommand[] = [
  {
    name: 'echo',
    doc: 'Returns its arguments.',
    args: [
      { name: 'text', type: 'str' },
      { name: 'count', type: 'int', optional: true },
      { name: 'opts', type: { struct: [{ name: 'mode', type: { enum: ['a', 'b'] } }] }, optional: true },
    ],
    run: (_ctx, args) => Promise.resolve(args),
  },
  {
    name: 'wait',
    doc: 'Waits for a gate, then returns its name.',
    args: [{ name: 'gate', type: 'str' }],
    run: async (_ctx, args) => {
      const name = args['gate'] as string;
      const g = gate(name);
      g.started = true;
      order.push(`start ${name}`);
      await g.promise;
      order.push(`end ${name}`);
      return { gate: name };
    },
  },
  {
    name: 'emit',
    doc: 'Emits an event.',
    args: [{ name: 'event', type: 'str' }],
    run: (ctx, args) => {
      ctx.emitEvent(args['event'] as string, { from: 'emit' });
      return Promise.resolve({});
    },
  },
  { name: 'fail', doc: 'Fails.', args: [], run: () => Promise.reject(new QmpError('DeviceNotFound', "Device 'x' not found")) },
  { name: 'crash', doc: 'Throws a plain Error.', args: [], run: () => Promise.reject(new TypeError('boom\nsecond line')) },
  {
    name: 'cyclic',
    doc: 'Returns a value that is not JSON.',
    args: [],
    run: () => {
      const v: { self?: unknown } = {};
      v.self = v;
      return Promise.resolve(v as unknown as QmpObject);
    },
  },
  { name: 'machine-only', doc: 'Needs a machine.', args: [], needsMachine: true, run: () => Promise.resolve({}) },
];

let quits = 0;
async function server(opts: { maxSessions?: number; commands?: QmpCommand[] } = {}): Promise<{ srv: QmpServer; sock: string }> {
  const sock = path.join(dir, `s${servers.length}.sock`);
  const srv = await QmpServer.listen(
    { type: 'unix', path: sock },
    { commands: opts.commands ?? [...testCommands, ...sessionCommands], machine: null, onQuit: () => quits++, ...(opts.maxSessions !== undefined ? { maxSessions: opts.maxSessions } : {}) },
  );
  servers.push(srv);
  return { srv, sock };
}

async function client(sock: string, negotiate = true): Promise<QmpClient> {
  const c = await QmpClient.connect({ path: sock }, { negotiate });
  clients.push(c);
  return c;
}

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-qmp-protocol-'));
});
afterEach(async () => {
  await Promise.all(clients.splice(0).map((c) => c.close()));
});
afterAll(async () => {
  await Promise.all(servers.splice(0).map((s) => s.close()));
  fs.rmSync(dir, { recursive: true, force: true });
});

describe('QMP session', () => {
  it('greets_with_qemus_version_shape_and_the_oob_capability_and_ends_lines_in_crlf', async () => {
    const { sock } = await server();
    const raw = await new Promise<string>((resolve) => {
      const s = net.createConnection({ path: sock });
      s.once('data', (d: Buffer) => {
        s.destroy();
        resolve(d.toString());
      });
    });
    expect(raw.endsWith('\r\n')).toBe(true);
    const g = JSON.parse(raw) as { QMP: { version: { qemu: Record<string, number>; package: string }; capabilities: string[] } };
    expect(g.QMP.capabilities).toEqual(['oob']);
    expect(g.QMP.version.qemu).toEqual({ major: 7, minor: 2, micro: 0 });
    expect(g.QMP.version.package).toMatch(/^snapstack \d+\.\d+\.\d+/);
    expect(raw).toMatch(/^\{"QMP": \{"version": \{"qemu": \{/);
  });

  it('before_negotiation_only_qmp_capabilities_exists', async () => {
    const { sock } = await server();
    const c = await client(sock, false);
    for (const name of ['echo', 'query-commands', 'no-such']) {
      await expect(c.execute(name, { text: 'x' })).rejects.toMatchObject({ errorClass: 'CommandNotFound', desc: "Expecting capabilities negotiation with 'qmp_capabilities'" });
    }
    c.sendRaw('{"exec-oob": "echo", "id": 1}\n');
    expect(await c.readMessage()).toEqual({ id: 1, error: { class: 'GenericError', desc: "QMP input member 'exec-oob' is unexpected" } });
    await expect(c.execute('qmp_capabilities', { enable: ['bogus'] })).rejects.toMatchObject({ desc: "Parameter 'null' does not accept value 'bogus'" });
    await expect(c.execute('qmp_capabilities')).resolves.toEqual({});
    await expect(c.execute('qmp_capabilities')).rejects.toMatchObject({
      errorClass: 'CommandNotFound',
      desc: 'Capabilities negotiation is already complete, command ignored',
    });
    await expect(c.execute('echo', { text: 'x' })).resolves.toEqual({ text: 'x' });
  });

  it('with_oob_enabled_exec_oob_is_checked_but_no_command_allows_it', async () => {
    const { sock } = await server();
    const c = await client(sock, false);
    await c.execute('qmp_capabilities', { enable: ['oob'] });
    await expect(c.execute('echo', { text: 'x' }, { oob: true })).rejects.toMatchObject({ errorClass: 'GenericError', desc: 'The command echo does not support OOB' });
    await expect(c.execute('nope', {}, { oob: true })).rejects.toMatchObject({ errorClass: 'CommandNotFound', desc: 'The command nope has not been found' });
    c.sendRaw('{"exec-oob": "echo", "execute": "echo", "id": 2}\n');
    expect(await c.readMessage()).toEqual({ id: 2, error: { class: 'GenericError', desc: "QMP input member 'execute' clashes with 'exec-oob'" } });
  });

  it('echoes_any_id_and_orders_members_as_qemu', async () => {
    const { sock } = await server();
    const c = await client(sock);
    c.sendRaw('{"execute": "echo", "arguments": {"text": "a"}, "id": {"x": [1, null]}}\n');
    expect(await c.readRawLine()).toBe('{"return": {"text": "a"}, "id": {"x": [1, null]}}');
    c.sendRaw('{"execute": "fail", "id": "f"}');
    expect(await c.readRawLine()).toBe('{"id": "f", "error": {"class": "DeviceNotFound", "desc": "Device \'x\' not found"}}');
    c.sendRaw("{'execute': 'echo', 'arguments': {'text': 'b'}}\n");
    expect(await c.readRawLine()).toBe('{"return": {"text": "b"}}');
    c.sendRaw('{"execute": "echo", "arguments": {"text": "c"}, "id": 0.1}\n');
    expect(await c.readRawLine()).toBe('{"return": {"text": "c"}, "id": 0.10000000000000001}');
  });

  it('refuses_bad_requests_with_qemus_texts_and_keeps_going', async () => {
    const { sock } = await server();
    const c = await client(sock);
    const cases: [string, QmpObject][] = [
      ['{"execute": "echo", "id": 1', {}], // completed by the next line
      ['}\n', { error: { class: 'GenericError', desc: "Parameter 'text' is missing" }, id: 1 }],
      ['[]\n', { error: { class: 'GenericError', desc: 'QMP input must be a JSON object' } }],
      ['"s"\n', { error: { class: 'GenericError', desc: 'QMP input must be a JSON object' } }],
      ['{}\n', { error: { class: 'GenericError', desc: "QMP input lacks member 'execute'" } }],
      ['{"id": 3}\n', { id: 3, error: { class: 'GenericError', desc: "QMP input lacks member 'execute'" } }],
      ['{"execute": 1, "id": 4}\n', { id: 4, error: { class: 'GenericError', desc: "QMP input member 'execute' must be a string" } }],
      ['{"execute": "echo", "arguments": [], "id": 5}\n', { id: 5, error: { class: 'GenericError', desc: "QMP input member 'arguments' must be an object" } }],
      ['{"execute": "echo", "control": {}, "id": 6}\n', { id: 6, error: { class: 'GenericError', desc: "QMP input member 'control' is unexpected" } }],
      ['{"execute": "nope", "id": 7}\n', { id: 7, error: { class: 'CommandNotFound', desc: 'The command nope has not been found' } }],
      ['{"execute": "machine-only", "id": 8}\n', { id: 8, error: { class: 'CommandNotFound', desc: 'The command machine-only has not been found' } }],
      ['{"execute": "echo", "arguments": {"text": "x", "zz": 1}, "id": 9}\n', { id: 9, error: { class: 'GenericError', desc: "Parameter 'zz' is unexpected" } }],
      ['{"execute": "echo", "arguments": {"text": "x", "count": 1.0}}\n', { error: { class: 'GenericError', desc: "Invalid parameter type for 'count', expected: integer" } }],
      ['{"execute": "echo", "arguments": {"text": "x", "opts": {"mode": "c"}}}\n', { error: { class: 'GenericError', desc: "Parameter 'mode' does not accept value 'c'" } }],
      ['{"execute": "echo", "arguments": {"text": "x", "opts": {}}}\n', { error: { class: 'GenericError', desc: "Parameter 'opts.mode' is missing" } }],
      ['{"execute": "crash", "id": 10}\n', { id: 10, error: { class: 'GenericError', desc: 'boom' } }],
      ['{"execute": "cyclic", "id": 11}\n', { id: 11, error: { class: 'GenericError', desc: 'Internal error: the reply of cyclic cannot be encoded' } }],
      ['@\n', { error: { class: 'GenericError', desc: "JSON parse error, stray '@'" } }],
      ['{"a" "b"}\n', { error: { class: 'GenericError', desc: 'JSON parse error, missing : in object pair' } }],
    ];
    for (const [input, want] of cases) {
      c.sendRaw(input);
      if (Object.keys(want).length > 0) expect(await c.readMessage(), input).toEqual(want);
    }
    await expect(c.execute('echo', { text: 'still here' })).resolves.toEqual({ text: 'still here' });
  });

  it('runs_one_command_at_a_time_per_session_and_sessions_concurrently', async () => {
    const { sock } = await server();
    const a = await client(sock);
    const b = await client(sock);
    order.length = 0;
    const a1 = a.execute('wait', { gate: 'a1' });
    const a2 = a.execute('wait', { gate: 'a2' });
    const b1 = b.execute('wait', { gate: 'b1' });
    await expect.poll(() => gate('a1').started && gate('b1').started).toBe(true);
    // a2 waits behind a1 in session a, even though its gate opens first.
    gate('a2').open();
    gate('b1').open();
    await expect(b1).resolves.toEqual({ gate: 'b1' });
    expect(gate('a2').started).toBe(false);
    gate('a1').open();
    await expect(a1).resolves.toEqual({ gate: 'a1' });
    await expect(a2).resolves.toEqual({ gate: 'a2' });
    expect(order.filter((o) => / a\d$/.test(o))).toEqual(['start a1', 'end a1', 'start a2', 'end a2']);
  });

  it('sends_events_only_to_negotiated_sessions_with_qemus_timestamp', async () => {
    const { sock } = await server();
    const a = await client(sock);
    const b = await client(sock);
    const shy = await client(sock, false);
    await a.execute('emit', { event: 'TEST_EVENT' });
    const ea = await a.waitEvent('TEST_EVENT');
    const eb = await b.waitEvent('TEST_EVENT');
    expect(ea.data).toEqual({ from: 'emit' });
    expect(eb.timestamp).toEqual(ea.timestamp);
    const nowS = Date.now() / 1000;
    expect(Math.abs(ea.timestamp.seconds + ea.timestamp.microseconds / 1e6 - nowS)).toBeLessThan(5);
    expect(Number.isInteger(ea.timestamp.microseconds) && ea.timestamp.microseconds < 1e6).toBe(true);
    // The session still negotiating saw nothing; once negotiated it sees the next one.
    await shy.execute('qmp_capabilities');
    await a.execute('emit', { event: 'SECOND' });
    await shy.waitEvent('SECOND');
    expect(shy.events.map((e) => e.event)).toEqual(['SECOND']);
  });

  it('turns_job_status_changes_into_JOB_STATUS_CHANGE_once_per_session_with_two_servers', async () => {
    const one = await server();
    const two = await server();
    const a = await client(one.sock);
    const b = await client(two.sock);
    withBql((bql) => {
      jobStart(bql, 'qmp-test-job', 'test', { run: () => Promise.resolve() });
    });
    const seen = await a.waitEvent('JOB_STATUS_CHANGE', (e) => e.data?.['status'] === 'null');
    expect(seen.data).toEqual({ status: 'null', id: 'qmp-test-job' });
    await b.waitEvent('JOB_STATUS_CHANGE', (e) => e.data?.['status'] === 'null');
    const statuses = (c: QmpClient): unknown[] => c.events.filter((e) => e.event === 'JOB_STATUS_CHANGE' && e.data?.['id'] === 'qmp-test-job').map((e) => e.data?.['status']);
    expect(statuses(a)).toEqual(['created', 'running', 'waiting', 'pending', 'concluded', 'null']);
    expect(statuses(b)).toEqual(statuses(a));
  });

  it('quit_replies_and_calls_onQuit_once_without_SHUTDOWN_when_there_is_no_machine_as_QSD', async () => {
    const { sock } = await server();
    const a = await client(sock);
    const b = await client(sock);
    const before = quits;
    a.sendRaw('{"execute": "quit", "id": "q"}\n');
    expect(await a.readRawLine()).toBe('{"return": {}, "id": "q"}');
    await a.execute('quit');
    await new Promise((r) => setTimeout(r, 50));
    expect(quits).toBe(before + 1);
    expect([...a.events, ...b.events].filter((e) => e.event === 'SHUTDOWN')).toEqual([]);
  });

  it('lists_its_commands_and_always_has_the_session_commands', async () => {
    const { sock } = await server({ commands: testCommands });
    const c = await client(sock);
    const names = ((await c.execute('query-commands')) as { name: string }[]).map((x) => x.name);
    expect(names).toEqual([...testCommands.map((t) => t.name), 'qmp_capabilities', 'query-commands', 'quit']);
  });

  it('refuses_a_session_past_the_cap_with_one_error_line_and_a_clean_close', async () => {
    const { sock } = await server({ maxSessions: 2 });
    await client(sock);
    await client(sock);
    const extra = await new Promise<string>((resolve) => {
      let text = '';
      const s = net.createConnection({ path: sock });
      s.on('data', (d: Buffer) => (text += d.toString()));
      s.on('close', () => resolve(text));
    });
    expect(extra).toBe('{"error": {"class": "GenericError", "desc": "Too many QMP sessions: this server serves at most 2 at once"}}\r\n');
    await clients[0]?.close();
    await expect.poll(async () => {
      try {
        const c = await client(sock);
        return typeof c.greeting['QMP'];
      } catch {
        return 'refused';
      }
    }).toBe('object');
  });

  it('replies_to_a_client_that_already_shut_its_sending_side', async () => {
    const { sock } = await server();
    const text = await new Promise<string>((resolve) => {
      let out = '';
      const s = net.createConnection({ path: sock }, () => {
        s.end('{"execute": "qmp_capabilities"}\n{"execute": "echo", "arguments": {"text": "bye"}, "id": 1}\n');
      });
      s.on('data', (d: Buffer) => (out += d.toString()));
      s.on('close', () => resolve(out));
    });
    const lines = text.split('\r\n').filter((l) => l !== '');
    expect(lines.slice(1)).toEqual(['{"return": {}}', '{"return": {"text": "bye"}, "id": 1}']);
  });

  it('close_waits_for_the_running_command_and_sends_its_reply', async () => {
    const { srv, sock } = await server();
    const c = await client(sock);
    const pending = c.execute('wait', { gate: 'closing' });
    await expect.poll(() => gate('closing').started).toBe(true);
    const closed = srv.close();
    let done = false;
    void closed.then(() => (done = true));
    await new Promise((r) => setTimeout(r, 50));
    expect(done).toBe(false);
    gate('closing').open();
    await expect(pending).resolves.toEqual({ gate: 'closing' });
    await closed;
    await c.waitClosed();
    expect(fs.existsSync(sock)).toBe(false);
  });
});

describe('QMP protocol documentation', () => {
  it('states_the_bounds_the_code_enforces', () => {
    expect(QMP_PROTOCOL_DOC).toContain('1024 levels of nesting');
    expect(QMP_PROTOCOL_DOC).toContain('1 MiB of tokens and 64 Ki tokens');
    expect(QMP_PROTOCOL_DOC).toContain('at most 8');
    expect(QMP_PROTOCOL_DOC).toContain('Per server: 64 sessions.');
  });
});

describe('QMP server sockets', () => {
  it('replaces_a_stale_socket_file_but_never_a_live_one_or_a_regular_file', async () => {
    const stale = path.join(dir, 'stale.sock');
    const old = net.createServer();
    await new Promise<void>((r) => old.listen(stale, r));
    await expect(QmpServer.listen({ type: 'unix', path: stale }, { commands: testCommands, machine: null, onQuit: () => undefined })).rejects.toMatchObject({
      code: 'EBUSY',
      message: `Failed to bind socket to ${stale}: Address already in use`,
    });
    await new Promise<void>((r) => old.close(() => r()));
    // net.Server.close removes the file: a stale one is left by a process that exits without cleaning up.
    fs.writeFileSync(path.join(dir, 'make-stale.cjs'), `const net=require('net');const s=net.createServer();s.listen(${JSON.stringify(stale)},()=>process.reallyExit(0));`);
    spawnSync(process.execPath, [path.join(dir, 'make-stale.cjs')]);
    expect(fs.lstatSync(stale).isSocket()).toBe(true);
    const srv = await QmpServer.listen({ type: 'unix', path: stale }, { commands: testCommands, machine: null, onQuit: () => undefined });
    servers.push(srv);
    const c = await client(stale);
    await expect(c.execute('echo', { text: 'ok' })).resolves.toEqual({ text: 'ok' });

    const regular = path.join(dir, 'regular');
    fs.writeFileSync(regular, 'precious');
    await expect(QmpServer.listen({ type: 'unix', path: regular }, { commands: testCommands, machine: null, onQuit: () => undefined })).rejects.toMatchObject({ code: 'EINVAL' });
    expect(fs.readFileSync(regular, 'utf8')).toBe('precious');
  });

  it('listens_on_tcp_port_0_and_reports_the_bound_port', async () => {
    const srv = await QmpServer.listen({ type: 'inet', host: '127.0.0.1', port: 0 }, { commands: testCommands, machine: null, onQuit: () => undefined });
    servers.push(srv);
    expect(srv.address.type).toBe('inet');
    const port = srv.address.type === 'inet' ? srv.address.port : 0;
    expect(port).toBeGreaterThan(0);
    const c = await QmpClient.connect({ host: '127.0.0.1', port });
    clients.push(c);
    await expect(c.execute('echo', { text: 'tcp' })).resolves.toEqual({ text: 'tcp' });
  });
});

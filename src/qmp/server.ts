/**
 * The QMP server: listens on a unix socket or TCP (or serves streams handed to it: a chardev
 * socket, stdio) and runs one QmpSession per connection; `snapstack daemon` and `snapstack monitor
 * -qmp` sit on it.
 *
 * Main-loop code without the BQL (sessions dispatch; commands take the lock themselves).
 *
 * - Unix socket: a stale socket file (nothing accepts on it) is removed before bind; a live one is
 *   refused ("Address already in use"), and so is a path that is not a socket: unlike QEMU, which
 *   unlinks whatever is there, we never delete a file that is not ours. The socket file is removed
 *   again on close. TCP binds the host given (127.0.0.1 when empty).
 * - At most 64 sessions at once (QEMU has no bound): a connection past the cap gets one error
 *   line and is closed, before any greeting.
 * - Events: the server passes every event of the process-wide bus (events.ts) to each negotiated
 *   session, and retains the job-event bridge while it runs.
 * - close() stops listening, lets each session's running command finish and send its reply, then
 *   closes every connection.
 */
import fs from 'node:fs';
import net from 'node:net';
import type { Duplex } from 'node:stream';
import { BlockError, codeForSystemError } from '../block/errors.js';
import type { Machine } from '../machine/machine.js';
import { sessionCommands } from './commands/session.js';
import { forwardMachineEvents } from './commands/snapshot-jobs.js';
import { onQmpEvent, retainJobEventBridge } from './events.js';
import { DEFAULT_JSON_LIMITS, formatQmpJson, type JsonStreamLimits } from './json-stream.js';
import { MAX_OUTPUT_BYTES, MAX_QUEUED_REQUESTS, OUTPUT_HIGH_WATER_BYTES, QmpSession } from './session.js';
import type { QmpCommand } from './types.js';

/** Where a QMP server listens. */
export type QmpListenAddress = { type: 'unix'; path: string } | { type: 'inet'; host: string; port: number };

/** What a QMP server serves. */
export interface QmpServerOptions {
  commands: readonly QmpCommand[];
  machine: Machine | null;
  onQuit: () => void;
  /** Sessions at once (default 64). */
  maxSessions?: number;
  /** The parser's per-message bounds (defaults: json-stream.ts). */
  limits?: Partial<JsonStreamLimits>;
}

/** Sessions at once, unless told. */
export const DEFAULT_MAX_SESSIONS = 64;

function systemCode(e: unknown): string {
  return typeof e === 'object' && e !== null && 'code' in e ? String((e as { code: unknown }).code) : '';
}

/** True when something accepts connections on the unix socket at `path`. */
function socketIsLive(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.createConnection({ path });
    const done = (live: boolean): void => {
      s.destroy();
      resolve(live);
    };
    s.once('connect', () => done(true));
    s.once('error', () => done(false));
    setTimeout(() => done(false), 1000).unref();
  });
}

/** Makes `path` free for a new unix socket: removes a stale socket, refuses anything else. */
async function clearUnixPath(path: string): Promise<void> {
  let st: fs.Stats;
  try {
    st = fs.lstatSync(path);
  } catch (e) {
    if (systemCode(e) === 'ENOENT') return;
    throw new BlockError(codeForSystemError(systemCode(e)), `Failed to bind socket to ${path}: ${e instanceof Error ? e.message : String(e)}`, { file: path, cause: e });
  }
  if (!st.isSocket()) {
    throw new BlockError('EINVAL', `Failed to bind socket to ${path}: the file exists and is not a socket (not replacing it)`, { file: path });
  }
  if (await socketIsLive(path)) {
    throw new BlockError('EBUSY', `Failed to bind socket to ${path}: Address already in use`, { file: path });
  }
  fs.unlinkSync(path);
}

function listenOn(server: net.Server, addr: QmpListenAddress): Promise<void> {
  return new Promise((resolve, reject) => {
    const onError = (e: Error): void => {
      const where = addr.type === 'unix' ? addr.path : `${addr.host}:${addr.port}`;
      const code = systemCode(e) === 'EADDRINUSE' ? 'EBUSY' : codeForSystemError(systemCode(e));
      reject(new BlockError(code, `Failed to bind socket to ${where}: ${e.message}`, addr.type === 'unix' ? { file: addr.path, cause: e } : { cause: e }));
    };
    server.once('error', onError);
    const ok = (): void => {
      server.off('error', onError);
      resolve();
    };
    if (addr.type === 'unix') server.listen({ path: addr.path }, ok);
    else server.listen({ host: addr.host === '' ? '127.0.0.1' : addr.host, port: addr.port }, ok);
  });
}

/**
 * The protocol section of docs/qmp.md (scripts/gen-qmp-doc.js prints it before the command list),
 * written from the constants above so that the numbers cannot drift from the code.
 */
export const QMP_PROTOCOL_DOC = `## The protocol

A session is one connection (\`snapstack daemon --chardev socket,id=c,path=P,server=on,wait=off
--monitor chardev=c\`, or \`snapstack monitor -qmp unix:P,server=on,wait=off\`). It goes as with
qemu-storage-daemon 7.2; test/qmp-qsd-protocol.test.ts sends the same bytes to both (a fixed
sequence and 1500 random near-JSON inputs) and compares the replies and event lines byte for byte:
member order (QEMU writes objects in its hash table's order), escapes, numbers, and which problem
is named first when a request has several.

1. The server greets: \`{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package":
   "snapstack X.Y.Z"}, "capabilities": ["oob"]}}\`.
2. The client sends \`{"execute": "qmp_capabilities"}\` (\`"arguments": {"enable": ["oob"]}\` allows
   \`exec-oob\`, which no command accepts yet). Until then every other command is CommandNotFound
   "Expecting capabilities negotiation with 'qmp_capabilities'", and no events are sent.
3. Each request \`{"execute": NAME, "arguments": {...}, "id": ANY}\` gets one reply, \`{"return": ...,
   "id": ANY}\` or \`{"id": ANY, "error": {"class": ..., "desc": ...}}\`; \`id\` is optional and
   echoed as sent (integers up to 64 bits exactly). Requests of one session run one at a time, in order; sessions run side by side.
4. Events \`{"timestamp": {"seconds": S, "microseconds": US}, "event": NAME, "data": {...}}\` arrive
   between replies: JOB_STATUS_CHANGE for every job, the BLOCK_JOB_* events, SHUTDOWN after \`quit\`
   (as qemu-system-x86_64 sends it; qemu-storage-daemon sends none).
5. Every line the server writes ends in CRLF; input need not be lines: \`{...}{...}\` is two requests.

Bad input gets QEMU's replies: JSON errors ("JSON parse error, stray '@'", "... expecting value"),
"QMP input must be a JSON object", "QMP input lacks member 'execute'", "QMP input member 'x' is
unexpected", "The command x has not been found", and for arguments "Parameter 'x' is missing",
"Parameter 'x' is unexpected", "Invalid parameter type for 'x', expected: string". After a JSON
error the parser skips to the next \`{ } [ ] : ,\` or control character, as QEMU's does; send a
0xFF byte to force it into a known state.

Bounds, per message: ${DEFAULT_JSON_LIMITS.maxNesting} levels of nesting (as QEMU), ${DEFAULT_JSON_LIMITS.maxMessageBytes / 1024 / 1024} MiB of tokens and ${DEFAULT_JSON_LIMITS.maxTokens / 1024} Ki tokens (QEMU:
64 MiB, 2 Mi). A message past a bound gets one error ("JSON token size limit exceeded") and the
rest of it is skipped (QEMU parses the rest as new input). Per session: at most ${MAX_QUEUED_REQUESTS}
requests wait to run (reading pauses), output waiting for a peer that does not read stops the
session at ${OUTPUT_HIGH_WATER_BYTES / 1024 / 1024} MiB and closes it at ${MAX_OUTPUT_BYTES / 1024 / 1024} MiB. Per server: ${DEFAULT_MAX_SESSIONS} sessions.
`;

/** A QMP server: a listening socket (optional) and its sessions. */
export class QmpServer {
  /** The bound address (the port filled in when 0 was asked). */
  readonly address: QmpListenAddress;
  readonly #opts: QmpServerOptions;
  readonly #commands: readonly QmpCommand[];
  readonly #server: net.Server | null;
  readonly #sessions = new Set<QmpSession>();
  readonly #stopEvents: () => void;
  readonly #releaseBridge: () => void;
  /** The machine's STOP / RESUME / BLOCK_IO_ERROR events, forwarded while the server runs. */
  readonly #releaseMachineEvents: () => void;
  /** The unix socket's inode, to remove only our own file on close. */
  readonly #socketIno: number | null;
  #quit = false;
  #closing: Promise<void> | null = null;

  private constructor(address: QmpListenAddress, opts: QmpServerOptions, server: net.Server | null, socketIno: number | null) {
    this.address = address;
    this.#opts = opts;
    this.#server = server;
    this.#socketIno = socketIno;
    // qmp_capabilities, query-commands and quit always exist, whether or not the table lists them.
    const names = new Set(opts.commands.map((c) => c.name));
    this.#commands = [...opts.commands, ...sessionCommands.filter((c) => !names.has(c.name))];
    this.#stopEvents = onQmpEvent((e) => {
      for (const s of this.#sessions) {
        try {
          s.sendEvent(e);
        } catch {
          // An event that cannot be encoded reaches no session; the others' events still flow.
        }
      }
    });
    this.#releaseBridge = retainJobEventBridge();
    this.#releaseMachineEvents = opts.machine === null ? () => undefined : forwardMachineEvents(opts.machine);
    server?.on('connection', (socket) => this.attach(socket));
  }

  /** Listens on `addr` and serves every connection. */
  static async listen(addr: QmpListenAddress, opts: QmpServerOptions): Promise<QmpServer> {
    if (addr.type === 'unix') await clearUnixPath(addr.path);
    // allowHalfOpen: a client that sends its commands and shuts its side (socat, nc -N) still gets the replies.
    const server = net.createServer({ allowHalfOpen: true, pauseOnConnect: false });
    await listenOn(server, addr);
    let bound: QmpListenAddress = addr;
    let ino: number | null = null;
    if (addr.type === 'inet') {
      const a = server.address();
      if (a !== null && typeof a === 'object') bound = { type: 'inet', host: a.address, port: a.port };
    } else {
      ino = fs.statSync(addr.path).ino;
    }
    return new QmpServer(bound, opts, server, ino);
  }

  /**
   * Serves every connection of a listener that already listens on `addr` (a chardev's): the socket
   * never goes away between the chardev and the monitor, so a client that saw it can connect.
   */
  static adopt(listener: net.Server, addr: QmpListenAddress, opts: QmpServerOptions): QmpServer {
    let ino: number | null = null;
    if (addr.type === 'unix') {
      try {
        ino = fs.statSync(addr.path).ino;
      } catch {
        ino = null;
      }
    }
    return new QmpServer(addr, opts, listener, ino);
  }

  /** Serves one already-connected stream (a chardev socket, stdio). */
  attach(stream: Duplex): void {
    if (this.#closing !== null) {
      stream.destroy();
      return;
    }
    const max = this.#opts.maxSessions ?? DEFAULT_MAX_SESSIONS;
    if (this.#sessions.size >= max) {
      stream.on('error', () => undefined);
      const error = { class: 'GenericError', desc: `Too many QMP sessions: this server serves at most ${max} at once` };
      stream.end(`${formatQmpJson({ error })}\r\n`);
      setTimeout(() => stream.destroy(), 1000).unref();
      return;
    }
    const session = new QmpSession(stream, {
      commands: this.#commands,
      machine: this.#opts.machine,
      onQuit: () => this.#onQuit(),
      ...(this.#opts.limits !== undefined ? { limits: this.#opts.limits } : {}),
    });
    this.#sessions.add(session);
    void session.closed.then(() => this.#sessions.delete(session));
    session.start();
  }

  /** Sessions currently connected. */
  get sessionCount(): number {
    return this.#sessions.size;
  }

  /** Stops listening, waits for running commands, closes every session. */
  close(): Promise<void> {
    if (this.#closing === null) this.#closing = this.#doClose();
    return this.#closing;
  }

  async #doClose(): Promise<void> {
    const server = this.#server;
    const stopped =
      server === null ? Promise.resolve() : new Promise<void>((resolve) => server.close(() => resolve()));
    await Promise.all([...this.#sessions].map((s) => s.close()));
    await stopped;
    this.#stopEvents();
    this.#releaseBridge();
    this.#releaseMachineEvents();
    if (this.address.type === 'unix' && this.#socketIno !== null) {
      try {
        if (fs.statSync(this.address.path).ino === this.#socketIno) fs.unlinkSync(this.address.path);
      } catch {
        // Already gone.
      }
    }
  }

  #onQuit(): void {
    if (this.#quit) return;
    this.#quit = true;
    this.#opts.onQuit();
  }
}

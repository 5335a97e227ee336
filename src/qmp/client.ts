/**
 * A small QMP client: for tests, benchmarks and library users that drive a QMP server (snapstack's
 * own, or qemu-storage-daemon / qemu-system-* 7.2) over a unix socket or TCP.
 *
 * Main-loop code with no lock: it only moves JSON over a socket and knows nothing of the block
 * layer. The wire protocol (QEMU's docs/interop/qmp-spec): the server sends one greeting line
 * `{"QMP": {"version": ..., "capabilities": [...]}}`; the client sends `qmp_capabilities` to leave
 * capabilities-negotiation mode; each command `{"execute": NAME, "arguments": {...}, "id": ID}`
 * gets one reply `{"return": ...}` or `{"error": {"class", "desc"}}` carrying the same `id`; events
 * `{"event", "data", "timestamp"}` may arrive between replies. Lines end in CRLF.
 *
 * The client adds its own string `id` to every command it sends and matches replies by it, so a
 * reply that carries no id (a parse error, a reply to text sent with sendRaw) is never mistaken
 * for a command's: such lines are queued for readRawLine / readMessage. A reply line longer than
 * `maxLineBytes` (default 64 MiB) is a protocol error that closes the client, never a hang or
 * unbounded buffering.
 */
import net from 'node:net';
import type { Duplex } from 'node:stream';
import { QmpError, type QmpErrorClass, type QmpObject, type QmpValue } from './types.js';

/** Where a QMP server listens: a unix socket path, or a TCP host and port. */
export type QmpConnectAddress = { path: string } | { host: string; port: number };

/** Options of QmpClient.connect. */
export interface QmpClientOptions {
  /** Send qmp_capabilities after the greeting (default true). */
  negotiate?: boolean;
  /** Capabilities to enable in that qmp_capabilities (`enable`), e.g. ['oob']. */
  capabilities?: string[];
  /** How long to wait for the connection and the greeting (default 10 s). */
  connectTimeoutMs?: number;
  /** The longest line accepted from the server; a longer one closes the client (default 64 MiB). */
  maxLineBytes?: number;
  /** Sees every line the server sends, as sent (without CRLF), before it is sorted: for logs and byte-level tests. */
  onLine?: (line: string) => void;
}

/** One event as QMP sends it. */
export interface QmpEvent {
  event: string;
  data?: QmpObject;
  timestamp: { seconds: number; microseconds: number };
}

/** Why the client failed outside a command's own error reply. */
export type QmpClientErrorCode = 'closed' | 'timeout' | 'protocol' | 'line-too-long' | 'connect';

/** A failure of the connection or of the protocol (a command's own error is a QmpError). */
export class QmpClientError extends Error {
  override readonly name = 'QmpClientError';
  constructor(
    readonly code: QmpClientErrorCode,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

/** Options of one command. */
export interface QmpExecuteOptions {
  /** Send it as `exec-oob` instead of `execute`. */
  oob?: boolean;
  /** Reject with a 'timeout' QmpClientError after this long (default: wait as long as it takes). */
  timeoutMs?: number;
}

interface Pending {
  resolve(reply: QmpObject): void;
  reject(e: Error): void;
  timer: NodeJS.Timeout | null;
}

interface Waiter<T> {
  accept(v: T): boolean;
  resolve(v: T): void;
  reject(e: Error): void;
  timer: NodeJS.Timeout | null;
}

const DEFAULT_MAX_LINE_BYTES = 64 * 1024 * 1024;
const DEFAULT_CONNECT_TIMEOUT_MS = 10_000;

function isObject(v: unknown): v is QmpObject {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

const ERROR_CLASSES: ReadonlySet<string> = new Set<QmpErrorClass>([
  'GenericError',
  'CommandNotFound',
  'DeviceNotActive',
  'DeviceNotFound',
  'KVMMissingCap',
]);

/** Turns a reply's `error` member into a QmpError (an unknown class is kept as GenericError). */
export function qmpErrorOf(reply: QmpObject): QmpError | null {
  const err = reply['error'];
  if (!isObject(err)) return null;
  const cls = typeof err['class'] === 'string' && ERROR_CLASSES.has(err['class']) ? (err['class'] as QmpErrorClass) : 'GenericError';
  const desc = typeof err['desc'] === 'string' ? err['desc'] : JSON.stringify(err);
  return new QmpError(cls, desc);
}

/** A QMP connection. */
export class QmpClient {
  /** The server's greeting line, parsed: `{"QMP": {"version": ..., "capabilities": [...]}}`. */
  greeting: QmpObject = {};
  /** Every event received so far, in order. */
  readonly events: QmpEvent[] = [];

  readonly #stream: Duplex;
  readonly #maxLineBytes: number;
  readonly #onLineTap: ((line: string) => void) | undefined;
  #chunks: Buffer[] = [];
  #chunkBytes = 0;
  #nextId = 1;
  readonly #pending = new Map<string, Pending>();
  /** Lines that were neither an event nor the reply to a pending command. */
  readonly #lines: string[] = [];
  #lineWaiters: Waiter<string>[] = [];
  #eventWaiters: Waiter<QmpEvent>[] = [];
  /** Events already handed out by waitEvent (by index in `events`). */
  readonly #taken = new Set<number>();
  #failure: QmpClientError | null = null;
  #closed = false;
  readonly #closedPromise: Promise<void>;

  private constructor(stream: Duplex, maxLineBytes: number, onLine: ((line: string) => void) | undefined) {
    this.#stream = stream;
    this.#maxLineBytes = maxLineBytes;
    this.#onLineTap = onLine;
    let onClosed: () => void = () => undefined;
    this.#closedPromise = new Promise<void>((resolve) => {
      onClosed = resolve;
    });
    stream.on('data', (chunk: Buffer | string) => this.#onData(typeof chunk === 'string' ? Buffer.from(chunk) : chunk));
    stream.on('error', (e: Error) => this.#fail(new QmpClientError('closed', `QMP connection failed: ${e.message}`, { cause: e })));
    stream.on('close', () => {
      this.#fail(new QmpClientError('closed', 'QMP connection closed by the server'));
      onClosed();
    });
    stream.on('end', () => {
      this.#fail(new QmpClientError('closed', 'QMP connection closed by the server'));
    });
  }

  /** Connects, reads the greeting and (unless `negotiate: false`) sends qmp_capabilities. */
  static async connect(addr: QmpConnectAddress, opts: QmpClientOptions = {}): Promise<QmpClient> {
    const timeoutMs = opts.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS;
    const socket = await new Promise<net.Socket>((resolve, reject) => {
      const s = 'path' in addr ? net.createConnection({ path: addr.path }) : net.createConnection({ host: addr.host, port: addr.port });
      const timer = setTimeout(() => {
        s.destroy();
        reject(new QmpClientError('timeout', `connecting to QMP at ${describe(addr)} timed out after ${timeoutMs} ms`));
      }, timeoutMs);
      s.once('connect', () => {
        clearTimeout(timer);
        s.removeAllListeners('error');
        resolve(s);
      });
      s.once('error', (e: Error) => {
        clearTimeout(timer);
        reject(new QmpClientError('connect', `cannot connect to QMP at ${describe(addr)}: ${e.message}`, { cause: e }));
      });
    });
    return QmpClient.fromStream(socket, opts);
  }

  /** Speaks QMP over an already-connected stream (a socket pair, a child's stdio). */
  static async fromStream(stream: Duplex, opts: QmpClientOptions = {}): Promise<QmpClient> {
    const client = new QmpClient(stream, opts.maxLineBytes ?? DEFAULT_MAX_LINE_BYTES, opts.onLine);
    try {
      const line = await client.readRawLine(opts.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS);
      let greeting: unknown;
      try {
        greeting = JSON.parse(line);
      } catch {
        throw new QmpClientError('protocol', `the QMP greeting is not JSON: ${line.slice(0, 200)}`);
      }
      if (!isObject(greeting) || !isObject(greeting['QMP'])) {
        throw new QmpClientError('protocol', `the first line is not a QMP greeting: ${line.slice(0, 200)}`);
      }
      client.greeting = greeting;
      if (opts.negotiate !== false) await client.execute('qmp_capabilities', opts.capabilities === undefined ? undefined : { enable: opts.capabilities });
      return client;
    } catch (e) {
      client.#stream.destroy();
      throw e;
    }
  }

  /** Runs a command: resolves with its `return`, rejects with a QmpError (class and desc) on an error reply. */
  async execute(name: string, args?: QmpObject, opts: QmpExecuteOptions = {}): Promise<QmpValue> {
    const reply = await this.request(name, args, opts);
    const err = qmpErrorOf(reply);
    if (err !== null) throw err;
    if (!('return' in reply)) throw new QmpClientError('protocol', `reply to ${name} has neither return nor error: ${JSON.stringify(reply)}`);
    return reply['return'] as QmpValue;
  }

  /** Sends a command and resolves with the whole reply object (`return` or `error`, and the id). */
  request(name: string, args?: QmpObject, opts: QmpExecuteOptions = {}): Promise<QmpObject> {
    const id = `snapstack-client-${this.#nextId++}`;
    const msg: QmpObject = { [opts.oob === true ? 'exec-oob' : 'execute']: name };
    if (args !== undefined) msg['arguments'] = args;
    msg['id'] = id;
    return new Promise<QmpObject>((resolve, reject) => {
      if (this.#failure !== null) {
        reject(this.#failure);
        return;
      }
      const timer =
        opts.timeoutMs === undefined
          ? null
          : setTimeout(() => {
              this.#pending.delete(id);
              reject(new QmpClientError('timeout', `no reply to ${name} within ${opts.timeoutMs} ms`));
            }, opts.timeoutMs);
      this.#pending.set(id, { resolve, reject, timer });
      this.#stream.write(`${JSON.stringify(msg)}\n`);
    });
  }

  /** Writes text as is (no id is added, no newline appended): for protocol and fuzz tests. */
  sendRaw(text: string | Buffer): void {
    if (this.#failure !== null) throw this.#failure;
    this.#stream.write(text);
  }

  /** Like sendRaw, but resolves once the bytes were handed to the kernel (for huge inputs). */
  sendRawAsync(text: string | Buffer): Promise<void> {
    if (this.#failure !== null) return Promise.reject(this.#failure);
    return new Promise<void>((resolve, reject) => {
      this.#stream.write(text, (e) => (e ? reject(e) : resolve()));
    });
  }

  /**
   * The next line (without its CRLF) that was neither an event nor the reply to a command sent
   * with execute/request, waiting up to timeoutMs (default 10 s).
   */
  readRawLine(timeoutMs = 10_000): Promise<string> {
    const queued = this.#lines.shift();
    if (queued !== undefined) return Promise.resolve(queued);
    if (this.#failure !== null) return Promise.reject(this.#failure);
    return this.#wait(this.#lineWaiters, () => true, timeoutMs, 'a line from the server');
  }

  /** readRawLine, parsed as a JSON object. */
  async readMessage(timeoutMs = 10_000): Promise<QmpObject> {
    const line = await this.readRawLine(timeoutMs);
    let v: unknown;
    try {
      v = JSON.parse(line);
    } catch {
      throw new QmpClientError('protocol', `the server sent a line that is not JSON: ${line.slice(0, 200)}`);
    }
    if (!isObject(v)) throw new QmpClientError('protocol', `the server sent JSON that is not an object: ${line.slice(0, 200)}`);
    return v;
  }

  /**
   * The first event named `name` (and accepted by `predicate`) that no earlier waitEvent returned,
   * from those received already or the next ones; rejects with a 'timeout' error after timeoutMs.
   */
  waitEvent(name: string, predicate: (e: QmpEvent) => boolean = () => true, timeoutMs = 10_000): Promise<QmpEvent> {
    const accept = (e: QmpEvent): boolean => e.event === name && predicate(e);
    for (let i = 0; i < this.events.length; i++) {
      const e = this.events[i];
      if (e !== undefined && !this.#taken.has(i) && accept(e)) {
        this.#taken.add(i);
        return Promise.resolve(e);
      }
    }
    if (this.#failure !== null) return Promise.reject(this.#failure);
    return this.#wait(this.#eventWaiters, accept, timeoutMs, `event ${name}`);
  }

  /** True once the connection is closed or failed. */
  get closed(): boolean {
    return this.#failure !== null;
  }

  /** Resolves when the server closed the connection (or close() was called). */
  waitClosed(): Promise<void> {
    return this.#closedPromise;
  }

  /** Closes the connection; pending commands reject with a 'closed' error. */
  async close(): Promise<void> {
    if (!this.#closed) {
      this.#closed = true;
      this.#fail(new QmpClientError('closed', 'the QMP client was closed'));
      this.#stream.end();
      const timer = setTimeout(() => this.#stream.destroy(), 1000);
      await this.#closedPromise;
      clearTimeout(timer);
    }
    await this.#closedPromise;
  }

  #wait<T>(list: Waiter<T>[], accept: (v: T) => boolean, timeoutMs: number, what: string): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      const w: Waiter<T> = { accept, resolve, reject, timer: null };
      w.timer = setTimeout(() => {
        const i = list.indexOf(w);
        if (i >= 0) list.splice(i, 1);
        reject(new QmpClientError('timeout', `waited ${timeoutMs} ms for ${what}`));
      }, timeoutMs);
      list.push(w);
    });
  }

  #onData(chunk: Buffer): void {
    if (this.#failure !== null) return;
    let start = 0;
    for (;;) {
      const nl = chunk.indexOf(0x0a, start);
      if (nl < 0) break;
      const piece = chunk.subarray(start, nl);
      if (this.#chunkBytes + piece.length > this.#maxLineBytes) {
        this.#lineTooLong();
        return;
      }
      this.#chunks.push(piece);
      const line = Buffer.concat(this.#chunks).toString('utf8');
      this.#chunks = [];
      this.#chunkBytes = 0;
      this.#onLine(line.endsWith('\r') ? line.slice(0, -1) : line);
      if (this.#failure !== null) return;
      start = nl + 1;
    }
    if (start < chunk.length) {
      const rest = chunk.subarray(start);
      if (this.#chunkBytes + rest.length > this.#maxLineBytes) {
        this.#lineTooLong();
        return;
      }
      // Copy: the stream may reuse its buffer.
      this.#chunks.push(Buffer.from(rest));
      this.#chunkBytes += rest.length;
    }
  }

  #lineTooLong(): void {
    this.#chunks = [];
    this.#chunkBytes = 0;
    this.#fail(new QmpClientError('line-too-long', `the server sent a line longer than ${this.#maxLineBytes} bytes`));
    this.#stream.destroy();
  }

  #onLine(line: string): void {
    this.#onLineTap?.(line);
    let msg: unknown = undefined;
    try {
      msg = JSON.parse(line);
    } catch {
      // Not JSON: hand it to readRawLine as it is.
    }
    if (isObject(msg)) {
      const id = msg['id'];
      if (typeof id === 'string' && ('return' in msg || 'error' in msg)) {
        const p = this.#pending.get(id);
        if (p !== undefined) {
          this.#pending.delete(id);
          if (p.timer !== null) clearTimeout(p.timer);
          p.resolve(msg);
          return;
        }
      }
      if (typeof msg['event'] === 'string' && !('return' in msg) && !('error' in msg)) {
        this.#onEvent(msg as unknown as QmpEvent);
        return;
      }
    }
    const w = this.#lineWaiters.shift();
    if (w !== undefined) {
      if (w.timer !== null) clearTimeout(w.timer);
      w.resolve(line);
    } else {
      this.#lines.push(line);
    }
  }

  #onEvent(e: QmpEvent): void {
    const index = this.events.length;
    this.events.push(e);
    const i = this.#eventWaiters.findIndex((w) => w.accept(e));
    if (i < 0) return;
    const w = this.#eventWaiters[i];
    if (w === undefined) return;
    this.#eventWaiters.splice(i, 1);
    if (w.timer !== null) clearTimeout(w.timer);
    this.#taken.add(index);
    w.resolve(e);
  }

  #fail(e: QmpClientError): void {
    if (this.#failure !== null) return;
    this.#failure = e;
    for (const p of this.#pending.values()) {
      if (p.timer !== null) clearTimeout(p.timer);
      p.reject(e);
    }
    this.#pending.clear();
    for (const w of [...this.#lineWaiters, ...this.#eventWaiters]) {
      if (w.timer !== null) clearTimeout(w.timer);
      w.reject(e);
    }
    this.#lineWaiters = [];
    this.#eventWaiters = [];
  }
}

function describe(addr: QmpConnectAddress): string {
  return 'path' in addr ? addr.path : `${addr.host}:${addr.port}`;
}

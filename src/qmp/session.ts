/**
 * One QMP session: the protocol as qemu-storage-daemon 7.2 speaks it on one connection.
 *
 * Main-loop code without the BQL: the session only parses, checks and dispatches; each command
 * takes the lock itself for its global-state steps (see types.ts).
 *
 * ## The protocol (what a client sees; every line below was checked against QSD 7.2)
 *
 * 1. On connect the server sends the greeting
 *    `{"QMP": {"version": {"qemu": {...}, "package": ...}, "capabilities": ["oob"]}}`.
 * 2. Capabilities negotiation: the only command is `qmp_capabilities` (optionally
 *    `{"enable": ["oob"]}`, accepted: the monitor offers oob); anything else is CommandNotFound
 *    "Expecting capabilities negotiation with 'qmp_capabilities'". No events are sent yet.
 * 3. Command mode: each input `{"execute": NAME, "arguments": {...}, "id": ANY}` gets exactly one
 *    reply, `{"return": VALUE, "id": ID}` or `{"id": ID, "error": {"class": C, "desc": D}}`
 *    (`id` only when the request had one; member order as QEMU writes it). Events
 *    `{"timestamp": ..., "event": ..., "data": ...}` come between replies.
 * 4. Request checks, in QEMU's order: the JSON (json-stream.ts: parse errors have no id); "QMP
 *    input must be a JSON object"; then the members, in QEMU's QDict order (json-stream.ts
 *    qdictOrder, so that the same problem is named first): `execute` (or `exec-oob`
 *    once oob is enabled) "must be a string", the two "clash", `arguments` "must be an object",
 *    anything else but `id` "is unexpected"; "QMP input lacks member 'execute'"; the command
 *    ("The command X has not been found", CommandNotFound); `exec-oob` of a command that does not
 *    allow it ("The command X does not support OOB": none of ours does); the arguments
 *    (schema.ts); then the command runs.
 * 5. Every line the server writes ends in CRLF, as QEMU's do.
 *
 * ## Order and bounds
 *
 * Commands of one session run one at a time in the order received (a command's `run` is awaited
 * before the next starts); sessions run concurrently. Parsing stops while 8 requests wait (QEMU's
 * QMP_REQ_QUEUE_LEN_MAX; the bytes after them wait unparsed, and reading pauses); running stops,
 * and reading with it, while more than 1 MiB of output waits for a peer that does not read. A peer
 * that lets 16 MiB pile up anyway (events keep coming) is disconnected.
 * The parser bounds each message (json-stream.ts), so a session's memory is bounded whatever the peer sends.
 */
import type { Duplex } from 'node:stream';
import type { Machine } from '../machine/machine.js';
import { qmpVersionInfo } from './commands/misc.js';
import { QMP_CAPABILITIES_ARGS } from './commands/session.js';
import { toQmpError } from './commands/util.js';
import { emitQmpEvent, type QmpEventMessage } from './events.js';
import { carryLiteral, formatQmpJson, JsonStream, qdictOrder, type JsonStreamItem, type JsonStreamLimits } from './json-stream.js';
import { validateArguments } from './schema.js';
import { QmpError, type QmpCommand, type QmpContext, type QmpErrorClass, type QmpObject, type QmpValue } from './types.js';

/** Requests parsed but not yet run before the session stops reading (QEMU's QMP_REQ_QUEUE_LEN_MAX). */
export const MAX_QUEUED_REQUESTS = 8;
/** Output waiting for the peer above which the session stops reading. */
export const OUTPUT_HIGH_WATER_BYTES = 1024 * 1024;
/** Bytes parsed at a time, so that parsing can stop once enough requests wait. */
const INPUT_SLICE_BYTES = 4096;
/** Output waiting for the peer above which the session is closed. */
export const MAX_OUTPUT_BYTES = 16 * 1024 * 1024;

/** What a session needs from its server. */
export interface QmpSessionOptions {
  /** The commands of command mode (qmp_capabilities, query-commands and quit among them). */
  commands: readonly QmpCommand[];
  machine: Machine | null;
  /**
   * Called after the reply to `quit` was written (and SHUTDOWN emitted: only with a machine, as
   * qemu-system's monitor does; qemu-storage-daemon, which has no guest, sends none).
   */
  onQuit: () => void;
  /** The parser's per-message bounds (defaults: json-stream.ts). */
  limits?: Partial<JsonStreamLimits>;
}

/** The greeting a QMP server sends first. */
export function qmpGreeting(): QmpObject {
  return { QMP: { version: qmpVersionInfo(), capabilities: ['oob'] } };
}

function isObject(v: QmpValue | undefined): v is QmpObject {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function hasOwn(o: object, k: string): boolean {
  return Object.prototype.hasOwnProperty.call(o, k);
}

/** A request's `id`, when it had one, and the request (which keeps a big integer's literal). */
interface RequestId {
  has: boolean;
  value: QmpValue;
  from: QmpObject | null;
}

/** A reply with the request's id echoed, exactly as it came. */
function withId(reply: QmpObject, id: RequestId): QmpObject {
  if (!id.has) return reply;
  reply['id'] = id.value;
  if (id.from !== null) carryLiteral(id.from, 'id', reply, 'id');
  return reply;
}

/** One connection speaking QMP. */
export class QmpSession {
  readonly #stream: Duplex;
  readonly #opts: QmpSessionOptions;
  readonly #parser: JsonStream;
  readonly #commands: ReadonlyMap<string, QmpCommand>;
  readonly #ctx: QmpContext;
  #queue: JsonStreamItem[] = [];
  #running: Promise<void> | null = null;
  #negotiated = false;
  #oob = false;
  #quitRequested = false;
  #inputEnded = false;
  #closing = false;
  #closed = false;
  #paused = false;
  /** Bytes received and not yet parsed (at most one chunk: reading pauses while they wait). */
  #input: Buffer | null = null;
  #parserEnded = false;
  readonly #closedPromise: Promise<void>;
  #resolveClosed: () => void = () => undefined;

  constructor(stream: Duplex, opts: QmpSessionOptions) {
    this.#stream = stream;
    this.#opts = opts;
    this.#parser = new JsonStream(opts.limits);
    this.#commands = new Map(opts.commands.map((c) => [c.name, c]));
    this.#closedPromise = new Promise<void>((resolve) => {
      this.#resolveClosed = resolve;
    });
    this.#ctx = {
      machine: opts.machine,
      commands: opts.commands,
      emitEvent: (event, data) => emitQmpEvent(event, data),
      requestQuit: () => {
        this.#quitRequested = true;
      },
    };
  }

  /** Sends the greeting and starts reading requests. */
  start(): void {
    const s = this.#stream;
    s.on('data', (chunk: Buffer | string) => this.#onData(typeof chunk === 'string' ? Buffer.from(chunk) : chunk));
    s.on('end', () => {
      this.#inputEnded = true;
      this.#parseInput();
      this.#pump();
    });
    s.on('drain', () => {
      this.#pump();
      this.#flow();
    });
    s.on('error', () => this.#onClosed());
    s.on('close', () => this.#onClosed());
    this.#write(qmpGreeting());
  }

  /** True once qmp_capabilities succeeded (the session is in command mode and receives events). */
  get negotiated(): boolean {
    return this.#negotiated;
  }

  /** Resolves when the connection is closed. */
  get closed(): Promise<void> {
    return this.#closedPromise;
  }

  /** Sends an event, if the session is in command mode (QEMU sends none while negotiating). */
  sendEvent(e: QmpEventMessage): void {
    if (!this.#negotiated || this.#closed) return;
    this.#write(e as unknown as QmpObject);
  }

  /** Stops reading, waits for the running command (its reply is still sent), then closes the connection. */
  async close(): Promise<void> {
    if (!this.#closing) {
      this.#closing = true;
      this.#queue = [];
      this.#stream.pause();
      if (this.#running !== null) await this.#running;
      if (!this.#closed) {
        // Flush what was written (the running command's reply), then close without waiting for the
        // peer to close its side; a peer that does not read gets 2 s.
        const s = this.#stream;
        const timer = setTimeout(() => s.destroy(), 2000);
        timer.unref();
        s.end(() => s.destroy());
        await this.#closedPromise;
        clearTimeout(timer);
      }
    }
    await this.#closedPromise;
  }

  #onClosed(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#queue = [];
    if (!this.#stream.destroyed) this.#stream.destroy();
    this.#resolveClosed();
  }

  #onData(chunk: Buffer): void {
    if (this.#closing || this.#closed) return;
    this.#input = this.#input === null ? chunk : Buffer.concat([this.#input, chunk]);
    this.#parseInput();
    this.#pump();
    this.#flow();
  }

  /**
   * Parses received bytes a slice at a time while fewer than MAX_QUEUED_REQUESTS wait, so that
   * one large chunk of tiny requests never becomes thousands of queued ones; the rest waits as bytes.
   */
  #parseInput(): void {
    while (this.#input !== null && this.#queue.length < MAX_QUEUED_REQUESTS) {
      const slice = this.#input.subarray(0, INPUT_SLICE_BYTES);
      this.#input = this.#input.length > INPUT_SLICE_BYTES ? this.#input.subarray(INPUT_SLICE_BYTES) : null;
      const items = this.#parser.push(slice);
      if (items.length > 0) this.#queue.push(...items);
    }
    if (this.#input === null && this.#inputEnded && !this.#parserEnded) {
      this.#parserEnded = true;
      this.#queue.push(...this.#parser.end());
    }
  }

  /** Pauses reading while too much waits (requests, unparsed bytes, replies to send); resumes when it drained. */
  #flow(): void {
    if (this.#closing || this.#closed) return;
    const busy = this.#queue.length >= MAX_QUEUED_REQUESTS || this.#input !== null || this.#outputBacklogged();
    if (busy && !this.#paused) {
      this.#paused = true;
      this.#stream.pause();
    } else if (!busy && this.#paused) {
      this.#paused = false;
      this.#stream.resume();
    }
  }

  #outputBacklogged(): boolean {
    return this.#stream.writableLength > OUTPUT_HIGH_WATER_BYTES;
  }

  /** Runs queued requests one at a time; waits for 'drain' while the peer is not reading its replies. */
  #pump(): void {
    if (this.#running !== null || this.#closed || this.#closing) return;
    if (this.#outputBacklogged()) return;
    this.#parseInput();
    const next = this.#queue.shift();
    if (next === undefined) {
      if (this.#parserEnded && !this.#stream.writableEnded) this.#stream.end();
      return;
    }
    this.#running = this.#handle(next)
      .catch((e: unknown) => {
        // A bug of ours (a reply that cannot be encoded): the request still gets an answer and
        // the daemon keeps running.
        this.#replyError({ has: false, value: null, from: null }, 'GenericError', `Internal error: ${toQmpError(e).desc}`);
      })
      .finally(() => {
        this.#running = null;
        if (this.#closed || this.#closing) return;
        this.#pump();
        this.#flow();
      });
  }

  #write(msg: QmpObject): void {
    this.#writeLine(formatQmpJson(msg));
  }

  #writeLine(line: string): void {
    const s = this.#stream;
    if (this.#closed || s.destroyed || s.writableEnded) return;
    s.write(`${line}\r\n`);
    if (s.writableLength > MAX_OUTPUT_BYTES) {
      // A peer that does not read: drop it rather than hold its replies and events without bound.
      s.destroy();
      return;
    }
    if (s.writableLength > OUTPUT_HIGH_WATER_BYTES) this.#flow();
  }

  #replyError(id: RequestId, errorClass: QmpErrorClass, desc: string): void {
    const error = { class: errorClass, desc };
    this.#write(withId({ error }, id));
  }

  async #handle(item: JsonStreamItem): Promise<void> {
    const noId: RequestId = { has: false, value: null, from: null };
    if (!item.ok) {
      this.#replyError(noId, 'GenericError', item.error);
      return;
    }
    const req = item.value;
    if (!isObject(req)) {
      this.#replyError(noId, 'GenericError', 'QMP input must be a JSON object');
      return;
    }
    const id: RequestId = hasOwn(req, 'id') ? { has: true, value: req['id'] as QmpValue, from: req } : noId;

    // The members, in QEMU's QDict order (qmp_dispatch_check_obj): it decides which problem is named.
    let execKey: string | null = null;
    for (const key of qdictOrder(Object.keys(req))) {
      const value = req[key];
      if (key === 'execute' || (key === 'exec-oob' && this.#oob)) {
        if (typeof value !== 'string') return this.#replyError(id, 'GenericError', `QMP input member '${key}' must be a string`);
        if (execKey !== null) return this.#replyError(id, 'GenericError', `QMP input member '${key}' clashes with '${execKey}'`);
        execKey = key;
      } else if (key === 'arguments') {
        if (!isObject(value)) return this.#replyError(id, 'GenericError', "QMP input member 'arguments' must be an object");
      } else if (key !== 'id') {
        return this.#replyError(id, 'GenericError', `QMP input member '${key}' is unexpected`);
      }
    }
    if (execKey === null) return this.#replyError(id, 'GenericError', "QMP input lacks member 'execute'");
    const name = req[execKey] as string;
    const oob = execKey === 'exec-oob';
    const argsValue = req['arguments'];
    const args: QmpObject = isObject(argsValue) ? argsValue : {};

    // No exec-oob before negotiation: oob is not enabled yet, so the member check refused it.
    if (!this.#negotiated) return this.#negotiate(id, name, args);

    const cmd = this.#commands.get(name);
    if (cmd === undefined || (cmd.needsMachine === true && this.#opts.machine === null)) {
      return this.#replyError(id, 'CommandNotFound', `The command ${name} has not been found`);
    }
    if (oob) return this.#replyError(id, 'GenericError', `The command ${name} does not support OOB`);
    let result: QmpValue;
    try {
      validateArguments(cmd.args, args);
      result = await cmd.run(this.#ctx, args);
    } catch (e) {
      const err = toQmpError(e);
      this.#replyError(id, err.errorClass, err.desc);
      return;
    }
    let line: string;
    try {
      line = formatQmpJson(withId({ return: result ?? {} }, id));
    } catch {
      // A return value that is not JSON (a cycle): an error reply instead of a dead session.
      this.#replyError(id, 'GenericError', `Internal error: the reply of ${name} cannot be encoded`);
      return;
    }
    this.#writeLine(line);
    if (this.#quitRequested) {
      this.#quitRequested = false;
      if (this.#opts.machine !== null) emitQmpEvent('SHUTDOWN', { guest: false, reason: 'host-qmp-quit' });
      this.#opts.onQuit();
    }
  }

  /** Capabilities-negotiation mode: only qmp_capabilities exists. */
  #negotiate(id: RequestId, name: string, args: QmpObject): void {
    if (name !== 'qmp_capabilities') {
      // QEMU replaces the desc of every CommandNotFound in this mode with its hint.
      this.#replyError(id, 'CommandNotFound', "Expecting capabilities negotiation with 'qmp_capabilities'");
      return;
    }
    try {
      validateArguments(QMP_CAPABILITIES_ARGS, args);
    } catch (e) {
      const err = toQmpError(e);
      this.#replyError(id, err.errorClass, err.desc);
      return;
    }
    const enable = args['enable'];
    this.#oob = Array.isArray(enable) && enable.includes('oob');
    this.#negotiated = true;
    this.#write(withId({ return: {} }, id));
  }
}

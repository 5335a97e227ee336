/**
 * Socket character devices for QMP monitors, as QEMU's `--chardev socket,...` and `-qmp
 * unix:PATH,server=on,wait=off` give them: a listening unix or TCP socket (TCP on 127.0.0.1 unless
 * a host is given) that a monitor (`--monitor chardev=ID`) serves with QMP.
 *
 * Main-loop code without the BQL (sockets only).
 *
 * A chardev listens from the moment it is created (bind errors come with its option, as in QEMU);
 * with `wait=on` (QEMU's default for a server) creation waits for the first client. When a
 * monitor takes the chardev, its listener is handed over to a QmpServer on the same address
 * (the connections made meanwhile are attached to it). A chardev no monitor takes keeps its
 * connections open and silent, as QEMU's would.
 * Client mode (`server=off`, connecting out) is not supported.
 */
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { BlockError, codeForSystemError } from '../block/errors.js';
import type { Machine } from '../machine/machine.js';
import { QmpServer, type QmpListenAddress } from '../qmp/server.js';
import type { QmpCommand } from '../qmp/types.js';
import { strerror } from '../commands/format.js';
import { parseKeyval } from './keyval.js';

/** A socket chardev as the command line describes it. */
export interface ChardevSpec {
  id: string;
  address: QmpListenAddress;
  /** QEMU's `wait`: creation blocks until the first client connects. */
  wait: boolean;
}

/** The parameters of QEMU's socket chardev that snapstack does not implement (refused by name). */
const UNSUPPORTED_SOCKET_PARAMS = ['fd', 'to', 'ipv4', 'ipv6', 'nodelay', 'telnet', 'tn3270', 'websocket', 'reconnect', 'tls-creds', 'tls-authz', 'abstract', 'tight', 'mux', 'logfile', 'logappend', 'delay'];
const SOCKET_PARAMS = ['backend', 'id', 'path', 'host', 'port', 'server', 'wait'];
/** QEMU's chardev backends (`--chardev help`); only socket is built. */
const CHARDEV_BACKENDS = ['pty', 'udp', 'memory', 'file', 'socket', 'stdio', 'ringbuf', 'null', 'pipe', 'serial', 'parallel', 'vc', 'spicevmc', 'spiceport', 'braille', 'msmouse', 'wctablet', 'testdev'];

function fail(message: string): never {
  throw new BlockError('EINVAL', message);
}

/** QemuOpts' boolean: on/off (yes/no, true/false, y/n too). */
function parseOnOff(name: string, v: string): boolean {
  if (v === 'on' || v === 'yes' || v === 'true' || v === 'y') return true;
  if (v === 'off' || v === 'no' || v === 'false' || v === 'n') return false;
  fail(`Parameter '${name}' expects 'on' or 'off'`);
}

/** The help `--chardev help` prints (the backends snapstack builds). */
export const CHARDEV_HELP = 'Available chardev backend types: \n  socket';

/**
 * Parses `--chardev socket,id=ID,path=PATH|host=HOST,port=PORT,server=on,wait=off` with QEMU's
 * messages; null when it asked for help (`--chardev help`).
 * @locking common
 */
export function parseChardevOption(text: string): ChardevSpec | null {
  const { value: o, help } = parseKeyval(text, 'backend');
  if (help) return null;
  const str = (k: string): string | undefined => {
    const v = o[k];
    if (v === undefined) return undefined;
    if (typeof v !== 'string') fail(`Invalid parameter '${k}'`);
    return v;
  };
  const id = str('id');
  if (id === undefined) fail('chardev: no id specified');
  const backend = str('backend');
  if (backend === undefined) fail(`chardev: "${id}" missing backend`);
  if (!CHARDEV_BACKENDS.includes(backend)) fail(`'${backend}' is not a valid char driver name`);
  if (backend !== 'socket') fail(`chardev backend '${backend}' is not supported (snapstack has socket chardevs only)`);
  for (const k of Object.keys(o)) {
    if (UNSUPPORTED_SOCKET_PARAMS.includes(k)) fail(`chardev: socket: parameter '${k}' is not supported by snapstack`);
    if (!SOCKET_PARAMS.includes(k)) fail(`Invalid parameter '${k}'`);
  }
  const serverText = str('server');
  const waitText = str('wait');
  const server = serverText === undefined ? false : parseOnOff('server', serverText);
  const wait = waitText === undefined ? true : parseOnOff('wait', waitText);
  if (!server && waitText !== undefined) fail("'wait' option is incompatible with socket in client connect mode");
  const sockPath = str('path');
  const host = str('host');
  const port = str('port');
  let address: QmpListenAddress;
  if (sockPath !== undefined) address = { type: 'unix', path: sockPath };
  else {
    if (host === undefined && port === undefined) fail('chardev: socket: no host given');
    if (port === undefined) fail('chardev: socket: no port given');
    address = { type: 'inet', host: host === undefined || host === '' ? '127.0.0.1' : host, port: parsePort(host ?? '127.0.0.1', port) };
  }
  if (!server) fail(`chardev: socket: client mode (server=off) is not supported by snapstack: give server=on`);
  return { id, address, wait };
}

function parsePort(host: string, port: string): number {
  const n = /^\d+$/.test(port) ? Number(port) : NaN;
  if (!Number.isInteger(n) || n > 65535) fail(`address resolution failed for ${host}:${port}: Servname not supported for ai_socktype`);
  return n;
}

/**
 * Parses QEMU's legacy chardev spec, as `-qmp` takes it: `unix:PATH[,server=on][,wait=off]` or
 * `tcp:[HOST]:PORT[,server=on][,wait=off]`; the chardev gets the id `id`.
 * @locking common
 */
export function parseLegacyChardev(text: string, id: string): ChardevSpec {
  const comma = text.search(/,(?!,)/);
  const head = comma < 0 ? text : text.slice(0, comma);
  const rest = comma < 0 ? '' : text.slice(comma + 1);
  let base: string;
  if (head.startsWith('unix:')) base = `socket,id=${id},path=${head.slice(5).replaceAll(',', ',,')}`;
  else if (head.startsWith('tcp:')) {
    const hp = head.slice(4);
    const colon = hp.lastIndexOf(':');
    if (colon < 0) fail(`chardev: tcp: '${hp}': expected HOST:PORT`);
    const host = hp.slice(0, colon).replace(/^\[(.*)\]$/, '$1');
    base = `socket,id=${id},host=${host === '' ? '127.0.0.1' : host},port=${hp.slice(colon + 1)}`;
  } else fail(`'${head}' is not a valid char driver name (snapstack's -qmp takes unix:PATH or tcp:HOST:PORT)`);
  const spec = parseChardevOption(rest === '' ? base : `${base},${rest}`);
  if (spec === null) fail(`Invalid parameter 'help'`);
  return spec;
}

function systemCode(e: unknown): string {
  return typeof e === 'object' && e !== null && 'code' in e ? String((e as { code: unknown }).code) : '';
}

/** strerror's text for a Node system error code (the socket errors QEMU prints). */
function sysStrerror(code: string): string {
  const socketErrors: Record<string, string> = {
    EADDRINUSE: 'Address already in use',
    EADDRNOTAVAIL: 'Cannot assign requested address',
    ENOTDIR: 'Not a directory',
    ENAMETOOLONG: 'File name too long',
  };
  return socketErrors[code] ?? strerror(codeForSystemError(code));
}

/** A unix socket path ready for bind: a stale socket removed, a live one or another file refused. */
async function clearSocketPath(file: string): Promise<void> {
  let st: fs.Stats;
  try {
    st = fs.lstatSync(file);
  } catch (e) {
    if (systemCode(e) === 'ENOENT') return;
    throw new BlockError('EIO', `Failed to bind socket to ${file}: ${sysStrerror(systemCode(e))}`, { file, cause: e });
  }
  if (!st.isSocket()) fail(`Failed to bind socket to ${file}: the file exists and is not a socket (not replacing it)`);
  const live = await new Promise<boolean>((resolve) => {
    const s = net.createConnection({ path: file });
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
  if (live) throw new BlockError('EBUSY', `Failed to bind socket to ${file}: Address already in use`, { file });
  fs.unlinkSync(file);
}

/** What a monitor on a chardev serves. */
export interface MonitorOptions {
  commands: readonly QmpCommand[];
  machine: Machine | null;
  onQuit: () => void;
}

/** A listening socket chardev, later handed to a QMP monitor. */
export class Chardev {
  #listener: net.Server | null;
  #held: net.Socket[] = [];
  #server: QmpServer | null = null;
  #address: QmpListenAddress;

  private constructor(
    readonly spec: ChardevSpec,
    listener: net.Server,
    address: QmpListenAddress,
  ) {
    this.#listener = listener;
    this.#address = address;
    listener.on('connection', (s) => this.#hold(s));
  }

  /** The address it listens on (a TCP port 0 filled in). */
  get address(): QmpListenAddress {
    return this.#address;
  }

  /** True once a monitor serves it. */
  get inUse(): boolean {
    return this.#server !== null;
  }

  /**
   * Creates the chardev: binds its socket (QEMU's "Failed to bind socket to P: ..." on failure)
   * and, with wait=on, waits for the first client (`waiting` is told first, as QEMU prints it).
   */
  static async open(spec: ChardevSpec, waiting: (text: string) => void, interrupted?: Promise<unknown>): Promise<Chardev> {
    const a = spec.address;
    if (a.type === 'unix') await clearSocketPath(a.path);
    const listener = net.createServer({ allowHalfOpen: true });
    await new Promise<void>((resolve, reject) => {
      listener.once('error', (e) => {
        const where = a.type === 'unix' ? a.path : `${a.host}:${a.port}`;
        let code = systemCode(e);
        // libuv reports a missing directory as EACCES; QEMU's bind says ENOENT
        if (a.type === 'unix' && code === 'EACCES' && !fs.existsSync(path.dirname(path.resolve(a.path)))) code = 'ENOENT';
        reject(new BlockError(code === 'EADDRINUSE' ? 'EBUSY' : 'EIO', `Failed to bind socket to ${where}: ${sysStrerror(code)}`, { cause: e }));
      });
      if (a.type === 'unix') listener.listen({ path: a.path }, resolve);
      else listener.listen({ host: a.host, port: a.port }, resolve);
    });
    let bound: QmpListenAddress = a;
    const la = listener.address();
    if (a.type === 'inet' && la !== null && typeof la === 'object') bound = { type: 'inet', host: a.host, port: la.port };
    const dev = new Chardev(spec, listener, bound);
    if (spec.wait) {
      const where = bound.type === 'unix' ? `unix:${bound.path}` : `tcp:${bound.host}:${bound.port}`;
      waiting(`info: waiting for connection on: disconnected:${where},server=on`);
      const connected = new Promise<boolean>((resolve) => listener.once('connection', () => resolve(true)));
      if (!(await Promise.race([connected, (interrupted ?? new Promise<never>(() => undefined)).then(() => false)]))) {
        await dev.close();
        throw new BlockError('ECANCELED', `interrupted while waiting for a connection on ${where}`);
      }
    }
    return dev;
  }

  #hold(s: net.Socket): void {
    s.pause();
    s.on('error', () => undefined);
    this.#held.push(s);
  }

  /**
   * Serves QMP on the chardev: its socket moves to a QmpServer on the same address, and the
   * clients that connected meanwhile are attached to it. EBUSY ("Device 'ID' is in use") when a
   * monitor has it already.
   */
  async attachMonitor(opts: MonitorOptions): Promise<QmpServer> {
    if (this.#server !== null) throw new BlockError('EBUSY', `Device '${this.spec.id}' is in use`);
    const listener = this.#listener;
    let server: QmpServer;
    if (listener !== null) {
      // the monitor takes over the listening socket itself: re-binding would leave a moment with
      // no socket file, in which a client that had seen it would get ENOENT
      this.#listener = null;
      listener.removeAllListeners('connection');
      server = QmpServer.adopt(listener, this.#address, opts);
    } else {
      server = await QmpServer.listen(this.#address, opts);
    }
    this.#server = server;
    for (const s of this.#held.splice(0)) {
      if (s.destroyed) continue;
      server.attach(s);
      s.resume();
    }
    return server;
  }

  /** Stops listening; the monitor's QmpServer (if any) finishes its running commands and closes its sessions. */
  async close(): Promise<void> {
    const listener = this.#listener;
    this.#listener = null;
    for (const s of this.#held.splice(0)) s.destroy();
    if (listener !== null) {
      await new Promise<void>((resolve) => listener.close(() => resolve()));
      if (this.#address.type === 'unix') {
        try {
          if (fs.lstatSync(this.#address.path).isSocket()) fs.unlinkSync(this.#address.path);
        } catch {
          // gone already
        }
      }
    }
    const server = this.#server;
    if (server !== null) await server.close();
  }
}

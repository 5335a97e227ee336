/**
 * `snapstack nbd [OPTIONS] FILE`: export one image over NBD, with qemu-nbd's options. Main-loop
 * code: the image is opened through the block layer (openImage: one node graph, a backend named
 * after the export), then served by src/nbd/server.ts until the first client has gone (qemu-nbd's
 * default) or, with -t, until SIGTERM/SIGINT/SIGHUP. Shutdown finishes the requests in flight,
 * closes the image (its lock is released) and removes the unix socket and the pid file.
 *
 * TLS as qemu-nbd: `--object tls-creds-x509,id=ID,dir=DIR,endpoint=server[,verify-peer=on|off]`
 * makes the credentials, `--tls-creds ID` makes every client use TLS (src/nbd/tls-creds.ts).
 */
import fs from 'node:fs';
import { BlockError, isBlockError } from '../block/errors.js';
import { openImage, type Image } from '../image.js';
import { NbdServer, type NbdListenAddress } from '../nbd/server.js';
import { NBD_DEFAULT_PORT } from '../nbd/protocol.js';
import { addTlsCreds, findTlsCreds, loadTlsCredsX509, type TlsCredsX509 } from '../nbd/tls-creds.js';
import type { Out } from './img-usage.js';
import { parseKeyval } from './keyval.js';
import { writeLockedPidfile, type HeldPidfile } from './pidfile.js';

const P = 'snapstack nbd';

/** The help text, in qemu-nbd's words where the option is the same. */
export const NBD_USAGE = `Usage: snapstack nbd [OPTIONS] FILE
Export FILE over NBD (qemu-nbd's options).

  -h, --help                display this help and exit
Connection properties:
  -p, --port=PORT           port to listen on (default '${NBD_DEFAULT_PORT}')
  -b, --bind=IFACE          interface to bind to (default '127.0.0.1')
  -k, --socket=PATH         path to the unix socket
  -e, --shared=NUM          device can be shared by NUM clients (default '1')
  -t, --persistent          don't exit on the last connection
  -x, --export-name=NAME    expose export by name (default is empty string)
  -D, --description=TEXT    export a human-readable description
  -A, --allocation-depth    expose the allocation depth (qemu:allocation-depth)
General purpose options:
      --pid-file=PATH       store the server's process ID in the given file
      --object type,id=ID,...   define an object such as 'tls-creds-x509'
                            (tls-creds-x509,id=ID,dir=DIR,endpoint=server[,verify-peer=on|off]:
                            DIR holds ca-cert.pem, server-cert.pem, server-key.pem)
      --tls-creds=ID        use id of an earlier --object to provide TLS; every
                            client must then negotiate TLS (NBD_OPT_STARTTLS) and,
                            with verify-peer=on (the default), show a certificate
                            signed by DIR/ca-cert.pem
Block device options:
  -f, --format=FORMAT       set image format (raw, qcow2)
  -r, --read-only           export read-only
  -l, --load-snapshot=SNAPSHOT_PARAM
                            load an internal snapshot inside FILE and export it
                            as a read-only device, SNAPSHOT_PARAM format is
                            'snapshot.id=[ID],snapshot.name=[NAME]', or '[ID_OR_NAME]'
      --cache=MODE          writeback (default), writethrough or unsafe
      --aio=MODE            threads (default) or sync
Not built: --fork, -c/--connect, --tls-authz, --tls-hostname, -o/--offset, -s/--snapshot, -B, --image-opts.`;

/** What the command line asks for. */
export interface NbdCliOptions {
  file: string;
  format?: string;
  exportName: string;
  description?: string;
  socket?: string;
  port?: number;
  bind?: string;
  readOnly: boolean;
  persistent: boolean;
  shared: number;
  cache: 'writeback' | 'writethrough' | 'unsafe';
  aio: 'threads' | 'sync';
  snapshot?: string;
  pidFile?: string;
  allocationDepth: boolean;
  /** `--object` texts, in order (tls-creds-x509 only). */
  objects: string[];
  tlsCreds?: string;
}

const WITH_VALUE: Record<string, string> = {
  '-f': 'format',
  '--format': 'format',
  '-x': 'export-name',
  '--export-name': 'export-name',
  '-k': 'socket',
  '--socket': 'socket',
  '-p': 'port',
  '--port': 'port',
  '-b': 'bind',
  '--bind': 'bind',
  '-e': 'shared',
  '--shared': 'shared',
  '--cache': 'cache',
  '--aio': 'aio',
  '-l': 'load-snapshot',
  '--load-snapshot': 'load-snapshot',
  '--pid-file': 'pid-file',
  '-D': 'description',
  '--description': 'description',
  '--tls-creds': 'tls-creds',
};
const SWITCHES: Record<string, string> = {
  '-r': 'read-only',
  '--read-only': 'read-only',
  '-t': 'persistent',
  '--persistent': 'persistent',
  '-A': 'allocation-depth',
  '--allocation-depth': 'allocation-depth',
  '-h': 'help',
  '--help': 'help',
};
const NOT_BUILT = new Set(['--fork', '-c', '--connect', '-d', '--disconnect', '--tls-authz', '--tls-hostname', '-o', '--offset', '-s', '--snapshot', '-B', '--bitmap', '--image-opts', '-L', '--list', '-n', '--nocache', '--discard', '--detect-zeroes']);

/** Which snapshot `-l` names: `snapshot.name=X`, `snapshot.id=X`, or a bare ID-or-name. */
function snapshotParam(text: string): string {
  if (!text.includes('=')) return text;
  const fields = new Map(text.split(',').map((kv) => [kv.slice(0, kv.indexOf('=')), kv.slice(kv.indexOf('=') + 1)] as const));
  const v = fields.get('snapshot.name') ?? fields.get('snapshot.id');
  if (v === undefined || v === '') throw new BlockError('EINVAL', `Failed in parsing snapshot param '${text}'`, { field: '-l', value: text });
  return v;
}

/** Parses the command line; null for --help. */
export function parseNbdArgs(argv: string[]): NbdCliOptions | null {
  const values = new Map<string, string>();
  const switches = new Set<string>();
  const files: string[] = [];
  const objects: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i] as string;
    const eq = a.startsWith('--') ? a.indexOf('=') : -1;
    const flag = eq > 0 ? a.slice(0, eq) : a;
    if (NOT_BUILT.has(flag)) throw new BlockError('ENOTSUP', `${flag} is not supported by snapstack nbd`, { field: flag });
    if (flag === '--object') {
      const v = eq > 0 ? a.slice(eq + 1) : argv[++i];
      if (v === undefined) throw new BlockError('EINVAL', `option '${flag}' requires an argument`, { field: flag });
      objects.push(v);
      continue;
    }
    const key = WITH_VALUE[flag];
    if (key !== undefined) {
      const v = eq > 0 ? a.slice(eq + 1) : argv[++i];
      if (v === undefined) throw new BlockError('EINVAL', `option '${flag}' requires an argument`, { field: flag });
      values.set(key, v);
      continue;
    }
    const sw = SWITCHES[flag];
    if (sw !== undefined && eq < 0) {
      switches.add(sw);
      continue;
    }
    if (a.startsWith('-') && a !== '-') throw new BlockError('EINVAL', `invalid option '${a}'\nTry 'snapstack nbd --help' for more information.`, { field: a });
    files.push(a);
  }
  if (switches.has('help')) return null;
  const [file] = files;
  if (file === undefined || files.length !== 1) throw new BlockError('EINVAL', `Expecting one image file name\nTry 'snapstack nbd --help' for more information.`);
  const cache = values.get('cache') ?? 'writeback';
  if (cache === 'none' || cache === 'off' || cache === 'directsync') throw new BlockError('ENOTSUP', `--cache=${cache}: cache.direct=on (O_DIRECT) is not supported by snapstack`, { field: '--cache', value: cache });
  if (cache !== 'writeback' && cache !== 'writethrough' && cache !== 'unsafe') throw new BlockError('EINVAL', `Invalid cache mode '${cache}'`, { field: '--cache', value: cache });
  const aio = values.get('aio') ?? 'threads';
  if (aio !== 'threads' && aio !== 'sync') throw new BlockError('ENOTSUP', `--aio=${aio} is not supported by snapstack (threads or sync)`, { field: '--aio', value: aio });
  const sharedText = values.get('shared') ?? '1';
  const shared = Number(sharedText);
  if (!/^\d+$/.test(sharedText) || shared < 1 || shared > 0x7fffffff) throw new BlockError('EINVAL', `Invalid shared device number '${sharedText}'`, { field: '--shared', value: sharedText });
  const o: NbdCliOptions = {
    file,
    exportName: values.get('export-name') ?? '',
    readOnly: switches.has('read-only'),
    persistent: switches.has('persistent'),
    allocationDepth: switches.has('allocation-depth'),
    shared,
    cache,
    aio,
    objects,
  };
  const tlsCreds = values.get('tls-creds');
  if (tlsCreds !== undefined) o.tlsCreds = tlsCreds;
  const portText = values.get('port');
  if (portText !== undefined) {
    const port = Number(portText);
    if (!/^\d+$/.test(portText) || port > 65535) throw new BlockError('EINVAL', `Invalid port '${portText}'`, { field: '--port', value: portText });
    o.port = port;
  }
  const set = (k: 'format' | 'description' | 'socket' | 'bind' | 'pidFile', name: string): void => {
    const v = values.get(name);
    if (v !== undefined) o[k] = v;
  };
  set('format', 'format');
  set('description', 'description');
  set('socket', 'socket');
  set('bind', 'bind');
  set('pidFile', 'pid-file');
  const snap = values.get('load-snapshot');
  if (snap !== undefined) {
    o.snapshot = snapshotParam(snap);
    o.readOnly = true;
  }
  if (o.socket !== undefined && (o.port !== undefined || o.bind !== undefined)) {
    throw new BlockError('EINVAL', '-k/--socket and -p/--port or -b/--bind are mutually exclusive', { field: '--socket' });
  }
  return o;
}

/**
 * Makes the TLS credentials object an `--object` text describes (`tls-creds-x509,id=..,dir=..`)
 * and registers it; other object types are refused by name. Reads the certificate files.
 */
export function addTlsCredsObject(text: string): TlsCredsX509 {
  const { value, help } = parseKeyval(text, 'qom-type');
  const type = value['qom-type'];
  if (help) throw new BlockError('EINVAL', 'Help is not available for this option', { field: '--object' });
  if (type === undefined) throw new BlockError('EINVAL', "Parameter 'qom-type' is missing", { field: 'qom-type' });
  if (type !== 'tls-creds-x509') throw new BlockError('ENOTSUP', `object type '${typeof type === 'string' ? type : '?'}' is not supported here (tls-creds-x509 is)`, { field: 'qom-type' });
  const props: Record<string, string> = {};
  for (const [k, v] of Object.entries(value)) {
    if (typeof v !== 'string') throw new BlockError('EINVAL', `Invalid parameter type for '${k}', expected: string`, { field: k });
    props[k] = v;
  }
  const creds = loadTlsCredsX509(props);
  addTlsCreds(creds);
  return creds;
}

/**
 * For `snapstack img` / `io` (qemu-img's and qemu-io's `--object` and `--image-opts`): registers
 * each `--object tls-creds-x509,...` and returns the other arguments. `--image-opts` is accepted
 * and dropped: a file name holding `=` is read as options anyway (openImage).
 */
export function takeTlsObjectArgs(argv: readonly string[]): string[] {
  const rest: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i] as string;
    if (a === '--image-opts') continue;
    if (a === '--object' || a.startsWith('--object=')) {
      const v = a === '--object' ? argv[++i] : a.slice('--object='.length);
      if (v === undefined) throw new BlockError('EINVAL', "option '--object' requires an argument", { field: '--object' });
      addTlsCredsObject(v);
      continue;
    }
    rest.push(a);
  }
  return rest;
}

/** A backend name made from the export name (backend names are letters, digits, '-', '.', '_'). */
function backendName(exportName: string): string {
  return /^[A-Za-z0-9_.-]*$/.test(exportName) && exportName.length <= 64 ? `nbd.${exportName === '' ? 'default' : exportName}` : 'nbd.export';
}

/** Removes a unix socket left by an earlier run (never a file that is not a socket). */
function removeStaleSocket(path: string): void {
  try {
    if (fs.lstatSync(path).isSocket()) fs.rmSync(path);
  } catch {
    // absent: nothing to remove
  }
}

/** Runs `snapstack nbd`; resolves with the exit status once the server has shut down. */
export async function nbdMain(argv: string[], out: Out, err: Out): Promise<number> {
  let o: NbdCliOptions | null;
  try {
    o = parseNbdArgs(argv);
  } catch (e) {
    err(`${P}: ${e instanceof Error ? e.message : String(e)}`);
    return 1;
  }
  if (o === null) {
    out(NBD_USAGE);
    return 0;
  }
  let tls: TlsCredsX509 | undefined;
  try {
    for (const text of o.objects) addTlsCredsObject(text);
    if (o.tlsCreds !== undefined) tls = findTlsCreds(o.tlsCreds, 'server');
  } catch (e) {
    err(`${P}: ${e instanceof Error ? e.message : String(e)}`);
    return 1;
  }
  let img: Image;
  try {
    img = await openImage(o.file, { readOnly: o.readOnly, aio: o.aio, name: backendName(o.exportName), ...(o.format === undefined ? {} : { format: o.format }) });
  } catch (e) {
    err(`${P}: Failed to blk_new_open '${o.file}': ${isBlockError(e) || e instanceof Error ? e.message : String(e)}`);
    return 1;
  }
  const opts = o;
  let server: NbdServer | null = null;
  let pidfile: HeldPidfile | null = null;
  try {
    if (opts.snapshot !== undefined) {
      try {
        await img.loadSnapshotTemporarily(opts.snapshot);
      } catch (e) {
        throw isBlockError(e, 'ENOENT') ? new BlockError('ENOENT', "Failed to load snapshot: Can't find snapshot", { field: '-l', value: opts.snapshot, cause: e }) : e;
      }
    }
    server = new NbdServer({
      exports: [{ name: opts.exportName, backend: img.backend, cache: opts.cache, allocationDepth: opts.allocationDepth, ...(opts.description === undefined ? {} : { description: opts.description }) }],
      maxConnections: opts.shared,
      log: (line) => err(`${P}: ${line}`),
      ...(tls === undefined ? {} : { tls }),
    });
    const addr: NbdListenAddress = opts.socket !== undefined ? { type: 'unix', path: opts.socket } : { type: 'inet', host: opts.bind ?? '127.0.0.1', port: opts.port ?? NBD_DEFAULT_PORT };
    if (addr.type === 'unix') removeStaleSocket(addr.path);
    await server.listen(addr);
    if (opts.pidFile !== undefined) pidfile = writeLockedPidfile(opts.pidFile);
  } catch (e) {
    err(`${P}: ${e instanceof Error ? e.message : String(e)}`);
    if (server !== null) await server.close();
    await img.close().catch(() => undefined);
    return 1;
  }
  const srv = server;
  const signals: NodeJS.Signals[] = ['SIGTERM', 'SIGINT', 'SIGHUP'];
  let status = 0;
  await new Promise<void>((resolve) => {
    let stopping = false;
    const stop = (): void => {
      if (stopping) return;
      stopping = true;
      for (const s of signals) process.off(s, stop);
      void (async () => {
        await srv.close();
        try {
          await img.close();
        } catch (e) {
          err(`${P}: closing '${opts.file}': ${e instanceof Error ? e.message : String(e)}`);
          status = 1;
        }
        pidfile?.release();
        resolve();
      })();
    };
    for (const s of signals) process.on(s, stop);
    // qemu-nbd without --persistent: the server ends once its clients are gone
    if (!opts.persistent) srv.on('client-closed', (left: number) => left === 0 && stop());
  });
  return status;
}

/**
 * `snapstack daemon`'s command line, read as qemu-storage-daemon 7.2 reads it (getopt_long): long
 * options with their value as the next word or after `=`, unambiguous prefixes (`--vers`), `-h`,
 * `-V`, `-T VALUE` / `-TVALUE`, and getopt's messages for what is wrong ("unrecognized option
 * '--x'", "option '--blockdev' requires an argument", "invalid option -- 'x'", "X: Unexpected
 * argument"). Common code (pure).
 */
import fs from 'node:fs';
import { BlockError } from '../block/errors.js';

/** One option of the command line, in order. */
export interface DaemonOption {
  /** The long name (`blockdev`, `help`, ...). */
  name: DaemonOptionName;
  /** Its value; '' for the options that take none. */
  value: string;
  /** How it was written, for messages: `--blockdev VALUE`. */
  text: string;
}

/** qemu-storage-daemon's options. */
export type DaemonOptionName = 'help' | 'trace' | 'version' | 'blockdev' | 'chardev' | 'daemonize' | 'export' | 'monitor' | 'nbd-server' | 'object' | 'pidfile';

const LONG: ReadonlyArray<{ name: DaemonOptionName; arg: boolean }> = [
  { name: 'blockdev', arg: true },
  { name: 'chardev', arg: true },
  { name: 'daemonize', arg: false },
  { name: 'export', arg: true },
  { name: 'help', arg: false },
  { name: 'monitor', arg: true },
  { name: 'nbd-server', arg: true },
  { name: 'object', arg: true },
  { name: 'pidfile', arg: true },
  { name: 'trace', arg: true },
  { name: 'version', arg: false },
];
const SHORT: Readonly<Record<string, DaemonOptionName>> = { h: 'help', V: 'version', T: 'trace' };

function usageError(message: string): never {
  throw new BlockError('EINVAL', message);
}

/**
 * Splits `argv` into options as getopt_long does for qemu-storage-daemon; throws BlockError with
 * getopt's message (without the program name) for an unknown option, a missing value or a word
 * that is not an option.
 * @locking common
 */
export function parseDaemonArgs(argv: readonly string[]): DaemonOption[] {
  const out: DaemonOption[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i] as string;
    if (a === '--') {
      const extra = argv[i + 1];
      if (extra !== undefined) usageError(`${extra}: Unexpected argument`);
      break;
    }
    if (a.startsWith('--')) {
      const eq = a.indexOf('=');
      const word = eq < 0 ? a.slice(2) : a.slice(2, eq);
      const exact = LONG.find((o) => o.name === word);
      const matches = exact !== undefined ? [exact] : LONG.filter((o) => o.name.startsWith(word));
      if (matches.length === 0 || word === '') usageError(`unrecognized option '${a}'`);
      if (matches.length > 1) usageError(`option '--${word}' is ambiguous; possibilities: ${matches.map((m) => `'--${m.name}'`).join(' ')}`);
      const opt = matches[0] as { name: DaemonOptionName; arg: boolean };
      if (!opt.arg) {
        if (eq >= 0) usageError(`option '--${opt.name}' doesn't allow an argument`);
        out.push({ name: opt.name, value: '', text: `--${opt.name}` });
        continue;
      }
      let value: string;
      if (eq >= 0) value = a.slice(eq + 1);
      else {
        const next = argv[i + 1];
        if (next === undefined) usageError(`option '--${opt.name}' requires an argument`);
        value = next;
        i++;
      }
      out.push({ name: opt.name, value, text: `--${opt.name} ${value}` });
      continue;
    }
    if (a.startsWith('-') && a.length > 1) {
      // a cluster of short options: -hV, -Tpattern
      for (let j = 1; j < a.length; j++) {
        const c = a[j] as string;
        const name = SHORT[c];
        if (name === undefined) usageError(`invalid option -- '${c}'`);
        if (name !== 'trace') {
          out.push({ name, value: '', text: `-${c}` });
          continue;
        }
        let value = a.slice(j + 1);
        if (value === '') {
          const next = argv[i + 1];
          if (next === undefined) usageError(`option requires an argument -- '${c}'`);
          value = next;
          i++;
        }
        out.push({ name, value, text: `-T ${value}` });
        break;
      }
      continue;
    }
    usageError(`${a}: Unexpected argument`);
  }
  return out;
}

/** `snapstack daemon --help`: qemu-storage-daemon's help, for what snapstack serves. */
export const DAEMON_USAGE = `Usage: snapstack daemon [options]
snapstack storage daemon: qemu-storage-daemon's command line, QMP on snapstack's block layer

  -h, --help             display this help and exit
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                         accepted and ignored (snapstack has no trace events)
  -V, --version          output version information and exit

  --blockdev [driver=]<driver>[,node-name=<N>][,read-only=on|off]
             [,force-share=on|off][,driver specific parameters...]
                         configure a block node (drivers: file, nbd, raw, qcow2, memory;
                         JSON when it starts with '{')

  --chardev socket,id=<id>,path=<path>|host=<host>,port=<port>,server=on[,wait=on|off]
                         configure a listening socket for a monitor
                         (TCP on 127.0.0.1 unless a host is given)

  --daemonize            daemonize the process, and have the parent exit
                         once startup is complete

  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
           [,writable=on|off][,description=<text>][,allocation-depth=on|off]
           [,writethrough=on|off][,iothread=<id>]
                         export the specified block node over NBD
                         (the NBD server must be started first)

  --monitor [chardev=]name[,mode=control]
                         configure a QMP monitor

  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
               [,tls-creds=<id>][,max-connections=<n>]
  --nbd-server addr.type=unix,addr.path=<path>
               [,tls-creds=<id>][,max-connections=<n>]
                         start an NBD server for exporting block nodes
                         (with tls-creds every client must use TLS)

  --object help          list object types that can be added
  --object <type>,help   list properties for the given object type
  --object iothread,id=<id>[,poll-max-ns=<ns>]
                         create an IOThread
  --object tls-creds-x509,id=<id>,dir=<dir>,endpoint=server|client
           [,verify-peer=on|off]
                         load x509 TLS credentials from <dir> (ca-cert.pem,
                         server-cert.pem/-key.pem or client-cert.pem/-key.pem)

  --pidfile <path>       write process ID to a file after startup

FUSE, vhost-user-blk and vduse-blk exports and NBD tls-authz are not built.
SIGTERM, SIGINT, SIGHUP and the QMP command 'quit' shut the daemon down cleanly.`;

/** snapstack's version from its package.json (src/cli and dist/cli both sit two levels below it). */
export function daemonVersionText(): string {
  let version = 'unknown';
  try {
    const pkg = JSON.parse(fs.readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version?: unknown };
    if (typeof pkg.version === 'string') version = pkg.version;
  } catch {
    // a copy without its package.json: the version stays unknown
  }
  return `snapstack daemon version ${version} (qemu-storage-daemon 7.2 command line and QMP)\nCopyright (c) the snapstack authors; modelled on QEMU (c) 2003-2022 Fabrice Bellard and the QEMU Project developers`;
}

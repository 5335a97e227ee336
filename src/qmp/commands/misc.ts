/**
 * query-version, query-iothreads and human-monitor-command.
 *
 * query-version's reply is also the greeting's `version` (H1's session code imports
 * `qmpVersionInfo`): snapstack speaks QEMU 7.2's QMP, so it says qemu 7.2.0, with its own name and
 * version as the package. human-monitor-command runs one line of the HMP monitor
 * (src/monitor/hmp.ts) without the BQL held (each HMP command takes it itself).
 */
import fs from 'node:fs';
import { withBql } from '../../block/bql.js';
import { listIOThreads, type IOThread } from '../../block/iothread.js';
import { Monitor } from '../../monitor/hmp.js';
import { QmpError, type QmpCommand, type QmpObject } from '../types.js';
import { optInt, qmpErrors, reqStr } from './util.js';

/** QEMU's default poll-max-ns, for an IOThread whose worker does not say. */
const DEFAULT_POLL_MAX_NS = 32768;

let packageVersion: string | null = null;

/** snapstack's version from its package.json (src/ and dist/ both sit two levels below it). */
function snapstackVersion(): string {
  if (packageVersion !== null) return packageVersion;
  try {
    const text = fs.readFileSync(new URL('../../../package.json', import.meta.url), 'utf8');
    const parsed: unknown = JSON.parse(text);
    const v = typeof parsed === 'object' && parsed !== null && 'version' in parsed ? (parsed as { version: unknown }).version : undefined;
    packageVersion = typeof v === 'string' ? v : '0.0.0';
  } catch {
    packageVersion = '0.0.0';
  }
  return packageVersion;
}

/**
 * QMP's VersionInfo: the QEMU version whose protocol snapstack speaks, and snapstack as the package.
 * @locking common
 */
export function qmpVersionInfo(): QmpObject {
  return { qemu: { major: 7, minor: 2, micro: 0 }, package: `snapstack ${snapstackVersion()}` };
}

/** The poll window of an IOThread's worker. */
function pollMaxNs(t: IOThread): number {
  return t.pollMaxNs;
}

const queryVersion: QmpCommand = {
  name: 'query-version',
  doc: 'The version of QEMU whose QMP snapstack speaks (7.2.0) and snapstack\'s own as the package; the greeting carries the same.',
  args: [],
  example: { returns: { qemu: { major: 7, minor: 2, micro: 0 }, package: 'snapstack 0.1.0' } },
  run: async () => qmpVersionInfo(),
};

const queryIothreads: QmpCommand = {
  name: 'query-iothreads',
  doc: "Lists the IOThreads (`--object iothread,id=ID`) as QEMU's IOThreadInfo. thread-id is the process id: a Node.js worker has no thread id of its own that the system shows; the adaptive polling knobs QEMU has besides poll-max-ns read 0.",
  args: [],
  example: { returns: [{ id: 'io0', 'thread-id': 4242, 'poll-max-ns': 32768, 'poll-grow': 0, 'poll-shrink': 0, 'aio-max-batch': 0 }] },
  run: () =>
    qmpErrors(() =>
      withBql((bql) =>
        listIOThreads(bql).map((t) => ({ id: t.id, 'thread-id': process.pid, 'poll-max-ns': pollMaxNs(t), 'poll-grow': 0, 'poll-shrink': 0, 'aio-max-batch': 0 })),
      ),
    ),
};

const humanMonitorCommand: QmpCommand = {
  name: 'human-monitor-command',
  doc: 'Runs one HMP command line (every command of the REPL: info block, qemu-io, savevm, block_stream, ...) and returns its output, each line ended by "\\r\\n" as QEMU\'s monitor writes it ("" when it prints nothing). `cpu-index` must name a vCPU of the machine.',
  args: [
    { name: 'command-line', type: 'str' },
    { name: 'cpu-index', type: 'int', optional: true },
  ],
  example: { args: { 'command-line': 'info iothreads' }, returns: 'io0:\r\n    pending requests=0\r\n' },
  run: (ctx, args) =>
    qmpErrors(async () => {
      const line = reqStr(args, 'command-line');
      const cpu = optInt(args, 'cpu-index');
      if (cpu !== undefined && (ctx.machine === null || !Number.isInteger(cpu) || cpu < 0 || cpu >= ctx.machine.vcpus)) {
        throw new QmpError('GenericError', "Parameter 'cpu-index' expects a CPU number");
      }
      const out: string[] = [];
      const monitor = new Monitor((text) => out.push(text), ctx.machine);
      await monitor.execute(line);
      if (monitor.quitRequested) ctx.requestQuit();
      return out.map((text) => `${text.replace(/\r?\n/g, '\r\n')}\r\n`).join('');
    }),
};

/** query-version, query-iothreads, human-monitor-command. */
export const miscCommands: QmpCommand[] = [queryVersion, queryIothreads, humanMonitorCommand];

/**
 * `snapstack monitor`: the HMP-like monitor on an emulated machine whose disks and options are
 * given in QEMU's syntax: `--drive file=PATH,format=raw|qcow2,id=ID[,iothread=ID][,readonly=on]`
 * (repeatable), `--object iothread,id=ID`, `-m SIZE` (guest RAM), `--smp N` (vCPUs), `--guest`
 * (run the self-checking guest workload). `--demo` builds a demo machine under ./demo: a qcow2
 * and a raw disk (created if absent), an IOThread, and the guest workload running.
 * `-qmp unix:PATH,server=on,wait=off` / `-qmp tcp:HOST:PORT,server=on,wait=off` (repeatable)
 * serves QMP with the machine beside the REPL; `quit` on either ends both. When standard input
 * ends without `quit`, the QMP monitors go on serving until QMP `quit`, SIGTERM or SIGHUP.
 */
import fs from 'node:fs';
import path from 'node:path';
import { withBql, withBqlSync, type Bql } from '../block/bql.js';
import { BlockError } from '../block/errors.js';
import { createIOThread, shutdownIOThreads } from '../block/iothread.js';
import { parseOptions, parseSize } from '../block/options.js';
import { createRawFile } from '../drivers/file/driver.js';
import { createQcow2File } from '../drivers/qcow2/create.js';
import '../drivers/index.js';
import { Machine } from '../machine/machine.js';
import { Monitor } from '../monitor/hmp.js';
import { runRepl } from '../monitor/repl.js';
import { describeError } from '../commands/format.js';
import { qmpCommands } from '../qmp/command-table.js';
import { Chardev, parseLegacyChardev } from './chardev.js';

const USAGE = `usage: snapstack monitor [--object iothread,id=ID[,poll-max-ns=NS]]... [--drive file=PATH,format=raw|qcow2,id=ID[,iothread=ID][,readonly=on]]...
                         [-m SIZE] [--smp N] [--guest] [--demo]
                         [-qmp unix:PATH,server=on,wait=off | -qmp tcp:HOST:PORT,server=on,wait=off]...`;

function addObject(bql: Bql, spec: string): void {
  const o = parseOptions(spec, 'qom-type');
  if (o['qom-type'] !== 'iothread') throw new BlockError('EINVAL', `--object ${spec}: only 'iothread' objects are known`, { field: 'qom-type' });
  const id = o['id'];
  if (id === undefined) throw new BlockError('EINVAL', `--object ${spec}: 'id' is required`, { field: 'id' });
  for (const key of Object.keys(o)) {
    if (key !== 'qom-type' && key !== 'id' && key !== 'poll-max-ns') {
      throw new BlockError('EINVAL', `--object ${spec}: unknown iothread property '${key}' (known: id, poll-max-ns)`, { field: key });
    }
  }
  const poll = o['poll-max-ns'];
  if (poll !== undefined && !/^\d+$/.test(poll)) {
    throw new BlockError('EINVAL', `--object ${spec}: poll-max-ns must be a non-negative integer, not '${poll}'`, { field: 'poll-max-ns', value: poll });
  }
  createIOThread(bql, id, poll === undefined ? {} : { pollMaxNs: Number(poll) });
}

function demoSetup(dir: string): { objects: string[]; drives: string[] } {
  fs.mkdirSync(dir, { recursive: true });
  const qcow = path.join(dir, 'disk0.qcow2');
  const raw = path.join(dir, 'disk1.raw');
  if (!fs.existsSync(qcow)) withBqlSync((bql) => createQcow2File(bql, qcow, { sizeBytes: 256 * 1024 * 1024 }));
  if (!fs.existsSync(raw)) withBqlSync((bql) => createRawFile(bql, raw, 64 * 1024 * 1024));
  return {
    objects: ['iothread,id=io0'],
    drives: [`file=${qcow},format=qcow2,id=disk0,iothread=io0`, `file=${raw},format=raw,id=disk1`],
  };
}

/** Runs `snapstack monitor ARGS`; returns the exit status. */
export async function monitorMain(argv: string[], out: (s: string) => void, err: (s: string) => void): Promise<number> {
  const objects: string[] = [];
  const drives: string[] = [];
  const qmpSpecs: string[] = [];
  const chardevs: Chardev[] = [];
  let demo = false;
  let guest = false;
  let ramBytes = 64 * 1024 * 1024;
  let vcpus = 2;
  let machine: Machine | undefined;
  // QMP quit (or a signal, with QMP monitors) ends the REPL and the monitor
  let stopWaiting: () => void = () => undefined;
  const stopped = new Promise<void>((resolve) => (stopWaiting = resolve));
  let quitting = false;
  const qmpQuit = (): void => {
    quitting = true;
    stopWaiting();
    // ends the REPL's line reader, so runRepl returns
    process.stdin.destroy();
  };
  try {
    for (let i = 0; i < argv.length; i++) {
      const a = argv[i] as string;
      const value = (): string => {
        const v = argv[++i];
        if (v === undefined) throw new BlockError('EINVAL', `option ${a} needs a value\n${USAGE}`, { field: a });
        return v;
      };
      if (a === '--drive' || a === '-drive') drives.push(value());
      else if (a === '--object' || a === '-object') objects.push(value());
      else if (a === '-m' || a === '--m') ramBytes = parseSize(value().replace(/^size=/, ''), '-m');
      else if (a === '--smp' || a === '-smp') vcpus = Number(value());
      else if (a === '-qmp' || a === '--qmp') qmpSpecs.push(value());
      else if (a === '--guest') guest = true;
      else if (a === '--demo') demo = true;
      else if (a === '-h' || a === '--help') {
        out(USAGE);
        return 0;
      } else throw new BlockError('EINVAL', `invalid option '${a}'\n${USAGE}`, { field: a });
    }
    if (demo) {
      const d = demoSetup(path.resolve('demo'));
      objects.push(...d.objects);
      drives.push(...d.drives);
      guest = true;
    }
    machine = new Machine({ ramBytes, vcpus, guest });
    const m = machine;
    await withBql(async (bql) => {
      for (const o of objects) addObject(bql, o);
      for (const d of drives) await m.addDrive(bql, d);
      await m.start(bql);
    });
    const specs = qmpSpecs.map((text, i) => ({ text, spec: parseLegacyChardev(text, `compat_monitor${i}`) }));
    for (const { text, spec } of specs) {
      const dev = await Chardev.open(spec, (info) => err(`snapstack monitor: -qmp ${text}: ${info}`));
      chardevs.push(dev);
      await dev.attachMonitor({ commands: qmpCommands({ machine: true }), machine: m, onQuit: () => qmpQuit() });
    }
  } catch (e) {
    err(`snapstack monitor: ${describeError(e)}`);
    await Promise.all(chardevs.map((c) => c.close()));
    if (machine !== undefined) {
      const m = machine;
      await withBql((bql) => m.shutdown(bql)).catch(() => undefined);
    }
    await withBql((bql) => shutdownIOThreads(bql));
    return 1;
  }
  const interactive = process.stdin.isTTY === true && process.stdout.isTTY === true;
  const progress = interactive ? (text: string): void => void process.stdout.write(`\r${text}\x1b[K${text === '' ? '' : ''}`) : null;
  const monitor = new Monitor(out, machine, progress);
  await monitor.refreshNames();
  await monitor.printRecovery();
  const banner = ["snapstack monitor - type 'help' for more information"];
  if (demo) {
    banner.push('Demo machine: disk0 (qcow2, IOThread io0) and disk1 (raw), the guest workload running. Try:');
    banner.push('  savevm s1     info snapshots     qemu-io disk0 "read 0 4k"     loadvm s1     delvm s1');
    banner.push('  info block    info status        stop / cont                   quit');
  }
  const signals: NodeJS.Signals[] = chardevs.length > 0 ? ['SIGTERM', 'SIGHUP'] : [];
  for (const sig of signals) process.on(sig, qmpQuit);
  try {
    await Promise.race([runRepl(monitor, process.stdin, process.stdout, banner), stopped]);
    // input ended without quit: the QMP monitors go on serving until they are told to stop
    if (!monitor.quitRequested && !quitting && chardevs.length > 0) await stopped;
  } finally {
    for (const sig of signals) process.off(sig, qmpQuit);
  }
  await Promise.all(chardevs.map((c) => c.close()));
  const m = machine;
  await withBql((bql) => m.shutdown(bql));
  await withBql((bql) => shutdownIOThreads(bql));
  return 0;
}

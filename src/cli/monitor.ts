/**
 * `snapstack monitor`: the HMP-like monitor over the drives given in QEMU's syntax:
 * `--drive file=PATH,format=raw,id=ID[,iothread=ID][,readonly=on]` (repeatable) and
 * `--object iothread,id=ID`; `--demo` adds a demo disk under ./demo (created if absent) bound to
 * an IOThread.
 */
import fs from 'node:fs';
import path from 'node:path';
import { blkNew } from '../block/backend.js';
import { withBql, type Bql } from '../block/bql.js';
import { BlockError } from '../block/errors.js';
import { openNode } from '../block/graph.js';
import { createIOThread, shutdownIOThreads } from '../block/iothread.js';
import { parseOptions, type NodeOptions } from '../block/options.js';
import { createRawFile } from '../drivers/file.js';
import '../drivers/index.js';
import { Monitor } from '../monitor/hmp.js';
import { runRepl } from '../monitor/repl.js';
import { describeError } from './format.js';

const USAGE = `usage: snapstack monitor [--object iothread,id=ID]... [--drive file=PATH,format=raw,id=ID[,iothread=ID][,readonly=on]]... [--demo]`;

async function addDrive(bql: Bql, spec: string): Promise<void> {
  const o = parseOptions(spec, 'file');
  const id = o['id'];
  if (id === undefined) throw new BlockError('EINVAL', `--drive ${spec}: 'id' is required`, { field: 'id' });
  const nodeOpts: NodeOptions = {};
  for (const [k, v] of Object.entries(o)) {
    if (k === 'id') continue;
    nodeOpts[k === 'readonly' ? 'read-only' : k] = v;
  }
  const node = await openNode(bql, nodeOpts);
  blkNew(bql, id, node);
}

function addObject(bql: Bql, spec: string): void {
  const o = parseOptions(spec, 'qom-type');
  if (o['qom-type'] !== 'iothread') throw new BlockError('EINVAL', `--object ${spec}: only 'iothread' objects are known`, { field: 'qom-type' });
  const id = o['id'];
  if (id === undefined) throw new BlockError('EINVAL', `--object ${spec}: 'id' is required`, { field: 'id' });
  createIOThread(bql, id);
}

function demoSetup(dir: string): { objects: string[]; drives: string[] } {
  fs.mkdirSync(dir, { recursive: true });
  const raw = path.join(dir, 'disk0.raw');
  if (!fs.existsSync(raw)) createRawFile(raw, 64 * 1024 * 1024);
  return { objects: ['iothread,id=io0'], drives: [`file=${raw},format=raw,id=disk0,iothread=io0`] };
}

/** Runs `snapstack monitor ARGS`; returns the exit status. */
export async function monitorMain(argv: string[], out: (s: string) => void, err: (s: string) => void): Promise<number> {
  const objects: string[] = [];
  const drives: string[] = [];
  let demo = false;
  try {
    for (let i = 0; i < argv.length; i++) {
      const a = argv[i] as string;
      if (a === '--drive' || a === '-drive' || a === '--object' || a === '-object') {
        const v = argv[++i];
        if (v === undefined) throw new BlockError('EINVAL', `option ${a} needs a value\n${USAGE}`, { field: a });
        (a.endsWith('drive') ? drives : objects).push(v);
      } else if (a === '--demo') demo = true;
      else if (a === '-h' || a === '--help') {
        out(USAGE);
        return 0;
      } else throw new BlockError('EINVAL', `invalid option '${a}'\n${USAGE}`, { field: a });
    }
    if (demo) {
      const d = demoSetup(path.resolve('demo'));
      objects.push(...d.objects);
      drives.push(...d.drives);
    }
    await withBql(async (bql) => {
      for (const o of objects) addObject(bql, o);
      for (const d of drives) await addDrive(bql, d);
    });
  } catch (e) {
    err(`snapstack monitor: ${describeError(e)}`);
    await shutdownIOThreads();
    return 1;
  }
  const monitor = new Monitor(out);
  const banner = ["snapstack monitor - type 'help' for more information"];
  if (demo) {
    banner.push('Try:  info block            (the demo disk, bound to IOThread io0)');
    banner.push('      qemu-io disk0 "write -P 0xab 0 64k"   then   qemu-io disk0 "read -P 0xab 0 64k"');
    banner.push('      info iothreads        and   quit');
  }
  await runRepl(monitor, process.stdin, process.stdout, banner);
  await shutdownIOThreads();
  return 0;
}

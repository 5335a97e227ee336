#!/usr/bin/env node
// @ts-check
/**
 * The snapstack side of bench/snapshot-latency.js, in its own process: a machine (--ram bytes of
 * guest RAM, the guest workload running) with one qcow2 disk, served by our QMP server on
 * --socket. With --hold-bql its snapshot-save job runs savevm with the BQL held for the whole run,
 * as QEMU does and as snapstack did before the snapshot lock (the "before" row); otherwise the
 * job is the real one. Prints "ready" when the socket listens; quits on QMP quit.
 *
 *   node bench/lib/qmp-machine.js --socket S --disk FILE --ram BYTES [--hold-bql]
 */
import path from 'node:path';
import { pathToFileURL } from 'node:url';

const argv = process.argv.slice(2);
/** @param {string} name */
const opt = (name) => {
  const i = argv.indexOf(`--${name}`);
  return i >= 0 ? argv[i + 1] : undefined;
};
const dist = path.resolve(opt('lib') ?? 'dist');
/** @param {string} p */
const load = (p) => import(pathToFileURL(path.join(dist, p)).href);
const { withBql } = await load('block/bql.js');
const { jobStart } = await load('block/job.js');
const { Machine } = await load('machine/machine.js');
const { saveVm } = await load('machine/savevm.js');
const { qmpCommands } = await load('qmp/command-table.js');
const { QmpServer } = await load('qmp/server.js');

const m = new Machine({ guest: true, vcpus: 2, ramBytes: Number(opt('ram') ?? 256 * 1024 * 1024), seed: 1 });
await withBql(async (/** @type {unknown} */ bql) => {
  await m.addDrive(bql, `file=${opt('disk')},format=qcow2,id=disk0,node-name=disk0`);
  await m.start(bql);
});
/** @type {Array<{ name: string, doc: string, args: readonly unknown[], run: (ctx: unknown, args: Record<string, unknown>) => Promise<unknown> }>} */
let commands = qmpCommands({ machine: true });
if (argv.includes('--hold-bql')) {
  const held = {
    name: 'snapshot-save',
    doc: 'bench only: savevm with the BQL held for the whole run',
    args: commands.find((c) => c.name === 'snapshot-save')?.args ?? [],
    /** @param {unknown} _ctx @param {Record<string, unknown>} args */
    run: (_ctx, args) =>
      withBql((/** @type {unknown} */ bql) => {
        jobStart(bql, String(args['job-id']), 'snapshot-save', {
          run: () => withBql((/** @type {unknown} */ b) => saveVm(b, m, String(args['tag']), { devices: ['disk0'], vmstate: 'disk0', overwrite: false })),
        }, { autoDismiss: false });
        return {};
      }),
  };
  commands = commands.map((c) => (c.name === 'snapshot-save' ? held : c));
}
const server = await QmpServer.listen({ type: 'unix', path: String(opt('socket')) }, {
  commands,
  machine: m,
  onQuit: () =>
    void (async () => {
      await server.close();
      await withBql((/** @type {unknown} */ bql) => m.shutdown(bql));
      process.exit(0);
    })(),
});
console.log('ready');

#!/usr/bin/env node
// @ts-check
/**
 * `npm run bench:snapshot-latency`: how long the monitor takes to answer while a snapshot-save
 * job with --ram bytes of VM state runs (issue 13). A QMP client sends query-jobs and query-block
 * one after the other (each waits for its reply) from the moment the job starts until it has
 * concluded, and records each reply's latency. Three peers, each on a fresh 1 GiB qcow2 disk:
 *   qemu         qemu-system-x86_64 7.2 (-machine none, RAM from a file of random bytes, so that
 *                the VM state is as large as ours): its job runs in one main-loop callback with
 *                the BQL held;
 *   ours-held    snapstack with savevm holding the BQL for the whole run (the behaviour before the
 *                snapshot lock; bench/lib/qmp-machine.js --hold-bql);
 *   ours         snapstack's job: snapshot lock, BQL only for the short steps.
 * Prints per peer the job's duration, the queries answered during it and the latency p50 / p99 /
 * max (medians over --reps, with the range).
 *
 *   npm run build && npm run bench:snapshot-latency -- [--ram 256M] [--reps 3] [--peers qemu,ours-held,ours]
 */
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { readCommandLine, usageFail } from './lib/args.js';

/** @type {import('./lib/args.js').Spec} */
const SPEC = {
  ram: { type: 'size', default: 256 * 1024 * 1024, metavar: 'BYTES', help: 'guest RAM (the VM state saved)' },
  reps: { type: 'number', default: 3, metavar: 'N', help: 'repetitions' },
  peers: { type: 'string', default: 'qemu,ours-held,ours', metavar: 'LIST', help: 'which peers to run' },
  lib: { type: 'string', default: 'dist', metavar: 'DIR', help: 'the library build' },
  help: { type: 'flag', help: 'show this help' },
};
const a = readCommandLine('bench/snapshot-latency.js', 'npm run bench:snapshot-latency', SPEC);
if (a === null) process.exit();
const ram = Number(a['ram']);
const reps = Number(a['reps']);
const peers = String(a['peers']).split(',');
if (!(ram >= 1024 * 1024 && reps > 0 && peers.every((p) => ['qemu', 'ours-held', 'ours'].includes(p)))) {
  usageFail('bench/snapshot-latency.js', 'npm run bench:snapshot-latency', SPEC, '--ram must be at least 1M, --reps > 0, --peers from qemu, ours-held, ours');
  process.exit();
}
const dist = path.resolve(String(a['lib']));
const { QmpClient } = await import(pathToFileURL(path.join(dist, 'qmp/client.js')).href);
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-snaplat-'));
const sleep = (/** @type {number} */ ms) => new Promise((r) => setTimeout(r, ms));

/** @param {string} file */
async function waitFor(file) {
  for (let i = 0; i < 1000 && !fs.existsSync(file); i++) await sleep(20);
  if (!fs.existsSync(file)) throw new Error(`${file} did not appear`);
}

/** Starts one peer on a fresh disk; returns its socket and process. @param {string} peer @param {number} rep */
async function start(peer, rep) {
  const disk = path.join(dir, `${peer}-${rep}.qcow2`);
  const sock = path.join(dir, `${peer}-${rep}.sock`);
  spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', disk, '1G']);
  if (peer === 'qemu') {
    const ramFile = path.join(dir, 'ram.bin');
    if (!fs.existsSync(ramFile)) {
      const fd = fs.openSync(ramFile, 'w');
      const chunk = Buffer.alloc(1 << 20);
      for (let off = 0; off < ram; off += chunk.length) {
        for (let i = 0; i < chunk.length; i += 4) chunk.writeUInt32LE((Math.random() * 2 ** 32) >>> 0, i);
        fs.writeSync(fd, chunk);
      }
      fs.closeSync(fd);
    }
    const proc = spawn('qemu-system-x86_64', [
      '-object', `memory-backend-file,id=mem,size=${ram},mem-path=${ramFile},share=off`,
      '-machine', 'none,memory-backend=mem', '-m', `${ram / (1024 * 1024)}M`, '-nodefaults', '-display', 'none', '-accel', 'tcg',
      '-blockdev', `driver=file,node-name=f0,filename=${disk}`, '-blockdev', 'driver=qcow2,node-name=disk0,file=f0',
      '-qmp', `unix:${sock},server=on,wait=off`,
    ], { stdio: 'ignore' });
    await waitFor(sock);
    return { sock, proc };
  }
  const args = ['bench/lib/qmp-machine.js', '--socket', sock, '--disk', disk, '--ram', String(ram), '--lib', dist];
  if (peer === 'ours-held') args.push('--hold-bql');
  const proc = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'inherit'] });
  await new Promise((resolve, reject) => {
    proc.stdout?.on('data', (d) => String(d).includes('ready') && resolve(undefined));
    proc.once('exit', (c) => reject(new Error(`${peer} exited with ${c}`)));
  });
  return { sock, proc };
}

/** @param {number[]} xs @param {number} q */
function quantile(xs, q) {
  const s = [...xs].sort((x, y) => x - y);
  return s[Math.min(s.length - 1, Math.floor(q * s.length))] ?? NaN;
}

/** One run: the job and the queries during it. @param {string} peer @param {number} rep */
async function runOnce(peer, rep) {
  const { sock, proc } = await start(peer, rep);
  const client = await QmpClient.connect({ path: sock });
  await sleep(300); // let the guest run a little
  const lat = [];
  const t0 = performance.now();
  const save = client.execute('snapshot-save', { 'job-id': 'save0', tag: 'bench', vmstate: 'disk0', devices: ['disk0'] });
  let done = false;
  for (let i = 0; !done && performance.now() - t0 < 120_000; i++) {
    const q0 = performance.now();
    const r = await client.execute(i % 2 === 0 ? 'query-jobs' : 'query-block');
    lat.push(performance.now() - q0);
    if (i % 2 === 0) done = Array.isArray(r) && r.some((j) => j.id === 'save0' && j.status === 'concluded');
  }
  const seconds = (performance.now() - t0) / 1000;
  await save;
  const jobs = /** @type {Array<Record<string, unknown>>} */ (await client.execute('query-jobs'));
  const err = jobs.find((j) => j['id'] === 'save0')?.['error'];
  if (err !== undefined) throw new Error(`${peer}: the job failed: ${String(err)}`);
  await client.execute('quit').catch(() => undefined);
  await client.close();
  if (proc.exitCode === null) await new Promise((r) => proc.once('exit', r));
  return { seconds, queries: lat.length, p50: quantile(lat, 0.5), p99: quantile(lat, 0.99), max: Math.max(...lat) };
}

/** @type {Record<string, Array<Awaited<ReturnType<typeof runOnce>>>>} */
const results = {};
for (let rep = 0; rep < reps; rep++) {
  const order = rep % 2 === 0 ? peers : [...peers].reverse();
  for (const peer of order) (results[peer] ??= []).push(await runOnce(peer, rep));
}
/** @param {number[]} xs @param {number} digits */
const med = (xs, digits) => `${quantile(xs, 0.5).toFixed(digits)} (${Math.min(...xs).toFixed(digits)}–${Math.max(...xs).toFixed(digits)})`;
console.log(`snapshot-save of ${ram / (1024 * 1024)} MiB of VM state; monitor latency while it runs (query-jobs / query-block, one at a time); ${reps} reps, median (range); load: ${os.loadavg()[0]?.toFixed(2)}`);
console.log('| peer | job s | queries answered | p50 ms | p99 ms | max ms |');
console.log('| --- | --- | --- | --- | --- | --- |');
for (const peer of peers) {
  const r = results[peer] ?? [];
  console.log(`| ${peer} | ${med(r.map((x) => x.seconds), 2)} | ${med(r.map((x) => x.queries), 0)} | ${med(r.map((x) => x.p50), 2)} | ${med(r.map((x) => x.p99), 2)} | ${med(r.map((x) => x.max), 1)} |`);
}
fs.rmSync(dir, { recursive: true, force: true });

#!/usr/bin/env node
// @ts-check
/**
 * `npm run bench:nbd`: NBD throughput, side by side in one run (issue 14, part 5).
 *
 * Servers, one at a time, each exporting the same image over a unix socket (export name `e`):
 *   snapstack  `node bin/snapstack.js nbd -t -e 8 -f FMT -x e -k SOCK FILE` (the build under test)
 *   qemu-nbd   `qemu-nbd -t -e 8 -f FMT -x e -k SOCK FILE` (7.2, cache=writeback, aio=threads)
 *   QSD        qemu-storage-daemon, a file node under a FMT node, `--nbd-server addr.type=unix`,
 *              `--export type=nbd,...,writable=on` (cache.direct=off: the page cache, as the others)
 * Images: --size (1 GiB) raw and qcow2, every byte written (0x5a) by qemu-io / qemu-img convert,
 * so reads hit data, writes overwrite allocated clusters and the page cache holds the image.
 * `-e 8` lets nbdcopy open its connections where the server advertises CAN_MULTI_CONN.
 *
 * Load (from the same client processes against every server):
 *   fio --ioengine=nbd: 4k randread QD1, 4k randread QD32, 4k randwrite QD32 (IOPS),
 *                       1M read QD4, 1M write QD4 (MB/s); --runtime seconds, time based
 *   nbdcopy URI null:   the whole export read (MB/s from the wall time)
 *   our client:         `snapstack img bench` against `qemu-img bench` on the qemu-nbd raw export,
 *                       the same nbd+unix:// URL, 4k reads QD1 and QD32, the same request count
 *                       (from qemu-img's rate) and the same -S stride (qemu-img bench has no random mode)
 *
 * Each repetition starts every server afresh; the order of the servers (and of the two clients)
 * rotates between repetitions. A row prints the median and range of each tool and the ratios
 * ours / qemu-nbd and ours / QSD (median and range of the per-repetition ratios; above 1:
 * snapstack is faster). The server's CPU time over each fio job (from /proc/PID/stat, all its
 * threads) is printed as a second table: 100% is one core busy, the machine has os.cpus() cores
 * shared by client and server.
 *
 *   npm run build && npm run bench:nbd -- [--size 1G] [--runtime 5] [--reps 3] [--formats raw,qcow2] [--markdown]
 */
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { parseSize } from '../dist/index.js';
import { readCommandLine, usageFail } from './lib/args.js';
import { qemuStrideBlocks } from './lib/peers.js';
import { renderTable } from './lib/table.js';

/** @type {import('./lib/args.js').Spec} */
const SPEC = {
  size: { type: 'size', default: '1G', metavar: 'SIZE', help: 'size of each image (all of it written)' },
  runtime: { type: 'number', default: 5, metavar: 'SEC', help: 'seconds per fio job and per client run' },
  reps: { type: 'number', default: 3, metavar: 'N', help: 'repetitions' },
  formats: { type: 'string', default: 'raw,qcow2', metavar: 'LIST', help: 'image formats exported' },
  servers: { type: 'string', default: 'snapstack,qemu-nbd,qsd', metavar: 'LIST', help: 'servers measured (snapstack first: it is the numerator)' },
  client: { type: 'flag', default: true, help: 'also measure our client against qemu-img bench (--client=off to skip)' },
  copy: { type: 'flag', default: true, help: 'also time nbdcopy of the whole export (--copy=off to skip)' },
  markdown: { type: 'flag', help: 'print the tables as Markdown' },
  help: { type: 'flag', help: 'show this help' },
};

const SCRIPT = 'bench/nbd-compare.js';
const CMD = 'npm run bench:nbd';
const a = readCommandLine(SCRIPT, CMD, SPEC);
if (a === null) process.exit();

const MiB = 1024 * 1024;
// a default is not converted by the parser: '1G' arrives as the string
const size = typeof a['size'] === 'string' ? parseSize(a['size'], 'size') : Number(a['size']);
const runtime = Number(a['runtime']);
const reps = Number(a['reps']);
const formats = String(a['formats']).split(',');
const servers = String(a['servers']).split(',');
const markdown = a['markdown'] === true;
if (!(size >= 64 * MiB && size % MiB === 0 && runtime >= 1 && reps >= 1 && Number.isInteger(reps)
  && formats.length > 0 && formats.every((f) => f === 'raw' || f === 'qcow2')
  && servers[0] === 'snapstack' && servers.every((s) => ['snapstack', 'qemu-nbd', 'qsd'].includes(s)))) {
  usageFail(SCRIPT, CMD, SPEC, '--size a MiB multiple of at least 64M, --runtime >= 1, --reps a whole number >= 1, --formats of raw,qcow2, --servers of snapstack,qemu-nbd,qsd starting with snapstack');
  process.exit();
}

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const SNAPSTACK = path.join(REPO, 'bin', 'snapstack.js');

/** @param {string} tool @param {string[]} args */
function run(tool, args) {
  const r = spawnSync(tool, args, { encoding: 'utf8', maxBuffer: 64 * MiB });
  if (r.error !== undefined || r.status !== 0) throw new Error(`${tool} ${args.join(' ')} failed (exit ${r.status}): ${r.error?.message ?? ''}${r.stdout}${r.stderr}`);
  return r.stdout;
}

/** The first line of `tool --version`, or null when it does not run. @param {string} tool */
function version(tool) {
  const r = spawnSync(tool, ['--version'], { encoding: 'utf8' });
  return r.error !== undefined || r.status !== 0 ? null : (r.stdout.split('\n')[0] ?? '').trim();
}

// the peers: fio with its nbd engine and qemu-nbd are needed; QSD and nbdcopy are columns that can go
const missing = [];
for (const t of ['qemu-img', 'qemu-io', 'qemu-nbd', 'fio']) if (version(t) === null) missing.push(t);
if (missing.length > 0) {
  process.stderr.write(`${SCRIPT}: ${missing.join(', ')} not found (apt-get install qemu-utils fio): nothing to compare against\n`);
  process.exit(1);
}
const engines = spawnSync('fio', ['--enghelp'], { encoding: 'utf8' }).stdout ?? '';
if (!/^\s*nbd\s*$/m.test(engines)) {
  process.stderr.write(`${SCRIPT}: this fio has no nbd engine (fio --enghelp): nothing to measure with\n`);
  process.exit(1);
}
if (!fs.existsSync(path.join(REPO, 'dist', 'cli', 'main.js'))) {
  process.stderr.write(`${SCRIPT}: no build in dist/: run npm run build first\n`);
  process.exit(1);
}
/** @type {string[]} */
const notes = [];
const useServers = servers.filter((s) => {
  if (s === 'qsd' && version('qemu-storage-daemon') === null) {
    notes.push('qemu-storage-daemon not found (apt-get install qemu-system-common): its column is left out');
    return false;
  }
  return true;
});
const doCopy = a['copy'] === true && version('nbdcopy') !== null;
if (a['copy'] === true && !doCopy) notes.push('nbdcopy not found (apt-get install libnbd-bin): the copy row is left out');

const root = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-nbdbench-'));
const SOCK = path.join(root, 's.sock');
const URI = `nbd+unix:///e?socket=${SOCK}`;

/** @type {Set<import('node:child_process').ChildProcess>} */
const live = new Set();
function killAll() {
  for (const p of live) p.kill('SIGKILL');
}
process.on('SIGINT', () => {
  killAll();
  fs.rmSync(root, { recursive: true, force: true });
  process.exit(130);
});

/** The image files, every byte written. */
function makeImages() {
  /** @type {Record<string, string>} */
  const files = {};
  const raw = path.join(root, 'img.raw');
  run('qemu-img', ['create', '-q', '-f', 'raw', raw, String(size)]);
  run('qemu-io', ['-f', 'raw', '-c', `write -P 0x5a 0 ${size}`, raw]);
  if (formats.includes('raw')) files['raw'] = raw;
  if (formats.includes('qcow2')) {
    const q = path.join(root, 'img.qcow2');
    run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, q]);
    files['qcow2'] = q;
  }
  return files;
}

/** Whether something accepts a connection on the socket. */
function canConnect() {
  return new Promise((resolve) => {
    const s = net.connect(SOCK);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

/**
 * @typedef {object} Server
 * @property {number} pid
 * @property {() => Promise<void>} stop
 */

/** Starts `kind` exporting `file` as format `fmt` on SOCK; resolves when it accepts connections. @param {string} kind @param {string} fmt @param {string} file @returns {Promise<Server>} */
async function startServer(kind, fmt, file) {
  fs.rmSync(SOCK, { force: true });
  /** @type {[string, string[]]} */
  const cmd =
    kind === 'snapstack' ? [process.execPath, [SNAPSTACK, 'nbd', '-t', '-e', '8', '-f', fmt, '-x', 'e', '-k', SOCK, file]]
    : kind === 'qemu-nbd' ? ['qemu-nbd', ['-t', '-e', '8', '-f', fmt, '-x', 'e', '-k', SOCK, file]]
    : ['qemu-storage-daemon', [
      '--blockdev', `driver=file,node-name=f,filename=${file},cache.direct=off,aio=threads`,
      '--blockdev', `driver=${fmt},node-name=n,file=f`,
      '--nbd-server', `addr.type=unix,addr.path=${SOCK}`,
      '--export', 'type=nbd,id=e,node-name=n,name=e,writable=on',
    ]];
  const proc = spawn(cmd[0], cmd[1], { stdio: ['ignore', 'ignore', 'pipe'] });
  live.add(proc);
  let stderr = '';
  proc.stderr?.on('data', (d) => (stderr += String(d)));
  const exited = new Promise((resolve) => proc.once('exit', resolve));
  const deadline = Date.now() + 20_000;
  while (!(fs.existsSync(SOCK) && (await canConnect()))) {
    if (proc.exitCode !== null || proc.signalCode !== null) throw new Error(`${kind} exited (${proc.exitCode ?? proc.signalCode}): ${stderr}`);
    if (Date.now() > deadline) {
      proc.kill('SIGKILL');
      throw new Error(`${kind} did not listen on ${SOCK} within 20 s: ${stderr}`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  const pid = proc.pid;
  if (pid === undefined) throw new Error(`${kind}: no pid`);
  return {
    pid,
    stop: async () => {
      proc.kill('SIGTERM');
      const t = setTimeout(() => proc.kill('SIGKILL'), 10_000);
      await exited;
      clearTimeout(t);
      live.delete(proc);
    },
  };
}

const TCK = Number(spawnSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).stdout.trim()) || 100;
/** CPU seconds (user + system, all threads) of process `pid` so far. @param {number} pid */
function cpuSec(pid) {
  const st = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  const f = st.slice(st.lastIndexOf(')') + 2).split(' ');
  // f[0] is field 3 (state): utime is field 14, stime field 15
  return (Number(f[11]) + Number(f[12])) / TCK;
}

/**
 * @typedef {object} Row
 * @property {string} name
 * @property {'randread' | 'randwrite' | 'read' | 'write'} rw
 * @property {number} bs
 * @property {number} qd
 */
/** @type {Row[]} */
const FIO_ROWS = [
  { name: '4k randread QD1', rw: 'randread', bs: 4096, qd: 1 },
  { name: '4k randread QD32', rw: 'randread', bs: 4096, qd: 32 },
  { name: '4k randwrite QD32', rw: 'randwrite', bs: 4096, qd: 32 },
  { name: '1M read QD4', rw: 'read', bs: MiB, qd: 4 },
  { name: '1M write QD4', rw: 'write', bs: MiB, qd: 4 },
];
/** IOPS for 4k rows, MB/s for the large ones. @param {Row} row */
const unitOf = (row) => (row.bs >= 65536 ? 'MB/s' : 'IOPS');

/** One fio job on the export; its IOPS or MB/s, and the server's CPU share over it. @param {Row} row @param {number} serverPid */
function fioJob(row, serverPid) {
  const args = [
    '--name=nbd-compare', '--ioengine=nbd', `--uri=${URI}`, `--rw=${row.rw}`, `--bs=${row.bs}`, `--iodepth=${row.qd}`,
    `--runtime=${runtime}`, '--time_based', '--norandommap', '--randrepeat=0', '--output-format=json',
  ];
  const c0 = cpuSec(serverPid);
  const t0 = performance.now();
  const out = run('fio', args);
  const wall = (performance.now() - t0) / 1000;
  const c1 = cpuSec(serverPid);
  // fio prints "fio: connected to NBD server" before the JSON document
  const json = JSON.parse(out.slice(out.indexOf('{')));
  const job = json.jobs[0];
  if (job.error !== 0) throw new Error(`fio ${args.join(' ')}: error ${job.error}`);
  const d = row.rw === 'read' || row.rw === 'randread' ? job.read : job.write;
  return { value: row.bs >= 65536 ? d.bw_bytes / 1e6 : d.iops, serverCpu: (c1 - c0) / wall, fioCpu: (job.usr_cpu + job.sys_cpu) / 100 };
}

/** nbdcopy of the whole export to null:; MB/s from the wall time. */
function copyJob() {
  const t0 = performance.now();
  run('nbdcopy', [URI, 'null:']);
  return size / 1e6 / ((performance.now() - t0) / 1000);
}

/** Whether the export advertises CAN_MULTI_CONN (nbdcopy's connection count follows it). */
function multiConn() {
  const r = spawnSync('nbdinfo', ['--json', URI], { encoding: 'utf8' });
  if (r.status !== 0) return 'unknown';
  return /"can_multi_conn":\s*true/.test(r.stdout) ? 'multi-conn' : 'one connection';
}

const STEP = qemuStrideBlocks(size, 4096) * 4096;
/** Request counts per client QD, from qemu-img bench's rate (the same for both clients). */
const clientCounts = new Map();
/** One `img bench` run of `count` 4 KiB reads at depth `qd`; its IOPS. @param {'snapstack' | 'qemu-img'} tool @param {number} qd @param {number} count */
function clientBench(tool, qd, count) {
  const args = ['bench', '-f', 'raw', '-c', String(count), '-d', String(qd), '-s', '4096', '-S', String(STEP), URI];
  const out = tool === 'qemu-img' ? run('qemu-img', args) : run(process.execPath, [SNAPSTACK, 'img', ...args]);
  const m = /Run completed in ([\d.]+) seconds/.exec(out);
  if (m === null) throw new Error(`${tool} bench printed no time: ${out}`);
  return count / Math.max(Number(m[1]), 0.0005);
}
/** The count for about `runtime` seconds of qemu-img bench at depth `qd` (calibrated once). @param {number} qd */
function clientCount(qd) {
  let n = clientCounts.get(qd);
  if (n === undefined) {
    let count = 2000;
    let rate = clientBench('qemu-img', qd, count);
    while (count / rate < 0.3) {
      count *= 4;
      rate = clientBench('qemu-img', qd, count);
    }
    n = Math.max(qd, Math.round(rate * runtime));
    clientCounts.set(qd, n);
  }
  return n;
}

/** @param {number[]} xs */
function median(xs) {
  const s = [...xs].sort((x, y) => x - y);
  const m = Math.floor(s.length / 2);
  return s.length % 2 === 1 ? (s[m] ?? NaN) : ((s[m - 1] ?? NaN) + (s[m] ?? NaN)) / 2;
}
/** A value with a sensible number of digits. @param {number} x */
function num(x) {
  if (!Number.isFinite(x)) return '—';
  return x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toFixed(2);
}
/** "median (min–max)". @param {number[]} xs @param {(x: number) => string} [f] */
function cell(xs, f = num) {
  if (xs.length === 0) return '—';
  return `${f(median(xs))} (${f(Math.min(...xs))}–${f(Math.max(...xs))})`;
}

/** results[key][server] = values per repetition, in repetition order. @type {Map<string, Map<string, number[]>>} */
const results = new Map();
/** serverCpu[key][server] = CPU shares per repetition. @type {Map<string, Map<string, number[]>>} */
const serverCpu = new Map();
/** @param {Map<string, Map<string, number[]>>} m @param {string} key @param {string} who @param {number} v */
function put(m, key, who, v) {
  let byWho = m.get(key);
  if (byWho === undefined) m.set(key, (byWho = new Map()));
  let xs = byWho.get(who);
  if (xs === undefined) byWho.set(who, (xs = []));
  xs.push(v);
}
/** @type {Map<string, string>} */
const multi = new Map();

const load0 = os.loadavg();
process.stdout.write(`nbd-compare: ${size / MiB} MiB images (${formats.join(', ')}), fio ${runtime} s per job, ${reps} reps; ${version('qemu-nbd')}; ${version('fio')}; ${os.cpus().length} CPUs, load ${load0.map((x) => x.toFixed(2)).join(' ')} at start\n`);
const t0 = performance.now();
try {
  const files = makeImages();
  for (let r = 0; r < reps; r++) {
    for (const fmt of formats) {
      const file = files[fmt];
      if (file === undefined) continue;
      const order = useServers.map((_, i) => useServers[(i + r) % useServers.length] ?? 'snapstack');
      for (const kind of order) {
        const srv = await startServer(kind, fmt, file);
        try {
          if (r === 0) multi.set(`${fmt} ${kind}`, multiConn());
          for (const row of FIO_ROWS) {
            const m = fioJob(row, srv.pid);
            const key = `${fmt} ${row.name} (${unitOf(row)})`;
            put(results, key, kind, m.value);
            put(serverCpu, key, kind, m.serverCpu * 100);
            put(serverCpu, key, `fio-${kind}`, m.fioCpu * 100);
          }
          if (doCopy) put(results, `${fmt} nbdcopy ${size / MiB} MiB (MB/s)`, kind, copyJob());
          if (a['client'] === true && kind === 'qemu-nbd' && fmt === formats[0]) {
            for (const qd of [1, 32]) {
              const count = clientCount(qd);
              /** @type {Array<'snapstack' | 'qemu-img'>} */
              const tools = r % 2 === 0 ? ['snapstack', 'qemu-img'] : ['qemu-img', 'snapstack'];
              for (const tool of tools) put(results, `client: img bench 4k read QD${qd} on qemu-nbd ${fmt} (IOPS)`, tool, clientBench(tool, qd, count));
            }
          }
        } finally {
          await srv.stop();
        }
      }
    }
  }
} finally {
  killAll();
  fs.rmSync(root, { recursive: true, force: true });
}

/** Per-repetition ratios ours / other. @param {number[] | undefined} ours @param {number[] | undefined} other */
function ratios(ours, other) {
  if (ours === undefined || other === undefined) return [];
  return ours.map((x, i) => x / (other[i] ?? NaN));
}
const ratioText = (/** @type {number} */ x) => x.toFixed(2);
const hasQsd = useServers.includes('qsd');
/** @type {string[][]} */
const rows = [];
/** @type {string[][]} */
const clientRows = [];
for (const [key, byWho] of results) {
  if (key.startsWith('client:')) {
    const ours = byWho.get('snapstack');
    const q = byWho.get('qemu-img');
    clientRows.push([key.slice('client: '.length), cell(ours ?? []), cell(q ?? []), cell(ratios(ours, q), ratioText)]);
    continue;
  }
  const ours = byWho.get('snapstack');
  const qn = byWho.get('qemu-nbd');
  const qs = byWho.get('qsd');
  const line = [key, cell(ours ?? []), cell(qn ?? [])];
  if (hasQsd) line.push(cell(qs ?? []));
  line.push(cell(ratios(ours, qn), ratioText));
  if (hasQsd) line.push(cell(ratios(ours, qs), ratioText));
  rows.push(line);
}
const head = ['row', 'snapstack nbd', 'qemu-nbd', ...(hasQsd ? ['QSD'] : []), 'ours/qemu-nbd', ...(hasQsd ? ['ours/QSD'] : [])];
process.stdout.write(`\nServers (fio --ioengine=nbd, nbdcopy; median (min–max) of ${reps}; ratios above 1: snapstack faster)\n\n`);
process.stdout.write(`${renderTable(head, rows, markdown)}\n`);
if (clientRows.length > 0) {
  process.stdout.write(`\nClients on the same nbd+unix:// URL (snapstack img bench vs qemu-img bench)\n\n`);
  process.stdout.write(`${renderTable(['row', 'snapstack img bench', 'qemu-img bench', 'ours/qemu-img'], clientRows, markdown)}\n`);
}
/** @type {string[][]} */
const cpuRows = [];
for (const [key, byWho] of serverCpu) {
  const line = [key];
  for (const s of useServers) line.push(`${num(median(byWho.get(s) ?? []))} / ${num(median(byWho.get(`fio-${s}`) ?? []))}`);
  cpuRows.push(line);
}
process.stdout.write(`\nCPU over each fio job, % of one core (median): server / fio\n\n`);
process.stdout.write(`${renderTable(['row', ...useServers], cpuRows, markdown)}\n`);
process.stdout.write(`\nCAN_MULTI_CONN (nbdcopy opens 4 connections where it is set): ${[...multi].map(([k, v]) => `${k}: ${v}`).join('; ')}\n`);
for (const n of notes) process.stdout.write(`note: ${n}\n`);
const load1 = os.loadavg();
process.stdout.write(`load ${load1.map((x) => x.toFixed(2)).join(' ')} at the end, ${((performance.now() - t0) / 1000).toFixed(0)} s in all (a shared machine: compare ratios from the same run only)\n`);

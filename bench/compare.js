#!/usr/bin/env node
// @ts-check
/**
 * `npm run bench:compare`: snapstack against `qemu-img bench`, `fio` and a bare fs.*Sync loop, on
 * the same files in the same run.
 *
 *   npm run build && npm run bench:compare -- [--runtime 2] [--reps 3] [--size 1G] [--only PATTERN] [--quick] [--busy N]
 *
 * The matrix: 4 KiB random read and write at queue depth 1 and 32, 64 KiB and 1 MiB sequential
 * read and write at queue depth 8 (--seq-depth), each on a raw and a qcow2 image (fully written
 * first, in the page cache). Per row the tools run back to back, their order rotated from one
 * repetition to the next; snapstack runs in this process through bench/lib/engine.js (the engine
 * of bench/run.js). Prints the throughput medians, the snapstack/peer ratios (min, median, max of
 * the per-repetition ratios), latency and CPU per request, and writes bench/results/<timestamp>.json
 * and .svg (--out DIR to put them elsewhere). Installs nothing: a missing tool is named and its
 * column left empty.
 *
 * --busy N: a busy host. N child processes each keep a core busy (bench/lib/busy.js) from before
 * the first tool (image preparation excluded) to after the last, the same for every tool; they are
 * killed on exit and on Ctrl-C. The figure is in the output header and in the JSON (options.busy).
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { checkQcow2File, shutdownIOThreads, withBql } from '../dist/index.js';
import { formatSize, readCommandLine, usageFail as failUsage } from './lib/args.js';
import { barChartSvg } from './lib/chart.js';
import { startBusy } from './lib/busy.js';
import { liveTempDirs, prepareImage, removeTempDirs, runBenchmark, warnIfDistStale } from './lib/engine.js';
import { detectTool, fioRun, probeFioEngine, probeQemuIoUring, qemuImgBenchTimed, qemuStrideBlocks, syncLoop } from './lib/peers.js';
import { renderTable } from './lib/table.js';

const HERE = path.dirname(fileURLToPath(import.meta.url));

/** @type {import('./lib/args.js').Spec} */
const SPEC = {
  runtime: { type: 'number', metavar: 'SEC', help: 'seconds per measurement (default 2; --quick: 0.3)' },
  reps: { type: 'number', metavar: 'N', help: 'repetitions of the whole matrix (default 3; --quick: 1)' },
  size: { type: 'size', metavar: 'SIZE', help: 'image size (default 1G; --quick: 64M)' },
  only: { type: 'string', metavar: 'PATTERN', help: "rows to run: a regular expression (or a comma list of them) matched against ids like 'raw/4k-randread-qd1'" },
  quick: { type: 'flag', help: 'a short smoke run: --runtime 0.3 --reps 1 --size 64M unless given' },
  tools: { type: 'string', default: 'snapstack,qemu-img,fio,sync', metavar: 'LIST', help: 'tools to run (snapstack, qemu-img, fio, sync)' },
  'seq-depth': { type: 'number', default: 8, metavar: 'N', help: 'queue depth of the sequential rows' },
  ramp: { type: 'number', metavar: 'SEC', help: 'warm-up before each snapstack and sync-loop measurement (default min(0.5, runtime/4))' },
  aio: { type: 'string', default: 'threads', choices: ['threads', 'sync'], help: "snapstack's file aio mode" },
  iothreads: { type: 'number', default: 0, metavar: 'N', help: "snapstack's IOThreads (0: the default pool)" },
  busy: { type: 'number', default: 0, metavar: 'N', help: 'a busy host: N processes spin on a core each for the whole run, the same for every tool' },
  out: { type: 'string', metavar: 'DIR', help: 'where the JSON and SVG go (default bench/results)' },
  markdown: { type: 'flag', help: 'print the tables as Markdown' },
  from: { type: 'string', metavar: 'FILE', help: 'measure nothing: print the tables of an earlier results JSON (with --markdown for docs)' },
  json: { type: 'flag', help: 'print the results JSON on stdout instead of the tables' },
  help: { type: 'flag', help: 'show this help' },
};

/**
 * @typedef {object} Row
 * @property {string} id
 * @property {'raw' | 'qcow2'} format
 * @property {string} pattern
 * @property {'read' | 'write' | 'randread' | 'randwrite'} rw
 * @property {number} bs
 * @property {number} qd
 * @property {'IOPS' | 'MB/s'} unit
 */

/** @typedef {import('./lib/peers.js').PeerMeasurement} Measurement */

/** @typedef {{ rep: number, m?: Measurement, error?: string }} Sample */

const TOOL_LABELS = /** @type {const} */ ({
  snapstack: 'snapstack',
  'qemu-img:threads': 'qemu-img threads',
  'qemu-img:io_uring': 'qemu-img io_uring',
  fio: 'fio',
  sync: 'fs sync loop',
});
/** @typedef {keyof typeof TOOL_LABELS} ToolId */
const TOOL_IDS = /** @type {ToolId[]} */ (Object.keys(TOOL_LABELS));
const PEERS = /** @type {ToolId[]} */ (TOOL_IDS.filter((t) => t !== 'snapstack'));

/** @param {number} seqDepth @returns {Row[]} */
function matrix(seqDepth) {
  /** @type {Array<Omit<Row, 'id' | 'format'>>} */
  const patterns = [
    { pattern: '4k-randread-qd1', rw: 'randread', bs: 4096, qd: 1, unit: 'IOPS' },
    { pattern: '4k-randread-qd32', rw: 'randread', bs: 4096, qd: 32, unit: 'IOPS' },
    { pattern: '4k-randwrite-qd1', rw: 'randwrite', bs: 4096, qd: 1, unit: 'IOPS' },
    { pattern: '4k-randwrite-qd32', rw: 'randwrite', bs: 4096, qd: 32, unit: 'IOPS' },
    { pattern: `64k-seqread-qd${seqDepth}`, rw: 'read', bs: 65536, qd: seqDepth, unit: 'MB/s' },
    { pattern: `64k-seqwrite-qd${seqDepth}`, rw: 'write', bs: 65536, qd: seqDepth, unit: 'MB/s' },
    { pattern: `1m-seqread-qd${seqDepth}`, rw: 'read', bs: 1 << 20, qd: seqDepth, unit: 'MB/s' },
    { pattern: `1m-seqwrite-qd${seqDepth}`, rw: 'write', bs: 1 << 20, qd: seqDepth, unit: 'MB/s' },
  ];
  /** @type {Row[]} */
  const rows = [];
  for (const p of patterns) for (const format of /** @type {const} */ (['raw', 'qcow2'])) rows.push({ id: `${format}/${p.pattern}`, format, ...p });
  return rows;
}

/** @param {number[]} xs */
function median(xs) {
  const s = [...xs].sort((a, b) => a - b);
  const n = s.length;
  if (n === 0) return NaN;
  return n % 2 === 1 ? /** @type {number} */ (s[(n - 1) / 2]) : (/** @type {number} */ (s[n / 2 - 1]) + /** @type {number} */ (s[n / 2])) / 2;
}

/** @param {number[]} xs */
function spread(xs) {
  return xs.length === 0 ? null : { min: Math.min(...xs), median: median(xs), max: Math.max(...xs), n: xs.length };
}

/** @param {number} v @param {'IOPS' | 'MB/s'} unit */
function fmtValue(v, unit) {
  if (!Number.isFinite(v)) return '';
  return unit === 'IOPS' ? Math.round(v).toLocaleString('en-US') : v >= 100 ? Math.round(v).toLocaleString('en-US') : v.toFixed(1);
}

/** @param {{ min: number, median: number, max: number } | null} r */
function fmtRatio(r) {
  if (r === null) return '';
  return `${r.median.toFixed(2)} (${r.min.toFixed(2)}-${r.max.toFixed(2)})`;
}

/** @param {number | null | undefined} v */
function fmtUs(v) {
  if (v === null || v === undefined || !Number.isFinite(v)) return '';
  return v >= 100 ? Math.round(v).toString() : v >= 10 ? v.toFixed(1) : v.toFixed(2);
}

/**
 * @typedef {object} ToolStats
 * @property {{ min: number, median: number, max: number, n: number } | null} value IOPS (4k rows) or MB/s (sequential rows) over the repetitions
 * @property {number} iops median
 * @property {number} mbps median
 * @property {number} cpuUsPerOp median
 * @property {{ p50: number, p99: number, p999: number } | null} latUs medians
 * @property {string[]} errors
 * @property {Sample[]} samples
 */

/**
 * @typedef {Row & { tools: Partial<Record<ToolId, ToolStats>>, ratios: Partial<Record<ToolId, { min: number, median: number, max: number, n: number } | null>> }} ResultRow
 */

/**
 * @typedef {object} ResultsDoc what bench/results/<timestamp>.json holds
 * @property {{ date: string, wallSec: number, machine: { cpu: string, cores: number, kernel: string, node: string, memGiB: number }, options: { runtime: number, reps: number, size: number, ramp: number, seqDepth: number, aio: string, iothreads: number, only: unknown, quick: boolean, tools: string[], busy?: number }, loadavg?: { before: number[], after: number[] }, tools: { 'qemu-img': import('./lib/peers.js').ToolInfo, 'qemu-img io_uring': import('./lib/peers.js').ToolInfo, fio: import('./lib/peers.js').ToolInfo & { ioengine: string | null, note: string } }, prepareSec: Record<string, number>, qcow2Check?: string | null, qemuStrideBlocks: number }} meta
 * @property {string[]} notes
 * @property {ResultRow[]} rows
 */

/** @param {ResultsDoc} doc @param {ToolId} t */
function toolLabel(doc, t) {
  return t === 'fio' ? `fio (${doc.meta.tools.fio.ioengine ?? 'missing'})` : TOOL_LABELS[t];
}

/** @param {ResultRow} r @param {ToolId} t whether the tool does not apply to the row (as opposed to missing) */
function notApplicable(r, t) {
  return (t === 'fio' && r.format !== 'raw') || (t === 'sync' && !(r.bs === 4096 && r.qd === 1));
}

/**
 * The bar chart of a results document.
 * @param {ResultsDoc} doc
 */
function renderSvg(doc) {
  const { machine, options } = doc.meta;
  const present = TOOL_IDS.filter((t) => doc.rows.some((r) => r.tools[t] !== undefined));
  return barChartSvg({
    title: `snapstack bench:compare, ${doc.meta.date.slice(0, 16).replace('T', ' ')} UTC`,
    subtitle: [
      `${machine.cores} x ${machine.cpu}, ${machine.kernel}, node ${machine.node}; ${formatSize(options.size)} images in the page cache; median of ${options.reps} x ${options.runtime} s, line = min..max`,
      `each group is scaled to its largest bar; 4k rows in IOPS, sequential rows (QD${options.seqDepth}) in MB/s; qemu-img 4k rows are strided, not random`,
    ],
    tools: present.map((t) => toolLabel(doc, t)),
    groups: doc.rows.map((r) => ({
      label: r.id,
      unit: r.unit,
      bars: present.flatMap((t) => {
        const v = r.tools[t]?.value;
        return v === undefined || v === null ? [] : [{ tool: toolLabel(doc, t), median: v.median, min: v.min, max: v.max }];
      }),
    })),
  });
}

/**
 * The tables and notes of a results document, as text or Markdown.
 * @param {ResultsDoc} doc @param {boolean} markdown
 */
function renderText(doc, markdown) {
  const { machine, options, tools } = doc.meta;
  const out = [];
  out.push(`# snapstack bench:compare  ${doc.meta.date}`);
  out.push(`# ${machine.cores} x ${machine.cpu}, ${machine.kernel}, node ${machine.node}, ${machine.memGiB} GiB RAM`);
  out.push(
    `# ${formatSize(options.size)} images in the page cache; ${options.reps} repetition(s) x ${options.runtime} s per measurement; ${tools['qemu-img'].available ? tools['qemu-img'].version : 'qemu-img: missing'}; ${tools.fio.available ? `${tools.fio.version} (${tools.fio.ioengine})` : 'fio: missing'}`,
  );
  const busy = options.busy ?? 0;
  if (busy > 0) out.push(`# busy host: ${busy} process(es) spinning on a core each for the whole run (--busy ${busy})`);
  if (doc.meta.loadavg !== undefined) out.push(`# load average (1/5/15 min) before the run: ${doc.meta.loadavg.before.map((x) => x.toFixed(2)).join(' ')}, after: ${doc.meta.loadavg.after.map((x) => x.toFixed(2)).join(' ')}`);
  out.push('');
  out.push(`Throughput, median of ${options.reps} (IOPS for 4k rows, MB/s = 10^6 B/s for sequential rows)`);
  out.push(
    renderTable(
      ['row', 'unit', ...TOOL_IDS.map((t) => toolLabel(doc, t))],
      doc.rows.map((r) => [r.id, r.unit, ...TOOL_IDS.map((t) => (notApplicable(r, t) ? 'n/a' : fmtValue(r.tools[t]?.value?.median ?? NaN, r.unit)))]),
      markdown,
      2,
    ),
  );
  out.push('');
  out.push('snapstack / peer: median (min-max) of the per-repetition ratios');
  out.push(
    renderTable(
      ['row', ...PEERS.map((t) => `/ ${toolLabel(doc, t)}`)],
      doc.rows.map((r) => [r.id, ...PEERS.map((t) => (notApplicable(r, t) ? 'n/a' : fmtRatio(r.ratios[t] ?? null)))]),
      markdown,
    ),
  );
  out.push('');
  out.push('Latency in us (median over repetitions of p50 / p99 / p99.9) and CPU time per request in us (user+system, whole process)');
  out.push(
    renderTable(
      ['row', 'snapstack p50/p99/p99.9', 'fio p50/p99/p99.9', ...TOOL_IDS.map((t) => `CPU ${t === 'fio' ? 'fio' : TOOL_LABELS[t]}`)],
      doc.rows.map((r) => {
        const lat = (/** @type {ToolId} */ t) => {
          const l = r.tools[t]?.latUs;
          return l === null || l === undefined ? '' : `${fmtUs(l.p50)} / ${fmtUs(l.p99)} / ${fmtUs(l.p999)}`;
        };
        return [r.id, lat('snapstack'), notApplicable(r, 'fio') ? 'n/a' : lat('fio'), ...TOOL_IDS.map((t) => (notApplicable(r, t) ? 'n/a' : fmtUs(r.tools[t]?.cpuUsPerOp)))];
      }),
      markdown,
    ),
  );
  out.push('');
  out.push('Notes');
  for (const n of doc.notes) out.push(`- ${n}`);
  const missing = [tools['qemu-img'], tools.fio].filter((t) => !t.available).map((t) => t.version);
  if (tools['qemu-img'].available && !tools['qemu-img io_uring'].available) missing.push(tools['qemu-img io_uring'].version);
  for (const m of missing) out.push(`- missing: ${m}`);
  if (doc.meta.qcow2Check !== undefined && doc.meta.qcow2Check !== null) out.push(`- the qcow2 image after the run (every tool wrote into it): ${doc.meta.qcow2Check}`);
  for (const r of doc.rows) for (const t of TOOL_IDS) for (const e of r.tools[t]?.errors ?? []) out.push(`- error: ${r.id} ${TOOL_LABELS[t]}: ${e.split('\n')[0]}`);
  return out.join('\n');
}

async function main() {
  const a = readCommandLine('bench/compare.js', 'npm run bench:compare', SPEC);
  if (a === null) return;
  if (a['from'] !== undefined) {
    const doc = /** @type {ResultsDoc} */ (JSON.parse(fs.readFileSync(String(a['from']), 'utf8')));
    process.stdout.write(`${renderText(doc, a['markdown'] === true)}\n`);
    return;
  }
  const quick = a['quick'] === true;
  const runtime = /** @type {number | undefined} */ (a['runtime']) ?? (quick ? 0.3 : 2);
  const reps = Math.max(1, Math.round(/** @type {number | undefined} */ (a['reps']) ?? (quick ? 1 : 3)));
  const size = /** @type {number | undefined} */ (a['size']) ?? (quick ? 64 * 2 ** 20 : 2 ** 30);
  const ramp = /** @type {number | undefined} */ (a['ramp']) ?? Math.min(0.5, runtime / 4);
  const seqDepth = Math.max(1, Math.round(/** @type {number} */ (a['seq-depth'])));
  const aio = /** @type {'threads' | 'sync'} */ (a['aio']);
  const iothreads = Math.round(/** @type {number} */ (a['iothreads']));
  const busyCount = /** @type {number} */ (a['busy']);
  const outDir = path.resolve(/** @type {string | undefined} */ (a['out']) ?? path.join(HERE, 'results'));
  const markdown = a['markdown'] === true;
  const wanted = new Set(String(a['tools']).split(',').map((s) => s.trim()).filter((s) => s !== ''));
  for (const t of wanted) if (!['snapstack', 'qemu-img', 'fio', 'sync'].includes(t)) return usageFail(`--tools: unknown tool '${t}'`);
  if (!(runtime > 0)) return usageFail('--runtime must be > 0');
  if (!Number.isSafeInteger(busyCount) || busyCount > 64) return usageFail('--busy must be a whole number of processes, 0..64');
  if (size % (1 << 20) !== 0) return usageFail('--size must be a whole number of MiB');
  /** @type {RegExp[]} */
  let only = [];
  try {
    only = a['only'] === undefined ? [] : String(a['only']).split(',').map((p) => new RegExp(p.trim()));
  } catch (e) {
    return usageFail(`--only: ${e instanceof Error ? e.message : String(e)}`);
  }
  const rows = matrix(seqDepth).filter((r) => only.length === 0 || only.some((re) => re.test(r.id)));
  if (rows.length === 0) return usageFail(`--only ${a['only']} matches no row (ids look like raw/4k-randread-qd1, qcow2/1m-seqwrite-qd${seqDepth})`);
  warnIfDistStale();

  const tty = process.stderr.isTTY === true;
  /** @param {string} s */
  const log = (s) => process.stderr.write(`${s}\n`);
  let statusWidth = 0;
  /** @param {string} s */
  const status = (s) => {
    if (!tty) return;
    process.stderr.write(`\r${s.padEnd(statusWidth)}`);
    statusWidth = s.length;
  };
  const clearStatus = () => {
    if (tty && statusWidth > 0) process.stderr.write(`\r${' '.repeat(statusWidth)}\r`);
    statusWidth = 0;
  };

  // --- tools -------------------------------------------------------------------------------
  const qemu = wanted.has('qemu-img') ? detectTool('qemu-img') : { available: false, version: 'qemu-img not requested (--tools)' };
  const fio = wanted.has('fio') ? detectTool('fio') : { available: false, version: 'fio not requested (--tools)' };
  if (!qemu.available) log(`note: ${qemu.version}`);
  if (!fio.available) log(`note: ${fio.version}`);

  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-compare-'));
  liveTempDirs.add(dir);
  for (const [sig, code] of /** @type {const} */ ([['SIGINT', 130], ['SIGTERM', 143]])) {
    process.once(sig, () => {
      removeTempDirs();
      process.exit(code); // the 'exit' hook of bench/lib/busy.js stops the spinners
    });
  }
  const files = { raw: path.join(dir, 'disk.raw'), qcow2: path.join(dir, 'disk.qcow2') };
  /** @type {import('./lib/busy.js').BusyLoad | null} */
  let busy = null;
  try {
    const needRaw = rows.some((r) => r.format === 'raw') || wanted.has('sync') || fio.available || qemu.available;
    const needQcow2 = rows.some((r) => r.format === 'qcow2');
    /** @type {Record<string, number>} */
    const prepSec = {};
    for (const [fmt, need] of /** @type {Array<['raw' | 'qcow2', boolean]>} */ ([
      ['raw', needRaw],
      ['qcow2', needQcow2],
    ])) {
      if (!need) continue;
      status(`writing the ${formatSize(size)} ${fmt} image...`);
      const t0 = performance.now();
      await prepareImage(fmt, files[fmt], size);
      prepSec[fmt] = (performance.now() - t0) / 1000;
    }
    clearStatus();

    const qemuIoUring = qemu.available ? probeQemuIoUring(files.raw) : { available: false, version: 'qemu-img missing' };
    if (qemu.available && !qemuIoUring.available) log(`note: ${qemuIoUring.version}; the qemu-img io_uring column is left empty`);
    const fioEngine = fio.available ? probeFioEngine(files.raw) : { ioengine: null, note: fio.version };
    if (fio.available && fioEngine.ioengine !== 'io_uring') log(`note: fio: ${fioEngine.note}`);

    /** @param {Row} row @returns {ToolId[]} the tools that apply to the row and are here */
    const toolsFor = (row) =>
      TOOL_IDS.filter((t) => {
        if (t === 'snapstack') return wanted.has('snapstack');
        if (t === 'qemu-img:threads') return qemu.available;
        if (t === 'qemu-img:io_uring') return qemu.available && qemuIoUring.available;
        if (t === 'fio') return fio.available && fioEngine.ioengine !== null && row.format === 'raw';
        return wanted.has('sync') && row.bs === 4096 && row.qd === 1;
      });

    /**
     * @param {Row} row @param {ToolId} tool
     * @returns {Promise<Measurement>}
     */
    const measure = async (row, tool) => {
      const write = row.rw === 'write' || row.rw === 'randwrite';
      const random = row.rw === 'randread' || row.rw === 'randwrite';
      switch (tool) {
        case 'snapstack': {
          const r = await runBenchmark({ driver: row.format, rw: row.rw, bs: row.bs, iodepth: row.qd, iothreads, aio, file: files[row.format], fullyWritten: true, runtime, ramp });
          return { iops: r.iops, mbps: r.mbps, ops: r.ops, elapsedSec: r.elapsedSec, cpuUsPerOp: r.cpu.usPerOp, latUs: { p50: r.latUs.p50, p99: r.latUs.p99, p999: r.latUs.p999 }, command: `bench/run.js --driver ${row.format} --rw ${row.rw} --bs ${row.bs} --iodepth ${row.qd} --iothreads ${iothreads} --aio ${aio} --file ${files[row.format]} --runtime ${runtime} --ramp ${ramp}` };
        }
        case 'qemu-img:threads':
        case 'qemu-img:io_uring':
          return qemuImgBenchTimed({ file: files[row.format], format: row.format, write, random, bs: row.bs, iodepth: row.qd, size, aio: tool === 'qemu-img:threads' ? 'threads' : 'io_uring' }, runtime);
        case 'fio':
          return fioRun({ file: files.raw, rw: row.rw, bs: row.bs, iodepth: row.qd, size, ioengine: /** @type {string} */ (fioEngine.ioengine), runtime, ramp: 0 });
        case 'sync':
          return syncLoop({ file: files.raw, write, bs: row.bs, size, runtime, ramp });
      }
    };

    // --- the busy host: spinners from before the warm-up to after the last measurement --------
    const loadBefore = os.loadavg();
    if (busyCount > 0) status(`starting ${busyCount} busy process(es)...`);
    busy = await startBusy(busyCount);
    if (busyCount > 0) log(`busy host: ${busyCount} spinning process(es), pid ${busy.pids.join(', ')}`);

    // --- warm-up: start snapstack's workers and let the JIT settle before anything is timed --
    if (wanted.has('snapstack')) {
      const warm = /** @type {Row} */ (rows[0]);
      status(`warm-up: snapstack ${warm.id}...`);
      try {
        await runBenchmark({ driver: warm.format, rw: warm.rw, bs: warm.bs, iodepth: warm.qd, iothreads, aio, file: files[warm.format], fullyWritten: true, runtime: Math.min(1, runtime) });
      } catch (e) {
        clearStatus();
        log(`warm-up failed: ${e instanceof Error ? e.message : String(e)}`);
      }
    }

    // --- the runs: repetitions x rows x tools, the tool order rotated ----------------------
    /** @type {Map<string, Map<ToolId, Sample[]>>} */
    const samples = new Map(rows.map((r) => [r.id, new Map()]));
    const totalSteps = reps * rows.reduce((n, r) => n + toolsFor(r).length, 0);
    let step = 0;
    const t0 = Date.now();
    const startedAt = new Date();
    for (let rep = 0; rep < reps; rep++) {
      if (!tty) log(`repetition ${rep + 1}/${reps}...`);
      for (const [ri, row] of rows.entries()) {
        const tools = toolsFor(row);
        const k = tools.length === 0 ? 0 : (rep + ri) % tools.length;
        const order = [...tools.slice(k), ...tools.slice(0, k)];
        for (const tool of order) {
          step++;
          status(`[${step}/${totalSteps}] rep ${rep + 1}/${reps} ${row.id} ${TOOL_LABELS[tool]}`);
          const list = /** @type {Map<ToolId, Sample[]>} */ (samples.get(row.id));
          const s = list.get(tool) ?? [];
          list.set(tool, s);
          try {
            s.push({ rep, m: await measure(row, tool) });
          } catch (e) {
            const msg = e instanceof Error ? e.message : String(e);
            s.push({ rep, error: msg });
            clearStatus();
            log(`error: ${row.id} ${TOOL_LABELS[tool]}: ${msg.split('\n')[0]}`);
          }
        }
      }
    }
    clearStatus();
    const wallSec = (Date.now() - t0) / 1000;
    const loadAfter = os.loadavg();
    busy.stop();

    // every tool wrote into the same qcow2 image: check that it is still consistent
    /** @type {string | null} */
    let qcow2Check = null;
    if (needQcow2) {
      status('checking the qcow2 image...');
      if (qemu.available) {
        const r = spawnSync('qemu-img', ['check', '-f', 'qcow2', files.qcow2], { encoding: 'utf8' });
        qcow2Check = `qemu-img check: exit ${r.status}: ${(r.stdout || r.stderr).trim().split('\n')[0]}`;
      } else {
        const r = await checkQcow2File(files.qcow2, { leaks: false, errors: false });
        qcow2Check = `snapstack check: ${r.corruptions} corruptions, ${r.leaks} leaks`;
      }
      clearStatus();
      if (!/exit 0:|: 0 corruptions, 0 leaks/.test(qcow2Check)) log(`warning: the qcow2 image is not clean after the run: ${qcow2Check}`);
    }

    // --- statistics --------------------------------------------------------------------------
    /** @param {Row} row @param {Measurement} m */
    const value = (row, m) => (row.unit === 'IOPS' ? m.iops : m.mbps);
    /** @type {ResultRow[]} */
    const results = rows.map((row) => {
      const list = /** @type {Map<ToolId, Sample[]>} */ (samples.get(row.id));
      /** @type {ResultRow['tools']} */
      const tools = {};
      /** @type {ResultRow['ratios']} */
      const ratios = {};
      for (const t of TOOL_IDS) {
        const ss = list.get(t);
        if (ss === undefined) continue;
        const ok = ss.flatMap((s) => (s.m === undefined ? [] : [s.m]));
        const lat = ok.flatMap((m) => (m.latUs === null ? [] : [m.latUs]));
        tools[t] = {
          value: spread(ok.map((m) => value(row, m))),
          iops: median(ok.map((m) => m.iops)),
          mbps: median(ok.map((m) => m.mbps)),
          cpuUsPerOp: median(ok.flatMap((m) => (m.cpuUsPerOp === null ? [] : [m.cpuUsPerOp]))),
          latUs: lat.length === 0 ? null : { p50: median(lat.map((l) => l.p50)), p99: median(lat.map((l) => l.p99)), p999: median(lat.map((l) => l.p999)) },
          errors: ss.flatMap((s) => (s.error === undefined ? [] : [s.error])),
          samples: ss,
        };
      }
      const own = list.get('snapstack') ?? [];
      for (const peer of PEERS) {
        const theirs = list.get(peer);
        if (theirs === undefined) continue;
        /** @type {number[]} */
        const rs = [];
        for (const s of own) {
          const o = theirs.find((x) => x.rep === s.rep);
          if (s.m !== undefined && o?.m !== undefined) rs.push(value(row, s.m) / value(row, o.m));
        }
        ratios[peer] = spread(rs);
      }
      return { ...row, tools, ratios };
    });

    // --- report ------------------------------------------------------------------------------
    const cpu = os.cpus()[0]?.model.trim() ?? 'unknown CPU';
    const machine = { cpu, cores: os.cpus().length, kernel: `${os.type()} ${os.release()}`, node: process.version, memGiB: Math.round(os.totalmem() / 2 ** 30) };
    const stride = qemuStrideBlocks(size, 4096);
    const notes = [
      `All tools go through the page cache on the same files: snapstack's file node does buffered pread/pwrite; qemu-img bench -t writeback; fio --direct=0. The images (${formatSize(size)}) were written in full first, so every read hits allocated data.`,
      `Sequential rows run at queue depth ${seqDepth} for every tool.`,
      `qemu-img bench (7.2) has no random mode: its 4k rows use -S ${stride * 4096} (a stride of ${stride} blocks, a prime near 0.618 x the block count): each request is the previous offset plus the stride modulo the image size, so it visits every block once per cycle in a scattered order. snapstack, fio and the sync loop use uniform random offsets.`,
      'qemu-img bench takes a request count, not a time: the count is set from its previous rate (first from short calibration runs) to last about the runtime; its own timer covers the requests only. Its CPU per request comes from the process CPU time (/proc cutime+cstime through sh), start-up and image open included.',
      `fio runs on the raw file only (--ioengine=${fioEngine.ioengine ?? '-'} --iodepth=QD --direct=0 --norandommap --invalidate=0, no ramp: it has no JIT to warm); its latency is lat (submission to completion, --lat_percentiles=1), as snapstack's. Its CPU per request is the whole process tree's CPU time (as for qemu-img): fio's own usr/sys figures miss the io_uring kernel workers that do buffered writes (they are kept in the JSON as fioCpuUsPerOp).`,
      `fs sync loop: a bare fs.readSync / fs.writeSync loop at QD1, uniform random 4 KiB offsets, on the raw file, in this process, nothing timed per request: the limit for one request at a time from Node. The qcow2 4k QD1 rows are compared with the same raw-file loop.`,
      `snapstack: in this process (bench/lib/engine.js), aio=${aio}, ${iothreads === 0 ? 'the default pool' : `${iothreads} IOThread(s)`}, SharedArrayBuffer buffers, ${ramp} s warm-up not counted; latency is from the call to the settled promise (queueing included); CPU per request is process.cpuUsage() (all threads) / requests.`,
      ...(busyCount > 0
        ? [`Busy host (--busy ${busyCount}): ${busyCount} child process(es) each spin on a core (bench/lib/busy.js) from before the warm-up to after the last measurement, the same for every tool; on this ${os.cpus().length}-core machine that leaves ${Math.max(0, os.cpus().length - busyCount)} core(s) to the tool measured.`]
        : []),
      `Ratios are snapstack / peer per repetition (the tools of a row run back to back, their order rotated each repetition); shown as median (min-max) over ${reps} repetition(s).`,
    ];
    const date = startedAt.toISOString();
    /** @type {ResultsDoc} */
    const doc = {
      meta: {
        date,
        wallSec,
        machine,
        options: { runtime, reps, size, ramp, seqDepth, aio, iothreads, only: a['only'] ?? null, quick, tools: [...wanted], busy: busyCount },
        loadavg: { before: loadBefore, after: loadAfter },
        tools: {
          'qemu-img': qemu,
          'qemu-img io_uring': qemuIoUring,
          fio: { ...fio, ioengine: fioEngine.ioengine, note: fioEngine.note },
        },
        prepareSec: prepSec,
        qcow2Check,
        qemuStrideBlocks: stride,
      },
      notes,
      rows: results,
    };
    fs.mkdirSync(outDir, { recursive: true });
    const stamp = date.replace(/[:.]/g, '-');
    const jsonPath = path.join(outDir, `${stamp}.json`);
    const svgPath = path.join(outDir, `${stamp}.svg`);
    fs.writeFileSync(jsonPath, `${JSON.stringify(doc, null, 2)}\n`);

    fs.writeFileSync(svgPath, renderSvg(doc));
    if (a['json'] === true) process.stdout.write(`${JSON.stringify(doc, null, 2)}\n`);
    else process.stdout.write(`${renderText(doc, markdown)}\nwrote ${path.relative(process.cwd(), jsonPath)} and ${path.relative(process.cwd(), svgPath)} (${Math.round(wallSec)} s)\n`);
  } finally {
    busy?.stop();
    await withBql((bql) => shutdownIOThreads(bql));
    fs.rmSync(dir, { recursive: true, force: true });
    liveTempDirs.delete(dir);
  }
}

/** @param {string} msg */
function usageFail(msg) {
  failUsage('bench/compare.js', 'npm run bench:compare', SPEC, msg);
}

await main();

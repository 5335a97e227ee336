// @ts-check
/**
 * Snapshot cost benchmark (issue 3): snapshot create, goto and delete on qcow2 images of 1 GiB and
 * 64 GiB virtual size with 1 GiB written, through snapstack (library calls, and the `snapstack img
 * snapshot` process) and through `qemu-img snapshot` on the same file, alternating, several rounds.
 * The point: the time must follow the allocated metadata, not the virtual size.
 *
 *   npm run build && node bench/snapshot-compare.js [--rounds 3] [--written 1G] [--sizes 1G,64G:packed,64G] [--json]
 *
 * A size with `:packed` writes the data at the start of the disk (the same metadata as a 1 GiB
 * image); without it the written megabytes are spread over the whole virtual size (one L2 table
 * per 512 MiB of disk, so more metadata).
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { openImage, parseSize, shutdownIOThreads, withBql, withBqlSync } from '../dist/index.js';
import { createQcow2File } from '../dist/drivers/qcow2/create.js';

/** @param {string} name @param {string} fallback */
function arg(name, fallback) {
  const i = process.argv.indexOf(name);
  return i >= 0 && process.argv[i + 1] !== undefined ? /** @type {string} */ (process.argv[i + 1]) : fallback;
}
const rounds = Number(arg('--rounds', '3'));
const written = parseSize(arg('--written', '1G'));
const sizes = arg('--sizes', '1G,64G:packed,64G').split(',').map((s) => ({ size: parseSize(s.replace(/:packed$/, '')), packed: s.endsWith(':packed') }));
const asJson = process.argv.includes('--json');
const cli = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'bin', 'snapstack.js');
const hasQemu = spawnSync('qemu-img', ['--version'], { stdio: 'ignore' }).status === 0;

/** @param {number[]} xs */
function median(xs) {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)] ?? NaN;
}

/** @param {string} cmd @param {string[]} args */
function timeProcess(cmd, args) {
  const t0 = process.hrtime.bigint();
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  const ms = Number(process.hrtime.bigint() - t0) / 1e6;
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed: ${r.stderr}`);
  return ms;
}

/** @param {() => Promise<unknown>} fn */
async function timeAsync(fn) {
  const t0 = process.hrtime.bigint();
  await fn();
  return Number(process.hrtime.bigint() - t0) / 1e6;
}

/** @param {number} size @param {boolean} packed */
async function prepare(size, packed) {
  const f = path.join(os.tmpdir(), `snapstack-snapbench-${size}.qcow2`);
  withBqlSync((bql) => createQcow2File(bql, f, { sizeBytes: size }));
  const img = await openImage(f, { format: 'qcow2' });
  const chunk = new Uint8Array(1 << 20);
  for (let i = 0; i < chunk.length; i++) chunk[i] = (i * 131) & 0xff;
  // spread the written data over the whole virtual size so that metadata covers all of it
  const stride = packed ? chunk.length : Math.max(chunk.length, Math.floor(size / (written / chunk.length) / chunk.length) * chunk.length);
  const t = await timeAsync(async () => {
    for (let n = 0, off = 0; n < written / chunk.length && off < size; n++, off += stride) await img.write(off, chunk);
    await img.flush();
  });
  await img.close();
  return { f, writeMBs: written / 1e6 / (t / 1e3) };
}

const ops = ['create', 'goto', 'delete'];
/** @type {Record<string, Record<string, Record<string, number[]>>>} */
const results = {};
for (const { size, packed } of sizes) {
  const { f, writeMBs } = await prepare(size, packed);
  const label = `${size / 2 ** 30} GiB${packed ? ' packed' : ''}`;
  /** @type {Record<string, Record<string, number[]>>} */
  const r = { 'snapstack (library)': {}, 'snapstack img (process)': {}, 'qemu-img snapshot': {} };
  for (const tool of Object.values(r)) for (const op of ops) tool[op] = [];
  for (let round = 0; round < rounds; round++) {
    const lib = r['snapstack (library)'];
    const img = await openImage(f, { format: 'qcow2' });
    lib?.create?.push(await timeAsync(() => img.createSnapshot('bench')));
    lib?.goto?.push(await timeAsync(() => img.gotoSnapshot('bench')));
    lib?.delete?.push(await timeAsync(() => img.deleteSnapshot('bench')));
    await img.close();
    const proc = r['snapstack img (process)'];
    proc?.create?.push(timeProcess(process.execPath, [cli, 'img', 'snapshot', '-c', 'bench', f]));
    proc?.goto?.push(timeProcess(process.execPath, [cli, 'img', 'snapshot', '-a', 'bench', f]));
    proc?.delete?.push(timeProcess(process.execPath, [cli, 'img', 'snapshot', '-d', 'bench', f]));
    if (hasQemu) {
      const q = r['qemu-img snapshot'];
      q?.create?.push(timeProcess('qemu-img', ['snapshot', '-c', 'bench', f]));
      q?.goto?.push(timeProcess('qemu-img', ['snapshot', '-a', 'bench', f]));
      q?.delete?.push(timeProcess('qemu-img', ['snapshot', '-d', 'bench', f]));
    }
  }
  if (hasQemu) {
    const chk = spawnSync('qemu-img', ['check', f], { encoding: 'utf8' });
    if (chk.status !== 0) throw new Error(`qemu-img check failed after the benchmark:\n${chk.stdout}${chk.stderr}`);
  }
  results[label] = r;
  if (!asJson) console.log(`${label} virtual, ${written / 2 ** 30} GiB written (${writeMBs.toFixed(0)} MB/s through snapstack qcow2):`);
  fs.rmSync(f, { force: true });
}
await withBql((bql) => shutdownIOThreads(bql));

if (asJson) console.log(JSON.stringify(results, null, 2));
else {
  console.log(`\nmedian of ${rounds} rounds, milliseconds${hasQemu ? '' : ' (qemu-img not found: its column is empty)'}`);
  console.log(`${'image'.padEnd(15)}${'op'.padEnd(8)}${'snapstack lib'.padStart(14)}${'snapstack img'.padStart(14)}${'qemu-img'.padStart(10)}${'lib/qemu'.padStart(10)}${'img/qemu'.padStart(10)}`);
  for (const [label, r] of Object.entries(results)) {
    for (const op of ops) {
      const lib = median(r['snapstack (library)']?.[op] ?? []);
      const proc = median(r['snapstack img (process)']?.[op] ?? []);
      const q = median(r['qemu-img snapshot']?.[op] ?? []);
      const ratio = Number.isFinite(q) ? (proc / q).toFixed(2) : '';
      const libRatio = Number.isFinite(q) ? (lib / q).toFixed(2) : '';
      console.log(`${label.padEnd(15)}${op.padEnd(8)}${lib.toFixed(1).padStart(14)}${proc.toFixed(1).padStart(14)}${(Number.isFinite(q) ? q.toFixed(1) : '').padStart(10)}${libRatio.padStart(10)}${ratio.padStart(10)}`);
    }
  }
}

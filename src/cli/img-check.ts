/**
 * `snapstack img check [-f FMT] [-r leaks|all] [--output=human|json] FILENAME`, as qemu-img check:
 * the same messages and exit codes (0 clean, 1 check failed, 2 corruptions, 3 leaks only,
 * 63 format without checks). Without -r the image is opened read-only and never written.
 */
import fs from 'node:fs';
import { withBql } from '../block/bql.js';
import { BlockError } from '../block/errors.js';
import { closeNode, openNode } from '../block/graph.js';
import { QCOW_MAGIC } from '../drivers/qcow2/constants.js';
import { checkQcow2, type Qcow2CheckResult } from '../drivers/qcow2/check.js';
import { loadQcow2State } from '../drivers/qcow2/open.js';
import '../drivers/index.js';
import { takeFlag, takeOutputJson, refuseUnknownOptions } from './args.js';
import { describeError } from './format.js';
import type { Out } from './img.js';

const USAGE = 'usage: snapstack img check [-f FMT] [-r leaks|all] [--output=human|json] FILENAME';

function isQcow2(file: string): boolean {
  const fd = fs.openSync(file, 'r');
  try {
    const b = Buffer.alloc(4);
    return fs.readSync(fd, b, 0, 4, 0) === 4 && b.readUInt32BE(0) === QCOW_MAGIC;
  } finally {
    fs.closeSync(fd);
  }
}

function printHuman(r: Qcow2CheckResult, out: Out): void {
  if (r.corruptionsFixed > 0 || r.leaksFixed > 0) {
    out(`The following inconsistencies were found and repaired:\n\n    ${r.leaksFixed} leaked clusters\n    ${r.corruptionsFixed} corruptions\n`);
    out('Double checking the fixed image now...');
  }
  if (r.corruptions === 0 && r.leaks === 0 && r.checkErrors === 0) out('No errors were found on the image.');
  if (r.corruptions > 0) out(`\n${r.corruptions} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.`);
  if (r.leaks > 0) out(`\n${r.leaks} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.`);
  if (r.checkErrors > 0) out(`\n${r.checkErrors} internal errors have occurred during the check.`);
  if (r.totalClusters !== 0 && r.allocatedClusters !== 0) {
    const pct = (a: number, b: number): string => ((a * 100) / b).toFixed(2);
    out(
      `${r.allocatedClusters}/${r.totalClusters} = ${pct(r.allocatedClusters, r.totalClusters)}% allocated, ${pct(r.fragmentedClusters, r.allocatedClusters)}% fragmented, ${pct(r.compressedClusters, r.allocatedClusters)}% compressed clusters`,
    );
  }
  if (r.imageEndOffset > 0) out(`Image end offset: ${r.imageEndOffset}`);
}

function toJson(r: Qcow2CheckResult, file: string): Record<string, unknown> {
  const o: Record<string, unknown> = { filename: file, format: 'qcow2', 'check-errors': r.checkErrors };
  if (r.imageEndOffset > 0) o['image-end-offset'] = r.imageEndOffset;
  if (r.corruptions > 0) o['corruptions'] = r.corruptions;
  if (r.leaks > 0) o['leaks'] = r.leaks;
  if (r.corruptionsFixed > 0) o['corruptions-fixed'] = r.corruptionsFixed;
  if (r.leaksFixed > 0) o['leaks-fixed'] = r.leaksFixed;
  if (r.totalClusters > 0) {
    o['total-clusters'] = r.totalClusters;
    o['allocated-clusters'] = r.allocatedClusters;
    o['fragmented-clusters'] = r.fragmentedClusters;
    o['compressed-clusters'] = r.compressedClusters;
  }
  return o;
}

/**
 * Checks (and on request repairs) the qcow2 file `file`; the result's counts decide the exit code.
 * Opens the file's protocol node itself: read-only unless a repair was asked for.
 */
export async function checkQcow2File(file: string, repair: { leaks: boolean; errors: boolean }): Promise<Qcow2CheckResult> {
  const writable = repair.leaks || repair.errors;
  return withBql(async (bql) => {
    const node = await openNode(bql, { driver: 'file', filename: file, 'read-only': writable ? 'off' : 'on' });
    try {
      const state = await loadQcow2State(node, node, 4 * 1024 * 1024, { refuseOverlaps: false });
      return await checkQcow2(state, repair);
    } finally {
      await closeNode(bql, node);
    }
  });
}

/** Runs `img check`; returns qemu-img's exit code. */
export async function imgCheck(args: string[], out: Out, err: Out): Promise<number> {
  const fmt = takeFlag(args, '-f');
  const r = takeFlag(args, '-r');
  const json = takeOutputJson(args);
  refuseUnknownOptions(args, USAGE);
  const [file] = args;
  if (file === undefined || args.length !== 1) throw new BlockError('EINVAL', `Expecting one image file name\n${USAGE}`);
  if (r !== undefined && r !== 'leaks' && r !== 'all') throw new BlockError('EINVAL', `Unknown option value for -r (expecting 'leaks' or 'all'): ${r}`, { field: '-r', value: r });
  if (!fs.existsSync(file)) throw new BlockError('ENOENT', `Could not open '${file}': No such file or directory`, { file });
  if ((fmt !== undefined && fmt !== 'qcow2') || !isQcow2(file)) {
    err('snapstack img: This image format does not support checks');
    return 63;
  }
  let res: Qcow2CheckResult;
  try {
    res = await checkQcow2File(file, { leaks: r !== undefined, errors: r === 'all' });
  } catch (e) {
    err(`snapstack img: Check failed: ${describeError(e)}`);
    return 1;
  }
  for (const m of res.messages) err(m);
  if (json) out(JSON.stringify(toJson(res, file), null, 4));
  else printHuman(res, out);
  if (res.checkErrors > 0) return 1;
  if (res.corruptions > 0) return 2;
  if (res.leaks > 0) return 3;
  return 0;
}

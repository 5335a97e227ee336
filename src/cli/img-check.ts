/**
 * `snapstack img check [-f FMT] [-r leaks|all] [--output=human|json] FILENAME`, as qemu-img check:
 * the same messages and exit codes (0 clean, 1 check failed, 2 corruptions, 3 leaks only,
 * 63 format without checks). Without -r the image is opened read-only and never written.
 */
import fs from 'node:fs';
import { withBql, type Bql } from '../block/bql.js';
import { bdrvCanCheck, bdrvCheck, type CheckFix, type CheckResult } from '../block/check.js';
import { withDrained } from '../block/drain.js';
import { findProtocolDriver, probingDrivers } from '../block/driver.js';
import { BlockError, isBlockError } from '../block/errors.js';
import { closeNode, openNode } from '../block/graph.js';
import type { BlockNode } from '../block/node.js';
import type { NodeOptions } from '../block/options.js';
import '../drivers/index.js';
import { openImage } from '../image.js';
import { takeFlag, takeForceShare, takeOutputJson, refuseUnknownOptions } from './args.js';
import { describeError } from '../commands/format.js';
import type { Out } from './img-usage.js';

const USAGE = 'usage: snapstack img check [-f FMT] [-U] [-r leaks|all] [--output=human|json] FILENAME';

/** The `op` of an error that the open of the image to check gave. */
const OPEN_OP = 'check-open';

/** Formats whose driver takes `x-check=on` (QEMU's BDRV_O_CHECK: open what a check must report). */
const CHECK_MODE_FORMATS = new Set(['qcow2']);

/** The format the first bytes `head` show (raw when no driver claims them), as the block layer probes. */
function probeHead(head: Uint8Array, file: string): string {
  let best = 'raw';
  let bestScore = 0;
  for (const drv of probingDrivers()) {
    const score = drv.probe?.(head, file) ?? 0;
    if (score > bestScore) {
      best = drv.formatName;
      bestScore = score;
    }
  }
  return best;
}

/** The format of the host file or the protocol's image (an NBD export) `file`, probed from its first bytes. */
async function probeFormatName(file: string): Promise<string> {
  const head = new Uint8Array(2048);
  if (findProtocolDriver(file) !== null) {
    const img = await openImage(file, { format: 'raw', readOnly: true });
    try {
      const n = Math.min(head.length, img.size);
      await img.read(0, n, head.subarray(0, n));
      return probeHead(head.subarray(0, n), file);
    } finally {
      await img.close();
    }
  }
  const fd = fs.openSync(file, 'r');
  try {
    const n = fs.readSync(fd, head, 0, head.length, 0);
    return probeHead(head.subarray(0, n), file);
  } finally {
    fs.closeSync(fd);
  }
}

/** Opens the image for a check through the block layer: read-only unless a repair was asked for. */
async function openForCheck(bql: Bql, file: string, format: string, writable: boolean, forceShare: boolean): Promise<BlockNode> {
  const protocol = findProtocolDriver(file);
  const opts: NodeOptions =
    protocol === null
      ? { driver: format, 'file.driver': 'file', 'file.filename': file, 'file.aio': 'sync', 'read-only': writable ? 'off' : 'on' }
      : { driver: format, 'file.driver': protocol.formatName, 'file.filename': file, 'read-only': writable ? 'off' : 'on' };
  if (forceShare) opts['file.force-share'] = 'on';
  if (CHECK_MODE_FORMATS.has(format)) opts['x-check'] = 'on';
  return openNode(bql, opts);
}

/**
 * `%0.2f` as C's printf writes it: like toFixed(2), except that an exact tie rounds to even
 * (3.125 prints 3.12, where toFixed says 3.13).
 */
function printf2(v: number): string {
  const x = v * 100;
  const floor = Math.floor(x);
  if (x - floor !== 0.5) return v.toFixed(2);
  return ((floor % 2 === 0 ? floor : floor + 1) / 100).toFixed(2);
}

function printHuman(r: CheckResult, out: Out): void {
  if (r.corruptionsFixed > 0 || r.leaksFixed > 0) {
    out(`The following inconsistencies were found and repaired:\n\n    ${r.leaksFixed} leaked clusters\n    ${r.corruptionsFixed} corruptions\n`);
    out('Double checking the fixed image now...');
  }
  if (r.corruptions === 0 && r.leaks === 0 && r.checkErrors === 0) out('No errors were found on the image.');
  if (r.corruptions > 0) out(`\n${r.corruptions} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.`);
  if (r.leaks > 0) out(`\n${r.leaks} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.`);
  if (r.checkErrors > 0) out(`\n${r.checkErrors} internal errors have occurred during the check.`);
  if (r.totalClusters !== 0 && r.allocatedClusters !== 0) {
    const pct = (a: number, b: number): string => printf2((a * 100) / b);
    out(
      `${r.allocatedClusters}/${r.totalClusters} = ${pct(r.allocatedClusters, r.totalClusters)}% allocated, ${pct(r.fragmentedClusters, r.allocatedClusters)}% fragmented, ${pct(r.compressedClusters, r.allocatedClusters)}% compressed clusters`,
    );
  }
  if (r.imageEndOffset > 0) out(`Image end offset: ${r.imageEndOffset}`);
}

function toJson(r: CheckResult, file: string, format: string): Record<string, unknown> {
  const o: Record<string, unknown> = { filename: file, format, 'check-errors': r.checkErrors };
  if (r.imageEndOffset > 0) o['image-end-offset'] = r.imageEndOffset;
  if (r.corruptions > 0) o['corruptions'] = r.corruptions;
  if (r.leaks > 0) o['leaks'] = r.leaks;
  if (r.corruptionsFixed > 0) o['corruptions-fixed'] = r.corruptionsFixed;
  if (r.leaksFixed > 0) o['leaks-fixed'] = r.leaksFixed;
  // qemu-img leaves each allocation figure out when it is 0
  if (r.totalClusters > 0) o['total-clusters'] = r.totalClusters;
  if (r.allocatedClusters > 0) o['allocated-clusters'] = r.allocatedClusters;
  if (r.fragmentedClusters > 0) o['fragmented-clusters'] = r.fragmentedClusters;
  if (r.compressedClusters > 0) o['compressed-clusters'] = r.compressedClusters;
  return o;
}

/**
 * Checks (and on request repairs) the image `file` through its driver's check callback; null when
 * its format has no check (qemu-img's exit code 63).
 */
export async function checkImageFile(file: string, format: string, fix: CheckFix, forceShare = false): Promise<CheckResult | null> {
  const writable = fix.leaks || fix.errors;
  return withBql(async (bql) => {
    let node: BlockNode;
    try {
      node = await openForCheck(bql, file, format, writable, forceShare);
    } catch (e) {
      // qemu-img says "Could not open 'F': ..." for these, not "Check failed"
      if (!isBlockError(e)) throw e;
      throw new BlockError(e.code, e.message, { op: OPEN_OP, file, cause: e, ...(e.node === undefined ? {} : { node: e.node }), ...(e.field === undefined ? {} : { field: e.field }) });
    }
    try {
      if (!bdrvCanCheck(bql, node)) return null;
      return await withDrained(bql, node, (drained) => bdrvCheck(bql, drained, node, fix));
    } finally {
      await closeNode(bql, node);
    }
  });
}

/**
 * Checks (and on request repairs) the qcow2 file `file` (the library's entry point, kept for its
 * callers); ENOTSUP when the file is not qcow2.
 */
export async function checkQcow2File(file: string, repair: CheckFix): Promise<CheckResult> {
  const res = await checkImageFile(file, 'qcow2', repair);
  if (res === null) throw new BlockError('ENOTSUP', `'${file}': this image format does not support checks`, { file, op: 'check' });
  if (res.failure !== null) throw res.failure;
  return res;
}

/** Runs `img check`; returns qemu-img's exit code. */
export async function imgCheck(args: string[], out: Out, err: Out): Promise<number> {
  const fmt = takeFlag(args, '-f');
  const r = takeFlag(args, '-r');
  const forceShare = takeForceShare(args);
  const json = takeOutputJson(args);
  refuseUnknownOptions(args, USAGE);
  const [file] = args;
  if (file === undefined || args.length !== 1) throw new BlockError('EINVAL', `Expecting one image file name\n${USAGE}`);
  if (r !== undefined && r !== 'leaks' && r !== 'all') throw new BlockError('EINVAL', `Unknown option value for -r (expecting 'leaks' or 'all'): ${r}`, { field: '-r', value: r });
  // a protocol's file name (nbd://, nbd+unix://) names no host file: its driver says whether it opens
  if (findProtocolDriver(file) === null && !fs.existsSync(file)) throw new BlockError('ENOENT', `Could not open '${file}': No such file or directory`, { file });
  const format = fmt ?? (await probeFormatName(file));
  let res: CheckResult | null;
  try {
    res = await checkImageFile(file, format, { leaks: r !== undefined, errors: r === 'all' }, forceShare);
  } catch (e) {
    if (isBlockError(e) && e.op === OPEN_OP) err(`snapstack img: Could not open '${file}': ${e.message}`);
    else err(`snapstack img: Check failed: ${describeError(e)}`);
    return 1;
  }
  if (res === null) {
    err('snapstack img: This image format does not support checks');
    return 63;
  }
  for (const m of res.messages) err(m);
  if (res.failure !== null) {
    err(`snapstack img: Check failed: ${describeError(res.failure)}`);
    return 1;
  }
  if (json) out(JSON.stringify(toJson(res, file, format), null, 4));
  else printHuman(res, out);
  if (res.checkErrors > 0) {
    err('snapstack img: Check failed');
    return 1;
  }
  if (res.corruptions > 0) return 2;
  if (res.leaks > 0) return 3;
  return 0;
}

/**
 * `snapstack img info`: qemu-img info's human and JSON output, and `--backing-chain` (every image
 * of the chain, top first). Without it, as qemu-img, the backing file is named but not opened.
 */
import fs from 'node:fs';
import { resolveBackingFilename } from '../block/backing.js';
import { withBql } from '../block/bql.js';
import { BlockError } from '../block/errors.js';
import { bdrvGetLength } from '../block/io.js';
import type { BlockNode } from '../block/node.js';
import { bdrvSnapshotList } from '../block/snapshot.js';
import type { SnapshotInfo } from '../block/driver.js';
import { openImage } from '../image.js';
import { takeFlag, takeForceShare, takeOutputJson, takeSwitch } from './args.js';
import { displayName, isJsonFilename, jsonFilenameOptions, optionString } from './json-filename.js';
import { sizeToStr } from '../commands/format.js';
import type { Out } from './img-usage.js';
import { IMG_USAGE as USAGE } from './img-usage.js';
import { snapshotHeader, snapshotJson, snapshotRow } from '../commands/snapshot-format.js';

/** What qemu-img info reports of one image. */
interface ImageReport {
  filename: string;
  format: string;
  virtualSize: number;
  actualSize: number | null;
  clusterSize: number | undefined;
  backing: { name: string; full: string; format: string | null } | null;
  snapshots: SnapshotInfo[];
  specific: Record<string, unknown> | undefined;
}

async function report(node: BlockNode, filename: string): Promise<ImageReport> {
  const inst = node.drv;
  const named = inst.backingFile?.() ?? null;
  let actualSize: number | null = null;
  try {
    actualSize = fs.statSync(node.filename).blocks * 512;
  } catch {
    actualSize = null; // not a host file (a memory node)
  }
  const snapshots = inst.snapshotList !== undefined ? await withBql((bql) => bdrvSnapshotList(bql, node)) : [];
  return {
    filename,
    format: node.driver.formatName,
    virtualSize: bdrvGetLength(node),
    actualSize,
    clusterSize: inst.clusterSize?.(),
    backing: named === null ? null : { name: named.filename, full: resolveBackingFilename(node.filename, named.filename, node.nodeName), format: named.format },
    snapshots,
    specific: inst.formatSpecific?.(),
  };
}

function formatSpecificLines(data: Record<string, unknown>, out: Out): void {
  out('Format specific information:');
  for (const [k, v] of Object.entries(data)) out(`    ${k.replace(/-/g, ' ')}: ${String(v)}`);
}

function humanLines(r: ImageReport, out: Out): void {
  out(`image: ${r.filename}`);
  out(`file format: ${r.format}`);
  out(`virtual size: ${sizeToStr(r.virtualSize)} (${r.virtualSize} bytes)`);
  out(`disk size: ${r.actualSize === null ? 'unavailable' : sizeToStr(r.actualSize)}`);
  if (r.clusterSize !== undefined) out(`cluster_size: ${r.clusterSize}`);
  if (r.backing !== null) {
    out(`backing file: ${r.backing.name}${r.backing.full !== r.backing.name ? ` (actual path: ${r.backing.full})` : ''}`);
    if (r.backing.format !== null) out(`backing file format: ${r.backing.format}`);
  }
  if (r.snapshots.length > 0) {
    out('Snapshot list:');
    out(snapshotHeader());
    for (const sn of r.snapshots) out(snapshotRow(sn));
  }
  const data = r.specific?.['data'];
  if (typeof data === 'object' && data !== null) formatSpecificLines(data as Record<string, unknown>, out);
}

/** The JSON object in qemu-img 7.2's key order. */
function jsonObject(r: ImageReport): Record<string, unknown> {
  const o: Record<string, unknown> = {};
  if (r.backing?.format !== undefined && r.backing.format !== null) o['backing-filename-format'] = r.backing.format;
  if (r.snapshots.length > 0) o['snapshots'] = r.snapshots.map(snapshotJson);
  o['virtual-size'] = r.virtualSize;
  o['filename'] = r.filename;
  if (r.clusterSize !== undefined) o['cluster-size'] = r.clusterSize;
  o['format'] = r.format;
  if (r.actualSize !== null) o['actual-size'] = r.actualSize;
  if (r.specific !== undefined) o['format-specific'] = r.specific;
  if (r.backing !== null) {
    o['full-backing-filename'] = r.backing.full;
    o['backing-filename'] = r.backing.name;
  }
  o['dirty-flag'] = false;
  return o;
}

function indent(text: string, by: string): string {
  return text
    .split('\n')
    .map((l) => by + l)
    .join('\n');
}

/** Runs `img info ARGS`; returns the exit status. */
export async function imgInfo(args: string[], out: Out): Promise<number> {
  const fmt = takeFlag(args, '-f');
  const forceShare = takeForceShare(args);
  const json = takeOutputJson(args);
  const chain = takeSwitch(args, '--backing-chain');
  const [file] = args;
  if (file === undefined || args.length > 1) throw new BlockError('EINVAL', `Expecting one image file name\n${USAGE}`);
  // json:{...}: its options, shown under the name QEMU gives the image (a file name, an NBD URL)
  const jsonOpts = isJsonFilename(file) ? jsonFilenameOptions(file) : null;
  const target = jsonOpts === null ? file : optionString(jsonOpts);
  const shown = jsonOpts === null ? file : displayName(jsonOpts, file);
  const img = await openImage(target, { aio: 'sync', readOnly: true, forceShare, noBacking: !chain, ...(fmt === undefined ? {} : { format: fmt }) });
  try {
    const root = img.backend.root;
    if (root === null) throw new BlockError('ENOMEDIUM', `Device '${img.name}' has no medium`, { node: img.name });
    const reports: ImageReport[] = [await report(root, shown)];
    if (chain) for (let n = root.backing; n !== undefined; n = n.backing) reports.push(await report(n, n.filename));
    if (json) {
      if (!chain) out(JSON.stringify(jsonObject(reports[0] as ImageReport), null, 4));
      else out(`[\n${reports.map((r) => indent(JSON.stringify(jsonObject(r), null, 4), '    ')).join(',\n')}\n]`);
    } else {
      reports.forEach((r, i) => {
        if (i > 0) out('');
        humanLines(r, out);
      });
    }
  } finally {
    await img.close();
  }
  return 0;
}

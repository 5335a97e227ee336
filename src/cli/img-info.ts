/**
 * `snapstack img info`: qemu-img info's human and JSON output.
 */
import fs from 'node:fs';
import { blkGetLength } from '../block/backend.js';
import { BlockError } from '../block/errors.js';
import { openImage } from '../image.js';
import { takeFlag, takeForceShare, takeOutputJson } from './args.js';
import { sizeToStr } from './format.js';
import type { Out } from './img-usage.js';
import { IMG_USAGE as USAGE } from './img-usage.js';
import { snapshotHeader, snapshotJson, snapshotRow } from './snapshot-format.js';

function formatSpecificLines(data: Record<string, unknown>, out: Out): void {
  out('Format specific information:');
  for (const [k, v] of Object.entries(data)) out(`    ${k.replace(/-/g, ' ')}: ${String(v)}`);
}

/** Runs `img info ARGS`; returns the exit status. */
export async function imgInfo(args: string[], out: Out): Promise<number> {
  const fmt = takeFlag(args, '-f');
  const forceShare = takeForceShare(args);
  const json = takeOutputJson(args);
  const [file] = args;
  if (file === undefined || args.length > 1) throw new BlockError('EINVAL', `Expecting one image file name\n${USAGE}`);
  const img = await openImage(file, { aio: 'sync', readOnly: true, forceShare, ...(fmt === undefined ? {} : { format: fmt }) });
  try {
    const inst = img.backend.root?.instance ?? null;
    const format = img.backend.root?.driver.formatName ?? 'raw';
    const virtualSize = blkGetLength(img.backend);
    const actualSize = fs.statSync(file).blocks * 512;
    const clusterSize = inst?.clusterSize?.();
    const specific = inst?.formatSpecific?.();
    const snapshots = inst?.snapshotList !== undefined ? await img.snapshots() : [];
    if (json) {
      const o: Record<string, unknown> = {};
      if (snapshots.length > 0) o['snapshots'] = snapshots.map(snapshotJson);
      o['virtual-size'] = virtualSize;
      o['filename'] = file;
      if (clusterSize !== undefined) o['cluster-size'] = clusterSize;
      o['format'] = format;
      o['actual-size'] = actualSize;
      if (specific !== undefined) o['format-specific'] = specific;
      o['dirty-flag'] = false;
      out(JSON.stringify(o, null, 4));
    } else {
      out(`image: ${file}`);
      out(`file format: ${format}`);
      out(`virtual size: ${sizeToStr(virtualSize)} (${virtualSize} bytes)`);
      out(`disk size: ${sizeToStr(actualSize)}`);
      if (clusterSize !== undefined) out(`cluster_size: ${clusterSize}`);
      if (snapshots.length > 0) {
        out('Snapshot list:');
        out(snapshotHeader());
        for (const sn of snapshots) out(snapshotRow(sn));
      }
      const data = specific?.['data'];
      if (typeof data === 'object' && data !== null) formatSpecificLines(data as Record<string, unknown>, out);
    }
  } finally {
    await img.close();
  }
  return 0;
}

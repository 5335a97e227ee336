/**
 * `snapstack img`: qemu-img's syntax: create, info, snapshot, check, convert, compare.
 * Each subcommand returns the process exit status; errors print one line on stderr.
 */
import fs from 'node:fs';
import { blkGetLength } from '../block/backend.js';
import { withBqlSync } from '../block/bql.js';
import { BlockError } from '../block/errors.js';
import { parseOptions, parseSize } from '../block/options.js';
import { createOptions } from './create-options.js';
import { createRawFile } from '../drivers/file/driver.js';
import { createQcow2File } from '../drivers/qcow2/create.js';
import { openImage } from '../image.js';
import { takeFlag, takeForceShare, takeOutputJson } from './args.js';
import { describeError, sizeToStr } from './format.js';
import { imgCheck } from './img-check.js';
import { imgCompare, imgConvert } from './img-convert.js';
import { imgMap } from './img-map.js';
import { imgSnapshot } from './img-snapshot.js';
import { snapshotHeader, snapshotJson, snapshotRow } from './snapshot-format.js';

export type Out = (s: string) => void;

const USAGE = `usage: snapstack img create [-f raw|qcow2] [-o cluster_size=..,refcount_bits=..,compat=0.10|1.1,lazy_refcounts=on|off] FILENAME SIZE
       snapstack img info [-f FMT] [-U] [--output=human|json] FILENAME
       snapstack img snapshot [-l | -a SNAPSHOT | -c SNAPSHOT | -d SNAPSHOT] [-U] FILENAME
       snapstack img check [-f FMT] [-U] [-r leaks|all] [--output=human|json] FILENAME
       snapstack img convert [-f FMT] [-U] [-O FMT] [-o OPTIONS] [-l snapshot.name=TAG] SRC DST
       snapstack img compare [-f FMT] [-F FMT] [-U] A B
       snapstack img map [-f FMT] [-U] [--output=human|json] FILENAME
  -U, --force-share: open read-only, sharing every permission (reads an image another process holds)`;

async function create(args: string[], out: Out): Promise<number> {
  const fmt = takeFlag(args, '-f') ?? 'raw';
  const o = parseOptions(takeFlag(args, '-o') ?? '');
  const [file, sizeText] = args;
  if (file === undefined || args.length > 2) throw new BlockError('EINVAL', `Expecting a filename and a size\n${USAGE}`);
  const sizeOpt = sizeText ?? o['size'];
  if (sizeOpt === undefined) throw new BlockError('EINVAL', `Image creation needs a size parameter\n${USAGE}`, { field: 'size' });
  const size = parseSize(sizeOpt);
  const opts = createOptions(fmt, o);
  if (fmt === 'raw') {
    withBqlSync((bql) => createRawFile(bql, file, size));
    out(`Formatting '${file}', fmt=raw size=${size}`);
  } else if (fmt === 'qcow2') {
    withBqlSync((bql) => createQcow2File(bql, file, { sizeBytes: size, ...opts }));
    const lazy = opts.lazyRefcounts === true ? 'on' : 'off';
    const compat = opts.compat === '0.10' ? ' compat=0.10' : '';
    out(`Formatting '${file}', fmt=qcow2 cluster_size=${opts.clusterSize ?? 65536} extended_l2=off compression_type=zlib size=${size}${compat} lazy_refcounts=${lazy} refcount_bits=${opts.refcountBits ?? 16}`);
  } else {
    throw new BlockError('ENOTSUP', `Unknown file format '${fmt}' (snapstack creates raw and qcow2)`, { field: '-f', value: fmt });
  }
  return 0;
}

function formatSpecificLines(data: Record<string, unknown>, out: Out): void {
  out('Format specific information:');
  for (const [k, v] of Object.entries(data)) out(`    ${k.replace(/-/g, ' ')}: ${String(v)}`);
}

async function info(args: string[], out: Out): Promise<number> {
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

/** Runs `snapstack img ARGS`; returns the exit status (errors print one line on stderr). */
export async function imgMain(argv: string[], out: Out, err: Out): Promise<number> {
  const [sub, ...args] = argv;
  try {
    switch (sub) {
      case 'create':
        return await create(args, out);
      case 'info':
        return await info(args, out);
      case 'snapshot':
        return await imgSnapshot(args, out, err);
      case 'check':
        return await imgCheck(args, out, err);
      case 'convert':
        return await imgConvert(args, out);
      case 'compare':
        return await imgCompare(args, out, err);
      case 'map':
        return await imgMap(args, out, err);
      case undefined:
      case '--help':
      case '-h':
        out(USAGE);
        return sub === undefined ? 1 : 0;
      default:
        err(`snapstack img: command '${sub}' is not known\n${USAGE}`);
        return 1;
    }
  } catch (e) {
    err(`snapstack img: ${describeError(e)}`);
    return 1;
  }
}

/**
 * `snapstack img create`: qemu-img create's syntax, options and output line.
 */
import { withBqlSync } from '../block/bql.js';
import { BlockError } from '../block/errors.js';
import { parseOptions, parseSize } from '../block/options.js';
import { createRawFile } from '../drivers/file/driver.js';
import { createQcow2File } from '../drivers/qcow2/create.js';
import { takeFlag } from './args.js';
import { createOptions } from './create-options.js';
import type { Out } from './img-usage.js';
import { IMG_USAGE as USAGE } from './img-usage.js';

/** Runs `img create ARGS`; returns the exit status. */
export async function imgCreate(args: string[], out: Out): Promise<number> {
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

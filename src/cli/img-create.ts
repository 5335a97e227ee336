/**
 * `snapstack img create`: qemu-img create's syntax, options and output line, backing files
 * included (`-b FILE -F FMT`, `-u`, `-o backing_file=..,backing_fmt=..`).
 */
import { withBql, withBqlSync } from '../block/bql.js';
import { resolveBackingFilename } from '../block/backing.js';
import { findProtocolDriver } from '../block/driver.js';
import { BlockError } from '../block/errors.js';
import { closeNode, openNode } from '../block/graph.js';
import { bdrvGetLength } from '../block/io.js';
import { parseOptions, parseSize } from '../block/options.js';
import { createRawFile } from '../drivers/file/driver.js';
import { createQcow2File } from '../drivers/qcow2/create.js';
import { takeFlag, takeSwitch } from './args.js';
import { createOptions } from './create-options.js';
import { createOnProtocol } from './img-create-protocol.js';
import type { Out } from './img-usage.js';
import { IMG_USAGE as USAGE } from './img-usage.js';

/**
 * The virtual size of the backing file `name` of a new image `file` (resolved against the new
 * image's directory, as qemu-img does), opened read-only, shared, without its own backing chain.
 */
async function backingSize(file: string, name: string, format: string): Promise<number> {
  const path = resolveBackingFilename(file, name, file);
  return withBql(async (bql) => {
    let node;
    try {
      node = await openNode(bql, { driver: format, file: path, 'read-only': 'on', backing: 'null', 'file.force-share': 'on', 'file.aio': 'sync' });
    } catch (e) {
      const why = e instanceof Error ? e.message : String(e);
      throw new BlockError(e instanceof BlockError ? e.code : 'EIO', `${file}: ${why}\nCould not open backing image.`, { file: path, field: 'backing_file', cause: e });
    }
    try {
      return bdrvGetLength(node);
    } finally {
      await closeNode(bql, node);
    }
  });
}

/** qemu-img create's 'Formatting ...' line for a raw or qcow2 image. */
function formattingLine(file: string, fmt: 'raw' | 'qcow2', size: number, opts: ReturnType<typeof createOptions>): string {
  if (fmt === 'raw') return `Formatting '${file}', fmt=raw size=${size}`;
  const lazy = opts.lazyRefcounts === true ? 'on' : 'off';
  const compat = opts.compat === '0.10' ? ' compat=0.10' : '';
  const backing = opts.backingFile === undefined ? '' : ` backing_file=${opts.backingFile} backing_fmt=${opts.backingFormat ?? ''}`;
  return `Formatting '${file}', fmt=qcow2 cluster_size=${opts.clusterSize ?? 65536} extended_l2=off compression_type=zlib size=${size}${compat}${backing} lazy_refcounts=${lazy} refcount_bits=${opts.refcountBits ?? 16}`;
}

/** Runs `img create ARGS`; returns the exit status. */
export async function imgCreate(args: string[], out: Out): Promise<number> {
  const fmt = takeFlag(args, '-f') ?? 'raw';
  const o = parseOptions(takeFlag(args, '-o') ?? '');
  const backingFlag = takeFlag(args, '-b');
  const backingFmtFlag = takeFlag(args, '-F');
  const unsafe = takeSwitch(args, '-u');
  const quiet = takeSwitch(args, '-q');
  const [file, sizeText] = args;
  if (file === undefined || args.length > 2 || file.startsWith('-')) throw new BlockError('EINVAL', `Expecting a filename and a size\n${USAGE}`);
  if (backingFlag !== undefined) o['backing_file'] = backingFlag;
  if (backingFmtFlag !== undefined) o['backing_fmt'] = backingFmtFlag;
  const backingFile = o['backing_file'];
  const backingFmt = o['backing_fmt'];
  if (fmt === 'raw' && (backingFile !== undefined || backingFmt !== undefined)) {
    throw new BlockError('ENOTSUP', `${file}: Backing file not supported for file format 'raw'`, { file, field: 'backing_file' });
  }
  if (backingFmt !== undefined && backingFile === undefined) {
    throw new BlockError('EINVAL', `${file}: Backing format cannot be used without backing file`, { file, field: 'backing_fmt' });
  }
  if (backingFile !== undefined && backingFmt === undefined) {
    throw new BlockError('EINVAL', `${file}: Backing file specified without backing format (give -F FMT)`, { file, field: 'backing_fmt' });
  }
  const sizeOpt = sizeText ?? o['size'];
  let size: number;
  if (sizeOpt !== undefined) size = parseSize(sizeOpt);
  else if (backingFile !== undefined && backingFmt !== undefined && !unsafe) size = await backingSize(file, backingFile, backingFmt);
  else throw new BlockError('EINVAL', `${file}: Image creation needs a size parameter\n${USAGE}`, { file, field: 'size' });
  // without -u, the backing file must open (qemu-img checks it even when the size is given)
  if (sizeOpt !== undefined && backingFile !== undefined && backingFmt !== undefined && !unsafe) await backingSize(file, backingFile, backingFmt);
  const opts = createOptions(fmt, o);
  // an NBD URL: the export exists already; it is checked and formatted as QEMU does (after the 'Formatting' line)
  const protocol = findProtocolDriver(file);
  if (protocol !== null && (fmt === 'raw' || fmt === 'qcow2')) {
    if (!quiet) out(formattingLine(file, fmt, size, opts));
    await createOnProtocol(file, protocol, fmt === 'raw' ? { format: 'raw', sizeBytes: size } : { format: 'qcow2', options: { sizeBytes: size, ...opts } });
    return 0;
  }
  if (fmt === 'raw') {
    withBqlSync((bql) => createRawFile(bql, file, size));
    if (!quiet) out(formattingLine(file, fmt, size, opts));
  } else if (fmt === 'qcow2') {
    withBqlSync((bql) => createQcow2File(bql, file, { sizeBytes: size, ...opts }));
    if (!quiet) out(formattingLine(file, fmt, size, opts));
  } else {
    throw new BlockError('ENOTSUP', `Unknown file format '${fmt}' (snapstack creates raw and qcow2)`, { field: '-f', value: fmt });
  }
  return 0;
}

/**
 * `snapstack img`: qemu-img's syntax for the subcommands snapstack has so far: `create` and
 * `info`. Returns the process exit status.
 */
import fs from 'node:fs';
import { blkGetLength } from '../block/backend.js';
import { BlockError } from '../block/errors.js';
import { parseOptions, parseSize } from '../block/options.js';
import { createRawFile } from '../drivers/file.js';
import { openImage } from '../image.js';
import { describeError, sizeToStr } from './format.js';

const USAGE = `usage: snapstack img create [-f raw] FILENAME SIZE
       snapstack img info [-f FMT] [--output=human|json] FILENAME`;

function takeFlag(args: string[], flag: string): string | undefined {
  const i = args.indexOf(flag);
  if (i < 0) return undefined;
  const v = args[i + 1];
  if (v === undefined) throw new BlockError('EINVAL', `option ${flag} needs a value`, { field: flag });
  args.splice(i, 2);
  return v;
}

async function create(args: string[], out: (s: string) => void): Promise<number> {
  const fmt = takeFlag(args, '-f') ?? 'raw';
  const o = takeFlag(args, '-o');
  if (o !== undefined && Object.keys(parseOptions(o)).length > 0) {
    throw new BlockError('EINVAL', `Invalid options for file format '${fmt}': ${o}`, { field: '-o', value: o });
  }
  if (fmt !== 'raw') throw new BlockError('ENOTSUP', `Unknown file format '${fmt}' (this version creates raw images)`, { field: '-f', value: fmt });
  const [file, sizeText] = args;
  if (file === undefined || sizeText === undefined || args.length > 2) throw new BlockError('EINVAL', `Expecting a filename and a size\n${USAGE}`);
  const size = parseSize(sizeText);
  createRawFile(file, size);
  out(`Formatting '${file}', fmt=${fmt} size=${size}`);
  return 0;
}

async function info(args: string[], out: (s: string) => void): Promise<number> {
  const fmt = takeFlag(args, '-f');
  let json = false;
  const rest: string[] = [];
  for (const a of args) {
    if (a === '--output=json') json = true;
    else if (a === '--output=human') json = false;
    else rest.push(a);
  }
  const [file] = rest;
  if (file === undefined || rest.length > 1) throw new BlockError('EINVAL', `Expecting one image file name\n${USAGE}`);
  const img = await openImage(file, { readOnly: true, ...(fmt === undefined ? {} : { format: fmt }) });
  try {
    const info = await img.info();
    const format = info.inserted?.driver ?? 'raw';
    const virtualSize = blkGetLength(img.backend);
    const actualSize = fs.statSync(file).blocks * 512;
    if (json) {
      out(JSON.stringify({ 'virtual-size': virtualSize, filename: file, format, 'actual-size': actualSize, 'dirty-flag': false }, null, 4));
    } else {
      out(`image: ${file}`);
      out(`file format: ${format}`);
      out(`virtual size: ${sizeToStr(virtualSize)} (${virtualSize} bytes)`);
      out(`disk size: ${sizeToStr(actualSize)}`);
    }
  } finally {
    await img.close();
  }
  return 0;
}

/** Runs `snapstack img ARGS`; returns the exit status (errors print one line on stderr). */
export async function imgMain(argv: string[], out: (s: string) => void, err: (s: string) => void): Promise<number> {
  const [sub, ...args] = argv;
  try {
    switch (sub) {
      case 'create':
        return await create(args, out);
      case 'info':
        return await info(args, out);
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

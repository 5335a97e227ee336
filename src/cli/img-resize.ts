/**
 * `snapstack img resize [-f fmt] [--preallocation=off] [-q] [--shrink] FILE [+|-]SIZE`: qemu-img
 * 7.2's resize for raw and qcow2, with its messages and exit codes ("Image resized.", a shrink
 * without --shrink refused with the warning, "New image size must be positive", ...).
 */
import { blkGetLength } from '../block/backend.js';
import { BlockError, isBlockError } from '../block/errors.js';
import { parseSize } from '../block/options.js';
import { openImage } from '../image.js';
import { refuseUnknownOptions, takeFlag, takeSwitch } from './args.js';
import { describeError } from '../commands/format.js';
import type { Out } from './img-usage.js';
import { IMG_USAGE as USAGE } from './img-usage.js';

const P = 'snapstack img';
const SIZE_HELP =
  "Parameter 'size' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.";
const PREALLOC_MODES = ['off', 'metadata', 'falloc', 'full'];

/** Removes `--NAME=VALUE` or `--NAME VALUE` from `args`; the last value given. */
function takeLong(args: string[], name: string): string | undefined {
  let value: string | undefined;
  for (let i = 0; i < args.length; ) {
    const a = args[i] as string;
    if (a.startsWith(`${name}=`)) {
      value = a.slice(name.length + 1);
      args.splice(i, 1);
    } else if (a === name) {
      value = args[i + 1];
      if (value === undefined) throw new BlockError('EINVAL', `option '${name}' requires an argument`, { field: name });
      args.splice(i, 2);
    } else i++;
  }
  return value;
}

/** The size argument: absolute, or relative with a leading + or -; null when it does not parse. */
function parseSizeArg(text: string): { relative: -1 | 0 | 1; bytes: number } | null {
  const relative = text.startsWith('+') ? 1 : text.startsWith('-') ? -1 : 0;
  const body = relative === 0 ? text : text.slice(1);
  if (body === '' || body.startsWith('-') || body.startsWith('+')) return null;
  try {
    return { relative, bytes: parseSize(body, 'size') };
  } catch {
    return null;
  }
}

/** Runs `img resize ARGS`; returns the exit status. */
export async function imgResize(argv: string[], out: Out, err: Out): Promise<number> {
  const args = [...argv];
  if (args.length < 2) {
    err(`${P}: Not enough arguments\nTry 'snapstack img --help' for more information`);
    return 1;
  }
  // qemu-img takes the size off the end first, so that "-10M" is not read as an option
  const sizeText = args.pop() as string;
  const fmt = takeFlag(args, '-f');
  const quiet = takeSwitch(args, '-q');
  const shrink = takeSwitch(args, '--shrink');
  const prealloc = takeLong(args, '--preallocation');
  takeSwitch(args, '--');
  refuseUnknownOptions(args, USAGE);
  if (args.length !== 1) {
    err(`${P}: Expecting image file name and size\nTry 'snapstack img --help' for more information`);
    return 1;
  }
  const file = args[0] as string;
  if (prealloc !== undefined && !PREALLOC_MODES.includes(prealloc)) {
    err(`${P}: Invalid preallocation mode '${prealloc}'`);
    return 1;
  }
  const size = parseSizeArg(sizeText);
  if (size === null) {
    err(`${P}: ${SIZE_HELP}`);
    return 1;
  }
  let img;
  try {
    img = await openImage(file, { aio: 'sync', ...(fmt === undefined ? {} : { format: fmt }) });
  } catch (e) {
    err(`${P}: Could not open '${file}': ${isBlockError(e) ? e.message : describeError(e)}`);
    return 1;
  }
  try {
    const current = blkGetLength(img.backend);
    const total = size.relative === 0 ? size.bytes : current + size.relative * size.bytes;
    if (total <= 0) {
      err(`${P}: New image size must be positive`);
      return 1;
    }
    if (total < current && !shrink) {
      err(`${P}: Use the --shrink option to perform a shrink operation.`);
      err(
        `${P}: warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.`,
      );
      return 1;
    }
    if (prealloc !== undefined && prealloc !== 'off') {
      if (total < current) {
        err(`${P}: Preallocation can't be used for shrinking an image`);
        return 1;
      }
      err(`${P}: Preallocation mode '${prealloc}' is not supported by snapstack (only off)`);
      return 1;
    }
    if (!Number.isSafeInteger(total)) {
      err(`${P}: Image size ${total} is too large (snapstack keeps sizes below 2^53)`);
      return 1;
    }
    try {
      await img.truncate(total);
    } catch (e) {
      err(`${P}: ${isBlockError(e) ? e.message : describeError(e)}`);
      return 1;
    }
    if (!quiet) out('Image resized.');
    return 0;
  } finally {
    await img.close();
  }
}

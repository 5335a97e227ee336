/**
 * `snapstack img dd [-U] [-f FMT] [-O FMT] [bs=N] [count=N] [skip=N] if=IN of=OUT`: qemu-img 7.2's
 * dd, with its messages and exit codes. OUT is created anew (raw or qcow2) and every block is
 * written, zeros included, as qemu-img does. 7.2's quirks are kept, since users compare outputs:
 * `count` limits the input to count*bs bytes from offset 0, not from `skip` (so skip beyond
 * count*bs gives an empty OUT and "cannot skip to specified offset", with exit status 0).
 */
import { withBqlSync } from '../block/bql.js';
import { BlockError, isBlockError } from '../block/errors.js';
import { createRawFile } from '../drivers/file/driver.js';
import { createQcow2File } from '../drivers/qcow2/create.js';
import { openImage, type Image } from '../image.js';
import { takeFlag, takeForceShare } from './args.js';
import { describeError } from '../commands/format.js';
import type { Out } from './img-usage.js';

const P = 'snapstack img';
/** INT64_MAX, the largest count or offset qemu-img takes. */
export const INT64_MAX = (1n << 63n) - 1n;
const INT_MAX = 2147483647;
/** The most bytes one transfer of the copy loop moves (whole blocks; the result is the same as block by block). */
const MAX_TRANSFER = 1024 * 1024;
const SUFFIX: Record<string, bigint> = { '': 1n, b: 1n, k: 1n << 10n, m: 1n << 20n, g: 1n << 30n, t: 1n << 40n, p: 1n << 50n, e: 1n << 60n };

/** A usage error with qemu-img's message (lines without the program name), ending the command with status 1. */
export class UsageError extends Error {}

/**
 * qemu-img's cvtnum_full: a byte count with an optional suffix (b, k, M, G, T, P, E; binary),
 * decimal (a fraction only with a suffix) or hexadecimal, within [min, max]; a UsageError with
 * qemu-img's message otherwise.
 * @locking common
 */
export function cvtnum(name: string, text: string, min: bigint, max: bigint): number {
  const m = /^\s*(?:0[xX]([0-9a-fA-F]+)|(\d+)(?:\.(\d*))?|\.(\d+))([bBkKmMgGtTpPeE]?)$/.exec(text);
  const suffixHelp = `Invalid ${name} specified. You may use k, M, G, T, P or E suffixes for\nkilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.`;
  if (m === null) throw new UsageError(suffixHelp);
  const [, hex, int, frac1, frac2, suffix] = m;
  const mult = SUFFIX[(suffix ?? '').toLowerCase()] ?? 1n;
  const frac = frac1 ?? frac2 ?? '';
  let value: bigint;
  if (hex !== undefined) value = BigInt(`0x${hex}`) * mult;
  else {
    if (mult === 1n && /[1-9]/.test(frac)) throw new UsageError(suffixHelp);
    const scale = 10n ** BigInt(frac.length);
    value = (BigInt(int ?? '0') * scale + BigInt(frac === '' ? '0' : frac)) * mult / scale;
  }
  if (value < min || value > max) throw new UsageError(`Invalid ${name} specified. Must be between ${min} and ${max}.`);
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new BlockError('EFBIG', `${name}=${text} is beyond what snapstack handles (2^53 - 1)`, { field: name, value: text });
  }
  return Number(value);
}

/**
 * Prints a message as qemu-img does: each line under the program's name, but the "Try ..." hint.
 * @locking common
 */
export function printError(err: Out, message: string): void {
  err(
    message
      .split('\n')
      .map((l) => (l.startsWith('Try ') ? l : `${P}: ${l}`))
      .join('\n'),
  );
}

/** What the operands asked. */
interface DdRequest {
  bs: number;
  count: number | null;
  skip: number | null;
  input: string | null;
  output: string | null;
}

function parseOperands(operands: string[]): DdRequest {
  const r: DdRequest = { bs: 512, count: null, skip: null, input: null, output: null };
  for (const arg of operands) {
    const eq = arg.indexOf('=');
    const key = eq < 0 ? arg : arg.slice(0, eq);
    const value = arg.slice(eq + 1);
    if (eq < 0) throw new UsageError(`unrecognized operand ${key}`);
    if (key === 'bs') r.bs = cvtnum('bs', value, 1n, BigInt(INT_MAX));
    else if (key === 'count') r.count = cvtnum('count', value, 0n, INT64_MAX);
    else if (key === 'skip') r.skip = cvtnum('skip', value, 0n, INT64_MAX);
    else if (key === 'if') r.input = value;
    else if (key === 'of') r.output = value;
    else throw new UsageError(`unrecognized operand ${key}`);
  }
  return r;
}

/** Copies [inPos, size) of `from` to `to` from offset 0, in whole blocks of `bs` (the last one short). */
async function copyBlocks(from: Image, to: Image, bs: number, inPos: number, size: number): Promise<void> {
  const per = Math.max(bs, MAX_TRANSFER - (MAX_TRANSFER % bs));
  const buf = new Uint8Array(per);
  for (let pos = inPos, outPos = 0; pos < size; ) {
    const n = Math.min(per, size - pos);
    const view = buf.subarray(0, n);
    // the input's last sector may be partial (a raw file): qemu-img reads it as a whole sector of zeros past the end
    const avail = Math.max(0, Math.min(n, from.size - pos));
    view.fill(0, avail);
    try {
      if (avail > 0) await from.read(pos, avail, view.subarray(0, avail));
    } catch (e) {
      throw new BlockError('EIO', `error while reading from input image file: ${isBlockError(e) ? e.message : describeError(e)}`);
    }
    try {
      await to.write(outPos, view);
    } catch (e) {
      throw new BlockError('EIO', `error while writing to output image file: ${isBlockError(e) ? e.message : describeError(e)}`);
    }
    pos += n;
    outPos += n;
  }
}

/** Runs `img dd ARGS`; returns the exit status (1 on an error, printed on `err` as qemu-img does). */
export async function imgDd(argv: string[], out: Out, err: Out): Promise<number> {
  void out;
  const args = [...argv];
  let req: DdRequest;
  let fmt: string | undefined;
  let outFmt: string;
  let forceShare: boolean;
  try {
    fmt = takeFlag(args, '-f');
    outFmt = takeFlag(args, '-O') ?? 'raw';
    forceShare = takeForceShare(args);
    const bad = args.find((a) => a.startsWith('-') && a !== '-');
    if (bad !== undefined) throw new UsageError(`unrecognized option '${bad}'\nTry 'snapstack img --help' for more information`);
    req = parseOperands(args);
    if (req.input === null || req.output === null) throw new UsageError('Must specify both input and output files');
  } catch (e) {
    printError(err, e instanceof Error ? e.message : String(e));
    return 1;
  }
  const { input, output, bs } = req;
  let from: Image;
  try {
    from = await openImage(input, { aio: 'sync', readOnly: true, forceShare, ...(fmt === undefined ? {} : { format: fmt }) });
  } catch (e) {
    err(`${P}: Could not open '${input}': ${isBlockError(e) ? e.message : describeError(e)}`);
    return 1;
  }
  try {
    if (outFmt !== 'raw' && outFmt !== 'qcow2') {
      err(`${P}: Unknown file format`);
      return 1;
    }
    let size = Math.ceil(from.size / 512) * 512; // qemu's block layer counts whole sectors
    if (req.count !== null && req.count * bs < size) size = req.count * bs;
    const skipBytes = req.skip === null ? 0 : req.skip * bs;
    const beyond = req.skip !== null && (!Number.isSafeInteger(skipBytes) || size < skipBytes);
    // qemu-img creates OUT rounded up to whole 512-byte sectors (the tail reads as zeros)
    const copied = beyond ? 0 : size - skipBytes;
    const outSize = Math.ceil(copied / 512) * 512;
    try {
      if (outFmt === 'raw') withBqlSync((bql) => createRawFile(bql, output, outSize));
      else withBqlSync((bql) => createQcow2File(bql, output, { sizeBytes: outSize }));
    } catch (e) {
      err(`${P}: ${output}: error while creating output image: ${isBlockError(e) ? e.message : describeError(e)}`);
      return 1;
    }
    let to: Image;
    try {
      to = await openImage(output, { aio: 'sync', format: outFmt });
    } catch (e) {
      err(`${P}: Could not open '${output}': ${isBlockError(e) ? e.message : describeError(e)}`);
      return 1;
    }
    try {
      // qemu-img warns and copies nothing when skip lies past the (count-limited) input; exit 0
      if (beyond) err(`${P}: ${input}: cannot skip to specified offset`);
      await copyBlocks(from, to, bs, beyond ? size : skipBytes, size);
    } catch (e) {
      err(`${P}: ${isBlockError(e) ? e.message : describeError(e)}`);
      return 1;
    } finally {
      await to.close();
    }
  } finally {
    await from.close();
  }
  return 0;
}

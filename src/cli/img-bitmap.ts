/**
 * `snapstack img bitmap`: qemu-img bitmap's syntax, options, output and exit codes.
 * UNFINISHED: a placeholder until its implementation lands (refuses with ENOTSUP).
 */
import { BlockError } from '../block/errors.js';
import type { Out } from './img-usage.js';

/** Runs `img bitmap ARGS`; returns the exit status. */
export async function imgBitmap(_args: string[], _out: Out, _err: Out): Promise<number> {
  throw new BlockError('ENOTSUP', "'img bitmap' is not implemented yet", { op: 'bitmap' });
}

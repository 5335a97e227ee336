/**
 * `snapstack img resize`: qemu-img resize's syntax, options, output and exit codes.
 * UNFINISHED: a placeholder until its implementation lands (refuses with ENOTSUP).
 */
import { BlockError } from '../block/errors.js';
import type { Out } from './img-usage.js';

/** Runs `img resize ARGS`; returns the exit status. */
export async function imgResize(_args: string[], _out: Out, _err: Out): Promise<number> {
  throw new BlockError('ENOTSUP', "'img resize' is not implemented yet", { op: 'resize' });
}

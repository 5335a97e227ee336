/**
 * `snapstack img rebase`: qemu-img rebase's syntax, options, output and exit codes.
 * UNFINISHED: a placeholder until its implementation lands (refuses with ENOTSUP).
 */
import { BlockError } from '../block/errors.js';
import type { Out } from './img-usage.js';

/** Runs `img rebase ARGS`; returns the exit status. */
export async function imgRebase(_args: string[], _out: Out, _err: Out): Promise<number> {
  throw new BlockError('ENOTSUP', "'img rebase' is not implemented yet", { op: 'rebase' });
}

/**
 * `snapstack img commit`: qemu-img commit's syntax, options, output and exit codes.
 * UNFINISHED: a placeholder until its implementation lands (refuses with ENOTSUP).
 */
import { BlockError } from '../block/errors.js';
import type { Out } from './img-usage.js';

/** Runs `img commit ARGS`; returns the exit status. */
export async function imgCommit(_args: string[], _out: Out, _err: Out): Promise<number> {
  throw new BlockError('ENOTSUP', "'img commit' is not implemented yet", { op: 'commit' });
}

/**
 * `snapstack img amend`: qemu-img amend's syntax, options, output and exit codes.
 * UNFINISHED: a placeholder until its implementation lands (refuses with ENOTSUP).
 */
import { BlockError } from '../block/errors.js';
import type { Out } from './img-usage.js';

/** Runs `img amend ARGS`; returns the exit status. */
export async function imgAmend(_args: string[], _out: Out, _err: Out): Promise<number> {
  throw new BlockError('ENOTSUP', "'img amend' is not implemented yet", { op: 'amend' });
}

/**
 * `snapstack img bitmap`: refused by design, with the reason. snapstack keeps no persistent dirty
 * bitmaps. An image's bitmaps stay untouched while snapstack only reads it; the first read/write
 * open clears the bitmaps' autoclear bit (the qcow2 specification's rule for a writer that does
 * not know them), so QEMU then treats them as inconsistent and drops them instead of trusting
 * bitmaps that missed the writes: they are invalidated, never silently wrong.
 */
import { BlockError } from '../block/errors.js';
import type { Out } from './img-usage.js';

/** Runs `img bitmap ARGS`: refuses (exit 1) without opening the image. */
export async function imgBitmap(_args: string[], _out: Out, _err: Out): Promise<number> {
  throw new BlockError(
    'ENOTSUP',
    "'img bitmap' is not supported: snapstack keeps no persistent bitmaps (use qemu-img bitmap). An image's bitmaps survive read-only use; a write through snapstack invalidates them, as the qcow2 autoclear rule requires",
    { op: 'bitmap' },
  );
}

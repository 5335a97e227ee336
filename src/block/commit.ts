/**
 * Committing an overlay's data into a backing file below it (QEMU's commit: qemu-img commit and
 * the block-commit job): every range allocated in `top` or an image between it and `base` is
 * read through `top` and written into `base`. Where the chain lies, what counts as allocated
 * above the base, and the copy of one step live here; img-commit.ts and jobs/commit-job.ts drive it.
 *
 * I/O code: ordinary requests on the nodes; the caller decides when (between steps) to yield.
 */
import fs from 'node:fs';
import { resolveBackingFilename } from './backing.js';
import { BlockError } from './errors.js';
import { bdrvBlockStatus, bdrvGetLength, bdrvPread, bdrvPwrite, bdrvPwriteZeroes, bdrvTruncate } from './io.js';
import type { BlockNode } from './node.js';

/** How much one commit step copies at most (QEMU's COMMIT_BUFFER_SIZE is 512 KiB; 1 MiB here). */
export const COMMIT_STEP = 1024 * 1024;

/** realpath when the file exists, else the name itself. */
function realOrSelf(name: string): string {
  try {
    return fs.realpathSync(name);
  } catch {
    return name;
  }
}

/**
 * The node below `top` in its backing chain that `name` means (QEMU's bdrv_find_backing_image):
 * the backing file an overlay records under exactly that name, or the file that `name` (relative
 * to the overlay's directory when not absolute) is. Null when the chain holds none.
 * @locking common
 */
export function findBackingImage(top: BlockNode, name: string): BlockNode | null {
  for (let cur: BlockNode | undefined = top; cur !== undefined; cur = cur.backing) {
    const below = cur.backing;
    if (below === undefined) return null;
    const recorded = cur.drv.backingFile?.() ?? null;
    if (recorded !== null && recorded.filename === name) return below;
    let wanted: string;
    try {
      wanted = resolveBackingFilename(cur.filename, name, cur.nodeName);
    } catch {
      continue;
    }
    if (below.filename !== '' && realOrSelf(wanted) === realOrSelf(below.filename)) return below;
  }
  return null;
}

/**
 * How many backing edges lie between `top` and `base` (1: base is top's backing file); EINVAL
 * when base is not below top.
 * @locking common
 */
export function chainDepth(top: BlockNode, base: BlockNode): number {
  let d = 0;
  for (let cur: BlockNode | undefined = top; cur !== undefined; cur = cur.backing, d++) if (cur === base) return d;
  throw new BlockError('EINVAL', `Node '${base.nodeName}' is not in the backing chain of '${top.nodeName}'`, { node: top.nodeName, field: 'base' });
}

/**
 * Whether the bytes from `offset` are allocated in `top` or an image above `base` (base itself
 * excluded), and for how many bytes that holds (at most `bytes`): QEMU's bdrv_is_allocated_above.
 * Past the end of an image above base the chain reads zeros: allocated (as QEMU since 5.1).
 * @locking io
 */
export async function allocatedAbove(top: BlockNode, base: BlockNode | null, offset: number, bytes: number): Promise<{ allocated: boolean; bytes: number }> {
  let n = bytes;
  for (let cur: BlockNode | undefined = top; cur !== undefined && cur !== base; cur = cur.backing) {
    // past the end of an image the chain reads zeros, whatever lies below: that counts as allocated
    if (offset >= bdrvGetLength(cur)) return { allocated: true, bytes: n };
    const st = await bdrvBlockStatus(cur, offset, Math.min(n, bdrvGetLength(cur) - offset));
    if (st.allocated) return { allocated: true, bytes: Math.min(n, st.bytes) };
    n = Math.min(n, st.bytes);
  }
  return { allocated: false, bytes: n };
}

/** True when every byte of `buf` is zero. */
function isZero(buf: Uint8Array): boolean {
  for (let i = 0; i < buf.length; i++) if (buf[i] !== 0) return false;
  return true;
}

/**
 * Grows `base` to the size of `top` when it is smaller (QEMU's commit does it before copying).
 * @locking io
 */
export async function growBaseForCommit(top: BlockNode, base: BlockNode): Promise<void> {
  const len = bdrvGetLength(top);
  if (bdrvGetLength(base) < len) await bdrvTruncate(base, len);
}

/**
 * Copies one step from `offset`: when the range is allocated above `base`, what `top` reads there
 * is written into `base` (zeros as write-zeroes). Returns how many bytes it covered.
 * @locking io
 */
export async function commitStep(top: BlockNode, base: BlockNode, offset: number, buf: Uint8Array): Promise<number> {
  const len = bdrvGetLength(top);
  const want = Math.min(buf.length, len - offset);
  const st = await allocatedAbove(top, base, offset, want);
  if (!st.allocated) return st.bytes;
  const chunk = buf.subarray(0, st.bytes);
  await bdrvPread(top, offset, chunk);
  if (isZero(chunk)) await bdrvPwriteZeroes(base, offset, st.bytes);
  else await bdrvPwrite(base, offset, chunk);
  return st.bytes;
}

/**
 * Copies everything allocated above `base` into it, step by step; `onProgress(done, total)` after
 * each step. Growing the base and flushing it are the caller's.
 * @locking io
 */
export async function commitAll(top: BlockNode, base: BlockNode, onProgress?: (done: number, total: number) => void): Promise<void> {
  const len = bdrvGetLength(top);
  const buf = new Uint8Array(COMMIT_STEP);
  for (let off = 0; off < len; ) {
    off += await commitStep(top, base, off, buf);
    onProgress?.(off, len);
  }
}

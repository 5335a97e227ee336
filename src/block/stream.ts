/**
 * block-stream (QEMU's block/stream.c): the data of the images between a node and `base` (all of
 * its backing chain when no base) is copied into the node, in steps, while the guest goes on
 * using it; at the end, under the BQL and drained, the node's backing becomes `base` (none
 * without one), its image records that, and the images in between are closed.
 *
 * Each step is drained on the node (guest requests wait in the device's queue for it): the check
 * that the node does not allocate the range and the write that fills it are one unit, so no
 * guest write is overwritten with older data. Between steps the job yields and honours
 * pause and cancel; a cancelled stream leaves the node with some ranges copied (the same data)
 * and its old backing chain.
 *
 * Global-state entry (`blockStream` takes `Bql`); the body runs as I/O code in the background.
 */
import { blkFind } from './backend.js';
import { backingNameFor, changeBackingFile } from './backing-change.js';
import { acquireBql, assertBql, releaseBql, type Bql } from './bql.js';
import { allocatedAbove } from './commit.js';
import { withDrained, withDrainedAll } from './drain.js';
import { BlockError } from './errors.js';
import { bdrvSetBacking } from './graph-change.js';
import { closeNodeIfUnused, findNode } from './graph.js';
import { bdrvBlockStatus, bdrvFlush, bdrvGetLength, bdrvPread, bdrvPwrite, bdrvPwriteZeroes } from './io.js';
import { jobStart, type Job } from './job.js';
import type { BlockNode } from './node.js';

/** How much one stream step copies at most. */
export const STREAM_STEP = 512 * 1024;

/** What to stream. */
export interface BlockStreamOptions {
  jobId: string;
  /** The device whose root node is streamed into (or `node`). */
  device?: string;
  /** The node streamed into (or `device`). */
  node?: string;
  /** The node name of the backing image that stays; none: the whole chain is copied. */
  base?: string;
  /** Remove the job when it concluded (default true). */
  autoDismiss?: boolean;
  /** Finalize (the graph change) once done (default true); false: wait for job-finalize. */
  autoFinalize?: boolean;
}

/** True when every byte of `buf` is zero. */
function isZero(buf: Uint8Array): boolean {
  for (let i = 0; i < buf.length; i++) if (buf[i] !== 0) return false;
  return true;
}

/**
 * The node a device or node name means (a device: its root). EINVAL when neither or both given.
 * @locking global-state
 */
export function jobTargetNode(bql: Bql, device: string | undefined, node: string | undefined): BlockNode {
  assertBql(bql, 'job target');
  if (node !== undefined) {
    if (device !== undefined) throw new BlockError('EINVAL', "Give only one of 'device' and 'node'", { field: 'device' });
    return findNode(bql, node);
  }
  if (device === undefined) throw new BlockError('EINVAL', "Give one of 'device' and 'node'", { field: 'device' });
  const blk = blkFind(bql, device);
  if (blk.root === null) throw new BlockError('ENOMEDIUM', `Device '${device}' has no medium`, { node: device });
  return blk.root;
}

/** One step at `offset`: fills what the node does not allocate from the chain above base. */
async function streamStep(top: BlockNode, base: BlockNode | null, offset: number, buf: Uint8Array): Promise<number> {
  const len = bdrvGetLength(top);
  const want = Math.min(buf.length, len - offset);
  const own = await bdrvBlockStatus(top, offset, want);
  if (own.allocated) return own.bytes;
  const below = top.backing;
  if (below === undefined) return own.bytes;
  const st = await allocatedAbove(below, base, offset, own.bytes);
  if (!st.allocated) return st.bytes;
  const chunk = buf.subarray(0, st.bytes);
  await bdrvPread(top, offset, chunk);
  // write-zeroes leaves an unallocated cluster alone where nothing shows through now (past the
  // backing file's end); the base may show there once it is the backing file: zeros as data then
  if (isZero(chunk) && offset + st.bytes <= bdrvGetLength(below)) await bdrvPwriteZeroes(top, offset, st.bytes);
  else await bdrvPwrite(top, offset, chunk);
  return st.bytes;
}

/**
 * The images strictly between `top` and `base` (top's backing first).
 * @locking common
 */
export function imagesBetween(top: BlockNode, base: BlockNode | null): BlockNode[] {
  const out: BlockNode[] = [];
  for (let cur = top.backing; cur !== undefined && cur !== base; cur = cur.backing) out.push(cur);
  return out;
}

/**
 * Starts a block-stream job into the node (see the file comment). EINVAL when `base` is not in
 * the node's backing chain, EACCES when the node is read-only.
 * @locking global-state
 */
export function blockStream(bql: Bql, opts: BlockStreamOptions): Job {
  assertBql(bql, 'block-stream');
  const top = jobTargetNode(bql, opts.device, opts.node);
  const base = opts.base === undefined ? null : findNode(bql, opts.base);
  if (base !== null && !imagesBetween(top, null).includes(base)) {
    throw new BlockError('EINVAL', `Node '${base.nodeName}' is not a backing image of '${top.nodeName}'`, { node: top.nodeName, field: 'base' });
  }
  if (top.readOnly) throw new BlockError('EACCES', `Node '${top.nodeName}' is read-only: nothing can be streamed into it`, { node: top.nodeName, op: 'block-stream' });
  const removed = imagesBetween(top, base);
  return jobStart(
    bql,
    opts.jobId,
    'stream',
    {
      async run(job: Job): Promise<void> {
        const len = bdrvGetLength(top);
        const buf = new Uint8Array(STREAM_STEP);
        job.setProgress(0, len);
        for (let off = 0; off < len; ) {
          if (await job.pausePoint()) return;
          const b = await acquireBql();
          try {
            off += await withDrained(b, top, () => streamStep(top, base, off, buf));
          } finally {
            releaseBql(b);
          }
          job.setProgress(off, len);
        }
      },
      async prepare(b: Bql): Promise<void> {
        await withDrainedAll(b, async (d) => {
          await bdrvFlush(top);
          await changeBackingFile(b, d, top, base === null ? null : backingNameFor(top, base), base === null ? null : base.driver.formatName);
          bdrvSetBacking(b, d, top, base);
        });
        for (const n of removed) await closeNodeIfUnused(b, n);
      },
    },
    { nodes: [top, ...removed, ...(base === null ? [] : [base])], ...(opts.autoDismiss === undefined ? {} : { autoDismiss: opts.autoDismiss }), ...(opts.autoFinalize === undefined ? {} : { autoFinalize: opts.autoFinalize }) },
  );
}

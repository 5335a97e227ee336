/**
 * block-commit (QEMU's block/commit.c and, for the active layer, mirror.c's active commit): the
 * data allocated in `top` and the images between it and `base` is copied into `base`, in steps,
 * while the guest goes on writing through its device.
 *
 * - Intermediate commit (top is below the device's root): the guest never reads `base` where the
 *   copied ranges lie (an image above allocates them), so steps need no drain. At the end, under
 *   the BQL and drained-all: base flushed, the overlay above top records base as its backing
 *   file and gets it as its backing child, top and the images down to base are closed.
 * - Active commit (top is the device's root): after the first pass the job is ready and waits for
 *   complete; guest writes land in top meanwhile. Complete copies what is allocated above base
 *   again under drained-all (so nothing written since is missed), flushes base and puts base under
 *   the device in top's place (replaceNode), then closes top and the images above base.
 * A cancelled or failed commit changes no graph edge and no header: every image reads as before
 * (base only got data in ranges that the images above it hide).
 * UNFINISHED: without a reopen the base must have been opened writable (backing.read-only=off);
 * the final pass of an active commit copies every allocated range again (no dirty bitmap).
 *
 * Global-state entry (`blockCommit` takes `Bql`); the body runs as I/O code in the background.
 */
import { backingNameFor, changeBackingFile } from '../backing-change.js';
import { assertBql, type Bql } from '../bql.js';
import { commitAll, commitStep, COMMIT_STEP, growBaseForCommit } from '../commit.js';
import { withDrainedAll } from '../drain.js';
import { BlockError } from '../errors.js';
import { bdrvSetBacking, replaceNode } from '../graph-change.js';
import { closeNodeIfUnused, findNode } from '../graph.js';
import { bdrvFlush, bdrvGetLength } from '../io.js';
import { jobStart, type Job } from '../job.js';
import { BdrvChild, type BlockNode } from '../node.js';
import { imagesBetween, jobTargetNode } from '../stream.js';

/** What to commit. */
export interface BlockCommitOptions {
  jobId: string;
  /** The device whose chain it is (its root is the default top). */
  device?: string;
  /** Node name of the image committed (default: the device's root: an active commit). */
  top?: string;
  /** Node name of the image committed into (default: top's backing file). */
  base?: string;
  /** Remove the job when it concluded (default true). */
  autoDismiss?: boolean;
  /** Finalize (the graph change) once done (default true); false: wait for job-finalize. */
  autoFinalize?: boolean;
}

/** The node whose backing child is `node`, if a node (not a device) uses it so. */
function overlayOf(node: BlockNode): BlockNode | null {
  for (const p of node.parents) if (p instanceof BdrvChild && p.role === 'backing') return p.parent;
  return null;
}

/** Waits `ms` milliseconds. */
function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/**
 * Starts a block-commit job (see the file comment). EINVAL when base is not below top or top
 * has no backing file; EACCES when base is read-only.
 * @locking global-state
 */
export function blockCommit(bql: Bql, opts: BlockCommitOptions): Job {
  assertBql(bql, 'block-commit');
  const top = opts.top !== undefined ? findNode(bql, opts.top) : jobTargetNode(bql, opts.device, undefined);
  const root = opts.device !== undefined ? jobTargetNode(bql, opts.device, undefined) : null;
  if (top.backing === undefined) throw new BlockError('EINVAL', `Node '${top.nodeName}' has no backing file to commit into`, { node: top.nodeName, field: 'base' });
  const base = opts.base === undefined ? top.backing : findNode(bql, opts.base);
  if (!imagesBetween(top, null).includes(base)) {
    throw new BlockError('EINVAL', `Node '${base.nodeName}' is not a backing image of '${top.nodeName}'`, { node: top.nodeName, field: 'base' });
  }
  if (base.readOnly) {
    throw new BlockError('EACCES', `Base node '${base.nodeName}' is read-only: open it writable for the commit (backing.read-only=off)`, { node: base.nodeName, op: 'block-commit' });
  }
  const overlay = overlayOf(top);
  const active = overlay === null;
  if (!active && root !== null && !imagesBetween(root, null).includes(top)) {
    throw new BlockError('EINVAL', `Node '${top.nodeName}' is not in the chain of device '${opts.device ?? ''}'`, { node: top.nodeName, field: 'top' });
  }
  const removed = [top, ...imagesBetween(top, base)];
  const buf = new Uint8Array(COMMIT_STEP);
  return jobStart(
    bql,
    opts.jobId,
    'commit',
    {
      async run(job: Job): Promise<void> {
        await growBaseForCommit(top, base);
        const len = bdrvGetLength(top);
        job.setProgress(0, len);
        for (let off = 0; off < len; ) {
          if (await job.pausePoint()) {
            if (!active || job.cancelled) return;
          }
          off += await commitStep(top, base, off, buf);
          job.setProgress(off, len);
        }
        if (!active) return;
        job.setReady();
        while (!(await job.pausePoint())) await sleep(5);
      },
      async prepare(b: Bql): Promise<void> {
        await withDrainedAll(b, async (d) => {
          if (active) await commitAll(top, base);
          await bdrvFlush(base);
          if (overlay !== null) {
            await changeBackingFile(b, d, overlay, backingNameFor(overlay, base), base.driver.formatName);
            bdrvSetBacking(b, d, overlay, base);
          } else {
            replaceNode(b, d, top, base);
          }
        });
        for (const n of removed) await closeNodeIfUnused(b, n);
      },
    },
    { nodes: [...(overlay === null ? [] : [overlay]), ...removed, base], ...(opts.autoDismiss === undefined ? {} : { autoDismiss: opts.autoDismiss }), ...(opts.autoFinalize === undefined ? {} : { autoFinalize: opts.autoFinalize }) },
  );
}

/**
 * Image checks through the block layer (QEMU's bdrv_check): `img check` and any other caller
 * reach a format's consistency check by its driver callback, never by importing the driver.
 *
 * Global-state code: the caller holds the BQL and has drained the node (a check reads every
 * table, and a repair rewrites some of them, so no request may run beside it).
 */
import { assertBql, type Bql } from './bql.js';
import { assertDrained, type DrainedProof } from './drain.js';
import { BlockError } from './errors.js';
import type { BlockNode } from './node.js';

/** What to repair: QEMU's BDRV_FIX_LEAKS (`-r leaks`) and BDRV_FIX_ERRORS (with it, `-r all`). */
export interface CheckFix {
  leaks: boolean;
  errors: boolean;
}

/** What a check found (QEMU's BdrvCheckResult with its fragmentation figures). */
export interface CheckResult {
  corruptions: number;
  leaks: number;
  checkErrors: number;
  corruptionsFixed: number;
  leaksFixed: number;
  imageEndOffset: number;
  totalClusters: number;
  allocatedClusters: number;
  fragmentedClusters: number;
  compressedClusters: number;
  /** One line per problem found or repaired, in qemu-img's words. */
  messages: string[];
  /** Why the check stopped early (qemu-img's "Check failed: ..."), or null when it ran through. */
  failure: BlockError | null;
}

/**
 * True when the node's driver can check its images (qemu-img's "does not support checks").
 * @locking global-state
 */
export function bdrvCanCheck(bql: Bql, node: BlockNode): boolean {
  assertBql(bql, 'bdrvCanCheck');
  return node.instance !== null && node.drv.checkImage !== undefined;
}

/**
 * Checks the drained node's image and repairs what `fix` asks for (a repair needs a writable node).
 * @locking global-state
 */
export async function bdrvCheck(bql: Bql, drained: DrainedProof, node: BlockNode, fix: CheckFix): Promise<CheckResult> {
  assertBql(bql, 'bdrvCheck');
  assertDrained(bql, drained, node, 'bdrvCheck');
  const check = node.drv.checkImage;
  if (check === undefined) {
    throw new BlockError('ENOTSUP', `Block format '${node.driver.formatName}' used by node '${node.nodeName}' does not support checks`, { node: node.nodeName, op: 'check' });
  }
  if ((fix.leaks || fix.errors) && node.readOnly) {
    throw new BlockError('EACCES', `Node '${node.nodeName}' is read only: a repair needs a writable node`, { node: node.nodeName, op: 'check' });
  }
  return check.call(node.drv, bql, drained, fix);
}

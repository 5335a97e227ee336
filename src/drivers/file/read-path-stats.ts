/**
 * How a file node's reads went (inline on the main loop or handed to a worker): a test hook,
 * exported through src/testing.ts.
 */
import type { BlockNode } from '../../block/node.js';
import type { ReadPathStats } from './inline-reads.js';
import { FileInstance } from './instance.js';

/**
 * The read-path counts of a file node; null when it is not an open aio=threads file node or
 * its inline reads are off.
 * @locking io
 */
export function fileReadPathStatsForTesting(node: BlockNode): ReadPathStats | null {
  const inst = node.instance;
  return inst instanceof FileInstance ? inst.readPathStats() : null;
}

/**
 * `check -r all` through the block layer (as `img check -r all` runs it) on a crashsim disk, for
 * the power-loss sweeps of the repair: BlockErrors after the power cut are expected and ignored.
 */
import { withBql } from '../../src/block/bql.js';
import { bdrvCheck } from '../../src/block/check.js';
import { withDrained } from '../../src/block/drain.js';
import { isBlockError } from '../../src/block/errors.js';
import { closeNode, openNode } from '../../src/block/graph.js';

/**
 * Runs `check -r all` on crashsim disk `id` opened in check mode.
 * @locking common
 */
export async function repairCrashDisk(id: string): Promise<void> {
  try {
    await withBql(async (bql) => {
      const node = await openNode(bql, { driver: 'qcow2', 'x-check': 'on', 'file.driver': 'crashsim', 'file.id': id });
      try {
        await withDrained(bql, node, (d) => bdrvCheck(bql, d, node, { leaks: true, errors: true }));
      } finally {
        await closeNode(bql, node);
      }
    });
  } catch (e) {
    if (!isBlockError(e)) throw e;
  }
}

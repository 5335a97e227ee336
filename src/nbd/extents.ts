/**
 * What an NBD export's ranges hold, for `base:allocation` and for sparse structured reads: the
 * block layer's status of the export's root node, seen through its backing chain (QEMU's
 * bdrv_block_status_above), as NBD state flags.
 *
 * I/O code: runs alongside other requests; each query holds the backend's in-flight reference
 * (so a drained section waits for it, and one that is already in force holds it back).
 */
import type { BlockBackend } from '../block/backend.js';
import { BlockError } from '../block/errors.js';
import { bdrvBlockStatus, bdrvGetLength } from '../block/io.js';
import type { BlockNode } from '../block/node.js';
import { NBD_STATE_HOLE, NBD_STATE_ZERO, type NbdExtent } from './protocol.js';

/** Which meta context an extent list is for. */
export type ExtentContext = 'base:allocation' | 'qemu:allocation-depth';

/**
 * Status of `bytes` at `offset` of `node`, asking the backing chain where the node has nothing:
 * the `base:allocation` flags and the depth of the layer that holds the range (1 for the top
 * node, 2 for its backing node, ...; 0 when no layer does: qemu:allocation-depth).
 */
async function chainStatus(node: BlockNode, offset: number, bytes: number, depth: number): Promise<{ length: number; flags: number; depth: number }> {
  const st = await bdrvBlockStatus(node, offset, bytes);
  const length = Math.max(1, Math.min(st.bytes, bytes));
  if (st.allocated) return { length, flags: (st.data ? 0 : NBD_STATE_HOLE) | (st.zero ? NBD_STATE_ZERO : 0), depth };
  const backing = node.backing;
  if (backing === undefined) return { length, flags: NBD_STATE_HOLE | NBD_STATE_ZERO, depth: 0 };
  const reach = bdrvGetLength(backing) - offset;
  // past the end of a shorter backing file the overlay reads zeros
  if (reach <= 0) return { length, flags: NBD_STATE_HOLE | NBD_STATE_ZERO, depth: 0 };
  return chainStatus(backing, offset, Math.min(length, reach), depth + 1);
}

/**
 * The extents covering `[offset, offset + bytes)` of the export, adjacent ones with the same
 * flags merged; at most `maxExtents` (the last one then ends before the range does).
 * @locking io
 */
export async function exportExtents(blk: BlockBackend, offset: number, bytes: number, maxExtents: number, context: ExtentContext = 'base:allocation'): Promise<NbdExtent[]> {
  const wait = blk.enter();
  if (wait !== null) await wait;
  try {
    const root = blk.root;
    if (root === null) throw new BlockError('ENOMEDIUM', `block status on device '${blk.name}': no medium`, { node: blk.name, op: 'block-status' });
    const out: NbdExtent[] = [];
    for (let at = offset, end = offset + bytes; at < end; ) {
      const st = await chainStatus(root, at, end - at, 1);
      const e = { length: st.length, flags: context === 'base:allocation' ? st.flags : st.depth };
      const last = out[out.length - 1];
      if (last !== undefined && last.flags === e.flags) last.length += e.length;
      else if (out.length >= maxExtents) break;
      else out.push({ length: e.length, flags: e.flags });
      at += e.length;
    }
    return out;
  } finally {
    blk.leave();
  }
}

/**
 * Image creation on a protocol that cannot create anything itself (an NBD export), for `img
 * create` and `img convert` without -n, as QEMU's bdrv_co_create_opts_simple and the format's
 * create do: the protocol's image is opened read-write (a failure says "Protocol driver 'nbd'
 * does not support image creation, and opening the image failed: ..."); a raw image needs the
 * export to be at least its size (an export cannot grow: "Cannot grow NBD nodes"), a qcow2 image
 * only room for its metadata; the first sector (512 bytes, or the whole export when smaller) is
 * zeroed, so that nothing probes the old contents as a format; qcow2 then writes its header,
 * refcount table and blocks, and zeroes its L1 table (stale bytes of the export stay where the
 * new image will not read them: unallocated clusters are never read from the file).
 *
 * Global-state code: takes the BQL itself (opens and closes a node); the writes are I/O requests
 * on a node nothing else uses.
 */
import { withBql } from '../block/bql.js';
import type { BlockDriver } from '../block/driver.js';
import { BlockError, isBlockError } from '../block/errors.js';
import { closeNode, openNode } from '../block/graph.js';
import { bdrvFlush, bdrvGetLength, bdrvPwrite, bdrvPwriteZeroes } from '../block/io.js';
import type { BlockNode } from '../block/node.js';
import { planQcow2Create, type Qcow2CreateOptions } from '../drivers/qcow2/create.js';

/** The first sector QEMU zeroes on a new image over a protocol without create (BDRV_SECTOR_SIZE). */
const FIRST_SECTOR_BYTES = 512;

/** What to create: raw of `sizeBytes`, or qcow2 with its creation options. */
export type ProtocolCreate = { format: 'raw'; sizeBytes: number } | { format: 'qcow2'; options: Qcow2CreateOptions };

function messageOf(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

async function openTarget(filename: string, drv: BlockDriver): Promise<{ node: BlockNode; close: () => Promise<void> }> {
  return withBql(async (bql) => {
    let node: BlockNode;
    try {
      node = await openNode(bql, { driver: drv.formatName, filename, 'read-only': 'off' });
    } catch (e) {
      throw new BlockError(isBlockError(e) ? e.code : 'EIO', `${filename}: Protocol driver '${drv.formatName}' does not support image creation, and opening the image failed: ${messageOf(e)}`, {
        file: filename,
        op: 'create',
        cause: e,
      });
    }
    return { node, close: () => withBql((b) => closeNode(b, node)) };
  });
}

/**
 * Creates `what` on the protocol image `filename` (selected by `drv`, e.g. nbd), QEMU's way for a
 * protocol without its own create. Errors name the file name first, as qemu-img's.
 * @locking global-state
 */
export async function createOnProtocol(filename: string, drv: BlockDriver, what: ProtocolCreate): Promise<void> {
  const plan = what.format === 'qcow2' ? planQcow2Create(what.options) : null;
  const { node, close } = await openTarget(filename, drv);
  let failure: unknown = null;
  try {
    const length = bdrvGetLength(node);
    // raw needs its whole size; qcow2 asks the protocol for none (it grows the file as it allocates)
    if (what.format === 'raw' && length < what.sizeBytes) {
      throw new BlockError('ENOSPC', `${filename}: Cannot grow NBD nodes (the export has ${length} bytes, the image needs ${what.sizeBytes})`, { file: filename, field: 'size', value: what.sizeBytes });
    }
    if (plan !== null && length < plan.fileLength) {
      throw new BlockError('ENOSPC', `${filename}: Cannot grow NBD nodes (the export has ${length} bytes, qcow2's metadata needs ${plan.fileLength})`, { file: filename, field: 'size', value: plan.fileLength });
    }
    const clear = Math.min(length, FIRST_SECTOR_BYTES);
    if (clear > 0) await bdrvPwriteZeroes(node, 0, clear, { mayUnmap: true });
    if (plan !== null) {
      let end = 0;
      for (const w of plan.writes) {
        await bdrvPwrite(node, w.offset, w.data);
        end = Math.max(end, w.offset + w.data.length);
      }
      // on a host file the L1 table is the zeros a truncate leaves; an export holds old bytes there
      if (plan.fileLength > end) await bdrvPwriteZeroes(node, end, plan.fileLength - end, {});
    }
    await bdrvFlush(node);
  } catch (e) {
    failure = e;
  }
  try {
    await close();
  } catch (e) {
    failure ??= e;
  }
  if (failure !== null) {
    if (isBlockError(failure) && failure.message.startsWith(`${filename}: `)) throw failure;
    throw new BlockError(isBlockError(failure) ? failure.code : 'EIO', `${filename}: ${messageOf(failure)}`, { file: filename, op: 'create', cause: failure });
  }
}

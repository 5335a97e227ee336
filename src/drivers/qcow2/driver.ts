/**
 * Format driver `qcow2`: probing by magic and opening an image over the node's `file` child.
 *
 * Options: `l2-cache-size` (bytes of L2 tables kept in memory; by default, as QEMU, enough to
 * cover the whole disk, between 1 and 32 MiB), `read-only` handled by the block layer.
 */
import type { Bql } from '../../block/bql.js';
import { assertBql } from '../../block/bql.js';
import { registerDriver, type BlockDriver, type BlockDriverInstance } from '../../block/driver.js';
import { BlockError } from '../../block/errors.js';
import type { BlockNode } from '../../block/node.js';
import { parseSize, type NodeOptions } from '../../block/options.js';
import { INCOMPAT_CORRUPT, INCOMPAT_DIRTY, QCOW_MAGIC } from './constants.js';
import { Qcow2Instance } from './instance.js';
import { loadQcow2State } from './open.js';

const KNOWN_OPTIONS = new Set(['l2-cache-size']);

/** The `qcow2` format driver. */
export const qcow2Driver: BlockDriver = {
  formatName: 'qcow2',
  kind: 'format',
  /** 100 when the file starts with the qcow2 magic and a version it could be. */
  probe(header: Uint8Array): number {
    if (header.length < 8) return 0;
    const v = new DataView(header.buffer, header.byteOffset, header.byteLength);
    return v.getUint32(0) === QCOW_MAGIC && v.getUint32(4) >= 2 ? 100 : 0;
  },
  /**
   * Opens a qcow2 image over the node's already attached `file` child, reading and validating
   * its metadata; refuses a corrupt-marked image read/write and a dirty one it cannot repair.
   * @locking global-state
   */
  async open(bql: Bql, node: BlockNode, opts: NodeOptions): Promise<BlockDriverInstance> {
    assertBql(bql, 'qcow2 open');
    const file = node.file;
    if (file === undefined) {
      throw new BlockError('EINVAL', `Driver 'qcow2' needs a 'file' child (node '${node.nodeName}')`, { node: node.nodeName, field: 'file' });
    }
    for (const key of Object.keys(opts)) {
      if (!KNOWN_OPTIONS.has(key)) {
        throw new BlockError('EINVAL', `Invalid parameter '${key}' for driver 'qcow2' (node '${node.nodeName}')`, { node: node.nodeName, field: key });
      }
    }
    const cacheText = opts['l2-cache-size'];
    const l2CacheBytes = cacheText === undefined ? undefined : parseSize(cacheText, 'l2-cache-size');
    const state = await loadQcow2State(node, file, l2CacheBytes);
    const h = state.header;
    if (h.backingFile !== null) {
      throw new BlockError('ENOTSUP', `qcow2 '${state.filename}': backing files are not supported yet (backing file: '${h.backingFile}')`, {
        node: node.nodeName,
        file: state.filename,
        field: 'backing_file_offset',
      });
    }
    if ((h.incompatibleFeatures & BigInt(INCOMPAT_CORRUPT)) !== 0n && !node.readOnly) {
      throw new BlockError('EACCES', `qcow2 '${state.filename}': Image is corrupt; cannot be opened read/write (run 'snapstack img check -r all')`, {
        node: node.nodeName,
        file: state.filename,
        field: 'incompatible_features',
      });
    }
    if ((h.incompatibleFeatures & BigInt(INCOMPAT_DIRTY)) !== 0n && !node.readOnly) {
      // refcounts may be stale (lazy refcounts after a crash): QEMU repairs them on open
      const { repairDirtyImage } = await import('./check.js');
      await repairDirtyImage(state);
    }
    return new Qcow2Instance(state);
  },
};

registerDriver(qcow2Driver);

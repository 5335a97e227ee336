/**
 * Format driver `qcow2`: probing by magic and opening an image over the node's `file` child.
 *
 * Options: `l2-cache-size` (bytes of L2 tables kept in memory; by default, as QEMU, enough to
 * cover the whole disk, between 1 and 32 MiB), `read-only` handled by the block layer, and
 * `x-check=on` (QEMU's BDRV_O_CHECK, for `img check`: a corrupt-marked or dirty image opens
 * read/write without an automatic repair, and damage that an ordinary open refuses, overlapping
 * tables or a bad snapshot L1 pointer, is left for the check to report).
 *
 * On a read/write open the autoclear feature bits are cleared before anything else is written
 * (the specification requires it of a writer that does not know them; snapstack keeps neither
 * bitmaps nor a raw external data file, so it knows none): one 8-byte write of the field, flushed.
 * A check-mode open keeps the bitmaps bit: a check writes no guest data, so they stay consistent
 * (and the check counts their clusters as in use).
 */
import type { Bql } from '../../block/bql.js';
import { assertBql } from '../../block/bql.js';
import type { CheckFix, CheckResult } from '../../block/check.js';
import { assertDrained, type DrainedProof } from '../../block/drain.js';
import { registerDriver, type BlockDriver, type BlockDriverInstance } from '../../block/driver.js';
import { BlockError } from '../../block/errors.js';
import { bdrvFlush, bdrvPwrite } from '../../block/io.js';
import type { BlockNode } from '../../block/node.js';
import { parseBool, parseSize, type NodeOptions } from '../../block/options.js';
import { checkQcow2, repairDirtyImage } from './check.js';
import { AUTOCLEAR_BITMAPS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, QCOW_MAGIC } from './constants.js';
import { qcow2MakeEmpty } from './backing-file.js';
import { headerBackingFormat } from './header.js';
import { updateBackingInHeader } from './header-update.js';
import { withMetadataLock } from './metadata-lock.js';
import { flushMetadata } from './writeback.js';
import { Qcow2Instance } from './instance.js';
import { loadQcow2State } from './open.js';
import type { Qcow2State } from './state.js';

const KNOWN_OPTIONS = new Set(['l2-cache-size', 'x-check']);

/** Header offset of autoclear_features (v3). */
const AUTOCLEAR_OFFSET = 88;

/** A qcow2 instance with the check callback (check.ts does the work) and its backing file's name. */
class CheckingQcow2Instance extends Qcow2Instance {
  /**
   * Rewrites the backing file name and format in the header (header-update.ts: crash-safe), after
   * the metadata is flushed, under the metadata lock; the node is quiet.
   * @locking global-state
   */
  async changeBackingFile(bql: Bql, drained: DrainedProof, filename: string | null, format: string | null): Promise<void> {
    assertBql(bql, 'qcow2 change-backing-file');
    assertDrained(bql, drained, this.state.node, 'qcow2 change-backing-file');
    const s = this.state;
    if (s.node.readOnly) {
      throw new BlockError('EACCES', `qcow2 '${s.filename}': the image is read-only: its backing file name cannot change`, { node: s.node.nodeName, file: s.filename, field: 'backing_file' });
    }
    await withMetadataLock(s, async (locked) => {
      if (s.metadataDirty) await flushMetadata(s);
      await updateBackingInHeader(locked, s, filename, format);
    });
  }

  /**
   * Makes every guest cluster unallocated (backing-file.ts); the node is quiet.
   * @locking global-state
   */
  makeEmpty(bql: Bql, drained: DrainedProof): Promise<void> {
    return qcow2MakeEmpty(bql, drained, this.state.node);
  }

  /** The backing file the header names, with the format its backing-format extension records. */
  backingFile(): { filename: string; format: string | null } | null {
    const h = this.state.header;
    return h.backingFile === null ? null : { filename: h.backingFile, format: headerBackingFormat(h) };
  }

  /**
   * Checks the image as qemu-img check does and repairs what `fix` asks for; the node is quiet.
   * @locking global-state
   */
  async checkImage(bql: Bql, drained: DrainedProof, fix: CheckFix): Promise<CheckResult> {
    assertBql(bql, 'qcow2 check');
    assertDrained(bql, drained, this.state.node, 'qcow2 check');
    return checkQcow2(this.state, fix);
  }
}

/** Sets autoclear_features to `keep` on disk and in memory: one write of the field, then a flush. */
async function clearAutoclearBits(s: Qcow2State, keep: bigint): Promise<void> {
  const field = new Uint8Array(8);
  new DataView(field.buffer).setBigUint64(0, keep);
  await bdrvPwrite(s.file, AUTOCLEAR_OFFSET, field);
  await bdrvFlush(s.file);
  s.header.autoclearFeatures = keep;
}

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
    const checkMode = parseBool(opts, 'x-check', false);
    const state = await loadQcow2State(node, file, l2CacheBytes, checkMode ? { refuseOverlaps: false, checkSnapshots: false } : {});
    const h = state.header;
    if ((h.incompatibleFeatures & BigInt(INCOMPAT_CORRUPT)) !== 0n && !node.readOnly && !checkMode) {
      throw new BlockError('EACCES', `qcow2 '${state.filename}': Image is corrupt; cannot be opened read/write (run 'snapstack img check -r all')`, {
        node: node.nodeName,
        file: state.filename,
        field: 'incompatible_features',
      });
    }
    // a check writes no guest data, so the bitmaps it leaves stay consistent: it keeps their bit
    const clear = checkMode ? h.autoclearFeatures & ~BigInt(AUTOCLEAR_BITMAPS) : h.autoclearFeatures;
    if (clear !== 0n && !node.readOnly) await clearAutoclearBits(state, h.autoclearFeatures & ~clear);
    if ((h.incompatibleFeatures & BigInt(INCOMPAT_DIRTY)) !== 0n && !node.readOnly && !checkMode) {
      // refcounts may be stale (lazy refcounts after a crash): QEMU repairs them on open
      await repairDirtyImage(bql, state);
    }
    return new CheckingQcow2Instance(state);
  },
};

registerDriver(qcow2Driver);

/**
 * An open qcow2 node: the driver callbacks, each a thin layer over the module that does the work
 * (data-path.ts for guest I/O, snapshots.ts for internal snapshots).
 *
 * I/O callbacks run alongside each other; the snapshot callbacks take `Bql` and a drained proof,
 * so nothing else runs on the node while they change its metadata.
 */
import { assertBql, type Bql } from '../../block/bql.js';
import { assertDrained, type DrainedProof } from '../../block/drain.js';
import type { BlockDriverInstance, BlockStatus, SnapshotInfo, WriteZeroesFlags } from '../../block/driver.js';
import { BlockError } from '../../block/errors.js';
import { INCOMPAT_CORRUPT, COMPAT_LAZY_REFCOUNTS } from './constants.js';
import { qcow2BlockStatus, qcow2Read, qcow2Write, qcow2ZeroClusters } from './data-path.js';
import { createSnapshot, deleteSnapshot, gotoSnapshot, loadSnapshotTemporarily } from './snapshots.js';
import type { Qcow2State } from './state.js';
import { flushMetadata } from './writeback.js';
import { qcow2WriteCompressed } from './compressed-write.js';
import { qcow2Truncate } from './resize.js';
import { toSnapshotInfo } from '../snapshot-lookup.js';

/** Largest chunk of explicit zeros written at once when the zero flag cannot be used. */
const ZERO_CHUNK = 1024 * 1024;

/** The instance of one open qcow2 image. */
export class Qcow2Instance implements BlockDriverInstance {
  private zeros: Uint8Array | null = null;

  constructor(readonly state: Qcow2State) {}

  private get nodeName(): string {
    return this.state.node.nodeName;
  }

  /** Reads guest data: allocated clusters from the file, compressed ones inflated, the rest zeros. */
  preadv(offset: number, buf: Uint8Array): Promise<void> {
    return qcow2Read(this.state, offset, buf);
  }

  /** Writes guest data, allocating (copy on write) where the cluster is missing or shared. */
  pwritev(offset: number, buf: Uint8Array): Promise<void> {
    this.refuseInTmpSnapshot('write');
    return qcow2Write(this.state, offset, buf);
  }

  /** Writes whole clusters compressed with zlib (convert -c). */
  pwriteCompressed(offset: number, buf: Uint8Array): Promise<void> {
    this.refuseInTmpSnapshot('write-compressed');
    return qcow2WriteCompressed(this.state, offset, buf);
  }

  /** Whole clusters get the zero flag (v3); partial clusters at either end are written with zeros. */
  async pwriteZeroes(offset: number, bytes: number, flags: WriteZeroesFlags): Promise<void> {
    this.refuseInTmpSnapshot('write-zeroes');
    const C = this.state.clusterSize;
    const end = offset + bytes;
    const firstFull = Math.ceil(offset / C) * C;
    const lastFull = Math.floor(end / C) * C;
    if (firstFull >= lastFull) {
      await this.writeExplicitZeroes(offset, bytes);
      return;
    }
    if (offset < firstFull) await this.writeExplicitZeroes(offset, firstFull - offset);
    const flagged = await qcow2ZeroClusters(this.state, firstFull, (lastFull - firstFull) / C, flags.mayUnmap === true, false);
    if (!flagged) await this.writeExplicitZeroes(firstFull, lastFull - firstFull);
    if (end > lastFull) await this.writeExplicitZeroes(lastFull, end - lastFull);
  }

  /** Whole clusters in the range become unallocated (they read as zeros); partial ones are kept. */
  async pdiscard(offset: number, bytes: number): Promise<void> {
    this.refuseInTmpSnapshot('discard');
    const C = this.state.clusterSize;
    const firstFull = Math.ceil(offset / C) * C;
    const lastFull = Math.floor((offset + bytes) / C) * C;
    if (firstFull < lastFull) await qcow2ZeroClusters(this.state, firstFull, (lastFull - firstFull) / C, true, true);
  }

  /**
   * Makes every completed write durable: the metadata changes in dependency order behind their
   * barriers (writeback.ts), then a flush of the file; only the file flush when nothing is dirty.
   */
  flush(): Promise<void> {
    const s = this.state;
    if (!s.metadataDirty) return s.flushFile('guest flush');
    return s.lock.run(() => flushMetadata(s));
  }

  /** The virtual disk size. */
  getLength(): number {
    return this.state.sizeBytes;
  }

  /** Changes the virtual size (QEMU's rules: no shrinking or v2 resizing with snapshots). */
  async truncate(sizeBytes: number): Promise<void> {
    this.refuseInTmpSnapshot('truncate');
    await qcow2Truncate(this.state, sizeBytes);
  }

  /** Writes VM-state bytes into the area past the guest disk (where QEMU puts it). */
  saveVmstate(buf: Uint8Array, pos: number): Promise<void> {
    this.refuseInTmpSnapshot('save-vmstate');
    return qcow2Write(this.state, this.state.vmStateOffset() + pos, buf);
  }

  /** Reads VM-state bytes from the area past the guest disk. */
  loadVmstate(buf: Uint8Array, pos: number): Promise<void> {
    return qcow2Read(this.state, this.state.vmStateOffset() + pos, buf);
  }

  /** Flushes (when writable) and drops the caches; the node is quiet. */
  async close(bql: Bql, drained: DrainedProof): Promise<void> {
    assertBql(bql, 'qcow2 close');
    assertDrained(bql, drained, this.state.node, 'qcow2 close');
    const s = this.state;
    // a corrupt or broken image takes no more writes: closing it only drops the caches
    try {
      if (!s.node.readOnly && s.broken === null) {
        if (s.metadataDirty) await s.lock.run(() => flushMetadata(s));
        else await s.flushFile('close');
      }
    } finally {
      s.l2Cache.clear();
      s.refblockCache.clear();
    }
  }

  /** Creates an internal snapshot of the active state; the ID is one more than the largest. */
  async snapshotCreate(bql: Bql, drained: DrainedProof, info: SnapshotInfo): Promise<SnapshotInfo> {
    this.enterSnapshotOp(bql, drained, 'snapshot-create');
    this.refuseInTmpSnapshot('snapshot-create');
    const sn = await createSnapshot(bql, drained, this.state, info);
    return toSnapshotInfo(sn);
  }

  /** Reverts the active state to the snapshot with this ID or name. */
  async snapshotGoto(bql: Bql, drained: DrainedProof, idOrName: string): Promise<void> {
    this.enterSnapshotOp(bql, drained, 'snapshot-goto');
    this.refuseInTmpSnapshot('snapshot-goto');
    await gotoSnapshot(bql, drained, this.state, idOrName);
  }

  /** Deletes the first snapshot that matches `id` and `name`. */
  async snapshotDelete(bql: Bql, drained: DrainedProof, id: string | null, name: string | null): Promise<SnapshotInfo> {
    this.enterSnapshotOp(bql, drained, 'snapshot-delete');
    this.refuseInTmpSnapshot('snapshot-delete');
    return toSnapshotInfo(await deleteSnapshot(bql, drained, this.state, id, name));
  }

  /** The snapshot table, in order. */
  async snapshotList(bql: Bql): Promise<SnapshotInfo[]> {
    assertBql(bql, 'qcow2 snapshot-list');
    return this.state.snapshots.map(toSnapshotInfo);
  }

  /** Shows a snapshot instead of the active state; the node must be read-only. */
  async snapshotLoadTmp(bql: Bql, id: string | null, name: string | null): Promise<void> {
    assertBql(bql, 'qcow2 snapshot-load-tmp');
    if (!this.state.node.readOnly) {
      throw new BlockError('EINVAL', `Device '${this.nodeName}' is not read-only: a snapshot can only be loaded temporarily on a read-only node`, {
        node: this.nodeName,
        op: 'snapshot-load-tmp',
      });
    }
    await loadSnapshotTemporarily(bql, this.state, id, name);
  }

  /** Which guest clusters hold data, zeros or nothing, and where the data lies in the file. */
  blockStatus(offset: number, bytes: number): Promise<BlockStatus> {
    return qcow2BlockStatus(this.state, offset, bytes);
  }

  /** The image's cluster size. */
  clusterSize(): number {
    return this.state.clusterSize;
  }

  /** What qemu-img info shows under "Format specific information". */
  formatSpecific(): Record<string, unknown> {
    const h = this.state.header;
    if (h.version === 2) return { type: 'qcow2', data: { compat: '0.10', 'compression-type': 'zlib', 'refcount-bits': this.state.refcountBits } };
    return {
      type: 'qcow2',
      data: {
        compat: '1.1',
        'compression-type': 'zlib',
        'lazy-refcounts': (h.compatibleFeatures & BigInt(COMPAT_LAZY_REFCOUNTS)) !== 0n,
        'refcount-bits': this.state.refcountBits,
        corrupt: (h.incompatibleFeatures & BigInt(INCOMPAT_CORRUPT)) !== 0n,
        'extended-l2': false,
      },
    };
  }

  private enterSnapshotOp(bql: Bql, drained: DrainedProof, op: string): void {
    assertBql(bql, `qcow2 ${op}`);
    assertDrained(bql, drained, this.state.node, `qcow2 ${op}`);
  }

  private refuseInTmpSnapshot(op: string): void {
    const tmp = this.state.tmpSnapshot;
    if (tmp !== null) {
      throw new BlockError('EPERM', `qcow2 node '${this.nodeName}' shows snapshot '${tmp}' temporarily and refuses ${op}`, { node: this.nodeName, op });
    }
  }

  private async writeExplicitZeroes(offset: number, bytes: number): Promise<void> {
    const chunk = Math.min(bytes, ZERO_CHUNK);
    if (this.zeros === null || this.zeros.length < chunk) this.zeros = new Uint8Array(Math.max(chunk, this.state.clusterSize));
    const zeros = this.zeros;
    for (let done = 0; done < bytes; ) {
      const n = Math.min(bytes - done, zeros.length);
      await qcow2Write(this.state, offset + done, zeros.subarray(0, n));
      done += n;
    }
  }
}

/**
 * Creating a qcow2 image as `qemu-img create -f qcow2` lays it out: the header cluster, the
 * refcount table, the refcount blocks that count the image's own metadata, then the active L1
 * table (so a default 64 KiB-cluster image is byte-for-byte the size qemu-img makes).
 * Planning is common code; `createQcow2File` (BQL) and `createQcow2OnNode` (BQL and a drained
 * proof covering the node) carry the plan out.
 */
import fs from 'node:fs';
import { isOwnBackingFile } from '../../block/backing.js';
import { openForCreate } from '../file/image-lock.js';
import { assertBql, type Bql } from '../../block/bql.js';
import { assertDrained, runInDrainedSection, type DrainedProof } from '../../block/drain.js';
import { BlockError, fromSystemError } from '../../block/errors.js';
import { bdrvPwrite, bdrvTruncate } from '../../block/io.js';
import type { BlockNode } from '../../block/node.js';
import { setEntry } from './entries.js';
import { EXT_FEATURE_TABLE } from './constants.js';
import { headerAreaBytes, newHeader, serializeHeader, setHeaderBacking } from './header.js';

/** What `img create -f qcow2 -o ...` accepts. */
export interface Qcow2CreateOptions {
  sizeBytes: number;
  /** Default 65536. */
  clusterSize?: number;
  /** Default 16. */
  refcountBits?: number;
  /** '0.10' (version 2) or '1.1' (version 3, the default). */
  compat?: '0.10' | '1.1';
  lazyRefcounts?: boolean;
  /** The backing file name written into the header (not opened here). */
  backingFile?: string;
  /** The backing file's format, recorded in the backing-format extension. */
  backingFormat?: string;
}

/** The bytes to write for a new image, and the file's final length. */
export interface Qcow2CreatePlan {
  writes: Array<{ offset: number; data: Uint8Array }>;
  fileLength: number;
}

function log2Exact(n: number, field: string, what: string): number {
  const bits = Math.log2(n);
  if (!Number.isInteger(bits)) {
    throw new BlockError('EINVAL', `${what} must be a power of two (${field}=${n})`, { field, value: n });
  }
  return bits;
}

/**
 * Plans a fresh image: header | refcount table | refcount blocks | L1, every cluster counted once.
 * @locking common
 */
export function planQcow2Create(o: Qcow2CreateOptions): Qcow2CreatePlan {
  const clusterSize = o.clusterSize ?? 65536;
  const clusterBits = log2Exact(clusterSize, 'cluster_size', 'Cluster size');
  if (clusterBits < 9 || clusterBits > 21) {
    throw new BlockError('EINVAL', `Cluster size must be a power of two between 512 and 2048k (cluster_size=${clusterSize})`, {
      field: 'cluster_size',
      value: clusterSize,
    });
  }
  const refcountBits = o.refcountBits ?? 16;
  const refcountOrder = log2Exact(refcountBits, 'refcount_bits', 'Refcount width');
  if (o.sizeBytes % 512 !== 0) {
    throw new BlockError('EINVAL', `Image size must be a multiple of 512 bytes (size=${o.sizeBytes})`, { field: 'size', value: o.sizeBytes });
  }
  const version = o.compat === '0.10' ? 2 : 3;
  const h = newHeader({ sizeBytes: o.sizeBytes, clusterBits, refcountOrder, version, lazyRefcounts: o.lazyRefcounts ?? false });
  if (o.backingFile !== undefined) setHeaderBacking(h, o.backingFile, o.backingFormat ?? null);
  // as qemu-img, the optional feature-name table is left out when it would fill the first cluster
  if (headerAreaBytes(h) >= clusterSize) h.extensions = h.extensions.filter((e) => e.type !== EXT_FEATURE_TABLE);
  if (o.backingFile === undefined && o.backingFormat !== undefined) {
    throw new BlockError('EINVAL', 'Backing format cannot be used without backing file', { field: 'backing_fmt', value: o.backingFormat });
  }
  const C = clusterSize;
  const E = (C * 8) / refcountBits;
  const l1Bytes = h.l1Size * 8;
  const l1Clusters = Math.ceil(l1Bytes / C);
  let refblocks = 1;
  let tableClusters = 1;
  for (;;) {
    const total = 1 + tableClusters + refblocks + l1Clusters;
    const needBlocks = Math.ceil(total / E);
    const needTable = Math.max(1, Math.ceil((needBlocks * 8) / C));
    if (needBlocks <= refblocks && needTable <= tableClusters) break;
    refblocks = Math.max(refblocks, needBlocks);
    tableClusters = Math.max(tableClusters, needTable);
  }
  const total = 1 + tableClusters + refblocks + l1Clusters;
  h.refcountTableOffset = C;
  h.refcountTableClusters = tableClusters;
  h.l1TableOffset = l1Clusters === 0 ? 0 : (1 + tableClusters + refblocks) * C;
  const table = new Uint8Array(tableClusters * C);
  const tableView = new DataView(table.buffer);
  const blocks = new Uint8Array(refblocks * C);
  const firstBlock = (1 + tableClusters) * C;
  for (let b = 0; b < refblocks; b++) setEntry(tableView, b, firstBlock + b * C, false);
  for (let ci = 0; ci < total; ci++) writeRefcountOne(blocks, ci, refcountBits);
  const writes = [
    { offset: 0, data: serializeHeader(h, C) },
    { offset: C, data: table },
    { offset: firstBlock, data: blocks },
  ];
  const fileLength = l1Clusters === 0 ? firstBlock + refblocks * C : h.l1TableOffset + l1Bytes;
  return { writes, fileLength };
}

/** Sets refcount slot `i` of a run of refcount blocks to 1 (big-endian; sub-byte widths fill each byte from its low bits). */
function writeRefcountOne(blocks: Uint8Array, i: number, bits: number): void {
  if (bits < 8) {
    const bit = i * bits;
    const byte = bit >> 3;
    blocks[byte] = (blocks[byte] ?? 0) | (1 << (bit & 7));
    return;
  }
  const bytes = bits / 8;
  blocks[i * bytes + bytes - 1] = 1;
}

/**
 * Creates (or overwrites) the host file `filename` as a fresh qcow2 image. Creating image files
 * is global state (it must not race an open of the same file in this process): the BQL is held.
 * @locking global-state
 */
export function createQcow2File(bql: Bql, filename: string, o: Qcow2CreateOptions): void {
  assertBql(bql, 'createQcow2File');
  if (o.backingFile !== undefined && isOwnBackingFile(filename, o.backingFile)) {
    throw new BlockError('EINVAL', `${filename}: Error: Trying to create an image with the same filename as the backing file`, { file: filename, field: 'backing_file', value: o.backingFile });
  }
  const plan = planQcow2Create(o);
  let fd = -1;
  let release = (): void => {};
  try {
    ({ fd, release } = openForCreate(bql, filename)); // the image lock first, as qemu-img create: a held image is refused, untouched
    for (const w of plan.writes) fs.writeSync(fd, w.data, 0, w.data.length, w.offset);
    fs.ftruncateSync(fd, plan.fileLength);
  } catch (e) {
    throw e instanceof BlockError ? e : fromSystemError(e, 'create', { file: filename });
  } finally {
    if (fd >= 0) fs.closeSync(fd);
    release();
  }
}

/**
 * Formats the protocol node `file` (memory, file, or a test layer) as a fresh qcow2 image. It
 * replaces everything on the node, so the node must be quiet: `drained` covers it (its own
 * section, a parent's that reaches it only, or drain-all), and the writes go as the section's owner.
 * @locking global-state
 */
export async function createQcow2OnNode(bql: Bql, drained: DrainedProof, file: BlockNode, o: Qcow2CreateOptions): Promise<void> {
  assertDrained(bql, drained, file, 'createQcow2OnNode');
  const plan = planQcow2Create(o);
  await runInDrainedSection(bql, drained, async () => {
    await bdrvTruncate(file, 0);
    for (const w of plan.writes) await bdrvPwrite(file, w.offset, w.data);
    await bdrvTruncate(file, plan.fileLength);
  });
}

/**
 * `snapstack img measure [--output=human|json] [-O fmt] [-o options] [--size N | [-f fmt]
 * [-l snapshot.name=TAG] [-U] FILE]`: qemu-img 7.2's measure for raw and qcow2 targets, with its
 * lines ("required size: N", "fully allocated size: N", and "bitmaps size: N" for a qcow2 source
 * and a v3 target: its persistent bitmaps as QEMU counts them), JSON keys, messages and exit codes.
 *
 * A source's data is what its block status calls data (through its backing chain), counted in
 * target clusters as QEMU counts it. Raw sources: Node cannot ask the file system for holes
 * (SEEK_HOLE), so 4 KiB blocks that read as zeros count as holes; QEMU counts zeros written into
 * a raw file as data, and the first block of a raw file qemu-img created is always allocated
 * (file-posix's allocate_first_block), so a raw source whose first cluster reads as zeros
 * measures one cluster less here than with qemu-img.
 */
import type { BlockStatus } from '../block/driver.js';
import { BlockError, isBlockError } from '../block/errors.js';
import { bdrvBlockStatus, bdrvGetLength, bdrvPread } from '../block/io.js';
import type { BlockNode } from '../block/node.js';
import { parseOptions, parseSize, type NodeOptions } from '../block/options.js';
import { Qcow2Instance } from '../drivers/qcow2/instance.js';
import { measureQcow2, measureRaw, persistentBitmapsSize, type MeasureResult } from '../drivers/qcow2/measure.js';
import { openImage } from '../image.js';
import { refuseUnknownOptions, takeFlag, takeForceShare, takeOutputJson } from './args.js';
import { describeError } from '../commands/format.js';
import type { Out } from './img-usage.js';
import { IMG_USAGE as USAGE } from './img-usage.js';

const P = 'snapstack img';
/** The granularity at which a raw source's zeros count as holes (a file system block). */
const HOLE_BLOCK = 4096;

const QCOW2_OPTIONS = ['size', 'compat', 'backing_file', 'backing_fmt', 'encryption', 'cluster_size', 'preallocation', 'lazy_refcounts', 'refcount_bits'];
const RAW_OPTIONS = ['size', 'preallocation'];
const PREALLOC = ['off', 'metadata', 'falloc', 'full'] as const;
type Prealloc = (typeof PREALLOC)[number];

/** Removes `--size N` / `--size=N`; the text given. */
function takeSize(args: string[]): string | undefined {
  let v: string | undefined;
  for (let i = 0; i < args.length; ) {
    const a = args[i] as string;
    if (a.startsWith('--size=')) {
      v = a.slice('--size='.length);
      args.splice(i, 1);
    } else if (a === '--size') {
      v = args[i + 1];
      if (v === undefined) throw new BlockError('EINVAL', "option '--size' requires an argument", { field: '--size' });
      args.splice(i, 2);
    } else i++;
  }
  return v;
}

/** The -l argument: snapshot.name=X, snapshot.id=X or a bare ID or name. */
function snapshotParam(text: string): string {
  if (!text.includes('=')) return text;
  const o = parseOptions(text);
  const v = o['snapshot.name'] ?? o['snapshot.id'];
  if (v === undefined) throw new BlockError('EINVAL', `Failed in parsing snapshot param '${text}'`, { field: '-l', value: text });
  return v;
}

/** A node's status at `offset` through its backing chain (QEMU's bdrv_block_status_above with no base). */
async function chainStatus(node: BlockNode, offset: number, bytes: number): Promise<{ st: BlockStatus; node: BlockNode }> {
  const st = await bdrvBlockStatus(node, offset, bytes);
  const backing = node.backing;
  if (st.allocated || backing === undefined) return { st, node };
  const reach = bdrvGetLength(backing) - offset;
  if (reach <= 0) return { st: { ...st, zero: true, data: false }, node };
  return chainStatus(backing, offset, Math.min(st.bytes, reach));
}

/** True when `buf` holds only zeros. */
function allZero(buf: Uint8Array): boolean {
  for (let i = 0; i < buf.length; i++) if (buf[i] !== 0) return false;
  return true;
}

/**
 * The number of target clusters of `clusterSize` bytes that hold any data of `root`'s first
 * `size` bytes (QEMU's loop: each data run counts from its cluster's start to its cluster's end).
 */
async function dataClusters(root: BlockNode, size: number, clusterSize: number): Promise<number> {
  let count = 0;
  let countedEnd = 0; // clusters below this offset are counted already
  const mark = (from: number, to: number): void => {
    const first = Math.max(Math.floor(from / clusterSize) * clusterSize, countedEnd);
    const end = Math.ceil(to / clusterSize) * clusterSize;
    if (end > first) {
      count += (end - first) / clusterSize;
      countedEnd = end;
    }
  };
  const block = new Uint8Array(HOLE_BLOCK);
  for (let off = 0; off < size; ) {
    const { st, node } = await chainStatus(root, off, size - off);
    const n = Math.max(1, Math.min(st.bytes, size - off));
    if (!st.zero && st.data && st.allocated) {
      if (node.driver.formatName === 'raw') {
        // no hole information from the file: a block of zeros counts as a hole
        for (let p = off; p < off + n; p += HOLE_BLOCK) {
          const len = Math.min(HOLE_BLOCK, off + n - p);
          const view = block.subarray(0, len);
          await bdrvPread(node, p, view);
          if (!allZero(view)) mark(p, p + len);
        }
      } else mark(off, off + n);
    }
    off += n;
  }
  return count;
}

/** The qcow2 target's options as measure takes them; throws qemu-img's message when one is wrong. */
function qcow2Target(o: NodeOptions): { clusterSize: number; refcountOrder: number; preallocation: Prealloc; hasBackingFile: boolean; v3: boolean } {
  const clusterSize = o['cluster_size'] === undefined ? 65536 : parseSize(o['cluster_size'], 'cluster_size');
  if (clusterSize < 512 || clusterSize > 2 * 1024 * 1024 || (clusterSize & (clusterSize - 1)) !== 0) {
    throw new BlockError('EINVAL', 'Cluster size must be a power of two between 512 and 2048k', { field: 'cluster_size', value: clusterSize });
  }
  const compat = o['compat'] ?? '1.1';
  if (!['0.10', '1.1', 'v2', 'v3'].includes(compat)) throw new BlockError('EINVAL', `Invalid compatibility level: '${compat}'`, { field: 'compat', value: compat });
  const v3 = compat === '1.1' || compat === 'v3';
  const bits = o['refcount_bits'] === undefined ? 16 : parseSize(o['refcount_bits'], 'refcount_bits');
  if (bits < 1 || bits > 64 || (bits & (bits - 1)) !== 0) {
    throw new BlockError('EINVAL', 'Refcount width must be a power of two and may not exceed 64 bits', { field: 'refcount_bits', value: bits });
  }
  if (!v3 && bits !== 16) {
    throw new BlockError('EINVAL', 'Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)', { field: 'refcount_bits', value: bits });
  }
  return { clusterSize, refcountOrder: Math.log2(bits), preallocation: preallocOf(o), hasBackingFile: o['backing_file'] !== undefined, v3 };
}

function preallocOf(o: NodeOptions): Prealloc {
  const p = o['preallocation'] ?? 'off';
  const mode = PREALLOC.find((m) => m === p);
  if (mode === undefined) throw new BlockError('EINVAL', `Invalid parameter '${p}'`, { field: 'preallocation', value: p });
  return mode;
}

/** Runs `img measure ARGS`; returns the exit status. */
export async function imgMeasure(argv: string[], out: Out, err: Out): Promise<number> {
  const args = [...argv];
  const json = takeOutputJson(args);
  const sizeText = takeSize(args);
  const dstFmt = takeFlag(args, '-O') ?? 'raw';
  const optText = takeFlag(args, '-o');
  const srcFmt = takeFlag(args, '-f');
  const snap = takeFlag(args, '-l');
  const forceShare = takeForceShare(args);
  refuseUnknownOptions(args, USAGE);
  if (args.length > 1) {
    err(`${P}: Expecting at most one filename\nTry 'snapstack img --help' for more information`);
    return 1;
  }
  const file = args[0];
  if (file !== undefined && sizeText !== undefined) {
    err(`${P}: --size N cannot be used together with a filename.`);
    return 1;
  }
  if (file === undefined && sizeText === undefined) {
    err(`${P}: Either --size N or one filename must be specified.`);
    return 1;
  }
  let size = 0;
  if (sizeText !== undefined) {
    try {
      size = parseSize(sizeText, 'size');
    } catch {
      err(`${P}: Invalid image size specified. You may use k, M, G, T, P or E suffixes for `);
      err(`${P}: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.`);
      return 1;
    }
  }
  if (dstFmt !== 'raw' && dstFmt !== 'qcow2') {
    err(`${P}: Unknown file format '${dstFmt}'`);
    return 1;
  }
  let target: ReturnType<typeof qcow2Target> | null = null;
  try {
    const o = parseOptions(optText ?? '');
    const known = dstFmt === 'qcow2' ? QCOW2_OPTIONS : RAW_OPTIONS;
    const bad = Object.keys(o).find((k) => !known.includes(k));
    if (bad !== undefined) {
      err(`${P}: Invalid parameter '${bad}'`);
      err(`${P}: Invalid options for file format '${dstFmt}'`);
      return 1;
    }
    if (o['size'] !== undefined && sizeText === undefined && file === undefined) size = parseSize(o['size'], 'size');
    if (dstFmt === 'qcow2') target = qcow2Target(o);
    else preallocOf(o);
  } catch (e) {
    err(`${P}: ${isBlockError(e) ? e.message : describeError(e)}`);
    return 1;
  }

  let result: MeasureResult;
  let bitmaps: number | null = null;
  try {
    if (file === undefined) {
      result = target === null ? measureRaw(size, false) : measureQcow2(target, size, null);
    } else {
      const img = await openImage(file, { aio: 'sync', readOnly: true, forceShare, ...(srcFmt === undefined ? {} : { format: srcFmt }) });
      try {
        if (snap !== undefined) await img.loadSnapshotTemporarily(snapshotParam(snap));
        const root = img.backend.root;
        if (root === null) throw new BlockError('ENOMEDIUM', `Device '${img.name}' has no medium`, { node: img.name });
        const srcSize = img.size;
        if (target === null) result = measureRaw(srcSize, true);
        else {
          const clusters = target.hasBackingFile ? 0 : await dataClusters(root, srcSize, target.clusterSize);
          result = measureQcow2(target, srcSize, clusters);
          const inst = root.instance;
          if (target.v3 && inst instanceof Qcow2Instance) bitmaps = await persistentBitmapsSize(inst.state, target.clusterSize);
        }
      } finally {
        await img.close();
      }
    }
  } catch (e) {
    err(`${P}: ${isBlockError(e) ? e.message : describeError(e)}`);
    return 1;
  }
  if (json) {
    const o: Record<string, number> = {};
    if (bitmaps !== null) o['bitmaps'] = bitmaps;
    o['required'] = result.required;
    o['fully-allocated'] = result.fullyAllocated;
    out(JSON.stringify(o, null, 4));
  } else {
    out(`required size: ${result.required}`);
    out(`fully allocated size: ${result.fullyAllocated}`);
    if (bitmaps !== null) out(`bitmaps size: ${bitmaps}`);
  }
  return 0;
}

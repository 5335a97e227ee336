/**
 * The request path at node level: read, write, write-zeroes, discard, flush, length, truncate.
 *
 * I/O code: every function here may run at any time, alongside other requests on the same node,
 * and takes no proof. Each request is checked (offset and length whole, non-negative, without
 * overflow; inside the node for format nodes; not a write to a read-only node), counted in the
 * node's `inFlight` from entry to completion (success or error), and handed to the driver.
 * Protocol nodes may be written past their end (files grow) and read past it (zeros), as in QEMU.
 * Before all that, the request gate (request-gate.ts) holds a request to a drained node that
 * neither the section's owner nor a parent's in-flight request made, until the section ends.
 */
import { aioWaitKick } from './aio-wait.js';
import type { BlockStatus, WriteFlags, WriteZeroesFlags } from './driver.js';
import { BlockError } from './errors.js';
import { nodeRequestBegin, nodeRequestEnd, type BlockNode } from './node.js';
import { gateRequest } from './request-gate.js';

/** Largest request or offset accepted (QEMU's BDRV_MAX_LENGTH is about 2^63; ours is 2^53). */
export const MAX_REQUEST_OFFSET = Number.MAX_SAFE_INTEGER;

/**
 * Throws a typed error if the request is malformed for `node`: EINVAL for a negative, fractional
 * or overflowing range, or one past the end of a format node; EPERM for a write to a read-only node.
 * @locking io
 */
export function checkRequest(node: BlockNode, op: string, offset: number, bytes: number, isWrite: boolean): void {
  if (!Number.isSafeInteger(offset) || offset < 0) {
    throw new BlockError('EINVAL', `${op} on node '${node.nodeName}': invalid offset ${offset}`, { node: node.nodeName, op, field: 'offset', value: offset });
  }
  if (!Number.isSafeInteger(bytes) || bytes < 0 || offset + bytes > MAX_REQUEST_OFFSET) {
    throw new BlockError('EINVAL', `${op} on node '${node.nodeName}': invalid length ${bytes} at offset ${offset}`, {
      node: node.nodeName,
      op,
      field: 'bytes',
      value: bytes,
    });
  }
  if (isWrite && node.readOnly) {
    throw new BlockError('EPERM', `${op} on node '${node.nodeName}': the node is read-only`, { node: node.nodeName, op });
  }
  if (node.driver.kind === 'format') {
    const len = node.drv.getLength();
    if (offset + bytes > len) {
      throw new BlockError('EINVAL', `${op} on node '${node.nodeName}': ${bytes} bytes at offset ${offset} run past the end (${len} bytes)`, {
        node: node.nodeName,
        op,
        field: 'offset',
        value: offset,
      });
    }
  }
}

function decInFlight(node: BlockNode): void {
  if (nodeRequestEnd(node) === 0) aioWaitKick();
}

/**
 * Reads `buf.length` bytes at `offset` of `node` into `buf`.
 * @locking io
 */
export async function bdrvPread(node: BlockNode, offset: number, buf: Uint8Array): Promise<void> {
  const gate = gateRequest(node, 'read');
  if (gate !== null) await gate;
  checkRequest(node, 'read', offset, buf.length, false);
  nodeRequestBegin(node);
  try {
    await node.drv.preadv(offset, buf);
  } finally {
    decInFlight(node);
  }
}

/** The flags of a FUA write, made once (the write path allocates nothing per request). */
const FUA: WriteFlags = Object.freeze({ fua: true });

/**
 * Writes `buf` at `offset` of `node`; with `flags.fua` the bytes are durable when it resolves
 * (passed to a driver that supports FUA, else the node is flushed after the write).
 * @locking io
 */
export async function bdrvPwrite(node: BlockNode, offset: number, buf: Uint8Array, flags?: WriteFlags): Promise<void> {
  const gate = gateRequest(node, 'write');
  if (gate !== null) await gate;
  checkRequest(node, 'write', offset, buf.length, true);
  nodeRequestBegin(node);
  try {
    const drv = node.drv;
    if (flags?.fua !== true) await drv.pwritev(offset, buf);
    else if (drv.supportsFua === true) await drv.pwritev(offset, buf, FUA);
    else {
      // FUA emulated as QEMU does: the write, then a flush of the node within the same request
      await drv.pwritev(offset, buf);
      await drv.flush();
    }
  } finally {
    decInFlight(node);
  }
}

/**
 * Writes `buf` at `offset` of `node` compressed (qemu-img convert -c): whole clusters of the
 * format, the last one of the disk possibly short; 0 bytes ends a run of compressed writes (qcow2
 * rounds its file up to whole sectors). ENOTSUP when the node's driver cannot compress.
 * @locking io
 */
export async function bdrvPwriteCompressed(node: BlockNode, offset: number, buf: Uint8Array): Promise<void> {
  const gate = gateRequest(node, 'write-compressed');
  if (gate !== null) await gate;
  checkRequest(node, 'write-compressed', offset, buf.length, true);
  const drv = node.drv;
  if (drv.pwriteCompressed === undefined) {
    throw new BlockError('ENOTSUP', `write-compressed on node '${node.nodeName}': Compression not supported for this file format (${node.driver.formatName})`, {
      node: node.nodeName,
      op: 'write-compressed',
    });
  }
  nodeRequestBegin(node);
  try {
    await drv.pwriteCompressed(offset, buf);
  } finally {
    decInFlight(node);
  }
}

/**
 * Makes `bytes` bytes at `offset` of `node` read as zeros; `flags.fua` as for bdrvPwrite.
 * @locking io
 */
export async function bdrvPwriteZeroes(node: BlockNode, offset: number, bytes: number, flags: WriteZeroesFlags = {}): Promise<void> {
  const gate = gateRequest(node, 'write-zeroes');
  if (gate !== null) await gate;
  checkRequest(node, 'write-zeroes', offset, bytes, true);
  nodeRequestBegin(node);
  try {
    const drv = node.drv;
    if (flags.fua !== true || drv.supportsFua === true) await drv.pwriteZeroes(offset, bytes, flags);
    else {
      await drv.pwriteZeroes(offset, bytes, { ...flags, fua: false });
      await drv.flush();
    }
  } finally {
    decInFlight(node);
  }
}

/**
 * Discards `bytes` bytes at `offset` of `node` (a hint; the contents become unspecified).
 * @locking io
 */
export async function bdrvPdiscard(node: BlockNode, offset: number, bytes: number): Promise<void> {
  const gate = gateRequest(node, 'discard');
  if (gate !== null) await gate;
  checkRequest(node, 'discard', offset, bytes, true);
  nodeRequestBegin(node);
  try {
    await node.drv.pdiscard(offset, bytes);
  } finally {
    decInFlight(node);
  }
}

/**
 * Makes every completed write on `node` durable.
 * @locking io
 */
export async function bdrvFlush(node: BlockNode): Promise<void> {
  const gate = gateRequest(node, 'flush');
  if (gate !== null) await gate;
  nodeRequestBegin(node);
  try {
    if (!node.readOnly) await node.drv.flush();
  } finally {
    decInFlight(node);
  }
}

/**
 * What the range from `offset` holds (data, zeros, unallocated) and where it lies in the node's
 * `file` child; drivers without block status report data at the same offset.
 * @locking io
 */
export async function bdrvBlockStatus(node: BlockNode, offset: number, bytes: number): Promise<BlockStatus> {
  const gate = gateRequest(node, 'block-status');
  if (gate !== null) await gate;
  checkRequest(node, 'block-status', offset, bytes, false);
  const drv = node.drv;
  if (drv.blockStatus === undefined) return { bytes, data: true, zero: false, allocated: true, hostOffset: offset };
  nodeRequestBegin(node);
  try {
    return await drv.blockStatus(offset, bytes);
  } finally {
    decInFlight(node);
  }
}

/**
 * The node's length in bytes (virtual size for a format node).
 * @locking io
 */
export function bdrvGetLength(node: BlockNode): number {
  return node.drv.getLength();
}

/**
 * Resizes `node` to `sizeBytes`; bytes added read as zeros.
 * @locking io
 */
export async function bdrvTruncate(node: BlockNode, sizeBytes: number): Promise<void> {
  const gate = gateRequest(node, 'truncate');
  if (gate !== null) await gate;
  if (!Number.isSafeInteger(sizeBytes) || sizeBytes < 0) {
    throw new BlockError('EINVAL', `truncate on node '${node.nodeName}': invalid size ${sizeBytes}`, {
      node: node.nodeName,
      op: 'truncate',
      field: 'size',
      value: sizeBytes,
    });
  }
  if (node.readOnly) {
    throw new BlockError('EPERM', `truncate on node '${node.nodeName}': the node is read-only`, { node: node.nodeName, op: 'truncate' });
  }
  nodeRequestBegin(node);
  try {
    await node.drv.truncate(sizeBytes);
  } finally {
    decInFlight(node);
  }
}

/** The node that stores VM state for `node`: itself, or the first one down its `file` chain. */
function vmstateNode(node: BlockNode, op: string): BlockNode {
  let cur: BlockNode | undefined = node;
  for (let depth = 0; cur !== undefined && depth < 16; depth++) {
    if (cur.drv.saveVmstate !== undefined && cur.drv.loadVmstate !== undefined) return cur;
    cur = cur.file;
  }
  throw new BlockError('ENOTSUP', `${op}: node '${node.nodeName}' (${node.driver.formatName}) cannot store VM state`, { node: node.nodeName, op });
}

/**
 * True when `node` (or a node down its `file` chain) can store VM state.
 * @locking io
 */
export function bdrvCanStoreVmstate(node: BlockNode): boolean {
  try {
    vmstateNode(node, 'vmstate');
    return true;
  } catch {
    return false;
  }
}

/**
 * Writes VM-state bytes at `pos` of the node's VM-state area (QEMU's bdrv_co_writev_vmstate).
 * @locking io
 */
export async function bdrvSaveVmstate(node: BlockNode, buf: Uint8Array, pos: number): Promise<void> {
  const gate = gateRequest(node, 'save-vmstate');
  if (gate !== null) await gate;
  const target = vmstateNode(node, 'save-vmstate');
  if (!Number.isSafeInteger(pos) || pos < 0) {
    throw new BlockError('EINVAL', `save-vmstate on node '${node.nodeName}': invalid position ${pos}`, { node: node.nodeName, field: 'pos', value: pos });
  }
  if (target.readOnly) throw new BlockError('EPERM', `save-vmstate on node '${target.nodeName}': the node is read-only`, { node: target.nodeName });
  nodeRequestBegin(node);
  try {
    await (target.drv.saveVmstate as (b: Uint8Array, p: number) => Promise<void>).call(target.drv, buf, pos);
  } finally {
    decInFlight(node);
  }
}

/**
 * Reads VM-state bytes at `pos` of the node's VM-state area (QEMU's bdrv_co_readv_vmstate).
 * @locking io
 */
export async function bdrvLoadVmstate(node: BlockNode, buf: Uint8Array, pos: number): Promise<void> {
  const gate = gateRequest(node, 'load-vmstate');
  if (gate !== null) await gate;
  const target = vmstateNode(node, 'load-vmstate');
  if (!Number.isSafeInteger(pos) || pos < 0) {
    throw new BlockError('EINVAL', `load-vmstate on node '${node.nodeName}': invalid position ${pos}`, { node: node.nodeName, field: 'pos', value: pos });
  }
  nodeRequestBegin(node);
  try {
    await (target.drv.loadVmstate as (b: Uint8Array, p: number) => Promise<void>).call(target.drv, buf, pos);
  } finally {
    decInFlight(node);
  }
}

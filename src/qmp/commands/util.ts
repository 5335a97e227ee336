/**
 * What the QMP command groups share: reading validated arguments, turning the block layer's
 * errors into QMP's, and finding a device or node the way QEMU's block commands do.
 *
 * Common code, except `lookupDevice` and `rootNodeOf`, which read the graph tables (global state:
 * the caller holds the BQL).
 */
import type { BlockBackend } from '../../block/backend.js';
import { assertBql, type Bql } from '../../block/bql.js';
import { BlockError } from '../../block/errors.js';
import { BdrvChild, type BlockNode } from '../../block/node.js';
import { allBackends, allNodes } from '../../block/registry.js';
import type { Machine } from '../../machine/machine.js';
import { QmpError, type QmpContext, type QmpObject } from '../types.js';

/**
 * The string argument `name` (the schema checked its type); undefined when left out.
 * @locking common
 */
export function optStr(args: QmpObject, name: string): string | undefined {
  const v = args[name];
  return typeof v === 'string' ? v : undefined;
}

/**
 * The string argument `name` that the schema requires.
 * @locking common
 */
export function reqStr(args: QmpObject, name: string): string {
  const v = args[name];
  if (typeof v !== 'string') throw new QmpError('GenericError', `Parameter '${name}' is missing`);
  return v;
}

/**
 * The boolean argument `name`, or `fallback` when left out.
 * @locking common
 */
export function optBool(args: QmpObject, name: string, fallback: boolean): boolean {
  const v = args[name];
  return typeof v === 'boolean' ? v : fallback;
}

/**
 * The integer argument `name`; undefined when left out.
 * @locking common
 */
export function optInt(args: QmpObject, name: string): number | undefined {
  const v = args[name];
  return typeof v === 'number' ? v : undefined;
}

/**
 * A QmpError for any failure: a QmpError as it is, a BlockError's message (its first line: QEMU
 * keeps hints out of `desc`) as GenericError.
 * @locking common
 */
export function toQmpError(e: unknown): QmpError {
  if (e instanceof QmpError) return e;
  const message = e instanceof Error ? e.message : String(e);
  return new QmpError('GenericError', message.split('\n')[0] ?? message);
}

/**
 * Runs `fn` and rethrows whatever it throws as a QmpError.
 * @locking common
 */
export async function qmpErrors<T>(fn: () => Promise<T> | T): Promise<T> {
  try {
    return await fn();
  } catch (e) {
    throw toQmpError(e);
  }
}

/** What a `device` argument names: a backend (and its root) or a node. */
export interface DeviceLookup {
  blk: BlockBackend | null;
  node: BlockNode | null;
}

/**
 * The backend or node `device` names, as QEMU's bdrv_lookup_bs: the backend first, then the
 * node; QEMU's "Cannot find device='x' nor node-name='x'" otherwise.
 * @locking global-state
 */
export function lookupDevice(bql: Bql, device: string): DeviceLookup {
  assertBql(bql, 'lookup device');
  const blk = allBackends.get(device);
  if (blk !== undefined) return { blk, node: blk.root };
  const node = allNodes.get(device);
  if (node !== undefined) return { blk: null, node };
  throw new QmpError('GenericError', `Cannot find device='${device}' nor node-name='${device}'`);
}

/**
 * The root node `device` names (QEMU's qmp_get_root_bs): a backend's node ("Device 'x' has no
 * medium" when empty), or a node no other node uses ("Need a root block node").
 * @locking global-state
 */
export function rootNodeOf(bql: Bql, device: string): BlockNode {
  const found = lookupDevice(bql, device);
  if (found.node === null) throw new QmpError('GenericError', `Device '${device}' has no medium`);
  if (found.blk === null) {
    for (const p of found.node.parents) if (p instanceof BdrvChild) throw new QmpError('GenericError', 'Need a root block node');
  }
  return found.node;
}

/**
 * True when `e` is a BlockError with `code`.
 * @locking common
 */
export function hasCode(e: unknown, code: BlockError['code']): boolean {
  return e instanceof BlockError && e.code === code;
}

/**
 * The machine of this monitor, or CommandNotFound when it runs none (the daemon).
 * @locking common
 */
export function machineOf(ctx: QmpContext): Machine {
  if (ctx.machine === null) throw new QmpError('CommandNotFound', 'this monitor runs no machine');
  return ctx.machine;
}

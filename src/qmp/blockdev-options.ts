/**
 * blockdev-add's options (QAPI's BlockdevOptions) checked as QEMU checks them and translated to
 * the block layer's NodeOptions, and the one `blockdevAdd` that QMP's blockdev-add and the
 * daemon's `--blockdev` both call.
 *
 * Global-state code: blockdevAdd takes the `Bql` (it opens nodes); the checking and translation
 * are pure. The same options arrive two ways: QMP sends JSON types (`"read-only": true`), while
 * QEMU's dotted key syntax (`--blockdev driver=file,filename=x,read-only=on`) gives every scalar
 * as a string; both are accepted unless `strict` (QMP) asks for JSON types only, as QEMU's QMP
 * input visitor does. Errors are QEMU's texts ("Parameter 'driver' does not accept value 'x'",
 * "Invalid parameter type for 'read-only', expected: boolean", "Parameter 'x' is unexpected",
 * "Parameter 'filename' is missing", "'node-name' must be specified for the root node").
 *
 * Drivers: file, nbd (`server`: a SocketAddress object, inet or unix; `export`, `tls-creds`,
 * `tls-hostname`, `reconnect-delay`, `open-timeout`), raw, qcow2 (`backing`: null, a node name or nested options) as in QEMU, and
 * snapstack's own `memory` (`size`, RAM-backed). `iothread` (binding a node's transfers to an
 * IOThread) is snapstack's extension; QEMU binds IOThreads to devices and exports instead.
 */
import { assertBql, type Bql } from '../block/bql.js';
import { BlockError } from '../block/errors.js';
import { findNode, openNode, releaseNode, retainNode } from '../block/graph.js';
import type { BlockNode } from '../block/node.js';
import { parseSize, type NodeOptions } from '../block/options.js';
import { allBackends, allNodes } from '../block/registry.js';
import '../drivers/index.js';
import { QmpError, type QmpField, type QmpObject, type QmpValue } from './types.js';

/** How an option is handled: translated, accepted and ignored (a hint), or refused. */
type Support = 'yes' | 'ignored' | 'no';

/** The type of one BlockdevOptions member. */
type OptType =
  | 'str'
  | 'bool'
  | 'int'
  /** QAPI's uint32 (reconnect-delay, open-timeout). */
  | 'uint32'
  | 'size'
  | { enum: readonly string[] }
  /** BlockdevRef: a node name or nested options. */
  | 'ref'
  /** BlockdevRefOrNull: as 'ref', or null for none. */
  | 'refOrNull'
  | { struct: readonly OptField[] }
  /**
   * A flat QAPI union (SocketAddress): `type` picks the branch's members; its members become
   * dotted keys under the member's name (`server.type`, `server.path`).
   */
  | { union: Readonly<Record<string, readonly OptField[] | 'unsupported'>> };

interface OptField {
  name: string;
  type: OptType;
  required?: boolean;
  support?: Support;
}

/** Drivers blockdev-add knows: QEMU's names for file/nbd/raw/qcow2, and snapstack's memory. */
export const BLOCKDEV_DRIVERS = ['file', 'memory', 'nbd', 'qcow2', 'raw'] as const;

/** Protocol drivers: they take force-share themselves (a format passes it to its file child). */
const PROTOCOL_DRIVERS: ReadonlySet<string> = new Set(['file', 'nbd']);

/**
 * QAPI's SocketAddress (discriminator `type`): InetSocketAddress (host and port both strings) and
 * UnixSocketAddress as QEMU declares them; vsock and fd are refused (the NBD client has neither).
 */
const SOCKET_ADDRESS: OptType = {
  union: {
    inet: [
      { name: 'host', type: 'str', required: true },
      { name: 'port', type: 'str', required: true },
      { name: 'numeric', type: 'bool', support: 'no' },
      { name: 'to', type: 'int', support: 'no' },
      { name: 'ipv4', type: 'bool', support: 'no' },
      { name: 'ipv6', type: 'bool', support: 'no' },
      { name: 'keep-alive', type: 'bool', support: 'no' },
      { name: 'mptcp', type: 'bool', support: 'no' },
    ],
    unix: [
      { name: 'path', type: 'str', required: true },
      { name: 'abstract', type: 'bool', support: 'no' },
      { name: 'tight', type: 'bool', support: 'no' },
    ],
    vsock: 'unsupported',
    fd: 'unsupported',
  },
};

/** QAPI's BlockdevOptions base members (the ones every driver has), plus snapstack's iothread. */
const BASE_FIELDS: readonly OptField[] = [
  { name: 'driver', type: { enum: BLOCKDEV_DRIVERS }, required: true },
  { name: 'node-name', type: 'str' },
  { name: 'discard', type: { enum: ['ignore', 'unmap'] }, support: 'ignored' },
  {
    name: 'cache',
    type: {
      struct: [
        { name: 'direct', type: 'bool', support: 'no' },
        { name: 'no-flush', type: 'bool', support: 'no' },
      ],
    },
  },
  { name: 'read-only', type: 'bool' },
  { name: 'auto-read-only', type: 'bool', support: 'ignored' },
  { name: 'force-share', type: 'bool' },
  { name: 'detect-zeroes', type: { enum: ['off', 'on', 'unmap'] }, support: 'no' },
  { name: 'iothread', type: 'str' },
];

/** Each driver's own members (QAPI's BlockdevOptionsFile, -Raw, -Qcow2; memory is ours). */
const DRIVER_FIELDS: Readonly<Record<(typeof BLOCKDEV_DRIVERS)[number], readonly OptField[]>> = {
  file: [
    { name: 'filename', type: 'str', required: true },
    { name: 'pr-manager', type: 'str', support: 'no' },
    { name: 'locking', type: { enum: ['off', 'on', 'auto'] } },
    // 'sync' is snapstack's: transfers on the main loop itself
    { name: 'aio', type: { enum: ['threads', 'native', 'io_uring', 'sync'] } },
    { name: 'aio-max-batch', type: 'int', support: 'no' },
    // snapstack's: small reads on the main loop while nothing else of the node is in flight
    { name: 'inline-reads', type: 'bool' },
    { name: 'drop-cache', type: 'bool', support: 'ignored' },
    { name: 'x-check-cache-dropped', type: 'bool', support: 'ignored' },
  ],
  memory: [{ name: 'size', type: 'size', required: true }],
  // QAPI's BlockdevOptionsNbd, in its order
  nbd: [
    { name: 'server', type: SOCKET_ADDRESS, required: true },
    { name: 'export', type: 'str' },
    { name: 'tls-creds', type: 'str' },
    { name: 'tls-hostname', type: 'str' },
    { name: 'x-dirty-bitmap', type: 'str', support: 'no' },
    { name: 'reconnect-delay', type: 'uint32' },
    { name: 'open-timeout', type: 'uint32' },
  ],
  raw: [
    { name: 'file', type: 'ref', required: true },
    { name: 'offset', type: 'int', support: 'no' },
    { name: 'size', type: 'int', support: 'no' },
  ],
  qcow2: [
    { name: 'file', type: 'ref', required: true },
    { name: 'backing', type: 'refOrNull' },
    { name: 'lazy-refcounts', type: 'bool', support: 'no' },
    { name: 'pass-discard-request', type: 'bool', support: 'ignored' },
    { name: 'pass-discard-snapshot', type: 'bool', support: 'ignored' },
    { name: 'pass-discard-other', type: 'bool', support: 'ignored' },
    { name: 'cache-size', type: 'size', support: 'no' },
    { name: 'l2-cache-size', type: 'size' },
    { name: 'l2-cache-entry-size', type: 'size', support: 'no' },
    { name: 'refcount-cache-size', type: 'size', support: 'no' },
    { name: 'cache-clean-interval', type: 'int', support: 'no' },
    { name: 'data-file', type: 'ref', support: 'no' },
  ],
};

/**
 * blockdev-add's top-level members for the command's schema (the union over the drivers, each
 * optional and of type 'any': blockdevAdd checks them per driver, with QEMU's dotted names).
 * @locking common
 */
export function blockdevAddFields(): QmpField[] {
  const seen = new Set<string>();
  const out: QmpField[] = [];
  for (const f of [...BASE_FIELDS, ...Object.values(DRIVER_FIELDS).flat()]) {
    if (seen.has(f.name)) continue;
    seen.add(f.name);
    out.push({ name: f.name, type: 'any', optional: f.name !== 'driver' });
  }
  return out;
}

/** Options for checking blockdev-add's arguments. */
export interface BlockdevAddOptions {
  /** JSON types only (QMP's input visitor); otherwise strings are accepted too (the key syntax). */
  strict?: boolean;
}

function fail(desc: string): never {
  throw new QmpError('GenericError', desc);
}

function typeName(t: OptType): string {
  if (t === 'str') return 'string';
  if (t === 'bool') return 'boolean';
  if (t === 'int' || t === 'uint32' || t === 'size') return 'integer';
  if (t === 'ref') return 'BlockdevRef';
  if (t === 'refOrNull') return 'BlockdevRefOrNull';
  if ('enum' in t) return 'string';
  return 'object';
}

function isObject(v: QmpValue | undefined): v is QmpObject {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/**
 * Turns dotted keys (`file.filename`, as a key=value parser may leave them) into nested objects,
 * as QEMU's keyval does; EINVAL-like GenericError when a key is both a scalar and an object.
 */
function nestDottedKeys(opts: QmpObject, path: string): QmpObject {
  const out: QmpObject = {};
  for (const [key, value] of Object.entries(opts)) {
    const dot = key.indexOf('.');
    const v = isObject(value) ? nestDottedKeys(value, `${path}${key}.`) : value;
    if (dot < 0) {
      const prev = out[key];
      if (prev !== undefined) {
        if (isObject(prev) && isObject(v)) out[key] = nestDottedKeys({ ...prev, ...v }, `${path}${key}.`);
        else fail(`Parameter '${path}${key}' is given twice`);
      } else out[key] = v;
      continue;
    }
    const head = key.slice(0, dot);
    const rest = key.slice(dot + 1);
    const prev = out[head];
    if (prev !== undefined && !isObject(prev)) fail(`Parameters '${path}${head}.*' used inconsistently`);
    const inner: QmpObject = isObject(prev) ? prev : {};
    out[head] = nestDottedKeys({ ...inner, [rest]: v }, `${path}${head}.`);
  }
  return out;
}

/** Reads one scalar member in the visitor's way; returns its NodeOptions text. */
function scalar(name: string, type: OptType, v: QmpValue, strict: boolean): string {
  const wrongType = (): never => fail(`Invalid parameter type for '${name}', expected: ${typeName(type)}`);
  if (type === 'str') {
    if (typeof v !== 'string') wrongType();
    return v as string;
  }
  if (type === 'bool') {
    if (typeof v === 'boolean') return v ? 'on' : 'off';
    if (strict || typeof v !== 'string') return wrongType();
    if (['on', 'yes', 'true', 'y'].includes(v)) return 'on';
    if (['off', 'no', 'false', 'n'].includes(v)) return 'off';
    return fail(`Parameter '${name}' expects 'on' or 'off'`);
  }
  if (type === 'uint32') {
    // QEMU reads a uint64 (any other type, a fraction: "expects uint64"), then checks uint32's range
    let n: number;
    if (typeof v === 'number' && Number.isInteger(v)) n = v;
    else if (!strict && typeof v === 'string' && /^-?\d+$/.test(v)) n = Number(v);
    else return fail(`Parameter '${name}' expects uint64`);
    if (n < 0 || n > 0xffffffff) fail(`Parameter '${name}' expects uint32_t`);
    return String(n);
  }
  if (type === 'int' || type === 'size') {
    if (typeof v === 'number') {
      if (!Number.isSafeInteger(v) || (type === 'size' && v < 0)) wrongType();
      return String(v);
    }
    if (strict || typeof v !== 'string') return wrongType();
    if (type === 'int') {
      if (!/^-?\d+$/.test(v)) fail(`Parameter '${name}' expects integer`);
      return v;
    }
    try {
      return String(parseSize(v, name));
    } catch {
      return fail(`Parameter '${name}' expects a non-negative number below 2^64`);
    }
  }
  if (typeof type === 'object' && 'enum' in type) {
    if (typeof v !== 'string') wrongType();
    if (!type.enum.includes(v as string)) fail(`Parameter '${name}' does not accept value '${String(v)}'`);
    return v as string;
  }
  return wrongType();
}

/**
 * Checks one BlockdevOptions object (at `path`, '' for the root) and writes its NodeOptions keys
 * under `prefix` into `out`. Order of the checks follows QEMU's visitor: the members in
 * declaration order (base first, then the driver's), then unexpected keys.
 */
function visitOptions(obj: QmpObject, path: string, prefix: string, out: NodeOptions, strict: boolean): void {
  const driverValue = obj['driver'];
  if (driverValue === undefined) fail(`Parameter '${path}driver' is missing`);
  const driver = scalar(`${path}driver`, { enum: BLOCKDEV_DRIVERS }, driverValue, strict) as (typeof BLOCKDEV_DRIVERS)[number];
  const fields = [...BASE_FIELDS, ...DRIVER_FIELDS[driver]];
  for (const f of fields) visitField(obj, f, path, prefix, out, strict, driver);
  const known = new Set(fields.map((f) => f.name));
  for (const key of Object.keys(obj)) if (!known.has(key)) fail(`Parameter '${path}${key}' is unexpected`);
  // QEMU's bdrv_open_common; the file driver checks it itself when it opens, nbd has no such check
  if (driver === 'nbd' && out[`${prefix}force-share`] === 'on' && out[`${prefix}read-only`] !== 'on') fail('force-share=on can only be used with read-only images');
}

function visitField(obj: QmpObject, f: OptField, path: string, prefix: string, out: NodeOptions, strict: boolean, driver: string): void {
  const v = obj[f.name];
  const name = `${path}${f.name}`;
  if (v === undefined) {
    if (f.required === true) fail(`Parameter '${name}' is missing`);
    return;
  }
  const type = f.type;
  if (type === 'ref' || type === 'refOrNull') {
    if (v === null && type === 'refOrNull') {
      out[`${prefix}${f.name}`] = 'null';
      return;
    }
    if (typeof v === 'string') {
      if (f.support === 'no') fail(`Parameter '${name}' is not supported by snapstack`);
      visitReference(name, f.name, v, prefix, out);
      return;
    }
    if (!isObject(v)) fail(`Invalid parameter type for '${name}', expected: ${typeName(type)}`);
    if (f.support === 'no') fail(`Parameter '${name}' is not supported by snapstack`);
    visitOptions(v, `${name}.`, `${prefix}${f.name}.`, out, strict);
    return;
  }
  if (typeof type === 'object' && 'union' in type) {
    if (!isObject(v)) fail(`Invalid parameter type for '${name}', expected: object`);
    visitUnion(v, type.union, `${name}.`, `${prefix}${f.name}.`, out, strict, driver);
    return;
  }
  if (typeof type === 'object' && 'struct' in type) {
    if (!isObject(v)) fail(`Invalid parameter type for '${name}', expected: object`);
    for (const sub of type.struct) {
      const sv = v[sub.name];
      if (sv === undefined) continue;
      const text = scalar(`${name}.${sub.name}`, sub.type, sv, strict);
      // snapstack always caches in the host's page cache and honours flushes: only the defaults
      if (sub.support === 'no' && text !== 'off') fail(`Parameter '${name}.${sub.name}' is not supported by snapstack (only false)`);
    }
    const subKnown = new Set(type.struct.map((s) => s.name));
    for (const key of Object.keys(v)) if (!subKnown.has(key)) fail(`Parameter '${name}.${key}' is unexpected`);
    return;
  }
  const text = scalar(name, type, v, strict);
  if (f.support === 'ignored') return;
  if (f.support === 'no') {
    if (f.name === 'detect-zeroes' && text === 'off') return;
    fail(`Parameter '${name}' is not supported by snapstack's ${driver} driver`);
  }
  if (f.name === 'aio' && (text === 'native' || text === 'io_uring')) fail(`Parameter '${name}' value '${text}' is not supported by snapstack (threads or sync)`);
  if (f.name === 'force-share' && !PROTOCOL_DRIVERS.has(driver)) {
    // QEMU's force-share is inherited by the children; snapstack's file driver is what takes locks
    out[`${prefix}file.force-share`] ??= text;
    return;
  }
  out[`${prefix}${f.name}`] = text;
}

/**
 * A flat union's object at `path`: its `type` first, then that branch's members in order, then
 * unexpected keys; each written as a dotted key under `prefix`.
 */
function visitUnion(obj: QmpObject, branches: Readonly<Record<string, readonly OptField[] | 'unsupported'>>, path: string, prefix: string, out: NodeOptions, strict: boolean, driver: string): void {
  const typeValue = obj['type'];
  if (typeValue === undefined) fail(`Parameter '${path}type' is missing`);
  if (typeof typeValue !== 'string') fail(`Invalid parameter type for '${path}type', expected: string`);
  // QEMU names an enum member alone here ("Parameter 'type' does not accept value 'x'")
  if (!Object.keys(branches).includes(typeValue)) fail(`Parameter 'type' does not accept value '${typeValue}'`);
  const kind = typeValue;
  const branch = branches[kind];
  if (branch === undefined || branch === 'unsupported') fail(`Parameter '${path}type' value '${kind}' is not supported by snapstack's ${driver} driver (${supportedKinds(branches)})`);
  out[`${prefix}type`] = kind;
  for (const f of branch) visitField(obj, f, path, prefix, out, strict, driver);
  const known = new Set(['type', ...branch.map((f) => f.name)]);
  for (const key of Object.keys(obj)) if (!known.has(key)) fail(`Parameter '${path}${key}' is unexpected`);
}

function supportedKinds(branches: Readonly<Record<string, readonly OptField[] | 'unsupported'>>): string {
  return Object.entries(branches)
    .filter(([, b]) => b !== 'unsupported')
    .map(([k]) => k)
    .join(' or ');
}

/** A member given as a node name (BlockdevRef's string branch). */
function visitReference(name: string, member: string, value: string, prefix: string, out: NodeOptions): void {
  if (member === 'backing') {
    out[`${prefix}backing`] = value;
    return;
  }
  if (!allNodes.has(value) && !allBackends.has(value)) fail(`Cannot find device='${value}' nor node-name='${value}'`);
  if (member !== 'file') fail(`Parameter '${name}': a reference to an existing node ('${value}') is not supported for '${member}'; give its options instead`);
  // an open node as the file child (graph.ts `file-node`): it stays open when this node closes
  out[`${prefix}file-node`] = value;
}

const NODE_NAME_RE = /^[A-Za-z][A-Za-z0-9_.-]*$/;

/**
 * Checks blockdev-add's options as QEMU does and translates them to the NodeOptions openNode
 * takes (nested objects become dotted keys; booleans 'on'/'off'). Throws QmpError (GenericError)
 * with QEMU's texts.
 * @locking common
 */
export function blockdevOptionsToNodeOptions(options: QmpObject, opts: BlockdevAddOptions = {}): NodeOptions {
  const strict = opts.strict === true;
  // QMP nests objects itself (a dotted key is just an unknown member there); the key syntax gives dotted keys
  const nested = strict ? options : nestDottedKeys(options, '');
  const out: NodeOptions = {};
  visitOptions(nested, '', '', out, strict);
  const name = out['node-name'];
  if (name === undefined) fail("'node-name' must be specified for the root node");
  for (const [key, value] of Object.entries(out)) {
    if ((key === 'node-name' || key.endsWith('.node-name')) && !NODE_NAME_RE.test(value)) fail(`Invalid node-name: '${value}'`);
  }
  return out;
}

/** Nodes blockdev-add (or --blockdev) created at the top level: the monitor owns them. */
const monitorOwned = new WeakSet<BlockNode>();

/** The text QEMU would give for a failed open, from the block layer's error. */
function openFailure(e: unknown): QmpError {
  if (e instanceof QmpError) return e;
  const message = e instanceof Error ? e.message : String(e);
  let first = message.split('\n')[0] ?? message;
  // "Failed to get "write" lock (node 'x' of this process holds it)": QEMU says the first part
  const lock = /^(Failed to get (?:shared )?"[a-z ]+" lock)/.exec(first);
  if (lock?.[1] !== undefined) first = lock[1];
  // "qcow2 'x.img': Image is not in qcow2 format (magic: 0x0)": QEMU names neither file nor field
  const format = /^qcow2 '.*?': (Image is not in qcow2 format)/.exec(first);
  if (format?.[1] !== undefined) first = format[1];
  return new QmpError('GenericError', first);
}

/**
 * Opens the node (and its children) that blockdev-add's `options` describe, as QMP's
 * blockdev-add and `snapstack daemon --blockdev` do. Scalars may be JSON types or strings
 * (`strict`: JSON types only). The node is owned by the monitor (blockdev-del may close it).
 * Throws QmpError with QEMU's texts.
 * @locking global-state
 */
export async function blockdevAdd(bql: Bql, options: QmpObject, opts: BlockdevAddOptions = {}): Promise<BlockNode> {
  assertBql(bql, 'blockdev-add');
  const nodeOptions = blockdevOptionsToNodeOptions(options, opts);
  const name = nodeOptions['node-name'] ?? '';
  if (allNodes.has(name)) fail(`Duplicate nodes with node-name='${name}'`);
  if (allBackends.has(name)) fail(`node-name=${name} is conflicting with a device id`);
  const backing = nodeOptions['backing'];
  if (backing !== undefined && backing !== 'null' && !allNodes.has(backing)) {
    fail(`Could not open backing file: Cannot find device='${backing}' nor node-name='${backing}'`);
  }
  let node: BlockNode;
  try {
    node = await openNode(bql, nodeOptions);
  } catch (e) {
    throw openFailure(e);
  }
  monitorOwned.add(node);
  retainNode(bql, node);
  return node;
}

/**
 * True when `node` was created by blockdev-add (or --blockdev) at the top level.
 * @locking common
 */
export function isMonitorOwned(node: BlockNode): boolean {
  return monitorOwned.has(node);
}

/**
 * Forgets that the monitor owns `node` (blockdev-del calls it once the node is closed).
 * @locking global-state
 */
export function dropMonitorOwnership(bql: Bql, node: BlockNode): void {
  assertBql(bql, 'blockdev-del');
  monitorOwned.delete(node);
  releaseNode(bql, node);
}

/**
 * The node `name` names, or QEMU's "Failed to find node with node-name='x'".
 * @locking global-state
 */
export function findNodeForQmp(bql: Bql, name: string): BlockNode {
  try {
    return findNode(bql, name);
  } catch (e) {
    if (e instanceof BlockError && e.code === 'ENOENT') fail(`Failed to find node with node-name='${name}'`);
    throw e;
  }
}

/**
 * What `info block` and `query-named-block-nodes` show: backends and nodes with their driver,
 * file, size, read-only flag, IOThread and drain counters.
 *
 * Global-state code (BQL): it walks the graph tables.
 */
import { assertBql, type Bql } from './bql.js';
import type { BlockNode } from './node.js';
import type { BlockBackend } from './backend.js';
import { allBackends, allNodes } from './registry.js';

/** One node as query-named-block-nodes reports it. */
export interface NodeInfo {
  nodeName: string;
  driver: string;
  file: string;
  virtualSize: number;
  readOnly: boolean;
  iothread: string | null;
  inFlight: number;
  quiesceCounter: number;
  children: Array<{ role: string; nodeName: string }>;
  /** The backing node's file, when the node has a backing child (QEMU's backing_file). */
  backingFile?: string;
  /** How many backing nodes lie below this one (QEMU's backing_file_depth). */
  backingFileDepth: number;
  formatSpecific?: Record<string, unknown>;
}

/** One backend as `info block` reports it. */
export interface BackendInfo {
  device: string;
  inserted: NodeInfo | null;
  readOnly: boolean;
  inFlight: number;
  quiesceCounter: number;
  queued: number;
}

function describeNode(node: BlockNode): NodeInfo {
  const inst = node.instance;
  const info: NodeInfo = {
    nodeName: node.nodeName,
    driver: node.driver.formatName,
    file: node.filename,
    virtualSize: inst === null ? 0 : inst.getLength(),
    readOnly: node.readOnly,
    iothread: node.ioThread?.id ?? null,
    inFlight: node.inFlight,
    quiesceCounter: node.quiesceCounter,
    children: node.children.map((c) => ({ role: c.role, nodeName: c.child.nodeName })),
    backingFileDepth: 0,
  };
  for (let b = node.backing; b !== undefined && info.backingFileDepth < 256; b = b.backing) info.backingFileDepth++;
  if (node.backing !== undefined) info.backingFile = node.backing.filename;
  const fs = inst?.formatSpecific?.();
  if (fs !== undefined) info.formatSpecific = fs;
  return info;
}

/**
 * The backends a user sees as devices: all but the internal ones.
 * @locking global-state
 */
export function deviceBackends(bql: Bql): BlockBackend[] {
  assertBql(bql, 'deviceBackends');
  return [...allBackends.values()].filter((blk) => !blk.internal);
}

/**
 * Every node of the graph (query-named-block-nodes).
 * @locking global-state
 */
export function queryNamedBlockNodes(bql: Bql): NodeInfo[] {
  assertBql(bql, 'queryNamedBlockNodes');
  return [...allNodes.values()].map(describeNode);
}

/**
 * Every device's backend with the node inserted in it (info block / query-block); the block
 * layer's internal backends (NBD exports, temporary ones) are left out, as in QEMU.
 * @locking global-state
 */
export function queryBlock(bql: Bql): BackendInfo[] {
  assertBql(bql, 'queryBlock');
  return deviceBackends(bql).map((blk) => ({
    device: blk.name,
    inserted: blk.root === null ? null : describeNode(blk.root),
    readOnly: blk.readOnly,
    inFlight: blk.inFlight,
    quiesceCounter: blk.quiesceCounter,
    queued: blk.queuedCount,
  }));
}

/**
 * `info block` text, one device a paragraph, in QEMU's layout.
 * @locking global-state
 */
export function formatInfoBlock(bql: Bql): string {
  const lines: string[] = [];
  for (const b of queryBlock(bql)) {
    if (b.inserted === null) {
      lines.push(`${b.device}: [not inserted]`);
      continue;
    }
    const n = b.inserted;
    const ro = b.readOnly ? ', read-only' : '';
    lines.push(`${b.device} (${n.nodeName}): ${n.file === '' ? '(none)' : n.file} (${n.driver}${ro})`);
    lines.push(`    Virtual size:     ${n.virtualSize} bytes`);
    if (n.backingFile !== undefined) lines.push(`    Backing file:     ${n.backingFile} (chain depth: ${n.backingFileDepth})`);
    lines.push(`    IOThread:         ${n.iothread ?? 'main loop'}`);
    lines.push(`    In flight:        ${b.inFlight} (queued ${b.queued}, quiesce ${b.quiesceCounter})`);
  }
  return lines.join('\n');
}

/**
 * A crash-safe rewrite of the qcow2 header area in cluster 0: the header, its extensions and the
 * backing file name (amend, rebase, commit, resize's header changes beyond the size field).
 *
 * I/O code: the caller holds the metadata lock (`MetadataLocked`).
 *
 * The power-loss model (a 512-byte sector is atomic; between two flushes any subset of the writes
 * persists, each torn at sectors) lets one write of sector 0 switch the header atomically, but not
 * a write of a longer area: a torn one would pair the new sector 0 with the old sector 1. So:
 * - the new area fits in sector 0: one write of sector 0, flushed;
 * - else, when the old area lies clear of the new area's tail (bytes 512..end): the tail first,
 *   flushed, then sector 0, flushed (until sector 0 lands, the old header uses none of the tail);
 * - else an intermediate header first: the old header (or, if that cannot, the new one) without
 *   the optional feature-name table, small enough for sector 0, its backing file name moved to a
 *   spot of the cluster that neither the old nor the new area uses (written and flushed before
 *   it), then the tail, flushed, then sector 0, flushed.
 * Every crash state parses as the old header, the new one, or the intermediate one, which names
 * the same image as one of them (the feature-name table only names feature bits for messages).
 * When no intermediate header fits, the rewrite is refused (EFBIG) before anything is written.
 */
import { BlockError } from '../../block/errors.js';
import { EXT_FEATURE_TABLE, V2_HEADER_LENGTH } from './constants.js';
import { headerBackingFileOffset, serializeHeader, setHeaderBacking } from './header.js';
import { assertMetadataLocked, type MetadataLocked } from './metadata-lock.js';
import type { Qcow2State } from './state.js';
import type { Qcow2Header } from './types.js';

/** The unit the power-loss model writes atomically. */
const SECTOR = 512;

const utf8 = new TextEncoder();

/** A byte range [from, to) of cluster 0. */
type Span = readonly [from: number, to: number];

/** Rounds up to a multiple of 8. */
function align8(n: number): number {
  return Math.ceil(n / 8) * 8;
}

/** A deep copy of a header (extensions' bytes included). */
function cloneHeader(h: Qcow2Header): Qcow2Header {
  return { ...h, extensions: h.extensions.map((e) => ({ type: e.type, data: e.data.slice() })) };
}

/** End of the fixed header, the extensions and their end marker of `h`. */
function extensionsEnd(h: Qcow2Header): number {
  let off = h.version === 2 ? V2_HEADER_LENGTH : h.headerLength;
  for (const ext of h.extensions) off += 8 + align8(ext.data.length);
  return off + 8;
}

/** The backing file name's bytes of `h` (empty when none). */
function backingBytes(h: Qcow2Header): Uint8Array {
  return h.backingFile === null ? new Uint8Array(0) : utf8.encode(h.backingFile);
}

/** The ranges of cluster 0 that header `h` uses, with its name where `backingOffset` says. */
function areaOf(h: Qcow2Header, backingOffset: number): Span[] {
  const spans: Span[] = [[0, extensionsEnd(h)]];
  const len = backingBytes(h).length;
  if (h.backingFile !== null && len > 0) spans.push([backingOffset, backingOffset + len]);
  return spans;
}

/** True when the two ranges share a byte. */
function overlaps(a: Span, b: Span): boolean {
  return a[0] < b[1] && b[0] < a[1];
}

/** The end of the furthest range. */
function endOf(spans: readonly Span[]): number {
  return spans.reduce((m, s) => Math.max(m, s[1]), 0);
}

/** The first 8-aligned place of `len` bytes in [from, limit) that meets none of `used`; -1 when none. */
function freeSpot(used: readonly Span[], from: number, limit: number, len: number): number {
  const starts = [from, ...used.map((s) => s[1])].map((x) => align8(Math.max(x, from))).sort((a, b) => a - b);
  for (const at of starts) {
    if (at + len > limit) continue;
    if (!used.some((s) => overlaps(s, [at, at + len]))) return at;
  }
  return -1;
}

/** What the rewrite writes: an optional intermediate step, then the new header's tail and sector 0. */
interface HeaderPlan {
  /** The intermediate header: its name bytes written at `nameAt` (when >= 512) before sector 0. */
  intermediate: { header: Qcow2Header; sector0: Uint8Array; name: Uint8Array; nameAt: number; isNew: boolean } | null;
  /** The new area beyond sector 0 (empty when it fits in sector 0). */
  tail: Uint8Array;
  /** The new sector 0. */
  sector0: Uint8Array;
}

/**
 * The intermediate header for `base` (old or new contents): without the feature-name table, the
 * fixed part and extensions in sector 0, the backing file name inside sector 0 when it fits there,
 * else at a spot of [512, cluster) outside `avoid`. Null when it cannot be placed.
 */
function intermediateFor(base: Qcow2Header, clusterSize: number, avoid: readonly Span[], isNew: boolean): HeaderPlan['intermediate'] {
  const h = cloneHeader(base);
  h.extensions = h.extensions.filter((e) => e.type !== EXT_FEATURE_TABLE);
  const name = backingBytes(h);
  if (extensionsEnd(h) > SECTOR) return null;
  if (h.backingFile === null || headerBackingFileOffset(h) + name.length <= SECTOR) {
    h.backingFileOffset = headerBackingFileOffset(h);
    h.backingFileSize = name.length;
    return { header: h, sector0: serializeHeader(h, clusterSize).slice(0, SECTOR), name: new Uint8Array(0), nameAt: 0, isNew };
  }
  const at = freeSpot(avoid, SECTOR, clusterSize, name.length);
  if (at < 0) return null;
  const withoutName = cloneHeader(h);
  withoutName.backingFile = null;
  const sector0 = serializeHeader(withoutName, clusterSize).slice(0, SECTOR);
  const v = new DataView(sector0.buffer);
  v.setUint32(8, 0); // backing_file_offset: below 2^32 (inside cluster 0)
  v.setUint32(12, at);
  v.setUint32(16, name.length);
  h.backingFileOffset = at;
  h.backingFileSize = name.length;
  return { header: h, sector0, name, nameAt: at, isNew };
}

/**
 * Plans the rewrite of header `old` (as it lies on disk) into `next` in a cluster of
 * `clusterSize` bytes; throws EFBIG when no crash-safe sequence exists.
 * @locking common
 */
export function planHeaderRewrite(old: Qcow2Header, next: Qcow2Header, clusterSize: number, filename: string): HeaderPlan {
  const bytes = serializeHeader(next, clusterSize);
  const newArea = areaOf(next, headerBackingFileOffset(next));
  const newEnd = endOf(newArea);
  const sector0 = bytes.slice(0, SECTOR);
  if (newEnd <= SECTOR) return { intermediate: null, tail: new Uint8Array(0), sector0 };
  const tail = bytes.slice(SECTOR, newEnd);
  const tailSpan: Span = [SECTOR, newEnd];
  const oldArea = areaOf(old, old.backingFileOffset);
  if (!oldArea.some((s) => overlaps(s, tailSpan))) return { intermediate: null, tail, sector0 };
  const avoid = [...oldArea, ...newArea];
  const intermediate = intermediateFor(old, clusterSize, avoid, false) ?? intermediateFor(next, clusterSize, avoid, true);
  if (intermediate === null) {
    throw new BlockError(
      'EFBIG',
      `qcow2 '${filename}': cannot rewrite the header crash-safely: the new header area (${newEnd} bytes) overlaps the old one beyond sector 0, and neither header fits in sector 0 without its feature-name table with its backing file name in a free spot of the first cluster (${clusterSize} bytes)`,
      { file: filename, field: 'header_extensions', value: newEnd },
    );
  }
  return { intermediate, tail, sector0 };
}

/**
 * Rewrites the header of `s` as `change` edits a copy of it (fields, extensions, backing file
 * name), crash-safely (see the file comment); memory switches once the new header is on disk.
 * The caller holds the metadata lock (`locked`). Fields that point at metadata (L1, refcount
 * table, snapshots) must already point at durable structures.
 * @locking io
 */
export async function updateHeader(locked: MetadataLocked, s: Qcow2State, change: (h: Qcow2Header) => void): Promise<void> {
  assertMetadataLocked(locked, s, 'update header');
  const old = s.header;
  const next = cloneHeader(old);
  change(next);
  const plan = planHeaderRewrite(old, next, s.clusterSize, s.filename);
  const i = plan.intermediate;
  const switched = (): void => {
    next.backingFileOffset = headerBackingFileOffset(next);
    next.backingFileSize = backingBytes(next).length;
    s.header = next;
  };
  if (i !== null) {
    if (i.name.length > 0 && i.nameAt >= SECTOR) {
      await s.writeMeta(i.nameAt, i.name, 'backing file name (moved aside for the header rewrite)');
      await s.flushFile('the moved backing file name before the intermediate header');
    }
    await s.commitHeader(0, i.sector0, 'intermediate header');
    // memory follows the file (old or new contents): the next rewrite must know where the name lies
    s.header = i.header;
    await s.flushFile('the intermediate header before the new header area');
  }
  if (plan.tail.length > 0) {
    await s.writeMeta(SECTOR, plan.tail, 'header extensions and backing file name');
    await s.flushFile('the new header area before its first sector');
  }
  await s.commitHeader(0, plan.sector0, 'header');
  switched();
  await s.flushFile('the new header');
}

/**
 * Sets (null: removes) the backing file name and its format recorded in the header, crash-safely
 * (what rebase and commit change; nothing else is touched). The caller holds the metadata lock.
 * @locking io
 */
export async function updateBackingInHeader(locked: MetadataLocked, s: Qcow2State, filename: string | null, format: string | null): Promise<void> {
  await updateHeader(locked, s, (h) => setHeaderBacking(h, filename, format));
}

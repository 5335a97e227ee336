/**
 * The raw-snapshot index (`<image>.snapshots/index.json`): its names, its entries, and the parser
 * and serializer. The parser refuses anything damaged with EINVAL naming the file and the field;
 * members it does not know are kept, so a rewrite by this version preserves them.
 *
 * Common code: pure functions, no I/O.
 */
import type { SnapshotInfo } from '../../block/driver.js';
import { BlockError } from '../../block/errors.js';

/** The `format` member every index carries. */
export const INDEX_FORMAT = 'snapstack-raw-snapshots';
/** The only index version this code reads and writes. */
export const INDEX_VERSION = 1;
/** Suffix of the store directory beside the image. */
export const STORE_SUFFIX = '.snapshots';
export const INDEX_NAME = 'index.json';
export const INDEX_TMP = 'index.json.tmp';
export const PENDING_NAME = 'pending.vmstate';
export const PENDING_TMP = 'pending.vmstate.tmp';
/** The clone a goto renames over the image, beside it (same directory, so the rename is atomic). */
export const GOTO_TMP_SUFFIX = '.snapstack-goto.tmp';
/** Names the store itself uses: no snapshot file may take one. */
export const RESERVED = new Set([INDEX_NAME, INDEX_TMP, PENDING_NAME, PENDING_TMP]);
/** Files of ours that an index may leave unreferenced after a crash: removed by the cleanup. */
export const ORPHAN_PATTERN = /\.(img|vmstate|tmp)$/;
export const VMSTATE_MODE = 0o600;

/** One snapshot as the index records it. */
export interface RawSnapshotEntry extends SnapshotInfo {
  /** Its disk: a file name inside the store directory. */
  file: string;
  /** Its VM state (a file name inside the store directory), or null when it has none. */
  vmStateFile: string | null;
  /** The image's length when the snapshot was taken. */
  diskSize: number;
}

/** An entry with the members this version does not know, kept so that a rewrite preserves them. */
export interface StoredEntry extends RawSnapshotEntry {
  extra: Record<string, unknown>;
}

/** The parsed index. */
export interface StoredIndex {
  snapshots: StoredEntry[];
  extra: Record<string, unknown>;
}

const ENTRY_KEYS = ['id', 'name', 'file', 'vmStateFile', 'vmStateSize', 'dateSec', 'dateNsec', 'vmClockNsec', 'icount', 'diskSize'] as const;
const INDEX_KEYS = ['format', 'version', 'snapshots'] as const;

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function describe(v: unknown): string {
  const s = JSON.stringify(v);
  return s === undefined ? String(v) : s.length > 60 ? `${s.slice(0, 57)}...` : s;
}

function extraMembers(obj: Record<string, unknown>, known: readonly string[]): Record<string, unknown> {
  const extra: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(obj)) if (!known.includes(k)) extra[k] = v;
  return extra;
}

/**
 * Parses and validates an index document; EINVAL naming `indexPath` and the offending field.
 * @locking common
 */
export function parseSnapshotIndex(text: string, indexPath: string, nodeName?: string): { snapshots: RawSnapshotEntry[] } {
  return parseIndex(text, indexPath, nodeName);
}

/**
 * Parses an index keeping the members this version does not know (for a rewrite that preserves them).
 * @locking common
 */
export function parseIndex(text: string, indexPath: string, nodeName: string | undefined): StoredIndex {
  const bad = (field: string, why: string): BlockError =>
    new BlockError('EINVAL', `Snapshot index '${indexPath}' is damaged: ${field === '' ? 'the document' : `field '${field}'`} ${why}; it is refused and left as it is`, {
      node: nodeName,
      file: indexPath,
      field: field === '' ? 'index' : field,
      op: 'snapshot-index',
    });
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch (e) {
    throw bad('', `is not valid JSON (${e instanceof Error ? e.message : String(e)})`);
  }
  if (!isRecord(doc)) throw bad('', 'must be a JSON object');
  if (doc['format'] !== INDEX_FORMAT) throw bad('format', `must be ${describe(INDEX_FORMAT)} (it is ${describe(doc['format'])})`);
  const version = doc['version'];
  if (typeof version !== 'number' || !Number.isSafeInteger(version)) throw bad('version', `must be an integer (it is ${describe(version)})`);
  if (version !== INDEX_VERSION) {
    throw new BlockError('EINVAL', `Snapshot index '${indexPath}' has unsupported version ${version} (field 'version'; this snapstack reads version ${INDEX_VERSION}); it is refused and left as it is`, {
      node: nodeName,
      file: indexPath,
      field: 'version',
      value: version,
      op: 'snapshot-index',
    });
  }
  const list = doc['snapshots'];
  if (!Array.isArray(list)) throw bad('snapshots', `must be an array (it is ${describe(list)})`);
  const snapshots: StoredEntry[] = [];
  const ids = new Map<string, number>();
  const files = new Map<string, string>();
  list.forEach((raw: unknown, i) => {
    const at = `snapshots[${i}]`;
    if (!isRecord(raw)) throw bad(at, 'must be an object');
    const str = (k: string, nonEmpty: boolean): string => {
      const v = raw[k];
      if (typeof v !== 'string' || (nonEmpty && v === '')) throw bad(`${at}.${k}`, `must be a ${nonEmpty ? 'non-empty ' : ''}string (it is ${describe(v)})`);
      return v;
    };
    const int = (k: string, min: number, max = Number.MAX_SAFE_INTEGER): number => {
      const v = raw[k];
      if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min || v > max) {
        throw bad(`${at}.${k}`, `must be an integer from ${min} to ${max} (it is ${describe(v)})`);
      }
      return v;
    };
    const fileName = (k: string, v: string): string => {
      if (v === '.' || v === '..' || /[/\\\0]/.test(v) || RESERVED.has(v)) {
        throw bad(`${at}.${k}`, `must name a file inside the store directory (it is ${describe(v)})`);
      }
      const owner = files.get(v);
      if (owner !== undefined) throw bad(`${at}.${k}`, `names ${describe(v)}, which ${owner} names too`);
      files.set(v, `${at}.${k}`);
      return v;
    };
    const id = str('id', true);
    const seen = ids.get(id);
    if (seen !== undefined) throw bad(`${at}.id`, `repeats the ID ${describe(id)} of snapshots[${seen}]`);
    ids.set(id, i);
    const name = str('name', false);
    const file = fileName('file', str('file', true));
    const vmStateSize = int('vmStateSize', 0);
    const vmRaw = raw['vmStateFile'];
    let vmStateFile: string | null;
    if (vmRaw === null) {
      if (vmStateSize > 0) throw bad(`${at}.vmStateFile`, `is null but vmStateSize is ${vmStateSize}`);
      vmStateFile = null;
    } else {
      vmStateFile = fileName('vmStateFile', str('vmStateFile', true));
      if (vmStateSize === 0) throw bad(`${at}.vmStateFile`, `must be null when vmStateSize is 0 (it is ${describe(vmRaw)})`);
    }
    snapshots.push({
      id,
      name,
      file,
      vmStateFile,
      vmStateSize,
      dateSec: int('dateSec', 0),
      dateNsec: int('dateNsec', 0, 999_999_999),
      vmClockNsec: int('vmClockNsec', 0),
      icount: int('icount', -1),
      diskSize: int('diskSize', 0),
      extra: extraMembers(raw, ENTRY_KEYS),
    });
  });
  return { snapshots, extra: extraMembers(doc, INDEX_KEYS) };
}

/**
 * The index document, as written to `index.json.tmp` before its rename.
 * @locking common
 */
export function serializeIndex(index: StoredIndex): string {
  const doc = {
    format: INDEX_FORMAT,
    version: INDEX_VERSION,
    snapshots: index.snapshots.map((e) => ({
      id: e.id,
      name: e.name,
      file: e.file,
      vmStateFile: e.vmStateFile,
      vmStateSize: e.vmStateSize,
      dateSec: e.dateSec,
      dateNsec: e.dateNsec,
      vmClockNsec: e.vmClockNsec,
      icount: e.icount,
      diskSize: e.diskSize,
      ...e.extra,
    })),
    ...index.extra,
  };
  return `${JSON.stringify(doc, null, 2)}\n`;
}

/**
 * `<base><suffix>`, or `<base>-N<suffix>` when that name is taken.
 * @locking common
 */
export function freeName(base: string, suffix: string, taken: ReadonlySet<string>): string {
  let name = `${base}${suffix}`;
  for (let n = 1; taken.has(name) || RESERVED.has(name); n++) name = `${base}-${n}${suffix}`;
  return name;
}

/**
 * The file names an index refers to (snapshot disks and VM-state files).
 * @locking common
 */
export function referencedNames(index: StoredIndex): Set<string> {
  const names = new Set<string>();
  for (const e of index.snapshots) {
    names.add(e.file);
    if (e.vmStateFile !== null) names.add(e.vmStateFile);
  }
  return names;
}


/**
 * Backing files: where an overlay's backing file is (a relative name is resolved against the
 * overlay's directory, as QEMU's path_combine does) and the options its node is opened with
 * (QEMU's bdrv_backing_options: read-only unless told otherwise, the overlay's IOThread, and the
 * file options an overlay passes down: aio, force-share, locking, inline-reads).
 *
 * Common code: pure functions on names and option sets (and one stat of two paths); graph.ts
 * opens and links the node.
 */
import fs from 'node:fs';
import path from 'node:path';
import { BlockError } from './errors.js';
import { subOptions, type NodeOptions } from './options.js';

/** File options a backing node inherits from its overlay's file child unless it sets its own. */
const INHERITED_FILE_OPTIONS = ['aio', 'force-share', 'locking', 'inline-reads'] as const;

/** Names that are not host paths relative to a directory: absolute paths and protocol URLs. */
function isAbsoluteName(name: string): boolean {
  return name.startsWith('/') || /^[A-Za-z][A-Za-z0-9+.-]*:/.test(name);
}

/**
 * The file name to open for backing file `name` of the overlay stored in `overlayFilename`: as
 * written when absolute or a URL, else relative to the overlay's directory (`sub/top.qcow2` +
 * `base.qcow2` = `sub/base.qcow2`). EINVAL when the overlay has no file name to be relative to.
 * @locking common
 */
export function resolveBackingFilename(overlayFilename: string, name: string, overlayNode: string): string {
  if (isAbsoluteName(name)) return name;
  if (overlayFilename === '') {
    throw new BlockError('EINVAL', `Cannot use relative backing file names for '${overlayNode}'`, { node: overlayNode, field: 'backing_file', value: name });
  }
  const slash = overlayFilename.lastIndexOf('/');
  return slash < 0 ? name : `${overlayFilename.slice(0, slash + 1)}${name}`;
}

/** What an overlay's options say about its backing child. */
export type BackingChoice =
  | { kind: 'none' }
  | { kind: 'node'; nodeName: string }
  | { kind: 'open'; options: NodeOptions };

/**
 * Decides how the backing child of a format node opened with `opts` comes about, given what the
 * image itself names (`named`, from the driver's backingFile()): none (`backing=null`, or nothing
 * named or given), an existing node (`backing=NODE`), or a node to open from `backing.*` options
 * completed with the named file and format. EINVAL for `backing=` given both ways.
 * @locking common
 */
export function backingChoice(
  opts: NodeOptions,
  named: { filename: string; format: string | null } | null,
  overlay: { filename: string; nodeName: string },
): BackingChoice {
  const given = opts['backing'];
  const sub = subOptions(opts, 'backing');
  const hasSub = Object.keys(sub).length > 0;
  if (given !== undefined) {
    if (hasSub) {
      throw new BlockError('EINVAL', `Option 'backing=${given}' cannot be combined with 'backing.*' options (node '${overlay.nodeName}')`, {
        node: overlay.nodeName,
        field: 'backing',
      });
    }
    if (given === 'null' || given === '') return { kind: 'none' };
    return { kind: 'node', nodeName: given };
  }
  if (named === null && !hasSub) return { kind: 'none' };
  const o: NodeOptions = { ...sub };
  const namesItsFile = o['file'] !== undefined || o['filename'] !== undefined || Object.keys(o).some((k) => k.startsWith('file.'));
  if (!namesItsFile) {
    if (named === null) {
      throw new BlockError('EINVAL', `The backing options of node '${overlay.nodeName}' name no file (give backing.file=PATH)`, { node: overlay.nodeName, field: 'backing.file' });
    }
    o['file'] = resolveBackingFilename(overlay.filename, named.filename, overlay.nodeName);
    if (o['driver'] === undefined && o['format'] === undefined && named.format !== null) o['driver'] = named.format;
  }
  o['read-only'] ??= 'on';
  if (opts['iothread'] !== undefined) o['iothread'] ??= opts['iothread'];
  for (const k of INHERITED_FILE_OPTIONS) {
    const v = opts[`file.${k}`];
    if (v !== undefined) o[`file.${k}`] ??= v;
  }
  return { kind: 'open', options: o };
}

/**
 * True when the backing file `name` of the image stored in `filename` is that image itself: the
 * same path once resolved, or the same file under another name (a hard link). An image that names
 * itself can never be opened, and creating one over its backing file destroys the data.
 * @locking common
 */
export function isOwnBackingFile(filename: string, name: string): boolean {
  const resolved = resolveBackingFilename(filename, name, filename);
  if (path.resolve(resolved) === path.resolve(filename)) return true;
  try {
    const a = fs.statSync(resolved);
    const b = fs.statSync(filename);
    return a.dev === b.dev && a.ino === b.ino;
  } catch {
    return false; // one of them does not exist: they are not the same file
  }
}

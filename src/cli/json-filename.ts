/**
 * QEMU's `json:{...}` pseudo file names for `img` (`json:{"driver":"nbd","server":{"type":"unix",
 * "path":"/s"}}`, `json:{"driver":"qcow2","file":{"driver":"file","filename":"x.qcow2"}}`): the
 * object is flattened to dotted node options as QEMU's qdict_flatten does (booleans on/off,
 * numbers as text), and the name shown for the image is the one QEMU's bdrv_refresh_filename
 * gives: the plain file name, or for nbd its URL.
 *
 * Common code: pure functions.
 */
import { BlockError } from '../block/errors.js';
import type { NodeOptions } from '../block/options.js';

const PREFIX = 'json:';
/** NBD's well-known port, left out of the URL QEMU shows. */
const NBD_DEFAULT_PORT = '10809';

/** True for a `json:{...}` file name. */
export function isJsonFilename(name: string): boolean {
  return name.startsWith(PREFIX);
}

function flatten(obj: Record<string, unknown>, prefix: string, out: NodeOptions, whole: string): void {
  for (const [k, v] of Object.entries(obj)) {
    const key = `${prefix}${k}`;
    if (typeof v === 'string') out[key] = v;
    else if (typeof v === 'boolean') out[key] = v ? 'on' : 'off';
    else if (typeof v === 'number' && Number.isFinite(v)) out[key] = String(v);
    else if (v === null) out[key] = 'null';
    else if (typeof v === 'object' && !Array.isArray(v)) flatten(v as Record<string, unknown>, `${key}.`, out, whole);
    else throw new BlockError('ENOTSUP', `Could not open '${whole}': option '${key}' is a list, which snapstack's json: file names do not take`, { field: key });
  }
}

/**
 * The node options a `json:{...}` file name gives; EINVAL in qemu-img's words when it is not a
 * JSON object.
 */
export function jsonFilenameOptions(name: string): NodeOptions {
  let parsed: unknown;
  try {
    parsed = JSON.parse(name.slice(PREFIX.length));
  } catch {
    throw new BlockError('EINVAL', `Could not open '${name}': Could not parse the JSON options`, { field: 'filename', value: name });
  }
  if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) {
    throw new BlockError('EINVAL', `Could not open '${name}': Invalid JSON object given`, { field: 'filename', value: name });
  }
  const out: NodeOptions = {};
  flatten(parsed as Record<string, unknown>, '', out, name);
  return out;
}

/** The options as the key=value text openImage takes (commas doubled, as QEMU's syntax escapes them). */
export function optionString(opts: NodeOptions): string {
  return Object.entries(opts)
    .map(([k, v]) => `${k}=${v.replace(/,/g, ',,')}`)
    .join(',');
}

/** QEMU's name for an nbd node from its options under `p` (nbd_refresh_filename), or null. */
function nbdName(opts: NodeOptions, p: string): string | null {
  const exp = opts[`${p}export`];
  const hasExport = exp !== undefined && exp !== '';
  if (opts[`${p}server.type`] === 'unix') {
    const path = opts[`${p}server.path`] ?? '';
    return hasExport ? `nbd+unix:///${exp}?socket=${path}` : `nbd+unix://?socket=${path}`;
  }
  if (opts[`${p}server.type`] === 'inet') {
    const host = opts[`${p}server.host`] ?? '';
    const port = opts[`${p}server.port`];
    const hostPort = port === undefined || port === NBD_DEFAULT_PORT ? host : `${host}:${port}`;
    return hasExport ? `nbd://${hostPort}/${exp}` : `nbd://${hostPort}`;
  }
  return opts[`${p}filename`] ?? null;
}

/**
 * The name QEMU shows for the image the options open: the protocol node's file name or NBD URL
 * (through `file.` children), else `fallback` (the json: text itself).
 */
export function displayName(opts: NodeOptions, fallback: string): string {
  for (let p = ''; p.length < 64; p += 'file.') {
    const driver = opts[`${p}driver`];
    if (driver === 'nbd') return nbdName(opts, p) ?? fallback;
    const filename = opts[`${p}filename`];
    if (filename !== undefined) return filename;
    if (!Object.keys(opts).some((k) => k.startsWith(`${p}file.`))) {
      const file = opts[`${p}file`];
      return file ?? fallback;
    }
  }
  return fallback;
}

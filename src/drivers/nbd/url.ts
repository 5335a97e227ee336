/**
 * NBD file names as QEMU spells them: `nbd://host[:port]/export`, `nbd+tcp://...` (the same) and
 * `nbd+unix:///export?socket=PATH`; the legacy `nbd:HOST:PORT[:exportname=NAME]` and
 * `nbd:unix:PATH[:exportname=NAME]` too. The export is the URL's path without its leading '/',
 * percent-decoded; an empty one names the server's default export.
 *
 * Common code: pure functions.
 */
import { BlockError } from '../../block/errors.js';
import { NBD_DEFAULT_PORT } from '../../nbd/client-proto.js';
import type { NbdAddress } from '../../nbd/client.js';

/** Where a file name points: the server and the export. */
export interface NbdTarget {
  address: NbdAddress;
  exportName: string;
}

const URL_RE = /^nbd(\+tcp|\+unix)?:\/\//;

/**
 * True when `filename` is an NBD file name (a URL or the legacy `nbd:` form).
 * @locking common
 */
export function isNbdFilename(filename: string): boolean {
  return URL_RE.test(filename) || filename.startsWith('nbd:');
}

function bad(filename: string, why: string): BlockError {
  return new BlockError('EINVAL', `Invalid NBD file name '${filename}': ${why}`, { field: 'filename', value: filename });
}

function parsePort(filename: string, text: string): number {
  if (!/^\d{1,5}$/.test(text) || Number(text) < 1 || Number(text) > 65535) throw bad(filename, `port '${text}' is not a number between 1 and 65535`);
  return Number(text);
}

function decode(filename: string, text: string): string {
  try {
    return decodeURIComponent(text);
  } catch {
    throw bad(filename, `the export name '${text}' holds a broken %-escape`);
  }
}

/**
 * Parses an NBD file name; EINVAL naming what is wrong.
 * @locking common
 */
export function parseNbdFilename(filename: string): NbdTarget {
  const m = URL_RE.exec(filename);
  if (m === null) {
    if (filename.startsWith('nbd:')) return parseLegacy(filename);
    throw bad(filename, 'expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH');
  }
  const rest = filename.slice(m[0].length);
  const q = rest.indexOf('?');
  const beforeQuery = q < 0 ? rest : rest.slice(0, q);
  const query = q < 0 ? '' : rest.slice(q + 1);
  const slash = beforeQuery.indexOf('/');
  const authority = slash < 0 ? beforeQuery : beforeQuery.slice(0, slash);
  const exportName = decode(filename, slash < 0 ? '' : beforeQuery.slice(slash + 1));
  const params = new Map<string, string>();
  for (const part of query === '' ? [] : query.split('&')) {
    const eq = part.indexOf('=');
    const key = eq < 0 ? part : part.slice(0, eq);
    if (params.has(key)) throw bad(filename, `query parameter '${key}' given twice`);
    params.set(key, decode(filename, eq < 0 ? '' : part.slice(eq + 1)));
  }
  if (m[1] === '+unix') {
    if (authority !== '') throw bad(filename, 'a unix-socket URL takes no host (nbd+unix:///EXPORT?socket=PATH)');
    const socket = params.get('socket');
    if (socket === undefined || socket === '') throw bad(filename, "a unix-socket URL needs '?socket=PATH'");
    for (const k of params.keys()) if (k !== 'socket') throw bad(filename, `unknown query parameter '${k}'`);
    return { address: { type: 'unix', path: socket }, exportName };
  }
  if (params.size > 0) throw bad(filename, 'a TCP URL takes no query parameters');
  let host: string;
  let portText = '';
  if (authority.startsWith('[')) {
    const close = authority.indexOf(']');
    if (close < 0) throw bad(filename, 'an IPv6 address without its closing bracket');
    host = authority.slice(1, close);
    const after = authority.slice(close + 1);
    if (after !== '' && !after.startsWith(':')) throw bad(filename, `unexpected '${after}' after the host`);
    portText = after.slice(1);
  } else {
    const colon = authority.lastIndexOf(':');
    host = colon < 0 ? authority : authority.slice(0, colon);
    portText = colon < 0 ? '' : authority.slice(colon + 1);
  }
  if (host === '') throw bad(filename, 'no host');
  return { address: { type: 'inet', host, port: portText === '' ? NBD_DEFAULT_PORT : parsePort(filename, portText) }, exportName };
}

function parseLegacy(filename: string): NbdTarget {
  let body = filename.slice('nbd:'.length);
  let exportName = '';
  const ex = body.indexOf(':exportname=');
  if (ex >= 0) {
    exportName = body.slice(ex + ':exportname='.length);
    body = body.slice(0, ex);
  }
  if (body.startsWith('unix:')) {
    const path = body.slice('unix:'.length);
    if (path === '') throw bad(filename, 'no socket path after nbd:unix:');
    return { address: { type: 'unix', path }, exportName };
  }
  const colon = body.lastIndexOf(':');
  if (colon <= 0) throw bad(filename, 'expected nbd:HOST:PORT or nbd:unix:PATH');
  return { address: { type: 'inet', host: body.slice(0, colon), port: parsePort(filename, body.slice(colon + 1)) }, exportName };
}

/**
 * The URL QEMU would print for a target (`nbd+unix:///exp?socket=/s`, `nbd://h:10809/exp`).
 * @locking common
 */
export function formatNbdUrl(t: NbdTarget): string {
  const exp = encodeURIComponent(t.exportName).replace(/%2F/g, '/');
  if (t.address.type === 'unix') return `nbd+unix:///${exp}?socket=${t.address.path}`;
  const host = t.address.host.includes(':') ? `[${t.address.host}]` : t.address.host;
  return `nbd://${host}:${t.address.port}/${exp}`;
}

/**
 * QEMU's KEY=VALUE,... syntax (util/keyval.c) as `--blockdev`, `--object` and `--monitor` take it,
 * turned into the JSON object it stands for. Common code (pure string handling).
 *
 * - `key=value` pairs separated by `,`; a `,,` inside a value is one comma; a trailing `,` is allowed.
 * - A key is dotted: `file.filename=x` is `{"file": {"filename": "x"}}`. Each fragment is a QAPI
 *   name (a letter, then letters, digits, `-` and `_`; or `__RFQDN_name`) or, after the first,
 *   decimal digits: an object whose keys are all indexes is a list (`a.0=x,a.1=y`), without gaps.
 *   Fragments are 1 to 127 characters.
 * - Values stay strings (QEMU's keyval visitor converts them to the type it expects); a key given
 *   twice keeps the last value; a key used both as a value and as an object is an error.
 * - The implied key: a first element without `=` is the value of that key (`file,filename=x` is
 *   `driver=file,filename=x` for --blockdev). `help` or `?` there asks for help.
 *
 * Errors carry QEMU's texts ("Invalid parameter 'x'", "Expected '=' after parameter 'x'",
 * "Parameters 'x.*' used inconsistently", "Parameter 'x.0' missing", "Parameter 'x' is too long").
 */
import { BlockError } from '../block/errors.js';
import type { QmpObject, QmpValue } from '../qmp/types.js';

/** A parsed keyval string, and whether it asked for help (`help` or `?` in the implied key's place). */
export interface KeyvalResult {
  value: QmpObject;
  help: boolean;
}

const MAX_FRAGMENT = 127;

/** Length of the QAPI name at the start of `s` (QEMU's parse_qapi_name), 0 when there is none. */
function qapiNameLength(s: string): number {
  let i = 0;
  if (s.startsWith('__')) {
    // downstream extension: __RFQDN_name
    i = 2;
    while (i < s.length && /[a-z0-9.-]/.test(s[i] as string)) i++;
    if (s[i] !== '_') return 0;
    i++;
  }
  if (!/[A-Za-z]/.test(s[i] ?? '')) return 0;
  i++;
  while (i < s.length && /[A-Za-z0-9_-]/.test(s[i] as string)) i++;
  return i;
}

/** Length of the list index at the start of `s`, 0 when it does not start with a digit. */
function indexLength(s: string): number {
  let i = 0;
  while (i < s.length && /[0-9]/.test(s[i] as string)) i++;
  return i;
}

function fail(message: string): never {
  throw new BlockError('EINVAL', message);
}

type Tree = Map<string, Tree | string>;

/** Puts `value` (or an object when null) under `key` in `cur`, as keyval_parse_put does. */
function put(cur: Tree, key: string, value: string | null, errKey: string): Tree | string {
  const old = cur.get(key);
  if (old !== undefined) {
    if ((typeof old === 'string') !== (value !== null)) fail(`Parameters '${errKey}.*' used inconsistently`);
    if (value === null) return old;
  }
  const next: Tree | string = value ?? new Map();
  cur.set(key, next);
  return next;
}

/** Parses one `key=value` from `text` at `pos` into `root`; returns where the next one starts. */
function parseOne(root: Tree, text: string, pos: number, impliedKey: string | null, onHelp: () => void): number {
  const rest = text.slice(pos);
  let len = rest.search(/[=,]/);
  if (len < 0) len = rest.length;
  let key = rest;
  let implied = false;
  if (len > 0 && rest[len] !== '=') {
    const word = rest.slice(0, len);
    if (word === 'help' || word === '?') {
      onHelp();
      return pos + len + (rest[len] === ',' ? 1 : 0);
    }
    if (impliedKey !== null) {
      key = impliedKey;
      len = impliedKey.length;
      implied = true;
    }
  }
  const keyText = key.slice(0, len);
  // walk the fragments
  let cur = root;
  let s = 0;
  let last = '';
  for (;;) {
    const frag = keyText.slice(s);
    const n = s !== 0 && indexLength(frag) > 0 ? indexLength(frag) : qapiNameLength(frag);
    if (n === 0 || (s + n < keyText.length && keyText[s + n] !== '.')) fail(`Invalid parameter '${keyText}'`);
    if (n > MAX_FRAGMENT) fail(`Parameter${s !== 0 || n !== keyText.length ? ' fragment' : ''} '${frag.slice(0, n)}' is too long`);
    if (s !== 0) {
      const next = put(cur, last, null, keyText.slice(0, s - 1));
      if (typeof next === 'string') fail(`Parameters '${keyText.slice(0, s - 1)}.*' used inconsistently`);
      cur = next;
    }
    last = frag.slice(0, n);
    s += n;
    if (keyText[s] !== '.') break;
    s++;
  }
  let i: number;
  if (implied) i = pos;
  else {
    if (rest[len] !== '=') fail(`Expected '=' after parameter '${keyText}'`);
    i = pos + len + 1;
  }
  let value = '';
  while (i < text.length) {
    const c = text[i] as string;
    if (c === ',') {
      if (text[i + 1] !== ',') {
        i++;
        break;
      }
      i++;
    }
    value += text[i];
    i++;
  }
  put(cur, last, value, keyText);
  return i;
}

/** Turns objects whose keys are all indexes into lists (keyval_listify). */
function listify(tree: Tree, path: string): QmpValue {
  let hasIndex = false;
  let hasMember = false;
  const out: QmpObject = {};
  for (const [k, v] of tree) {
    if (/^[0-9]/.test(k)) hasIndex = true;
    else hasMember = true;
    out[k] = typeof v === 'string' ? v : listify(v, `${path}${k}.`);
  }
  if (hasIndex && hasMember) fail(`Parameters '${path}*' used inconsistently`);
  if (!hasIndex) return out;
  const list: QmpValue[] = [];
  const byIndex = new Map<number, QmpValue>();
  let max = -1;
  for (const [k, v] of Object.entries(out)) {
    const idx = Math.min(Number(k), 2 ** 31 - 1);
    byIndex.set(idx, v);
    max = Math.max(max, idx);
  }
  for (let i = 0; i <= max; i++) {
    const v = byIndex.get(i);
    if (v === undefined) fail(`Parameter '${path}${i}' missing`);
    list.push(v);
  }
  return list;
}

/**
 * Parses `text` in QEMU's KEY=VALUE,... syntax; `impliedKey` names the key a first element
 * without `=` stands for (null: none). Throws BlockError (EINVAL) with QEMU's message.
 * @locking common
 */
export function parseKeyval(text: string, impliedKey: string | null): KeyvalResult {
  const root: Tree = new Map();
  let help = false;
  let pos = 0;
  let implied = impliedKey;
  while (pos < text.length) {
    pos = parseOne(root, text, pos, implied, () => (help = true));
    implied = null;
  }
  const value = listify(root, '');
  if (typeof value !== 'object' || value === null || Array.isArray(value)) fail(`Invalid parameter '${text}'`);
  return { value, help };
}

/**
 * QEMU-style option strings: `file=disk.img,format=raw,node-name=n0,read-only=on`.
 *
 * Common code (pure functions). A `,,` stands for a literal comma inside a value, as in QEMU.
 * A bare first word without `=` is taken as the value of `implied` (e.g. the driver name).
 */
import { BlockError } from './errors.js';

/** Parsed options: string values keyed by option name (dotted names like `file.filename` kept). */
export type NodeOptions = Record<string, string>;

/**
 * Splits `a=1,b=x,,y` into `{ a: '1', b: 'x,y' }`; EINVAL on an empty key or a repeated one.
 * @locking common
 */
export function parseOptions(text: string, implied?: string): NodeOptions {
  const opts: NodeOptions = {};
  const parts: string[] = [];
  let cur = '';
  for (let i = 0; i < text.length; i++) {
    const ch = text[i];
    if (ch === ',') {
      if (text[i + 1] === ',') {
        cur += ',';
        i++;
        continue;
      }
      parts.push(cur);
      cur = '';
      continue;
    }
    cur += ch;
  }
  parts.push(cur);
  parts.forEach((part, index) => {
    if (part === '' && parts.length === 1) return;
    const eq = part.indexOf('=');
    let key: string;
    let value: string;
    if (eq < 0) {
      if (index === 0 && implied !== undefined) {
        key = implied;
        value = part;
      } else {
        throw new BlockError('EINVAL', `Invalid option '${part}' in '${text}': expected key=value`, { field: part });
      }
    } else {
      key = part.slice(0, eq);
      value = part.slice(eq + 1);
    }
    if (key === '') throw new BlockError('EINVAL', `Empty option name in '${text}'`, { field: '' });
    if (Object.prototype.hasOwnProperty.call(opts, key)) {
      throw new BlockError('EINVAL', `Option '${key}' given twice in '${text}'`, { field: key });
    }
    opts[key] = value;
  });
  return opts;
}

const SIZE_SUFFIX: Readonly<Record<string, number>> = {
  '': 1,
  b: 1,
  k: 1024,
  m: 1024 ** 2,
  g: 1024 ** 3,
  t: 1024 ** 4,
  p: 1024 ** 5,
};

/**
 * Parses a size such as `4096`, `64k`, `64M`, `1.5G` (binary units, as qemu-img) into bytes.
 * @locking common
 */
export function parseSize(text: string, field = 'size'): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtTpPbB]?)(?:i?[bB])?\s*$/.exec(text);
  if (m === null) {
    throw new BlockError('EINVAL', `Invalid ${field} '${text}': expected a number with an optional k, M, G, T or P suffix`, {
      field,
      value: text,
    });
  }
  const mult = SIZE_SUFFIX[(m[2] ?? '').toLowerCase()] ?? 1;
  const bytes = Number(m[1]) * mult;
  if (!Number.isSafeInteger(bytes)) {
    throw new BlockError('EINVAL', `Invalid ${field} '${text}': not a whole number of bytes below 2^53`, { field, value: text });
  }
  return bytes;
}

/**
 * Parses an on/off option (`on`, `off`, `true`, `false`, `yes`, `no`); `fallback` when absent.
 * @locking common
 */
export function parseBool(opts: NodeOptions, key: string, fallback: boolean): boolean {
  const v = opts[key];
  if (v === undefined) return fallback;
  if (v === 'on' || v === 'true' || v === 'yes') return true;
  if (v === 'off' || v === 'false' || v === 'no') return false;
  throw new BlockError('EINVAL', `Parameter '${key}' expects 'on' or 'off', got '${v}'`, { field: key, value: v });
}

/**
 * The options whose names start with `prefix.` with the prefix removed (`file.filename` -> `filename`).
 * @locking common
 */
export function subOptions(opts: NodeOptions, prefix: string): NodeOptions {
  const out: NodeOptions = {};
  const p = `${prefix}.`;
  for (const [k, v] of Object.entries(opts)) if (k.startsWith(p)) out[k.slice(p.length)] = v;
  return out;
}

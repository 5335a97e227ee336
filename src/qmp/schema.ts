/**
 * Checks a command's `arguments` against its QmpField list before the command runs, with the
 * messages QEMU's QObject input visitor gives (all GenericError), as qemu-storage-daemon 7.2 prints them:
 *
 * - `Parameter 'x' is missing`, `Parameter 'x' is unexpected`;
 * - `Invalid parameter type for 'x', expected: string` (integer, number, boolean, array, object);
 * - `Parameter 'x' does not accept value 'v'` for an enum, where QEMU names the member alone (not
 *   its path) and says 'null' for a list element;
 * - nested names as QEMU writes them: `file.filename`, `options[0].driver`.
 *
 * Members are checked in the schema's order and the first failure is the reply; unexpected keys
 * of a struct are reported after its members, before the next member of the enclosing struct.
 * Which unexpected key is named when there are several is QEMU's choice too: the first in the
 * GLib hash table QEMU keeps of the keys not yet visited (firstUnexpected; exact up to 7 keys per
 * object, where GLib's table has not grown yet; past that the first in QDict order).
 * An `int` refuses a number written with a fraction or exponent (`1.0`) and one outside int64, as
 * QEMU does; 'any' is passed through unchecked. A `null` is a value of no type but 'any'.
 *
 * Common code: pure, no lock.
 */
import { isNonIntLiteral, qdictOrder } from './json-stream.js';
import { QmpError, type QmpField, type QmpObject, type QmpType, type QmpValue } from './types.js';

const INT64_LIMIT = 2 ** 63;

function isObject(v: QmpValue | undefined): v is QmpObject {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function invalidType(path: string, expected: string): QmpError {
  return new QmpError('GenericError', `Invalid parameter type for '${path}', expected: ${expected}`);
}

/** Where a value sits: its path for messages, its own name (null for a list element), its container and key. */
interface Place {
  path: string;
  name: string | null;
  container: object;
  key: string | number;
}

function checkValue(type: QmpType, v: QmpValue, at: Place): void {
  if (type === 'any') return;
  if (type === 'str') {
    if (typeof v !== 'string') throw invalidType(at.path, 'string');
    return;
  }
  if (type === 'bool') {
    if (typeof v !== 'boolean') throw invalidType(at.path, 'boolean');
    return;
  }
  if (type === 'number') {
    if (typeof v !== 'number') throw invalidType(at.path, 'number');
    return;
  }
  if (type === 'int') {
    if (typeof v !== 'number' || !Number.isInteger(v) || v >= INT64_LIMIT || v < -INT64_LIMIT || isNonIntLiteral(at.container, at.key)) {
      throw invalidType(at.path, 'integer');
    }
    return;
  }
  if ('enum' in type) {
    if (typeof v !== 'string') throw invalidType(at.path, 'string');
    if (!type.enum.includes(v)) throw new QmpError('GenericError', `Parameter '${at.name ?? 'null'}' does not accept value '${v}'`);
    return;
  }
  if ('array' in type) {
    if (!Array.isArray(v)) throw invalidType(at.path, 'array');
    for (let i = 0; i < v.length; i++) {
      checkValue(type.array, v[i] as QmpValue, { path: `${at.path}[${i}]`, name: null, container: v, key: i });
    }
    return;
  }
  if (!isObject(v)) throw invalidType(at.path, 'object');
  checkStruct(type.struct, v, `${at.path}.`);
}

/** GLib's g_str_hash: djb2 over the key's bytes as signed chars. */
function gStrHash(key: string): number {
  let h = 5381;
  for (const byte of Buffer.from(key, 'utf8')) h = (Math.imul(h, 33) + (byte >= 0x80 ? byte - 0x100 : byte)) >>> 0;
  return h;
}

/** GLib's smallest table: 8 slots, indexed by (hash * 11) % 7, quadratic probing. */
const GHASH_SIZE = 8;
const GHASH_MOD = 7;

/**
 * The unexpected key QEMU names: it puts an object's keys (in QDict order) into a GLib hash
 * table, removes each member it visits, and names the first key left in the table's slot order.
 */
function firstUnexpected(obj: QmpObject, known: ReadonlySet<string>): string | undefined {
  const keys = qdictOrder(Object.keys(obj));
  const left = keys.filter((k) => !known.has(k));
  if (left.length <= 1 || keys.length >= GHASH_SIZE) return left[0];
  const slots: (string | null)[] = new Array<string | null>(GHASH_SIZE).fill(null);
  for (const k of keys) {
    let h = gStrHash(k);
    if (h <= 1) h = 2;
    let index = (Math.imul(h, 11) >>> 0) % GHASH_MOD;
    for (let step = 1; slots[index] !== null; step++) index = (index + step) & (GHASH_SIZE - 1);
    slots[index] = k;
  }
  return slots.find((k) => k !== null && !known.has(k)) ?? left[0];
}

function checkStruct(fields: readonly QmpField[], obj: QmpObject, prefix: string): void {
  const known = new Set<string>();
  for (const f of fields) {
    known.add(f.name);
    const present = Object.prototype.hasOwnProperty.call(obj, f.name);
    if (!present) {
      if (f.optional === true) continue;
      throw new QmpError('GenericError', `Parameter '${prefix}${f.name}' is missing`);
    }
    checkValue(f.type, obj[f.name] as QmpValue, { path: `${prefix}${f.name}`, name: f.name, container: obj, key: f.name });
  }
  const extra = firstUnexpected(obj, known);
  if (extra !== undefined) throw new QmpError('GenericError', `Parameter '${prefix}${extra}' is unexpected`);
}

/** Checks `args` against `fields`; throws QEMU's QmpError (GenericError) for the first problem. */
export function validateArguments(fields: readonly QmpField[], args: QmpObject): void {
  checkStruct(fields, args, '');
}

/** A type as QAPI's schema writes it, for documentation: `str`, `['str']`, `'oob'|'x'`, `{a: int, b?: str}`. */
export function describeQmpType(type: QmpType): string {
  if (typeof type === 'string') return type;
  if ('enum' in type) return type.enum.map((e) => `'${e}'`).join('|');
  if ('array' in type) return `[${describeQmpType(type.array)}]`;
  return `{${type.struct.map((f) => `${f.name}${f.optional === true ? '?' : ''}: ${describeQmpType(f.type)}`).join(', ')}}`;
}

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
 * of a struct are reported after its members, before the next member of the enclosing struct (QEMU
 * reports the first unexpected key in its hash table's order, we in the order they were sent).
 * An `int` refuses a number written with a fraction or exponent (`1.0`) and one outside int64, as
 * QEMU does; 'any' is passed through unchecked. A `null` is a value of no type but 'any'.
 *
 * Common code: pure, no lock.
 */
import { isNonIntLiteral } from './json-stream.js';
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
  for (const k of Object.keys(obj)) {
    if (!known.has(k)) throw new QmpError('GenericError', `Parameter '${prefix}${k}' is unexpected`);
  }
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

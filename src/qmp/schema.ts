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
 * GLib hash table QEMU keeps of the keys not yet visited (firstUnexpected, GHashOrder).
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

/** GLib's prime moduli by table shift (ghash.c's prime_mod). */
const PRIME_MOD = [1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071, 262139, 524287, 1048573];
const HASH_TABLE_MIN_SHIFT = 3;
const UNUSED_HASH = 0;
const TOMBSTONE_HASH = 1;

/**
 * The slot layout of a GLib GHashTable of string keys (GLib 2.74's open addressing with quadratic
 * probing, growth and shrinking re-derived), enough to know the order in which its iterator
 * returns the keys: QEMU names the unexpected argument that comes first in it.
 */
class GHashOrder {
  #size = 0;
  #mod = 0;
  #mask = 0;
  #hashes: number[] = [];
  #keys: (string | null)[] = [];
  #nnodes = 0;
  #noccupied = 0;

  constructor() {
    this.#setShift(HASH_TABLE_MIN_SHIFT);
    this.#hashes = new Array<number>(this.#size).fill(UNUSED_HASH);
    this.#keys = new Array<string | null>(this.#size).fill(null);
  }

  #setShift(shift: number): void {
    this.#size = 1 << shift;
    this.#mod = PRIME_MOD[shift] ?? this.#size - 1;
    this.#mask = this.#size - 1;
  }

  #index(hash: number): number {
    return (Math.imul(hash, 11) >>> 0) % this.#mod;
  }

  #lookup(key: string, hash: number): { index: number; found: boolean } {
    let index = this.#index(hash);
    let tombstone = -1;
    for (let step = 1; this.#hashes[index] !== UNUSED_HASH; step++) {
      if (this.#hashes[index] === hash && this.#keys[index] === key) return { index, found: true };
      if (this.#hashes[index] === TOMBSTONE_HASH && tombstone < 0) tombstone = index;
      index = (index + step) & this.#mask;
    }
    return { index: tombstone >= 0 ? tombstone : index, found: false };
  }

  insert(key: string): void {
    const hash = Math.max(gStrHash(key), 2);
    const { index, found } = this.#lookup(key, hash);
    if (found) return;
    const wasUnused = this.#hashes[index] === UNUSED_HASH;
    this.#hashes[index] = hash;
    this.#keys[index] = key;
    this.#nnodes++;
    if (wasUnused) {
      this.#noccupied++;
      this.#maybeResize();
    }
  }

  remove(key: string): void {
    const { index, found } = this.#lookup(key, Math.max(gStrHash(key), 2));
    if (!found) return;
    this.#hashes[index] = TOMBSTONE_HASH;
    this.#keys[index] = null;
    this.#nnodes--;
    this.#maybeResize();
  }

  /** The first key in iteration order. */
  first(): string | undefined {
    for (let i = 0; i < this.#size; i++) if ((this.#hashes[i] ?? 0) >= 2) return this.#keys[i] ?? undefined;
    return undefined;
  }

  #maybeResize(): void {
    const size = this.#size;
    const noccupied = this.#noccupied;
    if ((size > this.#nnodes * 4 && size > 1 << HASH_TABLE_MIN_SHIFT) || size <= noccupied + Math.trunc(noccupied / 16)) this.#resize();
  }

  #resize(): void {
    const oldSize = this.#size;
    let shift = 0;
    for (let n = Math.trunc(this.#nnodes * 1.333); n > 0; n >>= 1) shift++;
    this.#setShift(Math.max(shift, HASH_TABLE_MIN_SHIFT));
    while (this.#hashes.length < this.#size) {
      this.#hashes.push(UNUSED_HASH);
      this.#keys.push(null);
    }
    // In place, as GLib does: each entry goes to its new slot, evicting the one there, which moves next.
    const placed = new Array<boolean>(Math.max(oldSize, this.#size)).fill(false);
    for (let i = 0; i < oldSize; i++) {
      let hash = this.#hashes[i] ?? UNUSED_HASH;
      if (hash < 2) {
        this.#hashes[i] = UNUSED_HASH;
        continue;
      }
      if (placed[i] === true) continue;
      this.#hashes[i] = UNUSED_HASH;
      let key = this.#keys[i] ?? null;
      this.#keys[i] = null;
      for (;;) {
        let index = this.#index(hash);
        for (let step = 1; placed[index] === true; step++) index = (index + step) & this.#mask;
        placed[index] = true;
        const evictedHash = this.#hashes[index] ?? UNUSED_HASH;
        const evictedKey = this.#keys[index] ?? null;
        this.#hashes[index] = hash;
        this.#keys[index] = key;
        if (evictedHash < 2) break;
        hash = evictedHash;
        key = evictedKey;
      }
    }
    this.#hashes.length = this.#size;
    this.#keys.length = this.#size;
    this.#noccupied = this.#nnodes;
  }
}

/**
 * The unexpected key QEMU names: it puts an object's keys (in QDict order) into a GLib hash
 * table, removes each member as it visits it (in the schema's order), and names the first key
 * left in the table's iteration order.
 */
function firstUnexpected(obj: QmpObject, visited: readonly string[], known: ReadonlySet<string>): string | undefined {
  const keys = qdictOrder(Object.keys(obj));
  const left = keys.filter((k) => !known.has(k));
  if (left.length <= 1) return left[0];
  const table = new GHashOrder();
  for (const k of keys) table.insert(k);
  for (const k of visited) table.remove(k);
  return table.first() ?? left[0];
}

function checkStruct(fields: readonly QmpField[], obj: QmpObject, prefix: string): void {
  const known = new Set<string>();
  const visited: string[] = [];
  for (const f of fields) {
    known.add(f.name);
    const present = Object.prototype.hasOwnProperty.call(obj, f.name);
    if (!present) {
      if (f.optional === true) continue;
      throw new QmpError('GenericError', `Parameter '${prefix}${f.name}' is missing`);
    }
    checkValue(f.type, obj[f.name] as QmpValue, { path: `${prefix}${f.name}`, name: f.name, container: obj, key: f.name });
    visited.push(f.name);
  }
  const extra = firstUnexpected(obj, visited, known);
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

/**
 * blockdev-add's option checking under random input (fast-check): any JSON object either
 * translates to NodeOptions of strings or is refused with a QmpError (GenericError), never
 * another exception; and a valid option tree gives the same NodeOptions whether its scalars come
 * as JSON types (QMP) or as the strings of QEMU's key=value syntax (--blockdev), nested or dotted.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { blockdevOptionsToNodeOptions } from '../src/qmp/blockdev-options.js';
import { QmpError, type QmpObject, type QmpValue } from '../src/qmp/types.js';

const KEYS = ['driver', 'node-name', 'filename', 'file', 'backing', 'read-only', 'size', 'locking', 'aio', 'cache', 'direct', 'l2-cache-size', 'force-share', 'discard', 'x'];

const jsonValue: fc.Arbitrary<QmpValue> = fc.letrec<{ v: QmpValue }>((tie) => ({
  v: fc.oneof(
    { depthSize: 'small' },
    fc.constant(null),
    fc.boolean(),
    fc.integer({ min: -5, max: 1 << 20 }),
    fc.constantFrom('file', 'raw', 'qcow2', 'memory', 'on', 'off', 'n0', '3x', '', '64k', 'auto', 'threads'),
    fc.array(tie('v'), { maxLength: 2 }),
    fc.dictionary(fc.constantFrom(...KEYS), tie('v'), { maxKeys: 4 }),
  ),
})).v;

const options: fc.Arbitrary<QmpObject> = fc.dictionary(fc.constantFrom(...KEYS, 'file.driver', 'file.filename'), jsonValue, { maxKeys: 6 });

/** A valid option tree: a format node over a protocol node, or a protocol node alone. */
const validTree: fc.Arbitrary<QmpObject> = fc
  .record({
    name: fc.constantFrom('n0', 'disk', 'a.b-c_d'),
    ro: fc.boolean(),
    proto: fc.oneof(
      fc.record({ driver: fc.constant('file'), filename: fc.constantFrom('/tmp/a.img', 'x.qcow2'), locking: fc.constantFrom('on', 'off', 'auto') }),
      fc.record({ driver: fc.constant('memory'), size: fc.integer({ min: 0, max: 1 << 30 }) }),
    ),
    format: fc.constantFrom('raw', 'qcow2', null),
    l2: fc.option(fc.integer({ min: 0, max: 1 << 24 }), { nil: undefined }),
  })
  .map(({ name, ro, proto, format, l2 }) => {
    if (format === null) return { ...proto, 'node-name': name, 'read-only': ro } as QmpObject;
    const o: QmpObject = { driver: format, 'node-name': name, 'read-only': ro, file: proto as QmpObject };
    if (format === 'qcow2' && l2 !== undefined) o['l2-cache-size'] = l2;
    return o;
  });

/** The key=value form of a tree: every scalar a string (booleans on/off), nested objects dotted. */
function keyval(o: QmpObject, prefix = '', out: QmpObject = {}): QmpObject {
  for (const [k, v] of Object.entries(o)) {
    if (typeof v === 'object' && v !== null && !Array.isArray(v)) keyval(v, `${prefix}${k}.`, out);
    else out[`${prefix}${k}`] = typeof v === 'boolean' ? (v ? 'on' : 'off') : String(v);
  }
  return out;
}

describe('blockdev-add options under random input', () => {
  it('either translate to string options or are refused with a GenericError QmpError', () => {
    fc.assert(
      fc.property(options, fc.boolean(), (o, strict) => {
        try {
          const r = blockdevOptionsToNodeOptions(o, { strict });
          for (const v of Object.values(r)) expect(typeof v).toBe('string');
          expect(typeof r['driver']).toBe('string');
          expect(typeof r['node-name']).toBe('string');
        } catch (e) {
          expect(e).toBeInstanceOf(QmpError);
          expect((e as QmpError).errorClass).toBe('GenericError');
          expect((e as QmpError).desc).not.toMatch(/\n/);
        }
      }),
      { numRuns: 3000, seed: 1301 },
    );
  });

  it('give the same node options from JSON types and from the key=value strings', () => {
    fc.assert(
      fc.property(validTree, (tree) => {
        const fromQmp = blockdevOptionsToNodeOptions(tree, { strict: true });
        expect(blockdevOptionsToNodeOptions(keyval(tree))).toEqual(fromQmp);
        expect(blockdevOptionsToNodeOptions(tree)).toEqual(fromQmp);
        expect(() => blockdevOptionsToNodeOptions(keyval(tree), { strict: true })).toThrow(QmpError);
      }),
      { numRuns: 1000, seed: 1302 },
    );
  });
});

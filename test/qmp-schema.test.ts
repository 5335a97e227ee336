/**
 * Argument checking (src/qmp/schema.ts) with the messages qemu-storage-daemon 7.2 gives for the
 * same mistakes (the QSD command each case was taken from is named beside it).
 */
import { describe, expect, it } from 'vitest';
import { JsonStream } from '../src/qmp/json-stream.js';
import { describeQmpType, validateArguments } from '../src/qmp/schema.js';
import type { QmpField, QmpObject } from '../src/qmp/types.js';

/** Parses as the server does, so that number literals keep their int/float mark. */
function wire(text: string): QmpObject {
  const [item] = new JsonStream().push(Buffer.from(text));
  if (item === undefined || !item.ok || typeof item.value !== 'object' || item.value === null || Array.isArray(item.value)) {
    throw new Error(`bad test input ${text}`);
  }
  return item.value;
}

function desc(fields: readonly QmpField[], args: string): string | null {
  try {
    validateArguments(fields, wire(args));
    return null;
  } catch (e) {
    expect(e).toMatchObject({ errorClass: 'GenericError' });
    return (e as Error).message;
  }
}

const blockdevDel: QmpField[] = [{ name: 'node-name', type: 'str' }];
const setSpeed: QmpField[] = [
  { name: 'device', type: 'str' },
  { name: 'speed', type: 'int' },
];
const nbdStart: QmpField[] = [
  {
    name: 'addr',
    type: {
      struct: [
        { name: 'type', type: { enum: ['inet', 'unix'] } },
        { name: 'data', type: { struct: [{ name: 'path', type: 'str' }] } },
      ],
    },
  },
];
const reopen: QmpField[] = [{ name: 'options', type: { array: { struct: [{ name: 'driver', type: 'str' }, { name: 'node-name', type: 'str', optional: true }] } } }];
const caps: QmpField[] = [{ name: 'enable', type: { array: { enum: ['oob'] } }, optional: true }];
const flat: QmpField[] = [{ name: 'flat', type: 'bool', optional: true }];

describe('validateArguments', () => {
  it('accepts_what_the_schema_allows', () => {
    expect(desc(setSpeed, '{"device": "j", "speed": -5}')).toBeNull();
    expect(desc(caps, '{}')).toBeNull();
    expect(desc(caps, '{"enable": ["oob", "oob"]}')).toBeNull();
    expect(desc([{ name: 'x', type: 'number' }], '{"x": 1}')).toBeNull();
    expect(desc([{ name: 'x', type: 'number' }], '{"x": 1.5}')).toBeNull();
    expect(desc([{ name: 'x', type: 'any' }], '{"x": {"anything": [null]}}')).toBeNull();
    expect(desc(reopen, '{"options": [{"driver": "file"}, {"driver": "raw", "node-name": "n"}]}')).toBeNull();
  });

  it('names_a_missing_or_unexpected_member_as_qemu_does', () => {
    expect(desc(blockdevDel, '{}')).toBe("Parameter 'node-name' is missing"); // blockdev-del
    expect(desc(blockdevDel, '{"a": 1}')).toBe("Parameter 'node-name' is missing");
    expect(desc(blockdevDel, '{"node-name": "z", "q": 1}')).toBe("Parameter 'q' is unexpected");
    expect(desc([], '{"a": {}}')).toBe("Parameter 'a' is unexpected"); // query-version
    expect(desc(nbdStart, '{"addr": {"type": "unix", "data": {}}}')).toBe("Parameter 'addr.data.path' is missing"); // nbd-server-start
    expect(desc(reopen, '{"options": [{"driver": "file", "zz": 1}]}')).toBe("Parameter 'options[0].zz' is unexpected"); // blockdev-reopen
  });

  it('names_the_expected_type_as_qemu_does', () => {
    expect(desc(flat, '{"flat": "yes"}')).toBe("Invalid parameter type for 'flat', expected: boolean"); // query-named-block-nodes
    expect(desc(blockdevDel, '{"node-name": null}')).toBe("Invalid parameter type for 'node-name', expected: string");
    expect(desc(setSpeed, '{"device": "a", "speed": 1.0}')).toBe("Invalid parameter type for 'speed', expected: integer"); // block-job-set-speed
    expect(desc(setSpeed, '{"device": "a", "speed": 1e3}')).toBe("Invalid parameter type for 'speed', expected: integer");
    expect(desc(setSpeed, '{"device": "a", "speed": 9223372036854775808}')).toBe("Invalid parameter type for 'speed', expected: integer");
    expect(desc(setSpeed, '{"device": "a", "speed": "5"}')).toBe("Invalid parameter type for 'speed', expected: integer");
    expect(desc([{ name: 'x', type: 'number' }], '{"x": "1"}')).toBe("Invalid parameter type for 'x', expected: number");
    expect(desc(caps, '{"enable": "oob"}')).toBe("Invalid parameter type for 'enable', expected: array"); // qmp_capabilities
    expect(desc(reopen, '{"options": [1]}')).toBe("Invalid parameter type for 'options[0]', expected: object");
    expect(desc(reopen, '{"options": [{"driver": 1}]}')).toBe("Invalid parameter type for 'options[0].driver', expected: string");
    expect(desc(nbdStart, '{"addr": {"type": 5, "data": {}}}')).toBe("Invalid parameter type for 'addr.type', expected: string");
  });

  it('names_the_unexpected_key_qemu_names_when_there_are_several', () => {
    // qemu-storage-daemon 7.2, query-version with these arguments.
    expect(desc([], '{"a": 1, "b": 2}')).toBe("Parameter 'b' is unexpected");
    expect(desc([], '{"zz": 1, "q": 2}')).toBe("Parameter 'zz' is unexpected");
    expect(desc([], '{"q": 1, "zz": 2}')).toBe("Parameter 'zz' is unexpected");
  });

  it('names_an_enum_by_its_member_alone_and_a_list_element_null', () => {
    expect(desc(nbdStart, '{"addr": {"type": "bogus", "data": {}}}')).toBe("Parameter 'type' does not accept value 'bogus'");
    expect(desc(caps, '{"enable": ["bogus"]}')).toBe("Parameter 'null' does not accept value 'bogus'");
  });

  it('reports_a_nested_unexpected_key_before_a_later_member_is_missing', () => {
    const fields: QmpField[] = [
      { name: 'a', type: { struct: [{ name: 'x', type: 'int' }] } },
      { name: 'b', type: 'str' },
    ];
    expect(desc(fields, '{"a": {"x": 1, "y": 2}}')).toBe("Parameter 'a.y' is unexpected");
    expect(desc(fields, '{"a": {"x": 1}}')).toBe("Parameter 'b' is missing");
  });

  it('describes_types_for_the_documentation', () => {
    expect(describeQmpType({ array: { enum: ['oob'] } })).toBe("['oob']");
    expect(describeQmpType({ struct: [{ name: 'a', type: 'int' }, { name: 'b', type: 'str', optional: true }] })).toBe('{a: int, b?: str}');
  });
});

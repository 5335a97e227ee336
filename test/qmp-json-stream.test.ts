/**
 * The QMP input parser (src/qmp/json-stream.ts) and the output formatter: QEMU's messages for bad
 * input (taken from qemu-storage-daemon 7.2's replies), resynchronisation, the bounds, and
 * properties: any JSON split anywhere reassembles; garbage never throws and is always followed by
 * a working parser.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { formatQmpJson, isNonIntLiteral, JsonStream, qdictOrder, type JsonStreamItem } from '../src/qmp/json-stream.js';
import type { QmpObject, QmpValue } from '../src/qmp/types.js';

function parseAll(input: string | Buffer, limits?: ConstructorParameters<typeof JsonStream>[0]): JsonStreamItem[] {
  const s = new JsonStream(limits);
  return [...s.push(typeof input === 'string' ? Buffer.from(input, 'latin1') : input), ...s.end()];
}

function errors(input: string | Buffer, limits?: ConstructorParameters<typeof JsonStream>[0]): (string | QmpValue)[] {
  return parseAll(input, limits).map((i) => (i.ok ? i.value : i.error));
}

describe('JsonStream', () => {
  it('splits_values_that_follow_each_other_without_newlines', () => {
    expect(errors('{"execute":"a"}{"execute":"b"} [1] "s" 12\n')).toEqual([{ execute: 'a' }, { execute: 'b' }, [1], 's', 12]);
  });

  it('waits_for_the_end_of_a_number_before_emitting_it', () => {
    const s = new JsonStream();
    expect(s.push(Buffer.from('12'))).toEqual([]);
    expect(s.push(Buffer.from('3 '))).toEqual([{ ok: true, value: 123 }]);
  });

  it('reports_the_parse_errors_qemu_reports', () => {
    const cases: [string, string][] = [
      ['foo\n', "JSON parse error, invalid keyword 'foo'"],
      ['{"a" "b"}', 'JSON parse error, missing : in object pair'],
      ['{"a":1 xx}', 'JSON parse error, expected separator in dict'],
      ['[1 2]', 'JSON parse error, expected separator in list'],
      ['{1:2}', 'JSON parse error, key is not a string in object'],
      ['{"a":1,}', 'JSON parse error, expecting value'],
      ['[1,]', 'JSON parse error, expecting value'],
      ['{,}', 'JSON parse error, expecting value'],
      [']', 'JSON parse error, expecting value'],
      ['[{]}', 'JSON parse error, expecting value'],
      ['{"a":1,"a":2}', 'JSON parse error, duplicate key'],
      ['"\\x"', 'JSON parse error, invalid escape sequence in string'],
      ['"\\ud800"', 'JSON parse error, \\ud800 is not a valid Unicode character'],
      ['"\\uD800\\u0041"', 'JSON parse error, \\uD800 is not a valid Unicode character'],
      ['"\\u12"', 'JSON parse error, \\u12" is not a valid Unicode character'],
      ['"\\u12x4"', 'JSON parse error, \\u12x4 is not a valid Unicode character'],
      ['"\\uFFFF"', 'JSON parse error, \\uFFFF is not a valid Unicode character'],
      ['"\xc3\x28"', 'JSON parse error, invalid UTF-8 sequence in string'],
      ['"\xed\xa0\x80"', 'JSON parse error, invalid UTF-8 sequence in string'],
      ['"\xf4\x90\x80\x80"', 'JSON parse error, invalid UTF-8 sequence in string'],
      ['"\xef\xbf\xbf"', 'JSON parse error, invalid UTF-8 sequence in string'],
      ['@\n', "JSON parse error, stray '@'"],
      ['-}', "JSON parse error, stray '-}'"],
      ['1.}', "JSON parse error, stray '1.}'"],
      ['1e+}', "JSON parse error, stray '1e+}'"],
      ['\x80\n', "JSON parse error, stray '\ufffd'"],
    ];
    for (const [input, want] of cases) expect(errors(input), JSON.stringify(input)).toEqual([want]);
  });

  it('resynchronises_after_a_lexer_error_as_qemu_does', () => {
    // qemu-storage-daemon 7.2's four replies to this line: the error, then ':' '18' '}' each on its own.
    expect(errors('{"execute":"query-version",@ "id":18}\n')).toEqual([
      "JSON parse error, stray '@'",
      'JSON parse error, expecting value',
      18,
      'JSON parse error, expecting value',
    ]);
    expect(errors('{"id":"a\nb"}\n{"x":1}')).toEqual(["JSON parse error, stray '\"a\n'", 'JSON parse error, expecting value', { x: 1 }]);
    // qemu-storage-daemon 7.2: no exponent after a lone zero.
    expect(errors('0e{\n')).toEqual([0, "JSON parse error, invalid keyword 'e'"]);
    expect(errors('{"id":01}\n')).toEqual(["JSON parse error, stray '01'", 'JSON parse error, expecting value']);
    expect(errors('{"id":"\t"}')).toEqual(["JSON parse error, stray '\"\t'", 'JSON parse error, expecting value']);
    // 0xFF resets a half-read message: the client's way to force a known state.
    expect(errors(Buffer.concat([Buffer.from('{"a": [1, '), Buffer.of(0xff), Buffer.from('{"b":2}')]))).toEqual([
      "JSON parse error, stray '\ufffd'",
      { b: 2 },
    ]);
  });

  it('accepts_qemus_extensions_and_unicode', () => {
    expect(errors("{'a': 'x\"y', \"b\": \"\\u00e9\\ud83d\\ude00\\/\\'\"}")).toEqual([{ a: 'x"y', b: 'é😀/\'' }]);
    expect(errors('"\xc0\x80" "\xf0\x9f\x98\x80" "\\u0000"')).toEqual(['\u0000', '😀', '\u0000']);
    expect(errors('[-0, 0.0, 1.5e3, 1E-2, true, false, null]')).toEqual([[0, 0, 1500, 0.01, true, false, null]]);
  });

  it('remembers_which_numbers_were_not_written_as_int64_integers', () => {
    const [item] = parseAll('{"a": 1, "b": 1.0, "c": 1e3, "d": 9223372036854775807, "e": 9223372036854775808, "f": [2, 2.0]}');
    expect(item?.ok).toBe(true);
    const v = (item as { value: QmpObject }).value;
    expect(['a', 'b', 'c', 'd', 'e'].map((k) => isNonIntLiteral(v, k))).toEqual([false, true, true, false, true]);
    const f = v['f'] as QmpValue[];
    expect([isNonIntLiteral(f, 0), isNonIntLiteral(f, 1)]).toEqual([false, true]);
    expect(Object.keys(v)).toEqual(['a', 'b', 'c', 'd', 'e', 'f']);
    expect({ ...v }).toEqual(v);
  });

  it('a_key_named___proto___is_an_ordinary_member', () => {
    const [item] = parseAll('{"__proto__": {"x": 1}}');
    const v = (item as { value: QmpObject }).value;
    expect(Object.keys(v)).toEqual(['__proto__']);
    expect(Object.getPrototypeOf(v)).toBe(Object.prototype);
  });

  it('refuses_nesting_deeper_than_1024_with_one_error_and_resumes_after_the_message', () => {
    expect(errors(`${'['.repeat(1024)}${']'.repeat(1024)}`)).toHaveLength(1);
    expect(errors(`${'['.repeat(1100)}${']'.repeat(1100)}{"x":1}`)).toEqual(['JSON nesting depth limit exceeded', { x: 1 }]);
  });

  it('refuses_a_message_past_the_byte_bound_and_skips_the_rest_of_it', () => {
    const big = `{"execute": "x", "arguments": {"s": "${'A'.repeat(5000)}"}}{"ok": 1}`;
    expect(errors(big, { maxMessageBytes: 4096 })).toEqual(['JSON token size limit exceeded', { ok: 1 }]);
    const many = `[${'1,'.repeat(3000)}1]{"ok": 2}`;
    expect(errors(many, { maxTokens: 1000 })).toEqual(['JSON token count limit exceeded', { ok: 2 }]);
    // A string with a brace inside does not end the skipped message.
    expect(errors(`{"s": "${'}'.repeat(5000)}"} {"ok": 3}`, { maxMessageBytes: 1000 })).toEqual(['JSON token size limit exceeded', { ok: 3 }]);
  });

  it('never_holds_more_than_its_bound_for_an_endless_string', () => {
    const s = new JsonStream({ maxMessageBytes: 64 * 1024 });
    const out: JsonStreamItem[] = [];
    out.push(...s.push(Buffer.from('{"execute": "x", "arguments": {"s": "')));
    const chunk = Buffer.alloc(64 * 1024, 0x41);
    for (let i = 0; i < 64; i++) {
      out.push(...s.push(chunk));
      expect(s.bufferedBytes).toBeLessThanOrEqual(64 * 1024 + 64);
    }
    out.push(...s.push(Buffer.from('"}}{"ok": 4}')));
    expect(out.map((i) => (i.ok ? i.value : i.error))).toEqual(['JSON token size limit exceeded', { ok: 4 }]);
  });

  it('reassembles_any_json_split_at_any_points', () => {
    fc.assert(
      fc.property(fc.array(fc.jsonValue(), { minLength: 1, maxLength: 4 }), fc.array(fc.nat(), { maxLength: 12 }), (values, cuts) => {
        const text = Buffer.from(values.map((v) => JSON.stringify(v)).join('\n') + '\n');
        const points = [...new Set(cuts.map((c) => c % (text.length + 1)))].sort((a, b) => a - b);
        const s = new JsonStream();
        const out: JsonStreamItem[] = [];
        let at = 0;
        for (const p of [...points, text.length]) {
          out.push(...s.push(text.subarray(at, p)));
          at = p;
        }
        out.push(...s.end());
        const norm = (v: unknown): unknown => JSON.parse(JSON.stringify(v)) as unknown;
        expect(out.map((i) => (i.ok ? norm(i.value) : i.error))).toEqual(values.map((v) => norm(v)));
      }),
      { numRuns: 300 },
    );
  });

  it('gives_the_same_messages_however_the_bytes_are_split', () => {
    const bytes = fc.oneof(
      fc.uint8Array({ maxLength: 400 }),
      fc.array(fc.constantFrom('{', '}', '[', ']', ':', ',', ' ', '\n', '"', '\\', 'a', '1', '.', 'e', '-', '@', '\xff', '"execute"', '"s"', "'"), { maxLength: 80 }).map((t) => Buffer.from(t.join(''), 'latin1')),
    );
    fc.assert(
      fc.property(bytes, fc.array(fc.nat(), { maxLength: 10 }), (input, cuts) => {
        const limits = { maxMessageBytes: 64, maxTokens: 16, maxNesting: 8 };
        const whole = new JsonStream(limits);
        const expected = [...whole.push(input), ...whole.end()];
        const split = new JsonStream(limits);
        const got: JsonStreamItem[] = [];
        let at = 0;
        for (const p of [...new Set(cuts.map((c) => c % (input.length + 1)))].sort((a, b) => a - b)) {
          got.push(...split.push(input.subarray(at, p)));
          at = p;
        }
        got.push(...split.push(input.subarray(at)), ...split.end());
        expect(got).toEqual(expected);
      }),
      { numRuns: 1000 },
    );
  });

  it('garbage_never_throws_and_a_valid_command_after_a_reset_always_parses', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 300 }), fc.nat(300), (garbage, cut) => {
        const s = new JsonStream({ maxMessageBytes: 256, maxNesting: 16, maxTokens: 32 });
        const out = s.push(garbage.subarray(0, cut));
        out.push(...s.push(garbage.subarray(cut)));
        for (const i of out) if (!i.ok) expect(i.error).toMatch(/^JSON /);
        expect(s.bufferedBytes).toBeLessThanOrEqual(256 + 64);
        // QMP's reset: 0xFF puts the lexer in a known state (its own error reply), then a command.
        const after = s.push(Buffer.from('\xff{"execute": "query-version"}', 'latin1'));
        expect(after.at(-1)).toEqual({ ok: true, value: { execute: 'query-version' } });
      }),
      { numRuns: 500 },
    );
  });
});

describe('formatQmpJson', () => {
  it('writes_as_qemus_json_writer_does', () => {
    expect(formatQmpJson({ return: {}, id: [1, { a: null }] })).toBe('{"return": {}, "id": [1, {"a": null}]}');
    expect(formatQmpJson('é😀\u007f\u001f/"\\\b\f\n\r\t')).toBe('"\\u00E9\\uD83D\\uDE00\\u007F\\u001F/\\"\\\\\\b\\f\\n\\r\\t"');
    expect(formatQmpJson([0.1, 1.5, 1500, 1e20, 1e-7, -0.5, 0.01, 123.456])).toBe(
      '[0.10000000000000001, 1.5, 1500, 1e+20, 9.9999999999999995e-08, -0.5, 0.01, 123.456]',
    );
    expect(formatQmpJson('\ud800x')).toBe('"\\uFFFDx"');
  });

  it('orders_members_as_qemus_qdict_iterates_them', () => {
    // The orders qemu-storage-daemon 7.2 writes: version, reply, event, error.
    expect(qdictOrder(['major', 'minor', 'micro'])).toEqual(['micro', 'minor', 'major']);
    expect(qdictOrder(['return', 'id'])).toEqual(['return', 'id']);
    expect(qdictOrder(['error', 'id'])).toEqual(['id', 'error']);
    expect(qdictOrder(['event', 'data', 'timestamp'])).toEqual(['timestamp', 'event', 'data']);
    expect(qdictOrder(['id', 'status'])).toEqual(['status', 'id']);
    expect(formatQmpJson({ error: { desc: 'd', class: 'GenericError' }, id: 1 })).toBe('{"id": 1, "error": {"class": "GenericError", "desc": "d"}}');
  });

  it('writes_back_a_big_integer_as_it_came_and_a_double_as_qemu_prints_it', () => {
    const [item] = parseAll('{"a": 9223372036854775807, "b": 18446744073709551615, "c": 18446744073709551616, "d": [-9223372036854775808, 123456789012345678], "e": -0.0, "f": -0}');
    const v = (item as { value: QmpObject }).value;
    expect(formatQmpJson(v)).toBe(
      '{"d": [-9223372036854775808, 123456789012345678], "e": -0, "a": 9223372036854775807, "f": 0, "b": 18446744073709551615, "c": 1.8446744073709552e+19}',
    );
    // A value changed since parsing is written as it is now.
    v['a'] = 2 ** 60;
    expect(formatQmpJson({ a: v['a'] })).toBe('{"a": 1.152921504606847e+18}');
  });

  it('round_trips_through_the_parser', () => {
    fc.assert(
      fc.property(fc.jsonValue(), (v) => {
        const norm = JSON.parse(JSON.stringify(v)) as QmpValue;
        const [item] = parseAll(`${formatQmpJson(norm)}\n`);
        expect(item).toEqual({ ok: true, value: norm });
      }),
      { numRuns: 300 },
    );
  });
});

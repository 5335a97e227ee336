import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { BlockError } from './errors.js';
import { parseBool, parseOptions, parseSize, subOptions, type NodeOptions } from './options.js';

/** Runs `fn` and returns the BlockError it throws; fails the test otherwise. */
function catchBlockError(fn: () => unknown): BlockError {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(BlockError);
    return e as BlockError;
  }
  throw new Error('expected a BlockError, nothing was thrown');
}

describe('parseOptions', () => {
  it('splits key=value pairs on commas', () => {
    expect(parseOptions('file=disk.img,format=raw,node-name=n0,read-only=on')).toEqual({
      file: 'disk.img',
      format: 'raw',
      'node-name': 'n0',
      'read-only': 'on',
    });
  });

  it('keeps dotted option names as they are', () => {
    expect(parseOptions('driver=raw,file.driver=memory,file.size=1M')).toEqual({
      driver: 'raw',
      'file.driver': 'memory',
      'file.size': '1M',
    });
  });

  it('reads a doubled comma as a literal comma inside a value', () => {
    expect(parseOptions('a=1,b=x,,y')).toEqual({ a: '1', b: 'x,y' });
    expect(parseOptions('file=a,,b,,c.img,format=raw')).toEqual({ file: 'a,b,c.img', format: 'raw' });
  });

  it('handles doubled commas at the start and at the end of a value', () => {
    expect(parseOptions('a=,,x')).toEqual({ a: ',x' });
    expect(parseOptions('a=x,,')).toEqual({ a: 'x,' });
    expect(parseOptions('a=x,,,b=y')).toEqual({ a: 'x,', b: 'y' });
    expect(parseOptions('a=,,,,')).toEqual({ a: ',,' });
  });

  it('keeps everything after the first = in the value', () => {
    expect(parseOptions('a=b=c,d==')).toEqual({ a: 'b=c', d: '=' });
  });

  it('accepts an empty value', () => {
    expect(parseOptions('a=,b=1')).toEqual({ a: '', b: '1' });
  });

  it('gives an empty string no options', () => {
    expect(parseOptions('')).toEqual({});
    expect(parseOptions('', 'driver')).toEqual({});
  });

  it('takes a bare first word as the value of the implied key', () => {
    expect(parseOptions('memory,size=1M', 'driver')).toEqual({ driver: 'memory', size: '1M' });
    expect(parseOptions('qcow2', 'driver')).toEqual({ driver: 'qcow2' });
  });

  it('refuses a bare first word when no key is implied, with EINVAL', () => {
    const err = catchBlockError(() => parseOptions('memory,size=1M'));
    expect(err.code).toBe('EINVAL');
    expect(err.message).toContain("'memory'");
  });

  it('refuses a bare word that is not the first, even with an implied key', () => {
    const err = catchBlockError(() => parseOptions('size=1M,memory', 'driver'));
    expect(err.code).toBe('EINVAL');
    expect(err.field).toBe('memory');
  });

  it('refuses a trailing single comma with EINVAL', () => {
    expect(catchBlockError(() => parseOptions('a=1,')).code).toBe('EINVAL');
  });

  it('refuses a key given twice with EINVAL naming the key', () => {
    const err = catchBlockError(() => parseOptions('size=1M,node-name=a,size=2M'));
    expect(err.code).toBe('EINVAL');
    expect(err.errno).toBe(22);
    expect(err.field).toBe('size');
    expect(err.message).toContain("'size'");
  });

  it('refuses an implied key that is also given explicitly', () => {
    const err = catchBlockError(() => parseOptions('memory,driver=file', 'driver'));
    expect(err.code).toBe('EINVAL');
    expect(err.field).toBe('driver');
  });

  it('refuses an empty key with EINVAL', () => {
    expect(catchBlockError(() => parseOptions('=x')).code).toBe('EINVAL');
    const err = catchBlockError(() => parseOptions('a=1,=2'));
    expect(err.code).toBe('EINVAL');
    expect(err.field).toBe('');
    expect(err.message).toMatch(/Empty option name/);
  });

  it('does not treat inherited object keys as duplicates', () => {
    expect(parseOptions('constructor=1,toString=2')).toEqual({ constructor: '1', toString: '2' });
  });

  it('round-trips random maps whose values contain commas when commas are doubled', () => {
    const key = fc.stringMatching(/^[a-z.-]+$/);
    fc.assert(
      fc.property(fc.dictionary(key, fc.string({ unit: 'binary' }), { maxKeys: 8 }), (map) => {
        const text = Object.entries(map)
          .map(([k, v]) => `${k}=${v.replaceAll(',', ',,')}`)
          .join(',');
        const parsed = parseOptions(text);
        expect(parsed).toEqual(map);
        expect(Object.keys(parsed)).toEqual(Object.keys(map));
      }),
      { numRuns: 500 },
    );
  });

  it('round-trips values made mostly of commas and equals signs', () => {
    const key = fc.stringMatching(/^[a-z.-]+$/);
    const nasty = fc.string({ unit: fc.constantFrom(',', '=', 'a', ' ') });
    fc.assert(
      fc.property(fc.dictionary(key, nasty, { maxKeys: 6 }), (map) => {
        const text = Object.entries(map)
          .map(([k, v]) => `${k}=${v.replaceAll(',', ',,')}`)
          .join(',');
        expect(parseOptions(text)).toEqual(map);
      }),
      { numRuns: 500 },
    );
  });
});

describe('parseSize', () => {
  it('reads a plain number as bytes', () => {
    expect(parseSize('4096')).toBe(4096);
    expect(parseSize('0')).toBe(0);
  });

  it('reads binary suffixes in either case', () => {
    expect(parseSize('64k')).toBe(64 * 1024);
    expect(parseSize('64K')).toBe(64 * 1024);
    expect(parseSize('64M')).toBe(64 * 1024 * 1024);
    expect(parseSize('64m')).toBe(64 * 1024 * 1024);
    expect(parseSize('1G')).toBe(1024 ** 3);
    expect(parseSize('2T')).toBe(2 * 1024 ** 4);
    expect(parseSize('1P')).toBe(1024 ** 5);
  });

  it('reads fractional sizes that come to whole bytes', () => {
    expect(parseSize('1.5G')).toBe(1.5 * 1024 ** 3);
    expect(parseSize('0.5k')).toBe(512);
  });

  it('accepts B, KB and KiB spellings', () => {
    expect(parseSize('512b')).toBe(512);
    expect(parseSize('64KiB')).toBe(64 * 1024);
    expect(parseSize('64MB')).toBe(64 * 1024 * 1024);
  });

  it('refuses bad input with EINVAL naming the field and the text', () => {
    for (const bad of ['', 'abc', '-1', '1X', '1.5', '0.3k', '1..5G', '12 34', '1e3']) {
      const err = catchBlockError(() => parseSize(bad, 'cluster_size'));
      expect(err.code).toBe('EINVAL');
      expect(err.field).toBe('cluster_size');
      expect(err.message).toContain('cluster_size');
      expect(err.message).toContain(`'${bad}'`);
    }
  });

  it("names the field 'size' when none is given", () => {
    const err = catchBlockError(() => parseSize('lots'));
    expect(err.field).toBe('size');
    expect(err.message).toContain('size');
  });

  it('refuses sizes of 2^53 bytes or more', () => {
    expect(catchBlockError(() => parseSize('8192P')).code).toBe('EINVAL');
  });
});

describe('parseBool', () => {
  it('reads on, true and yes as true', () => {
    for (const v of ['on', 'true', 'yes']) expect(parseBool({ flag: v }, 'flag', false)).toBe(true);
  });

  it('reads off, false and no as false', () => {
    for (const v of ['off', 'false', 'no']) expect(parseBool({ flag: v }, 'flag', true)).toBe(false);
  });

  it('returns the fallback when the key is absent', () => {
    expect(parseBool({}, 'flag', true)).toBe(true);
    expect(parseBool({ other: 'off' }, 'flag', false)).toBe(false);
  });

  it('refuses any other value with EINVAL naming the key and the value', () => {
    const err = catchBlockError(() => parseBool({ 'read-only': 'maybe' }, 'read-only', false));
    expect(err.code).toBe('EINVAL');
    expect(err.field).toBe('read-only');
    expect(err.message).toContain("'read-only'");
    expect(err.message).toContain("'maybe'");
    expect(catchBlockError(() => parseBool({ x: '' }, 'x', false)).code).toBe('EINVAL');
    expect(catchBlockError(() => parseBool({ x: 'ON' }, 'x', false)).code).toBe('EINVAL');
  });
});

describe('subOptions', () => {
  it('keeps the options under a prefix, with the prefix removed', () => {
    const opts: NodeOptions = { driver: 'raw', 'file.driver': 'memory', 'file.size': '1M', 'file.x.y': 'z', 'backing.file': 'b' };
    expect(subOptions(opts, 'file')).toEqual({ driver: 'memory', size: '1M', 'x.y': 'z' });
    expect(subOptions(opts, 'backing')).toEqual({ file: 'b' });
  });

  it('ignores keys that only share the prefix text without the dot', () => {
    expect(subOptions({ file: 'a.img', filename: 'b.img', 'file.driver': 'file' }, 'file')).toEqual({ driver: 'file' });
  });

  it('returns an empty map when nothing matches', () => {
    expect(subOptions({ a: '1' }, 'file')).toEqual({});
  });

  it('does not change the options it reads', () => {
    const opts: NodeOptions = { 'file.driver': 'memory' };
    subOptions(opts, 'file');
    expect(opts).toEqual({ 'file.driver': 'memory' });
  });
});

import { describe, expect, expectTypeOf, it } from 'vitest';
import { BlockError, ERROR_CODES, fromSystemError, isBlockError, type ErrorCode } from './errors.js';

/** A Node.js-style system error, as fs throws. */
function sysError(code: string, message: string): NodeJS.ErrnoException {
  return Object.assign(new Error(message), { code, syscall: 'open' });
}

describe('BlockError', () => {
  it('carries its code, the matching errno, and the context fields', () => {
    const cause = new Error('underlying');
    const e = new BlockError('EINVAL', 'bad offset', { node: 'n0', op: 'read', file: '/tmp/x.img', field: 'offset', value: -1, cause });
    expect(e).toBeInstanceOf(Error);
    expect(e).toBeInstanceOf(BlockError);
    expect(e.name).toBe('BlockError');
    expect(e.message).toBe('bad offset');
    expect(e.code).toBe('EINVAL');
    expect(e.errno).toBe(22);
    expect(e.node).toBe('n0');
    expect(e.op).toBe('read');
    expect(e.file).toBe('/tmp/x.img');
    expect(e.field).toBe('offset');
    expect(e.cause).toBe(cause);
  });

  it('leaves context fields undefined when not given', () => {
    const e = new BlockError('EIO', 'something broke');
    expect(e.node).toBeUndefined();
    expect(e.op).toBeUndefined();
    expect(e.file).toBeUndefined();
    expect(e.field).toBeUndefined();
    expect(e.cause).toBeUndefined();
    expect('cause' in e).toBe(false);
  });

  it('uses the Linux errno numbers for its codes', () => {
    const expected: Record<ErrorCode, number> = {
      EPERM: 1,
      ENOENT: 2,
      EIO: 5,
      EACCES: 13,
      EBUSY: 16,
      EINVAL: 22,
      EFBIG: 27,
      ENOSPC: 28,
      ENOTSUP: 95,
      ENOMEDIUM: 123,
      ECANCELED: 125,
    };
    expect({ ...ERROR_CODES }).toEqual(expected);
    for (const [code, errno] of Object.entries(expected)) {
      expect(new BlockError(code as ErrorCode, 'x').errno).toBe(errno);
    }
  });

  it('has a stack trace that mentions its message', () => {
    const e = new BlockError('EBUSY', 'node busy');
    expect(e.stack).toContain('node busy');
  });
});

describe('isBlockError', () => {
  it('is true for a BlockError and false for anything else', () => {
    expect(isBlockError(new BlockError('EIO', 'x'))).toBe(true);
    expect(isBlockError(new Error('x'))).toBe(false);
    expect(isBlockError(sysError('ENOENT', 'x'))).toBe(false);
    expect(isBlockError({ code: 'EIO', errno: 5, message: 'x', name: 'BlockError' })).toBe(false);
    expect(isBlockError(null)).toBe(false);
    expect(isBlockError(undefined)).toBe(false);
    expect(isBlockError('EIO')).toBe(false);
  });

  it('filters by code when one is given', () => {
    const e = new BlockError('ENOSPC', 'full');
    expect(isBlockError(e, 'ENOSPC')).toBe(true);
    expect(isBlockError(e, 'EIO')).toBe(false);
    expect(isBlockError(new Error('x'), 'ENOSPC')).toBe(false);
  });

  it('narrows an unknown value to BlockError', () => {
    const caught: unknown = new BlockError('EPERM', 'no');
    if (isBlockError(caught)) {
      expectTypeOf(caught).toEqualTypeOf<BlockError>();
      expect(caught.errno).toBe(1);
    } else {
      expect.unreachable('a BlockError was not recognised');
    }
  });
});

describe('fromSystemError', () => {
  it('maps ENOENT and EACCES to the same codes', () => {
    const a = fromSystemError(sysError('ENOENT', 'no such file'), 'open', { node: 'n0', file: '/tmp/missing.img' });
    expect(a.code).toBe('ENOENT');
    expect(a.errno).toBe(2);
    const b = fromSystemError(sysError('EACCES', 'permission denied'), 'open', { node: 'n0', file: '/tmp/locked.img' });
    expect(b.code).toBe('EACCES');
    expect(b.errno).toBe(13);
  });

  it('maps EROFS to EACCES and EISDIR to EINVAL', () => {
    expect(fromSystemError(sysError('EROFS', 'ro fs'), 'write', {}).code).toBe('EACCES');
    expect(fromSystemError(sysError('EISDIR', 'dir'), 'open', {}).code).toBe('EINVAL');
  });

  it('maps unknown system codes, errors without a code and non-errors to EIO', () => {
    expect(fromSystemError(sysError('EWEIRD', 'strange'), 'read', { node: 'n0' }).code).toBe('EIO');
    expect(fromSystemError(new Error('plain'), 'read', { node: 'n0' }).code).toBe('EIO');
    expect(fromSystemError('a string', 'read', { node: 'n0' }).code).toBe('EIO');
    expect(fromSystemError(null, 'read', { node: 'n0' }).code).toBe('EIO');
  });

  it('names the operation, the node and the file in the message, with the original text', () => {
    const e = fromSystemError(sysError('ENOENT', 'ENOENT: no such file or directory'), 'open', { node: 'disk0', file: '/tmp/gone.img' });
    expect(e.message).toContain('open');
    expect(e.message).toContain("node 'disk0'");
    expect(e.message).toContain("file '/tmp/gone.img'");
    expect(e.message).toContain('no such file or directory');
    expect(e.node).toBe('disk0');
    expect(e.file).toBe('/tmp/gone.img');
    expect(e.op).toBe('open');
  });

  it('names only what it was given', () => {
    const onlyFile = fromSystemError(sysError('EACCES', 'denied'), 'create', { file: '/tmp/a.img' });
    expect(onlyFile.message).toContain("file '/tmp/a.img'");
    expect(onlyFile.message).not.toContain('node');
    const onlyNode = fromSystemError(sysError('EACCES', 'denied'), 'flush', { node: 'n1' });
    expect(onlyNode.message).toContain("node 'n1'");
    expect(onlyNode.message).not.toContain('file');
  });

  it('keeps the system error as the cause', () => {
    const sys = sysError('ENOSPC', 'no space left');
    const e = fromSystemError(sys, 'write', { node: 'n0' });
    expect(e.code).toBe('ENOSPC');
    expect(e.cause).toBe(sys);
  });

  it('returns a BlockError unchanged', () => {
    const original = new BlockError('EBUSY', 'busy', { node: 'x' });
    expect(fromSystemError(original, 'close', { node: 'y', file: '/f' })).toBe(original);
  });
});

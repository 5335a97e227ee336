import os from 'node:os';
import { describe, expect, it } from 'vitest';
import { BlockError, codeForErrno, codeForSystemError, fromSystemError } from './errors.js';

describe('one errno mapping for aio=sync and aio=threads', () => {
  const names = ['ENOSPC', 'EACCES', 'EPERM', 'ENOENT', 'EROFS', 'EISDIR', 'EBUSY', 'EFBIG', 'EIO', 'EDQUOT', 'EINVAL', 'ENOTSUP', 'EOPNOTSUPP', 'EMFILE'];

  it('gives a worker errno (either sign) the same code as the fs error of that name', () => {
    const table = os.constants.errno as Record<string, number | undefined>;
    for (const name of names) {
      const n = table[name];
      if (n === undefined) continue;
      expect({ name, threads: codeForErrno(-n) }).toEqual({ name, threads: codeForSystemError(name) });
      expect(codeForErrno(n)).toBe(codeForErrno(-n));
    }
  });

  it('maps what a full, read-only or quota-limited disk reports to the codes callers branch on', () => {
    expect(codeForSystemError('ENOSPC')).toBe('ENOSPC');
    expect(codeForSystemError('EDQUOT')).toBe('ENOSPC');
    expect(codeForSystemError('EROFS')).toBe('EACCES');
    expect(codeForSystemError('EOPNOTSUPP')).toBe('ENOTSUP');
  });

  it('calls anything it does not know EIO', () => {
    expect(codeForSystemError('EWHATEVER')).toBe('EIO');
    expect(codeForErrno(0x7fff)).toBe('EIO');
    expect(codeForSystemError('')).toBe('EIO');
  });

  it('fromSystemError uses the same table', () => {
    const e = Object.assign(new Error('no room'), { code: 'EDQUOT' });
    expect(fromSystemError(e, 'write', { file: '/x' }).code).toBe('ENOSPC');
  });
});

describe('BlockError corruption marker and offset', () => {
  it('carries corrupt and offset when given, false and undefined otherwise', () => {
    const bad = new BlockError('EIO', 'refcount block 3 at offset 196608 is not cluster aligned', { file: 'a.qcow2', field: 'refcount_table', offset: 196608, corrupt: true });
    expect(bad.corrupt).toBe(true);
    expect(bad.offset).toBe(196608);
    const plain = new BlockError('ENOSPC', 'disk full');
    expect(plain.corrupt).toBe(false);
    expect(plain.offset).toBeUndefined();
  });
});

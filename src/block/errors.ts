/**
 * Typed errors of the block layer (common code: no lock, no calling-context rule).
 *
 * Every failure that reaches a user is a BlockError with a stable errno-like `code` that callers
 * branch on, and a message that names the node, the operation and the offending value, the way
 * QEMU's messages do. Extra context (file, field, offset) is kept as properties for programs.
 */
import os from 'node:os';

/** The errno-like codes snapstack uses; stable public API. */
export const ERROR_CODES = {
  EINVAL: 22,
  ENOENT: 2,
  EACCES: 13,
  EPERM: 1,
  ENOSPC: 28,
  EIO: 5,
  ENOTSUP: 95,
  EBUSY: 16,
  EFBIG: 27,
  ENOMEDIUM: 123,
  /** An operation (a job) was cancelled before it changed anything. */
  ECANCELED: 125,
} as const;

export type ErrorCode = keyof typeof ERROR_CODES;

/** Context carried by a BlockError; every field is optional, the message already names them. */
export interface BlockErrorContext {
  node?: string;
  op?: string;
  file?: string;
  field?: string;
  value?: string | number | bigint;
  /** Byte offset (in the file or node named) where the problem lies. */
  offset?: number;
  /** True when the error says the image's metadata is inconsistent (QEMU's "corrupt" events). */
  corrupt?: boolean;
  cause?: unknown;
}

/** The one error type of snapstack: a code, a message a person can act on, and its context. */
export class BlockError extends Error {
  override readonly name = 'BlockError';
  readonly code: ErrorCode;
  readonly errno: number;
  readonly node: string | undefined;
  readonly op: string | undefined;
  readonly file: string | undefined;
  readonly field: string | undefined;
  /** Byte offset where the problem lies, when known. */
  readonly offset: number | undefined;
  /** True for damaged metadata (the image is refused or marked corrupt); false otherwise. */
  readonly corrupt: boolean;

  constructor(code: ErrorCode, message: string, ctx: BlockErrorContext = {}) {
    super(message, ctx.cause === undefined ? undefined : { cause: ctx.cause });
    this.code = code;
    this.errno = ERROR_CODES[code];
    this.node = ctx.node;
    this.op = ctx.op;
    this.file = ctx.file;
    this.field = ctx.field;
    this.offset = ctx.offset;
    this.corrupt = ctx.corrupt === true;
  }
}

/**
 * True when `e` is a BlockError, optionally with the given code (narrows the type).
 * @locking common
 */
export function isBlockError(e: unknown, code?: ErrorCode): e is BlockError {
  return e instanceof BlockError && (code === undefined || e.code === code);
}

/** System error names (as Node.js and os.constants.errno spell them) and the code each becomes. */
const NODE_ERRNO: Readonly<Record<string, ErrorCode>> = {
  ENOENT: 'ENOENT',
  EACCES: 'EACCES',
  EPERM: 'EPERM',
  ENOSPC: 'ENOSPC',
  EINVAL: 'EINVAL',
  EBUSY: 'EBUSY',
  EFBIG: 'EFBIG',
  EROFS: 'EACCES',
  EISDIR: 'EINVAL',
  EIO: 'EIO',
  ENOTSUP: 'ENOTSUP',
  EOPNOTSUPP: 'ENOTSUP',
  ENOMEDIUM: 'ENOMEDIUM',
  ECANCELED: 'ECANCELED',
  EDQUOT: 'ENOSPC',
};

/** errno number -> name, from the platform's table (Linux numbers on Linux). */
const ERRNO_NAMES = new Map<number, string>(Object.entries(os.constants.errno).map(([name, n]) => [n, name]));

/**
 * The BlockError code for a system error name such as 'ENOSPC' (EIO for anything unknown): the one
 * mapping shared by aio=sync (fs errors carry the name) and aio=threads (errno numbers, below).
 * @locking common
 */
export function codeForSystemError(name: string): ErrorCode {
  return NODE_ERRNO[name] ?? 'EIO';
}

/**
 * The BlockError code for an errno number, positive or negative (a worker's result): the same
 * table as codeForSystemError, reached through the platform's errno names.
 * @locking common
 */
export function codeForErrno(errno: number): ErrorCode {
  const name = ERRNO_NAMES.get(Math.abs(errno));
  return name === undefined ? 'EIO' : codeForSystemError(name);
}

/** strerror(3)'s texts for the system error codes Node.js reports, as QEMU's messages print them. */
const SYSTEM_ERROR_TEXT: Readonly<Record<string, string>> = {
  ENOENT: 'No such file or directory',
  EACCES: 'Permission denied',
  EPERM: 'Operation not permitted',
  EISDIR: 'Is a directory',
  ENOTDIR: 'Not a directory',
  EEXIST: 'File exists',
  EROFS: 'Read-only file system',
  ENOSPC: 'No space left on device',
  EAGAIN: 'Resource temporarily unavailable',
  ENAMETOOLONG: 'File name too long',
  EADDRINUSE: 'Address already in use',
  EADDRNOTAVAIL: 'Cannot assign requested address',
  ECONNREFUSED: 'Connection refused',
  ECONNRESET: 'Connection reset by peer',
  ETIMEDOUT: 'Connection timed out',
  EHOSTUNREACH: 'No route to host',
  ENOTSOCK: 'Socket operation on non-socket',
  EIO: 'Input/output error',
};

/**
 * The strerror text of a Node.js system error (`No such file or directory` for ENOENT), or its
 * message when the code is not one of the usual ones.
 * @locking common
 */
export function systemErrorText(e: unknown): string {
  const code = typeof e === 'object' && e !== null && 'code' in e ? String((e as { code: unknown }).code) : '';
  return SYSTEM_ERROR_TEXT[code] ?? (e instanceof Error ? e.message : String(e));
}

/**
 * Wraps a Node.js system error (fs) into a BlockError naming the node, operation and file.
 * @locking common
 */
export function fromSystemError(e: unknown, op: string, ctx: BlockErrorContext): BlockError {
  if (e instanceof BlockError) return e;
  const sysCode = typeof e === 'object' && e !== null && 'code' in e ? String((e as { code: unknown }).code) : '';
  const code = codeForSystemError(sysCode);
  const what = e instanceof Error ? e.message : String(e);
  const where = [ctx.node !== undefined ? `node '${ctx.node}'` : '', ctx.file !== undefined ? `file '${ctx.file}'` : '']
    .filter((s) => s !== '')
    .join(', ');
  return new BlockError(code, `${op} failed on ${where}: ${what}`, { ...ctx, op, cause: e });
}

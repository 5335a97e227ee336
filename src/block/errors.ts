/**
 * Typed errors of the block layer (common code: no lock, no calling-context rule).
 *
 * Every failure that reaches a user is a BlockError with a stable errno-like `code` that callers
 * branch on, and a message that names the node, the operation and the offending value, the way
 * QEMU's messages do. Extra context (file, field, offset) is kept as properties for programs.
 */

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
} as const;

export type ErrorCode = keyof typeof ERROR_CODES;

/** Context carried by a BlockError; every field is optional, the message already names them. */
export interface BlockErrorContext {
  node?: string;
  op?: string;
  file?: string;
  field?: string;
  value?: string | number | bigint;
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

  constructor(code: ErrorCode, message: string, ctx: BlockErrorContext = {}) {
    super(message, ctx.cause === undefined ? undefined : { cause: ctx.cause });
    this.code = code;
    this.errno = ERROR_CODES[code];
    this.node = ctx.node;
    this.op = ctx.op;
    this.file = ctx.file;
    this.field = ctx.field;
  }
}

/**
 * True when `e` is a BlockError, optionally with the given code (narrows the type).
 * @locking common
 */
export function isBlockError(e: unknown, code?: ErrorCode): e is BlockError {
  return e instanceof BlockError && (code === undefined || e.code === code);
}

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
};

/**
 * Wraps a Node.js system error (fs) into a BlockError naming the node, operation and file.
 * @locking common
 */
export function fromSystemError(e: unknown, op: string, ctx: BlockErrorContext): BlockError {
  if (e instanceof BlockError) return e;
  const sysCode = typeof e === 'object' && e !== null && 'code' in e ? String((e as { code: unknown }).code) : '';
  const code = NODE_ERRNO[sysCode] ?? 'EIO';
  const what = e instanceof Error ? e.message : String(e);
  const where = [ctx.node !== undefined ? `node '${ctx.node}'` : '', ctx.file !== undefined ? `file '${ctx.file}'` : '']
    .filter((s) => s !== '')
    .join(', ');
  return new BlockError(code, `${op} failed on ${where}: ${what}`, { ...ctx, op, cause: e });
}

/**
 * Number formatting shared by the CLI and the monitor, in QEMU's styles. Common code (pure).
 */
import { ERROR_CODES, isBlockError, type ErrorCode } from '../block/errors.js';

const UNITS = ['KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB'];

/** qemu-io's cvtstr: `32 bytes`, `4 KiB`, `1.5 MiB` (three decimals at most, trailing zeros cut). */
export function cvtstr(value: number): string {
  if (value < 1024) return `${trimZeros(value.toFixed(3))} bytes`;
  let v = value;
  let unit = 'bytes';
  for (const u of UNITS) {
    if (v < 1024) break;
    v /= 1024;
    unit = u;
  }
  return `${trimZeros(v.toFixed(3))} ${unit}`;
}

/** QEMU's size_to_str (qemu-img info): `0 B`, `512 B`, `1 MiB`, `1.5 GiB` (three significant digits). */
export function sizeToStr(value: number): string {
  if (value < 1024) return `${value} B`;
  let v = value;
  let unit = 'B';
  for (const u of UNITS) {
    if (v < 1024) break;
    v /= 1024;
    unit = u;
  }
  const digits = v >= 100 ? 0 : v >= 10 ? 1 : 2;
  return `${trimZeros(v.toFixed(digits))} ${unit}`;
}

function trimZeros(s: string): string {
  return s.includes('.') ? s.replace(/0+$/, '').replace(/\.$/, '') : s;
}

const STRERROR: Readonly<Record<ErrorCode, string>> = {
  EINVAL: 'Invalid argument',
  ENOENT: 'No such file or directory',
  EACCES: 'Permission denied',
  EPERM: 'Operation not permitted',
  ENOSPC: 'No space left on device',
  EIO: 'Input/output error',
  ENOTSUP: 'Not supported',
  EBUSY: 'Device or resource busy',
  EFBIG: 'File too large',
  ENOMEDIUM: 'No medium found',
  ECANCELED: 'Operation canceled',
};

/** `Input/output error`-style text for a code, as strerror would print it. */
export function strerror(code: ErrorCode): string {
  return STRERROR[code];
}

/** One line for a user: the strerror text and, for BlockErrors, the precise message. */
export function describeError(e: unknown): string {
  if (isBlockError(e)) return `${STRERROR[e.code]}: ${e.message}`;
  return e instanceof Error ? e.message : String(e);
}

/** The errno for an error, for exit statuses (1 when unknown). */
export function errnoOf(e: unknown): number {
  return isBlockError(e) ? ERROR_CODES[e.code] : 1;
}

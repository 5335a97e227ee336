/**
 * Number formatting shared by the CLI and the monitor, in QEMU's styles. Common code (pure).
 */
import { ERROR_CODES, isBlockError, type ErrorCode } from '../block/errors.js';

const UNITS = ['KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB'];

/**
 * `x` with `f` decimals as C's printf rounds: to nearest, an exact tie to the even digit
 * (glibc), where Number#toFixed takes the larger one (`192.5` is `192` in QEMU's output).
 */
function fixedAsPrintf(x: number, f: number): string {
  const scale = 10 ** f;
  const scaled = x * scale;
  const floor = Math.floor(scaled);
  if (scaled - floor !== 0.5) return x.toFixed(f);
  const even = floor % 2 === 0 ? floor : floor + 1;
  return (even / scale).toFixed(f);
}

/**
 * qemu-io's cvtstr: `512 bytes`, `4 KiB`, `1.500 MiB` (`%.3f` of the largest unit the value
 * reaches, with a `.000` cut; bytes as `%f` with `.000...` cut).
 */
export function cvtstr(value: number): string {
  let unitIndex = -1;
  for (let i = UNITS.length - 1; i >= 0; i--) {
    if (value >= 1024 ** (i + 1)) {
      unitIndex = i;
      break;
    }
  }
  const text = unitIndex < 0 ? fixedAsPrintf(value, 6) : fixedAsPrintf(value / 1024 ** (unitIndex + 1), 3);
  const cut = text.indexOf('.000');
  return `${cut >= 0 ? text.slice(0, cut) : text} ${unitIndex < 0 ? 'bytes' : UNITS[unitIndex]}`;
}

/**
 * QEMU's size_to_str (qemu-img info, snapshot tables): `%0.3g` of the value in the unit whose
 * integer part stays below 1000 (`512 B`, `0.977 KiB` for 1000 bytes, `1.5 GiB`, `192 KiB` for
 * 197120 bytes), three significant digits, trailing zeros cut.
 */
export function sizeToStr(value: number): string {
  // QEMU: frexp(val / (1000/1024)) gives the binary exponent; a unit is 10 of them
  let i = 0;
  while (i < UNITS.length && value >= (1000 / 1024) * 1024 ** (i + 1)) i++;
  const x = value / 1024 ** i;
  const digits = x >= 100 ? 0 : x >= 10 ? 1 : x >= 1 ? 2 : 3;
  let text = fixedAsPrintf(x, digits);
  // %g: a value that rounds up to 1000 is printed in exponent form
  if (Number(text) >= 1000) text = '1e+03';
  const unit = i === 0 ? 'B' : (UNITS[i - 1] ?? 'EiB');
  return `${trimZeros(text)} ${unit}`;
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

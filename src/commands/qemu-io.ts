/**
 * qemu-io's commands on a BlockBackend: `read [-P pat] [-v] [-q] OFF LEN`, `write [-P pat | -z [-u]] [-f]
 * [-q] OFF LEN`, `discard OFF LEN`, `flush`, `length`, `truncate SIZE`, printing what qemu-io
 * prints. Used by `snapstack io` and the monitor's `qemu-io` command.
 *
 * I/O code: the commands are ordinary requests on the backend and take no proof.
 */
import { blkFlush, blkGetLength, blkPdiscard, blkPread, blkPwrite, blkPwriteZeroes, blkTruncate, type BlockBackend } from '../block/backend.js';
import { BlockError } from '../block/errors.js';
import { parseSize } from '../block/options.js';
import { cvtstr, describeError } from './format.js';

/** Splits a command line on blanks, honouring single and double quotes. */
export function splitArgs(line: string): string[] {
  const out: string[] = [];
  const re = /"([^"]*)"|'([^']*)'|(\S+)/g;
  for (let m = re.exec(line); m !== null; m = re.exec(line)) out.push(m[1] ?? m[2] ?? m[3] ?? '');
  return out;
}

interface Parsed {
  flags: Map<string, string | true>;
  rest: string[];
}

function parseFlags(args: string[], withValue: string, bare: string, cmd: string): Parsed {
  const flags = new Map<string, string | true>();
  const rest: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const a = args[i] as string;
    if (/^-[A-Za-z]$/.test(a)) {
      const f = a.slice(1);
      if (withValue.includes(f)) {
        const v = args[++i];
        if (v === undefined) throw new BlockError('EINVAL', `${cmd}: option -${f} needs a value`, { field: `-${f}` });
        flags.set(f, v);
      } else if (bare.includes(f)) flags.set(f, true);
      else throw new BlockError('EINVAL', `${cmd}: invalid option -- '${f}'`, { field: `-${f}` });
    } else rest.push(a);
  }
  return { flags, rest };
}

function parsePattern(text: string, cmd: string): number {
  const n = Number(text);
  if (!Number.isInteger(n) || n < 0 || n > 255) {
    throw new BlockError('EINVAL', `${cmd}: invalid pattern '${text}': expected a byte (0..255 or 0x00..0xff)`, { field: '-P', value: text });
  }
  return n;
}

/**
 * QEMU's BDRV_REQUEST_MAX_BYTES: the largest single request (INT_MAX rounded down to 512). A
 * length past it is refused before it sizes a buffer, with qemu-io's words.
 */
export const MAX_REQUEST_BYTES = 2147483136;

function offLen(rest: string[], cmd: string, suffix = ''): [number, number] {
  if (rest.length !== 2) throw new BlockError('EINVAL', `${cmd}: expected OFFSET and LENGTH, got ${rest.length} arguments`, { op: cmd });
  const off = parseSize(rest[0] as string, 'offset');
  const len = parseSize(rest[1] as string, 'length');
  if (len > MAX_REQUEST_BYTES) {
    throw new BlockError('EINVAL', `length cannot exceed ${MAX_REQUEST_BYTES}${suffix}, given ${rest[1] as string}`, { op: cmd, field: 'length', value: len });
  }
  return [off, len];
}

function timing(out: (s: string) => void, bytes: number, startMs: number): void {
  const sec = Math.max((performance.now() - startMs) / 1000, 1e-9);
  const secs = Math.floor(sec);
  const centis = Math.floor((sec - secs) * 100);
  out(`${cvtstr(bytes)}, 1 ops; ${String(secs).padStart(2, '0')}.${String(centis).padStart(2, '0')} sec (${cvtstr(bytes / sec)}/sec and ${(1 / sec).toFixed(4)} ops/sec)`);
}

function hexdump(out: (s: string) => void, buf: Uint8Array, base: number): void {
  for (let i = 0; i < buf.length; i += 16) {
    const row = buf.subarray(i, i + 16);
    const hex = [...row].map((b) => b.toString(16).padStart(2, '0')).join(' ');
    const ascii = [...row].map((b) => (b >= 0x20 && b < 0x7f ? String.fromCharCode(b) : '.')).join('');
    out(`${(base + i).toString(16).padStart(8, '0')}:  ${hex.padEnd(47, ' ')}  ${ascii}`);
  }
}

/** The commands this module knows, for help and tab completion. */
export const QEMU_IO_COMMANDS = ['read', 'write', 'discard', 'flush', 'length', 'truncate'] as const;

/**
 * Runs one qemu-io command line on `blk`, printing through `out`. Returns false when the command
 * failed (bad syntax, I/O error or pattern mismatch): the caller turns that into an exit status.
 * @locking io
 */
export async function runQemuIoCommand(blk: BlockBackend, line: string, out: (s: string) => void): Promise<boolean> {
  const args = splitArgs(line);
  const cmd = args.shift();
  if (cmd === undefined) return true;
  try {
    switch (cmd) {
      case 'read': {
        const { flags, rest } = parseFlags(args, 'P', 'vq', 'read');
        const [off, len] = offLen(rest, 'read');
        const buf = new Uint8Array(len);
        const t0 = performance.now();
        try {
          await blkPread(blk, off, buf);
        } catch (e) {
          out(`read failed: ${describeError(e)}`);
          return false;
        }
        let ok = true;
        const pat = flags.get('P');
        if (typeof pat === 'string') {
          const p = parsePattern(pat, 'read');
          const bad = buf.findIndex((b) => b !== p);
          if (bad >= 0) {
            out(`Pattern verification failed at offset ${off + bad}, ${len - bad} bytes`);
            ok = false;
          }
        }
        if (flags.has('v')) hexdump(out, buf, off);
        if (!flags.has('q')) {
          out(`read ${len}/${len} bytes at offset ${off}`);
          timing(out, len, t0);
        }
        return ok;
      }
      case 'write': {
        const { flags, rest } = parseFlags(args, 'P', 'zquf', 'write');
        const [off, len] = offLen(rest, 'write', ' without -n');
        const pat = flags.get('P');
        if (flags.has('z') && pat !== undefined) throw new BlockError('EINVAL', 'write: -z and -P cannot be given together', { field: '-z' });
        const fill = typeof pat === 'string' ? parsePattern(pat, 'write') : 0xcd;
        const t0 = performance.now();
        try {
          const fua = flags.has('f');
          if (flags.has('z')) await blkPwriteZeroes(blk, off, len, { mayUnmap: flags.has('u'), fua });
          else await blkPwrite(blk, off, new Uint8Array(len).fill(fill), { fua });
        } catch (e) {
          out(`write failed: ${describeError(e)}`);
          return false;
        }
        if (!flags.has('q')) {
          out(`wrote ${len}/${len} bytes at offset ${off}`);
          timing(out, len, t0);
        }
        return true;
      }
      case 'discard': {
        const { flags, rest } = parseFlags(args, '', 'q', 'discard');
        const [off, len] = offLen(rest, 'discard');
        const t0 = performance.now();
        try {
          await blkPdiscard(blk, off, len);
        } catch (e) {
          out(`discard failed: ${describeError(e)}`);
          return false;
        }
        if (!flags.has('q')) {
          out(`discard ${len}/${len} bytes at offset ${off}`);
          timing(out, len, t0);
        }
        return true;
      }
      case 'flush':
        try {
          await blkFlush(blk);
        } catch (e) {
          out(`flush failed: ${describeError(e)}`);
          return false;
        }
        return true;
      case 'length':
        out(cvtstr(blkGetLength(blk)));
        return true;
      case 'truncate': {
        if (args.length !== 1) throw new BlockError('EINVAL', 'truncate: expected SIZE', { op: 'truncate' });
        try {
          await blkTruncate(blk, parseSize(args[0] as string));
        } catch (e) {
          out(`truncate: ${describeError(e)}`);
          return false;
        }
        return true;
      }
      default:
        out(`command "${cmd}" not found`);
        return false;
    }
  } catch (e) {
    // a refused argument prints qemu-io's own line; anything else is named, never a V8 stack
    if (e instanceof BlockError && e.field === 'length') out(e.message);
    else out(`${cmd}: ${e instanceof BlockError ? e.message : describeError(e)}`);
    return false;
  }
}

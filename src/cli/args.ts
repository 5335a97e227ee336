/**
 * Small helpers for qemu-img-style argument lists. Common code.
 */
import { BlockError } from '../block/errors.js';

/** Removes `flag VALUE` from `args` and returns VALUE (the last one when repeated). */
export function takeFlag(args: string[], flag: string): string | undefined {
  let value: string | undefined;
  for (let i = args.indexOf(flag); i >= 0; i = args.indexOf(flag)) {
    const v = args[i + 1];
    if (v === undefined) throw new BlockError('EINVAL', `option ${flag} needs a value`, { field: flag });
    value = v;
    args.splice(i, 2);
  }
  return value;
}

/** Removes a boolean flag from `args`; true when it was there. */
export function takeSwitch(args: string[], flag: string): boolean {
  const i = args.indexOf(flag);
  if (i < 0) return false;
  args.splice(i, 1);
  return true;
}

/** Removes `-U` / `--force-share` (qemu-img's: open read-only, sharing every permission); true when given. */
export function takeForceShare(args: string[]): boolean {
  const short = takeSwitch(args, '-U');
  const long = takeSwitch(args, '--force-share');
  return short || long;
}

/** Removes `--output=human|json` (or `--output human`); true for json. */
export function takeOutputJson(args: string[]): boolean {
  let json = false;
  for (let i = 0; i < args.length; ) {
    const a = args[i] as string;
    let v: string | undefined;
    if (a.startsWith('--output=')) {
      v = a.slice('--output='.length);
      args.splice(i, 1);
    } else if (a === '--output') {
      v = args[i + 1];
      args.splice(i, 2);
    } else {
      i++;
      continue;
    }
    if (v !== 'json' && v !== 'human') throw new BlockError('EINVAL', `--output must be human or json, not '${v ?? ''}'`, { field: '--output', value: v ?? '' });
    json = v === 'json';
  }
  return json;
}

/** Refuses any remaining option-like argument. */
export function refuseUnknownOptions(args: string[], usage: string): void {
  const bad = args.find((a) => a.startsWith('-') && a !== '-');
  if (bad !== undefined) throw new BlockError('EINVAL', `invalid option '${bad}'\n${usage}`, { field: bad });
}

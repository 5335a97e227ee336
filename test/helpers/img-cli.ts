/**
 * Runs `snapstack img ARGS` in-process and returns its exit status and what it printed, each
 * line ending in a newline (as a process's output would).
 */
import { imgMain } from '../../src/cli/img.js';

/** The exit status and the output of one `img` command. */
export interface ImgResult {
  status: number;
  out: string;
  err: string;
}

/** Runs `snapstack img ARGS` in this process. */
export async function cli(args: string[]): Promise<ImgResult> {
  const out: string[] = [];
  const err: string[] = [];
  const status = await imgMain(args, (s) => out.push(s), (s) => err.push(s));
  return { status, out: out.map((l) => `${l}\n`).join(''), err: err.map((l) => `${l}\n`).join('') };
}

/** Runs `snapstack img ARGS` in this process from directory `cwd` (relative names resolve there). */
export async function cliIn(cwd: string, args: string[]): Promise<ImgResult> {
  const before = process.cwd();
  process.chdir(cwd);
  try {
    return await cli(args);
  } finally {
    process.chdir(before);
  }
}

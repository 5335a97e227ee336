/**
 * `snapstack img commit [-f fmt] [-t cache] [-b BASE] [-r rate] [-d] [-p] [-q] FILE`: qemu-img
 * 7.2's commit. The data allocated in FILE and the images between it and BASE (default: FILE's
 * backing file) is written into BASE (grown first when smaller), BASE is flushed, then FILE is
 * emptied unless -d or -b was given (-b implies -d, as in qemu-img); "Image committed.".
 * BASE is opened writable only for the commit: FILE is opened once read-only to find BASE in the
 * chain (nothing is written to an image the commit then refuses), then again read/write with
 * that one backing image writable.
 */
import { withBql } from '../block/bql.js';
import { chainDepth, commitAll, findBackingImage, growBaseForCommit } from '../block/commit.js';
import { withDrained } from '../block/drain.js';
import { isBlockError } from '../block/errors.js';
import { bdrvFlush } from '../block/io.js';
import type { BlockNode } from '../block/node.js';
import { openImage, type Image } from '../image.js';
import { refuseUnknownOptions, takeFlag, takeSwitch } from './args.js';
import { describeError } from '../commands/format.js';
import { ProgressMeter } from './img-rebase.js';
import { IMG_USAGE as USAGE, type Out } from './img-usage.js';

const P = 'snapstack img';
const HINT = "Try 'snapstack img --help' for more information";

/** An error's text as qemu-img words its cause. */
function msg(e: unknown): string {
  if (isBlockError(e)) return e.code === 'ENOTSUP' ? 'Operation not supported' : e.message.replace(/ \(known: [^)]*\)$/, '');
  return describeError(e);
}

/** Runs `img commit ARGS`; returns the exit status. */
export async function imgCommit(argv: string[], out: Out, err: Out, progressOut: (s: string) => void = (s) => void process.stdout.write(s)): Promise<number> {
  const args = [...argv];
  const fmt = takeFlag(args, '-f');
  const baseName = takeFlag(args, '-b');
  takeFlag(args, '-t');
  takeFlag(args, '-r');
  const drop = takeSwitch(args, '-d') || baseName !== undefined;
  const quiet = takeSwitch(args, '-q');
  const progress = takeSwitch(args, '-p') && !quiet;
  takeSwitch(args, '--');
  refuseUnknownOptions(args, USAGE);
  if (args.length !== 1) {
    err(`${P}: Expecting one image file name\n${HINT}`);
    return 1;
  }
  const file = args[0] as string;
  const open = (extra: Record<string, string>, readOnly = false): Promise<Image> =>
    openImage(file, { aio: 'sync', readOnly, ...(fmt === undefined ? {} : { format: fmt }), nodeOptions: extra });
  let depth: number;
  {
    let img: Image;
    try {
      img = await open({}, true);
    } catch (e) {
      err(`${P}: Could not open '${file}': ${msg(e)}`);
      return 1;
    }
    try {
      const top = img.backend.root;
      if (top === null || top.backing === undefined) {
        err(`${P}: Image does not have a backing file`);
        return 1;
      }
      const base = baseName === undefined ? top.backing : findBackingImage(top, baseName);
      if (base === null) {
        err(`${P}: Did not find '${baseName ?? ''}' in the backing chain of '${file}'`);
        return 1;
      }
      depth = chainDepth(top, base);
    } finally {
      await img.close().catch(() => undefined);
    }
  }
  const meter = progress ? new ProgressMeter(progressOut, 1) : null;
  const status = await commit(open, depth, drop, meter, err);
  if (status === 0) meter?.set(100);
  meter?.end();
  if (status === 0 && !quiet) out('Image committed.');
  return status;
}

/** Opens FILE with the base `depth` images down writable, commits, empties; the exit status. */
async function commit(open: (extra: Record<string, string>) => Promise<Image>, depth: number, drop: boolean, meter: ProgressMeter | null, err: Out): Promise<number> {
  let img: Image;
  try {
    img = await open({ [`${'backing.'.repeat(depth)}read-only`]: 'off' });
  } catch (e) {
    err(`${P}: ${msg(e)}`);
    return 1;
  }
  try {
    const top = img.backend.root;
    let base: BlockNode | null | undefined = top;
    for (let i = 0; i < depth && base !== null && base !== undefined; i++) base = base.backing;
    if (top === null || base === null || base === undefined || base === top) {
      err(`${P}: The backing chain of '${top?.filename ?? ''}' changed while the commit opened it`);
      return 1;
    }
    try {
      await growBaseForCommit(top, base);
      await commitAll(top, base, meter === null ? undefined : (done, total) => meter.set((done / total) * 100));
      await bdrvFlush(base);
    } catch (e) {
      err(`${P}: ${msg(e)}`);
      return 1;
    }
    if (!drop) {
      if (top.drv.makeEmpty === undefined) {
        err(`${P}: Image committed, but could not empty it: Operation not supported`);
        return 1;
      }
      try {
        await withBql((bql) => withDrained(bql, top, async (d) => top.drv.makeEmpty?.(bql, d)));
      } catch (e) {
        err(`${P}: ${msg(e)}`);
        return 1;
      }
    }
    return 0;
  } finally {
    await img.close().catch((e: unknown) => err(`${P}: ${msg(e)}`));
  }
}

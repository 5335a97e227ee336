/**
 * `snapstack img rebase [-f fmt] [-F fmt] [-u] [-p] [-q] [-U] [-t cache] [-T cache] -b BACKING FILE`:
 * qemu-img 7.2's rebase. Unsafe (-u): only the header changes (FILE opened without its backing
 * chain). Safe: every range where the old chain and the new backing file differ is written into
 * FILE first (block/rebase.ts), then the header names the new file; `-b ""` makes FILE standalone.
 * A relative BACKING is resolved against FILE's directory, as qemu-img does, and recorded as given.
 * Unlike qemu-img 7.2, a missing -F (or a format that records no backing file) is refused before
 * any data is copied: the same message and exit status, without writing into FILE.
 */
import { resolveBackingFilename } from '../block/backing.js';
import { findBackingImage } from '../block/commit.js';
import { changeBackingFile } from '../block/backing-change.js';
import { withBql } from '../block/bql.js';
import { withDrained } from '../block/drain.js';
import { findDriver } from '../block/driver.js';
import { isBlockError } from '../block/errors.js';
import { rebaseCopy } from '../block/rebase.js';
import { openImage, type Image } from '../image.js';
import { refuseUnknownOptions, takeFlag, takeForceShare, takeSwitch } from './args.js';
import { describeError } from '../commands/format.js';
import { IMG_USAGE as USAGE, type Out } from './img-usage.js';

const P = 'snapstack img';
const HINT = "Try 'snapstack img --help' for more information";

/** The message of an error as qemu-img words its cause. */
function msg(e: unknown): string {
  if (isBlockError(e)) {
    if (e.code === 'ENOTSUP') return 'Operation not supported';
    return e.message.replace(/ \(known: [^)]*\)$/, '');
  }
  return describeError(e);
}

/** Runs `img rebase ARGS`; returns the exit status. */
export async function imgRebase(argv: string[], out: Out, err: Out, progressOut: (s: string) => void = (s) => void process.stdout.write(s)): Promise<number> {
  const args = [...argv];
  const fmt = takeFlag(args, '-f');
  const backingFmt = takeFlag(args, '-F');
  const backing = takeFlag(args, '-b');
  takeFlag(args, '-t');
  takeFlag(args, '-T');
  const unsafe = takeSwitch(args, '-u');
  const quiet = takeSwitch(args, '-q');
  const progress = takeSwitch(args, '-p') && !quiet;
  takeForceShare(args);
  takeSwitch(args, '--');
  refuseUnknownOptions(args, USAGE);
  if (args.length !== 1) {
    err(`${P}: Expecting one image file name\n${HINT}`);
    return 1;
  }
  if (!unsafe && backing === undefined) {
    err(`${P}: Must specify backing file (-b) or use unsafe mode (-u)\n${HINT}`);
    return 1;
  }
  const file = args[0] as string;
  if (backingFmt !== undefined) {
    try {
      findDriver(backingFmt);
    } catch {
      err(`${P}: Invalid format name: '${backingFmt}'`);
      return 1;
    }
  }
  const meter = progress ? new ProgressMeter(progressOut, 2) : null;
  const status = await rebase(file, fmt, backing ?? '', backingFmt ?? null, unsafe, meter, err);
  if (status === 0) meter?.set(100);
  meter?.end();
  void out;
  return status;
}

/** Opens FILE, copies (safe mode), changes the header; returns the exit status. */
async function rebase(file: string, fmt: string | undefined, backing: string, backingFmt: string | null, unsafe: boolean, meter: ProgressMeter | null, err: Out): Promise<number> {
  let img: Image;
  try {
    img = await openImage(file, { aio: 'sync', ...(fmt === undefined ? {} : { format: fmt }), ...(unsafe ? { noBacking: true } : {}) });
  } catch (e) {
    err(`${P}: Could not open '${file}': ${msg(e)}`);
    return 1;
  }
  let newBacking: Image | null = null;
  try {
    const root = img.backend.root;
    if (root === null) return 1;
    if (backing !== '' && backingFmt === null) {
      err(`${P}: Could not change the backing file to '${backing}': backing format must be specified`);
      return 1;
    }
    if (root.drv.changeBackingFile === undefined) {
      err(`${P}: Could not change the backing file to '${backing}': Operation not supported`);
      return 1;
    }
    if (!unsafe) {
      if (backing !== '') {
        try {
          const path = resolveBackingFilename(root.filename === '' ? file : root.filename, backing, root.nodeName);
          newBacking = await openImage(path, { aio: 'sync', readOnly: true, ...(backingFmt === null ? {} : { format: backingFmt }) });
        } catch (e) {
          err(`${P}: Could not open new backing file '${backing}': ${msg(e)}`);
          return 1;
        }
      }
      try {
        await rebaseCopy({
          overlay: img.backend,
          oldBacking: root.backing ?? null,
          newBacking: newBacking?.backend.root ?? null,
          prefixInChain: backing === '' ? null : findBackingImage(root, backing),
          ...(meter === null ? {} : { onStep: (p: number) => meter.add(p) }),
        });
        await img.flush();
      } catch (e) {
        err(`${P}: Error while writing to COW image: ${msg(e)}`);
        return 1;
      }
    }
    try {
      await withBql((bql) => withDrained(bql, root, (d) => changeBackingFile(bql, d, root, backing === '' ? null : backing, backingFmt)));
    } catch (e) {
      err(`${P}: Could not change the backing file to '${backing}': ${msg(e)}`);
      return 1;
    }
    return 0;
  } finally {
    await newBacking?.close().catch(() => undefined);
    await img.close().catch((e: unknown) => err(`${P}: ${msg(e)}`));
  }
}

/**
 * qemu-img's progress meter (util/qemu-progress.c) with a chosen minimum step: single-precision
 * state, `    (P/100%)\r` at 0, at 100 and whenever the value moved by more than the step since
 * the last print; a newline at the end (rebase: step 2, commit: step 1).
 */
export class ProgressMeter {
  private current = 0;
  private lastPrint = 0;
  private readonly minSkip: number;

  /** Prints the 0% line at once (qemu_progress_print(0, 100)). */
  constructor(
    private readonly write: (s: string) => void,
    minSkip: number,
  ) {
    this.minSkip = Math.fround(minSkip);
    this.print();
  }

  /** Adds `delta` points (qemu_progress_print(delta, 100)). */
  add(delta: number): void {
    this.set(Math.fround(this.current + Math.fround(delta)));
  }

  /** Sets the value (qemu_progress_print(value, 0)). */
  set(percent: number): void {
    const c = Math.fround(Math.min(percent, 100));
    this.current = c;
    if (c > Math.fround(this.lastPrint + this.minSkip) || c < Math.fround(this.lastPrint - this.minSkip) || c === 100 || c === 0) {
      this.lastPrint = c;
      this.print();
    }
  }

  /** Ends the meter with a newline. */
  end(): void {
    this.write('\n');
  }

  private print(): void {
    this.write(`    (${this.current.toFixed(2)}/100%)\r`);
  }
}

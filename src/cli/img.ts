/**
 * `snapstack img`: qemu-img's syntax. Each subcommand lives in its own file (img-NAME.ts) and
 * returns the process exit status; errors print one line on stderr.
 */
import { describeError } from '../commands/format.js';
import { imgAmend } from './img-amend.js';
import { imgBench } from './img-bench.js';
import { imgBitmap } from './img-bitmap.js';
import { imgCheck } from './img-check.js';
import { imgCommit } from './img-commit.js';
import { imgCompare, imgConvert } from './img-convert.js';
import { imgCreate } from './img-create.js';
import { imgDd } from './img-dd.js';
import { imgInfo } from './img-info.js';
import { imgMap } from './img-map.js';
import { imgMeasure } from './img-measure.js';
import { imgRebase } from './img-rebase.js';
import { imgResize } from './img-resize.js';
import { imgSnapshot } from './img-snapshot.js';
import { IMG_USAGE, type Out } from './img-usage.js';
import { takeTlsObjectArgs } from './nbd.js';

export type { Out } from './img-usage.js';

type Subcommand = (args: string[], out: Out, err: Out) => Promise<number>;

/** The subcommands, by name. */
const SUBCOMMANDS: Record<string, Subcommand> = {
  create: (a, o) => imgCreate(a, o),
  info: (a, o) => imgInfo(a, o),
  snapshot: imgSnapshot,
  check: imgCheck,
  convert: imgConvert,
  compare: imgCompare,
  map: imgMap,
  amend: imgAmend,
  bench: imgBench,
  bitmap: imgBitmap,
  commit: imgCommit,
  dd: imgDd,
  measure: imgMeasure,
  rebase: imgRebase,
  resize: imgResize,
};

/** Runs `snapstack img ARGS`; returns the exit status (errors print one line on stderr). */
export async function imgMain(argv: string[], out: Out, err: Out): Promise<number> {
  const [sub, ...args] = argv;
  if (sub === undefined || sub === '--help' || sub === '-h') {
    out(IMG_USAGE);
    return sub === undefined ? 1 : 0;
  }
  const run = Object.hasOwn(SUBCOMMANDS, sub) ? SUBCOMMANDS[sub] : undefined;
  if (run === undefined) {
    err(`snapstack img: command '${sub}' is not known\n${IMG_USAGE}`);
    return 1;
  }
  try {
    // --object tls-creds-x509,... for driver=nbd,tls-creds=ID (src/cli/nbd.ts)
    return await run(takeTlsObjectArgs(args), out, err);
  } catch (e) {
    err(`snapstack img: ${describeError(e)}`);
    return 1;
  }
}

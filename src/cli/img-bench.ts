/**
 * `snapstack img bench [-c COUNT] [-d DEPTH] [-f FMT] [--flush-interval=N] [--no-drain] [-i AIO]
 * [-n] [-o OFFSET] [--pattern=BYTE] [-q] [-s SIZE] [-S STEP] [-t CACHE] [-U] [-w] FILE`: qemu-img
 * 7.2's bench, with its options, output lines and exit codes, so that the two stacks can be
 * compared with the same command. The requests go through the block layer: one BlockBackend on
 * the image (aio=threads, QEMU's default), DEPTH requests in flight, issued and completed in
 * qemu-img's order (bench_cb), with a flush every N requests (after draining the queue unless
 * --no-drain). Not modelled: `-t` (accepted, the cache mode is always writeback), `-i io_uring`
 * (runs on the thread pool); `-n` / `-i native` need O_DIRECT, which snapstack does not do.
 * Unlike qemu-img, `-d 0` is refused (qemu-img 7.2 waits forever).
 */
import { blkFlush, blkGetLength, blkPread, blkPwrite, type BlockBackend } from '../block/backend.js';
import { isBlockError } from '../block/errors.js';
import { openImage } from '../image.js';
import { describeError, strerror } from '../commands/format.js';
import { cvtnum, INT64_MAX, printError, UsageError } from './img-dd.js';
import type { Out } from './img-usage.js';

const P = 'snapstack img';
const INT_MAX = 2147483647;
const CACHE_MODES = ['none', 'off', 'writeback', 'writethrough', 'directsync', 'unsafe'];
const AIO_MODES = ['threads', 'native', 'io_uring'];

/** What the command line asked. */
interface BenchOptions {
  count: number;
  depth: number;
  fmt: string | undefined;
  offset: number;
  bufsize: number;
  step: number;
  cache: string;
  aio: string;
  write: boolean;
  quiet: boolean;
  forceShare: boolean;
  pattern: number;
  flushInterval: number;
  drainOnFlush: boolean;
  filename: string;
}

/** qemu_strtoul with base 0 over the whole string, at most INT_MAX; null when it is not such a number. */
function parseUint(text: string): number | null {
  const m = /^\s*(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9]\d*)$/.exec(text);
  if (m === null) return null;
  const v = m[1] as string;
  const n = /^0[xX]/.test(v) ? parseInt(v.slice(2), 16) : v.length > 1 && v.startsWith('0') ? parseInt(v, 8) : Number(v);
  return n <= INT_MAX ? n : null;
}

function uintOption(text: string, what: string, min = 0): number {
  const n = parseUint(text);
  if (n === null || n < min) throw new UsageError(`Invalid ${what} specified`);
  return n;
}

/** Short options that take a value, and long ones (with or without `=`). */
const SHORT_VALUE = new Set(['c', 'd', 'f', 'i', 'o', 's', 'S', 't']);
const LONG_VALUE = new Set(['pattern', 'flush-interval']);
const LONG_FLAG = new Set(['no-drain', 'force-share', 'help']);

/** getopt_long over qemu-img bench's options: [name, value] pairs and the operands. */
function getopt(argv: string[]): { opts: Array<[string, string]>; operands: string[] } {
  const opts: Array<[string, string]> = [];
  const operands: string[] = [];
  const unrecognized = (a: string): UsageError => new UsageError(`unrecognized option '${a}'\nTry 'snapstack img --help' for more information`);
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i] as string;
    if (a.startsWith('--') && a.length > 2) {
      const eq = a.indexOf('=');
      const name = a.slice(2, eq < 0 ? undefined : eq);
      if (LONG_VALUE.has(name)) {
        const v = eq < 0 ? argv[++i] : a.slice(eq + 1);
        if (v === undefined) throw new UsageError(`option '--${name}' requires an argument\nTry 'snapstack img --help' for more information`);
        opts.push([name, v]);
      } else if (LONG_FLAG.has(name) && eq < 0) opts.push([name, '']);
      else throw unrecognized(a);
    } else if (a.startsWith('-') && a.length > 1) {
      for (let k = 1; k < a.length; k++) {
        const c = a[k] as string;
        if (SHORT_VALUE.has(c)) {
          const v = k + 1 < a.length ? a.slice(k + 1) : argv[++i];
          if (v === undefined) throw new UsageError(`option requires an argument -- '${c}'\nTry 'snapstack img --help' for more information`);
          opts.push([c, v]);
          break;
        }
        if (!'hnqwU'.includes(c)) throw unrecognized(a);
        opts.push([c, '']);
      }
    } else operands.push(a);
  }
  return { opts, operands };
}

function parseBenchArgs(argv: string[]): BenchOptions {
  const { opts, operands } = getopt(argv);
  const o: Omit<BenchOptions, 'filename'> = {
    count: 75000,
    depth: 64,
    fmt: undefined,
    offset: 0,
    bufsize: 4096,
    step: 0,
    cache: 'writeback',
    aio: 'threads',
    write: false,
    quiet: false,
    forceShare: false,
    pattern: 0,
    flushInterval: 0,
    drainOnFlush: true,
  };
  for (const [name, v] of opts) {
    switch (name) {
      case 'c':
        o.count = uintOption(v, 'request count');
        break;
      case 'd':
        o.depth = uintOption(v, 'queue depth', 1);
        break;
      case 'f':
        o.fmt = v;
        break;
      case 'n':
        o.aio = 'native';
        break;
      case 'i':
        if (!AIO_MODES.includes(v)) throw new UsageError(`Invalid aio option: ${v}`);
        o.aio = v;
        break;
      case 'o':
        o.offset = cvtnum('offset', v, 0n, INT64_MAX);
        break;
      case 'q':
        o.quiet = true;
        break;
      case 's':
        o.bufsize = cvtnum('buffer size', v, 0n, BigInt(INT_MAX));
        break;
      case 'S':
        o.step = cvtnum('step_size', v, 0n, BigInt(INT_MAX));
        break;
      case 't':
        if (!CACHE_MODES.includes(v)) throw new UsageError('Invalid cache mode');
        o.cache = v;
        break;
      case 'w':
        o.write = true;
        break;
      case 'U':
      case 'force-share':
        o.forceShare = true;
        break;
      case 'pattern': {
        const n = parseUint(v);
        if (n === null || n > 0xff) throw new UsageError('Invalid pattern byte specified');
        o.pattern = n;
        break;
      }
      case 'flush-interval':
        o.flushInterval = uintOption(v, 'flush interval');
        break;
      case 'no-drain':
        o.drainOnFlush = false;
        break;
      default:
        throw new UsageError(`unrecognized option '${name}'\nTry 'snapstack img --help' for more information`);
    }
  }
  const [filename] = operands;
  if (filename === undefined || operands.length !== 1) throw new UsageError("Expecting one image file name\nTry 'snapstack img --help' for more information");
  if (!o.write && o.flushInterval > 0) throw new UsageError('--flush-interval is only available in write tests');
  if (o.flushInterval > 0 && o.flushInterval < o.depth) throw new UsageError("Flush interval can't be smaller than depth");
  return { ...o, filename };
}

/** A request failure as qemu-img reports it ("Failed request: Input/output error"). */
class RequestFailed extends Error {}

/**
 * Runs qemu-img's bench loop (bench_cb) on `blk`: keeps `depth` requests in flight, moves the
 * offset by `step` (wrapping as qemu-img does), flushes every `flushInterval` requests.
 */
function runRequests(blk: BlockBackend, o: BenchOptions, buf: Uint8Array): Promise<void> {
  const imageSize = blkGetLength(blk);
  const step = o.step === 0 ? o.bufsize : o.step;
  let n = o.count;
  let inFlight = 0;
  let inFlush = false;
  let offset = o.offset;
  return new Promise<void>((resolve, reject) => {
    let failed = false;
    const fail = (e: unknown): void => {
      if (failed) return;
      failed = true;
      reject(e);
    };
    const done = (p: Promise<void>): void => {
      p.then(
        () => callback(),
        (e: unknown) => fail(e),
      );
    };
    const issue = (at: number): Promise<void> => {
      // past the end: qemu-img's request fails with EIO (blk_check_byte_request)
      if (at + o.bufsize > imageSize) return Promise.reject(new RequestFailed(strerror('EIO')));
      return o.write ? blkPwrite(blk, at, buf) : blkPread(blk, at, buf);
    };
    const callback = (): void => {
      if (failed) return;
      if (inFlush) {
        inFlush = false; // the flush after a drained queue finished: go on
      } else if (inFlight > 0) {
        const remaining = n - inFlight;
        n--;
        inFlight--;
        if (o.flushInterval > 0 && remaining % o.flushInterval === 0) {
          if (inFlight === 0 || !o.drainOnFlush) {
            if (o.drainOnFlush) {
              inFlush = true;
              done(blkFlush(blk));
            } else blkFlush(blk).catch((e: unknown) => fail(e));
          }
          if (o.drainOnFlush) return;
        }
      }
      while (n > inFlight && inFlight < o.depth) {
        const at = offset;
        inFlight++;
        done(issue(at));
        offset += step;
        offset = imageSize <= o.bufsize ? 0 : offset % (imageSize - o.bufsize);
      }
      if (n === 0 && !inFlush) resolve();
    };
    callback();
  });
}

/** Runs `img bench ARGS`; returns the exit status. */
export async function imgBench(argv: string[], out: Out, err: Out): Promise<number> {
  let o: BenchOptions;
  try {
    o = parseBenchArgs(argv);
  } catch (e) {
    printError(err, e instanceof Error ? e.message : String(e));
    return 1;
  }
  if (o.aio === 'native' && o.cache !== 'none' && o.cache !== 'off' && o.cache !== 'directsync') {
    err(`${P}: Could not open '${o.filename}': aio=native was specified, but it requires cache.direct=on, which was not specified.`);
    return 1;
  }
  if (o.aio === 'native' || o.cache === 'none' || o.cache === 'off' || o.cache === 'directsync') {
    err(`${P}: Could not open '${o.filename}': cache.direct=on (O_DIRECT) is not supported by snapstack`);
    return 1;
  }
  let img;
  try {
    img = await openImage(o.filename, { aio: 'threads', readOnly: !o.write, forceShare: o.forceShare, ...(o.fmt === undefined ? {} : { format: o.fmt }) });
  } catch (e) {
    err(`${P}: Could not open '${o.filename}': ${isBlockError(e) ? e.message : describeError(e)}`);
    return 1;
  }
  try {
    const show = out; // qemu-img's -q quiets only the open, not these lines
    const step = o.step === 0 ? o.bufsize : o.step;
    show(`Sending ${o.count} ${o.write ? 'write' : 'read'} requests, ${o.bufsize} bytes each, ${o.depth} in parallel (starting at offset ${o.offset}, step size ${step})`);
    if (o.flushInterval > 0) show(`Sending flush every ${o.flushInterval} requests`);
    const buf = new Uint8Array(o.bufsize).fill(o.pattern);
    const t1 = process.hrtime.bigint();
    try {
      await runRequests(img.backend, o, buf);
    } catch (e) {
      const why = e instanceof RequestFailed ? e.message : isBlockError(e) ? strerror(e.code) : describeError(e);
      err(`${P}: Failed request: ${why}`);
      return 1;
    }
    const seconds = Number(process.hrtime.bigint() - t1) / 1e9;
    show(`Run completed in ${seconds.toFixed(3)} seconds.`);
    return 0;
  } finally {
    await img.close();
  }
}

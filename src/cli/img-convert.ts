/**
 * `img convert` (copy an image, or one of its snapshots, into a new raw or qcow2 image, keeping it
 * sparse; `-c` writes qcow2 clusters compressed, `-n` writes into an existing image, `-p` prints
 * qemu-img's progress; `-B FILE -F FMT` / `-o backing_file=..,backing_fmt=..` makes a qcow2 target
 * over a backing file and copies only what the source's top image allocates) and `img compare` (qemu-img compare's messages and exit codes: 0
 * identical, 1 differ, 2 error). convert walks the source as qemu-img 7.2 does (block status
 * runs, 2 MiB chunks, one target cluster at a time with -c), so its progress lines match.
 */
import fs from 'node:fs';
import { blkPwriteCompressed } from '../block/backend.js';
import { withBqlSync } from '../block/bql.js';
import { BlockError, isBlockError } from '../block/errors.js';
import { findProtocolDriver } from '../block/driver.js';
import { bdrvBlockStatus, bdrvGetLength } from '../block/io.js';
import { parseOptions } from '../block/options.js';
import { createRawFile } from '../drivers/file/driver.js';
import { createQcow2File } from '../drivers/qcow2/create.js';
import { openImage, type Image } from '../image.js';
import { createOptions } from './create-options.js';
import { createOnProtocol } from './img-create-protocol.js';
import { isJsonFilename, jsonFilenameOptions, optionString } from './json-filename.js';
import { takeFlag, takeForceShare, takeSwitch, refuseUnknownOptions } from './args.js';
import { describeError, strerror } from '../commands/format.js';
import type { Out } from './img-usage.js';

const CHUNK = 1024 * 1024;
/** qemu-img convert's buffer (IO_BUF_SIZE): the most one data chunk covers. */
const IO_BUF_SIZE = 2 * 1024 * 1024;
/** qemu-img convert's default -S: zero runs of at least this many bytes are left sparse. */
const MIN_SPARSE = 4096;
const P = 'snapstack img';
const CONVERT_USAGE =
  'usage: snapstack img convert [-c] [-n] [-p] [-q] [-f FMT] [-U] [-O raw|qcow2] [-B BACKING_FILE [-F BACKING_FMT]] [-o OPTIONS] [-l snapshot.name=TAG|snapshot.id=ID|ID_OR_NAME] SRC DST';
const COMPARE_USAGE = 'usage: snapstack img compare [-f FMT] [-F FMT] [-U] A B';

function isZero(buf: Uint8Array): boolean {
  for (let i = 0; i < buf.length; i++) if (buf[i] !== 0) return false;
  return true;
}

/** Which snapshot `-l` names: `snapshot.name=X`, `snapshot.id=X`, or a bare ID-or-name. */
function parseSnapshotParam(text: string): string {
  if (!text.includes('=')) return text;
  const o = parseOptions(text);
  const v = o['snapshot.name'] ?? o['snapshot.id'];
  if (v === undefined) throw new BlockError('EINVAL', `Failed in parsing snapshot param '${text}'`, { field: '-l', value: text });
  return v;
}

/**
 * qemu-img's simple progress meter (util/qemu-progress.c): single-precision state, a line
 * `    (P/100%)\r` whenever the value moved by more than 1 point, and at 0 and 100; a newline at the end.
 */
export class ConvertProgress {
  private current = 0;
  private lastPrint = 0;
  private readonly minSkip = Math.fround(1.0);

  constructor(private readonly write: ((s: string) => void) | null) {
    this.print();
  }

  /** Sets the value (0..100) and prints it when qemu-img would. */
  set(percent: number): void {
    this.current = Math.fround(percent);
    const c = this.current;
    if (c > Math.fround(this.lastPrint + this.minSkip) || c < Math.fround(this.lastPrint - this.minSkip) || c === 100 || c === 0) {
      this.lastPrint = c;
      this.print();
    }
  }

  /** Ends the meter (qemu-img prints a newline). */
  end(): void {
    this.write?.('\n');
  }

  private print(): void {
    this.write?.(`    (${this.current.toFixed(2)}/100%)\r`);
  }
}

/** The kinds of source extent qemu-img convert tells apart. */
const enum Status {
  Data,
  Zero,
  /** Not allocated in the source's top image: left unallocated, the target's backing file shows (only with a target backing file). */
  Backing,
}

/** How the walk treats the target's backing file (qemu-img's target_has_backing, target_backing_sectors). */
interface TargetBacking {
  /** The target has a backing file: ranges the source's top does not allocate are skipped. */
  has: boolean;
  /** The new target's backing file length in bytes (zeros from there on are skipped too), or -1 when unknown (`-n`). */
  lengthBytes: number;
}

const NO_BACKING: TargetBacking = { has: false, lengthBytes: -1 };

/** qemu-img convert's walk over the source (convert_iteration_sectors), in bytes. */
class SourceWalk {
  private nextStatus = 0;
  status = Status.Data;

  constructor(
    private readonly src: Image,
    private readonly size: number,
    private readonly bufSize: number,
    private readonly compressCluster: number,
    private readonly target: TargetBacking = NO_BACKING,
  ) {}

  /** The length of the next piece from `pos`, setting `status` for it. */
  async next(pos: number): Promise<number> {
    const root = this.src.backend.root;
    if (root === null) throw new BlockError('ENOMEDIUM', `convert: the source '${this.src.name}' has no medium`);
    let n = this.size - pos;
    // past the end of the target's backing file a zero needs no write: split the walk there
    const tbl = this.target.lengthBytes;
    const postBackingZero = tbl >= 0 && pos >= tbl;
    if (tbl >= 0 && pos < tbl && pos + n > tbl) n = tbl - pos;
    if (this.nextStatus <= pos) {
      // the source's top image alone (QEMU: block status above the source's backing node); an
      // unallocated range reads as zero only where no backing file of the source reaches
      const st = await bdrvBlockStatus(root, pos, n);
      if (st.zero) this.status = postBackingZero ? Status.Backing : Status.Zero;
      else if (st.data || st.allocated || !this.target.has) this.status = Status.Data;
      else this.status = Status.Backing;
      this.nextStatus = pos + st.bytes;
    }
    n = Math.min(n, this.nextStatus - pos);
    if (this.status === Status.Data) n = Math.min(n, this.bufSize);
    const C = this.compressCluster;
    if (C > 0) {
      // compressed images are written in whole clusters: a short zero run counts as data
      if (n < C) {
        n = Math.min(C, this.size - pos);
        this.status = Status.Data;
      } else n -= n % C;
    }
    return n;
  }
}

/** What `img convert` was asked. */
interface ConvertRequest {
  srcFmt: string | undefined;
  dstFmt: string;
  options: string | undefined;
  /** `-B`: the target's backing file. */
  backingFile: string | undefined;
  /** `-F`: the target's backing file format. */
  backingFmt: string | undefined;
  /** How many sources were named (only one is taken; several refused as qemu-img when -B is given). */
  sourceCount: number;
  snap: string | undefined;
  forceShare: boolean;
  progress: boolean;
  compress: boolean;
  noCreate: boolean;
  src: string;
  dst: string;
}

function parseConvertArgs(args: string[]): ConvertRequest {
  const srcFmt = takeFlag(args, '-f');
  const dstFmt = takeFlag(args, '-O') ?? 'raw';
  const options = takeFlag(args, '-o');
  const backingFile = takeFlag(args, '-B');
  const backingFmt = takeFlag(args, '-F');
  const snap = takeFlag(args, '-l');
  const forceShare = takeForceShare(args);
  const progress = takeSwitch(args, '-p');
  const quiet = takeSwitch(args, '-q');
  const compress = takeSwitch(args, '-c');
  const noCreate = takeSwitch(args, '-n');
  refuseUnknownOptions(args, CONVERT_USAGE);
  const src = args[0];
  const dst = args[args.length - 1];
  if (src === undefined || dst === undefined || args.length < 2) throw new BlockError('EINVAL', `Expecting a source and a destination\n${CONVERT_USAGE}`);
  const sourceCount = args.length - 1;
  return { srcFmt, dstFmt, options, backingFile, backingFmt, sourceCount, snap, forceShare, progress: progress && !quiet, compress, noCreate, src, dst };
}

/**
 * Copies `from` into `to` as qemu-img convert does; `fresh`: the target reads as zeros already
 * (never with a backing file: zeros must mask it); `target`: its backing file, whose data shows
 * wherever the source's top image allocates nothing.
 */
async function copyImage(from: Image, to: Image, req: ConvertRequest, fresh: boolean, target: TargetBacking, progressOut: (s: string) => void): Promise<void> {
  const size = from.size; // the padding up to a whole sector stays zero in the target
  const targetCluster = to.backend.root?.drv.clusterSize?.() ?? 0;
  const C = req.compress ? targetCluster : 0;
  const bufSize = req.compress ? targetCluster : IO_BUF_SIZE;
  // first pass: how many bytes of data there are (the progress meter's 100%)
  let allocated = 0;
  const count = new SourceWalk(from, size, bufSize, C, target);
  for (let pos = 0; pos < size; ) {
    const n = await count.next(pos);
    if (count.status === Status.Data) allocated += n;
    pos += n;
  }
  const meter = req.progress ? new ConvertProgress(progressOut) : null;
  const walk = new SourceWalk(from, size, bufSize, C, target);
  const buf = new Uint8Array(bufSize);
  let done = 0;
  for (let pos = 0; pos < size; ) {
    const n = await walk.next(pos);
    if (walk.status === Status.Data) {
      const view = buf.subarray(0, n);
      await at('reading', pos, from.read(pos, n, view));
      if (req.compress) {
        // whole clusters only: a short last one is padded up to the cluster or the target's end
        const whole = n < C ? Math.min(C, to.size - pos) : n;
        const w = buf.subarray(0, Math.max(n, whole)).fill(0, n);
        if (!isZero(view)) await at('writing', pos, blkPwriteCompressed(to.backend, pos, w));
        else if (!fresh) await at('writing', pos, to.writeZeroes(pos, n));
      } else await at('writing', pos, writeSparse(to, pos, view, fresh));
      done += n;
      meter?.set((100 * done) / allocated);
    } else if (walk.status === Status.Zero && !fresh) await at('writing', pos, to.writeZeroes(pos, n));
    pos += n;
  }
  if (req.compress) await blkPwriteCompressed(to.backend, 0, new Uint8Array(0));
  await to.flush();
  meter?.set(100);
  meter?.end();
}

/** Waits for a transfer of the chunk at `pos`; a failure reads as qemu-img's ("error while writing at byte N: Input/output error"). */
async function at(what: 'reading' | 'writing', pos: number, p: Promise<unknown>): Promise<void> {
  try {
    await p;
  } catch (e) {
    const code = isBlockError(e) ? e.code : 'EIO';
    throw new BlockError(code, `error while ${what} at byte ${pos}: ${strerror(code)}`, { offset: pos, op: what === 'reading' ? 'read' : 'write' });
  }
}

/** Writes the non-zero parts of `data` (in MIN_SPARSE pieces); zero parts stay sparse, or are zeroed when the target is not fresh. */
async function writeSparse(to: Image, pos: number, data: Uint8Array, fresh: boolean): Promise<void> {
  let i = 0;
  while (i < data.length) {
    const zero = isZero(data.subarray(i, Math.min(i + MIN_SPARSE, data.length)));
    let j = i + MIN_SPARSE;
    while (j < data.length && isZero(data.subarray(j, Math.min(j + MIN_SPARSE, data.length))) === zero) j += MIN_SPARSE;
    j = Math.min(j, data.length);
    if (!zero) await to.write(pos + i, data.subarray(i, j));
    else if (!fresh) await to.writeZeroes(pos + i, j - i);
    i = j;
  }
}

/**
 * qemu-img convert's refusals of a target backing file, in its order: several sources (the
 * concatenation has no one top image), a backing file without its format (7.2 requires -F), a
 * format without a file (qcow2's creation refuses it).
 */
function checkTargetBacking(req: ConvertRequest, backingFile: string | undefined, backingFmt: string | undefined): void {
  if (backingFile !== undefined && req.sourceCount > 1) {
    throw new BlockError('EINVAL', 'Having a backing file for the target makes no sense when concatenating multiple input images', { field: '-B', value: backingFile });
  }
  if (req.sourceCount > 1) throw new BlockError('ENOTSUP', `Expecting a source and a destination: concatenating several sources is not supported\n${CONVERT_USAGE}`, { field: 'filename' });
  if (req.noCreate) return;
  if (backingFile !== undefined && backingFmt === undefined) {
    throw new BlockError('EINVAL', 'Use of backing file requires explicit backing format', { field: 'backing_fmt' });
  }
  if (backingFmt !== undefined && backingFile === undefined) {
    throw new BlockError('EINVAL', `${req.dst}: error while converting ${req.dstFmt}: Backing format cannot be used without backing file`, { file: req.dst, field: 'backing_fmt' });
  }
}

/** A BlockError's own message (what qemu-img prints after its name), or the error's text. */
function messageOf(e: unknown): string {
  return isBlockError(e) ? e.message : describeError(e);
}

/**
 * Runs `img convert`; returns the exit status (1 on an error, printed on `err` as qemu-img does).
 * Progress (`-p`) goes to `progressOut`, standard output by default (it has no newlines).
 */
export async function imgConvert(
  args: string[],
  out: Out,
  err: Out = (l) => void process.stderr.write(`${l}\n`),
  progressOut: (s: string) => void = (s) => void process.stdout.write(s),
): Promise<number> {
  void out;
  let req: ConvertRequest;
  try {
    req = parseConvertArgs(args);
  } catch (e) {
    err(`${P}: ${messageOf(e)}`);
    return 1;
  }
  if (req.noCreate && req.options !== undefined) {
    err(`${P}: -o has no effect when skipping image creation`);
    return 1;
  }
  let from: Image;
  try {
    from = await openImage(imageTarget(req.src), { aio: 'sync', readOnly: true, forceShare: req.forceShare, ...(req.srcFmt === undefined ? {} : { format: req.srcFmt }) });
  } catch (e) {
    err(`${P}: Could not open '${req.src}': ${messageOf(e)}`);
    return 1;
  }
  try {
    if (req.snap !== undefined) {
      const snap = parseSnapshotParam(req.snap);
      try {
        await from.loadSnapshotTemporarily(snap);
      } catch (e) {
        // qemu-img: "Failed to load snapshot: Can't find snapshot"
        if (isBlockError(e) && e.code === 'ENOENT') throw new BlockError('ENOENT', "Failed to load snapshot: Can't find snapshot", { field: '-l', value: snap, cause: e });
        throw e;
      }
    }
    // qemu's block layer counts whole sectors: a raw source of 1000 bytes makes a 1024-byte target
    const size = Math.ceil(from.size / 512) * 512;
    const { dstFmt, dst } = req;
    if (dstFmt !== 'raw' && dstFmt !== 'qcow2') throw new BlockError('ENOTSUP', `Unknown file format '${dstFmt}'`, { field: '-O', value: dstFmt });
    if (req.compress && dstFmt !== 'qcow2') throw new BlockError('ENOTSUP', 'Compression not supported for this file format', { field: '-c', value: dstFmt });
    // -n: the existing target is taken to have the backing file -B names (qemu-img checks nothing)
    let targetHasBacking = req.noCreate && req.backingFile !== undefined;
    // an NBD target exists already and keeps its old bytes: it is formatted, not created; raw on it reads them (no zero-init)
    const dstProtocol = findProtocolDriver(dst);
    if (!req.noCreate) {
      const o = parseOptions(req.options ?? '');
      if (dstFmt === 'raw') {
        // qemu-img adds -B and -F to raw's creation options, which have neither
        if (req.backingFile !== undefined) throw new BlockError('ENOTSUP', `Backing file not supported for file format 'raw'`, { field: '-B', value: req.backingFile });
        if (req.backingFmt !== undefined) throw new BlockError('ENOTSUP', `Backing file format not supported for file format 'raw'`, { field: '-F', value: req.backingFmt });
      } else {
        // -B and -F override -o backing_file / backing_fmt, as in qemu-img
        if (req.backingFile !== undefined) o['backing_file'] = req.backingFile;
        if (req.backingFmt !== undefined) o['backing_fmt'] = req.backingFmt;
      }
      const co = createOptions(dstFmt, o); // qemu-img's options, refused by name when unknown
      targetHasBacking = co.backingFile !== undefined;
      checkTargetBacking(req, co.backingFile, co.backingFormat);
      if (dstProtocol !== null) {
        try {
          await createOnProtocol(dst, dstProtocol, dstFmt === 'raw' ? { format: 'raw', sizeBytes: size } : { format: 'qcow2', options: { sizeBytes: size, ...co } });
        } catch (e) {
          // qemu-img: "nbd://h/e: error while converting raw: Cannot grow NBD nodes"
          const why = messageOf(e).replace(`${dst}: `, '');
          throw new BlockError(isBlockError(e) ? e.code : 'EIO', `${dst}: error while converting ${dstFmt}: ${why}`, { file: dst, op: 'create', cause: e });
        }
      } else if (dstFmt === 'raw') withBqlSync((bql) => createRawFile(bql, dst, size));
      else withBqlSync((bql) => createQcow2File(bql, dst, { sizeBytes: size, ...co }));
    } else if (req.sourceCount > 1) checkTargetBacking(req, req.backingFile, req.backingFmt);
    let to: Image;
    try {
      to = await openImage(dst, { aio: 'sync', format: dstFmt });
    } catch (e) {
      err(`${P}: Could not open '${dst}': ${messageOf(e)}`);
      return 1;
    }
    try {
      if (req.noCreate && to.size < size) throw new BlockError('EINVAL', 'output file is smaller than input file', { file: dst, field: 'size', value: to.size });
      // a new target's backing length: zeros of the source past it need no write (they read as zeros)
      const backingNode = to.backend.root?.backing;
      const target: TargetBacking = {
        has: targetHasBacking,
        lengthBytes: targetHasBacking && !req.noCreate && backingNode !== undefined ? bdrvGetLength(backingNode) : -1,
      };
      await copyImage(from, to, req, !req.noCreate && !targetHasBacking && !(dstProtocol !== null && dstFmt === 'raw'), target, progressOut);
    } finally {
      await to.close();
    }
  } catch (e) {
    err(`${P}: ${messageOf(e)}`);
    return 1;
  } finally {
    await from.close();
  }
  return 0;
}

/** First differing 512-byte sector offset between two equally long buffers, or -1. */
function firstMismatch(a: Uint8Array, b: Uint8Array): number {
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return i - (i % 512);
  return -1;
}

async function firstNonZero(img: Image, from: number, to: number, buf: Uint8Array): Promise<number> {
  for (let off = from; off < to; off += CHUNK) {
    const n = Math.min(CHUNK, to - off);
    const v = await img.read(off, n, buf.subarray(0, n));
    for (let i = 0; i < n; i++) if (v[i] !== 0) return off + i - (i % 512);
  }
  return -1;
}

/** What openImage takes for an image name: the name, or a json:{...} name's options. */
function imageTarget(name: string): string {
  return isJsonFilename(name) ? optionString(jsonFilenameOptions(name)) : name;
}

/** Runs `img compare`; returns 0 identical, 1 different, 2 on error. */
export async function imgCompare(args: string[], out: Out, err: Out): Promise<number> {
  try {
    const fa = takeFlag(args, '-f');
    const fb = takeFlag(args, '-F') ?? fa;
    const forceShare = takeForceShare(args);
    takeSwitch(args, '-q');
    takeSwitch(args, '-s');
    refuseUnknownOptions(args, COMPARE_USAGE);
    const [pa, pb] = args;
    if (pa === undefined || pb === undefined || args.length !== 2) throw new BlockError('EINVAL', `Expecting two image file names\n${COMPARE_USAGE}`);
    // a protocol's file name (nbd://, nbd+unix://) names no host file: its driver says whether it opens
    for (const p of [pa, pb]) if (findProtocolDriver(p) === null && !isJsonFilename(p) && !fs.existsSync(p)) throw new BlockError('ENOENT', `Could not open '${p}': No such file or directory`, { file: p });
    const a = await openImage(imageTarget(pa), { aio: 'sync', readOnly: true, forceShare, ...(fa === undefined ? {} : { format: fa }) });
    try {
      const b = await openImage(imageTarget(pb), { aio: 'sync', readOnly: true, forceShare, ...(fb === undefined ? {} : { format: fb }) });
      try {
        const common = Math.min(a.size, b.size);
        const ba = new Uint8Array(CHUNK);
        const bb = new Uint8Array(CHUNK);
        for (let off = 0; off < common; off += CHUNK) {
          const n = Math.min(CHUNK, common - off);
          await a.read(off, n, ba.subarray(0, n));
          await b.read(off, n, bb.subarray(0, n));
          const m = firstMismatch(ba.subarray(0, n), bb.subarray(0, n));
          if (m >= 0) {
            out(`Content mismatch at offset ${off + m}!`);
            return 1;
          }
        }
        // qemu-img warns only once the common part is equal
        if (a.size !== b.size) out('Warning: Image size mismatch!');
        const longer = a.size > b.size ? a : b;
        const nz = await firstNonZero(longer, common, longer.size, ba);
        if (nz >= 0) {
          out(`Content mismatch at offset ${nz}!`);
          return 1;
        }
        out('Images are identical.');
        return 0;
      } finally {
        await b.close();
      }
    } finally {
      await a.close();
    }
  } catch (e) {
    err(`snapstack img: ${describeError(e)}`);
    return 2;
  }
}

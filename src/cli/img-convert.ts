/**
 * `img convert` (copy an image, or one of its snapshots, into a new raw or qcow2 image, keeping it
 * sparse) and `img compare` (qemu-img compare's messages and exit codes: 0 identical, 1 differ,
 * 2 error). Both move data in 1 MiB chunks through the library API.
 */
import fs from 'node:fs';
import { withBqlSync } from '../block/bql.js';
import { BlockError } from '../block/errors.js';
import { parseOptions } from '../block/options.js';
import { createRawFile } from '../drivers/file/driver.js';
import { createQcow2File } from '../drivers/qcow2/create.js';
import { openImage, type Image } from '../image.js';
import { createOptions } from './create-options.js';
import { takeFlag, takeForceShare, takeSwitch, refuseUnknownOptions } from './args.js';
import { describeError } from './format.js';
import type { Out } from './img-usage.js';

const CHUNK = 1024 * 1024;
const CONVERT_USAGE = 'usage: snapstack img convert [-f FMT] [-U] [-O raw|qcow2] [-o OPTIONS] [-l snapshot.name=TAG|snapshot.id=ID|ID_OR_NAME] SRC DST';
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

/** Runs `img convert`; returns the exit status. */
export async function imgConvert(args: string[], out: Out): Promise<number> {
  const srcFmt = takeFlag(args, '-f');
  const dstFmt = takeFlag(args, '-O') ?? 'raw';
  const o = parseOptions(takeFlag(args, '-o') ?? '');
  const snap = takeFlag(args, '-l');
  const forceShare = takeForceShare(args);
  takeSwitch(args, '-p');
  takeSwitch(args, '-q');
  refuseUnknownOptions(args, CONVERT_USAGE);
  const [src, dst] = args;
  if (src === undefined || dst === undefined || args.length !== 2) throw new BlockError('EINVAL', `Expecting a source and a destination\n${CONVERT_USAGE}`);
  const from = await openImage(src, { aio: 'sync', readOnly: true, forceShare, ...(srcFmt === undefined ? {} : { format: srcFmt }) });
  try {
    if (snap !== undefined) await from.loadSnapshotTemporarily(parseSnapshotParam(snap));
    const size = from.size;
    if (dstFmt !== 'raw' && dstFmt !== 'qcow2') throw new BlockError('ENOTSUP', `Unknown file format '${dstFmt}'`, { field: '-O', value: dstFmt });
    const co = createOptions(dstFmt, o); // qemu-img's options, refused by name when unknown
    if (dstFmt === 'raw') withBqlSync((bql) => createRawFile(bql, dst, size));
    else withBqlSync((bql) => createQcow2File(bql, dst, { sizeBytes: size, ...co }));
    const to = await openImage(dst, { aio: 'sync', format: dstFmt });
    try {
      const buf = new Uint8Array(CHUNK);
      for (let off = 0; off < size; off += CHUNK) {
        const n = Math.min(CHUNK, size - off);
        const view = buf.subarray(0, n);
        await from.read(off, n, view);
        if (!isZero(view)) await to.write(off, view);
      }
    } finally {
      await to.close();
    }
  } finally {
    await from.close();
  }
  void out;
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
    for (const p of [pa, pb]) if (!fs.existsSync(p)) throw new BlockError('ENOENT', `Could not open '${p}': No such file or directory`, { file: p });
    const a = await openImage(pa, { aio: 'sync', readOnly: true, forceShare, ...(fa === undefined ? {} : { format: fa }) });
    try {
      const b = await openImage(pb, { aio: 'sync', readOnly: true, forceShare, ...(fb === undefined ? {} : { format: fb }) });
      try {
        const common = Math.min(a.size, b.size);
        if (a.size !== b.size) out('Warning: Image size mismatch!');
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

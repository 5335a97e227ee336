/**
 * `snapstack img amend [-f fmt] [-q] [-p] [--force] -o options FILE`: qemu-img 7.2's amend for
 * qcow2 (compat=0.10|1.1, lazy_refcounts, refcount_bits, size; backing_file/backing_fmt only to
 * their current values, as 7.2, which points to rebase otherwise), with its refusals by name and
 * exit codes. The steps run in QEMU's order (upgrade, refcount width, lazy refcounts, size,
 * downgrade), each on a freshly opened image; every refusal is made before anything is written.
 */
import { BlockError, isBlockError } from '../block/errors.js';
import { parseOptions, parseSize, type NodeOptions } from '../block/options.js';
import { changeRefcountWidth, downgradeToV2, setLazyRefcounts, upgradeToV3 } from '../drivers/qcow2/amend.js';
import { headerBackingFormat } from '../drivers/qcow2/header.js';
import { Qcow2Instance } from '../drivers/qcow2/instance.js';
import { withMetadataLock, type MetadataLocked } from '../drivers/qcow2/metadata-lock.js';
import { qcow2Truncate } from '../drivers/qcow2/resize.js';
import type { Qcow2State } from '../drivers/qcow2/state.js';
import { openImage } from '../image.js';
import { refuseUnknownOptions, takeFlag, takeSwitch } from './args.js';
import { describeError } from '../commands/format.js';
import type { Out } from './img-usage.js';
import { IMG_USAGE as USAGE } from './img-usage.js';

const P = 'snapstack img';
/** Options amend takes for qcow2. */
const AMEND = ['compat', 'size', 'backing_file', 'backing_fmt', 'lazy_refcounts', 'refcount_bits', 'data_file', 'data_file_raw'];
/** Options of qcow2 creation that amend cannot change. */
const CREATE_ONLY = ['cluster_size', 'preallocation', 'encryption', 'encrypt.format', 'extended_l2', 'compression_type'];

/** Removes every `-o OPTIONS` and merges them (later ones win). */
function takeOptions(args: string[]): string[] | null {
  const all: string[] = [];
  for (let v = takeFlagFirst(args, '-o'); v !== undefined; v = takeFlagFirst(args, '-o')) all.push(v);
  return all.length === 0 ? null : all;
}

function takeFlagFirst(args: string[], flag: string): string | undefined {
  const i = args.indexOf(flag);
  if (i < 0) return undefined;
  const v = args[i + 1];
  if (v === undefined) throw new BlockError('EINVAL', `option ${flag} needs a value`, { field: flag });
  args.splice(i, 2);
  return v;
}

/** What the options ask for, checked against the image as it is. */
interface AmendPlan {
  version: 2 | 3;
  refcountBits: number;
  lazy: boolean;
  size: number | null;
}

/** Opens FILE as qcow2 read/write, runs `fn` on its state, closes. */
async function withQcow2<T>(file: string, fmt: string | undefined, fn: (s: Qcow2State) => Promise<T>): Promise<T> {
  let img;
  try {
    img = await openImage(file, { aio: 'sync', ...(fmt === undefined ? {} : { format: fmt }) });
  } catch (e) {
    throw new BlockError(isBlockError(e) ? e.code : 'EIO', `Could not open '${file}': ${isBlockError(e) ? e.message : describeError(e)}`, { file, cause: e });
  }
  try {
    const inst = img.backend.root?.instance;
    const name = img.backend.root?.driver.formatName ?? 'raw';
    if (!(inst instanceof Qcow2Instance)) throw new BlockError('ENOTSUP', `Format driver '${name}' does not support option amendment`, { op: 'amend' });
    return await fn(inst.state);
  } finally {
    await img.close();
  }
}

/** Validates the options against image state `s`; throws qemu-img's message for the first problem. */
function plan(o: NodeOptions, s: Qcow2State): AmendPlan {
  const h = s.header;
  let version: 2 | 3 = h.version;
  const compat = o['compat'];
  if (compat !== undefined) {
    if (compat === '0.10' || compat === 'v2') version = 2;
    else if (compat === '1.1' || compat === 'v3') version = 3;
    else throw new BlockError('EINVAL', `Unknown compatibility level ${compat}`, { field: 'compat', value: compat });
  }
  let refcountBits = s.refcountBits;
  if (o['refcount_bits'] !== undefined) {
    const text = o['refcount_bits'];
    const n = /^\d+$/.test(text) ? Number(text) : NaN;
    if (!(n > 0 && n <= 64 && (n & (n - 1)) === 0)) {
      throw new BlockError('EINVAL', 'Refcount width must be a power of two and may not exceed 64 bits', { field: 'refcount_bits', value: text });
    }
    refcountBits = n;
  }
  if (version < 3 && refcountBits !== 16 && o['refcount_bits'] === undefined) {
    throw new BlockError('ENOTSUP', 'compat=0.10 requires refcount_bits=16', { field: 'compat' });
  }
  if (version < 3 && refcountBits !== 16) {
    throw new BlockError('EINVAL', 'Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)', { field: 'refcount_bits' });
  }
  let lazy = (h.compatibleFeatures & 1n) !== 0n;
  const lz = o['lazy_refcounts'];
  if (lz !== undefined) {
    if (lz === 'on' || lz === 'true' || lz === 'yes') lazy = true;
    else if (lz === 'off' || lz === 'false' || lz === 'no') lazy = false;
    else throw new BlockError('EINVAL', "Parameter 'lazy_refcounts' expects 'on' or 'off'", { field: 'lazy_refcounts', value: lz });
  }
  if (lazy && version < 3) {
    throw new BlockError('EINVAL', 'Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)', { field: 'lazy_refcounts' });
  }
  if (o['data_file'] !== undefined || o['data_file_raw'] !== undefined) {
    throw new BlockError('EINVAL', 'data-file can only be set for images that use an external data file', { field: 'data_file' });
  }
  if (o['backing_file'] !== undefined || o['backing_fmt'] !== undefined) {
    const file = o['backing_file'] ?? null;
    const fmt = o['backing_fmt'] ?? null;
    if (file !== h.backingFile || fmt !== headerBackingFormat(h)) {
      throw new BlockError('EINVAL', "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.", { field: 'backing_file' });
    }
  }
  const size = o['size'] === undefined ? null : parseSize(o['size'], 'size');
  return { version, refcountBits, lazy, size };
}

/** Runs `img amend ARGS`; returns the exit status. */
export async function imgAmend(argv: string[], _out: Out, err: Out): Promise<number> {
  const args = [...argv];
  const fmt = takeFlag(args, '-f');
  takeSwitch(args, '-q');
  takeSwitch(args, '-p');
  takeSwitch(args, '--force');
  const optTexts = takeOptions(args);
  refuseUnknownOptions(args, USAGE);
  if (optTexts === null) {
    err(`${P}: Must specify options (-o)\nTry 'snapstack img --help' for more information`);
    return 1;
  }
  if (args.length !== 1) {
    err(`${P}: Expecting one image file name\nTry 'snapstack img --help' for more information`);
    return 1;
  }
  const file = args[0] as string;
  const o: NodeOptions = {};
  try {
    for (const t of optTexts) Object.assign(o, parseOptions(t));
  } catch (e) {
    err(`${P}: ${isBlockError(e) ? e.message : describeError(e)}`);
    return 1;
  }
  let p: AmendPlan;
  try {
    p = await withQcow2(file, fmt, async (s) => {
      for (const k of Object.keys(o)) {
        if (CREATE_ONLY.includes(k)) throw new BlockError('EINVAL', `Invalid parameter '${k}'\nThis option is only supported for image creation`, { field: k });
        if (!AMEND.includes(k)) throw new BlockError('EINVAL', `Invalid parameter '${k}'`, { field: k });
      }
      return plan(o, s);
    });
  } catch (e) {
    err(`${P}: ${isBlockError(e) ? e.message : describeError(e)}`);
    return 1;
  }
  try {
    const lockedStep = (fn: (s: Qcow2State) => (l: MetadataLocked) => Promise<void>): Promise<void> => withQcow2(file, fmt, (s) => withMetadataLock(s, fn(s)));
    if (p.version === 3) await lockedStep((s) => (l) => upgradeToV3(l, s));
    await lockedStep((s) => async (l) => {
      if (p.refcountBits !== s.refcountBits) await changeRefcountWidth(l, s, p.refcountBits);
    });
    if (p.version === 3) await lockedStep((s) => (l) => setLazyRefcounts(l, s, p.lazy));
    else await lockedStep((s) => (l) => setLazyRefcounts(l, s, false));
    const size = p.size;
    if (size !== null) {
      await withQcow2(file, fmt, async (s) => {
        if (size !== s.sizeBytes) await qcow2Truncate(s, size);
      });
    }
    if (p.version === 2) await lockedStep((s) => (l) => downgradeToV2(l, s));
  } catch (e) {
    err(`${P}: ${isBlockError(e) ? e.message : describeError(e)}`);
    return 1;
  }
  return 0;
}

/**
 * `snapstack img map [-f FMT] [--output=human|json] FILENAME`, as qemu-img map: the guest ranges
 * and where their data lies in the image file (human), or every range with its flags (json).
 */
import { BlockError } from '../block/errors.js';
import type { BlockStatus } from '../block/driver.js';
import { bdrvBlockStatus, bdrvGetLength } from '../block/io.js';
import type { BlockNode } from '../block/node.js';
import { parseSize } from '../block/options.js';
import { openImage } from '../image.js';
import { takeFlag, takeForceShare, takeOutputJson, refuseUnknownOptions } from './args.js';
import type { Out } from './img-usage.js';

const USAGE = 'usage: snapstack img map [-f FMT] [-U] [--start-offset=OFFSET] [--max-length=LEN] [--output=human|json] FILENAME';

interface MapEntry {
  start: number;
  length: number;
  depth: number;
  data: boolean;
  zero: boolean;
  present: boolean;
  offset: number | null;
  file: string;
}

/**
 * The status of `bytes` at `offset` of `node` as seen through its backing chain (QEMU's
 * bdrv_block_status_above): where it is unallocated, the backing node is asked, down to the
 * bottom; `depth` says how far down the answer came from.
 */
async function chainStatus(node: BlockNode, offset: number, bytes: number, depth: number): Promise<{ st: BlockStatus; depth: number; node: BlockNode }> {
  const st = await bdrvBlockStatus(node, offset, bytes);
  const backing = node.backing;
  if (st.allocated || backing === undefined) return { st, depth, node };
  const reach = bdrvGetLength(backing) - offset;
  if (reach <= 0) return { st: { ...st, zero: true }, depth, node };
  return chainStatus(backing, offset, Math.min(st.bytes, reach), depth + 1);
}

/** Parses a non-negative byte count given to `--start-offset=` / `--max-length=`. */
function takeByteOption(args: string[], name: string): number | undefined {
  const i = args.findIndex((a) => a.startsWith(`${name}=`));
  if (i < 0) return undefined;
  const text = (args[i] as string).slice(name.length + 1);
  args.splice(i, 1);
  const n = parseSize(text, name);
  return n;
}

function hex(n: number): string {
  return n === 0 ? '0' : `0x${n.toString(16)}`;
}

/** Runs `img map`; returns the exit status. */
export async function imgMap(args: string[], out: Out, err: Out): Promise<number> {
  const fmt = takeFlag(args, '-f');
  const forceShare = takeForceShare(args);
  const json = takeOutputJson(args);
  const startOffset = takeByteOption(args, '--start-offset') ?? 0;
  const maxLength = takeByteOption(args, '--max-length');
  refuseUnknownOptions(args, USAGE);
  const [file] = args;
  if (file === undefined || args.length !== 1) throw new BlockError('EINVAL', `Expecting one image file name\n${USAGE}`);
  const img = await openImage(file, { aio: 'sync', readOnly: true, forceShare, ...(fmt === undefined ? {} : { format: fmt }) });
  try {
    const root = img.backend.root;
    if (root === null) throw new BlockError('ENOENT', `Device '${img.name}' has no medium`, { node: img.name });
    const entries: MapEntry[] = [];
    const end = maxLength === undefined ? img.size : Math.min(img.size, startOffset + maxLength);
    for (let off = Math.min(startOffset, img.size); off < end; ) {
      const { st, depth, node } = await chainStatus(root, off, end - off, 0);
      const last = entries[entries.length - 1];
      const contiguous =
        last !== undefined &&
        last.depth === depth &&
        last.file === node.filename &&
        last.data === st.data &&
        last.zero === st.zero &&
        last.present === st.allocated &&
        (last.offset === null ? st.hostOffset === null : st.hostOffset === last.offset + last.length);
      if (contiguous && last !== undefined) last.length += st.bytes;
      else entries.push({ start: off, length: st.bytes, depth, data: st.data, zero: st.zero, present: st.allocated, offset: st.hostOffset, file: node.filename });
      off += st.bytes;
    }
    if (json) {
      const rows = entries.map((e) => {
        const o: Record<string, unknown> = { start: e.start, length: e.length, depth: e.depth, present: e.present, zero: e.zero, data: e.data };
        if (e.offset !== null) o['offset'] = e.offset;
        return `${JSON.stringify(o).replace(/,"/g, ', "').replace(/":/g, '": ').replace(/^\{/, '{ ').replace(/\}$/, '}')}`;
      });
      out(`[${rows.join(',\n')}]`);
    } else {
      out(`${'Offset'.padEnd(16)}${'Length'.padEnd(16)}${'Mapped to'.padEnd(16)}File`);
      for (const e of entries) {
        if (!e.data) continue;
        if (e.offset === null) {
          err('snapstack img: File contains external, encrypted or compressed clusters.');
          return 1;
        }
        out(`${hex(e.start).padEnd(16)}${hex(e.length).padEnd(16)}${hex(e.offset).padEnd(16)}${e.file}`);
      }
    }
  } finally {
    await img.close();
  }
  return 0;
}

/**
 * `snapstack img map [-f FMT] [--output=human|json] FILENAME`, as qemu-img map: the guest ranges
 * and where their data lies in the image file (human), or every range with its flags (json).
 */
import { BlockError } from '../block/errors.js';
import { bdrvBlockStatus } from '../block/io.js';
import { openImage } from '../image.js';
import { takeFlag, takeForceShare, takeOutputJson, refuseUnknownOptions } from './args.js';
import type { Out } from './img-usage.js';

const USAGE = 'usage: snapstack img map [-f FMT] [-U] [--output=human|json] FILENAME';

interface MapEntry {
  start: number;
  length: number;
  data: boolean;
  zero: boolean;
  present: boolean;
  offset: number | null;
}

function hex(n: number): string {
  return n === 0 ? '0' : `0x${n.toString(16)}`;
}

/** Runs `img map`; returns the exit status. */
export async function imgMap(args: string[], out: Out, err: Out): Promise<number> {
  const fmt = takeFlag(args, '-f');
  const forceShare = takeForceShare(args);
  const json = takeOutputJson(args);
  refuseUnknownOptions(args, USAGE);
  const [file] = args;
  if (file === undefined || args.length !== 1) throw new BlockError('EINVAL', `Expecting one image file name\n${USAGE}`);
  const img = await openImage(file, { aio: 'sync', readOnly: true, forceShare, ...(fmt === undefined ? {} : { format: fmt }) });
  try {
    const root = img.backend.root;
    if (root === null) throw new BlockError('ENOENT', `Device '${img.name}' has no medium`, { node: img.name });
    const entries: MapEntry[] = [];
    for (let off = 0; off < img.size; ) {
      const st = await bdrvBlockStatus(root, off, img.size - off);
      const last = entries[entries.length - 1];
      const contiguous =
        last !== undefined &&
        last.data === st.data &&
        last.zero === st.zero &&
        last.present === st.allocated &&
        (last.offset === null ? st.hostOffset === null : st.hostOffset === last.offset + last.length);
      if (contiguous && last !== undefined) last.length += st.bytes;
      else entries.push({ start: off, length: st.bytes, data: st.data, zero: st.zero, present: st.allocated, offset: st.hostOffset });
      off += st.bytes;
    }
    if (json) {
      const rows = entries.map((e) => {
        const o: Record<string, unknown> = { start: e.start, length: e.length, depth: 0, present: e.present, zero: e.zero, data: e.data };
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
        out(`${hex(e.start).padEnd(16)}${hex(e.length).padEnd(16)}${hex(e.offset).padEnd(16)}${file}`);
      }
    }
  } finally {
    await img.close();
  }
  return 0;
}

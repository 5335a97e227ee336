/**
 * The `-o` options of `img create` and `img convert -O`, as qemu-img 7.2 takes them: an unknown
 * option is refused by name, sizes take suffixes (`cluster_size=4k`), booleans on/off.
 */
import { BlockError } from '../block/errors.js';
import { parseBool, parseSize, type NodeOptions } from '../block/options.js';
import type { Qcow2CreateOptions } from '../drivers/qcow2/create.js';

/** What `-o` asks of a new image: qcow2's creation options but the size (given apart). */
export type CreateOptions = Omit<Qcow2CreateOptions, 'sizeBytes'>;

/**
 * Parses the `-o` options for format `fmt` (`raw` takes none but `size`).
 * @locking common
 */
export function createOptions(fmt: string, o: NodeOptions): CreateOptions {
  const known = fmt === 'qcow2' ? ['cluster_size', 'refcount_bits', 'compat', 'lazy_refcounts', 'size', 'backing_file', 'backing_fmt'] : ['size'];
  for (const k of Object.keys(o)) {
    if (!known.includes(k)) throw new BlockError('EINVAL', `Invalid parameter '${k}' for file format '${fmt}'`, { field: k, value: o[k] ?? '' });
  }
  const res: CreateOptions = {};
  if (o['cluster_size'] !== undefined) res.clusterSize = parseSize(o['cluster_size'], 'cluster_size');
  if (o['refcount_bits'] !== undefined) res.refcountBits = parseSize(o['refcount_bits'], 'refcount_bits');
  const compat = o['compat'];
  if (compat !== undefined) {
    if (compat === '0.10' || compat === 'v2') res.compat = '0.10';
    else if (compat === '1.1' || compat === 'v3') res.compat = '1.1';
    else throw new BlockError('EINVAL', `Invalid compatibility level: '${compat}'`, { field: 'compat', value: compat });
  }
  if (o['backing_file'] !== undefined) res.backingFile = o['backing_file'];
  if (o['backing_fmt'] !== undefined) res.backingFormat = o['backing_fmt'];
  if (o['lazy_refcounts'] !== undefined) res.lazyRefcounts = parseBool(o, 'lazy_refcounts', false);
  return res;
}

/**
 * `snapstack img snapshot [-l | -a SNAPSHOT | -c SNAPSHOT | -d SNAPSHOT] FILENAME`, as qemu-img
 * snapshot: -l lists (nothing at all when there are none), -c creates (duplicates allowed, icount
 * 0 as qemu-img records it), -a applies (ID first, then name), -d deletes by name.
 */
import { BlockError } from '../block/errors.js';
import { openImage } from '../image.js';
import { takeFlag, takeForceShare, takeSwitch, refuseUnknownOptions } from './args.js';
import { describeError } from '../commands/format.js';
import type { Out } from './img-usage.js';
import { snapshotHeader, snapshotRow } from '../commands/snapshot-format.js';

const USAGE = 'usage: snapstack img snapshot [-l | -a SNAPSHOT | -c SNAPSHOT | -d SNAPSHOT] [-f FMT] [-U] FILENAME';

/** Runs `img snapshot`; returns the exit status. */
export async function imgSnapshot(args: string[], out: Out, err: Out): Promise<number> {
  const fmt = takeFlag(args, '-f');
  const list = takeSwitch(args, '-l');
  const forceShare = takeForceShare(args);
  const apply = takeFlag(args, '-a');
  const createTag = takeFlag(args, '-c');
  const del = takeFlag(args, '-d');
  takeSwitch(args, '-q');
  refuseUnknownOptions(args, USAGE);
  const actions = [list, apply !== undefined, createTag !== undefined, del !== undefined].filter(Boolean).length;
  const [file] = args;
  if (actions !== 1 || file === undefined || args.length !== 1) throw new BlockError('EINVAL', `Expecting one action and one file name\n${USAGE}`);
  const img = await openImage(file, { aio: 'sync', readOnly: list, forceShare, ...(fmt === undefined ? {} : { format: fmt }) });
  try {
    if (list) {
      const sns = await img.snapshots();
      if (sns.length > 0) {
        out('Snapshot list:');
        out(snapshotHeader());
        for (const sn of sns) out(snapshotRow(sn));
      }
    } else {
      // exactly one of them is set (checked above): qemu-img's wording for its failure
      const [verb, tag, run] =
        createTag !== undefined
          ? (['create', createTag, () => img.createSnapshot(createTag, { icount: 0 })] as const)
          : apply !== undefined
            ? (['apply', apply, () => img.gotoSnapshot(apply)] as const)
            : (['delete', del ?? '', () => img.deleteSnapshot(del ?? '')] as const);
      try {
        await run();
      } catch (e) {
        err(`snapstack img: Could not ${verb} snapshot '${tag}': ${describeError(e)}`);
        return 1;
      }
    }
  } finally {
    await img.close();
  }
  return 0;
}

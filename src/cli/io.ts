/**
 * `snapstack io [-f FMT] [-r] FILE -c CMD [-c CMD ...]`: qemu-io's command-line mode. Runs each
 * command in order and exits 1 if any failed (I/O error, bad syntax, pattern mismatch).
 */
import { BlockError } from '../block/errors.js';
import { openImage } from '../image.js';
import { describeError } from '../commands/format.js';
import { runQemuIoCommand } from '../commands/qemu-io.js';
import { takeTlsObjectArgs } from './nbd.js';

const USAGE = `usage: snapstack io [-f FMT] [-r] [-U] FILENAME -c 'CMD' [-c 'CMD' ...]
commands: read [-P pattern] [-v] [-q] OFF LEN | write [-P pattern | -z] [-q] OFF LEN |
          discard OFF LEN | flush | length | truncate SIZE`;

/** Runs `snapstack io ARGS`; returns the exit status. */
export async function ioMain(argv: string[], out: (s: string) => void, err: (s: string) => void): Promise<number> {
  const cmds: string[] = [];
  let format: string | undefined;
  let readOnly = false;
  let forceShare = false;
  let file: string | undefined;
  try {
    // --object tls-creds-x509,... and --image-opts, as qemu-io (src/cli/nbd.ts)
    argv = takeTlsObjectArgs(argv);
    for (let i = 0; i < argv.length; i++) {
      const a = argv[i] as string;
      if (a === '-c' || a === '-f') {
        const v = argv[++i];
        if (v === undefined) throw new BlockError('EINVAL', `option ${a} needs a value\n${USAGE}`, { field: a });
        if (a === '-c') cmds.push(v);
        else format = v;
      } else if (a === '-r') readOnly = true;
      else if (a === '-U' || a === '--force-share') forceShare = true;
      else if (a === '-h' || a === '--help') {
        out(USAGE);
        return 0;
      } else if (a.startsWith('-')) throw new BlockError('EINVAL', `invalid option '${a}'\n${USAGE}`, { field: a });
      else if (file === undefined) file = a;
      else throw new BlockError('EINVAL', `more than one file name given ('${file}', '${a}')\n${USAGE}`);
    }
    if (file === undefined) throw new BlockError('EINVAL', `no file name given\n${USAGE}`);
    const img = await openImage(file, { aio: 'sync', readOnly, forceShare, ...(format === undefined ? {} : { format }) });
    let ok = true;
    try {
      for (const c of cmds) ok = (await runQemuIoCommand(img.backend, c, out)) && ok;
    } finally {
      await img.close();
    }
    return ok ? 0 : 1;
  } catch (e) {
    err(`snapstack io: ${describeError(e)}`);
    return 1;
  }
}

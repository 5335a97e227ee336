/**
 * The `snapstack` command: dispatches to `img`, `io`, `monitor` and `daemon`.
 */
import { daemonMain } from './daemon.js';
import { imgMain } from './img.js';
import { ioMain } from './io.js';
import { monitorMain } from './monitor.js';
import { withBql } from '../block/bql.js';
import { shutdownIOThreads } from '../block/iothread.js';

const USAGE = `usage: snapstack <command> [args]
commands:
  img create|info ...     image tools in qemu-img syntax
  io FILE -c CMD ...      run qemu-io commands on an image
  monitor [options]       the HMP-like monitor (--drive, --object iothread, --demo, -qmp)
  daemon [options]        a storage daemon with QMP, in qemu-storage-daemon's syntax
  nbd [options] FILE      export an image over NBD, in qemu-nbd's syntax
run 'snapstack <command> --help' for a command's options`;

/** Runs the command line `argv` (without node and script); returns the exit status. */
export async function main(argv: string[]): Promise<number> {
  // a reader that goes away (`| head`) ends the output, not the process with a stack trace
  process.stdout.on('error', (e: NodeJS.ErrnoException) => {
    if (e.code === 'EPIPE') process.exit(0);
    throw e;
  });
  const out = (s: string): void => void process.stdout.write(`${s}\n`);
  const err = (s: string): void => void process.stderr.write(`${s}\n`);
  const [cmd, ...rest] = argv;
  try {
    switch (cmd) {
      case 'img':
        return await imgMain(rest, out, err);
      case 'io':
        return await ioMain(rest, out, err);
      case 'monitor':
        return await monitorMain(rest, out, err);
      case 'daemon':
        return await daemonMain(rest, out, err);
      case 'nbd': return await (await import('./nbd.js')).nbdMain(rest, out, err);
      case '--help':
      case '-h':
        out(USAGE);
        return 0;
      default:
        err(cmd === undefined ? USAGE : `snapstack: unknown command '${cmd}'\n${USAGE}`);
        return 1;
    }
  } finally {
    await withBql((bql) => shutdownIOThreads(bql));
  }
}

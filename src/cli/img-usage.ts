/**
 * The usage text of `snapstack img` and the output callback type its subcommands share.
 */

/** Where a subcommand prints a line. */
export type Out = (s: string) => void;

/** `snapstack img --help`: qemu-img 7.2's syntax, for the options snapstack takes. */
export const IMG_USAGE = `usage: snapstack img COMMAND [options]
  amend [-p] [-q] [-f fmt] [--force] -o options filename
  bench [-c count] [-d depth] [-f fmt] [--flush-interval=N] [-i aio] [-n] [--no-drain] [-o offset] [--pattern=N] [-q] [-s buffer_size] [-S step_size] [-w] [-U] filename
  bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)... [-b source_file [-F source_fmt]] [-g granularity] [-f fmt] filename bitmap
  check [-q] [-f fmt] [--output=human|json] [-r leaks|all] [-U] filename
  commit [-q] [-f fmt] [-b base] [-d] [-p] filename
  compare [-f fmt] [-F fmt] [-p] [-q] [-s] [-U] filename1 filename2
  convert [-U] [-c] [-p] [-q] [-n] [-f fmt] [-O output_fmt] [-B backing_file [-F backing_fmt]] [-o options] [-l snapshot.name=TAG] filename output_filename
  create [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] filename [size]
  dd [-U] [-f fmt] [-O output_fmt] [bs=block_size] [count=blocks] [skip=blocks] if=input of=output
  info [-f fmt] [--output=human|json] [--backing-chain] [-U] filename
  map [-f fmt] [--start-offset=offset] [--max-length=len] [--output=human|json] [-U] filename
  measure [--output=human|json] [-O output_fmt] [-o options] [--size N | [-f fmt] [-l snapshot.name=TAG] filename]
  snapshot [-U] [-q] [-l | -a snapshot | -c snapshot | -d snapshot] filename
  rebase [-U] [-q] [-f fmt] [-p] [-u] -b backing_file [-F backing_fmt] filename
  resize [-f fmt] [--preallocation=off] [-q] [--shrink] filename [+ | -]size
qcow2 -o options: cluster_size, refcount_bits, compat=0.10|1.1, lazy_refcounts=on|off, backing_file, backing_fmt
  -U, --force-share: open read-only, sharing every permission (reads an image another process holds)`;

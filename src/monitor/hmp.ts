/**
 * The HMP-like command interpreter: one command line in, text out. It runs each command under the
 * BQL, as QEMU's monitor runs in the main loop with the BQL held; I/O commands (`qemu-io`) issue
 * ordinary requests. A bad command prints one `Error: ...` line and the monitor goes on.
 *
 * This version covers the block layer: help, info block, info iothreads, qemu-io, quit. The
 * machine and the snapshot commands (savevm, loadvm, delvm, info snapshots, stop, cont) come
 * with the machine (issue 4).
 */
import { blkFind } from '../block/backend.js';
import { withBql } from '../block/bql.js';
import { BlockError } from '../block/errors.js';
import { listIOThreads } from '../block/iothread.js';
import { formatInfoBlock, queryNamedBlockNodes } from '../block/query.js';
import { describeError } from '../cli/format.js';
import { runQemuIoCommand, splitArgs } from '../cli/qemu-io.js';

interface CommandSpec {
  args: string;
  help: string;
  run: (args: string[], raw: string) => Promise<void>;
}

/** A monitor session: its commands and where it prints. */
export class Monitor {
  /** Set by `quit`: the REPL stops reading. */
  quitRequested = false;
  private readonly commands: Map<string, CommandSpec>;
  private readonly infoCommands: Map<string, { help: string; run: (args: string[]) => Promise<void> }>;

  constructor(private readonly out: (line: string) => void) {
    this.infoCommands = new Map([
      ['block', { help: 'show the block devices (-n: also the named nodes)', run: (a) => this.infoBlock(a) }],
      ['iothreads', { help: 'show the IOThreads and their pending requests', run: () => this.infoIOThreads() }],
    ]);
    this.commands = new Map<string, CommandSpec>([
      ['help', { args: '[cmd]', help: 'show the help', run: (a) => this.help(a) }],
      ['info', { args: 'subcommand', help: 'show various information about the system state', run: (a) => this.info(a) }],
      [
        'qemu-io',
        {
          args: 'device "command"',
          help: 'run a qemu-io command on a block device (read, write, discard, flush, length, truncate)',
          run: (a) => this.qemuIo(a),
        },
      ],
      ['quit', { args: '', help: 'quit the monitor', run: async () => void (this.quitRequested = true) }],
    ]);
  }

  /** Command names, then `info` subcommands, for tab completion. */
  completions(line: string): string[] {
    const words = line.split(/\s+/);
    if (words.length <= 1) return [...this.commands.keys()].filter((c) => c.startsWith(words[0] ?? ''));
    if (words[0] === 'info' && words.length === 2) return [...this.infoCommands.keys()].filter((c) => c.startsWith(words[1] ?? '')).map((c) => `info ${c}`);
    return [];
  }

  /** Runs one command line; never throws (errors print as one line). */
  async execute(line: string): Promise<void> {
    const trimmed = line.trim();
    if (trimmed === '' || trimmed.startsWith('#')) return;
    const args = splitArgs(trimmed);
    const name = args.shift() ?? '';
    const cmd = this.commands.get(name);
    if (cmd === undefined) {
      this.out(`unknown command: '${name}'`);
      return;
    }
    try {
      await cmd.run(args, trimmed);
    } catch (e) {
      this.out(`Error: ${e instanceof BlockError ? e.message : describeError(e)}`);
    }
  }

  private async help(args: string[]): Promise<void> {
    const only = args[0];
    for (const [name, c] of this.commands) {
      if (only !== undefined && only !== name) continue;
      this.out(`${name}${c.args === '' ? '' : ` ${c.args}`} -- ${c.help}`);
      if (name === 'info' && (only === 'info' || only === undefined)) {
        for (const [sub, i] of this.infoCommands) this.out(`info ${sub} -- ${i.help}`);
      }
    }
    if (only !== undefined && !this.commands.has(only)) this.out(`unknown command: '${only}'`);
  }

  private async info(args: string[]): Promise<void> {
    const sub = args[0];
    const i = sub === undefined ? undefined : this.infoCommands.get(sub);
    if (i === undefined) {
      this.out(`info: subcommand ${sub === undefined ? 'missing' : `'${sub}' not found`}; one of: ${[...this.infoCommands.keys()].join(', ')}`);
      return;
    }
    await i.run(args.slice(1));
  }

  private async infoBlock(args: string[]): Promise<void> {
    await withBql((bql) => {
      const text = formatInfoBlock(bql);
      if (text !== '') this.out(text);
      if (args.includes('-n')) {
        for (const n of queryNamedBlockNodes(bql)) {
          this.out('');
          this.out(`${n.nodeName}: ${n.file === '' ? '(none)' : n.file} (${n.driver}${n.readOnly ? ', read-only' : ''})`);
          this.out(`    Virtual size:     ${n.virtualSize} bytes`);
          this.out(`    Children:         ${n.children.map((c) => `${c.role}=${c.nodeName}`).join(', ') || '(none)'}`);
          this.out(`    In flight:        ${n.inFlight} (quiesce ${n.quiesceCounter})`);
        }
      }
    });
  }

  private async infoIOThreads(): Promise<void> {
    await withBql((bql) => {
      for (const t of listIOThreads(bql)) {
        this.out(`${t.id}:`);
        this.out(`    pending requests=${t.pending}`);
      }
    });
  }

  private async qemuIo(args: string[]): Promise<void> {
    const [device, command, ...extra] = args;
    if (device === undefined || command === undefined || extra.length > 0) {
      throw new BlockError('EINVAL', 'usage: qemu-io DEVICE "COMMAND" (quote the command)', { op: 'qemu-io' });
    }
    const blk = await withBql((bql) => blkFind(bql, device));
    await runQemuIoCommand(blk, command, this.out);
  }
}

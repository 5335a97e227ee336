/**
 * The HMP-like command interpreter: one command line in, text out. Each command takes the BQL for
 * its global-state steps, as QEMU's monitor runs in the main loop with the BQL held; I/O commands
 * (`qemu-io`) issue ordinary requests; savevm, loadvm and delvm hold the snapshot lock and take
 * the BQL only for their short steps, so other monitors (QMP) answer while they run. A bad command prints one `Error: ...` line and the monitor goes on.
 *
 * Commands: help, info (block, iothreads, snapshots, status), qemu-io, savevm, loadvm, delvm,
 * snapshot_blkdev, block_stream, block_commit, block_job_pause/resume/cancel/complete, info
 * block-jobs, stop, cont, quit. Each is a thin layer over a library call (src/machine, src/block).
 */
import { blkDelete, blkFind, blkNew } from '../block/backend.js';
import { allBackends, allNodes } from '../block/registry.js';
import { withBql } from '../block/bql.js';
import { BlockError } from '../block/errors.js';
import { listIOThreads } from '../block/iothread.js';
import { formatInfoBlock, queryNamedBlockNodes } from '../block/query.js';
import { describeError } from '../commands/format.js';
import { snapshotBlkdev } from '../commands/snapshot-blkdev.js';
import { findJob, listJobs } from '../block/job.js';
import { blockCommit } from '../block/jobs/block-commit.js';
import { blockStream } from '../block/stream.js';
import { runQemuIoCommand, splitArgs } from '../commands/qemu-io.js';
import { snapshotHeader, snapshotRow } from '../commands/snapshot-format.js';
import type { Machine } from '../machine/machine.js';
import { withSnapshotLock } from '../block/snapshot-lock.js';
import { delVmLocked, listVmSnapshots, loadVmLocked, recoverVmSnapshots, saveVmLocked } from '../machine/savevm.js';

/** Backends made for qemu-io commands on a node name, counted for unique names. */
let qemuIoBackends = 0;

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

  /** Snapshot names seen by the last command, for tab completion (the completer is synchronous). */
  private snapshotNames: string[] = [];

  constructor(
    private readonly out: (line: string) => void,
    private readonly machine: Machine | null = null,
    private readonly progress: ((text: string) => void) | null = null,
  ) {
    this.infoCommands = new Map([
      ['block', { help: 'show the block devices (-n: also the named nodes)', run: (a) => this.infoBlock(a) }],
      ['iothreads', { help: 'show the IOThreads and their pending requests', run: () => this.infoIOThreads() }],
      ['snapshots', { help: 'show the currently saved VM snapshots', run: () => this.infoSnapshots() }],
      ['status', { help: 'show the current VM status (running|paused)', run: () => this.infoStatus() }],
      ['block-jobs', { help: 'show progress of ongoing block device operations', run: () => this.infoBlockJobs() }],
      ['guest', { help: "show the guest workload's counters and check every disk against its checksums", run: () => this.infoGuest() }],
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
      ['savevm', { args: '[tag]', help: 'save a VM snapshot. If no tag is provided, a new snapshot is created', run: (a) => this.savevm(a) }],
      ['loadvm', { args: 'tag', help: 'restore a VM snapshot from its tag', run: (a) => this.loadvm(a) }],
      ['delvm', { args: 'tag', help: 'delete a VM snapshot from its tag', run: (a) => this.delvm(a) }],
      [
        'snapshot_blkdev',
        {
          args: 'device new-image-file [format]',
          help: 'take an external snapshot of a device: a new qcow2 overlay on top of it, the old image becomes its backing file',
          run: (a) => this.snapshotBlkdev(a),
        },
      ],
      ['block_stream', { args: 'device [base-node]', help: 'copy the backing chain (down to base-node) into the device\'s image, in the background', run: (a) => this.blockStream(a) }],
      [
        'block_commit',
        { args: 'device [top-node [base-node]]', help: 'commit an image of the device\'s chain into the one below it, in the background (the top: an active commit)', run: (a) => this.blockCommit(a) },
      ],
      ['block_job_pause', { args: 'device', help: 'pause an active background block operation', run: (a) => this.jobOp(a, 'block_job_pause') }],
      ['block_job_resume', { args: 'device', help: 'resume a paused background block operation', run: (a) => this.jobOp(a, 'block_job_resume') }],
      ['block_job_cancel', { args: 'device', help: 'stop an active background block operation', run: (a) => this.jobOp(a, 'block_job_cancel') }],
      ['block_job_complete', { args: 'device', help: 'complete a background block operation that is ready', run: (a) => this.jobOp(a, 'block_job_complete') }],
      ['stop', { args: '', help: 'stop emulation', run: () => this.stop() }],
      ['cont', { args: '', help: 'resume emulation', run: () => this.cont() }],
      ['quit', { args: '', help: 'quit the monitor', run: async () => void (this.quitRequested = true) }],
    ]);
  }

  private needMachine(): Machine {
    if (this.machine === null) throw new BlockError('ENOTSUP', 'this monitor runs no machine', { op: 'monitor' });
    return this.machine;
  }

  private oneTag(args: string[], cmd: string, optional: boolean): string | undefined {
    if (args.length > 1) throw new BlockError('EINVAL', `${cmd}: too many arguments (one tag)`, { op: cmd });
    const tag = args[0];
    if (tag === undefined && !optional) throw new BlockError('EINVAL', `${cmd}: Parameter 'name' is missing`, { op: cmd });
    return tag;
  }

  private async savevm(args: string[]): Promise<void> {
    const m = this.needMachine();
    const tag = this.oneTag(args, 'savevm', true);
    this.progress?.('savevm: stopping the vCPUs, draining, saving the VM state and the disks...');
    try {
      const r = await withSnapshotLock(`savevm '${tag ?? ''}'`, (snap) => saveVmLocked(snap, m, tag));
      for (const w of r.warnings) this.out(`Warning: ${w}`);
    } finally {
      this.progress?.('');
    }
    await this.refreshNames();
  }

  private async loadvm(args: string[]): Promise<void> {
    const m = this.needMachine();
    const tag = this.oneTag(args, 'loadvm', false) ?? '';
    this.progress?.(`loadvm: reverting the disks to '${tag}' and loading the VM state...`);
    try {
      const r = await withSnapshotLock(`loadvm '${tag}'`, (snap) => loadVmLocked(snap, m, tag));
      for (const w of r.warnings) this.out(`Warning: ${w}`);
    } finally {
      this.progress?.('');
    }
  }

  private async delvm(args: string[]): Promise<void> {
    const m = this.needMachine();
    const tag = this.oneTag(args, 'delvm', false) ?? '';
    const failures = await withSnapshotLock(`delvm '${tag}'`, (snap) => delVmLocked(snap, m, tag));
    for (const f of failures) this.out(`Error: ${f}`);
    await this.refreshNames();
  }

  private async snapshotBlkdev(args: string[]): Promise<void> {
    const [device, snapshotFile, format, ...extra] = args;
    if (device === undefined || snapshotFile === undefined || extra.length > 0) {
      throw new BlockError('EINVAL', 'snapshot_blkdev: usage: snapshot_blkdev device new-image-file [format]', { op: 'snapshot_blkdev' });
    }
    await withBql((bql) => snapshotBlkdev(bql, { device, snapshotFile, ...(format === undefined ? {} : { format }) }));
  }

  private async blockStream(args: string[]): Promise<void> {
    const [device, base, ...extra] = args;
    if (device === undefined || extra.length > 0) throw new BlockError('EINVAL', 'block_stream: usage: block_stream device [base-node]', { op: 'block_stream' });
    await withBql((bql) => void blockStream(bql, { jobId: device, device, ...(base === undefined ? {} : { base }) }));
  }

  private async blockCommit(args: string[]): Promise<void> {
    const [device, top, base, ...extra] = args;
    if (device === undefined || extra.length > 0) throw new BlockError('EINVAL', 'block_commit: usage: block_commit device [top-node [base-node]]', { op: 'block_commit' });
    await withBql((bql) => void blockCommit(bql, { jobId: device, device, ...(top === undefined ? {} : { top }), ...(base === undefined ? {} : { base }) }));
  }

  private async jobOp(args: string[], cmd: 'block_job_pause' | 'block_job_resume' | 'block_job_cancel' | 'block_job_complete'): Promise<void> {
    const [id, ...extra] = args.filter((a) => a !== '-f');
    if (id === undefined || extra.length > 0) throw new BlockError('EINVAL', `${cmd}: usage: ${cmd} device`, { op: cmd });
    await withBql((bql) => {
      const job = findJob(bql, id);
      if (cmd === 'block_job_pause') job.pause(bql);
      else if (cmd === 'block_job_resume') job.resume(bql);
      else if (cmd === 'block_job_cancel') job.cancel(bql);
      else job.complete(bql);
    });
  }

  private async infoBlockJobs(): Promise<void> {
    const jobs = await withBql((bql) => listJobs(bql));
    if (jobs.length === 0) {
      this.out('No active jobs');
      return;
    }
    for (const j of jobs) {
      const state = j.status === 'ready' ? ' (ready)' : j.status === 'paused' ? ' (paused)' : '';
      this.out(`Type ${j.type}, device ${j.id}: Completed ${j.progress.current} of ${j.progress.total} bytes, speed limit 0 bytes/s${state}`);
    }
  }

  private async stop(): Promise<void> {
    const m = this.needMachine();
    await withBql((bql) => m.stop(bql));
  }

  private async cont(): Promise<void> {
    const m = this.needMachine();
    await withBql(async (bql) => {
      // a failed loadvm may have left disks to put back: that is done before the vCPUs run
      for (const line of await recoverVmSnapshots(bql, m)) this.out(line);
      m.cont(bql);
    });
  }

  /**
   * Prints what the machine's start-up recovery did (an interrupted savevm / loadvm / delvm rolled
   * back or finished), once.
   */
  async printRecovery(): Promise<void> {
    const m = this.machine;
    if (m === null) return;
    for (const line of await withBql(async (bql) => m.takeRecoveryReport(bql))) this.out(line);
  }

  private async infoStatus(): Promise<void> {
    const m = this.needMachine();
    this.out(`VM status: ${m.runState}`);
  }

  private async infoGuest(): Promise<void> {
    const m = this.needMachine();
    const r = await withBql((bql) => m.checkGuest(bql));
    this.out(`guest: ${m.guest ? 'running the workload' : 'no workload'}; writes ${r.writes}, reads ${r.reads}, self-check errors ${r.errors}`);
    const bad = r.mismatches.slice(0, 5).map((x) => `${x.disk}:${x.block}`);
    this.out(`disks: ${r.checked} blocks checked, ${r.mismatches.length} mismatches${bad.length > 0 ? ` (${bad.join(', ')}${r.mismatches.length > 5 ? ', ...' : ''})` : ''}`);
    for (const e of m.vcpuErrors) this.out(`Error: ${e}`);
  }

  private async infoSnapshots(): Promise<void> {
    const m = this.needMachine();
    let report;
    try {
      report = await withBql((bql) => listVmSnapshots(bql, m));
    } catch (e) {
      this.out(e instanceof BlockError ? e.message : describeError(e)); // QEMU prints no "Error: " here
      return;
    }
    if (report.complete.length === 0 && report.partial.length === 0) {
      this.out('There is no snapshot available.');
      return;
    }
    this.out('List of snapshots present on all disks:');
    if (report.complete.length === 0) this.out('None');
    else {
      this.out(snapshotHeader());
      for (const sn of report.complete) this.out(snapshotRow(sn, '--'));
    }
    for (const p of report.partial) {
      this.out('');
      this.out(`List of partial (non-loadable) snapshots on '${p.disk}':`);
      this.out(snapshotHeader());
      for (const sn of p.snapshots) this.out(snapshotRow(sn));
    }
    this.snapshotNames = [...new Set([...report.complete, ...report.partial.flatMap((p) => p.snapshots)].map((s) => s.name))];
  }

  /** Re-reads the snapshot names for tab completion. */
  async refreshNames(): Promise<void> {
    if (this.machine === null) return;
    const m = this.machine;
    try {
      const r = await withBql((bql) => listVmSnapshots(bql, m));
      this.snapshotNames = [...new Set([...r.complete, ...r.partial.flatMap((p) => p.snapshots)].map((s) => s.name))];
    } catch {
      this.snapshotNames = [];
    }
  }

  /** Command names, then `info` subcommands, for tab completion. */
  completions(line: string): string[] {
    const words = line.split(/\s+/);
    if (words.length <= 1) return [...this.commands.keys()].filter((c) => c.startsWith(words[0] ?? ''));
    if (words[0] === 'info' && words.length === 2) return [...this.infoCommands.keys()].filter((c) => c.startsWith(words[1] ?? '')).map((c) => `info ${c}`);
    if ((words[0] === 'loadvm' || words[0] === 'delvm' || words[0] === 'savevm') && words.length === 2) {
      return this.snapshotNames.filter((n) => n.startsWith(words[1] ?? '')).map((n) => `${words[0] ?? ''} ${n}`);
    }
    if (words[0] === 'qemu-io' && words.length === 2 && this.machine !== null) {
      return this.machine.disks.map((d) => d.id).filter((n) => n.startsWith(words[1] ?? '')).map((n) => `qemu-io ${n}`);
    }
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
    // a device, or (as QEMU's HMP) a node name: then a backend of its own for this command, which
    // may write only a node nothing else uses (a backing or file node is read here, never written)
    const { blk, temporary } = await withBql((bql) => {
      if (allBackends.has(device)) return { blk: blkFind(bql, device), temporary: false };
      const node = allNodes.get(device);
      if (node === undefined) return { blk: blkFind(bql, device), temporary: false }; // Device 'x' not found
      const readOnly = node.readOnly || node.parents.size > 0;
      return { blk: blkNew(bql, `qemu-io-node-${++qemuIoBackends}`, node, { readOnly, internal: true }), temporary: true };
    });
    try {
      await runQemuIoCommand(blk, command, this.out);
    } finally {
      if (temporary) await withBql((bql) => blkDelete(bql, blk));
    }
  }
}

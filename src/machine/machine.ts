/**
 * The emulated machine: guest RAM in a SharedArrayBuffer, vCPU worker threads running the
 * self-checking guest workload, and disks reached through a virtio-blk-like request queue in
 * shared memory (one slot per vCPU; layout.js). The device side runs on the main loop: it takes a
 * queued request exactly once, submits it to the disk's BlockBackend with the guest buffer as the
 * data (no copy: guest RAM is shared memory), and completes it.
 *
 * Global-state object: drives are added, the VM stopped and resumed, and its state saved and
 * loaded with the BQL held (the functions take the proof). The request path is I/O code.
 */
import { Worker } from 'node:worker_threads';
import { blkDelete, blkFlush, blkNew, blkPread, blkPwrite, type BlockBackend } from '../block/backend.js';
import { assertBql, type Bql } from '../block/bql.js';
import { withDrained } from '../block/drain.js';
import { BlockError, type ErrorCode } from '../block/errors.js';
import { closeNode, openNode } from '../block/graph.js';
import { bdrvGetLength } from '../block/io.js';
import type { BlockNode } from '../block/node.js';
import { parseOptions } from '../block/options.js';
import '../drivers/index.js';
import {
  BLOCK, CPU_RNG, CPU_SEED, CPU_STRIDE, CTL_DOORBELL, CTL_PAUSED, CTL_QUIT, CTL_RUN_STATE, GUEST_MAGIC, HDR_DISKS, HDR_ERRORS, HDR_MAGIC,
  HDR_READS, HDR_TABLE_BLOCKS, HDR_VCPUS, HDR_WRITES, OP_FLUSH, OP_READ, OP_WRITE, RUN, SLOT_DISK, SLOT_DONE, SLOT_LENGTH, SLOT_OP, SLOT_QUEUED,
  SLOT_RAM_OFFSET, SLOT_RUNNING, SLOT_STATE, SLOT_STATUS, SLOT_STRIDE, STOP, blockChecksum, bufferOffset, tableOffset,
} from './layout.js';
import { recoverVmSnapshots } from './savevm.js';
import { INTENT_SUFFIX, IntentStore } from './vm-intent.js';
import { decodeVmState, encodeVmState, maxVmStateBytes, vmStateLayout, type VmState } from './vmstate.js';

/** Longest the device loop sleeps without rescanning the request slots. */
const DOORBELL_RESCAN_MS = 20;
const VCPU_WORKER = new URL('./vcpu-worker.js', import.meta.url);
/** Blocks per disk whose checksums the guest tracks (64 MiB of each disk at 4 KiB). */
const MAX_TABLE_BLOCKS = 16384;

/** How to build a machine. */
export interface MachineOptions {
  /** Guest RAM in bytes (default 64 MiB). */
  ramBytes?: number;
  /** vCPU count (default 2). */
  vcpus?: number;
  /** Run the self-checking guest workload on the vCPUs (default false: the vCPUs idle). */
  guest?: boolean;
  /** Seed of the workload's pseudo-random sequence. */
  seed?: number;
}

/** One of the machine's disks: its device name, backend and root node. */
export interface MachineDisk {
  id: string;
  blk: BlockBackend;
  /** The backend's root now (an external snapshot or an active commit changes it). */
  readonly node: BlockNode;
  readOnly: boolean;
}

/** A guest request that failed on one of the machine's disks. */
export interface GuestIoError {
  device: string;
  nodeName: string | null;
  operation: 'read' | 'write';
  code: ErrorCode;
  message: string;
}

/** What `info status` shows. */
export type RunState = 'running' | 'paused';

/** Counters the guest keeps in its RAM. */
export interface GuestCounters {
  writes: number;
  reads: number;
  errors: number;
}

/** The emulated machine. */
export class Machine {
  readonly ramBytes: number;
  readonly vcpus: number;
  readonly guest: boolean;
  readonly ram: SharedArrayBuffer;
  readonly disks: MachineDisk[] = [];
  private readonly control: Int32Array;
  private readonly slots: Int32Array;
  private readonly slotOffsets: Float64Array;
  private readonly cpu: Int32Array;
  private readonly workers: Worker[] = [];
  private state: RunState = 'paused';
  private started = false;
  private inFlight = 0;
  private readonly idleWaiters: Array<() => void> = [];
  private deviceLoopDone: Promise<void> | null = null;
  private quitting = false;
  /** Virtual clock: nanoseconds the VM has been running. */
  private vmClockBase = 0;
  private runningSince = 0;
  private readonly seed: number;
  /** Errors of vCPU workers that died (shown by `info guest`). */
  readonly vcpuErrors: string[] = [];
  /** Keeps the process alive while the machine exists (Atomics.waitAsync holds no reference). */
  private keepAlive: ReturnType<typeof setInterval> | null = null;
  private intentStore: IntentStore | null = null;
  /** Holds that keep the machine stopped (holdPaused): cont is refused while there is one. */
  private readonly pauseHolds = new Set<{ reason: string }>();
  /** A user's stop while a hold was active (see stop). */
  private stopRequested = false;
  private readonly runStateListeners = new Set<(state: RunState) => void>();
  private readonly ioErrorListeners = new Set<(e: GuestIoError) => void>();
  /** What the start-up recovery did, until taken (reported once). */
  private recovered: string[] = [];

  constructor(opts: MachineOptions = {}) {
    this.ramBytes = opts.ramBytes ?? 64 * 1024 * 1024;
    this.vcpus = opts.vcpus ?? 2;
    this.guest = opts.guest ?? false;
    this.seed = opts.seed ?? 0x5eed;
    if (!Number.isInteger(this.vcpus) || this.vcpus < 1 || this.vcpus > 64) {
      throw new BlockError('EINVAL', `a machine has 1 to 64 vCPUs, not ${this.vcpus}`, { field: 'vcpus', value: this.vcpus });
    }
    if (!Number.isInteger(this.ramBytes) || this.ramBytes < 1024 * 1024 || this.ramBytes % BLOCK !== 0) {
      throw new BlockError('EINVAL', `guest RAM must be at least 1 MiB and a multiple of 4 KiB (-m ${this.ramBytes})`, { field: 'ram', value: this.ramBytes });
    }
    try {
      this.ram = new SharedArrayBuffer(this.ramBytes);
    } catch {
      // V8's RangeError ("Array buffer allocation failed") is no message for a user
      throw new BlockError('EINVAL', `cannot allocate ${this.ramBytes} bytes of guest RAM (-m ${this.ramBytes}): the host has not that much memory to give`, {
        field: 'ram',
        value: this.ramBytes,
      });
    }
    this.control = new Int32Array(new SharedArrayBuffer((CTL_PAUSED + this.vcpus) * 4));
    this.slots = new Int32Array(new SharedArrayBuffer(this.vcpus * SLOT_STRIDE * 4));
    this.slotOffsets = new Float64Array(new SharedArrayBuffer(this.vcpus * 8));
    this.cpu = new Int32Array(new SharedArrayBuffer(this.vcpus * CPU_STRIDE * 4));
    Atomics.store(this.control, CTL_RUN_STATE, STOP);
  }

  /**
   * Adds a disk from QEMU-style options (`file=PATH,format=qcow2,id=disk0[,iothread=io0][,readonly=on]`).
   * Disks are added before the machine starts.
   * @locking global-state
   */
  async addDrive(bql: Bql, options: string): Promise<MachineDisk> {
    assertBql(bql, 'addDrive');
    if (this.started) throw new BlockError('EBUSY', 'disks are added before the machine starts', { op: 'addDrive' });
    const opts = parseOptions(options, 'file');
    const id = opts['id'] ?? `disk${this.disks.length}`;
    delete opts['id'];
    if (opts['if'] !== undefined) delete opts['if'];
    if (opts['readonly'] !== undefined) {
      opts['read-only'] = opts['readonly'];
      delete opts['readonly'];
    }
    if (this.disks.some((d) => d.id === id)) throw new BlockError('EINVAL', `Duplicate drive ID '${id}'`, { field: 'id', value: id });
    const node = await openNode(bql, opts);
    try {
      const blk = blkNew(bql, id, node, { readOnly: node.readOnly });
      const disk: MachineDisk = {
        id,
        blk,
        get node(): BlockNode {
          const root = blk.root;
          if (root === null) throw new BlockError('ENOMEDIUM', `Device '${id}' has no medium`, { node: id });
          return root;
        },
        readOnly: node.readOnly,
      };
      this.disks.push(disk);
      return disk;
    } catch (e) {
      await closeNode(bql, node);
      throw e;
    }
  }

  /** Blocks per disk the guest tracks. */
  private get tableBlocks(): number {
    const sizes = this.disks.map((d) => Math.floor(bdrvGetLength(d.node) / BLOCK));
    return Math.min(MAX_TABLE_BLOCKS, Math.max(1, ...sizes));
  }

  /**
   * Boots the machine: lays out guest RAM, starts the device queue and (with a guest) the vCPU
   * workers, and runs it.
   * @locking global-state
   */
  async start(bql: Bql): Promise<void> {
    assertBql(bql, 'machine start');
    if (this.started) return;
    this.started = true;
    const tableBlocks = this.tableBlocks;
    const need = bufferOffset(this.vcpus, this.disks.length, tableBlocks);
    if (need > this.ramBytes) {
      throw new BlockError('ENOSPC', `guest RAM of ${this.ramBytes} bytes is too small for the workload's tables (${need} bytes needed)`, { field: 'ram' });
    }
    const words = new Uint32Array(this.ram);
    words[HDR_MAGIC] = GUEST_MAGIC;
    words[HDR_DISKS] = this.disks.length;
    words[HDR_TABLE_BLOCKS] = tableBlocks;
    words[HDR_VCPUS] = this.vcpus;
    // the rest of RAM holds "guest memory": a pattern, so that saved RAM is not all zeros
    const ramBytes = new Uint8Array(this.ram);
    for (let off = need; off < this.ramBytes; off += BLOCK) ramBytes[off] = (off / BLOCK) & 0xff;
    for (let i = 0; i < this.vcpus; i++) {
      this.cpu[i * CPU_STRIDE + CPU_RNG] = (this.seed * 2654435761 + i * 40503 + 1) | 0 || 1;
      this.cpu[i * CPU_STRIDE + CPU_SEED] = this.seed;
    }
    this.keepAlive = setInterval(() => undefined, 1 << 30);
    this.deviceLoopDone = this.deviceLoop();
    // a savevm / loadvm / delvm interrupted by a crash is rolled back or finished before the
    // guest runs; a recovery that fails is tried again by the next of those operations
    this.recovered = await recoverVmSnapshots(bql, this).catch((e: unknown) => [
      `VM snapshot recovery failed, it will be tried again by the next savevm, loadvm, delvm or cont: ${e instanceof Error ? e.message : String(e)}`,
    ]);
    if (this.guest && this.disks.some((d) => !d.readOnly)) {
      const writable = this.disks.map((d) => (d.readOnly ? 0 : Math.floor(bdrvGetLength(d.node) / BLOCK)));
      for (let i = 0; i < this.vcpus; i++) {
        const w = new Worker(VCPU_WORKER, {
          workerData: { index: i, vcpus: this.vcpus, disks: writable, control: this.control.buffer, slots: this.slots.buffer, slotOffsets: this.slotOffsets.buffer, ram: this.ram, cpu: this.cpu.buffer },
        });
        w.unref();
        // a vCPU that dies counts as paused, so that stop never waits for it; the error is kept
        w.on('error', (e: unknown) => this.vcpuErrors.push(`vCPU ${i}: ${e instanceof Error ? e.message : String(e)}`));
        w.on('exit', () => {
          Atomics.store(this.control, CTL_PAUSED + i, 1);
          Atomics.notify(this.control, CTL_PAUSED + i);
        });
        this.workers.push(w);
      }
    }
    if (this.resumeBlocker() === null) this.cont(bql);
  }

  /**
   * Where savevm / loadvm / delvm keep their intent record: a file beside the first writable
   * disk backed by a host file (`<image>.snapstack-vm.json`), else memory.
   * @locking global-state
   */
  intents(bql: Bql): IntentStore {
    assertBql(bql, 'intents');
    if (this.intentStore === null) {
      const home = this.disks.find((d) => !d.readOnly && d.node.filename !== '');
      this.intentStore = new IntentStore(home === undefined ? null : `${home.node.filename}${INTENT_SUFFIX}`);
    }
    return this.intentStore;
  }

  /**
   * What the start-up recovery of an interrupted savevm / loadvm / delvm did (empty when there was
   * nothing to do); returned once, then cleared.
   * @locking global-state
   */
  takeRecoveryReport(bql: Bql): string[] {
    assertBql(bql, 'takeRecoveryReport');
    return this.recovered.splice(0);
  }

  /** Why the vCPUs may not run now (a loadvm left disks to be put back), or null. */
  private resumeBlocker(): string | null {
    for (const h of this.pauseHolds) return `${h.reason} is running`;
    const p = this.intentStore?.pending ?? null;
    if (p === null || p.op !== 'loadvm' || p.phase !== 'started') return null;
    return `loadvm '${p.tag}' did not finish and the disks are not all put back yet (undo snapshots '${p.undoName ?? ''}')`;
  }

  /**
   * The most bytes a VM state of this machine can take: vm-state-size read from an image is
   * checked against it before it sizes a buffer.
   * @locking common
   */
  get vmStateLimitBytes(): number {
    return maxVmStateBytes({ ramBytes: this.ramBytes, cpuBytes: this.cpu.byteLength, deviceBytes: this.slots.byteLength });
  }

  /** Running or paused. */
  get runState(): RunState {
    return this.state;
  }

  /** Nanoseconds of virtual time (advances only while running). */
  get vmClockNsec(): number {
    return this.vmClockBase + (this.state === 'running' ? Number(process.hrtime.bigint()) - this.runningSince : 0);
  }

  /**
   * Pauses the vCPUs: returns once every vCPU sits in its pause and no guest request is in
   * flight (a request a vCPU had queued completes first: it is neither lost nor run twice).
   * Then, as QEMU's vm_stop, flushes every writable disk, so that a stopped machine's images on
   * disk hold everything the guest wrote (a copy taken now is consistent); a failed flush is
   * thrown (the machine stays stopped). `flush: false` for the snapshot operations, whose commit
   * writes the disks out itself. A stop while a snapshot operation holds the machine stopped is
   * remembered: the operation then leaves it stopped.
   * @locking global-state
   */
  async stop(bql: Bql, opts: { flush?: boolean } = {}): Promise<void> {
    assertBql(bql, 'stop');
    if (this.state === 'paused') {
      if (this.pauseHolds.size > 0) {
        // a snapshot operation holds the machine and drains its disks: a flush now would wait for
        // its sections while this BQL holder keeps it from finishing; the stop (and its flush)
        // takes effect when the operation lets the machine go
        if (opts.flush !== false) this.stopRequested = true;
        return;
      }
      if (opts.flush !== false) await this.flushDisks();
      return;
    }
    Atomics.store(this.control, CTL_RUN_STATE, STOP);
    Atomics.notify(this.control, CTL_RUN_STATE);
    for (let i = 0; i < this.workers.length; i++) {
      while (Atomics.load(this.control, CTL_PAUSED + i) !== 1) {
        const w = Atomics.waitAsync(this.control, CTL_PAUSED + i, 0, 100);
        if (w.async) await w.value;
      }
    }
    await this.whenDeviceIdle();
    this.vmClockBase = this.vmClockNsec;
    this.state = 'paused';
    this.announceRunState();
    if (opts.flush !== false) await this.flushDisks();
  }

  /**
   * Flushes every writable disk; the first failure is thrown after all were tried.
   * @locking global-state
   */
  async flushDisks(bql?: Bql): Promise<void> {
    if (bql !== undefined) assertBql(bql, 'flushDisks');
    let first: unknown = null;
    for (const d of this.disks) {
      if (d.readOnly) continue;
      try {
        await blkFlush(d.blk);
      } catch (e) {
        first ??= e;
      }
    }
    if (first !== null) throw first;
  }

  /**
   * True once (and then false) when a user's stop came while a snapshot operation held the
   * machine stopped: the operation must not resume it.
   * @locking global-state
   */
  takeStopRequest(bql: Bql): boolean {
    assertBql(bql, 'takeStopRequest');
    const r = this.stopRequested;
    this.stopRequested = false;
    return r;
  }

  /**
   * Adds a listener called after every change of the run state (QMP's STOP and RESUME events);
   * returns the function that removes it.
   * @locking common
   */
  onRunStateChange(listener: (state: RunState) => void): () => void {
    this.runStateListeners.add(listener);
    return () => void this.runStateListeners.delete(listener);
  }

  private announceRunState(): void {
    for (const l of [...this.runStateListeners]) {
      try {
        l(this.state);
      } catch {
        // a listener's failure is not the machine's
      }
    }
  }

  /**
   * Resumes the vCPUs; refused (EBUSY) while a failed or interrupted loadvm still has disks to
   * put back, so that no guest write lands on a disk the rollback will revert.
   * @locking global-state
   */
  cont(bql: Bql): void {
    assertBql(bql, 'cont');
    if (this.state === 'running') return;
    const blocker = this.resumeBlocker();
    if (blocker !== null) throw new BlockError('EBUSY', `the machine stays paused: ${blocker}; a savevm, loadvm or delvm puts them back first`, { op: 'cont' });
    this.runningSince = Number(process.hrtime.bigint());
    this.state = 'running';
    Atomics.store(this.control, CTL_RUN_STATE, RUN);
    Atomics.notify(this.control, CTL_RUN_STATE);
    this.announceRunState();
  }

  /** The counters the guest keeps in its RAM. */
  guestCounters(): GuestCounters {
    const w = new Uint32Array(this.ram);
    return { writes: w[HDR_WRITES] ?? 0, reads: w[HDR_READS] ?? 0, errors: w[HDR_ERRORS] ?? 0 };
  }

  /**
   * The VM state of a stopped machine: RAM, vCPU registers, device slots, and a description.
   * @locking global-state
   */
  saveState(bql: Bql): Uint8Array {
    assertBql(bql, 'saveState');
    return encodeVmState(this.currentState());
  }

  /**
   * The VM state of a stopped machine as pieces to stream (vmstate.ts vmStateLayout): the RAM is
   * a view of the guest's memory, valid while the machine stays stopped (holdPaused keeps it so).
   * @locking global-state
   */
  saveStateLayout(bql: Bql): { prefix: Uint8Array; ram: Uint8Array; total: number } {
    assertBql(bql, 'saveStateLayout');
    return vmStateLayout(this.currentState());
  }

  private currentState(): VmState {
    if (this.state !== 'paused') throw new BlockError('EBUSY', 'the VM state can only be saved while the machine is stopped', { op: 'savevm' });
    return {
      ram: new Uint8Array(this.ram),
      cpu: new Uint8Array(this.cpu.buffer),
      devices: new Uint8Array(this.slots.buffer),
      machine: { ramBytes: this.ramBytes, vcpus: this.vcpus, disks: this.disks.map((d) => d.id), vmClockNsec: this.vmClockNsec, guest: this.guest },
    };
  }

  /**
   * Keeps the stopped machine stopped (cont refused, naming `reason`) until the returned release
   * is called: a snapshot operation that streams the RAM between BQL steps holds it.
   * @locking global-state
   */
  holdPaused(bql: Bql, reason: string): () => void {
    assertBql(bql, 'holdPaused');
    if (this.state !== 'paused') throw new BlockError('EBUSY', `holdPaused: the machine is running (${reason})`, { op: 'holdPaused' });
    const token = { reason };
    this.pauseHolds.add(token);
    return () => void this.pauseHolds.delete(token);
  }

  /**
   * Loads a VM state into the stopped machine; refuses one that does not fit (other RAM size,
   * vCPU count, format version) without changing anything. `crc`: the checksum the reader computed
   * over all but the trailer (vmstate.ts decodeVmState), so that it is not computed twice.
   * @locking global-state
   */
  loadState(bql: Bql, bytes: Uint8Array, crc?: number): void {
    assertBql(bql, 'loadState');
    if (this.state !== 'paused') throw new BlockError('EBUSY', 'the VM state can only be loaded while the machine is stopped', { op: 'loadvm' });
    const s = decodeVmState(bytes, { ramBytes: this.ramBytes, vcpus: this.vcpus, cpuBytes: this.cpu.byteLength, deviceBytes: this.slots.byteLength }, crc);
    const savedSlots = new Int32Array(s.devices.slice().buffer);
    for (let i = 0; i < this.vcpus; i++) {
      if ((savedSlots[i * SLOT_STRIDE + SLOT_STATE] ?? 0) !== 0) {
        throw new BlockError('EINVAL', `VM state: the request slot of vCPU ${i} is not idle`, { field: 'devices' });
      }
    }
    new Uint8Array(this.ram).set(s.ram);
    new Uint8Array(this.cpu.buffer).set(s.cpu);
    new Uint8Array(this.slots.buffer).set(s.devices);
    this.vmClockBase = s.machine.vmClockNsec;
  }

  /**
   * Reads back every block the guest's table knows and compares its checksum; the machine should
   * be stopped so that nothing changes meanwhile.
   * @locking io
   */
  async verifyDisks(): Promise<{ checked: number; mismatches: Array<{ disk: string; block: number }> }> {
    const words = new Uint32Array(this.ram);
    const tableBlocks = words[HDR_TABLE_BLOCKS] ?? 0;
    const buf = new Uint8Array(BLOCK);
    const mismatches: Array<{ disk: string; block: number }> = [];
    let checked = 0;
    for (const [d, disk] of this.disks.entries()) {
      const base = tableOffset(d, tableBlocks) / 4;
      for (let b = 0; b < tableBlocks; b++) {
        const want = words[base + b] ?? 0;
        if (want === 0) continue;
        await blkPread(disk.blk, b * BLOCK, buf);
        checked++;
        if (blockChecksum(buf) !== want) mismatches.push({ disk: disk.id, block: b });
      }
    }
    return { checked, mismatches };
  }

  /**
   * The guest's self-check: stops the vCPUs (if running), reads back every block the guest's
   * table knows, and resumes; with the guest's own counters.
   * @locking global-state
   */
  async checkGuest(bql: Bql): Promise<GuestCounters & { checked: number; mismatches: Array<{ disk: string; block: number }> }> {
    const wasRunning = this.state === 'running';
    await this.stop(bql, { flush: false });
    try {
      const v = await this.verifyDisks();
      return { ...this.guestCounters(), ...v };
    } finally {
      if (wasRunning) this.cont(bql);
    }
  }

  /**
   * Stops the vCPUs and the device queue, flushes and closes every disk.
   * @locking global-state
   */
  async shutdown(bql: Bql): Promise<void> {
    assertBql(bql, 'machine shutdown');
    // a snapshot operation between its steps holds the machine and drains its disks: closing them
    // now would wait for it while this BQL holder keeps it from finishing (cancel its job first)
    for (const h of this.pauseHolds) throw new BlockError('EBUSY', `machine shutdown: ${h.reason} is running; cancel it first`, { op: 'shutdown' });
    if (this.started) await this.stop(bql);
    this.quitting = true;
    Atomics.store(this.control, CTL_QUIT, 1);
    Atomics.notify(this.control, CTL_RUN_STATE);
    Atomics.add(this.control, CTL_DOORBELL, 1);
    Atomics.notify(this.control, CTL_DOORBELL);
    await Promise.all(this.workers.map((w) => w.terminate()));
    this.workers.length = 0;
    if (this.deviceLoopDone !== null) await this.deviceLoopDone;
    if (this.keepAlive !== null) clearInterval(this.keepAlive);
    this.keepAlive = null;
    for (const disk of this.disks.splice(0)) {
      if (!disk.readOnly) await blkFlush(disk.blk);
      const node = disk.node;
      await withDrained(bql, node, () => blkDelete(bql, disk.blk));
      await closeNode(bql, node);
    }
  }

  private whenDeviceIdle(): Promise<void> {
    if (this.inFlight === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  /** The device side of the request queue: wakes on the doorbell and serves queued slots. */
  private async deviceLoop(): Promise<void> {
    while (!this.quitting) {
      const seen = Atomics.load(this.control, CTL_DOORBELL);
      for (let i = 0; i < this.vcpus; i++) {
        if (Atomics.compareExchange(this.slots, i * SLOT_STRIDE + SLOT_STATE, SLOT_QUEUED, SLOT_RUNNING) === SLOT_QUEUED) this.serve(i);
      }
      // the timeout is a safety net: in Node 20 a wake-up of Atomics.waitAsync from another
      // thread was seen to get lost under load (see src/block/iothread-ring.js); the slots are
      // rescanned at least every DOORBELL_RESCAN_MS
      const w = Atomics.waitAsync(this.control, CTL_DOORBELL, seen, DOORBELL_RESCAN_MS);
      if (w.async) await w.value;
    }
  }

  /** Runs the request in slot `i` and completes it. */
  private serve(i: number): void {
    const base = i * SLOT_STRIDE;
    const op = this.slots[base + SLOT_OP] ?? 0;
    const disk = this.disks[this.slots[base + SLOT_DISK] ?? -1];
    const length = this.slots[base + SLOT_LENGTH] ?? 0;
    const ramOffset = this.slots[base + SLOT_RAM_OFFSET] ?? 0;
    const offset = this.slotOffsets[i] ?? 0;
    this.inFlight++;
    let p: Promise<void>;
    if (disk === undefined || ramOffset < 0 || ramOffset + length > this.ramBytes) {
      p = Promise.reject(new BlockError('EINVAL', `vCPU ${i}: bad request (disk or buffer out of range)`, { op: 'virtio-blk' }));
    } else {
      const data = new Uint8Array(this.ram, ramOffset, length);
      p = op === OP_READ ? blkPread(disk.blk, offset, data) : op === OP_WRITE ? blkPwrite(disk.blk, offset, data) : op === OP_FLUSH ? blkFlush(disk.blk) : Promise.reject(new BlockError('EINVAL', `vCPU ${i}: unknown request ${op}`));
    }
    p.then(
      () => this.complete(i, 0),
      (e: unknown) => {
        this.complete(i, e instanceof BlockError ? -e.errno : -5);
        if (disk !== undefined) this.announceIoError(disk, op === OP_READ ? 'read' : 'write', e);
      },
    );
  }

  /**
   * Adds a listener called when a guest request fails on a disk (QMP's BLOCK_IO_ERROR; the error
   * is reported to the guest, QEMU's default action); returns the function that removes it.
   * @locking common
   */
  onIoError(listener: (e: GuestIoError) => void): () => void {
    this.ioErrorListeners.add(listener);
    return () => void this.ioErrorListeners.delete(listener);
  }

  private announceIoError(disk: MachineDisk, operation: 'read' | 'write', e: unknown): void {
    let nodeName: string | null = null;
    try {
      nodeName = disk.node.nodeName;
    } catch {
      // no medium
    }
    const ev: GuestIoError = { device: disk.id, nodeName, operation, code: e instanceof BlockError ? e.code : 'EIO', message: e instanceof Error ? e.message : String(e) };
    for (const l of [...this.ioErrorListeners]) {
      try {
        l(ev);
      } catch {
        // a listener's failure is not the machine's
      }
    }
  }

  private complete(i: number, status: number): void {
    const base = i * SLOT_STRIDE;
    this.slots[base + SLOT_STATUS] = status;
    Atomics.store(this.slots, base + SLOT_STATE, SLOT_DONE);
    Atomics.notify(this.slots, base + SLOT_STATE);
    if (--this.inFlight === 0) for (const w of this.idleWaiters.splice(0)) w();
  }
}

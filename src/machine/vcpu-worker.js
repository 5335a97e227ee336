// @ts-check
/**
 * A vCPU: a worker thread that runs the self-checking guest workload against guest RAM and the
 * machine's disks. It writes pseudo-random 4 KiB blocks (each vCPU owns the blocks b with
 * b % vcpus === index, so vCPUs never race on a block), records each block's checksum in the
 * table in guest RAM once the write completed, and reads blocks back to check them; a mismatch
 * counts in the guest's error counter. All of its state lives in guest RAM and its register file,
 * so the VM state (RAM + registers + devices) captures it whole.
 *
 * I/O goes through the request slot in shared memory (layout.js) and blocks with Atomics.wait
 * until the device completes it. Between steps the vCPU honours stop (pauses) and quit.
 */
import { workerData } from 'node:worker_threads';
import {
  BLOCK, CPU_RNG, CPU_STEPS, CPU_STRIDE, CTL_DOORBELL, CTL_PAUSED, CTL_QUIT, CTL_RUN_STATE, HDR_ERRORS, HDR_READS, HDR_TABLE_BLOCKS,
  HDR_WRITES, OP_READ, OP_WRITE, SLOT_DISK, SLOT_DONE, SLOT_IDLE, SLOT_LENGTH, SLOT_OP, SLOT_QUEUED, SLOT_RAM_OFFSET, SLOT_STATE,
  SLOT_STATUS, SLOT_STRIDE, STOP, blockChecksum, bufferOffset, tableOffset,
} from './layout.js';

/** @type {{ index: number, vcpus: number, disks: number[], control: SharedArrayBuffer, slots: SharedArrayBuffer, slotOffsets: SharedArrayBuffer, ram: SharedArrayBuffer, cpu: SharedArrayBuffer }} */
const data = workerData;
const control = new Int32Array(data.control);
const slot = new Int32Array(data.slots, data.index * SLOT_STRIDE * 4, SLOT_STRIDE);
const slotOffset = new Float64Array(data.slotOffsets, data.index * 8, 1);
const ram = new Uint8Array(data.ram);
const ramWords = new Uint32Array(data.ram);
const cpu = new Int32Array(data.cpu, data.index * CPU_STRIDE * 4, CPU_STRIDE);
const i = data.index;

/** xorshift32 on the register file: the guest's only randomness. */
function rand() {
  let x = cpu[CPU_RNG] ?? 1;
  x ^= x << 13;
  x ^= x >>> 17;
  x ^= x << 5;
  cpu[CPU_RNG] = x;
  return x >>> 0;
}

/**
 * Queues one request and waits until the device has completed it; returns the status (0 or -errno).
 * @param {number} op @param {number} disk @param {number} offset @param {number} ramOffset
 */
function request(op, disk, offset, ramOffset) {
  slot[SLOT_OP] = op;
  slot[SLOT_DISK] = disk;
  slot[SLOT_LENGTH] = BLOCK;
  slot[SLOT_RAM_OFFSET] = ramOffset;
  slot[SLOT_STATUS] = 0;
  slotOffset[0] = offset;
  Atomics.store(slot, SLOT_STATE, SLOT_QUEUED);
  Atomics.add(control, CTL_DOORBELL, 1);
  Atomics.notify(control, CTL_DOORBELL);
  for (;;) {
    const s = Atomics.load(slot, SLOT_STATE);
    if (s === SLOT_DONE) break;
    Atomics.wait(slot, SLOT_STATE, s, 1000);
  }
  const status = slot[SLOT_STATUS] ?? -5;
  Atomics.store(slot, SLOT_STATE, SLOT_IDLE);
  return status;
}

/** One step of the workload: a write of a fresh block, or a read that checks an older one. */
function step() {
  const tableBlocks = ramWords[HDR_TABLE_BLOCKS] ?? 0;
  const disk = rand() % data.disks.length;
  const diskBlocks = Math.min(tableBlocks, data.disks[disk] ?? 0);
  const owned = Math.floor((diskBlocks - 1 - i) / data.vcpus) + 1;
  if (owned <= 0) return;
  const block = (rand() % owned) * data.vcpus + i;
  const entry = tableOffset(disk, tableBlocks) / 4 + block;
  const buf = bufferOffset(i, data.disks.length, tableBlocks);
  const known = ramWords[entry] ?? 0;
  if (known !== 0 && rand() % 10 < 3) {
    const status = request(OP_READ, disk, block * BLOCK, buf);
    Atomics.add(ramWords, HDR_READS, 1);
    if (status !== 0 || blockChecksum(ram.subarray(buf, buf + BLOCK)) !== known) Atomics.add(ramWords, HDR_ERRORS, 1);
    return;
  }
  for (let k = 0; k < BLOCK; k += 4) {
    const v = rand();
    ram[buf + k] = v & 0xff;
    ram[buf + k + 1] = (v >>> 8) & 0xff;
    ram[buf + k + 2] = (v >>> 16) & 0xff;
    ram[buf + k + 3] = (v >>> 24) & 0xff;
  }
  const sum = blockChecksum(ram.subarray(buf, buf + BLOCK));
  const status = request(OP_WRITE, disk, block * BLOCK, buf);
  if (status !== 0) {
    Atomics.add(ramWords, HDR_ERRORS, 1);
    ramWords[entry] = 0; // unknown contents now
    return;
  }
  ramWords[entry] = sum;
  Atomics.add(ramWords, HDR_WRITES, 1);
}

const paused = CTL_PAUSED + i;
for (;;) {
  if (Atomics.load(control, CTL_QUIT) !== 0) break;
  if (Atomics.load(control, CTL_RUN_STATE) === STOP) {
    Atomics.store(control, paused, 1);
    Atomics.notify(control, paused);
    while (Atomics.load(control, CTL_RUN_STATE) === STOP && Atomics.load(control, CTL_QUIT) === 0) Atomics.wait(control, CTL_RUN_STATE, STOP, 1000);
    Atomics.store(control, paused, 0);
    continue;
  }
  step();
  cpu[CPU_STEPS] = (cpu[CPU_STEPS] ?? 0) + 1;
}
Atomics.store(control, paused, 1);
Atomics.notify(control, paused);

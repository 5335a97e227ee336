// @ts-check
/**
 * The shared-memory layout between the machine (main loop) and its vCPU workers: the control
 * words, the request slots of the virtio-blk-like queue, and the guest workload's data in guest
 * RAM. Plain JavaScript (checked by tsc) because the vCPU worker imports it as is.
 *
 * Control (Int32Array): RUN_STATE (0 running, 1 stop requested), QUIT, DOORBELL (bumped by a vCPU
 * after it queues a request), then one PAUSED word per vCPU (1 while it sits in a pause).
 *
 * Request slots (one per vCPU; Int32Array fields, Float64Array offset): STATE moves
 * IDLE -> QUEUED (vCPU) -> RUNNING (device) -> DONE (device) -> IDLE (vCPU); a request is taken
 * by the device exactly once, and a vCPU only pauses once its request is DONE and consumed.
 *
 * Guest RAM (the workload's view): a header page, then a checksum table per disk (one u32 per
 * 4 KiB block, 0 = never written), then one I/O buffer per vCPU; the rest of RAM is guest memory.
 */

export const CTL_RUN_STATE = 0;
export const CTL_QUIT = 1;
export const CTL_DOORBELL = 2;
export const CTL_PAUSED = 3; // + vCPU index
export const RUN = 0;
export const STOP = 1;

export const SLOT_STRIDE = 8;
export const SLOT_STATE = 0;
export const SLOT_OP = 1;
export const SLOT_DISK = 2;
export const SLOT_LENGTH = 3;
export const SLOT_RAM_OFFSET = 4;
export const SLOT_STATUS = 5;
export const SLOT_IDLE = 0;
export const SLOT_QUEUED = 1;
export const SLOT_RUNNING = 2;
export const SLOT_DONE = 3;
export const OP_READ = 1;
export const OP_WRITE = 2;
export const OP_FLUSH = 3;

export const BLOCK = 4096;
/** Header page of guest RAM: magic, geometry, counters (u32 words). */
export const HDR_MAGIC = 0; // 'SNPG'
export const HDR_DISKS = 1;
export const HDR_TABLE_BLOCKS = 2; // blocks tracked per disk
export const HDR_WRITES = 3;
export const HDR_READS = 4;
export const HDR_ERRORS = 5; // self-check mismatches the guest saw
export const HDR_VCPUS = 6;
export const GUEST_MAGIC = 0x534e5047;
export const TABLE_START = BLOCK;

/** vCPU register file (Int32Array, per vCPU): the workload's whole CPU state. */
export const CPU_STRIDE = 4;
export const CPU_RNG = 0;
export const CPU_STEPS = 1;
export const CPU_SEED = 2;

/**
 * Where the checksum table of disk `d` starts in guest RAM.
 * @param {number} d @param {number} tableBlocks
 */
export function tableOffset(d, tableBlocks) {
  return TABLE_START + d * tableBlocks * 4;
}

/**
 * Where vCPU `i`'s I/O buffer starts in guest RAM.
 * @param {number} i @param {number} disks @param {number} tableBlocks
 */
export function bufferOffset(i, disks, tableBlocks) {
  const tablesEnd = TABLE_START + disks * tableBlocks * 4;
  return Math.ceil(tablesEnd / BLOCK) * BLOCK + i * BLOCK;
}

/**
 * The checksum the workload keeps for a block (FNV-1a over the bytes; never 0).
 * @param {Uint8Array} data
 */
export function blockChecksum(data) {
  let h = 0x811c9dc5;
  for (let i = 0; i < data.length; i++) {
    h ^= data[i] ?? 0;
    h = Math.imul(h, 0x01000193);
  }
  return h >>> 0 || 1;
}

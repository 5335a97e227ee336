/**
 * The VM-state format: what savevm writes into the VM-state area of a disk and loadvm reads back.
 * Versioned and self-checking: a header (magic, version, section count), sections (RAM, vCPU
 * registers, devices, machine description), and a CRC-32 over everything before it. A reader
 * refuses what it cannot read (other magic, newer version, a section of the wrong size, a bad
 * checksum) with an error naming the field. Common code (pure functions on bytes).
 */
import zlib from 'node:zlib';
import { BlockError } from '../block/errors.js';

const MAGIC = 'SNAPVMST';
export const VMSTATE_VERSION = 1;
const SECTION_RAM = 1;
const SECTION_CPU = 2;
const SECTION_DEVICES = 3;
const SECTION_MACHINE = 4;
const HEADER_BYTES = 16;
const SECTION_HEADER_BYTES = 12;
const TWO32 = 0x100000000;

/** What the machine saves: RAM, the vCPUs' registers, the devices' state, and a description. */
export interface VmState {
  ram: Uint8Array;
  cpu: Uint8Array;
  /** Device state (the request queue's slots, which are idle when the VM is stopped). */
  devices: Uint8Array;
  machine: { ramBytes: number; vcpus: number; disks: string[]; vmClockNsec: number; guest: boolean };
}

function refuse(field: string, message: string): never {
  throw new BlockError('EINVAL', `VM state: ${message}`, { field });
}

/**
 * The encoded state in two pieces, so that a writer can stream it without first copying the RAM:
 * `prefix` (header, the machine, vCPU and device sections, and the RAM section's header), then
 * `ram` itself (a view, not a copy), then a 4-byte CRC-32 over both (`VMSTATE_TRAILER_BYTES`).
 * @locking common
 */
export function vmStateLayout(s: VmState): { prefix: Uint8Array; ram: Uint8Array; total: number } {
  const machine = new TextEncoder().encode(JSON.stringify(s.machine));
  const sections: Array<[number, Uint8Array]> = [
    [SECTION_MACHINE, machine],
    [SECTION_CPU, s.cpu],
    [SECTION_DEVICES, s.devices],
  ];
  const prefixBytes = HEADER_BYTES + sections.reduce((n, [, b]) => n + SECTION_HEADER_BYTES + b.length, 0) + SECTION_HEADER_BYTES;
  const prefix = new Uint8Array(prefixBytes);
  const v = new DataView(prefix.buffer);
  prefix.set(new TextEncoder().encode(MAGIC), 0);
  v.setUint32(8, VMSTATE_VERSION);
  v.setUint32(12, sections.length + 1);
  let off = HEADER_BYTES;
  const sectionHeader = (id: number, length: number): void => {
    v.setUint32(off, id);
    v.setUint32(off + 4, Math.floor(length / TWO32));
    v.setUint32(off + 8, length % TWO32);
    off += SECTION_HEADER_BYTES;
  };
  for (const [id, bytes] of sections) {
    sectionHeader(id, bytes.length);
    prefix.set(bytes, off);
    off += bytes.length;
  }
  sectionHeader(SECTION_RAM, s.ram.length);
  return { prefix, ram: s.ram, total: prefixBytes + s.ram.length + VMSTATE_TRAILER_BYTES };
}

/** The CRC-32 that ends an encoded state. */
export const VMSTATE_TRAILER_BYTES = 4;

/**
 * Serializes a VM state (one contiguous buffer, the size savevm records as vm-state-size).
 * @locking common
 */
export function encodeVmState(s: VmState): Uint8Array {
  const { prefix, ram, total } = vmStateLayout(s);
  const out = new Uint8Array(total);
  out.set(prefix, 0);
  out.set(ram, prefix.length);
  const off = total - VMSTATE_TRAILER_BYTES;
  new DataView(out.buffer).setUint32(off, zlib.crc32(out.subarray(0, off)));
  return out;
}

/**
 * The size of the encoded state in `head` (its first 16 bytes suffice when the header is sane),
 * or throws when it is not a VM state. Used to know how much to read.
 * @locking common
 */
export function checkVmStateHeader(head: Uint8Array): void {
  if (head.length < HEADER_BYTES) refuse('magic', `only ${head.length} bytes: too short for a header`);
  if (new TextDecoder().decode(head.subarray(0, 8)) !== MAGIC) refuse('magic', 'not a snapstack VM state (bad magic)');
  const version = new DataView(head.buffer, head.byteOffset, head.byteLength).getUint32(8);
  if (version !== VMSTATE_VERSION) refuse('version', `version ${version} cannot be read (this snapstack reads version ${VMSTATE_VERSION})`);
}

/** Longest machine description a reader accepts (it is a short JSON object). */
export const MAX_MACHINE_SECTION_BYTES = 64 * 1024;

/**
 * The most bytes a VM state of this machine can take (RAM, vCPU and device state, the longest
 * machine description, the headers and the checksum): the bound on a vm-state-size read from an
 * image before it sizes a buffer.
 * @locking common
 */
export function maxVmStateBytes(expect: { ramBytes: number; cpuBytes: number; deviceBytes: number }): number {
  return HEADER_BYTES + 4 * SECTION_HEADER_BYTES + MAX_MACHINE_SECTION_BYTES + expect.ramBytes + expect.cpuBytes + expect.deviceBytes + 4;
}

/**
 * The fewest bytes a VM state can take (headers, empty sections and the checksum).
 * @locking common
 */
export const MIN_VMSTATE_BYTES = HEADER_BYTES + 4 * SECTION_HEADER_BYTES + 4;

/**
 * Parses and verifies a VM state; `expect` is the machine it must fit (RAM size, vCPUs, disks).
 * `crc` is the CRC-32 of everything before the trailer when the reader computed it on the way in
 * (readVmStateStream): it is compared with the trailer instead of being computed again here.
 * @locking common
 */
export function decodeVmState(buf: Uint8Array, expect: { ramBytes: number; vcpus: number; cpuBytes: number; deviceBytes: number }, crc?: number): VmState {
  checkVmStateHeader(buf);
  const v = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const count = v.getUint32(12);
  if (count !== 4) refuse('sections', `${count} sections, expected 4`);
  let off = HEADER_BYTES;
  const found = new Map<number, Uint8Array>();
  for (let i = 0; i < count; i++) {
    if (off + SECTION_HEADER_BYTES > buf.length) refuse('sections', `section ${i} runs past the end (${buf.length} bytes)`);
    const id = v.getUint32(off);
    const len = v.getUint32(off + 4) * TWO32 + v.getUint32(off + 8);
    if (off + SECTION_HEADER_BYTES + len + 4 > buf.length) refuse('sections', `section ${id} (${len} bytes) runs past the end (${buf.length} bytes)`);
    found.set(id, buf.subarray(off + SECTION_HEADER_BYTES, off + SECTION_HEADER_BYTES + len));
    off += SECTION_HEADER_BYTES + len;
  }
  if (off + 4 !== buf.length) refuse('length', `${buf.length - off - 4} unexpected bytes after the sections`);
  const stored = v.getUint32(off);
  if ((crc ?? zlib.crc32(buf.subarray(0, off))) !== stored) refuse('crc32', 'checksum mismatch: the saved state is damaged');
  const ram = found.get(SECTION_RAM);
  const cpu = found.get(SECTION_CPU);
  const devices = found.get(SECTION_DEVICES);
  const machineBytes = found.get(SECTION_MACHINE);
  if (ram === undefined || cpu === undefined || devices === undefined || machineBytes === undefined) refuse('sections', 'a section is missing');
  if (ram.length !== expect.ramBytes) refuse('ram', `${ram.length} bytes of RAM saved, the machine has ${expect.ramBytes}`);
  if (cpu.length !== expect.cpuBytes) refuse('cpu', `${cpu.length} bytes of vCPU state saved, the machine needs ${expect.cpuBytes}`);
  if (devices.length !== expect.deviceBytes) refuse('devices', `${devices.length} bytes of device state saved, the machine needs ${expect.deviceBytes}`);
  if (machineBytes.length > MAX_MACHINE_SECTION_BYTES) refuse('machine', `a machine description of ${machineBytes.length} bytes (at most ${MAX_MACHINE_SECTION_BYTES})`);
  let machine: VmState['machine'];
  try {
    machine = JSON.parse(new TextDecoder().decode(machineBytes)) as VmState['machine'];
  } catch {
    refuse('machine', 'the machine description is not valid JSON');
  }
  if (machine.vcpus !== expect.vcpus) refuse('vcpus', `saved with ${machine.vcpus} vCPUs, the machine has ${expect.vcpus}`);
  return { ram, cpu, devices, machine };
}

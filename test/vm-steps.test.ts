/**
 * The streamed VM-state transfer (src/machine/vm-steps.ts): what writeVmStateStream writes is
 * byte for byte encodeVmState's output, for sizes around the chunk boundaries; readVmStateStream's
 * running CRC lets decodeVmState accept it, and refuse it after any one byte changed on disk.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { shutdownIOThreads, withBql } from '../src/index.js';
import { withBqlSync } from '../src/block/bql.js';
import { withDrainedSet } from '../src/block/drain.js';
import { closeNode, openNode } from '../src/block/graph.js';
import { bdrvLoadVmstate, bdrvSaveVmstate } from '../src/block/io.js';
import { createQcow2File } from '../src/drivers/qcow2/create.js';
import { heldBqlSteps, readVmStateStream, VMSTATE_CHUNK_BYTES, writeVmStateStream } from '../src/machine/vm-steps.js';
import { decodeVmState, encodeVmState, vmStateLayout, type VmState } from '../src/machine/vmstate.js';

let dir: string;
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-vm-steps-'));
});
afterAll(async () => {
  fs.rmSync(dir, { recursive: true, force: true });
  await withBql((bql) => shutdownIOThreads(bql));
});

function state(ramBytes: number, seed: number): VmState {
  const ram = new Uint8Array(ramBytes);
  for (let i = 0; i < ramBytes; i += 997) ram[i] = (seed + i) & 0xff;
  return { ram, cpu: new Uint8Array(64).fill(seed & 0xff), devices: new Uint8Array(32), machine: { ramBytes, vcpus: 1, disks: ['d0'], vmClockNsec: 42, guest: false } };
}
const expectOf = (s: VmState) => ({ ramBytes: s.ram.length, vcpus: 1, cpuBytes: 64, deviceBytes: 32 });

describe('the streamed VM state', () => {
  it('writes exactly encodeVmState\'s bytes, reads them back with a CRC that decodes, and refuses one changed byte', async () => {
    const file = path.join(dir, 'vm.qcow2');
    withBqlSync((bql) => createQcow2File(bql, file, { sizeBytes: 1 << 20 }));
    const node = await withBql((bql) => openNode(bql, `driver=qcow2,file.driver=file,file.filename=${file}`));
    try {
      // RAM sizes that put the end just before, on and after a chunk boundary (the prefix is small)
      const sizes = [1000, VMSTATE_CHUNK_BYTES - 200, VMSTATE_CHUNK_BYTES - 190, VMSTATE_CHUNK_BYTES, 2 * VMSTATE_CHUNK_BYTES + 5];
      await fc.assert(
        fc.asyncProperty(fc.constantFrom(...sizes), fc.integer({ min: 0, max: 255 }), fc.double({ min: 0, max: 1, noNaN: true }), async (ramBytes, seed, where) => {
          const s = state(ramBytes, seed);
          const want = encodeVmState(s);
          await withBql((bql) =>
            withDrainedSet(bql, [node], async (drained) => {
              const steps = heldBqlSteps(bql);
              const layout = vmStateLayout(s);
              expect(layout.total).toBe(want.length);
              expect(await writeVmStateStream(steps, drained, node, layout)).toBe(want.length);
              const raw = new Uint8Array(want.length);
              await bdrvLoadVmstate(node, raw, 0);
              expect(Buffer.compare(raw, want)).toBe(0);
              const back = await readVmStateStream(steps, drained, node, want.length);
              expect(decodeVmState(back.bytes, expectOf(s), back.crc).machine.vmClockNsec).toBe(42);
              // one byte changed on disk (header, a section or the trailer): refused, by the CRC or a header check
              const at = Math.min(want.length - 1, Math.floor(where * want.length));
              await bdrvSaveVmstate(node, new Uint8Array([(want[at] ?? 0) ^ 0x5a]), at);
              const bad = await readVmStateStream(steps, drained, node, want.length);
              expect(() => decodeVmState(bad.bytes, expectOf(s), bad.crc)).toThrow(/VM state/);
            }),
          );
        }),
        { numRuns: 12, seed: 1301 },
      );
    } finally {
      await withBql((bql) => closeNode(bql, node));
    }
  });
});

/**
 * Waiting for the self-checking guest and asking it whether its disks agree with its checksums
 * (the data oracle of the machine tests).
 */
import { expect } from 'vitest';
import { withBql } from '../../src/block/bql.js';
import type { Machine } from '../../src/machine/machine.js';

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Waits (up to 5 s) until the guest has made `n` more writes. */
export async function waitForWrites(m: Machine, n: number): Promise<void> {
  const target = m.guestCounters().writes + n;
  for (let i = 0; i < 500 && m.guestCounters().writes < target; i++) await sleep(10);
  expect(m.guestCounters().writes).toBeGreaterThanOrEqual(target);
}

/** Every disk block agrees with the checksum the guest keeps for it. */
export async function expectGuestConsistent(m: Machine): Promise<void> {
  const r = await withBql((bql) => m.checkGuest(bql));
  expect(r.mismatches, `disk blocks disagreeing with the guest's checksums: ${JSON.stringify(r.mismatches.slice(0, 5))}`).toEqual([]);
}

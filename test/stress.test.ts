import { afterAll, describe, expect, it } from 'vitest';
import { shutdownIOThreads } from '../src/block/iothread.js';
import { setDrainDisabledForTesting } from '../src/testing.js';
import { runStress, type StressOptions } from './helpers/stress.js';
import { withBql } from '../src/block/bql.js';

const load: StressOptions = {
  disks: 2,
  submittersPerDisk: 4,
  opsPerSubmitter: 700,
  drainedSections: 40,
  diskBytes: 8 * 1024 * 1024,
  seed: 1,
};

afterAll(async () => {
  setDrainDisabledForTesting(false);
  await withBql((bql) => shutdownIOThreads(bql));
});

describe('stress: random I/O from several submitters on two IOThreads, with drained sections', () => {
  it('loses, tears and reorders no write, and every drained section sees a quiet disk', async () => {
    const r = await runStress(load);
    expect(r.ops).toBe(load.disks * load.submittersPerDisk * load.opsPerSubmitter);
    expect(r.sections).toBeGreaterThan(5);
    expect(r.mismatches).toEqual([]);
  });

  it('detects the inconsistency when draining is disabled (the check can fail)', async () => {
    setDrainDisabledForTesting(true);
    try {
      const r = await runStress({ ...load, seed: 2 });
      expect(r.sections).toBeGreaterThan(5);
      expect(r.mismatches.length).toBeGreaterThan(0);
      expect(r.mismatches.some((m) => m.startsWith('drained section'))).toBe(true);
    } finally {
      setDrainDisabledForTesting(false);
    }
  });
});

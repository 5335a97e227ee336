/**
 * Type-level tests: the qcow2 functions that change metadata outside their module take the
 * metadata lock's proof, and no object literal passes for one.
 */
import { describe, expectTypeOf, it } from 'vitest';
import { MetadataLocked } from '../src/drivers/qcow2/metadata-lock.js';
import { setDiskSize, updateSnapshotRefcount } from '../src/drivers/qcow2/snapshots.js';
import type { Qcow2State } from '../src/drivers/qcow2/state.js';

declare const s: Qcow2State;
declare const locked: MetadataLocked;

describe('the metadata lock in the types', () => {
  it('setDiskSize and updateSnapshotRefcount need the proof (the latter the Bql and a drained proof too)', () => {
    expectTypeOf(setDiskSize).parameter(0).toEqualTypeOf<MetadataLocked>();
    expectTypeOf(updateSnapshotRefcount).parameter(2).toEqualTypeOf<MetadataLocked>();
    void setDiskSize(locked, s, 512);
    // @ts-expect-error: no proof
    void setDiskSize(s, 512);
    // @ts-expect-error: an object literal is no proof
    void setDiskSize({ state: s, live: true }, s, 512);
    // @ts-expect-error: the constructor is private
    new MetadataLocked(s);
  });
});

/**
 * The easy API (src/image.ts) takes the Big Lock itself; called with the lock held it used to wait
 * for ever. Now it fails with EBUSY after its wait bound, or uses the caller's proof when given.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { bqlIsHeld, withBql, withBqlSync } from '../src/block/bql.js';
import { isBlockError } from '../src/block/errors.js';
import { createRawFile } from '../src/drivers/index.js';
import { openImage } from '../src/image.js';

let dir: string;
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-easy-bql-'));
});
afterAll(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

function rawImage(name: string): string {
  const p = path.join(dir, name);
  withBqlSync((bql) => createRawFile(bql, p, 1 << 20));
  return p;
}

describe('the easy API called with the Big Lock held', () => {
  it('fails openImage inside withBql with a typed EBUSY naming the cause instead of hanging', async () => {
    const p = rawImage('inside.img');
    const started = Date.now();
    const err = await withBql(async () => {
      try {
        await openImage(p, { format: 'raw', bqlWaitMs: 100 });
        return null;
      } catch (e) {
        return e;
      }
    });
    expect(isBlockError(err, 'EBUSY')).toBe(true);
    expect(String((err as Error).message)).toMatch(/Big Lock \(BQL\) is still held.*inside withBql.*pass that proof/);
    expect(Date.now() - started).toBeLessThan(5000);
    // the abandoned wait hands the lock straight on: it is free again and usable
    await new Promise((r) => setTimeout(r, 10));
    expect(bqlIsHeld()).toBe(false);
    const img = await openImage(p, { format: 'raw' });
    await img.close();
    // and the file was not left locked by the failed open
    const again = await openImage(p, { format: 'raw' });
    await again.close();
  });

  it('works inside withBql when given the caller\'s proof: open, write, read, snapshot, close', async () => {
    const p = rawImage('proof.img');
    const data = await withBql(async (bql) => {
      const img = await openImage(p, { format: 'raw', bql });
      await img.write(0, new Uint8Array(512).fill(7));
      const sn = await img.createSnapshot('s', {}, bql);
      expect((await img.snapshots(bql)).map((s) => s.name)).toEqual(['s']);
      await img.write(0, new Uint8Array(512).fill(8));
      await img.gotoSnapshot(sn.id, bql);
      const back = await img.read(0, 512);
      await img.deleteSnapshot('s', bql);
      expect((await img.info(bql)).device).toBe(img.name);
      await img.close(bql);
      return back;
    });
    expect(data.every((b) => b === 7)).toBe(true);
  });

  it('fails Image.close inside withBql without the proof, and the image can still be closed after', async () => {
    const p = rawImage('close.img');
    const img = await openImage(p, { format: 'raw', bqlWaitMs: 50 });
    const err = await withBql(async () => img.snapshots().then(() => null, (e: unknown) => e));
    expect(isBlockError(err, 'EBUSY')).toBe(true);
    await img.close();
    expect(bqlIsHeld()).toBe(false);
  });

  it('refuses a stale proof', async () => {
    const p = rawImage('stale.img');
    const stale = await withBql((bql) => bql);
    await expect(openImage(p, { format: 'raw', bql: stale })).rejects.toThrow(/stale/);
  });

  it('waits for a lock another task holds briefly and then proceeds', async () => {
    const p = rawImage('wait.img');
    const holder = withBql(() => new Promise((r) => setTimeout(r, 100)));
    await new Promise((r) => setTimeout(r, 5));
    const img = await openImage(p, { format: 'raw', bqlWaitMs: 5000 });
    await holder;
    await img.close();
  });
});

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { withBql } from '../../block/bql.js';
import { shutdownIOThreads } from '../../block/iothread.js';
import { openImage, type Image } from '../../image.js';
import { createQcow2File } from './create.js';
import { Qcow2Instance } from './instance.js';
import { MetadataLocked, withMetadataLock } from './metadata-lock.js';
import { setDiskSize } from './snapshots.js';
import type { Qcow2State } from './state.js';

let dir = '';
const images: Image[] = [];
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-mdlock-'));
});
afterAll(async () => {
  for (const img of images) await img.close();
  fs.rmSync(dir, { recursive: true, force: true });
  await withBql((bql) => shutdownIOThreads(bql));
});

async function open(name: string): Promise<Qcow2State> {
  const f = path.join(dir, `${name}.qcow2`);
  await withBql(async (bql) => createQcow2File(bql, f, { sizeBytes: 1 << 24 }));
  const img = await openImage(f, { format: 'qcow2' });
  images.push(img);
  const inst = img.backend.root?.instance;
  if (!(inst instanceof Qcow2Instance)) throw new Error('not qcow2');
  return inst.state;
}

function code(e: unknown): string {
  return typeof e === 'object' && e !== null && 'code' in e ? String((e as { code: unknown }).code) : String(e);
}

describe('the qcow2 metadata lock proof', () => {
  it('is accepted while the lock is held for the same node', async () => {
    const s = await open('ok');
    await withMetadataLock(s, (locked) => setDiskSize(locked, s, 1 << 25));
    expect(s.sizeBytes).toBe(1 << 25);
  });

  it('refuses a stale proof, the proof of another node and a forged one, and changes nothing', async () => {
    const a = await open('a');
    const b = await open('b');
    let stale: MetadataLocked | null = null;
    await withMetadataLock(a, async (locked) => {
      stale = locked;
    });
    if (stale === null) throw new Error('no proof');
    const kept: MetadataLocked = stale;
    await expect(setDiskSize(kept, a, 1 << 25)).rejects.toSatisfy((e: unknown) => code(e) === 'EPERM');
    await expect(withMetadataLock(b, (other) => setDiskSize(other, a, 1 << 25))).rejects.toSatisfy((e: unknown) => code(e) === 'EPERM');
    const forged = Object.create(MetadataLocked.prototype) as MetadataLocked;
    await expect(withMetadataLock(a, (locked) => setDiskSize(forged ?? locked, a, 1 << 25))).rejects.toSatisfy((e: unknown) => code(e) === 'EPERM');
    expect(a.sizeBytes).toBe(1 << 24);
  });
});

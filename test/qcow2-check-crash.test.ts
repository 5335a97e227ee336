/**
 * `check -r all` under the power-loss simulator (test/helpers/crash-driver.ts: any subset of the
 * writes since the last flush persists, torn at sectors): a qemu-img image whose refcount
 * structure is damaged (so the repair must rebuild it elsewhere) is repaired with a crash at every
 * write and every flush of the repair. Every image the disk may hold afterwards must still be a
 * qcow2 image (the header never written but through its complete, flushed pointer update), must
 * check either as the damage it started with or as repaired (clean, or leaks only), and must hold
 * the guest data it held before (qemu-img compare).
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { withBql } from '../src/block/bql.js';
import { shutdownIOThreads } from '../src/index.js';
import { armCrash, crashDisk, crashImages, createCrashDisk } from './helpers/crash-driver.js';
import { describeInterop, qemu, qemuStatus } from './helpers/qemu.js';
import { repairCrashDisk } from './helpers/crash-repair.js';

let dir: string;
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-check-crash-'));
});
afterAll(async () => {
  fs.rmSync(dir, { recursive: true, force: true });
  await withBql((bql) => shutdownIOThreads(bql));
});

/** qemu-img check's exit status and corruption count of `f`. */
function verdict(f: string): { status: number; corruptions: number } {
  const r = qemuStatus('qemu-img', ['check', '--output=json', f]);
  const json = r.stdout.trim().startsWith('{') ? (JSON.parse(r.stdout) as { corruptions?: number }) : {};
  return { status: r.status, corruptions: json.corruptions ?? 0 };
}

const damages: Array<{ what: string; damage: (b: Buffer) => void }> = [
  {
    what: 'a zeroed refcount-table entry',
    damage: (b) => b.writeBigUInt64BE(0n, Number(b.readBigUInt64BE(48))),
  },
  {
    what: 'a zeroed refcount block',
    damage: (b) => {
      const block = Number(b.readBigUInt64BE(Number(b.readBigUInt64BE(48))) & 0x00fffffffffffe00n);
      b.fill(0, block, block + 65536);
    },
  },
];

describeInterop('check -r all is crash-safe', () => {
  for (const d of damages) {
    it(`a crash at any write or flush of the rebuild after ${d.what} leaves the old damage or the repair, never a broken header or lost data`, async () => {
      const src = path.join(dir, 'src.qcow2');
      qemu('qemu-img', ['create', '-q', '-f', 'qcow2', src, '64M']);
      qemu('qemu-io', ['-c', 'write -P 1 0 256k', '-c', 'write -P 2 1M 64k', src]);
      qemu('qemu-img', ['snapshot', '-c', 's1', src]);
      qemu('qemu-io', ['-c', 'write -P 3 0 64k', src]);
      const damaged = Buffer.from(fs.readFileSync(src));
      d.damage(damaged);
      const original = path.join(dir, 'original.qcow2');
      fs.writeFileSync(original, damaged);
      const before = verdict(original);
      expect(before.status).toBe(2);

      // how many events (writes and flushes) the whole repair makes
      createCrashDisk('chk-count', damaged);
      await repairCrashDisk('chk-count');
      const events = crashDisk('chk-count').events;
      expect(events).toBeGreaterThan(3);

      let images = 0;
      for (let n = 0; n < events; n++) {
        const id = `chk-${n}`;
        createCrashDisk(id, damaged);
        armCrash(id, n);
        await repairCrashDisk(id);
        for (const img of crashImages(id, { seed: 1000 + n })) {
          const f = path.join(dir, `crash-${n}.qcow2`);
          fs.writeFileSync(f, img.bytes);
          const v = verdict(f);
          const where = `crash at event ${n} of ${events}, persisted ${img.label}`;
          // the old damage exactly, or repaired (clean or leaks only): nothing in between
          expect({ where, ok: (v.status === 2 && v.corruptions === before.corruptions) || v.status === 0 || v.status === 3 }).toEqual({ where, ok: true });
          expect({ where, compare: qemuStatus('qemu-img', ['compare', '-q', original, f]).status }).toEqual({ where, compare: 0 });
          images++;
        }
      }
      console.log(`check -r all after ${d.what}: ${events} crash points, ${images} crash images`);
      expect(images).toBeGreaterThan(events);
    }, 300_000);
  }
});

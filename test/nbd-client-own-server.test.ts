/**
 * The two halves of NBD in snapstack meet: our client (driver=nbd) against our server
 * (src/nbd/server.ts) exporting a qcow2 image; reads, writes, zeroes and block status checked
 * against a reference, and qemu-img checks the exported image after the server is gone.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { bdrvBlockStatus, openImage, shutdownIOThreads, withBql, withBqlSync } from '../src/index.js';
import { createQcow2File } from '../src/drivers/qcow2/create.js';
import '../src/drivers/nbd/driver.js';
import { NbdServer } from '../src/nbd/server.js';
import { describeInterop, qemu, qemuStatus } from './helpers/qemu.js';
import { firstDifference, pattern } from './nbd-client-helpers.js';

const MiB = 1024 * 1024;
let dir: string;
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-nbd-own-'));
});
afterAll(async () => {
  fs.rmSync(dir, { recursive: true, force: true });
  await withBql((bql) => shutdownIOThreads(bql));
});

describeInterop('our NBD client over our NBD server', () => {
  it('reads, writes and zeroes a qcow2 image exported by snapstack, with block status, and qemu-img checks it afterwards', async () => {
    const file = path.join(dir, 'exported.qcow2');
    withBqlSync((bql) => createQcow2File(bql, file, { sizeBytes: 8 * MiB }));
    const exported = await openImage(file, { format: 'qcow2' });
    const server = new NbdServer({ exports: [{ name: 'ours', backend: exported.backend }], maxConnections: 2 });
    const sock = path.join(dir, 'ours.sock');
    await server.listen({ type: 'unix', path: sock });
    const ref = new Uint8Array(8 * MiB);
    try {
      const img = await openImage(`driver=nbd,server.type=unix,server.path=${sock},export=ours`);
      expect(img.size).toBe(8 * MiB);
      const writes: Array<[number, Uint8Array]> = [
        [0, pattern(1, 65536)],
        [MiB + 7, pattern(2, 300_000)],
        [6 * MiB, pattern(3, 4096)],
      ];
      await Promise.all(writes.map(([o, d]) => img.write(o, d)));
      for (const [o, d] of writes) ref.set(d, o);
      await img.writeZeroes(MiB + 4096, 8192);
      ref.fill(0, MiB + 4096, MiB + 4096 + 8192);
      await img.flush();
      const back = await img.read(0, 8 * MiB);
      expect(firstDifference(back, ref)).toBe(-1);
      const root = img.backend.root;
      if (root === null) throw new Error('no root');
      expect(await bdrvBlockStatus(root, 4 * MiB, MiB)).toMatchObject({ data: false, zero: true });
      expect(await bdrvBlockStatus(root, 0, 4096)).toMatchObject({ data: true });
      await img.close();
    } finally {
      await server.close();
      await exported.close();
    }
    const chk = qemuStatus('qemu-img', ['check', file]);
    expect(`${chk.stdout}${chk.stderr}exit ${chk.status}`).toMatch(/No errors were found on the image\.[\s\S]*exit 0$/);
    const out = path.join(dir, 'exported.raw');
    qemu('qemu-img', ['convert', '-O', 'raw', file, out]);
    expect(firstDifference(fs.readFileSync(out), ref)).toBe(-1);
  });
});

/**
 * FUA over NBD, both directions:
 * - the server: a write (or write-zeroes) a client sends with NBD_CMD_FLAG_FUA is durable when it
 *   is acknowledged. The export's image lies on a crashsim disk (a volatile cache in front of a
 *   durable image, test/helpers/crash-driver.ts) and our nbd driver writes to it, staying
 *   connected; after each acknowledged FUA write the durable image holds it, while a plain write
 *   is still only cached.
 * - the client: a FUA write through our nbd driver goes out as NBD_CMD_FLAG_FUA (nbdkit's log
 *   filter records the flag), a plain one without it.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { withBql } from '../src/block/bql.js';
import { withDrained } from '../src/block/drain.js';
import { closeNode, openNode } from '../src/block/graph.js';
import { shutdownIOThreads } from '../src/block/iothread.js';
import { createQcow2OnNode } from '../src/drivers/qcow2/create.js';
import { openImage } from '../src/image.js';
import { NbdServer } from '../src/nbd/server.js';
import { createCrashDisk, crashDisks, durableBytes, persistedBytes } from './helpers/crash-driver.js';
import { describeWithTool, startNbdkit } from './nbd-client-helpers.js';

let dir: string;
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-nbd-fua-'));
});
afterAll(async () => {
  crashDisks.clear();
  fs.rmSync(dir, { recursive: true, force: true });
  await withBql((bql) => shutdownIOThreads(bql));
});

const SIZE = 4 * 1024 * 1024;

/** A qcow2 image on crashsim disk `id`, every byte of it durable. */
async function qcow2Disk(id: string): Promise<void> {
  const seed = `${id}-seed`;
  createCrashDisk(seed);
  await withBql(async (bql) => {
    const node = await openNode(bql, `driver=crashsim,id=${seed}`);
    try {
      await withDrained(bql, node, (d) => createQcow2OnNode(bql, d, node, { sizeBytes: SIZE }));
    } finally {
      await closeNode(bql, node);
    }
  });
  createCrashDisk(id, persistedBytes(seed));
  crashDisks.delete(seed);
}

/** Reads `len` bytes at `off` of the qcow2 image in `bytes` (a durable image). */
async function readImage(bytes: Uint8Array, off: number, len: number): Promise<Uint8Array> {
  const id = `look-${Math.random().toString(36).slice(2)}`;
  createCrashDisk(id, bytes);
  const img = await openImage(`driver=qcow2,file.driver=crashsim,file.id=${id}`, { readOnly: true });
  try {
    return await img.read(off, len);
  } finally {
    await img.close();
    crashDisks.delete(id);
  }
}

describe('FUA through our NBD server', () => {
  it('acknowledges a FUA write or write-zeroes only once it is durable; a plain write is not flushed', async () => {
    await qcow2Disk('srv');
    const img = await openImage('driver=qcow2,file.driver=crashsim,file.id=srv');
    const sock = path.join(dir, 'srv.sock');
    const server = new NbdServer({ exports: [{ name: 'e', backend: img.backend }] });
    await server.listen({ type: 'unix', path: sock });
    // the client stays connected (a client's close flushes): our nbd driver, in this process
    const client = await openImage(`nbd+unix:///e?socket=${sock}`, { format: 'raw' });
    try {
      await client.write(0, new Uint8Array(65536).fill(0x41));
      expect((await readImage(durableBytes('srv'), 0, 65536)).every((b) => b === 0x41), 'a plain write is only cached').toBe(false);
      await client.write(1024 * 1024, new Uint8Array(65536).fill(0x42), { fua: true });
      expect((await readImage(durableBytes('srv'), 1024 * 1024, 65536)).every((b) => b === 0x42), 'the FUA write is durable').toBe(true);
      await client.write(2 * 1024 * 1024, new Uint8Array(4096).fill(0x43));
      await client.writeZeroes(2 * 1024 * 1024, 4096, { fua: true });
      expect((await readImage(durableBytes('srv'), 2 * 1024 * 1024, 4096)).every((b) => b === 0), 'the FUA write-zeroes is durable').toBe(true);
      await client.write(3 * 1024 * 1024, new Uint8Array(4096).fill(0x44));
      expect((await readImage(durableBytes('srv'), 3 * 1024 * 1024, 4096)).every((b) => b === 0x44), 'a plain write after them is only cached').toBe(false);
    } finally {
      await client.close();
    }
    await server.close();
    await img.close();
  });
});

describeWithTool('nbdkit', 'apt-get install nbdkit', 'FUA from our NBD client', () => {
  it('sends NBD_CMD_FLAG_FUA for a FUA write and write-zeroes, and not for a plain write', async () => {
    const sock = path.join(dir, 'kit.sock');
    const log = path.join(dir, 'kit.log');
    const srv = await startNbdkit(sock, ['--filter=log', 'memory', 'size=4M', `logfile=${log}`]);
    try {
      const img = await openImage(`nbd+unix:///?socket=${sock}`, { format: 'raw' });
      try {
        await img.write(0, new Uint8Array(4096).fill(1));
        await img.write(8192, new Uint8Array(4096).fill(2), { fua: true });
        await img.writeZeroes(65536, 4096, { fua: true });
      } finally {
        await img.close();
      }
    } finally {
      await srv.stop();
    }
    const lines = fs.readFileSync(log, 'utf8').split('\n');
    const write = (off: number): string => lines.find((l) => / Write /.test(l) && l.includes(`offset=0x${off.toString(16)} `)) ?? `(no Write at ${off})`;
    expect(write(0)).toMatch(/fua=0/);
    expect(write(8192)).toMatch(/fua=1/);
    expect(lines.find((l) => / Zero /.test(l) && l.includes('offset=0x10000 ')) ?? '(no Zero)').toMatch(/fua=1/);
  });
});

/**
 * The `file` driver with aio=sync: the same behaviour as on the IOThreads (reads past the end
 * are zeros, writes grow the file, write-zeroes, truncate, flush), done on the main loop; and the
 * option's refusals.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { withBql } from '../block/bql.js';
import { closeNode, openNode } from '../block/graph.js';
import { bdrvFlush, bdrvGetLength, bdrvPread, bdrvPwrite, bdrvPwriteZeroes, bdrvTruncate } from '../block/io.js';
import { createIOThread, shutdownIOThreads } from '../block/iothread.js';
import { isBlockError } from '../block/errors.js';
import './index.js';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-aio-sync-'));
afterAll(async () => {
  fs.rmSync(dir, { recursive: true, force: true });
  await withBql((bql) => shutdownIOThreads(bql));
});

describe('file aio=sync', () => {
  it('reads, writes, grows, zeroes, truncates and flushes like the threaded driver', async () => {
    const f = path.join(dir, 'a.img');
    fs.writeFileSync(f, Buffer.alloc(8192, 1));
    await withBql(async (bql) => {
      const node = await openNode(bql, { driver: 'file', filename: f, aio: 'sync' });
      try {
        await bdrvPwrite(node, 4096, new Uint8Array(8192).fill(2)); // past the end: grows
        expect(bdrvGetLength(node)).toBe(12288);
        await bdrvPwriteZeroes(node, 0, 1024);
        const back = new Uint8Array(16384);
        await bdrvPread(node, 0, back); // the last 4 KiB lie past the end: zeros
        expect(back.subarray(0, 1024).every((b) => b === 0)).toBe(true);
        expect(back.subarray(1024, 4096).every((b) => b === 1)).toBe(true);
        expect(back.subarray(4096, 12288).every((b) => b === 2)).toBe(true);
        expect(back.subarray(12288).every((b) => b === 0)).toBe(true);
        await bdrvTruncate(node, 4096);
        await bdrvFlush(node);
        expect(bdrvGetLength(node)).toBe(4096);
      } finally {
        await closeNode(bql, node);
      }
    });
    expect(fs.statSync(f).size).toBe(4096);
  });

  it('refuses aio=sync on an IOThread and an unknown aio mode, naming the option', async () => {
    const f = path.join(dir, 'b.img');
    fs.writeFileSync(f, Buffer.alloc(4096));
    await withBql(async (bql) => {
      createIOThread(bql, 'aio-sync-io0');
      const cases: Array<Record<string, string>> = [
        { driver: 'file', filename: f, aio: 'sync', iothread: 'aio-sync-io0' },
        { driver: 'file', filename: f, aio: 'native' },
      ];
      for (const opts of cases) {
        const err = await openNode(bql, opts).then(
          () => null,
          (e: unknown) => e,
        );
        expect(isBlockError(err) && err.code === 'EINVAL' && err.field === 'aio').toBe(true);
      }
    });
  });
});

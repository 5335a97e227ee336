/**
 * The check callback through the block layer (block/check.ts): img check reaches a format's check
 * by the driver callback only; a format without one says so (qemu-img's exit code 63); a repair
 * needs a writable node; the proofs are checked.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { withBql } from '../src/block/bql.js';
import { bdrvCanCheck, bdrvCheck } from '../src/block/check.js';
import { drainedBegin, drainedEnd, withDrained } from '../src/block/drain.js';
import { closeNode, openNode } from '../src/block/graph.js';
import { isBlockError, shutdownIOThreads } from '../src/index.js';
import { imgCheck } from '../src/cli/img-check.js';
import { createCrashDisk } from './helpers/crash-driver.js';
import { createQcow2OnNode } from '../src/drivers/qcow2/create.js';

let dir: string;
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-block-check-'));
});
afterAll(async () => {
  fs.rmSync(dir, { recursive: true, force: true });
  await withBql((bql) => shutdownIOThreads(bql));
});

describe('bdrvCheck', () => {
  it('a raw image has no check: bdrvCanCheck is false, bdrvCheck ENOTSUP, img check exits 63', async () => {
    const f = path.join(dir, 'plain.raw');
    fs.writeFileSync(f, Buffer.alloc(1024 * 1024));
    await withBql(async (bql) => {
      const node = await openNode(bql, { driver: 'raw', 'file.driver': 'file', 'file.filename': f, 'read-only': 'on' });
      try {
        expect(bdrvCanCheck(bql, node)).toBe(false);
        const err = await withDrained(bql, node, (d) => bdrvCheck(bql, d, node, { leaks: false, errors: false })).catch((e: unknown) => e);
        expect(isBlockError(err, 'ENOTSUP')).toBe(true);
      } finally {
        await closeNode(bql, node);
      }
    });
    const lines: string[] = [];
    expect(await imgCheck([f], () => undefined, (s) => lines.push(s))).toBe(63);
    expect(lines).toEqual(['snapstack img: This image format does not support checks']);
  });

  it('a repair on a read-only node is refused (EACCES) before the driver runs', async () => {
    createCrashDisk('bc-ro');
    await withBql(async (bql) => {
      const file = await openNode(bql, 'driver=crashsim,id=bc-ro');
      await withDrained(bql, file, (d) => createQcow2OnNode(bql, d, file, { sizeBytes: 1024 * 1024 }));
      await closeNode(bql, file);
      const node = await openNode(bql, { driver: 'qcow2', 'x-check': 'on', 'read-only': 'on', 'file.driver': 'crashsim', 'file.id': 'bc-ro' });
      try {
        expect(bdrvCanCheck(bql, node)).toBe(true);
        const clean = await withDrained(bql, node, (d) => bdrvCheck(bql, d, node, { leaks: false, errors: false }));
        expect(clean).toMatchObject({ corruptions: 0, leaks: 0, checkErrors: 0, failure: null });
        const err = await withDrained(bql, node, (d) => bdrvCheck(bql, d, node, { leaks: true, errors: true })).catch((e: unknown) => e);
        expect(isBlockError(err, 'EACCES')).toBe(true);
      } finally {
        await closeNode(bql, node);
      }
    });
  });

  it('a stale drained proof is refused (EPERM)', async () => {
    createCrashDisk('bc-stale');
    await withBql(async (bql) => {
      const file = await openNode(bql, 'driver=crashsim,id=bc-stale');
      await withDrained(bql, file, (d) => createQcow2OnNode(bql, d, file, { sizeBytes: 1024 * 1024 }));
      await closeNode(bql, file);
      const node = await openNode(bql, { driver: 'qcow2', 'x-check': 'on', 'read-only': 'on', 'file.driver': 'crashsim', 'file.id': 'bc-stale' });
      try {
        const d = await drainedBegin(bql, node);
        drainedEnd(bql, d);
        const err = await bdrvCheck(bql, d, node, { leaks: false, errors: false }).catch((e: unknown) => e);
        expect(isBlockError(err, 'EPERM')).toBe(true);
      } finally {
        await closeNode(bql, node);
      }
    });
  });
});

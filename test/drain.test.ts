import { afterEach, describe, expect, it } from 'vitest';
import { blkDelete, blkNew, blkPread, blkPwrite, type BlockBackend } from '../src/block/backend.js';
import { acquireBql, releaseBql, type Bql } from '../src/block/bql.js';
import { drainAllBegin, drainAllEnd, drainedBegin, drainedEnd } from '../src/block/drain.js';
import { isBlockError } from '../src/block/errors.js';
import { closeNode, openNode } from '../src/block/graph.js';
import type { BlockNode } from '../src/block/node.js';
import { bdrvSnapshotGoto } from '../src/block/snapshot.js';
import '../src/drivers/index.js';
import { gateOf, settle } from './helpers/gated-driver.js';

let bql: Bql;
const opened: Array<{ blk: BlockBackend; node: BlockNode }> = [];

async function gatedDisk(name: string): Promise<{ blk: BlockBackend; node: BlockNode; file: BlockNode }> {
  const node = await openNode(bql, `driver=raw,node-name=${name},file.driver=gated,file.node-name=${name}-file,file.size=1M`);
  const blk = blkNew(bql, `${name}-dev`, node);
  opened.push({ blk, node });
  const file = node.file;
  if (file === undefined) throw new Error('raw node without file child');
  return { blk, node, file };
}

function tracked<T>(p: Promise<T>): { p: Promise<T>; done: () => boolean } {
  let finished = false;
  const q = p.finally(() => {
    finished = true;
  });
  q.catch(() => {});
  return { p: q, done: () => finished };
}

afterEach(async () => {
  for (const { blk, node } of opened.splice(0)) {
    blkDelete(bql, blk);
    await closeNode(bql, node);
  }
  releaseBql(bql);
});

describe('drained sections', () => {
  it('returns from drainedBegin only when nothing is in flight', async () => {
    bql = await acquireBql();
    const { blk, node, file } = await gatedDisk('d1');
    const gate = gateOf('d1-file');
    gate.closed = true;
    const reads = Array.from({ length: 5 }, (_, i) => tracked(blkPread(blk, i * 512, new Uint8Array(512))));
    await settle();
    expect(file.inFlight).toBe(5);
    const begin = tracked(drainedBegin(bql, node));
    await settle();
    expect(begin.done()).toBe(false);
    gate.open();
    const drained = await begin.p;
    expect(reads.every((r) => r.done())).toBe(true);
    expect(node.inFlight).toBe(0);
    expect(file.inFlight).toBe(0);
    expect(blk.inFlight).toBe(0);
    drainedEnd(bql, drained);
  });

  it('holds requests submitted inside the section and restarts them in order at drainedEnd', async () => {
    bql = await acquireBql();
    const { blk, node } = await gatedDisk('d2');
    const gate = gateOf('d2-file');
    const drained = await drainedBegin(bql, node);
    const writes = Array.from({ length: 100 }, (_, i) => tracked(blkPwrite(blk, ((i * 37) % 200) * 512, new Uint8Array(512).fill(i))));
    await settle();
    expect(gate.log).toEqual([]);
    expect(writes.some((w) => w.done())).toBe(false);
    expect(blk.queued.length).toBe(100);
    drainedEnd(bql, drained);
    await Promise.all(writes.map((w) => w.p));
    expect(gate.log).toEqual(Array.from({ length: 100 }, (_, i) => `w@${((i * 37) % 200) * 512}`));
    // the last write to each sector wins: order was kept
    const back = new Uint8Array(512);
    await blkPread(blk, 0, back);
    expect(back[0]).toBe(0);
  });

  it('keeps requests queued until the last of nested sections ends', async () => {
    bql = await acquireBql();
    const { blk, node } = await gatedDisk('d3');
    const outer = await drainedBegin(bql, node);
    const inner = await drainedBegin(bql, node);
    expect(node.quiesceCounter).toBe(2);
    const w = tracked(blkPwrite(blk, 0, new Uint8Array(512).fill(9)));
    drainedEnd(bql, inner);
    await settle();
    expect(w.done()).toBe(false);
    expect(blk.quiesceCounter).toBe(1);
    drainedEnd(bql, outer);
    await w.p;
    expect(node.quiesceCounter).toBe(0);
    expect(blk.quiesceCounter).toBe(0);
  });

  it('drains while requests fail and leaves no in-flight count behind', async () => {
    bql = await acquireBql();
    const { blk, node, file } = await gatedDisk('d4');
    const gate = gateOf('d4-file');
    gate.closed = true;
    gate.failing = true;
    const reqs = Array.from({ length: 8 }, (_, i) => tracked(blkPwrite(blk, i * 512, new Uint8Array(512))));
    await settle();
    const begin = drainedBegin(bql, node);
    gate.open();
    const drained = await begin;
    const results = await Promise.allSettled(reqs.map((r) => r.p));
    expect(results.every((r) => r.status === 'rejected' && isBlockError(r.reason, 'EIO'))).toBe(true);
    expect([blk.inFlight, node.inFlight, file.inFlight]).toEqual([0, 0, 0]);
    drainedEnd(bql, drained);
  });

  it('quiesces the parents of a drained child, so the device queues its requests', async () => {
    bql = await acquireBql();
    const { blk, node, file } = await gatedDisk('d5');
    const drained = await drainedBegin(bql, file);
    expect(node.quiesceCounter).toBe(1);
    expect(blk.quiesceCounter).toBe(1);
    const r = tracked(blkPread(blk, 0, new Uint8Array(512)));
    await settle();
    expect(r.done()).toBe(false);
    drainedEnd(bql, drained);
    await r.p;
    expect(node.quiesceCounter).toBe(0);
  });

  it('drains every node with drainAllBegin and resumes them all at drainAllEnd', async () => {
    bql = await acquireBql();
    const a = await gatedDisk('d6');
    const b = await gatedDisk('d7');
    gateOf('d6-file').closed = true;
    const pending = [tracked(blkPread(a.blk, 0, new Uint8Array(512))), tracked(blkPread(b.blk, 0, new Uint8Array(512)))];
    await settle();
    const begin = tracked(drainAllBegin(bql));
    await settle();
    expect(begin.done()).toBe(false);
    gateOf('d6-file').open();
    const all = await begin.p;
    expect(pending.every((p) => p.done())).toBe(true);
    const queued = tracked(blkPwrite(b.blk, 0, new Uint8Array(512)));
    await settle();
    expect(queued.done()).toBe(false);
    drainAllEnd(bql, all);
    await queued.p;
    expect([a.node.quiesceCounter, b.node.quiesceCounter]).toEqual([0, 0]);
  });

  it('revokes the proof when the section ends, so using it again throws EPERM', async () => {
    bql = await acquireBql();
    const { node } = await gatedDisk('d8');
    const drained = await drainedBegin(bql, node);
    drainedEnd(bql, drained);
    expect(drained.live).toBe(false);
    expect(() => drainedEnd(bql, drained)).toThrow(expect.objectContaining({ code: 'EPERM' }));
    // the stale proof is refused before the driver is even asked
    await expect(bdrvSnapshotGoto(bql, drained, node, 'snap')).rejects.toMatchObject({ code: 'EPERM' });
  });
});

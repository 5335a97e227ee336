/**
 * The locking contract at run time: the types make a missing proof a compile error
 * (locking-contract.test-d.ts); these tests make sure a stale, forged or misdirected proof, which
 * the compiler cannot see, throws EPERM.
 */
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { blkDelete, blkList, blkNew } from '../src/block/backend.js';
import { acquireBql, Bql, releaseBql, withBql } from '../src/block/bql.js';
import {
  assertDrained,
  drainAllBegin,
  drainAllEnd,
  Drained,
  DrainedAll,
  drainedBegin,
  drainedEnd,
  withDrained,
} from '../src/block/drain.js';
import { BlockError } from '../src/block/errors.js';
import { attachChild, closeNode, detachChild, findNode, listNodes, openNode } from '../src/block/graph.js';
import { createIOThread, shutdownIOThreads } from '../src/block/iothread.js';
import type { BlockNode } from '../src/block/node.js';
import { bdrvSnapshotCreate, bdrvSnapshotDelete, bdrvSnapshotGoto } from '../src/block/snapshot.js';
import '../src/drivers/index.js';

const SNAP = { id: '', name: 's1', vmStateSize: 0, dateSec: 0, dateNsec: 0, vmClockNsec: 0, icount: -1 };

afterEach(async () => {
  await withBql(async (bql) => {
    for (const blk of blkList(bql)) blkDelete(bql, blk);
    for (let round = 0; round < 10 && listNodes(bql).length > 0; round++) {
      for (const node of listNodes(bql)) if (node.parents.size === 0) await closeNode(bql, node);
    }
  });
});

afterAll(async () => {
  await withBql((bql) => shutdownIOThreads(bql));
});

/** The BlockError that `fn` throws or rejects with; fails the test on anything else. */
async function blockError(fn: () => unknown): Promise<BlockError> {
  try {
    await fn();
  } catch (e) {
    expect(e).toBeInstanceOf(BlockError);
    return e as BlockError;
  }
  throw new Error('expected a BlockError, nothing was thrown');
}

/** A proof of an acquisition that has been released. */
async function staleBql(): Promise<Bql> {
  const bql = await acquireBql();
  releaseBql(bql);
  return bql;
}

describe('a stale Bql', () => {
  it('is refused by openNode, createIOThread and drainedBegin with EPERM', async () => {
    const node = await withBql((bql) => openNode(bql, 'driver=memory,size=1M,node-name=sb0'));
    const stale = await staleBql();
    const open = await blockError(() => openNode(stale, 'driver=memory,size=1M,node-name=sb1'));
    expect(open.code).toBe('EPERM');
    expect(open.message).toContain('openNode');
    const io = await blockError(() => createIOThread(stale, 'io-stale'));
    expect(io.code).toBe('EPERM');
    expect(io.message).toContain('createIOThread');
    const drain = await blockError(() => drainedBegin(stale, node));
    expect(drain.code).toBe('EPERM');
    expect(drain.message).toContain('drainedBegin');
    // none of them did anything
    expect(node.quiesceCounter).toBe(0);
    await withBql((bql) => {
      expect(listNodes(bql).map((n) => n.nodeName)).toEqual(['sb0']);
      expect(() => createIOThread(bql, 'io-stale')).not.toThrow();
    });
  });

  it('is refused with EPERM while another acquisition holds the lock', async () => {
    const stale = await staleBql();
    await withBql(async (bql) => {
      const node = await openNode(bql, 'driver=memory,size=1M');
      for (const call of [
        () => openNode(stale, 'driver=memory,size=1M'),
        () => closeNode(stale, node),
        () => findNode(stale, node.nodeName),
        () => blkNew(stale, 'dev-stale', node),
        () => drainedBegin(stale, node),
        () => drainAllBegin(stale),
      ]) {
        expect((await blockError(call)).code).toBe('EPERM');
      }
      expect(node.instance).not.toBeNull();
      expect(node.parents.size).toBe(0);
    });
  });

  it('is refused by drainedEnd, which leaves the section open', async () => {
    const stale = await staleBql();
    await withBql(async (bql) => {
      const node = await openNode(bql, 'driver=memory,size=1M');
      const d = await drainedBegin(bql, node);
      expect((await blockError(() => drainedEnd(stale, d))).code).toBe('EPERM');
      expect(d.live).toBe(true);
      expect(node.quiesceCounter).toBe(1);
      drainedEnd(bql, d);
      expect(node.quiesceCounter).toBe(0);
    });
  });
});

describe('a stale drained proof', () => {
  it('is refused by bdrvSnapshotGoto, bdrvSnapshotCreate and bdrvSnapshotDelete with EPERM', async () => {
    await withBql(async (bql) => {
      const node = await openNode(bql, 'driver=raw,file.driver=memory,file.size=1M');
      const d = await drainedBegin(bql, node);
      drainedEnd(bql, d);
      expect(d.live).toBe(false);
      const go = await blockError(() => bdrvSnapshotGoto(bql, d, node, 's1'));
      expect(go.code).toBe('EPERM');
      expect(go.message).toContain('bdrvSnapshotGoto');
      expect(go.message).toMatch(/stale/);
      expect((await blockError(() => bdrvSnapshotCreate(bql, d, node, SNAP))).code).toBe('EPERM');
      expect((await blockError(() => bdrvSnapshotDelete(bql, d, node, null, 's1'))).code).toBe('EPERM');
      // with a live proof the same call gets past the contract to the driver (no snapshot 's1')
      const live = await drainedBegin(bql, node);
      expect((await blockError(() => bdrvSnapshotGoto(bql, live, node, 's1'))).code).toBe('ENOENT');
      drainedEnd(bql, live);
    });
  });

  it('is refused by detachChild with EPERM, and the edge stays', async () => {
    await withBql(async (bql) => {
      const parent = await openNode(bql, 'driver=memory,size=1M,node-name=lp');
      const child = await openNode(bql, 'driver=memory,size=1M,node-name=lc');
      const edge = attachChild(bql, parent, 'data', child);
      const d = await drainedBegin(bql, parent);
      drainedEnd(bql, d);
      const err = await blockError(() => detachChild(bql, d, edge));
      expect(err.code).toBe('EPERM');
      expect(err.message).toContain('detachChild');
      expect(parent.children).toEqual([edge]);
      expect(child.parents.has(edge)).toBe(true);
    });
  });

  it('is refused by a second drainedEnd with EPERM, without unbalancing the counters', async () => {
    await withBql(async (bql) => {
      const node = await openNode(bql, 'driver=memory,size=1M');
      const outer = await drainedBegin(bql, node);
      const inner = await drainedBegin(bql, node);
      drainedEnd(bql, inner);
      expect((await blockError(() => drainedEnd(bql, inner))).code).toBe('EPERM');
      expect(node.quiesceCounter).toBe(1);
      drainedEnd(bql, outer);
      expect(node.quiesceCounter).toBe(0);
    });
  });

  it('from drain-all is refused once the section ended', async () => {
    await withBql(async (bql) => {
      const node = await openNode(bql, 'driver=raw,file.driver=memory,file.size=1M');
      const all = await drainAllBegin(bql);
      expect(() => assertDrained(bql, all, node, 'test')).not.toThrow();
      drainAllEnd(bql, all);
      const err = await blockError(() => bdrvSnapshotGoto(bql, all, node, 's1'));
      expect(err.code).toBe('EPERM');
      expect(err.message).toContain('all nodes');
      expect((await blockError(() => drainAllEnd(bql, all))).code).toBe('EPERM');
    });
  });
});

describe('a forged drained proof', () => {
  it('made as a look-alike object is refused with EPERM', async () => {
    await withBql(async (bql) => {
      const node = await openNode(bql, 'driver=raw,file.driver=memory,file.size=1M');
      const forged = { live: true, node, revoke() {} } as unknown as Drained;
      const err = await blockError(() => bdrvSnapshotGoto(bql, forged, node, 's1'));
      expect(err.code).toBe('EPERM');
      expect(err.message).toMatch(/forged/);
      expect((await blockError(() => assertDrained(bql, forged, node, 'test'))).code).toBe('EPERM');
    });
  });

  it('made as a Bql is refused with EPERM', async () => {
    await withBql(async (bql) => {
      const node = await openNode(bql, 'driver=memory,size=1M');
      const forged = bql as unknown as Drained;
      expect((await blockError(() => assertDrained(bql, forged, node, 'test'))).code).toBe('EPERM');
    });
  });

  // Regression (was a bug, now fixed) (src/block/drain.ts:173-177, assertLiveProof): the forgery check is `instanceof Drained`,
  // which an object made with Object.create(Drained.prototype) passes; the next line reads
  // `proof.live`, whose getter reads the private `#live` the object does not have, so a TypeError
  // ("Cannot read private member #live ...") escapes instead of the documented BlockError EPERM.
  // A brand check (`#live in proof`, or a WeakSet of minted proofs) would fix it.
  it('made with Object.create(Drained.prototype) is refused with EPERM', async () => {
    await withBql(async (bql) => {
      const node = await openNode(bql, 'driver=raw,file.driver=memory,file.size=1M');
      const forged = Object.create(Drained.prototype) as Drained;
      const err = await blockError(() => bdrvSnapshotGoto(bql, forged, node, 's1'));
      expect(err.code).toBe('EPERM');
    });
  });

  // Regression (was a bug, now fixed): same as above, for DrainedAll (src/block/drain.ts:174, `instanceof DrainedAll`).
  it('made with Object.create(DrainedAll.prototype) is refused with EPERM', async () => {
    await withBql(async (bql) => {
      const node = await openNode(bql, 'driver=memory,size=1M');
      const forged = Object.create(DrainedAll.prototype) as DrainedAll;
      const err = await blockError(() => assertDrained(bql, forged, node, 'test'));
      expect(err.code).toBe('EPERM');
    });
  });

  // Regression (was a bug, now fixed) (src/block/bql.ts:124): a Bql forged with Object.create(Bql.prototype) gets a TypeError
  // out of assertBql instead of EPERM, for the same reason.
  it('a Bql made with Object.create(Bql.prototype) is refused by openNode with EPERM', async () => {
    const forged = Object.create(Bql.prototype) as Bql;
    const err = await blockError(() => openNode(forged, 'driver=memory,size=1M'));
    expect(err.code).toBe('EPERM');
  });
});

describe('a drained proof for another node', () => {
  it('is refused with EPERM when the nodes are unrelated', async () => {
    await withBql(async (bql) => {
      const a = await openNode(bql, 'driver=raw,node-name=na,file.driver=memory,file.size=1M');
      const b = await openNode(bql, 'driver=raw,node-name=nb,file.driver=memory,file.size=1M');
      const other = await openNode(bql, 'driver=memory,size=1M,node-name=nother');
      const edge = attachChild(bql, b, 'data', other);
      await withDrained(bql, a, async (dA) => {
        const go = await blockError(() => bdrvSnapshotGoto(bql, dA, b, 's1'));
        expect(go.code).toBe('EPERM');
        expect(go.message).toContain("'nb'");
        expect(go.message).toContain("'na'");
        expect((await blockError(() => bdrvSnapshotCreate(bql, dA, b, SNAP))).code).toBe('EPERM');
        expect((await blockError(() => detachChild(bql, dA, edge))).code).toBe('EPERM');
        expect((await blockError(() => assertDrained(bql, dA, b, 'test'))).code).toBe('EPERM');
        expect((await blockError(() => assertDrained(bql, dA, b.file as BlockNode, 'test'))).code).toBe('EPERM');
      });
      expect(b.children).toContain(edge);
    });
  });

  it('does not cover the parent of the drained node', async () => {
    await withBql(async (bql) => {
      const raw = await openNode(bql, 'driver=raw,file.driver=memory,file.size=1M');
      await withDrained(bql, raw.file as BlockNode, async (dFile) => {
        expect((await blockError(() => assertDrained(bql, dFile, raw, 'test'))).code).toBe('EPERM');
      });
    });
  });

  it('does not cover a child that another, undrained parent also uses', async () => {
    await withBql(async (bql) => {
      const p1 = await openNode(bql, 'driver=memory,size=1M');
      const p2 = await openNode(bql, 'driver=memory,size=1M');
      const shared = await openNode(bql, 'driver=memory,size=1M');
      attachChild(bql, p1, 'data', shared);
      attachChild(bql, p2, 'data', shared);
      await withDrained(bql, p1, async (d1) => {
        expect((await blockError(() => assertDrained(bql, d1, shared, 'test'))).code).toBe('EPERM');
      });
    });
  });

  it('does not cover a child that a backend also uses', async () => {
    await withBql(async (bql) => {
      const raw = await openNode(bql, 'driver=raw,file.driver=memory,file.size=1M');
      const file = raw.file as BlockNode;
      blkNew(bql, 'direct-dev', file);
      await withDrained(bql, raw, async (d) => {
        expect((await blockError(() => assertDrained(bql, d, file, 'test'))).code).toBe('EPERM');
      });
    });
  });
});

describe('a drained proof for a raw node', () => {
  it('covers its file child', async () => {
    await withBql(async (bql) => {
      const raw = await openNode(bql, 'driver=raw,file.driver=memory,file.size=1M');
      const file = raw.file as BlockNode;
      await withDrained(bql, raw, (d) => {
        expect(() => assertDrained(bql, d, raw, 'test')).not.toThrow();
        expect(() => assertDrained(bql, d, file, 'test')).not.toThrow();
      });
    });
  });

  it('lets the snapshot call reach the file child through the raw fallback', async () => {
    await withBql(async (bql) => {
      const raw = await openNode(bql, 'driver=raw,node-name=fb,file.driver=memory,file.size=1M');
      await withDrained(bql, raw, async (d) => {
        // the contract check passed, then the memory node (through raw's fallback) found no 's1'
        const err = await blockError(() => bdrvSnapshotGoto(bql, d, raw, 's1'));
        expect(err.code).toBe('ENOENT');
        expect(err.message).toContain(`memory node '${raw.file?.nodeName ?? ''}'`); // the child answered
      });
    });
  });
});

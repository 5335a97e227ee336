/**
 * The request gate (src/block/request-gate.ts) at run time: a node-level request to a drained
 * node that neither the section's owner nor a parent's in-flight request made waits until the
 * section ends; the owner's own I/O (snapshot operations, createQcow2OnNode, withDrained's
 * callback) and nested requests go through; and the block layer's sealed driver callbacks refuse
 * another node's proof (the file driver's close used to close a descriptor still in use).
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { blkDelete, blkList, blkNew, blkPread } from '../src/block/backend.js';
import { acquireBql, releaseBql, withBql, withBqlSync, type Bql } from '../src/block/bql.js';
import { drainAllBegin, drainAllEnd, drainedBegin, drainedEnd, runInDrainedSection, withDrained } from '../src/block/drain.js';
import { registerDriver, type BlockDriverInstance } from '../src/block/driver.js';
import { BlockError } from '../src/block/errors.js';
import { closeNode, listNodes, openNode } from '../src/block/graph.js';
import { bdrvFlush, bdrvPread, bdrvPwrite, bdrvTruncate } from '../src/block/io.js';
import { shutdownIOThreads } from '../src/block/iothread.js';
import type { BlockNode } from '../src/block/node.js';
import { gateWaiting } from '../src/block/request-gate.js';
import { bdrvSnapshotCreate, bdrvSnapshotList } from '../src/block/snapshot.js';
import '../src/drivers/index.js';
import { memoryDriver } from '../src/drivers/memory.js';
import { createQcow2File, createQcow2OnNode } from '../src/drivers/qcow2/create.js';
import { rawDriver } from '../src/drivers/raw.js';
import { gateOf, settle } from './helpers/gated-driver.js';

const SNAP = { id: '', name: 's1', vmStateSize: 0, dateSec: 0, dateNsec: 0, vmClockNsec: 0, icount: -1 };
let dir = '';

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-gate-'));
});

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
  if (dir !== '') fs.rmSync(dir, { recursive: true, force: true });
});

function tracked<T>(p: Promise<T>): { p: Promise<T>; done: () => boolean } {
  let finished = false;
  const q = p.finally(() => {
    finished = true;
  });
  q.catch(() => {});
  return { p: q, done: () => finished };
}

async function blockError(fn: () => unknown): Promise<BlockError> {
  try {
    await fn();
  } catch (e) {
    expect(e).toBeInstanceOf(BlockError);
    return e as BlockError;
  }
  throw new Error('expected a BlockError, nothing was thrown');
}

async function rawOverGated(bql: Bql, name: string): Promise<{ raw: BlockNode; file: BlockNode }> {
  const raw = await openNode(bql, `driver=raw,node-name=${name},file.driver=gated,file.node-name=${name}-file,file.size=1M`);
  const file = raw.file;
  if (file === undefined) throw new Error('raw node without a file child');
  return { raw, file };
}

describe('a stray node-level request to a drained node', () => {
  it('waits while the section is held, in arrival order, and runs after drainedEnd', async () => {
    const bql = await acquireBql();
    try {
      const { raw, file } = await rawOverGated(bql, 'st1');
      const gate = gateOf('st1-file');
      const d = await drainedBegin(bql, raw);
      // the drained node itself and its file child (covered: reached only through it)
      const strays = [
        tracked(bdrvPwrite(file, 0, new Uint8Array(512).fill(1))),
        tracked(bdrvPwrite(raw, 512, new Uint8Array(512).fill(2))),
        tracked(bdrvPread(file, 0, new Uint8Array(512))),
        tracked(bdrvFlush(raw)),
        tracked(bdrvPwrite(file, 1024, new Uint8Array(512).fill(3))),
      ];
      await settle();
      expect(gate.log).toEqual([]);
      expect(strays.some((s) => s.done())).toBe(false);
      expect(gateWaiting(file)).toBe(3);
      expect(gateWaiting(raw)).toBe(2);
      expect(file.inFlight + raw.inFlight).toBe(0);
      drainedEnd(bql, d);
      await Promise.all(strays.map((s) => s.p));
      expect(gate.log.filter((e) => e.startsWith('w@'))).toEqual(['w@0', 'w@512', 'w@1024']);
      expect(gateWaiting(file) + gateWaiting(raw)).toBe(0);
    } finally {
      releaseBql(bql);
    }
  });

  it('waits for a drain-all section too, and a request released into a new section waits again', async () => {
    const bql = await acquireBql();
    try {
      const node = await openNode(bql, 'driver=memory,size=1M,node-name=st2');
      const all = await drainAllBegin(bql);
      const stray = tracked(bdrvTruncate(node, 4096));
      await settle();
      expect(stray.done()).toBe(false);
      drainAllEnd(bql, all);
      // a section begun before the released request ran holds it once more
      const d = await drainedBegin(bql, node);
      await settle();
      expect(stray.done()).toBe(false);
      expect(node.drv.getLength()).toBe(1024 * 1024);
      drainedEnd(bql, d);
      await stray.p;
      expect(node.drv.getLength()).toBe(4096);
    } finally {
      releaseBql(bql);
    }
  });

  it('waits while the owner snapshots the qcow2 node, then sees the finished snapshot', async () => {
    const f = path.join(dir, 'owner.qcow2');
    withBqlSync((bql) => createQcow2File(bql, f, { sizeBytes: 4 * 1024 * 1024 }));
    const bql = await acquireBql();
    try {
      const q = await openNode(bql, `driver=qcow2,file=${f},node-name=stq`);
      const file = q.file as BlockNode;
      const d = await drainedBegin(bql, q);
      // a reader outside the section: the header's nb_snapshots field (offset 60)
      const header = new Uint8Array(72);
      const stray = tracked(bdrvPread(file, 0, header));
      // the owner works on the node through its own code (writes through the file child)
      const sn = await bdrvSnapshotCreate(bql, d, q, SNAP);
      expect(sn.name).toBe('s1');
      await settle();
      expect(stray.done()).toBe(false);
      drainedEnd(bql, d);
      await stray.p;
      expect(new DataView(header.buffer).getUint32(60)).toBe(1);
      expect((await bdrvSnapshotList(bql, q)).map((s) => s.name)).toEqual(['s1']);
    } finally {
      releaseBql(bql);
    }
  });
});

describe('a node opened inside an imperative drain-all section', () => {
  it('reads its own header (the open owns the new nodes) while a stray request to it waits', async () => {
    const f = path.join(dir, 'opened-in-drain-all.qcow2');
    withBqlSync((bql) => createQcow2File(bql, f, { sizeBytes: 1024 * 1024 }));
    const bql = await acquireBql();
    try {
      const all = await drainAllBegin(bql);
      let stray: { p: Promise<void>; done: () => boolean } | null = null;
      try {
        // probing and the qcow2 open read the file child, which starts quiesced: not stray
        const q = await openNode(bql, `file=${f},node-name=oda`);
        expect(q.driver.formatName).toBe('qcow2');
        expect(q.quiesceCounter).toBeGreaterThan(0);
        stray = tracked(bdrvPread(q, 0, new Uint8Array(512)));
        await settle();
        expect(stray.done()).toBe(false);
      } finally {
        drainAllEnd(bql, all);
      }
      await stray.p;
    } finally {
      releaseBql(bql);
    }
  });

  it('a stray request waiting for a node that closes meanwhile fails with ENOMEDIUM instead of hanging', async () => {
    await withBql(async (bql) => {
      const m = await openNode(bql, 'driver=memory,size=1M,node-name=gone');
      const d = await drainedBegin(bql, m);
      const stray = tracked(bdrvPwrite(m, 0, new Uint8Array(512)));
      await settle();
      expect(stray.done()).toBe(false);
      drainedEnd(bql, d);
      await closeNode(bql, m);
      const err = await blockError(() => stray.p);
      expect(err.code).toBe('ENOMEDIUM');
    });
  });
});

describe("the section's owner", () => {
  it('does node-level I/O on the drained node and its file child inside withDrained', async () => {
    await withBql(async (bql) => {
      const { raw, file } = await rawOverGated(bql, 'ow1');
      const back = new Uint8Array(512);
      await withDrained(bql, raw, async () => {
        await bdrvPwrite(raw, 0, new Uint8Array(512).fill(7));
        await bdrvPread(file, 0, back);
      });
      expect(back[0]).toBe(7);
    });
  });

  it('of an imperative section does its I/O through runInDrainedSection; the scope ends with its proof', async () => {
    await withBql(async (bql) => {
      const { raw } = await rawOverGated(bql, 'ow2');
      const d = await drainedBegin(bql, raw);
      await runInDrainedSection(bql, d, () => bdrvPwrite(raw, 0, new Uint8Array(512).fill(9)));
      drainedEnd(bql, d);
      expect((await blockError(() => runInDrainedSection(bql, d, () => undefined))).code).toBe('EPERM');
    });
  });

  it('of another node does not get in: a proof for A does not admit requests to B', async () => {
    await withBql(async (bql) => {
      const a = await openNode(bql, 'driver=memory,size=1M,node-name=owA');
      const b = await openNode(bql, 'driver=memory,size=1M,node-name=owB');
      const dB = await drainedBegin(bql, b);
      let stray: ReturnType<typeof tracked<void>> | null = null;
      await withDrained(bql, a, async () => {
        await bdrvPwrite(a, 0, new Uint8Array(16));
        stray = tracked(bdrvPwrite(b, 0, new Uint8Array(16).fill(5)));
        await settle();
        expect(stray.done()).toBe(false);
      });
      drainedEnd(bql, dB);
      await (stray as unknown as { p: Promise<void> }).p;
    });
  });

  it('formats a node with createQcow2OnNode only with a live proof that covers it', async () => {
    await withBql(async (bql) => {
      const m = await openNode(bql, 'driver=memory,size=4M,node-name=fmt');
      const other = await openNode(bql, 'driver=memory,size=1M,node-name=fmt-other');
      const create = { sizeBytes: 1024 * 1024 };
      await withDrained(bql, other, async (dOther) => {
        const err = await blockError(() => createQcow2OnNode(bql, dOther, m, create));
        expect(err.code).toBe('EPERM');
        expect(err.message).toContain("'fmt'");
      });
      const stale = await drainedBegin(bql, m);
      drainedEnd(bql, stale);
      expect((await blockError(() => createQcow2OnNode(bql, stale, m, create))).code).toBe('EPERM');
      const magic = new Uint8Array(4);
      await bdrvPread(m, 0, magic);
      expect([...magic]).toEqual([0, 0, 0, 0]); // nothing was written
      await withDrained(bql, m, (d) => createQcow2OnNode(bql, d, m, create));
      await bdrvPread(m, 0, magic);
      expect([...magic]).toEqual([0x51, 0x46, 0x49, 0xfb]);
    });
  });
});

/**
 * A format driver whose reads wait for `release` before they read the child (a request in flight
 * in the parent), and whose close ignores its proofs and counts its calls.
 */
let release: () => void = () => {};
let twoStepCloses = 0;
registerDriver({
  formatName: 'two-step',
  kind: 'format',
  /** @locking global-state */
  async open(_bql, node): Promise<BlockDriverInstance> {
    const file = node.file as BlockNode;
    return {
      async preadv(offset: number, buf: Uint8Array): Promise<void> {
        await new Promise<void>((r) => (release = r));
        await bdrvPread(file, offset, buf);
      },
      pwritev: (offset: number, buf: Uint8Array) => bdrvPwrite(file, offset, buf),
      pwriteZeroes: async () => {},
      pdiscard: async () => {},
      flush: () => bdrvFlush(file),
      getLength: () => file.drv.getLength(),
      truncate: async () => {},
      close: async () => {
        twoStepCloses++;
      },
    };
  },
});

describe('a nested request', () => {
  it("made for a parent's request in flight reaches the drained child, so the drain can finish", async () => {
    await withBql(async (bql) => {
      const top = await openNode(bql, 'driver=two-step,node-name=ns,file.driver=memory,file.size=1M,file.node-name=ns-file');
      const file = top.file as BlockNode;
      await bdrvPwrite(file, 0, new Uint8Array(512).fill(4));
      const blk = blkNew(bql, 'ns-dev', top);
      const buf = new Uint8Array(512);
      const read = tracked(blkPread(blk, 0, buf));
      await settle();
      expect(top.inFlight).toBe(1);
      // drain the child: the parent is quiesced and its request must be let through to finish
      const begin = tracked(drainedBegin(bql, file));
      await settle();
      expect(begin.done()).toBe(false);
      release();
      const d = await begin.p;
      expect(read.done()).toBe(true);
      expect(buf[0]).toBe(4);
      drainedEnd(bql, d);
    });
  });
});

describe('proof-taking driver callbacks, sealed by the block layer', () => {
  it("refuse another node's proof for the file driver's close, and the descriptor stays in use", async () => {
    const fa = path.join(dir, 'a.raw');
    const fb = path.join(dir, 'b.raw');
    fs.writeFileSync(fa, Buffer.alloc(65536, 1));
    fs.writeFileSync(fb, Buffer.alloc(65536, 2));
    await withBql(async (bql) => {
      const a = await openNode(bql, `driver=file,filename=${fa},node-name=fa,aio=sync`);
      const b = await openNode(bql, `driver=file,filename=${fb},node-name=fb,aio=sync`);
      const instB = b.instance as BlockDriverInstance;
      await withDrained(bql, a, async (dA) => {
        const err = await blockError(() => instB.close(bql, dA));
        expect(err.code).toBe('EPERM');
        expect(err.message).toContain("'fb'");
        expect(err.message).toContain("'fa'");
      });
      // b's descriptor was not closed: it still reads its own bytes
      const buf = new Uint8Array(512);
      await bdrvPread(b, 0, buf);
      expect(buf.every((x) => x === 2)).toBe(true);
    });
  });

  it("refuse another node's proof before a driver whose close ignores its proofs runs at all", async () => {
    await withBql(async (bql) => {
      const top = await openNode(bql, 'driver=two-step,node-name=ig,file.driver=memory,file.size=1M');
      const other = await openNode(bql, 'driver=memory,size=1M,node-name=ig-other');
      const before = twoStepCloses;
      await withDrained(bql, other, async (dOther) => {
        const err = await blockError(() => (top.instance as BlockDriverInstance).close(bql, dOther));
        expect(err.code).toBe('EPERM');
        expect(err.message).toMatch(/^close \(node 'ig'\): node 'ig' is not covered by the drained section of 'ig-other'/);
      });
      expect(twoStepCloses).toBe(before);
      // its own live proof does not do either: only closeNode closes (and unlinks) a node
      await withDrained(bql, top, async (dTop) => {
        const err = await blockError(() => (top.instance as BlockDriverInstance).close(bql, dTop));
        expect(err.code).toBe('EPERM');
        expect(err.message).toContain('only closeNode');
      });
      expect(twoStepCloses).toBe(before);
      await closeNode(bql, top);
      expect(twoStepCloses).toBe(before + 1);
    });
  });

  it('refuse a stale proof and a stale Bql in memory and raw close, snapshot calls and open', async () => {
    const stale = await acquireBql();
    releaseBql(stale);
    await withBql(async (bql) => {
      const raw = await openNode(bql, 'driver=raw,node-name=sr,file.driver=memory,file.size=1M,file.node-name=sr-file');
      const file = raw.file as BlockNode;
      const d = await drainedBegin(bql, raw);
      drainedEnd(bql, d);
      expect((await blockError(() => (raw.instance as BlockDriverInstance).close(bql, d))).code).toBe('EPERM');
      expect((await blockError(() => (file.instance as BlockDriverInstance).close(bql, d))).code).toBe('EPERM');
      const inst = file.instance as BlockDriverInstance;
      await withDrained(bql, raw, async (live) => {
        expect((await blockError(() => inst.snapshotCreate?.(stale, live, SNAP))).code).toBe('EPERM');
      });
      expect((await blockError(() => inst.snapshotList?.(stale))).code).toBe('EPERM');
      expect(raw.instance).not.toBeNull();
      expect(file.instance).not.toBeNull();
      expect((await blockError(() => memoryDriver.open(stale, file, { size: '1M' }))).code).toBe('EPERM');
      expect((await blockError(() => rawDriver.open(stale, raw, {}))).code).toBe('EPERM');
    });
  });
});

describe('global state outside the types', () => {
  it('node counters, parents and children cannot be changed by assignment or a cast', async () => {
    await withBql(async (bql) => {
      const raw = await openNode(bql, 'driver=raw,node-name=ro,file.driver=memory,file.size=1M');
      const file = raw.file as BlockNode;
      expect(Reflect.set(raw, 'inFlight', 5)).toBe(false);
      expect(Reflect.set(raw, 'quiesceCounter', 3)).toBe(false);
      expect(Reflect.set(raw, 'instance', null)).toBe(false);
      expect([raw.inFlight, raw.quiesceCounter]).toEqual([0, 0]);
      expect(raw.instance).not.toBeNull();
      expect(typeof (file.parents as unknown as { add?: unknown }).add).toBe('undefined');
      expect(typeof (file.parents as unknown as { delete?: unknown }).delete).toBe('undefined');
      expect(() => (raw.children as unknown as unknown[]).push(1)).toThrow(TypeError);
      expect(raw.children).toHaveLength(1);
      expect(file.parents.size).toBe(1);
    });
  });

  it('shutdownIOThreads refuses a stale Bql and withBqlSync refuses while the lock is held', async () => {
    const stale = await acquireBql();
    releaseBql(stale);
    expect((await blockError(() => shutdownIOThreads(stale))).code).toBe('EPERM');
    await withBql(async () => {
      const err = await blockError(() => withBqlSync(() => 1));
      expect(err.code).toBe('EBUSY');
      expect(err.message).toMatch(/acquisition #\d+/);
    });
    expect(withBqlSync(() => 42)).toBe(42);
  });
});

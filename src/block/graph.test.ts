import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { gateOf, settle } from '../../test/helpers/gated-driver.js';
import '../drivers/index.js';
import { createRawFile } from '../drivers/index.js';
import { blkDelete, blkList, blkNew } from './backend.js';
import { withBql, withBqlSync, type Bql } from './bql.js';
import { drainedBegin, drainedEnd, withDrained } from './drain.js';
import { BlockError } from './errors.js';
import { attachChild, closeNode, detachChild, findNode, listNodes, openNode } from './graph.js';
import { bdrvPread, bdrvPwrite } from './io.js';
import { createIOThread, shutdownIOThreads } from './iothread.js';
import type { BlockNode } from './node.js';
import { formatInfoBlock, queryBlock, queryNamedBlockNodes } from './query.js';

let dir: string;

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-graph-'));
});

/** Deletes every backend and closes every node, parents first, so each test starts from an empty graph. */
afterEach(async () => {
  await withBql(async (bql) => {
    for (const blk of blkList(bql)) blkDelete(bql, blk);
    for (let round = 0; round < 100 && listNodes(bql).length > 0; round++) {
      for (const node of listNodes(bql)) if (node.parents.size === 0) await closeNode(bql, node);
    }
    expect(listNodes(bql)).toEqual([]);
  });
});

afterAll(async () => {
  await withBql((bql) => shutdownIOThreads(bql));
  fs.rmSync(dir, { recursive: true, force: true });
});

async function rejection(p: Promise<unknown> | (() => unknown)): Promise<BlockError> {
  try {
    await (typeof p === 'function' ? p() : p);
  } catch (e) {
    expect(e).toBeInstanceOf(BlockError);
    return e as BlockError;
  }
  throw new Error('expected a BlockError');
}

function names(bql: Bql): string[] {
  return listNodes(bql).map((n) => n.nodeName);
}

function mem(name: string): string {
  return `driver=memory,size=1M,node-name=${name}`;
}

describe('node names', () => {
  it('gives a node the node-name it was asked for and finds it by that name', async () => {
    await withBql(async (bql) => {
      const node = await openNode(bql, mem('disk-0.a_b'));
      expect(node.nodeName).toBe('disk-0.a_b');
      expect(findNode(bql, 'disk-0.a_b')).toBe(node);
      expect(names(bql)).toEqual(['disk-0.a_b']);
    });
  });

  it('accepts a node-name of 128 characters and refuses one of 129', async () => {
    await withBql(async (bql) => {
      const long = `n${'x'.repeat(127)}`;
      expect((await openNode(bql, mem(long))).nodeName).toBe(long);
      const err = await rejection(openNode(bql, mem(`${long}y`)));
      expect(err.code).toBe('EINVAL');
      expect(err.field).toBe('node-name');
    });
  });

  it('refuses invalid node-names with EINVAL naming the value', async () => {
    await withBql(async (bql) => {
      for (const bad of ['1disk', '-a', '_a', '.a', 'a b', 'a/b', 'a:b', '#block001', 'é', '']) {
        const err = await rejection(openNode(bql, { driver: 'memory', size: '1M', 'node-name': bad }));
        expect(err.code).toBe('EINVAL');
        expect(err.field).toBe('node-name');
        expect(err.message).toContain(`'${bad}'`);
      }
      expect(names(bql)).toEqual([]);
    });
  });

  it('refuses a duplicate node-name with EINVAL and keeps the first node', async () => {
    await withBql(async (bql) => {
      const first = await openNode(bql, mem('dup'));
      const err = await rejection(openNode(bql, mem('dup')));
      expect(err.code).toBe('EINVAL');
      expect(err.message).toContain("'dup'");
      expect(findNode(bql, 'dup')).toBe(first);
      expect(first.instance).not.toBeNull();
      expect(names(bql)).toEqual(['dup']);
    });
  });

  it('refuses a format node named like its own file child and closes the child again', async () => {
    await withBql(async (bql) => {
      const err = await rejection(openNode(bql, 'driver=raw,node-name=same,file.driver=memory,file.size=1M,file.node-name=same'));
      expect(err.code).toBe('EINVAL');
      expect(names(bql)).toEqual([]);
    });
  });

  it('names nodes without a node-name #blockNNN, each differently', async () => {
    await withBql(async (bql) => {
      const a = await openNode(bql, 'driver=memory,size=1M');
      const b = await openNode(bql, 'driver=memory,size=1M');
      const raw = await openNode(bql, 'driver=raw,file.driver=memory,file.size=1M');
      for (const n of [a, b, raw, raw.file as BlockNode]) expect(n.nodeName).toMatch(/^#block\d{3,}$/);
      const all = new Set([a, b, raw, raw.file as BlockNode].map((n) => n.nodeName));
      expect(all.size).toBe(4);
      expect(findNode(bql, a.nodeName)).toBe(a);
    });
  });

  it('refuses to find a node that does not exist with ENOENT', async () => {
    await withBql(async (bql) => {
      const err = await rejection(() => findNode(bql, 'ghost'));
      expect(err.code).toBe('ENOENT');
      expect(err.message).toContain("'ghost'");
    });
  });
});

describe('attachChild and detachChild', () => {
  it('links a child under a parent in both directions', async () => {
    await withBql(async (bql) => {
      const p = await openNode(bql, mem('p'));
      const c = await openNode(bql, mem('c'));
      const edge = attachChild(bql, p, 'data', c);
      expect(edge.parent).toBe(p);
      expect(edge.child).toBe(c);
      expect(edge.role).toBe('data');
      expect(p.children).toEqual([edge]);
      expect([...c.parents]).toEqual([edge]);
      expect(edge.parentName).toBe('p');
    });
  });

  it('refuses to make a node its own child with EINVAL', async () => {
    await withBql(async (bql) => {
      const a = await openNode(bql, mem('self'));
      const err = await rejection(() => attachChild(bql, a, 'data', a));
      expect(err.code).toBe('EINVAL');
      expect(err.message).toContain("'self'");
      expect(a.children).toEqual([]);
      expect(a.parents.size).toBe(0);
    });
  });

  it('refuses an edge that would close a cycle with EINVAL and leaves the graph unchanged', async () => {
    await withBql(async (bql) => {
      const a = await openNode(bql, mem('ca'));
      const b = await openNode(bql, mem('cb'));
      const c = await openNode(bql, mem('cc'));
      attachChild(bql, a, 'data', b);
      attachChild(bql, b, 'data', c);
      const direct = await rejection(() => attachChild(bql, b, 'data', a));
      expect(direct.code).toBe('EINVAL');
      expect(direct.message).toMatch(/cycle/);
      const indirect = await rejection(() => attachChild(bql, c, 'data', a));
      expect(indirect.code).toBe('EINVAL');
      expect(indirect.message).toMatch(/cycle/);
      expect(a.parents.size).toBe(0);
      expect(c.children).toEqual([]);
      expect(b.children.length).toBe(1);
    });
  });

  it('allows a diamond (a shared child is not a cycle)', async () => {
    await withBql(async (bql) => {
      const top = await openNode(bql, mem('top'));
      const left = await openNode(bql, mem('left'));
      const right = await openNode(bql, mem('right'));
      const bottom = await openNode(bql, mem('bottom'));
      attachChild(bql, top, 'data', left);
      attachChild(bql, top, 'data', right);
      attachChild(bql, left, 'data', bottom);
      attachChild(bql, right, 'data', bottom);
      expect(bottom.parents.size).toBe(2);
    });
  });

  it("refuses a second 'file' child with EINVAL", async () => {
    await withBql(async (bql) => {
      const raw = await openNode(bql, 'driver=raw,node-name=r2,file.driver=memory,file.size=1M');
      const other = await openNode(bql, mem('other'));
      const err = await rejection(() => attachChild(bql, raw, 'file', other));
      expect(err.code).toBe('EINVAL');
      expect(err.field).toBe('file');
      expect(other.parents.size).toBe(0);
    });
  });

  it('quiesces a new parent of a drained child and releases it on detach', async () => {
    await withBql(async (bql) => {
      const p = await openNode(bql, mem('qp'));
      const c = await openNode(bql, mem('qc'));
      const d = await drainedBegin(bql, c);
      const edge = attachChild(bql, p, 'data', c);
      expect(p.quiesceCounter).toBe(1);
      await withDrained(bql, p, (dp) => detachChild(bql, dp, edge));
      expect(p.quiesceCounter).toBe(0);
      expect(c.parents.size).toBe(0);
      drainedEnd(bql, d);
      expect(c.quiesceCounter).toBe(0);
    });
  });

  it('unlinks an edge under a drained section of the parent', async () => {
    await withBql(async (bql) => {
      const p = await openNode(bql, mem('dp'));
      const c = await openNode(bql, mem('dc'));
      const edge = attachChild(bql, p, 'data', c);
      await withDrained(bql, p, (d) => detachChild(bql, d, edge));
      expect(p.children).toEqual([]);
      expect(c.parents.size).toBe(0);
      const again = await rejection(withDrained(bql, p, (d) => detachChild(bql, d, edge)));
      expect(again.code).toBe('ENOENT');
    });
  });
});

describe('closeNode', () => {
  it('refuses to close a node used by a parent node with EBUSY naming the parent', async () => {
    await withBql(async (bql) => {
      const raw = await openNode(bql, 'driver=raw,node-name=user,file.driver=memory,file.node-name=used,file.size=1M');
      const file = raw.file as BlockNode;
      const err = await rejection(closeNode(bql, file));
      expect(err.code).toBe('EBUSY');
      expect(err.message).toContain("'used'");
      expect(err.message).toContain("'user'");
      expect(err.node).toBe('used');
      // nothing was closed
      expect(file.instance).not.toBeNull();
      expect(names(bql)).toEqual(['used', 'user']);
    });
    const raw = await withBql((bql) => findNode(bql, 'user'));
    await bdrvPwrite(raw, 0, new Uint8Array(512).fill(1));
  });

  it('refuses to close a node used by a backend with EBUSY naming the device', async () => {
    await withBql(async (bql) => {
      const node = await openNode(bql, mem('withdev'));
      const blk = blkNew(bql, 'dev-busy', node);
      const err = await rejection(closeNode(bql, node));
      expect(err.code).toBe('EBUSY');
      expect(err.message).toContain("'dev-busy'");
      blkDelete(bql, blk);
      await closeNode(bql, node);
      expect(names(bql)).toEqual([]);
    });
  });

  it('closes the driver and forgets the node', async () => {
    await withBql(async (bql) => {
      const node = await openNode(bql, mem('gone'));
      await closeNode(bql, node);
      expect(node.instance).toBeNull();
      expect(names(bql)).toEqual([]);
      expect((await rejection(() => findNode(bql, 'gone'))).code).toBe('ENOENT');
      // closing again is harmless
      await closeNode(bql, node);
    });
  });

  it('closes children left without a parent and keeps children still in use', async () => {
    await withBql(async (bql) => {
      const a = await openNode(bql, mem('pa'));
      const b = await openNode(bql, mem('pb'));
      const only = await openNode(bql, mem('only-a'));
      const shared = await openNode(bql, mem('shared'));
      attachChild(bql, a, 'data', only);
      attachChild(bql, a, 'data', shared);
      attachChild(bql, b, 'data', shared);
      await closeNode(bql, a);
      expect(a.instance).toBeNull();
      expect(only.instance).toBeNull();
      expect(shared.instance).not.toBeNull();
      expect([...shared.parents].map((p) => p.parentName)).toEqual(['pb']);
      expect(names(bql)).toEqual(['pb', 'shared']);
      await closeNode(bql, b);
      expect(shared.instance).toBeNull();
      expect(names(bql)).toEqual([]);
    });
  });

  it('closes the file child of a raw node, recursively down a chain', async () => {
    await withBql(async (bql) => {
      const raw = await openNode(bql, 'driver=raw,node-name=outer,file.driver=memory,file.node-name=inner,file.size=1M');
      const inner = raw.file as BlockNode;
      await closeNode(bql, raw);
      expect(inner.instance).toBeNull();
      expect(inner.parents.size).toBe(0);
      expect(names(bql)).toEqual([]);
    });
  });
});

describe('iothread binding', () => {
  it('binds a node and its file child to the IOThread named by iothread=', async () => {
    const p = path.join(dir, 'io.img');
    withBqlSync((bql) => createRawFile(bql, p, 65536));
    const node = await withBql(async (bql) => {
      const t = createIOThread(bql, 'io-graph');
      const n = await openNode(bql, `file=${p},format=raw,node-name=bound,iothread=io-graph`);
      expect(n.ioThread).toBe(t);
      expect(n.file?.ioThread).toBe(t);
      return n;
    });
    const data = new Uint8Array(4096).fill(0x5a);
    await bdrvPwrite(node, 4096, data);
    const back = new Uint8Array(4096);
    await bdrvPread(node, 4096, back);
    expect(back).toEqual(data);
    expect(new Uint8Array(fs.readFileSync(p).subarray(4096, 8192))).toEqual(data);
  });

  it('leaves a node without iothread= on the main loop', async () => {
    await withBql(async (bql) => {
      const n = await openNode(bql, 'driver=raw,file.driver=memory,file.size=1M');
      expect(n.ioThread).toBeNull();
      expect(n.file?.ioThread).toBeNull();
    });
  });

  it('refuses an unknown IOThread with ENOENT and opens nothing', async () => {
    await withBql(async (bql) => {
      const err = await rejection(openNode(bql, 'driver=raw,file.driver=memory,file.size=1M,iothread=nope'));
      expect(err.code).toBe('ENOENT');
      expect(err.message).toContain("'nope'");
      expect(names(bql)).toEqual([]);
    });
  });
});

describe('queries', () => {
  it('reports every node with its name, driver, file, size, flags, IOThread, counters and children', async () => {
    const p = path.join(dir, 'query.img');
    withBqlSync((bql) => createRawFile(bql, p, 3 * 65536));
    await withBql(async (bql) => {
      createIOThread(bql, 'io-query');
      await openNode(bql, `file=${p},format=raw,node-name=qraw,file.node-name=qfile,read-only=on,iothread=io-query`);
      await openNode(bql, 'driver=memory,size=2M,node-name=qmem');
      const infos = queryNamedBlockNodes(bql);
      expect(infos.map((i) => i.nodeName)).toEqual(['qfile', 'qraw', 'qmem']);
      expect(infos[1]).toEqual({
        nodeName: 'qraw',
        driver: 'raw',
        file: p,
        virtualSize: 3 * 65536,
        readOnly: true,
        iothread: 'io-query',
        inFlight: 0,
        quiesceCounter: 0,
        children: [{ role: 'file', nodeName: 'qfile' }],
        backingFileDepth: 0,
      });
      expect(infos[0]).toMatchObject({ nodeName: 'qfile', driver: 'file', file: p, readOnly: true, iothread: 'io-query', children: [] });
      expect(infos[2]).toMatchObject({
        nodeName: 'qmem',
        driver: 'memory',
        file: '',
        virtualSize: 2 * 1024 * 1024,
        readOnly: false,
        iothread: null,
        formatSpecific: { allocatedBytes: 0 },
      });
    });
  });

  it('reports requests in flight and drained sections in the counters', async () => {
    const raw = await withBql((bql) => openNode(bql, 'driver=raw,node-name=gq,file.driver=gated,file.node-name=gq-file,file.size=1M'));
    const gate = gateOf('gq-file');
    gate.closed = true;
    const read = bdrvPread(raw, 0, new Uint8Array(512));
    await settle();
    await withBql((bql) => {
      const byName = new Map(queryNamedBlockNodes(bql).map((i) => [i.nodeName, i]));
      expect(byName.get('gq')?.inFlight).toBe(1);
      expect(byName.get('gq-file')?.inFlight).toBe(1);
    });
    gate.open();
    await read;
    await withBql(async (bql) => {
      const d = await drainedBegin(bql, raw.file as BlockNode);
      const byName = new Map(queryNamedBlockNodes(bql).map((i) => [i.nodeName, i]));
      expect(byName.get('gq')).toMatchObject({ inFlight: 0, quiesceCounter: 1 });
      expect(byName.get('gq-file')).toMatchObject({ inFlight: 0, quiesceCounter: 1 });
      drainedEnd(bql, d);
      expect(queryNamedBlockNodes(bql).every((i) => i.quiesceCounter === 0)).toBe(true);
    });
  });

  it('reports backends with the node inserted in them', async () => {
    await withBql(async (bql) => {
      const node = await openNode(bql, 'driver=raw,node-name=qb,file.driver=memory,file.size=1M');
      blkNew(bql, 'dev0', node, { readOnly: true });
      const d = await drainedBegin(bql, node);
      const [info, ...rest] = queryBlock(bql);
      expect(rest).toEqual([]);
      expect(info).toMatchObject({
        device: 'dev0',
        readOnly: true,
        inFlight: 0,
        quiesceCounter: 1,
        queued: 0,
        inserted: { nodeName: 'qb', driver: 'raw', virtualSize: 1024 * 1024, readOnly: false },
      });
      drainedEnd(bql, d);
      expect(queryBlock(bql)[0]?.quiesceCounter).toBe(0);
    });
  });

  it('formats info block with the device name, node name, file, driver and size', async () => {
    const p = path.join(dir, 'info.img');
    withBqlSync((bql) => createRawFile(bql, p, 8192));
    await withBql(async (bql) => {
      const node = await openNode(bql, `file=${p},format=raw,node-name=inode`);
      blkNew(bql, 'ide0-hd0', node);
      const mnode = await openNode(bql, mem('mnode'));
      blkNew(bql, 'memdev', mnode, { readOnly: true });
      const text = formatInfoBlock(bql);
      expect(text).toContain('ide0-hd0 (inode)');
      expect(text).toContain(p);
      expect(text).toContain('(raw)');
      expect(text).toContain('8192 bytes');
      expect(text).toContain('main loop');
      expect(text).toContain('memdev (mnode): (none) (memory, read-only)');
      expect(text.indexOf('ide0-hd0')).toBeLessThan(text.indexOf('memdev'));
    });
  });
});

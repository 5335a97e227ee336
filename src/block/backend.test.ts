import { afterEach, describe, expect, it } from 'vitest';
import '../drivers/index.js';
import {
  blkDelete,
  blkFind,
  blkFlush,
  blkGetLength,
  blkList,
  blkNew,
  blkPdiscard,
  blkPread,
  blkPwrite,
  blkPwriteZeroes,
  blkTruncate,
  type BlockBackend,
} from './backend.js';
import { withBql, type Bql } from './bql.js';
import { drainedBegin, drainedEnd } from './drain.js';
import type { DrainedProof } from './drain.js';
import { registerDriver, type BlockDriver, type BlockDriverInstance } from './driver.js';
import { BlockError } from './errors.js';
import { closeNode, listNodes, openNode } from './graph.js';
import type { BlockNode } from './node.js';
import { parseSize, type NodeOptions } from './options.js';

/**
 * A protocol driver for these tests: `driver=bktest,size=N`. Each node has a control through
 * which a test makes requests wait (`hold`) or fail with EIO (`fail`), and sees what reached it.
 */
interface Control {
  log: string[];
  hold: boolean;
  fail: boolean;
  release(): void;
}
const controls = new Map<string, Control>();

class TestInstance implements BlockDriverInstance {
  private readonly data: Uint8Array;
  private readonly waiting: Array<() => void> = [];

  constructor(
    private readonly nodeName: string,
    size: number,
    private readonly ctl: Control,
  ) {
    this.data = new Uint8Array(size);
    ctl.release = () => {
      ctl.hold = false;
      for (const w of this.waiting.splice(0)) w();
    };
  }

  private async pass(what: string): Promise<void> {
    this.ctl.log.push(what);
    if (this.ctl.hold) await new Promise<void>((r) => this.waiting.push(r));
    if (this.ctl.fail) throw new BlockError('EIO', `test node '${this.nodeName}': injected I/O error`, { node: this.nodeName });
  }

  async preadv(offset: number, buf: Uint8Array): Promise<void> {
    await this.pass(`r@${offset}+${buf.length}`);
    buf.set(this.data.subarray(offset, offset + buf.length));
  }

  async pwritev(offset: number, buf: Uint8Array): Promise<void> {
    await this.pass(`w@${offset}+${buf.length}`);
    this.data.set(buf, offset);
  }

  async pwriteZeroes(offset: number, bytes: number): Promise<void> {
    await this.pass(`z@${offset}+${bytes}`);
    this.data.fill(0, offset, offset + bytes);
  }

  async pdiscard(offset: number, bytes: number): Promise<void> {
    await this.pass(`d@${offset}+${bytes}`);
  }

  async flush(): Promise<void> {
    await this.pass('f');
  }

  getLength(): number {
    return this.data.length;
  }

  async truncate(sizeBytes: number): Promise<void> {
    await this.pass(`t${sizeBytes}`);
    throw new BlockError('ENOTSUP', `test node '${this.nodeName}' cannot be resized`, { node: this.nodeName });
  }

  async close(_bql: Bql, _drained: DrainedProof): Promise<void> {
    controls.delete(this.nodeName);
  }
}

const testDriver: BlockDriver = {
  formatName: 'bktest',
  kind: 'protocol',
  async open(_bql: Bql, node: BlockNode, opts: NodeOptions): Promise<BlockDriverInstance> {
    const ctl: Control = { log: [], hold: false, fail: false, release: () => {} };
    controls.set(node.nodeName, ctl);
    return new TestInstance(node.nodeName, parseSize(opts['size'] ?? '64k'), ctl);
  },
};
registerDriver(testDriver);

function control(name: string): Control {
  const c = controls.get(name);
  if (c === undefined) throw new Error(`no test node '${name}'`);
  return c;
}

async function settle(): Promise<void> {
  for (let i = 0; i < 5; i++) await new Promise<void>((r) => setImmediate(r));
}

async function rejection(p: Promise<unknown> | (() => unknown)): Promise<BlockError> {
  try {
    await (typeof p === 'function' ? p() : p);
  } catch (e) {
    expect(e).toBeInstanceOf(BlockError);
    return e as BlockError;
  }
  throw new Error('expected a BlockError');
}

afterEach(async () => {
  await withBql(async (bql) => {
    for (const blk of blkList(bql)) blkDelete(bql, blk);
    for (let round = 0; round < 10 && listNodes(bql).length > 0; round++) {
      for (const node of listNodes(bql)) if (node.parents.size === 0) await closeNode(bql, node);
    }
  });
});

/** A raw node named `name` over a bktest node `name-file` of 64 KiB, with a backend `dev`. */
async function disk(name: string, dev: string, opts: { readOnly?: boolean; nodeReadOnly?: boolean } = {}): Promise<{ blk: BlockBackend; node: BlockNode; file: BlockNode; ctl: Control }> {
  return withBql(async (bql) => {
    const ro = opts.nodeReadOnly === true ? ',read-only=on' : '';
    const node = await openNode(bql, `driver=raw,node-name=${name},file.driver=bktest,file.node-name=${name}-file,file.size=64k${ro}`);
    const blkOpts = opts.readOnly === undefined ? {} : { readOnly: opts.readOnly };
    const blk = blkNew(bql, dev, node, blkOpts);
    return { blk, node, file: node.file as BlockNode, ctl: control(`${name}-file`) };
  });
}

describe('blkNew', () => {
  it('creates a named backend on a root node that blkFind and blkList see', async () => {
    await withBql(async (bql) => {
      const node = await openNode(bql, 'driver=memory,size=1M,node-name=root0');
      const blk = blkNew(bql, 'virtio0', node);
      expect(blk.name).toBe('virtio0');
      expect(blk.root).toBe(node);
      expect(blk.readOnly).toBe(false);
      expect(node.parents.has(blk)).toBe(true);
      expect(blkFind(bql, 'virtio0')).toBe(blk);
      expect(blkList(bql)).toEqual([blk]);
    });
  });

  it('refuses invalid device names with EINVAL naming the name', async () => {
    await withBql(async (bql) => {
      const node = await openNode(bql, 'driver=memory,size=1M');
      for (const bad of ['', '0disk', '-disk', 'a b', 'disk/0', 'dïsk', '#block001']) {
        const err = await rejection(() => blkNew(bql, bad, node));
        expect(err.code).toBe('EINVAL');
        expect(err.field).toBe('id');
        expect(err.message).toContain(`'${bad}'`);
      }
      expect(blkList(bql)).toEqual([]);
      expect(node.parents.size).toBe(0);
    });
  });

  it('refuses a duplicate device name with EINVAL and keeps the first backend', async () => {
    await withBql(async (bql) => {
      const a = await openNode(bql, 'driver=memory,size=1M');
      const b = await openNode(bql, 'driver=memory,size=1M');
      const first = blkNew(bql, 'dup0', a);
      const err = await rejection(() => blkNew(bql, 'dup0', b));
      expect(err.code).toBe('EINVAL');
      expect(err.message).toContain("'dup0'");
      expect(blkFind(bql, 'dup0')).toBe(first);
      expect(b.parents.size).toBe(0);
    });
  });

  it('frees the name on blkDelete and leaves the node open', async () => {
    await withBql(async (bql) => {
      const node = await openNode(bql, 'driver=memory,size=1M');
      const blk = blkNew(bql, 'reuse', node);
      blkDelete(bql, blk);
      expect(blk.root).toBeNull();
      expect(node.parents.size).toBe(0);
      expect(node.instance).not.toBeNull();
      expect((await rejection(() => blkFind(bql, 'reuse'))).code).toBe('ENOENT');
      expect(blkNew(bql, 'reuse', node).root).toBe(node);
    });
  });

  it('refuses a writable backend over a read-only node with EACCES', async () => {
    await withBql(async (bql) => {
      const node = await openNode(bql, 'driver=memory,size=1M,read-only=on,node-name=ronode');
      const err = await rejection(() => blkNew(bql, 'rw-over-ro', node, { readOnly: false }));
      expect(err.code).toBe('EACCES');
      expect(err.message).toContain("'rw-over-ro'");
      expect(err.message).toContain("'ronode'");
      expect(blkList(bql)).toEqual([]);
      // without an explicit flag the backend inherits read-only from its node
      expect(blkNew(bql, 'ro-inherit', node).readOnly).toBe(true);
    });
  });

  it('starts a backend drained when its root is drained', async () => {
    await withBql(async (bql) => {
      const node = await openNode(bql, 'driver=memory,size=1M');
      const d = await drainedBegin(bql, node);
      const blk = blkNew(bql, 'late', node);
      expect(blk.quiesceCounter).toBe(1);
      drainedEnd(bql, d);
      expect(blk.quiesceCounter).toBe(0);
    });
  });
});

describe('request checks', () => {
  it('refuses malformed ranges with EINVAL naming the device, before the driver sees them', async () => {
    const { blk, ctl } = await disk('chk', 'chkdev');
    const len = blkGetLength(blk);
    expect(len).toBe(65536);
    const cases: Array<[string, () => Promise<void>]> = [
      ['negative offset read', () => blkPread(blk, -1, new Uint8Array(1))],
      ['negative offset write', () => blkPwrite(blk, -512, new Uint8Array(512))],
      ['fractional offset', () => blkPread(blk, 1.5, new Uint8Array(1))],
      ['NaN offset', () => blkPread(blk, Number.NaN, new Uint8Array(1))],
      ['infinite offset', () => blkPwrite(blk, Number.POSITIVE_INFINITY, new Uint8Array(1))],
      ['offset past the end', () => blkPread(blk, len + 1, new Uint8Array(0))],
      ['range running past the end', () => blkPread(blk, len - 10, new Uint8Array(20))],
      ['write running past the end', () => blkPwrite(blk, len - 1, new Uint8Array(2))],
      ['offset + length overflowing 2^53', () => blkPread(blk, Number.MAX_SAFE_INTEGER, new Uint8Array(16))],
      ['offset above 2^53', () => blkPread(blk, 2 ** 60, new Uint8Array(16))],
      ['negative length', () => blkPwriteZeroes(blk, 0, -1)],
      ['fractional length', () => blkPdiscard(blk, 0, 0.5)],
      ['length overflowing', () => blkPwriteZeroes(blk, 4096, Number.MAX_SAFE_INTEGER)],
    ];
    for (const [what, call] of cases) {
      const err = await rejection(call());
      expect(err.code, what).toBe('EINVAL');
      expect(err.message, what).toContain("'chkdev'");
      expect(err.node, what).toBe('chkdev');
      expect(blk.inFlight, what).toBe(0);
    }
    expect(ctl.log).toEqual([]);
  });

  it('accepts a zero-length request at the very end and a full-device request', async () => {
    const { blk, ctl } = await disk('edge', 'edgedev');
    await blkPread(blk, 65536, new Uint8Array(0));
    await blkPwrite(blk, 0, new Uint8Array(65536).fill(3));
    const back = new Uint8Array(65536);
    await blkPread(blk, 0, back);
    expect(back.every((b) => b === 3)).toBe(true);
    expect(ctl.log).toContain('w@0+65536');
  });

  it('refuses writes, write-zeroes, discards and truncates on a read-only backend with EPERM, and still reads', async () => {
    const { blk, ctl } = await disk('robk', 'rodev', { readOnly: true });
    expect(blk.readOnly).toBe(true);
    for (const p of [blkPwrite(blk, 0, new Uint8Array(512)), blkPwriteZeroes(blk, 0, 512), blkPdiscard(blk, 0, 512), blkTruncate(blk, 4096)]) {
      const err = await rejection(p);
      expect(err.code).toBe('EPERM');
      expect(err.message).toContain("'rodev'");
    }
    expect(ctl.log).toEqual([]);
    expect(blk.inFlight).toBe(0);
    await blkPread(blk, 0, new Uint8Array(512));
    expect(ctl.log).toEqual(['r@0+512']);
  });

  it('refuses requests on a backend without a medium with ENOMEDIUM', async () => {
    const { blk } = await disk('nomed', 'nomeddev');
    await withBql((bql) => blkDelete(bql, blk));
    const err = await rejection(blkPread(blk, 0, new Uint8Array(512)));
    expect(err.code).toBe('ENOMEDIUM');
    expect(err.message).toContain("'nomeddev'");
    expect(blk.inFlight).toBe(0);
    expect(() => blkGetLength(blk)).toThrow(BlockError);
  });
});

describe('in-flight accounting', () => {
  it('counts a request from entry to completion on the backend and on every node it crosses', async () => {
    const { blk, node, file, ctl } = await disk('count', 'countdev');
    ctl.hold = true;
    const reqs = [blkPread(blk, 0, new Uint8Array(512)), blkPwrite(blk, 512, new Uint8Array(512).fill(1))];
    await settle();
    expect(blk.inFlight).toBe(2);
    expect(node.inFlight).toBe(2);
    expect(file.inFlight).toBe(2);
    ctl.release();
    await Promise.all(reqs);
    expect(blk.inFlight).toBe(0);
    expect(node.inFlight).toBe(0);
    expect(file.inFlight).toBe(0);
  });

  it('returns to zero after requests that fail in the driver, and passes the error on', async () => {
    const { blk, node, file, ctl } = await disk('fails', 'failsdev');
    ctl.fail = true;
    const results = await Promise.allSettled([
      blkPread(blk, 0, new Uint8Array(512)),
      blkPwrite(blk, 0, new Uint8Array(512)),
      blkPwriteZeroes(blk, 0, 512),
      blkPdiscard(blk, 0, 512),
      blkFlush(blk),
    ]);
    for (const r of results) {
      expect(r.status).toBe('rejected');
      if (r.status === 'rejected') {
        expect(r.reason).toBeInstanceOf(BlockError);
        expect((r.reason as BlockError).code).toBe('EIO');
      }
    }
    expect(ctl.log).toEqual(['r@0+512', 'w@0+512', 'z@0+512', 'd@0+512', 'f']);
    expect(blk.inFlight).toBe(0);
    expect(node.inFlight).toBe(0);
    expect(file.inFlight).toBe(0);
    // the device works again once the fault is gone
    ctl.fail = false;
    await blkPwrite(blk, 0, new Uint8Array(512).fill(9));
    const back = new Uint8Array(512);
    await blkPread(blk, 0, back);
    expect(back.every((b) => b === 9)).toBe(true);
  });

  it('returns to zero after held requests fail on release', async () => {
    const { blk, node, file, ctl } = await disk('heldfail', 'heldfaildev');
    ctl.hold = true;
    ctl.fail = true;
    const reqs = Array.from({ length: 10 }, (_, i) => blkPread(blk, i * 512, new Uint8Array(512)));
    await settle();
    expect(blk.inFlight).toBe(10);
    ctl.release();
    const results = await Promise.allSettled(reqs);
    expect(results.every((r) => r.status === 'rejected')).toBe(true);
    expect(blk.inFlight).toBe(0);
    expect(node.inFlight).toBe(0);
    expect(file.inFlight).toBe(0);
  });

  it('returns to zero after a truncate the driver refuses', async () => {
    const { blk, node, file } = await disk('trunc', 'truncdev');
    const err = await rejection(blkTruncate(blk, 4096));
    expect(err.code).toBe('ENOTSUP');
    expect(blk.inFlight).toBe(0);
    expect(node.inFlight).toBe(0);
    expect(file.inFlight).toBe(0);
  });

  it('lets a drain complete after failed requests', async () => {
    const { blk, node, ctl } = await disk('drainfail', 'drainfaildev');
    ctl.fail = true;
    await Promise.allSettled([blkPread(blk, 0, new Uint8Array(512)), blkPwrite(blk, 0, new Uint8Array(512))]);
    await withBql(async (bql) => {
      const d = await drainedBegin(bql, node);
      expect(node.inFlight).toBe(0);
      drainedEnd(bql, d);
    });
  });
});

describe('blkDelete', () => {
  it('refuses to delete a backend with requests in flight with EBUSY, and deletes it once they complete', async () => {
    const { blk, node, ctl } = await disk('busy', 'busydev');
    ctl.hold = true;
    const req = blkPwrite(blk, 0, new Uint8Array(512).fill(7));
    await settle();
    await withBql(async (bql) => {
      const err = await rejection(() => blkDelete(bql, blk));
      expect(err.code).toBe('EBUSY');
      expect(err.message).toContain("'busydev'");
      expect(err.message).toContain('1 requests in flight');
      expect(blkFind(bql, 'busydev')).toBe(blk);
      expect(blk.root).toBe(node);
    });
    ctl.release();
    await req;
    await withBql((bql) => {
      blkDelete(bql, blk);
      expect(blkList(bql)).toEqual([]);
    });
  });

  it('refuses to delete a backend with requests queued behind a drained section with EBUSY', async () => {
    const { blk, node } = await disk('queued', 'queueddev');
    await withBql(async (bql) => {
      const d = await drainedBegin(bql, node);
      const req = blkPread(blk, 0, new Uint8Array(512));
      await settle();
      expect(blk.queued.length).toBe(1);
      const err = await rejection(() => blkDelete(bql, blk));
      expect(err.code).toBe('EBUSY');
      expect(err.message).toContain('1 queued');
      drainedEnd(bql, d);
      await req;
      expect(blk.inFlight).toBe(0);
      blkDelete(bql, blk);
    });
  });
});

describe('the data path', () => {
  it('writes, reads, zeroes and flushes through the backend', async () => {
    await withBql(async (bql) => {
      const node = await openNode(bql, 'driver=raw,file.driver=memory,file.size=1M');
      blkNew(bql, 'datadev', node);
    });
    const blk = await withBql((bql) => blkFind(bql, 'datadev'));
    const data = Uint8Array.from({ length: 8192 }, (_, i) => (i * 13) & 0xff);
    await blkPwrite(blk, 4096, data);
    const back = new Uint8Array(8192);
    await blkPread(blk, 4096, back);
    expect(back).toEqual(data);
    await blkPwriteZeroes(blk, 8192, 4096);
    await blkPread(blk, 4096, back);
    expect(back.subarray(0, 4096)).toEqual(data.subarray(0, 4096));
    expect(back.subarray(4096).every((b) => b === 0)).toBe(true);
    await blkFlush(blk);
    await blkTruncate(blk, 2 * 1024 * 1024);
    expect(blkGetLength(blk)).toBe(2 * 1024 * 1024);
    expect(blk.inFlight).toBe(0);
  });
});

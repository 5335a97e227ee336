/**
 * qcow2 under failing and racing writes, without any crash (regressions found in review):
 * - an allocating write keeps its L2 table across waits (allocation, the data write); lock-free
 *   reads of other tables in that window used to evict the clean table, so the new entries went
 *   into an orphaned buffer: the write was lost, and a COW dropped the old cluster's reference
 *   anyway (refcount below its references). The table is now pinned before the first wait;
 * - a header write that lands but reports a failure (a lost acknowledgement) used to leave memory
 *   on the old state and free what the header now points at; commit points read the header back;
 * - a failed write (ENOSPC while the refcount table grows, EIO on a resize's header write) used to
 *   make the driver read its tables again and forget every completed, unflushed write, after which
 *   the next flush succeeded. Memory now stays the truth: dirty tables are written by a later flush.
 * The disk is an in-memory driver (`reviewmem`) that can hold, fail, fill up or lose the
 * acknowledgement of writes; qemu-img check judges the images.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { afterAll, expect, it } from 'vitest';
import type { Bql } from '../src/block/bql.js';
import { withBql } from '../src/block/bql.js';
import type { DrainedProof } from '../src/block/drain.js';
import { registerDriver, type BlockDriver, type BlockDriverInstance } from '../src/block/driver.js';
import { BlockError } from '../src/block/errors.js';
import type { BlockNode } from '../src/block/node.js';
import type { NodeOptions } from '../src/block/options.js';
import { shutdownIOThreads } from '../src/block/iothread.js';
import { planQcow2Create } from '../src/drivers/qcow2/create.js';
import { openImage } from '../src/image.js';

interface Mem {
  bytes: Uint8Array;
  length: number;
  holdWrites: boolean;
  held: Array<() => void>;
  /** The next this many writes fail with EIO. */
  failWrites: number;
  /** A write ending past this fails with ENOSPC. */
  maxLength: number;
  /** Writes until the one that is carried out but reports EIO (lost acknowledgement); -1: none. */
  lostAckIn: number;
  log: string[];
}
const mems = new Map<string, Mem>();

class MemInstance implements BlockDriverInstance {
  constructor(private readonly m: Mem) {}
  private grow(end: number): void {
    if (end > this.m.bytes.length) {
      const b = new Uint8Array(Math.max(end, this.m.bytes.length * 2));
      b.set(this.m.bytes);
      this.m.bytes = b;
    }
    if (end > this.m.length) this.m.length = end;
  }
  async preadv(offset: number, buf: Uint8Array): Promise<void> {
    buf.fill(0);
    const end = Math.min(this.m.length, offset + buf.length);
    if (end > offset) buf.set(this.m.bytes.subarray(offset, end));
  }
  async pwritev(offset: number, buf: Uint8Array): Promise<void> {
    if (this.m.holdWrites) await new Promise<void>((r) => this.m.held.push(r));
    if (this.m.failWrites > 0) {
      this.m.failWrites--;
      throw new BlockError('EIO', 'reviewmem: injected write failure');
    }
    if (offset + buf.length > this.m.maxLength) throw new BlockError('ENOSPC', 'reviewmem: disk full');
    this.grow(offset + buf.length);
    this.m.bytes.set(buf, offset);
    this.m.log.push(`w@${offset}+${buf.length}`);
    if (this.m.lostAckIn >= 0 && this.m.lostAckIn-- === 0) throw new BlockError('EIO', 'reviewmem: write done, acknowledgement lost');
  }
  async pwriteZeroes(offset: number, bytes: number): Promise<void> {
    this.grow(offset + bytes);
    this.m.bytes.fill(0, offset, offset + bytes);
  }
  async pdiscard(): Promise<void> {}
  async flush(): Promise<void> {}
  getLength(): number {
    return this.m.length;
  }
  async truncate(n: number): Promise<void> {
    this.grow(n);
    this.m.length = n;
  }
  async close(_bql: Bql, _d: DrainedProof): Promise<void> {}
}

const memDriver: BlockDriver = {
  formatName: 'reviewmem',
  kind: 'protocol',
  async open(_bql: Bql, _node: BlockNode, opts: NodeOptions): Promise<BlockDriverInstance> {
    const m = mems.get(String(opts['id']));
    if (m === undefined) throw new Error('no mem disk');
    return new MemInstance(m);
  },
};
registerDriver(memDriver);

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'review-evict-'));
afterAll(async () => {
  fs.rmSync(dir, { recursive: true, force: true });
  await withBql((bql) => shutdownIOThreads(bql));
});

function newDisk(id: string, sizeBytes: number, clusterSize: number): Mem {
  const plan = planQcow2Create({ sizeBytes, clusterSize });
  const bytes = new Uint8Array(plan.fileLength + 1024 * 1024);
  for (const w of plan.writes) bytes.set(w.data, w.offset);
  const m: Mem = { bytes, length: plan.fileLength, holdWrites: false, held: [], failWrites: 0, maxLength: Infinity, lostAckIn: -1, log: [] };
  mems.set(id, m);
  return m;
}

const tick = (): Promise<void> => new Promise((r) => setTimeout(r, 5));

function qemuCheck(m: Mem, name: string): { status: number | null; out: string } {
  const f = path.join(dir, `${name}.qcow2`);
  fs.writeFileSync(f, m.bytes.subarray(0, m.length));
  const r = spawnSync('qemu-img', ['check', f], { encoding: 'utf8' });
  return { status: r.status, out: r.stdout + r.stderr };
}

const C = 512; // 64 entries per L2 table: each table covers 32 KiB
const SPAN = C * (C / 8);
const TABLES = 40; // more than the 16 tables the cache holds

it('an allocating write into a clean cached L2 table survives concurrent reads of other tables', async () => {
  const m = newDisk('evict1', TABLES * SPAN, C);
  const spec = 'driver=qcow2,l2-cache-size=8192,file.driver=reviewmem,file.id=evict1';
  let img = await openImage(spec);
  for (let k = 0; k < TABLES; k++) await img.write(k * SPAN, new Uint8Array(C).fill(0x10 + k));
  await img.flush();
  await img.read(0, C); // L2 table 0 cached, clean
  m.holdWrites = true;
  const w = img.write(C, new Uint8Array(C).fill(0xab)); // guest cluster 1: unallocated in table 0
  await tick(); // the write now waits for its data write, holding table 0 unpinned
  for (let k = 1; k < TABLES; k++) await img.read(k * SPAN, C); // lock-free reads evict table 0
  m.holdWrites = false;
  for (const r of m.held.splice(0)) r();
  await w;
  const back = await img.read(C, C);
  expect(back[0], 'read right after the write').toBe(0xab);
  await img.close();
  img = await openImage(spec);
  const again = await img.read(C, C);
  await img.close();
  expect(again[0], 'after close and reopen').toBe(0xab);
});

it('a COW of a snapshot-shared cluster under the same race keeps refcounts >= references', async () => {
  const m = newDisk('evict2', TABLES * SPAN, C);
  const spec = 'driver=qcow2,l2-cache-size=8192,file.driver=reviewmem,file.id=evict2';
  let img = await openImage(spec);
  for (let k = 0; k < TABLES; k++) await img.write(k * SPAN, new Uint8Array(C).fill(0x10 + k));
  await img.createSnapshot('s1');
  // table 0 of the active image is now a copy; make it COPIED-clean and cached:
  await img.write(2 * C, new Uint8Array(C).fill(0x33)); // allocates in table 0 (table copied by create is already COPIED in L1)
  await img.flush();
  await img.read(0, C);
  m.holdWrites = true;
  const w = img.write(0, new Uint8Array(C).fill(0xcd)); // guest cluster 0: shared with s1 -> COW
  await tick();
  for (let k = 1; k < TABLES; k++) await img.read(k * SPAN, C);
  m.holdWrites = false;
  for (const r of m.held.splice(0)) r();
  await w;
  await img.flush();
  const back = await img.read(0, C);
  await img.close();
  const chk = qemuCheck(m, 'evict2');
  expect(chk.out).not.toMatch(/ERROR/);
  expect(back[0]).toBe(0xcd);
});

it('a failed header write during a resize does not drop earlier acknowledged writes (flush succeeds after it)', async () => {
  const m = newDisk('resync1', 64 * 1024 * 1024, 65536);
  const spec = 'driver=qcow2,file.driver=reviewmem,file.id=resync1';
  let img = await openImage(spec);
  await img.write(0, new Uint8Array(65536).fill(0x5a)); // acknowledged, metadata dirty in memory
  m.failWrites = 1; // the size write of the resize fails once (transient EIO)
  await expect(img.truncate(65 * 1024 * 1024)).rejects.toThrow();
  await img.flush(); // succeeds: the guest now believes its write is durable
  const back = await img.read(0, 16);
  await img.close();
  img = await openImage(spec);
  const again = await img.read(0, 16);
  await img.close();
  expect(back[0], 'read after the failed resize and a successful flush').toBe(0x5a);
  expect(again[0], 'after reopen').toBe(0x5a);
});

it('control: the same write without the concurrent reads is kept', async () => {
  const m = newDisk('control1', TABLES * SPAN, C);
  const spec = 'driver=qcow2,l2-cache-size=8192,file.driver=reviewmem,file.id=control1';
  const img = await openImage(spec);
  for (let k = 0; k < TABLES; k++) await img.write(k * SPAN, new Uint8Array(C).fill(0x10 + k));
  await img.flush();
  await img.read(0, C);
  m.holdWrites = true;
  const w = img.write(C, new Uint8Array(C).fill(0xab));
  await tick();
  m.holdWrites = false;
  for (const r of m.held.splice(0)) r();
  await w;
  const back = await img.read(C, C);
  await img.close();
  expect(back[0]).toBe(0xab);
});

import { Qcow2Instance } from '../src/drivers/qcow2/instance.js';

it('ENOSPC while growing the refcount table does not drop earlier acknowledged writes', async () => {
  const CS = 512;
  // find the guest cluster whose allocation grows the refcount table
  const probe = newDisk('enospc-probe', 64 * 1024 * 1024, CS);
  let img = await openImage('driver=qcow2,file.driver=reviewmem,file.id=enospc-probe');
  const st = (img.backend.root?.instance as Qcow2Instance).state;
  let k = 0;
  for (;;) {
    const before = st.reftable.length;
    await img.write(k * CS, new Uint8Array(CS).fill(1));
    if (st.reftable.length !== before) break;
    k++;
  }
  await img.close();
  void probe;
  // the same sequence, with the disk full just where the new table would go
  const m = newDisk('enospc', 64 * 1024 * 1024, CS);
  img = await openImage('driver=qcow2,file.driver=reviewmem,file.id=enospc');
  for (let j = 0; j < k - 1; j++) await img.write(j * CS, new Uint8Array(CS).fill(1));
  await img.flush();
  await img.write((k - 1) * CS, new Uint8Array(CS).fill(0x42)); // acknowledged, not yet flushed
  m.maxLength = m.length + 2 * CS; // room for the next data cluster, not for a new refcount area
  const err = await img.write(k * CS, new Uint8Array(CS).fill(2)).then(() => null, (e: unknown) => e);
  expect(String(err)).toMatch(/new refcount/);
  m.maxLength = Infinity; // space is freed, the guest goes on (werror=enospc, then resume)
  await img.flush();
  const back = await img.read((k - 1) * CS, 16);
  await img.close();
  expect(back[0], 'a write acknowledged before the failed one, then flushed').toBe(0x42);
});

it('a header write of growL1 that lands but reports failure: the resize counts as done and the new L1 is not freed and reused', async () => {
  const m = newDisk('lostack', 64 * 1024 * 1024, 65536);
  const spec = 'driver=qcow2,file.driver=reviewmem,file.id=lostack';
  let img = await openImage(spec);
  await img.write(0, new Uint8Array(65536).fill(0x61));
  await img.flush();
  m.log = [];
  // growL1: refcount block, new L1, header (36..47); the header write lands but reports EIO
  m.lostAckIn = 2;
  const err = await img.truncate(1024 * 1024 * 1024).then(() => null, (e: unknown) => e);
  // the header shows the new L1 when read back: the resize counts as done (or, if it fails, it
  // names the header write); either way nothing the header points at may be handed out again
  if (err !== null) expect(String(err)).toMatch(/L1 table pointer/);
  m.lostAckIn = -1;
  for (let k = 1; k < 8; k++) await img.write(k * 65536, new Uint8Array(65536).fill(0x62));
  await img.flush();
  await img.close();
  img = await openImage(spec);
  const back = await img.read(0, 16);
  await img.close();
  expect(back[0], 'guest cluster 0 after reopen (log: ' + m.log.join(' ') + ')').toBe(0x61);
  expect(qemuCheck(m, 'lostack').out).not.toMatch(/ERROR/);
});

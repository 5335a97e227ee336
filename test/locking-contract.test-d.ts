import { bdrvAllCreateSnapshot, bdrvAllDeleteSnapshot, bdrvAllGotoSnapshot, type GroupDisk } from '../src/block/snapshot-group.js';
import { Machine } from '../src/machine/machine.js';
import { delVm, delVmLocked, loadVm, loadVmLocked, saveVm, saveVmLocked } from '../src/machine/savevm.js';
import { acquireSnapshotLock, withSnapshotLock, type SnapshotLocked } from '../src/block/snapshot-lock.js';
/**
 * The locking contract at compile time: a call made without the proofs its signature demands must
 * not compile. Every `@ts-expect-error` below is a call that has to be refused; if one compiles,
 * tsc reports the directive as unused and this file fails.
 *
 * The functions named `compileOnly*` are never called: they exist to be type-checked.
 */
import { expectTypeOf, test } from 'vitest';
import { blockdevSnapshot } from '../src/block/external-snapshot.js';
import { bdrvSetBacking, replaceNode } from '../src/block/graph-change.js';
import {
  blkNew,
  blkReplaceRoot,
  blkPdiscard,
  blkPread,
  blkPwrite,
  blkPwriteZeroes,
  type BlockBackend,
} from '../src/block/backend.js';
import { acquireBql, Bql, withBql, withBqlSync } from '../src/block/bql.js';
import {
  drainAllBegin,
  drainedBegin,
  drainedEnd,
  Drained,
  DrainedAll,
  type DrainedSet,
  type GroupDrained,
  runDrainedIo,
  runInDrainedSection,
  withDrained,
  type DrainedProof,
} from '../src/block/drain.js';
import type { BlockDriver, BlockDriverInstance, SnapshotInfo, WriteFlags, WriteZeroesFlags } from '../src/block/driver.js';
import { attachChild, closeNode, detachChild, openNode } from '../src/block/graph.js';
import { bdrvPdiscard, bdrvPread, bdrvPwrite, bdrvPwriteZeroes } from '../src/block/io.js';
import { createIOThread, shutdownIOThreads, type IOThreadOptions } from '../src/block/iothread.js';
import type { BdrvChild, BlockNode } from '../src/block/node.js';
import type { NodeOptions } from '../src/block/options.js';
import { gateRequest } from '../src/block/request-gate.js';
import { bdrvSnapshotCreate, bdrvSnapshotDelete, bdrvSnapshotGoto, bdrvSnapshotList } from '../src/block/snapshot.js';
import { createRawFile } from '../src/drivers/file/driver.js';
import { discardSnapshotStore } from '../src/drivers/file/snapshot-store.js';
import { createQcow2File, createQcow2OnNode, type Qcow2CreateOptions } from '../src/drivers/qcow2/create.js';
import type * as PublicApi from '../src/index.js';

declare const info: SnapshotInfo;

// ---------------------------------------------------------------------------------------------
// snapshot operations need the BQL and a drained proof

test('snapshot create, goto and delete do not compile without the Bql and a drained proof', () => {
  async function compileOnlySnapshots(bql: Bql, node: BlockNode, drained: Drained, all: DrainedAll): Promise<void> {
    // the well-formed calls compile, with a node's section or with drain-all
    await bdrvSnapshotCreate(bql, drained, node, info);
    await bdrvSnapshotGoto(bql, drained, node, 'snap1');
    await bdrvSnapshotDelete(bql, drained, node, '1', null);
    await bdrvSnapshotCreate(bql, all, node, info);
    await bdrvSnapshotGoto(bql, all, node, 'snap1');
    await bdrvSnapshotDelete(bql, all, node, null, 'snap1');

    // only the BQL, no drained proof
    // @ts-expect-error -- bdrvSnapshotCreate needs a drained proof
    await bdrvSnapshotCreate(bql, node, info);
    // @ts-expect-error -- bdrvSnapshotGoto needs a drained proof
    await bdrvSnapshotGoto(bql, node, 'snap1');
    // @ts-expect-error -- bdrvSnapshotDelete needs a drained proof
    await bdrvSnapshotDelete(bql, node, '1', null);

    // a Bql where the drained proof goes
    // @ts-expect-error -- a Bql is not a drained proof
    await bdrvSnapshotCreate(bql, bql, node, info);
    // @ts-expect-error -- a Bql is not a drained proof
    await bdrvSnapshotGoto(bql, bql, node, 'snap1');
    // @ts-expect-error -- a Bql is not a drained proof
    await bdrvSnapshotDelete(bql, bql, node, '1', null);

    // a drained proof but no Bql
    // @ts-expect-error -- bdrvSnapshotCreate needs the BQL
    await bdrvSnapshotCreate(drained, node, info);
    // @ts-expect-error -- bdrvSnapshotGoto needs the BQL
    await bdrvSnapshotGoto(drained, node, 'snap1');
    // @ts-expect-error -- bdrvSnapshotDelete needs the BQL
    await bdrvSnapshotDelete(drained, node, '1', null);

    // a drained proof in the BQL's place
    // @ts-expect-error -- a drained proof is not a Bql
    await bdrvSnapshotGoto(drained, drained, node, 'snap1');
    // @ts-expect-error -- a drain-all proof is not a Bql
    await bdrvSnapshotGoto(all, all, node, 'snap1');

    // listing needs the BQL only
    await bdrvSnapshotList(bql, node);
    // @ts-expect-error -- bdrvSnapshotList needs the BQL
    await bdrvSnapshotList(node);
  }
  expectTypeOf(compileOnlySnapshots).toBeFunction();
});

// ---------------------------------------------------------------------------------------------
// graph changes, backends and IOThreads need the BQL

test('graph changes, backends, IOThreads and drain do not compile without the Bql, and detachChild not without a drained proof', () => {
  async function compileOnlyGraph(bql: Bql, node: BlockNode, child: BlockNode, edge: BdrvChild, drained: Drained): Promise<void> {
    await openNode(bql, 'driver=memory,size=1M');
    await closeNode(bql, node);
    attachChild(bql, node, 'file', child);
    detachChild(bql, drained, edge);
    blkNew(bql, 'dev0', node);
    createIOThread(bql, 'io0');
    await drainedBegin(bql, node);

    // @ts-expect-error -- openNode needs the BQL
    await openNode('driver=memory,size=1M');
    // @ts-expect-error -- openNode needs the BQL, not a drained proof
    await openNode(drained, 'driver=memory,size=1M');
    // @ts-expect-error -- closeNode needs the BQL
    await closeNode(node);
    // @ts-expect-error -- attachChild needs the BQL
    attachChild(node, 'file', child);
    // @ts-expect-error -- detachChild needs the BQL
    detachChild(drained, edge);
    // @ts-expect-error -- blkNew needs the BQL
    blkNew('dev0', node);
    // @ts-expect-error -- createIOThread needs the BQL
    createIOThread('io0');
    // @ts-expect-error -- drainedBegin needs the BQL
    await drainedBegin(node);
    // @ts-expect-error -- drainAllBegin needs the BQL
    await drainAllBegin();
    // @ts-expect-error -- drainedEnd needs the BQL
    drainedEnd(drained);

    // detachChild also needs the parent drained
    // @ts-expect-error -- detachChild needs a drained proof
    detachChild(bql, edge);
    // @ts-expect-error -- a Bql is not a drained proof
    detachChild(bql, bql, edge);
  }
  expectTypeOf(compileOnlyGraph).toBeFunction();
});

// ---------------------------------------------------------------------------------------------
// proofs are nominal: only the lock and drain can make them

test('look-alike objects are not assignable to the proof types', () => {
  function compileOnlyForgery(node: BlockNode): void {
    // @ts-expect-error -- a look-alike object is not a Drained (private #live makes the class nominal)
    const d1: Drained = { live: true, node };
    // @ts-expect-error -- not even with every public member
    const d2: Drained = { live: true, node, revoke(): void {} };
    // @ts-expect-error -- an empty object is not a drain-all proof
    const d3: DrainedAll = {};
    // @ts-expect-error -- an empty object is not a Bql
    const b1: Bql = {};
    // @ts-expect-error -- a look-alike object is not a Bql
    const b2: Bql = { serial: 1, live: true };
    // @ts-expect-error -- not even with every public member
    const b3: Bql = { serial: 1, live: true, revoke(): void {} };
    // @ts-expect-error -- the constructor is private: only acquireBql mints a Bql
    const b4 = new Bql(1);
    // @ts-expect-error -- the constructor is private: only drainedBegin mints a Drained
    const d4 = new Drained(node);
    // @ts-expect-error -- the constructor is private: only drainAllBegin mints a DrainedAll
    const d5 = new DrainedAll();
    void [d1, d2, d3, d4, d5, b1, b2, b3, b4];
  }
  expectTypeOf(compileOnlyForgery).toBeFunction();
});

test('proof types are nominal and distinct from one another', () => {
  expectTypeOf<{ live: true; node: BlockNode }>().not.toExtend<Drained>();
  expectTypeOf<{ live: boolean; node: BlockNode; revoke(): void }>().not.toExtend<Drained>();
  expectTypeOf<{ live: boolean; revoke(): void }>().not.toExtend<DrainedAll>();
  expectTypeOf<{}>().not.toExtend<Bql>();
  expectTypeOf<{ serial: number; live: boolean }>().not.toExtend<Bql>();
  expectTypeOf<{ serial: number; live: boolean; revoke(): void }>().not.toExtend<Bql>();
  // Bql and DrainedAll have the same public shape apart from `serial`: only the private brand keeps them apart
  expectTypeOf<Bql>().not.toExtend<DrainedAll>();
  expectTypeOf<Bql>().not.toExtend<DrainedProof>();
  expectTypeOf<DrainedAll>().not.toExtend<Bql>();
  expectTypeOf<Drained>().not.toExtend<Bql>();
  // both drained proofs are accepted where a DrainedProof is asked for
  expectTypeOf<Drained>().toExtend<DrainedProof>();
  expectTypeOf<DrainedAll>().toExtend<DrainedProof>();
  // only acquiring the lock hands out a Bql, only draining hands out a Drained
  expectTypeOf(acquireBql).returns.toEqualTypeOf<Promise<Bql>>();
  expectTypeOf(withBql<number>).parameter(0).parameter(0).toEqualTypeOf<Bql>();
  expectTypeOf(drainedBegin).returns.toEqualTypeOf<Promise<Drained>>();
  expectTypeOf(drainAllBegin).returns.toEqualTypeOf<Promise<DrainedAll>>();
});

test('global-state functions take the Bql first and snapshot changes take a drained proof second', () => {
  expectTypeOf(bdrvSnapshotCreate).parameters.toEqualTypeOf<[Bql, DrainedProof, BlockNode, SnapshotInfo]>();
  expectTypeOf(bdrvSnapshotGoto).parameters.toEqualTypeOf<[Bql, DrainedProof, BlockNode, string]>();
  expectTypeOf(bdrvSnapshotDelete).parameters.toEqualTypeOf<[Bql, DrainedProof, BlockNode, string | null, string | null]>();
  expectTypeOf(detachChild).parameters.toEqualTypeOf<[Bql, DrainedProof, BdrvChild]>();
  expectTypeOf(openNode).parameter(0).toEqualTypeOf<Bql>();
  expectTypeOf(closeNode).parameter(0).toEqualTypeOf<Bql>();
  expectTypeOf(attachChild).parameter(0).toEqualTypeOf<Bql>();
  expectTypeOf(blkNew).parameter(0).toEqualTypeOf<Bql>();
  expectTypeOf(createIOThread).parameters.toEqualTypeOf<[Bql, string, IOThreadOptions?]>();
});

test('driver snapshot callbacks demand the BQL and a drained proof', () => {
  // a method with fewer parameters would still be assignable, so pin the declared parameter lists
  expectTypeOf<NonNullable<BlockDriverInstance['snapshotGoto']>>().parameters.toEqualTypeOf<[Bql, DrainedProof, string]>();
  expectTypeOf<NonNullable<BlockDriverInstance['snapshotCreate']>>().parameters.toEqualTypeOf<[Bql, DrainedProof, SnapshotInfo]>();
  expectTypeOf<NonNullable<BlockDriverInstance['snapshotDelete']>>().parameters.toEqualTypeOf<[Bql, DrainedProof, string | null, string | null]>();
  expectTypeOf<BlockDriverInstance['close']>().parameters.toEqualTypeOf<[Bql, DrainedProof]>();
  expectTypeOf<NonNullable<BlockDriverInstance['snapshotList']>>().parameters.toEqualTypeOf<[Bql]>();
  expectTypeOf<NonNullable<BlockDriverInstance['snapshotLoadTmp']>>().parameters.toEqualTypeOf<[Bql, string | null, string | null]>();
  expectTypeOf<BlockDriver['open']>().parameters.toEqualTypeOf<[Bql, BlockNode, NodeOptions]>();
});

test('I/O functions take no proof', () => {
  expectTypeOf(blkPread).parameters.toEqualTypeOf<[BlockBackend, number, Uint8Array]>();
  expectTypeOf(blkPwrite).parameters.toEqualTypeOf<[BlockBackend, number, Uint8Array, WriteFlags?]>();
  expectTypeOf(blkPwriteZeroes).parameters.toEqualTypeOf<[BlockBackend, number, number, WriteZeroesFlags?]>();
  expectTypeOf(blkPdiscard).parameters.toEqualTypeOf<[BlockBackend, number, number]>();
  expectTypeOf(bdrvPread).parameters.toEqualTypeOf<[BlockNode, number, Uint8Array]>();
  expectTypeOf(bdrvPwrite).parameters.toEqualTypeOf<[BlockNode, number, Uint8Array, WriteFlags?]>();
  expectTypeOf(bdrvPwriteZeroes).parameters.toEqualTypeOf<[BlockNode, number, number, WriteZeroesFlags?]>();
  expectTypeOf(bdrvPdiscard).parameters.toEqualTypeOf<[BlockNode, number, number]>();
  expectTypeOf<BlockDriverInstance['preadv']>().parameters.toEqualTypeOf<[number, Uint8Array]>();
  expectTypeOf<BlockDriverInstance['pwritev']>().parameters.toEqualTypeOf<[number, Uint8Array, WriteFlags?]>();
  expectTypeOf<BlockDriverInstance['pwriteZeroes']>().parameters.toEqualTypeOf<[number, number, WriteZeroesFlags]>();
});

test('I/O calls do not compile with a proof in front', () => {
  function compileOnlyIo(blk: BlockBackend, node: BlockNode, bql: Bql, drained: Drained): void {
    void blkPread(blk, 0, new Uint8Array(512));
    void bdrvPread(node, 0, new Uint8Array(512));
    // @ts-expect-error -- I/O functions take no Bql
    void blkPread(bql, blk, 0, new Uint8Array(512));
    // @ts-expect-error -- I/O functions take no drained proof
    void bdrvPwrite(drained, node, 0, new Uint8Array(512));
  }
  expectTypeOf(compileOnlyIo).toBeFunction();
});

test('group snapshot operations need Bql and a drain-all or per-disk set proof; a one-node proof does not do', () => {
  function compileOnlyGroup(bql: Bql, all: DrainedAll, set: DrainedSet, one: Drained, disks: GroupDisk[], info: SnapshotInfo): void {
    void bdrvAllCreateSnapshot(bql, all, disks, info, null);
    void bdrvAllCreateSnapshot(bql, set, disks, info, null);
    void bdrvAllGotoSnapshot(bql, all, disks, 's1');
    void bdrvAllDeleteSnapshot(bql, all, disks, 's1');
    // @ts-expect-error -- a drained section of one node is not a drain of all
    void bdrvAllCreateSnapshot(bql, one, disks, info, null);
    // @ts-expect-error -- no drain proof at all
    void bdrvAllGotoSnapshot(bql, disks, 's1');
    // @ts-expect-error -- no Bql
    void bdrvAllDeleteSnapshot(all, disks, 's1');
  }
  expectTypeOf(compileOnlyGroup).toBeFunction();
  expectTypeOf(bdrvAllCreateSnapshot).parameter(1).toEqualTypeOf<GroupDrained>();
  expectTypeOf(bdrvAllGotoSnapshot).parameter(1).toEqualTypeOf<GroupDrained>();
  expectTypeOf(bdrvAllDeleteSnapshot).parameter(1).toEqualTypeOf<GroupDrained>();
});

test('machine and VM snapshot calls need the Bql', () => {
  function compileOnlyMachine(bql: Bql, m: Machine): void {
    void saveVm(bql, m, 'tag');
    void loadVm(bql, m, 'tag');
    void delVm(bql, m, 'tag');
    void m.stop(bql);
    // @ts-expect-error -- savevm without the Big Lock
    void saveVm(m, 'tag');
    // @ts-expect-error -- stop without the Big Lock
    void m.stop();
  }
  expectTypeOf(compileOnlyMachine).toBeFunction();
});

// ---------------------------------------------------------------------------------------------
// issue 11, item 2: the functions that change metadata or global state carry their proofs

test('createQcow2OnNode needs the Bql and a drained proof, createQcow2File and shutdownIOThreads the Bql', () => {
  async function compileOnlyCreate(bql: Bql, d: Drained, all: DrainedAll, node: BlockNode, o: Qcow2CreateOptions): Promise<void> {
    await createQcow2OnNode(bql, d, node, o);
    await createQcow2OnNode(bql, all, node, o);
    createQcow2File(bql, '/tmp/x.qcow2', o);
    await shutdownIOThreads(bql);
    withBqlSync((b) => createQcow2File(b, '/tmp/x.qcow2', o));

    // @ts-expect-error -- formatting a node needs the BQL and a drained proof
    await createQcow2OnNode(node, o);
    // @ts-expect-error -- the BQL alone is not enough: the node must be quiet
    await createQcow2OnNode(bql, node, o);
    // @ts-expect-error -- a Bql is not a drained proof
    await createQcow2OnNode(bql, bql, node, o);
    // @ts-expect-error -- creating an image file needs the BQL
    createQcow2File('/tmp/x.qcow2', o);
    // @ts-expect-error -- a drained proof is not the BQL
    createQcow2File(d, '/tmp/x.qcow2', o);
    // @ts-expect-error -- stopping the IOThreads needs the BQL
    await shutdownIOThreads();
  }
  expectTypeOf(compileOnlyCreate).toBeFunction();
  expectTypeOf(createQcow2OnNode).parameters.toEqualTypeOf<[Bql, DrainedProof, BlockNode, Qcow2CreateOptions]>();
  expectTypeOf(createQcow2File).parameters.toEqualTypeOf<[Bql, string, Qcow2CreateOptions]>();
  expectTypeOf(shutdownIOThreads).parameters.toEqualTypeOf<[Bql]>();
  expectTypeOf(withBqlSync<number>).parameter(0).parameter(0).toEqualTypeOf<Bql>();
});

test('createRawFile and discardSnapshotStore (the file driver) need the Bql', () => {
  function compileOnlyFile(bql: Bql, d: Drained): void {
    createRawFile(bql, '/tmp/x.raw', 1 << 20);
    discardSnapshotStore(bql, '/tmp/x.raw');
    // @ts-expect-error -- creating an image file needs the BQL
    createRawFile('/tmp/x.raw', 1 << 20);
    // @ts-expect-error -- a drained proof is not the BQL
    createRawFile(d, '/tmp/x.raw', 1 << 20);
    // @ts-expect-error -- removing a snapshot store needs the BQL
    discardSnapshotStore('/tmp/x.raw');
  }
  expectTypeOf(compileOnlyFile).toBeFunction();
  expectTypeOf(createRawFile).parameter(0).toEqualTypeOf<Bql>();
  expectTypeOf(discardSnapshotStore).parameter(0).toEqualTypeOf<Bql>();
});

test('driver open and close take the proofs the block layer checks before calling them', () => {
  expectTypeOf<BlockDriver['open']>().parameter(0).toEqualTypeOf<Bql>();
  expectTypeOf<BlockDriverInstance['close']>().parameter(0).toEqualTypeOf<Bql>();
  expectTypeOf<BlockDriverInstance['close']>().parameter(1).toEqualTypeOf<DrainedProof>();
  function compileOnlyCallbacks(bql: Bql, d: Drained, inst: BlockDriverInstance, drv: BlockDriver, node: BlockNode): void {
    void inst.close(bql, d);
    void drv.open(bql, node, {});
    // @ts-expect-error -- close needs a drained proof
    void inst.close(bql);
    // @ts-expect-error -- open needs the BQL
    void drv.open(node, {});
  }
  expectTypeOf(compileOnlyCallbacks).toBeFunction();
});

test('only the lock and drain revoke proofs: revoke() is not public', () => {
  function compileOnlyRevoke(bql: Bql, d: Drained, all: DrainedAll): void {
    // @ts-expect-error -- a Bql cannot be revoked from outside bql.ts
    bql.revoke();
    // @ts-expect-error -- a drained proof cannot be revoked from outside drain.ts
    d.revoke();
    // @ts-expect-error -- nor a drain-all proof
    all.revoke();
    // @ts-expect-error -- liveness is read-only
    bql.live = false;
    // @ts-expect-error -- a proof's node is fixed
    d.node = d.node;
  }
  expectTypeOf(compileOnlyRevoke).toBeFunction();
  expectTypeOf<Bql>().not.toHaveProperty('revoke');
  expectTypeOf<Drained>().not.toHaveProperty('revoke');
  expectTypeOf<DrainedAll>().not.toHaveProperty('revoke');
});

test("nodes' and backends' counters, parents, children and instance are readonly outside the block layer's core", () => {
  function compileOnlyCounters(node: BlockNode, blk: BlockBackend, edge: BdrvChild): void {
    const seen: number = node.inFlight + node.quiesceCounter + node.parents.size + node.children.length + blk.inFlight + blk.quiesceCounter;
    void seen;
    // @ts-expect-error -- inFlight is counted by the request path only
    node.inFlight = 0;
    // @ts-expect-error -- nor incremented
    node.inFlight++;
    // @ts-expect-error -- quiesceCounter belongs to drain
    node.quiesceCounter = 0;
    // @ts-expect-error -- nor decremented
    node.quiesceCounter--;
    // @ts-expect-error -- parents are linked by graph.ts and backend.ts
    node.parents.add(edge);
    // @ts-expect-error -- nor removed
    node.parents.delete(edge);
    // @ts-expect-error -- nor cleared
    node.parents.clear();
    // @ts-expect-error -- children are linked by graph.ts
    node.children.push(edge);
    // @ts-expect-error -- nor cut
    node.children.splice(0, 1);
    // @ts-expect-error -- the instance is set by open and cleared by close
    node.instance = null;
    // @ts-expect-error -- quiescing is drain's (drainedBegin), not a public method
    node.quiesce();
    // @ts-expect-error -- a backend's in-flight count is its own
    blk.inFlight = 0;
    // @ts-expect-error -- so is its quiesce counter
    blk.quiesceCounter = 0;
    // @ts-expect-error -- its queue cannot be pushed to from outside
    blk.queued.push(() => {});
    // @ts-expect-error -- its root changes only through blkNew / blkDelete
    blk.root = null;
  }
  expectTypeOf(compileOnlyCounters).toBeFunction();
  expectTypeOf<BlockNode['parents']>().toEqualTypeOf<ReadonlySet<import('../src/block/node.js').DrainParent>>();
  expectTypeOf<BlockNode['children']>().toEqualTypeOf<readonly BdrvChild[]>();
});

test('the public API exports none of the internal mutators', () => {
  expectTypeOf<typeof PublicApi>().not.toHaveProperty('nodeRequestBegin');
  expectTypeOf<typeof PublicApi>().not.toHaveProperty('nodeRequestEnd');
  expectTypeOf<typeof PublicApi>().not.toHaveProperty('nodeQuiesce');
  expectTypeOf<typeof PublicApi>().not.toHaveProperty('nodeUnquiesce');
  expectTypeOf<typeof PublicApi>().not.toHaveProperty('nodeLinkEdge');
  expectTypeOf<typeof PublicApi>().not.toHaveProperty('nodeUnlinkEdge');
  expectTypeOf<typeof PublicApi>().not.toHaveProperty('nodeSetParent');
  expectTypeOf<typeof PublicApi>().not.toHaveProperty('nodeSetInstance');
  expectTypeOf<typeof PublicApi>().not.toHaveProperty('gateRunAsOwner');
  expectTypeOf<typeof PublicApi>().not.toHaveProperty('gateSectionBegin');
  expectTypeOf<typeof PublicApi>().not.toHaveProperty('gateSectionEnd');
});

// ---------------------------------------------------------------------------------------------
// issue 11, item 3: owning a section is a proof too; the request path stays proof-free

test("doing I/O as a section's owner needs the Bql and a live proof; requests still take no proof", () => {
  async function compileOnlyOwner(bql: Bql, d: Drained, all: DrainedAll, node: BlockNode): Promise<void> {
    await runInDrainedSection(bql, d, () => bdrvPwrite(node, 0, new Uint8Array(512)));
    await runInDrainedSection(bql, all, () => bdrvPread(node, 0, new Uint8Array(512)));
    await withDrained(bql, node, (proof) => runInDrainedSection(bql, proof, () => 1));
    // @ts-expect-error -- owning a section needs the BQL
    await runInDrainedSection(d, () => 1);
    // @ts-expect-error -- and a drained proof, not just the BQL
    await runInDrainedSection(bql, () => 1);
    // @ts-expect-error -- a Bql is not a drained proof
    await runInDrainedSection(bql, bql, () => 1);
  }
  expectTypeOf(compileOnlyOwner).toBeFunction();
  expectTypeOf(runInDrainedSection<number>).parameters.toEqualTypeOf<[Bql, DrainedProof, () => Promise<number> | number]>();
  // the gate is on the request path: it takes the node and the operation's name, no proof
  expectTypeOf(gateRequest).parameters.toEqualTypeOf<[BlockNode, string]>();
  expectTypeOf(withDrained<void>).parameter(2).parameter(0).toEqualTypeOf<Drained>();
});

// ---------------------------------------------------------------------------------------------
// issue 11, item 4: node identity is a run-time check, said so in the types

test('Drained has no node type parameter: which node a proof covers is checked at run time', () => {
  // @ts-expect-error -- Drained is not generic: TypeScript gives every node the same type, so a
  // parameter could not tell node A's proof from node B's (the old Drained<N> never did)
  type Old = Drained<BlockNode>;
  function compileOnlyIdentity(bql: Bql, a: BlockNode, b: BlockNode, dA: Drained): void {
    // compiles, and throws EPERM at run time (test/locking-contract.test.ts, "a drained proof
    // for another node"): the types cannot see that dA covers a, not b
    void bdrvSnapshotGoto(bql, dA, b, 'snap1');
    void createQcow2OnNode(bql, dA, b, { sizeBytes: 1 << 20 });
    void a;
  }
  expectTypeOf(compileOnlyIdentity).toBeFunction();
  expectTypeOf<Drained['node']>().toEqualTypeOf<BlockNode>();
  expectTypeOf(drainedBegin).parameters.toEqualTypeOf<[Bql, BlockNode]>();
  expectTypeOf(drainedBegin).returns.toEqualTypeOf<Promise<Drained>>();
  void (0 as unknown as Old);
});

// ---------------------------------------------------------------------------------------------
// issue 12: every graph change of a running device takes the Bql and a drained-all proof

test('changing a backing child, replacing a node or a device root needs the Bql and DrainedAll', () => {
  async function compileOnlyGraphChange(bql: Bql, d: Drained, all: DrainedAll, blk: BlockBackend, a: BlockNode, b: BlockNode): Promise<void> {
    bdrvSetBacking(bql, all, a, b);
    bdrvSetBacking(bql, all, a, null);
    replaceNode(bql, all, a, b);
    blkReplaceRoot(bql, all, blk, b);
    await blockdevSnapshot(bql, blk, a); // drains by itself
    // @ts-expect-error -- a backing child changes only with every request drained
    bdrvSetBacking(bql, a, b);
    // @ts-expect-error -- one node's section does not cover the nodes above and below it
    bdrvSetBacking(bql, d, a, b);
    // @ts-expect-error -- and never without the BQL
    bdrvSetBacking(all, a, b);
    // @ts-expect-error -- replacing a node moves parents: drain-all
    replaceNode(bql, d, a, b);
    // @ts-expect-error -- a device's root moves only inside drain-all
    blkReplaceRoot(bql, blk, b);
    // @ts-expect-error -- the live snapshot takes the BQL
    await blockdevSnapshot(blk, a);
  }
  expectTypeOf(compileOnlyGraphChange).toBeFunction();
  expectTypeOf(bdrvSetBacking).parameters.toEqualTypeOf<[Bql, DrainedAll, BlockNode, BlockNode | null]>();
  expectTypeOf(replaceNode).parameters.toEqualTypeOf<[Bql, DrainedAll, BlockNode, BlockNode]>();
});

test('snapshot-lock code takes SnapshotLocked, never the Bql in its place; the lock is taken by name, not with a proof', () => {
  function compileOnlySnapshotLock(bql: Bql, snap: SnapshotLocked, m: Machine, set: DrainedSet): void {
    void saveVmLocked(snap, m, 'tag');
    void loadVmLocked(snap, m, 'tag', { devices: ['disk0'] });
    void delVmLocked(snap, m, 'tag');
    void runDrainedIo(snap, set, async () => 1);
    // @ts-expect-error -- the BQL is not the snapshot lock
    void saveVmLocked(bql, m, 'tag');
    // @ts-expect-error -- nor does the BQL stand in for it to do I/O on drained nodes
    void runDrainedIo(bql, set, async () => 1);
    // @ts-expect-error -- no proof at all
    void runDrainedIo(set, async () => 1);
    // @ts-expect-error -- the snapshot lock is not the BQL either
    void saveVm(snap, m, 'tag');
    // @ts-expect-error -- acquiring takes an owner's name: there is no proof to pass, so no way to ask for it "with" the BQL
    void acquireSnapshotLock(bql);
  }
  expectTypeOf(compileOnlySnapshotLock).toBeFunction();
  expectTypeOf(saveVmLocked).parameter(0).toEqualTypeOf<SnapshotLocked>();
  expectTypeOf(runDrainedIo).parameter(0).toEqualTypeOf<SnapshotLocked>();
  expectTypeOf(withSnapshotLock).parameter(1).parameter(0).toEqualTypeOf<SnapshotLocked>();
});

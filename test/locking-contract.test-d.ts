import { bdrvAllCreateSnapshot, bdrvAllDeleteSnapshot, bdrvAllGotoSnapshot, type GroupDisk } from '../src/block/snapshot-group.js';
import { Machine } from '../src/machine/machine.js';
import { delVm, loadVm, saveVm } from '../src/machine/savevm.js';
/**
 * The locking contract at compile time: a call made without the proofs its signature demands must
 * not compile. Every `@ts-expect-error` below is a call that has to be refused; if one compiles,
 * tsc reports the directive as unused and this file fails.
 *
 * The functions named `compileOnly*` are never called: they exist to be type-checked.
 */
import { expectTypeOf, test } from 'vitest';
import {
  blkNew,
  blkPdiscard,
  blkPread,
  blkPwrite,
  blkPwriteZeroes,
  type BlockBackend,
} from '../src/block/backend.js';
import { acquireBql, Bql, withBql } from '../src/block/bql.js';
import {
  drainAllBegin,
  drainedBegin,
  drainedEnd,
  Drained,
  DrainedAll,
  type DrainedProof,
} from '../src/block/drain.js';
import type { BlockDriver, BlockDriverInstance, SnapshotInfo, WriteZeroesFlags } from '../src/block/driver.js';
import { attachChild, closeNode, detachChild, openNode } from '../src/block/graph.js';
import { bdrvPdiscard, bdrvPread, bdrvPwrite, bdrvPwriteZeroes } from '../src/block/io.js';
import { createIOThread, type IOThreadOptions } from '../src/block/iothread.js';
import type { BdrvChild, BlockNode } from '../src/block/node.js';
import type { NodeOptions } from '../src/block/options.js';
import { bdrvSnapshotCreate, bdrvSnapshotDelete, bdrvSnapshotGoto, bdrvSnapshotList } from '../src/block/snapshot.js';

declare const info: SnapshotInfo;

// ---------------------------------------------------------------------------------------------
// snapshot operations need the BQL and a drained proof

test('snapshot create, goto and delete do not compile without the Bql and a drained proof', () => {
  async function compileOnlySnapshots(bql: Bql, node: BlockNode, drained: Drained<BlockNode>, all: DrainedAll): Promise<void> {
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
  async function compileOnlyGraph(bql: Bql, node: BlockNode, child: BlockNode, edge: BdrvChild, drained: Drained<BlockNode>): Promise<void> {
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
    const d1: Drained<BlockNode> = { live: true, node };
    // @ts-expect-error -- not even with every public member
    const d2: Drained<BlockNode> = { live: true, node, revoke(): void {} };
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
  expectTypeOf<{ live: true; node: BlockNode }>().not.toExtend<Drained<BlockNode>>();
  expectTypeOf<{ live: boolean; node: BlockNode; revoke(): void }>().not.toExtend<Drained<BlockNode>>();
  expectTypeOf<{ live: boolean; revoke(): void }>().not.toExtend<DrainedAll>();
  expectTypeOf<{}>().not.toExtend<Bql>();
  expectTypeOf<{ serial: number; live: boolean }>().not.toExtend<Bql>();
  expectTypeOf<{ serial: number; live: boolean; revoke(): void }>().not.toExtend<Bql>();
  // Bql and DrainedAll have the same public shape apart from `serial`: only the private brand keeps them apart
  expectTypeOf<Bql>().not.toExtend<DrainedAll>();
  expectTypeOf<Bql>().not.toExtend<DrainedProof>();
  expectTypeOf<DrainedAll>().not.toExtend<Bql>();
  expectTypeOf<Drained<BlockNode>>().not.toExtend<Bql>();
  // both drained proofs are accepted where a DrainedProof is asked for
  expectTypeOf<Drained<BlockNode>>().toExtend<DrainedProof>();
  expectTypeOf<DrainedAll>().toExtend<DrainedProof>();
  // only acquiring the lock hands out a Bql, only draining hands out a Drained
  expectTypeOf(acquireBql).returns.toEqualTypeOf<Promise<Bql>>();
  expectTypeOf(withBql<number>).parameter(0).parameter(0).toEqualTypeOf<Bql>();
  expectTypeOf(drainedBegin<BlockNode>).returns.toEqualTypeOf<Promise<Drained<BlockNode>>>();
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
  expectTypeOf(blkPwrite).parameters.toEqualTypeOf<[BlockBackend, number, Uint8Array]>();
  expectTypeOf(blkPwriteZeroes).parameters.toEqualTypeOf<[BlockBackend, number, number, WriteZeroesFlags?]>();
  expectTypeOf(blkPdiscard).parameters.toEqualTypeOf<[BlockBackend, number, number]>();
  expectTypeOf(bdrvPread).parameters.toEqualTypeOf<[BlockNode, number, Uint8Array]>();
  expectTypeOf(bdrvPwrite).parameters.toEqualTypeOf<[BlockNode, number, Uint8Array]>();
  expectTypeOf(bdrvPwriteZeroes).parameters.toEqualTypeOf<[BlockNode, number, number, WriteZeroesFlags?]>();
  expectTypeOf(bdrvPdiscard).parameters.toEqualTypeOf<[BlockNode, number, number]>();
  expectTypeOf<BlockDriverInstance['preadv']>().parameters.toEqualTypeOf<[number, Uint8Array]>();
  expectTypeOf<BlockDriverInstance['pwritev']>().parameters.toEqualTypeOf<[number, Uint8Array]>();
  expectTypeOf<BlockDriverInstance['pwriteZeroes']>().parameters.toEqualTypeOf<[number, number, WriteZeroesFlags]>();
});

test('I/O calls do not compile with a proof in front', () => {
  function compileOnlyIo(blk: BlockBackend, node: BlockNode, bql: Bql, drained: Drained<BlockNode>): void {
    void blkPread(blk, 0, new Uint8Array(512));
    void bdrvPread(node, 0, new Uint8Array(512));
    // @ts-expect-error -- I/O functions take no Bql
    void blkPread(bql, blk, 0, new Uint8Array(512));
    // @ts-expect-error -- I/O functions take no drained proof
    void bdrvPwrite(drained, node, 0, new Uint8Array(512));
  }
  expectTypeOf(compileOnlyIo).toBeFunction();
});

test('group snapshot operations need Bql and a drain-all proof; a one-node proof does not do', () => {
  function compileOnlyGroup(bql: Bql, all: DrainedAll, one: Drained<BlockNode>, disks: GroupDisk[], info: SnapshotInfo): void {
    void bdrvAllCreateSnapshot(bql, all, disks, info, null);
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
  expectTypeOf(bdrvAllCreateSnapshot).parameter(1).toEqualTypeOf<DrainedAll>();
  expectTypeOf(bdrvAllGotoSnapshot).parameter(1).toEqualTypeOf<DrainedAll>();
  expectTypeOf(bdrvAllDeleteSnapshot).parameter(1).toEqualTypeOf<DrainedAll>();
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

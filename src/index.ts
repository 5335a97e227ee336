/**
 * snapstack: a block-device stack for Node.js modelled on QEMU's block layer.
 *
 * The easy API is `openImage` / `Image` (src/image.ts). The block layer itself (nodes, backends,
 * the BQL, drain, IOThreads, snapshots) is exported too, each function with its locking contract
 * in its signature; docs/locking.md lists them.
 */
import './drivers/index.js';

export { Image, openImage, type OpenImageOptions } from './image.js';
export { BlockError, ERROR_CODES, isBlockError, type ErrorCode } from './block/errors.js';
export { Bql, acquireBql, releaseBql, tryAcquireBql, withBql, withBqlSync, assertBql } from './block/bql.js';
export { Drained, DrainedAll, drainedBegin, drainedEnd, drainAllBegin, drainAllEnd, withDrained, withDrainedAll, runInDrainedSection, assertDrained, type DrainedProof } from './block/drain.js';
export { BlockNode, BdrvChild, type ChildRole } from './block/node.js';
export {
  BlockBackend,
  blkNew,
  blkFind,
  blkList,
  blkDelete,
  blkPread,
  blkPwrite,
  blkPwriteZeroes,
  blkPdiscard,
  blkFlush,
  blkGetLength,
  blkTruncate,
  blkReplaceRoot,
} from './block/backend.js';
export { bdrvPread, bdrvPwrite, bdrvPwriteZeroes, bdrvPdiscard, bdrvFlush, bdrvGetLength, bdrvTruncate } from './block/io.js';
export { openNode, closeNode, findNode, listNodes, attachChild, detachChild } from './block/graph.js';
export { IOThread, type IOThreadOptions, createIOThread, findIOThread, listIOThreads, destroyIOThread, shutdownIOThreads } from './block/iothread.js';
export { blockdevSnapshot } from './block/external-snapshot.js';
export { resolveBackingFilename } from './block/backing.js';
export { snapshotBlkdev, type SnapshotBlkdevOptions } from './commands/snapshot-blkdev.js';
export { queryBlock, queryNamedBlockNodes, formatInfoBlock, type NodeInfo, type BackendInfo } from './block/query.js';
export { bdrvCanSnapshot, bdrvSnapshotCreate, bdrvSnapshotGoto, bdrvSnapshotDelete, bdrvSnapshotList, bdrvSnapshotLoadTmp } from './block/snapshot.js';
export { registerDriver, findDriver, type BlockDriver, type BlockDriverInstance, type SnapshotInfo, type WriteFlags, type WriteZeroesFlags } from './block/driver.js';
export { parseOptions, parseSize, type NodeOptions } from './block/options.js';
export { createRawFile } from './drivers/file/driver.js';
export { createQcow2File, type Qcow2CreateOptions } from './drivers/qcow2/create.js';
export { checkQcow2File } from './cli/img-check.js';
export { Machine, type MachineOptions, type MachineDisk, type RunState, type GuestCounters } from './machine/machine.js';
export { saveVm, loadVm, delVm, listVmSnapshots, defaultSnapshotTag, recoverVmSnapshots, VmSnapshotError, type SavevmResult, type LoadvmResult, type SnapshotReport } from './machine/savevm.js';
export {
  bdrvAllCanSnapshot,
  bdrvAllCreateSnapshot,
  bdrvAllDeleteSnapshot,
  bdrvAllFindSnapshots,
  bdrvAllFindVmstateDisk,
  bdrvAllGotoSnapshot,
  bdrvAllResolveSnapshot,
  GroupCreateError,
  type GroupDisk,
} from './block/snapshot-group.js';
export { bdrvSaveVmstate, bdrvLoadVmstate, bdrvBlockStatus } from './block/io.js';
export { saveVmLocked, loadVmLocked, delVmLocked, type VmSnapshotOptions } from './machine/savevm.js';
export { acquireSnapshotLock, releaseSnapshotLock, trySnapshotLock, withSnapshotLock, SnapshotLocked } from './block/snapshot-lock.js';
export { QmpServer, type QmpListenAddress, type QmpServerOptions } from './qmp/server.js';
export { QmpClient } from './qmp/client.js';
export { qmpCommands } from './qmp/command-table.js';
export { QmpError, type QmpCommand, type QmpContext, type QmpValue, type QmpObject } from './qmp/types.js';
export { NbdServer, type NbdExport, type NbdListenAddress } from './nbd/server.js';

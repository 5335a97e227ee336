/**
 * The driver interface: what every format (raw, qcow2) and protocol (file, memory) driver
 * implements, and the registry through which drivers make themselves known (block/ never imports
 * a driver by name).
 *
 * Each callback's signature carries its locking contract, as QEMU's BlockDriver groups its
 * callbacks into global-state and I/O ones:
 * - I/O callbacks take no proof: they run at any time, alongside other requests on the node.
 * - Global-state callbacks take `Bql`; those that need a quiet node also take a drained proof.
 *
 * The block layer checks the proofs before a driver sees them: at open it seals each instance's
 * proof-taking callbacks (graph.ts), so that any call, from the block layer or from code holding
 * `node.instance`, first asserts the BQL and a live drained proof covering that node, then runs
 * the callback as the section's owner (its node-level I/O reaches the drained nodes; see
 * request-gate.ts). `open` is called only with the BQL asserted. A driver may check again.
 */
import type { Bql } from './bql.js';
import type { CheckFix, CheckResult } from './check.js';
import type { DrainedProof } from './drain.js';
import { BlockError } from './errors.js';
import type { BlockNode } from './node.js';
import type { NodeOptions } from './options.js';

/** One internal snapshot as the block layer lists it (QEMU's QEMUSnapshotInfo). */
export interface SnapshotInfo {
  id: string;
  name: string;
  vmStateSize: number;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: number;
  /** Instruction count, or -1 when none was recorded. */
  icount: number;
}

/** Flags of a write request (QEMU's BdrvRequestFlags for writes). */
export interface WriteFlags {
  /**
   * Force unit access (BDRV_REQ_FUA): the written bytes are durable when the request completes.
   * A driver that does not set `supportsFua` never sees it: the block layer writes, then flushes
   * the node, as QEMU's bdrv_driver_pwritev does.
   */
  fua?: boolean;
}

/** Flags of a write-zeroes request. */
export interface WriteZeroesFlags extends WriteFlags {
  /** The driver may deallocate the range instead of writing zeros (BDRV_REQ_MAY_UNMAP). */
  mayUnmap?: boolean;
}

/** What a range of a node holds (QEMU's block status): data, zeros, where it lives in `file`. */
export interface BlockStatus {
  /** Bytes from the queried offset that share this status (at least 1). */
  bytes: number;
  /** Read from storage (not known to be zero without reading). */
  data: boolean;
  /** Known to read as zeros. */
  zero: boolean;
  /** Allocated in this node (data or a zero flag), not merely absent (QEMU's `present`). */
  allocated: boolean;
  /** Offset in the node's `file` child where the bytes lie contiguously, or null (unallocated, compressed). */
  hostOffset: number | null;
}

/** A driver instance: the state of one open node, with its callbacks. */
export interface BlockDriverInstance {
  /**
   * Reads `buf.length` bytes at `offset` into `buf` (ranges already checked by the block layer).
   * @locking io
   */
  preadv(offset: number, buf: Uint8Array): Promise<void>;
  /**
   * Writes `buf` at `offset`. `flags.fua` reaches the driver only when it sets `supportsFua`.
   * @locking io
   */
  pwritev(offset: number, buf: Uint8Array, flags?: WriteFlags): Promise<void>;
  /**
   * The driver honours `fua` in pwritev and pwriteZeroes itself (the NBD client sends
   * NBD_CMD_FLAG_FUA; raw passes it to its file). Absent or false: the block layer emulates FUA
   * with a flush of the node after the write (QEMU's supported_write_flags).
   * @locking io
   */
  readonly supportsFua?: boolean;
  /**
   * Writes whole clusters compressed (qemu-img convert -c): `offset` and `buf.length` are
   * cluster-aligned, except that the last cluster of the disk may be short.
   * @locking io
   */
  pwriteCompressed?(offset: number, buf: Uint8Array): Promise<void>;
  /**
   * Makes `bytes` bytes at `offset` read as zeros.
   * @locking io
   */
  pwriteZeroes(offset: number, bytes: number, flags: WriteZeroesFlags): Promise<void>;
  /**
   * Tells the driver the range is no longer needed; it may ignore the hint.
   * @locking io
   */
  pdiscard(offset: number, bytes: number): Promise<void>;
  /**
   * Makes completed writes durable.
   * @locking io
   */
  flush(): Promise<void>;
  /**
   * The node's current length in bytes.
   * @locking io
   */
  getLength(): number;
  /**
   * Changes the node's length; new bytes read as zeros.
   * @locking io
   */
  truncate(sizeBytes: number): Promise<void>;
  /**
   * Writes VM-state bytes at `pos` of the node's VM-state area (beyond the guest disk).
   * @locking io
   */
  saveVmstate?(buf: Uint8Array, pos: number): Promise<void>;
  /**
   * Reads VM-state bytes at `pos` of the node's VM-state area.
   * @locking io
   */
  loadVmstate?(buf: Uint8Array, pos: number): Promise<void>;
  /**
   * Closes the instance and releases what it holds (fds, caches). The node is quiet.
   * @locking global-state
   */
  close(bql: Bql, drained: DrainedProof): Promise<void>;
  /**
   * Creates an internal snapshot named `info.name`; the driver assigns the ID.
   * @locking global-state
   */
  snapshotCreate?(bql: Bql, drained: DrainedProof, info: SnapshotInfo): Promise<SnapshotInfo>;
  /**
   * Reverts the node to the snapshot with this ID or name (ID first).
   * @locking global-state
   */
  snapshotGoto?(bql: Bql, drained: DrainedProof, idOrName: string): Promise<void>;
  /**
   * Deletes the first snapshot matching `id` and `name` (a null one is not compared).
   * @locking global-state
   */
  snapshotDelete?(bql: Bql, drained: DrainedProof, id: string | null, name: string | null): Promise<SnapshotInfo>;
  /**
   * Lists the node's snapshots in table order.
   * @locking global-state
   */
  snapshotList?(bql: Bql): Promise<SnapshotInfo[]>;
  /**
   * Makes the read-only node show a snapshot's contents instead of the active state.
   * @locking global-state
   */
  snapshotLoadTmp?(bql: Bql, id: string | null, name: string | null): Promise<void>;
  /**
   * The status of the range starting at `offset` (at most `bytes` long); without it the block
   * layer treats everything as data at the same offset of the `file` child.
   * @locking io
   */
  blockStatus?(offset: number, bytes: number): Promise<BlockStatus>;
  /**
   * Format-specific data for query-named-block-nodes and `img info` (`{ type, data }`).
   * @locking io
   */
  formatSpecific?(): Record<string, unknown>;
  /**
   * The backing file the image's own metadata names (qcow2's header), and its format when the
   * image records it; null when the image names none. The block layer opens it as the node's
   * `backing` child unless the node's options say otherwise.
   * @locking io
   */
  backingFile?(): { filename: string; format: string | null } | null;
  /**
   * Rewrites the backing file name (and its format; null: none) that the image records, as QEMU's
   * bdrv_change_backing_file; crash-safe: the old name or the new one, never a mix. The graph's
   * backing child is the block layer's business (graph-change.ts). The node is quiet.
   * @locking global-state
   */
  changeBackingFile?(bql: Bql, drained: DrainedProof, filename: string | null, format: string | null): Promise<void>;
  /**
   * Makes every guest cluster unallocated (reads fall through to the backing file again), as
   * QEMU's bdrv_make_empty after `qemu-img commit`; the node is quiet.
   * @locking global-state
   */
  makeEmpty?(bql: Bql, drained: DrainedProof): Promise<void>;
  /**
   * The format's cluster size in bytes, when it has one (`img info` prints it).
   * @locking io
   */
  clusterSize?(): number;
  /**
   * Checks the image's metadata as qemu-img check does and repairs what `fix` asks for; the node
   * is quiet (block/check.ts's bdrvCheck is the entry point).
   * @locking global-state
   */
  checkImage?(bql: Bql, drained: DrainedProof, fix: CheckFix): Promise<CheckResult>;
}

/** A driver: its name, how to recognise its images, and how to open (and create) them. */
export interface BlockDriver {
  readonly formatName: string;
  /**
   * Protocol drivers reach storage; format drivers interpret a child's bytes; filters sit on a
   * `file` child and pass its bytes through (its length and growth included), like blkdebug.
   */
  readonly kind: 'protocol' | 'format' | 'filter';
  /**
   * For protocol drivers reached through a file name: the prefixes before ':' that select them
   * (`nbd`, `nbd+unix`), as QEMU's protocol_name.
   */
  readonly protocolNames?: readonly string[];
  /**
   * For format drivers: 0..100, how sure the first bytes of a file are this format.
   * @locking common
   */
  probe?(header: Uint8Array, filename: string): number;
  /**
   * Opens an instance on `node` (for a format driver its `file` child is already attached).
   * @locking global-state
   */
  open(bql: Bql, node: BlockNode, opts: NodeOptions): Promise<BlockDriverInstance>;
}

const registry = new Map<string, BlockDriver>();

/**
 * Makes a driver known under its format name; drivers call this when their module loads.
 * @locking common
 */
export function registerDriver(drv: BlockDriver): void {
  const existing = registry.get(drv.formatName);
  if (existing !== undefined && existing !== drv) {
    throw new BlockError('EINVAL', `driver '${drv.formatName}' is registered twice`, { field: 'driver', value: drv.formatName });
  }
  registry.set(drv.formatName, drv);
}

/**
 * Looks a driver up by name; ENOENT with the list of known drivers otherwise.
 * @locking common
 */
export function findDriver(name: string): BlockDriver {
  const drv = registry.get(name);
  if (drv === undefined) {
    const known = [...registry.keys()].sort().join(', ');
    throw new BlockError('ENOENT', `Unknown driver '${name}' (known: ${known})`, { field: 'driver', value: name });
  }
  return drv;
}

/**
 * The protocol driver a file name selects by its prefix (`nbd://h/e` -> nbd), or null for a host
 * file, as QEMU's bdrv_find_protocol; a prefix no driver claims is a host file's name.
 * @locking common
 */
export function findProtocolDriver(filename: string): BlockDriver | null {
  const m = /^([A-Za-z][A-Za-z0-9+.-]*):/.exec(filename);
  if (m === null) return null;
  const prefix = m[1] ?? '';
  for (const drv of registry.values()) if (drv.kind === 'protocol' && drv.protocolNames?.includes(prefix) === true) return drv;
  return null;
}

/**
 * The registered format drivers that can probe, for format detection.
 * @locking common
 */
export function probingDrivers(): BlockDriver[] {
  return [...registry.values()].filter((d) => d.kind === 'format' && d.probe !== undefined);
}

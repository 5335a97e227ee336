/**
 * Compressed cluster writes (qemu-img convert -c): deflate each cluster, store it in sectors.
 * UNFINISHED: a placeholder until its implementation lands (refuses with ENOTSUP).
 */
import { BlockError } from '../../block/errors.js';
import type { Qcow2State } from './state.js';

/**
 * Writes whole clusters at `offset` compressed.
 * @locking io
 */
export async function qcow2WriteCompressed(s: Qcow2State, offset: number, buf: Uint8Array): Promise<void> {
  void offset;
  void buf;
  throw new BlockError('ENOTSUP', `qcow2 node '${s.node.nodeName}': compressed writes are not implemented yet`, { node: s.node.nodeName, op: 'write-compressed' });
}

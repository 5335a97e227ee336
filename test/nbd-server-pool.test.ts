/**
 * src/nbd/buffer-pool.ts: shared-memory buffers are reused, never handed out twice, and the free
 * list stays within its bound.
 */
import { describe, expect, it } from 'vitest';
import { MIN_POOLED_BYTES, SharedBufferPool } from '../src/nbd/buffer-pool.js';

describe('NBD shared buffer pool', () => {
  it('hands out exact-length views over shared memory of a power-of-two class', () => {
    const pool = new SharedBufferPool();
    const b = pool.get(100_000);
    expect(b.length).toBe(100_000);
    expect(b.buffer).toBeInstanceOf(SharedArrayBuffer);
    expect(b.buffer.byteLength).toBe(131072);
    expect(pool.get(1).buffer.byteLength).toBe(MIN_POOLED_BYTES);
  });

  it('reuses a released buffer, and one released twice is handed out once', () => {
    const pool = new SharedBufferPool();
    const a = pool.get(70_000);
    pool.release(a);
    pool.release(a);
    expect(pool.freeBytes).toBe(131072);
    const b = pool.get(80_000);
    const c = pool.get(80_000);
    expect(b.buffer).toBe(a.buffer);
    expect(c.buffer).not.toBe(a.buffer);
    expect(pool.freeBytes).toBe(0);
  });

  it('keeps at most maxFreeBytes free and ignores buffers it did not make', () => {
    const pool = new SharedBufferPool(200_000);
    const bufs = [pool.get(65536), pool.get(65536), pool.get(65536), pool.get(65536)];
    for (const b of bufs) pool.release(b);
    expect(pool.freeBytes).toBe(3 * 65536);
    pool.release(Buffer.alloc(65536));
    pool.release(bufs[0]?.subarray(16) ?? Buffer.alloc(0));
    expect(pool.freeBytes).toBe(3 * 65536);
  });
});

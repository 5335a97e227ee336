/**
 * The easy API called from JavaScript with the wrong types (the TypeScript signature does not
 * protect a JavaScript caller): a typed EINVAL naming the device and the argument, never V8's
 * TypeError/RangeError text, and the image keeps its bytes.
 */
import { describe, expect, it } from 'vitest';
import { BlockError } from '../src/block/errors.js';
import { openImage, type Image } from '../src/image.js';

/** Calls `img`'s method with arguments that bypass the types. */
function call(img: Image, method: 'read' | 'write' | 'writeZeroes', ...args: unknown[]): Promise<unknown> {
  const f = img[method] as (...a: unknown[]) => Promise<unknown>;
  return (async () => f.apply(img, args))();
}

describe('easy API arguments from JavaScript', () => {
  it('answers each wrong argument with a typed EINVAL and loses nothing', async () => {
    const img = await openImage('driver=memory,size=1M', { name: 'bad-args' });
    try {
      const data = new Uint8Array(4096).fill(0x5a);
      await img.write(0, data);
      const cases: Array<[string, unknown[], RegExp]> = [
        ['read', [0, new Uint8Array(4)], /length must be a non-negative integer \(got Uint8Array\)/],
        ['read', [0, -4], /length must be a non-negative integer \(got -4\)/],
        ['read', [0, 4, [1, 2, 3, 4]], /buffer must be a Uint8Array \(got Array\)/],
        ['read', [0, 1e12], /invalid range of 1000000000000 bytes at offset 0/],
        ['read', ['x', 4], /invalid range/],
        ['write', [0, 'hello'], /data must be a Uint8Array \(got string\)/],
        ['write', [0, null], /data must be a Uint8Array \(got null\)/],
        ['write', [Number.NaN, new Uint8Array(4)], /invalid range/],
        ['writeZeroes', [0, 'x'], /invalid range/],
      ];
      for (const [method, args, message] of cases) {
        const e = await call(img, method as 'read', ...args).then(
          () => null,
          (err: unknown) => err,
        );
        expect(e, `${method}(${args.map(String).join(', ')})`).toBeInstanceOf(BlockError);
        expect((e as BlockError).code).toBe('EINVAL');
        expect((e as BlockError).message).toMatch(/device 'bad-args'/);
        expect((e as BlockError).message).toMatch(message);
      }
      expect((await img.read(0, 4096)).every((b) => b === 0x5a)).toBe(true);
    } finally {
      await img.close();
    }
  });
});

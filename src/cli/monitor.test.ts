import { describe, expect, it } from 'vitest';
import { withBql } from '../block/bql.js';
import { listIOThreads } from '../block/iothread.js';
import { monitorMain } from './monitor.js';

async function refused(argv: string[]): Promise<string> {
  const errors: string[] = [];
  const status = await monitorMain(argv, () => undefined, (s) => errors.push(s));
  expect(status).toBe(1);
  expect(errors).toHaveLength(1);
  return errors[0] as string;
}

describe('snapstack monitor --object iothread', () => {
  it('refuses a poll-max-ns that is not a non-negative integer, naming it, and creates no IOThread', async () => {
    for (const bad of ['abc', '-1', '1.5']) {
      const e = await refused(['--object', `iothread,id=io-p,poll-max-ns=${bad}`]);
      expect(e).toContain('poll-max-ns');
      expect(e).toContain(bad);
    }
    await withBql((bql) => expect(listIOThreads(bql).map((t) => t.id)).not.toContain('io-p'));
  });

  it('refuses an unknown iothread property, naming it and the known ones', async () => {
    const e = await refused(['--object', 'iothread,id=io-q,poll-grow=2']);
    expect(e).toContain("'poll-grow'");
    expect(e).toContain('poll-max-ns');
  });
});

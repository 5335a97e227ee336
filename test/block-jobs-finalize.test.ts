/**
 * auto-finalize off (QMP's `auto-finalize: false`) on the stream and commit jobs: the job waits
 * in 'pending' with the graph unchanged until job-finalize, and job-cancel there aborts it with
 * the chain kept.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { blockCommit } from '../src/block/jobs/block-commit.js';
import { onJobEvent } from '../src/block/job.js';
import { blockStream } from '../src/block/stream.js';
import { openImage, shutdownIOThreads, withBql } from '../src/index.js';
import { describeInterop, qemu } from './helpers/qemu.js';

let dir: string;
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-finalize-'));
});
afterAll(async () => {
  fs.rmSync(dir, { recursive: true, force: true });
  await withBql((bql) => shutdownIOThreads(bql));
});

function chain(name: string): string {
  const base = path.join(dir, `${name}-base.qcow2`);
  const top = path.join(dir, `${name}-top.qcow2`);
  qemu('qemu-img', ['create', '-q', '-f', 'qcow2', base, '1M']);
  qemu('qemu-io', ['-c', 'write -P 7 0 64k', base]);
  qemu('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', path.basename(base), '-F', 'qcow2', top]);
  qemu('qemu-io', ['-c', 'write -P 9 128k 64k', top]);
  return top;
}

const backing = (file: string): string | undefined => (JSON.parse(qemu('qemu-img', ['info', '-U', '--output=json', file])) as { 'backing-filename'?: string })['backing-filename'];

describeInterop('block jobs without auto-finalize', () => {
  for (const kind of ['stream', 'commit'] as const) {
    it(`${kind}: waits in pending with the chain unchanged; job-finalize changes it, job-cancel there keeps it`, async () => {
      for (const how of ['finalize', 'cancel'] as const) {
        const top = chain(`${kind}-${how}`);
        const img = await openImage(kind === 'commit' ? `driver=qcow2,file=${top},backing.read-only=off` : top);
        const statuses: string[] = [];
        const off = onJobEvent((e) => void (e.id === `${kind}-${how}` && statuses.push(e.status)));
        try {
          const job = await withBql((bql) =>
            kind === 'stream'
              ? blockStream(bql, { jobId: `${kind}-${how}`, device: img.name, autoFinalize: false, autoDismiss: false })
              : blockCommit(bql, { jobId: `${kind}-${how}`, device: img.name, autoFinalize: false, autoDismiss: false }),
          );
          for (let i = 0; i < 500 && job.status !== 'pending' && job.status !== 'ready'; i++) await new Promise((r) => setTimeout(r, 5));
          if (job.status === 'ready') await withBql((bql) => job.complete(bql)); // an active commit
          for (let i = 0; i < 500 && job.status !== 'pending'; i++) await new Promise((r) => setTimeout(r, 5));
          expect(job.status).toBe('pending');
          await new Promise((r) => setTimeout(r, 50));
          expect(job.status, 'it stays pending until told').toBe('pending');
          expect((await img.info()).inserted?.backingFile).toBeDefined();
          await withBql((bql) => (how === 'finalize' ? job.finalize(bql) : job.cancel(bql)));
          await job.whenConcluded();
          expect(job.error).toBeNull();
          expect(statuses.slice(-2)).toEqual(how === 'finalize' ? ['pending', 'concluded'] : ['aborting', 'concluded']);
          const after = (await img.info()).inserted?.backingFile;
          if (how === 'finalize') expect(after, 'the chain changed after job-finalize').toBeUndefined();
          else expect(after, 'the chain is kept after job-cancel').toBeDefined();
          await withBql((bql) => job.dismiss(bql));
        } finally {
          off();
          await img.close();
        }
        if (how === 'cancel') expect(backing(top)).toBe(`${kind}-${how}-base.qcow2`);
        qemu('qemu-img', ['check', top]);
      }
    });
  }
});

/**
 * img bench against qemu-img 7.2 bench: the same output lines for the same options (the time
 * left out: no timing assertions), the same messages and exit statuses for refusals, and -w
 * writes the pattern where qemu-img's offsets and steps say (read back with qemu-img).
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { imgBench } from '../src/cli/img-bench.js';
import { describeInterop, qemu, qemuStatus } from './helpers/qemu.js';

let dir = '';
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-bench-'));
});
afterAll(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

async function bench(args: string[]): Promise<{ status: number; out: string[]; err: string[] }> {
  const out: string[] = [];
  const err: string[] = [];
  const status = await imgBench(args, (l) => out.push(...l.split('\n')), (l) => err.push(...l.split('\n')));
  return { status, out, err };
}

function lines(s: string): string[] {
  return s.split('\n').filter((l) => l !== '');
}

function ours(stderr: string): string[] {
  return lines(stderr).map((l) => l.replace(/^qemu-img: /, 'snapstack img: ').replace("Try 'qemu-img --help'", "Try 'snapstack img --help'"));
}

/** Output lines with the run time replaced, so that the two tools can be compared. */
function untimed(out: string[]): string[] {
  return out.map((l) => l.replace(/^Run completed in \d+\.\d{3} seconds\.$/, 'Run completed in T seconds.'));
}

describeInterop('img bench against qemu-img bench', () => {
  const images: Record<string, string> = {};
  beforeAll(() => {
    for (const fmt of ['qcow2', 'raw']) {
      const f = path.join(dir, `disk.${fmt}`);
      qemu('qemu-img', ['create', '-f', fmt, f, '8M']);
      images[fmt] = f;
    }
  });

  const cases: string[][] = [
    ['-c', '200', '-d', '4'],
    ['-c', '0'],
    ['-c', '100', '-s', '1M', '-S', '0'],
    ['-c', '50', '-o', '7M', '-s', '512k'],
    ['-w', '-c', '40', '-d', '2', '--flush-interval=4'],
    ['-w', '-c', '40', '-d', '2', '--flush-interval', '8', '--no-drain'],
    ['-c', '30', '-i', 'threads', '-t', 'writeback', '-U'],
    ['-q', '-c', '10'],
    ['-c10', '-d0x8'],
  ];
  for (const fmt of ['qcow2', 'raw']) {
    for (const extra of cases) {
      it(`${fmt}: ${extra.join(' ')} prints qemu-img's lines`, async () => {
        const f = images[fmt] as string;
        const q = qemuStatus('qemu-img', ['bench', '-f', fmt, ...extra, f]);
        const m = await bench(['-f', fmt, ...extra, f]);
        expect(m.status).toBe(q.status);
        expect(m.err).toEqual(ours(q.stderr));
        expect(untimed(m.out)).toEqual(untimed(lines(q.stdout)));
        if (!extra.includes('-q')) expect(m.out[m.out.length - 1]).toMatch(/^Run completed in \d+\.\d{3} seconds\.$/);
      });
    }
  }

  it('-w writes the pattern at offset, offset + step, ... through the block layer (read back by qemu-img)', async () => {
    for (const fmt of ['qcow2', 'raw']) {
      const f = path.join(dir, `pattern.${fmt}`);
      qemu('qemu-img', ['create', '-f', fmt, f, '4M']);
      const m = await bench(['-w', '-f', fmt, '-c', '20', '-d', '3', '-s', '4k', '-S', '12k', '-o', '8k', '--pattern=0xa5', f]);
      expect(m.status).toBe(0);
      expect(qemuStatus('qemu-img', ['check', f]).status).toBe(fmt === 'qcow2' ? 0 : 63);
      const raw = path.join(dir, `pattern-${fmt}.raw`);
      qemu('qemu-img', ['convert', '-f', fmt, '-O', 'raw', f, raw]);
      const got = fs.readFileSync(raw);
      const want = Buffer.alloc(4 * 1024 * 1024);
      for (let k = 0; k < 20; k++) want.fill(0xa5, 8192 + k * 12288, 8192 + k * 12288 + 4096);
      expect(got.equals(want)).toBe(true);
    }
  });

  it("refusals: qemu-img's messages and exit statuses", async () => {
    const f = images['qcow2'] as string;
    const bad: string[][] = [
      ['-c', 'x', f],
      ['-c', '-1', f],
      ['-d', 'x', f],
      ['-s', 'x', f],
      ['-o', 'x', f],
      ['-S', 'x', f],
      ['--pattern=x', f],
      ['--pattern=256', f],
      ['-i', 'bad', f],
      ['-t', 'bad', f],
      ['--flush-interval=x', f],
      ['-x', f],
      [],
      [f, f],
      ['--flush-interval=64', f],
      ['-w', '--flush-interval=3', f],
      ['-n', f],
      ['-i', 'native', f],
      ['-c', '10', '-o', '8M', f],
    ];
    for (const args of bad) {
      const q = qemuStatus('qemu-img', ['bench', ...args]);
      const m = await bench(args);
      expect({ args, status: m.status, err: m.err, out: untimed(m.out) }).toEqual({ args, status: q.status, err: ours(q.stderr), out: untimed(lines(q.stdout)) });
    }
  });
});

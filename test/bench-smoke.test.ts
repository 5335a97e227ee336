/**
 * Smoke runs of the benchmark harness (bench/run.js, bench/compare.js) with tiny sizes and
 * runtimes: they must run to the end and report sane figures. No timed assertion: these are not
 * benchmarks, and the peers (qemu-img, fio) are used only when present.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { LatencyHistogram } from '../bench/lib/histogram.js';

let dir: string;
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-bench-smoke-'));
});
afterAll(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

function node(script: string, args: string[]) {
  return spawnSync(process.execPath, [path.resolve(script), ...args], { encoding: 'utf8', timeout: 50_000 });
}

interface Lat {
  min: number;
  p50: number;
  p99: number;
  p999: number;
  max: number;
}

function checkLatency(l: Lat): void {
  expect(l.min).toBeGreaterThan(0);
  expect(l.p50).toBeGreaterThanOrEqual(l.min);
  expect(l.p50).toBeLessThanOrEqual(l.p99);
  expect(l.p99).toBeLessThanOrEqual(l.p999);
  expect(l.p999).toBeLessThanOrEqual(l.max);
}

describe('bench/run.js', () => {
  for (const [driver, extra] of [
    ['raw', ['--rw', 'randread', '--iodepth', '4']],
    ['qcow2', ['--rw', 'randwrite', '--iodepth', '4']],
    ['raw', ['--rw', 'randrw', '--iodepth', '4', '--iothreads', '2', '--bs', '64k']],
  ] as const) {
    it(`--driver ${driver} ${extra.join(' ')} reports sane JSON and removes its image`, () => {
      const r = node('bench/run.js', ['--driver', driver, '--size', '8M', '--runtime', '0.2', ...extra, '--json']);
      expect(r.status, r.stderr).toBe(0);
      const j = JSON.parse(r.stdout);
      expect(j.tool).toBe('snapstack');
      expect(j.driver).toBe(driver);
      expect(j.fileCreated).toBe(true);
      expect(fs.existsSync(j.file)).toBe(false);
      expect(j.ops).toBeGreaterThan(0);
      expect(j.reads + j.writes).toBe(j.ops);
      expect(j.bytes).toBe(j.ops * j.bs);
      expect(j.elapsedSec).toBeGreaterThan(0);
      expect(j.iops).toBeGreaterThan(0);
      expect(j.mbps).toBeGreaterThan(0);
      expect(j.cpu.usPerOp).toBeGreaterThan(0);
      checkLatency(j.latUs);
      if (j.rw === 'randrw') {
        expect(j.reads).toBeGreaterThan(0);
        expect(j.writes).toBeGreaterThan(0);
      }
    });
  }

  it('prints text without escape codes on a pipe, and keeps a --file image', () => {
    const f = path.join(dir, 'given.raw');
    const r = node('bench/run.js', ['--file', f, '--size', '4M', '--runtime', '0.1', '--rw', 'read', '--bs', '1M']);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/IOPS\s+[\d,.]+\s+MB\/s/);
    expect(r.stdout).toMatch(/p50 .* p99 .* p99\.9/);
    expect(r.stdout + r.stderr).not.toMatch(/[\r\u001b]/);
    expect(fs.statSync(f).size).toBe(4 * 1024 * 1024);
  });

  it('refuses a bad option with exit status 2 and the usage', () => {
    const r = node('bench/run.js', ['--rw', 'sideways']);
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/--rw/);
    expect(r.stderr).toMatch(/usage/);
  });
});

describe('bench/compare.js', () => {
  it('--quick --only 4k-randread-qd1 writes a results JSON and an SVG', () => {
    const out = path.join(dir, 'results');
    const r = node('bench/compare.js', ['--quick', '--runtime', '0.2', '--only', '4k-randread-qd1', '--out', out]);
    expect(r.status, r.stderr).toBe(0);
    const files = fs.readdirSync(out);
    const json = files.find((f) => f.endsWith('.json'));
    expect(json).toBeDefined();
    expect(files).toContain(json?.replace(/\.json$/, '.svg'));
    const doc = JSON.parse(fs.readFileSync(path.join(out, json ?? ''), 'utf8'));
    expect(doc.rows.map((row: { id: string }) => row.id)).toEqual(['raw/4k-randread-qd1', 'qcow2/4k-randread-qd1']);
    for (const row of doc.rows) {
      const s = row.tools.snapstack;
      expect(s.errors).toEqual([]);
      expect(s.value.median).toBeGreaterThan(0);
      expect(s.latUs.p50).toBeLessThanOrEqual(s.latUs.p99);
      // each peer found on this machine ran without error; a missing one is named in meta.tools
      for (const [tool, t] of Object.entries(row.tools) as Array<[string, { errors: string[]; value: { median: number } | null }]>) {
        expect(t.errors, tool).toEqual([]);
        expect(t.value?.median, tool).toBeGreaterThan(0);
      }
      if (doc.meta.tools['qemu-img'].available) expect(row.ratios['qemu-img:threads'].median).toBeGreaterThan(0);
      else expect(doc.meta.tools['qemu-img'].version).toMatch(/not found/);
    }
    expect(fs.readFileSync(path.join(out, json?.replace(/\.json$/, '.svg') ?? ''), 'utf8')).toMatch(/^<svg[^]*<\/svg>\n$/);
    expect(r.stdout).toMatch(/snapstack \/ peer/);
  });
});

describe('bench/lib/histogram.js', () => {
  it('reads percentiles back within 0.4% and keeps min and max exact', () => {
    const h = new LatencyHistogram();
    for (let v = 1; v <= 100_000; v++) h.record(v * 1000);
    expect(h.count).toBe(100_000);
    expect(h.min).toBe(1000);
    expect(h.max).toBe(100_000_000);
    for (const p of [50, 99, 99.9]) {
      const exact = p * 1000 * 1000;
      expect(Math.abs(h.percentile(p) - exact) / exact).toBeLessThan(0.004);
    }
    h.record(1e12); // clamped at 2^32 - 1 ns
    expect(h.max).toBe(2 ** 32 - 1);
  });
});

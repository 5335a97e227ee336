/**
 * Interop tests run Debian's qemu-img / qemu-io as the oracle. In CI (CI=true) they must run: a
 * missing tool fails the suite. On a developer's machine without qemu-utils they are skipped, and
 * each skipped suite is recorded so that `npm test` names it at the end (scripts/interop-skip-report.js).
 */
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { describe, it } from 'vitest';

export const SKIP_REPORT = path.resolve('node_modules/.cache/snapstack/skipped-interop.txt');

function has(tool: string): boolean {
  return spawnSync(tool, ['--version'], { stdio: 'ignore' }).status === 0;
}

const missing = ['qemu-img', 'qemu-io'].filter((t) => !has(t));

/** A describe() that needs qemu-img and qemu-io: runs, fails in CI when they are missing, or skips and says so. */
export function describeInterop(name: string, fn: () => void): void {
  if (missing.length === 0) {
    describe(name, fn);
    return;
  }
  const why = `${missing.join(' and ')} not found (apt-get install qemu-utils)`;
  if (process.env['CI'] !== undefined && process.env['CI'] !== '' && process.env['CI'] !== 'false') {
    describe(name, () => {
      it('has the qemu-utils oracle it needs in CI', () => {
        throw new Error(`interop suite '${name}' cannot run in CI: ${why}`);
      });
    });
    return;
  }
  fs.mkdirSync(path.dirname(SKIP_REPORT), { recursive: true });
  fs.appendFileSync(SKIP_REPORT, `${name}: ${why}\n`);
  describe.skip(name, fn);
}

/** Runs qemu-img or qemu-io and returns stdout; throws with stderr on a non-zero exit. */
export function qemu(tool: 'qemu-img' | 'qemu-io', args: string[]): string {
  return execFileSync(tool, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

/** Runs a tool and returns its exit status and output without throwing. */
export function qemuStatus(tool: 'qemu-img' | 'qemu-io', args: string[]): { status: number; stdout: string; stderr: string } {
  const r = spawnSync(tool, args, { encoding: 'utf8' });
  return { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

/**
 * A describe() that needs the peer `tools` (installed by `install`): runs, fails in CI when one is
 * missing, or skips and records the skip for `npm test`'s report.
 */
export function describeNeeding(name: string, tools: readonly string[], install: string, fn: () => void): void {
  const absent = tools.filter((t) => !has(t));
  if (absent.length === 0) {
    describe(name, fn);
    return;
  }
  const why = `${absent.join(' and ')} not found (${install})`;
  if (process.env['CI'] !== undefined && process.env['CI'] !== '' && process.env['CI'] !== 'false') {
    describe(name, () => {
      it(`has the peers it needs in CI (${absent.join(', ')})`, () => {
        throw new Error(`suite '${name}' cannot run in CI: ${why}`);
      });
    });
    return;
  }
  fs.mkdirSync(path.dirname(SKIP_REPORT), { recursive: true });
  fs.appendFileSync(SKIP_REPORT, `${name}: ${why}\n`);
  describe.skip(name, fn);
}

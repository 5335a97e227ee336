/**
 * docs/locking.md is generated from the `@locking` tags and the signatures by
 * scripts/gen-locking-doc.js (`npm run docs:locking`). These tests fail when the file is stale or
 * a function is unclassified or misclassified, and check the generator on a small fixture tree.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { collectRows, renderMarkdown } from '../scripts/gen-locking-doc.js';

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const SCRIPT = path.join(REPO, 'scripts', 'gen-locking-doc.js');

describe('docs/locking.md', () => {
  it('matches the source (regenerate with `npm run docs:locking`)', () => {
    const file = path.join(REPO, 'docs', 'locking.md');
    const onDisk = fs.existsSync(file) ? fs.readFileSync(file, 'utf8') : '';
    const expected = renderMarkdown(collectRows(REPO).rows);
    expect(onDisk, 'docs/locking.md is stale: run `npm run docs:locking` and commit the result').toBe(expected);
  });

  it('every exported function and driver callback carries a @locking tag that matches its signature', () => {
    const { errors } = collectRows(REPO);
    expect(errors, 'locking-contract errors: fix the tags or signatures listed (`npm run docs:locking` prints them too)').toEqual([]);
  });
});

describe('gen-locking-doc on a fixture tree', () => {
  let root = '';

  const write = (rel: string, text: string): void => {
    const p = path.join(root, rel);
    fs.mkdirSync(path.dirname(p), { recursive: true });
    fs.writeFileSync(p, text);
  };

  beforeAll(() => {
    root = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-locking-doc-'));
    // type imports of modules that do not exist: the generator judges types by their text
    write(
      'src/block/fixture.ts',
      `import type { Bql } from './no-such-bql.js';
import type { Drained, DrainedProof } from './no-such-drain.js';
import type { BlockNode } from './no-such-node.js';

/** Has no tag at all. */
export function untaggedThing(x: number): number {
  return x;
}

/**
 * Reads with the lock, which I/O code must not need.
 * @locking io
 */
export function ioTakesBql(bql: Bql, offset: number): void {}

/**
 * Changes the graph without the lock.
 * @locking global-state
 */
export function globalWithoutBql(node: BlockNode): void {}

/**
 * Swaps a child of a quiet node. The rest is not in the table.
 * @locking global-state
 */
export async function swapChild(bql: Bql, drained: Drained<BlockNode>, node: BlockNode): Promise<void> {}

/**
 * Runs \`fn\` in a drained section (its callback's proof is not a precondition of the function).
 * @locking global-state
 */
export async function withQuiet(bql: Bql, fn: (d: Drained<BlockNode>) => void): Promise<void> {}

/**
 * Checks a proof from anywhere.
 * @locking common
 */
export const commonTakesProof = (proof: DrainedProof | null): void => {};

/**
 * Guesses.
 * @locking sometimes
 */
export function unknownTag(): void {}

/**
 * Picks a | b, e.g. the first one. Second sentence.
 * @locking common
 */
export function pick(a: number, b: number): number {
  return a;
}

function notExported(bql: Bql): void {}
`,
    );
    write(
      'src/drivers/fake.ts',
      `import type { Bql } from '../block/bql.js';

/** A driver's callbacks. */
export interface BlockDriverInstance {
  /**
   * Reads bytes.
   * @locking io
   */
  preadv(offset: number, buf: Uint8Array): Promise<void>;
  /** Forgot its tag. */
  flush(): Promise<void>;
}

/** A class: only its tagged methods count. */
export class Thing {
  /**
   * Lists things.
   * @locking global-state
   */
  list(bql: Bql | null): string[] {
    return [];
  }

  untaggedMethod(): void {}
}
`,
    );
    // tests are not scanned
    write('src/block/fixture.test.ts', 'export function untaggedInTest(): void {}\n');
  });

  afterAll(() => {
    if (root !== '') fs.rmSync(root, { recursive: true, force: true });
  });

  it('reports every violation, naming the function', () => {
    const { errors } = collectRows(root);
    const about = (name: string): string[] => errors.filter((e) => e.includes(`: ${name}: `));
    expect(about('untaggedThing')).toHaveLength(1);
    expect(about('untaggedThing')[0]).toMatch(/^src\/block\/fixture\.ts:\d+: untaggedThing: no @locking tag/);
    expect(about('ioTakesBql')).toHaveLength(1);
    expect(about('ioTakesBql')[0]).toContain('takes a Bql proof');
    expect(about('globalWithoutBql')).toHaveLength(1);
    expect(about('globalWithoutBql')[0]).toContain('no parameter typed Bql');
    expect(about('commonTakesProof')[0]).toContain('takes a drained proof');
    expect(about('unknownTag')[0]).toContain("unknown @locking value 'sometimes'");
    expect(about('BlockDriverInstance.flush')[0]).toContain('no @locking tag');
    // nothing else: not the correct ones, not unexported or untagged class members, not tests
    expect(errors).toHaveLength(6);
  });

  it('lists the correct functions with their contract', () => {
    const { rows } = collectRows(root);
    expect(rows.map((r) => `${r.module} ${r.className}.${r.name}`)).toEqual([
      'src/block/fixture.ts .pick',
      'src/block/fixture.ts .swapChild',
      'src/block/fixture.ts .withQuiet',
      'src/drivers/fake.ts BlockDriverInstance.preadv',
      'src/drivers/fake.ts Thing.list',
    ]);
    const swap = rows.find((r) => r.name === 'swapChild');
    expect(swap).toEqual({
      name: 'swapChild',
      module: 'src/block/fixture.ts',
      className: '',
      contract: 'global-state',
      bql: true,
      drained: true,
      alongside: 'no (drained)',
      summary: 'Swaps a child of a quiet node',
    });
    expect(rows.find((r) => r.name === 'withQuiet')).toMatchObject({ bql: true, drained: false, alongside: 'yes (BQL)' });
    expect(rows.find((r) => r.name === 'list')).toMatchObject({ className: 'Thing', bql: true, alongside: 'yes (BQL)' });
    expect(rows.find((r) => r.name === 'preadv')).toMatchObject({ contract: 'io', bql: false, drained: false, alongside: 'yes' });
    expect(rows.find((r) => r.name === 'pick')?.summary).toBe('Picks a | b, e.g. the first one');
  });

  it('renders deterministic markdown with escaped cells', () => {
    const { rows } = collectRows(root);
    const md = renderMarkdown(rows);
    expect(md).toBe(renderMarkdown([...rows].reverse()));
    expect(md.startsWith('# Locking contract\n')).toBe(true);
    expect(md).toContain('Generated by `npm run docs:locking` from the source; do not edit.');
    expect(md).toContain('| Function | Class | Contract | BQL | Drained | Alongside in-flight I/O | What it does |');
    expect(md).toContain('| `swapChild` |  | global-state | yes | yes | no (drained) | Swaps a child of a quiet node |');
    expect(md).toContain('| `pick` |  | common | no | no | yes | Picks a \\| b, e.g. the first one |');
    expect(md.indexOf('## src/block/fixture.ts')).toBeLessThan(md.indexOf('## src/drivers/fake.ts'));
  });

  it('CLI: --root writes DIR/docs/locking.md, exits 1 listing the errors; --check detects a stale file', () => {
    const run = (...args: string[]) => spawnSync(process.execPath, [SCRIPT, ...args], { encoding: 'utf8' });
    const gen = run('--root', root);
    expect(gen.status).toBe(1);
    expect(gen.stderr).toContain('untaggedThing');
    const out = path.join(root, 'docs', 'locking.md');
    expect(fs.readFileSync(out, 'utf8')).toBe(renderMarkdown(collectRows(root).rows));

    fs.appendFileSync(out, 'hand edit\n');
    const check = run('--check', '--root', root);
    expect(check.status).toBe(1);
    expect(check.stderr).toContain('docs/locking.md is stale: run `npm run docs:locking`');
  });
});

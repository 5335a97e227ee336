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
import { collectRows, METADATA_FUNCTIONS, renderMarkdown } from '../scripts/gen-locking-doc.js';

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
    write(
      'src/drivers/metadata.ts',
      `import fs from 'node:fs';
import type { Bql } from '../block/no-such-bql.js';
import type { DrainedProof } from '../block/no-such-drain.js';
import type { BlockNode } from '../block/no-such-node.js';

/**
 * Creates an image file from anywhere.
 * @locking common
 */
export function makeImageFile(p: string): void {
  const fd = fs.openSync(p, 'w');
  fs.closeSync(fd);
}

/**
 * Renames a snapshot store through a narrow fs interface, from the request path.
 * @locking io
 */
export function moveStore(sfs: { rename(a: string, b: string): void }, a: string): void {
  sfs.rename(a, a + '.old');
}

/**
 * Creates the pending VM-state file on the first save request.
 * @host-files the request that saves VM state creates its file; savevm holds drain-all meanwhile
 * @locking io
 */
export function openPending(p: string): number {
  return fs.openSync(p, 'w+');
}

/**
 * Deletes a snapshot store under the lock.
 * @locking global-state
 */
export function removeStore(bql: Bql, dir: string): void {
  fs.rmSync(dir, { recursive: true });
}

/**
 * Reads a file: not a change.
 * @locking io
 */
export function readIndex(p: string): string {
  return fs.readFileSync(p, 'utf8') + String(fs.openSync(p, 'r'));
}

/**
 * Checks a drained proof it was never given.
 * @locking global-state
 */
export function smuggledProof(bql: Bql, holder: { d: DrainedProof }, node: BlockNode): void {
  assertDrained(bql, holder.d, node, 'smuggled');
}

/**
 * Checks a Bql kept in a field.
 * @locking common
 */
export function smuggledBql(holder: { bql: Bql }): void {
  assertBql(holder.bql, 'smuggled');
}

/**
 * Formats a node on the request path.
 * @locking io
 */
export async function formatNode(node: BlockNode): Promise<void> {}

/**
 * Writes a table with the lock but without a drained section.
 * @locking global-state
 */
export async function writeTable(bql: Bql, node: BlockNode): Promise<void> {}

/**
 * Writes a table of a quiet node.
 * @locking global-state
 */
export async function writeTableDrained(bql: Bql, drained: DrainedProof, node: BlockNode): Promise<void> {}
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
    expect(errors.filter((e) => e.startsWith('src/block/') || e.includes('fake.ts'))).toHaveLength(6);
  });

  it('flags host-file changes in io and common code, unless a @host-files reason is given', () => {
    const { errors, rows } = collectRows(root);
    const about = (name: string): string[] => errors.filter((e) => e.includes(`: ${name}: `));
    expect(about('makeImageFile')).toEqual([expect.stringMatching(/is @locking common but changes host files \(openSync\(\.\.\., 'w'\)\)/)]);
    expect(about('moveStore')).toEqual([expect.stringMatching(/is @locking io but changes host files \(rename\)/)]);
    expect(about('openPending')).toEqual([]);
    expect(about('removeStore')).toEqual([]);
    expect(about('readIndex')).toEqual([]);
    expect(rows.map((r) => r.name)).toEqual(expect.arrayContaining(['openPending', 'removeStore', 'readIndex']));
  });

  it('flags a body that checks a proof it does not take as a parameter', () => {
    const { errors } = collectRows(root);
    expect(errors.filter((e) => e.includes(': smuggledProof: '))).toEqual([expect.stringContaining('calls assertDrained but takes no drained proof parameter')]);
    expect(errors.filter((e) => e.includes(': smuggledBql: '))).toEqual([expect.stringContaining('calls assertBql but takes no parameter typed Bql')]);
  });

  it("checks a list of metadata-changing functions: global-state with a Bql, a drained proof where marked, and present", () => {
    const list = new Map([
      ['formatNode', { drained: true }],
      ['writeTable', { drained: true }],
      ['writeTableDrained', { drained: true }],
      ['removeStore', { drained: false }],
      ['goneMissing', { drained: false }],
    ]);
    const { errors } = collectRows(root, list);
    const about = (name: string): string[] => errors.filter((e) => e.includes(`: ${name}: `));
    expect(about('formatNode')).toEqual([
      expect.stringContaining('must be @locking global-state with a Bql parameter'),
      expect.stringContaining('must take a drained proof'),
    ]);
    expect(about('writeTable')).toEqual([expect.stringContaining('must take a drained proof')]);
    expect(about('writeTableDrained')).toEqual([]);
    expect(about('removeStore')).toEqual([]);
    expect(about('goneMissing')).toEqual([expect.stringContaining('not found as an exported function')]);
    // without the list nothing about them is reported
    expect(collectRows(root).errors.filter((e) => e.includes(': formatNode: ') || e.includes('goneMissing'))).toEqual([]);
  });


  it('lists the correct functions with their contract', () => {
    const { rows } = collectRows(root);
    expect(rows.filter((r) => r.module !== 'src/drivers/metadata.ts').map((r) => `${r.module} ${r.className}.${r.name}`)).toEqual([
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
      lock: false,
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

describe("issue 11's list of functions that change metadata or global state", () => {
  it('names the nine functions: two on an open node need a drained proof, two the metadata lock', () => {
    expect([...METADATA_FUNCTIONS.keys()].sort()).toEqual(
      [
        'createQcow2File',
        'createQcow2OnNode',
        'createRawFile',
        'discardSnapshotStore',
        'repairDirtyImage',
        'setDiskSize',
        'shutdownIOThreads',
        'updateSnapshotRefcount',
        'writeSnapshotTable',
      ].sort(),
    );
    const drained = [...METADATA_FUNCTIONS].filter(([, v]) => v.drained).map(([k]) => k);
    expect(drained.sort()).toEqual(['createQcow2OnNode', 'updateSnapshotRefcount']);
    const locked = [...METADATA_FUNCTIONS].filter(([, v]) => 'lock' in v && v.lock === true).map(([k]) => k);
    expect(locked.sort()).toEqual(['setDiskSize', 'writeSnapshotTable']);
  });

  it('is all classified in the table: global-state with the BQL (and drained where marked), or taking the metadata lock proof', () => {
    const { rows } = collectRows(REPO);
    for (const [name, want] of METADATA_FUNCTIONS) {
      const row = rows.find((r) => r.name === name && r.className === '');
      expect(row, `${name} is missing from docs/locking.md (see the generator's errors)`).toBeDefined();
      if ('lock' in want && want.lock === true) {
        expect(row?.lock, name).toBe(true);
        continue;
      }
      expect(row?.contract, name).toBe('global-state');
      expect(row?.bql, name).toBe(true);
      if (want.drained) expect(row?.drained, name).toBe(true);
    }
  });
});

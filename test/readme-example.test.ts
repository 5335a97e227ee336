import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { expect, it } from 'vitest';

const examples = [...fs.readFileSync('README.md', 'utf8').matchAll(/```js example\n([\s\S]*?)```/g)].map((m) => m[1] ?? '');

/** Runs one example as a script; inside the repository the package resolves itself by name. */
function run(code: string, index: number): string {
  const script = path.resolve('test', `.readme-example-${index}.mjs`);
  fs.writeFileSync(script, code);
  try {
    return execFileSync(process.execPath, [script], { encoding: 'utf8', timeout: 30_000 });
  } finally {
    fs.rmSync(script, { force: true });
  }
}

it('finds the two library examples in the README', () => {
  expect(examples).toHaveLength(2);
});

it('runs the easy-API example and prints what its comments promise', () => {
  expect(run(examples[0] ?? '', 0).trim().split('\n')).toEqual(['16777216 true', 'true']);
});

it('runs the block-layer example to completion', () => {
  expect(run(examples[1] ?? '', 1)).toBe('');
});

const apiExamples = [...fs.readFileSync('docs/api.md', 'utf8').matchAll(/```js example\n([\s\S]*?)```/g)].map((m) => m[1] ?? '');

it('runs the machine example of docs/api.md and prints what its comments promise', () => {
  expect(apiExamples).toHaveLength(1);
  expect(run(apiExamples[0] ?? '', 2).trim().split('\n')).toEqual(['0 0', 'before']);
});

/**
 * docs/qmp.md is generated from the command table by scripts/gen-qmp-doc.js (`npm run docs:qmp`).
 * These tests fail when the page is stale, and check that every command is documented with its
 * arguments and that each example's arguments fit the command's own schema.
 */
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { renderQmpDoc, typeText } from '../scripts/gen-qmp-doc.js';
import { qmpCommands } from '../src/qmp/command-table.js';
import { QMP_PROTOCOL_DOC } from '../src/qmp/server.js';

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

describe('docs/qmp.md', () => {
  const commands = qmpCommands({ machine: true });

  it('matches the command table (regenerate with `npm run build && npm run docs:qmp`)', () => {
    const file = path.join(REPO, 'docs', 'qmp.md');
    const onDisk = fs.existsSync(file) ? fs.readFileSync(file, 'utf8') : '';
    expect(onDisk, 'docs/qmp.md is stale: run `npm run build && npm run docs:qmp` and commit the result').toBe(renderQmpDoc(commands, QMP_PROTOCOL_DOC));
  });

  it('has a section for every command, with every argument and its type', () => {
    const text = renderQmpDoc(commands);
    for (const c of commands) {
      expect(text).toContain(`\n## ${c.name}\n`);
      for (const a of c.args) expect(text).toContain(`| \`${a.name}\` | ${typeText(a.type).replace(/\|/g, '\\|')} |`);
    }
  });

  it('gives every command a doc, and examples only with arguments the command declares', () => {
    const names = new Set<string>();
    for (const c of commands) {
      expect(names.has(c.name), `command ${c.name} twice in the table`).toBe(false);
      names.add(c.name);
      expect(c.doc.length, `doc of ${c.name}`).toBeGreaterThan(20);
      const declared = new Set(c.args.map((a) => a.name));
      for (const k of Object.keys(c.example?.args ?? {})) expect(declared.has(k), `example of ${c.name} uses undeclared '${k}'`).toBe(true);
      for (const a of c.args) if (a.optional !== true && c.example?.args !== undefined) expect(c.example.args[a.name], `example of ${c.name} lacks '${a.name}'`).toBeDefined();
    }
  });
});

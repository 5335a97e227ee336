// @ts-check
// Prints, after `vitest run`, the interop suites that were skipped and why (qemu-utils missing).
import fs from 'node:fs';
import path from 'node:path';

const report = path.resolve('node_modules/.cache/snapstack/skipped-interop.txt');
if (fs.existsSync(report)) {
  const lines = [...new Set(fs.readFileSync(report, 'utf8').split('\n').filter((l) => l !== ''))];
  if (lines.length > 0) {
    console.log(`\nSkipped interop test suites (${lines.length}); install qemu-utils to run them:`);
    for (const l of lines) console.log(`  - ${l}`);
  }
}

import fs from 'node:fs';
import { SKIP_REPORT } from './helpers/qemu.js';

/** Starts each `vitest run` with an empty list of skipped interop suites. */
export default function setup(): void {
  fs.rmSync(SKIP_REPORT, { force: true });
}

/**
 * snapshot-save, snapshot-load and snapshot-delete as jobs (QEMU 6.0+). Not built yet.
 */
import type { QmpCommand } from '../types.js';

/** The snapshot job commands. */
export const snapshotJobCommands: QmpCommand[] = [];

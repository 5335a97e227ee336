/**
 * Test-only switches, kept out of the public entry point: importing this module is how a test
 * says it wants to break an invariant on purpose (negative controls).
 */
export { setDrainDisabledForTesting } from './block/drain.js';
export { crashIOThreadForTesting } from './block/iothread.js';
export { setWritebackBarriersDisabledForTesting } from './drivers/qcow2/writeback.js';
export { fileReadPathStatsForTesting } from './drivers/file/read-path-stats.js';

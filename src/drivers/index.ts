/**
 * Loads every built-in driver; each registers itself with the block layer when its module loads.
 * Common code, run once at import.
 */
import './file/driver.js';
import './memory.js';
import './raw.js';
import './qcow2/driver.js';
import './nbd/driver.js';

export { createRawFile } from './file/driver.js';
export { createQcow2File, createQcow2OnNode, type Qcow2CreateOptions } from './qcow2/create.js';

/**
 * Loads every built-in driver; each registers itself with the block layer when its module loads.
 * Common code, run once at import.
 */
import './file.js';
import './memory.js';
import './raw.js';

export { createRawFile } from './file.js';

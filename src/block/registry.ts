/**
 * The global tables of the block layer: every node by node-name, every backend by name.
 *
 * Global state, read and changed on the main loop under the BQL. Only graph.ts and backend.ts
 * add or remove entries; drain.ts reads them for drain-all.
 */
import type { BlockBackend } from './backend.js';
import type { BlockNode } from './node.js';

/** Every open node, in creation order. */
export const allNodes = new Map<string, BlockNode>();
/** Every backend, in creation order. */
export const allBackends = new Map<string, BlockBackend>();
/** Nesting depth of drain-all sections: new nodes start with this quiesce count. */
export const drainAllState = { count: 0 };

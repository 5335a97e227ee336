/**
 * Every QMP command snapstack answers, in one table: the server dispatches from it, query-commands
 * lists it and docs/qmp.md is generated from it. Each group lives in its own file under commands/.
 */
import { blockJobCommands } from './commands/block-jobs.js';
import { blockCommands } from './commands/block.js';
import { blockJobVerbCommands, jobCommands } from './commands/jobs.js';
import { miscCommands } from './commands/misc.js';
import { nbdExportCommands } from './commands/nbd-exports.js';
import { sessionCommands } from './commands/session.js';
import { snapshotJobCommands } from './commands/snapshot-jobs.js';
import { machineCommands } from './commands/machine.js';
import { transactionCommands } from './commands/transaction.js';
import type { QmpCommand } from './types.js';

/** The commands of a monitor; those that need a machine are left out where there is none. */
export function qmpCommands(opts: { machine: boolean }): QmpCommand[] {
  const all: QmpCommand[] = [...sessionCommands, ...miscCommands, ...blockCommands, ...jobCommands, ...blockJobCommands, ...blockJobVerbCommands, ...transactionCommands, ...snapshotJobCommands, ...machineCommands, ...nbdExportCommands];
  return all.filter((c) => opts.machine || c.needsMachine !== true);
}

/**
 * The run-state commands of a monitor that runs a machine: stop, cont and query-status, as
 * qemu-system's. stop pauses the vCPUs and flushes every disk (QEMU's vm_stop); cont is refused
 * while a snapshot operation holds the machine stopped or a failed loadvm still has disks to put
 * back; a stop that arrives while a snapshot job holds the machine is honoured when the job ends.
 */
import { withBql } from '../../block/bql.js';
import { recoverVmSnapshots } from '../../machine/savevm.js';
import type { QmpCommand } from '../types.js';
import { machineOf, qmpErrors } from './util.js';


/** stop, cont and query-status. */
export const machineCommands: QmpCommand[] = [
  {
    name: 'stop',
    doc: 'Stops the vCPUs; returns once no guest request is in flight and every disk is flushed (a copy of the images taken now is consistent). Raises STOP.',
    args: [],
    needsMachine: true,
    example: { returns: {} },
    run: (ctx) =>
      qmpErrors(async () => {
        const m = machineOf(ctx);
        await withBql((bql) => m.stop(bql));
        return {};
      }),
  },
  {
    name: 'cont',
    doc: 'Resumes the vCPUs (first putting back the disks of an interrupted loadvm); refused while a snapshot operation holds the machine stopped. Raises RESUME.',
    args: [],
    needsMachine: true,
    example: { returns: {} },
    run: (ctx) =>
      qmpErrors(async () => {
        const m = machineOf(ctx);
        await withBql(async (bql) => {
          await recoverVmSnapshots(bql, m);
          m.cont(bql);
        });
        return {};
      }),
  },
  {
    name: 'query-status',
    doc: "The machine's run state, as QEMU's StatusInfo (`running` or `paused`).",
    args: [],
    needsMachine: true,
    example: { returns: { status: 'running', singlestep: false, running: true } },
    run: (ctx) =>
      qmpErrors(async () => {
        const m = machineOf(ctx);
        const running = m.runState === 'running';
        return { status: running ? 'running' : 'paused', singlestep: false, running };
      }),
  },
];

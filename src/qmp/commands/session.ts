/**
 * The commands about the QMP session itself: qmp_capabilities, query-commands and quit.
 *
 * qmp_capabilities does its work in the session (src/qmp/session.ts), which answers it itself
 * while the client is still negotiating; this entry is what a session in command mode dispatches
 * to, and there, as in QEMU, it is refused: "Capabilities negotiation is already complete, command
 * ignored" (CommandNotFound). quit replies `{}`; the session then emits SHUTDOWN and calls the
 * server's onQuit.
 *
 * Common code: no lock, no block layer.
 */
import { QmpError, type QmpCommand, type QmpField } from '../types.js';

/** qmp_capabilities' arguments (QEMU's QMPCapability has one value: oob). */
export const QMP_CAPABILITIES_ARGS: readonly QmpField[] = [{ name: 'enable', type: { array: { enum: ['oob'] } }, optional: true }];

const qmpCapabilities: QmpCommand = {
  name: 'qmp_capabilities',
  doc: "Leaves capabilities negotiation for command mode; `enable: [\"oob\"]` also turns on out-of-band execution (`exec-oob`). Sent again once in command mode, it is refused with CommandNotFound.",
  args: QMP_CAPABILITIES_ARGS,
  example: { args: {}, returns: {} },
  run: () => Promise.reject(new QmpError('CommandNotFound', 'Capabilities negotiation is already complete, command ignored')),
};

const queryCommands: QmpCommand = {
  name: 'query-commands',
  doc: 'Lists the commands this monitor answers, as `[{"name": ...}]`.',
  args: [],
  example: { returns: [{ name: 'qmp_capabilities' }, { name: 'query-commands' }, { name: 'quit' }] },
  run: (ctx) => Promise.resolve(ctx.commands.map((c) => ({ name: c.name }))),
};

const quit: QmpCommand = {
  name: 'quit',
  doc: 'Shuts the daemon (or the monitor) down: replies `{}`, emits SHUTDOWN `{"guest": false, "reason": "host-qmp-quit"}`, then running requests finish and images are closed.',
  args: [],
  example: { returns: {} },
  run: (ctx) => {
    ctx.requestQuit();
    return Promise.resolve({});
  },
};

/** qmp_capabilities, query-commands and quit, for the command table. */
export const sessionCommands: QmpCommand[] = [qmpCapabilities, queryCommands, quit];

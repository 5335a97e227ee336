/**
 * The types every QMP piece shares: JSON values, the error classes QEMU replies with, the
 * argument schema of a command, the command itself and what it may reach while it runs.
 *
 * A command runs on the main loop without the BQL: like HMP's commands, it takes the lock with
 * withBql for its global-state steps and releases it before it waits for I/O or a job, so that a
 * long command never freezes the other monitors.
 */
import type { Machine } from '../machine/machine.js';

/** A JSON value as QMP carries it. */
export type QmpValue = null | boolean | number | string | QmpValue[] | { [key: string]: QmpValue };

/** A JSON object: a command's arguments, a reply's `return` when it is an object, an event's `data`. */
export type QmpObject = { [key: string]: QmpValue };

/** QEMU's QapiErrorClass values (qapi/error.json). */
export type QmpErrorClass = 'GenericError' | 'CommandNotFound' | 'DeviceNotActive' | 'DeviceNotFound' | 'KVMMissingCap';

/** A command's failure as QMP reports it: `{"error": {"class": ..., "desc": ...}}`. */
export class QmpError extends Error {
  constructor(
    readonly errorClass: QmpErrorClass,
    readonly desc: string,
  ) {
    super(desc);
    this.name = 'QmpError';
  }
}

/**
 * The type of one argument, in QAPI's words: built-in scalars, an enum, an array of a type, a
 * struct (its own fields), or 'any' (the command checks it itself: blockdev-add's options).
 */
export type QmpType =
  | 'str'
  | 'int'
  | 'number'
  | 'bool'
  | 'any'
  | { enum: readonly string[] }
  | { array: QmpType }
  | { struct: readonly QmpField[] };

/** One argument: its name, type, and whether it may be left out (QAPI's `*name`). */
export interface QmpField {
  name: string;
  type: QmpType;
  optional?: boolean;
}

/** What a running command may reach. */
export interface QmpContext {
  /** The machine of `snapstack monitor -qmp`; null in the daemon (as in qemu-storage-daemon). */
  readonly machine: Machine | null;
  /** Asks the server to shut down once the reply is sent (the `quit` command). */
  requestQuit(): void;
  /** Sends an event to every negotiated client (timestamps are added). */
  emitEvent(event: string, data?: QmpObject): void;
  /** The commands this monitor answers (query-commands lists them). */
  readonly commands: readonly QmpCommand[];
}

/** One QMP command: its schema, its documentation (docs/qmp.md is generated from it) and its body. */
export interface QmpCommand {
  name: string;
  /** One or two sentences: what it does, in docs/qmp.md and query-commands' documentation. */
  doc: string;
  /** The arguments; unknown keys are refused ("Parameter 'x' is unexpected") before run. */
  args: readonly QmpField[];
  /** An example for docs/qmp.md: the arguments sent and the `return` received. */
  example?: { args?: QmpObject; returns: QmpValue };
  /** Only in a monitor that runs a machine (savevm and friends); absent from the daemon's table. */
  needsMachine?: boolean;
  /** Runs the command with validated arguments; returns the reply's `return` ({} when nothing). */
  run(ctx: QmpContext, args: QmpObject): Promise<QmpValue>;
}

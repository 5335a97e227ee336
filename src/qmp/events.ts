/**
 * The process-wide QMP event bus: `emitQmpEvent(event, data?)` stamps an event with QEMU's
 * timestamp (`{"seconds": S, "microseconds": US}`, wall-clock time) and hands it to every
 * listener; each QmpServer listens and passes it on to each of its negotiated sessions, so, as in
 * QEMU, every monitor in command mode sees every event and a monitor still negotiating sees none.
 *
 * Job status changes reach the bus through one bridge for the whole process (H2's
 * forwardJobEvents, which turns src/block/job.ts's onJobEvent into JOB_STATUS_CHANGE and the
 * BLOCK_JOB_* events): servers retain it while they run, so two monitors in one process each get
 * every change once, not twice.
 *
 * Common code: runs on the main loop, no lock. Listeners run synchronously inside emitQmpEvent, so
 * events keep the order in which they were emitted; a listener that throws is skipped for that
 * event, and the others still get it.
 */
import { forwardJobEvents } from './commands/jobs.js';
import type { QmpObject } from './types.js';

/** An event as QMP sends it (member order as QEMU writes it). */
export interface QmpEventMessage {
  timestamp: { seconds: number; microseconds: number };
  event: string;
  data?: QmpObject;
}

type Listener = (e: QmpEventMessage) => void;

const listeners = new Set<Listener>();

/** QEMU's event timestamp: wall-clock seconds and microseconds. */
export function qmpTimestamp(): { seconds: number; microseconds: number } {
  const us = Math.floor((performance.timeOrigin + performance.now()) * 1000);
  return { seconds: Math.floor(us / 1e6), microseconds: us % 1e6 };
}

/** Sends an event to every listener (every negotiated QMP session of every server). */
export function emitQmpEvent(event: string, data?: QmpObject): void {
  const msg: QmpEventMessage = data === undefined ? { timestamp: qmpTimestamp(), event } : { timestamp: qmpTimestamp(), event, data };
  for (const l of [...listeners]) {
    try {
      l(msg);
    } catch {
      // A listener's failure (a session whose socket broke) must not keep the event from the others.
    }
  }
}

/** Listens to every event until the returned function is called. */
export function onQmpEvent(listener: Listener): () => void {
  listeners.add(listener);
  return () => {
    listeners.delete(listener);
  };
}

let bridgeUsers = 0;
let stopBridge: (() => void) | null = null;

/** Starts forwarding job status changes to the bus (counted: once for the process); returns the release. */
export function retainJobEventBridge(): () => void {
  bridgeUsers++;
  if (stopBridge === null) stopBridge = forwardJobEvents((event, data) => emitQmpEvent(event, data));
  let released = false;
  return () => {
    if (released) return;
    released = true;
    bridgeUsers--;
    if (bridgeUsers === 0 && stopBridge !== null) {
      stopBridge();
      stopBridge = null;
    }
  };
}

/**
 * Waiting for a peer tool's unix socket. The socket file appears at bind(), before the server
 * calls listen(): a connect in between is refused (ECONNREFUSED), so existing is not enough.
 */
import * as net from 'node:net';
import type { ChildProcess } from 'node:child_process';

function tryConnect(socket: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect({ path: socket }, () => {
      s.destroy();
      resolve(true);
    });
    s.on('error', () => resolve(false));
  });
}

/**
 * Resolves once `socket` accepts a connection; throws with the tool's stderr when `proc` exits
 * first or nothing listens within `timeoutMs`. The probe connection is closed at once.
 */
export async function waitForListening(socket: string, proc: ChildProcess, what: string, stderr: () => string, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (proc.exitCode !== null || proc.signalCode !== null) throw new Error(`${what} exited with ${proc.exitCode ?? proc.signalCode}: ${stderr()}`);
    if (await tryConnect(socket)) return;
    if (Date.now() > deadline) throw new Error(`${what} did not listen on ${socket} within ${timeoutMs / 1000} s: ${stderr()}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

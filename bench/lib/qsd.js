// @ts-check
/**
 * qemu-storage-daemon 7.2 as a benchmark peer: started on a QMP unix socket in a directory,
 * driven with snapstack's own QMP client (from the build under test), stopped with quit (SIGKILL
 * after a bound). Nothing is installed: a missing QSD is reported with the reason.
 */
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { pathToFileURL } from 'node:url';

const QSD = 'qemu-storage-daemon';

/** Whether qemu-storage-daemon runs, and its version line (or why not). */
export function detectQsd() {
  const r = spawnSync(QSD, ['--version'], { encoding: 'utf8' });
  if (r.error !== undefined || r.status !== 0) return { available: false, version: `${QSD} not found (apt-get install qemu-system-common)` };
  return { available: true, version: (r.stdout.split('\n')[0] ?? '').trim() };
}

/**
 * @typedef {object} QsdPeer
 * @property {any} client a connected, negotiated QmpClient
 * @property {() => Promise<void>} stop
 */

/**
 * Starts QSD with a QMP monitor in `dir` and connects `lib`'s QmpClient to it.
 * @param {string} dir @param {string} libDir the build (dist) whose qmp/client.js is used
 * @returns {Promise<QsdPeer>}
 */
export async function startQsd(dir, libDir) {
  const { QmpClient } = await import(pathToFileURL(path.join(libDir, 'qmp', 'client.js')).href);
  const socket = path.join(dir, 'qsd.sock');
  const proc = spawn(QSD, ['--chardev', `socket,id=c0,path=${socket},server=on,wait=off`, '--monitor', 'chardev=c0'], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  proc.stderr?.on('data', (d) => (stderr += String(d)));
  const exited = new Promise((resolve) => proc.once('exit', resolve));
  // the socket file appears at bind(), before listen(): retry the connect until it is accepted
  const deadline = Date.now() + 10_000;
  let client;
  for (;;) {
    if (proc.exitCode !== null) throw new Error(`${QSD} exited (${proc.exitCode}): ${stderr}`);
    try {
      if (fs.existsSync(socket)) {
        client = await QmpClient.connect({ path: socket });
        break;
      }
    } catch (e) {
      if (Date.now() > deadline) {
        proc.kill('SIGKILL');
        throw new Error(`${QSD} did not accept on ${socket}: ${e instanceof Error ? e.message : String(e)} ${stderr}`);
      }
    }
    if (Date.now() > deadline) {
      proc.kill('SIGKILL');
      throw new Error(`${QSD} did not create ${socket}: ${stderr}`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  return {
    client,
    stop: async () => {
      try {
        await client.execute('quit');
      } catch {
        // it may close before answering
      }
      await client.close().catch(() => undefined);
      const t = setTimeout(() => proc.kill('SIGKILL'), 5000);
      await exited;
      clearTimeout(t);
    },
  };
}

/**
 * `img check` of a truncated qcow2 file (a copy cut short, a disk that filled up): QEMU's check opens
 * it, reads what lies past the end as zeros and reports the damage (exit 2). snapstack used to
 * refuse the open ("Check failed", exit 1) and, once the open let it through, leaked V8's
 * "Invalid typed array length" from the snapshot-table read. Now both tools print the same report
 * and exit codes, and the file is not written.
 */
import { spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { describeInterop, qemu, qemuStatus } from './helpers/qemu.js';

let dir = '';
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-truncated-'));
});
afterAll(() => {
  if (dir !== '') fs.rmSync(dir, { recursive: true, force: true });
});

function snapstack(args: string[]): { status: number; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [path.resolve('bin/snapstack.js'), ...args], { encoding: 'utf8' });
  return { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

describeInterop('img check of a truncated qcow2 file', () => {
  it('reports what qemu-img check reports, with its exit code, and writes nothing', () => {
    const f = path.join(dir, 'cut.qcow2');
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', f, '64M']);
    qemu('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 0 1M', f]);
    qemu('qemu-img', ['snapshot', '-c', 's1', f]);
    qemu('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x6b 0 512k', f]);
    fs.truncateSync(f, 600 * 1024); // the snapshot table and the last clusters are gone
    const before = crypto.createHash('sha256').update(fs.readFileSync(f)).digest('hex');
    const q = qemuStatus('qemu-img', ['check', f]);
    const s = snapstack(['img', 'check', f]);
    expect(q.status).toBe(2);
    expect(s.status, s.stderr).toBe(2);
    expect(s.stdout).toBe(q.stdout);
    expect(`${s.stdout}${s.stderr}`).not.toMatch(/RangeError|TypeError|Invalid typed array/);
    expect(crypto.createHash('sha256').update(fs.readFileSync(f)).digest('hex')).toBe(before);
  });
});

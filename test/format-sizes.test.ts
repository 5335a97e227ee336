/**
 * QEMU's size texts: size_to_str (`qemu-img info`'s "virtual size", snapshot tables) and qemu-io's
 * cvtstr ("1.500 MiB, 1 ops"), compared with qemu-img and qemu-io 7.2 over seeded sizes that hit
 * the edges: the switch to the next unit at 1000 (not 1024: 1000 bytes are `0.977 KiB`), exact
 * ties (197120 bytes are 192.5 KiB, printed `192 KiB` as glibc rounds to even), and the `%g`
 * exponent form (`1e+03 MiB`).
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { cvtstr, sizeToStr } from '../src/commands/format.js';
import { prng } from './helpers/prng.js';
import { describeInterop, qemu } from './helpers/qemu.js';

let dir: string;
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-sizes-'));
});
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

/** Sector multiples around each unit's edges, plus seeded ones (raw sizes are whole sectors in QEMU). */
function sizes(): number[] {
  const out = new Set<number>([0, 512, 1024, 197120, 1024000, 1022976, 1048064000, 5368709120]);
  for (let k = 1; k <= 3; k++) {
    const unit = 1024 ** k;
    for (const m of [999, 999.5, 999.9, 1000, 1023.5, 1024, 1.0625, 1.5, 9.995, 10, 99.95, 100]) out.add(Math.round((m * unit) / 512) * 512);
  }
  const rnd = prng(7);
  for (let i = 0; i < 24; i++) out.add(512 * Math.floor(rnd() * 2 ** (10 + Math.floor(rnd() * 22))));
  return [...out].sort((a, b) => a - b);
}

describeInterop('sizes in QEMU\'s words', () => {
  it('size_to_str: qemu-img info\'s virtual size for every size', () => {
    const f = path.join(dir, 's.raw');
    const bad: string[] = [];
    for (const n of sizes()) {
      fs.writeFileSync(f, '');
      fs.truncateSync(f, n);
      const line = qemu('qemu-img', ['info', '-f', 'raw', f]).split('\n').find((l) => l.startsWith('virtual size: ')) ?? '';
      const theirs = line.slice('virtual size: '.length, line.indexOf(' ('));
      if (sizeToStr(n) !== theirs) bad.push(`${n}: ours '${sizeToStr(n)}', qemu-img '${theirs}'`);
    }
    expect(bad).toEqual([]);
  });

  it('cvtstr: qemu-io\'s transfer sizes', () => {
    const f = path.join(dir, 'w.raw');
    fs.writeFileSync(f, '');
    fs.truncateSync(f, 64 * 1024 * 1024);
    const lengths = [1, 512, 1000, 1023, 1024, 1088, 1536, 2560, 65536, 1000 * 1024, 1536 * 1024, 3 * 1024 * 1024 + 512, 64 * 1024 * 1024];
    const out = qemu('qemu-io', ['-f', 'raw', ...lengths.flatMap((n) => ['-c', `write 0 ${n}`]), f]);
    const theirs = out.split('\n').filter((l) => l.includes(' ops; ')).map((l) => l.slice(0, l.indexOf(',')));
    expect(lengths.map((n) => cvtstr(n))).toEqual(theirs);
  });
});

it('size_to_str and cvtstr round exact ties to even, as glibc\'s printf', () => {
  expect(sizeToStr(197120)).toBe('192 KiB');
  expect(sizeToStr(197632)).toBe('193 KiB');
  expect(sizeToStr(1000)).toBe('0.977 KiB');
  expect(sizeToStr(1048064000)).toBe('1e+03 MiB');
  expect(cvtstr(1088)).toBe('1.062 KiB');
  expect(cvtstr(1536)).toBe('1.500 KiB');
  expect(cvtstr(512)).toBe('512 bytes');
});

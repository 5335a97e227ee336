/**
 * The snapshot table as qemu-img 7.2 prints it (`qemu-img snapshot -l`, `qemu-img info`, HMP
 * `info snapshots`): block/qapi.c's bdrv_snapshot_dump. Common code (pure).
 */
import type { SnapshotInfo } from '../block/driver.js';
import { sizeToStr } from './format.js';

function pad(s: string, width: number, left: boolean): string {
  return left ? s.padEnd(width) : s.padStart(width);
}

function two(n: number): string {
  return String(n).padStart(2, '0');
}

/** The header line: `%-10s%-17s%8s%20s%13s%11s`. */
export function snapshotHeader(): string {
  return pad('ID', 10, true) + pad('TAG', 17, true) + pad('VM SIZE', 8, false) + pad('DATE', 20, false) + pad('VM CLOCK', 13, false) + pad('ICOUNT', 11, false);
}

/** One row: `%-9s %-16s %8s%20s%13s%11s`; local-time date, `HH:MM:SS.mmm` clock, blank icount when -1. */
export function snapshotRow(sn: SnapshotInfo, idOverride?: string): string {
  const d = new Date(sn.dateSec * 1000);
  const date = `${d.getFullYear()}-${two(d.getMonth() + 1)}-${two(d.getDate())} ${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}`;
  const ms = Math.floor(sn.vmClockNsec / 1e6);
  const clock = `${two(Math.floor(ms / 3600000))}:${two(Math.floor(ms / 60000) % 60)}:${two(Math.floor(ms / 1000) % 60)}.${String(ms % 1000).padStart(3, '0')}`;
  const icount = sn.icount === -1 ? '' : String(sn.icount);
  return `${pad(idOverride ?? sn.id, 9, true)} ${pad(sn.name, 16, true)} ${pad(sizeToStr(sn.vmStateSize), 8, false)}${pad(date, 20, false)}${pad(clock, 13, false)}${pad(icount, 11, false)}`;
}

/** A snapshot as qemu-img's JSON shows it (`icount` only when recorded). */
export function snapshotJson(sn: SnapshotInfo): Record<string, unknown> {
  const o: Record<string, unknown> = {
    id: sn.id,
    name: sn.name,
    'vm-state-size': sn.vmStateSize,
    'date-sec': sn.dateSec,
    'date-nsec': sn.dateNsec,
    'vm-clock-sec': Math.floor(sn.vmClockNsec / 1e9),
    'vm-clock-nsec': sn.vmClockNsec % 1e9,
  };
  if (sn.icount !== -1) o['icount'] = sn.icount;
  return o;
}

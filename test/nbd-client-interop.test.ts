/**
 * snapstack's NBD client (driver=nbd) against real servers: qemu-nbd exporting raw and qcow2
 * images, nbdkit's memory and file plugins (and its blocksize-policy filter, which makes the
 * server refuse requests that ignore its block-size constraints), and a qcow2 image stored ON an
 * NBD export. Every step is checked against a reference byte array; after the server stops,
 * the image file is compared (and qemu-img checks the qcow2 one).
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { bdrvBlockStatus, openImage, shutdownIOThreads, withBql, type Image } from '../src/index.js';
import '../src/drivers/nbd/driver.js';
import { Machine } from '../src/machine/machine.js';
import { loadVm, saveVm } from '../src/machine/savevm.js';
import { expectGuestConsistent, waitForWrites } from './helpers/guest.js';
import { describeInterop, qemu, qemuStatus } from './helpers/qemu.js';
import { describeWithTool, firstDifference, pattern, startNbdkit, startQemuNbd, startServer, type ServerProcess } from './nbd-client-helpers.js';

const MiB = 1024 * 1024;
let dir: string;
const servers: ServerProcess[] = [];

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapstack-nbd-client-'));
});
afterAll(async () => {
  for (const s of servers) await s.stop();
  fs.rmSync(dir, { recursive: true, force: true });
  await withBql((bql) => shutdownIOThreads(bql));
});

function sock(name: string): string {
  return path.join(dir, `${name}.sock`);
}

async function track(p: Promise<ServerProcess>): Promise<ServerProcess> {
  const s = await p;
  servers.push(s);
  return s;
}

function expectSame(actual: Uint8Array, expected: Uint8Array, what: string): void {
  const d = firstDifference(actual, expected);
  expect(d, `${what}: first difference at byte ${d}`).toBe(-1);
}

/** Writes of assorted sizes and alignments (some unaligned, one spanning several max-size pieces), mirrored in `ref`. */
async function writeMix(img: Image, ref: Uint8Array, seed: number): Promise<void> {
  const size = ref.length;
  const ops: Array<[number, number]> = [
    [0, 4096],
    [4096 * 7 + 1, 3000],
    [size - 512, 512],
    [MiB - 100, 200],
    [2 * MiB, 3 * MiB + 17],
    [12345, 1],
  ];
  // all in flight at once: the client pipelines them and matches the replies
  await Promise.all(
    ops.map(([off, len], i) => {
      const data = pattern(seed + i, len);
      ref.set(data, off);
      return img.write(off, data);
    }),
  );
  await img.writeZeroes(2 * MiB + 4096, 64 * 1024);
  ref.fill(0, 2 * MiB + 4096, 2 * MiB + 4096 + 64 * 1024);
  await img.flush();
}

async function readBack(img: Image, ref: Uint8Array, what: string): Promise<void> {
  expectSame(await img.read(0, ref.length), ref, `${what}: whole read`);
  // small reads at odd offsets, many in flight
  const reads = await Promise.all([1, 4097, MiB - 1, 2 * MiB + 5].map((o) => img.read(o, 9000)));
  reads.forEach((r, i) => {
    const o = [1, 4097, MiB - 1, 2 * MiB + 5][i] as number;
    expectSame(r, ref.subarray(o, o + 9000), `${what}: read at ${o}`);
  });
}

describeInterop('our NBD client over qemu-nbd', () => {
  it('reads and writes a raw image exported by qemu-nbd, which then holds the same bytes', async () => {
    const file = path.join(dir, 'raw.img');
    const ref = pattern(1, 8 * MiB);
    fs.writeFileSync(file, ref);
    const srv = await track(startQemuNbd(file, 'raw', 'disk', sock('qnbd-raw')));
    const img = await openImage(`driver=nbd,server.type=unix,server.path=${srv.socket},export=disk`);
    expect(img.size).toBe(8 * MiB);
    await readBack(img, ref, 'before writes');
    await writeMix(img, ref, 100);
    await readBack(img, ref, 'after writes');
    await img.close();
    await srv.stop();
    expectSame(fs.readFileSync(file), ref, 'the file after qemu-nbd stopped');
  });

  it('reads and writes a qcow2 image exported by qemu-nbd -f qcow2; qemu-img checks it clean afterwards', async () => {
    const file = path.join(dir, 'exp.qcow2');
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', file, '8M']);
    qemu('qemu-io', ['-f', 'qcow2', '-c', 'write -q -P 0x5a 1M 1M', file]);
    const ref = new Uint8Array(8 * MiB);
    ref.fill(0x5a, MiB, 2 * MiB);
    const srv = await track(startQemuNbd(file, 'qcow2', 'q', sock('qnbd-qcow2')));
    const img = await openImage(`driver=raw,file.driver=nbd,file.filename=nbd+unix:///q?socket=${srv.socket}`);
    await readBack(img, ref, 'qemu-io data');
    await writeMix(img, ref, 200);
    await readBack(img, ref, 'after writes');
    // block status from qemu-nbd: the zero tail of a fresh qcow2 is not data
    const root = img.backend.root;
    expect(root).not.toBeNull();
    if (root !== null) {
      const file0 = root.children.find((c) => c.role === 'file')?.child ?? root;
      const st = await bdrvBlockStatus(file0, 7 * MiB, MiB);
      expect(st.zero).toBe(true);
      expect(st.data).toBe(false);
      const st2 = await bdrvBlockStatus(file0, MiB, MiB);
      expect(st2.data).toBe(true);
    }
    await img.close();
    await srv.stop();
    const out = path.join(dir, 'exp.raw');
    qemu('qemu-img', ['convert', '-O', 'raw', file, out]);
    expectSame(fs.readFileSync(out), ref, 'qemu-img convert of the qcow2 after qemu-nbd stopped');
    const chk = qemuStatus('qemu-img', ['check', file]);
    expect(`${chk.stdout}${chk.stderr}exit ${chk.status}`).toMatch(/No errors were found on the image\.[\s\S]*exit 0$/);
  });

  it('opens a qcow2 image stored on an NBD export (driver=qcow2,file.driver=nbd) and qemu-img checks the result', async () => {
    // the export is the qcow2 file itself, with room behind it: an NBD export cannot grow
    const file = path.join(dir, 'on-nbd.qcow2');
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', file, '4M']);
    fs.truncateSync(file, 16 * MiB);
    const srv = await track(startQemuNbd(file, 'raw', 'store', sock('qnbd-store')));
    const img = await openImage(`driver=qcow2,file.driver=nbd,file.server.type=unix,file.server.path=${srv.socket},file.export=store`);
    expect(img.size).toBe(4 * MiB);
    const ref = new Uint8Array(4 * MiB);
    const a = pattern(7, 300_000);
    const b = pattern(8, 65536);
    await Promise.all([img.write(10_000, a), img.write(3 * MiB, b)]);
    ref.set(a, 10_000);
    ref.set(b, 3 * MiB);
    await img.flush();
    expectSame(await img.read(0, 4 * MiB), ref, 'qcow2 on nbd');
    await img.close();
    await srv.stop();
    const chk = qemuStatus('qemu-img', ['check', file]);
    expect(`${chk.stdout}${chk.stderr}exit ${chk.status}`).toMatch(/No errors were found on the image\.[\s\S]*exit 0$/);
    const out = path.join(dir, 'on-nbd.raw');
    qemu('qemu-img', ['convert', '-O', 'raw', file, out]);
    expectSame(fs.readFileSync(out), ref, 'qemu-img convert of the qcow2 written over NBD');
  });

  it('refuses to open a read-only export writable, and reads it read-only', async () => {
    const file = path.join(dir, 'ro.img');
    const ref = pattern(3, MiB);
    fs.writeFileSync(file, ref);
    const s = sock('qnbd-ro');
    const srv = await track(startQemuNbdReadOnly(file, s));
    await expect(openImage(`driver=nbd,server.type=unix,server.path=${s},export=ro`)).rejects.toMatchObject({ code: 'EACCES', message: expect.stringMatching(/read-only/) });
    const img = await openImage(`driver=nbd,server.type=unix,server.path=${s},export=ro`, { readOnly: true });
    expectSame(await img.read(0, MiB), ref, 'read-only export');
    await img.close();
    await srv.stop();
  });

  it('names the export when the server does not have it (ENOENT)', async () => {
    const file = path.join(dir, 'named.img');
    fs.writeFileSync(file, new Uint8Array(MiB));
    const srv = await track(startQemuNbd(file, 'raw', 'there', sock('qnbd-named')));
    await expect(openImage(`driver=nbd,server.type=unix,server.path=${srv.socket},export=missing`)).rejects.toMatchObject({
      code: 'ENOENT',
      message: expect.stringContaining("export 'missing' not found"),
    });
    await srv.stop();
  });
});

function startQemuNbdReadOnly(file: string, socket: string): Promise<ServerProcess> {
  return startServer('qemu-nbd', ['-k', socket, '-f', 'raw', '-x', 'ro', '-t', '-r', file], socket);
}

describeWithTool('nbdkit', 'apt-get install nbdkit', 'our NBD client over nbdkit', () => {
  it('reads and writes nbdkit memory, with block status from the server', async () => {
    const srv = await track(startNbdkit(sock('kit-mem'), ['memory', '16M']));
    const img = await openImage(`driver=nbd,server.type=unix,server.path=${srv.socket}`);
    const ref = new Uint8Array(16 * MiB);
    await readBack(img, ref, 'fresh memory');
    await writeMix(img, ref, 300);
    await readBack(img, ref, 'after writes');
    const root = img.backend.root;
    if (root === null) throw new Error('no root');
    const hole = await bdrvBlockStatus(root, 10 * MiB, MiB);
    expect(hole).toMatchObject({ data: false, zero: true, allocated: true });
    const data = await bdrvBlockStatus(root, 0, 4096);
    expect(data).toMatchObject({ data: true, zero: false, bytes: 4096 });
    await img.close();
  });

  it('reads and writes a file through nbdkit-file-plugin; the file then holds the same bytes', async () => {
    const file = path.join(dir, 'kit-file.img');
    const ref = pattern(4, 6 * MiB);
    fs.writeFileSync(file, ref);
    const srv = await track(startNbdkit(sock('kit-file'), ['file', file]));
    const img = await openImage(`driver=nbd,filename=nbd+unix:///?socket=${srv.socket}`);
    await readBack(img, ref, 'file');
    await writeMix(img, ref, 400);
    await img.discard(4 * MiB, MiB); // a hint: the bytes may or may not change; reread them
    ref.set(await img.read(4 * MiB, MiB), 4 * MiB);
    await readBack(img, ref, 'after writes');
    await img.close();
    await srv.stop();
    expectSame(fs.readFileSync(file), ref, 'the file after nbdkit stopped');
  });

  it("honours the server's block-size constraints (4 KiB minimum, 64 KiB maximum, enforced by the server)", async () => {
    const srv = await track(
      startNbdkit(sock('kit-bs'), [
        '--filter=blocksize-policy',
        'memory',
        '8M',
        'blocksize-minimum=4096',
        'blocksize-preferred=4096',
        'blocksize-maximum=65536',
        'blocksize-error-policy=error',
      ]),
    );
    const img = await openImage(`driver=nbd,server.type=unix,server.path=${srv.socket}`);
    const ref = new Uint8Array(8 * MiB);
    await writeMix(img, ref, 500);
    // two unaligned writes into the same 4 KiB block at once: the read-modify-writes must not lose either
    const x = pattern(600, 10);
    const y = pattern(601, 10);
    await Promise.all([img.write(40_000, x), img.write(40_020, y)]);
    ref.set(x, 40_000);
    ref.set(y, 40_020);
    await img.writeZeroes(5 * MiB + 3, 70_000);
    ref.fill(0, 5 * MiB + 3, 5 * MiB + 3 + 70_000);
    await readBack(img, ref, 'block-size constrained');
    await img.close();
  });
});

describeInterop('our NBD client when qemu-nbd is killed, and over qemu-storage-daemon', () => {
  it('keeps what was flushed when qemu-nbd is killed, reconnects within reconnect-delay and completes the requests', async () => {
    const file = path.join(dir, 'killed.img');
    fs.writeFileSync(file, new Uint8Array(4 * MiB));
    const s = sock('qnbd-killed');
    let srv = await startQemuNbd(file, 'raw', 'k', s);
    const img = await openImage(`driver=nbd,server.type=unix,server.path=${s},export=k,reconnect-delay=10`);
    const ref = new Uint8Array(4 * MiB);
    const a = pattern(50, 200_000);
    await img.write(1000, a);
    ref.set(a, 1000);
    await img.flush();
    srv.proc.kill('SIGKILL');
    await new Promise<void>((r) => srv.proc.once('exit', () => r()));
    // requests issued while the server is dead wait for it
    const b = pattern(51, 70_000);
    ref.set(b, 3 * MiB);
    const pendingWrite = img.write(3 * MiB, b);
    await new Promise((r) => setTimeout(r, 200));
    srv = await track(startQemuNbd(file, 'raw', 'k', s));
    await pendingWrite;
    await img.flush();
    expectSame(await img.read(0, 4 * MiB), ref, 'after the restart');
    await img.close();
    await srv.stop();
    expectSame(fs.readFileSync(file), ref, 'the file');
  });

  it('reads and writes a qcow2 node exported by qemu-storage-daemon --export type=nbd', async () => {
    const file = path.join(dir, 'qsd.qcow2');
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', file, '8M']);
    const s = sock('qsd');
    const srv = await track(
      startServer(
        'qemu-storage-daemon',
        [
          '--blockdev',
          `driver=file,node-name=f,filename=${file}`,
          '--blockdev',
          'driver=qcow2,node-name=q,file=f',
          '--nbd-server',
          `addr.type=unix,addr.path=${s}`,
          '--export',
          'type=nbd,id=e,node-name=q,name=qsd,writable=on',
        ],
        s,
      ),
    );
    const img = await openImage(`driver=nbd,server.type=unix,server.path=${s},export=qsd`);
    const ref = new Uint8Array(8 * MiB);
    await writeMix(img, ref, 700);
    await readBack(img, ref, 'qemu-storage-daemon');
    const root = img.backend.root;
    if (root === null) throw new Error('no root');
    expect(await bdrvBlockStatus(root, 7 * MiB, MiB)).toMatchObject({ data: false, zero: true });
    await img.close();
    await srv.stop();
    const out = path.join(dir, 'qsd.raw');
    qemu('qemu-img', ['convert', '-O', 'raw', file, out]);
    expectSame(fs.readFileSync(out), ref, 'qemu-img convert after qemu-storage-daemon stopped');
    const chk = qemuStatus('qemu-img', ['check', file]);
    expect(`${chk.stdout}${chk.stderr}exit ${chk.status}`).toMatch(/No errors were found on the image\.[\s\S]*exit 0$/);
  });
});

describeWithTool('nbdkit', 'apt-get install nbdkit', 'our NBD client under load', () => {
  it('keeps a reference model through 400 random concurrent reads, writes and zeroes on a 4 KiB-minimum server', async () => {
    const size = 2 * MiB;
    const srv = await track(
      startNbdkit(sock('kit-rand'), ['--filter=blocksize-policy', 'memory', '2M', 'blocksize-minimum=4096', 'blocksize-maximum=65536', 'blocksize-error-policy=error']),
    );
    const img = await openImage(`driver=nbd,server.type=unix,server.path=${srv.socket}`);
    const ref = new Uint8Array(size);
    let seed = 12345;
    const rnd = (n: number): number => {
      seed = (seed * 1103515245 + 12345) >>> 0;
      return seed % n;
    };
    for (let round = 0; round < 20; round++) {
      // 20 requests at once; writes in one batch never share a byte (so the model's order does not
      // matter) but often share a 4 KiB block: the read-modify-writes must not lose each other's bytes
      const taken: Array<[number, number]> = [];
      const ops: Promise<unknown>[] = [];
      for (let i = 0; i < 20; i++) {
        const len = 1 + rnd(100_000);
        const off = rnd(size - len);
        const kind = rnd(3);
        if (kind !== 2 && taken.some(([o, l]) => o < off + len && off < o + l)) continue;
        if (kind === 0) {
          taken.push([off, len]);
          const d = pattern(round * 100 + i, len);
          ref.set(d, off);
          ops.push(img.write(off, d));
        } else if (kind === 1) {
          taken.push([off, len]);
          ref.fill(0, off, off + len);
          ops.push(img.writeZeroes(off, len));
        } else {
          // a read in flight among the writes (its bytes may be old or new: not checked)
          ops.push(img.read(off, len));
        }
      }
      await Promise.all(ops);
      expectSame(await img.read(0, size), ref, `after round ${round}`);
    }
    await img.close();
  });
});

describeInterop('a machine whose disk is a qcow2 image on an NBD export', () => {
  it('runs the guest on it, savevm and loadvm restore RAM and disk together, and qemu-img sees the snapshot', async () => {
    const file = path.join(dir, 'vm-on-nbd.qcow2');
    qemu('qemu-img', ['create', '-q', '-f', 'qcow2', file, '16M']);
    fs.truncateSync(file, 64 * MiB); // room for clusters, snapshots and VM state: an export cannot grow
    const srv = await track(startQemuNbd(file, 'raw', 'vm', sock('qnbd-vm')));
    const m = new Machine({ guest: true, vcpus: 2, ramBytes: 4 * MiB });
    await withBql(async (bql) => {
      await m.addDrive(bql, `driver=qcow2,id=d0,file.driver=nbd,file.server.type=unix,file.server.path=${srv.socket},file.export=vm`);
      await m.start(bql);
    });
    try {
      await waitForWrites(m, 100);
      await withBql((bql) => saveVm(bql, m, 'over-nbd'));
      const atSave = m.guestCounters().writes;
      await waitForWrites(m, 200);
      await withBql((bql) => loadVm(bql, m, 'over-nbd'));
      await expectGuestConsistent(m);
      expect(m.guestCounters().writes).toBeLessThan(atSave + 200);
      await withBql((bql) => m.stop(bql));
      await expectGuestConsistent(m);
    } finally {
      await withBql((bql) => m.shutdown(bql));
    }
    await srv.stop();
    const info = JSON.parse(qemu('qemu-img', ['info', '--output=json', file])) as { snapshots?: Array<{ name: string; 'vm-state-size': number }> };
    expect(info.snapshots?.map((s) => s.name)).toEqual(['over-nbd']);
    expect(info.snapshots?.[0]?.['vm-state-size'] ?? 0).toBeGreaterThan(0);
    const chk = qemuStatus('qemu-img', ['check', file]);
    expect(`${chk.stdout}${chk.stderr}exit ${chk.status}`).toMatch(/No errors were found on the image\.[\s\S]*exit 0$/);
  });
});

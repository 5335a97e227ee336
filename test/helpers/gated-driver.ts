/**
 * A protocol driver for tests: `driver=gated,size=N`. It records the order in which requests reach
 * it, and holds them while its gate is closed, so that tests can keep requests in flight, make
 * them fail, and watch what drain does.
 */
import type { Bql } from '../../src/block/bql.js';
import type { DrainedProof } from '../../src/block/drain.js';
import { registerDriver, type BlockDriver, type BlockDriverInstance } from '../../src/block/driver.js';
import { BlockError } from '../../src/block/errors.js';
import type { BlockNode } from '../../src/block/node.js';
import { parseSize, type NodeOptions } from '../../src/block/options.js';

export interface GateControl {
  /** Requests in the order they reached the driver: `w@offset` / `r@offset`. */
  log: string[];
  /** Closed: requests wait. */
  closed: boolean;
  /** When set, requests fail with EIO once released. */
  failing: boolean;
  open(): void;
}

export const gates = new Map<string, GateControl>();

class GatedInstance implements BlockDriverInstance {
  private readonly data: Uint8Array;
  private waiting: Array<() => void> = [];

  constructor(
    private readonly nodeName: string,
    size: number,
    private readonly gate: GateControl,
  ) {
    this.data = new Uint8Array(size);
    gate.open = () => {
      gate.closed = false;
      for (const w of this.waiting.splice(0)) w();
    };
  }

  private async pass(): Promise<void> {
    if (this.gate.closed) await new Promise<void>((r) => this.waiting.push(r));
    if (this.gate.failing) throw new BlockError('EIO', `gated node '${this.nodeName}': injected failure`, { node: this.nodeName });
  }

  async preadv(offset: number, buf: Uint8Array): Promise<void> {
    this.gate.log.push(`r@${offset}`);
    await this.pass();
    buf.set(this.data.subarray(offset, offset + buf.length));
  }

  async pwritev(offset: number, buf: Uint8Array): Promise<void> {
    this.gate.log.push(`w@${offset}`);
    await this.pass();
    this.data.set(buf, offset);
  }

  async pwriteZeroes(offset: number, bytes: number): Promise<void> {
    this.gate.log.push(`z@${offset}`);
    await this.pass();
    this.data.fill(0, offset, offset + bytes);
  }

  async pdiscard(): Promise<void> {
    await this.pass();
  }

  async flush(): Promise<void> {
    await this.pass();
  }

  getLength(): number {
    return this.data.length;
  }

  async truncate(): Promise<void> {
    throw new BlockError('ENOTSUP', 'gated nodes cannot be resized');
  }

  async close(_bql: Bql, _drained: DrainedProof): Promise<void> {
    gates.delete(this.nodeName);
  }
}

const gatedDriver: BlockDriver = {
  formatName: 'gated',
  kind: 'protocol',
  async open(_bql: Bql, node: BlockNode, opts: NodeOptions): Promise<BlockDriverInstance> {
    const gate: GateControl = { log: [], closed: false, failing: false, open: () => {} };
    gates.set(node.nodeName, gate);
    return new GatedInstance(node.nodeName, parseSize(opts['size'] ?? '1M'), gate);
  },
};

registerDriver(gatedDriver);

/** The gate of node `name`. */
export function gateOf(name: string): GateControl {
  const g = gates.get(name);
  if (g === undefined) throw new Error(`no gated node '${name}'`);
  return g;
}

/** Lets pending promise callbacks and a few event-loop turns run. */
export async function settle(turns = 5): Promise<void> {
  for (let i = 0; i < turns; i++) await new Promise<void>((r) => setImmediate(r));
}

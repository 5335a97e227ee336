/**
 * `transaction` (QEMU's qmp_transaction): several snapshot actions that succeed or fail together.
 * Actions: blockdev-snapshot-internal-sync and abort (QEMU's test action, which always fails).
 *
 * As QEMU, each action is checked and made in order ("prepare"), every node quiet throughout:
 * one drained-all section covers the whole transaction, and the snapshot lock is held (waited
 * for before the BQL) so no snapshot job interleaves. When an action fails, the snapshots the
 * earlier actions made are deleted again in reverse order, and the error is the failing action's,
 * so a transaction leaves every image as it was or makes every snapshot. The BQL is held for the
 * transaction: it is one global-state step, as in QEMU.
 */
import { withBql } from '../../block/bql.js';
import { withDrainedAll } from '../../block/drain.js';
import type { SnapshotInfo } from '../../block/driver.js';
import type { BlockNode } from '../../block/node.js';
import { bdrvSnapshotCreate, bdrvSnapshotDelete } from '../../block/snapshot.js';
import { withSnapshotLock } from '../../block/snapshot-lock.js';
import { QmpError, type QmpCommand, type QmpObject, type QmpValue } from '../types.js';
import { planInternalSnapshot } from './block.js';
import { qmpErrors } from './util.js';

/** The action types a transaction takes. */
const ACTION_TYPES = ['abort', 'blockdev-snapshot-internal-sync'] as const;

function isObject(v: QmpValue | undefined): v is QmpObject {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** Checks one action's data members (the schema checked `type` and that `data` is there). */
function actionData(action: QmpObject, index: number): { type: (typeof ACTION_TYPES)[number]; device: string; name: string } {
  const at = `actions[${index}]`;
  const type = action['type'];
  if (typeof type !== 'string' || !(ACTION_TYPES as readonly string[]).includes(type)) throw new QmpError('GenericError', `Parameter 'type' does not accept value '${String(type)}'`);
  const data = action['data'];
  if (!isObject(data)) throw new QmpError('GenericError', `Parameter '${at}.data' is missing`);
  if (type === 'abort') {
    for (const k of Object.keys(data)) throw new QmpError('GenericError', `Parameter '${at}.data.${k}' is unexpected`);
    return { type, device: '', name: '' };
  }
  for (const member of ['device', 'name']) {
    const v = data[member];
    if (v === undefined) throw new QmpError('GenericError', `Parameter '${at}.data.${member}' is missing`);
    if (typeof v !== 'string') throw new QmpError('GenericError', `Invalid parameter type for '${at}.data.${member}', expected: string`);
  }
  for (const k of Object.keys(data)) if (k !== 'device' && k !== 'name') throw new QmpError('GenericError', `Parameter '${at}.data.${k}' is unexpected`);
  return { type: 'blockdev-snapshot-internal-sync', device: String(data['device']), name: String(data['name']) };
}

const transaction: QmpCommand = {
  name: 'transaction',
  doc: 'Runs snapshot actions atomically: every action succeeds, or none leaves a trace (the snapshots made before a failing action are deleted again). Actions: blockdev-snapshot-internal-sync (`data`: device, name) and abort (always fails). completion-mode grouped is refused, as QEMU refuses it for these actions.',
  args: [
    { name: 'actions', type: { array: { struct: [{ name: 'type', type: { enum: ACTION_TYPES } }, { name: 'data', type: 'any' }] } } },
    { name: 'properties', type: { struct: [{ name: 'completion-mode', type: { enum: ['individual', 'grouped'] }, optional: true }] }, optional: true },
  ],
  example: {
    args: {
      actions: [
        { type: 'blockdev-snapshot-internal-sync', data: { device: 'disk0', name: 'nightly' } },
        { type: 'blockdev-snapshot-internal-sync', data: { device: 'disk1', name: 'nightly' } },
      ],
    },
    returns: {},
  },
  run: (ctx, args) =>
    qmpErrors(async () => {
      const list = args['actions'];
      const actions = (Array.isArray(list) ? list : []).map((a, i) => actionData(isObject(a) ? a : {}, i));
      const props = args['properties'];
      const grouped = isObject(props) && props['completion-mode'] === 'grouped';
      if (actions.length === 0) return {};
      return withSnapshotLock('transaction', () =>
        withBql((bql) =>
          withDrainedAll(bql, async (drained) => {
            const made: Array<{ node: BlockNode; snapshot: SnapshotInfo }> = [];
            try {
              for (const a of actions) {
                if (a.type === 'abort') throw new QmpError('GenericError', 'Transaction aborted using Abort action');
                if (grouped) throw new QmpError('GenericError', `Action '${a.type}' does not support Transaction property completion-mode = grouped`);
                const plan = await planInternalSnapshot(bql, ctx, a.device, a.name);
                made.push({ node: plan.node, snapshot: await bdrvSnapshotCreate(bql, drained, plan.node, plan.info) });
              }
            } catch (e) {
              // undo in reverse order; a failed undo is reported with the cause
              const undoFailures: string[] = [];
              for (const m of made.reverse()) {
                try {
                  await bdrvSnapshotDelete(bql, drained, m.node, m.snapshot.id, m.snapshot.name);
                } catch (u) {
                  undoFailures.push(`${m.node.nodeName}: ${u instanceof Error ? u.message : String(u)}`);
                }
              }
              if (undoFailures.length > 0) {
                const first = e instanceof QmpError ? e.desc : e instanceof Error ? e.message : String(e);
                throw new QmpError('GenericError', `${first} (and removing the snapshots already made failed: ${undoFailures.join('; ')})`);
              }
              throw e;
            }
            return {};
          }),
        ),
      );
    }),
};

/** The transaction command. */
export const transactionCommands: QmpCommand[] = [transaction];

/**
 * NBD exports over QMP, as QEMU 7.2's qapi/block-export.json defines them: nbd-server-start,
 * nbd-server-stop, block-export-add (type nbd), block-export-del and query-block-exports, with
 * qemu-storage-daemon 7.2's replies, errors and BLOCK_EXPORT_DELETED events; and object-add /
 * object-del for the one object type the NBD code uses, tls-creds-x509 (src/nbd/tls-creds.ts).
 *
 * Each command runs on the main loop and takes the BQL (withBql) for its whole body: the
 * registry of exports (src/nbd/exports.ts) is global state, and starting, stopping or deleting
 * waits (for the listener, for the requests in flight of disconnected clients) under it.
 */
import { withBql } from '../../block/bql.js';
import { blockExportAdd, blockExportDel, nbdServerStart, nbdServerStop, queryBlockExports } from '../../nbd/exports.js';
import type { NbdListenAddress } from '../../nbd/server.js';
import { addTlsCreds, deleteTlsCreds, loadTlsCredsX509 } from '../../nbd/tls-creds.js';
import { QmpError, type QmpCommand, type QmpObject, type QmpValue } from '../types.js';
import { optBool, optInt, optStr, qmpErrors, reqStr } from './util.js';

function isObject(v: QmpValue | undefined): v is QmpObject {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function str(o: QmpObject, key: string, where: string): string {
  const v = o[key];
  if (v === undefined) throw new QmpError('GenericError', `Parameter '${where}.${key}' is missing`);
  if (typeof v !== 'string') throw new QmpError('GenericError', `Invalid parameter type for '${where}.${key}', expected: string`);
  return v;
}

/**
 * A SocketAddress's members (`type` plus unix `path` or inet `host`/`port`) at `where`, as the
 * listen address of the server; vsock and fd are refused by name.
 * @locking common
 */
export function listenAddressOf(o: QmpObject, where: string): NbdListenAddress {
  const type = str(o, 'type', where);
  if (type === 'unix') return { type: 'unix', path: str(o, 'path', where) };
  if (type === 'inet') {
    const host = str(o, 'host', where);
    const portText = str(o, 'port', where);
    const port = Number(portText);
    if (!/^\d+$/.test(portText) || port > 65535) throw new QmpError('GenericError', `Parameter '${where}.port' expects a port number, not '${portText}'`);
    return { type: 'inet', host, port };
  }
  if (type === 'vsock' || type === 'fd') throw new QmpError('GenericError', `NBD server address type '${type}' is not supported by snapstack (unix and inet are)`);
  throw new QmpError('GenericError', `Parameter '${where}.type' does not accept value '${type}'`);
}

/** nbd-server-start's SocketAddressLegacy: `{type, data: {...}}`, as QEMU 7.2 takes it. */
function legacyAddress(args: QmpObject): NbdListenAddress {
  const addr = args['addr'];
  if (!isObject(addr)) throw new QmpError('GenericError', "Invalid parameter type for 'addr', expected: object");
  const type = str(addr, 'type', 'addr');
  const data = addr['data'];
  if (data === undefined) throw new QmpError('GenericError', "Parameter 'addr.data' is missing");
  if (!isObject(data)) throw new QmpError('GenericError', "Invalid parameter type for 'addr.data', expected: object");
  return listenAddressOf({ ...data, type }, 'addr.data');
}

const nbdServerStartCommand: QmpCommand = {
  name: 'nbd-server-start',
  doc: "Starts the process's NBD server on `addr` (QEMU 7.2's SocketAddressLegacy: `{type: unix, data: {path}}` or `{type: inet, data: {host, port}}`; port is a string). `max-connections` bounds the clients served at once (0, the default: no bound). `tls-creds` names a tls-creds-x509 object with endpoint=server (the daemon's `--object`): every client must then negotiate TLS (QEMU's forced mode). `tls-authz`, vsock and fd addresses are not built.",
  args: [
    { name: 'addr', type: 'any' },
    { name: 'tls-creds', type: 'str', optional: true },
    { name: 'tls-authz', type: 'str', optional: true },
    { name: 'max-connections', type: 'int', optional: true },
  ],
  example: { args: { addr: { type: 'unix', data: { path: '/tmp/nbd.sock' } } }, returns: {} },
  run: (_ctx, args) =>
    qmpErrors(() =>
      withBql(async (bql) => {
        const addr = legacyAddress(args);
        const tlsCreds = optStr(args, 'tls-creds');
        if (optStr(args, 'tls-authz') !== undefined && tlsCreds === undefined) throw new QmpError('GenericError', "'tls-authz' requires that 'tls-creds' is set");
        if (optStr(args, 'tls-authz') !== undefined) throw new QmpError('GenericError', 'tls-authz is not supported by snapstack (tls-creds with verify-peer=on accepts every client certificate the CA signed)');
        const maxConnections = optInt(args, 'max-connections');
        await nbdServerStart(bql, addr, { ...(tlsCreds === undefined ? {} : { tlsCreds }), ...(maxConnections === undefined ? {} : { maxConnections }) });
        return {};
      }),
    ),
};

const nbdServerStopCommand: QmpCommand = {
  name: 'nbd-server-stop',
  doc: 'Stops the NBD server: every NBD export is removed (BLOCK_EXPORT_DELETED for each; their clients are disconnected once their requests in flight have finished), then the listener closes.',
  args: [],
  example: { returns: {} },
  run: (ctx) =>
    qmpErrors(() =>
      withBql(async (bql) => {
        const removed = await nbdServerStop(bql);
        // after the reply, as qemu-storage-daemon (its exports go away in a bottom half)
        setImmediate(() => {
          for (const id of removed) ctx.emitEvent('BLOCK_EXPORT_DELETED', { id });
        });
        return {};
      }),
    ),
};

const blockExportAddCommand: QmpCommand = {
  name: 'block-export-add',
  doc: "Exports the node `node-name` over the NBD server (type nbd only; fuse and vhost-user-blk are not built) as `name` (the node name by default), read-only unless `writable`; `description` is sent to clients that list exports, `allocation-depth` offers the qemu:allocation-depth meta context. The node is then in use (blockdev-del refuses it). `iothread` must name an IOThread; the node's transfers keep running where the node is bound, so `iothread` and `fixed-iothread` change nothing else. `writethrough` makes every write durable before it is acknowledged.",
  args: [
    { name: 'type', type: { enum: ['nbd', 'vhost-user-blk', 'fuse', 'vduse-blk'] } },
    { name: 'id', type: 'str' },
    { name: 'node-name', type: 'str' },
    { name: 'fixed-iothread', type: 'bool', optional: true },
    { name: 'iothread', type: 'str', optional: true },
    { name: 'writable', type: 'bool', optional: true },
    { name: 'writethrough', type: 'bool', optional: true },
    { name: 'name', type: 'str', optional: true },
    { name: 'description', type: 'str', optional: true },
    { name: 'bitmaps', type: { array: 'str' }, optional: true },
    { name: 'allocation-depth', type: 'bool', optional: true },
  ],
  example: { args: { type: 'nbd', id: 'export0', 'node-name': 'disk0', writable: true }, returns: {} },
  run: (_ctx, args) =>
    qmpErrors(() =>
      withBql((bql) => {
        const type = reqStr(args, 'type');
        if (type !== 'nbd') throw new QmpError('GenericError', `Block export type '${type}' is not supported by snapstack (nbd is)`);
        const bitmaps = args['bitmaps'];
        if (Array.isArray(bitmaps) && bitmaps.length > 0) throw new QmpError('GenericError', 'Exporting dirty bitmaps (qemu:dirty-bitmap:*) is not supported by snapstack');
        const name = optStr(args, 'name');
        const description = optStr(args, 'description');
        const iothread = optStr(args, 'iothread');
        blockExportAdd(bql, {
          id: reqStr(args, 'id'),
          nodeName: reqStr(args, 'node-name'),
          writable: optBool(args, 'writable', false),
          writethrough: optBool(args, 'writethrough', false),
          allocationDepth: optBool(args, 'allocation-depth', false),
          ...(name === undefined ? {} : { name }),
          ...(description === undefined ? {} : { description }),
          ...(iothread === undefined ? {} : { iothread }),
        });
        return {};
      }),
    ),
};

const blockExportDelCommand: QmpCommand = {
  name: 'block-export-del',
  doc: "Removes the export `id`. `mode: safe` (the default) is refused while clients are connected; `mode: hard` disconnects them once their requests in flight have finished. BLOCK_EXPORT_DELETED follows the reply.",
  args: [
    { name: 'id', type: 'str' },
    { name: 'mode', type: { enum: ['safe', 'hard'] }, optional: true },
  ],
  example: { args: { id: 'export0', mode: 'hard' }, returns: {} },
  run: (ctx, args) =>
    qmpErrors(() =>
      withBql(async (bql) => {
        const id = reqStr(args, 'id');
        await blockExportDel(bql, id, optStr(args, 'mode') === 'hard' ? 'hard' : 'safe');
        // after the reply, as qemu-storage-daemon
        setImmediate(() => ctx.emitEvent('BLOCK_EXPORT_DELETED', { id }));
        return {};
      }),
    ),
};

const queryBlockExportsCommand: QmpCommand = {
  name: 'query-block-exports',
  doc: 'Lists the block exports, newest first, as QEMU: id, type, node-name, shutting-down.',
  args: [],
  example: { returns: [{ id: 'export0', type: 'nbd', 'node-name': 'disk0', 'shutting-down': false }] },
  run: () =>
    qmpErrors(() =>
      withBql((bql) => queryBlockExports(bql).map((e) => ({ id: e.id, type: e.type, 'node-name': e.nodeName, 'shutting-down': e.shuttingDown }))),
    ),
};

/** The NBD server and block export commands. */
/** tls-creds-x509's members in object-add: strings, and booleans as JSON booleans. */
const TLS_X509_STR = ['dir', 'priority', 'passwordid'] as const;
const TLS_X509_BOOL = ['verify-peer', 'sanity-check', 'loaded'] as const;

const objectAddCommand: QmpCommand = {
  name: 'object-add',
  doc: "Creates a user object (QEMU's ObjectOptions). Only `qom-type: tls-creds-x509` is built: `dir` holds ca-cert.pem and server-cert.pem/server-key.pem (endpoint server) or client-cert.pem/client-key.pem (endpoint client, the default); the files are read at once; `verify-peer` defaults to true. nbd-server-start's `tls-creds` and the nbd driver's `tls-creds` name it.",
  args: [
    { name: 'qom-type', type: 'str' },
    { name: 'id', type: 'str' },
    { name: 'dir', type: 'str', optional: true },
    { name: 'endpoint', type: { enum: ['client', 'server'] }, optional: true },
    { name: 'verify-peer', type: 'bool', optional: true },
    { name: 'sanity-check', type: 'bool', optional: true },
    { name: 'loaded', type: 'bool', optional: true },
    { name: 'priority', type: 'str', optional: true },
    { name: 'passwordid', type: 'str', optional: true },
  ],
  example: { args: { 'qom-type': 'tls-creds-x509', id: 'tls0', dir: '/etc/pki/qemu', endpoint: 'server' }, returns: {} },
  run: (_ctx, args) =>
    qmpErrors(async () => {
      const type = reqStr(args, 'qom-type');
      if (type !== 'tls-creds-x509') throw new QmpError('GenericError', `object type '${type}' is not supported by object-add in snapstack (tls-creds-x509 is)`);
      const props: Record<string, string> = { id: reqStr(args, 'id') };
      for (const k of TLS_X509_STR) {
        const v = optStr(args, k);
        if (v !== undefined) props[k] = v;
      }
      const endpoint = optStr(args, 'endpoint');
      if (endpoint !== undefined) props['endpoint'] = endpoint;
      for (const k of TLS_X509_BOOL) if (args[k] !== undefined) props[k] = optBool(args, k, true) ? 'on' : 'off';
      addTlsCreds(loadTlsCredsX509(props));
      return {};
    }),
};

const objectDelCommand: QmpCommand = {
  name: 'object-del',
  doc: 'Deletes a user object made by object-add or `--object` (tls-creds-x509); NBD sessions already using it go on.',
  args: [{ name: 'id', type: 'str' }],
  example: { args: { id: 'tls0' }, returns: {} },
  run: (_ctx, args) =>
    qmpErrors(async () => {
      deleteTlsCreds(reqStr(args, 'id'));
      return {};
    }),
};

export const nbdExportCommands: QmpCommand[] = [nbdServerStartCommand, nbdServerStopCommand, blockExportAddCommand, blockExportDelCommand, queryBlockExportsCommand, objectAddCommand, objectDelCommand];

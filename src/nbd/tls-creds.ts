/**
 * TLS credentials objects (QEMU's `tls-creds-x509`, crypto/tlscredsx509.c) and the process's
 * registry of them by id, as `--object tls-creds-x509,id=ID,dir=DIR,endpoint=server|client` makes
 * them and `--tls-creds ID` / `tls-creds=ID` name them. Built on Node's own `tls`.
 *
 * The files in `dir` carry QEMU's names: ca-cert.pem (required), ca-crl.pem (optional), and
 * server-cert.pem + server-key.pem (required) for a server endpoint, or client-cert.pem +
 * client-key.pem (optional, used when both are there) for a client endpoint. They are read when
 * the object is made, as QEMU does, so a missing file fails `--object` with the file named.
 * `verify-peer` defaults to on: a server then demands a certificate signed by the CA from each
 * client; a client checks the server's certificate (and, with a host name, its name).
 *
 * Common code: made and looked up on the main loop; the objects are immutable.
 */
import fs from 'node:fs';
import path from 'node:path';
import tls from 'node:tls';
import { BlockError, systemErrorText } from '../block/errors.js';

/** The side of a TLS session a credentials object is for. */
export type TlsEndpoint = 'server' | 'client';

/** A loaded `tls-creds-x509` object. */
export interface TlsCredsX509 {
  readonly id: string;
  readonly dir: string;
  readonly endpoint: TlsEndpoint;
  readonly verifyPeer: boolean;
  /** The CA, certificate and key as Node's TLS takes them (the client's sessions share it). */
  readonly secureContext: tls.SecureContext;
  /** The same as options (a tls.Server makes its own context from them). */
  readonly contextOptions: Readonly<tls.SecureContextOptions>;
}

/** QEMU's credential file names (crypto/tlscredsx509.h). */
export const TLS_FILES = {
  caCert: 'ca-cert.pem',
  caCrl: 'ca-crl.pem',
  serverCert: 'server-cert.pem',
  serverKey: 'server-key.pem',
  clientCert: 'client-cert.pem',
  clientKey: 'client-key.pem',
} as const;

/** Properties tls-creds-x509 has in QEMU; the ones snapstack does not build are refused by name. */
const KNOWN_PROPS = ['qom-type', 'id', 'dir', 'endpoint', 'verify-peer', 'sanity-check', 'loaded', 'priority', 'passwordid'];
const NOT_BUILT_PROPS = ['priority', 'passwordid'];

const registry = new Map<string, TlsCredsX509>();

function invalid(message: string, field?: string): BlockError {
  return new BlockError('EINVAL', message, field === undefined ? {} : { field });
}

function onOff(props: Readonly<Record<string, string>>, key: string, dflt: boolean): boolean {
  const v = props[key];
  if (v === undefined) return dflt;
  if (v === 'on' || v === 'yes' || v === 'true') return true;
  if (v === 'off' || v === 'no' || v === 'false') return false;
  throw invalid(`Parameter '${key}' expects 'on' or 'off'`, key);
}

/** Reads a credential file: its bytes, null when optional and absent; QEMU's message otherwise. */
function readCred(dir: string, name: string, required: boolean): Buffer | null {
  const file = path.join(dir, name);
  try {
    return fs.readFileSync(file);
  } catch (e) {
    const code = typeof e === 'object' && e !== null && 'code' in e ? String((e as { code: unknown }).code) : '';
    if (code === 'ENOENT' && !required) return null;
    throw new BlockError(code === 'EACCES' ? 'EACCES' : 'ENOENT', `Unable to access credentials ${file}: ${systemErrorText(e)}`, { file, cause: e });
  }
}

/**
 * Makes a tls-creds-x509 object from its properties (strings, as keyval gives them) and reads
 * its files. EINVAL for a bad property, ENOENT naming the file for a missing one, EINVAL for
 * files Node's TLS cannot use (a key that does not match its certificate, bad PEM).
 * @locking common
 */
export function loadTlsCredsX509(props: Readonly<Record<string, string>>): TlsCredsX509 {
  for (const k of Object.keys(props)) {
    if (!KNOWN_PROPS.includes(k)) throw invalid(`Property '${k}' not found`, k);
    if (NOT_BUILT_PROPS.includes(k)) throw new BlockError('ENOTSUP', `tls-creds-x509 property '${k}' is not supported by snapstack`, { field: k });
  }
  const id = props['id'];
  if (id === undefined || id === '') throw invalid("Parameter 'id' is missing", 'id');
  if (!/^[A-Za-z][A-Za-z0-9_.-]*$/.test(id)) throw invalid(`Parameter 'id' expects an identifier`, 'id');
  const dir = props['dir'];
  if (dir === undefined || dir === '') throw invalid("Missing 'dir' property value", 'dir');
  const ep = props['endpoint'] ?? 'client';
  if (ep !== 'server' && ep !== 'client') throw invalid(`Parameter 'endpoint' does not accept value '${ep}'`, 'endpoint');
  const verifyPeer = onOff(props, 'verify-peer', true);
  onOff(props, 'sanity-check', true);
  onOff(props, 'loaded', true);
  const ca = readCred(dir, TLS_FILES.caCert, true);
  const crl = readCred(dir, TLS_FILES.caCrl, false);
  let cert: Buffer | null;
  let key: Buffer | null;
  if (ep === 'server') {
    cert = readCred(dir, TLS_FILES.serverCert, true);
    key = readCred(dir, TLS_FILES.serverKey, true);
  } else {
    cert = readCred(dir, TLS_FILES.clientCert, false);
    key = readCred(dir, TLS_FILES.clientKey, false);
    // QEMU uses a client certificate only when both halves are there
    if (cert === null || key === null) cert = key = null;
  }
  let secureContext: tls.SecureContext;
  const contextOptions: tls.SecureContextOptions = {
    ...(ca === null ? {} : { ca }),
    ...(crl === null ? {} : { crl }),
    ...(cert === null || key === null ? {} : { cert, key }),
    minVersion: 'TLSv1.2',
  };
  try {
    secureContext = tls.createSecureContext(contextOptions);
  } catch (e) {
    const msg = e instanceof Error ? e.message : String(e);
    throw new BlockError('EINVAL', `Cannot load the TLS credentials in ${dir} (tls-creds-x509 '${id}'): ${msg}`, { file: dir, cause: e });
  }
  return { id, dir, endpoint: ep, verifyPeer, secureContext, contextOptions };
}

/**
 * Adds a loaded object to the registry; EINVAL when the id is taken (QEMU's duplicate text).
 * @locking common
 */
export function addTlsCreds(creds: TlsCredsX509): void {
  if (registry.has(creds.id)) throw invalid(`attempt to add duplicate property '${creds.id}' to object (type 'container')`, 'id');
  registry.set(creds.id, creds);
}

/**
 * Removes the object `id`; ENOENT when there is none. Sessions already using it go on.
 * @locking common
 */
export function deleteTlsCreds(id: string): void {
  if (!registry.delete(id)) throw new BlockError('ENOENT', `object '${id}' not found`, { field: 'id', value: id });
}

/**
 * The object `id` for `endpoint`, with QEMU's messages: "No TLS credentials with id 'x'",
 * "Expected TLS credentials for a server endpoint".
 * @locking common
 */
export function findTlsCreds(id: string, endpoint: TlsEndpoint): TlsCredsX509 {
  const c = registry.get(id);
  if (c === undefined) throw new BlockError('ENOENT', `No TLS credentials with id '${id}'`, { field: 'tls-creds', value: id });
  if (c.endpoint !== endpoint) throw invalid(`Expected TLS credentials for a ${endpoint} endpoint (tls-creds '${id}' is for a ${c.endpoint})`, 'tls-creds');
  return c;
}

/**
 * True when an object `id` exists.
 * @locking common
 */
export function hasTlsCreds(id: string): boolean {
  return registry.has(id);
}

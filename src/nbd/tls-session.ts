/**
 * The TLS handshake on an NBD socket after NBD_OPT_STARTTLS was acknowledged (doc/proto.md, "TLS
 * support"): the same socket is wrapped in a Node TLSSocket, server or client side, and the
 * haggling goes on inside it. Main loop, one connection's code; no lock.
 *
 * The server side checks the client's certificate itself when the credentials say verify-peer
 * (requestCert, then `authorized`), so that a refusal is logged with its reason; the client side
 * lets Node verify the server's certificate against the CA, and its name against `hostname`
 * when one is given (QEMU's tls-hostname, or the host of an inet address).
 */
import type net from 'node:net';
import tls from 'node:tls';
import { BlockError } from '../block/errors.js';
import type { TlsCredsX509 } from './tls-creds.js';

/**
 * Runs the server side of the handshake on `raw`; resolves with the TLS socket once the client
 * is accepted. Rejects (the socket destroyed) with EACCES for a refused certificate, EIO for a
 * handshake that failed (garbage instead of a ClientHello) or a peer that went away.
 * @locking io
 */
export function tlsServerHandshake(raw: net.Socket, creds: TlsCredsX509): Promise<tls.TLSSocket> {
  return new Promise<tls.TLSSocket>((resolve, reject) => {
    // a tls.Server that never listens: handed this one socket, it runs Node's server handshake
    // (it makes its context from the options: it takes no ready SecureContext)
    const srv = new tls.Server({ ...creds.contextOptions, requestCert: creds.verifyPeer, rejectUnauthorized: false });
    let settled = false;
    const finish = (e: BlockError | null, s?: tls.TLSSocket): void => {
      if (settled) return;
      settled = true;
      raw.off('close', onClose);
      if (e !== null || s === undefined) {
        raw.destroy();
        reject(e ?? new BlockError('EIO', 'TLS handshake produced no socket', { op: 'nbd-starttls' }));
      } else resolve(s);
    };
    const onClose = (): void => finish(new BlockError('EIO', 'the client closed the connection during the TLS handshake', { op: 'nbd-starttls' }));
    raw.once('close', onClose);
    srv.on('tlsClientError', (err: Error) => finish(new BlockError('EIO', `TLS handshake failed: ${err.message}`, { op: 'nbd-starttls', cause: err })));
    srv.on('secureConnection', (s: tls.TLSSocket) => {
      s.on('error', () => undefined);
      // half-open again, as the plain connection was (replies still go out after the client's FIN)
      s.allowHalfOpen = allowHalfOpen;
      if (creds.verifyPeer && !s.authorized) {
        const peer = s.getPeerCertificate();
        const sent = typeof peer === 'object' && peer !== null && Object.keys(peer).length > 0;
        const code = s.authorizationError instanceof Error ? s.authorizationError.message : String(s.authorizationError ?? 'not verified');
        const why = sent ? `${code}: not signed by ${creds.dir}/ca-cert.pem` : 'the client sent no certificate';
        s.destroy();
        finish(new BlockError('EACCES', `the client's certificate was refused (${why}; tls-creds '${creds.id}' has verify-peer=on)`, { op: 'nbd-starttls' }));
        return;
      }
      finish(null, s);
    });
    // during the handshake a peer's FIN must close the TLS socket (the TLS socket copies the
    // flag): else a client that hangs up in mid-handshake is only noticed by the timeout
    const allowHalfOpen = raw.allowHalfOpen;
    raw.allowHalfOpen = false;
    srv.emit('connection', raw);
  });
}

/**
 * Runs the client side of the handshake on `raw` toward the server `where`; resolves with the
 * TLS socket. EIO naming the server and Node's reason when it fails (an unknown CA, a wrong host
 * name, the server hanging up).
 * @locking io
 */
export function tlsClientHandshake(raw: net.Socket, creds: TlsCredsX509, hostname: string | undefined, where: string): Promise<tls.TLSSocket> {
  return new Promise<tls.TLSSocket>((resolve, reject) => {
    const isIp = hostname !== undefined && /^[\d.]+$|:/.test(hostname);
    const s = tls.connect({
      socket: raw,
      secureContext: creds.secureContext,
      rejectUnauthorized: creds.verifyPeer,
      // SNI takes DNS names only
      ...(hostname !== undefined && !isIp ? { servername: hostname } : {}),
      checkServerIdentity: (_h, cert) => (hostname === undefined ? undefined : tls.checkServerIdentity(hostname, cert)),
    });
    let settled = false;
    const fail = (why: string, cause?: unknown): void => {
      if (settled) return;
      settled = true;
      s.destroy();
      raw.destroy();
      reject(new BlockError('EIO', `TLS handshake with NBD server ${where} failed: ${why}`, { op: 'nbd-connect', ...(cause === undefined ? {} : { cause }) }));
    };
    const onError = (e: Error): void => fail(e.message, e);
    const onClose = (): void => fail('the server closed the connection');
    s.on('error', onError);
    s.once('close', onClose);
    s.once('secureConnect', () => {
      if (settled) return;
      settled = true;
      s.off('error', onError);
      s.off('close', onClose);
      resolve(s);
    });
  });
}

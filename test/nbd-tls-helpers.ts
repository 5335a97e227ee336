/**
 * Certificates for the NBD TLS tests, made with openssl in a temporary directory, in QEMU's
 * layout (ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem, client-key.pem), with
 * the extensions gnutls (QEMU, libnbd) insists on: basicConstraints CA:TRUE and keyUsage
 * keyCertSign on the CA, keyUsage digitalSignature,keyEncipherment on the leaves, serverAuth /
 * clientAuth, and a SAN of IP:127.0.0.1,DNS:localhost on the server.
 *
 * Layout under `root`:
 *   server/  ca-cert.pem server-cert.pem server-key.pem   (a server endpoint)
 *   client/  ca-cert.pem client-cert.pem client-key.pem   (a client endpoint; libnbd's tls-certificates too)
 *   rogue/   ca-cert.pem (the good CA) client-cert.pem client-key.pem signed by a second CA
 *   nocert/  ca-cert.pem only (a client without a certificate)
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

/** Where each set of credentials lives. */
export interface TlsDirs {
  root: string;
  server: string;
  client: string;
  rogue: string;
  nocert: string;
}

function openssl(args: string[], cwd: string): void {
  execFileSync('openssl', args, { cwd, stdio: ['ignore', 'ignore', 'pipe'] });
}

function makeCa(dir: string, name: string, cn: string): void {
  fs.writeFileSync(path.join(dir, `${name}.ext`), 'basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\n');
  openssl(['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', `${name}-key.pem`, '-out', `${name}-cert.pem`, '-days', '30', '-subj', `/CN=${cn}`, '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign'], dir);
}

function makeLeaf(dir: string, name: string, ca: string, cn: string, ext: string): void {
  fs.writeFileSync(path.join(dir, `${name}.ext`), ext);
  openssl(['req', '-newkey', 'rsa:2048', '-nodes', '-keyout', `${name}-key.pem`, '-out', `${name}.csr`, '-subj', `/CN=${cn}`], dir);
  openssl(['x509', '-req', '-in', `${name}.csr`, '-CA', `${ca}-cert.pem`, '-CAkey', `${ca}-key.pem`, '-CAcreateserial', '-out', `${name}-cert.pem`, '-days', '30', '-extfile', `${name}.ext`], dir);
}

/** Makes every certificate under `root` (about a second of openssl). */
export function makeTlsDirs(root: string): TlsDirs {
  const work = path.join(root, 'work');
  fs.mkdirSync(work, { recursive: true });
  makeCa(work, 'ca', 'snapstack test CA');
  makeCa(work, 'ca2', 'rogue CA');
  const leaf = 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n';
  makeLeaf(work, 'server', 'ca', 'localhost', `${leaf}extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n`);
  makeLeaf(work, 'client', 'ca', 'snapstack test client', `${leaf}extendedKeyUsage=clientAuth\n`);
  makeLeaf(work, 'rogue', 'ca2', 'rogue client', `${leaf}extendedKeyUsage=clientAuth\n`);
  const dirs: TlsDirs = { root, server: path.join(root, 'server'), client: path.join(root, 'client'), rogue: path.join(root, 'rogue'), nocert: path.join(root, 'nocert') };
  const put = (dir: string, files: Record<string, string>): void => {
    fs.mkdirSync(dir, { recursive: true });
    for (const [to, from] of Object.entries(files)) fs.copyFileSync(path.join(work, from), path.join(dir, to));
  };
  put(dirs.server, { 'ca-cert.pem': 'ca-cert.pem', 'server-cert.pem': 'server-cert.pem', 'server-key.pem': 'server-key.pem' });
  put(dirs.client, { 'ca-cert.pem': 'ca-cert.pem', 'client-cert.pem': 'client-cert.pem', 'client-key.pem': 'client-key.pem' });
  put(dirs.rogue, { 'ca-cert.pem': 'ca-cert.pem', 'client-cert.pem': 'rogue-cert.pem', 'client-key.pem': 'rogue-key.pem' });
  put(dirs.nocert, { 'ca-cert.pem': 'ca-cert.pem' });
  return dirs;
}

/**
 * The daemon's command-line parsing on its own: QEMU's keyval syntax (dotted keys, `,,`, implied
 * keys, lists, QEMU's error texts), getopt_long's reading of qemu-storage-daemon's options, and
 * the --blockdev / --object / --monitor / --chardev / -qmp option parsers.
 */
import { describe, expect, it } from 'vitest';
import { parseChardevOption, parseLegacyChardev } from '../src/cli/chardev.js';
import { parseDaemonArgs } from '../src/cli/daemon-args.js';
import { parseBlockdevOption, parseMonitorOption, parseObjectOption } from '../src/cli/daemon.js';
import { parseKeyval } from '../src/cli/keyval.js';

function keyvalError(text: string, implied: string | null = null): string {
  try {
    parseKeyval(text, implied);
  } catch (e) {
    return (e as Error).message;
  }
  throw new Error(`'${text}' parsed`);
}

describe('keyval, as QEMU reads KEY=VALUE,...', () => {
  it('dotted keys make nested objects and values stay strings', () => {
    expect(parseKeyval('driver=qcow2,node-name=n,file.driver=file,file.filename=x,cache.direct=on', null).value).toEqual({
      driver: 'qcow2',
      'node-name': 'n',
      file: { driver: 'file', filename: 'x' },
      cache: { direct: 'on' },
    });
  });

  it('a double comma is a comma in the value, a trailing comma is allowed', () => {
    expect(parseKeyval('filename=a,,b,,,x=1,', null).value).toEqual({ filename: 'a,b,', x: '1' });
  });

  it('the implied key takes a first element without =, only the first', () => {
    expect(parseKeyval('file,filename=x', 'driver').value).toEqual({ driver: 'file', filename: 'x' });
    expect(keyvalError('file,node-name=f,file,name=x', 'driver')).toBe("Expected '=' after parameter 'file'");
    expect(keyvalError('file', null)).toBe("Expected '=' after parameter 'file'");
  });

  it('the last of two equal keys wins', () => {
    expect(parseKeyval('a=1,a=2', null).value).toEqual({ a: '2' });
  });

  it('numeric fragments make lists, without gaps', () => {
    expect(parseKeyval('a.0=x,a.1.b=y', null).value).toEqual({ a: ['x', { b: 'y' }] });
    expect(keyvalError('driver=file,x.1=a')).toBe("Parameter 'x.0' missing");
    expect(keyvalError('a.0=x,a.b=y')).toBe("Parameters 'a.*' used inconsistently");
  });

  it('refuses a key used as a value and as an object, with QEMU\'s text', () => {
    expect(keyvalError('x.y=1,x=2')).toBe("Parameters 'x.*' used inconsistently");
    expect(keyvalError('x=1,x.y=2')).toBe("Parameters 'x.*' used inconsistently");
  });

  it('refuses keys that are not QAPI names, and fragments over 127 characters', () => {
    expect(keyvalError('1x=2')).toBe("Invalid parameter '1x'");
    expect(keyvalError('a..b=2')).toBe("Invalid parameter 'a..b'");
    expect(keyvalError('=2')).toBe("Invalid parameter ''");
    expect(keyvalError(`${'k'.repeat(128)}=1`)).toBe(`Parameter '${'k'.repeat(128)}' is too long`);
    expect(parseKeyval(`${'k'.repeat(127)}=1`, null).value).toEqual({ ['k'.repeat(127)]: '1' });
  });

  it('help and ? ask for help', () => {
    expect(parseKeyval('help', 'driver').help).toBe(true);
    expect(parseKeyval('iothread,help', 'qom-type')).toEqual({ value: { 'qom-type': 'iothread' }, help: true });
    expect(parseKeyval('driver=file', 'driver').help).toBe(false);
  });
});

describe('getopt_long over qemu-storage-daemon\'s options', () => {
  const err = (argv: string[]): string => {
    try {
      parseDaemonArgs(argv);
    } catch (e) {
      return (e as Error).message;
    }
    throw new Error('parsed');
  };

  it('reads values as the next word or after =, prefixes, short options', () => {
    expect(parseDaemonArgs(['--blockdev', 'a', '--object=iothread,id=x', '--vers', '-T', 'p', '-Tq', '--daemonize', '-hV']).map((o) => [o.name, o.value])).toEqual([
      ['blockdev', 'a'],
      ['object', 'iothread,id=x'],
      ['version', ''],
      ['trace', 'p'],
      ['trace', 'q'],
      ['daemonize', ''],
      ['help', ''],
      ['version', ''],
    ]);
  });

  it('prints getopt\'s messages', () => {
    expect(err(['--foo'])).toBe("unrecognized option '--foo'");
    expect(err(['--monitor'])).toBe("option '--monitor' requires an argument");
    expect(err(['-x'])).toBe("invalid option -- 'x'");
    expect(err(['-T'])).toBe("option requires an argument -- 'T'");
    expect(err(['extra'])).toBe('extra: Unexpected argument');
    expect(err(['--daemonize=yes'])).toBe("option '--daemonize' doesn't allow an argument");
  });
});

describe('the option parsers', () => {
  const msg = (f: () => unknown): string => {
    try {
      f();
    } catch (e) {
      return (e as Error).message;
    }
    throw new Error('accepted');
  };

  it('--blockdev: JSON (strict types) or keyval (strings)', () => {
    expect(parseBlockdevOption('{"driver": "file", "node-name": "f", "filename": "x", "read-only": true}')).toEqual({
      options: { driver: 'file', 'node-name': 'f', filename: 'x', 'read-only': true },
      strict: true,
    });
    expect(parseBlockdevOption('file,node-name=f,filename=x')).toEqual({ options: { driver: 'file', 'node-name': 'f', filename: 'x' }, strict: false });
    expect(msg(() => parseBlockdevOption('{"a":}'))).toBe('JSON parse error, expecting value');
    expect(msg(() => parseBlockdevOption('{"a":1} {"b":2}'))).toBe('Expecting at most one JSON value');
    expect(msg(() => parseBlockdevOption('{"a":1'))).toBe('JSON parse error, premature EOI');
    expect(msg(() => parseBlockdevOption('help'))).toBe('Help is not available for this option');
  });

  it('--object: iothread with its properties, QEMU\'s refusals', () => {
    expect(parseObjectOption('iothread,id=io0,poll-max-ns=0')).toEqual({ kind: 'iothread', id: 'io0', pollMaxNs: 0 });
    expect(parseObjectOption('help')).toMatchObject({ kind: 'help' });
    expect(parseObjectOption('iothread,help')).toMatchObject({ kind: 'help', text: expect.stringContaining('poll-max-ns=<int>') });
    expect(msg(() => parseObjectOption('iothread'))).toBe("Parameter 'id' is missing");
    expect(msg(() => parseObjectOption('foo,id=x'))).toBe("Parameter 'qom-type' does not accept value 'foo'");
    expect(msg(() => parseObjectOption('iothread,id=io0,poll-max-ns=abc'))).toBe("Parameter 'poll-max-ns' expects integer");
    expect(msg(() => parseObjectOption('iothread,id=io0,poll-max-ns=-1'))).toBe('poll-max-ns value must be in range [0, 9223372036854775807]');
    expect(msg(() => parseObjectOption('iothread,id=io0,bogus=1'))).toBe("Parameter 'bogus' is unexpected");
    expect(msg(() => parseObjectOption('secret,id=s,data=x'))).toMatch(/not supported by snapstack/);
  });

  it('--monitor: the chardev, QMP mode only', () => {
    expect(parseMonitorOption('c')).toBe('c');
    expect(parseMonitorOption('chardev=c,mode=control,pretty=off')).toBe('c');
    expect(msg(() => parseMonitorOption('chardev=c,mode=readline'))).toBe('Only QMP is supported');
    expect(msg(() => parseMonitorOption('chardev=c,foo=1'))).toBe("Parameter 'foo' is unexpected");
    expect(msg(() => parseMonitorOption('mode=control'))).toBe("Parameter 'chardev' is missing");
    expect(msg(() => parseMonitorOption('help'))).toBe('Help is not available for this option');
  });

  it('--chardev: listening sockets, TCP on 127.0.0.1 unless told', () => {
    expect(parseChardevOption('socket,id=c,path=/tmp/x.sock,server=on,wait=off')).toEqual({ id: 'c', address: { type: 'unix', path: '/tmp/x.sock' }, wait: false });
    expect(parseChardevOption('socket,id=c,port=4444,server=on,wait=off')).toEqual({ id: 'c', address: { type: 'inet', host: '127.0.0.1', port: 4444 }, wait: false });
    expect(parseChardevOption('socket,id=c,host=0.0.0.0,port=0,server=on')).toEqual({ id: 'c', address: { type: 'inet', host: '0.0.0.0', port: 0 }, wait: true });
    expect(parseChardevOption('help')).toBeNull();
    expect(msg(() => parseChardevOption('socket,path=/tmp/x'))).toBe('chardev: no id specified');
    expect(msg(() => parseChardevOption('id=c,path=/tmp/x'))).toBe('chardev: "c" missing backend');
    expect(msg(() => parseChardevOption('foo,id=c'))).toBe("'foo' is not a valid char driver name");
    expect(msg(() => parseChardevOption('socket,id=c,path=/tmp/x,server=on,wait=maybe'))).toBe("Parameter 'wait' expects 'on' or 'off'");
    expect(msg(() => parseChardevOption('socket,id=c,path=/tmp/x,server=off,wait=off'))).toBe("'wait' option is incompatible with socket in client connect mode");
    expect(msg(() => parseChardevOption('socket,id=c,host=127.0.0.1,server=on'))).toBe('chardev: socket: no port given');
    expect(msg(() => parseChardevOption('socket,id=c,path=/tmp/x,bogus=1'))).toBe("Invalid parameter 'bogus'");
    expect(msg(() => parseChardevOption('socket,id=c,path=/tmp/x'))).toMatch(/client mode \(server=off\) is not supported/);
  });

  it('-qmp: QEMU\'s legacy unix: and tcp: forms', () => {
    expect(parseLegacyChardev('unix:/tmp/q.sock,server=on,wait=off', 'm0')).toEqual({ id: 'm0', address: { type: 'unix', path: '/tmp/q.sock' }, wait: false });
    expect(parseLegacyChardev('tcp::4444,server=on,wait=off', 'm0')).toEqual({ id: 'm0', address: { type: 'inet', host: '127.0.0.1', port: 4444 }, wait: false });
    expect(parseLegacyChardev('tcp:localhost:0,server=on', 'm0')).toEqual({ id: 'm0', address: { type: 'inet', host: 'localhost', port: 0 }, wait: true });
    expect(msg(() => parseLegacyChardev('stdio', 'm0'))).toMatch(/not a valid char driver name/);
  });
});

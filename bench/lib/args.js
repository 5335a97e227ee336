// @ts-check
/**
 * A small command-line parser for the bench scripts: `--name value`, `--name=value` and boolean
 * `--flag`s, checked against a spec; an unknown option or a bad value throws a UsageError naming it.
 */
import { parseSize } from '../../dist/index.js';

export class UsageError extends Error {}

/**
 * @typedef {{ type: 'string' | 'number' | 'size' | 'flag', default?: string | number | boolean, choices?: readonly string[], help: string, metavar?: string }} OptionSpec
 * @typedef {Record<string, OptionSpec>} Spec
 */

/**
 * Parses `argv` (without node and the script) against `spec`. Options not given and without a
 * default are absent from the result.
 * @param {string[]} argv
 * @param {Spec} spec
 * @returns {Record<string, string | number | boolean>}
 */
export function parseArgs(argv, spec) {
  /** @type {Record<string, string | number | boolean>} */
  const out = {};
  for (const [name, s] of Object.entries(spec)) if (s.default !== undefined) out[name] = s.default;
  for (let i = 0; i < argv.length; i++) {
    const a = /** @type {string} */ (argv[i]);
    if (!a.startsWith('--')) throw new UsageError(`unexpected argument '${a}'`);
    const eq = a.indexOf('=');
    const name = eq >= 0 ? a.slice(2, eq) : a.slice(2);
    const s = spec[name];
    if (s === undefined) throw new UsageError(`unknown option '--${name}'`);
    if (s.type === 'flag') {
      if (eq >= 0) {
        const v = a.slice(eq + 1);
        if (!['true', 'false', 'on', 'off', '1', '0'].includes(v)) throw new UsageError(`option '--${name}' is a flag: '${v}' is not on/off`);
        out[name] = v === 'true' || v === 'on' || v === '1';
      } else {
        out[name] = true;
      }
      continue;
    }
    let v;
    if (eq >= 0) v = a.slice(eq + 1);
    else {
      v = argv[++i];
      if (v === undefined) throw new UsageError(`option '--${name}' needs a value`);
    }
    out[name] = convert(name, s, v);
  }
  return out;
}

/**
 * @param {string} name @param {OptionSpec} s @param {string} v
 * @returns {string | number}
 */
function convert(name, s, v) {
  if (s.choices !== undefined && !s.choices.includes(v)) throw new UsageError(`option '--${name}': '${v}' is not one of ${s.choices.join(', ')}`);
  if (s.type === 'number') {
    const n = Number(v);
    if (v.trim() === '' || !Number.isFinite(n) || n < 0) throw new UsageError(`option '--${name}': '${v}' is not a non-negative number`);
    return n;
  }
  if (s.type === 'size') {
    try {
      return parseSize(v, name);
    } catch (e) {
      throw new UsageError(`option '--${name}': ${e instanceof Error ? e.message : String(e)}`);
    }
  }
  return v;
}

/**
 * The option list for --help.
 * @param {Spec} spec
 */
export function usage(spec) {
  const lines = [];
  for (const [name, s] of Object.entries(spec)) {
    const left = s.type === 'flag' ? `--${name}` : `--${name} ${s.metavar ?? (s.choices ? s.choices.join('|') : s.type.toUpperCase())}`;
    const def = s.default !== undefined && s.type !== 'flag' ? ` (default ${s.default})` : '';
    lines.push(`  ${left.padEnd(34)} ${s.help}${def}`);
  }
  return lines.join('\n');
}

/**
 * Reports a usage error of a bench script on stderr, with its option list, and sets exit status 2.
 * @param {string} script e.g. 'bench/run.js' @param {string} command e.g. 'npm run bench'
 * @param {Spec} spec @param {string} msg
 */
export function usageFail(script, command, spec, msg) {
  process.stderr.write(`${script}: ${msg}\nusage: ${command} -- [options]\n${usage(spec)}\n`);
  process.exitCode = 2;
}

/**
 * Parses a bench script's command line. Prints the option list for `--help`, or a usage error
 * (exit status 2), and returns null then: the script has nothing more to do.
 * @param {string} script @param {string} command @param {Spec} spec
 * @returns {Record<string, string | number | boolean> | null}
 */
export function readCommandLine(script, command, spec) {
  let a;
  try {
    a = parseArgs(process.argv.slice(2), spec);
  } catch (e) {
    if (!(e instanceof UsageError)) throw e;
    usageFail(script, command, spec, e.message);
    return null;
  }
  if (a['help'] === true) {
    process.stdout.write(`usage: ${command} -- [options]\n${usage(spec)}\n`);
    return null;
  }
  return a;
}

/** @param {number} bytes */
export function formatSize(bytes) {
  const units = [
    ['T', 2 ** 40],
    ['G', 2 ** 30],
    ['M', 2 ** 20],
    ['k', 2 ** 10],
  ];
  for (const [u, m] of /** @type {Array<[string, number]>} */ (units)) if (bytes >= m && bytes % m === 0) return `${bytes / m}${u}`;
  return `${bytes}`;
}

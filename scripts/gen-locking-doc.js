// @ts-check
/**
 * Generates docs/locking.md, the table of every block-layer function's and driver callback's
 * locking contract, from the `@locking io|global-state|common` JSDoc tags and the signatures.
 *
 *   node scripts/gen-locking-doc.js            writes docs/locking.md (npm run docs:locking)
 *   node scripts/gen-locking-doc.js --check    exits 1 when docs/locking.md is stale
 *   node scripts/gen-locking-doc.js --root DIR scans DIR/src/{block,drivers}, writes DIR/docs/locking.md
 *
 * The sources are parsed one file at a time (no type checking): parameter types are judged by
 * their text, so a fixture may import types from modules that do not exist. Contract violations
 * are collected and all reported; the file is still written for the functions without errors, and
 * the exit code is 1. They are:
 * - no tag, an unknown tag, conflicting tags;
 * - `io` / `common` code taking a proof, `global-state` code without a `Bql` parameter;
 * - a metadata change the body shows without the proof: `io` / `common` code that changes host
 *   files (fs rename/unlink/rm/mkdir/link/copy/writeFile/truncate, `open` with a creating flag,
 *   the same names on the file driver's StoreFs), unless a `@host-files <reason>` tag explains it;
 * - a body that calls `assertBql` / `assertDrained` without taking that proof as a parameter
 *   (a proof smuggled in through a field or a closure);
 * - a function of issue 11's list (METADATA_FUNCTIONS) that is not `global-state` with a Bql
 *   (and a drained proof where marked), or that is missing from the sources.
 */
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import ts from 'typescript';

/** The repository root (this script lives in scripts/). */
export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

/** Directories scanned, relative to the root. */
const SCAN_DIRS = ['src/block', 'src/drivers'];
/** Where the document goes, relative to the root. */
export const OUTPUT_PATH = 'docs/locking.md';
/** The interfaces whose every callback must be classified. */
const CALLBACK_INTERFACES = new Set(['BlockDriver', 'BlockDriverInstance']);
const CONTRACTS = new Set(['io', 'global-state', 'common', 'snapshot']);
/** The proof of holding the snapshot lock (src/block/snapshot-lock.ts): `snapshot` code takes it instead of the BQL. */
const SNAPSHOT_LOCK_TYPES = new Set(['SnapshotLocked']);
const BQL_TYPES = new Set(['Bql']);
const DRAINED_TYPES = new Set(['Drained', 'DrainedAll', 'DrainedProof', 'DrainedSet', 'GroupDrained']);
/** The proof of holding a qcow2 node's metadata lock (src/drivers/qcow2/metadata-lock.ts): I/O code may take it. */
const METADATA_LOCK_TYPES = new Set(['MetadataLocked']);
/**
 * Calls that change the host's files (create, rename, delete, link, truncate by name): image
 * files and snapshot stores are global state, so code making them is global-state code. Both the
 * `fs` names and the narrow StoreFs interface of the file driver's snapshot store are listed.
 */
const HOST_METADATA_CALLS = new Set([
  'renameSync', 'unlinkSync', 'rmSync', 'rmdirSync', 'mkdirSync', 'linkSync', 'symlinkSync', 'copyFileSync',
  'writeFileSync', 'truncateSync', 'rename', 'unlink', 'rm', 'rmdir', 'mkdir', 'mkdirp', 'link', 'symlink', 'copyFile', 'writeFile',
]);
/** `open` flags that create or truncate a file. */
const CREATING_OPEN_FLAG = /^[wa]|x/;
/**
 * The functions issue 11 found changing metadata or global state without a proof. Each must be
 * classified `global-state` with a Bql parameter and, where it works on an open node's metadata,
 * a drained proof; or, marked `lock`, be I/O code that takes the node's metadata-lock proof
 * (`MetadataLocked`: QEMU resizes a qcow2 image from the request path under s->lock, not the BQL).
 * A name missing from the sources is reported too (update this list when one is renamed), so the
 * list cannot silently fall out of the table.
 */
export const METADATA_FUNCTIONS = new Map([
  ['createQcow2OnNode', { drained: true }],
  ['createQcow2File', { drained: false }],
  ['writeSnapshotTable', { drained: false, lock: true }],
  ['setDiskSize', { drained: false, lock: true }],
  ['updateSnapshotRefcount', { drained: true }],
  ['repairDirtyImage', { drained: false }],
  ['discardSnapshotStore', { drained: false }],
  ['shutdownIOThreads', { drained: false }],
  ['createRawFile', { drained: false }],
]);

/**
 * One documented function or callback.
 * @typedef {object} LockingRow
 * @property {string} name function, method or callback name
 * @property {string} module path of its file relative to the root, forward slashes
 * @property {string} className enclosing class, interface or object (empty for a plain function)
 * @property {'io' | 'global-state' | 'common' | 'snapshot'} contract the classification from the locking tag
 * @property {boolean} bql whether it takes a `Bql` proof (must run with the BQL held)
 * @property {boolean} drained whether it takes a drained proof (needs a drained section)
 * @property {boolean} lock whether it takes the qcow2 metadata lock's proof (MetadataLocked)
 * @property {string} alongside whether it may run alongside in-flight I/O on the node
 * @property {string} summary first sentence of its doc comment
 */

/**
 * A function-like declaration found in a file, before classification.
 * @typedef {object} Candidate
 * @property {string} name
 * @property {string} className
 * @property {ts.Node} docNode the node whose JSDoc holds the description and tags
 * @property {ReadonlyArray<ts.ParameterDeclaration>} params
 * @property {ts.Node | undefined} body the function's body (undefined for signatures)
 * @property {number} pos position used for line numbers in messages
 */

/**
 * Every `.ts` file under the scanned directories except tests and declaration files, sorted.
 * @param {string} rootDir
 * @returns {string[]} absolute paths
 */
function sourceFiles(rootDir) {
  /** @type {string[]} */
  const out = [];
  /** @param {string} dir */
  const walk = (dir) => {
    if (!fs.existsSync(dir)) return;
    for (const ent of fs.readdirSync(dir, { withFileTypes: true })) {
      const p = path.join(dir, ent.name);
      if (ent.isDirectory()) {
        if (ent.name !== 'node_modules') walk(p);
      } else if (ent.isFile() && ent.name.endsWith('.ts') && !/\.(test|test-d|d)\.ts$/.test(ent.name)) {
        out.push(p);
      }
    }
  };
  for (const d of SCAN_DIRS) walk(path.join(rootDir, d));
  return out.sort(compare);
}

/**
 * Code-unit order: the same on every machine and locale.
 * @param {string} a
 * @param {string} b
 */
function compare(a, b) {
  return a < b ? -1 : a > b ? 1 : 0;
}

/**
 * @param {ts.Node} node
 * @param {ts.SyntaxKind} kind
 */
function hasModifier(node, kind) {
  return ts.canHaveModifiers(node) && (ts.getModifiers(node) ?? []).some((m) => m.kind === kind);
}

/**
 * Strips parentheses, `as`, `satisfies` and `!` around an expression.
 * @param {ts.Expression} e
 * @returns {ts.Expression}
 */
function unwrapExpression(e) {
  for (;;) {
    if (ts.isParenthesizedExpression(e) || ts.isAsExpression(e) || ts.isSatisfiesExpression(e) || ts.isNonNullExpression(e)) e = e.expression;
    else if (ts.isTypeAssertionExpression(e)) e = e.expression;
    else return e;
  }
}

/**
 * The function type inside `T`, `(T)` or `T | undefined`, if any.
 * @param {ts.TypeNode | undefined} t
 * @returns {ts.FunctionTypeNode | undefined}
 */
function functionTypeOf(t) {
  if (t === undefined) return undefined;
  if (ts.isFunctionTypeNode(t)) return t;
  if (ts.isParenthesizedTypeNode(t)) return functionTypeOf(t.type);
  if (ts.isUnionTypeNode(t)) {
    for (const m of t.types) {
      const f = functionTypeOf(m);
      if (f !== undefined) return f;
    }
  }
  return undefined;
}

/**
 * The names a parameter type refers to at its top level: `Bql`, `Bql | null`, `Drained<N>`,
 * `drain.DrainedProof`, `(A | B)`. A function type (`(d: Drained<N>) => T`) or an object type
 * mentions proofs of the callback, not of the function, and yields nothing.
 * @param {ts.TypeNode | undefined} t
 * @returns {string[]}
 */
function topLevelTypeNames(t) {
  if (t === undefined) return [];
  if (ts.isParenthesizedTypeNode(t) || ts.isTypeOperatorNode(t)) return topLevelTypeNames(t.type);
  if (ts.isUnionTypeNode(t) || ts.isIntersectionTypeNode(t)) return t.types.flatMap(topLevelTypeNames);
  if (ts.isTypeReferenceNode(t)) return [ts.isIdentifier(t.typeName) ? t.typeName.text : t.typeName.right.text];
  if (ts.isImportTypeNode(t) && t.qualifier !== undefined) {
    return [ts.isIdentifier(t.qualifier) ? t.qualifier.text : t.qualifier.right.text];
  }
  return [];
}

/**
 * @param {ts.ParameterDeclaration} p
 * @param {Set<string>} names
 */
function paramHasType(p, names) {
  return topLevelTypeNames(p.type).some((n) => names.has(n));
}

/**
 * The name of a declaration or member as written.
 * @param {ts.PropertyName | ts.BindingName | undefined} n
 * @param {ts.SourceFile} sf
 */
function nameText(n, sf) {
  if (n === undefined) return 'default';
  if (ts.isIdentifier(n) || ts.isPrivateIdentifier(n) || ts.isStringLiteral(n) || ts.isNumericLiteral(n)) return n.text;
  return n.getText(sf);
}

/**
 * @param {ts.Node} node
 * @returns {ts.JSDocTag[]}
 */
function lockingTags(node) {
  return ts.getJSDocTags(node).filter((t) => t.tagName.text === 'locking');
}

/**
 * The description of the JSDoc block closest to `node` (falling back to the text of an
 * internal/remarks/summary/description tag when the block has no description).
 * @param {ts.Node} node
 */
function docText(node) {
  const docs = ts.getJSDocCommentsAndTags(node).filter(ts.isJSDoc);
  const doc = docs[docs.length - 1];
  if (doc === undefined) return '';
  let text = ts.getTextOfJSDocComment(doc.comment) ?? '';
  if (text.trim() === '') {
    const tag = (doc.tags ?? []).find((t) => ['internal', 'remarks', 'summary', 'description'].includes(t.tagName.text));
    text = tag === undefined ? '' : (ts.getTextOfJSDocComment(tag.comment) ?? '');
  }
  return text;
}

/**
 * The first sentence of a description, whitespace collapsed, without its final period. A period
 * ends the sentence when followed by white space or the end, outside `code` and parentheses, and
 * not part of "e.g." / "i.e." / "etc." / "vs.".
 * @param {string} text
 */
export function firstSentence(text) {
  const s = text.replace(/\s+/g, ' ').trim();
  let inCode = false;
  let depth = 0;
  for (let i = 0; i < s.length; i++) {
    const ch = s[i];
    if (ch === '`') inCode = !inCode;
    else if (inCode) continue;
    else if (ch === '(') depth++;
    else if (ch === ')') depth = Math.max(0, depth - 1);
    else if (ch === '.' && depth === 0 && (i + 1 === s.length || s[i + 1] === ' ')) {
      if (/(?:^|[\s(])(?:e\.g|i\.e|etc|vs)$/i.test(s.slice(0, i))) continue;
      return s.slice(0, i);
    }
  }
  return s.replace(/\.$/, '');
}

/**
 * The body of a class or object-literal member that is a function.
 * @param {ts.Node} m
 * @returns {ts.Node | undefined}
 */
function memberBody(m) {
  if (ts.isMethodDeclaration(m) || ts.isGetAccessorDeclaration(m) || ts.isSetAccessorDeclaration(m)) return m.body;
  if ((ts.isPropertyDeclaration(m) || ts.isPropertyAssignment(m)) && m.initializer !== undefined) {
    const init = unwrapExpression(m.initializer);
    if (ts.isArrowFunction(init) || ts.isFunctionExpression(init)) return init.body;
  }
  return undefined;
}

/**
 * The name a call expression calls: `f(...)` gives `f`, `a.b.f(...)` gives `f`.
 * @param {ts.CallExpression} call
 */
function calleeName(call) {
  const e = unwrapExpression(call.expression);
  if (ts.isIdentifier(e)) return e.text;
  if (ts.isPropertyAccessExpression(e)) return e.name.text;
  return '';
}

/**
 * What a function body does that the contract cares about: the host-file changes it makes
 * (`fs.renameSync`, a StoreFs `unlink`, `openSync(p, 'w')`, ...) and whether it checks a Bql or
 * a drained proof itself. Nested functions count: they run on the function's behalf.
 * @param {ts.Node | undefined} body
 * @returns {{ hostChanges: string[], checksBql: boolean, checksDrained: boolean }}
 */
function scanBody(body) {
  /** @type {Set<string>} */
  const hostChanges = new Set();
  let checksBql = false;
  let checksDrained = false;
  /** @param {ts.Node} n */
  const visit = (n) => {
    if (ts.isCallExpression(n)) {
      const name = calleeName(n);
      if (HOST_METADATA_CALLS.has(name)) hostChanges.add(name);
      if (name === 'openSync' || name === 'open') {
        const flag = n.arguments[1];
        if (flag !== undefined && ts.isStringLiteralLike(flag) && CREATING_OPEN_FLAG.test(flag.text)) hostChanges.add(`${name}(..., '${flag.text}')`);
      }
      if (name === 'assertBql') checksBql = true;
      if (name === 'assertDrained') checksDrained = true;
    }
    ts.forEachChild(n, visit);
  };
  if (body !== undefined) visit(body);
  return { hostChanges: [...hostChanges].sort(compare), checksBql, checksDrained };
}

/**
 * The function-like declarations of one file that the contract covers.
 * @param {ts.SourceFile} sf
 * @returns {Candidate[]}
 */
function candidates(sf) {
  /** @type {Candidate[]} */
  const out = [];
  /** Names exported through `export { a, b as c }` without a module specifier. */
  const exportedLocals = new Set();
  for (const st of sf.statements) {
    if (ts.isExportDeclaration(st) && st.moduleSpecifier === undefined && st.exportClause !== undefined && ts.isNamedExports(st.exportClause)) {
      for (const el of st.exportClause.elements) exportedLocals.add((el.propertyName ?? el.name).text);
    }
  }
  /** @param {ts.Node} n */
  const isExported = (n) => hasModifier(n, ts.SyntaxKind.ExportKeyword);
  /** Function names already seen in this file (overloads are listed once). */
  const seenFunctions = new Set();

  /**
   * A class or object-literal member that is a function: method, accessor, or property holding
   * an arrow function or function expression (or typed as a function).
   * @param {ts.Node} m
   * @returns {ReadonlyArray<ts.ParameterDeclaration> | undefined}
   */
  const memberParams = (m) => {
    if (ts.isMethodDeclaration(m) || ts.isGetAccessorDeclaration(m) || ts.isSetAccessorDeclaration(m)) return m.parameters;
    if (ts.isMethodSignature(m)) return m.parameters;
    if (ts.isPropertyDeclaration(m) || ts.isPropertyAssignment(m)) {
      const init = m.initializer === undefined ? undefined : unwrapExpression(m.initializer);
      if (init !== undefined && (ts.isArrowFunction(init) || ts.isFunctionExpression(init))) return init.parameters;
      const ft = ts.isPropertyDeclaration(m) ? functionTypeOf(m.type) : undefined;
      return ft?.parameters;
    }
    if (ts.isPropertySignature(m)) return functionTypeOf(m.type)?.parameters;
    return undefined;
  };

  for (const st of sf.statements) {
    if (ts.isFunctionDeclaration(st)) {
      const name = nameText(st.name, sf);
      if (!(isExported(st) || exportedLocals.has(name))) continue;
      if (seenFunctions.has(name)) continue;
      seenFunctions.add(name);
      out.push({ name, className: '', docNode: st, params: st.parameters, body: st.body, pos: st.getStart(sf) });
    } else if (ts.isVariableStatement(st)) {
      for (const decl of st.declarationList.declarations) {
        const name = nameText(decl.name, sf);
        if (!(isExported(st) || exportedLocals.has(name)) || decl.initializer === undefined) continue;
        const init = unwrapExpression(decl.initializer);
        if (ts.isArrowFunction(init) || ts.isFunctionExpression(init)) {
          out.push({ name, className: '', docNode: decl, params: init.parameters, body: init.body, pos: decl.getStart(sf) });
        } else if (ts.isObjectLiteralExpression(init)) {
          // an exported object of callbacks (a driver): its tagged methods
          for (const m of init.properties) {
            const params = memberParams(m);
            if (params === undefined || lockingTags(m).length === 0) continue;
            out.push({ name: nameText(m.name, sf), className: name, docNode: m, params, body: memberBody(m), pos: m.getStart(sf) });
          }
        }
      }
    } else if (ts.isInterfaceDeclaration(st)) {
      const name = st.name.text;
      const everyCallback = CALLBACK_INTERFACES.has(name) && (isExported(st) || exportedLocals.has(name));
      for (const m of st.members) {
        const params = memberParams(m);
        if (params === undefined || (!everyCallback && lockingTags(m).length === 0)) continue;
        out.push({ name: nameText(m.name, sf), className: name, docNode: m, params, body: undefined, pos: m.getStart(sf) });
      }
    } else if (ts.isClassDeclaration(st)) {
      const className = nameText(st.name, sf);
      const seenMembers = new Set();
      for (const m of st.members) {
        const params = memberParams(m);
        if (params === undefined || lockingTags(m).length === 0) continue;
        const name = nameText(m.name, sf);
        if (seenMembers.has(name)) continue;
        seenMembers.add(name);
        out.push({ name, className, docNode: m, params, body: memberBody(m), pos: m.getStart(sf) });
      }
    }
  }
  return out;
}

/**
 * @param {ts.ParameterDeclaration} p
 * @param {ts.SourceFile} sf
 */
function describeParam(p, sf) {
  return `\`${p.getText(sf).replace(/\s+/g, ' ')}\``;
}

/**
 * Scans `rootDir` and classifies every exported block-layer function and driver callback.
 * @param {string} [rootDir] the directory holding src/ (default: this repository)
 * @param {ReadonlyMap<string, { drained: boolean, lock?: boolean }>} [metadataFunctions] functions that must be
 *   global-state with a Bql (and a drained proof where marked); default: issue 11's list for this
 *   repository, none for another root
 * @returns {{ rows: LockingRow[], errors: string[] }} rows sorted by module, class and name (those
 *   with an error are left out); errors as `module:line: Name: problem`, in file order
 */
export function collectRows(rootDir = REPO_ROOT, metadataFunctions = rootDir === REPO_ROOT ? METADATA_FUNCTIONS : new Map()) {
  /** @type {LockingRow[]} */
  const rows = [];
  /** @type {string[]} */
  const errors = [];
  /** @type {Set<string>} */
  const foundListed = new Set();
  for (const file of sourceFiles(rootDir)) {
    const module = path.relative(rootDir, file).split(path.sep).join('/');
    const sf = ts.createSourceFile(file, fs.readFileSync(file, 'utf8'), ts.ScriptTarget.Latest, true, ts.ScriptKind.TS);
    for (const c of candidates(sf)) {
      const label = c.className === '' ? c.name : `${c.className}.${c.name}`;
      const line = sf.getLineAndCharacterOfPosition(c.pos).line + 1;
      /** @param {string} msg */
      const fail = (msg) => errors.push(`${module}:${line}: ${label}: ${msg}`);
      const tags = lockingTags(c.docNode);
      if (tags.length === 0) {
        fail('no @locking tag (add `@locking io`, `@locking global-state` or `@locking common` to its doc comment)');
        continue;
      }
      const values = [...new Set(tags.map((t) => (ts.getTextOfJSDocComment(t.comment) ?? '').trim().split(/\s+/)[0] ?? ''))];
      if (values.length > 1) {
        fail(`conflicting @locking tags: ${values.map((v) => `'${v}'`).join(', ')}`);
        continue;
      }
      const value = values[0] ?? '';
      if (!CONTRACTS.has(value)) {
        fail(`unknown @locking value '${value}' (expected io, global-state, common or snapshot)`);
        continue;
      }
      const contract = /** @type {LockingRow['contract']} */ (value);
      const params = c.params.filter((p) => !(ts.isIdentifier(p.name) && p.name.text === 'this'));
      const bqlParams = params.filter((p) => paramHasType(p, BQL_TYPES));
      const drainedParams = params.filter((p) => paramHasType(p, DRAINED_TYPES));
      const lockParams = params.filter((p) => paramHasType(p, METADATA_LOCK_TYPES));
      const snapParams = params.filter((p) => paramHasType(p, SNAPSHOT_LOCK_TYPES));
      const problems = [];
      if (contract === 'snapshot' && snapParams.length === 0) problems.push('is @locking snapshot but takes no parameter typed SnapshotLocked');
      if (contract !== 'snapshot' && contract !== 'global-state' && snapParams.length > 0) problems.push(`is @locking ${contract} but takes the snapshot-lock proof; tag it snapshot`);
      if (contract !== 'global-state') {
        if (bqlParams.length > 0) problems.push(`is @locking ${contract} but takes a Bql proof (${bqlParams.map((p) => describeParam(p, sf)).join(', ')}); tag it global-state or drop the proof`);
        if (drainedParams.length > 0 && contract !== 'snapshot') problems.push(`is @locking ${contract} but takes a drained proof (${drainedParams.map((p) => describeParam(p, sf)).join(', ')}); tag it global-state (with a Bql parameter) or drop the proof`);
      } else if (bqlParams.length === 0) {
        const untyped = params.filter((p) => p.type === undefined).map((p) => describeParam(p, sf));
        const hint = untyped.length > 0 ? ` (parameters without a type annotation: ${untyped.join(', ')})` : '';
        problems.push(`is @locking global-state but takes no parameter typed Bql${hint}`);
      }
      const scan = scanBody(c.body);
      const hostFilesWhy = ts.getJSDocTags(c.docNode).find((t) => t.tagName.text === 'host-files');
      if (hostFilesWhy !== undefined && (ts.getTextOfJSDocComment(hostFilesWhy.comment) ?? '').trim() === '') {
        problems.push('has a @host-files tag without a reason (say why this I/O code may change host files)');
      }
      if (contract !== 'global-state' && scan.hostChanges.length > 0 && hostFilesWhy === undefined) {
        problems.push(
          `is @locking ${contract} but changes host files (${scan.hostChanges.join(', ')}): making, renaming or removing image files is global state; take a Bql and tag it global-state`,
        );
      }
      if (scan.checksBql && bqlParams.length === 0) problems.push('calls assertBql but takes no parameter typed Bql: the proof it checks must come in through its signature');
      if (scan.checksDrained && drainedParams.length === 0) problems.push('calls assertDrained but takes no drained proof parameter: the proof it checks must come in through its signature');
      const listed = c.className === '' ? metadataFunctions.get(c.name) : undefined;
      if (listed !== undefined && 'lock' in listed && listed.lock === true) {
        foundListed.add(c.name);
        if (lockParams.length === 0) problems.push("changes an open node's metadata (issue 11) and must take the metadata lock's proof (MetadataLocked)");
      } else if (listed !== undefined) {
        foundListed.add(c.name);
        if (contract !== 'global-state' || bqlParams.length === 0) {
          problems.push('changes metadata or global state (issue 11) and must be @locking global-state with a Bql parameter');
        }
        if (listed.drained && drainedParams.length === 0) {
          problems.push("changes an open node's metadata (issue 11) and must take a drained proof (Drained, DrainedAll or DrainedProof)");
        }
      }
      if (problems.length > 0) {
        for (const p of problems) fail(p);
        continue;
      }
      const bql = bqlParams.length > 0;
      const drained = drainedParams.length > 0;
      const locked = lockParams.length > 0;
      rows.push({
        name: c.name,
        module,
        className: c.className,
        contract,
        bql,
        drained,
        lock: locked,
        alongside: drained ? 'no (drained)' : contract === 'global-state' ? 'yes (BQL)' : contract === 'snapshot' ? 'yes (snapshot lock)' : locked ? 'yes (holds the metadata lock)' : 'yes',
        summary: firstSentence(docText(c.docNode)),
      });
    }
  }
  for (const name of metadataFunctions.keys()) {
    if (!foundListed.has(name)) errors.push(`(list): ${name}: named by issue 11 as changing metadata but not found as an exported function in ${SCAN_DIRS.join(' or ')} (renamed? update METADATA_FUNCTIONS)`);
  }
  rows.sort((a, b) => compare(a.module, b.module) || compare(a.className, b.className) || compare(a.name, b.name));
  return { rows, errors };
}

/**
 * A table cell: one line, `|` escaped.
 * @param {string} s
 */
function cell(s) {
  return s.replace(/\s+/g, ' ').trim().replace(/\|/g, '\\|');
}

/**
 * The markdown document for `rows` (deterministic: no dates; modules, classes and names sorted).
 * @param {ReadonlyArray<LockingRow>} rows
 * @returns {string}
 */
export function renderMarkdown(rows) {
  const sorted = [...rows].sort((a, b) => compare(a.module, b.module) || compare(a.className, b.className) || compare(a.name, b.name));
  const lines = [
    '# Locking contract',
    '',
    'Generated by `npm run docs:locking` from the source; do not edit.',
    '',
    'Every exported function of the block layer (`src/block/`) and the drivers (`src/drivers/`), and',
    'every driver callback, answers three questions: must the caller hold the Big Lock (BQL)? must the',
    'node be in a drained section? may it run while I/O is in flight? Its JSDoc tag `@locking` gives',
    'the class, and its signature carries the proofs: `global-state` code runs with the BQL held and',
    'takes the `Bql` proof; if it also takes a drained proof (`Drained<N>`, `DrainedAll` or',
    '`DrainedProof`) it needs a drained section, so no request is in flight on the node while it runs.',
    '`io` code is the request path: no BQL or drained proof, safe alongside other in-flight requests',
    '(a qcow2 function that changes metadata from there takes the `MetadataLocked` proof of the',
    "node's metadata lock: \"yes (holds the metadata lock)\"). `common` code",
    'takes no proof and may be called from anywhere. `snapshot` code runs for the holder of the',
    'snapshot lock (src/block/snapshot-lock.ts) and takes its `SnapshotLocked` proof instead of the',
    'BQL: it takes the BQL itself for its short global-state steps and does I/O between them on the',
    'nodes its own drained sections cover (the lock order: snapshot lock, then BQL; a BQL holder only',
    'tries the snapshot lock). The generator checks the tags against the',
    'signatures (docs/architecture.md, "The contract in the types").',
    '',
    `${sorted.length} functions and callbacks in ${new Set(sorted.map((r) => r.module)).size} modules.`,
  ];
  /** @type {string | null} */
  let current = null;
  for (const r of sorted) {
    if (r.module !== current) {
      current = r.module;
      lines.push(
        '',
        `## ${r.module}`,
        '',
        '| Function | Class | Contract | BQL | Drained | Alongside in-flight I/O | What it does |',
        '| --- | --- | --- | --- | --- | --- | --- |',
      );
    }
    const cells = [
      `\`${r.name}\``,
      r.className === '' ? '' : `\`${r.className}\``,
      r.contract,
      r.bql ? 'yes' : 'no',
      r.drained ? 'yes' : 'no',
      r.alongside,
      r.summary,
    ].map(cell);
    lines.push(`| ${cells.join(' | ')} |`);
  }
  return `${lines.join('\n')}\n`;
}

/**
 * The command line: write (default) or `--check`; `--root DIR`.
 * @param {string[]} argv
 * @returns {number} the exit code
 */
function main(argv) {
  let check = false;
  let root = REPO_ROOT;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--check') check = true;
    else if (a === '--root') {
      const dir = argv[++i];
      if (dir === undefined) {
        console.error('gen-locking-doc: --root needs a directory');
        return 2;
      }
      root = path.resolve(dir);
    } else if (a !== undefined && a.startsWith('--root=')) root = path.resolve(a.slice('--root='.length));
    else {
      console.error(`gen-locking-doc: unknown argument '${a}' (usage: gen-locking-doc.js [--check] [--root DIR])`);
      return 2;
    }
  }
  const { rows, errors } = collectRows(root);
  const text = renderMarkdown(rows);
  const out = path.join(root, OUTPUT_PATH);
  let code = 0;
  if (check) {
    const onDisk = fs.existsSync(out) ? fs.readFileSync(out, 'utf8') : null;
    if (onDisk !== text) {
      console.error(`${OUTPUT_PATH} is ${onDisk === null ? 'missing' : 'stale'}: run \`npm run docs:locking\` and commit the result.`);
      code = 1;
    } else {
      console.log(`${OUTPUT_PATH} is up to date (${rows.length} functions).`);
    }
  } else {
    fs.mkdirSync(path.dirname(out), { recursive: true });
    const old = fs.existsSync(out) ? fs.readFileSync(out, 'utf8') : null;
    if (old !== text) fs.writeFileSync(out, text);
    console.log(`${old === text ? 'unchanged' : 'wrote'} ${path.relative(process.cwd(), out) || out} (${rows.length} functions)`);
  }
  if (errors.length > 0) {
    console.error(`\n${errors.length} locking-contract error${errors.length === 1 ? '' : 's'} (left out of ${OUTPUT_PATH}):`);
    for (const e of errors) console.error(`  ${e}`);
    code = 1;
  }
  return code;
}

/** True when this file is the script node was started with (not imported by a test). */
function isMain() {
  const invoked = process.argv[1];
  if (invoked === undefined) return false;
  try {
    return import.meta.url === pathToFileURL(fs.realpathSync(invoked)).href;
  } catch {
    return import.meta.url === pathToFileURL(path.resolve(invoked)).href;
  }
}

if (isMain()) {
  process.exitCode = main(process.argv.slice(2));
}

/**
 * QMP's JSON, both ways: the streaming parser that turns a connection's bytes into messages, and
 * the formatter that writes replies and events the way QEMU writes them.
 *
 * Common code: no lock, no block layer; one JsonStream per connection, fed from the socket's data
 * events on the main loop.
 *
 * ## Input: what QEMU's json-lexer.c and json-streamer.c do, and what we do
 *
 * QMP input is a byte stream of JSON values, not lines: `{"execute":"a"}{"execute":"b"}` is two
 * commands, and a command may arrive one byte at a time. The lexer turns bytes into tokens
 * (structural characters, strings in double or single quotes, integers, floats, lower-case
 * keywords); whitespace separates tokens. The streamer counts `{`/`}` and `[`/`]` outside strings
 * and hands the tokens gathered so far to the parser as one message when both counts are zero (so a
 * scalar at the top level is a message of its own) or one of them went negative (a stray closer).
 * The parser then builds the value or reports the first error ("JSON parse error, expecting
 * value", "... missing : in object pair", "... duplicate key", ...); each becomes one reply.
 *
 * A byte the lexer cannot take (a control character inside a string, `@`, `01`, 0xFF) is "JSON
 * parse error, stray '<the token so far>'": the message gathered so far is dropped, the counts reset,
 * and the lexer skips input until a structural character (`{}[]:,`), a control character other than
 * tab, or 0xFE/0xFF: those are where it starts again. That is QEMU's resynchronisation, and clients
 * may send 0xFF (or any control character) to force the parser into a known state.
 *
 * Bounds (QEMU: 64 MiB of tokens, 2 Mi tokens, nesting 1024 per message). Ours, per message:
 * `maxMessageBytes` (default 1 MiB: the bytes of its tokens, plus one per token; whitespace is never
 * buffered), `maxTokens` (64 Ki) and `maxNesting` (1024, as QEMU). Past a bound the reply is QEMU's
 * ("JSON token size limit exceeded", "JSON token count limit exceeded", "JSON nesting depth limit
 * exceeded"), and there we deviate from QEMU on purpose: QEMU resets its counts and parses the rest
 * of the oversized message as new messages (one deep `[[[...]]]` earns a thousand error replies, and
 * the tail of a huge string is read as JSON); we skip the rest of that message instead (keeping
 * only its bracket counts, so memory stays bounded however long it is) and resume after it, or at
 * the next lexer error, exactly where QEMU would resynchronise. One oversized request, one reply.
 *
 * Numbers are JavaScript numbers; an integer beyond 2^53 that QEMU holds exactly (int64, uint64)
 * keeps its literal too, so that it is echoed as sent (an `id`), and a number written
 * with a fraction or exponent, or an integer outside int64, is remembered as "not an int64
 * literal" (isNonIntLiteral) so that an `int` argument refuses `1.0` as QEMU does.
 *
 * Strings are QEMU's modified UTF-8: invalid sequences, surrogates, noncharacters and code points
 * past U+10FFFF are refused ("invalid UTF-8 sequence in string", "\uD800 is not a valid Unicode
 * character"); `\u0000` and the overlong C0 80 are NUL.
 *
 * ## Output
 *
 * formatQmpJson writes what QEMU's JSON writer writes: `{"a": 1, "b": [2, 3]}` (", " and ": "),
 * every character outside printable ASCII as `\uXXXX` in upper-case hex (astral ones as surrogate
 * pairs), non-integers as C's `%.17g`, and an object's members in QEMU's QDict order (qdictOrder:
 * its hash table's buckets in turn, the member added last first within a bucket). That order is
 * why QEMU writes `{"return": ..., "id": 1}` but `{"id": 1, "error": ...}`, and `{"micro", "minor",
 * "major"}`; following it makes our lines byte for byte QEMU's.
 */
import type { QmpObject, QmpValue } from './types.js';

/** Per-message bounds of a JsonStream. */
export interface JsonStreamLimits {
  /** Bytes of a message's tokens, plus one per token (default 1 MiB). */
  maxMessageBytes: number;
  /** Tokens in one message (default 65536). */
  maxTokens: number;
  /** Open `{` plus `[` at any point (default 1024, as QEMU). */
  maxNesting: number;
}

/** The default bounds (see the module comment). */
export const DEFAULT_JSON_LIMITS: Readonly<JsonStreamLimits> = Object.freeze({
  maxMessageBytes: 1024 * 1024,
  maxTokens: 64 * 1024,
  maxNesting: 1024,
});

/** One message out of the stream: a JSON value, or the error QMP replies with (QEMU's desc text). */
export type JsonStreamItem = { ok: true; value: QmpValue } | { ok: false; error: string };

const enum Tok {
  LCurly,
  RCurly,
  LSquare,
  RSquare,
  Colon,
  Comma,
  Integer,
  Float,
  Keyword,
  String,
}

interface Token {
  type: Tok;
  /** The token's bytes (strings with their quotes); empty for structural tokens. */
  text: Buffer;
}

const enum St {
  Start,
  Whitespace,
  DqString,
  DqEscape,
  SqString,
  SqEscape,
  Zero,
  Nonzero,
  Neg,
  Mantissa,
  MantissaDigits,
  ExpE,
  ExpSign,
  ExpDigits,
  Keyword,
  Recovery,
}

const EMPTY = Buffer.alloc(0);

/** Bytes a discarded (oversized) token keeps for a later "stray" message. */
const DISCARD_KEEP_BYTES = 64;

function isDigit(b: number): boolean {
  return b >= 0x30 && b <= 0x39;
}

function structural(b: number): Tok | -1 {
  switch (b) {
    case 0x7b:
      return Tok.LCurly;
    case 0x7d:
      return Tok.RCurly;
    case 0x5b:
      return Tok.LSquare;
    case 0x5d:
      return Tok.RSquare;
    case 0x3a:
      return Tok.Colon;
    case 0x2c:
      return Tok.Comma;
    default:
      return -1;
  }
}

/** Marks the members of a parsed object or array whose number was not written as an int64 integer. */
const NON_INT = Symbol('snapstack.qmp.nonIntLiteral');

type Marked = { [NON_INT]?: Set<string | number> };

function markNonInt(container: object, key: string | number): void {
  const c = container as Marked;
  let set = c[NON_INT];
  if (set === undefined) {
    set = new Set();
    Object.defineProperty(container, NON_INT, { value: set, enumerable: false });
  }
  set.add(key);
}

/** The literal text of the members whose integer is exact in QEMU (int64 or uint64) but not in a double. */
const RAW_INT = Symbol('snapstack.qmp.rawInteger');

type RawMarked = { [RAW_INT]?: Map<string | number, string> };

function markRawInt(container: object, key: string | number, text: string): void {
  const c = container as RawMarked;
  let map = c[RAW_INT];
  if (map === undefined) {
    map = new Map();
    Object.defineProperty(container, RAW_INT, { value: map, enumerable: false });
  }
  map.set(key, text);
}

/** The integer literal of `container[key]` when a double cannot hold it exactly (and it is still that number). */
function rawIntText(container: object, key: string | number, v: number): string | undefined {
  const text = (container as RawMarked)[RAW_INT]?.get(key);
  return text !== undefined && Number(text) === v ? text : undefined;
}

/**
 * Carries the exact literal of a big integer from `from[fromKey]` to `to[toKey]` (the session
 * echoes a request's `id` that way: QEMU writes 9223372036854775807 back as it came).
 */
export function carryLiteral(from: object, fromKey: string, to: object, toKey: string): void {
  const text = (from as RawMarked)[RAW_INT]?.get(fromKey);
  if (text !== undefined) markRawInt(to, toKey, text);
}

/**
 * True when `container[key]` came from the wire as a number with a fraction or exponent, or as an
 * integer outside int64 (QEMU's `int` arguments refuse those even when the value is whole).
 */
export function isNonIntLiteral(container: object, key: string | number): boolean {
  return (container as Marked)[NON_INT]?.has(key) === true;
}

/** A streaming QMP input parser; see the module comment for what it accepts and how it recovers. */
export class JsonStream {
  readonly #limits: JsonStreamLimits;
  #state: St = St.Start;
  /** The current token's bytes. */
  #tok: Buffer = Buffer.allocUnsafe(256);
  #tokLen = 0;
  /** True while the current token is past the budget: its bytes are dropped. */
  #discardToken = false;
  #tokens: Token[] = [];
  #messageBytes = 0;
  #braces = 0;
  #brackets = 0;
  /** True while skipping the rest of an oversized message. */
  #skipping = false;
  #out: JsonStreamItem[] = [];

  constructor(limits: Partial<JsonStreamLimits> = {}) {
    this.#limits = { ...DEFAULT_JSON_LIMITS, ...limits };
  }

  /** Bytes held for the message being read (bounded by maxMessageBytes plus one token buffer). */
  get bufferedBytes(): number {
    return this.#messageBytes + this.#tokLen;
  }

  /** Feeds bytes; returns the messages (values and errors) they completed, in order. */
  push(chunk: Uint8Array): JsonStreamItem[] {
    for (let i = 0; i < chunk.length; ) {
      i = this.#feed(chunk, i);
    }
    const out = this.#out;
    this.#out = [];
    return out;
  }

  /** End of input: completes a number or keyword still waiting for its end; drops a partial message. */
  end(): JsonStreamItem[] {
    if (this.#state !== St.DqString && this.#state !== St.SqString) this.#feedByte(0x20);
    this.#tokLen = 0;
    this.#discardToken = false;
    this.#tokens = [];
    this.#messageBytes = 0;
    this.#braces = 0;
    this.#brackets = 0;
    this.#skipping = false;
    this.#state = St.Start;
    const out = this.#out;
    this.#out = [];
    return out;
  }

  /** Lexes from chunk[i]; returns the index of the next byte to lex. */
  #feed(chunk: Uint8Array, i: number): number {
    // Fast path through the body of a string: most of a large message is string bytes.
    const st = this.#state;
    if (st === St.DqString || st === St.SqString || st === St.Recovery || st === St.Whitespace) {
      const quote = st === St.DqString ? 0x22 : 0x27;
      let j = i;
      if (st === St.Whitespace) {
        while (j < chunk.length) {
          const b = chunk[j] as number;
          if (b !== 0x20 && b !== 0x09 && b !== 0x0a && b !== 0x0d) break;
          j++;
        }
        if (j === chunk.length) return j;
        this.#state = St.Start;
        return j;
      }
      if (st === St.Recovery) {
        while (j < chunk.length) {
          const b = chunk[j] as number;
          if ((b < 0x20 && b !== 0x09) || b >= 0xfe || structural(b) !== -1) break;
          j++;
        }
        if (j === chunk.length) return j;
        this.#state = St.Start;
        return j;
      }
      while (j < chunk.length) {
        const b = chunk[j] as number;
        if (b < 0x20 || b >= 0xfe || b === quote || b === 0x5c) break;
        j++;
      }
      if (j > i) {
        this.#append(chunk, i, j);
        return j;
      }
    }
    this.#feedByte(chunk[i] as number);
    return i + 1;
  }

  /** Appends chunk[from, to) to the current token, or drops it past the budget. */
  #append(chunk: Uint8Array, from: number, to: number): void {
    const n = to - from;
    if (this.#discardToken || this.#skipping) {
      // Keep only enough of a dropped token for the text of a later "stray" error.
      this.#appendRaw(chunk, from, from + Math.max(0, Math.min(n, DISCARD_KEEP_BYTES - this.#tokLen)));
      return;
    }
    if (this.#messageBytes + this.#tokLen + n + 1 > this.#limits.maxMessageBytes) {
      // Keep what fits (for the text of a later error), drop the rest of this token.
      this.#overLimit('JSON token size limit exceeded');
      this.#discardToken = true;
      this.#appendRaw(chunk, from, from + Math.max(0, Math.min(n, DISCARD_KEEP_BYTES - this.#tokLen)));
      return;
    }
    this.#appendRaw(chunk, from, to);
  }

  #appendRaw(chunk: Uint8Array, from: number, to: number): void {
    const n = to - from;
    if (n <= 0) return;
    if (this.#tokLen + n > this.#tok.length) {
      let size = this.#tok.length * 2;
      while (size < this.#tokLen + n) size *= 2;
      const bigger = Buffer.allocUnsafe(size);
      this.#tok.copy(bigger, 0, 0, this.#tokLen);
      this.#tok = bigger;
    }
    this.#tok.set(chunk.subarray(from, to), this.#tokLen);
    this.#tokLen += n;
  }

  #appendByte(b: number): void {
    if (this.#discardToken || this.#skipping) {
      if (this.#tokLen < DISCARD_KEEP_BYTES) this.#appendByteUnchecked(b);
      return;
    }
    if (this.#messageBytes + this.#tokLen + 2 > this.#limits.maxMessageBytes) {
      this.#overLimit('JSON token size limit exceeded');
      this.#discardToken = true;
      if (this.#tokLen < DISCARD_KEEP_BYTES) this.#appendByteUnchecked(b);
      return;
    }
    if (this.#tokLen === this.#tok.length) this.#appendRaw(Uint8Array.of(b), 0, 1);
    else this.#tok[this.#tokLen++] = b;
  }

  /** One byte through the lexer's state machine (QEMU's json-lexer.c, re-derived). */
  #feedByte(b: number): void {
    for (;;) {
      switch (this.#state) {
        case St.Start: {
          const s = structural(b);
          if (s !== -1) {
            this.#token(s);
            return;
          }
          if (b === 0x22 || b === 0x27) {
            this.#appendByte(b);
            this.#state = b === 0x22 ? St.DqString : St.SqString;
          } else if (b === 0x30) {
            this.#appendByte(b);
            this.#state = St.Zero;
          } else if (b >= 0x31 && b <= 0x39) {
            this.#appendByte(b);
            this.#state = St.Nonzero;
          } else if (b === 0x2d) {
            this.#appendByte(b);
            this.#state = St.Neg;
          } else if (b >= 0x61 && b <= 0x7a) {
            this.#appendByte(b);
            this.#state = St.Keyword;
          } else if (b === 0x20 || b === 0x09 || b === 0x0a || b === 0x0d) {
            this.#state = St.Whitespace;
          } else {
            this.#lexError(b);
          }
          return;
        }
        case St.Whitespace:
          if (b === 0x20 || b === 0x09 || b === 0x0a || b === 0x0d) return;
          this.#state = St.Start;
          continue;
        case St.DqString:
        case St.SqString: {
          const quote = this.#state === St.DqString ? 0x22 : 0x27;
          if (b === quote) {
            this.#appendByte(b);
            this.#token(Tok.String);
          } else if (b === 0x5c) {
            this.#appendByte(b);
            this.#state = this.#state === St.DqString ? St.DqEscape : St.SqEscape;
          } else if (b >= 0x20 && b <= 0xfd) {
            this.#appendByte(b);
          } else {
            this.#lexError(b);
          }
          return;
        }
        case St.DqEscape:
        case St.SqEscape:
          // Which escapes are valid is the parser's business (QEMU: "invalid escape sequence").
          if (b >= 0x20 && b <= 0xfd) {
            this.#appendByte(b);
            this.#state = this.#state === St.DqEscape ? St.DqString : St.SqString;
          } else {
            this.#lexError(b);
          }
          return;
        case St.Zero:
          // QEMU's lexer takes no exponent right after a lone 0: `0e5` is 0, then the keyword `e`.
          if (b === 0x2e) {
            this.#appendByte(b);
            this.#state = St.Mantissa;
            return;
          }
          if (isDigit(b)) {
            this.#lexError(b);
            return;
          }
          this.#token(Tok.Integer);
          continue;
        case St.Nonzero:
          if (isDigit(b)) {
            this.#appendByte(b);
            return;
          }
          if (b === 0x2e) {
            this.#appendByte(b);
            this.#state = St.Mantissa;
            return;
          }
          if (b === 0x65 || b === 0x45) {
            this.#appendByte(b);
            this.#state = St.ExpE;
            return;
          }
          this.#token(Tok.Integer);
          continue;
        case St.Neg:
          if (b === 0x30) {
            this.#appendByte(b);
            this.#state = St.Zero;
          } else if (b >= 0x31 && b <= 0x39) {
            this.#appendByte(b);
            this.#state = St.Nonzero;
          } else {
            this.#lexError(b);
          }
          return;
        case St.Mantissa:
          if (isDigit(b)) {
            this.#appendByte(b);
            this.#state = St.MantissaDigits;
          } else {
            this.#lexError(b);
          }
          return;
        case St.MantissaDigits:
          if (isDigit(b)) {
            this.#appendByte(b);
            return;
          }
          if (b === 0x65 || b === 0x45) {
            this.#appendByte(b);
            this.#state = St.ExpE;
            return;
          }
          this.#token(Tok.Float);
          continue;
        case St.ExpE:
          if (b === 0x2b || b === 0x2d) {
            this.#appendByte(b);
            this.#state = St.ExpSign;
          } else if (isDigit(b)) {
            this.#appendByte(b);
            this.#state = St.ExpDigits;
          } else {
            this.#lexError(b);
          }
          return;
        case St.ExpSign:
          if (isDigit(b)) {
            this.#appendByte(b);
            this.#state = St.ExpDigits;
          } else {
            this.#lexError(b);
          }
          return;
        case St.ExpDigits:
          if (isDigit(b)) {
            this.#appendByte(b);
            return;
          }
          this.#token(Tok.Float);
          continue;
        case St.Keyword:
          if (b >= 0x61 && b <= 0x7a) {
            this.#appendByte(b);
            return;
          }
          this.#token(Tok.Keyword);
          continue;
        case St.Recovery:
          if ((b < 0x20 && b !== 0x09) || b >= 0xfe || structural(b) !== -1) {
            this.#state = St.Start;
            continue;
          }
          return;
      }
    }
  }

  /** The lexer met a byte it cannot take (it is part of the token reported). */
  #lexError(b: number): void {
    const kept = this.#discardToken;
    this.#appendByteUnchecked(b);
    let text = this.#tok.subarray(0, this.#tokLen);
    // QEMU's token is a C string: its text ends at a NUL byte.
    const nul = text.indexOf(0);
    if (nul >= 0) text = text.subarray(0, nul);
    const shown = decodeLossy(text);
    this.#tokLen = 0;
    this.#discardToken = false;
    this.#resetMessage();
    this.#state = St.Recovery;
    this.#out.push({ ok: false, error: `JSON parse error, stray '${shown}${kept ? '...' : ''}'` });
  }

  #appendByteUnchecked(b: number): void {
    if (this.#tokLen < this.#tok.length) this.#tok[this.#tokLen++] = b;
    else this.#appendRaw(Uint8Array.of(b), 0, 1);
  }

  /** The current token is complete (structural tokens carry no text). */
  #token(type: Tok): void {
    let text = EMPTY;
    const discarded = this.#discardToken;
    if (this.#tokLen > 0) {
      text = discarded ? EMPTY : Buffer.from(this.#tok.subarray(0, this.#tokLen));
      this.#tokLen = 0;
    }
    this.#discardToken = false;
    this.#state = St.Start;
    const len = type <= Tok.Comma ? 1 : text.length;

    switch (type) {
      case Tok.LCurly:
        this.#braces++;
        break;
      case Tok.RCurly:
        this.#braces--;
        break;
      case Tok.LSquare:
        this.#brackets++;
        break;
      case Tok.RSquare:
        this.#brackets--;
        break;
      default:
        break;
    }
    // QEMU's rule: a message ends when both counts are back to zero or one went negative.
    const complete = this.#braces < 0 || this.#brackets < 0 || (this.#braces === 0 && this.#brackets === 0);
    if (this.#skipping || discarded) {
      // The rest of an oversized message: only its brackets matter.
      this.#skipping = true;
      if (complete) this.#resetMessage();
      return;
    }
    if (this.#messageBytes + len + 1 > this.#limits.maxMessageBytes) {
      this.#overLimit('JSON token size limit exceeded');
      if (complete) this.#resetMessage();
      return;
    }
    if (this.#tokens.length + 1 > this.#limits.maxTokens) {
      this.#overLimit('JSON token count limit exceeded');
      if (complete) this.#resetMessage();
      return;
    }
    if (this.#braces + this.#brackets > this.#limits.maxNesting) {
      this.#overLimit('JSON nesting depth limit exceeded');
      if (complete) this.#resetMessage();
      return;
    }
    this.#tokens.push({ type, text });
    this.#messageBytes += len + 1;
    if (!complete) return;
    const tokens = this.#tokens;
    this.#resetMessage();
    this.#out.push(parseMessage(tokens));
  }

  /** A bound was crossed: reply once, then skip the rest of this message. */
  #overLimit(error: string): void {
    this.#out.push({ ok: false, error });
    this.#tokens = [];
    this.#messageBytes = 0;
    this.#skipping = true;
  }

  #resetMessage(): void {
    this.#tokens = [];
    this.#messageBytes = 0;
    this.#braces = 0;
    this.#brackets = 0;
    this.#skipping = false;
  }
}

// ---------------------------------------------------------------------------------------------
// The parser: a message's tokens to a value, QEMU's json-parser.c messages (first error wins).

class ParseError extends Error {}

class Parser {
  #i = 0;
  constructor(readonly tokens: readonly Token[]) {}

  fail(msg: string): never {
    throw new ParseError(`JSON parse error, ${msg}`);
  }

  peek(): Token {
    const t = this.tokens[this.#i];
    if (t === undefined) this.fail('premature EOI');
    return t;
  }

  pop(): Token {
    const t = this.peek();
    this.#i++;
    return t;
  }

  /** Parses a value; stores it in container[key] (so numbers can be marked). */
  value(): { v: QmpValue; nonInt: boolean; raw?: string } {
    const t = this.peek();
    switch (t.type) {
      case Tok.LCurly:
        return { v: this.object(), nonInt: false };
      case Tok.LSquare:
        return { v: this.array(), nonInt: false };
      case Tok.String:
        this.#i++;
        return { v: parseString(t.text, (m) => this.fail(m)), nonInt: false };
      case Tok.Integer:
        this.#i++;
        return parseInteger(t.text.toString('latin1'));
      case Tok.Float:
        this.#i++;
        return { v: Number(t.text.toString('latin1')), nonInt: true };
      case Tok.Keyword: {
        this.#i++;
        const k = t.text.toString('latin1');
        if (k === 'true') return { v: true, nonInt: false };
        if (k === 'false') return { v: false, nonInt: false };
        if (k === 'null') return { v: null, nonInt: false };
        return this.fail(`invalid keyword '${k}'`);
      }
      default:
        return this.fail('expecting value');
    }
  }

  object(): QmpObject {
    this.pop();
    const obj: QmpObject = {};
    if (this.peek().type === Tok.RCurly) {
      this.pop();
      return obj;
    }
    this.pair(obj);
    let t = this.pop();
    while (t.type !== Tok.RCurly) {
      if (t.type !== Tok.Comma) this.fail('expected separator in dict');
      this.pair(obj);
      t = this.pop();
    }
    return obj;
  }

  pair(obj: QmpObject): void {
    const key = this.value();
    if (typeof key.v !== 'string') this.fail('key is not a string in object');
    if (this.pop().type !== Tok.Colon) this.fail('missing : in object pair');
    const val = this.value();
    if (Object.prototype.hasOwnProperty.call(obj, key.v)) this.fail('duplicate key');
    // defineProperty: a key "__proto__" is a member like any other, not the prototype.
    Object.defineProperty(obj, key.v, { value: val.v, enumerable: true, writable: true, configurable: true });
    if (val.nonInt) markNonInt(obj, key.v);
    if (val.raw !== undefined) markRawInt(obj, key.v, val.raw);
  }

  array(): QmpValue[] {
    this.pop();
    const arr: QmpValue[] = [];
    if (this.peek().type === Tok.RSquare) {
      this.pop();
      return arr;
    }
    let first = true;
    for (;;) {
      if (!first) {
        const t = this.pop();
        if (t.type === Tok.RSquare) return arr;
        if (t.type !== Tok.Comma) this.fail('expected separator in list');
      }
      first = false;
      const val = this.value();
      if (val.nonInt) markNonInt(arr, arr.length);
      if (val.raw !== undefined) markRawInt(arr, arr.length, val.raw);
      arr.push(val.v);
    }
  }
}

const INT64_MIN = -(2n ** 63n);
const INT64_MAX = 2n ** 63n - 1n;

const UINT64_MAX = 2n ** 64n - 1n;

/** An integer literal: QEMU keeps int64 and uint64 exactly, anything wider becomes a double. */
function parseInteger(text: string): { v: number; nonInt: boolean; raw?: string } {
  const n = Number(text);
  if (Number.isSafeInteger(n)) return { v: n === 0 ? 0 : n, nonInt: false };
  const big = BigInt(text);
  const nonInt = big < INT64_MIN || big > INT64_MAX;
  return big >= INT64_MIN && big <= UINT64_MAX ? { v: n, nonInt, raw: big.toString() } : { v: n, nonInt };
}

function parseMessage(tokens: readonly Token[]): JsonStreamItem {
  const p = new Parser(tokens);
  try {
    return { ok: true, value: p.value().v };
  } catch (e) {
    if (e instanceof ParseError) return { ok: false, error: e.message };
    throw e;
  }
}

// ---------------------------------------------------------------------------------------------
// Modified UTF-8 (QEMU's util/unicode.c rules, re-derived).

function validCodepoint(cp: number): boolean {
  if (cp < 0 || cp > 0x10ffff) return false;
  if ((cp >= 0xfdd0 && cp <= 0xfdef) || (cp & 0xfffe) === 0xfffe) return false;
  return !(cp >= 0xd800 && cp <= 0xdfff);
}

const MIN_CP = [0x80, 0x800, 0x10000, 0x200000, 0x4000000];

/** Decodes one modified-UTF-8 sequence at s[i]; returns the code point (-1: invalid) and its end. */
function utf8At(s: Uint8Array, i: number, end: number): { cp: number; next: number } {
  const b0 = s[i] as number;
  if (b0 < 0x80) return { cp: b0, next: i + 1 };
  if (b0 >= 0xfe || (b0 & 0x40) === 0) return { cp: -1, next: i + 1 };
  let len = 0;
  let mask = 0x80;
  while (b0 & mask) {
    len++;
    mask >>= 1;
  }
  let cp = b0 & (mask - 1);
  let p = i + 1;
  for (let k = 1; k < len; k++) {
    const b = p < end ? (s[p] as number) : 0;
    if ((b & 0xc0) !== 0x80) return { cp: -1, next: p };
    p++;
    cp = cp * 64 + (b & 0x3f);
  }
  if (cp > 0x10ffff) return { cp: -1, next: p };
  if ((cp >= 0xfdd0 && cp <= 0xfdef) || (cp & 0xfffe) === 0xfffe) return { cp: -1, next: p };
  if (cp >= 0xd800 && cp <= 0xdfff) return { cp: -1, next: p };
  if (cp < (MIN_CP[len - 2] as number) && !(cp === 0 && len === 2)) return { cp: -1, next: p };
  return { cp, next: p };
}

/** Bytes to text with U+FFFD for each invalid sequence (the text of a "stray" error). */
function decodeLossy(s: Uint8Array): string {
  let out = '';
  for (let i = 0; i < s.length; ) {
    const { cp, next } = utf8At(s, i, s.length);
    out += String.fromCodePoint(cp < 0 ? 0xfffd : cp);
    i = next;
  }
  return out;
}

function hex4(s: Uint8Array, i: number, end: number): number {
  let cp = 0;
  for (let k = 0; k < 4; k++) {
    const b = i + k < end ? (s[i + k] as number) : 0;
    let d: number;
    if (b >= 0x30 && b <= 0x39) d = b - 0x30;
    else if (b >= 0x61 && b <= 0x66) d = b - 0x57;
    else if (b >= 0x41 && b <= 0x46) d = b - 0x37;
    else return -1;
    cp = cp * 16 + d;
  }
  return cp;
}

/** A string token (with its quotes) to its value, or fail(QEMU's message). */
function parseString(tok: Buffer, fail: (msg: string) => never): string {
  const quote = tok[0] as number;
  const end = tok.length - 1; // the closing quote
  let out = '';
  let runStart = 1;
  let i = 1;
  const flushAscii = (upTo: number): void => {
    if (upTo > runStart) out += tok.toString('latin1', runStart, upTo);
  };
  while (i < end) {
    const b = tok[i] as number;
    if (b === quote) break;
    if (b < 0x80 && b !== 0x5c) {
      i++;
      continue;
    }
    flushAscii(i);
    if (b === 0x5c) {
      const escStart = i;
      const e = tok[i + 1] as number;
      i += 2;
      switch (e) {
        case 0x22:
          out += '"';
          break;
        case 0x27:
          out += "'";
          break;
        case 0x5c:
          out += '\\';
          break;
        case 0x2f:
          out += '/';
          break;
        case 0x62:
          out += '\b';
          break;
        case 0x66:
          out += '\f';
          break;
        case 0x6e:
          out += '\n';
          break;
        case 0x72:
          out += '\r';
          break;
        case 0x74:
          out += '\t';
          break;
        case 0x75: {
          let cp = hex4(tok, i, tok.length);
          i += 4;
          if (cp >= 0xd800 && cp <= 0xdbff && tok[i] === 0x5c && tok[i + 1] === 0x75) {
            const trail = hex4(tok, i + 2, tok.length);
            if (trail >= 0xdc00 && trail <= 0xdfff) {
              cp = 0x10000 + ((cp & 0x3ff) << 10) + (trail & 0x3ff);
              i += 6;
            }
          }
          if (!validCodepoint(cp)) {
            // QEMU prints the escape as written, as far as the token goes.
            const shown = tok.toString('latin1', escStart, Math.min(i, tok.length));
            fail(`${shown} is not a valid Unicode character`);
          }
          out += String.fromCodePoint(cp);
          break;
        }
        default:
          fail('invalid escape sequence in string');
      }
    } else {
      const { cp, next } = utf8At(tok, i, end);
      if (cp < 0) fail('invalid UTF-8 sequence in string');
      out += String.fromCodePoint(cp);
      i = next;
    }
    runStart = i;
  }
  flushAscii(Math.min(i, end));
  return out;
}

// ---------------------------------------------------------------------------------------------
// Output.

/** C's printf("%.17g", x) for a finite double. */
function formatG17(x: number): string {
  if (x === 0) return Object.is(x, -0) ? '-0' : '0';
  const exp = Number(x.toExponential(16).split('e')[1]);
  if (exp < -4 || exp >= 17) {
    const [mant = '', e = '0'] = x.toExponential(16).split('e');
    const m = mant.includes('.') ? mant.replace(/0+$/, '').replace(/\.$/, '') : mant;
    const en = Number(e);
    return `${m}e${en < 0 ? '-' : '+'}${String(Math.abs(en)).padStart(2, '0')}`;
  }
  const fixed = x.toFixed(Math.max(0, 16 - exp));
  return fixed.includes('.') ? fixed.replace(/0+$/, '').replace(/\.$/, '') : fixed;
}

function formatNumber(x: number): string {
  // QEMU would print inf/nan (not JSON); a reply must stay parseable.
  if (!Number.isFinite(x)) return 'null';
  // -0 only comes from a float literal (an integer -0 is read as 0): QEMU prints the double's sign.
  if (Number.isSafeInteger(x)) return Object.is(x, -0) ? '-0' : String(x);
  return formatG17(x);
}

function hexU(code: number): string {
  return `\\u${code.toString(16).toUpperCase().padStart(4, '0')}`;
}

function formatString(s: string): string {
  let out = '"';
  let runStart = 0;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c >= 0x20 && c < 0x7f && c !== 0x22 && c !== 0x5c) continue;
    out += s.slice(runStart, i);
    runStart = i + 1;
    switch (c) {
      case 0x22:
        out += '\\"';
        break;
      case 0x5c:
        out += '\\\\';
        break;
      case 0x08:
        out += '\\b';
        break;
      case 0x0c:
        out += '\\f';
        break;
      case 0x0a:
        out += '\\n';
        break;
      case 0x0d:
        out += '\\r';
        break;
      case 0x09:
        out += '\\t';
        break;
      default:
        if (c >= 0xd800 && c <= 0xdbff) {
          const d = s.charCodeAt(i + 1);
          if (d >= 0xdc00 && d <= 0xdfff) {
            out += hexU(c) + hexU(d);
            i++;
            runStart = i + 1;
          } else {
            out += hexU(0xfffd);
          }
        } else if (c >= 0xdc00 && c <= 0xdfff) {
          out += hexU(0xfffd);
        } else {
          out += hexU(c);
        }
    }
  }
  return `${out}${s.slice(runStart)}"`;
}

/** One member: a big integer as the literal it came as, anything else as formatQmpJson writes it. */
function formatMember(container: object, key: string | number, x: QmpValue | undefined): string {
  if (typeof x === 'number' && !Number.isSafeInteger(x)) {
    const raw = rawIntText(container, key, x);
    if (raw !== undefined) return raw;
  }
  return formatQmpJson(x);
}

/** QEMU's QDict: 512 buckets, chosen by tdb_hash (qobject/qdict.c; re-derived). */
const QDICT_BUCKETS = 512;

function qdictBucket(key: string): number {
  let ascii = true;
  for (let i = 0; i < key.length && ascii; i++) ascii = key.charCodeAt(i) < 0x80;
  const b: { readonly length: number; [i: number]: number } = ascii ? { length: key.length } : Buffer.from(key, 'utf8');
  let value = Math.imul(0x238f13af, b.length) >>> 0;
  for (let i = 0; i < b.length; i++) {
    const byte = ascii ? key.charCodeAt(i) : (b[i] as number);
    value = (value + ((byte << ((i * 5) % 24)) >>> 0)) >>> 0;
  }
  return ((Math.imul(1103515243, value) + 12345) >>> 0) % QDICT_BUCKETS;
}

/**
 * Keys (in the order they were added) in the order QEMU's QDict iterates them: by hash bucket,
 * and within one bucket the key added last first. QEMU checks a request's members in this order
 * and writes objects in it.
 */
export function qdictOrder(keys: readonly string[]): string[] {
  return keys
    .map((k, i) => ({ k, i, b: qdictBucket(k) }))
    .sort((x, y) => x.b - y.b || y.i - x.i)
    .map((e) => e.k);
}

/** A value as QEMU's JSON writer prints it (one line; no trailing newline; members in QDict order). */
export function formatQmpJson(v: QmpValue | undefined): string {
  if (v === null || v === undefined) return 'null';
  switch (typeof v) {
    case 'boolean':
      return v ? 'true' : 'false';
    case 'number':
      return formatNumber(v);
    case 'string':
      return formatString(v);
    default:
      break;
  }
  if (Array.isArray(v)) return `[${v.map((x, i) => formatMember(v, i, x)).join(', ')}]`;
  const parts: string[] = [];
  const keys = Object.keys(v).filter((k) => v[k] !== undefined);
  for (const k of keys.length > 1 ? qdictOrder(keys) : keys) parts.push(`${formatString(k)}: ${formatMember(v, k, v[k])}`);
  return `{${parts.join(', ')}}`;
}

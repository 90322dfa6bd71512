/**
 * A strict JSON parser for the files a checkpoint is described by (safetensors headers, the
 * shard index). `JSON.parse` silently keeps the last of two duplicate keys (so a tensor listed
 * twice would silently take the second place) and turns `1e3`, `1.0` or integers past 2^53
 * into numbers that cannot be told apart from valid offsets; this parser refuses the first and
 * keeps numbers as their text.
 *
 * @example
 * ```ts
 * import { parseStrictJson } from "./json.ts";
 * parseStrictJson('{"a": 1}', "x.json", {
 *   syntaxCode: "BAD_INDEX",
 *   what: "index",
 *   duplicate: (key) => { throw new Error(`${key} twice`); },
 * });
 * ```
 * @module
 */

import { CheckpointError, type CheckpointErrorCode } from "../errors.ts";
import { pathText, quoteName } from "../messages.ts";

const JSON_DEPTH_LIMIT = 128;

/** A JSON number kept as its source text, so integer rules can be checked exactly. */
export class JsonNumber {
  /** Keeps the number's text. */
  constructor(readonly raw: string) {}
}

/** A JSON object with its keys in source order; duplicates are rejected while parsing. */
export class JsonObject {
  /** Keeps the entries. */
  constructor(readonly entries: Map<string, JsonValue>) {}
}

/** A parsed JSON value. */
export type JsonValue = string | JsonNumber | boolean | null | JsonValue[] | JsonObject;

/** How {@link parseStrictJson} reports what it refuses. */
export interface StrictJsonOptions {
  /** Error code of a syntax error. */
  syntaxCode: CheckpointErrorCode;
  /** What the text is, for messages (`header`, `index`). */
  what: string;
  /**
   * Called with a key given twice in one object, the top-level key the object is under (null
   * at the top level) and the object's depth; it throws the error to report.
   */
  duplicate: (key: string, owner: string | null, depth: number) => never;
}

/**
 * Parses JSON text strictly: duplicate keys are errors (through `options.duplicate`), numbers
 * are kept as text ({@link JsonNumber}), nesting is bounded, lone surrogates are refused.
 * Syntax errors are CheckpointError `options.syntaxCode` naming `file` and the offset.
 */
export function parseStrictJson(text: string, file: string, options: StrictJsonOptions): JsonValue {
  return new JsonParser(text, file, options).parseDocument();
}

// A JSON number at `lastIndex` (sticky; one object for every number of a header).
const NUMBER = /-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?/y;

class JsonParser {
  private pos = 0;
  constructor(
    private readonly text: string,
    private readonly file: string,
    private readonly options: StrictJsonOptions,
  ) {}

  parseDocument(): JsonValue {
    this.skipWs();
    const v = this.value(0, null);
    this.skipWs();
    if (this.pos !== this.text.length) this.syntax("unexpected text after the JSON value");
    return v;
  }

  private syntax(what: string): never {
    throw new CheckpointError(
      this.options.syntaxCode,
      `${
        pathText(this.file)
      }: ${this.options.what} is not valid JSON: ${what} at offset ${this.pos}`,
    );
  }

  private skipWs(): void {
    const t = this.text;
    while (this.pos < t.length) {
      const c = t.charCodeAt(this.pos);
      if (c === 0x20 || c === 0x0a || c === 0x0d || c === 0x09) this.pos++;
      else break;
    }
  }

  // `owner` names the top-level entry being parsed, so a duplicate key inside it can be named.
  private value(depth: number, owner: string | null): JsonValue {
    if (depth > JSON_DEPTH_LIMIT) this.syntax(`nesting deeper than ${JSON_DEPTH_LIMIT}`);
    const t = this.text;
    if (this.pos >= t.length) this.syntax("unexpected end");
    const c = t[this.pos];
    if (c === "{") return this.object(depth, owner);
    if (c === "[") return this.array(depth, owner);
    if (c === '"') return this.string();
    if (c === "-" || (c >= "0" && c <= "9")) return this.number();
    if (t.startsWith("true", this.pos)) {
      this.pos += 4;
      return true;
    }
    if (t.startsWith("false", this.pos)) {
      this.pos += 5;
      return false;
    }
    if (t.startsWith("null", this.pos)) {
      this.pos += 4;
      return null;
    }
    this.syntax(`unexpected character ${quoteName(c)}`);
  }

  private object(depth: number, owner: string | null): JsonObject {
    const entries = new Map<string, JsonValue>();
    this.pos++; // {
    this.skipWs();
    if (this.text[this.pos] === "}") {
      this.pos++;
      return new JsonObject(entries);
    }
    for (;;) {
      this.skipWs();
      if (this.text[this.pos] !== '"') this.syntax("expected a string key");
      const key = this.string();
      if (entries.has(key)) this.options.duplicate(key, owner, depth);
      this.skipWs();
      if (this.text[this.pos] !== ":") this.syntax("expected ':'");
      this.pos++;
      this.skipWs();
      entries.set(key, this.value(depth + 1, depth === 0 ? key : owner));
      this.skipWs();
      const c = this.text[this.pos];
      if (c === ",") {
        this.pos++;
        continue;
      }
      if (c === "}") {
        this.pos++;
        return new JsonObject(entries);
      }
      this.syntax("expected ',' or '}'");
    }
  }

  private array(depth: number, owner: string | null): JsonValue[] {
    const out: JsonValue[] = [];
    this.pos++; // [
    this.skipWs();
    if (this.text[this.pos] === "]") {
      this.pos++;
      return out;
    }
    for (;;) {
      this.skipWs();
      out.push(this.value(depth + 1, owner));
      this.skipWs();
      const c = this.text[this.pos];
      if (c === ",") {
        this.pos++;
        continue;
      }
      if (c === "]") {
        this.pos++;
        return out;
      }
      this.syntax("expected ',' or ']'");
    }
  }

  private number(): JsonNumber {
    NUMBER.lastIndex = this.pos;
    const m = NUMBER.exec(this.text);
    if (m === null) this.syntax("malformed number");
    this.pos += m[0].length;
    return new JsonNumber(m[0]);
  }

  private string(): string {
    const t = this.text;
    this.pos++; // opening quote
    let out = "";
    let runStart = this.pos;
    for (;;) {
      if (this.pos >= t.length) this.syntax("unterminated string");
      const c = t.charCodeAt(this.pos);
      if (c === 0x22) {
        out += t.slice(runStart, this.pos);
        this.pos++;
        break;
      }
      if (c < 0x20) this.syntax("control character in string");
      if (c !== 0x5c) {
        this.pos++;
        continue;
      }
      out += t.slice(runStart, this.pos);
      const e = t[this.pos + 1];
      this.pos += 2;
      switch (e) {
        case '"':
          out += '"';
          break;
        case "\\":
          out += "\\";
          break;
        case "/":
          out += "/";
          break;
        case "b":
          out += "\b";
          break;
        case "f":
          out += "\f";
          break;
        case "n":
          out += "\n";
          break;
        case "r":
          out += "\r";
          break;
        case "t":
          out += "\t";
          break;
        case "u":
          out += String.fromCharCode(this.hex4());
          break;
        default:
          this.pos -= 2;
          this.syntax("invalid escape in string");
      }
      runStart = this.pos;
    }
    // serde_json, behind the reference reader, rejects lone surrogates; so do we, which also
    // keeps every accepted name representable in UTF-8 when we write it back.
    if (!out.isWellFormed()) this.syntax("lone surrogate in string");
    return out;
  }

  private hex4(): number {
    const h = this.text.slice(this.pos, this.pos + 4);
    if (!/^[0-9a-fA-F]{4}$/.test(h)) this.syntax("invalid \\u escape");
    this.pos += 4;
    return parseInt(h, 16);
  }
}

/**
 * The pieces every one-line error message is made of: the first items of a long list, counted
 * nouns, dotted names, and text from input made safe to print (ARCHITECTURE.md, "Errors").
 * Tensor names, file names and config values come from files anyone can write, and an error
 * line goes to a terminal: what a terminal would act on (control characters, `\r`, ANSI escape
 * sequences, line separators, bidi overrides) is written as an escape, and what is long is cut
 * in the middle, keeping its start and its end. Cutting never reads a long input whole, so a
 * 90 MB name costs no more than a short one.
 *
 * @example
 * ```ts
 * import { listNames, quoteName } from "./messages.ts";
 * quoteName("model.\x1b[31mlayers\r"); // '"model.\\u001b[31mlayers\\r"'
 * listNames(["a", "b", "c", "d", "e", "f", "g"], 3); // '"a", "b", "c" and 4 more'
 * ```
 * @module
 */

/**
 * The first `n` items joined by `, `, then `, ...` when there are more: `a, b, c, ...`. Items
 * are used as they are; pass names from input through {@link quoteName} first, or use
 * {@link listNames}.
 */
export function firstOf(items: readonly string[], n: number): string {
  return `${items.slice(0, n).join(", ")}${items.length > n ? ", ..." : ""}`;
}

/** `1 tensor`, `3 tensors`; `many` for nouns whose plural is not `one` + `s`. */
export function plural(count: number, one: string, many: string = `${one}s`): string {
  return `${count} ${count === 1 ? one : many}`;
}

/** The dotted name of `name` inside the module at `path` (`""` is the root: the name alone). */
export function qualifiedName(path: string, name: string): string {
  return path === "" ? name : `${path}.${name}`;
}

/** Longest name {@link quoteName} shows whole, in code points. */
export const NAME_SHOWN_MAX = 120;

/** Names {@link listNames} shows before "and N more". */
export const NAMES_LISTED_MAX = 5;

// C0 and C1 controls (ESC and CSI start terminal escape sequences), DEL, line and paragraph
// separators, bidirectional overrides and isolates (they reorder what a terminal shows), the
// byte order mark, and lone surrogates (not text at all).
// deno-lint-ignore no-control-regex -- control characters are what it looks for
const UNSAFE = new RegExp(
  "[\\u0000-\\u001f\\u007f-\\u009f\\u2028\\u2029\\u200e\\u200f\\u202a-\\u202e\\u2066-\\u2069\\ufeff\\ud800-\\udfff]",
  "gu",
);
const SHORT: Readonly<Record<string, string>> = { "\n": "\\n", "\r": "\\r", "\t": "\\t" };

/**
 * `s` with every control character, terminal escape, line separator, bidirectional override
 * and lone surrogate written as an escape (`\n`, `\u001b`); everything else as it is.
 */
export function escapeText(s: string): string {
  return s.replace(
    UNSAFE,
    (c) => SHORT[c] ?? `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`,
  );
}

const isHigh = (c: number) => c >= 0xd800 && c <= 0xdbff;
const isLow = (c: number) => c >= 0xdc00 && c <= 0xdfff;

/** Code points of `s`, counted without building an array of them. */
function codePoints(s: string): number {
  let n = s.length;
  for (let i = 0; i + 1 < s.length; i++) {
    if (isHigh(s.charCodeAt(i)) && isLow(s.charCodeAt(i + 1))) {
      n--;
      i++;
    }
  }
  return n;
}

/** The code-unit index after the first `k` code points of `s`. */
function afterPoints(s: string, k: number): number {
  let i = 0;
  for (let n = 0; n < k && i < s.length; n++) {
    i += isHigh(s.charCodeAt(i)) && isLow(s.charCodeAt(i + 1)) ? 2 : 1;
  }
  return i;
}

/** The code-unit index where the last `k` code points of `s` begin. */
function beforeLastPoints(s: string, k: number): number {
  let i = s.length;
  for (let n = 0; n < k && i > 0; n++) {
    i -= isLow(s.charCodeAt(i - 1)) && i >= 2 && isHigh(s.charCodeAt(i - 2)) ? 2 : 1;
  }
  return i;
}

/**
 * `s` cut to at most `max` code points (and at least 5 shown): its first and last code points
 * around `...`, so both ends stay readable. Surrogate pairs are never split; `s` is not read
 * whole when it is long.
 */
export function cutText(s: string, max: number = NAME_SHOWN_MAX): string {
  // Past 2 x max code units there are more than max code points: no need to count them.
  if (s.length <= max || (s.length <= 2 * max && codePoints(s) <= max)) return s;
  const keep = Math.max(2, max - 3);
  const head = Math.ceil(keep / 2);
  return `${s.slice(0, afterPoints(s, head))}...${s.slice(beforeLastPoints(s, keep - head))}`;
}

/**
 * A name from input (a tensor name, a file name, a config value) made safe for a one-line
 * message: in double quotes, with `"` and `\` escaped, every control character, terminal escape,
 * line separator, bidirectional override and lone surrogate written as an escape (`\n`,
 * `\u001b`), and a name longer than `max` code points cut in the middle to its first and last
 * code points around `...` so that both ends stay readable:
 * `"model.layers.0.mlp.experts.1...7.w2.weight"`. The result never contains a raw control
 * character and shows at most `max` code points of the name.
 */
export function quoteName(name: string, max: number = NAME_SHOWN_MAX): string {
  return `"${escapeText(cutText(name, max).replace(/["\\]/g, (c) => `\\${c}`))}"`;
}

/**
 * A path for a message: as given when it is plain, else escaped and cut like a name but
 * without quotes, so a message reads `dir/model.safetensors: ...`.
 */
export function pathText(path: string): string {
  return escapeText(cutText(path, 2 * NAME_SHOWN_MAX));
}

/** At most `max` names from input, quoted (see {@link quoteName}), then "and N more". */
export function listNames(names: readonly string[], max: number = NAMES_LISTED_MAX): string {
  const shown = names.slice(0, max).map((n) => quoteName(n));
  if (names.length <= max) return shown.join(", ");
  return `${shown.join(", ")} and ${names.length - max} more`;
}

/**
 * A JSON value from input for a message: strings quoted and cut, arrays and objects by kind
 * and size (their content could be anything), numbers and literals as JSON writes them.
 */
export function describeValue(v: unknown): string {
  if (v === undefined) return "missing";
  if (typeof v === "string") return `${quoteName(v)} (a string)`;
  if (Array.isArray(v)) return `a list of ${v.length}`;
  if (typeof v === "object" && v !== null) return "an object";
  return escapeText(cutText(String(v), 40));
}

/**
 * The last guard before a terminal: one line (line breaks folded into spaces), escaped, at
 * most `max` code points with the start and the end kept. The CLI passes every error message
 * through it.
 */
export function oneLine(message: string, max = 2000): string {
  const folded = message.replace(/\s*[\r\n]+\s*/g, " ").trim();
  return escapeText(cutText(folded, max));
}

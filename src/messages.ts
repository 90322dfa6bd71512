/**
 * Text from input inside error messages: tensor names, file names and config values come from
 * files anyone can write, and an error line goes to a terminal. Everything here escapes what a
 * terminal would act on (control characters, `\r`, ANSI escape sequences, line and bidi
 * separators) and cuts what is long, keeping its start and its end, so a message stays one
 * short line whatever the input.
 *
 * @example
 * ```ts
 * import { listNames, quoteName } from "./messages.ts";
 * quoteName("model.\x1b[31mlayers\r"); // '"model.\\u001b[31mlayers\\r"'
 * listNames(["a", "b", "c", "d", "e", "f", "g"], 3); // '"a", "b", "c" and 4 more'
 * ```
 * @module
 */

/** Longest name (in characters, before escaping) shown whole; longer ones are cut. */
export const MAX_NAME_CHARS = 120;

/** Names shown by {@link listNames} before "and N more". */
export const MAX_LISTED_NAMES = 5;

// C0 and C1 controls, DEL, and the characters that reorder or break a terminal line.
// deno-lint-ignore no-control-regex -- matching control characters is the point
const UNSAFE = /[\u0000-\u001f\u007f-\u009f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]/g;

const SHORT: Readonly<Record<string, string>> = {
  "\n": "\\n",
  "\r": "\\r",
  "\t": "\\t",
  "\b": "\\b",
  "\f": "\\f",
};

/** `s` with every control, line-breaking or bidi character written as an escape (`\r`, `\u001b`). */
export function escapeText(s: string): string {
  // Lone surrogates would print as replacement characters; they are escaped too.
  const out = s.replace(
    UNSAFE,
    (c) => SHORT[c] ?? `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`,
  );
  return out.isWellFormed() ? out : out.replace(
    /[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/g,
    (c) => `\\u${c.charCodeAt(0).toString(16)}`,
  );
}

function cutParts(s: string, max: number): [string, string] {
  if (s.length <= max) return [s, ""];
  const half = Math.max(1, Math.floor((max - 1) / 2));
  let a = half, b = s.length - half;
  if (/[\ud800-\udbff]/.test(s[a - 1] ?? "")) a--;
  if (/[\udc00-\udfff]/.test(s[b] ?? "")) b++;
  return [`${s.slice(0, a)}…${s.slice(b)}`, ` (${s.length} characters)`];
}

/**
 * `s` cut to about `max` characters: its start, `…`, its end, and how long it was. Cuts never
 * split a surrogate pair.
 */
export function cutText(s: string, max: number = MAX_NAME_CHARS): string {
  return cutParts(s, max).join("");
}

/**
 * A name from input (tensor, field, shard, key) for a message: cut to {@link MAX_NAME_CHARS}
 * (then followed by its length), escaped, in double quotes (a `"` or `\` inside is escaped too).
 */
export function quoteName(name: string, max: number = MAX_NAME_CHARS): string {
  const [shown, note] = cutParts(name, max);
  return `"${escapeText(shown.replace(/[\\"]/g, (c) => `\\${c}`))}"${note}`;
}

/**
 * A path for a message: as given when it is plain, else escaped and cut like a name (without
 * quotes, so a message reads `dir/model.safetensors: ...`).
 */
export function pathText(path: string): string {
  return escapeText(cutText(path, 2 * MAX_NAME_CHARS));
}

/** At most `max` quoted names, then "and N more". */
export function listNames(names: readonly string[], max: number = MAX_LISTED_NAMES): string {
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
 * The last guard before a terminal: one line, escaped, at most `max` characters (start and end
 * kept). The CLI and the server pass every error message through it.
 */
export function oneLine(message: string, max = 2000): string {
  const folded = message.replace(/\s*[\r\n]+\s*/g, " ").trim();
  return escapeText(cutText(folded, max));
}

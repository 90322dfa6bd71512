/**
 * The pieces every one-line error message is made of: the first items of a long list, counted
 * nouns, dotted names, and names from input made safe to print (ARCHITECTURE.md, "Errors").
 * @module
 */

/**
 * The first `n` items joined by `, `, then `, ...` when there are more: `a, b, c, ...`. Items
 * are used as they are; pass names from input through {@link quoteName} first.
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
 * A name from input (a tensor name, a file name, a config value) made safe for a one-line
 * message: in double quotes, with `"` and `\` escaped, every control character, terminal escape,
 * line separator, bidirectional override and lone surrogate written as an escape (`\n`,
 * `\u001b`), and a name longer than `max` code points cut in the middle to its first and last
 * code points around `...` so that both ends stay readable:
 * `"model.layers.0.mlp.experts.1...7.w2.weight"`. The result never contains a raw control
 * character and shows at most `max` code points of the name.
 */
export function quoteName(name: string, max: number = NAME_SHOWN_MAX): string {
  let shown = name;
  const points = [...name];
  if (points.length > max) {
    const keep = Math.max(2, max - 3);
    const head = Math.ceil(keep / 2);
    shown = `${points.slice(0, head).join("")}...${
      points.slice(points.length - (keep - head)).join("")
    }`;
  }
  const escaped = shown.replace(/["\\]/g, (c) => `\\${c}`).replace(
    UNSAFE,
    (c) => SHORT[c] ?? `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`,
  );
  return `"${escaped}"`;
}

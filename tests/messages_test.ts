/**
 * The message helpers: lists cut to their first items, counted nouns, dotted names, and names
 * from input escaped and cut so that a message stays one safe line.
 */

import assert from "node:assert/strict";
import fc from "fast-check";
import {
  cutText,
  describeValue,
  escapeText,
  firstOf,
  listNames,
  NAME_SHOWN_MAX,
  NAMES_LISTED_MAX,
  oneLine,
  pathText,
  plural,
  qualifiedName,
  quoteName,
} from "../src/messages.ts";

Deno.test("messages: firstOf lists the first n and marks the rest", () => {
  assert.equal(firstOf([], 3), "");
  assert.equal(firstOf(["a", "b"], 3), "a, b");
  assert.equal(firstOf(["a", "b", "c"], 3), "a, b, c");
  assert.equal(firstOf(["a", "b", "c", "d"], 3), "a, b, c, ...");
});

Deno.test("messages: plural and qualifiedName", () => {
  assert.equal(plural(0, "tensor"), "0 tensors");
  assert.equal(plural(1, "tensor"), "1 tensor");
  assert.equal(plural(2, "tensor does", "tensors do"), "2 tensors do");
  assert.equal(qualifiedName("", "weight"), "weight");
  assert.equal(qualifiedName("model.layers.0.mlp", "weight"), "model.layers.0.mlp.weight");
});

Deno.test("messages: quoteName escapes quotes, controls, terminal escapes and bidi overrides", () => {
  assert.equal(quoteName("model.embed_tokens.weight"), '"model.embed_tokens.weight"');
  assert.equal(quoteName('a"b\\c'), '"a\\"b\\\\c"');
  assert.equal(quoteName("a\nb\tc\rd"), '"a\\nb\\tc\\rd"');
  assert.equal(quoteName("\x1b[31mred\x1b[0m"), '"\\u001b[31mred\\u001b[0m"');
  assert.equal(quoteName("\u009b31m"), '"\\u009b31m"');
  assert.equal(quoteName("x\u202egnp.exe"), '"x\\u202egnp.exe"');
  assert.equal(quoteName("\u2028\u0000\u007f"), '"\\u2028\\u0000\\u007f"');
  assert.equal(quoteName("lone \ud800 surrogate"), '"lone \\ud800 surrogate"');
  // Characters outside the BMP and ordinary non-ASCII text stay as they are.
  assert.equal(quoteName("poids.\u00e9t\u00e9.\u{1f600}"), '"poids.\u00e9t\u00e9.\u{1f600}"');
});

Deno.test("messages: quoteName keeps both ends of a long name", () => {
  const name = `model.layers.0.${"x".repeat(500)}.mlp.down_proj.weight`;
  const q = quoteName(name, 60);
  assert.equal(q, `"model.layers.0.${"x".repeat(14)}...${"x".repeat(7)}.mlp.down_proj.weight"`);
  assert.equal([...q].length, 60 + 2);
  // Surrogate pairs are never split by the cut.
  const emoji = "\u{1f600}".repeat(300);
  const e = quoteName(emoji, 21);
  assert.equal(e, `"${"\u{1f600}".repeat(9)}...${"\u{1f600}".repeat(9)}"`);
});

// deno-lint-ignore no-control-regex -- control characters are what it looks for
const CONTROLS = new RegExp(
  "[\\u0000-\\u001f\\u007f-\\u009f\\u2028\\u2029\\u202a-\\u202e\\u2066-\\u2069]",
  "u",
);

Deno.test("messages: quoteName output is one line with no raw control character, bounded", () => {
  fc.assert(
    fc.property(
      fc.fullUnicodeString({ maxLength: 400 }),
      fc.integer({ min: 5, max: 200 }),
      (s, max) => {
        const q = quoteName(s, max);
        assert.ok(
          !CONTROLS.test(q),
          q,
        );
        assert.ok(!/[\ud800-\udfff]/u.test(q), "no lone surrogate");
        assert.ok(q.startsWith('"') && q.endsWith('"'));
        // At most `max` code points of the name, each written as at most six characters.
        assert.ok(q.length <= 2 + 6 * max, `${q.length}`);
        if ([...s].length <= max) {
          // Shown whole: undoing the escapes gives the name back.
          assert.equal(JSON.parse(q), s);
        }
      },
    ),
  );
  assert.equal(NAME_SHOWN_MAX, 120);
});

Deno.test("messages: escapeText, cutText and pathText on long and hostile input", () => {
  assert.equal(escapeText("a\rb\nc\td\x07"), "a\\rb\\nc\\td\\u0007");
  assert.equal(
    escapeText("model.layers.0.self_attn.q_proj.weight"),
    "model.layers.0.self_attn.q_proj.weight",
  );
  // A 90 MB name: cut without being read whole, both ends kept.
  const huge = `start.${"m".repeat(90_000_000)}.end`;
  const q = quoteName(huge);
  assert.ok(q.startsWith('"start.mmm') && q.endsWith('m.end"') && q.includes("..."), q);
  assert.equal([...q].length, NAME_SHOWN_MAX + 2);
  assert.equal(cutText("short"), "short");
  assert.ok(cutText("😀".repeat(200), 11).isWellFormed());
  assert.equal(pathText("dir/\x1b[2Jmodel.safetensors"), "dir/\\u001b[2Jmodel.safetensors");
});

Deno.test("messages: listNames shows a few quoted names then how many more; describeValue by kind", () => {
  assert.equal(listNames(["a", "b"]), '"a", "b"');
  assert.equal(listNames(["a", "b", "c", "d", "e", "f", "g"], 3), '"a", "b", "c" and 4 more');
  assert.ok(listNames(Array.from({ length: 1e5 }, (_, i) => `n${i}`)).length < 200);
  assert.equal(NAMES_LISTED_MAX, 5);
  assert.equal(describeValue("Llama"), '"Llama" (a string)');
  assert.equal(describeValue([1, 2, 3]), "a list of 3");
  assert.equal(describeValue({ a: 1 }), "an object");
  assert.equal(describeValue(1e21), "1e+21");
  assert.equal(describeValue(undefined), "missing");
});

Deno.test("messages: oneLine is one escaped line of bounded length", () => {
  assert.equal(oneLine("first\n  second\r\nthird"), "first second third");
  const l = oneLine(`${"a".repeat(5000)}\x1b${"b".repeat(5000)}`);
  assert.ok(l.length <= 2000 && l.startsWith("aaa") && l.endsWith("bbb"), l.slice(-40));
  assert.ok(!l.includes("\x1b"));
});

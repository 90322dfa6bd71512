import assert from "node:assert/strict";
import {
  cutText,
  describeValue,
  escapeText,
  listNames,
  MAX_NAME_CHARS,
  oneLine,
  quoteName,
} from "../src/messages.ts";

Deno.test("escapeText: controls, \\r, ANSI, DEL, C1, bidi and line separators become escapes", () => {
  assert.equal(escapeText("a\rb\nc\td"), "a\\rb\\nc\\td");
  assert.equal(escapeText("\x1b[31mred\x1b[0m"), "\\u001b[31mred\\u001b[0m");
  assert.equal(escapeText("\x00\x07\x7f\x9b"), "\\u0000\\u0007\\u007f\\u009b");
  assert.equal(escapeText("x\u202ey\u2028z\u2066"), "x\\u202ey\\u2028z\\u2066");
  assert.equal(escapeText("lone \ud800 pair 😀"), "lone \\ud800 pair 😀");
  assert.equal(
    escapeText("model.layers.0.self_attn.q_proj.weight"),
    "model.layers.0.self_attn.q_proj.weight",
  );
});

Deno.test("cutText and quoteName keep the start and the end of long names, whole pairs", () => {
  const long = `start.${"m".repeat(10_000)}.end`;
  const q = quoteName(long);
  assert.ok(q.startsWith('"start.mmm') && q.endsWith('m.end" (10010 characters)'), q);
  assert.ok(q.length < MAX_NAME_CHARS + 40, `${q.length}`);
  const emoji = "😀".repeat(200);
  const cut = cutText(emoji, 11);
  assert.ok(cut.isWellFormed(), cut);
  assert.equal(quoteName('a"b\\c'), '"a\\"b\\\\c"');
  assert.equal(quoteName("a\rb"), '"a\\rb"');
});

Deno.test("listNames: at most a few, then how many more; describeValue by kind", () => {
  assert.equal(listNames(["a", "b"]), '"a", "b"');
  assert.equal(listNames(["a", "b", "c", "d", "e", "f", "g"], 3), '"a", "b", "c" and 4 more');
  assert.equal(listNames(Array.from({ length: 1e5 }, (_, i) => `n${i}`)).length < 200, true);
  assert.equal(describeValue("Llama"), '"Llama" (a string)');
  assert.equal(describeValue([1, 2, 3]), "a list of 3");
  assert.equal(describeValue({ a: 1 }), "an object");
  assert.equal(describeValue(1e21), "1e+21");
  assert.equal(describeValue(undefined), "missing");
});

Deno.test("oneLine: one escaped line of bounded length", () => {
  assert.equal(oneLine("first\n  second\r\nthird"), "first second third");
  const l = oneLine(`${"a".repeat(5000)}\x1b${"b".repeat(5000)}`);
  assert.ok(l.length < 2100 && l.startsWith("aaa") && l.endsWith("characters)"), l.slice(-40));
  assert.ok(!l.includes("\x1b"));
});

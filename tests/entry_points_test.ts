/**
 * The public surface (ARCHITECTURE.md, "Layers and imports"): the entry points deno.json lists,
 * `.` with at most 40 names, and each exported name in exactly one entry point (one name for one
 * thing). Names come from `deno doc --json`, as JSR will see them.
 */

import assert from "node:assert/strict";

const ROOT = new URL("../", import.meta.url);
const ENTRIES = ["mod.ts", "engine.ts", "parallel.ts", "ffi.ts", "testing.ts"];

async function exportedNames(file: string): Promise<string[]> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["doc", "--json", file],
    cwd: ROOT,
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert.equal(out.code, 0, new TextDecoder().decode(out.stderr));
  const doc = JSON.parse(new TextDecoder().decode(out.stdout)) as {
    nodes: Record<string, { symbols: { name: string }[] }>;
  };
  return Object.values(doc.nodes).flatMap((n) => n.symbols.map((s) => s.name));
}

Deno.test("entry points: deno.json exports exactly the five entry points", async () => {
  const config = JSON.parse(await Deno.readTextFile(new URL("deno.json", ROOT)));
  assert.deepEqual(config.exports, {
    ".": "./mod.ts",
    "./engine": "./engine.ts",
    "./parallel": "./parallel.ts",
    "./ffi": "./ffi.ts",
    "./testing": "./testing.ts",
  });
  for (const e of ENTRIES) assert.ok(config.publish.include.includes(e), `${e} is published`);
});

Deno.test("entry points: . has at most 40 names; no name is exported twice", async () => {
  const names = new Map<string, string[]>();
  for (const e of ENTRIES) {
    const list = await exportedNames(e);
    assert.ok(list.length > 0, `${e} exports something`);
    if (e === "mod.ts") assert.ok(list.length <= 40, `. exports ${list.length} names`);
    for (const n of list) names.set(n, [...names.get(n) ?? [], e]);
  }
  const twice = [...names].filter(([, where]) => where.length > 1).map(([n, w]) => `${n}: ${w}`);
  assert.deepEqual(twice, []);
});

Deno.test("entry points: deno doc --lint is clean on the entry points together", async () => {
  // Together: a type one entry point names may be exported by another (Backend's StagedReader
  // is in ./engine), as JSR documents the package as a whole.
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["doc", "--lint", ...ENTRIES],
    cwd: ROOT,
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert.equal(out.code, 0, new TextDecoder().decode(out.stderr));
});

/**
 * The layout rules of ARCHITECTURE.md ("Layers and imports"), checked by parsing every import:
 * folders of src/ import only folders below them (so there is no cycle between folders), tests
 * never import scripts and scripts never import tests (both share through testing.ts).
 */

import assert from "node:assert/strict";

const ROOT = new URL("../", import.meta.url);

/**
 * Folders of src/ from the bottom up; a folder may import only folders of a lower rank. Files
 * directly under src/ count as a folder of their own name. Keep in step with ARCHITECTURE.md.
 */
const RANK: Readonly<Record<string, number>> = {
  errors: 0,
  messages: 0,
  tensor: 1,
  backend: 2,
  checkpoint: 3,
  nn: 4,
  quant: 5,
  reload: 6,
  models: 7,
  parallel: 8,
  testing: 9,
  cli: 10,
  server: 10,
};

/** Every .ts file under `dir` (relative to the repository root), recursively. */
function tsFiles(dir: string): string[] {
  const out: string[] = [];
  const walk = (rel: string) => {
    for (const e of Deno.readDirSync(new URL(rel, ROOT))) {
      const p = `${rel}/${e.name}`;
      if (e.isDirectory) walk(p);
      else if (e.name.endsWith(".ts")) out.push(p);
    }
  };
  walk(dir);
  return out.sort();
}

/** Relative specifiers of the static and dynamic imports and re-exports of a source text. */
function relativeImports(source: string): string[] {
  const out: string[] = [];
  const re = /(?:\bfrom\s*|\bimport\s*\(\s*|\bimport\s+)"(\.{1,2}\/[^"]+)"/g;
  for (const m of source.matchAll(re)) out.push(m[1]);
  return out;
}

/** `a/b/../c.ts` -> `a/c.ts`. */
function normalize(path: string): string {
  const parts: string[] = [];
  for (const p of path.split("/")) {
    if (p === "..") parts.pop();
    else if (p !== ".") parts.push(p);
  }
  return parts.join("/");
}

/** The files a file imports, relative to the repository root. */
function importsOf(file: string): string[] {
  const dir = file.slice(0, file.lastIndexOf("/"));
  return relativeImports(Deno.readTextFileSync(new URL(file, ROOT))).map((s) =>
    normalize(`${dir}/${s}`)
  );
}

/** The folder of a file under src/ (`src/backend/cuda/x.ts` -> `backend`, `src/errors.ts` -> `errors`). */
function folderOf(file: string): string {
  return file.split("/")[1].replace(/\.ts$/, "");
}

/** Folder-level import edges of src/: from -> to -> an example `file -> file`. */
function folderEdges(): Map<string, Map<string, string>> {
  const edges = new Map<string, Map<string, string>>();
  for (const file of tsFiles("src")) {
    for (const target of importsOf(file)) {
      if (!target.startsWith("src/")) continue;
      const a = folderOf(file), b = folderOf(target);
      if (a === b) continue;
      if (!edges.has(a)) edges.set(a, new Map());
      if (!edges.get(a)!.has(b)) edges.get(a)!.set(b, `${file} -> ${target}`);
    }
  }
  return edges;
}

/** A cycle of folders, or null (depth-first search over the folder graph). */
function findCycle(edges: Map<string, Map<string, string>>): string[] | null {
  const state = new Map<string, "open" | "done">();
  const stack: string[] = [];
  const visit = (n: string): string[] | null => {
    state.set(n, "open");
    stack.push(n);
    for (const m of edges.get(n)?.keys() ?? []) {
      if (state.get(m) === "open") return [...stack.slice(stack.indexOf(m)), m];
      if (!state.has(m)) {
        const c = visit(m);
        if (c) return c;
      }
    }
    stack.pop();
    state.set(n, "done");
    return null;
  };
  for (const n of edges.keys()) {
    if (!state.has(n)) {
      const c = visit(n);
      if (c) return c;
    }
  }
  return null;
}

Deno.test("layout: the import parser sees static, type, dynamic imports and re-exports", () => {
  const src = [
    `import { a } from "./a.ts";`,
    `import type { B } from "../b/b.ts";`,
    `export { c } from "./c.ts";`,
    `const d = await import("./d.ts");`,
    `import "./e.ts";`,
    `import fc from "fast-check";`,
    `import { x } from "node:util";`,
  ].join("\n");
  assert.deepEqual(relativeImports(src), ["./a.ts", "../b/b.ts", "./c.ts", "./d.ts", "./e.ts"]);
});

Deno.test("layout: the cycle finder finds a cycle and accepts a DAG", () => {
  const g = (pairs: [string, string][]) => {
    const m = new Map<string, Map<string, string>>();
    for (const [a, b] of pairs) m.set(a, (m.get(a) ?? new Map()).set(b, ""));
    return m;
  };
  assert.deepEqual(findCycle(g([["a", "b"], ["b", "c"], ["c", "a"]])), ["a", "b", "c", "a"]);
  assert.equal(findCycle(g([["a", "b"], ["b", "c"], ["a", "c"]])), null);
});

Deno.test("layout: no import cycle between folders of src/", () => {
  const cycle = findCycle(folderEdges());
  assert.equal(cycle, null, `folders import each other: ${cycle?.join(" -> ")}`);
});

Deno.test("layout: folders of src/ import only folders below them (ARCHITECTURE.md)", () => {
  const bad: string[] = [];
  for (const [a, targets] of folderEdges()) {
    for (const [b, example] of targets) {
      if (!(a in RANK) || !(b in RANK)) {
        bad.push(`${a} or ${b} has no rank: add it to ARCHITECTURE.md and RANK (${example})`);
      } else if (RANK[b] >= RANK[a]) bad.push(`${a} imports ${b}: ${example}`);
    }
  }
  assert.deepEqual(bad, []);
});

Deno.test("layout: tests never import scripts, scripts never import tests", () => {
  const bad: string[] = [];
  for (const [from, to] of [["tests", "scripts"], ["scripts", "tests"]]) {
    for (const file of tsFiles(from)) {
      for (const target of importsOf(file)) {
        if (target.startsWith(`${to}/`)) bad.push(`${file} -> ${target}`);
      }
    }
  }
  assert.deepEqual(bad, []);
});

Deno.test("layout: code cites ARCHITECTURE.md, never a tracker number", () => {
  const files = [
    ...["src", "tests", "scripts", "cuda", "wasm"].flatMap(allFiles),
    "README.md",
    "ARCHITECTURE.md",
    ...[...Deno.readDirSync(ROOT)].filter((e) => e.isFile && e.name.endsWith(".ts")).map((e) =>
      e.name
    ),
  ].filter((f) => /\.(ts|md|sh|cu|h|c|py)$/.test(f) && !f.endsWith("kernels_wasm.ts"));
  const bad: string[] = [];
  for (const f of files) {
    const text = Deno.readTextFileSync(new URL(f, ROOT));
    text.split("\n").forEach((line, i) => {
      if (/\bissues? #?\d+|\bDESIGN\.md\b/i.test(line)) bad.push(`${f}:${i + 1}: ${line.trim()}`);
    });
  }
  assert.deepEqual(bad, []);
});

/** Every file under `dir`, recursively, relative to the repository root. */
function allFiles(dir: string): string[] {
  const out: string[] = [];
  for (const e of Deno.readDirSync(new URL(dir, ROOT))) {
    const p = `${dir}/${e.name}`;
    if (e.isDirectory) out.push(...allFiles(p));
    else out.push(p);
  }
  return out;
}

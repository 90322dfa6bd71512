import assert from "node:assert/strict";
import { CheckpointError } from "../src/errors.ts";
import { DTYPES } from "../src/tensor/dtype.ts";
import {
  encodeSafetensors,
  type HostTensor,
  loadSafetensors,
  MAX_HEADER_LENGTH,
  parseSafetensorsHeader,
  readSafetensorsHeader,
  readTensorInto,
  writeSafetensors,
} from "../src/checkpoint/safetensors.ts";

const FIXTURES = new URL("../../shared/fixtures/", import.meta.url);
const CKPT = new URL("ckpt/", FIXTURES);
const EXPECT = new URL("expect/", FIXTURES);

function path(u: URL): string {
  return decodeURIComponent(u.pathname);
}

async function safetensorsFiles(dir: URL): Promise<string[]> {
  const out: string[] = [];
  for await (const e of Deno.readDir(dir)) {
    const p = new URL(e.name + (e.isDirectory ? "/" : ""), dir);
    if (e.isDirectory) out.push(...await safetensorsFiles(p));
    else if (e.name.endsWith(".safetensors")) out.push(path(p));
  }
  return out.sort();
}

// Reads a header with Python's simple recipe (u64 + JSON.parse) as an independent reference.
function naiveHeader(bytes: Uint8Array): { n: number; json: Record<string, unknown> } {
  const n = Number(new DataView(bytes.buffer, bytes.byteOffset).getBigUint64(0, true));
  return { n, json: JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + n))) };
}

Deno.test("every fixture safetensors file loads, with the tensors and bytes its header names", async () => {
  const files = [...await safetensorsFiles(CKPT), ...await safetensorsFiles(EXPECT)];
  assert.ok(files.length >= 3 + 14 + 4, `found only ${files.length} fixture files`);
  for (const file of files) {
    const bytes = await Deno.readFile(file);
    const { n, json } = naiveHeader(bytes);
    const loaded = await loadSafetensors(file);
    const names = Object.keys(json).filter((k) => k !== "__metadata__").sort();
    assert.deepEqual([...loaded.keys()].sort(), names, file);
    for (const name of names) {
      const info = json[name] as { dtype: string; shape: number[]; data_offsets: [number, number] };
      const t = loaded.get(name)!;
      assert.equal(t.dtype.safetensors, info.dtype);
      assert.deepEqual(t.shape, info.shape);
      const [b, e] = info.data_offsets;
      assert.deepEqual(t.data, bytes.subarray(8 + n + b, 8 + n + e), `${file}: ${name}`);
    }
    const header = await readSafetensorsHeader(file);
    assert.equal(header.headerLength, n);
    assert.equal(header.dataStart, 8 + n);
    assert.deepEqual(header.metadata, json.__metadata__ ?? {});
  }
});

Deno.test("encoding what we loaded reproduces every fixture byte for byte", async () => {
  const files = [...await safetensorsFiles(CKPT), ...await safetensorsFiles(EXPECT)];
  for (const file of files) {
    const bytes = await Deno.readFile(file);
    const header = await readSafetensorsHeader(file);
    const meta = Object.keys(header.metadata).length > 0 ? header.metadata : undefined;
    const encoded = encodeSafetensors(await loadSafetensors(file), meta);
    assert.deepEqual(encoded, bytes, file);
  }
});

function randomTensor(dtypeName: keyof typeof DTYPES, shape: number[], seed: number): HostTensor {
  const dtype = DTYPES[dtypeName];
  const n = shape.reduce((a, b) => a * b, 1) * dtype.size;
  const data = new Uint8Array(n);
  let x = seed;
  for (let i = 0; i < n; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    data[i] = x >>> 24;
  }
  return { dtype, shape, data };
}

Deno.test("round trip: encode -> parse -> same names, dtypes, shapes and bytes, via a file too", async () => {
  const tensors = new Map<string, HostTensor>([
    ["b", randomTensor("bf16", [3, 5], 1)],
    ["a.weight", randomTensor("f8_e4m3fn", [7, 3], 2)],
    ["scale", randomTensor("f32", [1], 3)],
    ["empty", randomTensor("f16", [0, 4], 4)],
    ["scalar", randomTensor("i64", [], 5)],
    ["flags", randomTensor("bool", [9], 6)],
    ['we"ird\\name\u00e9\u{1F600}\n', randomTensor("i8", [2], 7)],
    ["e5", randomTensor("f8_e5m2", [4], 8)],
    ["u", randomTensor("u8", [3], 9)],
    ["i", randomTensor("i32", [2, 2], 10)],
  ]);
  const bytes = encodeSafetensors(tensors, { format: "pt", note: 'x"y' });
  const h = parseSafetensorsHeader(bytes, bytes.byteLength, "rt.safetensors");
  assert.equal(h.headerLength % 8, 0, "header padded to 8 bytes");
  assert.deepEqual(h.metadata, { format: "pt", note: 'x"y' });
  assert.deepEqual([...h.tensors.keys()].sort(), [...tensors.keys()].sort());
  for (const [name, t] of tensors) {
    const e = h.tensors.get(name)!;
    assert.equal(e.dtype, t.dtype);
    assert.deepEqual(e.shape, t.shape);
    assert.equal(e.begin % t.dtype.size, 0, "each tensor aligned to its element size");
    assert.deepEqual(bytes.subarray(e.begin, e.end), t.data, name);
  }
  const dir = await Deno.makeTempDir();
  try {
    const file = `${dir}/rt.safetensors`;
    await writeSafetensors(file, tensors, { format: "pt", note: 'x"y' });
    assert.deepEqual(await Deno.readFile(file), bytes);
    const loaded = await loadSafetensors(file);
    for (const [name, t] of tensors) assert.deepEqual(loaded.get(name)!.data, t.data, name);
    // readTensorInto reads exactly one entry's bytes.
    const f = await Deno.open(file);
    try {
      const e = (await readSafetensorsHeader(file)).tensors.get("b")!;
      const dst = new Uint8Array(e.end - e.begin);
      await readTensorInto(f, e, dst);
      assert.deepEqual(dst, tensors.get("b")!.data);
    } finally {
      f.close();
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("encode rejects tensors it could not write faithfully", () => {
  const ok = randomTensor("bf16", [2, 2], 1);
  const bad = (code: string, f: () => unknown) =>
    assert.throws(f, (e) => e instanceof CheckpointError && e.code === code);
  bad("SIZE_MISMATCH", () => encodeSafetensors([["t", { ...ok, shape: [2, 3] }]]));
  bad("BAD_SHAPE", () => encodeSafetensors([["t", { ...ok, shape: [-2, -2] }]]));
  bad("DUPLICATE", () => encodeSafetensors([["t", ok], ["t", ok]]));
  bad("BAD_NAME", () => encodeSafetensors([["__metadata__", ok]]));
  bad("BAD_NAME", () => encodeSafetensors([["\ud800", ok]]));
});

// ---------------------------------------------------------------------------------------------
// Malformed files

const FILE = "bad.safetensors";

function craft(header: string | object, dataBytes = 0, lengthField?: bigint): Uint8Array {
  const json = new TextEncoder().encode(
    typeof header === "string" ? header : JSON.stringify(header),
  );
  const out = new Uint8Array(8 + json.byteLength + dataBytes);
  new DataView(out.buffer).setBigUint64(0, lengthField ?? BigInt(json.byteLength), true);
  out.set(json, 8);
  return out;
}

function rejects(bytes: Uint8Array, code: string, ...mentions: string[]): CheckpointError {
  let caught: unknown;
  try {
    parseSafetensorsHeader(bytes, bytes.byteLength, FILE);
  } catch (e) {
    caught = e;
  }
  assert.ok(caught instanceof CheckpointError, `expected CheckpointError ${code}, got ${caught}`);
  assert.equal(caught.code, code, caught.message);
  assert.ok(caught.message.startsWith(`${FILE}: `), caught.message);
  assert.ok(!caught.message.includes("\n"), "one-line message");
  for (const m of mentions) assert.ok(caught.message.includes(m), `"${caught.message}" lacks ${m}`);
  return caught;
}

const T = (dtype: string, shape: unknown, offsets: unknown) => ({
  dtype,
  shape,
  data_offsets: offsets,
});

Deno.test("truncated files and header lengths past the end are TRUNCATED", async () => {
  rejects(new Uint8Array(5), "TRUNCATED", "5 bytes");
  rejects(craft({}, 0, 1000n), "TRUNCATED", "1000");
  // A real file cut short in its data area: the header tiles more bytes than remain.
  const real = await Deno.readFile(path(new URL("llama-tiny/model.safetensors", CKPT)));
  const cut = real.subarray(0, real.byteLength - 100);
  const last = Object.entries(naiveHeader(real).json)
    .filter(([k]) => k !== "__metadata__")
    .sort((a, b) =>
      (a[1] as { data_offsets: number[] }).data_offsets[0] -
      (b[1] as { data_offsets: number[] }).data_offsets[0]
    )
    .at(-1)![0];
  rejects(cut, "TRUNCATED", `"${last}"`, "100 bytes short");
  // The prefix handed to the pure parser must hold the whole header.
  assert.throws(
    () => parseSafetensorsHeader(real.subarray(0, 100), real.byteLength, FILE),
    (e) => e instanceof CheckpointError && e.code === "TRUNCATED",
  );
});

Deno.test("header length bound and u64 high bits: HEADER_TOO_LARGE", () => {
  rejects(
    craft({}, 0, BigInt(MAX_HEADER_LENGTH + 1)),
    "HEADER_TOO_LARGE",
    String(MAX_HEADER_LENGTH),
  );
  rejects(craft({}, 0, 1n << 40n), "HEADER_TOO_LARGE");
});

Deno.test("header not UTF-8 or not JSON: HEADER_NOT_JSON; JSON but not an object: HEADER_NOT_OBJECT", () => {
  const badUtf8 = craft('{"a":1}');
  badUtf8[9] = 0xff;
  rejects(badUtf8, "HEADER_NOT_JSON", "UTF-8");
  rejects(craft('{"x": {"dtype": "F32",'), "HEADER_NOT_JSON");
  rejects(craft("{'x': 1}"), "HEADER_NOT_JSON");
  rejects(craft('{"x": 1} {}'), "HEADER_NOT_JSON");
  rejects(craft(""), "HEADER_NOT_JSON");
  rejects(craft('{"x":"\\ud800"}'), "HEADER_NOT_JSON", "surrogate");
  rejects(craft("[".repeat(1000) + "]".repeat(1000)), "HEADER_NOT_JSON", "nesting");
  rejects(craft("[]"), "HEADER_NOT_OBJECT", "an array");
  rejects(craft("42"), "HEADER_NOT_OBJECT", "42");
  rejects(craft('"s"'), "HEADER_NOT_OBJECT");
  // Leading and trailing whitespace is fine, as in the reference reader.
  const spaced = craft('  {"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}   ', 2);
  assert.equal(parseSafetensorsHeader(spaced, spaced.byteLength, FILE).tensors.size, 1);
});

Deno.test("entries: BAD_ENTRY, BAD_DTYPE, UNSUPPORTED_DTYPE, BAD_SHAPE, BAD_OFFSETS name the tensor", () => {
  rejects(craft({ "w.x": 5 }), "BAD_ENTRY", '"w.x"');
  rejects(craft({ "w.x": T("F99", [1], [0, 1]) }, 1), "BAD_DTYPE", '"w.x"', "F99");
  rejects(
    craft({ "w.x": { shape: [1], data_offsets: [0, 1] } }, 1),
    "BAD_DTYPE",
    '"w.x"',
    "missing",
  );
  rejects(craft({ "w.x": T("F64", [1], [0, 8]) }, 8), "UNSUPPORTED_DTYPE", '"w.x"', "F64");
  rejects(craft({ "w.x": T("I16", [1], [0, 2]) }, 2), "UNSUPPORTED_DTYPE", '"w.x"', "I16");
  rejects(craft({ "w.x": T("U8", [-1], [0, 1]) }, 1), "BAD_SHAPE", '"w.x"', "-1");
  rejects(craft({ "w.x": T("U8", "1", [0, 1]) }, 1), "BAD_SHAPE", '"w.x"');
  rejects(
    craft('{"w.x": {"dtype":"U8","shape":[1.0],"data_offsets":[0,1]}}', 1),
    "BAD_SHAPE",
    "1.0",
  );
  rejects(
    craft('{"w.x": {"dtype":"U8","shape":[1e0],"data_offsets":[0,1]}}', 1),
    "BAD_SHAPE",
    "1e0",
  );
  rejects(
    craft('{"w.x": {"dtype":"U8","shape":[9007199254740993],"data_offsets":[0,1]}}', 1),
    "BAD_SHAPE",
  );
  rejects(craft({ "w.x": T("F32", [2 ** 40, 2 ** 40], [0, 4]) }, 4), "BAD_SHAPE", "too large");
  rejects(craft({ "w.x": T("U8", [1], [0]) }, 1), "BAD_OFFSETS", '"w.x"');
  rejects(craft({ "w.x": T("U8", [1], [0, 1, 2]) }, 1), "BAD_OFFSETS", '"w.x"');
  rejects(craft({ "w.x": T("U8", [1], [-1, 0]) }, 1), "BAD_OFFSETS", '"w.x"');
  rejects(craft({ "w.x": T("U8", [0], [1, 0]) }, 1), "BAD_OFFSETS", '"w.x"', "[1, 0]");
});

Deno.test("size mismatch names file, tensor, offsets, dtype, shape and the bytes needed", () => {
  const e = rejects(
    craft({ "model.layers.0.mlp.up_proj.weight": T("BF16", [176, 64], [10, 20]) }, 20),
    "SIZE_MISMATCH",
  );
  assert.equal(
    e.message,
    `${FILE}: tensor "model.layers.0.mlp.up_proj.weight" data_offsets [10, 20] hold 10 bytes, BF16 [176, 64] needs 22528`,
  );
});

Deno.test("layout: OVERLAP, GAP (inside, at the start, trailing), out-of-range BAD_OFFSETS", () => {
  rejects(
    craft({ a: T("U8", [4], [0, 4]), b: T("U8", [4], [2, 6]) }, 6),
    "OVERLAP",
    '"a"',
    '"b"',
  );
  rejects(
    craft({ a: T("U8", [4], [0, 4]), b: T("U8", [4], [0, 4]) }, 4),
    "OVERLAP",
  );
  rejects(craft({ a: T("U8", [4], [0, 4]), b: T("U8", [4], [5, 9]) }, 9), "GAP", '"b"', "5");
  rejects(craft({ a: T("U8", [4], [1, 5]) }, 5), "GAP", '"a"');
  rejects(craft({ a: T("U8", [4], [0, 4]) }, 7), "GAP", "3 bytes");
  rejects(craft({}, 1), "GAP", "1 bytes");
  rejects(
    craft({ a: T("U8", [4], [0, 4]), b: T("U8", [4], [1000, 1004]) }, 4),
    "BAD_OFFSETS",
    '"b"',
    "[1000, 1004]",
  );
  // Zero-sized tensors may sit anywhere in the tiling, including at the very end.
  const ok = craft(
    { a: T("U8", [4], [0, 4]), z: T("F32", [0], [4, 4]), y: T("U8", [0], [0, 0]) },
    4,
  );
  assert.equal(parseSafetensorsHeader(ok, ok.byteLength, FILE).tensors.size, 3);
});

Deno.test("duplicate names, also when spelled with escapes, and duplicate keys in an entry", () => {
  const a = '{"dtype":"U8","shape":[1],"data_offsets":[0,1]}';
  const b = '{"dtype":"U8","shape":[1],"data_offsets":[1,2]}';
  rejects(craft(`{"w":${a},"w":${b}}`, 2), "DUPLICATE", '"w"');
  rejects(craft(`{"w":${a},"\\u0077":${b}}`, 2), "DUPLICATE", '"w"');
  rejects(craft(`{"a\\/b":${a},"a/b":${b}}`, 2), "DUPLICATE", '"a/b"');
  rejects(craft(`{"\\u00e9":${a},"\u00e9":${b}}`, 2), "DUPLICATE", '"\u00e9"');
  rejects(
    craft('{"w":{"dtype":"U8","dtype":"U8","shape":[1],"data_offsets":[0,1]}}', 1),
    "DUPLICATE",
    '"dtype"',
    '"w"',
  );
  rejects(craft(`{"__metadata__":{},"__metadata__":{}}`), "DUPLICATE");
  // Distinct names that only look alike are fine.
  const ok = craft(`{"w":${a},"W":${b}}`, 2);
  assert.equal(parseSafetensorsHeader(ok, ok.byteLength, FILE).tensors.size, 2);
});

Deno.test("__metadata__ must be a string-to-string map (null allowed)", () => {
  rejects(craft({ __metadata__: { k: 1 } }), "BAD_METADATA", '"k"');
  rejects(craft({ __metadata__: ["a"] }), "BAD_METADATA");
  rejects(craft({ __metadata__: "pt" }), "BAD_METADATA");
  rejects(craft({ __metadata__: { k: { x: "y" } } }), "BAD_METADATA");
  const nul = craft({ __metadata__: null });
  assert.deepEqual(parseSafetensorsHeader(nul, nul.byteLength, FILE).metadata, {});
  const proto = craft('{"__metadata__":{"__proto__":"x"}}');
  const h = parseSafetensorsHeader(proto, proto.byteLength, FILE);
  assert.equal(Object.getPrototypeOf(h.metadata), Object.prototype);
  assert.equal(h.metadata["__proto__"], "x");
});

Deno.test("readTensorInto: TRUNCATED naming file and tensor when the file shrank after validation", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const file = `${dir}/shrink.safetensors`;
    await writeSafetensors(file, [["w", randomTensor("f32", [16], 3)]]);
    const h = await readSafetensorsHeader(file);
    await Deno.truncate(file, h.dataStart + 10);
    const f = await Deno.open(file);
    try {
      const e = h.tensors.get("w")!;
      await assert.rejects(
        () => readTensorInto(f, e, new Uint8Array(64)),
        (err) =>
          err instanceof CheckpointError && err.code === "TRUNCATED" &&
          err.message.includes(file) && err.message.includes('"w"'),
      );
      await assert.rejects(
        () => readTensorInto(f, e, new Uint8Array(63)),
        (err) => err instanceof CheckpointError && err.code === "BAD_DESTINATION",
      );
    } finally {
      f.close();
    }
    await assert.rejects(
      () => loadSafetensors(file),
      (err) =>
        err instanceof CheckpointError && err.code === "TRUNCATED" && err.message.includes(file),
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

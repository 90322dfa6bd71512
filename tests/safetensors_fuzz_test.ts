// Property-based tests of the safetensors header parser: random and mutated headers, lengths
// and file sizes. The parser must throw nothing but CheckpointError, accept exactly what an
// independent (naive) checker accepts, return only entries inside the file, and finish fast.
// LAYERWISE_FUZZ_RUNS=<n> sets the runs per property (default 2500) for longer campaigns.
import assert from "node:assert/strict";
// fast-check (npm) generates and shrinks the cases: a well-kept property-testing library.
import fc from "fast-check";
import { CheckpointError } from "../src/errors.ts";
import { quoteName } from "../src/messages.ts";
import { DTYPES } from "../src/tensor/dtype.ts";
import {
  encodeSafetensors,
  type HostTensor,
  MAX_HEADER_LENGTH,
  parseSafetensorsHeader,
  type SafetensorsHeader,
  type TensorEntry,
} from "../src/checkpoint/safetensors.ts";

const RUNS = Number(Deno.env.get("LAYERWISE_FUZZ_RUNS") ?? "2500");
const SEED = Deno.env.get("LAYERWISE_FUZZ_SEED");
const PARAMS: fc.Parameters<unknown> = {
  numRuns: RUNS,
  ...(SEED !== undefined ? { seed: Number(SEED) } : {}),
};
const FILE = "fuzz.safetensors";

const SIZES: Record<string, number> = Object.fromEntries(
  Object.values(DTYPES).map((d) => [d.safetensors, d.size]),
);
const DTYPE_NAMES = [...Object.keys(SIZES), "F64", "I16", "U16", "X", "", "bf16"];

function u64(n: bigint): Uint8Array {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, BigInt.asUintN(64, n), true);
  return b;
}

function concat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((a, p) => a + p.byteLength, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.byteLength;
  }
  return out;
}

/** Runs the parser on a private copy of `prefix`; checks the invariants of any result. */
function parse(prefix: Uint8Array, fileSize: number): SafetensorsHeader | CheckpointError {
  let result: SafetensorsHeader | CheckpointError;
  try {
    result = parseSafetensorsHeader(prefix.slice(), fileSize, FILE);
  } catch (e) {
    if (!(e instanceof CheckpointError)) throw e;
    assert.ok(e.message.startsWith(`${FILE}: `) && !e.message.includes("\n"), e.message);
    result = e;
  }
  if (result instanceof CheckpointError) return result;
  const h = result;
  assert.ok(h.dataStart === 8 + h.headerLength && h.dataStart <= fileSize);
  assert.ok(h.dataStart <= prefix.byteLength, "header must lie inside the given prefix");
  const entries = [...h.tensors.values()].sort((a, b) => a.begin - b.begin || a.end - b.end);
  let at = h.dataStart;
  for (const e of entries) {
    assert.ok(e.begin === at && e.end >= e.begin && e.end <= fileSize, `${e.name} out of place`);
    assert.equal(e.end - e.begin, e.shape.reduce((a, d) => a * d, e.dtype.size));
    at = e.end;
  }
  assert.equal(at, fileSize, "entries cover the data area");
  return h;
}

/**
 * An independent checker built on JSON.parse, for headers written by JSON.stringify (so no
 * duplicate keys and no number spellings JSON.parse would blur). Returns true iff valid.
 */
function naiveAccepts(json: string, dataLength: number): boolean {
  const h = JSON.parse(json);
  // Lone surrogates are rejected (as serde_json does), wherever they occur.
  if (!wellFormed(h)) return false;
  if (typeof h !== "object" || h === null || Array.isArray(h)) return false;
  const spans: [number, number][] = [];
  for (const [k, v] of Object.entries(h)) {
    if (k === "__metadata__") {
      if (v === null) continue;
      if (typeof v !== "object" || Array.isArray(v)) return false;
      if (!Object.values(v as object).every((x) => typeof x === "string")) return false;
      continue;
    }
    if (typeof v !== "object" || v === null || Array.isArray(v)) return false;
    const { dtype, shape, data_offsets: off } = v as Record<string, unknown>;
    if (typeof dtype !== "string" || !Object.hasOwn(SIZES, dtype)) return false;
    const isIdx = (x: unknown) => Number.isSafeInteger(x) && (x as number) >= 0;
    if (!Array.isArray(shape) || !shape.every(isIdx)) return false;
    if (!Array.isArray(off) || off.length !== 2 || !off.every(isIdx)) return false;
    if (off[0] > off[1]) return false;
    let bytes = BigInt(SIZES[dtype]);
    for (const d of shape) bytes *= BigInt(d);
    // Overflow on the way counts as invalid; with a 0 dim after it the reference also fails.
    let running = SIZES[dtype];
    for (const d of shape) {
      running *= d;
      if (!Number.isSafeInteger(running)) return false;
    }
    if (BigInt(off[1] - off[0]) !== bytes) return false;
    spans.push([off[0], off[1]]);
  }
  spans.sort((a, b) => a[0] - b[0] || a[1] - b[1]);
  let at = 0;
  for (const [b, e] of spans) {
    if (b !== at) return false;
    at = e;
  }
  return at === dataLength;
}

function wellFormed(v: unknown): boolean {
  if (typeof v === "string") return v.isWellFormed();
  if (Array.isArray(v)) return v.every(wellFormed);
  if (typeof v === "object" && v !== null) {
    return Object.entries(v).every(([k, x]) => k.isWellFormed() && wellFormed(x));
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// Generators

const dtypeArb = fc.constantFrom(...Object.keys(SIZES));
const shapeArb = fc.array(fc.integer({ min: 0, max: 6 }), { maxLength: 3 });
const nameArb = fc.oneof(
  fc.constantFrom("w", "model.layers.0.mlp.up_proj.weight", "a/b", "__metadata__x", "é"),
  fc.string({ maxLength: 6 }),
  fc.string({ unit: "binary", maxLength: 6 }),
);

interface Spec {
  name: string;
  dtype: string;
  shape: number[];
}

const specsArb = fc.uniqueArray(
  fc.record({ name: nameArb, dtype: dtypeArb, shape: shapeArb }),
  { selector: (s: Spec) => s.name, maxLength: 6 },
).map((specs) => specs.filter((s) => s.name !== "__metadata__" && s.name.isWellFormed()));

/** A valid header object for the specs, laid out in a random order. */
function layout(specs: Spec[], order: number[]): [Record<string, unknown>, number] {
  const header: Record<string, unknown> = {};
  let at = 0;
  const idx = specs.map((_, i) => i).sort((a, b) => (order[a] ?? 0) - (order[b] ?? 0));
  for (const i of idx) {
    const s = specs[i];
    const n = s.shape.reduce((a, d) => a * d, SIZES[s.dtype]);
    header[s.name] = { dtype: s.dtype, shape: s.shape, data_offsets: [at, at + n] };
    at += n;
  }
  return [header, at];
}

const intLike = fc.oneof(
  fc.integer({ min: -3, max: 300 }),
  fc.constantFrom(2 ** 53, 2 ** 53 + 2, 1e21, 0.5, -0, 2 ** 31, 2 ** 32),
);

const anyJson = fc.jsonValue({ maxDepth: 2 });

/** Structural mutations of a header object: each keeps JSON.stringify's output unambiguous. */
const mutationArb = fc.oneof(
  fc.record({ kind: fc.constant("offset"), which: fc.nat(), side: fc.nat(1), value: intLike }),
  fc.record({
    kind: fc.constant("shape"),
    which: fc.nat(),
    value: fc.array(intLike, { maxLength: 3 }),
  }),
  fc.record({
    kind: fc.constant("dtype"),
    which: fc.nat(),
    value: fc.constantFrom(...DTYPE_NAMES),
  }),
  fc.record({
    kind: fc.constant("drop"),
    which: fc.nat(),
    field: fc.constantFrom("dtype", "shape", "data_offsets"),
  }),
  fc.record({ kind: fc.constant("copy"), which: fc.nat(), from: fc.nat() }),
  fc.record({ kind: fc.constant("replace"), which: fc.nat(), value: anyJson }),
  fc.record({
    kind: fc.constant("metadata"),
    value: fc.oneof(anyJson, fc.dictionary(fc.string(), fc.string())),
  }),
  fc.record({ kind: fc.constant("extra"), name: fc.string({ maxLength: 4 }), value: anyJson }),
);

type Mutation = {
  kind: string;
  which?: number;
  side?: number;
  value?: unknown;
  field?: string;
  name?: string;
  from?: number;
};

function mutate(header: Record<string, unknown>, m: Mutation): unknown {
  const names = Object.keys(header);
  const pick = names.length > 0 ? names[(m.which ?? 0) % names.length] : undefined;
  // Earlier mutations may have left a non-object entry or non-array offsets: start afresh then.
  const current = pick === undefined ? undefined : header[pick];
  const entry = pick === undefined ? undefined : {
    ...(typeof current === "object" && current !== null && !Array.isArray(current) ? current : {}),
  } as Record<string, unknown>;
  switch (m.kind) {
    case "offset":
      if (entry) {
        const off = Array.isArray(entry.data_offsets) ? [...entry.data_offsets] : [];
        off[m.side!] = m.value as number;
        entry.data_offsets = off;
      }
      break;
    case "shape":
      if (entry) entry.shape = m.value;
      break;
    case "dtype":
      if (entry) entry.dtype = m.value;
      break;
    case "drop":
      if (entry) delete entry[m.field!];
      break;
    case "copy": {
      // Take another entry's dtype, shape and place: sizes agree, so the layout overlaps.
      const src = header[names[(m.from ?? 0) % Math.max(1, names.length)]];
      if (entry && typeof src === "object" && src !== null) Object.assign(entry, src);
      break;
    }
    case "replace":
      if (pick !== undefined) return { ...header, [pick]: m.value };
      break;
    case "metadata":
      return { __metadata__: m.value, ...header };
    case "extra":
      return { ...header, [m.name!]: m.value };
  }
  return pick === undefined ? header : { ...header, [pick]: entry };
}

// ---------------------------------------------------------------------------------------------
// Properties

Deno.test("fuzz: random bytes and file sizes never escape as anything but CheckpointError", () => {
  fc.assert(
    fc.property(
      fc.uint8Array({ maxLength: 96 }),
      fc.oneof(fc.bigInt({ min: 0n, max: 200n }), fc.bigInt({ min: 0n, max: (1n << 64n) - 1n })),
      fc.boolean(),
      fc.integer({ min: -8, max: 64 }),
      (body, n, useN, slack) => {
        const bytes = useN ? concat(u64(n), body) : body;
        parse(bytes, Math.max(0, bytes.byteLength + slack));
        parse(bytes.subarray(0, Math.min(bytes.byteLength, 8 + (slack & 15))), bytes.byteLength);
      },
    ),
    PARAMS,
  );
});

Deno.test("fuzz: valid headers (any layout order, metadata, odd names) parse to exactly their entries", () => {
  fc.assert(
    fc.property(
      specsArb,
      fc.array(fc.nat(), { maxLength: 6 }),
      fc.option(fc.dictionary(fc.string({ maxLength: 4 }), fc.string({ maxLength: 4 }))),
      fc.nat(8),
      (specs, order, meta, pad) => {
        const [header, dataLength] = layout(specs, order);
        const json = JSON.stringify(meta === null ? header : { __metadata__: meta, ...header }) +
          " ".repeat(pad);
        const text = new TextEncoder().encode(json);
        const file = concat(u64(BigInt(text.byteLength)), text, new Uint8Array(dataLength));
        const h = parse(file, file.byteLength);
        if (h instanceof CheckpointError) throw h;
        assert.deepEqual([...h.tensors.keys()].sort(), specs.map((s) => s.name).sort());
        for (const s of specs) {
          const e: TensorEntry = h.tensors.get(s.name)!;
          assert.equal(e.dtype.safetensors, s.dtype);
          assert.deepEqual(e.shape, s.shape);
          const [b, end] = (header[s.name] as { data_offsets: number[] }).data_offsets;
          assert.deepEqual([e.begin - h.dataStart, e.end - h.dataStart], [b, end]);
        }
        assert.deepEqual(h.metadata, meta ?? {});
      },
    ),
    PARAMS,
  );
});

Deno.test("fuzz: mutated headers are accepted exactly when an independent checker accepts them", () => {
  fc.assert(
    fc.property(
      specsArb,
      fc.array(fc.nat(), { maxLength: 6 }),
      fc.array(mutationArb, { minLength: 1, maxLength: 3 }),
      fc.integer({ min: -4, max: 4 }),
      (specs, order, mutations, dataSlack) => {
        const [header, dataLength] = layout(specs, order);
        let mutated: unknown = header;
        for (const m of mutations) {
          if (typeof mutated === "object" && mutated !== null && !Array.isArray(mutated)) {
            mutated = mutate(mutated as Record<string, unknown>, m as Mutation);
          }
        }
        const json = JSON.stringify(mutated);
        const text = new TextEncoder().encode(json);
        const data = Math.max(0, dataLength + (dataSlack === 1 ? 0 : dataSlack));
        const file = concat(u64(BigInt(text.byteLength)), text, new Uint8Array(data));
        const got = parse(file, file.byteLength);
        const want = naiveAccepts(json, data);
        assert.equal(
          !(got instanceof CheckpointError),
          want,
          `${json} with ${data} data bytes: ${
            got instanceof CheckpointError ? got.message : "accepted"
          }`,
        );
      },
    ),
    PARAMS,
  );
});

Deno.test("fuzz: byte-level mutations of real encoded files (flips, cuts, length field, size)", () => {
  const tensorArb = fc.record({ name: nameArb, dtype: dtypeArb, shape: shapeArb });
  fc.assert(
    fc.property(
      fc.uniqueArray(tensorArb, { selector: (t) => t.name, maxLength: 4 }),
      fc.array(fc.tuple(fc.nat(), fc.nat(255)), { maxLength: 4 }),
      fc.oneof(
        fc.constant(null),
        fc.bigInt({ min: 0n, max: 400n }),
        fc.constant(BigInt(MAX_HEADER_LENGTH + 1)),
      ),
      fc.integer({ min: -20, max: 20 }),
      (tensors, flips, lengthField, sizeDelta) => {
        const host: [string, HostTensor][] = tensors
          .filter((t) => t.name !== "__metadata__" && t.name.isWellFormed())
          .map((t) => {
            const dtype = Object.values(DTYPES).find((d) => d.safetensors === t.dtype)!;
            const n = t.shape.reduce((a, d) => a * d, dtype.size);
            return [t.name, { dtype, shape: t.shape, data: new Uint8Array(n).fill(7) }];
          });
        const file = encodeSafetensors(host, { format: "pt" });
        // Untouched, it must parse back to what was encoded.
        const clean = parse(file, file.byteLength);
        if (clean instanceof CheckpointError) throw clean;
        assert.equal(clean.tensors.size, host.length);
        const bad = file.slice();
        for (const [at, v] of flips) bad[at % bad.byteLength] = v;
        if (lengthField !== null) bad.set(u64(lengthField), 0);
        const size = Math.max(0, bad.byteLength + sizeDelta);
        parse(bad.subarray(0, Math.min(size, bad.byteLength)), size);
      },
    ),
    PARAMS,
  );
});

/** Spells `name` as a JSON string with a random choice of characters written as escapes. */
function spell(name: string, mask: number[]): string {
  let out = '"';
  let i = 0;
  for (const ch of name) {
    const escape = (mask[i++ % Math.max(1, mask.length)] ?? 0) % 2 === 1;
    if (escape) {
      for (let k = 0; k < ch.length; k++) {
        out += "\\u" + ch.charCodeAt(k).toString(16).padStart(4, "0");
      }
    } else if (ch === "/" && mask.length > 2) out += "\\/";
    else out += JSON.stringify(ch).slice(1, -1);
  }
  return out + '"';
}

Deno.test("fuzz: escaped spellings decode to the same names, and a re-spelled duplicate is DUPLICATE", () => {
  fc.assert(
    fc.property(
      specsArb.filter((s) => s.length > 0),
      fc.array(fc.nat(3), { maxLength: 8 }),
      fc.array(fc.nat(3), { maxLength: 8 }),
      fc.nat(),
      (specs, mask1, mask2, which) => {
        const [header, dataLength] = layout(specs, []);
        const body = Object.entries(header).map(([k, v]) =>
          `${spell(k, mask1)}:${JSON.stringify(v)}`
        );
        const encode = (parts: string[]) => {
          const text = new TextEncoder().encode(`{${parts.join(",")}}`);
          return concat(u64(BigInt(text.byteLength)), text, new Uint8Array(dataLength));
        };
        const file = encode(body);
        const h = parse(file, file.byteLength);
        if (h instanceof CheckpointError) throw h;
        assert.deepEqual([...h.tensors.keys()].sort(), specs.map((s) => s.name).sort());
        const dup = specs[which % specs.length].name;
        const twice = encode([...body, `${spell(dup, mask2)}:${JSON.stringify(header[dup])}`]);
        const err = parse(twice, twice.byteLength);
        assert.ok(err instanceof CheckpointError && err.code === "DUPLICATE", String(err));
        assert.ok(err.message.includes(quoteName(dup)), err.message);
      },
    ),
    PARAMS,
  );
});

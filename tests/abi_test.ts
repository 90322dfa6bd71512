/**
 * The kernel ABI's constants are defined once in TypeScript (src/backend/abi.ts, the dtype table
 * of src/tensor/dtype.ts) and once in C (cuda/layerwise.h): this test reads the header and
 * checks the TypeScript tables against it (and the dtype sizes against cuda/lw_numeric.h), so
 * the two cannot drift apart.
 */

import assert from "node:assert/strict";
import {
  blockScaleIndex,
  GRANULARITY_CODE,
  MULTI_TENSOR_FIELDS,
  MULTI_TENSOR_KIND_CODE,
  QUANT_BLOCK,
  scaleCount,
  scaleShape,
  STATUS,
  statusError,
} from "../src/backend/abi.ts";
import { DTYPES, isModelFloat } from "../src/tensor/dtype.ts";

const HEADER = Deno.readTextFileSync(new URL("../cuda/layerwise.h", import.meta.url));
const NUMERIC = Deno.readTextFileSync(new URL("../cuda/lw_numeric.h", import.meta.url));

/** `LW_NAME = value` pairs of every enum in the header, comments removed. */
function enumValues(header: string): Map<string, number> {
  const text = header.replace(/\/\*[\s\S]*?\*\//g, "").replace(/\/\/.*$/gm, "");
  const out = new Map<string, number>();
  for (const m of text.matchAll(/enum\s*\{([^}]*)\}/g)) {
    for (const item of m[1].split(",")) {
      const kv = item.trim().match(/^(LW_\w+)\s*=\s*(\d+)$/);
      if (kv) out.set(kv[1], Number(kv[2]));
    }
  }
  return out;
}

const ENUMS = enumValues(HEADER);

Deno.test("abi: the header parser finds every enum value", () => {
  assert.deepEqual(
    [...enumValues("enum { LW_A = 0, /* x */ LW_B = 1 };\nenum {\n  LW_C = 7 // y\n};")],
    [["LW_A", 0], ["LW_B", 1], ["LW_C", 7]],
  );
  assert.ok(ENUMS.size >= 18, `only ${ENUMS.size} values found`);
});

Deno.test("abi: every dtype code matches the header, and the header has no other", () => {
  const header = [...ENUMS].filter(([k]) =>
    /^LW_(F|BF|I|U|BOOL)/.test(k) && !k.startsWith("LW_PER_")
  );
  const ours = Object.values(DTYPES).map((d) => [`LW_${d.name.toUpperCase()}`, d.code] as const);
  assert.deepEqual(new Map(ours), new Map(header));
});

Deno.test("abi: status codes match the header; each maps to its BackendError code", () => {
  assert.deepEqual(
    new Map(Object.entries(STATUS).map(([k, v]) => [`LW_${k}`, v])),
    new Map([...ENUMS].filter(([k]) => /^LW_(OK|E[A-Z]+)$/.test(k))),
  );
  assert.equal(statusError(STATUS.EINVAL)[0], "INVALID");
  assert.equal(statusError(STATUS.ECUDA)[0], "DEVICE");
  assert.equal(statusError(STATUS.ENOMEM)[0], "OUT_OF_MEMORY");
  assert.equal(statusError(STATUS.EIO)[0], "IO");
  assert.deepEqual(statusError(99), ["DEVICE", "status 99"]);
});

Deno.test("abi: granularity codes and the block size match the header", () => {
  assert.deepEqual(GRANULARITY_CODE, {
    tensor: ENUMS.get("LW_PER_TENSOR"),
    row: ENUMS.get("LW_PER_ROW"),
    block128: ENUMS.get("LW_PER_BLOCK128"),
  });
  // The header states the block scale layout: scale[ceil(rows/128) * ceil(cols/128)].
  const layout = HEADER.match(
    /LW_PER_BLOCK(\d+): scale\[ceil\(rows\/(\d+)\) \* ceil\(cols\/(\d+)\)\]/,
  );
  assert.ok(layout, "the header documents the block scale layout");
  assert.deepEqual(layout.slice(1).map(Number), [QUANT_BLOCK, QUANT_BLOCK, QUANT_BLOCK]);
});

Deno.test("abi: multi-tensor kinds and table widths match the header", () => {
  assert.deepEqual(MULTI_TENSOR_KIND_CODE, {
    "fp8-tensor": ENUMS.get("LW_MT_FP8_TENSOR"),
    "fp8-row": ENUMS.get("LW_MT_FP8_ROW"),
    "fp8-block128": ENUMS.get("LW_MT_FP8_BLOCK128"),
    "int8-row": ENUMS.get("LW_MT_INT8_ROW"),
  });
  assert.deepEqual(MULTI_TENSOR_FIELDS, {
    target: ENUMS.get("LW_MT_TARGET_FIELDS"),
    piece: ENUMS.get("LW_MT_PIECE_FIELDS"),
    item: ENUMS.get("LW_MT_ITEM_FIELDS"),
  });
});

Deno.test("abi: scale shapes, counts and block indices", () => {
  assert.deepEqual(scaleShape(300, 200, "tensor"), [1]);
  assert.deepEqual(scaleShape(300, 200, "row"), [300]);
  assert.deepEqual(scaleShape(300, 200, "block128"), [3, 2]);
  assert.equal(scaleCount(300, 200, "block128"), 6);
  assert.equal(scaleCount(300, 200, "row"), 300);
  assert.equal(scaleCount(0, 200, "block128"), 0);
  assert.equal(blockScaleIndex(0, 0, 200), 0);
  assert.equal(blockScaleIndex(127, 128, 200), 1);
  assert.equal(blockScaleIndex(128, 0, 200), 2);
  assert.equal(blockScaleIndex(299, 199, 200), 5);
});

Deno.test("abi: dtype predicates and sizes agree with the C helpers of lw_numeric.h", () => {
  // lw_dtype_is_quant_input: f32, f16, bf16; lw_dtype_is_float: codes LW_F32..LW_F8_E5M2.
  const floatMax = ENUMS.get("LW_F8_E5M2")!;
  for (const d of Object.values(DTYPES)) {
    assert.equal(d.floating, d.code <= floatMax, d.name);
    assert.equal(isModelFloat(d), ["f32", "f16", "bf16"].includes(d.name), d.name);
  }
  // lw_dtype_size in cuda/lw_numeric.h: runs of `case LW_X:` closed by `return N;`.
  const body = NUMERIC.match(/size_t lw_dtype_size\(int32_t dtype\) \{([\s\S]*?)\n\}/);
  assert.ok(body, "lw_numeric.h defines lw_dtype_size");
  const cSizes = new Map<string, number>();
  let pending: string[] = [];
  for (const m of body[1].matchAll(/case (LW_\w+):|return (\d+);/g)) {
    if (m[1]) pending.push(m[1]);
    else {
      for (const name of pending) cSizes.set(name, Number(m[2]));
      pending = [];
    }
  }
  const ours = new Map(Object.values(DTYPES).map((d) => [`LW_${d.name.toUpperCase()}`, d.size]));
  assert.deepEqual(ours, cSizes);
});

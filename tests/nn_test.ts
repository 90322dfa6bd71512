/**
 * Module tree and layers: tensor-parallel narrowing of every layer against host slices of the
 * checkpoint tensor, counting loads against meta tensors, shape errors, the reference's
 * capture/restore/materialize cases, nested loader wrappers, and bookkeeping freed with the model.
 */

import assert from "node:assert/strict";
import type { Backend } from "../src/backend/backend.ts";
import { CheckpointError, ReloadError } from "../src/errors.ts";
import {
  ColumnParallelLinear,
  FusedMoE,
  MergedColumnParallelLinear,
  QKVParallelLinear,
  RowParallelLinear,
  VocabParallelEmbedding,
} from "../src/nn/layers.ts";
import type { Module } from "../src/nn/module.ts";
import { createQuantMethod } from "../src/quant/create.ts";
import {
  copyInto,
  countWrites,
  type ShardId,
  TensorSlot,
  type WeightLoader,
} from "../src/nn/slots.ts";
import {
  captureLayerToMeta,
  getOriginalLoader,
  markWrapper,
  materializeLayer,
  restoreLayerOnMeta,
} from "../src/reload/meta.ts";
import { DTYPES } from "../src/tensor/dtype.ts";
import { Tensor } from "../src/tensor/tensor.ts";
import { randomBf16, rng, testBackends } from "../testing.ts";

const BACKENDS = await testBackends();

/** Rows [r0, r0+nr) and columns [c0, c0+nc) of a row-major bf16 matrix with `cols` columns. */
function slice(bytes: Uint8Array, cols: number, r0: number, nr: number, c0 = 0, nc = cols) {
  const out = new Uint8Array(nr * nc * 2);
  for (let r = 0; r < nr; r++) {
    out.set(
      bytes.subarray(((r0 + r) * cols + c0) * 2, ((r0 + r) * cols + c0 + nc) * 2),
      r * nc * 2,
    );
  }
  return out;
}

/** Loads host bf16 `bytes` of `shape` into `layer.<param>` with a shard and expert id. */
function load(
  b: Backend,
  layer: Module,
  param: string,
  shape: number[],
  bytes: Uint8Array,
  shardId?: ShardId,
  expertId?: number,
) {
  const t = b.empty(shape, DTYPES.bf16);
  try {
    b.upload(t, bytes);
    const slot = layer.slot(param);
    slot.weightLoader(slot, t, shardId, expertId);
  } finally {
    b.free(t.storage!);
  }
}

function freeLayer(b: Backend, layer: Module) {
  for (const [, s] of layer.ownSlots()) if (!s.tensor.isMeta) b.free(s.tensor.storage!);
}

for (const [bn, b] of BACKENDS) {
  const r = rng(42);
  const ctx = (tpRank: number, tpSize: number) => ({
    backend: b,
    dtype: DTYPES.bf16,
    tpRank,
    tpSize,
    createQuantMethod,
  });

  Deno.test(`${bn}: column- and row-parallel linears narrow to their rank`, () => {
    const w = randomBf16(r, 64 * 48), bias = randomBf16(r, 64);
    const col = new ColumnParallelLinear(ctx(1, 2), 48, 64, { bias: true });
    materializeLayer(col);
    load(b, col, "weight", [64, 48], w);
    load(b, col, "bias", [64], bias);
    assert.deepEqual(b.download(col.slot("weight").tensor), slice(w, 48, 32, 32));
    assert.deepEqual(b.download(col.slot("bias").tensor), bias.subarray(64, 128));
    freeLayer(b, col);

    const row = new RowParallelLinear(ctx(2, 4), 64, 48, { bias: true });
    materializeLayer(row);
    const w2 = randomBf16(r, 48 * 64), b2 = randomBf16(r, 48);
    load(b, row, "weight", [48, 64], w2);
    load(b, row, "bias", [48], b2);
    assert.deepEqual(b.download(row.slot("weight").tensor), slice(w2, 64, 0, 48, 32, 16));
    assert.deepEqual(b.download(row.slot("bias").tensor), b2, "row-parallel bias is whole");
    freeLayer(b, row);
  });

  Deno.test(`${bn}: QKV with more ranks than KV heads replicates KV heads; merged shards`, () => {
    // 8 query heads, 2 KV heads, 4 ranks: rank 3 holds q heads 6-7 and KV head 1.
    const d = 16, H = 32;
    const qkv = new QKVParallelLinear(ctx(3, 4), {
      hiddenSize: H,
      headDim: d,
      numHeads: 8,
      numKvHeads: 2,
    });
    assert.deepEqual(qkv.slot("weight").tensor.shape, [(2 + 1 + 1) * d, H]);
    materializeLayer(qkv);
    const q = randomBf16(r, 8 * d * H), k = randomBf16(r, 2 * d * H), v = randomBf16(r, 2 * d * H);
    load(b, qkv, "weight", [8 * d, H], q, "q");
    load(b, qkv, "weight", [2 * d, H], k, "k");
    load(b, qkv, "weight", [2 * d, H], v, "v");
    const got = b.download(qkv.slot("weight").tensor);
    const want = [slice(q, H, 6 * d, 2 * d), slice(k, H, d, d), slice(v, H, d, d)];
    assert.deepEqual(got, new Uint8Array(want.flatMap((x) => [...x])));
    assert.throws(() => load(b, qkv, "weight", [2 * d, H], v, "x"), /shard id must be q, k or v/);
    freeLayer(b, qkv);

    const merged = new MergedColumnParallelLinear(ctx(0, 2), H, [40, 24]);
    materializeLayer(merged);
    const up = randomBf16(r, 24 * H);
    load(b, merged, "weight", [24, H], up, 1);
    const all = b.download(merged.slot("weight").tensor);
    assert.deepEqual(
      all.subarray(20 * H * 2),
      slice(up, H, 0, 12),
      "shard 1 after shard 0's 20 rows",
    );
    freeLayer(b, merged);
  });

  Deno.test(`${bn}: vocab-parallel embedding: padded to 64, padding never loaded`, () => {
    const emb = new VocabParallelEmbedding(ctx(1, 2), 250, 8);
    assert.equal(emb.rowsPerRank, 128);
    assert.equal(emb.realRows, 250 - 128);
    assert.equal(emb.paddingElements("weight"), 6 * 8);
    const w = randomBf16(r, 250 * 8);
    const wt = b.empty([250, 8], DTYPES.bf16);
    b.upload(wt, w);
    const slot = emb.slot("weight");
    assert.equal(countWrites(() => slot.weightLoader(slot, wt)), 122 * 8, "counted on meta");
    materializeLayer(emb);
    slot.weightLoader(slot, wt);
    b.free(wt.storage!);
    const got = b.download(slot.tensor);
    assert.deepEqual(got.subarray(0, 122 * 16), slice(w, 8, 128, 122));
    assert.ok(got.subarray(122 * 16).every((x) => x === 0), "padding rows filled with zero");
    freeLayer(b, emb);
  });

  Deno.test(`${bn}: FusedMoE stacks experts; experts of another rank write and count nothing`, () => {
    const H = 16, I = 24;
    const moe = new FusedMoE(ctx(1, 2), {
      numExperts: 4,
      hiddenSize: H,
      intermediateSize: I,
      epRank: 1,
      epSize: 2,
    });
    assert.deepEqual(moe.slot("w13_weight").tensor.shape, [2, 24, H]);
    assert.deepEqual(moe.slot("w2_weight").tensor.shape, [2, H, 12]);
    const w1 = randomBf16(r, I * H), w3 = randomBf16(r, I * H), w2 = randomBf16(r, H * I);
    const t1 = b.empty([I, H], DTYPES.bf16);
    b.upload(t1, w1);
    const s13 = moe.slot("w13_weight");
    assert.equal(countWrites(() => s13.weightLoader(s13, t1, "w1", 0)), 0, "expert 0 is on rank 0");
    assert.equal(countWrites(() => s13.weightLoader(s13, t1, "w1", 3)), 12 * H);
    b.free(t1.storage!);
    materializeLayer(moe);
    load(b, moe, "w13_weight", [I, H], w1, "w1", 3);
    load(b, moe, "w13_weight", [I, H], w3, "w3", 3);
    load(b, moe, "w2_weight", [H, I], w2, "w2", 3);
    const w13 = b.download(moe.slot("w13_weight").tensor);
    const e1 = w13.subarray(24 * H * 2); // local expert 1 = global 3
    assert.deepEqual(e1.subarray(0, 12 * H * 2), slice(w1, H, 12, 12), "gate rows of rank 1");
    assert.deepEqual(e1.subarray(12 * H * 2), slice(w3, H, 12, 12), "up rows of rank 1");
    const w2k = b.download(moe.slot("w2_weight").tensor).subarray(H * 12 * 2);
    assert.deepEqual(w2k, slice(w2, I, 0, H, 12, 12), "down columns of rank 1");
    assert.throws(() => load(b, moe, "w2_weight", [H, I], w2, "w1", 3), /shard id must be w2/);
    assert.throws(() => load(b, moe, "w2_weight", [H, I], w2, "w2", 4), /expert id must be 0\.\.3/);
    freeLayer(b, moe);
  });

  Deno.test(`${bn}: wrong shapes and dtypes are CheckpointErrors naming the load`, () => {
    const qkv = new QKVParallelLinear(ctx(0, 1), {
      hiddenSize: 32,
      headDim: 16,
      numHeads: 2,
      numKvHeads: 1,
    });
    materializeLayer(qkv);
    assert.throws(
      () => load(b, qkv, "weight", [16, 30], new Uint8Array(16 * 30 * 2), "k"),
      (e: unknown) =>
        e instanceof CheckpointError && e.code === "SHAPE_MISMATCH" &&
        e.message === "QKVParallelLinear shard k: expected [16, 32], got [16, 30]",
    );
    const f8 = b.empty([16, 32], DTYPES.f8_e4m3fn);
    const slot = qkv.slot("weight");
    assert.throws(() => slot.weightLoader(slot, f8, "k"), /DTYPE|expected bf16, got f8_e4m3fn/);
    b.free(f8.storage!);
    freeLayer(b, qkv);
  });
}

Deno.test("counting a loader that writes two disjoint slices gives their sum", () => {
  const slot = new TensorSlot(Tensor.meta([10, 4], DTYPES.bf16), () => {});
  const src = Tensor.meta([10, 4], DTYPES.bf16);
  const twoSlices: WeightLoader = (s) => {
    copyInto(null!, s.tensor.narrow(0, 0, 2), src.narrow(0, 0, 2));
    copyInto(null!, s.tensor.narrow(0, 5, 3), src.narrow(0, 5, 3));
  };
  assert.equal(countWrites(() => twoSlices(slot, src)), (2 + 3) * 4);
  // Nested counts are separate; outside counting a meta write is an error.
  assert.equal(countWrites(() => assert.equal(countWrites(() => twoSlices(slot, src)), 20)), 0);
  assert.throws(
    () => twoSlices(slot, src),
    (e: unknown) => e instanceof ReloadError && e.code === "META_WRITE",
  );
});

Deno.test("capture, restore and materialize keep shape, dtype and loader", async () => {
  const [[, b]] = BACKENDS;
  const layer = new QKVParallelLinear({ backend: b, dtype: DTYPES.bf16, createQuantMethod }, {
    hiddenSize: 32,
    headDim: 16,
    numHeads: 2,
    numKvHeads: 1,
  }, { quant: "fp8-serialized", bias: true });
  const before = layer.ownSlots().map((
    [n, s],
  ) => [n, s.tensor.shape, s.tensor.dtype, s.weightLoader]);
  const meta = captureLayerToMeta(layer);
  assert.deepEqual([...meta.keys()], ["weight", "weight_scale", "bias"]);
  for (const [n, m] of meta) {
    assert.ok(m.meta.isMeta);
    assert.equal(m.slot, layer.slot(n));
  }
  materializeLayer(layer);
  const after = layer.ownSlots().map((
    [n, s],
  ) => [n, s.tensor.shape, s.tensor.dtype, s.weightLoader]);
  assert.deepEqual(after, before, "materialize keeps shape, dtype, loader");
  assert.ok(layer.ownSlots().every(([, s]) => !s.tensor.isMeta));
  // Processing changes the layer (fp8 scale [3] -> [1]); restore brings back model format.
  const storages = layer.ownSlots().map(([, s]) => s.tensor.storage!);
  b.fill(layer.slot("weight_scale").tensor, 1);
  layer.quantMethod!.processWeightsAfterLoading(layer);
  assert.deepEqual(layer.slot("weight_scale").tensor.shape, [1]);
  const kernel = layer.ownSlots().map(([, s]) => s.tensor);
  layer.setSlot("extra", new TensorSlot(Tensor.meta([1], DTYPES.f32), () => {}));
  restoreLayerOnMeta(layer, meta);
  const restored = layer.ownSlots().map((
    [n, s],
  ) => [n, s.tensor.shape, s.tensor.dtype, s.weightLoader]);
  assert.deepEqual(restored, before, "restore keeps shape, dtype, loader; removes other slots");
  assert.ok(layer.ownSlots().every(([, s]) => s.tensor.isMeta));
  for (const t of kernel) if (!t.storage!.freed) b.free(t.storage!);
  for (const s of storages) if (!s.freed) b.free(s);
  await Promise.resolve();
});

Deno.test("nested layerwise wrappers unwrap to the original loader", () => {
  const original: WeightLoader = () => {};
  const inner: WeightLoader = () => {};
  const outer: WeightLoader = () => {};
  markWrapper(inner, original);
  markWrapper(outer, inner);
  assert.equal(getOriginalLoader(outer), original);
  assert.equal(getOriginalLoader(original), original);
});

Deno.test("reload bookkeeping is freed with the model (no global strong references)", async () => {
  const script = new URL("./nn_gc_probe.ts", import.meta.url);
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "--v8-flags=--expose-gc", script.pathname],
  }).output();
  const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
  assert.equal(out.code, 0, text);
  assert.match(text, /collected: model=true layers=\d+\/\d+ infos=true/);
});

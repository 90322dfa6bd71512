/**
 * Quantization methods on single layers: online fp8/int8 processing equals the kernel applied
 * to the fused model-format weight, with the documented scale shapes; fp8-serialized fused
 * layers are requantized to the largest shard scale.
 */

import assert from "node:assert/strict";
import type { Backend, Granularity } from "../src/backend/backend.ts";
import { FusedMoE, MergedColumnParallelLinear, RowParallelLinear } from "../src/nn/layers.ts";
import type { Module } from "../src/nn/module.ts";
import type { QuantScheme } from "../src/nn/quant_method.ts";
import { createQuantMethod } from "../src/quant/create.ts";
import { materializeLayer } from "../src/reload/meta.ts";
import { DTYPES } from "../src/tensor/dtype.ts";
import type { Tensor } from "../src/tensor/tensor.ts";
import { randomBf16, rng, testBackends } from "../testing.ts";

const BACKENDS = await testBackends();

function upload(b: Backend, shape: number[], dtype = DTYPES.bf16, bytes: Uint8Array): Tensor {
  const t = b.empty(shape, dtype);
  b.upload(t, bytes);
  return t;
}

function feed(layer: Module, param: string, t: Tensor, shard?: string | number) {
  const slot = layer.slot(param);
  slot.weightLoader(slot, t, shard);
}

function freeLayer(b: Backend, layer: Module) {
  for (const [, s] of layer.ownSlots()) if (!s.tensor.storage!.freed) b.free(s.tensor.storage!);
}

const ONLINE: [QuantScheme, Granularity | "int8", number[]][] = [
  ["fp8-tensor", "tensor", [1]],
  ["fp8-channel", "row", [300]],
  ["fp8-block", "block128", [3, 2]],
  ["int8-channel", "int8", [300]],
];

for (const [bn, b] of BACKENDS) {
  for (const [scheme, g, scaleShape] of ONLINE) {
    Deno.test(`${bn}: ${scheme}: processing = the kernel on the fused weight, scale ${scaleShape}`, () => {
      const r = rng(9);
      const H = 200;
      const layer = new MergedColumnParallelLinear(
        { backend: b, dtype: DTYPES.bf16, createQuantMethod },
        H,
        [
          140,
          160,
        ],
        {
          quant: scheme,
        },
      );
      materializeLayer(layer);
      const gate = randomBf16(r, 140 * H, 0.1), up = randomBf16(r, 160 * H, 3);
      const tg = upload(b, [140, H], DTYPES.bf16, gate), tu = upload(b, [160, H], DTYPES.bf16, up);
      feed(layer, "weight", tu, 1);
      feed(layer, "weight", tg, 0);
      const fused = upload(b, [300, H], DTYPES.bf16, new Uint8Array([...gate, ...up]));
      const target = g === "int8" ? DTYPES.i8 : DTYPES.f8_e4m3fn;
      const q = b.empty([300, H], target), s = b.empty(scaleShape, DTYPES.f32);
      if (g === "int8") b.quantizeInt8(q, s, fused);
      else b.quantizeFp8(q, s, fused, g, true);
      layer.quantMethod!.processWeightsAfterLoading(layer);
      const w = layer.slot("weight").tensor, ws = layer.slot("weight_scale").tensor;
      assert.equal(w.dtype, target);
      assert.deepEqual(ws.shape, scaleShape);
      assert.deepEqual(b.download(w), b.download(q));
      assert.deepEqual(b.download(ws), b.download(s));
      for (const t of [tg, tu, fused, q, s]) b.free(t.storage!);
      freeLayer(b, layer);
    });
  }

  Deno.test(`${bn}: FusedMoE online scales are per expert`, () => {
    const want: Record<string, [number[], number[]]> = {
      "fp8-tensor": [[3], [3]],
      "fp8-channel": [[3, 64], [3, 16]],
      "fp8-block": [[3, 1, 1], [3, 1, 1]],
      "int8-channel": [[3, 64], [3, 16]],
    };
    for (const [scheme, [w13, w2]] of Object.entries(want)) {
      const moe = new FusedMoE({ backend: b, dtype: DTYPES.bf16, createQuantMethod }, {
        numExperts: 3,
        hiddenSize: 16,
        intermediateSize: 32,
        quant: scheme as QuantScheme,
      });
      materializeLayer(moe);
      for (const [, s] of moe.ownSlots()) b.fill(s.tensor, 0.5);
      moe.quantMethod!.processWeightsAfterLoading(moe);
      assert.deepEqual(moe.slot("w13_weight_scale").tensor.shape, w13, scheme);
      assert.deepEqual(moe.slot("w2_weight_scale").tensor.shape, w2, scheme);
      freeLayer(b, moe);
    }
  });

  Deno.test(`${bn}: fp8-serialized: fused shards requantized to the largest scale`, () => {
    const r = rng(5);
    const H = 64;
    const layer = new MergedColumnParallelLinear(
      { backend: b, dtype: DTYPES.bf16, createQuantMethod },
      H,
      [32, 48],
      {
        quant: "fp8-serialized",
      },
    );
    assert.deepEqual(layer.slot("weight_scale").tensor.shape, [2]);
    materializeLayer(layer);
    // Each shard as an fp8 checkpoint holds it: quantized with its own dynamic scale.
    const shards = [[32, 0.05], [48, 2]].map(([rows, spread]) => {
      const x = upload(b, [rows, H], DTYPES.bf16, randomBf16(r, rows * H, spread));
      const q = b.empty([rows, H], DTYPES.f8_e4m3fn), s = b.empty([1], DTYPES.f32);
      b.quantizeFp8(q, s, x, "tensor", true);
      b.free(x.storage!);
      return { q, s, scale: new Float32Array(b.download(s).buffer)[0] };
    });
    shards.forEach((sh, i) => {
      feed(layer, "weight", sh.q, i);
      feed(layer, "weight_scale", sh.s, i);
    });
    layer.quantMethod!.processWeightsAfterLoading(layer);
    const max = Math.max(shards[0].scale, shards[1].scale);
    assert.ok(shards[0].scale < shards[1].scale);
    const ws = layer.slot("weight_scale").tensor;
    assert.deepEqual(ws.shape, [1]);
    assert.equal(new Float32Array(b.download(ws).buffer)[0], max);
    const w = b.download(layer.slot("weight").tensor);
    assert.deepEqual(
      w.subarray(32 * H),
      b.download(shards[1].q),
      "the max-scale shard is unchanged",
    );
    // The other shard: its dequantized values are kept within half an fp8 step of max scale.
    const dqNew = b.empty([32, H], DTYPES.f32), dqOld = b.empty([32, H], DTYPES.f32);
    b.dequantizeFp8(dqNew, layer.slot("weight").tensor.narrow(0, 0, 32), ws, "tensor");
    b.dequantizeFp8(dqOld, shards[0].q, shards[0].s, "tensor");
    const a = new Float32Array(b.download(dqNew).buffer),
      o = new Float32Array(b.download(dqOld).buffer);
    let err = 0;
    for (let i = 0; i < a.length; i++) err = Math.max(err, Math.abs(a[i] - o[i]));
    assert.ok(err <= max / 2 ** 9 * 2 ** 8 && err > 0, `error ${err}, max scale ${max}`);
    assert.ok(
      !w.subarray(0, 32 * H).every((x, i) => x === b.download(shards[0].q)[i]),
      "requantized",
    );
    for (const t of [dqNew, dqOld, ...shards.flatMap((s) => [s.q, s.s])]) b.free(t.storage!);
    freeLayer(b, layer);
  });

  Deno.test(`${bn}: fp8-serialized: an unfused layer keeps checkpoint bytes and scale`, () => {
    const layer = new RowParallelLinear(
      { backend: b, dtype: DTYPES.bf16, createQuantMethod },
      64,
      32,
      {
        quant: "fp8-serialized",
      },
    );
    materializeLayer(layer);
    const x = upload(b, [32, 64], DTYPES.bf16, randomBf16(rng(1), 32 * 64, 0.3));
    const q = b.empty([32, 64], DTYPES.f8_e4m3fn), s = b.empty([], DTYPES.f32);
    b.quantizeFp8(q, s, x, "tensor", true);
    feed(layer, "weight", q);
    feed(layer, "weight_scale", s);
    layer.quantMethod!.processWeightsAfterLoading(layer);
    assert.deepEqual(b.download(layer.slot("weight").tensor), b.download(q));
    assert.deepEqual(b.download(layer.slot("weight_scale").tensor), b.download(s));
    for (const t of [x, q, s]) b.free(t.storage!);
    freeLayer(b, layer);
  });
}

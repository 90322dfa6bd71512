/**
 * fp8 checkpoints: the checkpoint already holds fp8 e4m3fn weights with one f32 scale per
 * logical shard (q, k, v; gate, up; w1, w3 per expert). Kernels want one scale per fused
 * weight, so processing requantizes every shard to the largest scale, as inference engines do:
 * dequantize the shard with its own scale (to f32) and quantize it with the max scale.
 * @module
 */

import type { Backend } from "../backend/backend.ts";
import { CheckpointError } from "../errors.ts";
import type { Module } from "../nn/module.ts";
import { copyInto, select0, TensorSlot } from "../nn/slots.ts";
import { DTYPES } from "../tensor/dtype.ts";
import { Tensor } from "../tensor/tensor.ts";
import { expertCount, matrices, matrixShape } from "./common.ts";
import type { KernelDestination, QuantMethod, WeightSpec } from "../nn/quant_method.ts";

/** Loads fp8 weights and per-shard scales; requantizes fused weights to one scale. */
export class Fp8SerializedMethod implements QuantMethod {
  /** `fp8-serialized`. */
  readonly name: string = "fp8-serialized";
  readonly #backend: Backend;
  #specs: readonly WeightSpec[] = [];

  /** A method on `backend`. */
  constructor(backend: Backend) {
    this.#backend = backend;
  }

  createWeights(layer: Module, specs: readonly WeightSpec[]): void {
    this.#specs = specs;
    const b = this.#backend;
    for (const spec of specs) {
      layer.setSlot(
        spec.name,
        new TensorSlot(Tensor.meta(spec.shape, DTYPES.f8_e4m3fn), spec.loader),
      );
      const experts = expertCount(spec);
      const n = spec.shardRows.length;
      const shape = experts === 0 ? [n] : [experts, n];
      layer.setSlot(
        spec.scaleName,
        new TensorSlot(Tensor.meta(shape, DTYPES.f32), (slot, loaded, shardId, expertId) => {
          const at = spec.scaleIndex(shardId, expertId);
          if (!at) return;
          if (loaded.numel !== 1) {
            throw new CheckpointError(
              "SHAPE_MISMATCH",
              `a per-tensor fp8 scale has one element, got ${loaded}`,
            );
          }
          const row = experts === 0 ? slot.tensor : select0(slot.tensor, at.expert);
          copyInto(b, row.narrow(0, at.shard, 1), loaded.reshape([1]));
        }),
      );
    }
  }

  processWeightsAfterLoading(layer: Module, into?: KernelDestination): void {
    const b = this.#backend;
    for (const spec of this.#specs) {
      const slot = layer.slot(spec.name);
      const w = slot.tensor;
      const scaleSlot = layer.slot(spec.scaleName);
      const old = scaleSlot.tensor;
      const n = spec.shardRows.length;
      const flat = old.reshape([old.numel]);
      const host = new Float32Array(b.download(old).buffer);
      const experts = expertCount(spec);
      // Requantized in place, or into the caller's kernel tensor when `into` gives one.
      const out = into?.(spec.name, w.shape, w.dtype) ?? w;
      const shape = experts === 0 ? [1] : [experts];
      const given = into?.(spec.scaleName, shape, DTYPES.f32) ?? null;
      const scale = given ?? b.empty(shape, DTYPES.f32);
      const [, cols] = matrixShape(spec);
      let tmp: Tensor | null = null;
      try {
        if (n > 1) tmp = b.empty([Math.max(...spec.shardRows), cols], DTYPES.f32);
        const dst = matrices(out);
        matrices(w).forEach((m, e) => {
          const own = host.subarray(e * n, e * n + n);
          const max = own.reduce((a, x) => Math.max(a, x), -Infinity);
          const sv = scale.narrow(0, e, 1);
          b.upload(sv, new Uint8Array(Float32Array.of(max).buffer));
          if (!tmp) {
            if (out !== w) b.copy(dst[e], m);
            return;
          }
          const buf = tmp;
          let start = 0;
          spec.shardRows.forEach((rows, i) => {
            const t = buf.narrow(0, 0, rows);
            b.dequantizeFp8(t, m.narrow(0, start, rows), flat.narrow(0, e * n + i, 1), "tensor");
            b.quantizeFp8(dst[e].narrow(0, start, rows), sv, t, "tensor", false);
            start += rows;
          });
        });
      } catch (e) {
        // Not yet in the layer: nobody else would free it.
        if (!given) b.free(scale.storage!);
        throw e;
      } finally {
        if (tmp) b.free(tmp.storage!);
      }
      b.free(old.storage!);
      scaleSlot.tensor = scale;
      if (out !== w) {
        b.free(w.storage!);
        slot.tensor = out;
      }
    }
  }
}

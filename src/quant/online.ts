/**
 * Online quantization: the checkpoint holds model-dtype weights (bf16); processing quantizes
 * them with dynamic scales. fp8 e4m3fn per tensor, per row (channel) or per 128x128 block, and
 * int8 per row. Scales are f32 in checkpoint orientation `[out, in]`: `[1]`, `[rows]` or
 * `[ceil(rows/128), ceil(cols/128)]`, with a leading `[experts]` for stacked experts (per-tensor
 * scales of experts are `[experts]`).
 * @module
 */

import type { Backend, Granularity } from "../backend/backend.ts";
import type { Module } from "../nn/module.ts";
import { type DType, DTYPES } from "../tensor/dtype.ts";
import { select0 } from "../nn/slots.ts";
import type { Tensor } from "../tensor/tensor.ts";
import { scaleShape } from "../backend/abi.ts";
import { expertCount, fillKernelTensors, matrices, matrixShape, putTensor } from "./common.ts";
import type { KernelDestination, QuantMethod, WeightSpec } from "../nn/quant_method.ts";
import { UnquantizedMethod } from "./unquantized.ts";

/** Quantizes model-dtype weights after loading, with dynamic scales. */
export class OnlineQuantMethod implements QuantMethod {
  /** `fp8-tensor`, `fp8-channel`, `fp8-block` or `int8-channel`. */
  readonly name: string;
  readonly #backend: Backend;
  readonly #create: UnquantizedMethod;
  readonly #target: DType;
  readonly #granularity: Granularity;
  #specs: readonly WeightSpec[] = [];

  /** The quantized dtype: f8_e4m3fn or i8. */
  get target(): DType {
    return this.#target;
  }

  /** One scale per tensor, per row or per 128x128 block. */
  get granularity(): Granularity {
    return this.#granularity;
  }

  /** The weights this method quantizes (set by createWeights). */
  get specs(): readonly WeightSpec[] {
    return this.#specs;
  }

  /** `target` is f8_e4m3fn (any granularity) or i8 (row only). */
  constructor(backend: Backend, modelDtype: DType, target: DType, granularity: Granularity) {
    this.#backend = backend;
    this.#create = new UnquantizedMethod(modelDtype);
    this.#target = target;
    this.#granularity = granularity;
    const g = { tensor: "tensor", row: "channel", block128: "block" }[granularity];
    this.name = `${target === DTYPES.i8 ? "int8" : "fp8"}-${g}`;
  }

  createWeights(layer: Module, specs: readonly WeightSpec[]): void {
    this.#specs = specs;
    this.#create.createWeights(layer, specs);
  }

  processWeightsAfterLoading(layer: Module, into?: KernelDestination): void {
    const b = this.#backend, g = this.#granularity;
    for (const spec of this.#specs) {
      const w = layer.slot(spec.name).tensor;
      const experts = expertCount(spec);
      const [rows, cols] = matrixShape(spec);
      const per = scaleShape(rows, cols, g);
      const sShape = experts === 0 ? per : g === "tensor" ? [experts] : [experts, ...per];
      const [q, s] = fillKernelTensors(b, into, [
        [spec.name, w.shape, this.#target],
        [spec.scaleName, sShape, DTYPES.f32],
      ], ([q, s]) => {
        const qs = matrices(q), ws = matrices(w);
        for (let i = 0; i < qs.length; i++) {
          const sv: Tensor = experts === 0 ? s : g === "tensor" ? s.narrow(0, i, 1) : select0(s, i);
          if (this.#target === DTYPES.i8) b.quantizeInt8(qs[i], sv, ws[i]);
          else b.quantizeFp8(qs[i], sv, ws[i], g, true);
        }
      });
      b.free(w.storage!);
      putTensor(layer, spec.name, q);
      putTensor(layer, spec.scaleName, s);
    }
  }
}

/**
 * No quantization: weights stay in the model dtype; processing does nothing.
 * @module
 */

import type { DType } from "../tensor/dtype.ts";
import type { Module } from "../nn/module.ts";
import { TensorSlot } from "../nn/slots.ts";
import { Tensor } from "../tensor/tensor.ts";
import type { QuantMethod, WeightSpec } from "../nn/quant_method.ts";

/** Keeps the model dtype; kernel format equals model format. */
export class UnquantizedMethod implements QuantMethod {
  /** `none`. */
  readonly name: string = "none";
  /** Kernel format is model format. */
  readonly keepsModelFormat: boolean = true;
  readonly #dtype: DType;

  /** A method creating weights of `dtype` (the model dtype). */
  constructor(dtype: DType) {
    this.#dtype = dtype;
  }

  createWeights(layer: Module, specs: readonly WeightSpec[]): void {
    for (const s of specs) {
      layer.setSlot(s.name, new TensorSlot(Tensor.meta(s.shape, this.#dtype), s.loader));
    }
  }

  processWeightsAfterLoading(_layer: Module): void {}
}

/**
 * Attention scales (q_scale, k_scale, v_scale): f32 scalars from the checkpoint. One that was
 * not loaded keeps its "not loaded" sentinel (a value <= 0) and becomes 1.0, as in vLLM.
 * @module
 */

import type { Backend } from "../backend/backend.ts";
import type { Module } from "./module.ts";
import type { QuantMethod, WeightSpec } from "./quant_method.ts";

/** The sentinel written into scale tensors before loading. */
export const SCALE_NOT_LOADED = -1;

/** Processes attention scale tensors in place. */
export class KvScaleMethod implements QuantMethod {
  /** `kv-scale`. */
  readonly name: string = "kv-scale";
  readonly #backend: Backend;
  readonly #names: readonly string[];

  /** Processes the scale slots `names` of the layer. */
  constructor(backend: Backend, names: readonly string[]) {
    this.#backend = backend;
    this.#names = names;
  }

  createWeights(_layer: Module, _specs: readonly WeightSpec[]): void {}

  processWeightsAfterLoading(layer: Module): void {
    for (const name of this.#names) {
      const t = layer.slot(name).tensor;
      const v = new DataView(this.#backend.download(t).buffer).getFloat32(0, true);
      if (!(v > 0) || !Number.isFinite(v)) this.#backend.fill(t, 1);
    }
  }
}

/**
 * Quantization as users name it (the CLI's `--quant` and `loadModel`'s `quant`), and the
 * layer-level scheme each name stands for. The CLI's choices are {@link QUANT_NAMES}.
 * @module
 */

import type { QuantScheme } from "../nn/quant_method.ts";
import type { ModelConfig } from "./config.ts";

/** Every quantization name, in the order help texts list them. */
export const QUANT_NAMES = ["auto", "none", "fp8", "fp8-channel", "fp8-block", "int8"] as const;

/**
 * A quantization name: `auto` (the checkpoint's own quantization when its config.json has one:
 * fp8 per 128x128 block, or fp8 per tensor; else fp8 per tensor), none, fp8 per tensor, per
 * channel, per 128x128 block, or int8 per row.
 */
export type QuantName = typeof QUANT_NAMES[number];

const SCHEMES: Readonly<Record<Exclude<QuantName, "auto">, QuantScheme>> = {
  none: "none",
  fp8: "fp8-tensor",
  "fp8-channel": "fp8-channel",
  "fp8-block": "fp8-block",
  int8: "int8-channel",
};

/**
 * The layer-level scheme for a quantization name (`fp8` is fp8 per tensor); schemes pass
 * through. `auto` needs the model's config (see {@link QuantName}); without one it is fp8 per
 * tensor.
 */
export function quantScheme(name: QuantName | QuantScheme, config?: ModelConfig): QuantScheme {
  if (name === "auto") {
    const q = config?.quantization ?? null;
    if (q === null) return "fp8-tensor";
    return q.weightBlockSize === null ? "fp8-serialized" : "fp8-block";
  }
  if (Object.hasOwn(SCHEMES, name)) return SCHEMES[name as Exclude<QuantName, "auto">];
  return name as QuantScheme;
}

/**
 * Quantization as users name it (the CLI's `--quant` and `loadModel`'s `quant`), and the
 * layer-level scheme each name stands for. The CLI's choices are {@link QUANT_NAMES}.
 * @module
 */

import type { QuantScheme } from "../nn/quant_method.ts";

/** Every quantization name, in the order help texts list them. */
export const QUANT_NAMES = ["none", "fp8", "fp8-channel", "fp8-block", "int8"] as const;

/** A quantization name: none, fp8 per tensor, per channel, per 128x128 block, or int8 per row. */
export type QuantName = typeof QUANT_NAMES[number];

const SCHEMES: Readonly<Record<QuantName, QuantScheme>> = {
  none: "none",
  fp8: "fp8-tensor",
  "fp8-channel": "fp8-channel",
  "fp8-block": "fp8-block",
  int8: "int8-channel",
};

/** The layer-level scheme for a quantization name (`fp8` is fp8 per tensor); schemes pass through. */
export function quantScheme(name: QuantName | QuantScheme): QuantScheme {
  if (Object.hasOwn(SCHEMES, name)) return SCHEMES[name as QuantName];
  return name as QuantScheme;
}

/**
 * The pairing rules of fp8 checkpoints, checked from the source's description before anything
 * is read: in a block-fp8 checkpoint (DeepSeek-V3, Qwen3-FP8) every `X.weight_scale_inv` sits
 * beside an F8_E4M3 `X.weight`, every F8_E4M3 `X.weight` has its `X.weight_scale_inv`, and only
 * a model quantized per 128x128 block takes them. Shapes of the scales are the loaders' to
 * check (src/quant/fp8_block.ts), in the same validation pass.
 * @module
 */

import type { TensorInfo, WeightSource } from "../checkpoint/source.ts";
import { CheckpointError, type CheckpointErrorCode } from "../errors.ts";
import type { QuantScheme } from "../nn/quant_method.ts";
import { quoteName } from "../messages.ts";
import { DTYPES } from "../tensor/dtype.ts";

const INV = "_scale_inv";

// The file and the tensor come first, as in every validation message; tensor names are quoted.
function fail(code: CheckpointErrorCode, t: TensorInfo, what: string): never {
  throw new CheckpointError(code, `${t.origin}: ${quoteName(t.name)}: ${what}`);
}

/**
 * Throws CheckpointError (one line naming the file and the tensor) when `source` breaks a rule
 * of fp8 checkpoints for a model quantized with `quant`: `QUANT_MISMATCH` for fp8 tensors a
 * model of that scheme cannot take exactly, `MISSING_TENSOR` for a weight without its block
 * scales (or scales without their weight), `DTYPE_MISMATCH` for block scales beside a weight
 * that is not F8_E4M3.
 */
export function checkFp8Checkpoint(source: WeightSource, quant: QuantScheme): void {
  const tensors = source.tensors;
  for (const t of tensors.values()) {
    if (t.name.endsWith(`.weight${INV}`)) {
      if (quant !== "fp8-block") {
        fail(
          "QUANT_MISMATCH",
          t,
          `block-fp8 scales need a model quantized per 128x128 block (--quant fp8-block or auto), not ${quant}`,
        );
      }
      const weightName = t.name.slice(0, -INV.length);
      const w = tensors.get(weightName);
      if (w === undefined) {
        fail("MISSING_TENSOR", t, `block-fp8 scales without their weight ${quoteName(weightName)}`);
      }
      if (w.dtype !== DTYPES.f8_e4m3fn) {
        fail(
          "DTYPE_MISMATCH",
          w,
          `is ${w.dtype.safetensors}, expected F8_E4M3 beside its block scales ${
            quoteName(t.name)
          }`,
        );
      }
    } else if (t.dtype === DTYPES.f8_e4m3fn) {
      if (quant === "fp8-block") {
        if (!tensors.has(`${t.name}${INV}`)) {
          fail(
            "MISSING_TENSOR",
            t,
            `is F8_E4M3 but its block scales ${quoteName(`${t.name}${INV}`)} are missing`,
          );
        }
      } else if (quant !== "fp8-serialized") {
        fail(
          "QUANT_MISMATCH",
          t,
          `is F8_E4M3: a model quantized ${quant} takes model-dtype weights (load an fp8 checkpoint with --quant auto)`,
        );
      }
    }
  }
}

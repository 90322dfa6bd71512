/**
 * Quant method instances by scheme name.
 * @module
 */

import type { Backend } from "../backend/backend.ts";
import { LayerwiseError } from "../errors.ts";
import { type DType, DTYPES } from "../tensor/dtype.ts";
import { Fp8BlockMethod } from "./fp8_block.ts";
import { Fp8SerializedMethod } from "./fp8_serialized.ts";
import type { QuantMethod, QuantScheme } from "../nn/quant_method.ts";
import { OnlineQuantMethod } from "./online.ts";
import { UnquantizedMethod } from "./unquantized.ts";

/** A fresh method for one layer; `modelDtype` is the dtype of unquantized weights (bf16). */
export function createQuantMethod(
  scheme: QuantScheme,
  backend: Backend,
  modelDtype: DType,
): QuantMethod {
  switch (scheme) {
    case "none":
      return new UnquantizedMethod(modelDtype);
    case "fp8-tensor":
      return new OnlineQuantMethod(backend, modelDtype, DTYPES.f8_e4m3fn, "tensor");
    case "fp8-channel":
      return new OnlineQuantMethod(backend, modelDtype, DTYPES.f8_e4m3fn, "row");
    case "fp8-block":
      return new Fp8BlockMethod(backend, modelDtype);
    case "int8-channel":
      return new OnlineQuantMethod(backend, modelDtype, DTYPES.i8, "row");
    case "fp8-serialized":
      return new Fp8SerializedMethod(backend);
  }
  throw new LayerwiseError("BAD_QUANT", `unknown quantization scheme ${scheme}`);
}

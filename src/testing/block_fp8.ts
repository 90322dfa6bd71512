/**
 * Block-fp8 checkpoint tensors made from bf16 ones, as DeepSeek-V3 and Qwen3-FP8 ship them:
 * tests and benches write such checkpoints with the backend's own block-128 quantization.
 * @module
 */

import type { Backend } from "../backend/backend.ts";
import { scaleShape } from "../backend/abi.ts";
import type { HostTensor } from "../checkpoint/safetensors.ts";
import { DTYPES } from "../tensor/dtype.ts";

/**
 * Quantizes a 2-D host tensor per 128x128 block on `backend`.
 *
 * @param backend Where the quantization runs (its scratch is freed before returning).
 * @param tensor A 2-D bf16, f16 or f32 tensor.
 * @returns The F8_E4M3 weight and its F32 `weight_scale_inv` of [ceil(rows/128), ceil(cols/128)].
 */
export function quantizeBlock128(
  backend: Backend,
  tensor: HostTensor,
): [weight: HostTensor, scaleInv: HostTensor] {
  const [rows, cols] = tensor.shape;
  const sShape = scaleShape(rows, cols, "block128");
  const src = backend.empty(tensor.shape, tensor.dtype);
  const q = backend.empty(tensor.shape, DTYPES.f8_e4m3fn);
  const s = backend.empty(sShape, DTYPES.f32);
  try {
    backend.upload(src, tensor.data);
    backend.quantizeFp8(q, s, src, "block128", true);
    return [
      { dtype: DTYPES.f8_e4m3fn, shape: tensor.shape, data: backend.download(q) },
      { dtype: DTYPES.f32, shape: sShape, data: backend.download(s) },
    ];
  } finally {
    for (const x of [src, q, s]) backend.free(x.storage!);
  }
}

/**
 * The demo's check: kernel tensors, dequantized here on the host (independently of the
 * backend's kernels), against the checkpoint-format tensors they came from, with an explicit
 * bound for the quantization error of each element.
 * @module
 */

import { blockScaleIndex, scaleCount } from "../backend/abi.ts";
import type { HostTensor } from "../checkpoint/safetensors.ts";

const F32 = new Float32Array(1);
const U32 = new Uint32Array(F32.buffer);

/** Values of the 256 fp8 e4m3fn bit patterns (NaN for 0x7f and 0xff). */
export const FP8_E4M3_VALUES: Float32Array = (() => {
  const out = new Float32Array(256);
  for (let b = 0; b < 256; b++) {
    const sign = b & 0x80 ? -1 : 1;
    const e = (b >> 3) & 0xf;
    const m = b & 7;
    if (e === 15 && m === 7) out[b] = NaN;
    else if (e === 0) out[b] = sign * m * 2 ** -9;
    else out[b] = sign * (1 + m / 8) * 2 ** (e - 7);
  }
  return out;
})();

function floats(t: HostTensor): Float32Array {
  const n = t.data.byteLength / t.dtype.size;
  const out = new Float32Array(n);
  const d = t.data;
  switch (t.dtype.name) {
    case "f32":
      return new Float32Array(d.slice().buffer);
    case "bf16":
      for (let i = 0; i < n; i++) {
        U32[0] = (d[2 * i] | (d[2 * i + 1] << 8)) << 16;
        out[i] = F32[0];
      }
      return out;
    case "f8_e4m3fn":
      for (let i = 0; i < n; i++) out[i] = FP8_E4M3_VALUES[d[i]];
      return out;
    case "i8":
      for (let i = 0; i < n; i++) out[i] = (d[i] << 24) >> 24;
      return out;
    default:
      throw new Error(`cannot compare ${t.dtype.name} tensors`);
  }
}

/** How a kernel tensor compares with its source. */
export interface Comparison {
  /** Elements compared. */
  elements: number;
  /** The largest |dequantized - source| / bound over the elements (at most 1 when it holds). */
  maxErrorOverBound: number;
  /** sqrt(sum (dequantized - source)^2 / sum source^2). */
  relativeRmsError: number;
  /** The per-element bound in words, for the report. */
  bound: string;
}

// Per-element slack for the two f32 roundings (x / scale, then q * scale).
const SLACK = 1 + 2 ** -20;

/**
 * Compares kernel tensor `q` (with its f32 `scale`, or none for an unquantized tensor) with
 * `src`, the model-format tensor it was made from (same [rows, cols]). The bound: fp8 e4m3
 * rounds x / scale to 3 mantissa bits, so |error| <= max(2^-4 |x|, 2^-10 scale) (the second
 * term for subnormals); int8 rounds to integers, so |error| <= scale / 2; unquantized tensors
 * must be exact.
 */
export function compareKernelTensor(
  q: HostTensor,
  scale: HostTensor | undefined,
  src: HostTensor,
): Comparison {
  const x = floats(src);
  const v = floats(q);
  if (x.length !== v.length) throw new Error(`size ${v.length} != ${x.length}`);
  const cols = q.shape.length >= 2 ? q.shape[q.shape.length - 1] : v.length;
  const rows = v.length / cols;
  const s = scale ? floats(scale) : undefined;
  let scaleAt: (r: number, c: number) => number = () => 1;
  if (s !== undefined) {
    const per = s.length;
    if (per === 1) scaleAt = () => s[0];
    else if (per === rows) scaleAt = (r) => s[r];
    else {
      if (per !== scaleCount(rows, cols, "block128")) throw new Error(`scale has ${per} values`);
      scaleAt = (r, c) => s[blockScaleIndex(r, c, cols)];
    }
  }
  const fp8 = q.dtype.name === "f8_e4m3fn";
  const int8 = q.dtype.name === "i8";
  let worst = 0, errSq = 0, refSq = 0;
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) {
      const i = r * cols + c;
      const sc = scaleAt(r, c);
      const deq = Math.fround(v[i] * sc);
      const err = Math.abs(deq - x[i]);
      errSq += err * err;
      refSq += x[i] * x[i];
      let bound = 0;
      if (fp8) bound = Math.max(2 ** -4 * Math.abs(x[i]), 2 ** -10 * sc) * SLACK;
      else if (int8) bound = 0.5 * sc * SLACK;
      const ratio = err === 0 ? 0 : bound === 0 ? Infinity : err / bound;
      if (!(ratio <= worst)) worst = Number.isNaN(ratio) ? Infinity : ratio;
    }
  }
  return {
    elements: v.length,
    maxErrorOverBound: worst,
    relativeRmsError: refSq > 0 ? Math.sqrt(errSq / refSq) : 0,
    bound: fp8 ? "|err| <= max(2^-4 |x|, 2^-10 scale)" : int8 ? "|err| <= scale / 2" : "exact",
  };
}

/** Stacks 2-D host tensors along dimension 0 (q, k, v -> qkv), as the fused layers do. */
export function stackRows(parts: readonly HostTensor[]): HostTensor {
  if (parts.length === 1) return parts[0];
  const cols = parts[0].shape.slice(1);
  const rows = parts.reduce((a, p) => a + p.shape[0], 0);
  const data = new Uint8Array(parts.reduce((a, p) => a + p.data.byteLength, 0));
  let at = 0;
  for (const p of parts) {
    data.set(p.data, at);
    at += p.data.byteLength;
  }
  return { dtype: parts[0].dtype, shape: [rows, ...cols], data };
}

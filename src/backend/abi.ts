/**
 * The constants of the kernel ABI (cuda/layerwise.h) as TypeScript, each defined once: status
 * codes and what they mean as a BackendError, granularity codes, and the geometry of 128x128
 * quantization blocks. The dtype codes are the `code` of each DType (src/tensor/dtype.ts).
 * tests/abi_test.ts reads cuda/layerwise.h and checks these tables against it (ARCHITECTURE.md,
 * "Kernel ABI").
 * @module
 */

import type { BackendErrorCode } from "../errors.ts";
import type { Granularity, MultiTensorKind } from "./backend.ts";

/** `lw_status` values: `LW_OK`, `LW_EINVAL`, `LW_ECUDA`, `LW_ENOMEM`, `LW_EIO`. */
export const STATUS: Readonly<{ OK: 0; EINVAL: 1; ECUDA: 2; ENOMEM: 3; EIO: 4 }> = Object.freeze({
  OK: 0,
  EINVAL: 1,
  ECUDA: 2,
  ENOMEM: 3,
  EIO: 4,
});

const STATUS_ERRORS: Readonly<Record<number, readonly [BackendErrorCode, string]>> = {
  [STATUS.EINVAL]: ["INVALID", "invalid argument"],
  [STATUS.ECUDA]: ["DEVICE", "CUDA error"],
  [STATUS.ENOMEM]: ["OUT_OF_MEMORY", "out of memory"],
  [STATUS.EIO]: ["IO", "file read failed or came short"],
};

/** The BackendError code of a non-zero status, and a text for it when the library gives none. */
export function statusError(status: number): readonly [BackendErrorCode, string] {
  return STATUS_ERRORS[status] ?? ["DEVICE", `status ${status}`];
}

/** Granularity codes: `LW_PER_TENSOR`, `LW_PER_ROW`, `LW_PER_BLOCK128`. */
export const GRANULARITY_CODE: Readonly<Record<Granularity, number>> = Object.freeze({
  tensor: 0,
  row: 1,
  block128: 2,
});

/** Rows and columns of one quantization block of `block128` granularity. */
export const QUANT_BLOCK = 128;

/** Shape of the scales of a rows x cols matrix: `[1]`, `[rows]`, or blocks `[ceil(rows/128), ceil(cols/128)]`. */
export function scaleShape(rows: number, cols: number, g: Granularity): number[] {
  if (g === "tensor") return [1];
  if (g === "row") return [rows];
  return [Math.ceil(rows / QUANT_BLOCK), Math.ceil(cols / QUANT_BLOCK)];
}

/** Number of scales of a rows x cols matrix at a granularity. */
export function scaleCount(rows: number, cols: number, g: Granularity): number {
  return scaleShape(rows, cols, g).reduce((a, b) => a * b, 1);
}

/** Index of the block scale of element (r, c) in a matrix of `cols` columns. */
export function blockScaleIndex(r: number, c: number, cols: number): number {
  return Math.floor(r / QUANT_BLOCK) * Math.ceil(cols / QUANT_BLOCK) + Math.floor(c / QUANT_BLOCK);
}

/** Multi-tensor quantize kinds: `LW_MT_FP8_TENSOR`, `LW_MT_FP8_ROW`, `LW_MT_FP8_BLOCK128`, `LW_MT_INT8_ROW`. */
export const MULTI_TENSOR_KIND_CODE: Readonly<Record<MultiTensorKind, number>> = Object.freeze({
  "fp8-tensor": 0,
  "fp8-row": 1,
  "fp8-block128": 2,
  "int8-row": 3,
});

/**
 * uint64 fields of one row of each multi-tensor table: `LW_MT_TARGET_FIELDS`,
 * `LW_MT_PIECE_FIELDS`, `LW_MT_ITEM_FIELDS`.
 */
export const MULTI_TENSOR_FIELDS: Readonly<{ target: 10; piece: 5; item: 5 }> = Object.freeze({
  target: 10,
  piece: 5,
  item: 5,
});

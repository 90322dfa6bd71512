/**
 * Helpers shared by the quantization methods.
 * @module
 */

import { CheckpointError } from "../errors.ts";
import type { Module } from "../nn/module.ts";
import { select0, TensorSlot, type WeightLoader } from "../nn/slots.ts";
import type { Tensor } from "../tensor/tensor.ts";
import type { DType } from "../tensor/dtype.ts";
import type { Backend } from "../backend/backend.ts";
import type { KernelDestination, WeightSpec } from "../nn/quant_method.ts";

/** The 2-D matrices of a weight: itself, or one per expert for `[experts, rows, cols]`. */
export function matrices(t: Tensor): Tensor[] {
  if (t.shape.length !== 3) return [t];
  return Array.from({ length: t.shape[0] }, (_, i) => select0(t, i));
}

/** Number of experts of a spec (0 for a plain 2-D weight). */
export function expertCount(spec: WeightSpec): number {
  return spec.shape.length === 3 ? spec.shape[0] : 0;
}

/** Rows and columns of each matrix of a spec. */
export function matrixShape(spec: WeightSpec): [number, number] {
  const n = spec.shape.length;
  return [spec.shape[n - 2], spec.shape[n - 1]];
}

/** The loader of slots that processing produces: checkpoints cannot write them. */
export function producedLoader(name: string): WeightLoader {
  return () => {
    throw new CheckpointError(
      "NOT_LOADABLE",
      `${name} is computed when weights are processed; the checkpoint cannot set it`,
    );
  };
}

/** Puts `tensor` into the slot `name`: swaps the tensor of an existing slot, else adds one. */
export function putTensor(layer: Module, name: string, tensor: Tensor): void {
  const slot = layer.getSlot(name);
  if (slot) slot.tensor = tensor;
  else layer.setSlot(name, new TensorSlot(tensor, producedLoader(name)));
}

/**
 * The kernel tensors of one spec, filled by `fill`: each is the caller's tensor when `into` gives
 * one (a reload writing in place), else a new backend tensor. New tensors are freed if `fill`
 * throws, since no layer holds them yet; the caller's are never freed here.
 */
export function fillKernelTensors(
  backend: Backend,
  into: KernelDestination | undefined,
  wanted: readonly (readonly [string, readonly number[], DType])[],
  fill: (tensors: Tensor[]) => void,
): Tensor[] {
  const own: Tensor[] = [];
  try {
    const tensors = wanted.map(([name, shape, dtype]) => {
      const given = into?.(name, shape, dtype);
      if (given) return given;
      const made = backend.empty(shape, dtype);
      own.push(made);
      return made;
    });
    fill(tensors);
    return tensors;
  } catch (e) {
    for (const t of own) backend.free(t.storage!);
    throw e;
  }
}

/**
 * Capturing a layer's model-format tensors as meta tensors, putting them back on a layer, and
 * giving them storage again. Only slots the layer owns are touched (tied slots belong to their
 * owner).
 * @module
 */

import { LayerwiseError } from "../errors.ts";
import type { Module } from "../nn/module.ts";
import type { TensorSlot, WeightLoader } from "../nn/slots.ts";
import { Tensor } from "../tensor/tensor.ts";

/** One model-format slot as captured: the slot object, its meta tensor and original loader. */
export interface TensorMeta {
  /** The slot object (kept, so tied modules keep seeing it). */
  readonly slot: TensorSlot;
  /** Shape and dtype, no storage. */
  readonly meta: Tensor;
  /** The loader with every layerwise wrapper removed. */
  readonly loader: WeightLoader;
}

/** A layer's model format: slot name to its captured description, in registration order. */
export type LayerMeta = Map<string, TensorMeta>;

// A wrapper maps to the loader it wraps; weak so it never keeps loaders (or models) alive.
const WRAPPED = new WeakMap<WeightLoader, WeightLoader>();

/** Marks `wrapper` as a layerwise wrapper around `inner`. */
export function markWrapper(wrapper: WeightLoader, inner: WeightLoader): void {
  WRAPPED.set(wrapper, inner);
}

/** Whether `loader` is a layerwise wrapper. */
export function isWrapper(loader: WeightLoader): boolean {
  return WRAPPED.has(loader);
}

/** The loader with all (possibly nested) layerwise wrappers removed. */
export function getOriginalLoader(loader: WeightLoader): WeightLoader {
  let l = loader;
  for (let w = WRAPPED.get(l); w; w = WRAPPED.get(l)) l = w;
  return l;
}

/** Captures the layer's owned slots as meta tensors with their original loaders. */
export function captureLayerToMeta(layer: Module): LayerMeta {
  const out: LayerMeta = new Map();
  for (const [name, slot] of layer.ownSlots()) {
    out.set(name, {
      slot,
      meta: Tensor.meta(slot.tensor.shape, slot.tensor.dtype),
      loader: getOriginalLoader(slot.weightLoader),
    });
  }
  return out;
}

/**
 * Puts the layer back in model format on meta: removes its owned slots and registers the
 * captured ones with meta tensors and their original loaders. The current tensors are not
 * freed (the caller keeps them).
 */
export function restoreLayerOnMeta(layer: Module, meta: LayerMeta): void {
  for (const [name] of layer.ownSlots()) layer.deleteSlot(name);
  for (const [name, m] of meta) {
    m.slot.tensor = m.meta;
    m.slot.weightLoader = m.loader;
    layer.setSlot(name, m.slot);
  }
}

/**
 * Gives every owned meta slot new storage on the layer's backend (filled with the slot's
 * `initValue` when it has one); returns the bytes allocated.
 */
export function materializeLayer(layer: Module): number {
  let bytes = 0;
  for (const [name, slot] of layer.ownSlots()) {
    if (!slot.tensor.isMeta) continue;
    if (!layer.backend) {
      throw new LayerwiseError("NO_BACKEND", `${layer.typeName}.${name}: the layer has no backend`);
    }
    const t = layer.backend.empty(slot.tensor.shape, slot.tensor.dtype);
    if (slot.initValue !== undefined) layer.backend.fill(t, slot.initValue);
    slot.tensor = t;
    bytes += t.nbytes;
  }
  return bytes;
}

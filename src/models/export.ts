/**
 * Kernel tensors out of a model, under our fused names in checkpoint orientation `[out, in]`
 * (`model.layers.N.self_attn.qkv_proj.weight`, `.weight_scale`, `.bias`...), norms and
 * embeddings under their checkpoint names. Vocabulary padding rows are cut off, so an
 * embedding has the checkpoint's shape.
 * @module
 */

import type { Backend } from "../backend/backend.ts";
import { LayerwiseError } from "../errors.ts";
import type { HostTensor } from "../checkpoint/safetensors.ts";
import { writeSafetensors } from "../checkpoint/safetensors.ts";
import { VocabParallelEmbedding } from "../nn/layers.ts";
import type { Module } from "../nn/module.ts";
import { assertIdle } from "../reload/layerwise.ts";
import type { Tensor } from "../tensor/tensor.ts";
import { qualifiedName } from "../messages.ts";

/**
 * Every kernel tensor the model holds, by export name, in model order. Tied slots appear once
 * (under their owner's name); meta tensors (nothing loaded) are left out.
 */
export function kernelTensors(model: Module): [string, Tensor][] {
  // Mid-reload, layers not yet written hold shape-only placeholders: refuse rather than skip.
  assertIdle(model, "kernelTensors");
  const out: [string, Tensor][] = [];
  for (const [path, m] of model.namedModules()) {
    for (const [name, slot] of m.ownSlots()) {
      let t = slot.tensor;
      if (t.isMeta) continue;
      if (m instanceof VocabParallelEmbedding && name === "weight" && m.realRows < t.shape[0]) {
        t = t.narrow(0, 0, m.realRows);
      }
      out.push([qualifiedName(path, name), t]);
    }
  }
  return out;
}

function ownerBackend(model: Module, name: string): Backend {
  const b = model.getModule(name.slice(0, Math.max(0, name.lastIndexOf("."))))?.backend ??
    model.backend;
  if (b === undefined) {
    throw new LayerwiseError("NO_BACKEND", `${name}: the module has no backend to read it from`);
  }
  return b;
}

/** Copies every kernel tensor to the host (see {@link kernelTensors}). */
export function downloadKernelTensors(model: Module): Map<string, HostTensor> {
  const out = new Map<string, HostTensor>();
  for (const [name, t] of kernelTensors(model)) {
    const backend = ownerBackend(model, name);
    out.set(name, { dtype: t.dtype, shape: [...t.shape], data: backend.download(t) });
  }
  return out;
}

/** Writes the model's kernel tensors to `file` as safetensors. */
export async function exportKernelTensors(model: Module, file: string): Promise<void> {
  await writeSafetensors(file, downloadKernelTensors(model), { format: "layerwise-kernel" });
}

/**
 * Tensor-parallel models: rank r of N holds its shard of every layer (column-parallel layers
 * split output rows, row-parallel layers split input columns, embeddings and the LM head split
 * the padded vocabulary, KV heads are replicated when there are fewer than ranks, norms and the
 * MoE router are replicated). The layers narrow each checkpoint tensor to the rank's shard as it
 * is loaded (src/nn/layers.ts), so every rank loads and reloads from the same unsharded
 * checkpoint.
 *
 * Process model: one Deno process drives all GPUs of the host. Rank r lives on its own backend,
 * by default CUDA device ordinal r (`openRankBackends`); the CUDA library sets the device on
 * every entry point, so one JS thread can drive every rank. NCCL communicators for the ranks
 * come from `ncclCommInitAll` in the same process (src/backend/cuda/nccl.ts), and a broadcast reload
 * (src/parallel/broadcast.ts) reads the checkpoint once on the source rank. On WebAssembly, N
 * backends (N separate memories) stand in for N GPUs.
 * @module
 */

import type { Backend } from "../backend/backend.ts";
import { openCudaBackend } from "../backend/cuda/device.ts";
import { openWasmBackend } from "../backend/wasm.ts";
import { LayerwiseError } from "../errors.ts";
import type { CausalLM } from "../models/causal_lm.ts";
import type { ModelConfig } from "../models/config.ts";
import {
  buildModel,
  loadModel,
  type LoadModelOptions,
  type ModelReloadOptions,
  type ModelReloadReport,
  reloadWeights,
  type WeightsInput,
} from "../models/load.ts";
import { type QuantName, quantScheme } from "../models/quant_names.ts";
import type { QuantScheme } from "../nn/quant_method.ts";

/** Which backend kind the ranks use. */
export type RankBackendKind = "cuda" | "wasm";

function checkSize(tpSize: number): void {
  if (!Number.isSafeInteger(tpSize) || tpSize < 1) {
    throw new LayerwiseError("BAD_CONFIG", `tensor-parallel size ${tpSize} is invalid`);
  }
}

/**
 * One backend per rank: CUDA device ordinals `devices[r]` (default r), or N WebAssembly
 * backends. On error the backends opened so far are closed.
 */
export async function openRankBackends(
  tpSize: number,
  kind: RankBackendKind,
  devices?: readonly number[],
): Promise<Backend[]> {
  checkSize(tpSize);
  if (devices && devices.length !== tpSize) {
    throw new LayerwiseError("BAD_CONFIG", `${devices.length} devices given for ${tpSize} ranks`);
  }
  const out: Backend[] = [];
  try {
    for (let r = 0; r < tpSize; r++) {
      out.push(
        kind === "cuda" ? openCudaBackend({ device: devices?.[r] ?? r }) : await openWasmBackend(),
      );
    }
  } catch (e) {
    for (const b of out) b.close();
    throw e;
  }
  return out;
}

function checkBackends(backends: readonly Backend[]): number {
  checkSize(backends.length);
  return backends.length;
}

/** Builds the (meta, unloaded) model of every rank: rank r on `backends[r]`. */
export function buildTensorParallel(
  config: ModelConfig,
  backends: readonly Backend[],
  quant: QuantName | QuantScheme,
): CausalLM[] {
  const tpSize = checkBackends(backends);
  return backends.map((backend, tpRank) =>
    buildModel(config, { backend, quant: quantScheme(quant, config), tpRank, tpSize })
  );
}

/** Options of {@link loadTensorParallel}: loadModel's, less the backend and the rank. */
export type TensorParallelLoadOptions = Omit<LoadModelOptions, "backend" | "tpRank" | "tpSize">;

/**
 * First load of every rank from one checkpoint directory (each rank reads and narrows it on
 * its own; see broadcastReload for reloads that read it once). Rank r goes on `backends[r]`.
 * On error the ranks loaded so far are freed.
 */
export async function loadTensorParallel(
  dir: string,
  backends: readonly Backend[],
  options: TensorParallelLoadOptions = {},
): Promise<CausalLM[]> {
  const tpSize = checkBackends(backends);
  const models: CausalLM[] = [];
  try {
    for (let r = 0; r < tpSize; r++) {
      models.push(await loadModel(dir, { ...options, backend: backends[r], tpRank: r, tpSize }));
    }
  } catch (e) {
    for (const m of models) freeModel(m);
    throw e;
  }
  return models;
}

/**
 * Reloads every rank from the same weights, one rank after the other, each reading the source
 * itself (the simple path; broadcastReload reads once and broadcasts over NCCL).
 */
export async function reloadTensorParallel(
  models: readonly CausalLM[],
  weights: WeightsInput,
  options: ModelReloadOptions = {},
): Promise<ModelReloadReport[]> {
  const out: ModelReloadReport[] = [];
  for (const m of models) out.push(await reloadWeights(m, weights, options));
  return out;
}

/** Frees every kernel tensor storage of a model (the model must not be used afterwards). */
export function freeModel(model: CausalLM): void {
  const seen = new Set<unknown>();
  for (const [, m] of model.namedModules()) {
    for (const [, slot] of m.ownSlots()) {
      const s = slot.tensor.storage;
      if (s && !s.freed && !seen.has(s)) {
        seen.add(s);
        m.backend!.free(s);
      }
    }
  }
}

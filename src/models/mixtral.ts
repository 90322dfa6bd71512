/**
 * Mixtral and Qwen3-MoE: Llama's attention (with Qwen3's q/k norms) and a sparse MoE block: a
 * router `gate` that stays in the model dtype, and `experts`, stacked w13/w2 expert weights.
 * Mixtral calls the block `block_sparse_moe` and has it in every layer; Qwen3-MoE calls it
 * `mlp` and has a dense MLP in the layers its config leaves out of `moeLayers`.
 * @module
 */

import { ColumnParallelLinear, FusedMoE, type LayerContext } from "../nn/layers.ts";
import { Module } from "../nn/module.ts";
import type { QuantScheme } from "../nn/quant_method.ts";
import { buildCausalLM, type BuildOptions, CausalLM } from "./causal_lm.ts";
import type { ModelConfig } from "./config.ts";
import { buildDenseMlp } from "./llama.ts";
import { mixtralNameMapper, qwen3MoeNameMapper } from "./names.ts";

/** The router (replicated, never quantized, as in vLLM) and the experts, under `name`. */
export function buildMoeBlock(
  ctx: LayerContext,
  c: ModelConfig,
  quant: QuantScheme,
  name = "block_sparse_moe",
): [string, Module] {
  const moe = new Module("SparseMoeBlock");
  // The router is replicated on every rank: build it as a single-rank layer.
  const replicated: LayerContext = { ...ctx, tpRank: 0, tpSize: 1 };
  moe.addModule(
    "gate",
    new ColumnParallelLinear(replicated, c.hiddenSize, c.numExperts, { quant: "none" }),
  );
  moe.addModule(
    "experts",
    new FusedMoE(ctx, {
      numExperts: c.numExperts,
      hiddenSize: c.hiddenSize,
      intermediateSize: c.moeIntermediateSize,
      quant,
    }),
  );
  return [name, moe];
}

/** Builds a Mixtral model (meta tensors, nothing loaded). */
export function buildMixtral(config: ModelConfig, options: BuildOptions): CausalLM {
  const root = new CausalLM(config, options, mixtralNameMapper(config));
  return buildCausalLM(root, options, (ctx, c, quant) => buildMoeBlock(ctx, c, quant));
}

/** Builds a Qwen3-MoE model (meta tensors, nothing loaded). */
export function buildQwen3Moe(config: ModelConfig, options: BuildOptions): CausalLM {
  const root = new CausalLM(config, options, qwen3MoeNameMapper(config));
  const moe = new Set(config.moeLayers);
  return buildCausalLM(
    root,
    options,
    (ctx, c, quant, layer) =>
      moe.has(layer) ? buildMoeBlock(ctx, c, quant, "mlp") : buildDenseMlp(ctx, c, quant),
  );
}

/**
 * Mixtral: Llama's attention with a sparse MoE block (`block_sparse_moe.gate`, a router that
 * stays in the model dtype, and `block_sparse_moe.experts`, stacked w13/w2 expert weights).
 * @module
 */

import { ColumnParallelLinear, FusedMoE, type LayerContext } from "../nn/layers.ts";
import { Module } from "../nn/module.ts";
import type { QuantScheme } from "../nn/quant_method.ts";
import { buildCausalLM, type BuildOptions, CausalLM } from "./causal_lm.ts";
import type { ModelConfig } from "./config.ts";
import { mixtralNameMapper } from "./names.ts";

/** `block_sparse_moe`: the router (replicated, never quantized, as in vLLM) and the experts. */
export function buildMoeBlock(
  ctx: LayerContext,
  c: ModelConfig,
  quant: QuantScheme,
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
      intermediateSize: c.intermediateSize,
      quant,
    }),
  );
  return ["block_sparse_moe", moe];
}

/** Builds a Mixtral model (meta tensors, nothing loaded). */
export function buildMixtral(config: ModelConfig, options: BuildOptions): CausalLM {
  const root = new CausalLM(config, options, mixtralNameMapper(config));
  return buildCausalLM(root, options, buildMoeBlock);
}

/**
 * Llama, and the families with the same tensors: Mistral (identical), Qwen2 (q/k/v biases)
 * and Qwen3 (q_norm / k_norm, head_dim apart from hidden / heads), which the config sets. The
 * MLP is a fused gate_up_proj and a down_proj.
 * @module
 */

import { type LayerContext, MergedColumnParallelLinear, RowParallelLinear } from "../nn/layers.ts";
import { Module } from "../nn/module.ts";
import type { QuantScheme } from "../nn/quant_method.ts";
import { buildCausalLM, type BuildOptions, CausalLM } from "./causal_lm.ts";
import type { ModelConfig } from "./config.ts";
import { denseNameMapper } from "./names.ts";

/** `mlp`: gate_up_proj (shards 0 = gate, 1 = up) and down_proj. */
export function buildDenseMlp(
  ctx: LayerContext,
  c: ModelConfig,
  quant: QuantScheme,
): [string, Module] {
  const mlp = new Module("MLP");
  const bias = c.mlpBias;
  mlp.addModule(
    "gate_up_proj",
    new MergedColumnParallelLinear(ctx, c.hiddenSize, [c.intermediateSize, c.intermediateSize], {
      bias,
      quant,
    }),
  );
  mlp.addModule(
    "down_proj",
    new RowParallelLinear(ctx, c.intermediateSize, c.hiddenSize, { bias, quant }),
  );
  return ["mlp", mlp];
}

/** Builds a Llama, Mistral, Qwen2 or Qwen3 model (meta tensors, nothing loaded). */
export function buildLlama(config: ModelConfig, options: BuildOptions): CausalLM {
  const root = new CausalLM(config, options, denseNameMapper(config));
  return buildCausalLM(root, options, buildDenseMlp);
}

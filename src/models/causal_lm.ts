/**
 * What every supported family shares: the model root with vLLM's names (`model.embed_tokens`,
 * `model.layers.N`, `model.norm`, `lm_head`), the attention block, and the checkpoint-name
 * hook. Families add only their MLP.
 * @module
 */

import type { Backend } from "../backend/backend.ts";
import {
  Attention,
  type LayerContext,
  ParallelLMHead,
  QKVParallelLinear,
  RMSNorm,
  RowParallelLinear,
  VocabParallelEmbedding,
} from "../nn/layers.ts";
import { Module, type WeightTarget } from "../nn/module.ts";
import type { QuantScheme } from "../nn/quant_method.ts";
import { createQuantMethod } from "../quant/create.ts";
import type { ModelConfig } from "./config.ts";
import { layerOrderKey, type NameMapper } from "./names.ts";

/** How to build a model: where its tensors live and how its linear layers are quantized. */
export interface BuildOptions {
  /** The backend every tensor lives on. */
  readonly backend: Backend;
  /** Quantization of the linear (and expert) layers; embeddings and norms stay in the model dtype. */
  readonly quant: QuantScheme;
  /** Tensor-parallel rank of this model (default 0); see src/parallel/tp.ts. */
  readonly tpRank?: number;
  /** Tensor-parallel ranks (default 1): the model holds rank `tpRank`'s shard of every layer. */
  readonly tpSize?: number;
}

/** The root of a causal language model: `model` and `lm_head`, plus the name mapping. */
export class CausalLM extends Module {
  /** The parsed config the model was built from. */
  readonly config: ModelConfig;
  /** The quantization of the linear layers. */
  readonly quant: QuantScheme;
  /** Read-order key of a checkpoint name (see {@link layerOrderKey}). */
  readonly readOrder: (name: string) => number;
  readonly #mapper: NameMapper;

  /** An empty root; {@link buildCausalLM} fills it. */
  constructor(config: ModelConfig, options: BuildOptions, mapper: NameMapper) {
    super(config.architecture, options.backend);
    this.config = config;
    this.quant = options.quant;
    this.readOrder = layerOrderKey(config.numLayers);
    this.#mapper = mapper;
  }

  /** The backend the model lives on. */
  get device(): Backend {
    return this.backend!;
  }

  /** Checkpoint name -> module path, slot, shard and expert (null: ignored on purpose). */
  override mapCheckpointName(name: string): WeightTarget | null {
    const t = this.#mapper(name);
    if (t === null) return null;
    const dot = t.param.lastIndexOf(".");
    const target: WeightTarget = dot < 0
      ? { path: "", param: t.param }
      : { path: t.param.slice(0, dot), param: t.param.slice(dot + 1) };
    return {
      ...target,
      ...(t.shardId === undefined ? {} : { shardId: t.shardId }),
      ...(t.expertId === undefined ? {} : { expertId: t.expertId }),
    };
  }
}

/** The layer context of a model. */
export function layerContext(config: ModelConfig, options: BuildOptions): LayerContext {
  return {
    backend: options.backend,
    dtype: config.dtype,
    tpRank: options.tpRank ?? 0,
    tpSize: options.tpSize ?? 1,
    createQuantMethod,
  };
}

/**
 * `self_attn`: fused qkv_proj, o_proj, the attention layer (no KV-cache scales), and Qwen3's
 * q_norm / k_norm.
 */
export function buildAttention(ctx: LayerContext, c: ModelConfig, quant: QuantScheme): Module {
  const attn = new Module("Attention block");
  attn.addModule(
    "qkv_proj",
    new QKVParallelLinear(ctx, {
      hiddenSize: c.hiddenSize,
      headDim: c.headDim,
      numHeads: c.numHeads,
      numKvHeads: c.numKvHeads,
    }, { bias: c.qkvBias, quant }),
  );
  attn.addModule(
    "o_proj",
    new RowParallelLinear(ctx, c.numHeads * c.headDim, c.hiddenSize, { bias: c.oBias, quant }),
  );
  attn.addModule("attn", new Attention(ctx));
  if (c.qkNorm) {
    // Per-head norms (Qwen3): one weight of head_dim, the same on every rank.
    attn.addModule("q_norm", new RMSNorm(ctx, c.headDim));
    attn.addModule("k_norm", new RMSNorm(ctx, c.headDim));
  }
  return attn;
}

/**
 * Builds `model.embed_tokens`, `model.layers.N.{input_layernorm, self_attn,
 * post_attention_layernorm, <mlp>}`, `model.norm` and `lm_head` (tied to the embedding when the
 * config says so). `mlp` returns the feed-forward block of decoder layer `layer` and its name.
 */
export function buildCausalLM(
  root: CausalLM,
  options: BuildOptions,
  mlp: (ctx: LayerContext, c: ModelConfig, quant: QuantScheme, layer: number) => [string, Module],
): CausalLM {
  const c = root.config;
  const ctx = layerContext(c, options);
  const model = root.addModule("model", new Module("Model"));
  const embed = model.addModule(
    "embed_tokens",
    new VocabParallelEmbedding(ctx, c.vocabSize, c.hiddenSize),
  );
  const layers = model.addModule("layers", new Module("Layers"));
  for (let i = 0; i < c.numLayers; i++) {
    const layer = layers.addModule(String(i), new Module("DecoderLayer"));
    layer.addModule("input_layernorm", new RMSNorm(ctx, c.hiddenSize));
    layer.addModule("self_attn", buildAttention(ctx, c, options.quant));
    layer.addModule("post_attention_layernorm", new RMSNorm(ctx, c.hiddenSize));
    const [name, block] = mlp(ctx, c, options.quant, i);
    layer.addModule(name, block);
  }
  model.addModule("norm", new RMSNorm(ctx, c.hiddenSize));
  if (c.tieWordEmbeddings) {
    const head = root.addModule("lm_head", new Module("ParallelLMHead (tied)"));
    head.tie("weight", embed.slot("weight"));
  } else {
    root.addModule("lm_head", new ParallelLMHead(ctx, c.vocabSize, c.hiddenSize));
  }
  return root;
}

/**
 * Checkpoint names -> model parameters. A Hugging Face checkpoint stores `q_proj`, `k_proj`,
 * `v_proj`, `gate_proj`, `up_proj` and per-expert `w1/w2/w3` separately; the model holds them
 * fused (`qkv_proj`, `gate_up_proj`, stacked experts), as vLLM does. Each name maps to the
 * fused parameter plus the shard (and expert) it fills.
 * @module
 */

/** Where one checkpoint tensor goes in the model. */
export interface ParamTarget {
  /** The model parameter's full name, e.g. `model.layers.0.self_attn.qkv_proj.weight`. */
  readonly param: string;
  /** The shard of a fused parameter: `q`/`k`/`v`, `0`/`1`, or `w1`/`w2`/`w3` for experts. */
  readonly shardId?: string | number;
  /** The expert of a stacked MoE parameter. */
  readonly expertId?: number;
}

/** Maps a checkpoint name to its target, or to null for a tensor the model ignores on purpose. */
export type NameMapper = (name: string) => ParamTarget | null;

// Rotary tables are recomputed by inference engines; old checkpoints still carry them.
const IGNORED = /(^|\.)rotary_emb\.(inv_freq|cos_cached|sin_cached)$/;

const STACKED: readonly (readonly [string, string, string | number])[] = [
  [".q_proj.", ".qkv_proj.", "q"],
  [".k_proj.", ".qkv_proj.", "k"],
  [".v_proj.", ".qkv_proj.", "v"],
  [".gate_proj.", ".gate_up_proj.", 0],
  [".up_proj.", ".gate_up_proj.", 1],
];

/** Options of {@link denseNameMapper}. */
export interface DenseMapperOptions {
  /** lm_head shares the embedding: a checkpoint's `lm_head.weight` is ignored, as vLLM does. */
  tieWordEmbeddings: boolean;
}

/** The mapping of the dense families (Llama, Mistral, Qwen2). */
export function denseNameMapper(options: DenseMapperOptions): NameMapper {
  return (name: string): ParamTarget | null => {
    if (IGNORED.test(name)) return null;
    if (options.tieWordEmbeddings && name === "lm_head.weight") return null;
    for (const [from, to, shardId] of STACKED) {
      if (name.includes(from)) return { param: name.replace(from, to), shardId };
    }
    return { param: name };
  };
}

// Ids in canonical decimal only: `experts.01` must not land on the slot of `experts.1`.
const EXPERT = /^(.*\.experts)\.(0|[1-9]\d*)\.(w[123])\.(\w+)$/;

/**
 * Names of the stacked expert parameters: w1 and w3 share `w13_<suffix>` (gate and up, in that
 * order), w2 has `w2_<suffix>`, as in vLLM's FusedMoE.
 */
export function expertParamName(prefix: string, shard: "w1" | "w2" | "w3", suffix: string): string {
  return `${prefix}.${shard === "w2" ? "w2" : "w13"}_${suffix}`;
}

/** The mapping of Mixtral: the dense one plus `experts.E.wN.*` -> stacked experts. */
export function mixtralNameMapper(options: DenseMapperOptions): NameMapper {
  const dense = denseNameMapper(options);
  return (name: string): ParamTarget | null => {
    const m = EXPERT.exec(name);
    if (m === null) return dense(name);
    const shard = m[3] as "w1" | "w2" | "w3";
    return {
      param: expertParamName(m[1], shard, m[4]),
      shardId: shard,
      expertId: Number(m[2]),
    };
  };
}

const LAYER = /^model\.layers\.(0|[1-9]\d*)\./;

/**
 * A read-order key for a checkpoint (or model) name: the embedding first, then each decoder
 * layer in turn, then the final norm and lm_head; anything else last. Reads sorted by it keep
 * one layer's scratch in memory whatever the order of tensors in the files.
 */
export function layerOrderKey(numLayers: number): (name: string) => number {
  return (name: string): number => {
    const m = LAYER.exec(name);
    if (m !== null) return Number(m[1]) + 1;
    if (name.startsWith("model.embed_tokens.")) return 0;
    if (name.startsWith("model.norm.") || name.startsWith("lm_head.")) return numLayers + 1;
    return numLayers + 2;
  };
}

/** The sizes {@link expectedCheckpointNames} needs (a subset of ModelConfig). */
export interface NamingConfig {
  /** Decoder layers. */
  readonly numLayers: number;
  /** Whether lm_head shares the embedding. */
  readonly tieWordEmbeddings: boolean;
  /** q/k/v biases. */
  readonly qkvBias: boolean;
  /** o_proj bias. */
  readonly oBias: boolean;
  /** MLP biases. */
  readonly mlpBias: boolean;
  /** MoE experts per layer (0: dense MLP). */
  readonly numExperts: number;
}

/**
 * Every tensor a Hugging Face checkpoint of this config holds, by checkpoint name, so that a
 * missing one can be named as the checkpoint would name it.
 */
export function expectedCheckpointNames(c: NamingConfig): string[] {
  const out = ["model.embed_tokens.weight"];
  for (let i = 0; i < c.numLayers; i++) {
    const p = `model.layers.${i}`;
    out.push(`${p}.input_layernorm.weight`, `${p}.post_attention_layernorm.weight`);
    for (const x of ["q", "k", "v"]) {
      out.push(`${p}.self_attn.${x}_proj.weight`);
      if (c.qkvBias) out.push(`${p}.self_attn.${x}_proj.bias`);
    }
    out.push(`${p}.self_attn.o_proj.weight`);
    if (c.oBias) out.push(`${p}.self_attn.o_proj.bias`);
    if (c.numExperts > 0) {
      out.push(`${p}.block_sparse_moe.gate.weight`);
      for (let e = 0; e < c.numExperts; e++) {
        for (const w of ["w1", "w2", "w3"]) {
          out.push(`${p}.block_sparse_moe.experts.${e}.${w}.weight`);
        }
      }
    } else {
      for (const x of ["gate", "up", "down"]) {
        out.push(`${p}.mlp.${x}_proj.weight`);
        if (c.mlpBias) out.push(`${p}.mlp.${x}_proj.bias`);
      }
    }
  }
  out.push("model.norm.weight");
  if (!c.tieWordEmbeddings) out.push("lm_head.weight");
  return out;
}

/**
 * The canonical spelling of a checkpoint name: leading zeros dropped from every numeric
 * component (`model.layers.01.x` -> `model.layers.1.x`). A name that differs from its canonical
 * spelling would alias another tensor's slot wherever an id is parsed as a number.
 */
export function canonicalName(name: string): string {
  if (!/(^|\.)0\d/.test(name)) return name;
  return name.split(".").map((c) => (/^\d+$/.test(c) ? c.replace(/^0+(?=\d)/, "") : c)).join(".");
}

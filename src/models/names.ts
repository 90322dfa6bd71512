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

/**
 * Block-fp8 checkpoints (DeepSeek-V3, Qwen3-FP8) call a weight's block scales
 * `weight_scale_inv`, though they multiply like every other scale: the model keeps them under
 * `weight_scale`, the name of its kernel tensor (ARCHITECTURE.md, "Block-fp8 checkpoints").
 */
export function scaleName(name: string): string {
  return name.endsWith(".weight_scale_inv") ? name.slice(0, -4) : name;
}

/** The mapping of the dense families (Llama, Mistral, Qwen2, Qwen3). */
export function denseNameMapper(options: DenseMapperOptions): NameMapper {
  return (checkpointName: string): ParamTarget | null => {
    if (IGNORED.test(checkpointName)) return null;
    const name = scaleName(checkpointName);
    if (options.tieWordEmbeddings && name === "lm_head.weight") return null;
    for (const [from, to, shardId] of STACKED) {
      if (name.includes(from)) return { param: name.replace(from, to), shardId };
    }
    return { param: name };
  };
}

// Ids in canonical decimal only: `experts.01` must not land on the slot of `experts.1`.
const EXPERT = /^(.*\.experts)\.(0|[1-9]\d*)\.(w[123])\.(\w+)$/;
const NAMED_EXPERT = /^(.*\.experts)\.(0|[1-9]\d*)\.(gate|up|down)_proj\.(\w+)$/;
const NAMED_SHARD = { gate: "w1", up: "w3", down: "w2" } as const;
// transformers 5 holds every expert of a layer in two parameters (no `.weight` suffix):
// gate_up_proj [E, 2I, H] (gate rows, then up) and down_proj [E, H, I].
const MERGED_EXPERTS = /^(.*\.experts)\.(gate_up_proj|down_proj)$/;

function mergedExperts(name: string): ParamTarget | null {
  const m = MERGED_EXPERTS.exec(name);
  if (m === null) return null;
  const shard = m[2] === "gate_up_proj" ? "w13" : "w2";
  return { param: `${m[1]}.${shard}_weight`, shardId: shard };
}

/**
 * Names of the stacked expert parameters: w1 and w3 share `w13_<suffix>` (gate and up, in that
 * order), w2 has `w2_<suffix>`, as in vLLM's FusedMoE.
 */
export function expertParamName(prefix: string, shard: "w1" | "w2" | "w3", suffix: string): string {
  return `${prefix}.${shard === "w2" ? "w2" : "w13"}_${suffix}`;
}

// transformers 5 names Mixtral's sparse block `mlp`, as Qwen3-MoE's.
const MIXTRAL_V5 = /^(model\.layers\.\d+)\.mlp\.(gate\.|experts\.)/;

/**
 * The mapping of Mixtral: the dense one plus `experts.E.wN.*` -> stacked experts, and the
 * merged expert parameters of transformers 5 (under `block_sparse_moe` or `mlp`).
 */
export function mixtralNameMapper(options: DenseMapperOptions): NameMapper {
  const dense = denseNameMapper(options);
  return (checkpointName: string): ParamTarget | null => {
    const name = scaleName(checkpointName).replace(MIXTRAL_V5, "$1.block_sparse_moe.$2");
    const merged = mergedExperts(name);
    if (merged !== null) return merged;
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

/**
 * The mapping of Qwen3-MoE: the dense one (attention, dense layers, the router `mlp.gate`)
 * plus `mlp.experts.E.{gate,up,down}_proj.*` -> stacked experts (w1, w3, w2), and the merged
 * expert parameters of transformers 5.
 */
export function qwen3MoeNameMapper(options: DenseMapperOptions): NameMapper {
  const dense = denseNameMapper(options);
  return (checkpointName: string): ParamTarget | null => {
    const name = scaleName(checkpointName);
    const merged = mergedExperts(name);
    if (merged !== null) return merged;
    const m = NAMED_EXPERT.exec(name);
    if (m === null) return dense(checkpointName);
    const shard = NAMED_SHARD[m[3] as keyof typeof NAMED_SHARD];
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
  /** The family: it decides how experts are named. */
  readonly architecture: string;
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
  /** Layers with experts (the others have a dense MLP). */
  readonly moeLayers: readonly number[];
  /** Per-head q_norm / k_norm. */
  readonly qkNorm: boolean;
}

/**
 * Every tensor a Hugging Face checkpoint of this config holds, by checkpoint name, so that a
 * missing one can be named as the checkpoint would name it. A layer whose experts `present`
 * holds merged (transformers 5: `experts.gate_up_proj`, `experts.down_proj`) expects them so.
 */
export function expectedCheckpointNames(
  c: NamingConfig,
  present: ReadonlySet<string> = new Set(),
): string[] {
  const out = ["model.embed_tokens.weight"];
  const mixtral = c.architecture === "MixtralForCausalLM";
  const moe = new Set(c.moeLayers);
  for (let i = 0; i < c.numLayers; i++) {
    const p = `model.layers.${i}`;
    out.push(`${p}.input_layernorm.weight`, `${p}.post_attention_layernorm.weight`);
    for (const x of ["q", "k", "v"]) {
      out.push(`${p}.self_attn.${x}_proj.weight`);
      if (c.qkvBias) out.push(`${p}.self_attn.${x}_proj.bias`);
    }
    out.push(`${p}.self_attn.o_proj.weight`);
    if (c.oBias) out.push(`${p}.self_attn.o_proj.bias`);
    if (c.qkNorm) out.push(`${p}.self_attn.q_norm.weight`, `${p}.self_attn.k_norm.weight`);
    if (c.numExperts > 0 && moe.has(i)) {
      const v5 = `${p}.mlp.experts`;
      const block = mixtral && !present.has(`${v5}.gate_up_proj`) ? "block_sparse_moe" : "mlp";
      out.push(`${p}.${block}.gate.weight`);
      const experts = `${p}.${block}.experts`;
      if (present.has(`${experts}.gate_up_proj`) || present.has(`${experts}.down_proj`)) {
        out.push(`${experts}.gate_up_proj`, `${experts}.down_proj`);
        continue;
      }
      const shards = mixtral ? ["w1", "w2", "w3"] : ["gate_proj", "up_proj", "down_proj"];
      for (let e = 0; e < c.numExperts; e++) {
        for (const w of shards) out.push(`${experts}.${e}.${w}.weight`);
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

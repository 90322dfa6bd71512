/**
 * Hugging Face `config.json` -> the few numbers that decide a model's tensors. Only what
 * changes shapes, names or dtypes is read; everything else (rope, dropout...) is ignored.
 * @module
 */

import { readBoundedText } from "../checkpoint/files.ts";
import { parseStrictJson } from "../checkpoint/json.ts";
import { CheckpointError, ConfigError } from "../errors.ts";
import { describeValue, listNames, pathText, quoteName } from "../messages.ts";
import { type DType, dtypeOf, isModelFloat } from "../tensor/dtype.ts";

/** The architectures this package builds, as `config.json` names them. */
export const ARCHITECTURES: readonly string[] = Object.freeze([
  "LlamaForCausalLM",
  "Qwen2ForCausalLM",
  "MistralForCausalLM",
  "MixtralForCausalLM",
  "Qwen3ForCausalLM",
  "Qwen3MoeForCausalLM",
]);

/** One of {@link ARCHITECTURES}. */
export type Architecture =
  | "LlamaForCausalLM"
  | "Qwen2ForCausalLM"
  | "MistralForCausalLM"
  | "MixtralForCausalLM"
  | "Qwen3ForCausalLM"
  | "Qwen3MoeForCausalLM";

/**
 * How the checkpoint says its weights are stored (`quantization_config`): fp8 e4m3 with one
 * scale per tensor (`weightBlockSize` null) or per block of `weightBlockSize` (DeepSeek-V3 and
 * Qwen3-FP8 ship [128, 128], with `weight_scale_inv` tensors).
 */
export interface CheckpointQuantization {
  /** `quant_method`; only fp8 is read. */
  readonly method: "fp8";
  /** `weight_block_size` as [rows, cols], or null for one scale per tensor. */
  readonly weightBlockSize: readonly [number, number] | null;
}

/** The parts of a config that fix the model's tensors. */
export interface ModelConfig {
  /** Which family builds the model. */
  readonly architecture: Architecture;
  /** Element type of the model-format weights (`dtype`, or the older `torch_dtype`). */
  readonly dtype: DType;
  /** Width of the residual stream. */
  readonly hiddenSize: number;
  /** MLP width (per expert for MoE models). */
  readonly intermediateSize: number;
  /** Number of decoder layers. */
  readonly numLayers: number;
  /** Query heads. */
  readonly numHeads: number;
  /** Key/value heads (grouped-query attention); defaults to `numHeads`. */
  readonly numKvHeads: number;
  /** Size of one head; defaults to hidden / heads. */
  readonly headDim: number;
  /** Rows of the embedding and of the lm_head. */
  readonly vocabSize: number;
  /** Whether lm_head shares the embedding's tensor. */
  readonly tieWordEmbeddings: boolean;
  /** Whether q/k/v projections have biases (always for Qwen2, `attention_bias` otherwise). */
  readonly qkvBias: boolean;
  /** Whether o_proj has a bias (Llama's `attention_bias` covers it too). */
  readonly oBias: boolean;
  /** Whether the MLP projections have biases (Llama's `mlp_bias`). */
  readonly mlpBias: boolean;
  /** RMSNorm epsilon (kept for completeness; the reload does not use it). */
  readonly rmsNormEps: number;
  /** MoE experts per layer; 0 for dense models. */
  readonly numExperts: number;
  /** Experts chosen per token; 0 for dense models. */
  readonly numExpertsPerToken: number;
  /** Rows of one expert's gate/up (Qwen3-MoE's `moe_intermediate_size`; Mixtral's MLP width). */
  readonly moeIntermediateSize: number;
  /** Decoder layers with experts (the others have a dense MLP); empty for dense models. */
  readonly moeLayers: readonly number[];
  /** Whether attention has per-head `q_norm` / `k_norm` weights of `headDim` (Qwen3). */
  readonly qkNorm: boolean;
  /** The checkpoint's own quantization, or null for model-dtype weights. */
  readonly quantization: CheckpointQuantization | null;
}

type Json = Record<string, unknown>;

/**
 * A size field of `config.json`. Sizes decide how much a model costs to build before any
 * checkpoint byte is read, so each is bounded twice before building: by a plain limit `max`
 * when the config is parsed, and by the checkpoint's headers (see
 * {@link checkConfigAgainstCheckpoint}) so that building costs time and memory in proportion
 * to the checkpoint, never to a number someone typed.
 */
export interface SizeField {
  /** The field's name in `config.json`. */
  readonly field: string;
  /** The {@link ModelConfig} property it sets. */
  readonly key: keyof ModelConfig;
  /** Largest value accepted at all (far above any real model). */
  readonly max: number;
  /**
   * How the checkpoint bounds it. `dim`: the value is (a part of) a tensor dimension, so it is
   * at most the largest dimension of any checkpoint tensor. `count`: the model holds at least
   * one checkpoint tensor per unit (per layer, per expert of a layer), so the product of the
   * count fields is at most the number of checkpoint tensors. `none`: bounded by another field.
   */
  readonly bound: "dim" | "count" | "none";
  /** For a `count` field, what one unit is, for messages (`layer`, `expert`). */
  readonly unit?: string;
}

/** The size fields, in the order they are checked (a field is read only when present). */
export const SIZE_FIELDS: readonly SizeField[] = Object.freeze(
  [
    { field: "hidden_size", key: "hiddenSize", max: 1 << 20, bound: "dim" },
    { field: "num_attention_heads", key: "numHeads", max: 1 << 14, bound: "dim" },
    { field: "num_key_value_heads", key: "numKvHeads", max: 1 << 14, bound: "dim" },
    { field: "head_dim", key: "headDim", max: 1 << 16, bound: "dim" },
    { field: "intermediate_size", key: "intermediateSize", max: 1 << 22, bound: "dim" },
    { field: "vocab_size", key: "vocabSize", max: 1 << 24, bound: "dim" },
    {
      field: "num_hidden_layers",
      key: "numLayers",
      max: 1 << 14,
      bound: "count",
      unit: "layer",
    },
    {
      field: "num_local_experts",
      key: "numExperts",
      max: 1 << 16,
      bound: "count",
      unit: "expert",
    },
    // Released Qwen3-MoE configs name the same number num_experts: bounded with it.
    { field: "num_experts", key: "numExperts", max: 1 << 16, bound: "none" },
    { field: "num_experts_per_tok", key: "numExpertsPerToken", max: 1 << 16, bound: "none" },
    {
      field: "moe_intermediate_size",
      key: "moeIntermediateSize",
      max: 1 << 22,
      bound: "dim",
    },
  ] as const,
);

/** Products of size fields that are one tensor dimension (q_proj's rows, k_proj's rows). */
export const DIM_PRODUCTS: readonly (readonly [string, string])[] = Object.freeze(
  [
    ["num_attention_heads", "head_dim"],
    ["num_key_value_heads", "head_dim"],
  ] as const,
);

const SIZE_LIMITS: ReadonlyMap<string, SizeField> = new Map(SIZE_FIELDS.map((f) => [f.field, f]));

function bad(file: string, field: string, what: string): never {
  throw new ConfigError("BAD_CONFIG", `${pathText(file)}: field ${field} ${what}`);
}

function present(cfg: Json, field: string): boolean {
  return Object.hasOwn(cfg, field) && cfg[field] !== null && cfg[field] !== undefined;
}

function int(cfg: Json, field: string, file: string, fallback?: number): number {
  if (!present(cfg, field)) {
    if (fallback !== undefined) return fallback;
    bad(file, field, "is missing");
  }
  const v = cfg[field];
  const max = SIZE_LIMITS.get(field)?.max ?? Number.MAX_SAFE_INTEGER;
  if (typeof v === "number" && Number.isInteger(v) && v > max) {
    bad(file, field, `is ${v}, more than the limit of ${max}`);
  }
  if (typeof v !== "number" || !Number.isSafeInteger(v) || v <= 0) {
    bad(file, field, `is ${describeValue(v)}, expected a positive integer`);
  }
  return v;
}

function bool(cfg: Json, field: string, file: string, fallback: boolean): boolean {
  if (!present(cfg, field)) return fallback;
  const v = cfg[field];
  if (typeof v !== "boolean") bad(file, field, `is ${describeValue(v)}, expected true or false`);
  return v;
}

function num(cfg: Json, field: string, file: string, fallback: number): number {
  if (!present(cfg, field)) return fallback;
  const v = cfg[field];
  if (typeof v !== "number" || !Number.isFinite(v)) {
    bad(file, field, `is ${describeValue(v)}, expected a number`);
  }
  return v;
}

function intList(cfg: Json, field: string, file: string): number[] {
  if (!present(cfg, field)) return [];
  const v = cfg[field];
  if (
    !Array.isArray(v) || v.some((x) => typeof x !== "number" || !Number.isSafeInteger(x) || x < 0)
  ) {
    bad(file, field, `is ${JSON.stringify(v)}, expected a list of layer indices`);
  }
  return v as number[];
}

/** Experts per layer: `num_experts` (released Qwen3-MoE configs) or `num_local_experts`. */
function expertCount(cfg: Json, file: string): number {
  const a = present(cfg, "num_experts") ? int(cfg, "num_experts", file) : undefined;
  const b = present(cfg, "num_local_experts") ? int(cfg, "num_local_experts", file) : undefined;
  if (a !== undefined && b !== undefined && a !== b) {
    bad(file, "num_local_experts", `is ${b} but num_experts is ${a}`);
  }
  const n = a ?? b;
  if (n === undefined) bad(file, "num_experts", "is missing (nor is there a num_local_experts)");
  return n;
}

function quantization(cfg: Json, file: string): CheckpointQuantization | null {
  if (!present(cfg, "quantization_config")) return null;
  const q = cfg.quantization_config as Json;
  if (typeof q !== "object" || Array.isArray(q)) {
    bad(file, "quantization_config", "is not an object");
  }
  if (q.quant_method !== "fp8") {
    bad(
      file,
      "quantization_config.quant_method",
      `is ${JSON.stringify(q.quant_method)}: only fp8 checkpoints are supported`,
    );
  }
  if (present(q, "fmt") && q.fmt !== "e4m3") {
    bad(file, "quantization_config.fmt", `is ${JSON.stringify(q.fmt)}, expected e4m3`);
  }
  if (!present(q, "weight_block_size")) return { method: "fp8", weightBlockSize: null };
  const b = q.weight_block_size;
  if (!Array.isArray(b) || b.length !== 2 || b[0] !== 128 || b[1] !== 128) {
    bad(
      file,
      "quantization_config.weight_block_size",
      `is ${JSON.stringify(b)}: only [128, 128] blocks are supported`,
    );
  }
  return { method: "fp8", weightBlockSize: [128, 128] };
}

/** Options for {@link parseModelConfig}. */
export interface ParseConfigOptions {
  /** Name of the file for messages (default `config.json`). */
  file?: string;
  /** Overrides the config's dtype (and makes it optional). */
  dtype?: DType;
}

/**
 * Validates a parsed `config.json` object. Throws CheckpointError `BAD_CONFIG` naming the
 * file and the field for an unknown architecture or a missing or malformed field.
 */
export function parseModelConfig(json: unknown, options: ParseConfigOptions = {}): ModelConfig {
  const file = options.file ?? "config.json";
  if (typeof json !== "object" || json === null || Array.isArray(json)) {
    throw new ConfigError("BAD_CONFIG", `${pathText(file)}: expected a JSON object`);
  }
  const cfg = json as Json;
  const archs = cfg.architectures;
  if (!present(cfg, "architectures")) {
    bad(file, "architectures", 'is missing, expected e.g. ["LlamaForCausalLM"]');
  }
  if (!Array.isArray(archs) || archs.length === 0 || !archs.every((a) => typeof a === "string")) {
    bad(
      file,
      "architectures",
      `is ${describeValue(archs)}, expected a non-empty list of names such as ["LlamaForCausalLM"]`,
    );
  }
  const architecture = archs.find((a) => ARCHITECTURES.includes(a as string)) as
    | Architecture
    | undefined;
  if (architecture === undefined) {
    bad(
      file,
      "architectures",
      `is [${listNames(archs as string[], 3)}]: not supported (supported: ${
        ARCHITECTURES.join(", ")
      })`,
    );
  }

  let dtype = options.dtype;
  if (dtype === undefined) {
    const field = present(cfg, "dtype") ? "dtype" : "torch_dtype";
    if (!present(cfg, field)) bad(file, "dtype", "is missing (nor is there a torch_dtype)");
    const name = cfg[field];
    const d = typeof name === "string" ? dtypeOf(name) : undefined;
    if (d === undefined || !isModelFloat(d)) {
      bad(file, field, `is ${describeValue(name)}, expected bfloat16, float16 or float32`);
    }
    dtype = d;
  }

  const hiddenSize = int(cfg, "hidden_size", file);
  const numHeads = int(cfg, "num_attention_heads", file);
  const numKvHeads = int(cfg, "num_key_value_heads", file, numHeads);
  if (numHeads % numKvHeads !== 0) {
    bad(
      file,
      "num_key_value_heads",
      `is ${numKvHeads}, which does not divide num_attention_heads ${numHeads}`,
    );
  }
  if (!present(cfg, "head_dim") && hiddenSize % numHeads !== 0) {
    bad(
      file,
      "head_dim",
      `is missing and hidden_size ${hiddenSize} is not a multiple of ${numHeads}`,
    );
  }
  const headDim = int(cfg, "head_dim", file, hiddenSize / numHeads);

  const qwen3 = architecture === "Qwen3ForCausalLM" || architecture === "Qwen3MoeForCausalLM";
  const moe = architecture === "MixtralForCausalLM" || architecture === "Qwen3MoeForCausalLM";
  const llamaLike = architecture === "LlamaForCausalLM";
  // Qwen3's attention_bias covers q/k/v and o, as Llama's does.
  const attentionBias = llamaLike || qwen3 ? bool(cfg, "attention_bias", file, false) : false;
  const numExperts = moe ? expertCount(cfg, file) : 0;
  const numExpertsPerToken = moe ? int(cfg, "num_experts_per_tok", file) : 0;
  if (numExpertsPerToken > numExperts) {
    bad(
      file,
      "num_experts_per_tok",
      `is ${numExpertsPerToken}, more than the ${numExperts} experts`,
    );
  }
  const intermediateSize = int(cfg, "intermediate_size", file);
  const numLayers = int(cfg, "num_hidden_layers", file);
  let moeLayers: number[] = [];
  if (architecture === "MixtralForCausalLM") {
    moeLayers = Array.from({ length: numLayers }, (_, i) => i);
  } else if (moe) {
    // vLLM's and transformers' rule: experts unless listed in mlp_only_layers, every
    // decoder_sparse_step-th layer.
    const dense = new Set(intList(cfg, "mlp_only_layers", file));
    const step = int(cfg, "decoder_sparse_step", file, 1);
    moeLayers = Array.from({ length: numLayers }, (_, i) => i).filter((i) =>
      !dense.has(i) && (i + 1) % step === 0
    );
  }
  return Object.freeze({
    architecture,
    dtype,
    hiddenSize,
    intermediateSize,
    numLayers,
    numHeads,
    numKvHeads,
    headDim,
    vocabSize: int(cfg, "vocab_size", file),
    // Every supported family's own config class defaults this to false.
    tieWordEmbeddings: bool(cfg, "tie_word_embeddings", file, false),
    qkvBias: architecture === "Qwen2ForCausalLM" ? true : attentionBias,
    oBias: attentionBias,
    mlpBias: llamaLike ? bool(cfg, "mlp_bias", file, false) : false,
    rmsNormEps: num(cfg, "rms_norm_eps", file, 1e-6),
    numExperts,
    numExpertsPerToken,
    moeIntermediateSize: architecture === "Qwen3MoeForCausalLM"
      ? int(cfg, "moe_intermediate_size", file)
      : moe
      ? intermediateSize
      : 0,
    moeLayers: Object.freeze(moeLayers),
    qkNorm: qwen3,
    quantization: quantization(cfg, file),
  });
}

/** Largest `config.json` read (real ones are a few kilobytes). */
export const MAX_CONFIG_BYTES: number = 16 << 20;

/**
 * Reads `<dir>/config.json` and parses it with {@link parseModelConfig}. Only a regular file of
 * at most {@link MAX_CONFIG_BYTES} is read (a FIFO or `/dev/zero` is refused before reading).
 * Throws ConfigError `NO_CONFIG` or `BAD_CONFIG`.
 */
export async function readModelConfig(
  dir: string,
  options: Omit<ParseConfigOptions, "file"> = {},
): Promise<ModelConfig> {
  const file = `${dir.replace(/\/+$/, "")}/config.json`;
  let text: string;
  try {
    text = await readBoundedText(file, MAX_CONFIG_BYTES, "NO_CONFIG", "a JSON file");
  } catch (e) {
    // Whatever the reader found (missing, a FIFO, too large, not UTF-8): no usable config.
    if (e instanceof CheckpointError) throw new ConfigError("NO_CONFIG", e.message);
    throw e;
  }
  // JSON.parse keeps the last of a key given twice, so a second "num_hidden_layers" would pass
  // silently: the strict reader of the checkpoint's own JSON files looks first.
  try {
    parseStrictJson(text, file, {
      syntaxCode: "BAD_CONFIG",
      what: "config.json",
      duplicate: (key, owner) => {
        throw new ConfigError(
          "BAD_CONFIG",
          `${pathText(file)}: key ${quoteName(key)} appears twice${
            owner === null ? "" : ` under ${quoteName(owner)}`
          }`,
        );
      },
    });
  } catch (e) {
    if (e instanceof ConfigError || !(e instanceof CheckpointError)) throw e;
    throw new ConfigError("BAD_CONFIG", e.message);
  }
  return parseModelConfig(JSON.parse(text), { ...options, file });
}

/** What {@link checkConfigAgainstCheckpoint} needs of each checkpoint tensor. */
export interface TensorShapeInfo {
  /** Sizes of each dimension. */
  readonly shape: readonly number[];
}

/**
 * Checks the config's size fields against the checkpoint it will load ({@link SIZE_FIELDS}):
 * every `dim` field (and product in {@link DIM_PRODUCTS}) is at most the largest dimension of
 * any checkpoint tensor, and the product of the `count` fields is at most the number of
 * checkpoint tensors (a 3-D tensor counting as its first dimension: stacked experts). Run
 * before building the model, it makes building cost in proportion to the checkpoint. Throws
 * ConfigError `CONFIG_CHECKPOINT_MISMATCH` naming the file, the field and the checkpoint. Costs
 * one pass over the tensors' shapes.
 */
export function checkConfigAgainstCheckpoint(
  config: ModelConfig,
  tensors: Iterable<TensorShapeInfo>,
  checkpoint: string,
  file = "config.json",
): void {
  let count = 0, maxDim = 0;
  for (const t of tensors) {
    // A 3-D tensor stacks one unit per row of its first dimension (transformers 5's merged
    // experts hold every expert of a layer in two tensors), which its bytes pay for.
    count += t.shape.length === 3 ? t.shape[0] : 1;
    for (const d of t.shape) if (d > maxDim) maxDim = d;
  }
  const fail = (what: string): never => {
    throw new ConfigError("CONFIG_CHECKPOINT_MISMATCH", `${pathText(file)}: ${what}`);
  };
  const value = (f: SizeField): number => config[f.key] as number;
  const byField = new Map(SIZE_FIELDS.map((f) => [f.field, f]));
  for (const f of SIZE_FIELDS) {
    if (f.bound === "dim" && value(f) > maxDim) {
      fail(
        `field ${f.field} is ${value(f)}, larger than any dimension of a tensor in ${
          pathText(checkpoint)
        } (largest: ${maxDim})`,
      );
    }
  }
  for (const [a, b] of DIM_PRODUCTS) {
    const fa = byField.get(a), fb = byField.get(b);
    if (fa === undefined || fb === undefined) continue;
    const p = value(fa) * value(fb);
    if (p > maxDim) {
      fail(
        `fields ${a} x ${b} are ${value(fa)} x ${
          value(fb)
        } = ${p}, larger than any dimension of a tensor in ${
          pathText(checkpoint)
        } (largest: ${maxDim})`,
      );
    }
  }
  const counts = SIZE_FIELDS.filter((f) => f.bound === "count" && value(f) > 0);
  const product = counts.reduce((a, f) => a * value(f), 1);
  if (product > count) {
    fail(
      `${counts.length === 1 ? "field" : "fields"} ${counts.map((f) => f.field).join(" x ")} ${
        counts.length === 1 ? "is" : "are"
      } ${counts.map(value).join(" x ")}, but ${pathText(checkpoint)} holds ${count} tensor${
        count === 1 ? "" : "s"
      } (the model needs at least one per ${
        counts.map((f) => f.unit ?? f.field).join(" of each ")
      })`,
    );
  }
}

/**
 * Hugging Face `config.json` -> the few numbers that decide a model's tensors. Only what
 * changes shapes, names or dtypes is read; everything else (rope, dropout...) is ignored.
 * @module
 */

import { readBoundedText } from "../checkpoint/files.ts";
import { CheckpointError, ConfigError } from "../errors.ts";
import { describeValue, listNames, pathText } from "../messages.ts";
import { type DType, dtypeOf, isModelFloat } from "../tensor/dtype.ts";

/** The architectures this package builds, as `config.json` names them. */
export const ARCHITECTURES: readonly string[] = Object.freeze([
  "LlamaForCausalLM",
  "Qwen2ForCausalLM",
  "MistralForCausalLM",
  "MixtralForCausalLM",
]);

/** One of {@link ARCHITECTURES}. */
export type Architecture =
  | "LlamaForCausalLM"
  | "Qwen2ForCausalLM"
  | "MistralForCausalLM"
  | "MixtralForCausalLM";

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
    { field: "num_experts_per_tok", key: "numExpertsPerToken", max: 1 << 16, bound: "none" },
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

  const moe = architecture === "MixtralForCausalLM";
  const llamaLike = architecture === "LlamaForCausalLM";
  const attentionBias = llamaLike ? bool(cfg, "attention_bias", file, false) : false;
  const numExperts = moe ? int(cfg, "num_local_experts", file) : 0;
  const numExpertsPerToken = moe ? int(cfg, "num_experts_per_tok", file) : 0;
  if (numExpertsPerToken > numExperts) {
    bad(
      file,
      "num_experts_per_tok",
      `is ${numExpertsPerToken}, more than num_local_experts ${numExperts}`,
    );
  }
  return Object.freeze({
    architecture,
    dtype,
    hiddenSize,
    intermediateSize: int(cfg, "intermediate_size", file),
    numLayers: int(cfg, "num_hidden_layers", file),
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
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new ConfigError(
      "BAD_CONFIG",
      `${pathText(file)}: not valid JSON (${(e as Error).message.slice(0, 200)})`,
    );
  }
  return parseModelConfig(json, { ...options, file });
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
 * checkpoint tensors. Run before building the model, it makes building cost in proportion to
 * the checkpoint. Throws ConfigError `CONFIG_CHECKPOINT_MISMATCH` naming the file, the field
 * and the checkpoint. Costs one pass over the tensors' shapes.
 */
export function checkConfigAgainstCheckpoint(
  config: ModelConfig,
  tensors: Iterable<TensorShapeInfo>,
  checkpoint: string,
  file = "config.json",
): void {
  let count = 0, maxDim = 0;
  for (const t of tensors) {
    count++;
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

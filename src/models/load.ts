/**
 * The model API: `loadModel(dir, options)` builds a model from a Hugging Face directory and
 * loads it; `reloadWeights(model, source, options)` reloads it in place, layer by layer;
 * `exportKernelTensors(model, file)` writes what the kernels see.
 * @module
 */

import type { Backend } from "../backend/backend.ts";
import { type BackendChoice, openBackend } from "../backend/select.ts";
import { openWeightSource, type TensorPairs, type WeightSource } from "../checkpoint/source.ts";
import type { StagingOptions } from "../backend/cuda/staging_plan.ts";
import { LayerwiseError } from "../errors.ts";
import type { QuantScheme } from "../nn/quant_method.ts";
import { recordMetadataForReloading, type ReloadOptions } from "../reload/layerwise.ts";
import { loadWeights, reloadLayerwise as engineReload, type ReloadReport } from "../reload/load.ts";
import { prefixError } from "../nn/module.ts";
import type { DType } from "../tensor/dtype.ts";
import type { Tensor } from "../tensor/tensor.ts";
import type { BuildOptions, CausalLM } from "./causal_lm.ts";
import { checkConfigAgainstCheckpoint, type ModelConfig, readModelConfig } from "./config.ts";
import { buildLlama } from "./llama.ts";
import { buildMixtral, buildQwen3Moe } from "./mixtral.ts";
import { type QuantName, quantScheme } from "./quant_names.ts";
import {
  placeInScratch,
  type PlaceRead,
  type ProgressCallback,
  streamWeights,
  type ValidatedWeights,
  validateWeights,
} from "./weights.ts";

export { exportKernelTensors, kernelTensors } from "./export.ts";
export type { CausalLM } from "./causal_lm.ts";

/** Builds the (meta, unloaded) model of a parsed config. */
export function buildModel(config: ModelConfig, options: BuildOptions): CausalLM {
  switch (config.architecture) {
    case "LlamaForCausalLM":
    case "MistralForCausalLM":
    case "Qwen2ForCausalLM":
    case "Qwen3ForCausalLM":
      return buildLlama(config, options);
    case "MixtralForCausalLM":
      return buildMixtral(config, options);
    case "Qwen3MoeForCausalLM":
      return buildQwen3Moe(config, options);
  }
  throw new LayerwiseError("BAD_CONFIG", `no builder for ${config.architecture}`);
}

/** Options of {@link loadModel}. */
export interface LoadModelOptions {
  /** A backend, or which one to open (default `auto`). */
  backend?: Backend | BackendChoice;
  /**
   * Quantization of the linear layers (default `auto`: the checkpoint's own, else fp8 per
   * tensor).
   */
  quant?: QuantName | QuantScheme;
  /** Overrides the config's dtype. */
  dtype?: DType;
  /** Where the weights are when not in `dir`: a path or a weight source. */
  weights?: string | WeightSource;
  /** Tensors the model does not have are errors (default: ignored, see the report). */
  strict?: boolean;
  /**
   * Refuse NaN or infinite values in the checkpoint, also values that become infinite in the
   * model's dtype or in a layer's kernel tensors (ReloadError `NON_FINITE`). Default off in the
   * API (the CLI turns it on); it costs one extra device read of every tensor.
   */
  rejectNonFinite?: boolean;
  /** Tensor-parallel rank to build and load (default 0); see src/parallel/tp.ts. */
  tpRank?: number;
  /** Tensor-parallel ranks (default 1). */
  tpSize?: number;
  /**
   * Sizes of the pinned staging pipeline used on CUDA with checkpoint files, or false for
   * the simple path (one tensor at a time through the source).
   */
  staging?: StagingOptions | false;
  /**
   * Outside the staged path, the largest piece a tensor with rows is read in (default
   * `READ_CHUNK_BYTES`, 16 MiB): bigger tensors (the embedding, the LM head) are read and
   * loaded as row chunks, so extra memory stays about one layer. `Infinity` reads whole tensors.
   */
  readChunkBytes?: number;
}

/** Any weight source `reloadWeights` takes: a path, a source, or in-memory pairs. */
export type WeightsInput = string | WeightSource | TensorPairs;

async function open(weights: WeightsInput): Promise<[WeightSource, boolean]> {
  if (typeof weights === "object" && weights !== null && "readInto" in weights) {
    return [weights as WeightSource, false];
  }
  return [await openWeightSource(weights as string | TensorPairs), true];
}

/**
 * First load: reads `<dir>/config.json`, builds the model, validates the checkpoint (from `dir`
 * or `options.weights`) against it, loads it in layer order and processes every layer into
 * kernel format. A backend opened here belongs to the model (close it with `model.device`).
 */
export async function loadModel(dir: string, options: LoadModelOptions = {}): Promise<CausalLM> {
  const config = await readModelConfig(dir, { dtype: options.dtype });
  const [source, own] = await open(options.weights ?? dir);
  try {
    // Before building: what building costs is then bounded by the checkpoint's size.
    checkConfigAgainstCheckpoint(
      config,
      source.tensors.values(),
      source.description,
      `${dir.replace(/\/+$/, "")}/config.json`,
    );
    const backend = typeof options.backend === "object"
      ? options.backend
      : await openBackend({ backend: options.backend });
    const model = buildModel(config, {
      backend,
      quant: quantScheme(options.quant ?? "auto", config),
      tpRank: options.tpRank,
      tpSize: options.tpSize,
    });
    recordMetadataForReloading(model);
    const plan = validateWeights(model, source, options);
    const stream = streamWeights(backend, source, plan, model.readOrder, options);
    await namingFile(
      source,
      stream,
      (s) => loadWeights(model, s, { rejectNonFinite: options.rejectNonFinite }),
    );
    return model;
  } finally {
    if (own) source.close();
  }
}

/**
 * Runs `consume` over `stream` and puts the file of the tensor being loaded in front of an
 * error that does not name it yet (an engine error knows tensors, not files).
 */
async function namingFile<T>(
  source: WeightSource,
  stream: AsyncIterable<readonly [string, Tensor]>,
  consume: (s: AsyncIterable<readonly [string, Tensor]>) => Promise<T>,
): Promise<T> {
  let current: string | undefined;
  async function* track() {
    for await (const item of stream) {
      current = item[0];
      yield item;
    }
  }
  try {
    return await consume(track());
  } catch (e) {
    const origin = current === undefined ? undefined : source.tensors.get(current)?.origin;
    if (origin === undefined || !(e instanceof LayerwiseError) || e.message.includes(origin)) {
      throw e;
    }
    throw prefixError(e, origin);
  }
}

/** Options of {@link reloadWeights}. */
export interface ModelReloadOptions extends ReloadOptions {
  /** Tensors the model does not have are errors (default: ignored and listed in the report). */
  strict?: boolean;
  /**
   * Accept a source that covers only some modules (e.g. a trainer pushing the layers it
   * changed): modules it does not touch keep their weights and are listed in `missing` and
   * `untouched`. Default false: a missing tensor is a CheckpointError before anything is
   * written. A module covered in part (one of q/k/v, say) is an error either way.
   */
  partial?: boolean;
  /** Called after each tensor is read: layer groups done, their number, bytes read. */
  onProgress?: ProgressCallback;
  /** As in {@link LoadModelOptions.staging}. */
  staging?: StagingOptions | false;
  /** As in {@link LoadModelOptions.readChunkBytes}. */
  readChunkBytes?: number;
}

/** The engine's report plus what validation found. */
export interface ModelReloadReport extends ReloadReport {
  /** The source's description (path). */
  readonly source: string;
  /** Tensors of the source the model does not have (ignored; errors with `strict`). */
  readonly unexpected: readonly string[];
  /** Tensors the model ignores on purpose. */
  readonly skipped: readonly string[];
  /** Model tensors the source did not cover (only with `partial`): they kept their weights. */
  readonly missing: readonly string[];
  /** Read rate: bytes loaded / seconds. */
  readonly bytesPerSecond: number;
}

/**
 * A model reload's report: the engine's report `r` (with whatever else it carries), what
 * validation of the source found, and the rate of `bytesLoaded` over `seconds`. Every path
 * (files, stream, IPC, NCCL) reports this one shape.
 */
export function modelReloadReport<R extends ReloadReport>(
  r: R,
  source: string,
  plan: ValidatedWeights,
  seconds: number,
): R & ModelReloadReport {
  return {
    ...r,
    source,
    unexpected: plan.unexpected,
    skipped: plan.skipped,
    missing: plan.missing,
    bytesPerSecond: seconds > 0 ? r.bytesLoaded / seconds : 0,
  };
}

/**
 * Reloads a loaded model in place from a path (file, directory or index), a weight source or
 * in-memory pairs. The whole source is validated against the model before anything is
 * written (CheckpointError naming file and tensor); then tensors are read in model layer order
 * and handed to the layerwise engine. With `atomic`, a failure mid-way restores every kernel
 * tensor bit-exactly.
 */
export async function reloadWeights(
  model: CausalLM,
  weights: WeightsInput,
  options: ModelReloadOptions = {},
): Promise<ModelReloadReport> {
  const [source, own] = await open(weights);
  try {
    const plan = validateWeights(model, source, options);
    // A checkpoint on disk: on WebAssembly, reads that the loaders would copy unchanged into
    // scratch go straight there (ARCHITECTURE.md, "Read paths").
    const place = typeof weights === "string" ? placeInScratch(model) : undefined;
    return await reloadStream(model, source, plan, options, place);
  } finally {
    if (own) source.close();
  }
}

/**
 * {@link reloadWeights} after its validation, for a caller that validated `source` itself
 * (`plan` from `validateWeights` with the same `strict` and `partial`), so that the whole
 * source is not checked against the model twice.
 */
export async function reloadValidated(
  model: CausalLM,
  source: WeightSource,
  plan: ValidatedWeights,
  options: ModelReloadOptions = {},
): Promise<ModelReloadReport> {
  return await reloadStream(model, source, plan, options, undefined);
}

async function reloadStream(
  model: CausalLM,
  source: WeightSource,
  plan: ValidatedWeights,
  options: ModelReloadOptions,
  place: PlaceRead | undefined,
): Promise<ModelReloadReport> {
  const stream = streamWeights(model.device, source, plan, model.readOrder, { ...options, place });
  const r = await namingFile(source, stream, (s) => engineReload(model, s, options));
  return modelReloadReport(r, source.description, plan, r.seconds);
}

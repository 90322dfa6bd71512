/**
 * The model API: `loadModel(dir, options)` builds a model from a Hugging Face directory and
 * loads it; `reloadWeights(model, source, options)` reloads it in place, layer by layer;
 * `exportKernelTensors(model, file)` writes what the kernels see.
 * @module
 */

import type { Backend } from "../backend/backend.ts";
import { type BackendChoice, openBackend } from "../backend/select.ts";
import { openWeightSource, type WeightSource } from "../checkpoint/source.ts";
import { LayerwiseError } from "../errors.ts";
import type { QuantScheme } from "../quant/method.ts";
import { materializeLayer } from "../reload/meta.ts";
import type { DType } from "../tensor/dtype.ts";
import type { BuildOptions, CausalLM } from "./causal_lm.ts";
import { type ModelConfig, readModelConfig } from "./config.ts";
import { buildLlama } from "./llama.ts";
import { buildMixtral } from "./mixtral.ts";

export { exportKernelTensors, kernelTensors } from "./export.ts";
export type { CausalLM } from "./causal_lm.ts";

/** Quantization as the CLI and `loadModel` name it. */
export type QuantName = "none" | "fp8" | "fp8-channel" | "fp8-block" | "int8";

const SCHEMES: Readonly<Record<QuantName, QuantScheme>> = {
  none: "none",
  fp8: "fp8-tensor",
  "fp8-channel": "fp8-channel",
  "fp8-block": "fp8-block",
  int8: "int8-channel",
};

/** The engine's scheme for a quantization name (`fp8` is fp8 per tensor). */
export function quantScheme(name: QuantName | QuantScheme): QuantScheme {
  if (Object.hasOwn(SCHEMES, name)) return SCHEMES[name as QuantName];
  return name as QuantScheme;
}

/** Builds the (meta, unloaded) model of a parsed config. */
export function buildModel(config: ModelConfig, options: BuildOptions): CausalLM {
  switch (config.architecture) {
    case "LlamaForCausalLM":
    case "MistralForCausalLM":
    case "Qwen2ForCausalLM":
      return buildLlama(config, options);
    case "MixtralForCausalLM":
      return buildMixtral(config, options);
  }
  throw new LayerwiseError("BAD_CONFIG", `no builder for ${config.architecture}`);
}

/** Options of {@link loadModel}. */
export interface LoadModelOptions {
  /** A backend, or which one to open (default `auto`). */
  backend?: Backend | BackendChoice;
  /** Quantization of the linear layers (default `fp8`, per tensor). */
  quant?: QuantName | QuantScheme;
  /** Overrides the config's dtype. */
  dtype?: DType;
  /** Where the weights are, when not in `dir` (file, directory or in-memory pairs). */
  weights?: string | WeightSource;
}

/**
 * First load: reads `<dir>/config.json`, builds the model, loads the checkpoint (from `dir`
 * or `options.weights`) in layer order and processes every layer into kernel format.
 */
export async function loadModel(dir: string, options: LoadModelOptions = {}): Promise<CausalLM> {
  const config = await readModelConfig(dir, { dtype: options.dtype });
  const backend = typeof options.backend === "object"
    ? options.backend
    : await openBackend({ backend: options.backend });
  const model = buildModel(config, { backend, quant: quantScheme(options.quant ?? "fp8") });
  const own = typeof options.weights !== "object";
  const source = typeof options.weights === "object"
    ? options.weights
    : await openWeightSource(options.weights ?? dir);
  try {
    await firstLoad(model, source);
  } finally {
    if (own) source.close();
  }
  return model;
}

async function firstLoad(model: CausalLM, source: WeightSource): Promise<void> {
  const b = model.device;
  for (const [, m] of model.namedModules()) materializeLayer(m);
  for (const name of source.plan(model.readOrder)) {
    const info = source.tensors.get(name)!;
    const host = new Uint8Array(info.bytes);
    await source.readInto(name, host);
    const t = b.empty(info.shape, info.dtype);
    try {
      b.upload(t, host);
      model.loadWeight(name, t);
    } finally {
      b.free(t.storage!);
    }
  }
  const layers = [...model.namedModules()].map(([, m]) => m).filter((m) => m.quantMethod);
  for (const m of layers.filter((m) => !m.processLast)) {
    m.quantMethod!.processWeightsAfterLoading(m);
  }
  for (const m of layers.filter((m) => m.processLast)) m.quantMethod!.processWeightsAfterLoading(m);
}

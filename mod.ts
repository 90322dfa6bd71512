/**
 * layerwise: in-place, layer-by-layer weight reloading for language models held in GPU memory
 * (CUDA) or CPU memory (WebAssembly).
 *
 * Load a Hugging Face checkpoint once (quantized to fp8 or int8 as inference kernels want it),
 * then reload new weights into the same kernel tensors, layer by layer: no second copy of the
 * model, and no device pointer moves, so captured CUDA graphs keep working.
 *
 * This entry point is what an application needs. The engine underneath (module tree, layers,
 * quantization methods, the layerwise lifecycle) is `@layerwise/reload/engine`; several GPUs are
 * `@layerwise/reload/parallel`; the raw FFI tables are `@layerwise/reload/ffi`; synthetic
 * checkpoints and test helpers are `@layerwise/reload/testing`.
 *
 * @example Load, reload, check that nothing moved
 * ```ts
 * import { loadModel, reloadWeights } from "@layerwise/reload";
 * import { synthTensors, writeSynthCheckpoint } from "@layerwise/reload/testing";
 *
 * // Two small generated checkpoints of one shape (a real model directory works the same).
 * const shape = {
 *   hiddenSize: 256,
 *   intermediateSize: 512,
 *   numLayers: 2,
 *   numHeads: 4,
 *   numKvHeads: 2,
 *   vocabSize: 1024,
 *   tieWordEmbeddings: true,
 * };
 * const a = await Deno.makeTempDir();
 * const b = await Deno.makeTempDir();
 * await writeSynthCheckpoint(a, shape, synthTensors(shape, 1));
 * await writeSynthCheckpoint(b, shape, synthTensors(shape, 2));
 *
 * const model = await loadModel(a, { quant: "fp8" }); // CUDA when usable, else WebAssembly
 * const report = await reloadWeights(model, b, { atomic: true });
 * console.log(
 *   `${report.layersProcessed} layers, ${report.bytesLoaded} bytes in ${report.seconds} s;`,
 *   `storage kept: ${report.storageKept}`,
 * );
 * model.device.close();
 * ```
 * @module
 */

// Errors
export {
  type ArgumentErrorCode,
  BackendError,
  type BackendErrorCode,
  CheckpointError,
  type CheckpointErrorCode,
  ConfigError,
  type ConfigErrorCode,
  type ErrorCode,
  LayerwiseError,
  ReloadError,
  type ReloadErrorCode,
  type ServerErrorCode,
} from "./src/errors.ts";

// Load, reload, export
export {
  type CausalLM,
  exportKernelTensors,
  kernelTensors,
  loadModel,
  type LoadModelOptions,
  type ModelReloadOptions,
  type ModelReloadReport,
  reloadWeights,
  type WeightsInput,
} from "./src/models/load.ts";
export { QUANT_NAMES, type QuantName } from "./src/models/quant_names.ts";
export { type ProgressCallback, READ_CHUNK_BYTES } from "./src/models/weights.ts";
export { isInconsistent } from "./src/reload/layerwise.ts";

// Reload from tensors already in backend memory (IPC or NCCL buckets, a staged checkpoint)
export { type DeviceTensorView, reloadFromDevice } from "./src/reload/device.ts";

// Backend selection
export type { Backend, BackendKind } from "./src/backend/backend.ts";
export { type BackendChoice, openBackend, type OpenBackendOptions } from "./src/backend/select.ts";
export { STAGING_DEFAULTS, type StagingOptions } from "./src/backend/cuda/staging_plan.ts";

// Weight sources
export {
  openWeightSource,
  type TensorInfo,
  type TensorLike,
  type TensorPairs,
  type WeightSource,
} from "./src/checkpoint/source.ts";

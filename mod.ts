/**
 * layerwise: in-place, layer-by-layer weight reloading for language models held in GPU memory
 * (CUDA) or CPU memory (WebAssembly).
 *
 * Load a Hugging Face checkpoint once (quantized to fp8 or int8 as inference kernels want it),
 * then reload new weights into the same kernel tensors, layer by layer: no second copy of the
 * model, and no device pointer moves, so captured CUDA graphs keep working.
 *
 * @example Load, reload, check that nothing moved
 * ```ts
 * import {
 *   loadModel,
 *   reloadWeights,
 *   synthTensors,
 *   writeSynthCheckpoint,
 * } from "@layerwise/reload";
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
export { BackendError, CheckpointError, LayerwiseError, ReloadError } from "./src/errors.ts";

// Tensors and dtypes
export {
  type DType,
  dtypeFromSafetensors,
  type DTypeName,
  dtypeOf,
  DTYPES,
} from "./src/tensor/dtype.ts";
export {
  type Layout2D,
  type RowWindow,
  rowWindow,
  type Storage,
  Tensor,
} from "./src/tensor/tensor.ts";

// Backends
export type { Backend, BackendKind, Granularity } from "./src/backend/backend.ts";
export { type BackendChoice, openBackend, type OpenBackendOptions } from "./src/backend/select.ts";
export { openWasmBackend, WASM_MAX_MEMORY_BYTES, wasmView } from "./src/backend/wasm.ts";
export {
  type CudaBackendOptions,
  CudaDevice,
  openCudaBackend,
  type PinnedBuffer,
  type StagerFailure,
  type StagerPlan,
} from "./src/backend/cuda.ts";

// Checkpoints
export {
  encodeSafetensors,
  type HostTensor,
  loadSafetensors,
  parseSafetensorsHeader,
  readSafetensorsHeader,
  type SafetensorsHeader,
  type TensorEntry,
  writeSafetensors,
} from "./src/checkpoint/safetensors.ts";
export { type Checkpoint, openCheckpoint } from "./src/checkpoint/sharded.ts";
export { STAGING_DEFAULTS, type StagingOptions } from "./src/checkpoint/staging.ts";
export {
  fileSource,
  memorySource,
  type NamedTensor,
  openWeightSource,
  type TensorInfo,
  type TensorLike,
  type TensorPairs,
  type WeightSource,
} from "./src/checkpoint/source.ts";

// Models: the high-level API
export {
  type CausalLM,
  exportKernelTensors,
  kernelTensors,
  loadModel,
  type LoadModelOptions,
  type ModelReloadOptions,
  type ModelReloadReport,
  type QuantName,
  reloadWeights,
  type WeightsInput,
} from "./src/models/load.ts";
export { type ProgressCallback, READ_CHUNK_BYTES } from "./src/models/weights.ts";
export {
  type Architecture,
  type CheckpointQuantization,
  type ModelConfig,
  type ParseConfigOptions,
  parseModelConfig,
  readModelConfig,
} from "./src/models/config.ts";
export { type SynthShape, synthTensors, writeSynthCheckpoint } from "./src/cli/synth.ts";

// The engine: module tree, quantization methods and the reload lifecycle, for custom models
export {
  abortLayerwiseReload,
  Attention,
  type AttentionScale,
  captureLayerToMeta,
  ColumnParallelLinear,
  copyInto,
  countWrites,
  createQuantMethod,
  defaultWeightLoader,
  type ExpectOptions,
  expectShape,
  fillInto,
  finalizeLayerwiseReload,
  type FinalizeSummary,
  FusedMoE,
  type FusedMoEOptions,
  getLayerwiseInfo,
  getOriginalLoader,
  inconsistentLayers,
  initializeLayerwiseReload,
  isInconsistent,
  isReloading,
  type KernelDestination,
  type LayerContext,
  type LayerMeta,
  type LayerwiseInfo,
  type LinearOptions,
  type LoadOptions,
  type LoadReport,
  loadWeights,
  materializeLayer,
  MergedColumnParallelLinear,
  Module,
  ParallelLMHead,
  QKVParallelLinear,
  type QKVSizes,
  QUANT_SCHEMES,
  type QuantMethod,
  type QuantScheme,
  recordMetadataForReloading,
  type ReloadOptions,
  type ReloadReport,
  reloadWeights as reloadLayerwise,
  type ReloadWeightsOptions,
  type ResolvedWeight,
  restoreLayerOnMeta,
  RMSNorm,
  RowParallelLinear,
  type ScaleIndex,
  select0,
  type ShardId,
  type ShardLayout,
  type SlotKind,
  type SlotOptions,
  type SplitLoad,
  type TensorDescriptor,
  type TensorMeta,
  TensorSlot,
  type ValidateOptions,
  validateWeights,
  type ValidationReport,
  VocabParallelEmbedding,
  type WeightLoader,
  type WeightSource as LoadedTensors,
  type WeightSpec,
  type WeightTarget,
} from "./src/reload/mod.ts";

// Several GPUs of one host: tensor-parallel ranks and the NCCL broadcast reload
export {
  buildTensorParallel,
  freeModel,
  loadTensorParallel,
  openRankBackends,
  type RankBackendKind,
  reloadTensorParallel,
  type TensorParallelLoadOptions,
} from "./src/parallel/tp.ts";
export {
  broadcastReload,
  type BroadcastReloadOptions,
  type BroadcastReloadReport,
  type BroadcastSource,
  checkpointBroadcastSource,
  deviceBroadcastSource,
} from "./src/parallel/broadcast.ts";
export { type BroadcastPart, NcclComms } from "./src/backend/nccl.ts";
// Low-level FFI surface, for callers that batch their own device calls
export { NCCL_SYMBOLS, type NcclLibrary, type NcclSymbols } from "./src/backend/nccl_ffi.ts";
export { CUDA_SYMBOLS, type CudaSymbols } from "./src/backend/cuda_ffi.ts";
export type { Wide, WideFn, WideSymbols } from "./src/backend/ffi.ts";

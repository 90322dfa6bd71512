/**
 * The engine under `loadModel` and `reloadWeights`, for custom models: the module tree and its
 * tensor slots, the tensor-parallel layers, quantization methods, the layerwise reload
 * lifecycle, tensors and dtypes, the two Backend implementations, and the checkpoint readers.
 * ARCHITECTURE.md describes how they fit together.
 *
 * @example A custom module reloaded in place
 * ```ts
 * import {
 *   createQuantMethod,
 *   DTYPES,
 *   loadWeights,
 *   Module,
 *   openWasmBackend,
 *   reloadLayerwise,
 *   RMSNorm,
 * } from "@layerwise/reload/engine";
 *
 * const backend = await openWasmBackend();
 * const ctx = { backend, dtype: DTYPES.f32, createQuantMethod };
 * const model = new Module("Root");
 * const norm = model.addModule("norm", new RMSNorm(ctx, 4));
 *
 * const weight = (v: number) => {
 *   const t = backend.empty([4], DTYPES.f32);
 *   backend.fill(t, v);
 *   return t;
 * };
 * await loadWeights(model, [["norm.weight", weight(1)]]);
 * const before = norm.slot("weight").tensor.ptr;
 * const report = await reloadLayerwise(model, [["norm.weight", weight(2)]]);
 * console.log(report.layersProcessed, norm.slot("weight").tensor.ptr === before);
 * backend.close();
 * ```
 * @module
 */

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
export type {
  Granularity,
  MultiTensorKind,
  MultiTensorLaunch,
  StagedReader,
} from "./src/backend/backend.ts";
export type { StagedTensor, StagingStats } from "./src/backend/cuda/staging_plan.ts";
export {
  openWasmBackend,
  WASM_MAX_MEMORY_BYTES,
  type WasmBackendOptions,
  wasmThreadCount,
  wasmView,
} from "./src/backend/wasm.ts";
export { type CudaBackendOptions, openCudaBackend } from "./src/backend/cuda/device.ts";

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
export { fileSource, memorySource, type NamedTensor } from "./src/checkpoint/source.ts";

// Model configs
export {
  type Architecture,
  checkConfigAgainstCheckpoint,
  type CheckpointQuantization,
  DIM_PRODUCTS,
  type ModelConfig,
  type ParseConfigOptions,
  parseModelConfig,
  readModelConfig,
  SIZE_FIELDS,
  type SizeField,
  type TensorShapeInfo,
} from "./src/models/config.ts";

// The module tree and its slots
export { Module, type ResolvedWeight, type WeightTarget } from "./src/nn/module.ts";
export {
  copyInto,
  countWrites,
  defaultWeightLoader,
  expectShape,
  select0,
  type ShardId,
  type SlotKind,
  type SlotOptions,
  TensorSlot,
  type WeightLoader,
} from "./src/nn/slots.ts";
export {
  Attention,
  type AttentionScale,
  ColumnParallelLinear,
  FusedMoE,
  type FusedMoEOptions,
  type LayerContext,
  type LinearOptions,
  MergedColumnParallelLinear,
  ParallelLMHead,
  QKVParallelLinear,
  type QKVSizes,
  RMSNorm,
  RowParallelLinear,
  VocabParallelEmbedding,
} from "./src/nn/layers.ts";

// Quantization methods
export {
  type KernelDestination,
  QUANT_SCHEMES,
  type QuantMethod,
  type QuantMethodFactory,
  type QuantScheme,
  type ScaleIndex,
  type ShardLayout,
  type SplitLoad,
  type WeightSpec,
} from "./src/nn/quant_method.ts";
export { createQuantMethod } from "./src/quant/create.ts";

// The layerwise lifecycle
export {
  abortLayerwiseReload,
  finalizeLayerwiseReload,
  type FinalizeSummary,
  getLayerwiseInfo,
  inconsistentLayers,
  initializeLayerwiseReload,
  isReloading,
  type LayerwiseInfo,
  recordMetadataForReloading,
  type ReloadOptions,
} from "./src/reload/layerwise.ts";
export {
  type ExpectOptions,
  type LoadOptions,
  type LoadReport,
  loadWeights,
  reloadLayerwise,
  type ReloadLayerwiseOptions,
  type ReloadReport,
  type TensorStream,
} from "./src/reload/load.ts";
export {
  type DeviceArrival,
  type DevicePlanReport,
  DeviceReload,
  type DeviceReloadOptions,
  type DeviceReloadReport,
  releaseDevicePlan,
} from "./src/reload/device.ts";
export {
  type DevicePhase,
  type DevicePlan,
  layoutKey,
  type PlanArrival,
  planDeviceReload,
  type PlannedLaunch,
} from "./src/reload/device_plan.ts";
export {
  type TensorDescriptor,
  type ValidateOptions,
  validateTensors,
  type ValidationReport,
} from "./src/reload/validate.ts";
export {
  captureLayerToMeta,
  getOriginalLoader,
  type LayerMeta,
  materializeLayer,
  restoreLayerOnMeta,
  type TensorMeta,
} from "./src/reload/meta.ts";

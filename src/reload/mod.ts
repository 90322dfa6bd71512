/**
 * Public surface of the module tree, quantization methods and the reload lifecycle, for the
 * package root to re-export.
 * @module
 */

export {
  copyInto,
  countWrites,
  defaultWeightLoader,
  expectShape,
  fillInto,
  Module,
  type ResolvedWeight,
  select0,
  type ShardId,
  type SlotKind,
  type SlotOptions,
  TensorSlot,
  type WeightLoader,
  type WeightTarget,
} from "../nn/module.ts";
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
} from "../nn/layers.ts";
export { createQuantMethod } from "../quant/create.ts";
export {
  type KernelDestination,
  QUANT_SCHEMES,
  type QuantMethod,
  type QuantScheme,
  type ScaleIndex,
  type ShardLayout,
  type SplitLoad,
  type WeightSpec,
} from "../quant/method.ts";
export {
  abortLayerwiseReload,
  finalizeLayerwiseReload,
  type FinalizeSummary,
  getLayerwiseInfo,
  inconsistentLayers,
  initializeLayerwiseReload,
  isInconsistent,
  isReloading,
  type LayerwiseInfo,
  recordMetadataForReloading,
  type ReloadOptions,
} from "./layerwise.ts";
export {
  type ExpectOptions,
  type LoadOptions,
  type LoadReport,
  loadWeights,
  type ReloadReport,
  reloadWeights,
  type ReloadWeightsOptions,
  type WeightSource,
} from "./load.ts";
export {
  type TensorDescriptor,
  type ValidateOptions,
  validateWeights,
  type ValidationReport,
} from "./validate.ts";
export {
  captureLayerToMeta,
  getOriginalLoader,
  type LayerMeta,
  materializeLayer,
  restoreLayerOnMeta,
  type TensorMeta,
} from "./meta.ts";

/**
 * The contract between layers and quantization methods: how a layer's weights are created in
 * model format and processed into kernel format, one method instance per layer. It lives with
 * the layers so that they never import an implementation: the implementations (src/quant/)
 * import this, and a model passes their factory in through the layer context (see
 * ARCHITECTURE.md, "Layers and imports").
 * @module
 */

import type { Backend } from "../backend/backend.ts";
import type { Module } from "./module.ts";
import type { ShardId, WeightLoader } from "./slots.ts";
import type { DType } from "../tensor/dtype.ts";
import type { Tensor } from "../tensor/tensor.ts";

/** A quantizable weight of a layer, as the layer describes it to its quant method. */
export interface WeightSpec {
  /** Slot name of the weight (`weight`, `w13_weight`, `w2_weight`). */
  readonly name: string;
  /** Slot name of its scale in kernel format (`weight_scale`, `w13_weight_scale`). */
  readonly scaleName: string;
  /** Model-format shape: `[rows, cols]`, or `[experts, rows, cols]` for stacked experts. */
  readonly shape: readonly number[];
  /** Rows of each logical shard (fused layers) in this partition; they sum to `rows`. */
  readonly shardRows: readonly number[];
  /** The layer's loader for the weight. */
  readonly loader: WeightLoader;
  /**
   * Where a serialized per-shard scale goes: the local expert (0 without experts) and the shard
   * index; null when the expert is not on this rank (the load writes nothing).
   */
  scaleIndex(shardId: ShardId | undefined, expertId: number | undefined): ScaleIndex | null;
  /**
   * Where the checkpoint tensor of a shard lands on this rank, for methods that load other
   * tensors of the same layout (block scales); null when the expert is not on this rank.
   */
  layout(shardId: ShardId | undefined, expertId: number | undefined): ShardLayout | null;
}

/** One per-expert piece of a merged load (`FusedMoE.splitMerged`). */
export interface SplitLoad {
  /** The piece, in checkpoint format. */
  readonly loaded: Tensor;
  /** Its shard id (`w1`, `w3`, `w2`). */
  readonly shardId: ShardId | undefined;
  /** Its expert. */
  readonly expertId: number | undefined;
}

/**
 * The rows and columns of a shard's checkpoint tensor `[rows, cols]` this rank takes, and where
 * they go in the model tensor: rows `[dstRow, dstRow + rows)` of the local expert's matrix.
 */
export interface ShardLayout {
  /** Shape of the shard's checkpoint tensor. */
  readonly full: readonly [number, number];
  /** First checkpoint row this rank takes. */
  readonly rowStart: number;
  /** Rows it takes. */
  readonly rows: number;
  /** First checkpoint column this rank takes. */
  readonly colStart: number;
  /** Columns it takes. */
  readonly cols: number;
  /** Local expert (0 without experts). */
  readonly expert: number;
  /** First row of the shard in the (expert's) model matrix. */
  readonly dstRow: number;
}

/** See {@link WeightSpec.scaleIndex}. */
export interface ScaleIndex {
  /** Local expert index (0 for a layer without experts). */
  readonly expert: number;
  /** Shard index into `shardRows`. */
  readonly shard: number;
}

/**
 * Where processing may write a kernel-format result: the tensor to write the result `name`
 * (of `shape` and `dtype`) into, or null to allocate it as usual. A reload passes one that
 * gives the kept kernel tensor of that name (same shape and dtype, contiguous), so that results
 * land in place without a second allocation and copy. Asking for a destination declares that
 * the layer's kernel tensors are about to be overwritten: the reload takes its atomic snapshot
 * and counts the layer as written from then on.
 */
export type KernelDestination = (
  name: string,
  shape: readonly number[],
  dtype: DType,
) => Tensor | null;

/**
 * Creates a layer's model-format weights and processes them into kernel format.
 *
 * Contract for processing: it may change shapes and dtypes; it swaps `slot.tensor` of existing
 * slots (it never replaces a slot object, so tied slots stay shared), may add new slots (scales),
 * and frees the model-format tensors it replaces. Everything left in the layer afterwards is
 * kernel format. Given `into`, it asks it for each result's tensor before computing that result
 * and writes the result there when it gets one (putting that tensor into the slot, never freeing
 * it); the bytes must be those it would have computed into a fresh tensor.
 */
export interface QuantMethod {
  /** Scheme name, for messages. */
  readonly name: string;
  /**
   * True when processing changes nothing: the model-format tensors are the kernel tensors. A
   * reload then writes checkpoint tensors straight into the kept kernel tensors (no scratch).
   */
  readonly keepsModelFormat?: boolean;
  /** Registers the (meta) model-format slots of `specs` on `layer`. */
  createWeights(layer: Module, specs: readonly WeightSpec[]): void;
  /** Turns the loaded model-format tensors of `layer` into kernel format (see `into` above). */
  processWeightsAfterLoading(layer: Module, into?: KernelDestination): void;
}

/** The quantization schemes of linear (and FusedMoE) layers. */
export type QuantScheme =
  | "none"
  | "fp8-tensor"
  | "fp8-channel"
  | "fp8-block"
  | "int8-channel"
  | "fp8-serialized";

/** All schemes, for tests and argument parsing. */
export const QUANT_SCHEMES: readonly QuantScheme[] = [
  "none",
  "fp8-tensor",
  "fp8-channel",
  "fp8-block",
  "int8-channel",
  "fp8-serialized",
];

/**
 * Makes a fresh quant method for one layer: `modelDtype` is the dtype of unquantized weights
 * (bf16). src/quant/create.ts has the one implementation, `createQuantMethod`.
 */
export type QuantMethodFactory = (
  scheme: QuantScheme,
  backend: Backend,
  modelDtype: DType,
) => QuantMethod;

/**
 * Layers with vLLM's parameter names and loading rules: column- and row-parallel linear layers
 * (narrowing to a tensor-parallel rank), fused QKV and merged-column linears, the vocab-parallel
 * embedding (vocabulary padded to a multiple of 64), RMSNorm, attention scales and FusedMoE.
 *
 * All tensors are created as meta tensors (model format, no storage); loading gives them
 * storage. Weights are `[out, in]` (checkpoint orientation).
 * @module
 */

import type { Backend } from "../backend/backend.ts";
import { CheckpointError, LayerwiseError } from "../errors.ts";
import { KvScaleMethod, SCALE_NOT_LOADED } from "./kv_scale.ts";
import type {
  QuantMethodFactory,
  QuantScheme,
  ShardLayout,
  SplitLoad,
  WeightSpec,
} from "./quant_method.ts";
import { type DType, DTYPES } from "../tensor/dtype.ts";
import { Tensor } from "../tensor/tensor.ts";
import { Module } from "./module.ts";
import {
  copyInto,
  defaultWeightLoader,
  expectShape,
  select0,
  type ShardId,
  TensorSlot,
  type WeightLoader,
} from "./slots.ts";

/** What every layer needs: the backend, the model dtype and its tensor-parallel place. */
export interface LayerContext {
  /** The backend the tensors live on. */
  readonly backend: Backend;
  /** dtype of unquantized weights (usually bf16). */
  readonly dtype: DType;
  /** This rank (default 0). */
  readonly tpRank?: number;
  /** Number of tensor-parallel ranks (default 1). */
  readonly tpSize?: number;
  /** Makes each layer's quant method (`createQuantMethod` of src/quant/create.ts). */
  readonly createQuantMethod: QuantMethodFactory;
}

/** Options of linear layers. */
export interface LinearOptions {
  /** Whether the layer has a bias (default false). */
  readonly bias?: boolean;
  /** Quantization scheme (default `none`). */
  readonly quant?: QuantScheme;
}

function divide(a: number, b: number, what: string): number {
  if (!Number.isSafeInteger(a) || b <= 0 || a % b !== 0) {
    throw new LayerwiseError("BAD_CONFIG", `${what}: ${a} is not divisible by ${b}`);
  }
  return a / b;
}

function tpOf(ctx: LayerContext): [number, number] {
  const rank = ctx.tpRank ?? 0, size = ctx.tpSize ?? 1;
  if (
    !Number.isSafeInteger(size) || size < 1 || !Number.isSafeInteger(rank) || rank < 0 ||
    rank >= size
  ) {
    throw new LayerwiseError("BAD_CONFIG", `tensor-parallel rank ${rank} of ${size} is invalid`);
  }
  return [rank, size];
}

function shardName(shardId: ShardId | undefined): string {
  return shardId === undefined ? "" : ` shard ${shardId}`;
}

/**
 * Column-parallel linear: the output rows are split across ranks. Fused subclasses stack
 * several logical shards along the output; each shard is split across ranks on its own.
 */
export class ColumnParallelLinear extends Module {
  /** Input features. */
  readonly inputSize: number;
  /** Full rows of each logical shard in the checkpoint. */
  readonly fullSizes: readonly number[];
  /** Rows of each logical shard on this rank. */
  readonly partSizes: readonly number[];
  /** Which rank's rows of each shard this rank holds (differs from tpRank for replicated KV heads). */
  readonly sourceRanks: readonly number[];

  /** A plain column-parallel linear `inputSize -> outputSize`. */
  constructor(
    ctx: LayerContext,
    inputSize: number,
    outputSize: number,
    options: LinearOptions = {},
    typeName = "ColumnParallelLinear",
    shards?: { full: number[]; part: number[]; sourceRanks: number[] },
  ) {
    super(typeName, ctx.backend);
    const [rank, size] = tpOf(ctx);
    this.inputSize = inputSize;
    const s = shards ?? {
      full: [outputSize],
      part: [divide(outputSize, size, `${typeName} output size`)],
      sourceRanks: [rank],
    };
    this.fullSizes = s.full;
    this.partSizes = s.part;
    this.sourceRanks = s.sourceRanks;
    const rows = s.part.reduce((a, b) => a + b, 0);
    this.quantMethod = ctx.createQuantMethod(options.quant ?? "none", ctx.backend, ctx.dtype);
    const spec: WeightSpec = {
      name: "weight",
      scaleName: "weight_scale",
      shape: [rows, inputSize],
      shardRows: s.part,
      loader: this.#rowsLoader(ctx.backend, true),
      scaleIndex: (shardId) => ({ expert: 0, shard: this.shardIndex(shardId) }),
      layout: (shardId) => this.#layout(shardId),
    };
    this.quantMethod.createWeights(this, [spec]);
    if (options.bias) {
      this.setSlot(
        "bias",
        new TensorSlot(Tensor.meta([rows], ctx.dtype), this.#rowsLoader(ctx.backend, false)),
      );
    }
  }

  /** Index of a shard id; plain layers accept none (or 0). */
  shardIndex(shardId: ShardId | undefined): number {
    if (shardId === undefined || shardId === 0) return 0;
    throw new CheckpointError("BAD_SHARD", `${this.typeName} has no shard ${shardId}`);
  }

  #layout(shardId: ShardId | undefined): ShardLayout {
    const i = this.shardIndex(shardId);
    const rows = this.partSizes[i];
    return {
      full: [this.fullSizes[i], this.inputSize],
      rowStart: this.sourceRanks[i] * rows,
      rows,
      colStart: 0,
      cols: this.inputSize,
      expert: 0,
      dstRow: this.partSizes.slice(0, i).reduce((a, b) => a + b, 0),
    };
  }

  #rowsLoader(backend: Backend, weight: boolean): WeightLoader {
    return (slot, loaded, shardId) => {
      const i = this.shardIndex(shardId);
      const full = weight ? [this.fullSizes[i], this.inputSize] : [this.fullSizes[i]];
      expectShape(loaded, full, `${this.typeName}${shardName(shardId)}`);
      const size = this.partSizes[i];
      const offset = this.partSizes.slice(0, i).reduce((a, b) => a + b, 0);
      copyInto(
        backend,
        slot.tensor.narrow(0, offset, size),
        loaded.narrow(0, this.sourceRanks[i] * size, size),
      );
    };
  }
}

/** Several column-parallel linears fused along the output (gate_up_proj): shard ids 0..n-1. */
export class MergedColumnParallelLinear extends ColumnParallelLinear {
  /** Fuses outputs of `outputSizes` (full sizes, each split across ranks). */
  constructor(
    ctx: LayerContext,
    inputSize: number,
    outputSizes: readonly number[],
    options: LinearOptions = {},
  ) {
    const [rank, size] = tpOf(ctx);
    super(ctx, inputSize, 0, options, "MergedColumnParallelLinear", {
      full: [...outputSizes],
      part: outputSizes.map((o) => divide(o, size, "MergedColumnParallelLinear output size")),
      sourceRanks: outputSizes.map(() => rank),
    });
  }

  /** Index of a shard id in `fullSizes`; CheckpointError BAD_SHARD for others. */
  override shardIndex(shardId: ShardId | undefined): number {
    if (
      typeof shardId === "number" && Number.isInteger(shardId) && shardId >= 0 &&
      shardId < this.fullSizes.length
    ) {
      return shardId;
    }
    throw new CheckpointError(
      "BAD_SHARD",
      `${this.typeName} shard id must be 0..${this.fullSizes.length - 1}, got ${shardId}`,
    );
  }
}

/** Sizes of a {@link QKVParallelLinear}. */
export interface QKVSizes {
  /** Hidden size (input features). */
  readonly hiddenSize: number;
  /** Size of one head. */
  readonly headDim: number;
  /** Query heads. */
  readonly numHeads: number;
  /** Key/value heads (grouped-query attention; default numHeads). */
  readonly numKvHeads?: number;
}

/**
 * Fused q, k, v projections (shard ids `q`, `k`, `v`). With more ranks than KV heads, each
 * rank holds one KV head, replicated across `tpSize / numKvHeads` ranks.
 */
export class QKVParallelLinear extends ColumnParallelLinear {
  /** Query heads on this rank. */
  readonly numHeadsPerRank: number;
  /** KV heads on this rank. */
  readonly numKvHeadsPerRank: number;

  /** Creates the fused projection. */
  constructor(ctx: LayerContext, sizes: QKVSizes, options: LinearOptions = {}) {
    const [rank, size] = tpOf(ctx);
    const nkv = sizes.numKvHeads ?? sizes.numHeads;
    const nh = divide(sizes.numHeads, size, "QKVParallelLinear heads");
    let kvPer: number, kvRank: number;
    if (size >= nkv) {
      const replicas = divide(size, nkv, "QKVParallelLinear ranks per KV head");
      kvPer = 1;
      kvRank = Math.floor(rank / replicas);
    } else {
      kvPer = divide(nkv, size, "QKVParallelLinear KV heads");
      kvRank = rank;
    }
    const d = sizes.headDim;
    super(ctx, sizes.hiddenSize, 0, options, "QKVParallelLinear", {
      full: [sizes.numHeads * d, nkv * d, nkv * d],
      part: [nh * d, kvPer * d, kvPer * d],
      sourceRanks: [rank, kvRank, kvRank],
    });
    this.numHeadsPerRank = nh;
    this.numKvHeadsPerRank = kvPer;
  }

  /** Index of a shard id in `fullSizes`; CheckpointError BAD_SHARD for others. */
  override shardIndex(shardId: ShardId | undefined): number {
    const i = shardId === "q" ? 0 : shardId === "k" ? 1 : shardId === "v" ? 2 : -1;
    if (i < 0) {
      throw new CheckpointError(
        "BAD_SHARD",
        `QKVParallelLinear shard id must be q, k or v, got ${shardId}`,
      );
    }
    return i;
  }
}

/** Row-parallel linear: the input columns are split across ranks; the bias is whole. */
export class RowParallelLinear extends Module {
  /** Full input features. */
  readonly inputSize: number;
  /** Output features. */
  readonly outputSize: number;
  /** Input features on this rank. */
  readonly inputSizePerRank: number;

  /** A row-parallel linear `inputSize -> outputSize`. */
  constructor(
    ctx: LayerContext,
    inputSize: number,
    outputSize: number,
    options: LinearOptions = {},
  ) {
    super("RowParallelLinear", ctx.backend);
    const [rank, size] = tpOf(ctx);
    this.inputSize = inputSize;
    this.outputSize = outputSize;
    const per = divide(inputSize, size, "RowParallelLinear input size");
    this.inputSizePerRank = per;
    const b = ctx.backend;
    const loader: WeightLoader = (slot, loaded, shardId) => {
      if (shardId !== undefined && shardId !== 0) {
        throw new CheckpointError("BAD_SHARD", `RowParallelLinear has no shard ${shardId}`);
      }
      expectShape(loaded, [outputSize, inputSize], "RowParallelLinear");
      copyInto(b, slot.tensor, loaded.narrow(1, rank * per, per));
    };
    this.quantMethod = ctx.createQuantMethod(options.quant ?? "none", b, ctx.dtype);
    this.quantMethod.createWeights(this, [{
      name: "weight",
      scaleName: "weight_scale",
      shape: [outputSize, per],
      shardRows: [outputSize],
      loader,
      scaleIndex: () => ({ expert: 0, shard: 0 }),
      layout: () => ({
        full: [outputSize, inputSize],
        rowStart: 0,
        rows: outputSize,
        colStart: rank * per,
        cols: per,
        expert: 0,
        dstRow: 0,
      }),
    }]);
    if (options.bias) {
      this.setSlot(
        "bias",
        new TensorSlot(Tensor.meta([outputSize], ctx.dtype), defaultWeightLoader(b)),
      );
    }
  }
}

/** Rounds `n` up to a multiple of `m`. */
function roundUp(n: number, m: number): number {
  return Math.ceil(n / m) * m;
}

/**
 * Embedding split along the vocabulary. As in vLLM the vocabulary is padded to a multiple of
 * 64 before splitting; padding rows are never loaded (they are zero), so a padded embedding
 * receives fewer elements than it holds and is processed at the end of a reload.
 */
export class VocabParallelEmbedding extends Module {
  /** Vocabulary size in the checkpoint. */
  readonly numEmbeddings: number;
  /** Embedding width. */
  readonly embeddingDim: number;
  /** Rows on this rank (padded). */
  readonly rowsPerRank: number;
  /** First vocabulary row of this rank. */
  readonly firstRow: number;
  /** Real (not padding) rows on this rank. */
  readonly realRows: number;

  /** Creates the embedding; `typeName` lets ParallelLMHead reuse it. */
  constructor(
    ctx: LayerContext,
    numEmbeddings: number,
    embeddingDim: number,
    typeName = "VocabParallelEmbedding",
  ) {
    super(typeName, ctx.backend);
    const [rank, size] = tpOf(ctx);
    this.numEmbeddings = numEmbeddings;
    this.embeddingDim = embeddingDim;
    this.rowsPerRank = divide(roundUp(numEmbeddings, 64), size, `${typeName} padded vocabulary`);
    this.firstRow = rank * this.rowsPerRank;
    this.realRows = Math.max(0, Math.min(this.rowsPerRank, numEmbeddings - this.firstRow));
    const b = ctx.backend;
    const loader: WeightLoader = (slot, loaded) => {
      expectShape(loaded, [numEmbeddings, embeddingDim], typeName);
      if (this.realRows === 0) return;
      copyInto(
        b,
        slot.tensor.narrow(0, 0, this.realRows),
        loaded.narrow(0, this.firstRow, this.realRows),
      );
    };
    const padded = this.realRows < this.rowsPerRank;
    this.setSlot(
      "weight",
      new TensorSlot(Tensor.meta([this.rowsPerRank, embeddingDim], ctx.dtype), loader, {
        initValue: padded ? 0 : undefined,
      }),
    );
  }

  /** The padding rows of `weight` on this rank, in elements. */
  override paddingElements(name: string): number {
    return name === "weight" ? (this.rowsPerRank - this.realRows) * this.embeddingDim : 0;
  }
}

/** The output projection over the vocabulary (same layout as the embedding; may be tied to it). */
export class ParallelLMHead extends VocabParallelEmbedding {
  /** Creates the head. */
  constructor(ctx: LayerContext, numEmbeddings: number, embeddingDim: number) {
    super(ctx, numEmbeddings, embeddingDim, "ParallelLMHead");
  }
}

/** RMSNorm: one `weight` of the hidden size, in the model dtype. */
export class RMSNorm extends Module {
  /** Creates the norm. */
  constructor(ctx: LayerContext, hiddenSize: number) {
    super("RMSNorm", ctx.backend);
    this.setSlot(
      "weight",
      new TensorSlot(Tensor.meta([hiddenSize], ctx.dtype), defaultWeightLoader(ctx.backend)),
    );
  }
}

/** The attention scale tensors a layer may hold. */
export type AttentionScale = "q_scale" | "k_scale" | "v_scale";

/**
 * Attention: holds only its optional f32 scales (fp8 KV cache). Processed after every other
 * layer; a scale absent from the checkpoint becomes 1.0.
 */
export class Attention extends Module {
  /** Creates the layer with the given scale tensors (possibly none). */
  constructor(ctx: LayerContext, scales: readonly AttentionScale[] = []) {
    super("Attention", ctx.backend);
    this.processLast = true;
    for (const name of scales) {
      this.setSlot(
        name,
        new TensorSlot(Tensor.meta([1], DTYPES.f32), defaultWeightLoader(ctx.backend), {
          initValue: SCALE_NOT_LOADED,
        }),
      );
    }
    if (scales.length > 0) this.quantMethod = new KvScaleMethod(ctx.backend, scales);
  }
}

/** Sizes and placement of a {@link FusedMoE}. */
export interface FusedMoEOptions {
  /** Experts in the model. */
  readonly numExperts: number;
  /** Hidden size. */
  readonly hiddenSize: number;
  /** Intermediate size of one expert (split across tensor-parallel ranks). */
  readonly intermediateSize: number;
  /** Expert-parallel rank (default 0). */
  readonly epRank?: number;
  /** Expert-parallel ranks (default 1): this rank holds experts `[epRank*E/epSize, ...)`. */
  readonly epSize?: number;
  /** Quantization scheme (default `none`). */
  readonly quant?: QuantScheme;
}

/**
 * Mixture of experts with stacked weights: `w13_weight` `[E, 2*I, H]` (gate w1 then up w3) and
 * `w2_weight` `[E, H, I]`. Loads are per expert with shard ids `w1`, `w2`, `w3`, or of every
 * expert at once (transformers 5's merged parameters, shard ids `w13` `[E, 2I, H]` and `w2`
 * `[E, H, I]`, no expert id), which go through the same per-expert loads; loads of experts held
 * by another rank write (and count) nothing.
 */
export class FusedMoE extends Module {
  /** Experts on this rank. */
  readonly localExperts: number;
  /** First global expert of this rank. */
  readonly firstExpert: number;
  /** Intermediate rows per expert on this rank. */
  readonly intermediatePerRank: number;
  readonly #options: FusedMoEOptions;

  /** Creates the layer. */
  constructor(ctx: LayerContext, options: FusedMoEOptions) {
    super("FusedMoE", ctx.backend);
    const [rank, size] = tpOf(ctx);
    this.#options = options;
    const epSize = options.epSize ?? 1, epRank = options.epRank ?? 0;
    this.localExperts = divide(options.numExperts, epSize, "FusedMoE experts");
    this.firstExpert = epRank * this.localExperts;
    const I = options.intermediateSize, H = options.hiddenSize;
    const ip = divide(I, size, "FusedMoE intermediate size");
    this.intermediatePerRank = ip;
    const b = ctx.backend;
    const w13: WeightLoader = (slot, loaded, shardId, expertId) => {
      const shard = this.#shard(shardId, ["w1", "w3"]);
      const e = this.localExpert(expertId);
      expectShape(loaded, [I, H], `FusedMoE shard ${shardId}`);
      if (e < 0) return;
      copyInto(
        b,
        select0(slot.tensor, e).narrow(0, shard * ip, ip),
        loaded.narrow(0, rank * ip, ip),
      );
    };
    const w2: WeightLoader = (slot, loaded, shardId, expertId) => {
      this.#shard(shardId, ["w2"]);
      const e = this.localExpert(expertId);
      expectShape(loaded, [H, I], "FusedMoE shard w2");
      if (e < 0) return;
      copyInto(b, select0(slot.tensor, e), loaded.narrow(1, rank * ip, ip));
    };
    const E = this.localExperts;
    this.quantMethod = ctx.createQuantMethod(options.quant ?? "none", b, ctx.dtype);
    this.quantMethod.createWeights(this, [
      {
        name: "w13_weight",
        scaleName: "w13_weight_scale",
        shape: [E, 2 * ip, H],
        shardRows: [ip, ip],
        loader: w13,
        scaleIndex: (s, e) => this.#scaleIndex(s, e, ["w1", "w3"]),
        layout: (s, e) => {
          const at = this.#scaleIndex(s, e, ["w1", "w3"]);
          return at && {
            full: [I, H],
            rowStart: rank * ip,
            rows: ip,
            colStart: 0,
            cols: H,
            expert: at.expert,
            dstRow: at.shard * ip,
          };
        },
      },
      {
        name: "w2_weight",
        scaleName: "w2_weight_scale",
        shape: [E, H, ip],
        shardRows: [H],
        loader: w2,
        scaleIndex: (s, e) => this.#scaleIndex(s, e, ["w2"]),
        layout: (s, e) => {
          const at = this.#scaleIndex(s, e, ["w2"]);
          return at && {
            full: [H, I],
            rowStart: 0,
            rows: H,
            colStart: rank * ip,
            cols: ip,
            expert: at.expert,
            dstRow: 0,
          };
        },
      },
    ]);
    // A merged load (transformers 5's stacked experts) becomes per-expert loads here, in front
    // of whatever loader the quant method installed, so no method sees one.
    for (const name of ["w13_weight", "w2_weight"]) {
      const slot = this.slot(name);
      const one = slot.weightLoader;
      slot.weightLoader = (s, loaded, shardId, expertId) => {
        for (const p of this.splitMerged(loaded, shardId, expertId)) {
          one(s, p.loaded, p.shardId, p.expertId);
        }
      };
    }
  }

  /**
   * The per-expert loads of a load: a merged one (shard `w13` `[E, 2I, H]`, gate rows then up
   * rows, or `w2` without expert id, `[E, H, I]`) becomes one load per expert it holds (all,
   * or a row window's) and shard; any other load is returned as it is.
   */
  splitMerged(
    loaded: Tensor,
    shardId: ShardId | undefined,
    expertId: number | undefined,
  ): SplitLoad[] {
    if (expertId !== undefined || (shardId !== "w13" && shardId !== "w2")) {
      return [{ loaded, shardId, expertId }];
    }
    const { numExperts: E, hiddenSize: H, intermediateSize: I } = this.#options;
    const w13 = shardId === "w13";
    expectShape(loaded, w13 ? [E, 2 * I, H] : [E, H, I], `FusedMoE merged ${shardId}`);
    const { start, end } = loaded.rowRange;
    const out: SplitLoad[] = [];
    for (let e = start; e < end; e++) {
      const x = select0(loaded, e);
      if (!w13) out.push({ loaded: x, shardId: "w2", expertId: e });
      else {
        out.push({ loaded: x.narrow(0, 0, I), shardId: "w1", expertId: e });
        out.push({ loaded: x.narrow(0, I, I), shardId: "w3", expertId: e });
      }
    }
    return out;
  }

  /** Local index of a global expert id, or -1 when another rank holds it. */
  localExpert(expertId: number | undefined): number {
    if (
      expertId === undefined || !Number.isInteger(expertId) || expertId < 0 ||
      expertId >= this.#options.numExperts
    ) {
      throw new CheckpointError(
        "BAD_EXPERT",
        `FusedMoE expert id must be 0..${this.#options.numExperts - 1}, got ${expertId}`,
      );
    }
    const e = expertId - this.firstExpert;
    return e >= 0 && e < this.localExperts ? e : -1;
  }

  #shard(shardId: ShardId | undefined, allowed: string[]): number {
    const i = allowed.indexOf(String(shardId));
    if (typeof shardId !== "string" || i < 0) {
      throw new CheckpointError(
        "BAD_SHARD",
        `FusedMoE shard id must be ${allowed.join(" or ")}, got ${shardId}`,
      );
    }
    return i;
  }

  #scaleIndex(shardId: ShardId | undefined, expertId: number | undefined, allowed: string[]) {
    const shard = this.#shard(shardId, allowed);
    const expert = this.localExpert(expertId);
    return expert < 0 ? null : { expert, shard };
  }
}

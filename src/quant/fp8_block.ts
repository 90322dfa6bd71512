/**
 * fp8 per 128x128 block, from either kind of checkpoint: model-dtype weights (bf16) are
 * quantized with dynamic block scales, and block-fp8 checkpoints (DeepSeek-V3, Qwen3-FP8:
 * F8_E4M3 `weight` plus `weight_scale_inv` of `[ceil(rows/128), ceil(cols/128)]`) are taken as
 * stored: a fused weight is its shards' fp8 rows and scale rows concatenated, no
 * requantization. Both give the same kernel format (`weight` fp8, `weight_scale` f32 blocks),
 * so a model first loaded from one kind reloads from the other.
 *
 * How: the model format holds `weight` in the model dtype and `weight_scale` (the checkpoint's
 * `weight_scale_inv`, see models/names.ts) as f32 blocks. An fp8 shard waits, as its bytes,
 * in the first bytes of its own rows of that scratch (see {@link packedFp8}) and is copied out
 * when processed; a model-dtype shard is written as usual, counted as covering its scale blocks
 * too, and remembered, and processing quantizes those shards per block. Because each shard starts
 * on a block boundary, quantizing a shard's blocks is quantizing the fused tensor's. A layer whose shards do not
 * start on block boundaries cannot hold a block-fp8 checkpoint exactly: it is quantized like
 * `fp8-block` always was (whole fused tensor, model-dtype checkpoints only).
 * @module
 */

import type { Backend, Granularity } from "../backend/backend.ts";
import { QUANT_BLOCK, scaleShape } from "../backend/abi.ts";
import { CheckpointError } from "../errors.ts";
import type { Module } from "../nn/module.ts";
import { copyInto, select0, type ShardId, TensorSlot, type WeightLoader } from "../nn/slots.ts";
import { type DType, DTYPES } from "../tensor/dtype.ts";
import { shapeString, type Storage, Tensor } from "../tensor/tensor.ts";
import { expertCount, fillKernelTensors, matrices, matrixShape, putTensor } from "./common.ts";
import type {
  KernelDestination,
  QuantMethod,
  ShardLayout,
  WeightSpec,
} from "../nn/quant_method.ts";
import { OnlineQuantMethod } from "./online.ts";

/** Block edge, rows and columns. */
const BLOCK = QUANT_BLOCK;

const blocks = (n: number) => Math.ceil(n / BLOCK);

/** Shape of the block scales of a spec: `[bR, bC]`, or `[E, bR, bC]` for stacked experts. */
function blockScaleShape(spec: WeightSpec): number[] {
  const [rows, cols] = matrixShape(spec);
  const per = scaleShape(rows, cols, "block128");
  const e = expertCount(spec);
  return e === 0 ? per : [e, ...per];
}

/** Shards start on block boundaries: every shard but the last has whole blocks of rows. */
function shardsAligned(spec: WeightSpec): boolean {
  return spec.shardRows.slice(0, -1).every((r) => r % BLOCK === 0);
}

/**
 * The fp8 view of a model-dtype weight `w` (contiguous, `[R, C]` or `[E, R, C]`) in which the
 * shard starting at row `dstRow` keeps its fp8 bytes: row `dstRow + i` of the view starts at
 * the first byte of the model-dtype row `dstRow` plus `i * C` bytes. An fp8 row is at most half
 * a model-dtype row, so a shard's fp8 rows stay within its own model-dtype rows, and shards of
 * either kind never overlap. Meta in, meta out.
 */
export function packedFp8(w: Tensor, spec: WeightSpec, dstRow: number): Tensor {
  if (w.isMeta) return Tensor.meta(w.shape, DTYPES.f8_e4m3fn);
  const ratio = w.dtype.size / DTYPES.f8_e4m3fn.size;
  const [rows, cols] = matrixShape(spec);
  const strides = expertCount(spec) === 0 ? [cols, 1] : [ratio * rows * cols, cols, 1];
  const offset = w.offset * ratio + dstRow * cols * (ratio - 1);
  return new Tensor(w.shape, DTYPES.f8_e4m3fn, w.storage, offset, strides);
}

/** Whether `start` and `count` of `full` cut along block edges (the end may be the tensor's). */
function cutsOnBlocks(start: number, count: number, full: number): boolean {
  return start % BLOCK === 0 && (count % BLOCK === 0 || start + count === full);
}

function checkAligned(l: ShardLayout, what: string): void {
  if (
    !cutsOnBlocks(l.rowStart, l.rows, l.full[0]) || !cutsOnBlocks(l.colStart, l.cols, l.full[1])
  ) {
    throw new CheckpointError(
      "BLOCK_ALIGNMENT",
      `${what}: this rank takes rows [${l.rowStart}, ${
        l.rowStart + l.rows
      }) and columns [${l.colStart}, ${l.colStart + l.cols}) of ${
        shapeString(l.full)
      }, which cut 128x128 blocks; a block-fp8 checkpoint needs another tensor-parallel size`,
    );
  }
}

/** Block-fp8 weights from fp8 or model-dtype checkpoints (see the module doc). */
export class Fp8BlockMethod implements QuantMethod {
  /** `fp8-block`. */
  readonly name: string = "fp8-block";
  readonly #backend: Backend;
  readonly #dtype: DType;
  #specs: readonly WeightSpec[] = [];
  // Layers whose shards cut blocks: the whole fused tensor is quantized, as online methods do.
  #online: OnlineQuantMethod | null = null;
  // The shards (`expert:row`) a model-dtype weight was loaded into, by the storage of the
  // layer's scale scratch: loads write straight into scratch, so what each shard was is known
  // as it arrives, and processing needs no device read to tell (a read would synchronize).
  readonly #quantize = new WeakMap<Storage, Set<string>>();

  /** The quantized dtype: f8_e4m3fn. */
  get target(): DType {
    return DTYPES.f8_e4m3fn;
  }

  /** One scale per 128x128 block. */
  get granularity(): Granularity {
    return "block128";
  }

  /** The weights this method quantizes (set by createWeights). */
  get specs(): readonly WeightSpec[] {
    return this.#specs;
  }

  /**
   * The model-format slots that processing computes from the weights when they come in the
   * model dtype (each weight's block scales); empty for a layer quantized whole.
   */
  get computedSlots(): readonly string[] {
    return this.#online ? [] : this.#specs.map((s) => s.scaleName);
  }

  /** A method on `backend`; `modelDtype` is the dtype of unquantized weights (bf16). */
  constructor(backend: Backend, modelDtype: DType) {
    this.#backend = backend;
    this.#dtype = modelDtype;
  }

  createWeights(layer: Module, specs: readonly WeightSpec[]): void {
    this.#specs = specs;
    if (!specs.every(shardsAligned)) {
      this.#online = new OnlineQuantMethod(
        this.#backend,
        this.#dtype,
        DTYPES.f8_e4m3fn,
        "block128",
      );
      this.#online.createWeights(layer, specs);
      for (const spec of specs) {
        const slot = layer.slot(spec.name);
        const load = slot.weightLoader;
        slot.weightLoader = (s, loaded, shardId, expertId) => {
          if (loaded.dtype === DTYPES.f8_e4m3fn) {
            throw new CheckpointError(
              "BLOCK_ALIGNMENT",
              `block-fp8 weight: this layer's shards of ${
                spec.shardRows.join(", ")
              } rows do not all start on a 128-row block, so its fp8 rows cannot be kept as stored`,
            );
          }
          load(s, loaded, shardId, expertId);
        };
      }
      return;
    }
    for (const spec of specs) {
      layer.setSlot(
        spec.name,
        new TensorSlot(Tensor.meta(spec.shape, this.#dtype), this.#weightLoader(layer, spec)),
      );
      layer.setSlot(
        spec.scaleName,
        new TensorSlot(Tensor.meta(blockScaleShape(spec), DTYPES.f32), this.#scaleLoader(spec)),
      );
    }
  }

  /** The scale blocks of a shard in the layer's scale tensor. */
  #scaleRows(scale: Tensor, spec: WeightSpec, l: ShardLayout): Tensor {
    const m = expertCount(spec) === 0 ? scale : select0(scale, l.expert);
    return m.narrow(0, l.dstRow / BLOCK, blocks(l.rows));
  }

  #weightLoader(layer: Module, spec: WeightSpec): WeightLoader {
    return (slot, loaded, shardId, expertId) =>
      this.#loadWeight(layer, spec, slot, loaded, shardId, expertId);
  }

  #loadWeight(
    layer: Module,
    spec: WeightSpec,
    slot: TensorSlot,
    loaded: Tensor,
    shardId: ShardId | undefined,
    expertId: number | undefined,
  ): void {
    const b = this.#backend;
    const l = spec.layout(shardId, expertId);
    if (loaded.dtype !== DTYPES.f8_e4m3fn) {
      spec.loader(slot, loaded, shardId, expertId);
      // Once per tensor: when its last rows arrive (a big one comes as row windows).
      if (l === null || loaded.rowRange.end !== loaded.shape[0]) return;
      // The load covers the shard's scale blocks too (processing computes them). When the
      // weight slot is meta the load is being counted, against that slot alone: count them.
      if (slot.tensor.isMeta) {
        const blocksOf = Tensor.meta([blocks(l.rows), blocks(matrixShape(spec)[1])], DTYPES.f32);
        copyInto(b, blocksOf, blocksOf);
        return;
      }
      const scratch = layer.slot(spec.scaleName).tensor.storage;
      if (scratch === null) return; // a planner's dry run against kept tensors: nothing to note
      const shards = this.#quantize.get(scratch) ?? new Set<string>();
      shards.add(`${l.expert}:${l.dstRow}`);
      this.#quantize.set(scratch, shards);
      return;
    }
    if (l !== null) {
      checkAligned(l, `block-fp8 weight${shardId === undefined ? "" : ` shard ${shardId}`}`);
    }
    // The layer's own loader narrows it (rank, shard, expert) into the bytes where it waits.
    const view = packedFp8(slot.tensor, spec, l?.dstRow ?? 0);
    spec.loader(new TensorSlot(view, spec.loader), loaded, shardId, expertId);
  }

  #scaleLoader(spec: WeightSpec): WeightLoader {
    const b = this.#backend;
    return (slot, loaded, shardId, expertId) => {
      const l = spec.layout(shardId, expertId);
      if (l === null) return;
      const what = `block scales${shardId === undefined ? "" : ` of shard ${shardId}`}`;
      const want = [blocks(l.full[0]), blocks(l.full[1])];
      if (loaded.shape.length !== 2 || loaded.shape[0] !== want[0] || loaded.shape[1] !== want[1]) {
        throw new CheckpointError(
          "SHAPE_MISMATCH",
          `${what}: expected ${shapeString(want)} (128x128 blocks of ${shapeString(l.full)}), got ${
            shapeString(loaded.shape)
          }`,
        );
      }
      if (loaded.dtype !== DTYPES.f32 && loaded.dtype !== DTYPES.bf16) {
        throw new CheckpointError(
          "DTYPE_MISMATCH",
          `${what}: expected F32 or BF16, got ${loaded.dtype.name}`,
        );
      }
      checkAligned(l, what);
      const src = loaded
        .narrow(0, l.rowStart / BLOCK, blocks(l.rows))
        .narrow(1, l.colStart / BLOCK, blocks(l.cols));
      copyInto(b, this.#scaleRows(slot.tensor, spec, l), src);
    };
  }

  /**
   * Which shards of a spec's loaded weight came as fp8 (per expert, then shard): those not
   * loaded from the model dtype. Their scales, read back only when there are any, must be
   * positive and finite.
   */
  #storedShards(spec: WeightSpec, scales: Tensor): boolean[] {
    const quantize = this.#quantize.get(scales.storage!) ?? new Set<string>();
    const out: boolean[] = [];
    for (let e = 0; e < Math.max(1, expertCount(spec)); e++) {
      let row = 0;
      for (const r of spec.shardRows) {
        out.push(!quantize.has(`${e}:${row}`));
        row += r;
      }
    }
    if (!out.includes(true)) return out;
    const values = new Float32Array(this.#backend.download(scales).buffer);
    const [rows, cols] = matrixShape(spec);
    const perMatrix = blocks(rows) * blocks(cols);
    let k = 0;
    for (let e = 0; e < Math.max(1, expertCount(spec)); e++) {
      let row = 0;
      for (const [i, r] of spec.shardRows.entries()) {
        const at = e * perMatrix + (row / BLOCK) * blocks(cols);
        const bad = values.subarray(at, at + blocks(r) * blocks(cols))
          .find((x) => !(x > 0 && x < Infinity));
        if (out[k++] && bad !== undefined) {
          throw new CheckpointError(
            "BAD_SCALE",
            `${spec.scaleName} of ${expertCount(spec) > 0 ? `expert ${e} ` : ""}shard ${i}: ` +
              `block-fp8 scales must be positive and finite, got ${bad}`,
          );
        }
        row += r;
      }
    }
    return out;
  }

  processWeightsAfterLoading(layer: Module, into?: KernelDestination): void {
    if (this.#online) {
      this.#online.processWeightsAfterLoading(layer, into);
      return;
    }
    const b = this.#backend;
    // Every spec is checked before anything is written (asking `into` counts as writing).
    const plans = this.#specs.map((spec) => {
      const w = layer.slot(spec.name).tensor;
      const given = layer.slot(spec.scaleName).tensor;
      const stored = this.#storedShards(spec, given);
      return { spec, w, given, stored };
    });
    for (const { spec, w, given, stored } of plans) {
      const [q, s] = fillKernelTensors(b, into, [
        [spec.name, w.shape, DTYPES.f8_e4m3fn],
        [spec.scaleName, given.shape, DTYPES.f32],
      ], ([q, s]) => {
        const qs = matrices(q), ws = matrices(w), ss = matrices(s), gs = matrices(given);
        let k = 0;
        for (let e = 0; e < qs.length; e++) {
          let row = 0;
          for (const rows of spec.shardRows) {
            const br = row / BLOCK, nb = blocks(rows);
            const qr = qs[e].narrow(0, row, rows), sr = ss[e].narrow(0, br, nb);
            if (stored[k++]) {
              // As stored: the fp8 rows (where the loader left them) and their scale rows.
              b.copy(qr, matrices(packedFp8(w, spec, row))[e].narrow(0, row, rows));
              b.copy(sr, gs[e].narrow(0, br, nb));
            } else b.quantizeFp8(qr, sr, ws[e].narrow(0, row, rows), "block128", true);
            row += rows;
          }
        }
      });
      b.free(w.storage!);
      b.free(given.storage!);
      putTensor(layer, spec.name, q);
      putTensor(layer, spec.scaleName, s);
    }
  }
}

/**
 * Tensor slots and the loaders that write into them. A slot holds a {@link Tensor} that can be
 * swapped (meta, materialized model format, processed kernel format) and the weight loader that
 * writes checkpoint tensors into it.
 *
 * Loaders write only through {@link copyInto}: when the destination is a meta tensor it counts
 * the elements it would write instead of copying, which is how the reload learns how many
 * elements a load contributes by running the real loader against meta destinations.
 * @module
 */

import type { Backend } from "../backend/backend.ts";
import { CheckpointError, ReloadError } from "../errors.ts";
import { type DType, isModelFloat } from "../tensor/dtype.ts";
import { shapeString, Tensor } from "../tensor/tensor.ts";

/** Identifies a shard of a fused tensor: `"q"`, `"k"`, `"v"`, `0..n-1`, `"w1"`, `"w2"`, `"w3"`. */
export type ShardId = string | number;

/**
 * Writes one checkpoint tensor (`loaded`, on the backend, in checkpoint format) into the
 * slot's tensor, narrowing to the shard, expert and tensor-parallel rank it belongs to.
 */
export type WeightLoader = (
  slot: TensorSlot,
  loaded: Tensor,
  shardId?: ShardId,
  expertId?: number,
) => void;

/** Whether a slot is a learnable parameter or a buffer (both are reloaded alike). */
export type SlotKind = "param" | "buffer";

/** Options of a {@link TensorSlot}. */
export interface SlotOptions {
  /** `param` (default) or `buffer`. */
  kind?: SlotKind;
  /**
   * Value written into the tensor right after it is given storage, for elements no load
   * writes (vocabulary padding) or a "not loaded" sentinel (attention scales).
   */
  initValue?: number;
}

/** A named place for a tensor in a module; the same slot may be shared by two modules (tying). */
export class TensorSlot {
  /** The current tensor: meta, model format or kernel format. */
  tensor: Tensor;
  /** The loader that writes checkpoint tensors into {@link tensor}. */
  weightLoader: WeightLoader;
  /** `param` or `buffer`. */
  readonly kind: SlotKind;
  /** See {@link SlotOptions.initValue}. */
  readonly initValue: number | undefined;

  /** Creates a slot holding `tensor` with `weightLoader`. */
  constructor(tensor: Tensor, weightLoader: WeightLoader, options: SlotOptions = {}) {
    this.tensor = tensor;
    this.weightLoader = weightLoader;
    this.kind = options.kind ?? "param";
    this.initValue = options.initValue;
  }
}

// ------------------------------------------------------------------ writing and counting

interface Counter {
  elements: number;
}

// Loaders are synchronous, so one active counter at a time is enough; it is only set for the
// duration of countWrites and never holds a model.
let activeCounter: Counter | null = null;

/**
 * Runs `fn` (a loader call) and returns the number of elements it wrote into meta tensors.
 * Nested calls each get their own count.
 */
export function countWrites(fn: () => void): number {
  const outer = activeCounter;
  const counter: Counter = { elements: 0 };
  activeCounter = counter;
  try {
    fn();
  } finally {
    activeCounter = outer;
  }
  return counter.elements;
}

/** One write a loader made under {@link recordWrites}: the destination and source views. */
export interface RecordedWrite {
  /** The destination view (of the slot's tensor). */
  readonly dst: Tensor;
  /** The source view (of the loaded tensor), same shape. */
  readonly src: Tensor;
}

let activeRecorder: RecordedWrite[] | null = null;

/**
 * A tensor of `shape` and `dtype` on storage that is no memory (a `plan` backend, address 0):
 * what loaders write into and read from under {@link recordWrites}, where nothing is written.
 */
export function placeholderTensor(shape: readonly number[], dtype: DType): Tensor {
  const bytes = shape.reduce((a, b) => a * b, 1) * dtype.size;
  return new Tensor(shape, dtype, { backend: { kind: "plan" }, ptr: 0, bytes, freed: false });
}

/**
 * Runs `fn` (a loader call) and returns the writes it made instead of making them: every
 * {@link copyInto} is recorded as its (destination, source) views, after the checks of a real
 * write. Planning uses it to learn where each checkpoint tensor goes without moving a byte.
 */
export function recordWrites(fn: () => void): RecordedWrite[] {
  const outer = activeRecorder;
  const writes: RecordedWrite[] = [];
  activeRecorder = writes;
  try {
    fn();
  } finally {
    activeRecorder = outer;
  }
  return writes;
}

/**
 * The only way loaders write: `dst = src` (casting between f32/f16/bf16). Shapes must match;
 * quantized dtypes (fp8, int8) must match exactly. When `dst` is a meta tensor, its element
 * count is added to the active {@link countWrites} counter and nothing is copied.
 *
 * When `src` is a row window (a chunk of a checkpoint tensor, see `rowWindow`, narrowed by the
 * loader), only the rows of dimension 0 it holds are written (or counted), into the same rows
 * of `dst`; a window that misses the loader's rows writes nothing. The backend only ever sees
 * plain views. A `src` that is `dst` itself (same storage, offset, dtype, shape and strides: a
 * read placed into the scratch, ARCHITECTURE.md "Read paths") is already in place: nothing is
 * copied.
 */
export function copyInto(backend: Backend, dst: Tensor, src: Tensor): void {
  if (dst.shape.length !== src.shape.length || dst.shape.some((d, i) => d !== src.shape[i])) {
    throw new CheckpointError(
      "SHAPE_MISMATCH",
      `expected ${shapeString(dst.shape)}, got ${shapeString(src.shape)}`,
    );
  }
  if (dst.dtype !== src.dtype && !(isModelFloat(dst.dtype) && isModelFloat(src.dtype))) {
    throw new CheckpointError(
      "DTYPE_MISMATCH",
      `expected ${dst.dtype.name}, got ${src.dtype.name}`,
    );
  }
  if (dst.window) {
    throw new ReloadError("WINDOWED", `a load into ${dst}: a destination holds every row`);
  }
  if (dst.isMeta && !activeCounter && !activeRecorder) {
    throw new ReloadError("META_WRITE", `a load into meta tensor ${dst} outside of counting`);
  }
  if (src.window) {
    const { start, end } = src.window;
    if (end === start) return;
    dst = dst.narrow(0, start, end - start);
    src = src.windowRows();
  }
  if (activeRecorder) {
    activeRecorder.push({ dst, src });
    return;
  }
  if (dst.isMeta) {
    activeCounter!.elements += dst.numel;
    return;
  }
  // The bytes were read into their place already (ARCHITECTURE.md, "Read paths").
  if (sameView(dst, src)) return;
  backend.copy(dst, src);
}

/** Whether `a` and `b` are the same elements of the same storage, laid out alike. */
function sameView(a: Tensor, b: Tensor): boolean {
  return a.storage === b.storage && a.offset === b.offset && a.dtype === b.dtype &&
    a.shape.every((d, i) => d === b.shape[i]) && a.strides.every((s, i) => s === b.strides[i]);
}

/** Throws CheckpointError SHAPE_MISMATCH unless `t` has exactly `shape`; `what` names the load. */
export function expectShape(t: Tensor, shape: readonly number[], what: string): void {
  if (t.shape.length !== shape.length || t.shape.some((d, i) => d !== shape[i])) {
    throw new CheckpointError(
      "SHAPE_MISMATCH",
      `${what}: expected ${shapeString(shape)}, got ${shapeString(t.shape)}`,
    );
  }
}

/** The loader of plain tensors: the whole tensor (a one-element tensor may have any shape). */
export function defaultWeightLoader(backend: Backend): WeightLoader {
  return (slot, loaded) => {
    const dst = slot.tensor;
    const src = dst.numel === 1 && loaded.numel === 1 ? loaded.reshape(dst.shape) : loaded;
    copyInto(backend, dst, src);
  };
}

/**
 * The sub-tensor at index `i` of dimension 0 (the dimension is dropped). Of a row window, only
 * a row it holds can be selected.
 */
export function select0(t: Tensor, i: number): Tensor {
  const v = t.narrow(0, i, 1);
  if (v.window) {
    throw new ReloadError("WINDOWED", `select0: row ${i} of ${t} is not held`);
  }
  if (!v.storage) return Tensor.meta(t.shape.slice(1), t.dtype);
  return new Tensor(t.shape.slice(1), t.dtype, v.storage, v.offset, v.strides.slice(1));
}

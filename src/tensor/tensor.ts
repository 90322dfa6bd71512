/**
 * Tensors: a shape, a dtype, and a place in backend memory (storage + element offset +
 * strides). A tensor without storage is a *meta* tensor: shape and dtype only, used to
 * describe what a layer expects without holding its bytes.
 * @module
 */

import { BackendError } from "../errors.ts";
import type { DType } from "./dtype.ts";

/** A block of backend memory. `ptr` is a device pointer (CUDA) or a memory offset (WASM). */
export interface Storage {
  /** The backend that owns the memory. */
  readonly backend: { readonly kind: string };
  /** Address of the first byte: device pointer or WebAssembly memory offset. */
  readonly ptr: number;
  /** Size in bytes. */
  readonly bytes: number;
  /** Set once the memory has been given back; using it afterwards is an error. */
  freed: boolean;
}

/** A 2-D description of a tensor's elements: `rows` runs of `cols` elements, `pitch` apart. */
export interface Layout2D {
  /** Number of contiguous runs. */
  readonly rows: number;
  /** Elements per run. */
  readonly cols: number;
  /** Distance in elements between the starts of two runs. */
  readonly pitch: number;
}

/**
 * Rows `[start, end)` of dimension 0 that a windowed tensor holds (see {@link rowWindow}); the
 * other rows of its shape are not there.
 */
export interface RowWindow {
  /** First row held. */
  readonly start: number;
  /** One past the last row held. */
  readonly end: number;
}

/** Row-major strides (in elements) of a contiguous tensor of this shape. */
export function contiguousStrides(shape: readonly number[]): number[] {
  const strides = new Array<number>(shape.length);
  let s = 1;
  for (let i = shape.length - 1; i >= 0; i--) {
    strides[i] = s;
    s *= shape[i];
  }
  return strides;
}

/** The number of elements of a shape. */
export function numelOf(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

/** Formats a shape as `[a, b]` for messages. */
export function shapeString(shape: readonly number[]): string {
  return `[${shape.join(", ")}]`;
}

function checkShape(shape: readonly number[]): void {
  for (const d of shape) {
    if (!Number.isSafeInteger(d) || d < 0) {
      throw new BackendError(
        "BAD_SHAPE",
        `invalid shape ${shapeString(shape)}`,
      );
    }
  }
}

/**
 * A view of backend memory (or, without storage, a meta tensor). A *windowed* tensor (see
 * {@link rowWindow}) has the full shape of a checkpoint tensor but holds only the rows of its
 * {@link Tensor.window}: `narrow` carries the window along, `copyInto` writes only those rows,
 * and it is never given to a backend (its `ptr` throws); {@link Tensor.windowRows} is the
 * plain view of the rows it holds.
 */
export class Tensor {
  /** Sizes of each dimension. */
  readonly shape: readonly number[];
  /** Element type. */
  readonly dtype: DType;
  /** The memory the tensor lives in; null for a meta tensor. */
  readonly storage: Storage | null;
  /** Offset of the first element into the storage, in elements. */
  readonly offset: number;
  /** Distance between neighbours along each dimension, in elements. */
  readonly strides: readonly number[];
  /**
   * The rows of dimension 0 this tensor holds, or null when it holds all of them. `offset`
   * and `strides` address the full shape, so for a window not starting at row 0 `offset` may
   * point before the storage; only the window's rows must lie inside it.
   */
  readonly window: RowWindow | null;
  // Shapes and strides never change: computed once (both are read per call on hot paths).
  readonly #numel: number;
  readonly #contiguous: boolean;

  /**
   * Creates a view; without `strides` the view is contiguous. With `window`, only those rows of
   * dimension 0 must lie inside the storage (a window of every row is no window).
   */
  constructor(
    shape: readonly number[],
    dtype: DType,
    storage: Storage | null,
    offset = 0,
    strides?: readonly number[],
    window?: RowWindow | null,
  ) {
    checkShape(shape);
    this.shape = Object.freeze([...shape]);
    this.dtype = dtype;
    this.storage = storage;
    this.offset = offset;
    this.strides = Object.freeze(
      strides ? [...strides] : contiguousStrides(shape),
    );
    this.#numel = numelOf(shape);
    const c = strides ? contiguousStrides(shape) : this.strides;
    this.#contiguous = shape.every((d, i) => d === 1 || this.strides[i] === c[i]);
    let rows = shape[0];
    if (window) {
      const { start, end } = window;
      if (
        shape.length === 0 || !Number.isSafeInteger(start) || !Number.isSafeInteger(end) ||
        start < 0 || end < start || end > shape[0]
      ) {
        throw new BackendError(
          "OUT_OF_RANGE",
          `row window [${start}, ${end}) does not fit shape ${shapeString(shape)}`,
        );
      }
      rows = end - start;
      this.window = start === 0 && end === shape[0] ? null : Object.freeze({ start, end });
    } else this.window = null;
    if (storage && window && rows === 0) {
      // An empty window holds no bytes: nothing to check.
    } else if (storage) {
      const first = window ? offset + window.start * this.strides[0] : offset;
      const end = this.#lastByte(first, rows);
      if (first < 0 || end > storage.bytes) {
        throw new BackendError(
          "OUT_OF_RANGE",
          `view ${shapeString(shape)} ${dtype.name}${
            window ? ` rows [${window.start}, ${window.end})` : ""
          } at element ${first} ends at byte ${end}, past its storage of ${storage.bytes} bytes`,
        );
      }
    }
  }

  /** A meta tensor: shape and dtype, no storage. */
  static meta(shape: readonly number[], dtype: DType): Tensor {
    return new Tensor(shape, dtype, null);
  }

  /** Number of elements. */
  get numel(): number {
    return this.#numel;
  }

  /** Bytes the elements occupy when contiguous. */
  get nbytes(): number {
    return this.numel * this.dtype.size;
  }

  /** True when the tensor has no storage. */
  get isMeta(): boolean {
    return this.storage === null;
  }

  /** True when the elements are laid out row-major without gaps. */
  get isContiguous(): boolean {
    return this.#contiguous;
  }

  /** Address of the first element (device pointer or WebAssembly offset). */
  get ptr(): number {
    if (!this.storage) {
      throw new BackendError("META_TENSOR", "a meta tensor has no storage");
    }
    if (this.window) {
      throw new BackendError(
        "WINDOWED",
        `${this} holds only some rows: give a backend its windowRows()`,
      );
    }
    if (this.storage.freed) {
      throw new BackendError("FREED", "the tensor's storage has been freed");
    }
    return this.storage.ptr + this.offset * this.dtype.size;
  }

  /** End byte of the view starting at element `first` with `rows` entries of dimension 0. */
  #lastByte(first: number, rows: number): number {
    if (this.numel === 0 || rows === 0) return first * this.dtype.size;
    let last = first;
    for (let i = 0; i < this.shape.length; i++) {
      last += ((i === 0 ? rows : this.shape[i]) - 1) * this.strides[i];
    }
    return (last + 1) * this.dtype.size;
  }

  /** Rows of dimension 0 this tensor holds: its window, or every row. */
  get rowRange(): RowWindow {
    return this.window ?? { start: 0, end: this.shape.length === 0 ? 1 : this.shape[0] };
  }

  /**
   * The rows this tensor holds as a plain view (the tensor itself when it is not windowed):
   * what a backend may be given.
   */
  windowRows(): Tensor {
    const w = this.window;
    // A dim-0 narrow to exactly the window's rows leaves a window covering every row: plain.
    return w ? this.narrow(0, w.start, w.end - w.start) : this;
  }

  /** A view of `length` entries of dimension `dim` starting at `start` (shares storage). */
  narrow(dim: number, start: number, length: number): Tensor {
    if (dim < 0) dim += this.shape.length;
    if (dim < 0 || dim >= this.shape.length) {
      throw new BackendError(
        "BAD_DIM",
        `narrow: dimension ${dim} out of range for shape ${shapeString(this.shape)}`,
      );
    }
    if (
      !Number.isSafeInteger(start) || !Number.isSafeInteger(length) ||
      start < 0 ||
      length < 0 || start + length > this.shape[dim]
    ) {
      throw new BackendError(
        "OUT_OF_RANGE",
        `narrow: [${start}, ${start + length}) out of range for dimension ${dim} of size ${
          this.shape[dim]
        }`,
      );
    }
    const shape = [...this.shape];
    shape[dim] = length;
    const offset = this.storage ? this.offset + start * this.strides[dim] : 0;
    // Along dimension 0 the window moves with the view and is cut to it; other narrows keep it.
    let window = this.window;
    if (window && dim === 0) {
      const s = Math.min(Math.max(window.start - start, 0), length);
      window = { start: s, end: Math.min(Math.max(window.end - start, s), length) };
    }
    return new Tensor(
      shape,
      this.dtype,
      this.storage,
      offset,
      this.storage ? this.strides : undefined,
      window,
    );
  }

  /** The same elements with another shape; the tensor must be contiguous and not windowed. */
  reshape(shape: readonly number[]): Tensor {
    if (this.window) {
      throw new BackendError("WINDOWED", `reshape: ${this} holds only some rows`);
    }
    if (numelOf(shape) !== this.numel) {
      throw new BackendError(
        "BAD_SHAPE",
        `reshape: ${shapeString(this.shape)} has ${this.numel} elements, ${
          shapeString(shape)
        } needs ${numelOf(shape)}`,
      );
    }
    if (!this.isContiguous) {
      throw new BackendError(
        "NOT_CONTIGUOUS",
        "reshape: the tensor is not contiguous",
      );
    }
    return new Tensor(shape, this.dtype, this.storage, this.offset);
  }

  /** The view as rows of contiguous runs, or null when it cannot be described that way. */
  layout2d(): Layout2D | null {
    // Drop size-1 dimensions: they do not affect addressing.
    const dims: { size: number; stride: number }[] = [];
    for (let i = 0; i < this.shape.length; i++) {
      if (this.shape[i] !== 1) {
        dims.push({ size: this.shape[i], stride: this.strides[i] });
      }
    }
    if (dims.length === 0) return { rows: 1, cols: 1, pitch: 1 };
    // Merge the innermost dimensions that are contiguous into one run (a run of one element
    // when the innermost is strided: a one-column view of a matrix).
    let k = dims.length - 1;
    let cols = 1;
    if (dims[k].stride === 1) {
      cols = dims[k].size;
      while (k > 0 && dims[k - 1].stride === cols) cols *= dims[--k].size;
      if (k === 0) return { rows: 1, cols, pitch: cols };
    } else k = dims.length;
    // What remains outside must be one evenly strided dimension (or mergeable into one).
    let rows = dims[k - 1].size;
    const pitch = dims[k - 1].stride;
    for (let j = k - 2; j >= 0; j--) {
      if (dims[j].stride !== rows * pitch) return null;
      rows *= dims[j].size;
    }
    return { rows, cols, pitch };
  }

  /** A short description for messages: `bf16[4096, 4096]`. */
  toString(): string {
    const w = this.window ? ` rows [${this.window.start}, ${this.window.end})` : "";
    return `${this.dtype.name}${shapeString(this.shape)}${w}${this.isMeta ? " (meta)" : ""}`;
  }
}

/**
 * A row chunk of a larger checkpoint tensor, as a load: `chunk` holds rows
 * `[rowStart, rowStart + chunk.shape[0])` of a tensor of `totalRows` rows (its other dimensions
 * are the chunk's). The result has the full shape and the chunk's rows as its window; loaders
 * take it like the whole tensor and write only those rows (see `copyInto`), and the reload
 * counts only them, so a big tensor can arrive as consecutive (or shuffled) chunks without
 * ever being whole in memory. A chunk of every row is the chunk itself.
 */
export function rowWindow(chunk: Tensor, rowStart: number, totalRows: number): Tensor {
  if (chunk.window) {
    throw new BackendError("WINDOWED", `rowWindow: ${chunk} is already a row window`);
  }
  if (chunk.shape.length === 0) {
    throw new BackendError("BAD_SHAPE", "rowWindow: a scalar has no rows");
  }
  const rows = chunk.shape[0];
  if (
    !Number.isSafeInteger(rowStart) || !Number.isSafeInteger(totalRows) || rowStart < 0 ||
    rowStart + rows > totalRows
  ) {
    throw new BackendError(
      "OUT_OF_RANGE",
      `rowWindow: rows [${rowStart}, ${rowStart + rows}) do not fit ${totalRows} rows`,
    );
  }
  const shape = [totalRows, ...chunk.shape.slice(1)];
  const offset = chunk.storage ? chunk.offset - rowStart * chunk.strides[0] : 0;
  return new Tensor(
    shape,
    chunk.dtype,
    chunk.storage,
    offset,
    chunk.storage ? chunk.strides : undefined,
    { start: rowStart, end: rowStart + rows },
  );
}

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

/** A view of backend memory (or, without storage, a meta tensor). */
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

  /** Creates a view; without `strides` the view is contiguous. */
  constructor(
    shape: readonly number[],
    dtype: DType,
    storage: Storage | null,
    offset = 0,
    strides?: readonly number[],
  ) {
    checkShape(shape);
    this.shape = Object.freeze([...shape]);
    this.dtype = dtype;
    this.storage = storage;
    this.offset = offset;
    this.strides = Object.freeze(
      strides ? [...strides] : contiguousStrides(shape),
    );
    if (storage) {
      const end = this.#lastByte();
      if (offset < 0 || end > storage.bytes) {
        throw new BackendError(
          "OUT_OF_RANGE",
          `view ${
            shapeString(shape)
          } ${dtype.name} at element ${offset} ends at byte ${end}, past its storage of ${storage.bytes} bytes`,
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
    return numelOf(this.shape);
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
    const c = contiguousStrides(this.shape);
    for (let i = 0; i < this.shape.length; i++) {
      if (this.shape[i] !== 1 && this.strides[i] !== c[i]) return false;
    }
    return true;
  }

  /** Address of the first element (device pointer or WebAssembly offset). */
  get ptr(): number {
    if (!this.storage) {
      throw new BackendError("META_TENSOR", "a meta tensor has no storage");
    }
    if (this.storage.freed) {
      throw new BackendError("FREED", "the tensor's storage has been freed");
    }
    return this.storage.ptr + this.offset * this.dtype.size;
  }

  #lastByte(): number {
    if (this.numel === 0) return this.offset * this.dtype.size;
    let last = this.offset;
    for (let i = 0; i < this.shape.length; i++) {
      last += (this.shape[i] - 1) * this.strides[i];
    }
    return (last + 1) * this.dtype.size;
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
    return new Tensor(
      shape,
      this.dtype,
      this.storage,
      offset,
      this.storage ? this.strides : undefined,
    );
  }

  /** The same elements with another shape; the tensor must be contiguous. */
  reshape(shape: readonly number[]): Tensor {
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
    // Merge the innermost dimensions that are contiguous into one run.
    let k = dims.length - 1;
    if (dims[k].stride !== 1) return null;
    let cols = dims[k].size;
    while (k > 0 && dims[k - 1].stride === cols) cols *= dims[--k].size;
    if (k === 0) return { rows: 1, cols, pitch: cols };
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
    return `${this.dtype.name}${shapeString(this.shape)}${this.isMeta ? " (meta)" : ""}`;
  }
}

/**
 * The Backend interface: memory and kernels, the same on CUDA and WebAssembly. The reload
 * engine talks only to this interface.
 * @module
 */

import type { DType } from "../tensor/dtype.ts";
import type { Storage, Tensor } from "../tensor/tensor.ts";
import type { StagedTensor, StagingOptions, StagingStats } from "./cuda/staging_plan.ts";

/** Which implementation a backend is. */
export type BackendKind = "cuda" | "wasm";

/** Quantization granularity: one scale per tensor, per row, or per 128x128 block. */
export type Granularity = "tensor" | "row" | "block128";

/** What a multi-tensor quantize launch computes (cuda/layerwise.h, LW_MT_*). */
export type MultiTensorKind = "fp8-tensor" | "fp8-row" | "fp8-block128" | "int8-row";

/**
 * One launch of the multi-tensor kernels over work tables held in backend memory (the layout
 * of cuda/layerwise.h, "multi-tensor kernels"): `absmax` writes the per-tensor fp8 scale of
 * every target, `quant` quantizes every target from its pieces (`kind`), `copy` copies or
 * casts. Offsets are bytes into `table`.
 */
export interface MultiTensorLaunch {
  /**
   * `absmax` (per-tensor fp8 scales of the targets), `quant`, `copy`; or `scan`, which writes
   * only the partials: one uint32 per item, the largest magnitude bits of its source elements in
   * the source dtype, at or above that dtype's infinity bits when the item holds a NaN or
   * infinity (nothing of the model is written); and `fold`, which turns a scan's partials into
   * the per-tensor fp8 scales, as `absmax` would (so a checked reload reads its sources once for
   * both).
   */
  readonly op: "absmax" | "scan" | "fold" | "quant" | "copy";
  /** With `quant`: the scheme. */
  readonly kind?: MultiTensorKind;
  /** The storage holding every table. */
  readonly table: Storage;
  /** Byte offset of the targets table. */
  readonly targets: number;
  /** Byte offset of the pieces table. */
  readonly pieces: number;
  /** Byte offset of the items table. */
  readonly items: number;
  /** Byte offset of the source addresses (one uint64 per source). */
  readonly bases: number;
  /**
   * With `absmax`, `scan` and `fold`: byte offset of the uint32 partials (one per item); with
   * `absmax`, {@link MultiTensorLaunch.counters} too (one per target).
   */
  readonly partials?: number;
  /** See {@link MultiTensorLaunch.partials}. */
  readonly counters?: number;
  /** First item of this launch. */
  readonly first: number;
  /** Items in this launch. */
  readonly count: number;
  /** dtype of every source piece of the launch. */
  readonly srcDtype: DType;
  /** With `copy`: the destination dtype. */
  readonly dstDtype?: DType;
}

/** Memory and kernels on one device. All kernels validate first and write nothing on error. */
export interface Backend {
  /** `cuda` or `wasm`. */
  readonly kind: BackendKind;
  /** A human description, e.g. `cuda:0 NVIDIA H200` or `wasm (simd128)`. */
  readonly description: string;

  /** Allocates `bytes` of backend memory (contents undefined). */
  alloc(bytes: number): Storage;
  /** Gives memory back. Freeing twice is an error. */
  free(storage: Storage): void;
  /** A new contiguous tensor with its own storage (contents undefined). */
  empty(shape: readonly number[], dtype: DType): Tensor;
  /** Bytes currently allocated through this backend. */
  allocatedBytes(): number;
  /**
   * Memory this backend does not own (a device pointer of another allocation, an IPC mapping,
   * a WebAssembly memory offset) as a Storage that kernels accept; `free` forgets it without
   * releasing it, and it is not counted by allocatedBytes.
   */
  borrow(ptr: number, bytes: number): Storage;

  /** Copies host bytes into a tensor (contiguous or 2-D strided); `src.length` must equal its nbytes. */
  upload(dst: Tensor, src: Uint8Array): void;
  /** Copies a tensor's elements to the host, compacted to row-major order. */
  download(src: Tensor): Uint8Array;

  /** dst = src, converting dtype when they differ; views may be 2-D strided; shapes must match. */
  copy(dst: Tensor, src: Tensor): void;
  /** Sets every element of a contiguous tensor to `value` (converted to its dtype). */
  fill(dst: Tensor, value: number): void;

  /** max |x| over a floating tensor (NaN if any element is NaN). */
  absmax(src: Tensor): number;
  /** Number of NaN and infinite elements. */
  countNonFinite(src: Tensor): number;
  /**
   * {@link Backend.countNonFinite} of each contiguous tensor, waiting for the device once for
   * all of them (a scan of a whole model is hundreds of tensors).
   */
  countNonFiniteEach(srcs: readonly Tensor[]): number[];
  /**
   * fp8 e4m3fn quantization of a contiguous 2-D (or 1-D, as one row) f32/f16/bf16 tensor.
   * With `dynamic`, scales are computed and written to `scale`; otherwise `scale` is read.
   */
  quantizeFp8(
    q: Tensor,
    scale: Tensor,
    src: Tensor,
    granularity: Granularity,
    dynamic: boolean,
  ): void;
  /** int8 per-row quantization with dynamic scales. */
  quantizeInt8(q: Tensor, scale: Tensor, src: Tensor): void;
  /** dst = f32(q) * scale, converted to dst's dtype (f32/f16/bf16). */
  dequantizeFp8(
    dst: Tensor,
    q: Tensor,
    scale: Tensor,
    granularity: Granularity,
  ): void;

  /** Queues one multi-tensor kernel launch (see {@link MultiTensorLaunch}). */
  launchMultiTensor(launch: MultiTensorLaunch): void;

  /** Waits for all queued work. */
  synchronize(): void;

  /**
   * Present when the backend's memory is host memory (WebAssembly): a view of a contiguous
   * tensor's bytes in place, so that file reads land there without a copy. The memory is
   * shared, so growth never detaches the view: it stays valid until the tensor is freed, and
   * reads into it may run while other tensors are allocated.
   */
  readonly hostView?: (tensor: Tensor) => Uint8Array;
  /**
   * Present when the backend reads files itself (CUDA on Linux): staged reads through pinned
   * memory (ARCHITECTURE.md, "Read paths").
   */
  readonly fileReader?: StagedReader;
  /** Releases everything; the backend is unusable afterwards. */
  close(): void;
}

/** Staged file reads of a backend; see {@link Backend.fileReader}. */
export interface StagedReader {
  /**
   * Reads the `located` tensors of `files` (in that order) and yields each as a contiguous
   * tensor in backend memory, borrowed until the consumer asks for the next one; a tensor
   * larger than the staging ring allows comes as consecutive row chunks (`rowWindow`s) under
   * its name. `infoOf` gives a tensor's shape and dtype. Returns true after the last tensor.
   */
  read(
    files: readonly string[],
    located: readonly StagedTensor[],
    infoOf: (name: string) => { readonly shape: readonly number[]; readonly dtype: DType },
    options?: StagingOptions,
    stats?: StagingStats,
  ): AsyncGenerator<[string, Tensor], boolean>;
  /**
   * Frees the pinned memory kept between reads (pinning is slow). Call before closing the
   * backend; a later read pins again.
   */
  release(): void;
}

/** The optional parts of a {@link Backend}, given by the implementation that has them. */
export type BackendCapabilities = Pick<Backend, "hostView" | "fileReader">;

/**
 * The Backend implementation shared by CUDA and WebAssembly. Each backend supplies a
 * `RawDevice` (memory and the C kernel ABI as plain numbers); this class does every check
 * first, so both backends accept and refuse exactly the same calls, and a refused call
 * writes nothing.
 * @module
 */

import { BackendError } from "../errors.ts";
import { type DType, DTYPES, isModelFloat } from "../tensor/dtype.ts";
import { type Layout2D, shapeString, type Storage, Tensor } from "../tensor/tensor.ts";
import {
  GRANULARITY_CODE,
  MULTI_TENSOR_FIELDS,
  MULTI_TENSOR_KIND_CODE,
  scaleCount,
  statusError,
} from "./abi.ts";
import type {
  Backend,
  BackendCapabilities,
  BackendKind,
  Granularity,
  MultiTensorLaunch,
  StagedReader,
} from "./backend.ts";

/**
 * The kernel section of the C ABI (cuda/layerwise.h) as JS sees it: the context first, pointers
 * and sizes as numbers, a status back. Both the WASM module's exports and the CUDA library's FFI
 * symbols have exactly this shape.
 */
export interface KernelAbi {
  /** lw_cast: strided 2-D conversion (or copy) between dtypes. */
  lw_cast(
    ctx: number,
    dst: number,
    dstDtype: number,
    dstPitch: number,
    src: number,
    srcDtype: number,
    srcPitch: number,
    rows: number,
    cols: number,
  ): number;
  /** lw_copy: n bytes. */
  lw_copy(ctx: number, dst: number, src: number, n: number): number;
  /** lw_copy2d: rows x width bytes, pitches in bytes. */
  lw_copy2d(
    ctx: number,
    dst: number,
    dstPitch: number,
    src: number,
    srcPitch: number,
    width: number,
    rows: number,
  ): number;
  /** lw_fill: n elements of elemSize bytes set to the pattern hi:lo. */
  lw_fill(ctx: number, dst: number, n: number, elemSize: number, lo: number, hi: number): number;
  /** lw_absmax: out[0] = max |x| as f32. */
  lw_absmax(ctx: number, out: number, src: number, dtype: number, n: number): number;
  /** lw_count_nonfinite: out[0] = count of NaN/Inf as u64. */
  lw_count_nonfinite(ctx: number, out: number, src: number, dtype: number, n: number): number;
  /** lw_quant_fp8: e4m3fn quantization at a granularity, dynamic or given scales. */
  lw_quant_fp8(
    ctx: number,
    q: number,
    scale: number,
    src: number,
    srcDtype: number,
    rows: number,
    cols: number,
    granularity: number,
    dynamic: number,
  ): number;
  /** lw_quant_int8_row: int8 per-row quantization. */
  lw_quant_int8_row(
    ctx: number,
    q: number,
    scale: number,
    src: number,
    srcDtype: number,
    rows: number,
    cols: number,
  ): number;
  /** lw_dequant_fp8: f32(q) * scale into f32/f16/bf16. */
  lw_dequant_fp8(
    ctx: number,
    dst: number,
    dstDtype: number,
    q: number,
    scale: number,
    rows: number,
    cols: number,
    granularity: number,
  ): number;
}

/** The multi-tensor section of the C ABI (cuda/layerwise.h), pointers as numbers. */
export interface MultiTensorAbi {
  /** lw_mt_absmax: per-tensor fp8 scales of the targets of items [first, first+n). */
  lw_mt_absmax(
    ctx: number,
    targets: number,
    pieces: number,
    items: number,
    first: number,
    n: number,
    bases: number,
    srcDtype: number,
    partials: number,
    counters: number,
  ): number;
  /** lw_mt_absmax_fold: per-tensor fp8 scales from a scan's partials (targets starting in range). */
  lw_mt_absmax_fold(
    ctx: number,
    targets: number,
    items: number,
    first: number,
    n: number,
    srcDtype: number,
    partials: number,
  ): number;
  /** lw_mt_quant: quantizes the targets of items [first, first+n). */
  lw_mt_quant(
    ctx: number,
    kind: number,
    targets: number,
    pieces: number,
    items: number,
    first: number,
    n: number,
    bases: number,
    srcDtype: number,
  ): number;
  /** lw_mt_copy: copies or casts the pieces of items [first, first+n) into their targets. */
  lw_mt_copy(
    ctx: number,
    targets: number,
    pieces: number,
    items: number,
    first: number,
    n: number,
    bases: number,
    srcDtype: number,
    dstDtype: number,
  ): number;
}

/** Memory and kernels of one device as the C ABI exposes them; each kernel returns a status. */
export interface RawDevice {
  /** `cuda` or `wasm`. */
  readonly kind: BackendKind;
  /** Human description. */
  readonly description: string;
  /** Allocates device memory; returns its address. Throws BackendError when out of memory. */
  malloc(bytes: number): number;
  /** Frees memory from malloc. */
  free(ptr: number): void;
  /** Host to device, synchronous with respect to the caller. */
  write(ptr: number, src: Uint8Array): void;
  /** Device to host, synchronous. */
  read(ptr: number, dst: Uint8Array): void;
  /** The kernel entry points, each called with {@link RawDevice.ctx} first. */
  readonly kernels: KernelAbi & MultiTensorAbi;
  /**
   * Throws BackendError `OUT_OF_RANGE` when bytes [ptr, ptr+n) cannot be device memory of
   * this device (WebAssembly: outside the memory); CUDA cannot tell and accepts them.
   */
  checkRange(op: string, ptr: number, n: number): void;
  /** The execution context passed to every kernel: a CUDA `lw_ctx*`, 0 on WASM. */
  readonly ctx: number;
  /** Waits for queued work. */
  sync(): void;
  /** Text for a non-zero status from the last call. */
  errorText(status: number): string;
  /** Releases the device. */
  close(): void;
}

// Integer fills must fit the dtype: silently wrapping 300 into a u8 would hide a caller's bug.
const INT_RANGE: Readonly<Record<string, [number, number]>> = {
  i8: [-128, 127],
  u8: [0, 255],
  bool: [0, 1],
  i32: [-(2 ** 31), 2 ** 31 - 1],
  i64: [Number.MIN_SAFE_INTEGER, Number.MAX_SAFE_INTEGER],
};

/** A tensor seen as a matrix: all dimensions but the last are rows. */
function matrixDims(t: Tensor): [number, number] {
  if (t.shape.length === 0) return [1, 1];
  const cols = t.shape[t.shape.length - 1];
  return [cols === 0 ? 0 : t.numel / cols, cols];
}

/** The Backend over a RawDevice; see the module doc. */
export class KernelBackend implements Backend {
  readonly #dev: RawDevice;
  readonly #k: KernelAbi & MultiTensorAbi;
  readonly #ctx: number;
  readonly #live = new Set<Storage>();
  readonly #borrowed = new Set<Storage>();
  #allocated = 0;
  #scratch: Storage;
  #closed = false;

  /** See {@link Backend.hostView}. */
  readonly hostView?: (tensor: Tensor) => Uint8Array;
  /** See {@link Backend.fileReader}. */
  readonly fileReader?: StagedReader;

  /** Wraps a raw device; `capabilities` gives the optional parts, made for this backend. */
  constructor(dev: RawDevice, capabilities?: (self: Backend) => BackendCapabilities) {
    this.#dev = dev;
    this.#k = dev.kernels;
    this.#ctx = dev.ctx;
    this.#scratch = this.alloc(64);
    const caps = capabilities?.(this) ?? {};
    if (caps.hostView) this.hostView = caps.hostView;
    if (caps.fileReader) this.fileReader = caps.fileReader;
  }

  /** `cuda` or `wasm`. */
  get kind(): BackendKind {
    return this.#dev.kind;
  }

  /** Human description of the device. */
  get description(): string {
    return this.#dev.description;
  }

  alloc(bytes: number): Storage {
    this.#open();
    if (!Number.isSafeInteger(bytes) || bytes < 0) {
      throw new BackendError("BAD_SIZE", `alloc: invalid size ${bytes}`);
    }
    // Zero-byte tensors still get a distinct, valid address.
    const ptr = this.#dev.malloc(Math.max(bytes, 1));
    const s: Storage = { backend: this, ptr, bytes, freed: false };
    this.#live.add(s);
    this.#allocated += bytes;
    return s;
  }

  borrow(ptr: number, bytes: number): Storage {
    this.#open();
    if (!Number.isSafeInteger(bytes) || bytes < 0 || !Number.isSafeInteger(ptr) || ptr <= 0) {
      throw new BackendError(
        "BAD_SIZE",
        `borrow: invalid memory ${ptr} of ${bytes} bytes (a positive address and size)`,
      );
    }
    this.#dev.checkRange("borrow", ptr, bytes);
    const s: Storage = { backend: this, ptr, bytes, freed: false };
    this.#live.add(s);
    this.#borrowed.add(s);
    return s;
  }

  free(storage: Storage): void {
    this.#open();
    if (this.#borrowed.delete(storage)) {
      // Borrowed memory belongs to someone else: forget it, never release it.
      this.#live.delete(storage);
      storage.freed = true;
      return;
    }
    if (!this.#live.has(storage)) {
      throw new BackendError(
        storage.freed ? "FREED" : "FOREIGN",
        storage.freed
          ? "free: storage was already freed"
          : "free: storage is not from this backend",
      );
    }
    this.#live.delete(storage);
    this.#allocated -= storage.bytes;
    storage.freed = true;
    this.#dev.free(storage.ptr);
  }

  empty(shape: readonly number[], dtype: DType): Tensor {
    const meta = Tensor.meta(shape, dtype);
    return new Tensor(shape, dtype, this.alloc(meta.nbytes));
  }

  allocatedBytes(): number {
    return this.#allocated - this.#scratch.bytes;
  }

  upload(dst: Tensor, src: Uint8Array): void {
    const l = this.#layout("upload", dst);
    if (src.byteLength !== dst.nbytes) {
      throw new BackendError(
        "SIZE_MISMATCH",
        `upload: ${src.byteLength} bytes given for ${dst} which holds ${dst.nbytes}`,
      );
    }
    if (l.rows === 1 || l.pitch === l.cols) {
      return this.#dev.write(dst.ptr, src);
    }
    const tmp = this.empty(dst.shape, dst.dtype);
    try {
      this.#dev.write(tmp.ptr, src);
      this.copy(dst, tmp);
      this.#dev.sync();
    } finally {
      this.free(tmp.storage!);
    }
  }

  download(src: Tensor): Uint8Array {
    const l = this.#layout("download", src);
    const out = new Uint8Array(src.nbytes);
    if (l.rows === 1 || l.pitch === l.cols) {
      this.#dev.read(src.ptr, out);
      return out;
    }
    const tmp = this.empty(src.shape, src.dtype);
    try {
      this.copy(tmp, src);
      this.#dev.read(tmp.ptr, out);
    } finally {
      this.free(tmp.storage!);
    }
    return out;
  }

  copy(dst: Tensor, src: Tensor): void {
    const ld = this.#layout("copy", dst);
    const ls = this.#layout("copy", src);
    if (
      dst.shape.length !== src.shape.length ||
      dst.shape.some((d, i) => d !== src.shape[i])
    ) {
      throw new BackendError(
        "SHAPE_MISMATCH",
        `copy: destination ${dst} and source ${src} differ in shape`,
      );
    }
    const same = dst.dtype === src.dtype;
    if (!same && !(dst.dtype.floating && src.dtype.floating)) {
      throw new BackendError(
        "BAD_DTYPE",
        `copy: no conversion from ${src.dtype.name} to ${dst.dtype.name} (floating dtypes only)`,
      );
    }
    this.#noOverlap("copy", dst, src);
    if (dst.numel === 0) return;
    for (const [d, s] of pairRuns(ld, ls, dst, src)) {
      if (same) {
        const e = dst.dtype.size;
        this.#check(
          "copy",
          d.rows === 1 ? this.#k.lw_copy(this.#ctx, d.ptr, s.ptr, d.cols * e) : this.#k.lw_copy2d(
            this.#ctx,
            d.ptr,
            d.pitch * e,
            s.ptr,
            s.pitch * e,
            d.cols * e,
            d.rows,
          ),
        );
      } else {
        this.#check(
          "copy",
          this.#k.lw_cast(
            this.#ctx,
            d.ptr,
            dst.dtype.code,
            d.pitch,
            s.ptr,
            src.dtype.code,
            s.pitch,
            d.rows,
            d.cols,
          ),
        );
      }
    }
  }

  fill(dst: Tensor, value: number): void {
    this.#contiguous("fill", dst);
    const e = dst.dtype.size;
    let lo = 0, hi = 0;
    if (dst.dtype.floating) {
      // Convert on the device so the rounding is the kernels' own; +0 is all zero bits in every
      // floating dtype and needs no round trip (which would make the host wait for the device).
      if (!Object.is(value, 0)) {
        const tmp = new Uint8Array(4);
        new DataView(tmp.buffer).setFloat32(0, value, true);
        this.#dev.write(this.#scratch.ptr, tmp);
        this.#check(
          "fill",
          this.#k.lw_cast(
            this.#ctx,
            this.#scratch.ptr + 8,
            dst.dtype.code,
            1,
            this.#scratch.ptr,
            0,
            1,
            1,
            1,
          ),
        );
        const bits = new Uint8Array(4);
        this.#dev.read(this.#scratch.ptr + 8, bits.subarray(0, e));
        lo = new DataView(bits.buffer).getUint32(0, true);
      }
    } else {
      if (!Number.isInteger(value)) {
        throw new BackendError(
          "BAD_VALUE",
          `fill: ${value} is not an integer for ${dst}`,
        );
      }
      const [min, max] = INT_RANGE[dst.dtype.name];
      if (value < min || value > max) {
        throw new BackendError(
          "BAD_VALUE",
          `fill: ${value} is outside [${min}, ${max}] for ${dst}`,
        );
      }
      const big = BigInt.asUintN(64, BigInt(value));
      lo = Number(big & 0xffffffffn);
      hi = Number(big >> 32n);
    }
    if (dst.numel === 0) return;
    this.#check("fill", this.#k.lw_fill(this.#ctx, dst.ptr, dst.numel, e, lo, hi));
  }

  absmax(src: Tensor): number {
    this.#contiguous("absmax", src);
    this.#floating("absmax", src);
    if (src.numel === 0) return 0;
    this.#check(
      "absmax",
      this.#k.lw_absmax(this.#ctx, this.#scratch.ptr, src.ptr, src.dtype.code, src.numel),
    );
    const out = new Uint8Array(4);
    this.#dev.read(this.#scratch.ptr, out);
    return new DataView(out.buffer).getFloat32(0, true);
  }

  countNonFinite(src: Tensor): number {
    return this.#countNonFinite("countNonFinite", [src])[0];
  }

  countNonFiniteEach(srcs: readonly Tensor[]): number[] {
    return this.#countNonFinite("countNonFiniteEach", srcs);
  }

  /** One counter per tensor, one read for all; the scratch holds them when they fit. */
  #countNonFinite(op: string, srcs: readonly Tensor[]): number[] {
    for (const t of srcs) this.#contiguous(op, t);
    const counted = srcs.flatMap((t, i) => (t.numel > 0 && t.dtype.floating ? [i] : []));
    const out = srcs.map(() => 0);
    if (counted.length === 0) return out;
    const bytes = new Uint8Array(8 * counted.length);
    // A tensor at a time is the host path's hot loop: no allocation there.
    const own = bytes.byteLength > this.#scratch.bytes ? this.alloc(bytes.byteLength) : null;
    const counts = own ?? this.#scratch;
    try {
      counted.forEach((i, k) => {
        const t = srcs[i];
        this.#check(
          op,
          this.#k.lw_count_nonfinite(this.#ctx, counts.ptr + 8 * k, t.ptr, t.dtype.code, t.numel),
        );
      });
      this.#dev.read(counts.ptr, bytes);
    } finally {
      if (own) this.free(own);
    }
    const v = new DataView(bytes.buffer);
    counted.forEach((i, k) => out[i] = Number(v.getBigUint64(8 * k, true)));
    return out;
  }

  quantizeFp8(
    q: Tensor,
    scale: Tensor,
    src: Tensor,
    granularity: Granularity,
    dynamic: boolean,
  ): void {
    const [rows, cols] = this.#quantArgs(
      "quantizeFp8",
      q,
      scale,
      src,
      DTYPES.f8_e4m3fn,
      granularity,
    );
    if (rows * cols === 0) return;
    this.#check(
      "quantizeFp8",
      this.#k.lw_quant_fp8(
        this.#ctx,
        q.ptr,
        scale.ptr,
        src.ptr,
        src.dtype.code,
        rows,
        cols,
        GRANULARITY_CODE[granularity],
        dynamic ? 1 : 0,
      ),
    );
  }

  quantizeInt8(q: Tensor, scale: Tensor, src: Tensor): void {
    const [rows, cols] = this.#quantArgs(
      "quantizeInt8",
      q,
      scale,
      src,
      DTYPES.i8,
      "row",
    );
    if (rows * cols === 0) return;
    this.#check(
      "quantizeInt8",
      this.#k.lw_quant_int8_row(this.#ctx, q.ptr, scale.ptr, src.ptr, src.dtype.code, rows, cols),
    );
  }

  dequantizeFp8(
    dst: Tensor,
    q: Tensor,
    scale: Tensor,
    granularity: Granularity,
  ): void {
    const [rows, cols] = this.#quantArgs(
      "dequantizeFp8",
      q,
      scale,
      dst,
      DTYPES.f8_e4m3fn,
      granularity,
    );
    if (rows * cols === 0) return;
    this.#noOverlap("dequantizeFp8", dst, q);
    this.#check(
      "dequantizeFp8",
      this.#k.lw_dequant_fp8(
        this.#ctx,
        dst.ptr,
        dst.dtype.code,
        q.ptr,
        scale.ptr,
        rows,
        cols,
        GRANULARITY_CODE[granularity],
      ),
    );
  }

  launchMultiTensor(l: MultiTensorLaunch): void {
    const s = this.#own("launchMultiTensor", new Tensor([l.table.bytes], DTYPES.u8, l.table));
    const f = MULTI_TENSOR_FIELDS;
    const inside = (what: string, off: number | undefined, bytes: number) => {
      if (off === undefined || !Number.isSafeInteger(off) || off < 0 || off + bytes > s.bytes) {
        throw new BackendError(
          "OUT_OF_RANGE",
          `launchMultiTensor: the ${what} table at ${off} (${bytes} bytes) is outside the ${s.bytes}-byte table storage`,
        );
      }
    };
    if (
      !Number.isSafeInteger(l.first) || !Number.isSafeInteger(l.count) || l.first < 0 || l.count < 0
    ) {
      throw new BackendError(
        "BAD_SIZE",
        `launchMultiTensor: invalid items [${l.first}, +${l.count})`,
      );
    }
    inside("items", l.items, (l.first + l.count) * f.item * 8);
    inside("targets", l.targets, 0);
    inside("pieces", l.pieces, 0);
    inside("bases", l.bases, 0);
    if (l.count === 0) return;
    const p = s.ptr, src = l.srcDtype.code;
    let status: number;
    if (l.op === "absmax" || l.op === "scan") {
      inside("partials", l.partials, (l.first + l.count) * 4);
      if (l.op === "absmax") inside("counters", l.counters, 0);
      status = this.#k.lw_mt_absmax(
        this.#ctx,
        p + l.targets,
        p + l.pieces,
        p + l.items,
        l.first,
        l.count,
        p + l.bases,
        src,
        p + l.partials!,
        l.op === "absmax" ? p + l.counters! : 0,
      );
    } else if (l.op === "fold") {
      inside("partials", l.partials, (l.first + l.count) * 4);
      status = this.#k.lw_mt_absmax_fold(
        this.#ctx,
        p + l.targets,
        p + l.items,
        l.first,
        l.count,
        src,
        p + l.partials!,
      );
    } else if (l.op === "quant") {
      if (l.kind === undefined || !Object.hasOwn(MULTI_TENSOR_KIND_CODE, l.kind)) {
        throw new BackendError("BAD_GRANULARITY", `launchMultiTensor: unknown kind ${l.kind}`);
      }
      status = this.#k.lw_mt_quant(
        this.#ctx,
        MULTI_TENSOR_KIND_CODE[l.kind],
        p + l.targets,
        p + l.pieces,
        p + l.items,
        l.first,
        l.count,
        p + l.bases,
        src,
      );
    } else if (l.op === "copy") {
      const dst = l.dstDtype ?? l.srcDtype;
      status = this.#k.lw_mt_copy(
        this.#ctx,
        p + l.targets,
        p + l.pieces,
        p + l.items,
        l.first,
        l.count,
        p + l.bases,
        src,
        dst.code,
      );
    } else {
      throw new BackendError("BAD_VALUE", `launchMultiTensor: unknown op ${l.op}`);
    }
    this.#check(`launchMultiTensor ${l.op}`, status);
  }

  synchronize(): void {
    this.#open();
    this.#dev.sync();
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#live.clear();
    this.#dev.close();
  }

  // ------------------------------------------------------------------ checks

  #open(): void {
    if (this.#closed) {
      throw new BackendError("CLOSED", `the ${this.kind} backend is closed`);
    }
  }

  #own(op: string, t: Tensor): Storage {
    this.#open();
    const s = t.storage;
    if (!s) throw new BackendError("META_TENSOR", `${op}: ${t} has no storage`);
    if (s.freed) {
      throw new BackendError("FREED", `${op}: ${t} uses freed storage`);
    }
    if (!this.#live.has(s)) {
      throw new BackendError("FOREIGN", `${op}: ${t} lives on another backend`);
    }
    return s;
  }

  #layout(op: string, t: Tensor): Layout2D {
    this.#own(op, t);
    const l = t.layout2d();
    if (!l) {
      throw new BackendError(
        "NOT_2D",
        `${op}: ${t} with strides ${shapeString(t.strides)} is not a 2-D strided view`,
      );
    }
    return l;
  }

  #contiguous(op: string, t: Tensor): void {
    this.#own(op, t);
    if (!t.isContiguous) {
      throw new BackendError(
        "NOT_CONTIGUOUS",
        `${op}: ${t} must be contiguous`,
      );
    }
  }

  #floating(op: string, t: Tensor): void {
    if (!t.dtype.floating) {
      throw new BackendError(
        "BAD_DTYPE",
        `${op}: ${t} must have a floating dtype`,
      );
    }
  }

  #noOverlap(op: string, a: Tensor, b: Tensor): void {
    if (a.storage !== b.storage || a.numel === 0 || b.numel === 0) return;
    const span = (t: Tensor) => {
      let last = 0;
      for (let i = 0; i < t.shape.length; i++) {
        last += (t.shape[i] - 1) * t.strides[i];
      }
      return [t.ptr, t.ptr + (last + 1) * t.dtype.size];
    };
    const [a0, a1] = span(a), [b0, b1] = span(b);
    if (a0 < b1 && b0 < a1) {
      throw new BackendError(
        "OVERLAP",
        `${op}: destination ${a} overlaps source ${b}`,
      );
    }
  }

  #quantArgs(
    op: string,
    q: Tensor,
    scale: Tensor,
    x: Tensor,
    qDtype: DType,
    g: Granularity,
  ): [number, number] {
    for (const t of [q, scale, x]) this.#contiguous(op, t);
    if (!isModelFloat(x.dtype)) {
      throw new BackendError(
        "BAD_DTYPE",
        `${op}: ${x} must be f32, f16 or bf16`,
      );
    }
    if (q.dtype !== qDtype) {
      throw new BackendError(
        "BAD_DTYPE",
        `${op}: quantized tensor ${q} must be ${qDtype.name}`,
      );
    }
    if (scale.dtype !== DTYPES.f32) {
      throw new BackendError("BAD_DTYPE", `${op}: scale ${scale} must be f32`);
    }
    if (!Object.hasOwn(GRANULARITY_CODE, g)) {
      throw new BackendError(
        "BAD_GRANULARITY",
        `${op}: unknown granularity ${g}`,
      );
    }
    if (
      q.shape.length !== x.shape.length ||
      q.shape.some((d, i) => d !== x.shape[i])
    ) {
      throw new BackendError(
        "SHAPE_MISMATCH",
        `${op}: ${q} and ${x} differ in shape`,
      );
    }
    const [rows, cols] = matrixDims(x);
    const want = scaleCount(rows, cols, g);
    if (scale.numel !== want) {
      throw new BackendError(
        "SHAPE_MISMATCH",
        `${op}: scale ${scale} has ${scale.numel} elements, ${g} scaling of ${rows}x${cols} needs ${want}`,
      );
    }
    this.#noOverlap(op, q, x);
    this.#noOverlap(op, scale, x);
    this.#noOverlap(op, scale, q);
    return [rows, cols];
  }

  #check(op: string, status: number): void {
    if (status !== 0) {
      throw new BackendError(
        statusError(status)[0],
        `${op} on ${this.description}: ${this.#dev.errorText(status)}`,
      );
    }
  }
}

interface Run {
  ptr: number;
  rows: number;
  cols: number;
  pitch: number;
}

/**
 * Pairs two 2-D layouts of the same elements into runs of equal shape. Contiguous views take
 * the other side's row split; otherwise the wider rows are split into the narrower ones.
 */
function* pairRuns(
  ld: Layout2D,
  ls: Layout2D,
  dst: Tensor,
  src: Tensor,
): Generator<[Run, Run]> {
  const flat = (l: Layout2D) => l.rows === 1 || l.pitch === l.cols;
  if (flat(ld) && flat(ls)) {
    const n = dst.numel;
    yield [{ ptr: dst.ptr, rows: 1, cols: n, pitch: n }, {
      ptr: src.ptr,
      rows: 1,
      cols: n,
      pitch: n,
    }];
    return;
  }
  if (flat(ld)) ld = { rows: ls.rows, cols: ls.cols, pitch: ls.cols };
  if (flat(ls)) ls = { rows: ld.rows, cols: ld.cols, pitch: ld.cols };
  if (ld.cols === ls.cols) {
    yield [{ ptr: dst.ptr, ...ld }, { ptr: src.ptr, ...ls }];
    return;
  }
  const [wide, narrow, wideT, narrowT, wideIsDst] = ld.cols > ls.cols
    ? [ld, ls, dst, src, true]
    : [ls, ld, src, dst, false];
  if (wide.cols % narrow.cols !== 0) {
    throw new BackendError(
      "NOT_2D",
      `copy: the views ${dst} and ${src} cannot be paired into equal runs`,
    );
  }
  const per = wide.cols / narrow.cols;
  const we = wideT.dtype.size, ne = narrowT.dtype.size;
  for (let r = 0; r < wide.rows; r++) {
    const w: Run = {
      ptr: wideT.ptr + r * wide.pitch * we,
      rows: per,
      cols: narrow.cols,
      pitch: narrow.cols,
    };
    const n: Run = {
      ptr: narrowT.ptr + r * per * narrow.pitch * ne,
      rows: per,
      cols: narrow.cols,
      pitch: narrow.pitch,
    };
    yield wideIsDst ? [w, n] : [n, w];
  }
}

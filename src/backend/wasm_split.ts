/**
 * How one kernel call becomes calls on several threads of the WebAssembly backend: each thread
 * runs the same single-thread kernel on its own part (a range of elements, rows, or 128-row
 * bands), so every element is computed by the same code as on one thread. Reductions are the
 * only cross-part step: each part writes a partial (an absmax, a count) and the caller combines
 * them with max or sum, which are exact, so the result is bit-identical to one thread's
 * (ARCHITECTURE.md, "WebAssembly threads").
 *
 * Kernels this module does not know, and calls it cannot vouch for (an unknown dtype or
 * granularity code, left for the kernel to refuse), run whole on the calling thread.
 * @module
 */

import { DTYPES, isModelFloat } from "../tensor/dtype.ts";
import { GRANULARITY_CODE, MULTI_TENSOR_FIELDS, QUANT_BLOCK } from "./abi.ts";
import type { KernelAbi } from "./kernels.ts";

/** Runs the parts of a call on the threads; the first non-zero status. */
export interface ThreadRunner {
  /** Threads available, the caller's included. */
  readonly threads: number;
  /** Most parts of one {@link run} (default {@link threads}). */
  readonly maxParts?: number;
  /** Runs `fn(...calls[i])` for every i, each part on whichever thread takes it; waits for all. */
  run(fn: string, calls: number[][]): number;
  /** The single-thread kernel on the calling thread. */
  call(fn: string, args: number[]): number;
  /** Per-part partial results: 16 bytes per part ({@link maxParts}), plus 16, at this offset. */
  readonly partials: number;
  /**
   * lw_wasm_fp8_tensor_bytes() bytes, 64-byte aligned, for lw_wasm_fp8_tensor: the lookup table
   * of a per-tensor fp8 quantization of 16-bit input, its rows' rule and the call's control
   * words; absent: such a call is split as the other kernels are.
   */
  readonly table?: number;
  /** Polls of a flag before a thread parks (the pool's; 0: park at once). */
  readonly spins?: number;
  /** Reads and writes the shared memory (a fresh view per call). */
  view(): DataView;
}

/** When to split. */
export interface SplitOptions {
  /** A call is split only into parts of at least this many bytes of input. */
  minBytesPerThread: number;
  /**
   * Kernels with no setup of their own per part (copies, casts, reductions, row and block
   * quantization) are cut into up to this many parts per thread (default 1), so that a thread
   * that starts late or loses its core leaves its share to the others. Per-tensor fp8
   * quantization stays at one part per thread: each part builds its own lookup table.
   */
  partsPerThread?: number;
}

const SIZE_BY_CODE = new Map(Object.values(DTYPES).map((d) => [d.code, d.size]));
const FLOAT_CODES = new Set(Object.values(DTYPES).filter((d) => d.floating).map((d) => d.code));
const QUANT_INPUT_CODES = new Set(Object.values(DTYPES).filter(isModelFloat).map((d) => d.code));
const TENSOR = GRANULARITY_CODE.tensor, ROW = GRANULARITY_CODE.row;
const BLOCK128 = GRANULARITY_CODE.block128;
// Element ranges start on multiples of this, so each part's vector loop starts aligned.
const ELEMENT_ALIGN = 64;

/**
 * [start, end) ranges cutting [0, n) into at most `parts` pieces of near-equal size, each
 * start a multiple of `unit`.
 */
export function splitRange(n: number, parts: number, unit = 1): [number, number][] {
  const units = Math.ceil(n / unit);
  const p = Math.max(1, Math.min(parts, units));
  const out: [number, number][] = [];
  for (let i = 0; i < p; i++) {
    const a = Math.min(n, Math.floor((units * i) / p) * unit);
    const b = Math.min(n, Math.floor((units * (i + 1)) / p) * unit);
    if (b > a) out.push([a, b]);
  }
  return out;
}

/**
 * Parts for a call over `bytes` of input: `perThread` per thread, none smaller than the
 * minimum.
 */
export function partCount(
  bytes: number,
  threads: number,
  minBytesPerThread: number,
  perThread = 1,
): number {
  if (threads <= 1) return 1;
  return Math.max(
    1,
    Math.min(threads * perThread, Math.floor(bytes / Math.max(1, minBytesPerThread))),
  );
}

// The multi-tensor kernels' item table: {target, row0, rows, col0, cols} per item, as uint64.
const MT_ITEM_FIELDS = MULTI_TENSOR_FIELDS.item;

/**
 * The multi-tensor kernels (lw_mt_*: a table of items, launched as a range [first, first+n))
 * on the threads, for those of `names` the module has: items are independent blocks, so the
 * range is cut into one sub-range per thread; lw_mt_absmax only between targets, because the
 * last item of a target combines that target's partials.
 */
export function splitMultiTensor(
  runner: ThreadRunner,
  options: SplitOptions,
  names: ReadonlySet<string>,
): Record<string, (...args: number[]) => number> {
  // Item ranges for [first, first+n): by bytes of input, cut only where `cut(i)` allows.
  const ranges = (items: number, first: number, n: number, dtype: number, atTargets: boolean) => {
    const size = SIZE_BY_CODE.get(dtype);
    if (size === undefined || n < 2) return [[first, first + n]];
    const v = runner.view();
    const field = (i: number, f: number) =>
      Number(v.getBigUint64(items + 8 * (i * MT_ITEM_FIELDS + f), true));
    let bytes = 0;
    for (let i = first; i < first + n; i++) bytes += field(i, 2) * field(i, 4) * size;
    const p = partCount(bytes, runner.threads, options.minBytesPerThread);
    const out: number[][] = [];
    let a = first;
    for (const [, b0] of splitRange(n, p)) {
      let b = first + b0;
      while (atTargets && b < first + n && field(b, 0) === field(b - 1, 0)) b++;
      if (b > a) out.push([a, b]);
      a = b;
    }
    return out;
  };
  const out: Record<string, (...args: number[]) => number> = {};
  if (names.has("lw_mt_absmax")) {
    out.lw_mt_absmax = (ctx, targets, pieces, items, first, n, bases, sd, partials, counters) =>
      runner.run(
        "lw_mt_absmax",
        ranges(items, first, n, sd, true).map(([a, b]) => [
          ctx,
          targets,
          pieces,
          items,
          a,
          b - a,
          bases,
          sd,
          partials,
          counters,
        ]),
      );
  }
  if (names.has("lw_mt_quant")) {
    out.lw_mt_quant = (ctx, kind, targets, pieces, items, first, n, bases, sd) =>
      runner.run(
        "lw_mt_quant",
        ranges(items, first, n, sd, false).map((
          [a, b],
        ) => [ctx, kind, targets, pieces, items, a, b - a, bases, sd]),
      );
  }
  if (names.has("lw_mt_copy")) {
    out.lw_mt_copy = (ctx, targets, pieces, items, first, n, bases, sd, dd) =>
      runner.run(
        "lw_mt_copy",
        ranges(items, first, n, sd, false).map((
          [a, b],
        ) => [ctx, targets, pieces, items, a, b - a, bases, sd, dd]),
      );
  }
  return out;
}

/**
 * The kernel ABI on `runner`'s threads: each method splits its call as the module doc says.
 * `ctx` is passed through (0 on WebAssembly).
 */
export function splitKernels(runner: ThreadRunner, options: SplitOptions): KernelAbi {
  const parts = (bytes: number) => partCount(bytes, runner.threads, options.minBytesPerThread);
  const maxParts = runner.maxParts ?? runner.threads;
  const perThread = Math.max(1, Math.min(options.partsPerThread ?? 1, maxParts / runner.threads));
  // Parts for the kernels with no per-part setup (see SplitOptions.partsPerThread).
  const fine = (bytes: number) =>
    partCount(bytes, runner.threads, options.minBytesPerThread, Math.floor(perThread));

  // n elements of `size` bytes each; `call(a, b)` gives the args of part [a, b).
  const flat = (
    fn: string,
    n: number,
    size: number,
    call: (a: number, b: number) => number[],
    count = fine,
  ) => {
    const p = count(n * size);
    if (p <= 1) return runner.call(fn, call(0, n));
    return runner.run(fn, splitRange(n, p, ELEMENT_ALIGN).map(([a, b]) => call(a, b)));
  };
  // rows of rowBytes each, split on multiples of `unit` rows.
  const byRows = (
    fn: string,
    rows: number,
    rowBytes: number,
    unit: number,
    call: (a: number, b: number) => number[],
  ) => {
    const p = fine(rows * rowBytes);
    if (p <= 1) return runner.call(fn, call(0, rows));
    return runner.run(fn, splitRange(rows, p, unit).map(([a, b]) => call(a, b)));
  };
  // Max over the parts' f32 absmax values, compared as bits: each is +0..Inf or the canonical
  // NaN, whose bits sort above Inf, so NaN wins as it does within one part.
  const combineAbsmax = (count: number, out: number) => {
    const v = runner.view();
    let m = 0;
    for (let i = 0; i < count; i++) m = Math.max(m, v.getUint32(runner.partials + 16 * i, true));
    v.setUint32(out, m, true);
  };
  // Absmax of n elements of `dtype` at src into out, on the threads.
  const absmax = (out: number, src: number, dtype: number, n: number): number => {
    const size = SIZE_BY_CODE.get(dtype)!;
    const ranges = splitRange(n, fine(n * size), ELEMENT_ALIGN);
    if (ranges.length <= 1) return runner.call("lw_absmax", [0, out, src, dtype, n]);
    const st = runner.run(
      "lw_absmax",
      ranges.map(([a, b], i) => [0, runner.partials + 16 * i, src + a * size, dtype, b - a]),
    );
    if (st === 0) combineAbsmax(ranges.length, out);
    return st;
  };

  return {
    lw_copy: (ctx, dst, src, n) => flat("lw_copy", n, 1, (a, b) => [ctx, dst + a, src + a, b - a]),
    lw_copy2d: (ctx, dst, dp, src, sp, width, rows) => {
      if (rows === 1 || (dp === width && sp === width)) {
        return flat("lw_copy", width * rows, 1, (a, b) => [ctx, dst + a, src + a, b - a]);
      }
      return byRows("lw_copy2d", rows, width, 1, (a, b) => [
        ctx,
        dst + a * dp,
        dp,
        src + a * sp,
        sp,
        width,
        b - a,
      ]);
    },
    lw_fill: (ctx, dst, n, size, lo, hi) => {
      if (![1, 2, 4, 8].includes(size)) return runner.call("lw_fill", [ctx, dst, n, size, lo, hi]);
      return flat("lw_fill", n, size, (a, b) => [ctx, dst + a * size, b - a, size, lo, hi]);
    },
    lw_cast: (ctx, dst, dd, dp, src, sd, sp, rows, cols) => {
      const de = SIZE_BY_CODE.get(dd), se = SIZE_BY_CODE.get(sd);
      if (de === undefined || se === undefined || rows === 0 || cols === 0) {
        return runner.call("lw_cast", [ctx, dst, dd, dp, src, sd, sp, rows, cols]);
      }
      if (rows === 1 || (dp === cols && sp === cols)) {
        const n = rows * cols;
        return flat("lw_cast", n, Math.max(de, se), (a, b) => [
          ctx,
          dst + a * de,
          dd,
          b - a,
          src + a * se,
          sd,
          b - a,
          1,
          b - a,
        ]);
      }
      return byRows("lw_cast", rows, cols * Math.max(de, se), 1, (a, b) => [
        ctx,
        dst + a * dp * de,
        dd,
        dp,
        src + a * sp * se,
        sd,
        sp,
        b - a,
        cols,
      ]);
    },
    lw_absmax: (ctx, out, src, dtype, n) => {
      if (!FLOAT_CODES.has(dtype)) return runner.call("lw_absmax", [ctx, out, src, dtype, n]);
      return absmax(out, src, dtype, n);
    },
    lw_count_nonfinite: (ctx, out, src, dtype, n) => {
      const size = SIZE_BY_CODE.get(dtype);
      const ranges = size === undefined ? [] : splitRange(n, fine(n * size), ELEMENT_ALIGN);
      if (ranges.length <= 1) return runner.call("lw_count_nonfinite", [ctx, out, src, dtype, n]);
      const st = runner.run(
        "lw_count_nonfinite",
        ranges.map(([a, b], i) => [ctx, runner.partials + 16 * i, src + a * size!, dtype, b - a]),
      );
      if (st !== 0) return st;
      const v = runner.view();
      let k = 0n;
      for (let i = 0; i < ranges.length; i++) k += v.getBigUint64(runner.partials + 16 * i, true);
      v.setBigUint64(out, k, true);
      return 0;
    },
    lw_quant_fp8: (ctx, q, scale, src, sd, rows, cols, g, dynamic) => {
      const args = [ctx, q, scale, src, sd, rows, cols, g, dynamic];
      if (!QUANT_INPUT_CODES.has(sd) || rows === 0 || cols === 0) {
        return runner.call("lw_quant_fp8", args);
      }
      const se = SIZE_BY_CODE.get(sd)!;
      if (g === TENSOR) {
        const n = rows * cols;
        if (parts(n * se) <= 1) return runner.call("lw_quant_fp8", args);
        if (runner.table !== undefined && sd !== DTYPES.f32.code) {
          // Absmax, scale, one table, its rule and the lookups in one call of every thread
          // (wasm/kernels.c, lw_wasm_fp8_tensor).
          const t = runner.table;
          runner.call("lw_wasm_fp8_tensor_reset", [ctx, t]);
          const p = fine(n * se);
          const call = [ctx, q, scale, t, src, sd, n, p, dynamic, runner.spins ?? 0];
          return runner.run(
            "lw_wasm_fp8_tensor",
            new Array(Math.min(p, runner.threads)).fill(call),
          );
        }
        if (dynamic) {
          // The scale of the whole tensor: the absmax on the threads, then the kernel's own
          // dynamic path on that one value (the absmax of a one-element tensor holding m is m),
          // so the scale comes from the same lw_fp8_scale as on one thread.
          const m = runner.partials + 16 * maxParts;
          const st = absmax(m, src, sd, n);
          if (st !== 0) return st;
          const s = runner.call("lw_quant_fp8", [
            ctx,
            m + 8,
            scale,
            m,
            DTYPES.f32.code,
            1,
            1,
            TENSOR,
            1,
          ]);
          if (s !== 0) return s;
        }
        return flat("lw_quant_fp8", n, se, (a, b) => [
          ctx,
          q + a,
          scale,
          src + a * se,
          sd,
          1,
          b - a,
          TENSOR,
          0,
        ], parts);
      }
      if (g === ROW) {
        return byRows("lw_quant_fp8", rows, cols * se, 1, (a, b) => [
          ctx,
          q + a * cols,
          scale + 4 * a,
          src + a * cols * se,
          sd,
          b - a,
          cols,
          ROW,
          dynamic,
        ]);
      }
      if (g === BLOCK128) {
        const nb = Math.ceil(cols / QUANT_BLOCK);
        return byRows("lw_quant_fp8", rows, cols * se, QUANT_BLOCK, (a, b) => [
          ctx,
          q + a * cols,
          scale + 4 * (a / QUANT_BLOCK) * nb,
          src + a * cols * se,
          sd,
          b - a,
          cols,
          BLOCK128,
          dynamic,
        ]);
      }
      return runner.call("lw_quant_fp8", args);
    },
    lw_quant_int8_row: (ctx, q, scale, src, sd, rows, cols) => {
      if (!QUANT_INPUT_CODES.has(sd) || cols === 0) {
        return runner.call("lw_quant_int8_row", [ctx, q, scale, src, sd, rows, cols]);
      }
      const se = SIZE_BY_CODE.get(sd)!;
      return byRows("lw_quant_int8_row", rows, cols * se, 1, (a, b) => [
        ctx,
        q + a * cols,
        scale + 4 * a,
        src + a * cols * se,
        sd,
        b - a,
        cols,
      ]);
    },
    lw_dequant_fp8: (ctx, dst, dd, q, scale, rows, cols, g) => {
      const args = [ctx, dst, dd, q, scale, rows, cols, g];
      if (!QUANT_INPUT_CODES.has(dd) || rows === 0 || cols === 0) {
        return runner.call("lw_dequant_fp8", args);
      }
      const de = SIZE_BY_CODE.get(dd)!;
      if (g === TENSOR) {
        return flat("lw_dequant_fp8", rows * cols, de, (a, b) => [
          ctx,
          dst + a * de,
          dd,
          q + a,
          scale,
          1,
          b - a,
          TENSOR,
        ]);
      }
      if (g === ROW || g === BLOCK128) {
        const unit = g === ROW ? 1 : QUANT_BLOCK;
        const perBand = g === ROW ? 1 : Math.ceil(cols / QUANT_BLOCK);
        return byRows("lw_dequant_fp8", rows, cols * de, unit, (a, b) => [
          ctx,
          dst + a * cols * de,
          dd,
          q + a * cols,
          scale + 4 * (a / unit) * perBand,
          b - a,
          cols,
          g,
        ]);
      }
      return runner.call("lw_dequant_fp8", args);
    },
  };
}

/**
 * Kernel throughput: each kernel of the ABI on the same random bf16 matrix, timed on one
 * backend, next to a plain copy of the same bytes measured in the same run. On WASM each kernel
 * is timed on 1 thread and on the backend's N threads, and the same C compiled natively with -O3
 * (-msse4.1 on x86-64: the 128-bit instructions V8's simd128 code needs there; -fopenmp, split
 * the same way, for N threads) is timed too when a C compiler is present, since the bar there is
 * half the native rate at every thread count: in alternating rounds, each side keeping its best.
 * @module
 */

import type { Backend } from "../src/backend/backend.ts";
import { openWasmBackend, wasmThreadCount } from "../src/backend/wasm.ts";
import { DTYPES } from "../src/tensor/dtype.ts";
import { Tensor } from "../src/tensor/tensor.ts";

/** One kernel measurement. */
export interface KernelResult {
  /** Kernel name (as the native harness knows it). */
  name: string;
  /** Threads the kernel ran on (WASM; 1 on CUDA). */
  threads: number;
  /** Elements processed per call. */
  elements: number;
  /** Bytes a call must move at least (each input read as the kernel needs it, outputs written). */
  bytes: number;
  /** Best seconds per call. */
  seconds: number;
  /** Best seconds per call of the native build, when measured. */
  nativeSeconds?: number;
  /**
   * Per-tensor fp8 only: best seconds per call of the native build's table lookup alone (each
   * thread its share, the table filled beforehand), when measured. Its 1-to-N-thread scaling is
   * what the host's cores give the kernel's main loop with no phase before it: how far a 10 x
   * bar on 16 cores is in reach of any build on that host.
   */
  nativeLookupSeconds?: number;
}

const COLS = 4096;
/** Columns of the wide-row cases (CUDA): a down projection's rows (Llama-3-8B's 14336). */
const WIDE = 14336;

/** Deterministic pseudo-random f32 values in [-2, 2), as bf16 bytes. */
function randomBf16(n: number, seed: number): Uint8Array {
  const out = new Uint16Array(n);
  const f = new Float32Array(1);
  const u = new Uint32Array(f.buffer);
  let s = seed >>> 0;
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    f[0] = ((s >>> 8) / 16777216) * 4 - 2;
    out[i] = (u[0] + 0x7fff + ((u[0] >>> 16) & 1)) >>> 16;
  }
  return new Uint8Array(out.buffer);
}

function time(backend: Backend, reps: number, fn: () => void): number {
  fn(); // warm-up: first-use costs stay out of the figure
  backend.synchronize();
  let best = Infinity;
  for (let r = 0; r < reps; r++) {
    const t0 = performance.now();
    fn();
    backend.synchronize();
    best = Math.min(best, (performance.now() - t0) / 1000);
  }
  return best;
}

/** The native build of the kernels (scripts/bench_native.c), built once per bench. */
interface NativeReference {
  /** Best seconds per call of `name` on `n` elements and `threads` threads, if it ran. */
  time(name: string, n: number, reps: number, threads: number): Promise<number | undefined>;
  /** Removes the build. */
  close(): Promise<void>;
}

async function nativeReference(): Promise<NativeReference | null> {
  const cc = Deno.env.get("CC") ?? "cc";
  const dir = await Deno.makeTempDir({ prefix: "layerwise-bench-" });
  const bin = `${dir}/bench_native`;
  const src = new URL("./bench_native.c", import.meta.url).pathname;
  const close = () => Deno.remove(dir, { recursive: true });
  try {
    // On x86-64, the instructions V8 needs for simd128 code there (SSE4.1): the kernels' byte
    // swizzles then have a native instruction (SSSE3's pshufb) on both sides.
    const isa = Deno.build.arch === "x86_64" ? ["-msse4.1"] : [];
    const build = await new Deno.Command(cc, {
      args: ["-O3", "-fopenmp", ...isa, "-o", bin, src, "-lm"],
    }).output();
    if (!build.success) {
      console.error(`native reference not built: ${new TextDecoder().decode(build.stderr)}`);
      await close();
      return null;
    }
  } catch (e) {
    console.error(`native reference not built (${(e as Error).message})`);
    await close();
    return null;
  }
  return {
    time: async (name, n, reps, threads) => {
      try {
        const r = await new Deno.Command(bin, {
          args: [name, String(n), String(reps), String(threads)],
        }).output();
        return r.success ? Number(new TextDecoder().decode(r.stdout).trim()) : undefined;
      } catch (e) {
        console.error(`native reference not run (${(e as Error).message})`);
        return undefined;
      }
    },
    close,
  };
}

/**
 * Rounds of WebAssembly-then-native timings per thread count; each side keeps its best. On a
 * shared host the rate of one core swings by up to 2x over seconds (BENCHMARKS.md, 2026-12-02,
 * third session), so a ratio from one sample of each side says more about when each ran than
 * about the code; several alternating windows give both sides the same chances.
 */
const NATIVE_ROUNDS = 3;

/**
 * Times every kernel on `elements` bf16 elements (a multiple of 4096). On WASM: on 1 thread (a
 * backend of its own) and on `backend`'s threads, each beside the native build on as many.
 */
export async function benchKernels(
  backend: Backend,
  elements: number,
  reps: number,
): Promise<KernelResult[]> {
  if (backend.kind !== "wasm") return await benchOn(backend, 1, elements, reps, null);
  const threads = wasmThreadCount(backend);
  const results: KernelResult[] = [];
  const native = await nativeReference();
  try {
    if (threads > 1) {
      const one = await openWasmBackend({ threads: 1 });
      try {
        results.push(...await benchOn(one, 1, elements, reps, native));
      } finally {
        one.close();
      }
    }
    results.push(...await benchOn(backend, threads, elements, reps, native));
  } finally {
    await native?.close();
  }
  return results;
}

async function benchOn(
  backend: Backend,
  threads: number,
  elements: number,
  reps: number,
  native: NativeReference | null,
): Promise<KernelResult[]> {
  const n = Math.max(COLS, Math.floor(elements / COLS) * COLS);
  const rows = n / COLS;
  const shape = [rows, COLS];
  const owned: Tensor[] = [];
  const mk = (s: number[], d: keyof typeof DTYPES) => {
    const t = backend.empty(s, DTYPES[d]);
    owned.push(t);
    return t;
  };
  const x = mk(shape, "bf16");
  backend.upload(x, randomBf16(n, 12345));
  const xf = mk(shape, "f32");
  const y = mk(shape, "bf16");
  const q8 = mk(shape, "f8_e4m3fn");
  const qi8 = mk(shape, "i8");
  const sT = mk([1], "f32");
  const sR = mk([rows], "f32");
  const sB = mk([Math.ceil(rows / 128), COLS / 128], "f32");
  const cases: [string, number, () => void][] = [
    ["copy", 4 * n, () => backend.copy(y, x)],
    ["cast_bf16_f32", 6 * n, () => backend.copy(xf, x)],
    ["cast_f32_bf16", 6 * n, () => backend.copy(y, xf)],
    ["absmax", 2 * n, () => backend.absmax(x)],
    ["count_nonfinite", 2 * n, () => backend.countNonFinite(x)],
    ["fp8_tensor", 5 * n, () => backend.quantizeFp8(q8, sT, x, "tensor", true)],
    ["fp8_row", 5 * n, () => backend.quantizeFp8(q8, sR, x, "row", true)],
    ["fp8_block128", 5 * n, () => backend.quantizeFp8(q8, sB, x, "block128", true)],
    ["int8_row", 5 * n, () => backend.quantizeInt8(qi8, sR, x)],
    ["dequant_fp8", 3 * n, () => backend.dequantizeFp8(y, q8, sT, "tensor")],
  ];
  // On CUDA, per-row kernels on rows too long to hold in registers, too (the first rows of the
  // same matrices seen as WIDE columns).
  const wideRows = Math.floor(n / WIDE), nw = wideRows * WIDE;
  if (backend.kind === "cuda" && wideRows > 0) {
    const view = (t: Tensor) => new Tensor([wideRows, WIDE], t.dtype, t.storage!, 0);
    const [xw, q8w, qi8w] = [x, q8, qi8].map(view);
    cases.push(
      [
        `fp8_row_${WIDE}`,
        5 * nw,
        () => backend.quantizeFp8(q8w, sR.narrow(0, 0, wideRows), xw, "row", true),
      ],
      [`int8_row_${WIDE}`, 5 * nw, () => backend.quantizeInt8(qi8w, sR.narrow(0, 0, wideRows), xw)],
    );
  }
  const results: KernelResult[] = cases.map(([name, bytes]) => ({
    name,
    threads,
    elements: name.endsWith(`_${WIDE}`) ? nw : n,
    bytes,
    seconds: Infinity,
  }));
  try {
    for (let round = 0; round < (native ? NATIVE_ROUNDS : 1); round++) {
      cases.forEach(([, , fn], i) => {
        results[i].seconds = Math.min(results[i].seconds, time(backend, reps, fn));
      });
      for (const r of native ? results : []) {
        const s = await native!.time(r.name, n, reps, threads);
        if (s !== undefined) r.nativeSeconds = Math.min(r.nativeSeconds ?? Infinity, s);
        if (r.name !== "fp8_tensor") continue;
        const l = await native!.time("fp8_lookup", n, reps, threads);
        if (l !== undefined) r.nativeLookupSeconds = Math.min(r.nativeLookupSeconds ?? Infinity, l);
      }
    }
  } finally {
    for (const t of owned) backend.free(t.storage!);
  }
  return results;
}

function fmt(x: number, unit: string): string {
  const k = ["", "K", "M", "G", "T"];
  let i = 0;
  while (x >= 1000 && i < k.length - 1) {
    x /= 1000;
    i++;
  }
  return `${x.toFixed(x >= 100 ? 0 : x >= 10 ? 1 : 2)} ${k[i]}${unit}`;
}

/** On CUDA, the quantization kernels' rates as a fraction of a device-to-device copy's. */
const CUDA_LIMITS: Record<string, number> = {
  fp8_tensor: 0.95,
  fp8_row: 0.8,
  fp8_block128: 0.8,
  int8_row: 0.8,
  [`fp8_row_${WIDE}`]: 0.8,
  [`int8_row_${WIDE}`]: 0.8,
};

/**
 * Formats results as a table: every figure next to the limit it is held to, as a ratio.
 * CUDA: per-tensor fp8 quantization against 0.9 x the copy rate. WASM: every kernel against
 * 0.5 x the native rate.
 */
export function kernelTable(backend: Backend, results: KernelResult[]): string {
  const lines = [
    `kernels on ${backend.description}, ${results[0].elements} bf16 elements (best of runs)`,
    [
      "kernel".padEnd(16),
      "threads".padStart(8),
      "elements/s".padStart(12),
      "bytes/s".padStart(11),
      "vs copy".padStart(8),
      backend.kind === "wasm" ? "native B/s".padStart(11) + "  vs native".padStart(11) : "",
      "  limit",
    ].join(""),
  ];
  for (const r of results) {
    const copy = results.find((c) => c.name === "copy" && c.threads === r.threads)!;
    const copyRate = copy.bytes / copy.seconds;
    const rate = r.bytes / r.seconds;
    const vsCopy = rate / copyRate;
    let row = r.name.padEnd(16) + String(r.threads).padStart(8) +
      fmt(r.elements / r.seconds, "").padStart(12) +
      fmt(rate, "B").padStart(11) + vsCopy.toFixed(2).padStart(8);
    if (backend.kind === "wasm") {
      if (r.nativeSeconds) {
        const vsNative = r.nativeSeconds / r.seconds;
        row += fmt(r.bytes / r.nativeSeconds, "B").padStart(11) + vsNative.toFixed(2).padStart(11);
        row += `  >= 0.50 of native: ${vsNative >= 0.5 ? "met" : "NOT MET"}`;
      } else row += "n/a".padStart(11) + "n/a".padStart(11) + "  (no native build)";
    } else if (CUDA_LIMITS[r.name] !== undefined) {
      const limit = CUDA_LIMITS[r.name];
      row += `  >= ${limit.toFixed(2)} of copy: ${vsCopy >= limit ? "met" : "NOT MET"}`;
    }
    lines.push(row);
  }
  // On WASM, how the threads multiply one thread's rate, beside the native build's own scaling
  // (the bar: per-tensor fp8 at 10 x on a 16-core host).
  const at = (name: string, t: number) => results.find((r) => r.name === name && r.threads === t);
  const many = Math.max(...results.map((r) => r.threads));
  const [one, all] = [at("fp8_tensor", 1), at("fp8_tensor", many)];
  if (backend.kind === "wasm" && many > 1 && one && all) {
    const native = one.nativeSeconds && all.nativeSeconds
      ? `; native ${(one.nativeSeconds / all.nativeSeconds).toFixed(1)} x`
      : "";
    const lookup = one.nativeLookupSeconds && all.nativeLookupSeconds
      ? `; native lookup loop alone ${
        (one.nativeLookupSeconds / all.nativeLookupSeconds).toFixed(1)
      } x`
      : "";
    lines.push(
      `fp8_tensor on ${many} threads: ${(one.seconds / all.seconds).toFixed(1)} x its 1-thread ` +
        `rate${native}${lookup} (bar on 16 cores: >= 10 x)`,
    );
  }
  return lines.join("\n");
}

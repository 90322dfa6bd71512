/**
 * CUDA against WebAssembly: both backends must give identical bytes for every kernel, on random
 * inputs of 1, 7, 4097 and 2^20+3 elements at element offsets 1..3 (so the CUDA kernels' scalar
 * heads, vector bodies and tails all run). The fixture vectors are checked on both backends by
 * kernels_test.ts. Where the CUDA backend does not open (no library, driver or GPU), the GPU
 * tests are registered as ignored and one test checks that the refusal is a clear BackendError.
 */
import assert from "node:assert/strict";
import type { Backend, Granularity } from "../src/backend/backend.ts";
import { CudaDevice, openCudaBackend } from "../src/backend/cuda/device.ts";
import { type CudaLibrary, loadCudaLibrary } from "../src/backend/cuda/cuda_ffi.ts";
import { openWasmBackend } from "../src/backend/wasm.ts";
import { BackendError } from "../src/errors.ts";
import { type DType, DTYPES } from "../src/tensor/dtype.ts";
import { Tensor } from "../src/tensor/tensor.ts";

let cuda: Backend | undefined;
let refusal: unknown;
try {
  cuda = openCudaBackend();
} catch (e) {
  refusal = e;
}
const wasm: Backend | undefined = cuda ? await openWasmBackend() : undefined;

let library: CudaLibrary | undefined;
try {
  library = loadCudaLibrary();
} catch {
  library = undefined;
}

const SIZES = [1, 7, 4097, 2 ** 20 + 3];
const FLOATS: DType[] = [DTYPES.f32, DTYPES.f16, DTYPES.bf16, DTYPES.f8_e4m3fn, DTYPES.f8_e5m2];
const QUANT_IN: DType[] = [DTYPES.f32, DTYPES.f16, DTYPES.bf16];
const GRANULARITIES: Granularity[] = ["tensor", "row", "block128"];

function gpuTest(name: string, fn: (c: Backend, w: Backend) => void | Promise<void>): void {
  Deno.test({
    name: `cuda: ${name}`,
    ignore: cuda === undefined,
    fn: () => fn(cuda!, wasm!),
  });
}

// ------------------------------------------------------------------ inputs

/** xorshift32: reproducible inputs without a dependency. */
function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    return (s >>>= 0);
  };
}

/** Random bit patterns: every encoding, NaN/Inf/subnormal/-0 included. */
function randomBits(n: number, dtype: DType, seed: number): Uint8Array {
  const next = rng(seed);
  const out = new Uint8Array(n * dtype.size);
  const words = new Uint32Array(out.buffer, 0, Math.floor(out.byteLength / 4));
  for (let i = 0; i < words.length; i++) words[i] = next();
  for (let i = words.length * 4; i < out.byteLength; i++) out[i] = next() & 0xff;
  return out;
}

/** Field layout of each floating format: exponent shift, exponent bits, bias. */
const FORMAT: Record<string, [number, number, number]> = {
  f32: [23, 8, 127],
  f16: [10, 5, 15],
  bf16: [7, 8, 127],
  f8_e4m3fn: [3, 4, 7],
  f8_e5m2: [2, 5, 15],
};

/**
 * Finite values of moderate range (|x| within 2^-spread..2^spread around 1, some zeros and
 * subnormal-free), as a model's weights are; the rounding of quantization is exercised fully.
 */
function niceValues(n: number, dtype: DType, seed: number, spread = 6): Uint8Array {
  const next = rng(seed);
  const [shift, ebits, bias] = FORMAT[dtype.name];
  const out = new Uint8Array(n * dtype.size);
  const dv = new DataView(out.buffer);
  const emax = (1 << ebits) - 2;
  for (let i = 0; i < n; i++) {
    const r = next();
    let e = bias + ((r % (2 * spread + 1)) - spread);
    e = Math.max(1, Math.min(emax, e));
    const mant = next() & ((1 << shift) - 1);
    const sign = (r >>> 16) & 1;
    let bits = r % 97 === 0 ? 0 : (sign << (shift + ebits)) | (e << shift) | mant;
    if (dtype.name === "f8_e4m3fn" && (bits & 0x7f) === 0x7f) bits ^= 1; // 0x7F is NaN
    if (dtype.size === 4) dv.setUint32(i * 4, bits >>> 0, true);
    else if (dtype.size === 2) dv.setUint16(i * 2, bits, true);
    else out[i] = bits;
  }
  return out;
}

/** Sets element i to NaN or +-Inf (e4m3fn has no Inf: NaN there). */
function inject(bytes: Uint8Array, dtype: DType, i: number, kind: "nan" | "inf" | "-inf"): void {
  const dv = new DataView(bytes.buffer, bytes.byteOffset);
  const f: Record<string, Record<string, number>> = {
    f32: { nan: 0x7fc00001, inf: 0x7f800000, "-inf": 0xff800000 },
    f16: { nan: 0x7e01, inf: 0x7c00, "-inf": 0xfc00 },
    bf16: { nan: 0x7fc1, inf: 0x7f80, "-inf": 0xff80 },
    f8_e4m3fn: { nan: 0x7f, inf: 0x7f, "-inf": 0xff },
    f8_e5m2: { nan: 0x7e, inf: 0x7c, "-inf": 0xfc },
  };
  const v = f[dtype.name][kind];
  if (dtype.size === 4) dv.setUint32(i * 4, v >>> 0, true);
  else if (dtype.size === 2) dv.setUint16(i * 2, v, true);
  else bytes[i] = v;
}

/** A tensor at element offset `off` inside a larger storage, holding `bytes`. */
function put(b: Backend, shape: number[], dtype: DType, bytes: Uint8Array, off: number): Tensor {
  const n = shape.reduce((a, d) => a * d, 1);
  const s = b.alloc((n + off + 3) * dtype.size);
  const t = new Tensor(shape, dtype, s, off);
  b.upload(t, bytes);
  return t;
}

/** An uninitialised-but-defined destination: filled with a marker so stray writes show. */
function dest(b: Backend, shape: number[], dtype: DType, off: number): Tensor {
  const n = shape.reduce((a, d) => a * d, 1);
  return put(b, shape, dtype, new Uint8Array(n * dtype.size).fill(0xa5), off);
}

function freeAll(b: Backend, ...ts: Tensor[]): void {
  for (const t of ts) if (t.storage && !t.storage.freed) b.free(t.storage);
}

function same(actual: Uint8Array, expected: Uint8Array, elem: number, what: string): void {
  assert.equal(actual.byteLength, expected.byteLength, `${what}: byte length`);
  for (let i = 0; i < actual.byteLength; i++) {
    if (actual[i] !== expected[i]) {
      const e = Math.floor(i / elem) * elem;
      const hex = (a: Uint8Array) =>
        Array.from(a.subarray(e, e + elem)).reverse().map((x) => x.toString(16).padStart(2, "0"))
          .join("");
      let count = 0;
      for (let j = 0; j < actual.byteLength; j += elem) {
        for (let k = 0; k < elem; k++) {
          if (actual[j + k] !== expected[j + k]) {
            count++;
            break;
          }
        }
      }
      assert.fail(
        `${what}: element ${e / elem} is 0x${hex(actual)} on CUDA, 0x${
          hex(expected)
        } on WASM (${count} elements differ)`,
      );
    }
  }
}

/** Runs `run` on both backends (same inputs) and compares the bytes of the tensors in `outs`. */
function both(
  c: Backend,
  w: Backend,
  what: string,
  run: (b: Backend) => { outs: Tensor[]; keep: Tensor[] },
): void {
  const rc = run(c), rw = run(w);
  c.synchronize();
  for (let i = 0; i < rc.outs.length; i++) {
    const o = rc.outs[i];
    same(c.download(o), w.download(rw.outs[i]), o.dtype.size, `${what} output ${i}`);
  }
  freeAll(c, ...rc.outs, ...rc.keep);
  freeAll(w, ...rw.outs, ...rw.keep);
}

/** 2-D shapes for a size: one row of n, and for the larger sizes a matrix of about as many. */
function shapesFor(n: number): number[][] {
  return n === 2 ** 20 + 3 ? [[1, n], [1031, 1017]] : n === 4097 ? [[1, n], [17, 241]] : [[1, n]];
}

function numel(shape: number[]): number {
  return shape.reduce((a, d) => a * d, 1);
}

// ------------------------------------------------------------------ tests

Deno.test({
  name: "cuda: a missing library, driver or GPU is a BackendError CUDA_UNAVAILABLE",
  ignore: cuda !== undefined,
  fn() {
    assert.ok(refusal instanceof BackendError, `expected a BackendError, got ${refusal}`);
    assert.equal(refusal.code, "CUDA_UNAVAILABLE");
    assert.match(
      refusal.message,
      /libcuda\.so\.1 not loadable|no CUDA device|no CUDA library found|--allow-ffi|driver/,
    );
  },
});

Deno.test({
  name: "cuda: lw_pread fills host memory and reports a short file as LW_EIO",
  ignore: library === undefined,
  fn() {
    const s = library!.symbols;
    const libc = Deno.dlopen("libc.so.6", {
      open: { parameters: ["buffer", "i32"], result: "i32" },
      close: { parameters: ["i32"], result: "i32" },
    });
    const path = Deno.makeTempFileSync();
    try {
      const data = randomBits(100_003, DTYPES.u8, 7);
      Deno.writeFileSync(path, data);
      const fd = libc.symbols.open(new TextEncoder().encode(path + "\0"), 0);
      assert.ok(fd >= 0);
      const dst = new Uint8Array(60_000);
      const ptr = Number(Deno.UnsafePointer.value(Deno.UnsafePointer.of(dst)));
      assert.equal(s.lw_pread(fd, ptr, dst.length, 40_000n), 0);
      assert.deepEqual(dst, data.subarray(40_000, 100_000));
      dst.fill(0);
      assert.equal(s.lw_pread(fd, ptr, 10, 100_000n), 4, "past the end is LW_EIO");
      const msg = new Uint8Array(256);
      const len = Number(s.lw_last_error(msg, msg.length));
      assert.match(new TextDecoder().decode(msg.subarray(0, len)), /short/);
      assert.equal(s.lw_pread(-1, ptr, 10, 0n), 4, "a bad descriptor is LW_EIO");
      libc.symbols.close(fd);
    } finally {
      libc.close();
      Deno.removeSync(path);
    }
  },
});

gpuTest("casts between every pair of floating dtypes match WASM bit for bit", (c, w) => {
  let seed = 1;
  for (const from of FLOATS) {
    for (const to of FLOATS) {
      if (from === to) continue;
      for (const n of SIZES) {
        const off = 1 + (seed % 3);
        const bytes = randomBits(n, from, seed++);
        both(c, w, `${from.name}->${to.name} n=${n} off=${off}`, (b) => {
          const src = put(b, [n], from, bytes, off);
          const dst = dest(b, [n], to, 4 - off);
          b.copy(dst, src);
          return { outs: [dst], keep: [src] };
        });
      }
    }
  }
});

gpuTest("strided 2-D casts and copies (shard narrowing) match WASM", (c, w) => {
  let seed = 100;
  for (const from of FLOATS) {
    for (const to of FLOATS) {
      for (const [rows, cols, pad] of [[3, 5, 2], [257, 130, 7], [64, 4097, 3]]) {
        const bytes = randomBits(rows * (cols + pad), from, seed++);
        both(c, w, `${from.name}->${to.name} ${rows}x${cols}+${pad}`, (b) => {
          const whole = put(b, [rows, cols + pad], from, bytes, 1);
          const src = whole.narrow(1, pad, cols);
          const dstWhole = dest(b, [rows, cols + 1], to, 2);
          const dst = dstWhole.narrow(1, 1, cols);
          b.copy(dst, src);
          return { outs: [dstWhole], keep: [whole] };
        });
      }
    }
  }
});

gpuTest("contiguous copies of every size and offset match WASM", (c, w) => {
  for (const dtype of [DTYPES.u8, DTYPES.bf16, DTYPES.f32, DTYPES.i64]) {
    for (const n of SIZES) {
      const bytes = randomBits(n, dtype, n + dtype.code);
      both(c, w, `copy ${dtype.name} n=${n}`, (b) => {
        const src = put(b, [n], dtype, bytes, 3);
        const dst = dest(b, [n], dtype, 1);
        b.copy(dst, src);
        return { outs: [dst], keep: [src] };
      });
    }
  }
});

gpuTest("fill matches WASM for every dtype, value and offset", (c, w) => {
  const values: Record<string, number[]> = {
    float: [0, -0, 1.5, -3.25e-3, 1e9, -70000, NaN, Infinity, 1e-45],
    i8: [0, 1, -1, 127, -128],
    u8: [0, 1, 127, 255],
    i32: [0, 1, -1, 123456789, -(2 ** 31), 2 ** 31 - 1],
    i64: [0, 1, -1, 123456789, -(2 ** 40), 2 ** 53 - 1],
    bool: [0, 1],
  };
  for (const dtype of Object.values(DTYPES)) {
    const vals = dtype.floating ? values.float : values[dtype.name];
    for (const v of vals) {
      for (const n of [1, 7, 4097, 100_003]) {
        const off = 1 + (n % 3);
        both(c, w, `fill ${dtype.name} ${v} n=${n}`, (b) => {
          const t = dest(b, [n + off + 2], dtype, 0);
          b.fill(t.narrow(0, off, n), v);
          return { outs: [t], keep: [] };
        });
      }
    }
  }
});

gpuTest("absmax matches WASM, and is NaN when any element is NaN", (c, w) => {
  let seed = 300;
  for (const dtype of FLOATS) {
    for (const n of SIZES) {
      const off = 1 + (seed % 3);
      const bytes = niceValues(n, dtype, seed++, 20);
      const run = (b: Backend, data: Uint8Array) => {
        const t = put(b, [n], dtype, data, off);
        const r = b.absmax(t);
        freeAll(b, t);
        return r;
      };
      const a = run(c, bytes);
      assert.ok(Number.isFinite(a) && a > 0, `${dtype.name} n=${n}: absmax ${a}`);
      assert.ok(Object.is(a, run(w, bytes)), `${dtype.name} n=${n} absmax`);
      inject(bytes, dtype, n - 1, "inf");
      const inf = run(c, bytes);
      assert.ok(Object.is(inf, run(w, bytes)), `${dtype.name} n=${n} absmax with Inf`);
      assert.equal(inf, dtype.name === "f8_e4m3fn" ? NaN : Infinity);
      inject(bytes, dtype, Math.floor(n / 2), "nan");
      assert.ok(Number.isNaN(run(c, bytes)), `${dtype.name} n=${n} NaN`);
      assert.ok(Number.isNaN(run(w, bytes)));
    }
  }
});

gpuTest("countNonFinite matches WASM on random bits and injected NaN/Inf", (c, w) => {
  let seed = 400;
  for (const dtype of FLOATS) {
    for (const n of SIZES) {
      const off = 1 + (seed % 3);
      const random = randomBits(n, dtype, seed++);
      const nice = niceValues(n, dtype, seed++);
      const positions = [0, n - 1, Math.floor(n / 3)];
      positions.forEach((p, i) => inject(nice, dtype, p, (["nan", "inf", "-inf"] as const)[i]));
      const expectNice = new Set(positions).size;
      for (const [name, data, expected] of [["random", random, -1], ["nice", nice, expectNice]]) {
        const run = (b: Backend) => {
          const t = put(b, [n], dtype, data as Uint8Array, off);
          const r = b.countNonFinite(t);
          freeAll(b, t);
          return r;
        };
        const k = run(c);
        assert.equal(k, run(w), `${dtype.name} n=${n} ${name}`);
        if ((expected as number) >= 0) assert.equal(k, expected, `${dtype.name} n=${n} ${name}`);
      }
    }
  }
});

function quantCase(
  c: Backend,
  w: Backend,
  kind: "fp8" | "int8",
  dtype: DType,
  shape: number[],
  g: Granularity,
  dynamic: boolean,
  bytes: Uint8Array,
  seed: number,
  offset?: number,
): void {
  const [rows, cols] = shape;
  const nScale = g === "tensor" ? 1 : g === "row" ? rows : Math.ceil(rows / 128) *
    Math.ceil(cols / 128);
  const scales = new Uint8Array(nScale * 4);
  const sv = new DataView(scales.buffer);
  const next = rng(seed);
  for (let i = 0; i < nScale; i++) sv.setFloat32(i * 4, 2 ** ((next() % 16) - 10) * 1.37, true);
  // Element offsets 0-3: aligned sources take the staged kernels, the others the fallbacks.
  const off = offset ?? seed % 4;
  both(c, w, `${kind} ${dtype.name} [${shape}] ${g} dynamic=${dynamic} off=${off}`, (b) => {
    const x = put(b, shape, dtype, bytes, off);
    const q = dest(b, shape, kind === "fp8" ? DTYPES.f8_e4m3fn : DTYPES.i8, 4 - off);
    const s = put(b, [nScale], DTYPES.f32, scales, 1);
    if (kind === "fp8") b.quantizeFp8(q, s, x, g, dynamic);
    else b.quantizeInt8(q, s, x);
    return { outs: [q, s], keep: [x] };
  });
}

gpuTest("fp8 quantization (tensor, row, block128; dynamic and given) matches WASM", (c, w) => {
  let seed = 500;
  for (const dtype of QUANT_IN) {
    for (const n of SIZES) {
      for (const shape of shapesFor(n)) {
        const bytes = niceValues(numel(shape), dtype, seed++);
        for (const g of GRANULARITIES) {
          for (const dynamic of [true, false]) {
            quantCase(c, w, "fp8", dtype, shape, g, dynamic, bytes, seed++);
          }
        }
      }
    }
  }
  // extra 2-D shapes with partial edge blocks
  for (const shape of [[257, 130], [129, 4100], [300, 7]]) {
    const bytes = niceValues(shape[0] * shape[1], DTYPES.bf16, seed++);
    for (const g of GRANULARITIES) quantCase(c, w, "fp8", DTYPES.bf16, shape, g, true, bytes, 9);
  }
});

gpuTest("fp8 quantization with NaN/Inf in the input matches WASM", (c, w) => {
  let seed = 600;
  for (const dtype of QUANT_IN) {
    const shape = [300, 259];
    const bytes = niceValues(shape[0] * shape[1], dtype, seed++);
    inject(bytes, dtype, 5, "inf");
    inject(bytes, dtype, 200 * 259 + 140, "nan");
    inject(bytes, dtype, 299 * 259, "-inf");
    for (const g of GRANULARITIES) {
      for (const dynamic of [true, false]) {
        quantCase(c, w, "fp8", dtype, shape, g, dynamic, bytes, seed++);
      }
    }
    quantCase(c, w, "int8", dtype, shape, "row", true, bytes, seed++);
  }
});

gpuTest("fp8 quantization at the edges of the fast division path matches WASM", (c, w) => {
  // The CUDA kernels divide through a reciprocal with a correction step where that is exact
  // (|scale| in [2^-60, 2^60], quotients in [2^-12, 2^64)); scales and inputs around those
  // bounds, and every input encoding, must still give the exact division's bytes.
  const scales = [
    2 ** -61,
    2 ** -60,
    1.5 * 2 ** -60,
    1e-10,
    1 / 229376,
    0.75,
    3,
    2 ** 59 * 1.9,
    2 ** 60,
    2 ** 61,
    0,
    -3,
    Infinity,
    NaN,
  ];
  let seed = 900;
  for (const dtype of QUANT_IN) {
    const n = 65_536 + 5;
    const bytes = randomBits(n, dtype, seed++);
    for (const sv of scales) {
      const sb = new Uint8Array(4);
      new DataView(sb.buffer).setFloat32(0, sv, true);
      both(c, w, `fp8 ${dtype.name} given scale ${sv}`, (b) => {
        const x = put(b, [n], dtype, bytes, 1);
        const q = dest(b, [n], DTYPES.f8_e4m3fn, 1);
        const s = put(b, [1], DTYPES.f32, sb, 0);
        b.quantizeFp8(q, s, x, "tensor", false);
        return { outs: [q], keep: [x, s] };
      });
    }
  }
});

gpuTest("int8 per-row quantization matches WASM", (c, w) => {
  let seed = 700;
  for (const dtype of QUANT_IN) {
    for (const n of SIZES) {
      for (const shape of shapesFor(n)) {
        const bytes = niceValues(numel(shape), dtype, seed++);
        quantCase(c, w, "int8", dtype, shape, "row", true, bytes, seed++);
      }
    }
  }
});

gpuTest(
  "per-row quantization, rows held in registers or staged in shared memory (up to past 48 KiB), matches WASM",
  (c, w) => {
    // Rows of whole 16-byte vectors at aligned addresses: short ones are held in registers,
    // longer ones staged in shared memory (bf16 14336 columns: 56 KiB for two stages, f32 12288:
    // 96 KiB, both past the opt-in); more rows than the grid has blocks.
    let seed = 800;
    for (const dtype of QUANT_IN) {
      const e = 16 / dtype.size;
      for (const shape of [[3, e], [1100, 4096], [9, 14336], [5, 12288], [40, 8 * e]]) {
        const bytes = niceValues(numel(shape), dtype, seed++);
        if (seed % 3 === 0) inject(bytes, dtype, shape[1] + 3, "nan");
        for (const dynamic of [true, false]) {
          quantCase(c, w, "fp8", dtype, shape, "row", dynamic, bytes, seed++, 0);
        }
        quantCase(c, w, "int8", dtype, shape, "row", true, bytes, seed++, 0);
      }
    }
  },
);

gpuTest("fp8 dequantization matches WASM for every granularity and output dtype", (c, w) => {
  let seed = 800;
  for (const to of QUANT_IN) {
    for (const n of SIZES) {
      for (const shape of [...shapesFor(n), ...(n === 4097 ? [[257, 130]] : [])]) {
        const [rows, cols] = shape;
        const qbytes = randomBits(rows * cols, DTYPES.f8_e4m3fn, seed++);
        for (const g of GRANULARITIES) {
          const nScale = g === "tensor" ? 1 : g === "row" ? rows : Math.ceil(rows / 128) *
            Math.ceil(cols / 128);
          const sbytes = niceValues(nScale, DTYPES.f32, seed++, 10);
          const off = 1 + (seed % 3);
          both(c, w, `dequant ${to.name} [${shape}] ${g}`, (b) => {
            const q = put(b, shape, DTYPES.f8_e4m3fn, qbytes, off);
            const s = put(b, [nScale], DTYPES.f32, sbytes, 2);
            const d = dest(b, shape, to, 4 - off);
            b.dequantizeFp8(d, q, s, g);
            return { outs: [d], keep: [q, s] };
          });
        }
      }
    }
  }
});

gpuTest("refused calls raise BackendError and write nothing", (c) => {
  const x = put(c, [4, 8], DTYPES.bf16, niceValues(32, DTYPES.bf16, 1), 1);
  const q = dest(c, [4, 8], DTYPES.f8_e4m3fn, 0);
  const badScale = dest(c, [3], DTYPES.f32, 0);
  const before = [c.download(q), c.download(badScale)];
  assert.throws(() => c.quantizeFp8(q, badScale, x, "row", true), BackendError);
  const i8 = dest(c, [4, 8], DTYPES.i8, 0);
  assert.throws(() => c.copy(i8, x), BackendError);
  assert.throws(() => c.absmax(i8), BackendError);
  c.synchronize();
  assert.deepEqual(c.download(q), before[0]);
  assert.deepEqual(c.download(badScale), before[1]);
  assert.deepEqual(c.download(i8), new Uint8Array(32).fill(0xa5));
  freeAll(c, x, q, badScale, i8);
});

gpuTest("the C entry points refuse unknown dtypes and granularities without writing", () => {
  const dev = CudaDevice.open(0);
  const s = dev.symbols;
  const ctx = dev.createContext();
  const a = dev.malloc(256), b = dev.malloc(256);
  try {
    const marker = new Uint8Array(256).fill(0x5a);
    dev.writeSync(ctx, a, marker);
    dev.writeSync(ctx, b, new Uint8Array(256).fill(1));
    assert.equal(s.lw_cast(ctx, a, 99, 8, b, 0, 8, 2, 8), 1);
    assert.match(dev.lastError(), /dtype/);
    assert.equal(s.lw_cast(ctx, a, LW.I8, 8, b, LW.F32, 8, 2, 8), 1);
    assert.equal(s.lw_quant_fp8(ctx, a, b, b, LW.I8, 2, 8, 0, 1), 1);
    assert.equal(s.lw_quant_fp8(ctx, a, b + 128, b, LW.F32, 2, 8, 7, 1), 1);
    assert.equal(s.lw_dequant_fp8(ctx, a, LW.F8, b, b, 2, 8, 0), 1);
    assert.equal(s.lw_fill(ctx, a, 4, 3, 0, 0), 1);
    assert.equal(s.lw_absmax(ctx, a, b, LW.I8, 4), 1);
    const after = new Uint8Array(256);
    dev.readSync(ctx, after, a);
    assert.deepEqual(after, marker);
    assert.throws(() => dev.malloc(2 ** 50), (e) => e instanceof BackendError);
    // The failed allocation is not reported again by the next launch on this thread.
    assert.equal(s.lw_fill(ctx, a, 64, 4, 0x3f800000, 0), 0, dev.lastError());
    dev.sync(ctx);
    const ones = new Float32Array(64);
    dev.readSync(ctx, new Uint8Array(ones.buffer), a);
    assert.ok(ones.every((x) => x === 1));
  } finally {
    dev.free(a);
    dev.free(b);
    dev.destroyContext(ctx);
  }
});

const LW = { F32: 0, F8: 3, I8: 5 } as const;

gpuTest("pinned buffers, streams and events move bytes both ways", async () => {
  const dev = CudaDevice.open(0);
  const ctx = dev.createContext();
  const n = 1 << 22;
  const host = dev.hostAlloc(n);
  const back = dev.hostAlloc(n);
  const d = dev.malloc(n);
  const e0 = dev.createEvent(), e1 = dev.createEvent();
  try {
    host.view.set(randomBits(n, DTYPES.u8, 42));
    dev.record(e0, ctx);
    dev.h2d(ctx, d, host.ptr, n);
    dev.d2h(ctx, back.ptr, d, n);
    dev.record(e1, ctx);
    await dev.eventSyncAsync(e1);
    await dev.syncAsync(ctx);
    assert.deepEqual(back.view, host.view);
    assert.ok(dev.elapsedMs(e0, e1) >= 0);
  } finally {
    dev.destroyEvent(e0);
    dev.destroyEvent(e1);
    dev.free(d);
    dev.hostFree(host);
    dev.hostFree(back);
    dev.destroyContext(ctx);
  }
});

gpuTest("close gives the device memory back", () => {
  const dev = CudaDevice.open(0);
  const b = openCudaBackend();
  const before = dev.memInfo().free;
  b.alloc(1 << 30);
  assert.ok(dev.memInfo().free <= before - (1 << 30));
  b.close();
  assert.ok(dev.memInfo().free >= before - (64 << 20));
});

Deno.test({
  name:
    "cuda: the staged kernels' paths for GPUs with less shared memory (one staged tile or row, none) give the same bytes",
  // The child runs set the variable: they run the tests below, not this one again.
  ignore: cuda === undefined || Deno.env.get("LAYERWISE_CUDA_TILE_STAGES") !== undefined,
  async fn() {
    const here = new URL(import.meta.url).pathname;
    const device = new URL("./device_test.ts", import.meta.url).pathname;
    for (const stages of ["1", "0"]) {
      const out = await new Deno.Command(Deno.execPath(), {
        args: ["test", "-A", here, device, "--filter", "/fp8 quantization|fp8-block|per-row/"],
        env: { LAYERWISE_CUDA_TILE_STAGES: stages, LAYERWISE_E2E_BACKEND: "cuda", NO_COLOR: "1" },
        stdout: "piped",
        stderr: "piped",
      }).output();
      const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
      assert.ok(out.success, `stages ${stages}: ${text.slice(-3000)}`);
      assert.match(text, /ok \| [1-9]\d* passed \| 0 failed/, `stages ${stages}`);
    }
  },
});

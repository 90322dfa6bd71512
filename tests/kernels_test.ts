/**
 * Backend-generic kernel tests against the PyTorch reference vectors in fixtures/vectors:
 * every exhaustive cast, every quantization case (q bytes and scale bytes), dequantization.
 * The same tests run on every backend that opens here: WebAssembly always, CUDA when
 * `openCudaBackend()` succeeds (so on a GPU machine this file is also the GPU kernel test).
 */
import assert from "node:assert/strict";
import type { Backend, Granularity } from "../src/backend/backend.ts";
import { openCudaBackend } from "../src/backend/cuda/device.ts";
import { openWasmBackend } from "../src/backend/wasm.ts";
import { type HostTensor, loadSafetensors } from "../src/checkpoint/safetensors.ts";
import { type DType, DTYPES } from "../src/tensor/dtype.ts";
import type { Tensor } from "../src/tensor/tensor.ts";

const VECTORS = new URL("../../shared/fixtures/vectors/", import.meta.url);
const casts = await loadSafetensors(new URL("casts.safetensors", VECTORS).pathname);
const rounding = await loadSafetensors(new URL("f32_round.safetensors", VECTORS).pathname);
const quant = await loadSafetensors(new URL("quant.safetensors", VECTORS).pathname);

function fixture(file: Map<string, HostTensor>, name: string): HostTensor {
  const t = file.get(name);
  assert.ok(t, `fixture tensor ${name} is missing`);
  return t;
}

/**
 * Byte comparison element by element; on failure the message names the first differing
 * element with both values in hex, and how many differ, instead of dumping whole arrays.
 */
export function assertSameElements(
  actual: Uint8Array,
  expected: Uint8Array,
  elemSize: number,
  what: string,
): void {
  assert.equal(actual.byteLength, expected.byteLength, `${what}: byte length`);
  let first = -1, count = 0;
  for (let i = 0; i < actual.byteLength; i += elemSize) {
    for (let j = 0; j < elemSize; j++) {
      if (actual[i + j] !== expected[i + j]) {
        if (first < 0) first = i / elemSize;
        count++;
        break;
      }
    }
  }
  if (first >= 0) {
    const hex = (b: Uint8Array) =>
      Array.from(b.subarray(first * elemSize, (first + 1) * elemSize)).reverse()
        .map((x) => x.toString(16).padStart(2, "0")).join("");
    assert.fail(
      `${what}: ${count} of ${actual.byteLength / elemSize} elements differ; first at ${first}: ` +
        `got 0x${hex(actual)}, want 0x${hex(expected)}`,
    );
  }
}

/** Registers the tests of this file for one backend. */
function kernelTests(kind: string, open: () => Promise<Backend | null>): void {
  let backend: Backend | null = null;
  let unavailable = "";
  const get = async (): Promise<Backend> => {
    if (!backend && !unavailable) {
      try {
        backend = await open();
        if (!backend) unavailable = "not available";
      } catch (e) {
        unavailable = (e as Error).message;
      }
    }
    if (!backend) throw new Error(`${kind} backend: ${unavailable}`);
    return backend;
  };
  const owned: Tensor[] = [];
  const put = (b: Backend, t: HostTensor): Tensor => {
    const d = b.empty(t.shape, t.dtype);
    owned.push(d);
    b.upload(d, t.data);
    return d;
  };
  const empty = (b: Backend, shape: readonly number[], dtype: DType): Tensor => {
    const d = b.empty(shape, dtype);
    owned.push(d);
    return d;
  };
  const release = (b: Backend) => {
    for (const t of owned.splice(0)) b.free(t.storage!);
  };

  const test = (name: string, fn: (b: Backend) => void | Promise<void>) =>
    Deno.test(`${kind}: ${name}`, async () => {
      const b = await get();
      try {
        await fn(b);
      } finally {
        release(b);
      }
    });

  /** Casts src (a fixture tensor) to dtype and compares with the expected fixture tensor. */
  const castCase = (b: Backend, src: HostTensor, dtype: DType, want: HostTensor, what: string) => {
    assert.equal(want.dtype, dtype, `${what}: fixture dtype`);
    const x = put(b, src);
    const y = empty(b, src.shape, dtype);
    b.copy(y, x);
    assertSameElements(b.download(y), want.data, dtype.size, what);
  };

  test("bf16 -> f32, all 65536 patterns", (b) => {
    const bits = fixture(casts, "bf16_bits");
    castCase(b, bits, DTYPES.f32, fixture(casts, "bf16_to_f32"), "bf16 -> f32");
  });

  test("f16 -> f32, all 65536 patterns (NaN quieted)", (b) => {
    const bits = fixture(casts, "f16_bits");
    castCase(b, bits, DTYPES.f32, fixture(casts, "f16_to_f32"), "f16 -> f32");
  });

  test("bf16 / f16 -> e4m3fn saturating, all patterns (Inf, NaN, -0, tiny)", (b) => {
    castCase(
      b,
      fixture(casts, "bf16_bits"),
      DTYPES.f8_e4m3fn,
      fixture(casts, "bf16_to_e4m3fn_sat"),
      "bf16 -> e4m3fn",
    );
    castCase(
      b,
      fixture(casts, "f16_bits"),
      DTYPES.f8_e4m3fn,
      fixture(casts, "f16_to_e4m3fn_sat"),
      "f16 -> e4m3fn",
    );
  });

  test("bf16 -> e5m2 saturating, all patterns", (b) => {
    castCase(
      b,
      fixture(casts, "bf16_bits"),
      DTYPES.f8_e5m2,
      fixture(casts, "bf16_to_e5m2_sat"),
      "bf16 -> e5m2",
    );
  });

  test("e4m3fn -> f32, all 256 bytes; and back", (b) => {
    const all = fixture(casts, "e4m3fn_all");
    castCase(b, all, DTYPES.f32, fixture(casts, "e4m3fn_all_to_f32"), "e4m3fn -> f32");
    // Every e4m3fn value is exact in f32, so the way back gives the same byte (NaN stays 0x7F|s).
    castCase(b, fixture(casts, "e4m3fn_all_to_f32"), DTYPES.f8_e4m3fn, all, "f32 -> e4m3fn");
  });

  test("f32 -> bf16 and f32 -> f16, round to nearest even", (b) => {
    const x = fixture(rounding, "f32");
    castCase(b, x, DTYPES.bf16, fixture(rounding, "f32_to_bf16"), "f32 -> bf16");
    castCase(b, x, DTYPES.f16, fixture(rounding, "f32_to_f16"), "f32 -> f16");
  });

  test("bf16 and f16 survive a round trip through f32 (finite and Inf)", (b) => {
    for (const name of ["bf16_bits", "f16_bits"]) {
      const src = fixture(casts, name);
      const f32 = put(b, fixture(casts, name === "bf16_bits" ? "bf16_to_f32" : "f16_to_f32"));
      const back = empty(b, src.shape, src.dtype);
      b.copy(back, f32);
      const got = new DataView(b.download(back).buffer);
      const want = new DataView(src.data.buffer, src.data.byteOffset, src.data.byteLength);
      const inf = name === "bf16_bits" ? 0x7f80 : 0x7c00;
      for (let i = 0; i < src.shape[0]; i++) {
        const w = want.getUint16(2 * i, true);
        if ((w & 0x7fff) > inf) continue; // NaN payloads: covered by the fixture cases above
        assert.equal(got.getUint16(2 * i, true), w, `${name} round trip at 0x${w.toString(16)}`);
      }
    }
  });

  const SHAPES = ["s0", "s1", "s2", "s3", "s4", "s5"];

  const fp8Case = (b: Backend, x: HostTensor, prefix: string, g: Granularity) => {
    const wantQ = fixture(quant, `${prefix}.q`);
    const wantS = fixture(quant, `${prefix}.scale`);
    const xt = put(b, x);
    const q = empty(b, x.shape, DTYPES.f8_e4m3fn);
    const s = empty(b, wantS.shape, DTYPES.f32);
    b.quantizeFp8(q, s, xt, g, true);
    assertSameElements(b.download(s), wantS.data, 4, `${prefix}.scale`);
    assertSameElements(b.download(q), wantQ.data, 1, `${prefix}.q`);
    // With the scale given (static quantization) the same bytes come out.
    const q2 = empty(b, x.shape, DTYPES.f8_e4m3fn);
    const s2 = put(b, wantS);
    b.quantizeFp8(q2, s2, xt, g, false);
    assertSameElements(b.download(q2), wantQ.data, 1, `${prefix}.q (static scale)`);
    assertSameElements(b.download(s2), wantS.data, 4, `${prefix}.scale (static, unchanged)`);
  };

  for (const g of ["tensor", "row", "block128"] as const) {
    test(`fp8 per-${g} quantization of bf16, every shape`, (b) => {
      for (const s of SHAPES) fp8Case(b, fixture(quant, `${s}.x_bf16`), `${s}.fp8_${g}`, g);
    });
  }

  test("fp8 per-tensor quantization of f32, every shape", (b) => {
    for (const s of SHAPES) {
      fp8Case(b, fixture(quant, `${s}.x_f32`), `${s}.f32.fp8_tensor`, "tensor");
    }
  });

  test("fp8 quantization of an all-zero input uses the minimum scale", (b) => {
    fp8Case(b, fixture(quant, "zero.x_bf16"), "zero.fp8_tensor", "tensor");
  });

  test("int8 per-row quantization of bf16, every shape", (b) => {
    for (const s of SHAPES) {
      const x = fixture(quant, `${s}.x_bf16`);
      const wantQ = fixture(quant, `${s}.int8_row.q`);
      const wantS = fixture(quant, `${s}.int8_row.scale`);
      const q = empty(b, x.shape, DTYPES.i8);
      const sc = empty(b, wantS.shape, DTYPES.f32);
      b.quantizeInt8(q, sc, put(b, x));
      assertSameElements(b.download(sc), wantS.data, 4, `${s}.int8_row.scale`);
      assertSameElements(b.download(q), wantQ.data, 1, `${s}.int8_row.q`);
    }
  });

  // f32(q) for every e4m3fn byte, from the reference table.
  const e4m3Value = (() => {
    const t = fixture(casts, "e4m3fn_all_to_f32");
    const bytes = fixture(casts, "e4m3fn_all").data;
    const v = new DataView(t.data.buffer, t.data.byteOffset, t.data.byteLength);
    const out = new Float32Array(256);
    for (let i = 0; i < 256; i++) out[bytes[i]] = v.getFloat32(4 * i, true);
    return out;
  })();

  for (const g of ["tensor", "row", "block128"] as const) {
    test(`fp8 per-${g} dequantization: f32(q) * scale, then the cast rules`, (b) => {
      for (const s of SHAPES) {
        const prefix = `${s}.fp8_${g}`;
        const qh = fixture(quant, `${prefix}.q`), sh = fixture(quant, `${prefix}.scale`);
        const [rows, cols] = qh.shape;
        const q = put(b, qh), sc = put(b, sh);
        const out = empty(b, qh.shape, DTYPES.f32);
        b.dequantizeFp8(out, q, sc, g);
        // Expected: the product of two f32 is exact in f64, so fround gives the f32 product.
        const scales = new Float32Array(sh.data.slice().buffer);
        const want = new Float32Array(rows * cols);
        const nb = Math.ceil(cols / 128);
        for (let r = 0; r < rows; r++) {
          for (let c = 0; c < cols; c++) {
            const k = g === "tensor" ? 0 : g === "row" ? r : Math.floor(r / 128) * nb +
              Math.floor(c / 128);
            want[r * cols + c] = Math.fround(e4m3Value[qh.data[r * cols + c]] * scales[k]);
          }
        }
        assertSameElements(b.download(out), new Uint8Array(want.buffer), 4, `${prefix} -> f32`);
        // To bf16/f16: the same as dequantizing to f32 and casting (one rounding each way).
        for (const dt of [DTYPES.bf16, DTYPES.f16]) {
          const direct = empty(b, qh.shape, dt), viaF32 = empty(b, qh.shape, dt);
          b.dequantizeFp8(direct, q, sc, g);
          b.copy(viaF32, out);
          assertSameElements(b.download(direct), b.download(viaF32), 2, `${prefix} -> ${dt.name}`);
        }
      }
    });
  }

  test("countNonFiniteEach: each tensor's countNonFinite, one wait for all", (b) => {
    // bf16 bit patterns: of all 65536, exponent 0xff (Inf, NaN) has 2 signs x 128 mantissas.
    const bits = put(b, fixture(casts, "bf16_bits"));
    const f32 = empty(b, bits.shape, DTYPES.f32);
    b.copy(f32, bits);
    const ints = empty(b, [7], DTYPES.u8);
    const none = empty(b, [0], DTYPES.bf16);
    const half = bits.narrow(0, 0, 32768);
    const got = b.countNonFiniteEach([bits, ints, f32, none, half]);
    const want = [bits, ints, f32, none, half].map((t) => b.countNonFinite(t));
    assert.deepEqual(got, want);
    assert.equal(got[0], 256);
    assert.equal(got[4], 128);
    assert.deepEqual(b.countNonFiniteEach([]), []);
  });

  test("dequantized fp8 is within half an e4m3 step of the input", (b) => {
    const x = fixture(quant, "s5.x_f32");
    const xs = new Float32Array(x.data.slice().buffer);
    const q = put(b, fixture(quant, "s5.f32.fp8_tensor.q"));
    const sc = put(b, fixture(quant, "s5.f32.fp8_tensor.scale"));
    const out = empty(b, x.shape, DTYPES.f32);
    b.dequantizeFp8(out, q, sc, "tensor");
    const got = new Float32Array(b.download(out).buffer);
    const scale =
      new Float32Array(fixture(quant, "s5.f32.fp8_tensor.scale").data.slice().buffer)[0];
    for (let i = 0; i < xs.length; i++) {
      // e4m3: 3 mantissa bits, subnormal step 2^-9; half a step of relative 2^-3 is 2^-4.
      const tol = Math.max(Math.abs(xs[i]) * 2 ** -4, 2 ** -10 * scale) * 1.0001;
      assert.ok(Math.abs(got[i] - xs[i]) <= tol, `element ${i}: ${got[i]} vs ${xs[i]}`);
    }
  });
}

kernelTests("wasm", () => openWasmBackend());
// The same vectors split across threads: every call is cut into parts however small, so each
// kernel's parts and reductions are exercised on inputs of every fixture's size.
for (const threads of [1, 2, 4]) {
  kernelTests(
    `wasm ${threads} thread${threads > 1 ? "s" : ""}`,
    () => openWasmBackend({ threads, minBytesPerThread: 0 }),
  );
}

// CUDA runs when it opens (library built, driver and GPU present); otherwise one ignored test
// says why, so the run shows that the GPU half was not exercised.
let cudaMissing = "";
const cuda: Backend | null = (() => {
  try {
    return openCudaBackend();
  } catch (e) {
    cudaMissing = (e as Error).message.split("\n")[0];
    return null;
  }
})();
if (cuda) {
  kernelTests("cuda", () => Promise.resolve(cuda));
} else {
  Deno.test({ name: `cuda: kernel tests not run (${cudaMissing})`, ignore: true, fn() {} });
}

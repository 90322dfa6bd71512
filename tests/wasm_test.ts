/**
 * WebAssembly backend: refused calls (typed errors, nothing written), strided and unaligned
 * views, memory growth, fill, absmax and non-finite counts checked against answers computed
 * here, and the raw module refusing bad arguments on its own.
 */
import assert from "node:assert/strict";
import type { Backend } from "../src/backend/backend.ts";
import { openWasmBackend, WASM_MAX_MEMORY_BYTES, wasmView } from "../src/backend/wasm.ts";
import { BackendError } from "../src/errors.ts";
import { type DType, DTYPES } from "../src/tensor/dtype.ts";
import { Tensor } from "../src/tensor/tensor.ts";
import { loadSafetensors } from "../src/checkpoint/safetensors.ts";
import { kernelsWasmBytes } from "../wasm/kernels_wasm.ts";
import fc from "fast-check";
import { HEAP_ALIGN, WasmHeap } from "../src/backend/wasm_heap.ts";
import {
  instantiateKernels,
  numberExports,
  readModuleInfo,
  sharedMemory64,
  wasmGlobals,
} from "../src/backend/wasm_abi.ts";

/** Seeded values in [-range, range): reproducible, no fixtures needed for layout tests. */
function randomF32(n: number, seed: number, range = 4): Float32Array {
  const out = new Float32Array(n);
  let s = seed >>> 0;
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    out[i] = ((s >>> 8) / 16777216) * 2 * range - range;
  }
  return out;
}

/** f32 values that bf16 holds exactly (top 16 bits), and their bf16 bits. */
function exactBf16(n: number, seed: number): { f32: Float32Array; bf16: Uint16Array } {
  const f32 = randomF32(n, seed);
  const u = new Uint32Array(f32.buffer);
  const bf16 = new Uint16Array(n);
  for (let i = 0; i < n; i++) {
    u[i] &= 0xffff0000;
    bf16[i] = u[i] >>> 16;
  }
  return { f32, bf16 };
}

const bytesOf = (a: ArrayBufferView): Uint8Array =>
  new Uint8Array(a.buffer, a.byteOffset, a.byteLength);

function upload(b: Backend, shape: number[], dtype: DType, data: ArrayBufferView): Tensor {
  const t = b.empty(shape, dtype);
  b.upload(t, bytesOf(data));
  return t;
}

function throwsBackend(fn: () => unknown, code: string, text: RegExp): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof BackendError, `expected a BackendError, got ${e}`);
    assert.equal(e.code, code, e.message);
    assert.match(e.message, text);
    return true;
  });
}

/** Runs fn on a fresh backend, closed afterwards. */
function wasmTest(name: string, fn: (b: Backend) => void | Promise<void>): void {
  Deno.test(`wasm: ${name}`, async () => {
    const b = await openWasmBackend();
    try {
      await fn(b);
    } finally {
      b.close();
    }
  });
}

// ------------------------------------------------------------------------- refused calls

wasmTest("refused kernel calls raise BackendError and write nothing", (b) => {
  const x = upload(b, [4, 8], DTYPES.bf16, exactBf16(32, 1).bf16);
  const sentinel = new Uint8Array(32).fill(0xa5);
  const q = upload(b, [4, 8], DTYPES.f8_e4m3fn, sentinel);
  const qi = upload(b, [4, 8], DTYPES.i8, sentinel);
  const s1 = upload(b, [1], DTYPES.f32, new Float32Array([7]));
  const s4 = upload(b, [4], DTYPES.f32, new Float32Array([7, 7, 7, 7]));
  const untouched = () => {
    assert.deepEqual(b.download(q), sentinel);
    assert.deepEqual(b.download(qi), sentinel);
    assert.deepEqual(new Float32Array(b.download(s1).buffer), new Float32Array([7]));
    assert.deepEqual(new Float32Array(b.download(s4).buffer), new Float32Array([7, 7, 7, 7]));
  };
  throwsBackend(() => b.quantizeFp8(qi, s1, x, "tensor", true), "BAD_DTYPE", /must be f8_e4m3fn/);
  throwsBackend(() => b.quantizeInt8(q, s4, x), "BAD_DTYPE", /must be i8/);
  throwsBackend(() => b.quantizeFp8(q, s1, qi, "tensor", true), "BAD_DTYPE", /f32, f16 or bf16/);
  throwsBackend(() => b.quantizeFp8(q, s1, x, "row", true), "SHAPE_MISMATCH", /needs 4/);
  throwsBackend(() => b.quantizeFp8(q, s4, x, "tensor", true), "SHAPE_MISMATCH", /needs 1/);
  throwsBackend(() => b.quantizeInt8(qi, s1, x), "SHAPE_MISMATCH", /needs 4/);
  const q3 = b.empty([3, 8], DTYPES.f8_e4m3fn);
  throwsBackend(() => b.quantizeFp8(q3, s1, x, "tensor", true), "SHAPE_MISMATCH", /differ/);
  throwsBackend(
    () => b.quantizeFp8(q, s1, x, "diagonal" as "row", true),
    "BAD_GRANULARITY",
    /diagonal/,
  );
  throwsBackend(() => b.copy(q, qi), "BAD_DTYPE", /no conversion from i8/);
  throwsBackend(() => b.copy(q, x.narrow(0, 0, 2)), "SHAPE_MISMATCH", /differ in shape/);
  throwsBackend(() => b.absmax(qi), "BAD_DTYPE", /floating/);
  throwsBackend(() => b.upload(q, new Uint8Array(31)), "SIZE_MISMATCH", /31 bytes/);
  throwsBackend(() => b.fill(q.narrow(1, 0, 4), 1), "NOT_CONTIGUOUS", /contiguous/);
  throwsBackend(() => b.fill(qi, 0.5), "BAD_VALUE", /not an integer/);
  throwsBackend(() => b.fill(qi, 128), "BAD_VALUE", /outside \[-128, 127\]/);
  throwsBackend(() => b.copy(q.narrow(0, 0, 2), q.narrow(0, 1, 2)), "OVERLAP", /overlaps/);
  untouched();
});

wasmTest("views out of range, freed storage, foreign tensors and a closed backend", async (b) => {
  const t = b.empty([4, 4], DTYPES.f32);
  throwsBackend(() => t.narrow(0, 2, 3), "OUT_OF_RANGE", /out of range for dimension 0/);
  throwsBackend(() => t.narrow(1, -1, 2), "OUT_OF_RANGE", /out of range/);
  throwsBackend(
    () => new Tensor([4, 4], DTYPES.f32, t.storage, 1),
    "OUT_OF_RANGE",
    /past its storage of 64 bytes/,
  );
  throwsBackend(() => new Tensor([17], DTYPES.f32, t.storage), "OUT_OF_RANGE", /64 bytes/);
  const u = b.empty([4, 4], DTYPES.f32);
  b.free(u.storage!);
  throwsBackend(() => b.copy(t, u), "FREED", /freed/);
  throwsBackend(() => b.copy(u, t), "FREED", /freed/);
  throwsBackend(() => b.download(u), "FREED", /freed/);
  throwsBackend(() => b.free(u.storage!), "FREED", /already freed/);
  throwsBackend(() => wasmView(b, u), "FREED", /freed/);
  const other = await openWasmBackend();
  try {
    const v = other.empty([4, 4], DTYPES.f32);
    throwsBackend(() => b.copy(t, v), "FOREIGN", /another backend/);
    throwsBackend(() => b.free(v.storage!), "FOREIGN", /not from this backend/);
    throwsBackend(() => wasmView(b, v), "FOREIGN", /another backend/);
  } finally {
    other.close();
  }
  throwsBackend(() => wasmView(b, Tensor.meta([2], DTYPES.f32)), "META_TENSOR", /no storage/);
  throwsBackend(() => wasmView(b, t.narrow(1, 0, 2)), "NOT_CONTIGUOUS", /contiguous/);
  b.close();
  throwsBackend(() => b.empty([1], DTYPES.f32), "CLOSED", /closed/);
  throwsBackend(() => b.download(t), "CLOSED", /closed/);
});

wasmTest("an allocation past the memory maximum is refused with the numbers", (b) => {
  b.empty([1024], DTYPES.f32);
  assert.equal(b.allocatedBytes(), 4096);
  const held = b.allocatedBytes();
  throwsBackend(
    () => b.alloc(WASM_MAX_MEMORY_BYTES + 1),
    "OUT_OF_MEMORY",
    /cannot allocate 17179869185 bytes .*maximum is \d+ bytes .* \d+ bytes .* in use/,
  );
  // Nothing changed, and the backend is still usable afterwards.
  assert.equal(b.allocatedBytes(), held);
  const t = upload(b, [2], DTYPES.f32, new Float32Array([1, -2]));
  assert.equal(b.absmax(t), 2);
});

Deno.test("wasm: past a small maximum, growth stops with OUT_OF_MEMORY; freed space is reused", async () => {
  const b = await openWasmBackend({ maxMemoryBytes: 64 * 2 ** 20 });
  try {
    const a = b.alloc(40 * 2 ** 20);
    throwsBackend(
      () => b.alloc(40 * 2 ** 20),
      "OUT_OF_MEMORY",
      /cannot allocate 41943040 bytes \(0\.04 GiB\): .*maximum is 67108864 bytes .*in use/,
    );
    b.free(a);
    b.free(b.alloc(40 * 2 ** 20));
  } finally {
    b.close();
  }
});

Deno.test("wasm: the raw module refuses bad arguments by itself and writes nothing", async () => {
  const bytes = kernelsWasmBytes();
  const module = await WebAssembly.compile(bytes);
  const { signatures } = readModuleInfo(bytes);
  const memory = sharedMemory64(2 ** 20, 2 ** 24);
  const inst = instantiateKernels(module, memory);
  const x = numberExports(inst, signatures);
  const p = wasmGlobals(inst).heapBase;
  const mem = () => new Uint8Array(memory.buffer);
  mem().fill(0x5a, p, p + 64);
  const lastError = () => {
    const at = x.lw_wasm_last_error();
    const m = mem();
    let end = at;
    while (m[end] !== 0) end++;
    return new TextDecoder().decode(m.slice(at, end));
  };
  const calls: [string, () => number, RegExp][] = [
    ["lw_cast dtype 42", () => x.lw_cast(0, p, 42, 4, p + 32, 0, 4, 1, 4), /unknown dtype/],
    ["lw_cast i32 -> f32", () => x.lw_cast(0, p, 0, 4, p + 32, 7, 4, 1, 4), /floating/],
    ["lw_fill 3-byte", () => x.lw_fill(0, p, 4, 3, 0, 0), /1, 2, 4 or 8/],
    ["lw_absmax i8", () => x.lw_absmax(0, p, p + 32, 5, 4), /floating/],
    ["lw_quant_fp8 i8", () => x.lw_quant_fp8(0, p, p + 8, p + 32, 5, 1, 4, 0, 1), /f32, f16/],
    ["lw_quant_fp8 gran 7", () => x.lw_quant_fp8(0, p, p + 8, p + 32, 0, 1, 4, 7, 1), /granul/],
    ["lw_quant_int8_row i8", () => x.lw_quant_int8_row(0, p, p + 8, p + 32, 5, 1, 4), /f32/],
    ["lw_dequant_fp8 to i8", () => x.lw_dequant_fp8(0, p, 5, p + 32, p + 8, 1, 4, 0), /f32/],
    ["lw_dequant_fp8 gran -1", () => x.lw_dequant_fp8(0, p, 0, p + 32, p + 8, 1, 4, -1), /gran/],
    ["lw_count_nonfinite 99", () => x.lw_count_nonfinite(0, p, p + 32, 99, 4), /unknown dtype/],
  ];
  for (const [what, call, text] of calls) {
    assert.equal(call(), 1, `${what}: status`);
    assert.match(lastError(), text, what);
    assert.ok(mem().subarray(p, p + 64).every((v) => v === 0x5a), `${what} wrote memory`);
  }
});

// ------------------------------------------------------------------------ strided views

wasmTest("copies between narrowed views (dim 0 and dim 1), both directions", (b) => {
  const rows = 6, cols = 10;
  const src = randomF32(rows * cols, 7);
  const a = upload(b, [rows, cols], DTYPES.f32, src);
  const at = (r: number, c: number) => src[r * cols + c];

  // dim 0 narrow: contiguous rows 2..4
  const d0 = b.empty([3, cols], DTYPES.f32);
  b.copy(d0, a.narrow(0, 2, 3));
  assert.deepEqual(new Float32Array(b.download(d0).buffer), src.slice(2 * cols, 5 * cols));

  // dim 1 narrow: columns 3..7 of every row (pitch 10)
  const d1 = b.empty([rows, 5], DTYPES.f32);
  b.copy(d1, a.narrow(1, 3, 5));
  const want1 = new Float32Array(rows * 5);
  for (let r = 0; r < rows; r++) for (let c = 0; c < 5; c++) want1[r * 5 + c] = at(r, c + 3);
  assert.deepEqual(new Float32Array(b.download(d1).buffer), want1);
  // download of the strided view compacts it the same way
  assert.deepEqual(new Float32Array(b.download(a.narrow(1, 3, 5)).buffer), want1);

  // into a narrowed destination: only that window changes
  const fresh = randomF32(rows * 4, 8);
  const n1 = upload(b, [rows, 4], DTYPES.f32, fresh);
  b.copy(a.narrow(1, 6, 4), n1);
  const got = new Float32Array(b.download(a).buffer);
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) {
      const want = c >= 6 ? fresh[r * 4 + c - 6] : at(r, c);
      assert.equal(got[r * cols + c], want, `element ${r},${c}`);
    }
  }
  // upload into a strided view: the other elements keep their values
  const up = randomF32(rows * 2, 9);
  b.upload(a.narrow(1, 0, 2), bytesOf(up));
  const got2 = new Float32Array(b.download(a).buffer);
  for (let r = 0; r < rows; r++) {
    assert.deepEqual([...got2.subarray(r * cols, r * cols + 2)], [
      ...up.subarray(r * 2, r * 2 + 2),
    ]);
    assert.deepEqual([...got2.subarray(r * cols + 2, (r + 1) * cols)], [
      ...got.subarray(r * cols + 2, (r + 1) * cols),
    ]);
  }
  // strided to strided with different pitches (10 and 7)
  const c7 = b.empty([rows, 7], DTYPES.f32);
  b.fill(c7, -1);
  b.copy(c7.narrow(1, 1, 5), a.narrow(1, 3, 5));
  const got3 = new Float32Array(b.download(c7).buffer);
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < 7; c++) {
      const want = c >= 1 && c < 6 ? got2[r * cols + c + 2] : -1;
      assert.equal(got3[r * 7 + c], want, `pitch 7 element ${r},${c}`);
    }
  }
});

wasmTest("casts to and from narrowed views", (b) => {
  const rows = 5, cols = 12;
  const { f32, bf16 } = exactBf16(rows * cols, 11);
  const xb = upload(b, [rows, cols], DTYPES.bf16, bf16);
  // bf16 columns 4..9 -> contiguous f32: exact, so the expected values are the f32 inputs
  const out = b.empty([rows, 6], DTYPES.f32);
  b.copy(out, xb.narrow(1, 4, 6));
  const want = new Float32Array(rows * 6);
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < 6; c++) want[r * 6 + c] = f32[r * cols + c + 4];
  }
  assert.deepEqual(new Float32Array(b.download(out).buffer), want);
  // contiguous f32 -> bf16 columns 0..5 of a strided destination; the rest stays
  const yb = upload(b, [rows, cols], DTYPES.bf16, new Uint16Array(rows * cols).fill(0x7777));
  b.copy(yb.narrow(1, 0, 6), out);
  const got = new Uint16Array(b.download(yb).buffer);
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) {
      const w = c < 6 ? bf16[r * cols + c + 4] : 0x7777;
      assert.equal(got[r * cols + c], w, `element ${r},${c}`);
    }
  }
  // strided -> strided with a cast (pitch 12 bf16 to pitch 8 f32), rows 1..3 only
  const zf = upload(b, [rows, 8], DTYPES.f32, new Float32Array(rows * 8).fill(9));
  b.copy(zf.narrow(0, 1, 3).narrow(1, 2, 6), xb.narrow(0, 1, 3).narrow(1, 4, 6));
  const gz = new Float32Array(b.download(zf).buffer);
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < 8; c++) {
      const inside = r >= 1 && r < 4 && c >= 2 && c < 8;
      assert.equal(gz[r * 8 + c], inside ? f32[r * cols + c + 2] : 9, `element ${r},${c}`);
    }
  }
});

// ---------------------------------------------------------------------- unaligned offsets

wasmTest("kernels at element offsets 1..3 give what they give at offset 0", (b) => {
  for (const n of [1, 7, 4097, 2 ** 20 + 3]) {
    const { f32, bf16 } = exactBf16(n, n);
    const ref = upload(b, [n], DTYPES.bf16, bf16);
    const refQ = b.empty([n], DTYPES.f8_e4m3fn), refS = b.empty([1], DTYPES.f32);
    b.quantizeFp8(refQ, refS, ref, "tensor", true);
    const refI = b.empty([1, n], DTYPES.i8), refIS = b.empty([1], DTYPES.f32);
    b.quantizeInt8(refI, refIS, ref.reshape([1, n]));
    const wantQ = b.download(refQ), wantS = b.download(refS);
    const wantI = b.download(refI), wantIS = b.download(refIS);
    let absmax = 0;
    for (const v of f32) absmax = Math.max(absmax, Math.abs(v));
    for (const off of [1, 2, 3]) {
      const what = `n=${n} offset ${off}`;
      const sb = b.alloc((n + 4) * 2), sf = b.alloc((n + 4) * 4), sq = b.alloc(n + 4);
      const sb2 = b.alloc((n + 4) * 2);
      const xb = new Tensor([n], DTYPES.bf16, sb, off);
      const xf = new Tensor([n], DTYPES.f32, sf, 3 - off + 1);
      const q = new Tensor([n], DTYPES.f8_e4m3fn, sq, off);
      b.upload(xb, bytesOf(bf16));
      b.copy(xf, xb); // cast at two different misalignments
      assert.deepEqual(b.download(xf), bytesOf(f32), `${what}: bf16 -> f32`);
      const back = new Tensor([n], DTYPES.bf16, sb2, (off + 1) % 4);
      b.copy(back, xf);
      assert.deepEqual(b.download(back), bytesOf(bf16), `${what}: f32 -> bf16`);
      b.copy(xb, back); // plain copy between two misalignments
      assert.deepEqual(b.download(xb), bytesOf(bf16), `${what}: copy`);
      assert.equal(b.absmax(xb), absmax, `${what}: absmax`);
      assert.equal(b.absmax(xf), absmax, `${what}: absmax f32`);
      assert.equal(b.countNonFinite(xb), 0, `${what}: countNonFinite`);
      const s = b.empty([1], DTYPES.f32);
      b.quantizeFp8(q, s, xb, "tensor", true);
      assert.deepEqual(b.download(q), wantQ, `${what}: fp8 q`);
      assert.deepEqual(b.download(s), wantS, `${what}: fp8 scale`);
      const qi = new Tensor([1, n], DTYPES.i8, sq, off), si = b.empty([1], DTYPES.f32);
      b.quantizeInt8(qi, si, xf.reshape([1, n]));
      assert.deepEqual(b.download(qi), wantI, `${what}: int8 q`);
      assert.deepEqual(b.download(si), wantIS, `${what}: int8 scale`);
      for (const st of [sb, sb2, sf, sq, s.storage!, si.storage!]) b.free(st);
    }
    for (const t of [ref, refQ, refS, refI, refIS]) b.free(t.storage!);
  }
});

// --------------------------------------------------------------------------- memory growth

wasmTest("memory growth keeps earlier tensors, pointers and views (the memory is shared)", (b) => {
  const first = upload(b, [1000], DTYPES.f32, randomF32(1000, 3));
  const before = b.download(first);
  const ptr = first.ptr;
  const view = wasmView(b, first);
  assert.deepEqual(new Uint8Array(view), before);
  const initial = view.buffer.byteLength;
  // Far more than the initial memory: the memory must grow (several times).
  const big: Tensor[] = [];
  for (let i = 0; i < 4; i++) {
    const t = b.empty([32 * 1024 * 1024], DTYPES.u8);
    b.fill(t, i + 1);
    big.push(t);
  }
  const now = wasmView(b, first);
  assert.ok(now.buffer.byteLength >= initial + 4 * 32 * 1024 * 1024 - 2 ** 24, "memory grew");
  assert.equal(view.byteLength, 4000, "a view made before growth keeps its length");
  assert.deepEqual(new Uint8Array(view), before, "and its bytes");
  assert.equal(first.ptr, ptr, "pointers are stable across growth");
  assert.deepEqual(b.download(first), before);
  assert.deepEqual(new Uint8Array(now), before);
  for (let i = 0; i < 4; i++) {
    const v = wasmView(b, big[i]);
    assert.equal(v[0], i + 1);
    assert.equal(v[v.length - 1], i + 1);
  }
  // A view is a live window: writes through it are what the kernels see.
  now.set(bytesOf(new Float32Array([-7.5])), 4 * 999);
  assert.equal(b.absmax(first), 7.5);
});

wasmTest("pointers past 4 GiB work (64-bit offsets), one allocation may exceed 4 GiB", (b) => {
  // Growth reserves address space rather than copying, and untouched pages cost nothing.
  const pad = b.alloc(2 ** 32 + 2 ** 20);
  const t = upload(b, [3, 4], DTYPES.bf16, exactBf16(12, 5).bf16);
  assert.ok(t.ptr >= 2 ** 32, `pointer ${t.ptr} is above 4 GiB`);
  const f = b.empty([3, 4], DTYPES.f32);
  b.copy(f, t);
  assert.ok(f.ptr >= 2 ** 32);
  assert.deepEqual(b.download(f), bytesOf(exactBf16(12, 5).f32));
  assert.equal(wasmView(b, f).byteLength, 48);
  // A kernel split across threads above 4 GiB: quantize 2 MiB of bf16 there.
  const n = 2 ** 20;
  const x = upload(b, [n], DTYPES.bf16, exactBf16(n, 6).bf16);
  const q = b.empty([n], DTYPES.f8_e4m3fn);
  const s = b.empty([1], DTYPES.f32);
  b.quantizeFp8(q, s, x, "tensor", true);
  assert.ok(x.ptr > 2 ** 32 && q.ptr > 2 ** 32);
  assert.equal(new Float32Array(b.download(s).buffer)[0], Math.fround(b.absmax(x) / 448));
  b.free(pad);
  // Freed space is reused: the same request fits again.
  b.free(b.alloc(2 ** 32 + 2 ** 20));
});

// -------------------------------------------------------------------------------- fill

wasmTest("fill: each element size, integers, and floats rounded like the casts", async (b) => {
  const n = 1031;
  const cases: [DType, number, (dv: DataView, i: number) => number | bigint, number | bigint][] = [
    [DTYPES.f32, 1.5, (d, i) => d.getFloat32(4 * i, true), 1.5],
    [DTYPES.i8, -3, (d, i) => d.getInt8(i), -3],
    [DTYPES.u8, 200, (d, i) => d.getUint8(i), 200],
    [DTYPES.bool, 1, (d, i) => d.getUint8(i), 1],
    [DTYPES.i32, -123456, (d, i) => d.getInt32(4 * i, true), -123456],
    [DTYPES.i64, -2, (d, i) => d.getBigInt64(8 * i, true), -2n],
    [DTYPES.i64, 2 ** 40 + 5, (d, i) => d.getBigInt64(8 * i, true), 2n ** 40n + 5n],
    // bf16/f16 of 0.1: the f32 value rounded to nearest even, computed here from its bits
    [DTYPES.bf16, 0.1, (d, i) => d.getUint16(2 * i, true), bf16Bits(0.1)],
    [DTYPES.f16, 0.5, (d, i) => d.getUint16(2 * i, true), await patternOf("f16", 0.5)],
    [DTYPES.f8_e4m3fn, 1, (d, i) => d.getUint8(i), await patternOf("e4m3fn", 1)],
    // saturates to -448
    [DTYPES.f8_e4m3fn, -1e6, (d, i) => d.getUint8(i), await patternOf("e4m3fn", -448)],
  ];
  for (const [dt, value, get, want] of cases) {
    const t = b.empty([n], dt);
    b.fill(t, value);
    const d = new DataView(b.download(t).buffer);
    for (let i = 0; i < n; i++) assert.equal(get(d, i), want, `${dt.name} fill ${value} at ${i}`);
  }
});

/** The f16 / e4m3fn bit pattern of an exactly representable value, from the reference table. */
async function patternOf(format: "f16" | "e4m3fn", value: number): Promise<number> {
  const casts = await loadSafetensors(
    new URL("../../shared/fixtures/vectors/casts.safetensors", import.meta.url).pathname,
  );
  const bits = casts.get(format === "f16" ? "f16_bits" : "e4m3fn_all")!;
  const vals = casts.get(format === "f16" ? "f16_to_f32" : "e4m3fn_all_to_f32")!;
  const v = new Float32Array(vals.data.slice().buffer);
  const i = v.findIndex((x) => x === value && !Object.is(x, -0));
  assert.ok(i >= 0, `${value} is in the ${format} table`);
  const d = new DataView(bits.data.buffer, bits.data.byteOffset, bits.data.byteLength);
  return format === "f16" ? d.getUint16(2 * i, true) : d.getUint8(i);
}

function bf16Bits(x: number): number {
  const u = new Uint32Array(new Float32Array([x]).buffer)[0];
  return (u + 0x7fff + ((u >>> 16) & 1)) >>> 16;
}

// ------------------------------------------------------------- absmax and non-finite counts

wasmTest("absmax and countNonFinite against values computed here", (b) => {
  const n = 1_000_003;
  const f32 = randomF32(n, 21, 3);
  let max = 0;
  for (let i = 0; i < n; i++) max = Math.max(max, Math.abs(f32[i]));
  // a negative extreme far from the start, so the sign is ignored and the tail loop is used
  f32[n - 2] = -(max * 2);
  const x = upload(b, [n], DTYPES.f32, f32);
  assert.equal(b.absmax(x), Math.fround(max * 2));
  assert.equal(b.countNonFinite(x), 0);
  for (const [i, v] of [[5, Infinity], [n - 1, -Infinity]]) {
    b.upload(x.narrow(0, i, 1), bytesOf(new Float32Array([v])));
  }
  assert.equal(b.absmax(x), Infinity);
  assert.equal(b.countNonFinite(x), 2);
  b.upload(x.narrow(0, 777_777, 1), bytesOf(new Float32Array([NaN])));
  assert.ok(Number.isNaN(b.absmax(x)));
  assert.equal(b.countNonFinite(x), 3);

  // the same through every floating dtype: cast down, then compare with the answer for the
  // values as they arrive in that dtype (read back through a cast to f32)
  for (const dt of [DTYPES.bf16, DTYPES.f16, DTYPES.f8_e4m3fn, DTYPES.f8_e5m2]) {
    const small = upload(b, [n], DTYPES.f32, randomF32(n, 22, 3));
    const y = b.empty([n], dt);
    b.copy(y, small);
    const back = b.empty([n], DTYPES.f32);
    b.copy(back, y);
    const vals = new Float32Array(b.download(back).buffer);
    let m = 0;
    for (const v of vals) m = Math.max(m, Math.abs(v));
    assert.equal(b.absmax(y), m, `${dt.name} absmax`);
    assert.equal(b.countNonFinite(y), 0, `${dt.name} finite`);
  }
  // -0 only: absmax is +0
  const z = upload(b, [9], DTYPES.f32, new Float32Array(9).fill(-0));
  assert.ok(Object.is(b.absmax(z), 0));
  // integer tensors are always finite
  const ints = upload(b, [4], DTYPES.i32, new Int32Array([0x7f800000, -1, 0x7fc00000, 5]));
  assert.equal(b.countNonFinite(ints), 0);
});

wasmTest("countNonFinite and absmax on random bit patterns of every floating dtype", (b) => {
  // Random bits hit NaN and Inf patterns often in the 8-bit formats, rarely in the others.
  const n = 200_003;
  const formats: [DType, number, (bits: number) => number][] = [
    // [dtype, bits per element, |x| as a number or NaN]
    [DTYPES.bf16, 16, (h) => Math.abs(new Float32Array(new Uint32Array([h << 16]).buffer)[0])],
    [DTYPES.f16, 16, (h) => {
      const e = (h >> 10) & 31, m = h & 1023;
      return e === 31
        ? (m ? NaN : Infinity)
        : e === 0
        ? m * 2 ** -24
        : (1 + m / 1024) * 2 ** (e - 15);
    }],
    [DTYPES.f8_e4m3fn, 8, (q) => {
      const e = (q >> 3) & 15, m = q & 7;
      return (q & 127) === 127 ? NaN : e === 0 ? m * 2 ** -9 : (1 + m / 8) * 2 ** (e - 7);
    }],
    [DTYPES.f8_e5m2, 8, (q) => {
      const e = (q >> 2) & 31, m = q & 3;
      return e === 31 ? (m ? NaN : Infinity) : e === 0 ? m * 2 ** -16 : (1 + m / 4) * 2 ** (e - 15);
    }],
  ];
  for (const [dt, width, value] of formats) {
    for (const density of [0, 1]) {
      const bits = width === 16 ? new Uint16Array(n) : new Uint8Array(n);
      let s = 99 + density;
      let count = 0, max = 0, nan = false;
      for (let i = 0; i < n; i++) {
        s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
        let v = s >>> (32 - width);
        // density 0: clear the top exponent bit so that every value is finite
        if (density === 0) v &= width === 16 ? 0xbfff : 0xbf;
        bits[i] = v;
        const x = value(v);
        if (!Number.isFinite(x)) count++;
        if (Number.isNaN(x)) nan = true;
        else max = Math.max(max, x);
      }
      const t = upload(b, [n], dt, bits);
      assert.equal(b.countNonFinite(t), count, `${dt.name} density ${density}: count`);
      const got = b.absmax(t);
      if (nan) assert.ok(Number.isNaN(got), `${dt.name}: NaN absmax`);
      else assert.equal(got, max, `${dt.name} density ${density}: absmax`);
      b.free(t.storage!);
    }
  }
});

Deno.test("wasm heap: live ranges never overlap, stay aligned and within the limit; freed space is reused", () => {
  fc.assert(
    fc.property(
      fc.array(fc.tuple(fc.boolean(), fc.integer({ min: 1, max: 5000 }), fc.nat()), {
        maxLength: 200,
      }),
      (ops) => {
        let size = 4096;
        const heap = new WasmHeap(1000, 200_000, size, (b) => {
          assert.ok(b > size && b <= 200_000, `growth to ${b}`);
          size = b;
        });
        const live = new Map<number, number>();
        for (const [alloc, bytes, pick] of ops) {
          if (alloc || live.size === 0) {
            const p = heap.alloc(bytes);
            if (p === 0) {
              // Refused only when no gap between live ranges (or above them) fits.
              const need = Math.ceil(bytes / HEAP_ALIGN) * HEAP_ALIGN;
              const ends = [...live].sort(([a], [b]) => a - b);
              let at = 1024;
              for (const [q, n] of ends) {
                assert.ok(q - at < need, `a gap of ${q - at} at ${at} fits ${bytes}`);
                at = q + Math.ceil(n / HEAP_ALIGN) * HEAP_ALIGN;
              }
              assert.ok(200_000 - at < need, `the top fits ${bytes}`);
              continue;
            }
            assert.equal(p % HEAP_ALIGN, 0);
            assert.ok(p >= 1000 && p + bytes <= size);
            for (const [q, n] of live) assert.ok(p + bytes <= q || q + n <= p, "overlap");
            live.set(p, bytes);
          } else {
            const p = [...live.keys()][pick % live.size];
            heap.free(p);
            live.delete(p);
          }
        }
        for (const p of [...live.keys()]) heap.free(p);
        assert.equal(heap.inUse, 0);
        // Everything merged back: one allocation of all the space used so far fits again.
        const all = heap.alloc(size - 1024);
        assert.equal(all, 1024);
      },
    ),
  );
});

Deno.test("wasm: fp8 per tensor over long 16-bit runs (the table path) gives the plain loop's bytes for every bit pattern", async () => {
  // Runs of 2^17 elements and more are quantized through a 65536-entry table built with the
  // same lw_e4m3_quant; a run of 65536 takes the plain loop. Every bf16 / f16 bit pattern
  // (NaN, Inf, -0, subnormals) three times over, in three orders, against both, at scales
  // with every special case the division has.
  const b = await openWasmBackend({ threads: 1 });
  try {
    const n = 65536, copies = 3;
    const bits = new Uint16Array(copies * n);
    for (let c = 0; c < copies; c++) {
      for (let i = 0; i < n; i++) bits[c * n + i] = (i * (2 * c + 1) + 12345 * c) & 0xFFFF;
    }
    const scales = [1, 0.37, 1 / 229376, 3e-39, 1e30, -2.5, 0, -0, Infinity, NaN];
    for (const dt of [DTYPES.bf16, DTYPES.f16]) {
      const x = b.empty([copies, n], dt);
      b.upload(x, new Uint8Array(bits.buffer));
      const sc = b.empty([1], DTYPES.f32);
      for (const s of scales) {
        b.upload(sc, new Uint8Array(new Float32Array([s]).buffer));
        const whole = b.empty([copies, n], DTYPES.f8_e4m3fn);
        b.quantizeFp8(whole, sc, x, "tensor", false);
        const got = b.download(whole);
        for (let c = 0; c < copies; c++) {
          const part = b.empty([1, n], DTYPES.f8_e4m3fn);
          b.quantizeFp8(part, sc, x.narrow(0, c, 1), "tensor", false);
          const want = b.download(part);
          const at = want.findIndex((v, i) => v !== got[c * n + i]);
          assert.equal(at, -1, `${dt.name} scale ${s}: bits 0x${bits[c * n + at]?.toString(16)}`);
          b.free(part.storage!);
        }
        // A run that starts at an odd element and ends past a multiple of eight: the table's
        // lookup takes eight elements at a time, then one by one.
        const flat = new Tensor([copies * n], dt, x.storage!, 0);
        const len = copies * n - 10;
        const odd = b.empty([len], DTYPES.f8_e4m3fn);
        b.quantizeFp8(odd, sc, flat.narrow(0, 3, len), "tensor", false);
        const oddGot = b.download(odd);
        const oddAt = oddGot.findIndex((v, i) => v !== got[3 + i]);
        assert.equal(oddAt, -1, `${dt.name} scale ${s}, odd run: element ${oddAt}`);
        b.free(odd.storage!);
        b.free(whole.storage!);
      }
      // Dynamic: the scale comes from the absmax, then the same table.
      const q = b.empty([copies, n], DTYPES.f8_e4m3fn);
      const finite = b.empty([copies, n], dt);
      const fin = bits.map((v) => ((v & (dt === DTYPES.bf16 ? 0x7F80 : 0x7C00)) ===
          (dt === DTYPES.bf16 ? 0x7F80 : 0x7C00)
        ? v & 0x8000
        : v)
      );
      b.upload(finite, new Uint8Array(fin.buffer));
      b.quantizeFp8(q, sc, finite, "tensor", true);
      const got = b.download(q);
      const part = b.empty([1, n], DTYPES.f8_e4m3fn);
      for (let c = 0; c < copies; c++) {
        b.quantizeFp8(part, sc, finite.narrow(0, c, 1), "tensor", false);
        const want = b.download(part);
        assert.equal(want.findIndex((v, i) => v !== got[c * n + i]), -1, `${dt.name} dynamic`);
      }
    }
  } finally {
    b.close();
  }
});

/**
 * WebAssembly kernels on several threads: the split of a call into parts (pure), every kernel
 * giving the same bytes on 1, 2, 3 and 4 threads on inputs with NaN, Inf and -0, the parts
 * really being run as parts, the thread count from the environment, and a backend left open
 * not keeping the process alive.
 */
import assert from "node:assert/strict";
import fc from "fast-check";
import type { Backend, Granularity } from "../src/backend/backend.ts";
import { openWasmBackend, wasmThreadCount, wasmThreads } from "../src/backend/wasm.ts";
import {
  instantiateKernels,
  numberExports,
  readModuleInfo,
  sharedMemory64,
  wasmGlobals,
} from "../src/backend/wasm_abi.ts";
import {
  partCount,
  splitKernels,
  splitRange,
  type ThreadRunner,
} from "../src/backend/wasm_split.ts";
import { BackendError } from "../src/errors.ts";
import { type DType, DTYPES } from "../src/tensor/dtype.ts";
import type { Tensor } from "../src/tensor/tensor.ts";
import { maxParts, WasmPool, WORKER_STACK_BYTES } from "../src/backend/wasm_pool.ts";
import { kernelsWasmBytes } from "../wasm/kernels_wasm.ts";

Deno.test("splitRange covers [0, n) in order with aligned starts, at most `parts` pieces", () => {
  fc.assert(
    fc.property(
      fc.integer({ min: 0, max: 1e6 }),
      fc.integer({ min: 1, max: 17 }),
      fc.integer({ min: 1, max: 300 }),
      (n, parts, unit) => {
        const r = splitRange(n, parts, unit);
        assert.ok(r.length <= parts);
        let at = 0;
        for (const [a, b] of r) {
          assert.equal(a, at);
          assert.ok(b > a);
          assert.equal(a % unit, 0);
          at = b;
        }
        assert.equal(at, n === 0 ? 0 : n);
      },
    ),
  );
  assert.deepEqual(splitRange(10, 3), [[0, 3], [3, 6], [6, 10]]);
  assert.deepEqual(splitRange(300, 4, 128), [[0, 128], [128, 256], [256, 300]]);
  assert.equal(partCount(1000, 4, 300), 3);
  assert.equal(partCount(100, 4, 300), 1);
  assert.equal(partCount(10 ** 9, 1, 0), 1);
});

/** Seeded bits for `dtype` with NaN, +-Inf and -0 sprinkled in (floating dtypes). */
function randomBits(n: number, dtype: DType, seed: number): Uint8Array {
  const out = new Uint8Array(n * dtype.size);
  const dv = new DataView(out.buffer);
  let s = seed >>> 0;
  const next = () => (s = (Math.imul(s, 1664525) + 1013904223) >>> 0);
  const f = new Float32Array(1);
  const u = new Uint32Array(f.buffer);
  for (let i = 0; i < n; i++) {
    f[0] = ((next() >>> 8) / 16777216 - 0.5) * 2 ** ((next() % 24) - 8);
    const special = next() % 997;
    if (special === 0) u[0] = 0x7fc00000;
    else if (special === 1) u[0] = 0xff800000;
    else if (special === 2) u[0] = 0x80000000;
    if (dtype.size === 4) dv.setUint32(4 * i, u[0], true);
    else if (dtype.name === "bf16") dv.setUint16(2 * i, u[0] >>> 16, true);
    else if (dtype.size === 2) dv.setUint16(2 * i, next() & 0xffff, true);
    else out[i] = next() & 0xff;
  }
  return out;
}

const ROWS = 300, COLS = 520; // not multiples of 128: the last band and block are partial
const FLOATS = [DTYPES.f32, DTYPES.f16, DTYPES.bf16, DTYPES.f8_e4m3fn, DTYPES.f8_e5m2];
const QUANT_IN = [DTYPES.f32, DTYPES.f16, DTYPES.bf16];
const GRANS: Granularity[] = ["tensor", "row", "block128"];

/** Every kernel's output bytes on `b`, by case name, for inputs `finite` (no NaN) or not. */
function outputs(b: Backend, finite: boolean): Map<string, Uint8Array> {
  const out = new Map<string, Uint8Array>();
  const put = (dtype: DType, seed: number, shape = [ROWS, COLS]) => {
    const t = b.empty(shape, dtype);
    let bits = randomBits(ROWS * COLS, dtype, seed).subarray(0, t.nbytes);
    if (finite && dtype.size === 4) {
      const f = new Float32Array(bits.slice().buffer).map((x) => (Number.isFinite(x) ? x : 1.5));
      bits = new Uint8Array(f.buffer);
    }
    b.upload(t, bits);
    return t;
  };
  for (const src of FLOATS) {
    const x = put(src, 11 + src.code);
    out.set(`absmax ${src.name}`, new Uint8Array(new Float32Array([b.absmax(x)]).buffer));
    out.set(
      `nonfinite ${src.name}`,
      new Uint8Array(new Float64Array([b.countNonFinite(x)]).buffer),
    );
    for (const dst of FLOATS) {
      const y = b.empty([ROWS, COLS], dst);
      b.copy(y, x);
      out.set(`cast ${src.name}->${dst.name}`, b.download(y));
      // A strided (narrowed) source and destination: the row split.
      const z = b.empty([ROWS, 200], dst);
      b.copy(z, x.narrow(1, 17, 200));
      out.set(`cast narrow ${src.name}->${dst.name}`, b.download(z));
    }
  }
  for (const src of QUANT_IN) {
    const x = put(src, 31 + src.code);
    for (const g of GRANS) {
      const q = b.empty([ROWS, COLS], DTYPES.f8_e4m3fn);
      const n = g === "tensor"
        ? 1
        : g === "row"
        ? ROWS
        : Math.ceil(ROWS / 128) * Math.ceil(COLS / 128);
      const sc = b.empty([n], DTYPES.f32);
      b.quantizeFp8(q, sc, x, g, true);
      out.set(`fp8 ${g} ${src.name} q`, b.download(q));
      out.set(`fp8 ${g} ${src.name} scale`, b.download(sc));
      b.quantizeFp8(q, sc, x, g, false);
      out.set(`fp8 static ${g} ${src.name} q`, b.download(q));
      for (const dst of QUANT_IN) {
        const d = b.empty([ROWS, COLS], dst);
        b.dequantizeFp8(d, q, sc, g);
        out.set(`dequant ${g} ${dst.name}`, b.download(d));
      }
    }
    const qi = b.empty([ROWS, COLS], DTYPES.i8);
    const si = b.empty([ROWS], DTYPES.f32);
    b.quantizeInt8(qi, si, x);
    out.set(`int8 ${src.name} q`, b.download(qi));
    out.set(`int8 ${src.name} scale`, b.download(si));
  }
  for (const dt of [DTYPES.u8, DTYPES.bf16, DTYPES.f32, DTYPES.i64]) {
    const t = b.empty([ROWS, COLS], dt);
    b.fill(t, 3);
    out.set(`fill ${dt.name}`, b.download(t));
  }
  return out;
}

for (const finite of [false, true]) {
  Deno.test(
    `wasm threads: every kernel gives the same bytes on 1, 2, 3 and 4 threads (${
      finite ? "finite inputs" : "with NaN, Inf and -0"
    })`,
    async () => {
      const ref = await openWasmBackend({ threads: 1 });
      const want = outputs(ref, finite);
      ref.close();
      for (const threads of [2, 3, 4]) {
        const b = await openWasmBackend({ threads, minBytesPerThread: 0 });
        try {
          assert.equal(wasmThreadCount(b), threads);
          const got = outputs(b, finite);
          assert.equal(got.size, want.size);
          for (const [name, bytes] of want) {
            assert.deepEqual(got.get(name), bytes, `${name} on ${threads} threads`);
          }
        } finally {
          b.close();
        }
      }
    },
  );
}

/** splitKernels over one instance, running each part in turn and recording it. */
async function recordingRunner(threads: number) {
  const bytes = kernelsWasmBytes();
  const { signatures } = readModuleInfo(bytes);
  const memory = sharedMemory64(2 ** 24, 2 ** 26);
  const inst = instantiateKernels(await WebAssembly.compile(bytes), memory);
  const fns = numberExports(inst, signatures);
  let top = Math.ceil(wasmGlobals(inst).heapBase / 64) * 64;
  const alloc = (n: number) => ((top += Math.ceil(n / 64) * 64), top - Math.ceil(n / 64) * 64);
  const log: { fn: string; parts: number }[] = [];
  const runner: ThreadRunner = {
    threads,
    partials: alloc(16 * (threads + 2)),
    call: (fn, args) => (log.push({ fn, parts: 1 }), fns[fn](...args)),
    run: (fn, calls) => {
      log.push({ fn, parts: calls.length });
      let st = 0;
      for (const c of calls) st ||= fns[fn](...c);
      return st;
    },
    view: () => new DataView(memory.buffer),
  };
  return { fns, runner, alloc, memory, log };
}

Deno.test("wasm threads: a big call runs as one part per thread, a small one whole", async () => {
  const { fns, runner, alloc, memory, log } = await recordingRunner(4);
  const k = splitKernels(runner, { minBytesPerThread: 4096 });
  const rows = 256, cols = 1000, n = rows * cols;
  const x = alloc(2 * n), q1 = alloc(n), q4 = alloc(n), s1 = alloc(4), s4 = alloc(4);
  new Uint8Array(memory.buffer, x, 2 * n).set(randomBits(n, DTYPES.bf16, 5));
  assert.equal(fns.lw_quant_fp8(0, q1, s1, x, DTYPES.bf16.code, rows, cols, 0, 1), 0);
  assert.equal(k.lw_quant_fp8(0, q4, s4, x, DTYPES.bf16.code, rows, cols, 0, 1), 0);
  // absmax parts, the scale from the combined absmax, then the quantization parts.
  assert.deepEqual(log, [
    { fn: "lw_absmax", parts: 4 },
    { fn: "lw_quant_fp8", parts: 1 },
    { fn: "lw_quant_fp8", parts: 4 },
  ]);
  const m = new Uint8Array(memory.buffer);
  assert.deepEqual(m.slice(q4, q4 + n), m.slice(q1, q1 + n));
  assert.deepEqual(m.slice(s4, s4 + 4), m.slice(s1, s1 + 4));
  log.length = 0;
  assert.equal(k.lw_quant_fp8(0, q4, s4, x, DTYPES.bf16.code, 1, 1000, 0, 1), 0);
  assert.deepEqual(log, [{ fn: "lw_quant_fp8", parts: 1 }], "2000 bytes stay on the caller");
  log.length = 0;
  // Block-128 bands: 256 rows make 2 parts of 128 rows, however many threads.
  assert.equal(k.lw_quant_fp8(0, q4, s4, x, DTYPES.bf16.code, rows, cols, 2, 1), 0);
  assert.deepEqual(log, [{ fn: "lw_quant_fp8", parts: 2 }]);
});

Deno.test("wasm threads: LAYERWISE_WASM_THREADS sets the count; a bad value is BAD_OPTION", () => {
  const old = Deno.env.get("LAYERWISE_WASM_THREADS");
  try {
    Deno.env.set("LAYERWISE_WASM_THREADS", "3");
    assert.equal(wasmThreads(), 3);
    assert.equal(wasmThreads(1), 1, "the option wins");
    Deno.env.delete("LAYERWISE_WASM_THREADS");
    assert.equal(wasmThreads(), navigator.hardwareConcurrency);
    for (const bad of ["0", "two", "1.5", "9999"]) {
      Deno.env.set("LAYERWISE_WASM_THREADS", bad);
      assert.throws(() => wasmThreads(), (e: unknown) => {
        assert.ok(e instanceof BackendError);
        assert.equal(e.code, "BAD_OPTION");
        assert.match(e.message, /LAYERWISE_WASM_THREADS must be a whole number of threads/);
        return true;
      });
    }
  } finally {
    if (old === undefined) Deno.env.delete("LAYERWISE_WASM_THREADS");
    else Deno.env.set("LAYERWISE_WASM_THREADS", old);
  }
});

Deno.test("wasm threads: a backend never closed does not keep the process alive", async () => {
  const url = new URL("../src/backend/wasm.ts", import.meta.url).href;
  const code = `import { openWasmBackend } from ${JSON.stringify(url)};
const b = await openWasmBackend({ threads: 3, minBytesPerThread: 0 });
const t = b.empty([4096], (await import(${
    JSON.stringify(new URL("../src/tensor/dtype.ts", import.meta.url).href)
  })).DTYPES.f32);
b.fill(t, -2);
console.log(b.absmax(t));`;
  const r = await new Deno.Command(Deno.execPath(), {
    args: ["eval", "--ext=ts", code],
    stdout: "piped",
    stderr: "piped",
    signal: AbortSignal.timeout(120_000),
  }).output();
  assert.equal(new TextDecoder().decode(r.stdout).trim(), "2", new TextDecoder().decode(r.stderr));
  assert.equal(r.code, 0, "the process ended by itself");
});

Deno.test("wasm threads: tensors used by the threads stay intact across growth", async () => {
  const b = await openWasmBackend({ threads: 2, minBytesPerThread: 0 });
  try {
    const ts: Tensor[] = [];
    for (let i = 0; i < 6; i++) {
      const t = b.empty([4 * 2 ** 20], DTYPES.f32);
      b.fill(t, -(i + 1));
      ts.push(t);
    }
    ts.forEach((t, i) => assert.equal(b.absmax(t), i + 1));
  } finally {
    b.close();
  }
});

Deno.test("wasm pool: more parts than threads all run, a trap on any part is WASM_TRAP after every part is done, and the pool goes on", async () => {
  const bytes = kernelsWasmBytes();
  const module = await WebAssembly.compile(bytes);
  const { signatures, memoryMinBytes } = readModuleInfo(bytes);
  const memory = sharedMemory64(Math.max(memoryMinBytes, 2 ** 24), 2 ** 26);
  const inst = instantiateKernels(module, memory);
  const local = numberExports(inst, signatures);
  let top = Math.ceil(wasmGlobals(inst).heapBase / 64) * 64;
  const alloc = (n: number) => ((top += Math.ceil(n / 64) * 64), top - Math.ceil(n / 64) * 64);
  const threads = 3;
  const stacks = [1, 2].map(() => alloc(WORKER_STACK_BYTES) + WORKER_STACK_BYTES);
  const pool = await WasmPool.start(
    threads,
    { module, memory, signatures },
    local,
    stacks,
    alloc(16 * (maxParts(threads) + 2)),
    alloc(65536),
  );
  try {
    assert.equal(pool.maxParts, maxParts(threads));
    const parts = pool.maxParts, piece = 4096;
    const src = alloc(parts * piece), dst = alloc(parts * piece);
    const m = () => new Uint8Array(memory.buffer);
    m().set(randomBits(parts * piece, DTYPES.u8, 9), src);
    const copies = (bad: number) =>
      Array.from({ length: parts }, (_, k) => [
        0,
        dst + k * piece,
        // Far past the memory: the copy traps.
        k === bad ? 2 ** 40 : src + k * piece,
        piece,
      ]);
    assert.equal(pool.run("lw_copy", copies(-1)), 0);
    assert.deepEqual(m().slice(dst, dst + parts * piece), m().slice(src, src + parts * piece));
    for (const bad of [0, parts - 1]) {
      m().fill(0, dst, dst + parts * piece);
      assert.throws(() => pool.run("lw_copy", copies(bad)), (e: unknown) => {
        assert.ok(e instanceof BackendError && e.code === "WASM_TRAP", String(e));
        assert.match(e.message, /^wasm lw_copy on 3 threads: /);
        return true;
      });
      // Every other part ran before the call returned.
      for (let k = 0; k < parts; k++) {
        if (k === bad) continue;
        const at = k * piece;
        assert.deepEqual(
          m().slice(dst + at, dst + at + piece),
          m().slice(src + at, src + at + piece),
          `part ${k} with part ${bad} trapping`,
        );
      }
    }
    // The pool still runs calls, and a status comes back from whichever thread ran the part.
    assert.equal(pool.run("lw_copy", copies(-1).slice(0, 5)), 0);
    assert.throws(() => pool.run("lw_copy", copies(-1).concat(copies(-1))), RangeError);
  } finally {
    pool.close();
  }
});

Deno.test("wasm threads: per-tensor fp8 through the call's shared table gives the plain loop's bytes for every 16-bit pattern", async () => {
  // Split calls fill one lookup table per call (lw_wasm_fp8_table, in parts), derive its rows'
  // rule (lw_wasm_fp8_rows: bf16 inputs whose 16 neighbours share an exponent in the rule's rows
  // are coded 16 at a time) and look their parts up (lw_wasm_fp8_lookup). Every bf16 / f16
  // pattern (NaN, Inf, -0, subnormals) twice: in order, so runs of 16 share an exponent, then
  // scattered; at scales with the division's special cases, static and dynamic. Against the
  // plain loop: one thread quantizing a 65536-element row at a time (too short for a table).
  const one = await openWasmBackend({ threads: 1 });
  const three = await openWasmBackend({ threads: 3, minBytesPerThread: 0 });
  try {
    const n = 65536;
    const bits = new Uint16Array(2 * n);
    for (let i = 0; i < 2 * n; i++) bits[i] = i < n ? i : (i * 40503) & 0xFFFF;
    const scales = [1, 0.37, 2 / 448, 1 / 229376, 3e-39, 1e30, 1.7e38, -2.5, 0, -0, Infinity, NaN];
    for (const dt of [DTYPES.bf16, DTYPES.f16]) {
      // Codes and scale of `input` quantized on b: whole (dynamic when s is null) or row by row.
      const run = (b: Backend, s: number | null, input: Uint16Array, byRow: boolean) => {
        const x = b.empty([2, n], dt);
        b.upload(x, new Uint8Array(input.buffer));
        const sc = b.empty([1], DTYPES.f32);
        if (s !== null) b.upload(sc, new Uint8Array(new Float32Array([s]).buffer));
        const q = b.empty([2, n], DTYPES.f8_e4m3fn);
        if (byRow) {
          for (let r = 0; r < 2; r++) {
            b.quantizeFp8(q.narrow(0, r, 1), sc, x.narrow(0, r, 1), "tensor", false);
          }
        } else b.quantizeFp8(q, sc, x, "tensor", s === null);
        const out = [b.download(q), b.download(sc)];
        for (const t of [x, sc, q]) b.free(t.storage!);
        return out;
      };
      for (const s of scales) {
        const [want] = run(one, s, bits, true), [got] = run(three, s, bits, false);
        const at = want.findIndex((v, i) => v !== got[i]);
        assert.equal(at, -1, `${dt.name} scale ${s}: bits 0x${bits[at]?.toString(16)}`);
      }
      const inf = dt === DTYPES.bf16 ? 0x7F80 : 0x7C00;
      const finite = bits.map((v) => ((v & inf) === inf ? v & 0x8000 : v));
      const [, ws] = run(one, null, finite, false), [gq, gs] = run(three, null, finite, false);
      assert.deepEqual(gs, ws, `${dt.name} dynamic scale`);
      const [wq] = run(one, new Float32Array(ws.buffer, ws.byteOffset, 1)[0], finite, true);
      assert.equal(wq.findIndex((v, i) => v !== gq[i]), -1, `${dt.name} dynamic`);
    }
  } finally {
    one.close();
    three.close();
  }
});

Deno.test("wasm threads: per-tensor fp8 in one call of every thread gives one thread's bytes, whichever threads come and when", async () => {
  // lw_wasm_fp8_tensor: steps (absmax, table, lookups) whose parts any thread takes, the thread
  // finishing a step's last part doing the serial work (the scale, the table's rule) that the
  // others wait for. Six threads on this machine's cores: more threads than cores, so threads
  // start late and waits park in memory.atomic.wait32, the calling thread's too. Every call has
  // another size, so another count of parts; weight-like values (the rule is taken) with a few
  // arbitrary bit patterns (NaN, Inf, subnormals: looked up entry by entry).
  const one = await openWasmBackend({ threads: 1 });
  const six = await openWasmBackend({ threads: 6, minBytesPerThread: 0 });
  const run = (b: Backend, dt: DType, bits: Uint16Array, s: number | null) => {
    const x = b.empty([bits.length], dt);
    b.upload(x, new Uint8Array(bits.buffer));
    const sc = b.empty([1], DTYPES.f32);
    if (s !== null) b.upload(sc, new Uint8Array(new Float32Array([s]).buffer));
    const q = b.empty([bits.length], DTYPES.f8_e4m3fn);
    b.quantizeFp8(q, sc, x, "tensor", s === null);
    const out = [b.download(q), b.download(sc)];
    for (const t of [x, sc, q]) b.free(t.storage!);
    return out;
  };
  try {
    fc.assert(
      fc.property(
        fc.integer({ min: 1, max: 300_000 }),
        fc.constantFrom(DTYPES.bf16, DTYPES.f16),
        fc.boolean(),
        fc.integer({ min: 1, max: 2 ** 31 }),
        (n, dt, dynamic, seed) => {
          const [mshift, bias] = dt === DTYPES.bf16 ? [7, 127] : [10, 15];
          const bits = new Uint16Array(n);
          let r = seed;
          const next = () => (r = (Math.imul(r, 1664525) + 1013904223) >>> 0);
          for (let i = 0; i < n; i++) {
            const v = next();
            bits[i] = v % 500 === 0
              ? next() & 0xFFFF
              : ((v >>> 31) << 15) | ((bias - 12 + (v % 13)) << mshift) |
                (next() & ((1 << mshift) - 1));
          }
          if (dynamic) {
            for (let i = 0; i < n; i++) {
              if (
                ((bits[i] >> mshift) & (dt === DTYPES.bf16 ? 0xFF : 0x1F)) ===
                  (dt === DTYPES.bf16 ? 0xFF : 0x1F)
              ) bits[i] &= 0x8000;
            }
          }
          const s = dynamic ? null : 0.0123;
          const [wq, ws] = run(one, dt, bits, s), [gq, gs] = run(six, dt, bits, s);
          assert.deepEqual(gs, ws, `${dt.name} n=${n} scale`);
          const at = wq.findIndex((v, i) => v !== gq[i]);
          assert.equal(at, -1, `${dt.name} n=${n} dynamic=${dynamic}: element ${at}`);
        },
      ),
      { numRuns: 60 },
    );
  } finally {
    one.close();
    six.close();
  }
});

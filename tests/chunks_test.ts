/**
 * Checkpoint tensors that arrive as row chunks (`rowWindow`): `copyInto` writes and counts only
 * the rows a chunk holds, however the loader narrows it (dimension 0 or 1, ranges the window
 * cuts or misses); reloads and first loads from random row chunks, in order or shuffled, give
 * kernel bytes identical to whole-tensor loads for every quantization scheme and for tensor-
 * parallel ranks of 2 and 4; a chunk sent twice is ignored, a missing one is reported by name,
 * overlapping ones are refused, and rejectNonFinite scans a chunk's own rows. Runs on every
 * available backend.
 */

import assert from "node:assert/strict";
import fc from "fast-check";
import type { Backend } from "../src/backend/backend.ts";
import { BackendError, CheckpointError, ReloadError } from "../src/errors.ts";
import { copyInto, countWrites, select0 } from "../src/nn/slots.ts";
import { QUANT_SCHEMES, type QuantScheme } from "../src/nn/quant_method.ts";
import { isReloading } from "../src/reload/layerwise.ts";
import { loadWeights, reloadLayerwise } from "../src/reload/load.ts";
import { DTYPES } from "../src/tensor/dtype.ts";
import { rowWindow, Tensor } from "../src/tensor/tensor.ts";
import { freeChunks, type HostChunk, randomChunks, streamChunks, uploadChunks } from "./_chunks.ts";
import {
  checkpointFor,
  equalBytes,
  freeModule,
  freshModel,
  kernelBytes,
  kernelLayout,
  randomBf16,
  rng,
  shuffle,
  testBackends,
  TINY,
  type TinyConfig,
  TinyModel,
} from "../testing.ts";

const BACKENDS = await testBackends();

function assertSameBytes(
  got: Map<string, Uint8Array>,
  want: Map<string, Uint8Array>,
  what: string,
) {
  assert.deepEqual([...got.keys()], [...want.keys()], `${what}: tensor names`);
  for (const [n, x] of want) assert.ok(equalBytes(got.get(n)!, x), `${what}: ${n} differs`);
}

/** Rows [r0, r1) of a row-major matrix of `rowBytes`-byte rows. */
function rows(bytes: Uint8Array, rowBytes: number, r0: number, r1: number): Uint8Array {
  return bytes.subarray(r0 * rowBytes, r1 * rowBytes);
}

/** A backend tensor holding `bytes`. */
function upload(b: Backend, shape: number[], bytes: Uint8Array): Tensor {
  const t = b.empty(shape, DTYPES.bf16);
  b.upload(t, bytes);
  return t;
}

// ------------------------------------------------------------------ windowed copyInto

for (const [bn, b] of BACKENDS) {
  Deno.test(`${bn}: a row window has the full shape, holds its rows, and never reaches a backend`, () => {
    const R = 10, C = 6, rb = C * 2;
    const host = randomBf16(rng(1), R * C);
    const chunk = upload(b, [4, C], rows(host, rb, 3, 7));
    try {
      const w = rowWindow(chunk, 3, R);
      assert.deepEqual(w.shape, [R, C]);
      assert.deepEqual(w.window, { start: 3, end: 7 });
      assert.deepEqual(w.rowRange, { start: 3, end: 7 });
      assert.equal(String(w), "bf16[10, 6] rows [3, 7)");
      assert.ok(equalBytes(b.download(w.windowRows()), rows(host, rb, 3, 7)));
      const code = (c: string) => (e: unknown) => e instanceof BackendError && e.code === c;
      assert.throws(() => w.ptr, code("WINDOWED"));
      assert.throws(() => w.reshape([R * C]), code("WINDOWED"));
      assert.throws(() => rowWindow(w, 3, R), code("WINDOWED"));
      assert.throws(() => rowWindow(chunk, 7, R), code("OUT_OF_RANGE"));
      // The same offset without the window reaches before the chunk's storage.
      assert.throws(
        () => new Tensor([R, C], DTYPES.bf16, chunk.storage, w.offset),
        code("OUT_OF_RANGE"),
      );
      // A chunk of every row is the plain chunk.
      const all = rowWindow(chunk, 0, 4);
      assert.equal(all.window, null);
      assert.equal(all.ptr, chunk.ptr);
      // A row it holds can be selected, another cannot.
      assert.ok(equalBytes(b.download(select0(w, 5)), rows(host, rb, 5, 6)));
      assert.throws(() => select0(w, 2), (e) => e instanceof ReloadError && e.code === "WINDOWED");
      // Nothing writes into a window.
      const dst = b.empty([R, C], DTYPES.bf16);
      try {
        assert.throws(
          () => copyInto(b, w, dst),
          (e) => e instanceof ReloadError && e.code === "WINDOWED",
        );
      } finally {
        b.free(dst.storage!);
      }
    } finally {
      b.free(chunk.storage!);
    }
  });

  Deno.test(`${bn}: copyInto writes and counts exactly the window's rows through any loader narrow`, () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 1, max: 12 }),
        fc.integer({ min: 1, max: 7 }),
        fc.integer({ min: 0, max: 1000 }),
        fc.array(fc.tuple(fc.boolean(), fc.nat(), fc.nat()), { maxLength: 2 }),
        (R, C, seed, narrows) => {
          const rand = rng(seed);
          const s = Math.floor(rand() * R);
          const e = s + 1 + Math.floor(rand() * (R - s));
          const host = randomBf16(rand, R * C);
          const chunk = upload(b, [e - s, C], rows(host, C * 2, s, e));
          try {
            // Narrow like a loader (dimension 0: rank rows, or dimension 1: rank columns),
            // tracking which checkpoint row and column each element of the view is.
            let view = rowWindow(chunk, s, R);
            let rowMap = [...Array(R).keys()], colMap = [...Array(C).keys()];
            for (const [dim0, a, bb] of narrows) {
              const size = dim0 ? rowMap.length : colMap.length;
              // Loaders narrow to non-empty ranges; the window may still miss them.
              const start = a % size, len = 1 + bb % (size - start);
              view = view.narrow(dim0 ? 0 : 1, start, len);
              if (dim0) rowMap = rowMap.slice(start, start + len);
              else colMap = colMap.slice(start, start + len);
            }
            const held = rowMap.filter((r) => r >= s && r < e).length;
            const meta = Tensor.meta(view.shape, DTYPES.bf16);
            assert.equal(countWrites(() => copyInto(b, meta, view)), held * colMap.length);
            const dst = b.empty(view.shape, DTYPES.bf16);
            try {
              b.fill(dst, 7);
              const sentinel = b.download(dst);
              copyInto(b, dst, view);
              const got = b.download(dst);
              const want = new Uint8Array(got.length);
              rowMap.forEach((r, i) =>
                colMap.forEach((c, j) => {
                  const at = (i * colMap.length + j) * 2;
                  const inside = r >= s && r < e;
                  want[at] = inside ? host[(r * C + c) * 2] : sentinel[at];
                  want[at + 1] = inside ? host[(r * C + c) * 2 + 1] : sentinel[at + 1];
                })
              );
              assert.ok(equalBytes(got, want), `window [${s}, ${e}) of ${R} rows, ${narrows}`);
            } finally {
              b.free(dst.storage!);
            }
          } finally {
            b.free(chunk.storage!);
          }
        },
      ),
      { numRuns: 200 },
    );
  });

  Deno.test(`${bn}: a window that misses the loader's rows writes and counts nothing`, () => {
    const R = 8, C = 4;
    const chunk = upload(b, [2, C], randomBf16(rng(2), 2 * C));
    const dst = b.empty([3, C], DTYPES.bf16);
    try {
      b.fill(dst, 0);
      const w = rowWindow(chunk, 6, R); // rows [6, 8)
      const rank0 = w.narrow(0, 0, 3); // a loader narrowing to rows [0, 3)
      assert.equal(rank0.window!.start, rank0.window!.end, "an empty window");
      assert.equal(countWrites(() => copyInto(b, Tensor.meta([3, C], DTYPES.bf16), rank0)), 0);
      copyInto(b, dst, rank0);
      assert.ok(b.download(dst).every((x) => x === 0));
      // Shape and dtype are still checked.
      assert.throws(
        () => copyInto(b, b.empty([2, C], DTYPES.bf16), rank0),
        (e) => e instanceof CheckpointError && e.code === "SHAPE_MISMATCH",
      );
    } finally {
      b.free(chunk.storage!);
      b.free(dst.storage!);
    }
  });
}

// ------------------------------------------------------------------ whole models

/** Configurations: tensor-parallel ranks of 1, 2 and 4, dense and mixture of experts. */
function configs(): [string, TinyConfig][] {
  const out: [string, TinyConfig][] = [
    ["tp 1 dense", { ...TINY, kvScales: ["k_scale", "v_scale"] }],
    ["tp 1 moe", { ...TINY, moe: { experts: 3, intermediate: 160 } }],
  ];
  for (const n of [2, 4]) {
    for (let r = 0; r < n; r++) {
      out.push([`tp ${r}/${n} dense`, { ...TINY, heads: 8, kvHeads: 2, tpRank: r, tpSize: n }]);
    }
  }
  for (let r = 0; r < 2; r++) {
    out.push([`tp ${r}/2 moe`, {
      ...TINY,
      moe: { experts: 2, intermediate: 160 },
      tpRank: r,
      tpSize: 2,
    }]);
  }
  return out;
}

async function reloadChunks(
  b: Backend,
  model: TinyModel,
  chunks: readonly HostChunk[],
  options: Parameters<typeof reloadLayerwise>[2] = {},
) {
  const up = uploadChunks(b, chunks);
  try {
    return await reloadLayerwise(model, up.map(([n, t]) => [n, t] as const), options);
  } finally {
    freeChunks(b, up);
  }
}

async function firstLoadChunks(b: Backend, c: TinyConfig, quant: QuantScheme, chunks: HostChunk[]) {
  const model = new TinyModel(b, c, quant);
  const up = uploadChunks(b, chunks);
  try {
    const r = await loadWeights(model, up.map(([n, t]) => [n, t] as const));
    return { model, report: r };
  } finally {
    freeChunks(b, up);
  }
}

for (const [bn, b] of BACKENDS) {
  for (const quant of QUANT_SCHEMES) {
    Deno.test(`${bn}: ${quant}: row-chunked reloads and first loads give the whole-tensor bytes (tp 1, 2, 4)`, async () => {
      for (const [label, c] of configs()) {
        const A = checkpointFor(b, c, 1, quant), B = checkpointFor(b, c, 2, quant);
        const fresh = await freshModel(b, c, quant, B);
        const model = await freshModel(b, c, quant, A);
        try {
          const want = kernelBytes(b, fresh);
          const layout = kernelLayout(model);
          const allocated = b.allocatedBytes();
          const chunks = randomChunks(B, 3);
          assert.ok(chunks.length > B.length, "tensors were cut");
          for (
            const [order, list] of [["in order", chunks], [
              "shuffled",
              shuffle([...chunks], 9),
            ]] as const
          ) {
            await reloadChunks(b, model, randomChunks(A, 5));
            const r = await reloadChunks(b, model, list);
            assert.equal(r.storageKept, true);
            // On a rank, chunks of other ranks' rows that come after its layer completed are
            // ignored; with one rank nothing is.
            if (!c.tpSize) assert.equal(r.ignoredLoads, 0, `${label} ${order}: nothing ignored`);
            assert.equal(r.bytesLoaded, B.reduce((a, h) => a + h.bytes.length, 0));
            assert.equal(r.tensorsLoaded, B.length, "a tensor sent as chunks counts once");
            assert.deepEqual(kernelLayout(model), layout, `${label} ${order}: nothing moved`);
            assert.equal(b.allocatedBytes(), allocated, `${label} ${order}: everything freed`);
            assertSameBytes(kernelBytes(b, model), want, `${label} ${quant} reload ${order}`);
          }
          const first = await firstLoadChunks(b, c, quant, shuffle([...chunks], 4));
          try {
            assertSameBytes(kernelBytes(b, first.model), want, `${label} ${quant} first load`);
            assert.equal(first.report.ignoredLoads, 0, "a first load writes every chunk once");
            assert.equal(first.report.tensorsLoaded, B.length);
          } finally {
            freeModule(b, first.model);
          }
        } finally {
          freeModule(b, model);
          freeModule(b, fresh);
        }
      }
    });
  }

  const find = (chunks: HostChunk[], name: string) =>
    chunks.findIndex((c) => c.name === name && c.start !== null && c.start > 0);

  Deno.test(`${bn}: a chunk sent twice is ignored; a missing chunk is reported by name`, async () => {
    const quant: QuantScheme = "fp8-tensor";
    const A = checkpointFor(b, TINY, 1, quant), B = checkpointFor(b, TINY, 2, quant);
    const fresh = await freshModel(b, TINY, quant, B);
    const model = await freshModel(b, TINY, quant, A);
    try {
      const want = kernelBytes(b, fresh);
      const chunks = randomChunks(B, 8);
      const q = find(chunks, "model.layers.1.self_attn.q_proj.weight");
      const e = find(chunks, "model.embed_tokens.weight");
      assert.ok(q >= 0 && e >= 0);
      // Right after itself (same rows: a duplicate) and once more at the end (layer processed).
      const twice = [...chunks.slice(0, q + 1), chunks[q], ...chunks.slice(q + 1), chunks[e]];
      const r = await reloadChunks(b, model, twice);
      assert.equal(r.ignoredLoads, 2);
      assertSameBytes(kernelBytes(b, model), want, "duplicates ignored");
      const first = await firstLoadChunks(b, TINY, quant, [...chunks, chunks[q], chunks[e]]);
      try {
        assert.equal(first.report.ignoredLoads, 2);
        assertSameBytes(kernelBytes(b, first.model), want, "first load: duplicates ignored");
      } finally {
        freeModule(b, first.model);
      }

      await reloadChunks(b, model, randomChunks(A, 2));
      const before = kernelBytes(b, model);
      for (
        const [i, name] of [[q, "model.layers.1.self_attn.qkv_proj.weight"], [
          e,
          "model.embed_tokens.weight",
        ]] as const
      ) {
        const lacking = chunks.filter((_, k) => k !== i);
        const missing = new RegExp(
          `${name.replaceAll(".", "\\.")}: \\d+ of \\d+ elements loaded \\(received .*rows`,
        );
        await assert.rejects(reloadChunks(b, model, lacking, { atomic: true }), (err: unknown) => {
          assert.ok(err instanceof ReloadError && err.code === "MISSING_WEIGHTS", String(err));
          assert.match(err.message, missing);
          return true;
        });
        assert.equal(isReloading(model), false);
        assertSameBytes(kernelBytes(b, model), before, "atomic abort restores the model");
        await assert.rejects(firstLoadChunks(b, TINY, quant, lacking), (err: unknown) => {
          assert.ok(err instanceof CheckpointError && err.code === "MISSING_WEIGHTS", String(err));
          assert.match(err.message, missing);
          return true;
        });
      }
    } finally {
      freeModule(b, model);
      freeModule(b, fresh);
    }
  });

  Deno.test(`${bn}: overlapping chunks are refused; rejectNonFinite scans a chunk's own rows`, async () => {
    const quant: QuantScheme = "none";
    const A = checkpointFor(b, TINY, 1, quant), B = checkpointFor(b, TINY, 2, quant);
    const model = await freshModel(b, TINY, quant, A);
    try {
      const name = "model.layers.0.mlp.down_proj.weight";
      const h = B.find((w) => w.name === name)!;
      const R = h.shape[0];
      const overlapping: HostChunk[] = [
        { name, whole: h, start: 0, end: 10 },
        { name, whole: h, start: 5, end: R },
      ];
      const rest = B.filter((w) => w.name !== name).map((w): HostChunk => ({
        name: w.name,
        whole: w,
        start: null,
        end: w.shape[0],
      }));
      for (
        const load of [
          (l: HostChunk[]) => reloadChunks(b, model, l, { atomic: true }),
          (l: HostChunk[]) => firstLoadChunks(b, TINY, quant, l),
        ]
      ) {
        await assert.rejects(load([...overlapping, ...rest]), (err: unknown) => {
          assert.ok(err instanceof CheckpointError && err.code === "OVERLAPPING_ROWS", String(err));
          assert.match(
            err.message,
            new RegExp(`${name.replaceAll(".", "\\.")}: rows \\[5, ${R}\\)`),
          );
          return true;
        });
      }

      // Rows [4, 8) of a storage whose rows [0, 4) are NaN: the whole-shape view of the chunk
      // would map rows 0-3 onto the NaNs; the scan must look at rows 4-7 only.
      const C = h.shape[1], rb = C * 2;
      const nan = new Uint8Array(4 * rb);
      for (let i = 0; i < nan.length; i += 2) [nan[i], nan[i + 1]] = [0xc0, 0x7f];
      const storage = upload(b, [8, C], new Uint8Array([...nan, ...rows(h.bytes, rb, 4, 8)]));
      const poisoned = upload(b, [4, C], nan);
      try {
        const clean = rowWindow(storage.narrow(0, 4, 4), 4, R);
        const bad = rowWindow(poisoned, 8, R);
        const others = [
          ...B.filter((w) => w.name !== name).map((w) =>
            [w.name, upload(b, w.shape, w.bytes)] as const
          ),
          ...[[0, 4], [8, R]].map(([s, e]) => {
            const t = upload(b, [e - s, C], rows(h.bytes, rb, s, e));
            return [name, rowWindow(t, s, R)] as const;
          }),
        ];
        try {
          await reloadLayerwise(model, [[name, clean], ...others], { rejectNonFinite: true });
          await assert.rejects(
            reloadLayerwise(model, [[name, bad], ...others], {
              rejectNonFinite: true,
              atomic: true,
            }),
            (err: unknown) => {
              assert.ok(err instanceof ReloadError && err.code === "NON_FINITE", String(err));
              assert.match(
                err.message,
                /\d+ of \d+ elements of the incoming bf16\[\d+, \d+\] are NaN/,
              );
              return true;
            },
          );
        } finally {
          for (const [, t] of others) b.free(t.storage!);
        }
      } finally {
        b.free(storage.storage!);
        b.free(poisoned.storage!);
      }
    } finally {
      freeModule(b, model);
    }
  });

  Deno.test(`${bn}: a source that holds one chunk at a time streams a whole model`, async () => {
    const B = checkpointFor(b, TINY, 2, "fp8-block");
    const fresh = await freshModel(b, TINY, "fp8-block", B);
    const model = await freshModel(b, TINY, "fp8-block", checkpointFor(b, TINY, 1, "fp8-block"));
    try {
      const allocated = b.allocatedBytes();
      await reloadLayerwise(model, streamChunks(b, randomChunks(B, 12)));
      assert.equal(b.allocatedBytes(), allocated);
      assertSameBytes(kernelBytes(b, model), kernelBytes(b, fresh), "streamed chunks");
    } finally {
      freeModule(b, model);
      freeModule(b, fresh);
    }
  });
}

/**
 * Reliability contract, apart from fault injection (faults_test.ts) and soak (soak_test.ts):
 * validation from headers before any write, rejectNonFinite, atomic snapshots in host memory,
 * the inconsistent mark without atomic, and refusal of concurrent loads and reloads. Runs on
 * every available backend.
 */

import assert from "node:assert/strict";
import type { Backend } from "../src/backend/backend.ts";
import { CheckpointError, ReloadError } from "../src/errors.ts";
import {
  inconsistentLayers,
  initializeLayerwiseReload,
  isInconsistent,
  isReloading,
} from "../src/reload/layerwise.ts";
import { loadWeights, reloadLayerwise } from "../src/reload/load.ts";
import { validateTensors } from "../src/reload/validate.ts";
import { DTYPES } from "../src/tensor/dtype.ts";
import type { Module } from "../src/nn/module.ts";
import type { Tensor } from "../src/tensor/tensor.ts";
import { describe, differing, faultyBackend, layerOf } from "./_faulty_backend.ts";
import {
  checkpointFor,
  freeModule,
  freeWeights,
  freshModel,
  type HostWeight,
  kernelBytes,
  kernelLayout,
  reloadHost,
  testBackends,
  TINY,
  type TinyConfig,
  TinyModel,
  uploadWeights,
} from "../testing.ts";

const BACKENDS = await testBackends();
const Q = "fp8-tensor";

/** Kernel tensors of `model` whose bytes differ from a fresh load of `host` (none: equal). */
async function differsFromFresh(b: Backend, model: Module, host: HostWeight[]): Promise<string[]> {
  const fresh = await freshModel(b, TINY, Q, host);
  try {
    return differing(kernelBytes(b, model), kernelBytes(b, fresh));
  } finally {
    freeModule(b, fresh);
  }
}

function withoutName(host: HostWeight[], name: string): HostWeight[] {
  const out = host.filter((h) => h.name !== name);
  assert.equal(out.length, host.length - 1, `${name} is in the checkpoint`);
  return out;
}

function replaced(host: HostWeight[], name: string, f: (h: HostWeight) => HostWeight) {
  let hit = 0;
  const out = host.map((h) => h.name === name ? (hit++, f(h)) : h);
  assert.equal(hit, 1, `${name} is in the checkpoint`);
  return out;
}

/** Sets bf16 element `i` of a copy of the weight's bytes to the raw bits `bits`. */
function withBf16Bits(h: HostWeight, at: [number, number][]): HostWeight {
  const bytes = h.bytes.slice();
  const v = new DataView(bytes.buffer);
  for (const [i, bits] of at) v.setUint16(2 * i, bits, true);
  return { ...h, bytes };
}

function rejectsWith(code: string, klass: typeof ReloadError | typeof CheckpointError) {
  return (e: unknown) => {
    assert.ok(e instanceof klass, `expected ${klass.name}, got ${e}`);
    assert.equal((e as ReloadError).code, code, String(e));
    assert.ok(!(e as Error).message.includes("\n"), "one-line message");
    return true;
  };
}

/** A source that stops before tensor `at` until released; `reached` resolves when it stops. */
function gated(ws: readonly [string, Tensor][], at: number) {
  let release!: () => void, reach!: () => void;
  const gate = new Promise<void>((r) => release = r);
  const reached = new Promise<void>((r) => reach = r);
  async function* source() {
    for (let i = 0; i < ws.length; i++) {
      if (i === at) {
        reach();
        await gate;
      }
      yield ws[i];
    }
  }
  return { source: source(), reached, release };
}

for (const [bn, b] of BACKENDS) {
  Deno.test(`${bn}: validateTensors: an exact checkpoint is complete; the model is untouched`, async () => {
    const A = checkpointFor(b, TINY, 1, Q), B = checkpointFor(b, TINY, 2, Q);
    // Before loading (the model's meta slots) and after (its recorded model format).
    const unloaded = new TinyModel(b, TINY, Q);
    const r0 = validateTensors(unloaded, describe(B));
    assert.equal(r0.complete, true);
    const model = await freshModel(b, TINY, Q, A);
    try {
      const layout = kernelLayout(model), before = kernelBytes(b, model);
      const allocated = b.allocatedBytes();
      const withRotary = [...describe(B), {
        name: "model.layers.0.self_attn.rotary_emb.inv_freq",
        dtype: DTYPES.f32,
        shape: [16],
      }];
      const r = validateTensors(model, withRotary);
      assert.deepEqual(r, { ...r0, skipped: ["model.layers.0.self_attn.rotary_emb.inv_freq"] });
      assert.equal(r.tensors, B.length);
      // TINY has no attention scales: every layer (embed, norm, lm_head, 6 per decoder layer) is covered.
      assert.deepEqual([r.unknown, r.missing, r.duplicates, r.layersUntouched], [[], [], [], []]);
      assert.equal(r.layersCovered, 3 + 6 * TINY.layers);
      assert.deepEqual(kernelLayout(model), layout);
      assert.deepEqual(differing(kernelBytes(b, model), before), []);
      assert.equal(b.allocatedBytes(), allocated, "validation allocates nothing");
    } finally {
      freeModule(b, model);
    }
  });

  Deno.test(`${bn}: validateTensors: unknown, missing, partial, wrong shape and dtype`, async () => {
    const A = checkpointFor(b, TINY, 1, Q), B = checkpointFor(b, TINY, 2, Q);
    const model = await freshModel(b, TINY, Q, A);
    try {
      const extra = [...describe(B), {
        name: "model.layers.0.mlp.extra_proj.weight",
        dtype: DTYPES.bf16,
        shape: [4, 4],
      }];
      assert.throws(
        () => validateTensors(model, extra),
        rejectsWith("UNKNOWN_TENSOR", CheckpointError),
      );
      assert.throws(
        () => validateTensors(model, extra),
        /1 unknown tensor: model\.layers\.0\.mlp\.extra_proj\.weight$/,
      );
      // With an origin (a weight source's TensorInfo has one), messages name the file.
      const fromFile = extra.map((d) => ({ ...d, origin: "/ckpt/model-00002.safetensors" }));
      assert.throws(
        () => validateTensors(model, fromFile),
        /unknown tensor: \/ckpt\/model-00002\.safetensors: model\.layers\.0\.mlp\.extra_proj\.weight$/,
      );
      assert.throws(
        () =>
          validateTensors(
            model,
            fromFile.map((d) => d.name === "model.norm.weight" ? { ...d, shape: [7] } : d),
          ),
        /checkpoint does not fit the model: 1 tensor does not fit: \/ckpt\/model-00002\.safetensors: model\.norm\.weight: /,
      );
      const lenient = validateTensors(model, extra, { strict: false });
      assert.deepEqual(lenient.unknown, ["model.layers.0.mlp.extra_proj.weight"]);
      assert.equal(lenient.complete, false);

      // Many unknown names: a count, the first few, "...".
      const many = [
        ...describe(B),
        ...Array.from({ length: 12 }, (_, i) => ({
          name: `junk.${i}`,
          dtype: DTYPES.f32,
          shape: [1],
        })),
      ];
      assert.throws(
        () => validateTensors(model, many),
        /12 unknown tensors: junk\.0, junk\.1, junk\.2, \.\.\.$/,
      );

      // A whole tensor missing: an error when strict, reported when lenient.
      const noDown = describe(withoutName(B, "model.layers.1.mlp.down_proj.weight"));
      assert.throws(
        () => validateTensors(model, noDown),
        /1 model tensor not in the checkpoint: model\.layers\.1\.mlp\.down_proj\.weight/,
      );
      const partial = validateTensors(model, noDown, { strict: false });
      assert.deepEqual(partial.missing, ["model.layers.1.mlp.down_proj.weight"]);
      assert.ok(partial.layersUntouched.includes("model.layers.1.mlp.down_proj"));

      // A shard missing leaves a layer covered in part: an error either way.
      const noUp = describe(withoutName(B, "model.layers.1.mlp.up_proj.weight"));
      for (const strict of [true, false]) {
        assert.throws(() => validateTensors(model, noUp, { strict }), (e: unknown) => {
          assert.ok(e instanceof CheckpointError && e.code === "MISSING_WEIGHTS", String(e));
          assert.match(
            e.message,
            /model\.layers\.1\.mlp\.gate_up_proj\.weight: 61440 of 122880 elements loaded \(received shards 0\)/,
          );
          return true;
        });
      }

      // Shape and dtype go through the layer's own loader checks.
      const badShape = describe(
        replaced(B, "model.layers.1.self_attn.k_proj.weight", (h) => ({ ...h, shape: [64, 191] })),
      );
      assert.throws(() => validateTensors(model, badShape, { strict: false }), (e: unknown) => {
        assert.ok(e instanceof CheckpointError && e.code === "SHAPE_MISMATCH", String(e));
        assert.match(
          e.message,
          /model\.layers\.1\.self_attn\.k_proj\.weight: .*expected \[64, 192\], got \[64, 191\]/,
        );
        return true;
      });
      const badDtype = describe(
        replaced(B, "model.norm.weight", (h) => ({ ...h, dtype: DTYPES.i8 })),
      );
      assert.throws(
        () => validateTensors(model, badDtype),
        /model\.norm\.weight: expected bf16, got i8/,
      );
      // The most severe kind gives the code; every kind is in the one line.
      assert.throws(
        () => validateTensors(model, [...badShape, ...extra.slice(-1)]),
        (e: unknown) => {
          assert.ok(e instanceof CheckpointError && e.code === "SHAPE_MISMATCH");
          assert.match(e.message, /1 tensor does not fit: .*; 1 unknown tensor: /);
          return true;
        },
      );

      // The same tensor twice (or a tied name twice) is a duplicate, as a load ignores it.
      const dup = validateTensors(model, [...describe(B), describe(B)[3]]);
      assert.deepEqual(dup.duplicates, [B[3].name]);
    } finally {
      freeModule(b, model);
    }
  });

  Deno.test(`${bn}: validation uses the loader's own checks: same message as the real reload`, async () => {
    const A = checkpointFor(b, TINY, 1, Q), B = checkpointFor(b, TINY, 2, Q);
    const model = await freshModel(b, TINY, Q, A);
    try {
      const bad = replaced(B, "model.layers.1.mlp.down_proj.weight", (h) => ({
        ...h,
        shape: [h.shape[1], h.shape[0]],
        bytes: h.bytes,
      }));
      let fromLoad = "";
      await assert.rejects(reloadHost(b, model, bad, { atomic: true }), (e: unknown) => {
        fromLoad = (e as Error).message;
        return e instanceof CheckpointError && e.code === "SHAPE_MISMATCH";
      });
      assert.throws(() => validateTensors(model, describe(bad)), (e: unknown) => {
        assert.ok(e instanceof CheckpointError);
        assert.ok(e.message.includes(fromLoad), `${e.message} contains ${fromLoad}`);
        return true;
      });
    } finally {
      freeModule(b, model);
    }
  });

  Deno.test(`${bn}: reloadLayerwise with expected refuses before writing anything (no atomic needed)`, async () => {
    const A = checkpointFor(b, TINY, 1, Q), B = checkpointFor(b, TINY, 2, Q);
    const model = await freshModel(b, TINY, Q, A);
    const fb = faultyBackend(b);
    try {
      const before = kernelBytes(b, model), layout = kernelLayout(model);
      // The last tensor in layer order does not fit: without validation the reload would have
      // written every layer before it.
      const bad = replaced(B, "lm_head.weight", (h) => ({ ...h, shape: [h.shape[1], h.shape[0]] }));
      await assert.rejects(
        reloadHost(b, model, bad, { expected: describe(bad) }),
        rejectsWith("SHAPE_MISMATCH", CheckpointError),
      );
      assert.equal(isInconsistent(model), false);
      assert.deepEqual(differing(kernelBytes(b, model), before), []);
      assert.deepEqual(kernelLayout(model), layout);
      // Strict: an unknown name refuses; lenient: it is skipped and reported.
      const extra = [...B, { ...B[1], name: "model.layers.0.mlp.extra_proj.weight" }];
      await assert.rejects(
        reloadHost(b, model, extra, { expected: describe(extra) }),
        rejectsWith("UNKNOWN_TENSOR", CheckpointError),
      );
      assert.deepEqual(differing(kernelBytes(b, model), before), []);
      const r = await reloadHost(b, model, extra, { expected: describe(extra), strict: false });
      assert.deepEqual(r.validation?.unknown, ["model.layers.0.mlp.extra_proj.weight"]);
      assert.equal(r.tensorsSkipped, 1);
      assert.deepEqual(await differsFromFresh(b, model, B), []);
      // Lenient partial reload: the layer the checkpoint lacks keeps its weights.
      const noDown = withoutName(A, "model.layers.1.mlp.down_proj.weight");
      const p = await reloadHost(b, model, noDown, { expected: describe(noDown), strict: false });
      assert.deepEqual(p.validation?.missing, ["model.layers.1.mlp.down_proj.weight"]);
      assert.ok(p.untouched.includes("model.layers.1.mlp.down_proj"));
      const changed = differing(kernelBytes(b, model), before).map(layerOf);
      assert.deepEqual([...new Set(changed)], ["model.layers.1.mlp.down_proj"]);
      // Validation is part of loadWeights too.
      const m2 = new TinyModel(fb, TINY, Q);
      const ws = uploadWeights(b, bad);
      try {
        await assert.rejects(
          loadWeights(m2, ws, { expected: describe(bad) }),
          rejectsWith("SHAPE_MISMATCH", CheckpointError),
        );
        assert.equal(fb.calls.get("copy") ?? 0, 0, "nothing copied before validation failed");
      } finally {
        freeWeights(b, ws);
      }
    } finally {
      freeModule(b, model);
    }
  });

  Deno.test(`${bn}: validateTensors covers tied weights, experts of other ranks and tensor parallel`, () => {
    const tied: TinyConfig = { ...TINY, tie: true };
    const m1 = new TinyModel(b, tied, Q);
    const ckpt = describe(checkpointFor(b, tied, 1, Q));
    assert.equal(validateTensors(m1, ckpt).complete, true);
    // The tied name resolves to the embedding: as a second name of it, a duplicate.
    const r = validateTensors(m1, [...ckpt, { ...ckpt[0], name: "lm_head.weight" }]);
    assert.deepEqual(r.duplicates, ["lm_head.weight"]);
    const moe: TinyConfig = {
      ...TINY,
      moe: { experts: 4, intermediate: 64, epRank: 1, epSize: 2 },
    };
    for (const quant of [Q, "fp8-serialized"] as const) {
      const m2 = new TinyModel(b, moe, quant);
      const r2 = validateTensors(m2, describe(checkpointFor(b, moe, 1, quant)));
      assert.equal(r2.complete, true, quant);
      assert.throws(
        () =>
          validateTensors(
            m2,
            describe(withoutName(
              checkpointFor(b, moe, 1, quant),
              "model.layers.0.block_sparse_moe.experts.3.w1.weight",
            )),
          ),
        /covered in part: model\.layers\.0\.block_sparse_moe\.experts\.w13_weight/,
      );
    }
    const tp: TinyConfig = { ...TINY, tpRank: 1, tpSize: 2 };
    assert.equal(
      validateTensors(new TinyModel(b, tp, Q), describe(checkpointFor(b, tp, 1, Q))).complete,
      true,
    );
  });

  Deno.test(`${bn}: rejectNonFinite: NaN/Inf in an incoming tensor is NON_FINITE, atomic restores`, async () => {
    const A = checkpointFor(b, TINY, 1, Q), B = checkpointFor(b, TINY, 2, Q);
    const model = await freshModel(b, TINY, Q, A);
    try {
      const before = kernelBytes(b, model), allocated = b.allocatedBytes();
      const name = "model.layers.1.self_attn.o_proj.weight";
      const nan = replaced(B, name, (h) => withBf16Bits(h, [[5, 0x7fc0], [700, 0xff80]]));
      await assert.rejects(
        reloadHost(b, model, nan, { atomic: true, rejectNonFinite: true }),
        (e: unknown) => {
          assert.ok(e instanceof ReloadError && e.code === "NON_FINITE", String(e));
          assert.match(
            e.message,
            new RegExp(`^${name.replaceAll(".", "\\.")}: .*2 of 36864 elements`),
          );
          assert.doesNotMatch(e.message, /inconsistent/);
          return true;
        },
      );
      assert.deepEqual(differing(kernelBytes(b, model), before), []);
      assert.equal(b.allocatedBytes(), allocated);
      // Without atomic: the layers before it hold new weights, and the error says which.
      await assert.rejects(reloadHost(b, model, nan, { rejectNonFinite: true }), (e: unknown) => {
        assert.ok(e instanceof ReloadError && e.code === "NON_FINITE");
        assert.match(
          e.message,
          /\[model inconsistent: \d+ layer\(s\) already hold new weights: model\.embed_tokens|model\.layers\.0/,
        );
        return true;
      });
      assert.equal(isInconsistent(model), true);
      // The option is off by default: the same weights reload.
      await reloadHost(b, model, nan);
      assert.equal(isInconsistent(model), false, "a complete reload clears the mark");
      // A first load scans too.
      const m2 = new TinyModel(b, TINY, Q);
      const ws = uploadWeights(b, nan);
      try {
        await assert.rejects(
          loadWeights(m2, ws, { rejectNonFinite: true }),
          rejectsWith("NON_FINITE", ReloadError),
        );
      } finally {
        freeWeights(b, ws);
      }
      assert.equal(b.allocatedBytes(), allocated, "the failed first load freed its memory");
      // A clean checkpoint passes the scan and reloads exactly.
      await reloadHost(b, model, B, { rejectNonFinite: true, atomic: true });
      assert.deepEqual(await differsFromFresh(b, model, B), []);
    } finally {
      freeModule(b, model);
    }
  });

  Deno.test(`${bn}: rejectNonFinite scans non-contiguous incoming views too`, async () => {
    const A = checkpointFor(b, TINY, 1, Q);
    const model = await freshModel(b, TINY, Q, A);
    const name = "model.layers.0.self_attn.o_proj.weight";
    const h = A.find((w) => w.name === name)!;
    const [rows, cols] = h.shape;
    // Left half: the weight; right half: NaN. Each half is a strided [rows, cols] view.
    const wide = b.empty([rows, 2 * cols], h.dtype);
    const bytes = new Uint8Array(h.bytes.length * 2);
    const nanBits = new Uint8Array(2 * cols);
    for (let i = 0; i < cols; i++) nanBits.set([0xc0, 0x7f], 2 * i);
    for (let r = 0; r < rows; r++) {
      bytes.set(h.bytes.subarray(2 * cols * r, 2 * cols * (r + 1)), 4 * cols * r);
      bytes.set(nanBits, 4 * cols * r + 2 * cols);
    }
    b.upload(wide, bytes);
    const left = wide.narrow(1, 0, cols), right = wide.narrow(1, cols, cols);
    assert.equal(left.isContiguous, false);
    const ws = uploadWeights(b, A.filter((w) => w.name !== name));
    try {
      const before = kernelBytes(b, model);
      const r = await reloadLayerwise(model, [...ws, [name, left] as [string, Tensor]], {
        rejectNonFinite: true,
      });
      assert.equal(r.storageKept, true);
      assert.deepEqual(differing(kernelBytes(b, model), before), [], "same weights as A");
      const allocated = b.allocatedBytes();
      await assert.rejects(
        reloadLayerwise(model, [...ws, [name, right] as [string, Tensor]], {
          rejectNonFinite: true,
          atomic: true,
        }),
        new RegExp(`${rows * cols} of ${rows * cols} elements`),
      );
      assert.equal(b.allocatedBytes(), allocated, "the temporary copy is freed");
      assert.deepEqual(differing(kernelBytes(b, model), before), []);
    } finally {
      freeWeights(b, ws);
      b.free(wide.storage!);
      freeModule(b, model);
    }
  });

  Deno.test(`${bn}: atomic snapshots go to host memory: no extra device memory`, async () => {
    const fb = faultyBackend(b);
    const A = checkpointFor(b, TINY, 1, Q), B = checkpointFor(b, TINY, 2, Q);
    const model = await freshModel(fb, TINY, Q, A);
    try {
      const peaks: number[] = [];
      const downloads: number[] = [];
      for (const atomic of [false, true]) {
        const ws = uploadWeights(b, atomic ? A : B);
        try {
          fb.resetPeak();
          fb.resetCounts();
          await reloadLayerwise(model, ws, { atomic });
          peaks.push(fb.peakAllocated);
          downloads.push(fb.calls.get("download") ?? 0);
        } finally {
          freeWeights(b, ws);
        }
      }
      assert.equal(peaks[1], peaks[0], "same device peak with and without atomic");
      const kernelTensors = model.namedTensors().length;
      assert.ok(
        downloads[1] >= downloads[0] + kernelTensors,
        `atomic downloads every kernel tensor (${downloads[1]} vs ${downloads[0]})`,
      );
    } finally {
      freeModule(b, model);
    }
  });

  Deno.test(`${bn}: without atomic the model stays marked inconsistent until its layers are rewritten`, async () => {
    const A = checkpointFor(b, TINY, 1, Q), B = checkpointFor(b, TINY, 2, Q);
    const C = checkpointFor(b, TINY, 3, Q);
    const model = await freshModel(b, TINY, Q, A);
    try {
      // Missing a shard of layer 1's MLP: layers before it are written first.
      const partial = withoutName(B, "model.layers.1.mlp.up_proj.weight");
      let written: string[] = [];
      await assert.rejects(reloadHost(b, model, partial), (e: unknown) => {
        assert.ok(e instanceof ReloadError && e.code === "MISSING_WEIGHTS");
        const m = e.message.match(
          /\[model inconsistent: (\d+) layer\(s\) already hold new weights: ([^;]+);/,
        );
        assert.ok(m, e.message);
        written = inconsistentLayers(model);
        assert.equal(Number(m[1]), written.length);
        assert.ok(m[2].startsWith(written[0]));
        return true;
      });
      assert.equal(isInconsistent(model), true);
      assert.ok(written.includes("model.layers.0.self_attn.qkv_proj"), written.join());
      // A successful partial reload of other layers keeps the mark and says so.
      const onlyNorm = B.filter((h) => h.name === "model.norm.weight");
      const r1 = await reloadHost(b, model, onlyNorm);
      assert.equal(r1.inconsistent, true);
      // model.norm was written again: only the others remain.
      const rest = written.filter((l) => l !== "model.norm");
      assert.ok(rest.length < written.length);
      assert.deepEqual(r1.inconsistentLayers, rest);
      // A failing atomic reload restores the (inconsistent) model and its error says so.
      await assert.rejects(
        reloadHost(b, model, withoutName(C, "model.layers.0.mlp.up_proj.weight"), { atomic: true }),
        /\[model inconsistent: \d+ layer\(s\) hold weights of a failed reload: /,
      );
      assert.deepEqual(inconsistentLayers(model), rest);
      // A complete reload clears it.
      const r2 = await reloadHost(b, model, C);
      assert.equal(r2.inconsistent, false);
      assert.deepEqual(r2.inconsistentLayers, []);
      assert.equal(isInconsistent(model), false);
      assert.deepEqual(await differsFromFresh(b, model, C), []);
    } finally {
      freeModule(b, model);
    }
  });

  Deno.test(`${bn}: a second reload or a load while a reload runs is refused; the first completes`, async () => {
    const A = checkpointFor(b, TINY, 1, Q), B = checkpointFor(b, TINY, 2, Q);
    const model = await freshModel(b, TINY, Q, A);
    const ws = uploadWeights(b, B), wa = uploadWeights(b, A);
    try {
      const g = gated(ws, 7);
      const first = reloadLayerwise(model, g.source, { atomic: true });
      await g.reached;
      assert.equal(isReloading(model), true);
      await assert.rejects(reloadLayerwise(model, wa), (e: unknown) => {
        assert.ok(e instanceof ReloadError && e.code === "RELOAD_ACTIVE", String(e));
        assert.match(e.message, /^reloadWeights: a reload of this model is already in progress/);
        return true;
      });
      await assert.rejects(
        reloadLayerwise(model, wa, { expected: describe(A) }),
        rejectsWith("RELOAD_ACTIVE", ReloadError),
      );
      await assert.rejects(loadWeights(model, wa), rejectsWith("RELOAD_ACTIVE", ReloadError));
      assert.throws(
        () => initializeLayerwiseReload(model),
        rejectsWith("RELOAD_ACTIVE", ReloadError),
      );
      g.release();
      const r = await first;
      assert.equal(r.storageKept, true);
      assert.equal(isReloading(model), false);
      assert.deepEqual(await differsFromFresh(b, model, B), [], "the first reload is unharmed");
    } finally {
      freeWeights(b, ws);
      freeWeights(b, wa);
      freeModule(b, model);
    }
  });

  Deno.test(`${bn}: a reload or a second load while a first load runs is refused`, async () => {
    const A = checkpointFor(b, TINY, 1, Q);
    const model = new TinyModel(b, TINY, Q);
    const wa = uploadWeights(b, A);
    try {
      const g = gated(wa, 3);
      const first = loadWeights(model, g.source);
      await g.reached;
      await assert.rejects(reloadLayerwise(model, wa), rejectsWith("LOAD_ACTIVE", ReloadError));
      await assert.rejects(loadWeights(model, wa), rejectsWith("LOAD_ACTIVE", ReloadError));
      g.release();
      await first;
      assert.deepEqual(await differsFromFresh(b, model, A), []);
      // Once settled, a reload goes through.
      const r = await reloadLayerwise(model, wa);
      assert.equal(r.storageKept, true);
    } finally {
      freeWeights(b, wa);
      freeModule(b, model);
    }
  });
}

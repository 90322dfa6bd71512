/**
 * The reload lifecycle end to end on every available backend: reload == fresh load (bytes) for
 * each quantization method with storage kept, any load order, far-apart shards, padding vs
 * missing, the buffer bound, tied weights, attention scales, experts on other ranks.
 */

import assert from "node:assert/strict";
import type { Backend } from "../src/backend/backend.ts";
import { ReloadError } from "../src/errors.ts";
import { QUANT_SCHEMES, type QuantScheme } from "../src/nn/quant_method.ts";
import { reloadLayerwise } from "../src/reload/load.ts";
import { isReloading } from "../src/reload/layerwise.ts";
import { DTYPES } from "../src/tensor/dtype.ts";
import {
  checkpointFor,
  equalBytes,
  freeModule,
  freeWeights,
  freshModel,
  type HostWeight,
  kernelBytes,
  kernelLayout,
  reloadHost,
  shuffle,
  testBackends,
  TINY,
  type TinyConfig,
  TinyModel,
  uploadWeights,
} from "../testing.ts";

const BACKENDS = await testBackends();

function assertSameBytes(a: Map<string, Uint8Array>, b: Map<string, Uint8Array>, what: string) {
  assert.deepEqual([...a.keys()], [...b.keys()], `${what}: tensor names`);
  for (const [n, x] of a) assert.ok(equalBytes(x, b.get(n)!), `${what}: ${n} differs`);
}

/** Runs: model loaded from A, reloaded from B (ordered by `order`), compared with fresh B. */
async function reloadMatchesFresh(
  b: Backend,
  c: TinyConfig,
  quant: QuantScheme,
  order: (ws: HostWeight[]) => HostWeight[] = (ws) => ws,
  options: Parameters<typeof reloadLayerwise>[2] = {},
) {
  const A = checkpointFor(b, c, 1, quant), B = checkpointFor(b, c, 2, quant);
  const model = await freshModel(b, c, quant, A);
  const fresh = await freshModel(b, c, quant, B);
  const before = kernelBytes(b, model);
  const layout = kernelLayout(model);
  const allocated = b.allocatedBytes();
  try {
    const report = await reloadHost(b, model, order([...B]), options);
    assert.equal(report.storageKept, true);
    assert.deepEqual(
      kernelLayout(model),
      layout,
      "every kernel tensor keeps address, shape, dtype",
    );
    assert.equal(b.allocatedBytes(), allocated, "the reload frees all it allocates");
    const after = kernelBytes(b, model);
    assertSameBytes(after, kernelBytes(b, fresh), `${quant} reload vs fresh load`);
    // Scales may coincide (same value distribution in A and B); weights must not.
    for (const [n, x] of after) {
      if (!n.endsWith("scale")) assert.ok(!equalBytes(x, before.get(n)!), `${n} changed`);
    }
    return report;
  } finally {
    freeModule(b, model);
    freeModule(b, fresh);
  }
}

for (const [bn, b] of BACKENDS) {
  for (const quant of QUANT_SCHEMES) {
    Deno.test(`${bn}: ${quant}: reload B after A == fresh load of B, storage kept`, async () => {
      const r = await reloadMatchesFresh(b, TINY, quant);
      assert.ok(r.layersProcessed > 0 && r.bytesLoaded > 0);
      // Padded vocabulary (250 -> 256): never complete, processed at finalize.
      assert.deepEqual(r.delayed, ["model.embed_tokens", "lm_head"]);
    });
  }

  for (const quant of ["fp8-tensor", "fp8-serialized", "fp8-block"] as QuantScheme[]) {
    Deno.test(`${bn}: ${quant}: reversed, random and far-apart shard orders give the same bytes`, async () => {
      await reloadMatchesFresh(b, TINY, quant, (ws) => ws.reverse());
      for (const seed of [3, 4]) {
        await reloadMatchesFresh(b, TINY, quant, (ws) => shuffle(ws, seed));
      }
      // q shards first, v shards last, everything else between.
      await reloadMatchesFresh(b, TINY, quant, (ws) => [
        ...ws.filter((w) => w.name.includes("q_proj")),
        ...ws.filter((w) => !w.name.includes("q_proj") && !w.name.includes("v_proj")),
        ...ws.filter((w) => w.name.includes("v_proj")),
      ]);
    });
  }

  Deno.test(`${bn}: none: kernel tensors hold exactly the new checkpoint bytes`, async () => {
    const B = checkpointFor(b, TINY, 2, "none");
    const model = await freshModel(b, TINY, "none", checkpointFor(b, TINY, 1, "none"));
    try {
      await reloadHost(b, model, B);
      const by = new Map(B.map((w) => [w.name, w.bytes]));
      const qkv = b.download(
        model.resolveWeight("model.layers.1.self_attn.q_proj.weight")!.slot.tensor,
      );
      const want = concat(
        ["q", "k", "v"].map((s) => by.get(`model.layers.1.self_attn.${s}_proj.weight`)!),
      );
      assert.ok(equalBytes(qkv, want), "qkv_proj.weight = q ++ k ++ v");
      const emb = b.download(model.getModule("model.embed_tokens")!.slot("weight").tensor);
      const e = by.get("model.embed_tokens.weight")!;
      assert.ok(equalBytes(emb.subarray(0, e.length), e), "embedding rows");
      assert.ok(emb.subarray(e.length).every((x) => x === 0), "padding rows are zero");
    } finally {
      freeModule(b, model);
    }
  });

  Deno.test(`${bn}: fp8-tensor: dequantized kernel weights follow the new weights`, async () => {
    const A = checkpointFor(b, TINY, 1, "none"), B = checkpointFor(b, TINY, 2, "none");
    const model = await freshModel(b, TINY, "fp8-tensor", A);
    try {
      await reloadHost(b, model, B);
      const layer = model.getModule("model.layers.0.mlp.down_proj")!;
      const q = layer.slot("weight").tensor, s = layer.slot("weight_scale").tensor;
      const dq = b.empty(q.shape, DTYPES.f32);
      b.dequantizeFp8(dq, q, s, "tensor");
      const got = new Float32Array(b.download(dq).buffer);
      b.free(dq.storage!);
      const src = B.find((w) => w.name === "model.layers.0.mlp.down_proj.weight")!;
      const want = bf16ToF32(src.bytes);
      const scale = new Float32Array(b.download(s).buffer)[0];
      let err = 0;
      for (let i = 0; i < want.length; i++) err = Math.max(err, Math.abs(got[i] - want[i]));
      // e4m3 has 3 mantissa bits: error at most half a step of the largest binade (16 * scale).
      assert.ok(err <= 16 * scale, `max error ${err} for scale ${scale}`);
      const aSrc = bf16ToF32(A.find((w) => w.name === src.name)!.bytes);
      let errA = 0;
      for (let i = 0; i < want.length; i++) errA = Math.max(errA, Math.abs(got[i] - aSrc[i]));
      assert.ok(errA > 16 * scale, "the weights are not A's any more");
    } finally {
      freeModule(b, model);
    }
  });

  Deno.test(`${bn}: a missing shard is reported by name; with atomic the model is unchanged`, async () => {
    const A = checkpointFor(b, TINY, 1, "fp8-tensor"), B = checkpointFor(b, TINY, 2, "fp8-tensor");
    const model = await freshModel(b, TINY, "fp8-tensor", A);
    try {
      const before = kernelBytes(b, model), layout = kernelLayout(model);
      const allocated = b.allocatedBytes();
      const partial = B.filter((w) => w.name !== "model.layers.1.mlp.up_proj.weight");
      await assert.rejects(reloadHost(b, model, partial, { atomic: true }), (e: unknown) => {
        assert.ok(e instanceof ReloadError && e.code === "MISSING_WEIGHTS", String(e));
        assert.match(
          e.message,
          /model\.layers\.1\.mlp\.gate_up_proj\.weight: 61440 of 122880 elements loaded \(received shards 0\)/,
        );
        assert.doesNotMatch(e.message, /inconsistent/);
        return true;
      });
      assert.equal(isReloading(model), false);
      assert.deepEqual(kernelLayout(model), layout);
      assertSameBytes(kernelBytes(b, model), before, "atomic abort restores the model");
      assert.equal(b.allocatedBytes(), allocated);
      // Without atomic the error says which layers already hold new weights.
      await assert.rejects(
        reloadHost(b, model, partial),
        /MISSING|not fully loaded.*model inconsistent: \d+ layer/,
      );
      // The model is still reloadable afterwards.
      const ws = uploadWeights(b, B);
      try {
        const r = await reloadLayerwise(model, ws);
        assert.equal(r.storageKept, true);
      } finally {
        freeWeights(b, ws);
      }
    } finally {
      freeModule(b, model);
    }
  });

  Deno.test(`${bn}: scratch of waiting layers stays within maxBufferedBytes, or BUFFER_LIMIT`, async () => {
    const order = (ws: HostWeight[]) => shuffle(ws, 7);
    const B = order(checkpointFor(b, TINY, 2, "fp8-channel"));
    const unbounded = await reloadMatchesFresh(b, TINY, "fp8-channel", () => [...B]);
    assert.ok(unbounded.peakBufferedBytes > 0);
    const budget = unbounded.peakBufferedBytes;
    const r = await reloadMatchesFresh(b, TINY, "fp8-channel", () => [...B], {
      maxBufferedBytes: budget,
    });
    assert.ok(r.peakBufferedBytes <= budget);
    // Layer order needs little buffering; random order with a small budget fails clearly.
    const inOrder = await reloadMatchesFresh(b, TINY, "fp8-channel");
    assert.ok(inOrder.peakBufferedBytes < budget, `${inOrder.peakBufferedBytes} < ${budget}`);
    const A = checkpointFor(b, TINY, 1, "fp8-channel");
    const model = await freshModel(b, TINY, "fp8-channel", A);
    try {
      const before = kernelBytes(b, model), allocated = b.allocatedBytes();
      await assert.rejects(
        reloadHost(b, model, [...B], { maxBufferedBytes: Math.floor(budget / 4), atomic: true }),
        (e: unknown) => {
          assert.ok(e instanceof ReloadError && e.code === "BUFFER_LIMIT", String(e));
          assert.match(
            e.message,
            /model\.layers\.\d\.\S+: materializing \d+ bytes of model-format scratch would hold \d+ bytes, over maxBufferedBytes=\d+/,
          );
          return true;
        },
      );
      assert.equal(b.allocatedBytes(), allocated, "buffers freed after the failure");
      assertSameBytes(kernelBytes(b, model), before, "atomic abort");
    } finally {
      freeModule(b, model);
    }
  });

  Deno.test(`${bn}: tied embeddings: either name loads the one tensor, once`, async () => {
    const c = { ...TINY, tie: true };
    const A = checkpointFor(b, c, 1, "none"), B = checkpointFor(b, c, 2, "none");
    const model = await freshModel(b, c, "none", A);
    const fresh = await freshModel(b, c, "none", B);
    try {
      const emb = model.getModule("model.embed_tokens")!.slot("weight");
      assert.equal(model.getModule("lm_head")!.getSlot("weight"), emb);
      // Send the embedding under the lm_head name, then again under its own name.
      const logs: string[] = [];
      const renamed = B.map((w) =>
        w.name === "model.embed_tokens.weight" ? { ...w, name: "lm_head.weight" } : w
      );
      const r = await reloadHost(b, model, [
        ...renamed,
        B.find((w) => w.name === "model.embed_tokens.weight")!,
      ], {
        log: (m) => logs.push(m),
      });
      assert.equal(r.ignoredLoads, 1);
      assert.ok(
        logs.some((l) => /model\.embed_tokens\.weight.*(ignored)/.test(l)),
        logs.join("\n"),
      );
      assertSameBytes(kernelBytes(b, model), kernelBytes(b, fresh), "tied reload");
      assert.equal(model.getModule("lm_head")!.getSlot("weight"), emb, "still shared");
      assert.ok(r.storageKept);
    } finally {
      freeModule(b, model);
      freeModule(b, fresh);
    }
  });

  Deno.test(`${bn}: loads to an already processed layer are ignored with a debug log`, async () => {
    const A = checkpointFor(b, TINY, 1, "fp8-tensor"), B = checkpointFor(b, TINY, 2, "fp8-tensor");
    const model = await freshModel(b, TINY, "fp8-tensor", A);
    const fresh = await freshModel(b, TINY, "fp8-tensor", B);
    try {
      const logs: string[] = [];
      const o = A.find((w) => w.name === "model.layers.0.self_attn.o_proj.weight")!;
      const r = await reloadHost(b, model, [...B, o], { log: (m) => logs.push(m) });
      assert.equal(r.ignoredLoads, 1);
      assert.ok(
        logs.includes(
          "model.layers.0.self_attn.o_proj.weight: layer already processed, load ignored",
        ),
      );
      assertSameBytes(kernelBytes(b, model), kernelBytes(b, fresh), "late A load ignored");
    } finally {
      freeModule(b, model);
      freeModule(b, fresh);
    }
  });

  Deno.test(`${bn}: attention scales reload (processed last); an absent scale becomes 1`, async () => {
    const c: TinyConfig = { ...TINY, kvScales: ["k_scale", "v_scale"] };
    for (const quant of ["none", "fp8-tensor"] as QuantScheme[]) {
      const r = await reloadMatchesFresh(b, c, quant);
      assert.ok(r.processed.at(-1)!.endsWith("self_attn.attn"), "attention last");
    }
    const B = checkpointFor(b, c, 2, "none");
    const model = await freshModel(b, c, "none", checkpointFor(b, c, 1, "none"));
    try {
      await reloadHost(b, model, B.filter((w) => !w.name.endsWith("v_scale")));
      const attn = model.getModule("model.layers.1.self_attn.attn")!;
      const k = new Float32Array(b.download(attn.slot("k_scale").tensor).buffer)[0];
      const v = new Float32Array(b.download(attn.slot("v_scale").tensor).buffer)[0];
      const want = new Float32Array(
        B.find((w) => w.name === "model.layers.1.self_attn.k_scale")!.bytes.buffer,
      )[0];
      assert.equal(k, want);
      assert.equal(v, 1);
    } finally {
      freeModule(b, model);
    }
  });

  for (
    const quant of [
      "none",
      "fp8-tensor",
      "fp8-block",
      "int8-channel",
      "fp8-serialized",
    ] as QuantScheme[]
  ) {
    Deno.test(`${bn}: ${quant}: FusedMoE reload, experts of another rank count zero`, async () => {
      const c: TinyConfig = {
        ...TINY,
        moe: { experts: 4, intermediate: 160, epRank: 1, epSize: 2 },
      };
      await reloadMatchesFresh(b, c, quant, (ws) => shuffle(ws, 11));
      const model = new TinyModel(b, c, quant);
      const moe = model.getModule("model.layers.0.block_sparse_moe.experts")!;
      assert.deepEqual(moe.slot("w13_weight").tensor.shape, [2, 320, TINY.hidden]);
    });
  }

  Deno.test(`${bn}: tensor parallel rank 1 of 2 reloads like a fresh load`, async () => {
    await reloadMatchesFresh(
      b,
      { ...TINY, tpRank: 1, tpSize: 2 },
      "fp8-serialized",
      (ws) => shuffle(ws, 5),
    );
    await reloadMatchesFresh(
      b,
      { ...TINY, tpRank: 3, tpSize: 4, heads: 8, kvHeads: 2 },
      "fp8-tensor",
    );
  });
}

function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((a, p) => a + p.length, 0));
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}

function bf16ToF32(bytes: Uint8Array): Float32Array {
  const u16 = new Uint16Array(bytes.buffer, bytes.byteOffset, bytes.length / 2);
  const u32 = new Uint32Array(u16.length);
  for (let i = 0; i < u16.length; i++) u32[i] = u16[i] << 16;
  return new Float32Array(u32.buffer);
}

if (BACKENDS.length > 1) {
  Deno.test("reloaded kernel tensors are byte-identical across backends", async () => {
    for (const quant of QUANT_SCHEMES) {
      const results = [];
      for (const [, b] of BACKENDS) {
        const model = await freshModel(b, TINY, quant, checkpointFor(b, TINY, 1, quant));
        try {
          await reloadHost(b, model, shuffle(checkpointFor(b, TINY, 2, quant), 13));
          results.push(kernelBytes(b, model));
        } finally {
          freeModule(b, model);
        }
      }
      for (const r of results.slice(1)) assertSameBytes(r, results[0], `${quant} across backends`);
    }
  });
} else {
  Deno.test({
    name: "reloaded kernel tensors are byte-identical across backends",
    ignore: true,
    fn() {},
  });
}

/**
 * Extra backend memory of a reload (ARCHITECTURE.md, "Memory"), counted from the
 * backend's own allocation figure: in layer order a reload holds the model-format scratch of
 * one quantized layer at a time (plus the tiny attention scales, held to the end), layers
 * without quantization none at all, and processing allocates nothing beside the scratch; in any
 * order the engine's peakBufferedBytes accounts for everything it holds; with big tensors sent
 * as row chunks, a source that holds one chunk at a time adds one chunk to that, however large
 * the embedding is. Also: a layer loaded straight into its kernel tensors counts as written from
 * its first load. Runs on every backend.
 */

import assert from "node:assert/strict";
import { ReloadError } from "../src/errors.ts";
import type { Module } from "../src/nn/module.ts";
import { QUANT_SCHEMES, type QuantScheme } from "../src/nn/quant_method.ts";
import { getLayerwiseInfo, inconsistentLayers } from "../src/reload/layerwise.ts";
import { reloadLayerwise } from "../src/reload/load.ts";
import type { Backend } from "../src/backend/backend.ts";
import type { Tensor } from "../src/tensor/tensor.ts";
import { boundedChunks, chunkBytes, type HostChunk, streamChunks } from "./_chunks.ts";
import { differing, failingSource, faultyBackend, layerOf } from "./_faulty_backend.ts";
import {
  checkpointFor,
  freeModule,
  freeWeights,
  freshModel,
  type HostWeight,
  kernelBytes,
  shuffle,
  testBackends,
  TINY,
  type TinyConfig,
  uploadWeights,
} from "../testing.ts";

const BACKENDS = await testBackends();

const CONFIGS: [string, TinyConfig][] = [
  ["dense with attention scales", { ...TINY, kvScales: ["k_scale", "v_scale"] }],
  ["mixture of experts", { ...TINY, moe: { experts: 3, intermediate: 160 } }],
];

/** Model-format bytes of each weight module, and whether it needs scratch to reload. */
function modules(
  model: Module,
): { path: string; bytes: number; scratch: boolean; last: boolean }[] {
  const out = [];
  for (const [path, m] of model.namedModules()) {
    const meta = getLayerwiseInfo(m)?.restoreMetadata;
    if (!meta) continue;
    out.push({
      path,
      bytes: [...meta.values()].reduce((a, t) => a + t.meta.nbytes, 0),
      scratch: m.quantMethod !== undefined && m.quantMethod.keepsModelFormat !== true,
      last: m.processLast,
    });
  }
  return out;
}

/**
 * What processing may allocate beside the scratch: fp8-serialized requantizes each shard of a
 * fused weight through an f32 copy of the largest shard (and a new scale).
 */
function processingBytes(model: Module, quant: QuantScheme): number {
  if (quant !== "fp8-serialized") return 0;
  let most = 0;
  for (const [, m] of model.namedModules()) {
    for (const [name, slot] of m.ownSlots()) {
      if (slot.tensor.dtype.name !== "f8_e4m3fn") continue;
      const scale = m.getSlot(`${name}_scale`)?.tensor;
      const cols = slot.tensor.shape.at(-1)!;
      const rows = slot.tensor.shape.at(-2)!;
      // Fused weights carry shard sizes only in the layer; the whole matrix bounds the shard.
      most = Math.max(most, rows * cols * 4 + (scale?.nbytes ?? 0));
    }
  }
  return most;
}

/** The host weights as a source that uploads each just before it is loaded. */
function uploadedOnce(b: Backend, host: HostWeight[]): AsyncGenerator<[string, Tensor]> {
  return streamChunks(
    b,
    host.map((h) => ({ name: h.name, whole: h, start: null, end: 0 })),
  );
}

for (const [bn, b] of BACKENDS) {
  for (const [what, c] of CONFIGS) {
    for (const quant of QUANT_SCHEMES) {
      Deno.test(`${bn}: ${what}: ${quant}: extra memory is one layer's scratch in layer order, accounted in any order`, async () => {
        const fb = faultyBackend(b);
        const model = await freshModel(fb, c, quant, checkpointFor(b, c, 1, quant));
        const B = checkpointFor(b, c, 2, quant);
        try {
          const ms = modules(model);
          const largest = Math.max(
            0,
            ...ms.filter((m) => m.scratch && !m.last).map((m) => m.bytes),
          );
          const held = ms.filter((m) => m.scratch && m.last).reduce((a, m) => a + m.bytes, 0);
          const extra = processingBytes(model, quant);
          if (quant === "none") assert.equal(largest, 0, "unquantized linears need no scratch");
          else assert.ok(largest > 0);
          for (const order of ["layer order", "shuffled"]) {
            const ws = uploadWeights(b, order === "shuffled" ? shuffle([...B], 11) : B);
            try {
              const base = b.allocatedBytes();
              fb.resetPeak();
              const r = await reloadLayerwise(model, ws);
              const peak = fb.peakAllocated - base;
              assert.equal(b.allocatedBytes(), base, `${order}: everything freed`);
              assert.equal(r.storageKept, true);
              // Scratch is the only thing the engine holds: the report covers the peak.
              assert.ok(
                peak <= r.peakBufferedBytes + extra,
                `${order}: peak extra ${peak} <= peak scratch ${r.peakBufferedBytes} + ${extra}`,
              );
              if (order === "layer order") {
                assert.equal(r.peakBufferedBytes, largest + held, "one layer's scratch at a time");
                assert.ok(
                  peak <= largest + held + extra,
                  `peak extra ${peak} <= largest layer ${largest} + scales ${held} + ${extra}`,
                );
                if (quant !== "fp8-serialized") assert.equal(peak, largest + held);
              }
            } finally {
              freeWeights(b, ws);
            }
          }
          // In layer order the largest layer's scratch is enough of a budget.
          const ws = uploadWeights(b, B);
          try {
            await reloadLayerwise(model, ws, { maxBufferedBytes: largest + held });
            if (largest > 0) {
              await assert.rejects(
                reloadLayerwise(model, ws, { maxBufferedBytes: largest - 1, atomic: true }),
                (e) => e instanceof ReloadError && e.code === "BUFFER_LIMIT",
              );
            }
          } finally {
            freeWeights(b, ws);
          }
        } finally {
          freeModule(b, model);
        }
      });
    }
  }

  for (const quant of QUANT_SCHEMES) {
    Deno.test(`${bn}: ${quant}: row chunks in layer order hold one layer's scratch plus one chunk, even with an embedding larger than a layer`, async () => {
      const c: TinyConfig = { ...TINY, vocab: 4000 };
      const fb = faultyBackend(b);
      const A = checkpointFor(b, c, 1, quant), B = checkpointFor(b, c, 2, quant);
      const model = await freshModel(fb, c, quant, A);
      try {
        const ms = modules(model);
        const scratch = ms.filter((m) => m.scratch && !m.last).map((m) => m.bytes);
        const largest = Math.max(0, ...scratch);
        const held = ms.filter((m) => m.scratch && m.last).reduce((a, m) => a + m.bytes, 0);
        const extra = processingBytes(model, quant);
        const layer = ms.filter((m) => m.path.startsWith("model.layers.0."))
          .reduce((a, m) => a + m.bytes, 0);
        const embedding = ms.find((m) => m.path === "model.embed_tokens")!.bytes;
        assert.ok(embedding > layer, `embedding ${embedding} > decoder layer ${layer}`);
        const maxChunk = 32 * 1024;
        const chunks = boundedChunks(B, maxChunk);
        const chunk = Math.max(...chunks.map((k) => chunkBytes(k).length));
        assert.ok(chunk <= maxChunk);
        const bound = largest + held + extra + chunk;
        assert.ok(bound < embedding, "the bound leaves no room for a whole embedding");
        const whole = B.map((h): HostChunk => ({ name: h.name, whole: h, start: null, end: 0 }));

        const peakOf = async (list: HostChunk[]) => {
          const base = b.allocatedBytes();
          fb.resetPeak();
          const r = await reloadLayerwise(model, streamChunks(fb, list));
          assert.equal(b.allocatedBytes(), base, "everything freed");
          assert.equal(r.storageKept, true);
          return fb.peakAllocated - base;
        };
        // Whole tensors one at a time: the embedding itself is in memory at once.
        const tensor = B.find((h) => h.name === "model.embed_tokens.weight")!.bytes.length;
        assert.ok((await peakOf(whole)) >= tensor);
        const want = kernelBytes(b, model);
        await reloadLayerwise(model, uploadedOnce(b, A));
        const peak = await peakOf(chunks);
        assert.ok(
          peak <= bound,
          `peak extra ${peak} <= largest scratch ${largest} + scales ${held} + ${extra} + chunk ${chunk}`,
        );
        assert.deepEqual(differing(kernelBytes(b, model), want), [], "same bytes as whole tensors");
      } finally {
        freeModule(b, model);
      }
    });
  }

  Deno.test(`${bn}: none: a layer loaded straight into its kernel tensors is written from its first load`, async () => {
    const A = checkpointFor(b, TINY, 1, "none"), B = checkpointFor(b, TINY, 2, "none");
    const model = await freshModel(b, TINY, "none", A);
    try {
      const before = kernelBytes(b, model);
      // Stop right after the q shard of layer 0's fused projection: a part-written layer.
      const k = B.findIndex((w) => w.name === "model.layers.0.self_attn.q_proj.weight") + 1;
      const qkv = "model.layers.0.self_attn.qkv_proj";
      const ws = uploadWeights(b, B);
      try {
        for (const atomic of [false, true]) {
          await assert.rejects(reloadLayerwise(model, failingSource(ws, k), { atomic }), (e) => {
            assert.ok(e instanceof ReloadError && e.code === "RELOAD_FAILED", String(e));
            const changed = [...new Set(differing(kernelBytes(b, model), before).map(layerOf))];
            if (atomic) {
              assert.deepEqual(changed, [], "atomic restores the part-written layer");
              assert.deepEqual(inconsistentLayers(model), []);
            } else {
              assert.ok(changed.includes(qkv), "q rows were written in place");
              const written = inconsistentLayers(model);
              for (const l of changed) assert.ok(written.includes(l), `${l} listed`);
              assert.equal(written.at(-1), qkv, "the part-written layer is listed last");
              assert.match(
                e.message,
                /model inconsistent: \d+ layer\(s\) already hold new weights/,
              );
            }
            return true;
          });
          // A complete reload of A puts everything back and clears the mark.
          const wa = uploadWeights(b, A);
          try {
            await reloadLayerwise(model, wa);
          } finally {
            freeWeights(b, wa);
          }
          assert.deepEqual(differing(kernelBytes(b, model), before), []);
          assert.deepEqual(inconsistentLayers(model), []);
        }
      } finally {
        freeWeights(b, ws);
      }
    } finally {
      freeModule(b, model);
    }
  });
}

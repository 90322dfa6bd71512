/**
 * Tensor parallelism on WebAssembly: N simulated ranks (N = 2 and 4), each on its own backend,
 * loaded from the same unsharded checkpoint (the fixtures llama-tiny, llama-tiny-sharded,
 * qwen2-tiny, mixtral-tiny, qwen3-tiny (q_norm / k_norm replicated), qwen3-moe-tiny (experts
 * in layer 0, a dense MLP in layer 1), and synthetic shapes with more KV heads and a vocabulary that
 * leaves the last rank without a real row).
 *
 * - quant `none`: the concatenation of the rank shards equals the unsharded kernel tensors, for
 *   every layer type: column-parallel layers on output rows (fused q/k/v and gate/up, each
 *   logical shard on its own; the MoE w13 per expert), row-parallel layers on input columns
 *   (o_proj, down_proj, MoE w2), embeddings and the LM head on the vocabulary; KV heads held by
 *   several ranks (fewer KV heads than ranks) are identical on each and appear once; norms,
 *   row-parallel biases and the router are whole on every rank.
 * - quant `fp8` (per tensor): the shards cannot be concatenated (each has its own scale), so
 *   each rank's fp8 weight and scale must equal quantizing, on its own, that rank's shard of
 *   the unsharded model-format tensor (per expert for MoE weights); the other tensors equal
 *   the `none` shards.
 *
 * The expected split is written here from the sharding rules, independently of the layers'
 * own bookkeeping.
 */
import assert from "node:assert/strict";
import type { Backend } from "../src/backend/backend.ts";
import { openWasmBackend } from "../src/backend/wasm.ts";
import type { HostTensor } from "../src/checkpoint/safetensors.ts";
import { quantizeFp8PerTensor, synthTensors, writeSynthCheckpoint } from "../testing.ts";
import { readModelConfig } from "../src/models/config.ts";
import { downloadKernelTensors } from "../src/models/export.ts";
import { loadModel } from "../src/models/load.ts";
import {
  freeModel,
  loadTensorParallel,
  openRankBackends,
  reloadTensorParallel,
} from "../src/parallel/tp.ts";
import { DTYPES } from "../src/tensor/dtype.ts";
import {
  catHost,
  expectedShard,
  narrowHost,
  type ShardRule,
  shardRule,
} from "../src/parallel/shards.ts";

const CKPT = new URL("../../shared/fixtures/ckpt/", import.meta.url).pathname;

// ---------------------------------------------------------------- helpers

type Host = HostTensor;
const narrow = narrowHost;
const cat = catHost;
type Split = ShardRule;
const split = shardRule;

function assertHostEqual(a: Host, b: Host, what: string): void {
  assert.equal(a.dtype, b.dtype, `${what}: dtype`);
  assert.deepEqual([...a.shape], [...b.shape], `${what}: shape`);
  assert.ok(
    a.data.length === b.data.length && a.data.every((x, i) => x === b.data[i]),
    `${what}: bytes differ`,
  );
}

/** The unsharded tensor put back together from the rank shards (checking replicas agree). */
function unshard(shards: Host[], s: Split, n: number, what: string): Host {
  switch (s.kind) {
    case "replicated":
      for (let r = 1; r < n; r++) assertHostEqual(shards[r], shards[0], `${what} replica ${r}`);
      return shards[0];
    case "cols":
      return cat(s.dim, shards);
    case "vocab":
      return cat(0, shards.filter((t) => t.shape[0] > 0));
    case "parts": {
      const blocks: Host[] = [];
      let at = 0;
      for (const p of s.parts) {
        const held = new Map<number, Host>();
        for (let r = 0; r < n; r++) {
          const mine = narrow(shards[r], s.dim, at, p.per);
          const prev = held.get(p.source(r));
          if (prev) assertHostEqual(mine, prev, `${what}: replicated block on rank ${r}`);
          else held.set(p.source(r), mine);
        }
        assert.equal(held.size, p.full / p.per, `${what}: every block held by some rank`);
        for (let k = 0; k < held.size; k++) blocks.push(held.get(k)!);
        at += p.per;
      }
      return cat(s.dim, blocks);
    }
  }
}

// ---------------------------------------------------------------- fixtures and synthetic shapes

const SYNTH = {
  hiddenSize: 64,
  intermediateSize: 96,
  numLayers: 2,
  numHeads: 8,
  numKvHeads: 4,
  vocabSize: 130, // padded to 192: with 4 ranks of 48 rows, rank 3 holds only padding
  tieWordEmbeddings: false,
};
const synthDir = await Deno.makeTempDir({ prefix: "layerwise-tp-" });
await writeSynthCheckpoint(synthDir, SYNTH, synthTensors(SYNTH, 7));
const synthTiedDir = await Deno.makeTempDir({ prefix: "layerwise-tp-tied-" });
const SYNTH_TIED = { ...SYNTH, numKvHeads: 2, vocabSize: 200, tieWordEmbeddings: true };
await writeSynthCheckpoint(synthTiedDir, SYNTH_TIED, synthTensors(SYNTH_TIED, 8));

const MODELS: [string, string][] = [
  ["llama-tiny", `${CKPT}llama-tiny`],
  ["llama-tiny-sharded", `${CKPT}llama-tiny-sharded`],
  ["qwen2-tiny", `${CKPT}qwen2-tiny`],
  ["mixtral-tiny", `${CKPT}mixtral-tiny`],
  ["qwen3-tiny", `${CKPT}qwen3-tiny`],
  ["qwen3-moe-tiny", `${CKPT}qwen3-moe-tiny`],
  ["synthetic (8 heads, 4 KV heads, vocab 130)", synthDir],
  ["synthetic (tied, 2 KV heads, vocab 200)", synthTiedDir],
];

const reference: Backend = await openWasmBackend();
const ranks4 = await openRankBackends(4, "wasm");

Deno.test({
  name: "tp: rank backends are separate memories, one per rank",
  fn: () => {
    assert.equal(new Set(ranks4).size, 4);
    assert.ok(ranks4.every((b) => b.kind === "wasm" && b !== reference));
  },
});

for (const [label, dir] of MODELS) {
  for (const n of [2, 4]) {
    Deno.test(`tp: ${label}, ${n} ranks, quant none: the shards concatenate to the unsharded tensors`, async () => {
      const c = await readModelConfig(dir);
      const full = await loadModel(dir, { backend: reference, quant: "none" });
      const models = await loadTensorParallel(dir, ranks4.slice(0, n), { quant: "none" });
      try {
        const want = downloadKernelTensors(full);
        const got = models.map((m) => downloadKernelTensors(m));
        for (const g of got) assert.deepEqual([...g.keys()], [...want.keys()], "tensor names");
        const kinds = new Set<string>();
        for (const [name, w] of want) {
          const s = split(name, c, n);
          kinds.add(
            s.kind === "parts" ? `parts@${s.dim}` : s.kind === "cols" ? `cols@${s.dim}` : s.kind,
          );
          const shards = got.map((g) => g.get(name)!);
          assertHostEqual(unshard(shards, s, n, name), w, `${name} put back together`);
          for (let r = 0; r < n; r++) {
            assertHostEqual(shards[r], expectedShard(w, s, c, n, r), `${name} rank ${r}`);
          }
        }
        // Every layer type of the family was met.
        const need = c.numExperts > 0
          ? ["parts@0", "parts@1", "cols@1", "cols@2", "vocab", "replicated"]
          : ["parts@0", "cols@1", "vocab", "replicated"];
        for (const k of need) assert.ok(kinds.has(k), `${label}: a ${k} tensor was checked`);
      } finally {
        freeModel(full);
        for (const m of models) freeModel(m);
      }
    });

    Deno.test(`tp: ${label}, ${n} ranks, fp8 per tensor: each shard is its own quantization of the unsharded model-format shard`, async () => {
      const c = await readModelConfig(dir);
      const full = await loadModel(dir, { backend: reference, quant: "none" });
      const models = await loadTensorParallel(dir, ranks4.slice(0, n), { quant: "fp8" });
      try {
        const want = downloadKernelTensors(full); // model format: quant none does not process
        let quantized = 0;
        for (let r = 0; r < n; r++) {
          const got = downloadKernelTensors(models[r]);
          for (const [name, g] of got) {
            if (name.endsWith("_scale")) continue; // checked with its weight
            const base = want.get(name);
            assert.ok(base, `${name} exists unsharded`);
            const shard = expectedShard(base, split(name, c, n), c, n, r);
            if (g.dtype !== DTYPES.f8_e4m3fn) {
              assertHostEqual(g, shard, `${name} rank ${r}`);
              continue;
            }
            const [q, scale] = quantizeOnItsOwn(reference, shard);
            assertHostEqual(g, q, `${name} rank ${r}: fp8 bytes`);
            assertHostEqual(got.get(`${name}_scale`)!, scale, `${name}_scale rank ${r}`);
            quantized++;
          }
        }
        assert.equal(quantized, n * 4 * c.numLayers, "4 fp8 weights per layer on every rank");
      } finally {
        freeModel(full);
        for (const m of models) freeModel(m);
      }
    });
  }
}

/**
 * fp8 per-tensor quantization of a model-format shard on its own (2-D: one scale; 3-D: one per
 * expert), on the reference backend.
 */
function quantizeOnItsOwn(b: Backend, t: Host): [Host, Host] {
  const experts = t.shape.length === 3 ? t.shape[0] : 0;
  const mats = experts === 0 ? [t] : Array.from({ length: experts }, (_, e) => {
    const m = narrow(t, 0, e, 1);
    return { ...m, shape: m.shape.slice(1) };
  });
  const qs: Host[] = [], scales: Host[] = [];
  for (const m of mats) {
    const { q, scale } = quantizeFp8PerTensor(b, m.shape, m.dtype, m.data);
    qs.push({ dtype: DTYPES.f8_e4m3fn, shape: [1, ...m.shape], data: q });
    scales.push({ dtype: DTYPES.f32, shape: [1], data: scale });
  }
  if (experts === 0) {
    return [{ ...qs[0], shape: qs[0].shape.slice(1) }, scales[0]];
  }
  return [cat(0, qs), cat(0, scales)];
}

Deno.test("tp: a shape that does not divide is a clear BAD_CONFIG naming the layer", async () => {
  const bad = await Deno.makeTempDir({ prefix: "layerwise-tp-bad-" });
  try {
    const shape = { ...SYNTH, intermediateSize: 90 };
    await writeSynthCheckpoint(bad, shape, synthTensors(shape, 1));
    await assert.rejects(
      () => loadTensorParallel(bad, ranks4.slice(0, 4), { quant: "none" }),
      (e: Error & { code?: string }) =>
        e.code === "BAD_CONFIG" && /not divisible by 4/.test(e.message),
    );
  } finally {
    await Deno.remove(bad, { recursive: true });
  }
});

Deno.test("tp: reloading every rank in place equals a fresh tensor-parallel load of the new weights", async () => {
  const next = await Deno.makeTempDir({ prefix: "layerwise-tp-next-" });
  const models = await loadTensorParallel(synthDir, ranks4, { quant: "fp8" });
  try {
    await writeSynthCheckpoint(next, SYNTH, synthTensors(SYNTH, 9));
    const ptrs = models.map((m) =>
      [...m.namedModules()].flatMap(([, x]) => x.ownSlots().map(([, s]) => s.tensor.ptr))
    );
    const reports = await reloadTensorParallel(models, next);
    assert.ok(reports.every((r) => r.storageKept && r.tensorsLoaded > 0));
    const again = models.map((m) =>
      [...m.namedModules()].flatMap(([, x]) => x.ownSlots().map(([, s]) => s.tensor.ptr))
    );
    assert.deepEqual(again, ptrs, "no kernel tensor moved");
    const fresh = await loadTensorParallel(next, ranks4, { quant: "fp8" });
    try {
      for (let r = 0; r < 4; r++) {
        const a = downloadKernelTensors(models[r]), b = downloadKernelTensors(fresh[r]);
        assert.deepEqual([...a.keys()], [...b.keys()]);
        for (const [name, t] of a) assertHostEqual(t, b.get(name)!, `rank ${r} ${name}`);
      }
    } finally {
      for (const m of fresh) freeModel(m);
    }
  } finally {
    for (const m of models) freeModel(m);
    await Deno.remove(next, { recursive: true });
  }
});

Deno.test("tp: cleanup", async () => {
  for (const b of [reference, ...ranks4]) assert.equal(b.allocatedBytes(), 0, "nothing leaked");
  await Deno.remove(synthDir, { recursive: true });
  await Deno.remove(synthTiedDir, { recursive: true });
});

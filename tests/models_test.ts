import assert from "node:assert/strict";
import { CheckpointError } from "../src/errors.ts";
import { parseModelConfig, readModelConfig } from "../src/models/config.ts";
import {
  denseNameMapper,
  expectedCheckpointNames,
  layerOrderKey,
  mixtralNameMapper,
  type ParamTarget,
} from "../src/models/names.ts";
import {
  type HostTensor,
  loadSafetensors,
  readSafetensorsHeader,
} from "../src/checkpoint/safetensors.ts";
import { openWasmBackend } from "../src/backend/wasm.ts";
import { memorySource } from "../src/checkpoint/source.ts";
import { downloadKernelTensors, kernelTensors } from "../src/models/export.ts";
import { loadModel, reloadWeights } from "../src/models/load.ts";
import { openCheckpoint } from "../src/checkpoint/sharded.ts";
import { equalBytes } from "../testing.ts";

const FIXTURES = new URL("../../shared/fixtures/", import.meta.url);
const CKPT = new URL("ckpt/", FIXTURES).pathname;
const EXPECT = new URL("expect/", FIXTURES).pathname;
const NAMES = ["llama-tiny", "llama-tiny-sharded", "qwen2-tiny", "mixtral-tiny"];

async function rawConfig(name: string): Promise<Record<string, unknown>> {
  return JSON.parse(await Deno.readTextFile(`${CKPT}${name}/config.json`));
}

Deno.test("config: every fixture parses to the values its config.json holds", async () => {
  for (const name of NAMES) {
    const raw = await rawConfig(name);
    const c = await readModelConfig(`${CKPT}${name}`);
    assert.equal(c.architecture, (raw.architectures as string[])[0]);
    assert.equal(c.dtype.name, "bf16", name);
    assert.equal(c.hiddenSize, raw.hidden_size);
    assert.equal(c.intermediateSize, raw.intermediate_size);
    assert.equal(c.numLayers, raw.num_hidden_layers);
    assert.equal(c.numHeads, raw.num_attention_heads);
    assert.equal(c.numKvHeads, raw.num_key_value_heads);
    assert.equal(c.vocabSize, raw.vocab_size);
    assert.equal(c.tieWordEmbeddings, raw.tie_word_embeddings);
    assert.equal(
      c.headDim,
      raw.head_dim ?? (raw.hidden_size as number) / (raw.num_attention_heads as number),
      name,
    );
    assert.equal(c.qkvBias, raw.architectures === undefined ? false : name === "qwen2-tiny");
    assert.equal(c.numExperts, raw.num_local_experts ?? 0);
    assert.equal(c.numExpertsPerToken, raw.num_experts_per_tok ?? 0);
  }
});

Deno.test("config: torch_dtype is read when dtype is absent; defaults follow HF", async () => {
  const raw = await rawConfig("llama-tiny");
  delete raw.dtype;
  raw.torch_dtype = "float16";
  delete raw.num_key_value_heads;
  delete raw.head_dim;
  delete raw.tie_word_embeddings;
  const c = parseModelConfig(raw);
  assert.equal(c.dtype.name, "f16");
  assert.equal(c.numKvHeads, raw.num_attention_heads);
  assert.equal(c.headDim, (raw.hidden_size as number) / (raw.num_attention_heads as number));
  assert.equal(c.tieWordEmbeddings, false);
  raw.attention_bias = true;
  assert.equal(parseModelConfig(raw).qkvBias, true);
  assert.equal(parseModelConfig(raw).oBias, true);
  raw.architectures = ["MistralForCausalLM"];
  assert.equal(parseModelConfig(raw).architecture, "MistralForCausalLM");
});

Deno.test("config: unknown architecture and missing or bad fields name config.json and the field", async () => {
  const cases: [string, (r: Record<string, unknown>) => void, RegExp][] = [
    [
      "arch",
      (r) => (r.architectures = ["GPT2LMHeadModel"]),
      /config\.json: field architectures .*GPT2LMHeadModel/,
    ],
    ["no arch", (r) => delete r.architectures, /config\.json: field architectures/],
    ["hidden", (r) => delete r.hidden_size, /config\.json: field hidden_size is missing/],
    ["layers", (r) => (r.num_hidden_layers = 2.5), /config\.json: field num_hidden_layers is 2\.5/],
    ["vocab", (r) => delete r.vocab_size, /config\.json: field vocab_size is missing/],
    ["dtype", (r) => delete r.dtype, /config\.json: field dtype is missing/],
    ["dtype value", (r) => (r.dtype = "int4"), /config\.json: field dtype is "int4"/],
    ["gqa", (r) => (r.num_key_value_heads = 3), /field num_key_value_heads is 3/],
    ["tie", (r) => (r.tie_word_embeddings = "yes"), /field tie_word_embeddings/],
  ];
  for (const [label, edit, re] of cases) {
    const raw = await rawConfig("llama-tiny");
    edit(raw);
    assert.throws(() => parseModelConfig(raw), (e: unknown) => {
      assert.ok(e instanceof CheckpointError, label);
      assert.match(e.message, re, label);
      assert.ok(!e.message.includes("\n"), label);
      return true;
    });
  }
  const moe = await rawConfig("mixtral-tiny");
  delete moe.num_local_experts;
  assert.throws(
    () => parseModelConfig(moe),
    /field num_experts is missing \(nor is there a num_local_experts\)/,
  );
  await assert.rejects(
    readModelConfig("/nonexistent-dir"),
    /\/nonexistent-dir\/config\.json: not found/,
  );
});

async function checkpointNames(name: string): Promise<string[]> {
  return [...(await openCheckpoint(`${CKPT}${name}`)).tensors.keys()];
}

Deno.test("names: mapped dense checkpoint names are exactly the expected kernel names", async () => {
  for (const name of ["llama-tiny", "llama-tiny-sharded", "qwen2-tiny"]) {
    const cfg = await readModelConfig(`${CKPT}${name}`);
    const map = denseNameMapper(cfg);
    const mapped = new Set<string>();
    for (const n of await checkpointNames(name)) {
      const t = map(n);
      if (t === null) continue;
      if (t.param === "lm_head.weight") continue; // not in the expect files
      mapped.add(t.param);
    }
    const expected = [...(await readSafetensorsHeader(`${EXPECT}${name}.fp8-tensor.safetensors`))
      .tensors.keys()].filter((n) => !n.endsWith("_scale"));
    assert.deepEqual([...mapped].sort(), expected.sort(), name);
  }
});

Deno.test("names: shards, experts, ties and ignored tensors", () => {
  const m = denseNameMapper({ tieWordEmbeddings: false });
  const t = (n: string): ParamTarget | null => m(n);
  assert.deepEqual(t("model.layers.3.self_attn.k_proj.bias"), {
    param: "model.layers.3.self_attn.qkv_proj.bias",
    shardId: "k",
  });
  assert.deepEqual(t("model.layers.0.mlp.up_proj.weight"), {
    param: "model.layers.0.mlp.gate_up_proj.weight",
    shardId: 1,
  });
  assert.deepEqual(t("model.layers.0.mlp.down_proj.weight"), {
    param: "model.layers.0.mlp.down_proj.weight",
  });
  assert.deepEqual(t("lm_head.weight"), { param: "lm_head.weight" });
  assert.equal(t("model.layers.0.self_attn.rotary_emb.inv_freq"), null);
  assert.equal(denseNameMapper({ tieWordEmbeddings: true })("lm_head.weight"), null);
  const x = mixtralNameMapper({ tieWordEmbeddings: false });
  assert.deepEqual(x("model.layers.1.block_sparse_moe.experts.3.w3.weight"), {
    param: "model.layers.1.block_sparse_moe.experts.w13_weight",
    shardId: "w3",
    expertId: 3,
  });
  assert.deepEqual(x("model.layers.1.block_sparse_moe.experts.12.w2.weight_scale"), {
    param: "model.layers.1.block_sparse_moe.experts.w2_weight_scale",
    shardId: "w2",
    expertId: 12,
  });
  assert.deepEqual(x("model.layers.1.block_sparse_moe.gate.weight"), {
    param: "model.layers.1.block_sparse_moe.gate.weight",
  });
  assert.deepEqual(x("model.layers.0.self_attn.q_proj.weight"), {
    param: "model.layers.0.self_attn.qkv_proj.weight",
    shardId: "q",
  });
});

Deno.test("names: layer order puts the embedding first, layers in turn, head last", async () => {
  const names = await checkpointNames("llama-tiny-sharded");
  const key = layerOrderKey(3);
  const sorted = [...names].sort((a, b) => key(a) - key(b));
  assert.equal(sorted[0], "model.embed_tokens.weight");
  assert.equal(sorted.at(-1), "model.norm.weight");
  let last = -1;
  for (const n of sorted) {
    const m = /^model\.layers\.(\d+)\./.exec(n);
    if (m) {
      assert.ok(Number(m[1]) >= last);
      last = Number(m[1]);
    }
  }
  assert.ok(key("lm_head.weight") > key("model.layers.2.mlp.down_proj.weight"));
  assert.ok(key("something.else") > key("lm_head.weight"));
});

Deno.test("names: expectedCheckpointNames lists exactly each fixture's tensors", async () => {
  for (const name of NAMES) {
    const cfg = await readModelConfig(`${CKPT}${name}`);
    assert.deepEqual(
      expectedCheckpointNames(cfg).sort(),
      (await checkpointNames(name)).sort(),
      name,
    );
  }
});

async function memoryPairs(dir: string, seed: number): Promise<[string, HostTensor][]> {
  const t = await loadSafetensors(`${dir}/model.safetensors`);
  const pairs = [...t];
  // A seeded shuffle: the API must not depend on the order tensors arrive in.
  let s = seed;
  for (let i = pairs.length - 1; i > 0; i--) {
    s = (s * 1103515245 + 12345) % 2 ** 31;
    const j = s % (i + 1);
    [pairs[i], pairs[j]] = [pairs[j], pairs[i]];
  }
  return pairs;
}

// Other values of the same shapes: each tensor's bf16 elements in reverse order.
function reversed(pairs: [string, HostTensor][]): [string, HostTensor][] {
  return pairs.map(([n, t]) => {
    const e = new Uint16Array(t.data.slice().buffer).reverse();
    return [n, { ...t, data: new Uint8Array(e.buffer) }];
  });
}

Deno.test("api: reload from shuffled in-memory pairs equals a first load of them; pointers kept", async () => {
  const backend = await openWasmBackend();
  try {
    for (const name of ["qwen2-tiny", "mixtral-tiny"]) {
      const dir = `${CKPT}${name}`;
      const model = await loadModel(dir, { backend, quant: "fp8" });
      const first = downloadKernelTensors(model);
      const ptrs = kernelTensors(model).map(([n, t]) => [n, t.ptr]);
      const b = reversed(await memoryPairs(dir, 7));
      const r = await reloadWeights(model, b);
      assert.equal(r.storageKept, true);
      assert.deepEqual(kernelTensors(model).map(([n, t]) => [n, t.ptr]), ptrs);
      assert.ok(r.layersProcessed > 0);
      const reloaded = downloadKernelTensors(model);
      const fresh = await loadModel(dir, { backend, quant: "fp8", weights: memorySource(b) });
      const want = downloadKernelTensors(fresh);
      let changed = 0;
      for (const [n, t] of want) {
        assert.deepEqual(reloaded.get(n)!.data, t.data, `${name} ${n}`);
        if (!equalBytes(first.get(n)!.data, t.data)) changed++;
      }
      assert.ok(changed > want.size / 2, `${name}: only ${changed} tensors changed`);
    }
  } finally {
    backend.close();
  }
});

Deno.test("api: unexpected tensors are reported, or errors with strict; nothing written", async () => {
  const backend = await openWasmBackend();
  try {
    const dir = `${CKPT}llama-tiny`;
    const model = await loadModel(dir, { backend, quant: "fp8" });
    const before = downloadKernelTensors(model);
    const pairs = await memoryPairs(dir, 3);
    const extra: [string, HostTensor] = ["model.layers.0.mlp.extra.weight", pairs[0][1]];
    const r = await reloadWeights(model, [...pairs, extra]);
    assert.deepEqual(r.unexpected, [extra[0]]);
    await assert.rejects(
      reloadWeights(model, [...pairs, extra], { strict: true }),
      (e: unknown) =>
        e instanceof CheckpointError && e.code === "UNKNOWN_TENSOR" && e.message.includes(extra[0]),
    );
    const after = downloadKernelTensors(model);
    for (const [n, t] of before) assert.deepEqual(after.get(n)!.data, t.data, n);
  } finally {
    backend.close();
  }
});

Deno.test("api: a partial reload keeps untouched modules; without `partial` it is refused", async () => {
  const backend = await openWasmBackend();
  try {
    const dir = `${CKPT}llama-tiny`;
    const model = await loadModel(dir, { backend, quant: "fp8" });
    const before = downloadKernelTensors(model);
    // New values for layer 0 only.
    const layer0 = reversed(await memoryPairs(dir, 7)).filter(([n]) =>
      n.startsWith("model.layers.0.")
    );
    await assert.rejects(
      reloadWeights(model, layer0),
      (e: unknown) => e instanceof CheckpointError && e.code === "MISSING_TENSOR",
    );
    const unchanged = downloadKernelTensors(model);
    for (const [n, t] of before) assert.deepEqual(unchanged.get(n)!.data, t.data, n);

    const r = await reloadWeights(model, layer0, { partial: true });
    assert.ok(r.missing.includes("model.layers.1.self_attn.qkv_proj.weight"), r.missing.join());
    assert.ok(!r.missing.some((n) => n.startsWith("model.layers.0.")), r.missing.join());
    assert.ok(r.untouched.includes("model.layers.1.mlp.down_proj"), r.untouched.join());
    const after = downloadKernelTensors(model);
    let changed = 0;
    for (const [n, t] of before) {
      const same = equalBytes(after.get(n)!.data, t.data);
      if (n.startsWith("model.layers.0.") && n.endsWith(".weight") && !n.includes("norm")) {
        assert.ok(!same, `${n} follows the new weights`);
        changed++;
      } else if (!n.startsWith("model.layers.0.")) assert.ok(same, `${n} kept its weights`);
    }
    assert.equal(changed, 4, "qkv, o, gate_up and down of layer 0 changed");
    // A module covered in part is an error even with `partial`.
    const noK = layer0.filter(([n]) => !n.endsWith("self_attn.k_proj.weight"));
    await assert.rejects(
      reloadWeights(model, noK, { partial: true }),
      (e: unknown) => e instanceof CheckpointError && e.code === "MISSING_WEIGHTS",
    );
  } finally {
    backend.close();
  }
});

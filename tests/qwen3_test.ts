/**
 * Qwen3, Qwen3-MoE and block-fp8 checkpoints against the fixtures transformers 5 wrote:
 * exports byte-identical to `expect/` after a first load and after reloads A -> B -> A (B:
 * modified tensors written here; for block-fp8 its expected kernel tensors are its shards'
 * bytes concatenated, computed here on the host), bf16 <-> block-fp8 reloads into one model,
 * refusals of malformed block-fp8 checkpoints before any write, transformers 5's merged expert
 * names against per-expert names, and block-fp8 on tensor-parallel WebAssembly ranks.
 *
 * The GPU machine runs the same tests with LAYERWISE_E2E_BACKEND=cuda.
 */
import assert from "node:assert/strict";
import type { Backend } from "../src/backend/backend.ts";
import { releaseStaging } from "../src/checkpoint/staging.ts";
import { openBackend } from "../src/backend/select.ts";
import {
  encodeSafetensors,
  type HostTensor,
  loadSafetensors,
} from "../src/checkpoint/safetensors.ts";
import { CheckpointError, LayerwiseError } from "../src/errors.ts";
import { parseModelConfig, readModelConfig } from "../src/models/config.ts";
import { downloadKernelTensors, kernelTensors } from "../src/models/export.ts";
import { type CausalLM, loadModel, reloadWeights, type WeightsInput } from "../src/models/load.ts";
import { expectedCheckpointNames } from "../src/models/names.ts";
import { type QuantName, quantScheme } from "../src/models/quant_names.ts";
import { freeModel, loadTensorParallel, openRankBackends } from "../src/parallel/tp.ts";
import { catHost, expectedShard, narrowHost, shardRule } from "../src/parallel/shards.ts";
import { DTYPES } from "../src/tensor/dtype.ts";
import { bf16Bits, equalBytes, quantizeBlock128, rng } from "../testing.ts";

const FIXTURES = new URL("../../shared/fixtures/", import.meta.url);
const CKPT = new URL("ckpt/", FIXTURES).pathname;
const EXPECT = new URL("expect/", FIXTURES).pathname;
const MAIN = new URL("../src/cli/main.ts", import.meta.url).pathname;
const BACKEND = (Deno.env.get("LAYERWISE_E2E_BACKEND") ?? "wasm") as "wasm" | "cuda";

type Tensors = Map<string, HostTensor>;

// ------------------------------------------------------------------------------------ helpers

async function withTemp<T>(f: (dir: string) => Promise<T>): Promise<T> {
  const dir = await Deno.makeTempDir({ prefix: "layerwise-qwen3-" });
  try {
    return await f(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

async function fixture(name: string): Promise<Tensors> {
  return await loadSafetensors(`${CKPT}${name}/model.safetensors`);
}

async function expectation(file: string): Promise<Tensors> {
  return await loadSafetensors(`${EXPECT}${file}.safetensors`);
}

/** A checkpoint directory: `tensors` as model.safetensors beside the fixture's config.json. */
async function writeCheckpoint(
  dir: string,
  configOf: string,
  tensors: Iterable<[string, HostTensor]>,
): Promise<string> {
  await Deno.mkdir(dir, { recursive: true });
  await Deno.writeFile(
    `${dir}/model.safetensors`,
    encodeSafetensors([...tensors], { format: "pt" }),
  );
  await Deno.copyFile(`${CKPT}${configOf}/config.json`, `${dir}/config.json`);
  return dir;
}

/** Same dtype and shape, other values: the elements in reverse order (valid for any dtype). */
function reversed(t: HostTensor): HostTensor {
  const n = t.dtype.size;
  const src = t.data, out = new Uint8Array(src.length);
  const count = src.length / n;
  for (let i = 0; i < count; i++) {
    out.set(src.subarray(i * n, i * n + n), (count - 1 - i) * n);
  }
  return { dtype: t.dtype, shape: [...t.shape], data: out };
}

function modified(ts: Tensors): Tensors {
  return new Map([...ts].reverse().map(([k, t]) => [k, reversed(t)]));
}

/** Every tensor of `want` is in `got` with the same dtype, shape and bytes; returns the count. */
function assertContains(got: Tensors, want: Tensors, label: string): number {
  assert.ok(want.size > 0, `${label}: nothing to compare`);
  for (const [name, w] of want) {
    const g = got.get(name);
    assert.ok(g !== undefined, `${label}: ${name} missing`);
    assert.equal(g.dtype.name, w.dtype.name, `${label}: ${name} dtype`);
    assert.deepEqual([...g.shape], [...w.shape], `${label}: ${name} shape`);
    assert.ok(equalBytes(g.data, w.data), `${label}: ${name} bytes differ`);
  }
  return want.size;
}

/** The same names, dtypes, shapes and bytes. */
function assertSame(got: Tensors, want: Tensors, label: string): void {
  assert.deepEqual([...got.keys()].sort(), [...want.keys()].sort(), `${label}: names`);
  assertContains(got, want, label);
}

function differs(a: Tensors, b: Tensors): boolean {
  return [...a].some(([k, t]) => !equalBytes(t.data, b.get(k)!.data));
}

const backend: Backend = await openBackend({ backend: BACKEND });

async function load(dir: string, quant: QuantName, options = {}): Promise<CausalLM> {
  return await loadModel(dir, { backend, quant, ...options });
}

function pointers(model: CausalLM): string[] {
  return kernelTensors(model).map(([n, t]) => `${n}@${t.ptr}`);
}

/** Reloads `weights` into `model` and returns the export; storage must be kept. */
async function reloadExport(
  model: CausalLM,
  weights: WeightsInput,
  options = {},
): Promise<Tensors> {
  const before = pointers(model);
  const r = await reloadWeights(model, weights, options);
  assert.ok(r.storageKept, "storage kept");
  assert.deepEqual(pointers(model), before, "no kernel tensor moved");
  return downloadKernelTensors(model);
}

/**
 * The kernel tensors a first load of a block-fp8 checkpoint must give, from its tensors alone:
 * each fused weight is its shards' fp8 rows concatenated, its scale their scale rows.
 */
function blockFp8Kernel(ckpt: Tensors, numLayers: number): Tensors {
  const out = new Map<string, HostTensor>();
  const get = (n: string) => ckpt.get(n)!;
  for (const [name, t] of ckpt) {
    if (t.dtype !== DTYPES.f8_e4m3fn && !name.endsWith("_scale_inv")) out.set(name, t);
  }
  for (let i = 0; i < numLayers; i++) {
    const p = `model.layers.${i}`;
    const fused: [string, string[]][] = [
      [`${p}.self_attn.qkv_proj`, ["q", "k", "v"].map((x) => `${p}.self_attn.${x}_proj`)],
      [`${p}.mlp.gate_up_proj`, ["gate", "up"].map((x) => `${p}.mlp.${x}_proj`)],
      [`${p}.self_attn.o_proj`, [`${p}.self_attn.o_proj`]],
      [`${p}.mlp.down_proj`, [`${p}.mlp.down_proj`]],
    ];
    for (const [to, from] of fused) {
      out.set(`${to}.weight`, catHost(0, from.map((f) => get(`${f}.weight`))));
      out.set(`${to}.weight_scale`, catHost(0, from.map((f) => get(`${f}.weight_scale_inv`))));
    }
  }
  return out;
}

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

async function cli(...args: string[]): Promise<Run> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", MAIN, "--backend", BACKEND, "--quiet", ...args],
    stdout: "piped",
    stderr: "piped",
    env: { NO_COLOR: "1" },
  }).output();
  const dec = new TextDecoder();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}

/** The error of a refused load: a CheckpointError of `code` in one line naming file and tensor. */
function refusal(code: string, file: string, tensor: string): (e: unknown) => boolean {
  return (e: unknown) => {
    assert.ok(e instanceof CheckpointError, `a CheckpointError, got ${e}`);
    assert.equal(e.code, code, e.message);
    assert.ok(!e.message.includes("\n"), `one line: ${e.message}`);
    assert.ok(e.message.includes(file), `names the file ${file}: ${e.message}`);
    assert.ok(e.message.includes(tensor), `names the tensor ${tensor}: ${e.message}`);
    return true;
  };
}

// ----------------------------------------------------------------------------------- config

Deno.test("qwen3 config: head_dim, q/k norms, experts, dense layers and quantization_config", async () => {
  const dense = await readModelConfig(`${CKPT}qwen3-tiny`);
  assert.equal(dense.architecture, "Qwen3ForCausalLM");
  assert.equal(dense.headDim, 128, "head_dim from config.json, not hidden / heads (64)");
  assert.equal(dense.qkNorm, true);
  assert.equal(dense.numExperts, 0);
  assert.deepEqual(dense.moeLayers, []);
  assert.equal(dense.quantization, null);
  assert.equal(quantScheme("auto", dense), "fp8-tensor");

  const moe = await readModelConfig(`${CKPT}qwen3-moe-tiny`);
  assert.equal(moe.architecture, "Qwen3MoeForCausalLM");
  assert.equal(moe.numExperts, 4, "num_local_experts");
  assert.equal(moe.moeIntermediateSize, 128);
  assert.deepEqual(moe.moeLayers, [0], "mlp_only_layers [1]: layer 1 is dense");

  const fp8 = await readModelConfig(`${CKPT}qwen3-tiny-fp8`);
  assert.deepEqual(fp8.quantization, { method: "fp8", weightBlockSize: [128, 128] });
  assert.equal(quantScheme("auto", fp8), "fp8-block");
  assert.equal(quantScheme("fp8", fp8), "fp8-tensor", "an explicit choice wins");

  const raw = JSON.parse(await Deno.readTextFile(`${CKPT}qwen3-moe-tiny/config.json`));
  // Released Qwen3-MoE configs say num_experts; both agreeing is fine, disagreeing is not.
  const released = { ...raw, num_experts: 4 };
  delete released.num_local_experts;
  assert.equal(parseModelConfig(released).numExperts, 4);
  assert.throws(
    () => parseModelConfig({ ...raw, num_experts: 8 }),
    /config\.json: field num_local_experts is 4 but num_experts is 8/,
  );
  const sparse = { ...raw, num_hidden_layers: 6, mlp_only_layers: [4], decoder_sparse_step: 2 };
  assert.deepEqual(parseModelConfig(sparse).moeLayers, [1, 3, 5]);
  assert.throws(
    () => parseModelConfig({ ...raw, mlp_only_layers: [-1] }),
    /field mlp_only_layers is .*-1.*, expected a list of layer indices/,
  );
  const q = JSON.parse(await Deno.readTextFile(`${CKPT}qwen3-tiny-fp8/config.json`));
  const perTensor = { ...q, quantization_config: { quant_method: "fp8" } };
  assert.deepEqual(parseModelConfig(perTensor).quantization, {
    method: "fp8",
    weightBlockSize: null,
  });
  assert.equal(quantScheme("auto", parseModelConfig(perTensor)), "fp8-serialized");
  for (
    const [qc, field] of [
      [{ quant_method: "awq" }, "quantization_config.quant_method"],
      [
        { quant_method: "fp8", weight_block_size: [64, 64] },
        "quantization_config.weight_block_size",
      ],
      [{ quant_method: "fp8", fmt: "e5m2" }, "quantization_config.fmt"],
    ] as const
  ) {
    assert.throws(
      () => parseModelConfig({ ...q, quantization_config: qc }),
      (e: unknown) =>
        e instanceof LayerwiseError && e.code === "BAD_CONFIG" &&
        e.message.includes(`config.json: field ${field} is `),
    );
  }
});

Deno.test("qwen3 names: expectedCheckpointNames lists exactly each fixture's tensors", async () => {
  for (const name of ["qwen3-tiny", "qwen3-moe-tiny", "qwen3-tiny-fp8"]) {
    const c = await readModelConfig(`${CKPT}${name}`);
    const names = [...(await fixture(name)).keys()];
    assert.deepEqual(
      expectedCheckpointNames(c).sort(),
      names.filter((n) => !n.endsWith("_scale_inv")).sort(),
      name,
    );
  }
});

// ----------------------------------------------------------------------- exports and reloads

const CASES: [string, QuantName, string][] = [
  ["qwen3-tiny", "fp8", "qwen3-tiny.fp8-tensor"],
  ["qwen3-moe-tiny", "fp8", "qwen3-moe-tiny.fp8-tensor"],
  ["qwen3-tiny", "fp8-block", "qwen3-tiny.fp8-block"],
  ["qwen3-tiny-fp8", "auto", "qwen3-tiny-fp8.fp8-block"],
  ["qwen3-tiny-fp8", "fp8-block", "qwen3-tiny-fp8.fp8-block"],
];

Deno.test("qwen3 e2e: --export equals the PyTorch expectation for every case", async () => {
  await withTemp(async (tmp) => {
    for (const [name, quant, expect] of CASES) {
      const out = `${tmp}/${name}.${quant}.safetensors`;
      const r = await cli("--model", `${CKPT}${name}`, "--quant", quant, "--export", out);
      assert.equal(r.code, 0, `${name} ${quant}: exit ${r.code}\n${r.stderr}`);
      assert.equal(r.stderr, "", `${name} ${quant}: nothing on stderr`);
      const want = await expectation(expect);
      assertSame(await loadSafetensors(out), want, `${name} --quant ${quant}`);
    }
    // auto is the default: `deno task reload --model <block-fp8 checkpoint>` as it is.
    const out = `${tmp}/default.safetensors`;
    const r = await cli("--model", `${CKPT}qwen3-tiny-fp8`, "--export", out);
    assert.equal(r.code, 0, r.stderr);
    assertSame(
      await loadSafetensors(out),
      await expectation("qwen3-tiny-fp8.fp8-block"),
      "default",
    );
  });
});

Deno.test("qwen3: a reload A -> B equals a first load of B, and B -> A the expectation again", async () => {
  await withTemp(async (tmp) => {
    for (const [name, quant, expect] of CASES) {
      const label = `${name} ${quant}`;
      const a = await fixture(name);
      const c = await readModelConfig(`${CKPT}${name}`);
      const b = modified(a);
      const dirB = await writeCheckpoint(`${tmp}/${name}-${quant}-b`, name, b);
      const want = await expectation(expect);
      const model = await load(`${CKPT}${name}`, quant);
      try {
        assertSame(downloadKernelTensors(model), want, `${label}: first load`);
        const got = await reloadExport(model, dirB);
        assert.ok(differs(got, want), `${label}: B differs from A`);
        const fresh = await load(dirB, quant);
        try {
          assertSame(got, downloadKernelTensors(fresh), `${label}: A -> B vs first load of B`);
        } finally {
          freeModel(fresh);
        }
        if (c.quantization !== null) {
          // The kernel tensors of a block-fp8 checkpoint are its own bytes, concatenated.
          assertSame(got, blockFp8Kernel(b, c.numLayers), `${label}: B's bytes, concatenated`);
        }
        assertSame(await reloadExport(model, `${CKPT}${name}`), want, `${label}: B -> A`);
      } finally {
        freeModel(model);
      }
    }
  });
});

Deno.test("qwen3: every quantization reloads A -> B to the bytes of a first load of B", async () => {
  await withTemp(async (tmp) => {
    for (const name of ["qwen3-tiny", "qwen3-moe-tiny"]) {
      const dirB = await writeCheckpoint(`${tmp}/${name}`, name, modified(await fixture(name)));
      for (const quant of ["none", "fp8-channel", "int8", "fp8-block"] as QuantName[]) {
        const model = await load(`${CKPT}${name}`, quant);
        const fresh = await load(dirB, quant);
        try {
          const a = downloadKernelTensors(model);
          const got = await reloadExport(model, dirB);
          assert.ok(differs(got, a), `${name} ${quant}: B differs`);
          assertSame(got, downloadKernelTensors(fresh), `${name} ${quant}`);
        } finally {
          freeModel(model);
          freeModel(fresh);
        }
      }
    }
  });
});

Deno.test("qwen3 block-fp8: bf16 and block-fp8 checkpoints reload into the same model, both ways", async () => {
  await withTemp(async (tmp) => {
    const bf16Want = await expectation("qwen3-tiny.fp8-block");
    const fp8Want = await expectation("qwen3-tiny-fp8.fp8-block");
    const bf16B = await writeCheckpoint(
      `${tmp}/bf16-b`,
      "qwen3-tiny",
      modified(await fixture("qwen3-tiny")),
    );
    const fp8BTensors = modified(await fixture("qwen3-tiny-fp8"));
    const fp8B = await writeCheckpoint(`${tmp}/fp8-b`, "qwen3-tiny-fp8", fp8BTensors);
    const bf16BWant = await (async () => {
      const m = await load(bf16B, "fp8-block");
      try {
        return downloadKernelTensors(m);
      } finally {
        freeModel(m);
      }
    })();

    // First loaded from the block-fp8 checkpoint (auto), then bf16 checkpoints.
    const fromFp8 = await load(`${CKPT}qwen3-tiny-fp8`, "auto");
    try {
      assert.equal(fromFp8.quant, "fp8-block");
      assertSame(await reloadExport(fromFp8, `${CKPT}qwen3-tiny`), bf16Want, "fp8 model <- bf16 A");
      assertSame(await reloadExport(fromFp8, bf16B), bf16BWant, "fp8 model <- bf16 B");
      assertSame(await reloadExport(fromFp8, `${CKPT}qwen3-tiny-fp8`), fp8Want, "<- fp8 A");
    } finally {
      freeModel(fromFp8);
    }
    // First loaded from bf16, then block-fp8 checkpoints.
    const fromBf16 = await load(`${CKPT}qwen3-tiny`, "fp8-block");
    try {
      assertSame(
        await reloadExport(fromBf16, `${CKPT}qwen3-tiny-fp8`),
        fp8Want,
        "bf16 model <- fp8 A",
      );
      assertSame(
        await reloadExport(fromBf16, fp8B),
        blockFp8Kernel(fp8BTensors, 2),
        "bf16 model <- fp8 B",
      );
      // Tensors over the chunk size arrive as row windows: the same bytes.
      const small = { readChunkBytes: 4096 };
      assertSame(
        await reloadExport(fromBf16, `${CKPT}qwen3-tiny`, small),
        bf16Want,
        "bf16 in rows",
      );
      assertSame(
        await reloadExport(fromBf16, `${CKPT}qwen3-tiny-fp8`, small),
        fp8Want,
        "fp8 in rows",
      );
    } finally {
      freeModel(fromBf16);
    }
  });
});

Deno.test("qwen3 block-fp8: one checkpoint may mix fp8 and bf16 shards of a fused layer", async () => {
  const bf16 = await fixture("qwen3-tiny");
  const fp8 = modified(await fixture("qwen3-tiny-fp8"));
  const mixed = new Map(bf16);
  for (let i = 0; i < 2; i++) {
    // An fp8 shard before bf16 ones (q; k, v) and after one (gate; up).
    for (const x of ["self_attn.q_proj", "mlp.up_proj"]) {
      for (const suffix of ["weight", "weight_scale_inv"]) {
        const name = `model.layers.${i}.${x}.${suffix}`;
        mixed.set(name, fp8.get(name)!);
      }
    }
  }
  const e = await expectation("qwen3-tiny.fp8-block");
  const f = blockFp8Kernel(fp8, 2);
  const want = new Map(e);
  for (let i = 0; i < 2; i++) {
    const p = `model.layers.${i}`;
    const rows = (t: Tensors, n: string, at: number, len: number) =>
      narrowHost(t.get(n)!, 0, at, len);
    for (
      const [n, fpRows, all] of [[`${p}.self_attn.qkv_proj`, [0, 512], 1024], [
        `${p}.mlp.gate_up_proj`,
        [256, 512],
        512,
      ]] as const
    ) {
      const [a, z] = fpRows;
      const pick = (suffix: string, unit: number) => {
        const name = `${n}.${suffix}`;
        const parts = [];
        if (a > 0) parts.push(rows(want, name, 0, a / unit));
        parts.push(rows(f, name, a / unit, (z - a) / unit));
        if (z < all) parts.push(rows(want, name, z / unit, (all - z) / unit));
        want.set(name, catHost(0, parts));
      };
      pick("weight", 1);
      pick("weight_scale", 128);
    }
  }
  const model = await load(`${CKPT}qwen3-tiny`, "fp8-block");
  try {
    for (const options of [{}, { readChunkBytes: 4096 }]) {
      const got = await reloadExport(model, [...mixed], options);
      assert.ok(differs(got, e), "some shards changed");
      assertSame(got, want, "mixed shards");
    }
  } finally {
    freeModel(model);
  }
});

// ---------------------------------------------------------------------------------- refusals

Deno.test("qwen3 block-fp8: malformed checkpoints are refused before any write, one line naming file and tensor", async () => {
  await withTemp(async (tmp) => {
    const a = await fixture("qwen3-tiny-fp8");
    const model = await load(`${CKPT}qwen3-tiny-fp8`, "auto");
    try {
      const before = downloadKernelTensors(model);
      const bad = async (
        label: string,
        edit: (t: Tensors) => void,
        code: string,
        tensor: string,
      ) => {
        const t = modified(a); // valid values, so only the edit is wrong
        edit(t);
        const dir = await writeCheckpoint(`${tmp}/${label}`, "qwen3-tiny-fp8", t);
        await assert.rejects(
          () => reloadWeights(model, dir),
          refusal(code, `${dir}/model.safetensors`, tensor),
          label,
        );
        assertSame(downloadKernelTensors(model), before, `${label}: nothing written`);
        // A first load of it is refused the same way, and so is the CLI, in one line.
        await assert.rejects(() => load(dir, "auto"), refusal(code, dir, tensor));
        const r = await cli("--model", dir);
        assert.equal(r.code, 1, `${label}: CLI exit`);
        assert.match(r.stderr, new RegExp(`^error: .*${tensor.replaceAll(".", "\\.")}.*\n$`));
      };
      const scale = "model.layers.1.self_attn.k_proj.weight_scale_inv";
      await bad(
        "wrong-scale-shape",
        (t) => {
          t.set(scale, { dtype: DTYPES.f32, shape: [2, 3], data: new Uint8Array(24).fill(60) });
        },
        "SHAPE_MISMATCH",
        scale,
      );
      await bad(
        "missing-scale",
        (t) => t.delete("model.layers.1.mlp.up_proj.weight_scale_inv"),
        "MISSING_TENSOR",
        "model.layers.1.mlp.up_proj.weight",
      );
      const o = "model.layers.0.self_attn.o_proj.weight";
      await bad(
        "bf16-weight",
        (t) => {
          const w = t.get(o)!;
          t.set(o, { dtype: DTYPES.bf16, shape: w.shape, data: new Uint8Array(w.data.length * 2) });
        },
        "DTYPE_MISMATCH",
        o,
      );
      await bad(
        "f32-weight-scale-dtype",
        (t) => {
          t.set(scale, { dtype: DTYPES.f16, shape: [2, 2], data: new Uint8Array(8) });
        },
        "DTYPE_MISMATCH",
        scale,
      );
    } finally {
      freeModel(model);
    }
  });
});

Deno.test("qwen3 block-fp8: a block-fp8 checkpoint into a per-tensor model is refused, naming file and tensor", async () => {
  const model = await load(`${CKPT}qwen3-tiny`, "fp8");
  try {
    const before = downloadKernelTensors(model);
    const file = `${CKPT}qwen3-tiny-fp8/model.safetensors`;
    await assert.rejects(
      () => reloadWeights(model, `${CKPT}qwen3-tiny-fp8`),
      (e: unknown) =>
        refusal("QUANT_MISMATCH", file, "model.layers.")(e) &&
        /needs? .*(per 128x128 block|--quant auto)/.test((e as Error).message),
    );
    assertSame(downloadKernelTensors(model), before, "nothing written");
  } finally {
    freeModel(model);
  }
  const r = await cli("--model", `${CKPT}qwen3-tiny-fp8`, "--quant", "fp8-channel");
  assert.equal(r.code, 1);
  assert.match(
    r.stderr,
    /^error: \S+qwen3-tiny-fp8\/model\.safetensors: "model\.layers\.\S+": .*\n$/,
  );
});

Deno.test("qwen3 block-fp8: a scale that is not positive is refused; with atomic the model is as before", async () => {
  const t = modified(await fixture("qwen3-tiny-fp8"));
  const name = "model.layers.1.mlp.gate_proj.weight_scale_inv";
  const s = t.get(name)!;
  const v = new Float32Array(s.data.slice().buffer);
  v[3] = 0;
  t.set(name, { ...s, data: new Uint8Array(v.buffer) });
  const model = await load(`${CKPT}qwen3-tiny-fp8`, "auto");
  try {
    const before = downloadKernelTensors(model);
    await assert.rejects(
      () => reloadWeights(model, [...t], { atomic: true }),
      (e: unknown) =>
        e instanceof CheckpointError && e.code === "BAD_SCALE" && !e.message.includes("\n") &&
        /^in-memory tensors: model\.layers\.1\.mlp\.\S+: weight_scale of shard 0: block-fp8 scales must be positive and finite, got 0$/
          .test(e.message),
    );
    assertSame(downloadKernelTensors(model), before, "restored");
    assertSame(
      await reloadExport(model, `${CKPT}qwen3-tiny`),
      await expectation("qwen3-tiny.fp8-block"),
      "usable",
    );
  } finally {
    freeModel(model);
  }
});

// ------------------------------------------------------------------- merged expert names

/** transformers 5's merged experts of per-expert tensors: gate_up_proj [E, 2I, H], down_proj [E, H, I]. */
function mergeExperts(
  t: Tensors,
  layers: number[],
  experts: number,
  from: (l: number) => string,
  shards: [string, string, string],
  to: (l: number) => string,
): Tensors {
  const out = new Map(t);
  const unsqueeze = (x: HostTensor) => ({ ...x, shape: [1, ...x.shape] });
  for (const l of layers) {
    const gateUp: HostTensor[] = [], down: HostTensor[] = [];
    for (let e = 0; e < experts; e++) {
      const [g, u, d] = shards.map((s) => `${from(l)}.${e}.${s}.weight`);
      gateUp.push(unsqueeze(catHost(0, [t.get(g)!, t.get(u)!])));
      down.push(unsqueeze(t.get(d)!));
      for (const n of [g, u, d]) out.delete(n);
    }
    out.set(`${to(l)}.gate_up_proj`, catHost(0, gateUp));
    out.set(`${to(l)}.down_proj`, catHost(0, down));
  }
  return out;
}

Deno.test("qwen3-moe: a reload from transformers 5's merged expert names equals one from per-expert names", async () => {
  const b = modified(await fixture("qwen3-moe-tiny"));
  const experts = (l: number) => `model.layers.${l}.mlp.experts`;
  const merged = mergeExperts(b, [0], 4, experts, ["gate_proj", "up_proj", "down_proj"], experts);
  assert.ok(merged.has("model.layers.0.mlp.experts.gate_up_proj"));
  for (const quant of ["fp8", "fp8-block", "none"] as QuantName[]) {
    const model = await load(`${CKPT}qwen3-moe-tiny`, quant);
    try {
      const a = downloadKernelTensors(model);
      const perExpert = await reloadExport(model, [...b]);
      assert.ok(differs(perExpert, a), `${quant}: B differs from A`);
      await reloadExport(model, `${CKPT}qwen3-moe-tiny`);
      // In row windows too: merged tensors are split by experts as their rows arrive.
      for (const options of [{}, { readChunkBytes: 40000 }]) {
        assertSame(await reloadExport(model, [...merged], options), perExpert, `${quant} merged`);
        await reloadExport(model, `${CKPT}qwen3-moe-tiny`);
      }
    } finally {
      freeModel(model);
    }
  }
});

Deno.test("qwen3-moe: a first load of many experts under merged names (more experts than tensors)", async () => {
  await withTemp(async (tmp) => {
    // 2 layers x 64 experts, held in 25 tensors when merged: the config's sizes are bounded by
    // the checkpoint all the same (a stacked tensor counts as its experts).
    const raw = JSON.parse(await Deno.readTextFile(`${CKPT}qwen3-moe-tiny/config.json`));
    const cfg = {
      ...raw,
      hidden_size: 64,
      num_attention_heads: 2,
      num_key_value_heads: 1,
      head_dim: 32,
      intermediate_size: 64,
      moe_intermediate_size: 16,
      num_local_experts: 64,
      mlp_only_layers: [],
      vocab_size: 64,
    };
    const c = parseModelConfig(cfg);
    const next = rng(5);
    const t = (shape: number[]): HostTensor => {
      const n = shape.reduce((a, b) => a * b, 1);
      const bits = new Uint16Array(n).map(() => bf16Bits(0.05 * (next() - 0.5)));
      return { dtype: DTYPES.bf16, shape, data: new Uint8Array(bits.buffer) };
    };
    const perExpert = new Map<string, HostTensor>();
    for (const name of expectedCheckpointNames(c)) {
      const [h, i, e, d] = [64, 16, 64, 32];
      const shape = name.endsWith("norm.weight")
        ? [/q_norm|k_norm/.test(name) ? d : h]
        : /embed_tokens|lm_head/.test(name)
        ? [64, h]
        : /q_proj/.test(name)
        ? [2 * d, h]
        : /[kv]_proj/.test(name)
        ? [d, h]
        : /o_proj/.test(name)
        ? [h, 2 * d]
        : /mlp\.gate\./.test(name)
        ? [e, h]
        : /(gate|up)_proj/.test(name)
        ? [i, h]
        : [h, i];
      perExpert.set(name, t(shape));
    }
    const experts = (l: number) => `model.layers.${l}.mlp.experts`;
    const merged = mergeExperts(perExpert, [0, 1], 64, experts, [
      "gate_proj",
      "up_proj",
      "down_proj",
    ], experts);
    assert.ok(merged.size < 2 * 64, `${merged.size} tensors`);
    const write = async (name: string, ts: Tensors) => {
      const dir = `${tmp}/${name}`;
      await Deno.mkdir(dir);
      await Deno.writeFile(
        `${dir}/model.safetensors`,
        encodeSafetensors([...ts], { format: "pt" }),
      );
      await Deno.writeTextFile(`${dir}/config.json`, JSON.stringify(cfg));
      return dir;
    };
    const a = await load(await write("merged", merged), "fp8");
    const b = await load(await write("per-expert", perExpert), "fp8");
    try {
      assertSame(downloadKernelTensors(a), downloadKernelTensors(b), "merged vs per-expert");
    } finally {
      freeModel(a);
      freeModel(b);
    }
  });
});

Deno.test("mixtral: merged expert names (block_sparse_moe or transformers 5's mlp) equal per-expert names", async () => {
  const b = modified(await fixture("mixtral-tiny"));
  const c = await readModelConfig(`${CKPT}mixtral-tiny`);
  const layers = Array.from({ length: c.numLayers }, (_, i) => i);
  const old = (l: number) => `model.layers.${l}.block_sparse_moe.experts`;
  const v5 = (l: number) => `model.layers.${l}.mlp.experts`;
  const w = ["w1", "w3", "w2"] as [string, string, string];
  const mergedOld = mergeExperts(b, layers, c.numExperts, old, w, old);
  const mergedV5 = new Map(
    [...mergeExperts(b, layers, c.numExperts, old, w, v5)].map(([n, t]) => [
      n.replace(/\.block_sparse_moe\.gate\./, ".mlp.gate."),
      t,
    ]),
  );
  assert.ok(mergedV5.has("model.layers.0.mlp.gate.weight"));
  const model = await load(`${CKPT}mixtral-tiny`, "fp8");
  try {
    const perExpert = await reloadExport(model, [...b]);
    for (const [label, merged] of [["block_sparse_moe", mergedOld], ["mlp", mergedV5]] as const) {
      await reloadExport(model, `${CKPT}mixtral-tiny`);
      assertSame(await reloadExport(model, [...merged], { strict: true }), perExpert, label);
    }
  } finally {
    freeModel(model);
  }
});

Deno.test("qwen3-moe: merged experts of the wrong shape are refused before any write", async () => {
  const b = modified(await fixture("qwen3-moe-tiny"));
  const experts = (l: number) => `model.layers.${l}.mlp.experts`;
  const merged = mergeExperts(b, [0], 4, experts, ["gate_proj", "up_proj", "down_proj"], experts);
  const name = "model.layers.0.mlp.experts.gate_up_proj";
  const gu = merged.get(name)!;
  merged.set(name, narrowHost(gu, 1, 0, 128)); // [E, I, H]: the up rows are missing
  const model = await load(`${CKPT}qwen3-moe-tiny`, "fp8");
  try {
    const before = downloadKernelTensors(model);
    await assert.rejects(
      () => reloadWeights(model, [...merged]),
      refusal("SHAPE_MISMATCH", "in-memory", name),
    );
    assertSame(downloadKernelTensors(model), before, "nothing written");
  } finally {
    freeModel(model);
  }
});

// ------------------------------------------------------------------------ tensor parallelism

/** A block scale [ceil(R/128), ceil(C/128)] as one f32 per element of its [R, C] weight. */
function expandBlocks(s: HostTensor, rows: number, cols: number): HostTensor {
  const src = new Float32Array(s.data.slice().buffer);
  const out = new Float32Array(rows * cols);
  const bc = s.shape[1];
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) out[r * cols + c] = src[(r >> 7) * bc + (c >> 7)];
  }
  return { dtype: DTYPES.f32, shape: [rows, cols], data: new Uint8Array(out.buffer) };
}

/** Back from one f32 per element to one per 128x128 block (its first element). */
function sampleBlocks(t: HostTensor): HostTensor {
  const [rows, cols] = t.shape;
  const src = new Float32Array(t.data.slice().buffer);
  const br = Math.ceil(rows / 128), bc = Math.ceil(cols / 128);
  const out = new Float32Array(br * bc);
  for (let i = 0; i < br; i++) {
    for (let j = 0; j < bc; j++) out[i * bc + j] = src[i * 128 * cols + j * 128];
  }
  return { dtype: DTYPES.f32, shape: [br, bc], data: new Uint8Array(out.buffer) };
}

Deno.test("qwen3 tp: block-fp8 on 2 WASM ranks holds the shards of the one-rank kernel tensors, from either checkpoint", async () => {
  const c = await readModelConfig(`${CKPT}qwen3-tiny-fp8`);
  const ranks = await openRankBackends(2, "wasm");
  try {
    for (const [dir, quant] of [["qwen3-tiny-fp8", "auto"], ["qwen3-tiny", "fp8-block"]] as const) {
      // One rank: the PyTorch expectation (tests above); its shards are what each rank holds.
      const full = await expectation("qwen3-tiny-fp8.fp8-block");
      const models = await loadTensorParallel(`${CKPT}${dir}`, ranks, { quant });
      try {
        for (let r = 0; r < 2; r++) {
          const got = downloadKernelTensors(models[r]);
          assert.deepEqual([...got.keys()].sort(), [...full.keys()].sort(), `${dir} rank ${r}`);
          for (const [name, g] of got) {
            if (name.endsWith(".weight_scale")) {
              const wName = name.slice(0, -"_scale".length);
              const [rows, cols] = full.get(wName)!.shape;
              const rule = shardRule(wName, c, 2);
              const want = sampleBlocks(
                expectedShard(expandBlocks(full.get(name)!, rows, cols), rule, c, 2, r),
              );
              assertContains(new Map([[name, g]]), new Map([[name, want]]), `${dir} rank ${r}`);
              continue;
            }
            const want = expectedShard(full.get(name)!, shardRule(name, c, 2), c, 2, r);
            assertContains(new Map([[name, g]]), new Map([[name, want]]), `${dir} rank ${r}`);
          }
        }
      } finally {
        for (const m of models) freeModel(m);
      }
    }
    // Four ranks would cut down_proj's 256 input columns into 64: not whole blocks.
    const four = await openRankBackends(4, "wasm");
    try {
      await assert.rejects(
        () => loadTensorParallel(`${CKPT}qwen3-tiny-fp8`, four, { quant: "auto" }),
        (e: unknown) =>
          e instanceof CheckpointError && e.code === "BLOCK_ALIGNMENT" &&
          e.message.includes("model.layers.0.mlp.down_proj.weight") && !e.message.includes("\n"),
      );
      for (const b of four) assert.equal(b.allocatedBytes(), 0, "nothing left allocated");
    } finally {
      for (const b of four) b.close();
    }
  } finally {
    for (const b of ranks) {
      assert.equal(b.allocatedBytes(), 0, "nothing leaked");
      b.close();
    }
  }
});

Deno.test("qwen3 fp8 per tensor: --quant auto loads a per-tensor fp8 checkpoint as fp8-serialized", async () => {
  await withTemp(async (dir) => {
    // qwen3-tiny with every decoder linear quantized per tensor, as such checkpoints ship.
    const a = await fixture("qwen3-tiny");
    const out: [string, HostTensor][] = [];
    for (const [name, t] of a) {
      if (!/\.(q|k|v|o|gate|up|down)_proj\.weight$/.test(name)) {
        out.push([name, t]);
        continue;
      }
      const src = backend.empty(t.shape, t.dtype);
      const q = backend.empty(t.shape, DTYPES.f8_e4m3fn);
      const s = backend.empty([1], DTYPES.f32);
      try {
        backend.upload(src, t.data);
        backend.quantizeFp8(q, s, src, "tensor", true);
        out.push([name, { dtype: DTYPES.f8_e4m3fn, shape: t.shape, data: backend.download(q) }]);
        out.push([`${name}_scale`, { dtype: DTYPES.f32, shape: [], data: backend.download(s) }]);
      } finally {
        for (const x of [src, q, s]) backend.free(x.storage!);
      }
    }
    const ckpt = new Map(out);
    await writeCheckpoint(dir, "qwen3-tiny", out);
    const config = JSON.parse(await Deno.readTextFile(`${dir}/config.json`));
    config.quantization_config = { quant_method: "fp8", activation_scheme: "dynamic" };
    await Deno.writeTextFile(`${dir}/config.json`, JSON.stringify(config));
    const model = await load(dir, "auto");
    try {
      assert.equal(model.quant, "fp8-serialized");
      const got = downloadKernelTensors(model);
      const f32 = (t: HostTensor) => new Float32Array(t.data.slice().buffer)[0];
      for (let i = 0; i < 2; i++) {
        const p = `model.layers.${i}`;
        // A tensor alone keeps its bytes and scale.
        for (const x of ["self_attn.o_proj", "mlp.down_proj"]) {
          assertContains(got, new Map([[`${p}.${x}.weight`, ckpt.get(`${p}.${x}.weight`)!]]), x);
          assert.equal(
            f32(got.get(`${p}.${x}.weight_scale`)!),
            f32(ckpt.get(`${p}.${x}.weight_scale`)!),
          );
        }
        // A fused one gets the largest shard scale; the shard that has it keeps its bytes.
        const shards = ["q", "k", "v"].map((x) => `${p}.self_attn.${x}_proj`);
        const scales = shards.map((s) => f32(ckpt.get(`${s}.weight_scale`)!));
        const max = Math.max(...scales);
        assert.equal(f32(got.get(`${p}.self_attn.qkv_proj.weight_scale`)!), max);
        const at = scales.indexOf(max);
        const rows = [512, 256, 256];
        const start = rows.slice(0, at).reduce((x, y) => x + y, 0);
        const fused = got.get(`${p}.self_attn.qkv_proj.weight`)!;
        assert.ok(
          equalBytes(
            narrowHost(fused, 0, start, rows[at]).data,
            ckpt.get(`${shards[at]}.weight`)!.data,
          ),
          "the shard with the largest scale is stored as it came",
        );
      }
    } finally {
      freeModel(model);
    }
  });
});

/** A checkpoint's decoder linears quantized per 128x128 block, as block-fp8 checkpoints ship. */
function blockQuantize(ts: Tensors): Tensors {
  const out = new Map<string, HostTensor>();
  for (const [name, t] of ts) {
    if (!/_proj\.weight$/.test(name)) {
      out.set(name, t);
      continue;
    }
    const [q, s] = quantizeBlock128(backend, t);
    out.set(name, q);
    out.set(`${name}_scale_inv`, s);
  }
  return out;
}

Deno.test("qwen3-moe block-fp8: experts of a block-fp8 checkpoint are their fp8 and scale rows, stacked", async () => {
  await withTemp(async (tmp) => {
    const fp8 = blockQuantize(await fixture("qwen3-moe-tiny"));
    const dir = await writeCheckpoint(tmp, "qwen3-moe-tiny", fp8);
    const config = JSON.parse(await Deno.readTextFile(`${dir}/config.json`));
    config.quantization_config = { quant_method: "fp8", weight_block_size: [128, 128] };
    await Deno.writeTextFile(`${dir}/config.json`, JSON.stringify(config));
    const model = await load(dir, "auto");
    try {
      assert.equal(model.quant, "fp8-block");
      const got = downloadKernelTensors(model);
      // Written out here: expert e of w13 is gate_e's rows then up_e's, w2's is down_e.
      const p = "model.layers.0.mlp.experts";
      const stack = (suffix: string, shards: string[]) =>
        catHost(
          0,
          [0, 1, 2, 3].map((e) => {
            const m = catHost(0, shards.map((x) => fp8.get(`${p}.${e}.${x}_proj.${suffix}`)!));
            return { ...m, shape: [1, ...m.shape] };
          }),
        );
      const want = new Map([
        [`${p}.w13_weight`, stack("weight", ["gate", "up"])],
        [`${p}.w13_weight_scale`, stack("weight_scale_inv", ["gate", "up"])],
        [`${p}.w2_weight`, stack("weight", ["down"])],
        [`${p}.w2_weight_scale`, stack("weight_scale_inv", ["down"])],
      ]);
      assertContains(got, want, "stacked experts");
      // The same bytes as quantizing the bf16 checkpoint per block, and reloads either way.
      const bf16 = await load(`${CKPT}qwen3-moe-tiny`, "fp8-block");
      try {
        const fromBf16 = downloadKernelTensors(bf16);
        assertSame(got, fromBf16, "block-fp8 checkpoint vs bf16 quantized per block");
        assertSame(await reloadExport(bf16, dir), fromBf16, "bf16 model <- block-fp8");
      } finally {
        freeModel(bf16);
      }
      const b = modified(await fixture("qwen3-moe-tiny"));
      const fromB = await reloadExport(model, [...b]);
      assert.ok(differs(fromB, got));
      assertSame(await reloadExport(model, dir), got, "back to the block-fp8 checkpoint");
    } finally {
      freeModel(model);
    }
  });
});

Deno.test("block-fp8: shards that do not start on a block are refused, naming file and tensor", async () => {
  await withTemp(async (tmp) => {
    // llama-tiny: gate rows 176 (up starts inside a block), q rows 64 (k starts inside one).
    const dir = await writeCheckpoint(
      tmp,
      "llama-tiny",
      blockQuantize(await fixture("llama-tiny")),
    );
    const config = JSON.parse(await Deno.readTextFile(`${dir}/config.json`));
    config.quantization_config = { quant_method: "fp8", weight_block_size: [128, 128] };
    await Deno.writeTextFile(`${dir}/config.json`, JSON.stringify(config));
    await assert.rejects(
      () => load(dir, "auto"),
      refusal(
        "BLOCK_ALIGNMENT",
        `${dir}/model.safetensors`,
        "model.layers.0.mlp.gate_proj.weight",
      ),
    );
  });
});

Deno.test("qwen3: cleanup", () => {
  releaseStaging(backend); // the pinned ring CUDA keeps between staged reads
  assert.equal(backend.allocatedBytes(), 0, "nothing leaked");
  backend.close();
});

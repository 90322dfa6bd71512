import assert from "node:assert/strict";
import { CheckpointError } from "../src/errors.ts";
import { DTYPES } from "../src/tensor/dtype.ts";
import {
  encodeSafetensors,
  type HostTensor,
  loadSafetensors,
  writeSafetensors,
} from "../src/checkpoint/safetensors.ts";
import { INDEX_FILE, openCheckpoint } from "../src/checkpoint/sharded.ts";
import { memorySource, openWeightSource, type WeightSource } from "../src/checkpoint/source.ts";

const CKPT = new URL("../../shared/fixtures/ckpt/", import.meta.url);
const path = (u: URL): string => decodeURIComponent(u.pathname).replace(/\/$/, "");
const SHARDED = path(new URL("llama-tiny-sharded/", CKPT));
const SINGLE = path(new URL("llama-tiny/", CKPT));

interface Index {
  metadata: { total_size: number };
  weight_map: Record<string, string>;
}

async function readIndex(dir: string): Promise<Index> {
  return JSON.parse(await Deno.readTextFile(`${dir}/${INDEX_FILE}`));
}

// Layer order as a model would give it: embeddings, layers 0.., then the rest.
function layerOrder(name: string): number {
  const m = /\.layers\.(\d+)\./.exec(name);
  if (m !== null) return Number(m[1]);
  return name.includes("embed_tokens") ? -1 : 1e9;
}

async function copyDir(from: string): Promise<string> {
  const dir = await Deno.makeTempDir();
  for await (const e of Deno.readDir(from)) {
    await Deno.copyFile(`${from}/${e.name}`, `${dir}/${e.name}`);
  }
  return dir;
}

async function withCopy(from: string, f: (dir: string) => Promise<void>): Promise<void> {
  const dir = await copyDir(from);
  try {
    await f(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

async function rejectsWith(
  p: () => Promise<unknown>,
  code: string,
  ...mentions: string[]
): Promise<void> {
  await assert.rejects(p, (e) => {
    assert.ok(e instanceof CheckpointError, `expected CheckpointError ${code}, got ${e}`);
    assert.equal(e.code, code, e.message);
    assert.ok(!e.message.includes("\n"));
    for (const m of mentions) assert.ok(e.message.includes(m), `"${e.message}" lacks ${m}`);
    return true;
  });
}

Deno.test("the 14-shard fixture opens: every indexed tensor in its shard, total size as indexed", async () => {
  const index = await readIndex(SHARDED);
  for (const p of [SHARDED, `${SHARDED}/${INDEX_FILE}`]) {
    const ckpt = await openCheckpoint(p);
    assert.equal(ckpt.files.length, new Set(Object.values(index.weight_map)).size);
    assert.equal(ckpt.files.length, 14);
    assert.deepEqual([...ckpt.tensors.keys()].sort(), Object.keys(index.weight_map).sort());
    let total = 0;
    for (const [name, e] of ckpt.tensors) {
      assert.equal(e.file, `${SHARDED}/${index.weight_map[name]}`);
      total += e.end - e.begin;
    }
    assert.equal(total, index.metadata.total_size);
  }
});

Deno.test("single file and directory with model.safetensors open alike", async () => {
  const fromDir = await openCheckpoint(SINGLE);
  const fromFile = await openCheckpoint(`${SINGLE}/model.safetensors`);
  assert.equal(fromDir.index, null);
  assert.deepEqual(fromDir.files, [`${SINGLE}/model.safetensors`]);
  assert.deepEqual([...fromDir.tensors.keys()], [...fromFile.tensors.keys()]);
  const loaded = await loadSafetensors(`${SINGLE}/model.safetensors`);
  assert.deepEqual([...fromDir.tensors.keys()].sort(), [...loaded.keys()].sort());
});

function checkPlan(
  plan: { name: string; file: string; begin: number }[],
  files: readonly string[],
  key: (name: string) => number,
): void {
  const rank = new Map(files.map((f, i) => [f, i]));
  for (let i = 1; i < plan.length; i++) {
    const a = plan[i - 1], b = plan[i];
    const ka = key(a.name), kb = key(b.name);
    assert.ok(ka <= kb, `${a.name} before ${b.name}`);
    if (ka === kb) {
      const fa = rank.get(a.file)!, fb = rank.get(b.file)!;
      assert.ok(fa < fb || (fa === fb && a.begin < b.begin), `${a.name} / ${b.name}`);
    }
  }
}

Deno.test("readPlan follows the caller's layer order, then file, then offset", async () => {
  const ckpt = await openCheckpoint(SHARDED);
  const plan = ckpt.readPlan(layerOrder);
  assert.equal(plan.length, ckpt.tensors.size);
  checkPlan(plan, ckpt.files, layerOrder);
  assert.equal(layerOrder(plan[0].name), -1);
  // The fixture's shards happen to be in layer order; a reversed order (as when a model's
  // layers are numbered against the file layout) must still be followed.
  const reversed = (n: string) => -layerOrder(n);
  const back = ckpt.readPlan(reversed);
  checkPlan(back, ckpt.files, reversed);
  assert.equal(back[0].name, "model.norm.weight");
  assert.equal(back.at(-1)!.name, "model.embed_tokens.weight");
  // Within one file, the plan goes by offset even when names sort otherwise.
  const single = await openCheckpoint(SINGLE);
  checkPlan(single.readPlan(layerOrder), single.files, layerOrder);
  checkPlan(single.readPlan(), single.files, () => 0);
});

Deno.test("a shard missing from disk: MISSING_SHARD naming the index and the shard", async () => {
  await withCopy(SHARDED, async (dir) => {
    const index = await readIndex(dir);
    const shard = index.weight_map["model.norm.weight"];
    await Deno.remove(`${dir}/${shard}`);
    await rejectsWith(() => openCheckpoint(dir), "MISSING_SHARD", INDEX_FILE, shard);
  });
});

Deno.test("index naming a tensor its shard lacks: MISSING_TENSOR; a shard tensor not indexed: UNINDEXED_TENSOR", async () => {
  await withCopy(SHARDED, async (dir) => {
    const index = await readIndex(dir);
    const shard = index.weight_map["model.norm.weight"];
    index.weight_map["model.ghost.weight"] = shard;
    await Deno.writeTextFile(`${dir}/${INDEX_FILE}`, JSON.stringify(index));
    await rejectsWith(() => openCheckpoint(dir), "MISSING_TENSOR", '"model.ghost.weight"', shard);
  });
  await withCopy(SHARDED, async (dir) => {
    const index = await readIndex(dir);
    delete index.weight_map["model.norm.weight"];
    await Deno.writeTextFile(`${dir}/${INDEX_FILE}`, JSON.stringify(index));
    await rejectsWith(() => openCheckpoint(dir), "UNINDEXED_TENSOR", '"model.norm.weight"');
  });
});

Deno.test("index pointing at the wrong shard, or a tensor in two shards", async () => {
  await withCopy(SHARDED, async (dir) => {
    const index = await readIndex(dir);
    const right = index.weight_map["model.norm.weight"];
    const wrong = index.weight_map["model.embed_tokens.weight"];
    index.weight_map["model.norm.weight"] = wrong;
    await Deno.writeTextFile(`${dir}/${INDEX_FILE}`, JSON.stringify(index));
    await rejectsWith(
      () => openCheckpoint(dir),
      "INDEX_MISMATCH",
      '"model.norm.weight"',
      right,
      wrong,
    );
  });
  await withCopy(SHARDED, async (dir) => {
    const index = await readIndex(dir);
    const a = index.weight_map["model.norm.weight"];
    const b = index.weight_map["model.embed_tokens.weight"];
    // Re-write shard b with an extra copy of the norm weight.
    const extra = (await loadSafetensors(`${dir}/${a}`)).get("model.norm.weight")!;
    const bt = await loadSafetensors(`${dir}/${b}`);
    bt.set("model.norm.weight", extra);
    await writeSafetensors(`${dir}/${b}`, bt, { format: "pt" });
    await rejectsWith(() => openCheckpoint(dir), "DUPLICATE", '"model.norm.weight"', a, b);
  });
});

Deno.test("bad index files and paths: BAD_INDEX, NO_CHECKPOINT; a bad shard header names the shard", async () => {
  await withCopy(SHARDED, async (dir) => {
    await Deno.writeTextFile(`${dir}/${INDEX_FILE}`, "{not json");
    await rejectsWith(() => openCheckpoint(dir), "BAD_INDEX", INDEX_FILE);
    await Deno.writeTextFile(`${dir}/${INDEX_FILE}`, '{"weight_map": []}');
    await rejectsWith(() => openCheckpoint(dir), "BAD_INDEX", "weight_map");
    await Deno.writeTextFile(`${dir}/${INDEX_FILE}`, '{"weight_map": {"a": 3}}');
    await rejectsWith(() => openCheckpoint(dir), "BAD_INDEX", '"a"');
    await Deno.writeTextFile(`${dir}/${INDEX_FILE}`, '{"weight_map": {"a": "../x.safetensors"}}');
    await rejectsWith(() => openCheckpoint(dir), "BAD_INDEX", "outside");
  });
  await withCopy(SHARDED, async (dir) => {
    const index = await readIndex(dir);
    const shard = index.weight_map["model.norm.weight"];
    const bytes = await Deno.readFile(`${dir}/${shard}`);
    await Deno.writeFile(`${dir}/${shard}`, bytes.subarray(0, bytes.byteLength - 1));
    await rejectsWith(() => openCheckpoint(dir), "TRUNCATED", shard, '"model.norm.weight"');
  });
  const empty = await Deno.makeTempDir();
  try {
    await rejectsWith(() => openCheckpoint(empty), "NO_CHECKPOINT", empty);
    await rejectsWith(() => openCheckpoint(`${empty}/nope`), "NO_CHECKPOINT", "nope");
  } finally {
    await Deno.remove(empty, { recursive: true });
  }
});

// ---------------------------------------------------------------------------------------------
// Weight sources

async function drain(src: WeightSource): Promise<Map<string, HostTensor>> {
  const out = new Map<string, HostTensor>();
  for await (const { name, tensor } of src) out.set(name, tensor);
  return out;
}

Deno.test("file source: headers first, then bytes identical to the shard files, in any order and concurrently", async () => {
  const src = await openWeightSource(SHARDED);
  try {
    const index = await readIndex(SHARDED);
    assert.deepEqual([...src.tensors.keys()].sort(), Object.keys(index.weight_map).sort());
    const expected = new Map<string, HostTensor>();
    for (const shard of new Set(Object.values(index.weight_map))) {
      for (const [n, t] of await loadSafetensors(`${SHARDED}/${shard}`)) expected.set(n, t);
    }
    for (const [name, info] of src.tensors) {
      assert.equal(info.dtype, expected.get(name)!.dtype);
      assert.deepEqual([...info.shape], expected.get(name)!.shape);
      assert.equal(info.bytes, expected.get(name)!.data.byteLength);
    }
    // All reads at once, in reverse plan order: reads on one file must not interleave.
    const names = src.plan(layerOrder).reverse();
    const bufs = names.map((n) => new Uint8Array(src.tensors.get(n)!.bytes));
    await Promise.all(names.map((n, i) => src.readInto(n, bufs[i])));
    names.forEach((n, i) => assert.deepEqual(bufs[i], expected.get(n)!.data, n));
    const drained = await drain(src);
    assert.equal(drained.size, expected.size);
    for (const [n, t] of drained) assert.deepEqual(t.data, expected.get(n)!.data);
    await rejectsWith(() => src.readInto("nope", new Uint8Array(1)), "UNKNOWN_TENSOR", '"nope"');
    await rejectsWith(
      () => src.readInto(names[0], new Uint8Array(bufs[0].byteLength + 1)),
      "BAD_DESTINATION",
      names[0],
    );
  } finally {
    src.close();
  }
});

Deno.test("memory source: typed arrays and raw bytes, any order, validated, plan by layer order", async () => {
  const f32 = new Float32Array([1, 2, 3, 4, 5, 6]);
  const bf16 = new Uint16Array([0x3f80, 0x4000]);
  const raw = new Uint8Array([1, 2, 3]);
  const src = memorySource([
    ["model.layers.1.w", { dtype: "f32", shape: [2, 3], data: f32 }],
    ["model.layers.0.w", { dtype: DTYPES.bf16, shape: [2], data: bf16 }],
    ["model.embed_tokens.weight", { dtype: "U8", shape: [3], data: raw }],
  ]);
  assert.deepEqual(src.plan(), [
    "model.layers.1.w",
    "model.layers.0.w",
    "model.embed_tokens.weight",
  ]);
  assert.deepEqual(src.plan(layerOrder), [
    "model.embed_tokens.weight",
    "model.layers.0.w",
    "model.layers.1.w",
  ]);
  const got = await drain(src);
  assert.deepEqual(got.get("model.layers.1.w")!.data, new Uint8Array(f32.buffer));
  assert.deepEqual(got.get("model.layers.0.w")!.data, new Uint8Array(bf16.buffer));
  assert.equal(got.get("model.embed_tokens.weight")!.dtype, DTYPES.u8);
  // Records work too, and so does an async iterable (collected before use).
  const rec = memorySource([{ name: "x", tensor: { dtype: "bf16", shape: [2], data: bf16 } }]);
  assert.equal(rec.tensors.get("x")!.bytes, 4);
  async function* stream() {
    yield ["s", { dtype: "f32", shape: [6], data: f32 }] as const;
  }
  const streamed = await openWeightSource(stream());
  const dst = new Uint8Array(24);
  await streamed.readInto("s", dst);
  assert.deepEqual(dst, new Uint8Array(f32.buffer));
  // The same tensors round-trip through a file.
  const bytes = encodeSafetensors(got);
  const dir = await Deno.makeTempDir();
  try {
    await Deno.writeFile(`${dir}/m.safetensors`, bytes);
    const back = await drain(await openWeightSource(`${dir}/m.safetensors`));
    for (const [n, t] of got) assert.deepEqual(back.get(n)!.data, t.data);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("memory source rejects wrong byte lengths, element types, dtypes and duplicates", () => {
  const bad = (code: string, f: () => unknown, ...mentions: string[]) =>
    assert.throws(f, (e) => {
      assert.ok(e instanceof CheckpointError);
      assert.equal(e.code, code, e.message);
      for (const m of mentions) assert.ok(e.message.includes(m), e.message);
      return true;
    });
  const f32 = new Float32Array(6);
  bad(
    "SIZE_MISMATCH",
    () => memorySource([["w", { dtype: "f32", shape: [2, 2], data: f32 }]]),
    '"w"',
    "24 bytes",
    "16",
  );
  bad(
    "DTYPE_MISMATCH",
    () => memorySource([["w", { dtype: "bf16", shape: [12], data: f32 }]]),
    "Float32Array",
  );
  bad(
    "DTYPE_MISMATCH",
    () => memorySource([["w", { dtype: "f32", shape: [3], data: new Float64Array(3) }]]),
  );
  bad("BAD_DTYPE", () => memorySource([["w", { dtype: "f64", shape: [6], data: f32 }]]), "f64");
  bad("BAD_SHAPE", () => memorySource([["w", { dtype: "f32", shape: [2.5], data: f32 }]]));
  bad(
    "DUPLICATE",
    () =>
      memorySource([
        ["w", { dtype: "f32", shape: [6], data: f32 }],
        ["w", { dtype: "f32", shape: [6], data: f32 }],
      ]),
    '"w"',
  );
  bad("BAD_DATA", () => memorySource([["w", { dtype: "f32", shape: [6], data: [1, 2] as never }]]));
  bad("BAD_DATA", () => memorySource([42 as never]));
});

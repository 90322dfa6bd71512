// The CLI against adversarial input, run as a user runs it (a subprocess on WebAssembly). Every
// case: exit status 1 (2 for usage), exactly one `error:` line naming the file and the tensor or
// field, no stack trace, nothing raw for a terminal, and a hang guard (the subprocess is killed
// past a generous limit: a guard, not a timing assertion). Where a model was loaded, the export
// after the failure equals the export before it.
import assert from "node:assert/strict";
import {
  encodeSafetensors,
  type HostTensor,
  loadSafetensors,
} from "../src/checkpoint/safetensors.ts";
import { dtypeOf } from "../src/tensor/dtype.ts";
import { fileSource } from "../src/checkpoint/source.ts";
import { closeFd, haveLibc, openFd } from "../src/backend/cuda/libc.ts";
import { CheckpointError } from "../src/errors.ts";

const ROOT = new URL("../", import.meta.url).pathname;
const MAIN = `${ROOT}src/cli/main.ts`;
const CKPT = new URL("../../shared/fixtures/ckpt/", import.meta.url).pathname;
const LLAMA = `${CKPT}llama-tiny`;
const MIXTRAL = `${CKPT}mixtral-tiny`;
const SHARDED = `${CKPT}llama-tiny-sharded`;
// WebAssembly by default; LAYERWISE_E2E_BACKEND=cuda runs the same cases on a GPU.
const BACKEND = Deno.env.get("LAYERWISE_E2E_BACKEND") ?? "wasm";
// A hang guard: far above a normal run (under a second) even on a loaded machine.
const LIMIT_MS = 90_000;

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

async function cli(args: string[], cwd?: string): Promise<Run> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", MAIN, "--backend", BACKEND, ...args],
    cwd,
    stdout: "piped",
    stderr: "piped",
    signal: AbortSignal.timeout(LIMIT_MS),
  }).output();
  assert.equal(out.signal, null, `killed (${out.signal}): hang guard for ${args.join(" ")}`);
  const d = new TextDecoder();
  return { code: out.code, stdout: d.decode(out.stdout), stderr: d.decode(out.stderr) };
}

/** Asserts one clean error line mentioning every string in `mentions`; returns it. */
function assertError(r: Run, status: 1 | 2, mentions: readonly string[], what: string): string {
  assert.equal(r.code, status, `${what}: exit ${r.code}, stderr: ${r.stderr.slice(0, 500)}`);
  const lines = r.stderr.split("\n").filter((l) => l !== "");
  const errors = lines.filter((l) => l.startsWith("error:"));
  assert.equal(errors.length, 1, `${what}: one error line, got ${JSON.stringify(lines)}`);
  for (const l of lines) {
    assert.ok(!/^\s+at /.test(l) && !l.includes("Uncaught"), `${what}: stack trace: ${l}`);
  }
  // deno-lint-ignore no-control-regex -- a terminal must get no raw control character
  assert.ok(!/[\u0000-\u0008\u000b-\u001f\u007f]/.test(r.stderr), `${what}: raw control chars`);
  assert.ok(errors[0].length < 2500, `${what}: error line of ${errors[0].length} chars`);
  for (const m of mentions) {
    assert.ok(errors[0].includes(m), `${what}: ${JSON.stringify(errors[0])} lacks ${m}`);
  }
  return errors[0];
}

async function tmpDir(): Promise<string> {
  return await Deno.makeTempDir({ prefix: "lw-hard-" });
}

/** A copy of a fixture directory (config.json and model.safetensors). */
async function copyModel(from: string, dir?: string): Promise<string> {
  dir ??= await tmpDir();
  await Deno.mkdir(dir, { recursive: true });
  await Deno.copyFile(`${from}/config.json`, `${dir}/config.json`);
  await Deno.copyFile(`${from}/model.safetensors`, `${dir}/model.safetensors`);
  return dir;
}

async function editConfig(dir: string, edit: (c: Record<string, unknown>) => void): Promise<void> {
  const c = JSON.parse(await Deno.readTextFile(`${dir}/config.json`));
  edit(c);
  await Deno.writeTextFile(`${dir}/config.json`, JSON.stringify(c));
}

/** Writes `tensors` as `file` (safetensors). */
async function writeTensors(file: string, tensors: Iterable<[string, HostTensor]>) {
  await Deno.writeFile(file, encodeSafetensors(tensors));
}

async function tensorsOf(dir: string): Promise<Map<string, HostTensor>> {
  return await loadSafetensors(`${dir}/model.safetensors`);
}

function bf16ToF32(t: HostTensor): HostTensor {
  const n = t.data.byteLength / 2;
  const out = new Uint8Array(n * 4);
  for (let i = 0; i < n; i++) {
    out[4 * i + 2] = t.data[2 * i];
    out[4 * i + 3] = t.data[2 * i + 1];
  }
  return { dtype: dtypeOf("f32")!, shape: t.shape, data: out };
}

function setF32(t: HostTensor, i: number, v: number): HostTensor {
  const data = t.data.slice();
  new DataView(data.buffer).setFloat32(4 * i, v, true);
  return { ...t, data };
}

function setBf16Bits(t: HostTensor, i: number, bits: number): HostTensor {
  const data = t.data.slice();
  new DataView(data.buffer).setUint16(2 * i, bits, true);
  return { ...t, data };
}

async function exportOf(args: string[], file: string): Promise<Uint8Array> {
  await Deno.remove(file).catch(() => {});
  const r = await cli([...args, "--quiet", "--export", file]);
  assert.equal(r.code, 0, r.stderr);
  return await Deno.readFile(file);
}

function sameBytes(a: Uint8Array, b: Uint8Array, what: string): void {
  assert.ok(
    a.byteLength === b.byteLength && a.every((x, i) => x === b[i]),
    `${what}: bytes differ`,
  );
}

/**
 * Runs a failing reload from `weights` into the model of `model` with --export, with and
 * without --atomic, and checks the error and that the export equals the one before.
 */
async function failingReload(
  model: string,
  weights: string,
  quant: string,
  mentions: string[],
  what: string,
  before?: Uint8Array,
): Promise<void> {
  const dir = await tmpDir();
  before ??= await exportOf(["--model", model, "--quant", quant], `${dir}/before.safetensors`);
  for (const atomic of [[], ["--atomic"]]) {
    const after = `${dir}/after.safetensors`;
    const r = await cli([
      "--model",
      model,
      "--weights",
      weights,
      "--quant",
      quant,
      "--quiet",
      "--export",
      after,
      ...atomic,
    ]);
    assertError(r, 1, mentions, `${what} ${atomic.join("")}`);
    sameBytes(await Deno.readFile(after), before, `${what} ${atomic.join("")}: export after`);
  }
}

// ---------------------------------------------------------------------------------------------
// 1. Non-finite values that appear in the cast

Deno.test("non-finite after the cast: refused with and without --atomic, the model as before", async () => {
  const base = await tensorsOf(LLAMA);
  const cases: [string, number, number][] = [
    ["model.layers.0.self_attn.q_proj.weight", 0, 3.4e38],
    ["model.layers.1.mlp.down_proj.weight", 77, -3.4e38],
    ["model.norm.weight", 3, 3.4e38], // a direct layer: written straight into its kernel tensor
    ["model.embed_tokens.weight", 1000, 3.399e38],
  ];
  for (const [name, at, v] of cases) {
    for (const quant of ["fp8", "none", "int8", "fp8-block"]) {
      const w = await tmpDir();
      const t = new Map(base);
      t.set(name, setF32(bf16ToF32(base.get(name)!), at, v));
      await writeTensors(`${w}/model.safetensors`, t);
      await failingReload(
        LLAMA,
        `${w}/model.safetensors`,
        quant,
        [`${w}/model.safetensors`, name, "bf16", "infinity"],
        `f32 ${v} in ${name} (${quant})`,
      );
    }
  }
});

Deno.test("non-finite after the cast: bf16 1e5 into a float16 model, on reload and on first load", async () => {
  const model = await copyModel(LLAMA);
  await editConfig(model, (c) => c.dtype = "float16");
  const base = await tensorsOf(LLAMA);
  for (
    const [name, at] of [["model.layers.1.self_attn.v_proj.weight", 5], [
      "model.norm.weight",
      0,
    ]] as const
  ) {
    const w = await tmpDir();
    const t = new Map(base);
    t.set(name, setBf16Bits(base.get(name)!, at, 0x47c3)); // 99840: finite in bf16, not in f16
    await writeTensors(`${w}/model.safetensors`, t);
    await failingReload(model, `${w}/model.safetensors`, "fp8", [w, name, "f16"], `1e5 ${name}`);
    // The same file as the first load: refused there too.
    await Deno.copyFile(`${model}/config.json`, `${w}/config.json`);
    assertError(await cli(["--model", w, "--quiet"]), 1, [w, name, "f16"], `first load ${name}`);
  }
});

// ---------------------------------------------------------------------------------------------
// 2. Output files written atomically; an output that is an input refused

Deno.test("atomic writer: a SIGINT or SIGTERM mid-write leaves the old file and no temporary", async () => {
  for (const sig of ["SIGINT", "SIGTERM"] as const) {
    const dir = await tmpDir();
    const target = `${dir}/out.safetensors`;
    await Deno.writeTextFile(target, "old contents");
    const child = new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", `${ROOT}tests/_atomic_child.ts`, target],
      stdout: "piped",
      stderr: "piped",
      signal: AbortSignal.timeout(LIMIT_MS),
    }).spawn();
    // The child says when its first chunk is written and it waits for the next.
    const reader = child.stdout.getReader();
    const { value } = await reader.read();
    assert.match(new TextDecoder().decode(value), /writing/);
    child.kill(sig);
    const status = await child.status;
    reader.releaseLock();
    await child.stdout.cancel();
    await child.stderr.cancel();
    assert.equal(status.code, sig === "SIGINT" ? 130 : 143);
    assert.equal(await Deno.readTextFile(target), "old contents");
    const left = [...Deno.readDirSync(dir)].map((e) => e.name);
    assert.deepEqual(left, ["out.safetensors"], `${sig}: ${left}`);
  }
});

Deno.test("CLI interrupted at any time: the export is the old file or a whole new one, no temporary left", async () => {
  const dir = await tmpDir();
  const target = `${dir}/e.safetensors`;
  const full = await exportOf(["--model", LLAMA], target);
  const old = new TextEncoder().encode("previous export");
  for (const [i, delay] of [50, 150, 300, 450, 600, 800, 1200].entries()) {
    await Deno.writeFile(target, old);
    const child = new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-A",
        MAIN,
        "--backend",
        BACKEND,
        "--model",
        LLAMA,
        "--quiet",
        "--export",
        target,
      ],
      stdout: "null",
      stderr: "null",
      signal: AbortSignal.timeout(LIMIT_MS),
    }).spawn();
    await new Promise((r) => setTimeout(r, delay));
    try {
      child.kill(i % 2 === 0 ? "SIGINT" : "SIGTERM");
    } catch {
      // It finished before the signal: the export is then the new file.
    }
    await child.status;
    const now = await Deno.readFile(target);
    const isOld = now.byteLength === old.byteLength && now.every((x, j) => x === old[j]);
    if (!isOld) sameBytes(now, full, `killed after ${delay} ms`);
    const left = [...Deno.readDirSync(dir)].map((e) => e.name);
    assert.deepEqual(left, ["e.safetensors"], `after ${delay} ms: ${left}`);
  }
});

Deno.test("--export or --json naming a file being read (or each other) is refused before the run", async () => {
  const model = await copyModel(LLAMA);
  const links = await tmpDir();
  await Deno.symlink(`${model}/model.safetensors`, `${links}/sym.safetensors`);
  await Deno.link(`${model}/model.safetensors`, `${links}/hard.safetensors`);
  const sharded = await tmpDir();
  for (const e of Deno.readDirSync(SHARDED)) {
    await Deno.copyFile(`${SHARDED}/${e.name}`, `${sharded}/${e.name}`);
  }
  const before = await Deno.readFile(`${model}/model.safetensors`);
  const cases: [string[], string[]][] = [
    [["--model", model, "--export", `${model}/model.safetensors`], [
      "--export",
      "model.safetensors",
    ]],
    [["--model", model, "--export", `${model}/./model.safetensors`], ["--export"]],
    [["--model", model, "--export", `${links}/sym.safetensors`], ["--export", "sym.safetensors"]],
    [["--model", model, "--export", `${links}/hard.safetensors`], ["--export", "hard.safetensors"]],
    [["--model", model, "--json", `${model}/config.json`], ["--json", "config.json"]],
    [[
      "--model",
      LLAMA,
      "--weights",
      sharded,
      "--export",
      `${sharded}/model-00003-of-00014.safetensors`,
    ], ["--export", "model-00003-of-00014"]],
    [
      ["--model", LLAMA, "--weights", sharded, "--json", `${sharded}/model.safetensors.index.json`],
      ["--json", "index.json"],
    ],
    [["--model", model, "--export", `${links}/x`, "--json", `${links}/./x`], [
      "--export and --json",
      "x",
    ]],
  ];
  for (const [args, mentions] of cases) {
    assertError(await cli([...args, "--quiet"]), 1, mentions, args.join(" "));
  }
  sameBytes(await Deno.readFile(`${model}/model.safetensors`), before, "checkpoint untouched");
});

// ---------------------------------------------------------------------------------------------
// 3. Sizes in config.json bounded before allocating

Deno.test("config sizes: bounded by plain limits and by the checkpoint's headers, before building", async () => {
  const cases: [string, Record<string, unknown>, string][] = [
    [LLAMA, { num_hidden_layers: 1e9 }, "num_hidden_layers"],
    [LLAMA, { num_hidden_layers: 1e5 }, "num_hidden_layers"],
    [LLAMA, { num_hidden_layers: 1000 }, "num_hidden_layers"],
    [LLAMA, { num_hidden_layers: 2 ** 53 - 1 }, "num_hidden_layers"],
    [LLAMA, { hidden_size: 2 ** 53 - 1 }, "hidden_size"],
    [LLAMA, { vocab_size: 1e18 }, "vocab_size"],
    [LLAMA, { intermediate_size: 2 ** 63 }, "intermediate_size"],
    [LLAMA, { vocab_size: 100_000 }, "vocab_size"],
    [LLAMA, { num_attention_heads: 256, head_dim: 16 }, "num_attention_heads"],
    [LLAMA, { head_dim: 4096 }, "head_dim"],
    [MIXTRAL, { num_local_experts: 1e9 }, "num_local_experts"],
    [MIXTRAL, { num_local_experts: 5000 }, "num_local_experts"],
    [MIXTRAL, { num_hidden_layers: 40 }, "num_hidden_layers"],
    [MIXTRAL, { num_experts_per_tok: 1e9 }, "num_experts_per_tok"],
  ];
  for (const [from, edit, field] of cases) {
    const dir = await copyModel(from);
    await editConfig(dir, (c) => Object.assign(c, edit));
    const r = await cli(["--model", dir, "--quiet"]);
    assertError(r, 1, [`${dir}/config.json`, field], JSON.stringify(edit));
  }
});

// ---------------------------------------------------------------------------------------------
// 4. Reads that never end

Deno.test("FIFOs, devices and directories are refused before they are read", async () => {
  const model = await copyModel(LLAMA);
  const t = await tmpDir();
  const fifo = (p: string) => new Deno.Command("mkfifo", { args: [p] }).outputSync();
  fifo(`${t}/pipe.safetensors`);
  // --weights a FIFO, a device, a link to /dev/zero
  await Deno.symlink("/dev/zero", `${t}/zero.safetensors`);
  for (const w of [`${t}/pipe.safetensors`, "/dev/zero", `${t}/zero.safetensors`, "/dev/null"]) {
    assertError(await cli(["--model", model, "--weights", w, "--quiet"]), 1, [w], `--weights ${w}`);
  }
  // config.json a FIFO, a link to /dev/zero, a directory
  for (const make of ["fifo", "zero", "dir"]) {
    const d = await copyModel(LLAMA);
    await Deno.remove(`${d}/config.json`);
    if (make === "fifo") fifo(`${d}/config.json`);
    if (make === "zero") await Deno.symlink("/dev/zero", `${d}/config.json`);
    if (make === "dir") await Deno.mkdir(`${d}/config.json`);
    assertError(await cli(["--model", d, "--quiet"]), 1, [`${d}/config.json`], `config ${make}`);
  }
  // model.safetensors a FIFO or a directory: named as such (not "holds neither")
  for (const make of ["fifo", "dir"]) {
    const d = await copyModel(LLAMA);
    await Deno.remove(`${d}/model.safetensors`);
    if (make === "fifo") fifo(`${d}/model.safetensors`);
    else await Deno.mkdir(`${d}/model.safetensors`);
    const line = assertError(
      await cli(["--model", model, "--weights", d, "--quiet"]),
      1,
      [`${d}/model.safetensors`, make === "fifo" ? "FIFO" : "directory"],
      `model.safetensors ${make}`,
    );
    assert.ok(!line.includes("neither"), line);
  }
  // An index whose shard is a FIFO, a directory, a link to /dev/zero; an index that is a FIFO
  for (const make of ["fifo", "dir", "zero", "index-fifo"]) {
    const d = await tmpDir();
    for (const e of Deno.readDirSync(SHARDED)) {
      await Deno.copyFile(`${SHARDED}/${e.name}`, `${d}/${e.name}`);
    }
    const shard = "model-00002-of-00014.safetensors";
    const target = make === "index-fifo" ? "model.safetensors.index.json" : shard;
    await Deno.remove(`${d}/${target}`);
    if (make === "fifo" || make === "index-fifo") fifo(`${d}/${target}`);
    if (make === "dir") await Deno.mkdir(`${d}/${target}`);
    if (make === "zero") await Deno.symlink("/dev/zero", `${d}/${target}`);
    const line = assertError(await cli(["--model", d, "--quiet"]), 1, [target], `shard ${make}`);
    assert.ok(!line.includes("not found"), line);
  }
});

// ---------------------------------------------------------------------------------------------
// 5. Names that alias

Deno.test("names that alias: non-canonical ids, a weight_map or config.json key twice, one shard under two names", async () => {
  const mix = await tensorsOf(MIXTRAL);
  const expert = [...mix.keys()].find((n) => n.includes(".experts.1.w1."))!;
  const cases: [string, (t: Map<string, HostTensor>) => void, string[]][] = [
    // experts.01 beside experts.1: both named
    [MIXTRAL, (t) => t.set(expert.replace(".experts.1.", ".experts.01."), t.get(expert)!), [
      expert,
      ".experts.01.",
    ]],
    // experts.01 instead of experts.1
    [MIXTRAL, (t) => {
      t.set(expert.replace(".experts.1.", ".experts.01."), t.get(expert)!);
      t.delete(expert);
    }, [".experts.01."]],
    [MIXTRAL, (t) => t.set(expert.replace(".experts.1.", ".experts.001."), t.get(expert)!), [
      ".experts.001.",
    ]],
    [LLAMA, (t) => {
      const n = "model.layers.1.input_layernorm.weight";
      t.set(n.replace(".1.", ".01."), t.get(n)!);
    }, ["model.layers.01.input_layernorm.weight", "model.layers.1.input_layernorm.weight"]],
  ];
  for (const [from, edit, mentions] of cases) {
    const w = await tmpDir();
    const t = await tensorsOf(from);
    edit(t);
    await writeTensors(`${w}/model.safetensors`, t);
    for (const strict of [[], ["--strict"]]) {
      await failingReload(
        from,
        `${w}/model.safetensors`,
        "fp8",
        [w, ...mentions],
        mentions.join(),
        undefined,
      );
      assertError(
        await cli(["--model", from, "--weights", w, "--quiet", ...strict]),
        1,
        mentions,
        `${mentions} ${strict}`,
      );
    }
  }

  // An index listing a tensor twice (the second place would silently win)
  const index = JSON.parse(await Deno.readTextFile(`${SHARDED}/model.safetensors.index.json`));
  const [name, shard] = Object.entries(index.weight_map as Record<string, string>)[3];
  const other = "model-00014-of-00014.safetensors";
  for (const second of [shard, other]) {
    const d = await tmpDir();
    for (const e of Deno.readDirSync(SHARDED)) {
      await Deno.copyFile(`${SHARDED}/${e.name}`, `${d}/${e.name}`);
    }
    const text = JSON.stringify(index).replace(
      '"weight_map":{',
      `"weight_map":{${JSON.stringify(name)}:${JSON.stringify(second)},`,
    );
    await Deno.writeTextFile(`${d}/model.safetensors.index.json`, text);
    assertError(
      await cli(["--model", d, "--quiet"]),
      1,
      ["index.json", name, "twice"],
      `twice ${second}`,
    );
  }

  // A config.json key given twice (JSON.parse would silently keep the last), at the top level
  // and inside a nested object
  const cfg = await Deno.readTextFile(`${LLAMA}/config.json`);
  for (
    const [edit, mentions] of [
      [cfg.replace("{", '{"num_hidden_layers": 2,'), ["num_hidden_layers", "twice"]],
      [cfg.replace("{", '{"vocab_size": 7, '), ["vocab_size", "twice"]],
      [cfg.replace("{", '{"rope_scaling": {"factor": 1, "factor": 2}, '), ["factor", "twice"]],
    ] as const
  ) {
    const d = await copyModel(LLAMA);
    await Deno.writeTextFile(`${d}/config.json`, edit);
    assertError(
      await cli(["--model", d, "--quiet"]),
      1,
      [`${d}/config.json`, ...mentions],
      `config key twice: ${mentions[0]}`,
    );
  }

  // ./x and x name one shard: loads; a link naming the same file twice is refused naming both
  const d = await tmpDir();
  for (const e of Deno.readDirSync(SHARDED)) {
    await Deno.copyFile(`${SHARDED}/${e.name}`, `${d}/${e.name}`);
  }
  const wm = index.weight_map as Record<string, string>;
  const dotted = Object.fromEntries(
    Object.entries(wm).map(([k, v], i) => [k, i % 2 ? `./${v}` : v]),
  );
  await Deno.writeTextFile(
    `${d}/model.safetensors.index.json`,
    JSON.stringify({ weight_map: dotted }),
  );
  const ok = await cli(["--model", d, "--quiet"]);
  assert.equal(ok.code, 0, ok.stderr);
  // A shard holding two tensors, one of them listed under a link to the shard.
  const counts = new Map<string, string[]>();
  for (const [k, v] of Object.entries(wm)) counts.set(v, [...(counts.get(v) ?? []), k]);
  const [twoShard, [first]] = [...counts].find(([, ks]) => ks.length >= 2)!;
  await Deno.symlink(`${d}/${twoShard}`, `${d}/alias.safetensors`);
  const aliased = { ...wm, [first]: "alias.safetensors" };
  await Deno.writeTextFile(
    `${d}/model.safetensors.index.json`,
    JSON.stringify({ weight_map: aliased }),
  );
  assertError(
    await cli(["--model", d, "--quiet"]),
    1,
    ["alias.safetensors", twoShard],
    "alias shard",
  );
});

// ---------------------------------------------------------------------------------------------
// 6. Output paths checked first; the first cause printed

Deno.test("outputs checked before the run; with two failures the first cause is the error", async () => {
  const bad = await tmpDir();
  const t = await tensorsOf(LLAMA);
  t.delete("model.layers.1.mlp.up_proj.weight");
  await writeTensors(`${bad}/model.safetensors`, t);
  const cases: [string[], string[]][] = [
    [["--model", LLAMA, "--export", "/nonexistent-dir/e.safetensors"], [
      "--export",
      "/nonexistent-dir",
    ]],
    [["--model", LLAMA, "--json", "/proc/r.json"], ["--json", "/proc"]],
    [["--model", LLAMA, "--export", bad], ["--export", "directory"]],
    [["--model", LLAMA, "--weights", bad, "--export", "/nonexistent-dir/e"], ["--export"]],
    [["--model", LLAMA, "--json", `${bad}/missing-dir/r.json`], ["--json", "missing-dir"]],
  ];
  for (const [args, mentions] of cases) {
    const r = await cli([...args, "--quiet"]);
    assertError(r, 1, mentions, args.join(" "));
    assert.equal(r.stdout, "", "nothing ran");
  }
  // A failed reload with good outputs: the reload's error, and both outputs written.
  const out = await tmpDir();
  const r = await cli([
    "--model",
    LLAMA,
    "--weights",
    bad,
    "--quiet",
    "--export",
    `${out}/e.safetensors`,
    "--json",
    `${out}/r.json`,
  ]);
  assertError(r, 1, [bad, "model.layers.1.mlp.up_proj.weight"], "failed reload");
  const report = JSON.parse(await Deno.readTextFile(`${out}/r.json`));
  assert.match(report.error, /up_proj/);
  // A broken config and a bad output: the config (read first) is the error.
  const broken = await copyModel(LLAMA);
  await editConfig(broken, (c) => delete c.hidden_size);
  assertError(
    await cli(["--model", broken, "--export", "/nonexistent-dir/e", "--quiet"]),
    1,
    ["config.json", "hidden_size"],
    "config first",
  );
});

// ---------------------------------------------------------------------------------------------
// 7. Names escaped and cut

Deno.test("names from input reach the terminal escaped, cut, and at most a few of many", async () => {
  const base = await tensorsOf(LLAMA);
  const names = [
    "model.layers.0.\rfake\x1b[2K\x1b[31m.weight",
    `model.${"x".repeat(2_000_000)}.end.weight`,
    "model.\u202eevil\u2028line.weight",
    "model.\x07bell\x00nul.weight",
  ];
  const small = base.get("model.norm.weight")!;
  for (const name of names) {
    const w = await tmpDir();
    await writeTensors(`${w}/model.safetensors`, [...base, [name, small]]);
    const line = assertError(
      await cli(["--model", LLAMA, "--weights", w, "--strict", "--quiet"]),
      1,
      [w, "model."],
      JSON.stringify(name.slice(0, 40)),
    );
    assert.ok(!/[\u202e\u2028]/.test(line), line);
    if (name.length > 1000) assert.ok(line.includes(".end.weight") && line.length < 2500, line);
  }
  // Many unknown names: a few listed, then how many more.
  const w = await tmpDir();
  const many: [string, HostTensor][] = [...base];
  for (let i = 0; i < 5000; i++) many.push([`extra.${i}.weight`, small]);
  await writeTensors(`${w}/model.safetensors`, many);
  const line = assertError(
    await cli(["--model", LLAMA, "--weights", w, "--strict", "--quiet"]),
    1,
    [w, "5000 unknown tensors"],
    "many unknown",
  );
  assert.ok(line.length < 1000, line);
  // Many missing names too.
  const w2 = await tmpDir();
  await writeTensors(
    `${w2}/model.safetensors`,
    [...base].filter(([n]) => !n.startsWith("model.layers.")),
  );
  const missing = assertError(await cli(["--model", LLAMA, "--weights", w2, "--quiet"]), 1, [
    w2,
    "missing",
    "more",
  ], "many missing");
  assert.ok(missing.length < 1000, missing);
});

// ---------------------------------------------------------------------------------------------
// 8. The misleading messages, each

Deno.test("messages say what is wrong", async () => {
  // --repeat -1 and friends: usage errors that say so
  for (
    const [args, m] of [
      [["--repeat", "-1"], "--repeat -1: expected a whole number"],
      [["--repeat", "-5"], "--repeat -5"],
      [["--model", "--quiet"], "--model needs a value"],
      [["--quant", "-x"], "--quant -x"],
    ] as const
  ) {
    assertError(await cli([...args]), 2, [m], args.join(" "));
  }
  const t = await tmpDir();
  // Not safetensors at all: said so, with its first bytes
  const files: [string, Uint8Array][] = [
    ["text.safetensors", new TextEncoder().encode("hello, this is not a checkpoint\n")],
    [
      "zip.safetensors",
      new Uint8Array([0x50, 0x4b, 0x03, 0x04, 0x14, 0, 0, 0, 8, 0, 1, 2, 3, 4, 5, 6]),
    ],
    [
      "gguf.safetensors",
      new TextEncoder().encode("GGUF\x03\x00\x00\x00\x10\x00\x00\x00\x00\x00\x00\x00"),
    ],
  ];
  for (const [name, bytes] of files) {
    await Deno.writeFile(`${t}/${name}`, bytes);
    const line = assertError(
      await cli(["--model", LLAMA, "--weights", `${t}/${name}`, "--quiet"]),
      1,
      [`${t}/${name}`, "not a safetensors file", new TextDecoder().decode(bytes.subarray(0, 2))],
      name,
    );
    assert.ok(!line.includes("exceeds"), line);
  }
  // architectures given as a string: said so, not "missing"
  for (const v of ["LlamaForCausalLM", 7, {}]) {
    const d = await copyModel(LLAMA);
    await editConfig(d, (c) => c.architectures = v);
    const line = assertError(await cli(["--model", d, "--quiet"]), 1, [
      "config.json",
      "architectures",
    ], `${v}`);
    assert.ok(!line.includes("missing"), line);
  }
  // Sizes of 2^53-1: the file and the field
  for (const field of ["hidden_size", "num_hidden_layers", "intermediate_size"]) {
    const d = await copyModel(LLAMA);
    await editConfig(d, (c) => c[field] = 2 ** 53 - 1);
    assertError(await cli(["--model", d, "--quiet"]), 1, [`${d}/config.json`, field], field);
  }
  // --repeat 0 still checks --weights
  for (const w of [`${t}/nothing-here`, `${t}/text.safetensors`]) {
    assertError(
      await cli(["--model", LLAMA, "--weights", w, "--repeat", "0", "--quiet"]),
      1,
      [w],
      `repeat 0 ${w}`,
    );
  }
  const missing = await tmpDir();
  const base = await tensorsOf(LLAMA);
  base.delete("model.norm.weight");
  await writeTensors(`${missing}/model.safetensors`, base);
  assertError(
    await cli(["--model", LLAMA, "--weights", missing, "--repeat", "0", "--quiet"]),
    1,
    [missing, "model.norm.weight"],
    "repeat 0 missing tensor",
  );
});

// ---------------------------------------------------------------------------------------------
// 9. model.safetensors and an index in one folder

Deno.test("a folder with model.safetensors and an index is read from model.safetensors (Hugging Face's rule)", async () => {
  const d = await copyModel(LLAMA);
  // An index beside it whose shards are absent: were it read, the load would fail.
  await Deno.writeTextFile(
    `${d}/model.safetensors.index.json`,
    JSON.stringify({ weight_map: { "model.norm.weight": "gone.safetensors" } }),
  );
  const out = await tmpDir();
  const want = await exportOf(["--model", LLAMA], `${out}/want.safetensors`);
  const r = await cli(["--model", d, "--export", `${out}/got.safetensors`]);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /model\.safetensors \(model\.safetensors\.index\.json beside it not used/);
  sameBytes(await Deno.readFile(`${out}/got.safetensors`), want, "read from model.safetensors");
});

Deno.test("a file cut during a reload is reported with the size it now has", async () => {
  const dir = await tmpDir();
  const file = `${dir}/model.safetensors`;
  await Deno.copyFile(`${LLAMA}/model.safetensors`, file);
  const source = await fileSource(file);
  try {
    const last = source.plan().at(-1)!;
    for (const size of [20_000, 100, 0]) {
      await Deno.truncate(file, size);
      const info = source.tensors.get(last)!;
      await assert.rejects(source.readInto(last, new Uint8Array(info.bytes)), (e) => {
        assert.ok(e instanceof CheckpointError && e.code === "TRUNCATED", String(e));
        assert.ok(e.message.includes(file) && e.message.includes(last), e.message);
        assert.match(e.message, new RegExp(`the file now ends at ${size}$`));
        return true;
      });
    }
  } finally {
    source.close();
  }
});

Deno.test("the staged (CUDA) reader's open does not wait on a FIFO", async () => {
  if (!haveLibc()) return;
  const dir = await tmpDir();
  new Deno.Command("mkfifo", { args: [`${dir}/pipe`] }).outputSync();
  // Blocking, this open would wait for a writer forever (the test would hang here).
  const fd = openFd(`${dir}/pipe`);
  assert.ok(fd >= 0);
  closeFd(fd);
  await Deno.remove(dir, { recursive: true });
});

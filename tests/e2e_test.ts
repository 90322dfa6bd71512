/**
 * The CLI end to end, as a subprocess: exports compared byte for byte with the fixtures that
 * PyTorch wrote, reloads from other checkpoints, bad checkpoints and bad usage.
 */
import assert from "node:assert/strict";
import {
  encodeSafetensors,
  type HostTensor,
  loadSafetensors,
} from "../src/checkpoint/safetensors.ts";
import { equalBytes } from "../testing.ts";

const FIXTURES = new URL("../../shared/fixtures/", import.meta.url);
const CKPT = new URL("ckpt/", FIXTURES).pathname;
const EXPECT = new URL("expect/", FIXTURES).pathname;
const MAIN = new URL("../src/cli/main.ts", import.meta.url).pathname;
const NAMES = ["llama-tiny", "llama-tiny-sharded", "qwen2-tiny", "mixtral-tiny"];
// The GPU machine runs the same tests with LAYERWISE_E2E_BACKEND=cuda.
const BACKEND = Deno.env.get("LAYERWISE_E2E_BACKEND") ?? "wasm";

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

async function cli(...args: string[]): Promise<Run> {
  return await cliIn({}, ...args);
}

async function cliIn(env: Record<string, string>, ...args: string[]): Promise<Run> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", MAIN, ...args],
    stdout: "piped",
    stderr: "piped",
    env: { NO_COLOR: "1", ...env },
  }).output();
  const dec = new TextDecoder();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}

function ok(r: Run, what: string): void {
  assert.equal(r.code, 0, `${what}: exit ${r.code}\n${r.stderr}`);
}

/** Every tensor of `expectFile` must be in `gotFile` with the same dtype, shape and bytes. */
async function assertContains(gotFile: string, expectFile: string, label: string): Promise<number> {
  const got = await loadSafetensors(gotFile);
  const want = await loadSafetensors(expectFile);
  assert.ok(want.size > 0);
  for (const [name, w] of want) {
    const g = got.get(name);
    assert.ok(g !== undefined, `${label}: export lacks ${name}`);
    assert.equal(g.dtype.name, w.dtype.name, `${label}: ${name} dtype`);
    assert.deepEqual(g.shape, w.shape, `${label}: ${name} shape`);
    assert.ok(equalBytes(g.data, w.data), `${label}: ${name} bytes differ`);
  }
  return want.size;
}

async function withTemp<T>(f: (dir: string) => Promise<T>): Promise<T> {
  const dir = await Deno.makeTempDir({ prefix: "layerwise-e2e-" });
  try {
    return await f(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("e2e: --quant fp8 --export matches the PyTorch expectation for every fixture", async () => {
  await withTemp(async (tmp) => {
    for (const name of NAMES) {
      const out = `${tmp}/${name}.safetensors`;
      const r = await cli(
        "--model",
        `${CKPT}${name}`,
        "--quant",
        "fp8",
        "--backend",
        BACKEND,
        "--export",
        out,
        "--quiet",
      );
      ok(r, name);
      assert.equal(r.stderr, "", `${name}: nothing on stderr`);
      const n = await assertContains(out, `${EXPECT}${name}.fp8-tensor.safetensors`, name);
      assert.ok(n >= 14, `${name}: ${n} tensors compared`);
    }
  });
});

// A copy of llama-tiny with the same shapes and other values: every tensor's elements reversed
// (bf16 elements are 2 bytes; reversing element order keeps them valid), tensors written in
// reverse name order so reads must be re-planned.
async function permutedCopy(dir: string): Promise<void> {
  const src = await loadSafetensors(`${CKPT}llama-tiny/model.safetensors`);
  const out: [string, HostTensor][] = [];
  for (const [name, t] of [...src].reverse()) {
    const e = new Uint16Array(t.data.slice().buffer).reverse();
    out.push([name, { dtype: t.dtype, shape: t.shape, data: new Uint8Array(e.buffer) }]);
  }
  await Deno.writeFile(`${dir}/model.safetensors`, encodeSafetensors(out, { format: "pt" }));
  await Deno.copyFile(`${CKPT}llama-tiny/config.json`, `${dir}/config.json`);
}

Deno.test("e2e: a reload from another checkpoint equals a first load of it, both ways", async () => {
  await withTemp(async (tmp) => {
    const copy = `${tmp}/copy`;
    await Deno.mkdir(copy);
    await permutedCopy(copy);
    const flags = ["--quant", "fp8", "--backend", BACKEND, "--quiet"];
    // Reload llama-tiny -> copy, against a first load of the copy (no reload: --repeat 0).
    ok(
      await cli(
        "--model",
        `${CKPT}llama-tiny`,
        "--weights",
        copy,
        ...flags,
        "--export",
        `${tmp}/r.st`,
      ),
      "reload into copy",
    );
    ok(await cli("--model", copy, "--repeat", "0", ...flags, "--export", `${tmp}/f.st`), "first");
    const r = await Deno.readFile(`${tmp}/r.st`);
    const f = await Deno.readFile(`${tmp}/f.st`);
    assert.ok(equalBytes(r, f), "reloaded export equals the first-load export of the copy");
    const base = await Deno.readFile(`${tmp}/r.st`);
    const before = await cli(
      "--model",
      `${CKPT}llama-tiny`,
      "--repeat",
      "0",
      ...flags,
      "--export",
      `${tmp}/b.st`,
    );
    ok(before, "first load of llama-tiny");
    assert.ok(!equalBytes(base, await Deno.readFile(`${tmp}/b.st`)), "the copy really differs");
    // The other way, against the PyTorch expectation: --model copy, --weights llama-tiny.
    const back = `${tmp}/back.st`;
    ok(
      await cli("--model", copy, "--weights", `${CKPT}llama-tiny`, ...flags, "--export", back),
      "reload back",
    );
    await assertContains(back, `${EXPECT}llama-tiny.fp8-tensor.safetensors`, "reload back");
  });
});

// ---------------------------------------------------------------------------------------------
// Bad checkpoints: each is a modified llama-tiny; header edits re-pack the same data bytes.

interface Parts {
  header: Record<string, { dtype: string; shape: number[]; data_offsets: number[] }>;
  data: Uint8Array;
}

async function llamaParts(): Promise<Parts> {
  const bytes = await Deno.readFile(`${CKPT}llama-tiny/model.safetensors`);
  const n = Number(new DataView(bytes.buffer).getBigUint64(0, true));
  const header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + n)));
  delete header.__metadata__;
  return { header, data: bytes.subarray(8 + n) };
}

function pack(headerText: string, data: Uint8Array, lengthField?: bigint): Uint8Array {
  const json = new TextEncoder().encode(headerText);
  const out = new Uint8Array(8 + json.byteLength + data.byteLength);
  new DataView(out.buffer).setBigUint64(0, lengthField ?? BigInt(json.byteLength), true);
  out.set(json, 8);
  out.set(data, 8 + json.byteLength);
  return out;
}

const Q0 = "model.layers.0.self_attn.q_proj.weight";
const O0 = "model.layers.0.self_attn.o_proj.weight";
const UP1 = "model.layers.1.mlp.up_proj.weight";

type Bad = {
  label: string;
  /** Writes the bad checkpoint under `dir`; returns the path to give to --weights. */
  make: (dir: string) => Promise<string>;
  /** What the error line must name besides the file. */
  mentions: string[];
};

async function writeFile(dir: string, bytes: Uint8Array): Promise<string> {
  const p = `${dir}/model.safetensors`;
  await Deno.writeFile(p, bytes);
  return p;
}

function lastTensor(p: Parts): string {
  return Object.entries(p.header).sort((a, b) => a[1].data_offsets[0] - b[1].data_offsets[0])
    .at(-1)![0];
}

/** llama-tiny with one bf16 NaN in o_proj of layer 0. */
async function withNaN(dir: string): Promise<string> {
  const p = await llamaParts();
  const data = p.data.slice();
  const [begin] = p.header[O0].data_offsets;
  new DataView(data.buffer).setUint16(begin + 6, 0x7fc0, true);
  return await writeFile(dir, pack(JSON.stringify(p.header), data));
}

const BAD: Bad[] = [
  { label: "a NaN in a weight (refused by default)", make: withNaN, mentions: [O0, "NaN"] },
  {
    label: "truncated file",
    make: async (dir) => {
      const bytes = await Deno.readFile(`${CKPT}llama-tiny/model.safetensors`);
      return await writeFile(dir, bytes.subarray(0, bytes.byteLength - 100));
    },
    mentions: [lastTensor(await llamaParts())],
  },
  {
    label: "header length past the end",
    make: async (dir) => {
      const p = await llamaParts();
      return await writeFile(dir, pack(JSON.stringify(p.header), p.data, 10_000_000n));
    },
    mentions: ["10000000"],
  },
  {
    label: "header not JSON",
    make: async (dir) => {
      const p = await llamaParts();
      return await writeFile(dir, pack(JSON.stringify(p.header).replace(/"/, "'"), p.data));
    },
    mentions: ["JSON"],
  },
  {
    label: "overlapping offsets",
    make: async (dir) => {
      const p = await llamaParts();
      // o_proj and q_proj have the same shape; o_proj now claims q_proj's bytes.
      const [qa, oa] = [p.header[Q0].data_offsets[0], p.header[O0].data_offsets[0]];
      const [first, second] = qa < oa ? [Q0, O0] : [O0, Q0];
      p.header[second].data_offsets = [...p.header[first].data_offsets];
      return await writeFile(dir, pack(JSON.stringify(p.header), p.data));
    },
    mentions: [Q0, O0],
  },
  {
    label: "out-of-range offsets",
    make: async (dir) => {
      const p = await llamaParts();
      const last = lastTensor(p);
      const [b, e] = p.header[last].data_offsets;
      p.header[last].data_offsets = [b + 1_000_000, e + 1_000_000];
      return await writeFile(dir, pack(JSON.stringify(p.header), p.data));
    },
    mentions: [lastTensor(await llamaParts())],
  },
  {
    label: "unknown dtype",
    make: async (dir) => {
      const p = await llamaParts();
      p.header[UP1].dtype = "BF17";
      return await writeFile(dir, pack(JSON.stringify(p.header), p.data));
    },
    mentions: [UP1, "BF17"],
  },
  {
    label: "duplicate names",
    make: async (dir) => {
      const p = await llamaParts();
      // JSON.stringify cannot write a duplicate key: rename in the text.
      const text = JSON.stringify(p.header).replace(`"${O0}"`, `"${Q0}"`);
      return await writeFile(dir, pack(text, p.data));
    },
    mentions: [Q0],
  },
  {
    label: "shard listed in the index but missing",
    make: async (dir) => {
      for await (const e of Deno.readDir(`${CKPT}llama-tiny-sharded`)) {
        await Deno.copyFile(`${CKPT}llama-tiny-sharded/${e.name}`, `${dir}/${e.name}`);
      }
      await Deno.remove(`${dir}/model-00003-of-00014.safetensors`);
      return dir;
    },
    mentions: ["model-00003-of-00014.safetensors"],
  },
  {
    label: "a tensor whose shape does not fit the model",
    make: async (dir) => {
      const t = await loadSafetensors(`${CKPT}llama-tiny/model.safetensors`);
      const q = t.get(Q0)!;
      t.set(Q0, { ...q, shape: [q.shape[0] / 2, q.shape[1] * 2] });
      return await writeFile(dir, encodeSafetensors(t));
    },
    mentions: [Q0],
  },
  {
    label: "missing tensors",
    make: async (dir) => {
      const t = await loadSafetensors(`${CKPT}llama-tiny/model.safetensors`);
      t.delete(UP1);
      return await writeFile(dir, encodeSafetensors(t));
    },
    mentions: [UP1],
  },
];

Deno.test("e2e: bad checkpoints exit 1 with one line naming file and tensor; state unchanged", async () => {
  await withTemp(async (tmp) => {
    const flags = ["--model", `${CKPT}llama-tiny`, "--quant", "fp8", "--backend", BACKEND];
    ok(await cli(...flags, "--repeat", "0", "--export", `${tmp}/before.st`), "first load");
    const before = await Deno.readFile(`${tmp}/before.st`);
    for (const [i, bad] of BAD.entries()) {
      const dir = `${tmp}/bad${i}`;
      await Deno.mkdir(dir);
      const weights = await bad.make(dir);
      for (const extra of i % 2 === 0 ? [[], ["--atomic"]] : [["--atomic"]]) {
        const after = `${dir}/after${extra.length}.st`;
        const r = await cli(...flags, "--weights", weights, "--export", after, ...extra);
        const what = `${bad.label} ${extra.join(" ")}`;
        assert.equal(r.code, 1, `${what}: exit ${r.code}\n${r.stderr}`);
        const lines = r.stderr.split("\n").filter((l) => l !== "");
        assert.equal(lines.length, 1, `${what}: one line on stderr, got:\n${r.stderr}`);
        assert.match(lines[0], /^error: /, what);
        assert.ok(lines[0].includes(dir), `${what}: names the file: ${lines[0]}`);
        for (const m of bad.mentions) {
          assert.ok(lines[0].includes(m), `${what}: names ${m}: ${lines[0]}`);
        }
        assert.ok(!/\n\s+at /.test(r.stderr), `${what}: no stack trace`);
        assert.ok(equalBytes(await Deno.readFile(after), before), `${what}: export unchanged`);
      }
    }
  });
});

Deno.test("e2e: --allow-non-finite accepts a NaN weight and reloads it", async () => {
  await withTemp(async (tmp) => {
    const weights = await withNaN(tmp);
    const r = await cli(
      ...["--model", `${CKPT}llama-tiny`, "--weights", weights, "--backend", BACKEND],
      ...["--allow-non-finite", "--quiet"],
    );
    ok(r, "--allow-non-finite");
  });
});

Deno.test("e2e: bad usage exits 2 with one line and a hint; --help exits 0", async () => {
  for (
    const argv of [["--bogus"], ["--quant", "fp4"], ["extra"], ["--weights", "x"], [
      "--repeat",
      "x",
    ]]
  ) {
    const r = await cli(...argv);
    assert.equal(r.code, 2, `${argv.join(" ")}: exit ${r.code}`);
    const lines = r.stderr.split("\n").filter((l) => l !== "");
    assert.equal(lines.length, 1, r.stderr);
    assert.match(lines[0], /^error: .*--help/);
  }
  const h = await cli("--help");
  assert.equal(h.code, 0);
  assert.match(h.stdout, /--model DIR/);
});

Deno.test("e2e: a missing model directory is a failed load: exit 1, one line", async () => {
  const r = await cli("--model", "/nonexistent/model", "--backend", BACKEND);
  assert.equal(r.code, 1);
  assert.equal(r.stderr.trim().split("\n").length, 1, r.stderr);
  assert.match(r.stderr, /^error: .*\/nonexistent\/model/);
});

Deno.test("e2e: the demo runs, keeps every pointer and matches B within the fp8 bound", async () => {
  await withTemp(async (tmp) => {
    const t0 = performance.now();
    const r = await cliIn({ TMPDIR: tmp }, "--backend", BACKEND, "--json", `${tmp}/demo.json`);
    const seconds = (performance.now() - t0) / 1000;
    ok(r, "demo");
    assert.match(r.stdout, /check: \d+ kernel tensors, 0 moved/);
    const rep = JSON.parse(await Deno.readTextFile(`${tmp}/demo.json`));
    assert.deepEqual(rep.moved, []);
    assert.equal(rep.reload.storageKept, true);
    assert.ok(rep.tensorsChecked > 0);
    assert.ok(rep.maxErrorOverBound <= 1, `${rep.maxErrorOverBound}`);
    assert.ok(rep.maxErrorOverBound > 0, "fp8 is lossy: some error must show");
    assert.ok(rep.reload.bytesLoaded >= 80e6, `${rep.reload.bytesLoaded}`);
    assert.ok(seconds < 60, `demo took ${seconds} s`);
    // The demo's temp dir (under TMPDIR, set to ours) is gone: only the report is left.
    const left = [];
    for await (const e of Deno.readDir(tmp)) left.push(e.name);
    assert.deepEqual(left, ["demo.json"]);
  });
});

Deno.test("e2e: every quantization reloads to the bytes of a first load", async () => {
  await withTemp(async (tmp) => {
    const copy = `${tmp}/copy`;
    await Deno.mkdir(copy);
    await permutedCopy(copy);
    for (const q of ["none", "fp8-channel", "fp8-block", "int8"]) {
      const flags = ["--quant", q, "--backend", BACKEND, "--quiet"];
      ok(
        await cli(
          "--model",
          `${CKPT}qwen2-tiny`,
          "--weights",
          `${CKPT}qwen2-tiny`,
          ...flags,
          "--export",
          `${tmp}/${q}-r.st`,
        ),
        `${q} reload`,
      );
      ok(
        await cli(
          "--model",
          `${CKPT}qwen2-tiny`,
          "--repeat",
          "0",
          ...flags,
          "--export",
          `${tmp}/${q}-f.st`,
        ),
        q,
      );
      const r = await Deno.readFile(`${tmp}/${q}-r.st`);
      assert.ok(equalBytes(r, await Deno.readFile(`${tmp}/${q}-f.st`)), q);
      const rl = await cli(
        "--model",
        `${CKPT}llama-tiny`,
        "--weights",
        copy,
        "--repeat",
        "2",
        ...flags,
        "--export",
        `${tmp}/${q}-c.st`,
      );
      ok(rl, `${q} reload twice into copy`);
      ok(await cli("--model", copy, "--repeat", "0", ...flags, "--export", `${tmp}/${q}-cf.st`), q);
      assert.ok(
        equalBytes(
          await Deno.readFile(`${tmp}/${q}-c.st`),
          await Deno.readFile(`${tmp}/${q}-cf.st`),
        ),
        `${q}: reload into copy`,
      );
    }
  });
});

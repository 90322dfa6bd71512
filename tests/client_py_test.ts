/**
 * The Python client (clients/python/layerwise_client.py) against a real server, when python3
 * is present: its HTTP transport (a streamed safetensors body built from shapes), disk
 * updates, model(), export() and errors; the exports it fetched are compared here, byte for
 * byte, with the PyTorch expectation and with each other; the IPC table (zero-copy routes,
 * offsets, handle cache, packing) with a fake driver and a fake torch. Its real torch parts (CUDA
 * tensors read in place, buckets) run only on a GPU machine with PyTorch.
 */
import assert from "node:assert/strict";
import { loadSafetensors } from "../src/checkpoint/safetensors.ts";
import { parseSafetensorsHeader } from "../src/checkpoint/safetensors.ts";
import { openCudaBackend } from "../src/backend/cuda/device.ts";
import { kernelTensors } from "../src/models/export.ts";
import { startServer } from "../src/server/server.ts";
import { commandSucceeds, equalBytes } from "../testing.ts";

const FIXTURES = new URL("../../shared/fixtures/", import.meta.url).pathname;
const LLAMA = `${FIXTURES}ckpt/llama-tiny`;
const EXPECT = `${FIXTURES}expect/llama-tiny.fp8-tensor.safetensors`;
const SCRIPT = new URL("./python/test_layerwise_client.py", import.meta.url).pathname;
const TOKEN = "python-client-test-token-0123";

function hasPython(): boolean {
  return commandSucceeds("python3", ["--version"]);
}

/** The fixture with every bf16 value doubled (exact). */
async function doubled(): Promise<Uint8Array<ArrayBuffer>> {
  const bytes = await Deno.readFile(`${LLAMA}/model.safetensors`);
  const h = parseSafetensorsHeader(bytes, bytes.byteLength, "fixture");
  const view = new DataView(bytes.buffer);
  for (const e of h.tensors.values()) {
    if (e.dtype.name !== "bf16") continue;
    for (let at = e.begin; at < e.end; at += 2) {
      const bits = view.getUint16(at, true);
      // Doubling a bf16 adds one to its exponent (finite, normal, non-zero values here).
      if ((bits & 0x7f80) !== 0 && (bits & 0x7f80) !== 0x7f00) {
        view.setUint16(at, bits + 0x80, true);
      }
    }
  }
  return bytes;
}

Deno.test({
  name: "python client: HTTP transport, disk, model, export and errors (standard library)",
  ignore: !hasPython(),
  fn: async () => {
    const root = await Deno.makeTempDir({ prefix: "layerwise-py-" });
    const out = await Deno.makeTempDir({ prefix: "layerwise-py-out-" });
    const s = await startServer({
      model: LLAMA,
      backend: "wasm",
      port: 0,
      token: TOKEN,
      allowPaths: [LLAMA, root],
    });
    try {
      await s.ready;
      await Deno.writeFile(`${root}/scaled.safetensors`, await doubled());
      const r = await new Deno.Command("python3", {
        args: [SCRIPT],
        env: {
          LW_URL: s.url,
          LW_TOKEN: TOKEN,
          LW_CKPT: `${LLAMA}/model.safetensors`,
          LW_SCALED: `${root}/scaled.safetensors`,
          LW_OUTSIDE: "/etc",
          LW_OUT: out,
          PYTHONDONTWRITEBYTECODE: "1",
        },
        stdout: "piped",
        stderr: "piped",
      }).output();
      const log = new TextDecoder().decode(r.stderr) + new TextDecoder().decode(r.stdout);
      assert.equal(r.code, 0, log);
      assert.match(log, /Ran 18 tests/);
      // The fixture pushed by the client gives the PyTorch expectation.
      const want = await loadSafetensors(EXPECT);
      const got = await loadSafetensors(`${out}/ckpt-http.safetensors`);
      for (const [name, w] of want) {
        assert.ok(equalBytes(got.get(name)!.data, w.data), `${name} differs from the expectation`);
      }
      // Tensors pushed over HTTP and the same file read by the server from disk agree.
      const http = await loadSafetensors(`${out}/scaled-http.safetensors`);
      const disk = await loadSafetensors(`${out}/scaled-disk.safetensors`);
      assert.equal(http.size, disk.size);
      for (const [name, t] of http) {
        assert.ok(equalBytes(t.data, disk.get(name)!.data), `${name}: http and disk differ`);
      }
      assert.ok([...http].some(([n, t]) => !equalBytes(t.data, got.get(n)!.data)));
    } finally {
      await s.stop();
      await Deno.remove(root, { recursive: true });
      await Deno.remove(out, { recursive: true });
    }
  },
});

/** Whether this machine has a usable CUDA backend and python3 with CUDA PyTorch and transformers. */
function gpuTrainer(): boolean {
  try {
    openCudaBackend().close();
  } catch {
    return false;
  }
  return commandSucceeds("python3", [
    "-c",
    "import torch, transformers, sys; sys.exit(0 if torch.cuda.is_available() else 1)",
  ]);
}

Deno.test({
  name:
    "python client (GPU): a PyTorch training loop pushes over IPC (zero-copy and packed) and HTTP; export = PyTorch fp8",
  ignore: !gpuTrainer(),
  fn: async () => {
    const script = new URL("./python/train_loop_gpu.py", import.meta.url).pathname;
    const dir = await Deno.makeTempDir({ prefix: "layerwise-train-" });
    try {
      const prep = await new Deno.Command("python3", { args: [script, "prepare", dir] }).output();
      assert.ok(prep.success, new TextDecoder().decode(prep.stderr));
      const s = await startServer({ model: dir, backend: "cuda", port: 0 });
      try {
        const model = await s.ready;
        const before = new Map(kernelTensors(model).map(([n, t]) => [n, t.ptr]));
        const r = await new Deno.Command("python3", {
          args: [script, "train", s.url, dir],
          stdout: "piped",
          stderr: "piped",
        }).output();
        const err = new TextDecoder().decode(r.stderr);
        assert.equal(r.code, 0, err);
        const out = JSON.parse(new TextDecoder().decode(r.stdout));
        const steps = out.steps as { step: number; transport: string; ipc?: string }[];
        // Zero-copy with one tensor through a bucket, HTTP, zero-copy twice, forced packing.
        assert.deepEqual(steps.map((x) => [x.step, x.transport, x.ipc ?? null]), [
          [0, "ipc", "mixed"],
          [1, "http", null],
          [2, "ipc", "zero-copy"],
          [2, "ipc", "zero-copy"],
          [2, "ipc", "copy"],
        ]);
        assert.equal(s.service.version, 5);
        const after = new Map(kernelTensors(model).map(([n, t]) => [n, t.ptr]));
        assert.deepEqual(after, before, "no kernel pointer moved");
        assert.equal(s.service.ipcHandlesOpen, 0, "the client released its buckets");
      } finally {
        await s.stop();
      }
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

/**
 * The CUDA graph proof: why reloads are in place (ARCHITECTURE.md, "Tensor formats"). A model is loaded in fp8; ONE CUDA
 * graph is captured of a probe kernel that reads every fp8 kernel tensor through its device
 * pointer (cuda/graph.cu `lw_fp8_tensor_sums`: exact sums in units of 2^-9 and the dequantized
 * sums); new weights are reloaded; the SAME graph is replayed without capturing again, and its
 * results must equal sums computed on the host from the downloaded kernel tensors of the new
 * model, and differ from before. Every kernel tensor pointer must be unchanged.
 *
 * The comparison is bit-exact: finite e4m3fn values are multiples of 2^-9, so their sums are
 * exact in any order, on the device (64-bit integer atomics) and on the host (f64). Runs where
 * the CUDA backend opens; registered as ignored otherwise. Each fixture runs twice: reloads
 * from host tensors (reloadWeights) and from tensors already on the device (reloadFromDevice,
 * whose multi-tensor launches write the same kernel tensors in place).
 */
import assert from "node:assert/strict";
import type { Backend } from "../src/backend/backend.ts";
import { CudaDevice, openCudaBackend } from "../src/backend/cuda/device.ts";
import { bf16Bits, bf16Value, rng } from "../testing.ts";
import { loadSafetensors } from "../src/checkpoint/safetensors.ts";
import type { TensorLike } from "../src/checkpoint/source.ts";
import { downloadKernelTensors, kernelTensors } from "../src/models/export.ts";
import { type CausalLM, loadModel, reloadWeights } from "../src/models/load.ts";
import { reloadFromDevice } from "../src/reload/device.ts";
import { DTYPES } from "../src/tensor/dtype.ts";
import type { Tensor } from "../src/tensor/tensor.ts";

const CKPT = new URL("../../shared/fixtures/ckpt/", import.meta.url).pathname;

let cuda: Backend | undefined;
let why = "";
try {
  cuda = openCudaBackend();
} catch (e) {
  why = (e as Error).message;
}

/** The value of an e4m3fn code, written from the format's definition (NaN counts 0). */
function e4m3(b: number): number {
  const e = (b >> 3) & 15, m = b & 7, sign = b & 0x80 ? -1 : 1;
  if (e === 15 && m === 7) return 0;
  return sign * (e === 0 ? m * 2 ** -9 : (1 + m / 8) * 2 ** (e - 7));
}

/** Per-tensor host sums of fp8 kernel tensors: [units of 2^-9, dequantized]. */
function hostSums(
  host: Map<string, { data: Uint8Array }>,
  probes: readonly Probe[],
): [number[], number[]] {
  const units: number[] = [], deq: number[] = [];
  for (const p of probes) {
    const q = host.get(p.name)!.data;
    let s = 0;
    for (let i = 0; i < q.length; i++) s += e4m3(q[i]);
    units.push(s * 512);
    // The device computes (units * 2^-9) * scale in f64: the same two exact-then-rounded steps.
    if (p.scaleName) {
      const sc = new Float32Array(host.get(p.scaleName)!.data.slice().buffer)[0];
      deq.push(s * sc);
    } else deq.push(s);
  }
  return [units, deq];
}

interface Probe {
  name: string;
  tensor: Tensor;
  scaleName?: string;
  scale?: Tensor;
}

function probesOf(model: CausalLM): Probe[] {
  const all = new Map(kernelTensors(model));
  const out: Probe[] = [];
  for (const [name, t] of all) {
    if (t.dtype !== DTYPES.f8_e4m3fn) continue;
    assert.ok(t.isContiguous, `${name} is contiguous`);
    const scaleName = `${name}_scale`;
    const s = all.get(scaleName);
    // Only a single per-tensor scale dequantizes the whole sum (experts have one per shard).
    out.push(s && s.numel === 1 ? { name, tensor: t, scaleName, scale: s } : { name, tensor: t });
  }
  return out;
}

/** The fixture's tensors, each bf16 element moved by a seeded amount: new, different weights. */
async function perturbed(dir: string, seed: number): Promise<[string, TensorLike][]> {
  const next = rng(seed);
  const out: [string, TensorLike][] = [];
  for (const [name, t] of await loadSafetensors(`${dir}/model.safetensors`)) {
    assert.equal(t.dtype, DTYPES.bf16, name);
    const bits = new Uint16Array(t.data.slice().buffer);
    for (let i = 0; i < bits.length; i++) {
      bits[i] = bf16Bits(bf16Value(bits[i]) + 0.01 * (next() - 0.5));
    }
    out.push([name, { dtype: t.dtype, shape: t.shape, data: new Uint8Array(bits.buffer) }]);
  }
  return out;
}

/** Reloads `model` from `pairs`: through reloadWeights, or uploaded first and reloadFromDevice. */
async function reloadVia(
  path: "host" | "device",
  b: Backend,
  model: CausalLM,
  pairs: [string, TensorLike][],
): Promise<boolean> {
  if (path === "host") return (await reloadWeights(model, pairs)).storageKept;
  const views = pairs.map(([name, t]) => {
    const d = b.empty(t.shape, t.dtype as typeof DTYPES.bf16);
    b.upload(d, new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength));
    return { name, tensor: d };
  });
  try {
    const r = await reloadFromDevice(model, views, { atomic: true });
    assert.equal(r.plan.hostLoads, 0, "every tensor went through the device plan");
    return r.storageKept;
  } finally {
    for (const v of views) b.free(v.tensor.storage!);
  }
}

async function original(dir: string): Promise<[string, TensorLike][]> {
  return [...await loadSafetensors(`${dir}/model.safetensors`)].map((
    [name, t],
  ) => [name, { dtype: t.dtype, shape: t.shape, data: t.data }]);
}

for (
  const [fixture, path] of ["llama-tiny", "mixtral-tiny"].flatMap((f) =>
    (["host", "device"] as const).map((p) => [f, p] as const)
  )
) {
  Deno.test({
    name: `cuda graph: one captured graph follows reloaded fp8 weights (${fixture}, ${path})${
      cuda ? "" : ` [not run: ${why}]`
    }`,
    ignore: cuda === undefined,
    fn: async () => {
      const b = cuda!;
      const dir = `${CKPT}${fixture}`;
      const model = await loadModel(dir, { backend: b, quant: "fp8" });
      const dev = CudaDevice.open(0);
      const ctx = dev.createContext();
      const probes = probesOf(model);
      assert.ok(probes.length >= 6, `${fixture}: ${probes.length} fp8 tensors`);
      const n = probes.length;
      // Device table {q, numel, scale} per tensor: the graph bakes in only this table's address.
      const table = new BigUint64Array(3 * n);
      probes.forEach((p, i) => {
        table[3 * i] = BigInt(p.tensor.ptr);
        table[3 * i + 1] = BigInt(p.tensor.numel);
        table[3 * i + 2] = BigInt(p.scale ? p.scale.ptr : 0);
      });
      const tablePtr = dev.malloc(table.byteLength);
      const sumsPtr = dev.malloc(8 * n), deqPtr = dev.malloc(8 * n);
      let exec = 0;
      try {
        dev.writeSync(ctx, tablePtr, new Uint8Array(table.buffer));
        const maxNumel = Math.max(...probes.map((p) => p.tensor.numel));
        dev.graphBegin(ctx);
        try {
          dev.fp8TensorSums(ctx, tablePtr, n, maxNumel, sumsPtr, deqPtr);
        } finally {
          exec = dev.graphEnd(ctx);
        }
        const replay = (): [number[], number[]] => {
          dev.graphLaunch(ctx, exec);
          const s = new BigInt64Array(n), d = new Float64Array(n);
          dev.readSync(ctx, new Uint8Array(s.buffer), sumsPtr);
          dev.readSync(ctx, new Uint8Array(d.buffer), deqPtr);
          return [[...s].map(Number), [...d]];
        };
        const pointers = (m: CausalLM) => kernelTensors(m).map(([k, t]) => [k, t.ptr]);
        const before = pointers(model);

        b.synchronize();
        const [u0, d0] = replay();
        const [hu0, hd0] = hostSums(downloadKernelTensors(model), probes);
        assert.deepEqual(u0, hu0, "first replay: exact sums equal the host's");
        assert.deepEqual(d0, hd0, "first replay: dequantized sums equal the host's");

        assert.equal(await reloadVia(path, b, model, await perturbed(dir, 1234)), true);
        b.synchronize();
        assert.deepEqual(pointers(model), before, "every kernel tensor pointer is unchanged");

        const [u1, d1] = replay(); // the same graph, not captured again
        const [hu1, hd1] = hostSums(downloadKernelTensors(model), probes);
        assert.deepEqual(u1, hu1, "replay after reload: exact sums equal the new weights'");
        assert.deepEqual(d1, hd1, "replay after reload: dequantized sums equal the new weights'");
        for (let i = 0; i < n; i++) {
          assert.notEqual(d1[i], d0[i], `${probes[i].name}: the sum follows the new weights`);
        }
        // And back: a reload of the original weights brings the first results back exactly.
        if (path === "host") await reloadWeights(model, dir);
        else await reloadVia(path, b, model, await original(dir));
        b.synchronize();
        const [u2, d2] = replay();
        assert.deepEqual([u2, d2], [u0, d0], "reloading the first weights restores the sums");
      } finally {
        if (exec !== 0) dev.graphDestroy(exec);
        dev.destroyContext(ctx);
        for (const p of [tablePtr, sumsPtr, deqPtr]) dev.free(p);
        const storages = new Set(kernelTensors(model).map(([, t]) => t.storage!));
        for (const s of storages) if (!s.freed) b.free(s);
      }
    },
  });
}

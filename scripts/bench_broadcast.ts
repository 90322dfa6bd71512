/**
 * Broadcast-reload bandwidth against raw NCCL broadcast bandwidth of the same bytes, in the
 * same run (limit: 0.9 of the raw broadcast; BENCHMARKS.md has the runs).
 *
 *   NCCL_NVLS_ENABLE=0 LAYERWISE_NCCL_LIB=.../libnccl.so.2 \
 *     deno run -A scripts/bench_broadcast.ts [--ranks N] [--shape 8b|1b|small] [--layers L]
 *       [--quant fp8|none|...] [--bucket-mib M] [--repeat R] [--verify] [--lifecycle]
 *
 * --lifecycle: every rank takes its tensors through the layerwise lifecycle (scratch per layer)
 * instead of the device path's multi-tensor launches from the buckets (the default).
 *
 * --verify (with --quant none): after the timed runs, a TP=1 model is loaded on cuda:0 from the
 * same source, and every rank's kernel tensors must equal, byte for byte, the matching shard of
 * the TP=1 kernel tensors (src/parallel/shards.ts); prints `verify: ... identical` or throws.
 *
 * Rank r is a tensor-parallel shard (TP = N) on CUDA device r, all driven by this process. The
 * source is the checkpoint-format (bf16) weights already on the root GPU, as a trainer would
 * hold them; each bucket is packed on the root, broadcast over NCCL, and every rank reloads its
 * shard from it (fp8 quantization included). The raw figure broadcasts buckets of the same sizes
 * buffer to buffer, nothing else. With one rank NCCL has no peer to send to, so only the
 * reload figure means something; the ratio is the acceptance figure on 2+ GPUs.
 * @module
 */

import { Buffer } from "node:buffer";
import type { Backend } from "../src/backend/backend.ts";
import { CudaDevice } from "../src/backend/cuda/device.ts";
import { NcclComms } from "../src/backend/cuda/nccl.ts";
import { synthConfig, type SynthShape, synthTensorShapes } from "../testing.ts";
import { parseModelConfig } from "../src/models/config.ts";
import { type QuantName, quantScheme } from "../src/models/quant_names.ts";
import { kernelTensors } from "../src/models/export.ts";
import { broadcastReload, deviceBroadcastSource } from "../src/parallel/broadcast.ts";
import { SHAPE_8B } from "./bench_reload.ts";
import { expectedShard, shardRule } from "../src/parallel/shards.ts";
import { buildTensorParallel, freeModel, openRankBackends } from "../src/parallel/tp.ts";
import { loadWeights } from "../src/reload/load.ts";
import { DTYPES } from "../src/tensor/dtype.ts";
import type { Tensor } from "../src/tensor/tensor.ts";

const SHAPES: Record<string, SynthShape> = {
  "8b": SHAPE_8B,
  "1b": {
    hiddenSize: 2048,
    intermediateSize: 8192,
    numLayers: 16,
    numHeads: 32,
    numKvHeads: 8,
    vocabSize: 128256,
    tieWordEmbeddings: true,
  },
  small: {
    hiddenSize: 1024,
    intermediateSize: 4096,
    numLayers: 8,
    numHeads: 16,
    numKvHeads: 8,
    vocabSize: 32000,
    tieWordEmbeddings: false,
  },
};

function arg(name: string, fallback: string): string {
  const i = Deno.args.indexOf(`--${name}`);
  return i >= 0 && i + 1 < Deno.args.length ? Deno.args[i + 1] : fallback;
}

const ranks = Number(arg("ranks", "1"));
const shapeName = arg("shape", "1b");
const shape = { ...SHAPES[shapeName] };
if (!SHAPES[shapeName]) throw new Error(`--shape: one of ${Object.keys(SHAPES).join(", ")}`);
if (Deno.args.includes("--layers")) shape.numLayers = Number(arg("layers", "1"));
const quant = arg("quant", "fp8") as QuantName;
const bucketBytes = Number(arg("bucket-mib", "256")) * (1 << 20);
const repeat = Number(arg("repeat", "3"));
if (Deno.env.get("NCCL_NVLS_ENABLE") === undefined) Deno.env.set("NCCL_NVLS_ENABLE", "0");

const GB = 1e9;
const devices = Array.from({ length: ranks }, (_, r) => r);
const backends: Backend[] = await openRankBackends(ranks, "cuda", devices);
const config = parseModelConfig(synthConfig(shape));
const models = buildTensorParallel(config, backends, quantScheme(quant, config));
const comms = NcclComms.initAll(devices);
const cuda0 = CudaDevice.open(0);
console.log(
  `# ${
    new Date().toISOString()
  } ${cuda0.name} x${ranks}, NCCL ${comms.version}, shape ${shapeName}` +
    ` (${shape.numLayers} layers), quant ${quant}, TP=${ranks}, bucket ${bucketBytes >> 20} MiB`,
);

// Seeded bf16 values in a typical weight range, tiled: the bytes only need to be realistic.
const shapes = synthTensorShapes(shape);
const maxBytes = Math.max(...shapes.map(([, s]) => s.reduce((a, b) => a * b, 1) * 2));
const host = new Uint16Array(maxBytes / 2 + 4096);
{
  const tile = new Uint16Array(1 << 22);
  let x = 12345;
  for (let i = 0; i < tile.length; i++) {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0;
    tile[i] = 0x3c00 + ((x >>> 16) & 0x3ff) | ((x & 1) << 15); // |v| in [2^-7, 2)
  }
  for (let at = 0; at < host.length; at += tile.length) {
    host.set(tile.subarray(0, Math.min(tile.length, host.length - at)), at);
  }
}
const hostBytes = new Uint8Array(host.buffer);

// The source: checkpoint-format tensors on the root GPU.
const root = backends[0];
const source: [string, Tensor][] = [];
let total = 0;
for (const [k, [name, s]] of shapes.entries()) {
  const t = root.empty(s, DTYPES.bf16);
  const off = (k * 2 * 977) % 8192;
  root.upload(t, hostBytes.subarray(off, off + t.nbytes));
  source.push([name, t]);
  total += t.nbytes;
}
root.synchronize();
console.log(`source: ${source.length} tensors, ${(total / GB).toFixed(2)} GB on cuda:0`);

// First load of every rank, tensor by tensor through its own backend.
for (let r = 0; r < ranks; r++) {
  const b = backends[r];
  const stream = async function* (): AsyncGenerator<[string, Tensor]> {
    for (const [name, t] of source) {
      if (r === 0) {
        yield [name, t];
        continue;
      }
      const x = b.empty(t.shape, t.dtype);
      try {
        b.upload(x, root.download(t));
        yield [name, x];
      } finally {
        b.free(x.storage!);
      }
    }
  };
  await loadWeights(models[r], stream());
}

// Raw NCCL: buckets of the same sizes, buffer to buffer, same streams setup.
const devs = devices.map((d) => CudaDevice.open(d));
const ctxs = devs.map((d) => d.createContext());
const streams = ctxs.map((c, r) => devs[r].stream(c));
const cap = Math.max(bucketBytes, ...source.map(([, t]) => Math.ceil(t.nbytes / 256) * 256));
const bufs = devs.map((d) => [d.malloc(cap), d.malloc(cap)]);
const sizes: number[] = [];
{
  let cur = 0;
  for (const [, t] of source) {
    if (cur > 0 && Math.ceil(cur / 256) * 256 + t.nbytes > cap) {
      sizes.push(cur);
      cur = 0;
    }
    cur = Math.ceil(cur / 256) * 256 + t.nbytes;
  }
  if (cur > 0) sizes.push(cur);
}
function rawOnce(): number {
  for (let r = 0; r < ranks; r++) devs[r].sync(ctxs[r]);
  const t0 = performance.now();
  sizes.forEach((n, i) => {
    comms.broadcast(bufs.map((b, r) => ({ ptr: b[i % 2], stream: streams[r] })), n, 0);
  });
  for (let r = 0; r < ranks; r++) devs[r].sync(ctxs[r]);
  return (performance.now() - t0) / 1000;
}
rawOnce(); // warm-up (NCCL sets up its channels on first use)
let rawBest = Infinity;
for (let i = 0; i < repeat; i++) rawBest = Math.min(rawBest, rawOnce());

const src = deviceBroadcastSource(source, "root GPU bf16 tensors");
const devicePath = !Deno.args.includes("--lifecycle");
await broadcastReload(models, comms, src, { bucketBytes, devicePath }); // warm-up
let best = Infinity, buckets = 0;
for (let i = 0; i < repeat; i++) {
  const r = await broadcastReload(models, comms, src, { bucketBytes, devicePath });
  if (!r.ranks.every((x) => x.storageKept)) throw new Error("a kernel tensor moved");
  best = Math.min(best, r.seconds);
  buckets = r.buckets;
}

const raw = total / rawBest / GB, reload = total / best / GB;
console.log(
  `NCCL broadcast (same ${sizes.length} buckets, ${(total / GB).toFixed(2)} GB): ` +
    `${raw.toFixed(1)} GB/s  (best of ${repeat})`,
);
console.log(
  `broadcast reload (${buckets} buckets, TP=${ranks}, ${quant}, ${
    devicePath ? "device path" : "lifecycle"
  }): ${reload.toFixed(1)} GB/s` +
    `  ratio ${(reload / raw).toFixed(3)} (limit 0.9)${
      ranks === 1 ? "  [1 rank: NCCL sends nothing; the ratio needs 2+ GPUs]" : ""
    }`,
);

if (Deno.args.includes("--verify")) {
  if (quant !== "none") throw new Error("--verify compares bytes: use it with --quant none");
  const t0 = performance.now();
  const [tp1] = buildTensorParallel(config, [root], quantScheme(quant, config));
  await loadWeights(tp1, source);
  const full = new Map(kernelTensors(tp1));
  let compared = 0, bytes = 0;
  for (let r = 0; r < ranks; r++) {
    for (const [name, t] of kernelTensors(models[r])) {
      const f = full.get(name);
      if (!f) throw new Error(`verify: ${name} is not in the TP=1 model`);
      const want = expectedShard(
        { dtype: f.dtype, shape: [...f.shape], data: root.download(f) },
        shardRule(name, config, ranks),
        config,
        ranks,
        r,
      );
      const got = backends[r].download(t);
      if (
        want.shape.join() !== t.shape.join() ||
        !Buffer.from(got.buffer, got.byteOffset, got.length).equals(want.data)
      ) {
        throw new Error(`verify: rank ${r} ${name} differs from its TP=1 shard`);
      }
      compared++;
      bytes += got.length;
    }
  }
  console.log(
    `verify: ${compared} kernel tensors of ${ranks} ranks (${(bytes / GB).toFixed(2)} GB) ` +
      `identical to their TP=1 shards (${((performance.now() - t0) / 1000).toFixed(1)} s)`,
  );
  freeModel(tp1);
}

for (let r = 0; r < ranks; r++) {
  devs[r].destroyContext(ctxs[r]);
  for (const p of bufs[r]) devs[r].free(p);
}
comms.destroy();
for (const m of models) freeModel(m);
for (const [, t] of source) root.free(t.storage!);
for (const b of backends) b.close();

/**
 * NCCL broadcast reload with the ranks one machine gives: ONE rank on cuda:0 (a second rank on
 * the same GPU is refused by NCCL). A broadcast reload (the checkpoint read once on the root,
 * packed into small buckets so that many are broadcast, then fed to the layerwise reload) must
 * give the same kernel bytes as a plain reload of the same weights, with every kernel tensor
 * left in place; the same from tensors already on the GPU. Runs where the CUDA backend opens
 * and NCCL loads (`LAYERWISE_NCCL_LIB`, else libnccl.so.2); ignored otherwise, with the reason.
 * Multi-GPU runs: scripts/bench_broadcast.ts (see its doc).
 */
import assert from "node:assert/strict";
import type { Backend } from "../src/backend/backend.ts";
import { openCudaBackend } from "../src/backend/cuda/device.ts";
import { NcclComms } from "../src/backend/cuda/nccl.ts";
import { loadNcclLibrary, ncclVersionString } from "../src/backend/cuda/nccl_ffi.ts";
import { openWeightSource } from "../src/checkpoint/source.ts";
import { synthTensors, writeSynthCheckpoint } from "../testing.ts";
import { BackendError } from "../src/errors.ts";
import type { CausalLM } from "../src/models/causal_lm.ts";
import { downloadKernelTensors, kernelTensors } from "../src/models/export.ts";
import { loadModel, reloadWeights } from "../src/models/load.ts";
import type { QuantName } from "../src/models/quant_names.ts";
import {
  broadcastReload,
  checkpointBroadcastSource,
  deviceBroadcastSource,
} from "../src/parallel/broadcast.ts";
import { freeModel } from "../src/parallel/tp.ts";
import { releaseDevicePlan } from "../src/reload/device.ts";
import type { Tensor } from "../src/tensor/tensor.ts";

const CKPT = new URL("../../shared/fixtures/ckpt/", import.meta.url).pathname;

let cuda: Backend | undefined;
let why = "";
let ncclRefusal: unknown;
try {
  const lib = loadNcclLibrary();
  console.error(`nccl: ${lib.path} (NCCL ${ncclVersionString(lib.version)})`);
} catch (e) {
  ncclRefusal = e;
  why = (e as Error).message;
}
if (ncclRefusal === undefined) {
  try {
    cuda = openCudaBackend();
  } catch (e) {
    why = (e as Error).message;
  }
}

// llama-tiny's shapes, new weights.
const SHAPE = {
  hiddenSize: 64,
  intermediateSize: 176,
  numLayers: 2,
  numHeads: 4,
  numKvHeads: 2,
  vocabSize: 320,
  tieWordEmbeddings: false,
};

function sameBytes(a: CausalLM, b: CausalLM, what: string): void {
  const x = downloadKernelTensors(a), y = downloadKernelTensors(b);
  assert.deepEqual([...x.keys()], [...y.keys()], `${what}: names`);
  for (const [name, t] of x) {
    const u = y.get(name)!;
    assert.ok(
      t.data.length === u.data.length && t.data.every((v, i) => v === u.data[i]),
      `${what}: ${name} differs`,
    );
  }
}

const pointers = (m: CausalLM) => kernelTensors(m).map(([n, t]) => `${n}@${t.ptr}`);

for (const quant of ["fp8", "none"] as QuantName[]) {
  Deno.test({
    name: `nccl: a 1-rank broadcast reload (${quant}) gives the kernel bytes of a plain reload${
      cuda ? "" : ` [not run: ${why}]`
    }`,
    ignore: cuda === undefined,
    fn: async () => {
      const b = cuda!;
      const dir = await Deno.makeTempDir({ prefix: "layerwise-nccl-" });
      const base = `${CKPT}llama-tiny`;
      const plain = await loadModel(base, { backend: b, quant });
      const bcast = await loadModel(base, { backend: b, quant });
      const comms = NcclComms.initAll([0]);
      try {
        await writeSynthCheckpoint(dir, SHAPE, synthTensors(SHAPE, 5));
        await reloadWeights(plain, dir);
        const before = pointers(bcast);
        const used = b.allocatedBytes();
        const ws = await openWeightSource(dir);
        const src = checkpointBroadcastSource(ws);
        let r;
        try {
          r = await broadcastReload([bcast], comms, src, { bucketBytes: 4096 });
        } finally {
          src.close();
          ws.close();
        }
        assert.ok(r.buckets > 4, `${r.buckets} buckets`);
        assert.equal(r.ranks.length, 1);
        assert.ok(r.ranks[0].storageKept);
        assert.equal(r.bytes, r.ranks[0].bytesLoaded);
        assert.deepEqual(pointers(bcast), before, "kernel tensors in place");
        // The device path keeps its plan's tables for the next reload of the same layout.
        releaseDevicePlan(bcast);
        assert.equal(b.allocatedBytes(), used, "buckets given back");
        sameBytes(bcast, plain, "from a checkpoint");

        // From tensors already on the GPU (a trainer's weights): new weights again.
        const host = synthTensors(SHAPE, 6);
        const dev: [string, Tensor][] = [];
        for (const [name, t] of host) {
          const x = b.empty(t.shape, t.dtype);
          b.upload(x, t.data);
          dev.push([name, x]);
        }
        try {
          await reloadWeights(plain, [...host]);
          // Every tensor through the layerwise lifecycle this time (devicePath false).
          const r2 = await broadcastReload([bcast], comms, deviceBroadcastSource(dev), {
            bucketBytes: 64 << 10,
            devicePath: false,
          });
          assert.ok(r2.buckets >= 2);
          sameBytes(bcast, plain, "from device tensors");
          assert.deepEqual(pointers(bcast), before, "kernel tensors in place");
        } finally {
          for (const [, x] of dev) b.free(x.storage!);
        }
      } finally {
        comms.destroy();
        freeModel(plain);
        freeModel(bcast);
        await Deno.remove(dir, { recursive: true });
      }
    },
  });
}

Deno.test({
  name: `nccl: a model count that does not match the ranks is refused before anything moves${
    cuda ? "" : ` [not run: ${why}]`
  }`,
  ignore: cuda === undefined,
  fn: async () => {
    const b = cuda!;
    const m = await loadModel(`${CKPT}llama-tiny`, { backend: b, quant: "fp8" });
    const comms = NcclComms.initAll([0]);
    try {
      await assert.rejects(
        () => broadcastReload([m, m], comms, deviceBroadcastSource([])),
        /2 models for 1 NCCL ranks/,
      );
    } finally {
      comms.destroy();
      freeModel(m);
    }
  },
});

Deno.test({
  name: "nccl: a missing NCCL is a BackendError NCCL_UNAVAILABLE that says where to point",
  ignore: ncclRefusal === undefined,
  fn: () => {
    assert.ok(ncclRefusal instanceof BackendError);
    assert.equal(ncclRefusal.code, "NCCL_UNAVAILABLE");
    assert.match(ncclRefusal.message, /LAYERWISE_NCCL_LIB|--allow-ffi/);
  },
});

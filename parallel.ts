/**
 * Several GPUs of one host, driven from one process: tensor-parallel ranks (each holds its
 * shard of every layer, loaded from the same unsharded checkpoint) and the broadcast reload
 * (each tensor read once on the root rank and broadcast over NCCL; every rank reloads in place).
 *
 * @example Two ranks on WebAssembly (CUDA devices work the same), loaded and reloaded
 * ```ts
 * import {
 *   freeModel,
 *   loadTensorParallel,
 *   openRankBackends,
 *   reloadTensorParallel,
 * } from "@layerwise/reload/parallel";
 * import { synthTensors, writeSynthCheckpoint } from "@layerwise/reload/testing";
 *
 * const shape = {
 *   hiddenSize: 128,
 *   intermediateSize: 256,
 *   numLayers: 1,
 *   numHeads: 4,
 *   numKvHeads: 2,
 *   vocabSize: 256,
 *   tieWordEmbeddings: true,
 * };
 * const dir = await Deno.makeTempDir();
 * await writeSynthCheckpoint(dir, shape, synthTensors(shape, 1));
 *
 * const backends = await openRankBackends(2, "wasm");
 * const ranks = await loadTensorParallel(dir, backends, { quant: "fp8" });
 * const reports = await reloadTensorParallel(ranks, dir);
 * console.log(reports.map((r) => r.layersProcessed));
 * for (const m of ranks) freeModel(m);
 * for (const b of backends) b.close();
 * ```
 * @module
 */

export {
  buildTensorParallel,
  freeModel,
  loadTensorParallel,
  openRankBackends,
  type RankBackendKind,
  reloadTensorParallel,
  type TensorParallelLoadOptions,
} from "./src/parallel/tp.ts";
export {
  broadcastReload,
  type BroadcastReloadOptions,
  type BroadcastReloadReport,
  type BroadcastSource,
  checkpointBroadcastSource,
  deviceBroadcastSource,
} from "./src/parallel/broadcast.ts";
export { type BroadcastPart, NcclComms } from "./src/backend/cuda/nccl.ts";

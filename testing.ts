/**
 * What tests and benchmarks share: synthetic checkpoints of any Llama shape, a tiny model built
 * from the engine's layers (with its checkpoints and helpers), a soak loop and memory probes.
 *
 * @example Write a small synthetic checkpoint and read its header back
 * ```ts
 * import { synthTensors, writeSynthCheckpoint } from "@layerwise/reload/testing";
 *
 * const shape = {
 *   hiddenSize: 64,
 *   intermediateSize: 128,
 *   numLayers: 1,
 *   numHeads: 4,
 *   numKvHeads: 2,
 *   vocabSize: 256,
 *   tieWordEmbeddings: true,
 * };
 * const dir = await Deno.makeTempDir();
 * const tensors = synthTensors(shape, 1); // same seed, same bytes
 * await writeSynthCheckpoint(dir, shape, tensors);
 * console.log(`${tensors.size} tensors in ${dir}/model.safetensors`);
 * ```
 * @module
 */

export * from "./src/testing/synth.ts";
export * from "./src/testing/tiny_model.ts";
export * from "./src/testing/soak.ts";
export * from "./src/testing/memory.ts";
export * from "./src/testing/fake_ipc.ts";
export * from "./src/testing/fake_nccl.ts";
export * from "./src/testing/server_export.ts";
export * from "./src/testing/block_fp8.ts";
export * from "./src/testing/tools.ts";

/**
 * Run by nn_test.ts with --expose-gc: builds and loads a model, starts a reload and buffers a
 * few loads, then drops every reference and checks that the model, its layers and their
 * reload bookkeeping are collected. Prints one line.
 */

import { openWasmBackend } from "../src/backend/wasm.ts";
import { getLayerwiseInfo, initializeLayerwiseReload } from "../src/reload/layerwise.ts";
import { loadWeights } from "../src/reload/load.ts";
import { makeCheckpoint, shuffle, TINY, TinyModel, uploadWeights } from "../testing.ts";

const gc = (globalThis as unknown as { gc?: () => void }).gc;
if (!gc) throw new Error("run with --v8-flags=--expose-gc");
const b = await openWasmBackend();
let collected = 0, model = false, infos = 0;
const registry = new FinalizationRegistry<string>((what) => {
  if (what === "model") model = true;
  else if (what === "info") infos++;
  else collected++;
});
let layers = 0, infoCount = 0;

async function scope() {
  const m = new TinyModel(b, TINY, "fp8-tensor");
  await loadWeights(m, uploadWeights(b, makeCheckpoint(TINY, 1)));
  initializeLayerwiseReload(m, { maxBufferedBytes: 1e9 });
  for (const [name, t] of shuffle(uploadWeights(b, makeCheckpoint(TINY, 2)), 3).slice(0, 6)) {
    m.loadWeight(name, t);
  }
  registry.register(m, "model");
  for (const [path, layer] of m.namedModules()) {
    if (path !== "") {
      registry.register(layer, "layer");
      layers++;
    }
    const meta = getLayerwiseInfo(layer)?.restoreMetadata;
    if (meta) {
      registry.register(meta, "info");
      infoCount++;
    }
  }
}

await scope();
for (let i = 0; i < 20 && !(model && collected === layers && infos === infoCount); i++) {
  gc();
  await new Promise((r) => setTimeout(r, 10));
}
console.log(`collected: model=${model} layers=${collected}/${layers} infos=${infos === infoCount}`);
if (!model || collected !== layers || infos !== infoCount) Deno.exit(1);

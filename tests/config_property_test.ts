// Random config.json files against a real checkpoint (llama-tiny): sizes from 0 to 2^63, wrong
// types, missing fields. Each either loads, at a cost in proportion to the checkpoint, or fails
// with one ConfigError/CheckpointError line naming the file; none crashes, hangs or allocates in
// proportion to a number in the config. In-process, through loadModel on WebAssembly.
import assert from "node:assert/strict";
import fc from "fast-check";
import { openWasmBackend } from "../src/backend/wasm.ts";
import { CheckpointError, ConfigError } from "../src/errors.ts";
import { loadModel } from "../src/models/load.ts";
import { kernelTensors } from "../src/models/export.ts";
import { openCheckpoint } from "../src/checkpoint/sharded.ts";
import { SIZE_FIELDS } from "../src/models/config.ts";

const CKPT = new URL("../../shared/fixtures/ckpt/llama-tiny/", import.meta.url).pathname;
const BASE: Record<string, unknown> = JSON.parse(await Deno.readTextFile(`${CKPT}config.json`));
// A guard against a hang or a build that costs what a config says (1e9 layers took minutes),
// not a timing assertion: far above the few milliseconds a case takes.
const GUARD_MS = 10_000;
// Heap growth allowed per case: a few times what the tiny checkpoint needs.
const HEAP_GUARD_BYTES = 256 * 1024 * 1024;

const FIELDS = [
  ...SIZE_FIELDS.map((f) => f.field),
  "architectures",
  "dtype",
  "tie_word_embeddings",
  "attention_bias",
  "rms_norm_eps",
];

// Raw JSON text for a value, so integers past 2^53 are written exactly as digits.
const RAW = "\u0000raw:";
const sizeValue = fc.oneof(
  fc.integer({ min: 0, max: 400 }), // near the real sizes: some configs load
  fc.constantFrom(16, 64, 176, 320, 2, 4),
  fc.bigInt({ min: 0n, max: 2n ** 63n }).map((b) => `${RAW}${b}`),
  fc.constantFrom(
    `${RAW}9007199254740991`,
    `${RAW}9223372036854775808`,
    `${RAW}1e9`,
    `${RAW}1e400`,
    `${RAW}-1`,
    `${RAW}1.5`,
    `${RAW}64.0`,
  ),
);
const wrongType = fc.constantFrom<unknown>("64", true, null, [], {}, [64], "LlamaForCausalLM", -3);
const value = fc.oneof(sizeValue, wrongType, fc.constant(undefined));

function configText(edits: Record<string, unknown>): string {
  const c: Record<string, unknown> = { ...BASE };
  for (const [k, v] of Object.entries(edits)) {
    if (v === undefined) delete c[k];
    else c[k] = v;
  }
  return JSON.stringify(c).replace(/"\\u0000raw:([^"]*)"/g, "$1");
}

Deno.test("random config.json files against llama-tiny: load in proportion, or one config/checkpoint error line", async () => {
  const ckpt = await openCheckpoint(CKPT);
  const ckptBytes = (await Deno.stat(`${CKPT}model.safetensors`)).size;
  const dir = await Deno.makeTempDir({ prefix: "lw-cfg-" });
  let loaded = 0, refused = 0;
  await fc.assert(
    fc.asyncProperty(
      fc.dictionary(fc.constantFrom(...FIELDS), value, { maxKeys: 4 }),
      async (edits) => {
        const text = configText(edits);
        await Deno.writeTextFile(`${dir}/config.json`, text);
        // One thread: a backend per case, and starting workers for each would cost more than
        // the case (seconds per case on a 16-core machine).
        const backend = await openWasmBackend({ threads: 1 });
        const heap0 = Deno.memoryUsage().heapUsed;
        const t0 = performance.now();
        try {
          const model = await loadModel(dir, { backend, weights: CKPT, quant: "fp8" });
          loaded++;
          // Built in proportion to the checkpoint: no more kernel tensors than it has tensors
          // (plus their scales), no more backend memory than a small multiple of its bytes.
          assert.ok(kernelTensors(model).length <= 2 * ckpt.tensors.size, text);
          assert.ok(backend.allocatedBytes() <= 2 * ckptBytes + (1 << 20), text);
        } catch (e) {
          refused++;
          assert.ok(e instanceof ConfigError || e instanceof CheckpointError, `${text}: ${e}`);
          assert.ok(!e.message.includes("\n"), e.message);
          assert.ok(
            e.message.includes("config.json") || e.message.includes(CKPT),
            `${text}: ${e.message} names no file`,
          );
          assert.ok(e.message.length < 2000, e.message.slice(0, 200));
        } finally {
          backend.close();
        }
        assert.ok(performance.now() - t0 < GUARD_MS, `hang guard: ${text}`);
        assert.ok(Deno.memoryUsage().heapUsed - heap0 < HEAP_GUARD_BYTES, `heap guard: ${text}`);
      },
    ),
    { numRuns: 300, seed: 0x15c0f1 },
  );
  // Both outcomes occur, so the property checked both branches.
  assert.ok(loaded > 0 && refused > 0, `loaded ${loaded}, refused ${refused}`);
  await Deno.remove(dir, { recursive: true });
});

Deno.test("every size field of the table is bounded: 2^63 is refused naming the field", async () => {
  const dir = await Deno.makeTempDir({ prefix: "lw-cfg-" });
  const mix = JSON.parse(
    await Deno.readTextFile(
      new URL("../../shared/fixtures/ckpt/mixtral-tiny/config.json", import.meta.url),
    ),
  );
  const qwen3Moe = JSON.parse(
    await Deno.readTextFile(
      new URL("../../shared/fixtures/ckpt/qwen3-moe-tiny/config.json", import.meta.url),
    ),
  );
  for (const f of SIZE_FIELDS) {
    for (const big of ["9223372036854775808", String(f.max + 1)]) {
      // Each field in a config whose architecture reads it.
      const base = f.field.startsWith("moe_") ? qwen3Moe : f.field.includes("expert") ? mix : BASE;
      const text = JSON.stringify({ ...base, [f.field]: 0 }).replace(
        `"${f.field}":0`,
        `"${f.field}":${big}`,
      );
      await Deno.writeTextFile(`${dir}/config.json`, text);
      await assert.rejects(
        loadModel(dir, { backend: "wasm", weights: CKPT }),
        (e: unknown) => e instanceof ConfigError && e.message.includes(f.field),
        `${f.field} = ${big}`,
      );
    }
  }
  await Deno.remove(dir, { recursive: true });
});

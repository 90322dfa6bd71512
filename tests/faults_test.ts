/**
 * Fault injection: a source that fails after k tensors (every k), a file truncated between
 * validation and reading, a kernel error on the n-th copy / quantization / allocation (every
 * n), and a quantization method that throws. After each failure: with atomic, every kernel
 * tensor's bytes equal those before; without, the model is marked inconsistent, the error lists
 * the written layers, and every layer not listed is unchanged. Then a good reload gives bytes
 * identical to a fresh load, storage in place and no memory leaked. Runs on every backend.
 */

import assert from "node:assert/strict";
import type { Backend, Granularity } from "../src/backend/backend.ts";
import { writeSafetensors } from "../src/checkpoint/safetensors.ts";
import { fileSource, type WeightSource } from "../src/checkpoint/source.ts";
import { BackendError, CheckpointError, LayerwiseError, ReloadError } from "../src/errors.ts";
import type { Module } from "../src/nn/module.ts";
import type { QuantScheme } from "../src/nn/quant_method.ts";
import { inconsistentLayers, isInconsistent, isReloading } from "../src/reload/layerwise.ts";
import { reloadLayerwise } from "../src/reload/load.ts";
import { validateTensors } from "../src/reload/validate.ts";
import type { Tensor } from "../src/tensor/tensor.ts";
import { differing, failingSource, faultyBackend, layerOf } from "./_faulty_backend.ts";
import {
  checkpointFor,
  equalBytes,
  freeModule,
  freeWeights,
  freshModel,
  type HostWeight,
  kernelBytes,
  kernelLayout,
  reloadHost,
  testBackends,
  TINY,
  uploadWeights,
} from "../testing.ts";

const BACKENDS = await testBackends();

/** A model loaded from A, fresh-load bytes of A and B, and the checks after a failure. */
class Harness {
  readonly A: HostWeight[];
  readonly B: HostWeight[];
  bytesA!: Map<string, Uint8Array>;
  bytesB!: Map<string, Uint8Array>;
  layout!: Map<string, string>;
  allocated = 0;
  model!: Module;
  failuresWithWrites = 0;
  failuresWithoutWrites = 0;

  constructor(readonly b: Backend, readonly run: Backend, readonly quant: QuantScheme) {
    this.A = checkpointFor(b, TINY, 1, quant);
    this.B = checkpointFor(b, TINY, 2, quant);
  }

  async setUp(): Promise<this> {
    const fresh = await freshModel(this.b, TINY, this.quant, this.B);
    this.bytesB = kernelBytes(this.b, fresh);
    freeModule(this.b, fresh);
    this.model = await freshModel(this.run, TINY, this.quant, this.A);
    this.bytesA = kernelBytes(this.b, this.model);
    this.layout = kernelLayout(this.model);
    this.allocated = this.b.allocatedBytes();
    return this;
  }

  tearDown(): void {
    freeModule(this.b, this.model);
  }

  /** Checks the model after a failed reload from A towards B; returns the written layers. */
  afterFailure(e: unknown, atomic: boolean, what: string): string[] {
    assert.ok(e instanceof LayerwiseError, `${what}: a typed error, got ${e}`);
    assert.ok(!e.message.includes("\n"), `${what}: one-line message`);
    assert.equal(isReloading(this.model), false, `${what}: reload ended`);
    assert.deepEqual(kernelLayout(this.model), this.layout, `${what}: storage in place`);
    assert.equal(this.b.allocatedBytes(), this.allocated, `${what}: nothing leaked`);
    const now = kernelBytes(this.b, this.model);
    const changed = differing(now, this.bytesA);
    if (atomic) {
      assert.deepEqual(changed, [], `${what}: atomic restores every kernel tensor`);
      assert.equal(isInconsistent(this.model), false, what);
      assert.doesNotMatch(e.message, /inconsistent/, what);
      return [];
    }
    const written = inconsistentLayers(this.model);
    for (const layer of new Set(changed.map(layerOf))) {
      assert.ok(written.includes(layer), `${what}: ${layer} changed but is not listed`);
    }
    // Every listed layer but the last finished writing: it holds exactly B.
    for (const name of now.keys()) {
      const i = written.indexOf(layerOf(name));
      if (i >= 0 && i < written.length - 1) {
        assert.ok(equalBytes(now.get(name)!, this.bytesB.get(name)!), `${what}: ${name} is B`);
      }
    }
    if (written.length > 0) {
      this.failuresWithWrites++;
      assert.match(
        e.message,
        new RegExp(
          `\\[model inconsistent: ${written.length} layer\\(s\\) already hold new weights: `,
        ),
        what,
      );
      assert.ok(e.message.includes(written[0]), `${what}: names the first written layer`);
    } else {
      this.failuresWithoutWrites++;
      assert.equal(changed.length, 0, what);
      assert.doesNotMatch(e.message, /inconsistent/, what);
    }
    return written;
  }

  /** A good reload after the failure: to A (exact), sometimes via B (exact). */
  async recover(viaB: boolean): Promise<void> {
    if (viaB) {
      const r = await reloadHost(this.b, this.model, this.B);
      assert.equal(r.inconsistent, false);
      assert.deepEqual(differing(kernelBytes(this.b, this.model), this.bytesB), []);
    }
    const r = await reloadHost(this.b, this.model, this.A);
    assert.equal(r.storageKept, true);
    assert.equal(r.inconsistent, false);
    assert.equal(isInconsistent(this.model), false);
    assert.deepEqual(differing(kernelBytes(this.b, this.model), this.bytesA), []);
    assert.deepEqual(kernelLayout(this.model), this.layout);
    assert.equal(this.b.allocatedBytes(), this.allocated);
  }
}

for (const [bn, b] of BACKENDS) {
  for (const quant of ["fp8-tensor", "none"] as QuantScheme[]) {
    Deno.test(`${bn}: ${quant}: a source that throws after k tensors, every k`, async () => {
      const h = await new Harness(b, b, quant).setUp();
      try {
        const ws = uploadWeights(b, h.B);
        h.allocated = b.allocatedBytes();
        try {
          for (const atomic of [true, false]) {
            for (let k = 0; k < ws.length; k++) {
              const what = `atomic=${atomic} k=${k}`;
              await assert.rejects(
                reloadLayerwise(h.model, failingSource(ws, k), { atomic }),
                (e) => {
                  assert.ok(
                    e instanceof ReloadError && e.code === "RELOAD_FAILED",
                    `${what}: ${e}`,
                  );
                  assert.match(
                    e.message,
                    new RegExp(`^reload failed: Error: source failed after ${k} tensors`),
                  );
                  assert.ok((e.cause as Error).message.startsWith("source failed"), "cause kept");
                  h.afterFailure(e, atomic, what);
                  return true;
                },
              );
              if (!atomic) await h.recover(k % 5 === 0);
            }
          }
          // Both kinds happened: failures before any write (mid-layer too) and after layers.
          assert.ok(h.failuresWithWrites > 0 && h.failuresWithoutWrites > 0);
          await h.recover(true);
        } finally {
          freeWeights(b, ws);
        }
      } finally {
        h.tearDown();
      }
    });
  }

  const KERNEL_FAULTS: [string, QuantScheme][] = [
    ["copy", "fp8-tensor"],
    ["copy", "none"],
    ["quantizeFp8", "fp8-tensor"],
    ["quantizeFp8", "fp8-serialized"],
    ["empty", "fp8-channel"],
    ["empty", "fp8-serialized"],
    ["download", "fp8-block"],
  ];
  for (const [method, quant] of KERNEL_FAULTS) {
    Deno.test(`${bn}: ${quant}: a kernel error on the n-th ${method}, every n`, async () => {
      const fb = faultyBackend(b);
      const h = await new Harness(b, fb, quant).setUp();
      try {
        // The source's tensors are uploaded once, outside the faulty wrapper.
        const ws = uploadWeights(b, h.B);
        h.allocated = b.allocatedBytes();
        try {
          for (const atomic of [true, false]) {
            // How many calls a good reload makes.
            fb.resetCounts();
            await reloadLayerwise(h.model, ws, { atomic });
            const calls = fb.calls.get(method) ?? 0;
            if (method !== "download" || atomic) {
              assert.ok(calls > 3, `${method} is called (${calls})`);
            }
            await h.recover(false);
            for (let n = 1; n <= calls; n++) {
              const what = `${method} #${n} atomic=${atomic}`;
              fb.arm(
                method,
                n,
                method === "empty"
                  ? () => new BackendError("OUT_OF_MEMORY", "wasm: cannot allocate (injected)")
                  : undefined,
              );
              try {
                await assert.rejects(reloadLayerwise(h.model, ws, { atomic }), (e) => {
                  assert.ok(e instanceof BackendError, `${what}: ${e}`);
                  assert.equal(e.code, method === "empty" ? "OUT_OF_MEMORY" : "INJECTED");
                  h.afterFailure(e, atomic, what);
                  return true;
                });
              } finally {
                fb.disarm();
              }
              if (!atomic) await h.recover(n % 7 === 0);
            }
          }
        } finally {
          freeWeights(b, ws);
        }
        h.allocated = b.allocatedBytes();
        // Downloads happen only with atomic (snapshots): those failures never leave writes.
        if (method !== "download") {
          assert.ok(h.failuresWithWrites > 0, "some faults hit after layers were written");
        }
        await h.recover(true);
      } finally {
        h.tearDown();
      }
    });
  }

  Deno.test(`${bn}: a quantization method that throws (before or after its own work)`, async () => {
    const h = await new Harness(b, b, "fp8-tensor").setUp();
    try {
      // down_proj of the last layer: processed after others; the embedding: at finalize.
      for (
        const path of [
          "model.layers.1.mlp.down_proj",
          "model.embed_tokens",
          "model.layers.0.self_attn.qkv_proj",
        ]
      ) {
        for (const after of [false, true]) {
          for (const atomic of [true, false]) {
            const layer = h.model.getModule(path)!;
            const inner = layer.quantMethod!;
            const what = `${path} after=${after} atomic=${atomic}`;
            layer.quantMethod = {
              name: inner?.name ?? "none",
              createWeights: (l, s) => inner?.createWeights(l, s),
              processWeightsAfterLoading(l) {
                if (after) inner?.processWeightsAfterLoading(l);
                throw new TypeError("quant method exploded");
              },
            };
            try {
              await assert.rejects(reloadHost(b, h.model, h.B, { atomic }), (e) => {
                assert.ok(e instanceof ReloadError && e.code === "RELOAD_FAILED", `${what}: ${e}`);
                assert.match(e.message, /^reload failed: TypeError: quant method exploded/);
                assert.ok(e.cause instanceof TypeError);
                const written = h.afterFailure(e, atomic, what);
                if (!atomic) assert.ok(!written.includes(path), `${what}: ${path} was not written`);
                return true;
              });
            } finally {
              layer.quantMethod = inner;
            }
            if (!atomic) await h.recover(false);
          }
        }
      }
      await h.recover(true);
    } finally {
      h.tearDown();
    }
  });

  Deno.test(`${bn}: when restoring an atomic snapshot fails, the model is marked inconsistent`, async () => {
    const fb = faultyBackend(b);
    const h = await new Harness(b, fb, "fp8-tensor").setUp();
    const ws = uploadWeights(b, h.B);
    h.allocated = b.allocatedBytes();
    try {
      // Fail late, after several layers were written; the second restore upload (restores
      // go last written first: the last layer's scale, then its weight) fails.
      fb.arm("upload", 2);
      await assert.rejects(
        reloadLayerwise(h.model, failingSource(ws, ws.length - 3), { atomic: true }),
        (e) => {
          assert.ok(fb.fired, "a restore was attempted and failed");
          assert.ok(e instanceof ReloadError && e.code === "RELOAD_FAILED", String(e));
          assert.match(
            e.message,
            /\[model inconsistent: 1 layer\(s\) already hold new weights: .*restoring them from the atomic snapshot failed/,
          );
          assert.equal(inconsistentLayers(h.model).length, 1);
          // Every other layer was restored.
          const bad = inconsistentLayers(h.model)[0];
          const changed = differing(kernelBytes(b, h.model), h.bytesA).map(layerOf);
          assert.deepEqual([...new Set(changed)], [bad]);
          return true;
        },
      );
      fb.disarm();
      await h.recover(false);
    } finally {
      freeWeights(b, ws);
      h.tearDown();
    }
  });

  Deno.test(`${bn}: a file truncated between validation and reading: TRUNCATED, atomic restores`, async () => {
    const h = await new Harness(b, b, "fp8-tensor").setUp();
    const dir = await Deno.makeTempDir({ prefix: "layerwise-faults-" });
    try {
      const file = `${dir}/model.safetensors`;
      const write = () =>
        writeSafetensors(
          file,
          h.B.map((w) => [w.name, { dtype: w.dtype, shape: w.shape, data: w.bytes }]),
        );
      for (const atomic of [true, false]) {
        await write();
        const size = (await Deno.stat(file)).size;
        const source = await fileSource(file);
        try {
          const report = validateTensors(h.model, source.tensors.values());
          assert.equal(report.complete, true);
          // Past the middle: some layers are read (and written) before the end is missing.
          await Deno.truncate(file, Math.floor(size * 0.6));
          await assert.rejects(
            reloadLayerwise(h.model, fromSource(b, source), {
              atomic,
              expected: source.tensors.values(),
            }),
            (e) => {
              assert.ok(e instanceof CheckpointError && e.code === "TRUNCATED", String(e));
              assert.ok(e.message.includes(file), "names the file");
              const written = h.afterFailure(e, atomic, `truncated atomic=${atomic}`);
              if (!atomic) assert.ok(written.length > 0, "layers were written before the end");
              return true;
            },
          );
        } finally {
          source.close();
        }
        if (!atomic) await h.recover(false);
      }
      // The rewritten file reloads exactly.
      await write();
      const source = await fileSource(file);
      try {
        await reloadLayerwise(h.model, fromSource(b, source), {
          expected: source.tensors.values(),
        });
        assert.deepEqual(differing(kernelBytes(b, h.model), h.bytesB), []);
      } finally {
        source.close();
      }
    } finally {
      h.tearDown();
      await Deno.remove(dir, { recursive: true });
    }
  });

  Deno.test(`${bn}: a quantization that leaves an infinite scale: NON_FINITE, atomic restores`, async () => {
    // The run backend quantizes as usual, then (while poisoned) overwrites the scales with
    // +Inf: what a kernel overflow would leave from finite weights.
    let poison = false;
    const run = new Proxy(b, {
      get(target, p) {
        if (p === "quantizeFp8") {
          return (q: Tensor, scale: Tensor, src: Tensor, g: Granularity, dynamic: boolean) => {
            target.quantizeFp8(q, scale, src, g, dynamic);
            if (poison) target.fill(scale, Infinity);
          };
        }
        const v = Reflect.get(target, p, target);
        return typeof v === "function" ? v.bind(target) : v;
      },
    });
    const h = await new Harness(b, run, "fp8-tensor").setUp();
    const ws = uploadWeights(b, h.B);
    h.allocated = b.allocatedBytes();
    try {
      for (const atomic of [true, false]) {
        poison = true;
        await assert.rejects(
          reloadLayerwise(h.model, ws, { atomic, rejectNonFinite: true }),
          (e) => {
            assert.ok(e instanceof ReloadError && e.code === "NON_FINITE", String(e));
            assert.match(e.message, /processing \(fp8-tensor\) left 1 of 1 elements .* infinite/);
            h.afterFailure(e, atomic, `inf scale atomic=${atomic}`);
            return true;
          },
        );
        poison = false;
        if (!atomic) await h.recover(false);
      }
      // Without the check the same kernels are let through: the check is what refused them.
      poison = true;
      await reloadLayerwise(h.model, ws, {});
      poison = false;
      await h.recover(true);
    } finally {
      freeWeights(b, ws);
      h.tearDown();
    }
  });
}

/** Reads a weight source in its plan order, uploading each tensor for the reload (freed after). */
async function* fromSource(
  b: Backend,
  source: WeightSource,
): AsyncGenerator<readonly [string, Tensor]> {
  for (const name of source.plan()) {
    const info = source.tensors.get(name)!;
    const host = new Uint8Array(info.bytes);
    await source.readInto(name, host);
    const t = b.empty(info.shape, info.dtype);
    try {
      b.upload(t, host);
      yield [name, t];
    } finally {
      b.free(t.storage!);
    }
  }
}

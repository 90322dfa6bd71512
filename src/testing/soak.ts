/**
 * Soak: many alternating reloads A/B of the tiny model, checking after every one that the kernel
 * bytes equal a fresh load of A or B, that no kernel tensor moved, and that device memory,
 * WebAssembly memory and host RSS stay flat after warm-up. Every 4th reload is atomic and every
 * 3rd scans for non-finite values, so snapshots and scans are soaked too. tests/soak_test.ts
 * runs it briefly; scripts/soak.ts runs it long.
 * @module
 */

import type { Backend } from "../backend/backend.ts";
import type { QuantScheme } from "../nn/quant_method.ts";
import { loadWeights, reloadLayerwise } from "../reload/load.ts";
import {
  checkpointFor,
  equalBytes,
  freeModule,
  freeWeights,
  kernelLayout,
  TINY,
  type TinyConfig,
  TinyModel,
  uploadWeights,
} from "./tiny_model.ts";

/** Options of {@link soak}. */
export interface SoakOptions {
  /** Reloads to run (alternating B, A, B, ...). */
  count: number;
  /** Quantization of the tiny model (default fp8-tensor). */
  quant?: QuantScheme;
  /** Model shape (default the tests' TINY). */
  config?: TinyConfig;
  /** Reloads before device and WebAssembly memory must be flat (default 5). */
  warmup?: number;
  /** Reloads before the RSS baseline is taken, once the JIT has settled (default 100). */
  rssWarmup?: number;
  /** Called every `every` reloads with the reload index. */
  progress?: (i: number, s: SoakStats) => void;
  /** See progress (default 1000). */
  every?: number;
}

/** What a soak measured; a failed check throws instead. */
export interface SoakStats {
  /** Reloads done. */
  reloads: number;
  /** Wall time of the reloads and checks, seconds. */
  seconds: number;
  /** backend.allocatedBytes() after the warm-up reloads (every later one must equal it). */
  allocatedAfterWarmup: number;
  /** WebAssembly memory size after warm-up and at the end (0 on other backends). */
  wasmMemory: [number, number];
  /** Host RSS after the RSS warm-up and the largest seen afterwards, bytes. */
  rss: [number, number];
  /** Live JS heap after a full GC at the first and the largest later progress point (0 without gc). */
  heapAfterGc: [number, number];
}

/** Runs the soak on `backend`; throws a one-line Error at the first failed check. */
export async function soak(backend: Backend, options: SoakOptions): Promise<SoakStats> {
  const b = backend;
  const quant = options.quant ?? "fp8-tensor";
  const config = options.config ?? TINY;
  const warmup = options.warmup ?? 5;
  const rssWarmup = Math.max(warmup, Math.min(options.rssWarmup ?? 100, options.count));
  const gc = (globalThis as { gc?: () => void }).gc;
  const every = options.every ?? 1000;
  const hosts = [checkpointFor(b, config, 1, quant), checkpointFor(b, config, 2, quant)];
  // Fresh-load bytes of A and B: what every reload must reproduce.
  const expected: Uint8Array[][] = [];
  for (const host of hosts) {
    const m = new TinyModel(b, config, quant);
    const ws = uploadWeights(b, host);
    try {
      await loadWeights(m, ws);
      expected.push(m.namedTensors().map(([, s]) => b.download(s.tensor)));
    } finally {
      freeWeights(b, ws);
      freeModule(b, m);
    }
  }
  const sources = hosts.map((h) => uploadWeights(b, h));
  const model = new TinyModel(b, config, quant);
  await loadWeights(model, sources[0]);
  const layout = kernelLayout(model);
  const wasmMem = () => b.hostView?.(model.namedTensors()[0][1].tensor).buffer.byteLength ?? 0;
  const stats: SoakStats = {
    reloads: 0,
    seconds: 0,
    allocatedAfterWarmup: 0,
    wasmMemory: [0, 0],
    rss: [0, 0],
    heapAfterGc: [0, 0],
  };
  const t0 = performance.now();
  try {
    for (let i = 0; i < options.count; i++) {
      const which = (i + 1) % 2;
      const r = await reloadLayerwise(model, sources[which], {
        atomic: i % 4 === 3,
        rejectNonFinite: i % 3 === 2,
      });
      if (!r.storageKept) throw new Error(`reload ${i}: storage moved`);
      const slots = model.namedTensors();
      const want = expected[which];
      for (let t = 0; t < slots.length; t++) {
        if (!equalBytes(b.download(slots[t][1].tensor), want[t])) {
          throw new Error(
            `reload ${i}: ${slots[t][0]} differs from a fresh load of ${"AB"[which]}`,
          );
        }
      }
      const lay = kernelLayout(model);
      for (const [n, l] of layout) {
        if (lay.get(n) !== l) throw new Error(`reload ${i}: ${n} moved: ${l} -> ${lay.get(n)}`);
      }
      const allocated = b.allocatedBytes();
      const rss = Deno.memoryUsage().rss;
      if (i + 1 === rssWarmup) stats.rss = [rss, rss];
      else if (i + 1 > rssWarmup) stats.rss[1] = Math.max(stats.rss[1], rss);
      if (i + 1 === warmup) {
        stats.allocatedAfterWarmup = allocated;
        stats.wasmMemory = [wasmMem(), wasmMem()];
      } else if (i + 1 > warmup) {
        if (allocated !== stats.allocatedAfterWarmup) {
          throw new Error(
            `reload ${i}: backend holds ${allocated} bytes, ${stats.allocatedAfterWarmup} after warm-up`,
          );
        }
        stats.wasmMemory[1] = wasmMem();
        if (stats.wasmMemory[1] !== stats.wasmMemory[0]) {
          throw new Error(`reload ${i}: WebAssembly memory grew to ${stats.wasmMemory[1]} bytes`);
        }
      }
      stats.reloads = i + 1;
      if ((i + 1) % every === 0) {
        if (gc) {
          gc();
          const heap = Deno.memoryUsage().heapUsed;
          if (stats.heapAfterGc[0] === 0) stats.heapAfterGc = [heap, heap];
          stats.heapAfterGc[1] = Math.max(stats.heapAfterGc[1], heap);
          if (stats.heapAfterGc[1] - stats.heapAfterGc[0] > 2 ** 20) {
            throw new Error(
              `reload ${i}: live JS heap after GC grew from ${
                stats.heapAfterGc[0]
              } to ${heap} bytes`,
            );
          }
        }
        stats.seconds = (performance.now() - t0) / 1000;
        options.progress?.(i + 1, stats);
      }
    }
  } finally {
    stats.seconds = (performance.now() - t0) / 1000;
    for (const ws of sources) freeWeights(b, ws);
    freeModule(b, model);
  }
  return stats;
}

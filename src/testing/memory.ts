/**
 * Measuring memory in tests and benchmarks: the peak of a backend's allocations, and the
 * model-format bytes a reload may hold at most (one module, one decoder layer).
 * @module
 */

import type { Backend } from "../backend/backend.ts";
import type { CausalLM } from "../models/causal_lm.ts";
import { getLayerwiseInfo } from "../reload/layerwise.ts";

/** The peak of a backend's allocated bytes, tracked while {@link PeakTracker.stop} is not called. */
export interface PeakTracker {
  /** Largest allocatedBytes() right after any allocation since the last reset. */
  readonly peak: number;
  /** Restarts the peak at the current allocation. */
  resetPeak(): void;
  /** Stops tracking (puts the backend's own `alloc` back). */
  stop(): void;
}

/**
 * Tracks the peak allocation of `b` by wrapping its `alloc` on the instance (every allocation,
 * `empty` included, goes through it). The backend object itself stays the same, so code that
 * recognizes backends by identity (hostView, storage ownership) keeps working.
 */
export function trackPeak(b: Backend): PeakTracker {
  let peak = b.allocatedBytes();
  const own = Object.getOwnPropertyDescriptor(b, "alloc");
  const inner = b.alloc;
  (b as { alloc: Backend["alloc"] }).alloc = function (this: Backend, bytes: number) {
    const out = inner.call(this, bytes);
    peak = Math.max(peak, b.allocatedBytes());
    return out;
  };
  return {
    get peak() {
      return peak;
    },
    resetPeak() {
      peak = b.allocatedBytes();
    },
    stop() {
      if (own) Object.defineProperty(b, "alloc", own);
      else delete (b as { alloc?: unknown }).alloc;
    },
  };
}

/** Model-format bytes of the largest weight module and of the largest decoder layer. */
export function modelFormatBytes(model: CausalLM): { module: number; layer: number } {
  let module = 0;
  const layers = new Map<string, number>();
  for (const [path, m] of model.namedModules()) {
    const meta = getLayerwiseInfo(m)?.restoreMetadata;
    if (!meta) continue;
    const bytes = [...meta.values()].reduce((a, t) => a + t.meta.nbytes, 0);
    module = Math.max(module, bytes);
    const layer = path.match(/^model\.layers\.\d+/)?.[0];
    if (layer) layers.set(layer, (layers.get(layer) ?? 0) + bytes);
  }
  return { module, layer: Math.max(0, ...layers.values()) };
}

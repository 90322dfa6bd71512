/**
 * Fault injection for the reliability tests: a Backend wrapper that counts calls per method,
 * throws BackendError `INJECTED` on the n-th call of a chosen method from the moment it is
 * armed, and records the peak of allocated bytes; plus small helpers shared by the reliability,
 * fault and soak tests (fresh loads, reloads from host weights, per-layer byte comparisons).
 * @module
 */

import type { Backend } from "../src/backend/backend.ts";
import { BackendError, type BackendErrorCode } from "../src/errors.ts";
import type { Tensor } from "../src/tensor/tensor.ts";
import { equalBytes, type HostWeight } from "../testing.ts";

// A code no real backend throws, so that a test tells an injected failure from a real one.
const INJECTED = "INJECTED" as BackendErrorCode;

/** A Backend that delegates to another and fails on demand. */
export interface FaultyBackend extends Backend {
  /** Calls per method name since creation (or the last {@link FaultyBackend.resetCounts}). */
  readonly calls: Map<string, number>;
  /** Fails the `n`-th call (1-based) of `method` from now on, once; `error` replaces the default. */
  arm(method: string, n: number, error?: () => Error): void;
  /** Removes the armed fault. */
  disarm(): void;
  /** Whether the armed fault has fired. */
  readonly fired: boolean;
  /** Zeroes {@link FaultyBackend.calls}. */
  resetCounts(): void;
  /** Largest allocatedBytes() seen right after any allocation since the last reset. */
  readonly peakAllocated: number;
  /** Restarts the peak at the current allocation. */
  resetPeak(): void;
}

/** Wraps `inner`: every method goes through, counted; the armed one throws once. */
export function faultyBackend(inner: Backend): FaultyBackend {
  const calls = new Map<string, number>();
  let armed: { method: string; left: number; error: () => Error } | null = null;
  let fired = false;
  let peak = inner.allocatedBytes();
  const control = {
    calls,
    arm(method: string, n: number, error?: () => Error) {
      fired = false;
      armed = {
        method,
        left: n,
        error: error ??
          (() => new BackendError(INJECTED, `injected failure of ${method} call ${n}`)),
      };
    },
    disarm() {
      armed = null;
    },
    get fired() {
      return fired;
    },
    resetCounts() {
      calls.clear();
    },
    get peakAllocated() {
      return peak;
    },
    resetPeak() {
      peak = inner.allocatedBytes();
    },
  };
  return new Proxy(inner, {
    get(target, prop) {
      if (Object.hasOwn(control, prop)) {
        return (control as Record<string | symbol, unknown>)[prop];
      }
      const v = Reflect.get(target, prop, target);
      if (typeof v !== "function" || typeof prop !== "string") return v;
      return (...args: unknown[]) => {
        calls.set(prop, (calls.get(prop) ?? 0) + 1);
        if (armed && armed.method === prop && --armed.left === 0) {
          const e = armed.error();
          armed = null;
          fired = true;
          throw e;
        }
        const out = v.apply(target, args);
        if (prop === "alloc" || prop === "empty") peak = Math.max(peak, target.allocatedBytes());
        return out;
      };
    },
  }) as FaultyBackend;
}

/** Names of the tensors whose bytes differ between two downloads of the same model. */
export function differing(a: Map<string, Uint8Array>, b: Map<string, Uint8Array>): string[] {
  const keys = new Set([...a.keys(), ...b.keys()]);
  return [...keys].filter((k) => !a.has(k) || !b.has(k) || !equalBytes(a.get(k)!, b.get(k)!));
}

/** The layer path of a dotted tensor name (`model.layers.0.mlp.down_proj.weight` -> its module). */
export function layerOf(tensorName: string): string {
  return tensorName.slice(0, tensorName.lastIndexOf("."));
}

/** Descriptors (name, dtype, shape) of host weights, as a checkpoint header gives them. */
export function describe(
  host: readonly HostWeight[],
): { name: string; dtype: HostWeight["dtype"]; shape: number[] }[] {
  return host.map((h) => ({ name: h.name, dtype: h.dtype, shape: h.shape }));
}

/** A source that yields the first `k` uploaded tensors, then throws. */
export async function* failingSource(
  ws: readonly [string, Tensor][],
  k: number,
  error: () => unknown = () => new Error(`source failed after ${k} tensors`),
): AsyncGenerator<readonly [string, Tensor]> {
  for (let i = 0; i < ws.length; i++) {
    if (i === k) throw error();
    await Promise.resolve();
    yield ws[i];
  }
}

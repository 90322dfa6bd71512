/**
 * Soak: many alternating reloads A/B of a tiny model, checking after every one that the kernel
 * bytes equal a fresh load of A or B, that no kernel tensor moved, and that device memory,
 * WebAssembly memory and host RSS stay flat after warm-up. tests/soak_test.ts runs 1000 on
 * WebAssembly (and CUDA where it opens); for longer runs:
 *
 *   deno run -A scripts/soak.ts --count 100000 [--backend wasm|cuda] [--quant fp8-tensor]
 *
 * Every 4th reload is atomic and every 3rd scans for non-finite values, so snapshots and scans
 * are soaked too. Host RSS includes what V8 keeps reserved for its heap, which grows in steps
 * with the garbage (downloads, snapshots) even when nothing leaks; run with
 * `--v8-flags=--expose-gc` to also check the live JS heap after a full GC at each progress
 * point (flat within 1 MiB; measured 4.3 MiB throughout 12000 reloads).
 * @module
 */

import type { QuantScheme } from "../src/nn/quant_method.ts";
import { soak, type SoakStats } from "../testing.ts";

function gcNote(st: SoakStats): string {
  if (st.heapAfterGc[0] === 0) return "n/a (no --v8-flags=--expose-gc)";
  return `${(st.heapAfterGc[0] / 2 ** 20).toFixed(1)} -> max ${
    (st.heapAfterGc[1] / 2 ** 20).toFixed(1)
  } MiB`;
}

if (import.meta.main) {
  const args = Deno.args;
  const flag = (name: string, fallback: string) => {
    const i = args.indexOf(`--${name}`);
    return i >= 0 && i + 1 < args.length ? args[i + 1] : fallback;
  };
  const count = Number(flag("count", "10000"));
  const kind = flag("backend", "wasm");
  const quant = flag("quant", "fp8-tensor") as QuantScheme;
  const backend = kind === "cuda"
    ? (await import("../src/backend/cuda/device.ts")).openCudaBackend()
    : await (await import("../src/backend/wasm.ts")).openWasmBackend();
  const mib = (n: number) => (n / 2 ** 20).toFixed(1);
  const s = await soak(backend, {
    count,
    quant,
    every: 1000,
    progress: (i, st) =>
      console.log(
        `${i} reloads, ${st.seconds.toFixed(1)} s, allocated ${st.allocatedAfterWarmup} B, rss ${
          mib(st.rss[0])
        } -> max ${mib(st.rss[1])} MiB, wasm memory ${mib(st.wasmMemory[1])} MiB, heap after gc ${
          gcNote(st)
        }`,
      ),
  });
  console.log(
    `ok: ${s.reloads} reloads on ${backend.description} (${quant}) in ${
      s.seconds.toFixed(1)
    } s: exact every time, storage never moved, device memory flat at ${s.allocatedAfterWarmup} B, rss ${
      mib(s.rss[0])
    } -> max ${mib(s.rss[1])} MiB`,
  );
}

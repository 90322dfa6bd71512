/**
 * The device-source reload bench (`deno task bench --only device`): a Llama-shaped model (8B on
 * CUDA, a small shape on WebAssembly) reloaded by reloadFromDevice from bf16 tensors already in
 * backend memory, given as separate tensors and as packed 256 MiB buckets (raw addresses), for
 * each quantization. Printed beside the floor measured in the same run: the bytes that must
 * move (the bf16 of quantized weights read twice, for absmax and for quantization, their
 * quantized bytes written, every other tensor read and written once) at the device-to-device
 * copy rate of this run; and the extra backend memory the reload held at its peak.
 * @module
 */

import type { Backend } from "../src/backend/backend.ts";
import { synthConfig, type SynthShape, synthTensorShapes } from "../testing.ts";
import { parseModelConfig } from "../src/models/config.ts";
import { buildModel } from "../src/models/load.ts";
import { type QuantName, quantScheme } from "../src/models/quant_names.ts";
import { loadWeights } from "../src/reload/load.ts";
import { recordMetadataForReloading } from "../src/reload/layerwise.ts";
import {
  type DeviceTensorView,
  releaseDevicePlan,
  reloadFromDevice,
} from "../src/reload/device.ts";
import { DTYPES } from "../src/tensor/dtype.ts";
import { Tensor } from "../src/tensor/tensor.ts";
import { cudaHandle } from "../src/backend/cuda/device.ts";
import { SHAPE_8B, SHAPE_SMALL } from "./bench_reload.ts";

/** Options of {@link benchDevice}. */
export interface DeviceBenchOptions {
  /** `8b` or `small` (default: 8b on CUDA, small on WebAssembly). */
  shape?: "8b" | "small";
  /** Timed reloads per case (default 5 on CUDA, 2 on WebAssembly); the best is reported. */
  runs?: number;
  /** Quantizations (default: all five). */
  quants?: QuantName[];
  /**
   * Output of `../shared/tools/peer_torch.py` run on this machine just before: its
   * `PEER d2d compiled` time (torch.compile, GPU-resident bf16 into fp8 per tensor) is printed
   * beside the fp8 rows, as a ratio.
   */
  peerLog?: string;
}

/** One row of the bench. */
export interface DeviceBenchRow {
  /** Quantization. */
  quant: QuantName;
  /** `tensors` (one allocation each) or `buckets` (packed, raw addresses). */
  layout: "tensors" | "buckets";
  /** Best reload time, ms. */
  ms: number;
  /** Checkpoint bytes / time, GB/s. */
  gbps: number;
  /** The floor's time for this case, ms. */
  floorMs: number;
  /** floorMs / ms (1 = at the floor). */
  ofFloor: number;
  /** Most extra backend bytes held during the reloads (plan tables). */
  peakExtraBytes: number;
  /** Whether the timed runs reused the plan. */
  planReused: boolean;
  /**
   * CUDA only, from the best run: device milliseconds of the plan's launches by op (`absmax`,
   * `quant:<kind>`, `copy`, `fill`), timed by events around each, and `span` from the first
   * launch's start to the last one's end (the rest of `ms` is host work and waits).
   */
  gpuMs?: Record<string, number>;
}

/** Records CUDA events around every multi-tensor launch and fill of `b` while installed. */
function launchTimer(b: Backend) {
  const h = cudaHandle(b);
  if (h === undefined) return undefined;
  const d = h.device, events: number[] = [];
  let used = 0;
  const marks: { op: string; start: number; end: number }[] = [];
  const event = () => {
    if (used === events.length) events.push(d.createEvent());
    return events[used++];
  };
  const launch = b.launchMultiTensor.bind(b), fill = b.fill.bind(b);
  const timed =
    <A extends unknown[]>(op: (...a: A) => string, f: (...a: A) => void) => (...a: A) => {
      const start = event();
      d.record(start, h.ctx);
      f(...a);
      const end = event();
      d.record(end, h.ctx);
      marks.push({ op: op(...a), start, end });
    };
  return {
    install() {
      b.launchMultiTensor = timed((l) => l.op === "quant" ? `quant:${l.kind}` : l.op, launch);
      b.fill = timed((_t: Tensor, _v: number) => "fill", fill);
    },
    uninstall() {
      b.launchMultiTensor = launch;
      b.fill = fill;
    },
    /** Device ms by op of the marks since the last call (their events have completed). */
    take(): Record<string, number> {
      const out: Record<string, number> = {};
      for (const m of marks) out[m.op] = (out[m.op] ?? 0) + d.elapsedMs(m.start, m.end);
      if (marks.length > 0) out.span = d.elapsedMs(marks[0].start, marks[marks.length - 1].end);
      marks.length = 0;
      used = 0;
      return out;
    },
    destroy() {
      for (const e of events) d.destroyEvent(e);
    },
  };
}

const BUCKET = 256 * 1024 * 1024;
const GB = 1e9;

/** Device-to-device copy rate (bytes read + written per second) of this backend, measured now. */
function copyRate(b: Backend, bytes: number, reps: number): number {
  const a = b.empty([bytes], DTYPES.u8), c = b.empty([bytes], DTYPES.u8);
  try {
    b.fill(a, 1);
    b.copy(c, a);
    b.synchronize();
    let best = Infinity;
    for (let i = 0; i < reps; i++) {
      const t0 = performance.now();
      b.copy(c, a);
      b.synchronize();
      best = Math.min(best, performance.now() - t0);
    }
    return (2 * bytes) / (best / 1000);
  } finally {
    b.free(a.storage!);
    b.free(c.storage!);
  }
}

/** Runs the bench on `b` and prints its table; returns the rows. */
export async function benchDevice(
  b: Backend,
  options: DeviceBenchOptions = {},
): Promise<{ rows: DeviceBenchRow[]; copyGBps: number; checkpointBytes: number }> {
  const cuda = b.kind === "cuda";
  const shape: SynthShape = (options.shape ?? (cuda ? "8b" : "small")) === "8b"
    ? SHAPE_8B
    : SHAPE_SMALL;
  const runs = options.runs ?? (cuda ? 5 : 2);
  const quants = options.quants ?? ["fp8", "fp8-channel", "fp8-block", "int8", "none"];
  const names = synthTensorShapes(shape);
  const config = parseModelConfig(synthConfig(shape));
  // Source: bf16 tensors with pseudo-random bits, written once on the device from a 16 MiB seed.
  const seed = new Uint8Array(16 * 1024 * 1024);
  let s = 12345;
  for (let i = 0; i < seed.length; i += 2) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    seed[i] = s >>> 24;
    seed[i + 1] = (s >>> 16) & 0x3f; // |x| < 2: finite bf16
  }
  const fillFrom = (t: Tensor) => {
    const bytes = t.nbytes;
    const flat = t.reshape([bytes / 2]);
    for (let at = 0; at < bytes; at += seed.length) {
      const n = Math.min(seed.length, bytes - at);
      b.upload(flat.narrow(0, at / 2, n / 2), seed.subarray(0, n));
    }
  };
  const separate: [string, Tensor][] = names.map(([name, sh]) => {
    const t = b.empty(sh, DTYPES.bf16);
    fillFrom(t);
    return [name, t];
  });
  const checkpointBytes = separate.reduce((a, [, t]) => a + t.nbytes, 0);
  // The same bytes packed into buckets (a tensor larger than a bucket gets its own).
  const buckets: Tensor[] = [];
  const packed: DeviceTensorView[] = [];
  {
    let cur: Tensor | null = null, used = 0;
    for (const [name, t] of separate) {
      if (!cur || used + t.nbytes > cur.nbytes) {
        cur = b.empty([Math.max(BUCKET, t.nbytes)], DTYPES.u8);
        buckets.push(cur);
        used = 0;
      }
      b.copy(cur.narrow(0, used, t.nbytes), bytesOf(t));
      packed.push({ name, dtype: "bf16", shape: t.shape, ptr: cur.ptr + used });
      used += Math.ceil(t.nbytes / 256) * 256;
    }
  }
  b.synchronize();
  const rate = copyRate(b, cuda ? 2 ** 30 : 2 ** 26, cuda ? 10 : 3);
  const rows: DeviceBenchRow[] = [];
  try {
    for (const quant of quants) {
      const model = buildModel(config, { backend: b, quant: quantScheme(quant) });
      recordMetadataForReloading(model);
      await loadWeights(model, separate);
      // Bytes that must move: quantized weights' bf16 read twice + their quantized bytes
      // written; the rest read and written once.
      let must = 0;
      for (const [name, t] of separate) {
        const quantized = quant !== "none" && /_proj\.weight$/.test(name);
        must += quantized ? 2 * t.nbytes + t.nbytes / 2 : 2 * t.nbytes;
      }
      const floorMs = (must / rate) * 1000;
      for (const layout of ["tensors", "buckets"] as const) {
        const views: DeviceTensorView[] = layout === "tensors"
          ? separate.map(([name, tensor]) => ({ name, tensor }))
          : packed;
        const base = b.allocatedBytes();
        let peak = base;
        const alloc = b.alloc.bind(b);
        b.alloc = (n: number) => {
          const st = alloc(n);
          peak = Math.max(peak, b.allocatedBytes());
          return st;
        };
        let best = Infinity, reused = true, table = 0;
        let gpuMs: Record<string, number> | undefined;
        const timer = launchTimer(b);
        try {
          await reloadFromDevice(model, views); // plans (first layout) or replans
          timer?.install();
          for (let i = 0; i < runs; i++) {
            const t0 = performance.now();
            const r = await reloadFromDevice(model, views);
            const ms = performance.now() - t0;
            const gpu = timer?.take();
            if (ms < best) [best, gpuMs] = [ms, gpu];
            reused &&= r.plan.reused;
            table = r.plan.tableBytes;
          }
        } finally {
          timer?.uninstall();
          timer?.destroy();
          b.alloc = alloc;
        }
        peak = Math.max(peak, b.allocatedBytes());
        rows.push({
          quant,
          layout,
          ms: best,
          gbps: checkpointBytes / (best / 1000) / GB,
          floorMs,
          ofFloor: floorMs / best,
          // The plan's tables stay allocated between reloads (made by an earlier layout when
          // the layouts' names, dtypes and shapes agree): count them either way.
          peakExtraBytes: Math.max(peak - base, table),
          planReused: reused,
          gpuMs,
        });
      }
      releaseDevicePlan(model);
      for (const [, m] of model.namedModules()) {
        for (const [, slot] of m.ownSlots()) {
          if (slot.tensor.storage && !slot.tensor.storage.freed) b.free(slot.tensor.storage);
        }
      }
    }
  } finally {
    for (const [, t] of separate) b.free(t.storage!);
    for (const t of buckets) b.free(t.storage!);
  }
  console.log(
    `device-source reload on ${b.description}: ${
      (checkpointBytes / GB).toFixed(2)
    } GB of bf16 checkpoint (${shape === SHAPE_8B ? "8B" : "small"} shape), device-to-device copy ${
      (rate / GB).toFixed(0)
    } GB/s (read + write), best of ${runs}`,
  );
  console.log(
    "quant        layout    ms        GB/s     floor ms  of floor  peak extra  plan reused",
  );
  for (const r of rows) {
    console.log(
      `${r.quant.padEnd(12)} ${r.layout.padEnd(9)} ${r.ms.toFixed(2).padStart(8)} ${
        r.gbps.toFixed(1).padStart(8)
      } ${r.floorMs.toFixed(2).padStart(9)} ${r.ofFloor.toFixed(2).padStart(9)} ${
        (r.peakExtraBytes / 1024).toFixed(0).padStart(8)
      } KiB  ${r.planReused}`,
    );
  }
  const peer = options.peerLog?.match(/PEER d2d compiled[^\n]*best ([0-9.]+)s/);
  if (options.peerLog !== undefined && shape !== SHAPE_8B) {
    console.log("  peer: peer_torch.py times the 8B shape; this run is not 8B, no ratio");
  } else if (options.peerLog !== undefined) {
    if (!peer) console.log("  peer: no `PEER d2d compiled` line in the given log");
    else {
      const peerMs = Number(peer[1]) * 1000;
      for (const r of rows.filter((x) => x.quant === "fp8")) {
        console.log(
          `  fp8 ${r.layout}: ${r.ms.toFixed(2)} ms against torch.compile's ${
            peerMs.toFixed(1)
          } ms (peer_torch.py, same machine): ${
            (peerMs / r.ms).toFixed(2)
          } x as fast (asked >= 2.25)`,
        );
      }
    }
  }
  for (const r of rows) {
    if (r.gpuMs === undefined) continue;
    const parts = Object.entries(r.gpuMs).map(([k, v]) => `${k} ${v.toFixed(2)}`).join(", ");
    console.log(`  ${r.quant} ${r.layout}: device ms of the launches: ${parts}`);
  }
  return { rows, copyGBps: rate / GB, checkpointBytes };
}

/** A contiguous tensor's bytes as a u8 view of the same storage. */
function bytesOf(t: Tensor): Tensor {
  return new Tensor([t.nbytes], DTYPES.u8, t.storage, t.offset * t.dtype.size);
}

/**
 * The built-in demo (`deno task reload` without arguments): a generated ~100 MB Llama-shaped
 * model, a first load from checkpoint A, an in-place reload from checkpoint B, and checks that
 * no kernel tensor moved and that the kernel tensors now hold B within quantization error.
 * @module
 */

import { openBackend } from "../backend/select.ts";
import type { HostTensor } from "../checkpoint/safetensors.ts";
import type { CausalLM } from "../models/causal_lm.ts";
import { downloadKernelTensors, exportKernelTensors, kernelTensors } from "../models/export.ts";
import { loadModel, reloadWeights } from "../models/load.ts";
import { ReloadError } from "../errors.ts";
import type { CliOptions } from "./args.ts";
import { describeReload } from "./run.ts";
import { writeJsonReport } from "./outputs.ts";
import { checkWritable } from "../checkpoint/atomic_write.ts";
import { createProgressBar } from "./progress.ts";
import { DEMO_SHAPE, synthTensors, writeSynthCheckpoint } from "../testing/synth.ts";
import { compareKernelTensor, type Comparison, stackRows } from "./verify.ts";

const SEED_A = 0x5eed_a;
const SEED_B = 0x5eed_b;

/** The demo's findings, for --json. */
export interface DemoReport {
  /** The backend's description. */
  backend: string;
  /** Checkpoint bytes (each of A and B). */
  checkpointBytes: number;
  /** Seconds of the first load. */
  loadSeconds: number;
  /** The reload. */
  reload: Awaited<ReturnType<typeof reloadWeights>>;
  /** Kernel tensors whose storage (pointer/offset) changed: must be none. */
  moved: string[];
  /** Kernel tensors compared with B. */
  tensorsChecked: number;
  /** The largest error relative to its bound over every element (<= 1 passes). */
  maxErrorOverBound: number;
  /** The largest relative RMS error of one tensor. */
  maxRelativeRmsError: number;
  /** The bound, in words. */
  bound: string;
  /** Seconds of the whole demo. */
  seconds: number;
}

/**
 * The model-format tensor each kernel weight comes from: checkpoint tensors of one fused
 * parameter stacked in shard order (q, k, v; gate, up). Non-quantized tensors map to
 * themselves.
 */
function sourcesByKernelName(
  model: CausalLM,
  ckpt: Map<string, HostTensor>,
): Map<string, HostTensor> {
  const parts = new Map<string, { order: number; t: HostTensor }[]>();
  const rank = (s: string | number | undefined): number =>
    s === undefined ? 0 : typeof s === "number" ? s : "qkv".indexOf(s);
  for (const [name, t] of ckpt) {
    const target = model.mapCheckpointName(name);
    if (target === null) continue;
    const key = target.path === "" ? target.param : `${target.path}.${target.param}`;
    const list = parts.get(key) ?? [];
    list.push({ order: rank(target.shardId), t });
    parts.set(key, list);
  }
  const out = new Map<string, HostTensor>();
  for (const [k, list] of parts) {
    out.set(k, stackRows(list.sort((a, b) => a.order - b.order).map((x) => x.t)));
  }
  return out;
}

/** Compares every kernel tensor of the model with checkpoint B. */
export function checkAgainst(
  model: CausalLM,
  ckpt: Map<string, HostTensor>,
): { checked: number; worst: Comparison | null; maxRel: number } {
  const kernel = downloadKernelTensors(model);
  const sources = sourcesByKernelName(model, ckpt);
  let checked = 0, maxRel = 0;
  let worst: Comparison | null = null;
  for (const [name, src] of sources) {
    const q = kernel.get(name);
    if (q === undefined) throw new ReloadError("DEMO_CHECK", `kernel tensor ${name} is missing`);
    const c = compareKernelTensor(q, kernel.get(`${name}_scale`), src);
    checked++;
    maxRel = Math.max(maxRel, c.relativeRmsError);
    if (worst === null || c.maxErrorOverBound > worst.maxErrorOverBound) worst = c;
  }
  return { checked, worst, maxRel };
}

/** Runs the demo; throws ReloadError when a check fails. */
export async function runDemo(o: CliOptions): Promise<DemoReport> {
  const start = performance.now();
  const say = (s: string) => {
    if (!o.quiet) console.log(s);
  };
  // Before minutes of work: an output that cannot be written is known now.
  if (o.export !== undefined) await checkWritable(o.export, "--export");
  if (o.json !== undefined) await checkWritable(o.json, "--json");
  const tmp = await Deno.makeTempDir({ prefix: "layerwise-demo-" });
  const backend = await openBackend({ backend: o.backend });
  try {
    say(`layerwise demo on ${backend.description}`);
    const dirA = `${tmp}/a`, dirB = `${tmp}/b`;
    await Deno.mkdir(dirA);
    await Deno.mkdir(dirB);
    const bytes = await writeSynthCheckpoint(dirA, DEMO_SHAPE, synthTensors(DEMO_SHAPE, SEED_A));
    const b = synthTensors(DEMO_SHAPE, SEED_B);
    await writeSynthCheckpoint(dirB, DEMO_SHAPE, b, 4);
    say(
      `generated checkpoints A and B: Llama, ${DEMO_SHAPE.numLayers} layers, hidden ${DEMO_SHAPE.hiddenSize}, ` +
        `${(bytes / 1e6).toFixed(1)} MB of bf16 each (B in 4 shards)`,
    );

    let t = performance.now();
    const model = await loadModel(dirA, {
      backend,
      quant: o.quant,
      rejectNonFinite: o.rejectNonFinite,
    });
    const loadSeconds = (performance.now() - t) / 1000;
    say(
      `first load from A (${o.quant === "auto" ? `auto: ${model.quant}` : o.quant}): ${
        loadSeconds.toFixed(2)
      } s`,
    );

    const before = new Map(kernelTensors(model).map(([n, k]) => [n, k.ptr]));
    const bar = createProgressBar({ quiet: o.quiet, label: "reload" });
    t = performance.now();
    const reload = await reloadWeights(model, dirB, {
      atomic: o.atomic,
      strict: o.strict,
      rejectNonFinite: o.rejectNonFinite,
      onProgress: (done, total, n) => bar.update(done, total, n),
    });
    bar.finish();
    say(`reload from B: ${describeReload(reload)}`);

    const after = new Map(kernelTensors(model).map(([n, k]) => [n, k.ptr]));
    const moved = [...before].filter(([n, p]) => after.get(n) !== p).map(([n]) => n);
    const { checked, worst, maxRel } = checkAgainst(model, b);
    const report: DemoReport = {
      backend: backend.description,
      checkpointBytes: bytes,
      loadSeconds,
      reload,
      moved,
      tensorsChecked: checked,
      maxErrorOverBound: worst?.maxErrorOverBound ?? 0,
      maxRelativeRmsError: maxRel,
      bound: worst?.bound ?? "exact",
      seconds: (performance.now() - start) / 1000,
    };
    say(
      `check: ${before.size} kernel tensors, ${moved.length} moved; ${checked} compared with B: ` +
        `max error / bound = ${report.maxErrorOverBound.toFixed(3)} (${report.bound}), ` +
        `max relative RMS error ${report.maxRelativeRmsError.toExponential(2)}`,
    );
    say(`demo done in ${report.seconds.toFixed(1)} s`);
    if (o.json !== undefined) {
      await writeJsonReport(o.json, report);
    }
    if (o.export !== undefined) {
      await exportKernelTensors(model, o.export);
    }
    if (!reload.storageKept) {
      throw new ReloadError(
        "DEMO_CHECK",
        "the engine reports kernel tensors that lost their storage",
      );
    }
    if (moved.length > 0) {
      throw new ReloadError(
        "DEMO_CHECK",
        `kernel tensors moved during the reload: ${moved.join(", ")}`,
      );
    }
    if (!(report.maxErrorOverBound <= 1)) {
      throw new ReloadError(
        "DEMO_CHECK",
        `dequantized weights differ from B by ${report.maxErrorOverBound} times the bound (${report.bound})`,
      );
    }
    return report;
  } finally {
    backend.close();
    await Deno.remove(tmp, { recursive: true });
  }
}

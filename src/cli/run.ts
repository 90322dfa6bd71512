/**
 * `deno task reload --model DIR`: first load, then `--repeat` reloads from `--weights`, then
 * `--export` (also after a failed reload) and `--json`.
 * @module
 */

import { openBackend } from "../backend/select.ts";
import type { Backend } from "../backend/backend.ts";
import {
  exportKernelTensors,
  loadModel,
  type ModelReloadReport,
  reloadWeights,
} from "../models/load.ts";
import type { CausalLM } from "../models/causal_lm.ts";
import type { CliOptions } from "./args.ts";
import { oneLine } from "../messages.ts";
import { createProgressBar, formatBytes, formatRate } from "./progress.ts";
import { checkOutputs, writeJsonReport } from "./outputs.ts";
import { openWeightSource } from "../checkpoint/source.ts";
import { validateWeights } from "../models/weights.ts";

/** The JSON report of a run (`--json`). */
export interface RunReport {
  /** The backend's description. */
  backend: string;
  /** The --model directory. */
  model: string;
  /** The --weights path. */
  weights: string;
  /** The checkpoint file read for the first load (a single file or an index). */
  checkpoint: string;
  /** The quantization. */
  quant: string;
  /** The first load. */
  load: { seconds: number };
  /** One entry per reload that completed. */
  reloads: ModelReloadReport[];
  /** The error line of a failed reload, if any. */
  error?: string;
}

function print(line: string, quiet: boolean): void {
  if (!quiet) console.log(line);
}

/** One line describing a reload. */
export function describeReload(r: ModelReloadReport): string {
  // "Layers" in the engine's sense (every module holding weights), not decoder layers.
  return `${r.layersProcessed} weight modules, ${formatBytes(r.bytesLoaded)} in ${
    r.seconds.toFixed(3)
  } s (${formatRate(r.bytesLoaded, r.seconds)}), peak scratch ${
    formatBytes(r.peakBufferedBytes)
  }, storage kept: ${r.storageKept ? "yes" : "NO"}` +
    (r.unexpected.length > 0 ? `, ${r.unexpected.length} unexpected tensors ignored` : "");
}

/**
 * Runs the --model flow; throws the first load or reload error (after --export and --json).
 * Output paths are checked before anything runs (they must be writable, distinct, and none of
 * the files read); when writing an output fails after a failed reload, the reload's error is
 * the one thrown and the write's is a warning.
 */
export async function runReload(o: CliOptions): Promise<void> {
  const dir = o.model!;
  const weights = o.weights ?? dir;
  const checkpoint = await checkOutputs(o, dir, weights);
  const backend: Backend = await openBackend({ backend: o.backend });
  try {
    const t0 = performance.now();
    const model: CausalLM = await loadModel(dir, {
      backend,
      quant: o.quant,
      rejectNonFinite: o.rejectNonFinite,
    });
    const report: RunReport = {
      backend: backend.description,
      model: dir,
      weights,
      checkpoint,
      quant: model.quant,
      load: { seconds: (performance.now() - t0) / 1000 },
      reloads: [],
    };
    print(
      `loaded ${model.config.architecture} from ${checkpoint} on ${backend.description} (${
        o.quant === "auto" ? `auto: ${model.quant}` : o.quant
      }) in ${report.load.seconds.toFixed(3)} s`,
      o.quiet,
    );
    if (o.repeat === 0 && o.weights !== undefined) {
      // Nothing is reloaded, but --weights is still checked against the model.
      const source = await openWeightSource(weights);
      try {
        validateWeights(model, source, { strict: o.strict });
      } finally {
        source.close();
      }
    }
    let failure: unknown;
    for (let i = 0; i < o.repeat; i++) {
      const bar = createProgressBar({
        quiet: o.quiet,
        label: o.repeat > 1 ? `reload ${i + 1}/${o.repeat}` : "reload",
      });
      try {
        const r = await reloadWeights(model, weights, {
          atomic: o.atomic,
          strict: o.strict,
          rejectNonFinite: o.rejectNonFinite,
          onProgress: (done, total, bytes) => bar.update(done, total, bytes),
        });
        report.reloads.push(r);
        bar.finish();
        print(`reload ${i + 1}: ${describeReload(r)}`, o.quiet);
        if (r.inconsistent) {
          console.error(
            `warning: model inconsistent: ${
              r.inconsistentLayers.join(", ")
            } hold weights of an earlier failed reload`,
          );
        }
      } catch (e) {
        bar.finish();
        failure = e;
        report.error = e instanceof Error ? e.message : String(e);
        break;
      }
    }
    // Written even after a failure: the export shows the state the failure left. The first
    // cause stays the error; a write that fails after it is a warning.
    const write = async (what: string, run: () => Promise<void>) => {
      try {
        await run();
      } catch (e) {
        if (failure === undefined) throw e;
        console.error(`warning: ${what} not written: ${errorText(e)}`);
      }
    };
    if (o.export !== undefined) {
      await write("--export", () => exportKernelTensors(model, o.export!));
    }
    if (o.json !== undefined) await write("--json", () => writeJsonReport(o.json!, report));
    if (failure !== undefined) throw failure;
  } finally {
    backend.close();
  }
}

function errorText(e: unknown): string {
  return oneLine(e instanceof Error ? e.message : String(e));
}

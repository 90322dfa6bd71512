/**
 * The two ways weights get into a model: {@link loadWeights} (first load: model format, then
 * processing per layer) and {@link reloadWeights} (layerwise reload into the kept kernel
 * tensors, returning a {@link ReloadReport}).
 *
 * Tensors from the source are borrowed: the engine reads them during the call that receives
 * them and copies what it must keep, so the source may free or reuse them after each step.
 * @module
 */

import { CheckpointError, ReloadError } from "../errors.ts";
import { countWrites, type Module, prefixError, type TensorSlot } from "../nn/module.ts";
import { type Storage, Tensor } from "../tensor/tensor.ts";
import {
  describeGaps,
  failReload,
  finalizeLayerwiseReload,
  getLayerwiseInfo,
  initializeLayerwiseReload,
  isReloading,
  recordMetadataForReloading,
  type ReloadOptions,
} from "./layerwise.ts";
import { materializeLayer, restoreLayerOnMeta } from "./meta.ts";

/** Checkpoint tensors by name, in any order: an array, a generator, an async stream. */
export type WeightSource =
  | Iterable<readonly [string, Tensor]>
  | AsyncIterable<readonly [string, Tensor]>;

/** What {@link loadWeights} did. */
export interface LoadReport {
  /** Tensors loaded. */
  readonly tensorsLoaded: number;
  /** Names the model skips on purpose (mapCheckpointName returned null). */
  readonly tensorsSkipped: number;
  /** Loads ignored: the same tensor again (e.g. both names of a tied weight). */
  readonly ignoredLoads: number;
  /** Bytes of the loaded checkpoint tensors. */
  readonly bytesLoaded: number;
  /** Layers processed into kernel format. */
  readonly layersProcessed: number;
  /** Wall time in seconds. */
  readonly seconds: number;
}

/** Options of {@link loadWeights}. */
export interface LoadOptions {
  /** Receives debug messages. */
  log?: (message: string) => void;
}

/**
 * First load: gives the model-format tensors storage, runs every load through the real
 * loaders, checks that each layer received everything but padding (CheckpointError
 * `MISSING_WEIGHTS` otherwise), then processes each layer into kernel format (attention last).
 * Records reload metadata first when that was not done. On error the model is put back on
 * meta, its memory freed.
 */
export async function loadWeights(
  model: Module,
  weights: WeightSource,
  options: LoadOptions = {},
): Promise<LoadReport> {
  const t0 = performance.now();
  const log = options.log ?? (() => {});
  if (isReloading(model)) {
    throw new ReloadError("RELOAD_ACTIVE", "loadWeights: a layerwise reload is in progress");
  }
  const layers = [...model.namedModules()].filter(([, m]) => m.ownSlots().length > 0);
  if (layers.some(([, m]) => !getLayerwiseInfo(m)?.restoreMetadata)) {
    recordMetadataForReloading(model); // also refuses a model that was loaded already
  }
  for (const [path, m] of layers) {
    for (const [name, slot] of m.ownSlots()) {
      if (!slot.tensor.isMeta) {
        throw new ReloadError(
          "ALREADY_LOADED",
          `${path}.${name} is loaded already: use reloadWeights for new weights`,
        );
      }
    }
  }
  const counts = new Map<TensorSlot, { elements: number; shards: string[] }>();
  const seen = new Map<TensorSlot, Set<string>>();
  let tensors = 0, skipped = 0, ignored = 0, bytes = 0;
  try {
    for (const [, m] of layers) materializeLayer(m);
    for await (const [name, loaded] of weights) {
      const r = model.resolveWeight(name);
      if (!r) {
        skipped++;
        continue;
      }
      const key = `${r.shardId ?? ""}|${r.expertId ?? ""}`;
      const keys = seen.get(r.slot) ?? new Set();
      if (keys.has(key)) {
        ignored++;
        log(`${name}: its tensor was loaded already, ignored`);
        continue;
      }
      const real = r.slot.tensor;
      let n: number;
      try {
        r.slot.tensor = Tensor.meta(real.shape, real.dtype);
        try {
          n = countWrites(() => r.slot.weightLoader(r.slot, loaded, r.shardId, r.expertId));
        } finally {
          r.slot.tensor = real;
        }
        r.slot.weightLoader(r.slot, loaded, r.shardId, r.expertId);
      } catch (e) {
        throw prefixError(e, name);
      }
      keys.add(key);
      seen.set(r.slot, keys);
      const c = counts.get(r.slot) ?? { elements: 0, shards: [] };
      c.elements += n;
      if (r.shardId !== undefined) {
        c.shards.push(r.expertId === undefined ? `${r.shardId}` : `${r.shardId}@${r.expertId}`);
      }
      counts.set(r.slot, c);
      tensors++;
      bytes += loaded.nbytes;
    }
    const missing: string[] = [];
    for (const [path, m] of layers) {
      if (m.processLast) continue; // attention scales are optional
      const meta = getLayerwiseInfo(m)!.restoreMetadata!;
      missing.push(
        ...describeGaps(m, path, meta, (name) => {
          return counts.get(m.getSlot(name)!) ?? { elements: 0, shards: [] };
        }),
      );
    }
    if (missing.length > 0) {
      throw new CheckpointError(
        "MISSING_WEIGHTS",
        `${missing.length} tensor${missing.length > 1 ? "s were" : " was"} not fully loaded: ${
          missing.join("; ")
        }`,
      );
    }
    for (const last of [false, true]) {
      for (const [, m] of layers) {
        if (m.processLast === last) m.quantMethod?.processWeightsAfterLoading(m);
      }
    }
  } catch (e) {
    for (const [, m] of layers) {
      const freed = new Set<Storage>();
      for (const [, slot] of m.ownSlots()) {
        const s = slot.tensor.storage;
        if (s && !s.freed && !freed.has(s)) {
          freed.add(s);
          m.backend!.free(s);
        }
      }
      restoreLayerOnMeta(m, getLayerwiseInfo(m)!.restoreMetadata!);
    }
    throw e;
  }
  return {
    tensorsLoaded: tensors,
    tensorsSkipped: skipped,
    ignoredLoads: ignored,
    bytesLoaded: bytes,
    layersProcessed: layers.length,
    seconds: (performance.now() - t0) / 1000,
  };
}

/** What {@link reloadWeights} did. */
export interface ReloadReport {
  /** Layers written with new weights. */
  readonly layersProcessed: number;
  /** Their paths, in processing order. */
  readonly processed: readonly string[];
  /** Layers processed at the end because only padding was missing (e.g. a padded vocabulary). */
  readonly delayed: readonly string[];
  /** Layers that received nothing: their kernel tensors are unchanged. */
  readonly untouched: readonly string[];
  /** Tensors loaded. */
  readonly tensorsLoaded: number;
  /** Names the model skips on purpose. */
  readonly tensorsSkipped: number;
  /** Loads ignored: to an already-processed layer, or the same shard twice. */
  readonly ignoredLoads: number;
  /** Bytes of the checkpoint tensors loaded. */
  readonly bytesLoaded: number;
  /** Wall time in seconds. */
  readonly seconds: number;
  /** Most checkpoint bytes held at once while layers waited for shards. */
  readonly peakBufferedBytes: number;
  /** Most model-format scratch bytes at once (about one layer). */
  readonly peakScratchBytes: number;
  /** Every kernel tensor kept its storage (same address) through the reload. */
  readonly storageKept: boolean;
}

/**
 * Reloads new weights into a loaded model, layer by layer, in place: initialize, load every
 * tensor of `weights` (any order), finalize. On any error the reload is aborted (see
 * abortLayerwiseReload) and the error says which layers already hold new weights.
 */
export async function reloadWeights(
  model: Module,
  weights: WeightSource,
  options: ReloadOptions = {},
): Promise<ReloadReport> {
  const t0 = performance.now();
  initializeLayerwiseReload(model, options);
  let tensors = 0, skipped = 0, bytes = 0;
  try {
    for await (const [name, loaded] of weights) {
      if (model.loadWeight(name, loaded)) {
        tensors++;
        bytes += loaded.nbytes;
      } else skipped++;
    }
  } catch (e) {
    failReload(model, e);
  }
  const s = finalizeLayerwiseReload(model);
  return {
    layersProcessed: s.processed.length,
    processed: s.processed,
    delayed: s.delayed,
    untouched: s.untouched,
    tensorsLoaded: tensors,
    tensorsSkipped: skipped,
    ignoredLoads: s.ignoredLoads,
    bytesLoaded: bytes,
    seconds: (performance.now() - t0) / 1000,
    peakBufferedBytes: s.peakBufferedBytes,
    peakScratchBytes: s.peakScratchBytes,
    storageKept: s.storageKept,
  };
}

/**
 * The two ways weights get into a model: {@link loadWeights} (first load: model format, then
 * processing per layer) and {@link reloadLayerwise} (layerwise reload into the kept kernel
 * tensors, returning a {@link ReloadReport}).
 *
 * Tensors from the source are borrowed: the engine writes them into place during the call that
 * receives them and keeps no reference, so the source may free or reuse them after each step.
 * @module
 */

import { CheckpointError, ReloadError } from "../errors.ts";
import { qualifiedName } from "../messages.ts";
import { type Module, prefixError } from "../nn/module.ts";
import { countWrites, type TensorSlot } from "../nn/slots.ts";
import { type Storage, Tensor } from "../tensor/tensor.ts";
import {
  assertIdle,
  describeGaps,
  failReload,
  finalizeLayerwiseReload,
  type FinalizeSummary,
  getLayerwiseInfo,
  initializeLayerwiseReload,
  recordMetadataForReloading,
  rejectNonFinite,
  rejectNonFiniteKernel,
  type ReloadOptions,
  setLoading,
} from "./layerwise.ts";
import { materializeLayer, restoreLayerOnMeta } from "./meta.ts";
import { loadLabel, RowLedger } from "./rows.ts";
import { type TensorDescriptor, validateTensors, type ValidationReport } from "./validate.ts";

/**
 * Checkpoint tensors by name, in any order: an array, a generator, an async stream. A tensor
 * may come as row chunks (each a `rowWindow` under the tensor's name), in any order.
 */
export type TensorStream =
  | Iterable<readonly [string, Tensor]>
  | AsyncIterable<readonly [string, Tensor]>;

/** What {@link loadWeights} did. */
export interface LoadReport {
  /** Checkpoint tensors loaded (a tensor sent as row chunks counts once). */
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

/** Validation options shared by {@link loadWeights} and {@link reloadLayerwise}. */
export interface ExpectOptions {
  /**
   * Descriptors (name, dtype, shape) of every tensor the source will give, e.g. a weight
   * source's `tensors.values()` read from headers: when set, the whole checkpoint is checked
   * against the model with validateTensors before anything is written.
   */
  expected?: Iterable<TensorDescriptor>;
  /**
   * With `expected`: unknown and uncovered tensors are errors (true, default) or only
   * reported (false; unknown names are then skipped during the load).
   */
  strict?: boolean;
}

/** Options of {@link loadWeights}. */
export interface LoadOptions extends ExpectOptions {
  /** Receives debug messages. */
  log?: (message: string) => void;
  /**
   * Scan every incoming tensor on the backend for NaN/Inf before loading it, as it comes and
   * converted to the model's dtype, and each layer's kernel tensors after processing; a hit is
   * ReloadError `NON_FINITE` naming the tensor and the count. Default false (the CLI turns it
   * on); costs one extra device read of every incoming tensor.
   */
  rejectNonFinite?: boolean;
}

/** Options of {@link reloadLayerwise}: the lifecycle's options plus validation. */
export interface ReloadLayerwiseOptions extends ReloadOptions, ExpectOptions {}

/**
 * First load: gives the model-format tensors storage, runs every load through the real
 * loaders, checks that each layer received everything but padding (CheckpointError
 * `MISSING_WEIGHTS` otherwise), then processes each layer into kernel format (attention last).
 * Records reload metadata first when that was not done. On error the model is put back on
 * meta, its memory freed.
 */
export async function loadWeights(
  model: Module,
  weights: TensorStream,
  options: LoadOptions = {},
): Promise<LoadReport> {
  const t0 = performance.now();
  const log = options.log ?? (() => {});
  assertIdle(model, "loadWeights");
  const layers = [...model.namedModules()].filter(([, m]) => m.ownSlots().length > 0);
  if (layers.some(([, m]) => !getLayerwiseInfo(m)?.restoreMetadata)) {
    recordMetadataForReloading(model); // also refuses a model that was loaded already
  }
  assertUnloaded(layers);
  const skip = options.expected
    ? new Set(validateTensors(model, options.expected, { strict: options.strict }).unknown)
    : new Set<string>();
  const counts = new Map<TensorSlot, { elements: number; shards: string[] }>();
  const seen = new Map<TensorSlot, RowLedger>();
  let skipped = 0, ignored = 0, bytes = 0;
  const tensors = new Set<string>();
  // Set synchronously, before the first await: a reload or load started meanwhile is refused.
  setLoading(model, true);
  try {
    for (const [, m] of layers) materializeLayer(m);
    for await (const [name, loaded] of weights) {
      if (skip.has(name)) {
        skipped++;
        continue;
      }
      const r = model.resolveWeight(name);
      if (!r) {
        skipped++;
        continue;
      }
      const keys = seen.get(r.slot) ?? new RowLedger();
      const key = `${r.shardId ?? ""}|${r.expertId ?? ""}`;
      if (keys.seen(key, loaded, name)) {
        ignored++;
        log(`${name}: its tensor (these rows) was loaded already, ignored`);
        continue;
      }
      const real = r.slot.tensor;
      let n: number;
      try {
        if (options.rejectNonFinite) rejectNonFinite(r.module.backend!, loaded, name, real.dtype);
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
      keys.add(key, loaded);
      seen.set(r.slot, keys);
      const c = counts.get(r.slot) ?? { elements: 0, shards: [] };
      c.elements += n;
      const label = loadLabel(loaded, r.shardId, r.expertId);
      if (label !== null) c.shards.push(label);
      counts.set(r.slot, c);
      tensors.add(name);
      bytes += loaded.windowRows().nbytes;
    }
    const missing = missingLoads(layers, counts);
    if (missing.length > 0) {
      throw new CheckpointError(
        "MISSING_WEIGHTS",
        `${missing.length} tensor${missing.length > 1 ? "s were" : " was"} not fully loaded: ${
          missing.join("; ")
        }`,
      );
    }
    for (const last of [false, true]) {
      for (const [path, m] of layers) {
        if (m.processLast !== last || m.quantMethod === undefined) continue;
        m.quantMethod.processWeightsAfterLoading(m);
        if (options.rejectNonFinite) rejectNonFiniteKernel([{ layer: m, path }]);
      }
    }
  } catch (e) {
    unloadLayers(layers);
    throw e;
  } finally {
    setLoading(model, false);
  }
  return {
    tensorsLoaded: tensors.size,
    tensorsSkipped: skipped,
    ignoredLoads: ignored,
    bytesLoaded: bytes,
    layersProcessed: layers.length,
    seconds: (performance.now() - t0) / 1000,
  };
}

/** Throws ReloadError `ALREADY_LOADED` when a slot of `layers` holds storage. */
function assertUnloaded(layers: readonly [string, Module][]): void {
  for (const [path, m] of layers) {
    for (const [name, slot] of m.ownSlots()) {
      if (!slot.tensor.isMeta) {
        throw new ReloadError(
          "ALREADY_LOADED",
          `${qualifiedName(path, name)} is loaded already: use reloadLayerwise for new weights`,
        );
      }
    }
  }
}

/**
 * What a first load left short, from the elements each slot received: one line per tensor
 * that got less than all but its padding. Attention scales are optional and never listed.
 */
function missingLoads(
  layers: readonly [string, Module][],
  counts: ReadonlyMap<TensorSlot, { elements: number; shards: string[] }>,
): string[] {
  const missing: string[] = [];
  for (const [path, m] of layers) {
    if (m.processLast) continue;
    const meta = getLayerwiseInfo(m)!.restoreMetadata!;
    missing.push(
      ...describeGaps(m, path, meta, (name) => {
        return counts.get(m.getSlot(name)!) ?? { elements: 0, shards: [] };
      }),
    );
  }
  return missing;
}

/** Frees what a failed first load gave `layers` (tied storage once) and puts them back on meta. */
function unloadLayers(layers: readonly [string, Module][]): void {
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
}

/** What {@link reloadLayerwise} did: the finalize summary plus what was loaded and checked. */
export interface ReloadReport extends FinalizeSummary {
  /** Layers written with new weights (the length of `processed`). */
  readonly layersProcessed: number;
  /** Checkpoint tensors loaded (a tensor sent as row chunks counts once). */
  readonly tensorsLoaded: number;
  /** Names the model skips on purpose. */
  readonly tensorsSkipped: number;
  /** Bytes of the checkpoint tensors loaded. */
  readonly bytesLoaded: number;
  /** Wall time in seconds. */
  readonly seconds: number;
  /**
   * True while layers still hold weights of an earlier failed, non-atomic reload that this
   * reload did not write again (see isInconsistent); they are in `inconsistentLayers`.
   */
  readonly inconsistent: boolean;
  /** The validation done before writing, when `expected` was given. */
  readonly validation: ValidationReport | null;
}

/**
 * Reloads new weights into a loaded model, layer by layer, in place: validate (with
 * `expected`), initialize, load every tensor of `weights` (any order), finalize. On any error
 * the reload is aborted (see abortLayerwiseReload): with `atomic` the model is restored
 * bit-exactly, otherwise the error lists the layers already written and the model is marked
 * inconsistent (isInconsistent). Errors that are not LayerwiseErrors (a source that throws)
 * come out as ReloadError `RELOAD_FAILED` with the original as `cause`.
 *
 * While it runs (it awaits the source), another reloadLayerwise or loadWeights of the same model
 * is refused with ReloadError `RELOAD_ACTIVE`; the model's slots show model-format tensors
 * (meta, or scratch being filled) for layers not yet processed, so do not read or export the
 * model through its slots until the promise settles. Kernel tensor storage (device pointers)
 * stays valid and in place throughout: kernels that use it see old weights in layers not yet
 * written, new weights in written ones, and a mix in a layer being written (a layer without
 * quantization is written as its tensors arrive).
 */
export async function reloadLayerwise(
  model: Module,
  weights: TensorStream,
  options: ReloadLayerwiseOptions = {},
): Promise<ReloadReport> {
  const t0 = performance.now();
  // Named as the package root's reloadWeights, which is what almost every caller called.
  assertIdle(model, "reloadWeights");
  const validation = options.expected
    ? validateTensors(model, options.expected, { strict: options.strict })
    : null;
  const skip = new Set(validation?.unknown ?? []);
  initializeLayerwiseReload(model, options);
  let skipped = 0, bytes = 0;
  const tensors = new Set<string>();
  try {
    for await (const [name, loaded] of weights) {
      if (skip.has(name)) skipped++;
      else if (model.loadWeight(name, loaded)) {
        tensors.add(name);
        bytes += loaded.windowRows().nbytes;
      } else skipped++;
    }
  } catch (e) {
    failReload(model, e);
  }
  const s = finalizeLayerwiseReload(model);
  return {
    ...s,
    layersProcessed: s.processed.length,
    tensorsLoaded: tensors.size,
    tensorsSkipped: skipped,
    bytesLoaded: bytes,
    seconds: (performance.now() - t0) / 1000,
    inconsistent: s.inconsistentLayers.length > 0,
    validation,
  };
}

/**
 * Validation of a whole checkpoint against a model from its headers alone (names, dtypes,
 * shapes), before any kernel tensor is written. It is a dry run of the real loaders: each
 * described tensor becomes a meta tensor (shape and dtype, no storage) and goes through the
 * layer's own loader into the layer's model-format meta tensors, where `copyInto` counts the
 * elements it would write instead of copying. So the shape and dtype checks and the coverage
 * count are the code of the real load, and the model itself is not touched.
 * @module
 */

import { CheckpointError, type CheckpointErrorCode, LayerwiseError } from "../errors.ts";
import { type Module, prefixError } from "../nn/module.ts";
import { countWrites, type ShardId, TensorSlot, type WeightLoader } from "../nn/slots.ts";
import type { DType } from "../tensor/dtype.ts";
import { Tensor } from "../tensor/tensor.ts";
import { describeGaps, getLayerwiseInfo } from "./layerwise.ts";
import type { LayerMeta } from "./meta.ts";
import { firstOf, pathText, plural, qualifiedName } from "../messages.ts";

/** What a checkpoint header says about a tensor (a `TensorInfo` of a weight source fits). */
export interface TensorDescriptor {
  /** Name in the checkpoint. */
  readonly name: string;
  /** Element type. */
  readonly dtype: DType;
  /** Sizes of each dimension. */
  readonly shape: readonly number[];
  /** Where it comes from (a file path), put in front of messages about it when given. */
  readonly origin?: string;
}

/** Options of {@link validateTensors}. */
export interface ValidateOptions {
  /**
   * When true (default), unknown tensors and model tensors the checkpoint does not cover are a
   * CheckpointError; when false they are only listed in the report (a partial reload: layers
   * that receive nothing keep their weights, unknown names are skipped). Wrong shapes or
   * dtypes, and layers covered only in part, are errors either way: the load would fail.
   */
  strict?: boolean;
}

/** The outcome of {@link validateTensors}. */
export interface ValidationReport {
  /** Descriptors that go into model tensors. */
  readonly tensors: number;
  /** Names the model skips on purpose (e.g. rotary `inv_freq`). */
  readonly skipped: readonly string[];
  /** Names the model has no tensor for. */
  readonly unknown: readonly string[];
  /** Model tensors (`path.param`) that no descriptor covers, in layers that receive nothing. */
  readonly missing: readonly string[];
  /** Descriptors that repeat a tensor (or shard) already described; a load ignores them. */
  readonly duplicates: readonly string[];
  /** Layers the checkpoint covers completely (but padding). */
  readonly layersCovered: number;
  /** Layers that receive nothing and would keep their weights in a reload. */
  readonly layersUntouched: readonly string[];
  /** True when every layer is covered and no name is unknown. */
  readonly complete: boolean;
}

interface Target {
  readonly layer: Module;
  readonly path: string;
  readonly param: string;
  readonly meta: Tensor;
  readonly loader: WeightLoader;
}

/** The model-format tensors of every layer: recorded metadata, or the meta slots of a new model. */
function modelFormat(model: Module): {
  layers: [Module, string, LayerMeta][];
  byModule: Map<Module, Map<string, Target>>;
  bySlot: Map<TensorSlot, Target>;
} {
  const layers: [Module, string, LayerMeta][] = [];
  const byModule = new Map<Module, Map<string, Target>>();
  const bySlot = new Map<TensorSlot, Target>();
  const seen = new Set<Module>();
  for (const [path, m] of model.namedModules()) {
    if (seen.has(m)) continue;
    seen.add(m);
    let meta = getLayerwiseInfo(m)?.restoreMetadata ?? null;
    if (!meta) {
      const own = m.ownSlots();
      if (own.length === 0) continue;
      meta = new Map();
      for (const [name, slot] of own) {
        if (!slot.tensor.isMeta) {
          throw new LayerwiseError(
            "NOT_RECORDED",
            `${
              qualifiedName(path, name)
            }: the model is loaded but its metadata was not recorded; validate needs the model format`,
          );
        }
        meta.set(name, { slot, meta: slot.tensor, loader: slot.weightLoader });
      }
    }
    const targets = new Map<string, Target>();
    for (const [name, t] of meta) {
      const target = { layer: m, path, param: name, meta: t.meta, loader: t.loader };
      targets.set(name, target);
      bySlot.set(t.slot, target);
    }
    layers.push([m, path, meta]);
    byModule.set(m, targets);
  }
  return { layers, byModule, bySlot };
}

/**
 * Checks a whole checkpoint against `model` from its descriptors (names, dtypes, shapes)
 * without reading or writing any tensor: every name must map to a model tensor (unknown names
 * are listed), every load must pass the layer's loader (shape and dtype), and every layer must
 * be covered completely but for padding (attention scales are optional). Works on a model that
 * was built but not loaded, and on a loaded one (its recorded model format is used).
 *
 * Throws CheckpointError with a one-line message (count, first names, `...`): `SHAPE_MISMATCH`
 * or `DTYPE_MISMATCH` (or the loader's own code) for tensors that do not fit,
 * `MISSING_WEIGHTS` for layers covered only in part; with `strict` (default) also
 * `UNKNOWN_TENSOR` for unknown names and `MISSING_WEIGHTS` for uncovered tensors. The most
 * severe kind gives the code; the message lists every kind found.
 */
export function validateTensors(
  model: Module,
  entries: Iterable<TensorDescriptor>,
  options: ValidateOptions = {},
): ValidationReport {
  const format = modelFormat(model);
  const run = dryRun(model, format, entries);
  const cover = coverage(format, run.received);
  const report: ValidationReport = {
    tensors: run.tensors,
    skipped: run.skipped,
    unknown: run.unknown,
    missing: cover.missing,
    duplicates: run.duplicates,
    layersCovered: cover.covered,
    layersUntouched: cover.untouched,
    complete: run.unknown.length === 0 && cover.missing.length === 0 &&
      cover.partial.length === 0,
  };
  refuseMisfits(run, cover, options.strict ?? true);
  return report;
}

/** Elements each model tensor would receive, and the shards they come in. */
type Received = Map<Target, { elements: number; shards: string[] }>;

/** What the dry run of the loaders found, entry by entry. */
interface DryRun {
  readonly received: Received;
  readonly tensors: number;
  readonly skipped: string[];
  readonly unknown: string[];
  /** The unknown names with their origins, for messages. */
  readonly unknownWhere: string[];
  readonly duplicates: string[];
  /** Entries the loaders refused. */
  readonly misfits: CheckpointError[];
}

/** Each entry as a meta tensor through its layer's own loader, counting what it would write. */
function dryRun(
  model: Module,
  { byModule, bySlot }: ReturnType<typeof modelFormat>,
  entries: Iterable<TensorDescriptor>,
): DryRun {
  const received: Received = new Map();
  const keys = new Set<string>();
  const slotIds = new Map<Target, number>();
  const skipped: string[] = [], unknown: string[] = [], duplicates: string[] = [];
  const unknownWhere: string[] = [];
  const misfits: CheckpointError[] = [];
  let tensors = 0;
  for (const e of entries) {
    const name = e.name;
    let target: Target | undefined;
    const mapped = model.mapCheckpointName(name);
    if (mapped === null) {
      skipped.push(name);
      continue;
    }
    const module = model.getModule(mapped.path);
    if (module) {
      target = module.isTied(mapped.param)
        ? bySlot.get(module.getSlot(mapped.param)!)
        : byModule.get(module)?.get(mapped.param);
    }
    if (!target) {
      unknown.push(name);
      unknownWhere.push(
        e.origin === undefined ? pathText(name) : `${e.origin}: ${pathText(name)}`,
      );
      continue;
    }
    const shardId: ShardId | undefined = mapped.shardId;
    const expertId: number | undefined = mapped.expertId;
    let id = slotIds.get(target);
    if (id === undefined) slotIds.set(target, id = slotIds.size);
    const key = `${id}|${shardId ?? ""}|${expertId ?? ""}`;
    if (keys.has(key)) {
      duplicates.push(name);
      continue;
    }
    // A throwaway slot: the loader writes into `slot.tensor`, here the model-format meta.
    const slot = new TensorSlot(target.meta, target.loader);
    let n: number;
    try {
      const loaded = Tensor.meta(e.shape, e.dtype);
      n = countWrites(() => target.loader(slot, loaded, shardId, expertId));
    } catch (err) {
      // A checkpoint tensor that does not fit is listed; anything else is not the checkpoint's
      // fault and goes up at once.
      if (err instanceof CheckpointError) {
        const named = prefixError(err, name) as CheckpointError;
        misfits.push(
          e.origin === undefined
            ? named
            : new CheckpointError(named.code, `${e.origin}: ${named.message}`),
        );
        continue;
      }
      throw prefixError(err, name);
    }
    keys.add(key);
    tensors++;
    const r = received.get(target) ?? { elements: 0, shards: [] };
    r.elements += n;
    if (shardId !== undefined) {
      r.shards.push(expertId === undefined ? `${shardId}` : `${shardId}@${expertId}`);
    }
    received.set(target, r);
  }
  return { received, tensors, skipped, unknown, unknownWhere, duplicates, misfits };
}

/** Coverage per layer: complete, untouched (listed as missing), or in part (the gaps). */
function coverage(
  { layers, byModule }: ReturnType<typeof modelFormat>,
  received: Received,
): { missing: string[]; partial: string[]; untouched: string[]; covered: number } {
  const missing: string[] = [], partial: string[] = [], untouched: string[] = [];
  let covered = 0;
  for (const [layer, path, meta] of layers) {
    const targets = byModule.get(layer)!;
    const got = (name: string) => received.get(targets.get(name)!) ?? { elements: 0, shards: [] };
    const total = [...targets.values()].reduce((a, t) => a + (received.get(t)?.elements ?? 0), 0);
    if (layer.processLast) {
      // Attention scales are optional: absent ones keep (or get) their default.
      if (total === 0) untouched.push(path);
      else covered++;
      continue;
    }
    const gaps = describeGaps(layer, path, meta, got);
    if (gaps.length === 0) covered++;
    else if (total === 0) {
      untouched.push(path);
      missing.push(...[...meta.keys()].map((n) => qualifiedName(path, n)));
    } else partial.push(...gaps);
  }
  return { missing, partial, untouched, covered };
}

/**
 * The one CheckpointError for everything found: the most severe kind gives the code, the
 * message lists every kind.
 */
function refuseMisfits(
  { misfits, unknown, unknownWhere }: DryRun,
  { missing, partial }: { missing: string[]; partial: string[] },
  strict: boolean,
): void {
  const parts: string[] = [];
  let code: CheckpointErrorCode | "" = "";
  if (misfits.length > 0) {
    code = misfits[0].code;
    parts.push(
      `${plural(misfits.length, "tensor does", "tensors do")} not fit: ${
        misfits.slice(0, 3).map((m) => m.message).join("; ")
      }${misfits.length > 3 ? "; ..." : ""}`,
    );
  }
  if (partial.length > 0) {
    code ||= "MISSING_WEIGHTS";
    parts.push(`${plural(partial.length, "tensor")} covered in part: ${firstOf(partial, 3)}`);
  }
  if (strict && unknown.length > 0) {
    code ||= "UNKNOWN_TENSOR";
    parts.push(`${plural(unknown.length, "unknown tensor")}: ${firstOf(unknownWhere, 3)}`);
  }
  if (strict && missing.length > 0) {
    code ||= "MISSING_WEIGHTS";
    parts.push(
      `${plural(missing.length, "model tensor")} not in the checkpoint: ${firstOf(missing, 3)}`,
    );
  }
  if (code !== "") {
    throw new CheckpointError(code, `checkpoint does not fit the model: ${parts.join("; ")}`);
  }
}

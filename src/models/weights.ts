/**
 * Between a weight source and the engine: validation of the whole new checkpoint against the
 * model from its description alone (names, shapes, dtypes, coverage) before any kernel tensor
 * is written, and the stream of backend tensors read in model layer order.
 * @module
 */

import type { Backend } from "../backend/backend.ts";
import { wasmView } from "../backend/wasm.ts";
import type { TensorInfo, WeightSource } from "../checkpoint/source.ts";
import { CheckpointError, LayerwiseError } from "../errors.ts";
import { countWrites, TensorSlot } from "../nn/module.ts";
import { describeGaps, getLayerwiseInfo } from "../reload/layerwise.ts";
import { Tensor } from "../tensor/tensor.ts";
import type { CausalLM } from "./causal_lm.ts";
import { expectedCheckpointNames } from "./names.ts";

/** What validation found: the names to load, and what it leaves out. */
export interface ValidatedWeights {
  /** Names to load, in read order (model layer order). */
  readonly names: readonly string[];
  /** Names the model ignores on purpose (rotary tables, a tied lm_head). */
  readonly skipped: readonly string[];
  /** Names the model does not have (only when not strict; strict makes them errors). */
  readonly unexpected: readonly string[];
  /** Bytes to load. */
  readonly bytes: number;
  /** Layer-order keys of the names, with how many names each has (for progress). */
  readonly layers: ReadonlyMap<number, number>;
}

function quote(s: string): string {
  return JSON.stringify(s);
}

function where(info: TensorInfo): string {
  return `${info.origin}: tensor ${quote(info.name)}`;
}

/**
 * Checks every tensor of `source` against `model` from its description: each name maps to a
 * model tensor (or is reported, or is an error with `strict`), each load fits (shape, dtype,
 * shard) as the real loader sees it, and together they cover every model tensor except
 * padding. Throws CheckpointError naming the file and the tensor. The model must have recorded
 * its metadata (loadModel does).
 */
export function validateWeights(
  model: CausalLM,
  source: WeightSource,
  options: { strict?: boolean } = {},
): ValidatedWeights {
  const names: string[] = [];
  const skipped: string[] = [];
  const unexpected: string[] = [];
  const received = new Map<TensorSlot, { elements: number; shards: string[] }>();
  let bytes = 0;
  for (const name of source.plan(model.readOrder)) {
    const info = source.tensors.get(name)!;
    const target = model.mapCheckpointName(name);
    if (target === null) {
      skipped.push(name);
      continue;
    }
    const module = model.getModule(target.path);
    const slot = module?.getSlot(target.param);
    const meta = module && getLayerwiseInfo(module)?.restoreMetadata?.get(target.param);
    if (!module || !slot || module.isTied(target.param) || !meta) {
      if (options.strict) {
        throw new CheckpointError(
          "UNKNOWN_TENSOR",
          `${where(info)} is not a tensor of this ${model.config.architecture} model`,
        );
      }
      unexpected.push(name);
      continue;
    }
    // The real loader against meta tensors: it checks shard, shape and dtype as a load would,
    // and counts the elements it would write.
    const probe = new TensorSlot(meta.meta, meta.loader);
    let n: number;
    try {
      n = countWrites(() =>
        meta.loader(
          probe,
          Tensor.meta(info.shape, info.dtype),
          target.shardId,
          target.expertId,
        )
      );
    } catch (e) {
      if (!(e instanceof LayerwiseError)) throw e;
      throw new CheckpointError(e.code, `${where(info)} does not fit the model: ${e.message}`);
    }
    const got = received.get(slot) ?? { elements: 0, shards: [] };
    const shard = target.shardId === undefined ? "" : String(target.shardId) +
      (target.expertId === undefined ? "" : `@${target.expertId}`);
    if (got.shards.includes(shard) || (shard === "" && got.elements > 0)) {
      throw new CheckpointError(
        "DUPLICATE",
        `${where(info)} loads ${target.path}.${target.param}${
          shard ? ` shard ${shard}` : ""
        } a second time`,
      );
    }
    got.elements += n;
    got.shards.push(shard);
    received.set(slot, got);
    names.push(name);
    bytes += info.bytes;
  }
  const present = new Set(source.tensors.keys());
  const absent = expectedCheckpointNames(model.config).filter((n) => !present.has(n));
  if (absent.length > 0) {
    throw new CheckpointError(
      "MISSING_TENSOR",
      `${source.description}: ${absent.length} tensor${absent.length > 1 ? "s" : ""} missing: ${
        absent.slice(0, 8).join(", ")
      }${absent.length > 8 ? ", ..." : ""}`,
    );
  }
  // Coverage by element count catches what a name list cannot (e.g. a custom mapping).
  const gaps: string[] = [];
  for (const [path, m] of model.namedModules()) {
    const meta = getLayerwiseInfo(m)?.restoreMetadata;
    if (!meta || m.processLast) continue;
    gaps.push(
      ...describeGaps(
        m,
        path,
        meta,
        (n) => received.get(m.getSlot(n)!) ?? { elements: 0, shards: [] },
      ),
    );
  }
  if (gaps.length > 0) {
    throw new CheckpointError(
      "MISSING_WEIGHTS",
      `${source.description}: not every model tensor is covered: ${gaps.slice(0, 4).join("; ")}`,
    );
  }
  const layers = new Map<number, number>();
  for (const n of names) {
    const k = model.readOrder(n);
    layers.set(k, (layers.get(k) ?? 0) + 1);
  }
  return { names, skipped, unexpected, bytes, layers };
}

/** Progress of a stream: layer-order groups fully read, of all, and bytes read. */
export type ProgressCallback = (layersDone: number, layersTotal: number, bytes: number) => void;

/**
 * Reads the validated names in order into backend tensors and yields them; each tensor is
 * freed when the consumer asks for the next one (the engine copies what it keeps). On the
 * WebAssembly backend the bytes are read straight into its memory.
 */
export async function* streamWeights(
  backend: Backend,
  source: WeightSource,
  plan: ValidatedWeights,
  readOrder: (name: string) => number,
  onProgress?: ProgressCallback,
): AsyncGenerator<[string, Tensor]> {
  const left = new Map(plan.layers);
  let done = 0, bytes = 0;
  let staging = new Uint8Array(0);
  for (const name of plan.names) {
    const info = source.tensors.get(name)!;
    const t = backend.empty(info.shape, info.dtype);
    try {
      if (backend.kind === "wasm") {
        await source.readInto(name, wasmView(backend, t));
      } else {
        if (staging.byteLength < info.bytes) staging = new Uint8Array(info.bytes);
        const dst = staging.subarray(0, info.bytes);
        await source.readInto(name, dst);
        backend.upload(t, dst);
      }
      bytes += info.bytes;
      const k = readOrder(name);
      const n = left.get(k)! - 1;
      left.set(k, n);
      if (n === 0) done++;
      onProgress?.(done, plan.layers.size, bytes);
      yield [name, t];
    } finally {
      backend.free(t.storage!);
    }
  }
}

/**
 * Staged reads of a file-backed weight source: finds where its tensors lie in the checkpoint
 * files (the headers the source validated), then lets the CUDA backend read them through its
 * pinned ring (src/backend/cuda/staging.ts). {@link canStage} says whether a backend can take
 * this path; otherwise callers read through the source.
 * @module
 */

import type { Backend } from "../backend/backend.ts";
import {
  checkOptions,
  type StagedTensor,
  STAGING_DEFAULTS,
  type StagingOptions,
  type StagingStats,
} from "../backend/cuda/staging_plan.ts";
import type { Tensor } from "../tensor/tensor.ts";
import { openCheckpoint } from "./sharded.ts";
import type { WeightSource } from "./source.ts";

/** Where a source's tensors are in files, or null when it is not file-backed. */
async function locate(
  source: WeightSource,
  names: readonly string[],
): Promise<{ files: string[]; tensors: StagedTensor[] } | null> {
  const infos = names.map((n) => source.tensors.get(n));
  if (infos.some((i) => i === undefined || i.origin === "memory")) return null;
  let ckpt;
  try {
    ckpt = await openCheckpoint(source.description);
  } catch {
    return null;
  }
  const files: string[] = [];
  const index = new Map<string, number>();
  const tensors: StagedTensor[] = [];
  for (const name of names) {
    const info = source.tensors.get(name)!;
    const e = ckpt.tensors.get(name);
    // The headers must be the ones the source validated: same file, dtype and size.
    if (
      !e || e.file !== info.origin || e.dtype.name !== info.dtype.name ||
      e.end - e.begin !== info.bytes
    ) return null;
    let f = index.get(e.file);
    if (f === undefined) {
      index.set(e.file, f = files.length);
      files.push(e.file);
    }
    tensors.push({ name, file: f, offset: e.begin, bytes: info.bytes });
  }
  return { files, tensors };
}

/** Whether {@link stageTensors} can run for this backend: it has a `fileReader` (CUDA, Linux). */
export function canStage(backend: Backend): boolean {
  return backend.fileReader !== undefined;
}

/**
 * Frees the pinned memory `backend` keeps between staged reads (pinning is slow). Call before
 * closing the backend; a later staged read pins again.
 */
export function releaseStaging(backend: Backend): void {
  backend.fileReader?.release();
}

/**
 * Reads `names` of a file-backed `source` (in that order) through the backend's pinned ring
 * and yields each as a contiguous tensor in `backend` memory, borrowed until the consumer asks
 * for the next one; a tensor larger than the staging ring allows comes as row chunks.
 * Errors: CheckpointError `TRUNCATED` when a file came short, `MISSING_SHARD` when one vanished;
 * BackendError from the device, `BAD_OPTION` for staging sizes that are not positive integers. Yields nothing and returns
 * false when the source is not file-backed or the backend cannot stage (call {@link canStage}
 * first); returns true after the last tensor.
 */
export async function* stageTensors(
  backend: Backend,
  source: WeightSource,
  names: readonly string[],
  options: StagingOptions = {},
  stats?: StagingStats,
): AsyncGenerator<[string, Tensor], boolean> {
  const reader = backend.fileReader;
  if (!reader) return false;
  checkOptions({ ...STAGING_DEFAULTS, ...options });
  const where = await locate(source, names);
  if (where === null) return false;
  return yield* reader.read(
    where.files,
    where.tensors,
    (n) => source.tensors.get(n)!,
    options,
    stats,
  );
}

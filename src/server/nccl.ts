/**
 * NCCL updates: a trainer in another process (on other GPUs, or the same host's) joins a
 * communicator with the server (`POST /v1/update/nccl/init`), then for each update sends the
 * tensor list (`POST /v1/update/nccl`) and broadcasts the tensors packed into buckets. The list
 * is checked as an IPC table is (names, dtypes, shapes; then against the model: names, shapes,
 * coverage) before the first byte is received.
 *
 * Packing (the trainer packs identically; clients/python/layerwise_client.py `pack_buckets`):
 * tensors in the order of the list; each starts at the next multiple of 256 bytes after the end
 * of the one before it in its bucket; a tensor that would end past the bucket capacity starts
 * the next bucket at offset 0; the capacity is `bucket_bytes`, raised to the largest tensor
 * rounded up to 256. Each bucket is broadcast from the trainer's rank as uint8 of its length up
 * to the end of its last tensor. This is {@link planBuckets}, the plan of the broadcast reload.
 *
 * Each bucket arrives in one of three slots in the server's device memory (a layer may span two
 * buckets: bucket i-1 stays while i arrives, i+1 arrives while the reload reads them), and the
 * device reload writes every layer whose tensors have arrived straight from the slots, in one
 * phase per bucket (reload/device.ts). Once the list was accepted, a failure still receives the
 * rest of the buckets so that the communicator stays in step with the trainer.
 * @module
 */

import { NCCL_UNIQUE_ID_BYTES, type NcclReceiver } from "../backend/nccl_receiver.ts";
import type { Backend } from "../backend/backend.ts";
import type { Module } from "../nn/module.ts";
import { type BucketPlan, planBuckets } from "../parallel/broadcast.ts";
import { DeviceReload, type DeviceReloadOptions } from "../reload/device.ts";
import type { DeviceReloadReport } from "../reload/device.ts";
import type { Storage } from "../tensor/tensor.ts";
import { Tensor } from "../tensor/tensor.ts";
import { quoteName } from "../messages.ts";
import { checkTableTensor, type TableTensor } from "./ipc.ts";
import { checkFields } from "./json_body.ts";
import { serverError } from "./http_errors.ts";

/** A checked `POST /v1/update/nccl/init` body. */
export interface NcclInit {
  /** The `ncclUniqueId` the trainer made. */
  readonly uniqueId: Uint8Array;
  /** Ranks in the communicator (the trainer's and the server's). */
  readonly worldSize: number;
  /** The server's rank. */
  readonly rankOffset: number;
}

/** A checked `POST /v1/update/nccl` body. */
export interface NcclUpdate {
  /** The tensors, in the order they are packed and broadcast. */
  readonly tensors: readonly TableTensor[];
  /** Bucket capacity asked for (raised to the largest tensor; see the module doc). */
  readonly bucketBytes: number;
  /** The trainer's rank, root of every broadcast (default 0). */
  readonly srcRank: number;
  /** Restore every kernel tensor if the update fails. */
  readonly atomic: boolean;
  /** Unknown names are errors. */
  readonly strict: boolean;
  /** Modules not covered keep their weights. */
  readonly partial: boolean;
  /** The caller's tag for the new version. */
  readonly tag?: string;
}

const BASE64_128 = /^[A-Za-z0-9+/]{171}=$/;

/** Checks a `POST /v1/update/nccl/init` body; throws ServerError `BAD_NCCL_INIT` (400). */
export function parseNcclInit(body: unknown): NcclInit {
  const where = "nccl init";
  const b = checkFields<{ unique_id: string; world_size: number; rank_offset: number }>(body, {
    unique_id: { type: "string", required: true },
    world_size: { type: "integer", required: true },
    rank_offset: { type: "integer", required: true },
  }, where);
  if (!BASE64_128.test(b.unique_id)) {
    throw serverError(
      "BAD_NCCL_INIT",
      `${where}: unique_id is the base64 of ${NCCL_UNIQUE_ID_BYTES} bytes (172 characters), got ${
        quoteName(b.unique_id, 24)
      }`,
    );
  }
  // One rank of this server: at least the trainer's besides it.
  if (b.world_size < 2 || b.world_size > 65536) {
    throw serverError(
      "BAD_NCCL_INIT",
      `${where}: world_size must be 2 to 65536, got ${b.world_size}`,
    );
  }
  if (b.rank_offset < 0 || b.rank_offset >= b.world_size) {
    throw serverError(
      "BAD_NCCL_INIT",
      `${where}: rank_offset ${b.rank_offset} is not a rank of ${b.world_size}`,
    );
  }
  return {
    uniqueId: Uint8Array.from(atob(b.unique_id), (c) => c.charCodeAt(0)),
    worldSize: b.world_size,
    rankOffset: b.rank_offset,
  };
}

function bad(message: string): never {
  throw serverError("BAD_NCCL_TABLE", message);
}

/** Checks a `POST /v1/update/nccl` body (see the module doc); throws ServerError 400. */
export function parseNcclUpdate(body: unknown): NcclUpdate {
  const where = "nccl update";
  const b = checkFields<{
    tensors: unknown[];
    bucket_bytes: number;
    src_rank?: number;
    atomic?: boolean;
    strict?: boolean;
    partial?: boolean;
    tag?: string;
  }>(body, {
    tensors: { type: "array", required: true },
    bucket_bytes: { type: "integer", required: true },
    src_rank: { type: "integer" },
    atomic: { type: "boolean" },
    strict: { type: "boolean" },
    partial: { type: "boolean" },
    tag: { type: "string", nullable: true },
  }, where);
  if (b.bucket_bytes <= 0) bad(`${where}: bucket_bytes must be positive, got ${b.bucket_bytes}`);
  const srcRank = b.src_rank ?? 0;
  if (srcRank < 0) bad(`${where}: src_rank must be a rank, got ${srcRank}`);
  const names = new Set<string>();
  const tensors = b.tensors.map((raw, i) => {
    const at = `${where}: tensors[${i}]`;
    const x = checkFields<{ name: string; dtype: string; shape: unknown[] }>(raw, {
      name: { type: "string", required: true },
      dtype: { type: "string", required: true },
      shape: { type: "array", required: true },
    }, at);
    return checkTableTensor(x, `${at} (${quoteName(x.name)})`, names, bad);
  });
  return {
    tensors,
    bucketBytes: b.bucket_bytes,
    srcRank,
    atomic: b.atomic ?? false,
    strict: b.strict ?? false,
    partial: b.partial ?? false,
    tag: b.tag,
  };
}

/** The buckets of an update, as the trainer packs them (see the module doc). */
export function ncclBuckets(update: NcclUpdate): BucketPlan {
  const bytes = new Map(update.tensors.map((t) => [t.name, t.bytes]));
  return planBuckets(update.tensors.map((t) => t.name), (n) => bytes.get(n)!, update.bucketBytes);
}

/** Bucket slots in device memory (see the module doc). */
const SLOTS = 3;

/**
 * Receives the buckets of `plan` from the trainer and reloads `model` from them in place (see
 * the module doc). The update was validated against the model already (`validateWeights`):
 * tensors it skips are received and not loaded. From here on every bucket is received, the
 * reload failing or not; `outOfStep` is called when that could not be done (the bucket slots
 * could not be allocated, the communicator failed): the caller then leaves the communicator.
 */
export function receiveAndReload(
  model: Module,
  backend: Backend,
  receiver: NcclReceiver,
  update: NcclUpdate,
  plan: BucketPlan,
  options: DeviceReloadOptions,
  outOfStep: () => void,
): DeviceReloadReport {
  const { buckets } = plan;
  const byName = new Map(update.tensors.map((t) => [t.name, t]));
  const descs: TableTensor[] = [], phaseOf: number[] = [], offsetOf: number[] = [];
  buckets.forEach((b, i) => {
    b.names.forEach((name, k) => {
      descs.push(byName.get(name)!);
      phaseOf.push(i);
      offsetOf.push(b.offsets[k]);
    });
  });
  const slots: Storage[] = [];
  let received = 0, allocated = false;
  const ids: number[] = [];
  const receive = (i: number) => {
    ids[i] = receiver.receive(slots[i % SLOTS].ptr, buckets[i].bytes, update.srcRank);
    received = i + 1;
  };
  try {
    for (let i = 0; i < Math.min(SLOTS, buckets.length); i++) {
      slots.push(backend.alloc(plan.bucketBytes));
    }
    allocated = true;
    const bases = descs.map((d, k) =>
      d.bytes === 0 ? 0 : slots[phaseOf[k] % SLOTS].ptr + offsetOf[k]
    );
    // Validated against the model by the caller: strictness and coverage were decided there.
    const reload = DeviceReload.begin(
      model,
      descs.map((d) => ({ name: d.name, dtype: d.dtype, shape: d.shape, origin: "nccl update" })),
      bases,
      { ...options, strict: false, partial: true },
      { phaseOf, window: 2 },
    );
    try {
      for (let i = 0; i < Math.min(2, buckets.length); i++) receive(i);
      for (let i = 0; i < buckets.length; i++) {
        receiver.waitFor(ids[i]);
        const slot = slots[i % SLOTS];
        reload.runPhase(i, (k) => {
          const d = descs[k];
          return new Tensor(d.shape, d.dtype, slot, offsetOf[k] / d.dtype.size);
        });
        // Slot (i + 2) % 3 held bucket i - 1, which the phase just queued was the last to read.
        if (i + 2 < buckets.length) receive(i + 2);
      }
      receiver.synchronize();
    } catch (e) {
      try {
        reload.abort(e);
      } catch (aborted) {
        drain(aborted);
      }
    }
    return reload.finish();
  } catch (e) {
    return drain(e);
  } finally {
    for (const s of slots) backend.free(s);
  }

  // The trainer broadcasts every bucket whatever happens here: receive the rest (bytes
  // discarded) so that the communicator stays usable, then fail with the first error.
  function drain(e: unknown): never {
    if (!allocated) outOfStep();
    else {
      try {
        while (received < buckets.length) receive(received);
        receiver.synchronize();
      } catch {
        // The first error is the one to report.
        outOfStep();
      }
    }
    throw e;
  }
}

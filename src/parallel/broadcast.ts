/**
 * Broadcast reload: a source rank reads each checkpoint-format tensor once, packs tensors into
 * buckets in its GPU memory and broadcasts each bucket over NCCL to every rank; every rank
 * feeds the tensors of each bucket it receives to its own layerwise reload (the models may be
 * tensor-parallel shards: each rank's loaders narrow the whole tensors to its shard).
 *
 * Each rank reloads through the device path (reload/device.ts): one plan for the whole layout,
 * in phases, one per bucket; when bucket i has arrived, the multi-tensor launches write every
 * layer whose tensors are in buckets i-1 and i straight from the buckets into the kept kernel
 * tensors (no scratch), and tensors of layers spread wider go through the layerwise lifecycle
 * as they arrive. With `devicePath: false`, every tensor goes through the lifecycle.
 *
 * Pipeline, with three bucket slots per rank (two without the device path): while bucket i is
 * filled on the root and broadcast (on a stream of its own per rank), every rank's reload works
 * on buckets i-2 and i-1 (its kernels on the model backend's stream). A slot is reused once
 * every rank's reload is done with its bucket and its backend has finished the work that reads
 * it. Nothing of a bucket is kept. The streams wait for each other through events; the host
 * only orders what it queues, so one JavaScript thread keeps every GPU busy.
 *
 * Validation first: every rank checks the whole checkpoint description against its model
 * before anything is read or written (as reloadWeights does).
 * @module
 */

import { CudaDevice, cudaHandle } from "../backend/cuda/device.ts";
import type { NcclComms } from "../backend/cuda/nccl.ts";
import { describingSource, type TensorInfo, type WeightSource } from "../checkpoint/source.ts";
import { LayerwiseError } from "../errors.ts";
import type { CausalLM } from "../models/causal_lm.ts";
import type { ModelReloadOptions } from "../models/load.ts";
import { validateWeights } from "../models/weights.ts";
import { DeviceReload } from "../reload/device.ts";
import { reloadLayerwise as engineReload, type ReloadReport } from "../reload/load.ts";
import type { Storage } from "../tensor/tensor.ts";
import { Tensor } from "../tensor/tensor.ts";

/** Where the root rank gets tensor bytes: a checkpoint, or tensors already on its GPU. */
export interface BroadcastSource {
  /** For messages and reports. */
  readonly description: string;
  /** Every tensor, by name, known before anything is read. */
  readonly tensors: ReadonlyMap<string, TensorInfo>;
  /** Names in read order (see WeightSource.plan). */
  plan(order?: (name: string) => number): string[];
  /**
   * Puts tensor `name`'s bytes at device address `dst` of the root's device, queued on context
   * `ctx` of `dev` (host staging is the source's business). Called once per tensor.
   */
  fill(name: string, dst: number, dev: CudaDevice, ctx: number): Promise<void>;
  /** Releases what the source holds. */
  close(): void;
}

const ALIGN = 256;

function alignUp(n: number): number {
  return Math.ceil(n / ALIGN) * ALIGN;
}

/**
 * A checkpoint (WeightSource) as a broadcast source: each tensor is read once into pinned host
 * memory on the root and copied to the device.
 */
export function checkpointBroadcastSource(source: WeightSource): BroadcastSource {
  const pinned = new Map<CudaDevice, { ptr: number; bytes: number; view: Uint8Array }>();
  return {
    description: source.description,
    tensors: source.tensors,
    plan: (order) => source.plan(order),
    async fill(name, dst, dev, ctx) {
      const info = source.tensors.get(name)!;
      let buf = pinned.get(dev);
      if (!buf || buf.bytes < info.bytes) {
        // One staging buffer: the previous copy out of it must be done before it is refilled.
        if (buf) {
          dev.sync(ctx);
          dev.hostFree(buf);
        }
        buf = dev.hostAlloc(Math.max(info.bytes, 64 << 20));
        pinned.set(dev, buf);
      }
      dev.sync(ctx);
      await source.readInto(name, buf.view.subarray(0, info.bytes));
      dev.h2d(ctx, dst, buf.ptr, info.bytes);
    },
    close() {
      for (const [dev, buf] of pinned) dev.hostFree(buf);
      pinned.clear();
    },
  };
}

/**
 * Tensors already on the root's GPU (e.g. a trainer's weights) as a broadcast source: each is
 * copied device to device into the bucket. The tensors must be contiguous.
 */
export function deviceBroadcastSource(
  tensors: Iterable<readonly [string, Tensor]>,
  description = "device tensors",
): BroadcastSource {
  const byName = new Map<string, Tensor>();
  const infos = new Map<string, TensorInfo>();
  for (const [name, t] of tensors) {
    if (!t.isContiguous || t.isMeta) {
      throw new LayerwiseError(
        "BAD_SOURCE",
        `${name}: a broadcast source tensor must be contiguous`,
      );
    }
    byName.set(name, t);
    infos.set(name, {
      name,
      dtype: t.dtype,
      shape: [...t.shape],
      bytes: t.nbytes,
      origin: description,
    });
  }
  const names = [...byName.keys()];
  return {
    description,
    tensors: infos,
    plan(order) {
      if (!order) return [...names];
      const at = new Map(names.map((n, i) => [n, i]));
      return [...names].sort((a, b) => order(a) - order(b) || at.get(a)! - at.get(b)!);
    },
    fill(name, dst, dev, ctx) {
      const t = byName.get(name)!;
      if (t.nbytes > 0) dev.check("broadcast copy", dev.symbols.lw_copy(ctx, dst, t.ptr, t.nbytes));
      return Promise.resolve();
    },
    close() {},
  };
}

/** Options of {@link broadcastReload}. */
export interface BroadcastReloadOptions extends ModelReloadOptions {
  /** The rank that reads the source (default 0). */
  root?: number;
  /** Bucket size in bytes (default 256 MiB; raised to the largest tensor). */
  bucketBytes?: number;
  /**
   * Write layers straight from the buckets with the device path's multi-tensor launches
   * (default true); false: every tensor goes through the layerwise lifecycle.
   */
  devicePath?: boolean;
}

/** What {@link broadcastReload} did. */
export interface BroadcastReloadReport {
  /** Each rank's reload report. */
  readonly ranks: readonly ReloadReport[];
  /** Checkpoint bytes broadcast (each read once on the root). */
  readonly bytes: number;
  /** Buckets broadcast. */
  readonly buckets: number;
  /** Bucket capacity used, in bytes. */
  readonly bucketBytes: number;
  /** Wall time, seconds, until every rank's reload finished and its device was idle. */
  readonly seconds: number;
  /** bytes / seconds. */
  readonly bytesPerSecond: number;
}

interface Deferred {
  promise: Promise<void>;
  resolve: () => void;
  reject: (e: unknown) => void;
}

function deferred(): Deferred {
  let resolve!: () => void, reject!: (e: unknown) => void;
  const promise = new Promise<void>((a, b) => {
    resolve = a;
    reject = b;
  });
  promise.catch(() => {}); // observed by whoever awaits it; never an unhandled rejection
  return { promise, resolve, reject };
}

/** One broadcast: tensors at aligned offsets of one device block. */
export interface Bucket {
  /** Tensor names, in read order. */
  readonly names: string[];
  /** Byte offset of each tensor in the bucket. */
  readonly offsets: number[];
  /** Bytes of the bucket up to the end of its last tensor. */
  bytes: number;
}

/** The buckets of a broadcast reload, from {@link planBuckets}. */
export interface BucketPlan {
  /** Buckets in read order. */
  readonly buckets: readonly Bucket[];
  /** Size of each bucket's device block: the bucket size asked for, or the largest tensor. */
  readonly bucketBytes: number;
  /** Bytes of all tensors. */
  readonly bytes: number;
}

/**
 * Cuts tensors `names` (read order; `bytesOf` gives their sizes) into buckets of at most
 * `bucketBytes`, each tensor at an aligned offset; a tensor larger than that makes the blocks as
 * large as it is. Pure: what broadcastReload then allocates and drives.
 */
export function planBuckets(
  names: readonly string[],
  bytesOf: (name: string) => number,
  bucketBytes: number = 256 << 20,
): BucketPlan {
  let cap = bucketBytes;
  for (const name of names) cap = Math.max(cap, alignUp(bytesOf(name)));
  const buckets: Bucket[] = [];
  let cur: Bucket = { names: [], offsets: [], bytes: 0 };
  let total = 0;
  for (const name of names) {
    const bytes = bytesOf(name);
    total += bytes;
    if (cur.names.length > 0 && alignUp(cur.bytes) + bytes > cap) {
      buckets.push(cur);
      cur = { names: [], offsets: [], bytes: 0 };
    }
    const at = alignUp(cur.bytes);
    cur.names.push(name);
    cur.offsets.push(at);
    cur.bytes = at + bytes;
  }
  if (cur.names.length > 0) buckets.push(cur);
  return { buckets, bucketBytes: cap, bytes: total };
}

/**
 * Reloads every rank's model in place from one source read once on the root and broadcast
 * over NCCL in buckets. `models[r]` must live on the CUDA device `comms.devices[r]`. Rejects
 * with the first error of any rank (each rank's reload then aborts as reloadWeights does:
 * restored with `atomic`, else marked inconsistent).
 */
export async function broadcastReload(
  models: readonly CausalLM[],
  comms: NcclComms,
  source: BroadcastSource,
  options: BroadcastReloadOptions = {},
): Promise<BroadcastReloadReport> {
  const t0 = performance.now();
  const n = comms.size;
  if (models.length !== n) {
    throw new LayerwiseError("BAD_CONFIG", `${models.length} models for ${n} NCCL ranks`);
  }
  const root = options.root ?? 0;
  if (!Number.isInteger(root) || root < 0 || root >= n) {
    throw new LayerwiseError("BAD_CONFIG", `broadcast root ${root} is not a rank of ${n}`);
  }
  for (const m of models) {
    if (m.device.kind !== "cuda") {
      throw new LayerwiseError("BAD_CONFIG", "broadcastReload needs models on CUDA backends");
    }
  }
  // Validate everything against every rank before a byte moves.
  const plans = models.map((m) =>
    validateWeights(
      m,
      describingSource(source.description, source.tensors, (o) => source.plan(o), "the broadcast"),
      options,
    )
  );
  const names = plans[0].names;
  for (let r = 1; r < n; r++) {
    if (plans[r].names.join("\n") !== names.join("\n")) {
      throw new LayerwiseError("BAD_CONFIG", `rank ${r} loads other tensors than rank 0`);
    }
  }
  const { buckets, bucketBytes: cap, bytes: total } = planBuckets(
    names,
    (name) => source.tensors.get(name)!.bytes,
    options.bucketBytes,
  );

  const handles = models.map((m, r) => {
    const h = cudaHandle(m.device);
    if (!h) throw new LayerwiseError("BAD_CONFIG", `rank ${r}: not a backend of openCudaBackend`);
    return h;
  });
  const devs = comms.devices.map((d) => CudaDevice.open(d));
  const ctxs: number[] = [];
  const storages: Storage[][] = [];
  // The device path keeps a bucket until the next one has arrived (a layer may span two).
  const device = options.devicePath ?? true;
  const nslots = device ? 3 : 2;
  // Per rank and bucket slot: "the broadcast into it arrived" (recorded on the rank's broadcast
  // stream) and "the model is done reading it" (recorded on the model's stream). The streams
  // wait for each other through these; the host never waits for a device mid-way.
  const arrived: number[][] = [], freed: number[][] = [];
  // Scratch blocks freed by one layer are taken by the next (exact sizes repeat): without the
  // reuse cache every scratch free is a cudaFree, which waits for the whole device.
  for (const h of handles) h.pool.hold();
  try {
    for (let r = 0; r < n; r++) {
      ctxs.push(devs[r].createContext());
      storages.push(Array.from({ length: nslots }, () => models[r].device.alloc(cap)));
      arrived.push(Array.from({ length: nslots }, () => devs[r].createSyncEvent()));
      freed.push(Array.from({ length: nslots }, () => devs[r].createSyncEvent()));
      for (const e of freed[r]) devs[r].record(e, handles[r].ctx);
    }
    const streams = ctxs.map((c, r) => devs[r].stream(c));
    const ready = models.map(() => buckets.map(() => deferred()));
    const consumed = models.map(() => buckets.map(() => deferred()));
    let failed: unknown;
    const failAll = (e: unknown) => {
      failed ??= e;
      for (const list of [...ready, ...consumed]) for (const d of list) d.reject(failed);
    };

    const rankStream = async function* (r: number): AsyncGenerator<[string, Tensor]> {
      for (let i = 0; i < buckets.length; i++) {
        // The broadcast of bucket i is queued; the model's stream waits for it to arrive.
        await ready[r][i].promise;
        devs[r].wait(handles[r].ctx, arrived[r][i % nslots]);
        const b = buckets[i], storage = storages[r][i % nslots];
        for (let k = 0; k < b.names.length; k++) {
          const info = source.tensors.get(b.names[k])!;
          yield [
            b.names[k],
            new Tensor(info.shape, info.dtype, storage, b.offsets[k] / info.dtype.size),
          ];
        }
        // Every tensor of the bucket was taken; its reads are queued on the model's stream.
        devs[r].record(freed[r][i % nslots], handles[r].ctx);
        consumed[r][i].resolve();
      }
    };

    // The device path: phase i when bucket i has arrived; bucket i-1 is done after it.
    const descs = names.map((name) => {
      const info = source.tensors.get(name)!;
      return { name, dtype: info.dtype, shape: info.shape };
    });
    const phaseOf: number[] = [], offsetOf: number[] = [];
    for (const [i, b] of buckets.entries()) {
      for (const o of b.offsets) {
        phaseOf.push(i);
        offsetOf.push(o);
      }
    }
    const rankDevice = async (r: number): Promise<ReloadReport> => {
      const bases = descs.map((_, k) => storages[r][phaseOf[k] % nslots].ptr + offsetOf[k]);
      const reload = DeviceReload.begin(models[r], descs, bases, options, { phaseOf, window: 2 });
      const done = (i: number) => {
        devs[r].record(freed[r][i % nslots], handles[r].ctx);
        consumed[r][i].resolve();
      };
      try {
        for (let i = 0; i < buckets.length; i++) {
          await ready[r][i].promise;
          devs[r].wait(handles[r].ctx, arrived[r][i % nslots]);
          const storage = storages[r][i % nslots];
          reload.runPhase(i, (k) => {
            return new Tensor(
              descs[k].shape,
              descs[k].dtype,
              storage,
              offsetOf[k] / descs[k].dtype.size,
            );
          });
          if (i > 0) done(i - 1);
        }
        if (buckets.length > 0) done(buckets.length - 1);
      } catch (e) {
        reload.abort(e);
      }
      return reload.finish();
    };

    const coordinator = (async () => {
      for (let i = 0; i < buckets.length; i++) {
        const slot = i % nslots;
        if (i >= nslots) await Promise.all(consumed.map((c) => c[i - nslots].promise));
        if (failed) return;
        // The slot is overwritten only after each model is done with the bucket it held (for
        // the first buckets: after the model's work before the slot was allocated).
        for (let r = 0; r < n; r++) devs[r].wait(ctxs[r], freed[r][slot]);
        const b = buckets[i];
        const rootBase = storages[root][slot].ptr;
        for (let k = 0; k < b.names.length; k++) {
          await source.fill(b.names[k], rootBase + b.offsets[k], devs[root], ctxs[root]);
        }
        comms.broadcast(
          storages.map((s, r) => ({ ptr: s[slot].ptr, stream: streams[r] })),
          b.bytes,
          root,
        );
        // Each rank's model may start on bucket i once its own copy has arrived.
        for (let r = 0; r < n; r++) {
          devs[r].record(arrived[r][slot], ctxs[r]);
          ready[r][i].resolve();
        }
      }
    })().catch(failAll);

    const reports = await Promise.all(
      models.map((m, r) =>
        (device ? rankDevice(r) : engineReload(m, rankStream(r), options)).catch((e) => {
          failAll(e);
          throw e;
        })
      ),
    ).catch(async (e) => {
      await coordinator;
      throw failed ?? e;
    });
    await coordinator;
    if (failed) throw failed;
    for (let r = 0; r < n; r++) {
      devs[r].sync(ctxs[r]);
      models[r].device.synchronize();
    }
    comms.checkAsync();
    const seconds = (performance.now() - t0) / 1000;
    return {
      ranks: reports,
      bytes: total,
      buckets: buckets.length,
      bucketBytes: cap,
      seconds,
      bytesPerSecond: seconds > 0 ? total / seconds : 0,
    };
  } finally {
    for (let r = 0; r < ctxs.length; r++) devs[r].destroyContext(ctxs[r]);
    // After a failure a model's stream may still read a bucket: its blocks go to the pool, where
    // only work on that same stream reuses them, and the release's cudaFree waits for the device.
    for (let r = 0; r < storages.length; r++) {
      for (const s of storages[r]) models[r].device.free(s);
    }
    for (let r = 0; r < arrived.length; r++) {
      for (const e of [...arrived[r], ...freed[r]]) devs[r].destroyEvent(e);
    }
    for (const h of handles) h.pool.release((p) => h.device.free(p));
  }
}

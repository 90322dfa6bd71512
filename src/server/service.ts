/**
 * The model behind the server and the updates it takes: the first load, the version counter
 * and tag, the report of the last update, one update at a time (see lock.ts), the metrics and
 * a progress line per update on stderr. Routes parse requests; this module runs them.
 * @module
 */

import type { Backend } from "../backend/backend.ts";
import type { IpcMapper } from "../backend/ipc.ts";
import type { NcclJoiner, NcclReceiver } from "../backend/nccl_receiver.ts";
import { openBackend } from "../backend/select.ts";
import { quoteName } from "../messages.ts";
import { fileSource } from "../checkpoint/source.ts";
import type { CausalLM } from "../models/causal_lm.ts";
import {
  loadModel,
  type LoadModelOptions,
  type ModelReloadOptions,
  type ModelReloadReport,
  modelReloadReport,
  reloadValidated,
  reloadWeights,
} from "../models/load.ts";
import { validateWeights } from "../models/weights.ts";
import { inconsistentLayers } from "../reload/layerwise.ts";
import type { BodyReader } from "./body.ts";
import { errorLine, serverError } from "./http_errors.ts";
import { IpcHandleCache, type IpcUpdate, reloadFromMapped, TableValidation } from "./ipc.ts";
import { type RunningUpdate, UpdateLock } from "./lock.ts";
import { ncclBuckets, type NcclInit, type NcclUpdate, receiveAndReload } from "./nccl.ts";
import { ServerMetrics } from "./metrics.ts";
import { openStreamSource } from "./stream_source.ts";

/** How IPC and NCCL updates name their source in reports and messages. */
const IPC_SOURCE = "ipc update", NCCL_SOURCE = "nccl update";

/** A checkpoint-format tensor the model expects: what a client needs to build an update. */
export interface ExpectedTensor {
  /** Checkpoint name. */
  readonly name: string;
  /** safetensors dtype name (`BF16`...). */
  readonly dtype: string;
  /** Sizes of each dimension. */
  readonly shape: readonly number[];
}

/** Options every update shares. */
export interface UpdateOptions {
  /** Restore every kernel tensor bit-exactly if the update fails. */
  atomic?: boolean;
  /** Tensors the model does not have are errors. */
  strict?: boolean;
  /** Modules the update does not cover keep their weights. */
  partial?: boolean;
  /** The caller's tag of the version the update makes. */
  tag?: string;
}

/** What an update did, as answered and kept for `GET /v1/model`. */
export interface UpdateSummary {
  /** The update's id. */
  readonly id: string;
  /** `disk`, `stream`, `ipc` or `nccl`. */
  readonly path: string;
  /** The model version after it. */
  readonly version: number;
  /** The caller's tag, or null. */
  readonly tag: string | null;
  /** Where the weights came from (a path, `request body`, `ipc update`). */
  readonly source: string;
  /** Wall time from request to reply, in seconds. */
  readonly seconds: number;
  /** Checkpoint bytes loaded. */
  readonly bytes: number;
  /** Checkpoint tensors loaded. */
  readonly tensors: number;
  /** Weight modules written. */
  readonly layersProcessed: number;
  /** Every kernel tensor kept its storage and address. */
  readonly storageKept: boolean;
  /** Most model-format scratch held at once by layers waiting for tensors. */
  readonly peakScratchBytes: number;
  /** Tensors the model does not have (ignored unless strict). */
  readonly unexpected: readonly string[];
  /** Model tensors not covered (partial updates). */
  readonly missing: readonly string[];
}

/** How the service runs. */
export interface ServiceOptions {
  /** Scan incoming weights for NaN/Inf (default true). */
  rejectNonFinite?: boolean;
  /**
   * Bound on model-format scratch held by layers waiting for tensors (see ReloadOptions);
   * default two decoder layers' checkpoint bytes, at least 64 MiB. A body so far out of layer
   * order that it needs more fails with ReloadError `BUFFER_LIMIT` (422).
   */
  maxBufferedBytes?: number;
  /** Largest row chunk read at once (default READ_CHUNK_BYTES). */
  readChunkBytes?: number;
  /** Where progress lines go (default: nowhere). */
  log?: (line: string) => void;
  /** Maps CUDA IPC handles on the model's backend; without it IPC updates answer 400. */
  ipcMapper?: (model: CausalLM) => IpcMapper | undefined;
  /**
   * IPC handles stay open while one of the last this many updates sent them (default 2); older
   * ones are closed, so a trainer's freed buckets are not kept alive by the server.
   */
  ipcKeepUpdates?: number;
  /** Joins NCCL communicators on the model's backend; without it NCCL updates answer 400. */
  ncclJoiner?: (model: CausalLM) => NcclJoiner | undefined;
}

/** The server's side of the NCCL communicator, as `GET /v1/model` shows it. */
export interface NcclState {
  /** The server's rank. */
  readonly rank: number;
  /** Ranks in the communicator. */
  readonly worldSize: number;
}

/** The service; see the module doc. */
export class WeightService {
  /** One update at a time. */
  readonly lock: UpdateLock = new UpdateLock();
  /** The Prometheus metrics. */
  readonly metrics: ServerMetrics = new ServerMetrics();
  /** Aborted when the server stops and a running update must give up. */
  readonly abort: AbortController = new AbortController();
  #model: CausalLM | null = null;
  #loadError: string | null = null;
  #expected: ExpectedTensor[] = [];
  #version = 0;
  #tag: string | null = null;
  #last: UpdateSummary | null = null;
  #ipc: IpcHandleCache | null = null;
  #mapper: IpcMapper | undefined;
  #joiner: NcclJoiner | undefined;
  #receiver: NcclReceiver | null = null;
  #maxBufferedBytes: number | undefined;
  readonly #tables = new TableValidation();
  readonly #options: ServiceOptions;

  /** A service with no model yet (see {@link WeightService.load}). */
  constructor(options: ServiceOptions = {}) {
    this.#options = options;
  }

  /** The model once loaded. */
  get model(): CausalLM | null {
    return this.#model;
  }

  /** The first load's error line, if it failed. */
  get loadError(): string | null {
    return this.#loadError;
  }

  /** Successful updates so far. */
  get version(): number {
    return this.#version;
  }

  /** The tag of the current version, or null. */
  get tag(): string | null {
    return this.#tag;
  }

  /** The last successful update. */
  get lastUpdate(): UpdateSummary | null {
    return this.#last;
  }

  /** The checkpoint-format tensors the model takes. */
  get expected(): readonly ExpectedTensor[] {
    return this.#expected;
  }

  /** Whether IPC updates can be taken (a mapper exists for the model's backend). */
  get ipcAvailable(): boolean {
    return this.#mapper !== undefined;
  }

  /** Whether NCCL updates can be taken (a joiner exists for the model's backend). */
  get ncclAvailable(): boolean {
    return this.#joiner !== undefined;
  }

  /** The communicator joined, or null. */
  get nccl(): NcclState | null {
    const r = this.#receiver;
    return r === null ? null : { rank: r.rank, worldSize: r.worldSize };
  }

  /** Table validations run so far (an IPC or NCCL table of the last success's layout reuses it). */
  get tableValidations(): number {
    return this.#tables.runs;
  }

  /** IPC handles open now. */
  get ipcHandlesOpen(): number {
    return this.#ipc?.size ?? 0;
  }

  /**
   * The first load from `dir`; records the checkpoint tensors the model took (names, dtypes,
   * shapes) as what later updates must send. A failure is kept (`loadError`) and thrown.
   */
  async load(dir: string, options: LoadModelOptions): Promise<CausalLM> {
    // Opened here (unless given) so that a failed load does not leave it open.
    let owned: Backend | null = null;
    try {
      const backend = typeof options.backend === "object"
        ? options.backend
        : (owned = await openBackend({ backend: options.backend }));
      const model = await loadModel(dir, { ...options, backend });
      const source = await fileSource(dir);
      let layerBytes = 0;
      try {
        const plan = validateWeights(model, source);
        this.#expected = plan.names.map((n) => {
          const t = source.tensors.get(n)!;
          if (n.startsWith("model.layers.0.")) layerBytes += t.bytes;
          return { name: n, dtype: t.dtype.safetensors, shape: [...t.shape] };
        });
      } finally {
        source.close();
      }
      // Model-format scratch of layers that wait for more tensors is what a body out of layer
      // order costs; it is bounded (default: two decoder layers' checkpoint bytes, at least
      // 64 MiB) so that no order can make an update hold a copy of the model.
      this.#maxBufferedBytes = this.#options.maxBufferedBytes ??
        Math.max(64 * 1024 ** 2, 2 * layerBytes);
      this.#mapper = this.#options.ipcMapper?.(model);
      if (this.#mapper) {
        this.#ipc = new IpcHandleCache(this.#mapper, this.#options.ipcKeepUpdates);
      }
      this.#joiner = this.#options.ncclJoiner?.(model);
      this.#model = model;
      return model;
    } catch (e) {
      this.#loadError = errorLine(e);
      owned?.close();
      throw e;
    }
  }

  /** The model, or ServerError `NOT_READY` / `LOAD_FAILED` (503). */
  requireModel(): CausalLM {
    if (this.#model !== null) return this.#model;
    if (this.#loadError !== null) {
      throw serverError("LOAD_FAILED", `the first load failed: ${this.#loadError}`);
    }
    throw serverError("NOT_READY", "the model is still loading");
  }

  /** Layers holding weights of a failed non-atomic update (empty when consistent). */
  inconsistentLayers(): string[] {
    return this.#model === null ? [] : inconsistentLayers(this.#model);
  }

  #reloadOptions(o: UpdateOptions): ModelReloadOptions {
    return {
      atomic: o.atomic ?? false,
      strict: o.strict ?? false,
      partial: o.partial ?? false,
      rejectNonFinite: this.#options.rejectNonFinite ?? true,
      maxBufferedBytes: this.#maxBufferedBytes,
      readChunkBytes: this.#options.readChunkBytes,
    };
  }

  /**
   * Runs one update under the lock (409 while another runs): raises the version on success,
   * records metrics, writes the progress line. `run` gets the model.
   */
  async #update(
    path: string,
    o: UpdateOptions,
    run: (model: CausalLM, held: RunningUpdate) => Promise<ModelReloadReport>,
  ): Promise<UpdateSummary> {
    const model = this.requireModel();
    const held = this.lock.acquire(path);
    const t0 = performance.now();
    this.metrics.begin();
    try {
      const r = await run(model, held);
      const seconds = (performance.now() - t0) / 1000;
      this.#version++;
      this.#tag = o.tag ?? null;
      const summary: UpdateSummary = {
        id: held.id,
        path,
        version: this.#version,
        tag: this.#tag,
        source: r.source,
        seconds,
        bytes: r.bytesLoaded,
        tensors: r.tensorsLoaded,
        layersProcessed: r.layersProcessed,
        storageKept: r.storageKept,
        peakScratchBytes: r.peakBufferedBytes,
        unexpected: r.unexpected,
        missing: r.missing,
      };
      this.#last = summary;
      this.metrics.end(
        path,
        true,
        seconds,
        r.bytesLoaded,
        this.#version,
        r.inconsistentLayers.length,
      );
      this.#options.log?.(
        `update ${held.id} ${path}: ${(r.bytesLoaded / 1e9).toFixed(3)} GB in ${
          seconds.toFixed(3)
        } s (${
          (seconds > 0 ? r.bytesLoaded / seconds / 1e9 : 0).toFixed(2)
        } GB/s), version ${this.#version}${
          this.#tag === null ? "" : ` tag ${quoteName(this.#tag)}`
        }`,
      );
      return summary;
    } catch (e) {
      const seconds = (performance.now() - t0) / 1000;
      this.metrics.end(path, false, seconds, 0, this.#version, this.inconsistentLayers().length);
      this.#options.log?.(
        `update ${held.id} ${path} failed after ${seconds.toFixed(3)} s: ${errorLine(e, 300)}`,
      );
      throw e;
    } finally {
      this.lock.release(held);
    }
  }

  /** A reload from a file or directory (already resolved inside the allowed roots). */
  updateFromDisk(path: string, o: UpdateOptions): Promise<UpdateSummary> {
    return this.#update("disk", o, (model) => reloadWeights(model, path, this.#reloadOptions(o)));
  }

  /**
   * A reload from a safetensors body: header first (validated against the model before any
   * write), then tensors as their bytes arrive. `maxBytes` bounds the body.
   */
  updateFromStream(
    body: BodyReader,
    o: UpdateOptions & { maxBytes: number; contentLength?: number },
  ): Promise<UpdateSummary> {
    return this.#update("stream", o, async (model) => {
      try {
        const source = await openStreamSource(body, {
          maxBytes: o.maxBytes,
          contentLength: o.contentLength,
        });
        const options = this.#reloadOptions(o);
        const plan = validateWeights(model, source, options);
        source.willRead(plan.names);
        if (plan.names.length === 0) await source.finish();
        // The body is no file: never let the staged path look for one under its description.
        return await reloadValidated(model, source, plan, { ...options, staging: false });
      } finally {
        body.cancel();
      }
    });
  }

  /**
   * A reload from the trainer's device memory through CUDA IPC: the table is checked against
   * the model before any handle is opened; the answer comes once the buckets are no longer
   * read.
   */
  updateFromIpc(update: IpcUpdate): Promise<UpdateSummary> {
    const mapper = this.#mapper;
    const cache = this.#ipc;
    if (mapper === undefined || cache === null) {
      const backend = this.#model?.device.kind ?? "unknown";
      return Promise.reject(
        serverError(
          "IPC_UNAVAILABLE",
          `CUDA IPC updates need the cuda backend on the trainer's GPU; this server runs on ${backend}`,
        ),
      );
    }
    return this.#update("ipc", update, async (model) => {
      const plan = this.#tables.validate(model, update, IPC_SOURCE);
      const addresses = update.buckets.map((b, i) => {
        let m;
        try {
          m = cache.map(b.handle);
        } catch (e) {
          throw serverError(
            "IPC_OPEN_FAILED",
            `ipc update: bucket ${i}: the handle could not be opened on this GPU (${
              errorLine(e, 300)
            })`,
            422,
          );
        }
        if (b.bytes > m.bytes) {
          throw serverError(
            "IPC_BUCKET_TOO_LARGE",
            `ipc update: bucket ${i} claims ${b.bytes} bytes, its allocation has ${m.bytes} from the mapped address`,
            422,
          );
        }
        return m.address;
      });
      const opts = this.#reloadOptions(update);
      try {
        const r = await reloadFromMapped(model, update, addresses, plan.names, opts);
        return modelReloadReport(r, IPC_SOURCE, plan, r.seconds);
      } finally {
        // The reply promises the trainer that its buckets are no longer read.
        mapper.synchronize();
        if (update.release) cache.release(update.buckets.map((b) => b.handle));
        cache.endUpdate();
      }
    });
  }

  #requireJoiner(): NcclJoiner {
    if (this.#joiner !== undefined) return this.#joiner;
    const backend = this.#model?.device.kind ?? "unknown";
    throw serverError(
      "NCCL_UNSUPPORTED",
      `NCCL updates need the cuda backend; this server runs on ${backend}`,
    );
  }

  /**
   * Joins the trainer's communicator (leaving the one joined before, if any); resolves once
   * every rank has joined. Refused (409) while an update runs.
   */
  async initNccl(init: NcclInit): Promise<NcclState> {
    this.requireModel();
    const joiner = this.#requireJoiner();
    const held = this.lock.acquire("nccl-init");
    try {
      this.closeNccl();
      try {
        this.#receiver = await joiner.join(init.uniqueId, init.worldSize, init.rankOffset);
      } catch (e) {
        throw serverError(
          "NCCL_INIT_FAILED",
          `nccl init: rank ${init.rankOffset} of ${init.worldSize} could not join (${
            errorLine(e, 300)
          })`,
        );
      }
      this.#options.log?.(
        `nccl: joined as rank ${init.rankOffset} of ${init.worldSize}`,
      );
      return this.nccl!;
    } finally {
      this.lock.release(held);
    }
  }

  /** Leaves the communicator; returns whether one was joined. */
  closeNccl(): boolean {
    const r = this.#receiver;
    if (r === null) return false;
    this.#receiver = null;
    r.close();
    return true;
  }

  /**
   * A reload from the trainer's NCCL broadcasts: the tensor list is checked against the model
   * before the first receive (see nccl.ts). A refused update receives nothing and leaves the
   * communicator (the trainer, whose broadcasts were queued, aborts its side and joins again).
   */
  updateFromNccl(update: NcclUpdate): Promise<UpdateSummary> {
    try {
      this.#requireJoiner();
    } catch (e) {
      return Promise.reject(e);
    }
    return this.#update("nccl", update, (model) => {
      const receiver = this.#receiver;
      if (receiver === null) {
        throw serverError(
          "NO_COMMUNICATOR",
          "nccl update: no communicator: POST /v1/update/nccl/init first",
        );
      }
      let started = false;
      try {
        if (update.srcRank >= receiver.worldSize || update.srcRank === receiver.rank) {
          throw serverError(
            "BAD_NCCL_TABLE",
            `nccl update: src_rank ${update.srcRank} is not the trainer's rank (the server is rank ${receiver.rank} of ${receiver.worldSize})`,
          );
        }
        const plan = this.#tables.validate(model, update, NCCL_SOURCE);
        const buckets = ncclBuckets(update);
        started = true;
        const r = receiveAndReload(
          model,
          model.device,
          receiver,
          update,
          buckets,
          this.#reloadOptions(update),
          () => this.closeNccl(),
        );
        return Promise.resolve(modelReloadReport(r, NCCL_SOURCE, plan, r.seconds));
      } catch (e) {
        // Refused before any receive: the trainer's queued broadcasts will never be matched.
        if (!started) this.closeNccl();
        throw e;
      }
    });
  }

  /** Closes cached IPC handles (the given ones, or all); returns how many were open. */
  releaseIpc(handles?: readonly string[]): number {
    return this.#ipc?.release(handles) ?? 0;
  }

  /** Closes IPC handles, the communicator and the model's backend. */
  close(): void {
    try {
      this.#ipc?.release();
      this.closeNccl();
    } finally {
      this.#model?.device.close();
      this.#model = null;
    }
  }
}

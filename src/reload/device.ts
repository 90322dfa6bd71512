/**
 * Reloads from tensors already in backend memory (a trainer's parameters shared by CUDA IPC,
 * NCCL buckets, a checkpoint staged on the device; on WebAssembly, offsets in the module's
 * memory): {@link reloadFromDevice}. The tensors are read in place: no host copy, no staging,
 * no model-format scratch. A plan (device_plan.ts), made once per model and source layout and
 * kept for later reloads of the same layout, drives a few multi-tensor launches over the whole
 * model: the absmax of every per-tensor fp8 weight over all its shards, then one quantize per
 * scheme writing each shard into its rows of the kept kernel tensor, then the copies. The host
 * waits once, at the end. Validation, the atomic contract, the numerics and the report are those
 * of reloadWeights; layers the plan does not cover go through the same lifecycle as any load.
 *
 * @example Reload a model from tensors in its backend's memory
 * ```ts
 * import { loadModel, reloadFromDevice } from "@layerwise/reload";
 * import { DTYPES } from "@layerwise/reload/engine";
 * import { synthTensors, writeSynthCheckpoint } from "@layerwise/reload/testing";
 *
 * const shape = { hiddenSize: 128, intermediateSize: 256, numLayers: 1, numHeads: 2,
 *   numKvHeads: 1, vocabSize: 256, tieWordEmbeddings: true };
 * const dir = await Deno.makeTempDir();
 * await writeSynthCheckpoint(dir, shape, synthTensors(shape, 1));
 * const model = await loadModel(dir, { quant: "fp8", backend: "wasm" });
 * const b = model.device;
 * // New weights, already on the device (here: uploaded; a trainer would hand pointers).
 * const views = [...synthTensors(shape, 2)].map(([name, host]) => {
 *   const t = b.empty(host.shape, DTYPES.bf16);
 *   b.upload(t, host.data);
 *   return { name, tensor: t };
 * });
 * const report = await reloadFromDevice(model, views, { atomic: true });
 * console.log(report.layersProcessed, report.storageKept, report.plan.reused);
 * b.close();
 * ```
 * @module
 */

import type { Backend, MultiTensorLaunch } from "../backend/backend.ts";
import { CheckpointError, LayerwiseError, ReloadError } from "../errors.ts";
import { firstOf, quoteName } from "../messages.ts";
import type { Module } from "../nn/module.ts";
import type { TensorSlot } from "../nn/slots.ts";
import { type DType, dtypeOf, DTYPES } from "../tensor/dtype.ts";
import { type Storage, Tensor } from "../tensor/tensor.ts";
import { type DevicePlan, layoutKey, planDeviceReload, type PlannedLaunch } from "./device_plan.ts";
import {
  assertIdle,
  failReload,
  finalizeLayerwiseReload,
  getLayerwiseInfo,
  incomingScannedByCaller,
  initializeLayerwiseReload,
  rejectNonFiniteEach,
  rejectNonFiniteKernel,
  type ReloadOptions,
  writeLayersInPlace,
} from "./layerwise.ts";
import type { ReloadReport } from "./load.ts";
import type { TensorMeta } from "./meta.ts";
import { type TensorDescriptor, validateTensors, type ValidationReport } from "./validate.ts";

/** Magnitude bits of infinity in each dtype a `scan` launch reads (ARCHITECTURE.md, "Device source"). */
const INF_BITS: ReadonlyMap<DType, number> = new Map([
  [DTYPES.f32, 0x7f800000],
  [DTYPES.f16, 0x7c00],
  [DTYPES.bf16, 0x7f80],
]);

/**
 * A checkpoint-format tensor in backend memory: a backend tensor (contiguous, on the model's
 * backend), or a raw address with dtype and shape (a CUDA device pointer, e.g. inside an IPC or
 * NCCL bucket; a WebAssembly memory offset). The memory stays the caller's: it is only read,
 * and only during the call. On CUDA it must hold its final bytes when the call begins (work that
 * writes it on other streams or processes is complete); the reload's kernels run on the model
 * backend's stream.
 */
export type DeviceTensorView =
  | { readonly name: string; readonly tensor: Tensor }
  | {
    readonly name: string;
    readonly dtype: DType | string;
    readonly shape: readonly number[];
    readonly ptr: number;
  };

/** Options of {@link reloadFromDevice}: those of reloadWeights. */
export interface DeviceReloadOptions extends ReloadOptions {
  /** Names the model does not have are errors (default false: skipped and reported). */
  strict?: boolean;
  /**
   * Accept views that cover only some layers (default false: a model tensor no view covers is
   * a CheckpointError before anything is written). Layers covered in part are errors either way.
   */
  partial?: boolean;
}

/** What the plan did in a device reload. */
export interface DevicePlanReport {
  /** True when the plan of an earlier reload with the same layout was used. */
  readonly reused: boolean;
  /** Layers written by the multi-tensor launches. */
  readonly layers: number;
  /** Source tensors loaded through the host lifecycle instead (layers the plan leaves). */
  readonly hostLoads: number;
  /** Kernel launches queued by the plan. */
  readonly launches: number;
  /** Bytes of the plan's tables in backend memory. */
  readonly tableBytes: number;
}

/** The report of {@link reloadFromDevice}: reloadWeights' report plus the plan's. */
export interface DeviceReloadReport extends ReloadReport {
  /** The plan's part. */
  readonly plan: DevicePlanReport;
  /** Model tensors no view covered (with `partial`): they kept their weights. */
  readonly missing: readonly string[];
  /** Names the model does not have (skipped). */
  readonly unexpected: readonly string[];
}

interface CachedPlan {
  readonly plan: DevicePlan;
  readonly backend: Backend;
  readonly table: Tensor;
  /** Validation of this layout against the model (a pure function of both: kept with the plan). */
  readonly validation: ValidationReport;
  /** Per source tensor: skipped (unknown or skipped by the model), or loaded. */
  readonly skipped: readonly boolean[];
  /** The layout (names, dtypes, shapes) and the arrival it was made for. */
  readonly layout: string;
  /** See {@link CachedPlan.layout}. */
  readonly arrival: string;
  /** The phase of each source tensor (empty: all in phase 0). */
  readonly phaseOf: readonly number[];
  /** The model-format dtype each source tensor is loaded as (for rejectNonFinite). */
  readonly modelDtype: readonly (DType | undefined)[];
  /** The layers the plan's launches write (every phase's). */
  readonly inPlace: ReadonlySet<Module>;
}

const PLANS = new WeakMap<Module, CachedPlan>();

/** Frees the cached device plan of `model` (its tables in backend memory), if any. */
export function releaseDevicePlan(model: Module): void {
  const c = PLANS.get(model);
  if (!c) return;
  PLANS.delete(model);
  if (!c.table.storage!.freed) c.backend.free(c.table.storage!);
}

/** Checks the views and makes backend tensors of them (borrowed storage for raw addresses). */
function viewTensors(backend: Backend, views: readonly DeviceTensorView[]): {
  tensors: Tensor[];
  descs: TensorDescriptor[];
  borrowed: Storage[];
} {
  const tensors: Tensor[] = [], descs: TensorDescriptor[] = [], borrowed: Storage[] = [];
  const names = new Set<string>();
  try {
    for (const v of views) {
      if (typeof v?.name !== "string") {
        throw new CheckpointError("BAD_VIEW", "device view: every view needs a string name");
      }
      // Built only for a message: a table of hundreds of views would pay it on every reload.
      const where = () => `device view ${quoteName(v.name)}`;
      if (names.has(v.name)) {
        throw new CheckpointError("DUPLICATE", `${where()}: the name is given twice`);
      }
      names.add(v.name);
      let t: Tensor;
      if ("tensor" in v) {
        t = v.tensor;
        if (!(t instanceof Tensor) || t.isMeta || t.window || t.storage!.backend !== backend) {
          throw new CheckpointError(
            "BAD_VIEW",
            `${where()}: the tensor must be a whole tensor in the model's backend memory`,
          );
        }
        if (!t.isContiguous) {
          throw new CheckpointError("BAD_VIEW", `${where()}: ${t} must be contiguous`);
        }
      } else {
        const dtype = typeof v.dtype === "string" ? dtypeOf(v.dtype) : v.dtype;
        if (!dtype) {
          throw new CheckpointError(
            "BAD_DTYPE",
            `${where()}: unknown dtype ${quoteName(String(v.dtype))}`,
          );
        }
        if (
          !Array.isArray(v.shape) ||
          v.shape.some((d) => !Number.isSafeInteger(d) || d < 0)
        ) {
          throw new CheckpointError(
            "BAD_SHAPE",
            `${where()}: the shape must be non-negative integers`,
          );
        }
        const meta = Tensor.meta(v.shape, dtype);
        if (!Number.isSafeInteger(v.ptr) || v.ptr <= 0) {
          throw new CheckpointError(
            "BAD_VIEW",
            `${where()}: the address must be a positive integer`,
          );
        }
        let s: Storage;
        try {
          s = backend.borrow(v.ptr, meta.nbytes);
        } catch (e) {
          const m = e instanceof Error ? e.message : String(e);
          throw new CheckpointError("BAD_VIEW", `${where()}: ${m}`);
        }
        borrowed.push(s);
        t = new Tensor(v.shape, dtype, s);
      }
      tensors.push(t);
      descs.push({ name: v.name, dtype: t.dtype, shape: t.shape, origin: "device" });
    }
  } catch (e) {
    for (const s of borrowed) backend.free(s);
    throw e;
  }
  return { tensors, descs, borrowed };
}

/**
 * The cached plan for this layout (and kernel addresses), or a new one; validation of the
 * layout against the model comes with it (done again only for a new layout).
 */
function planFor(
  model: Module,
  backend: Backend,
  descs: readonly TensorDescriptor[],
  arrival: { phaseOf?: readonly number[]; window?: number },
): [CachedPlan, boolean] {
  const c = PLANS.get(model);
  const layout = layoutKey(descs);
  if (
    c && c.backend === backend && c.layout === layout &&
    c.arrival === arrivalKey(arrival) && !c.table.storage!.freed &&
    c.plan.kept.every((k) => !k.tensor.storage!.freed && k.tensor.ptr === k.ptr)
  ) {
    return [c, true];
  }
  const validation = validateTensors(model, descs, { strict: false });
  const unknown = new Set(validation.unknown);
  const skipped = descs.map((d) => unknown.has(d.name) || model.resolveWeight(d.name) === null);
  releaseDevicePlan(model);
  const plan = planDeviceReload(model, descs, { ...arrival, skip: skipped });
  // The model-format tensor behind each slot (tied names resolve to their owner's).
  const owners = new Map<TensorSlot, TensorMeta>();
  for (const [, m] of model.namedModules()) {
    for (const t of getLayerwiseInfo(m)?.restoreMetadata?.values() ?? []) owners.set(t.slot, t);
  }
  const table = backend.empty([plan.table.byteLength], DTYPES.u8);
  try {
    backend.upload(table, plan.table);
  } catch (e) {
    backend.free(table.storage!);
    throw e;
  }
  const fresh: CachedPlan = {
    plan,
    backend,
    table,
    validation,
    skipped,
    layout,
    arrival: arrivalKey(arrival),
    phaseOf: arrival.phaseOf ?? [],
    inPlace: new Set(plan.phases.flatMap((p) => p.layers)),
    modelDtype: descs.map((d, i) => {
      if (skipped[i]) return undefined;
      const r = model.resolveWeight(d.name)!;
      return owners.get(r.slot)?.meta.dtype;
    }),
  };
  PLANS.set(model, fresh);
  return [fresh, false];
}

function arrivalKey(a: { phaseOf?: readonly number[]; window?: number }): string {
  return `${a.phaseOf?.join(",") ?? ""}|${a.window ?? ""}`;
}

/** How the sources of a {@link DeviceReload} arrive (see PlanArrival). */
export interface DeviceArrival {
  /** The phase in which each source tensor arrives (default: all in phase 0). */
  readonly phaseOf?: readonly number[];
  /** How many consecutive phases stay resident (default: all). */
  readonly window?: number;
}

/**
 * One device reload in progress. {@link DeviceReload.begin} validates the layout against the
 * model (kept with the cached plan), plans (or reuses the plan), writes the source addresses and
 * starts the lifecycle; {@link DeviceReload.runPhase} writes the layers whose sources have all
 * arrived once a phase's sources are resident (reloadFromDevice has one phase; a broadcast one
 * per bucket); {@link DeviceReload.finish} waits for the device and ends the reload. Any error
 * aborts it as reloadWeights does (restored with `atomic`, else marked inconsistent).
 */
export class DeviceReload {
  readonly #model: Module;
  readonly #backend: Backend;
  readonly #descs: readonly TensorDescriptor[];
  readonly #cached: CachedPlan;
  readonly #reused: boolean;
  readonly #options: DeviceReloadOptions;
  readonly #t0 = performance.now();
  #next = 0;
  #aborted = false;

  private constructor(
    model: Module,
    backend: Backend,
    descs: readonly TensorDescriptor[],
    cached: CachedPlan,
    reused: boolean,
    options: DeviceReloadOptions,
  ) {
    this.#model = model;
    this.#backend = backend;
    this.#descs = descs;
    this.#cached = cached;
    this.#reused = reused;
    this.#options = options;
  }

  /**
   * Starts a reload of `model` from sources `descs` at device addresses `bases` (0 for an empty
   * tensor), arriving as `arrival` says. Throws before anything is written when the layout does
   * not fit the model.
   */
  static begin(
    model: Module,
    descs: readonly TensorDescriptor[],
    bases: readonly number[],
    options: DeviceReloadOptions = {},
    arrival: DeviceArrival = {},
  ): DeviceReload {
    assertIdle(model, "reloadFromDevice");
    const backend = firstBackend(model);
    const [cached, reused] = planFor(model, backend, descs, arrival);
    checkCoverage(cached.validation, options);
    const { plan, table } = cached;
    // Bases are the one per-reload input of the plan.
    const bytes = new Uint8Array(plan.sources * 8);
    const dv = new DataView(bytes.buffer);
    bases.forEach((p, i) => dv.setBigUint64(i * 8, BigInt(p), true));
    if (bytes.byteLength > 0) {
      backend.upload(
        new Tensor([bytes.byteLength], table.dtype, table.storage, plan.offsets.bases),
        bytes,
      );
    }
    initializeLayerwiseReload(model, options, cached.inPlace);
    // runPhase scans each phase's sources whole, the ones it loads through the lifecycle too.
    incomingScannedByCaller(model);
    return new DeviceReload(model, backend, descs, cached, reused, options);
  }

  /** Phases of the plan. */
  get phases(): number {
    return this.#cached.plan.phases.length;
  }

  /**
   * Phase `p`'s sources are resident (and those of the `window - 1` phases before it): scans
   * them with `rejectNonFinite`, queues the launches of the layers it completes, and loads the
   * tensors the plan leaves through the lifecycle. `tensorAt(i)` is source i as a backend
   * tensor (asked only for this phase's sources). Phases run in order.
   */
  runPhase(p: number, tensorAt: (i: number) => Tensor): void {
    const model = this.#model, b = this.#backend;
    try {
      if (this.#aborted) {
        throw new ReloadError("NOT_RELOADING", "device reload: it was aborted");
      }
      if (p !== this.#next) {
        throw new ReloadError(
          "BAD_PHASE",
          `device reload: phase ${p} given, ${this.#next} expected`,
        );
      }
      this.#next++;
      const phase = this.#cached.plan.phases[p];
      const scanned = this.#options.rejectNonFinite ? this.#rejectNonFinite(p, tensorAt) : false;
      if (phase.layers.length > 0) {
        writeLayersInPlace(model, phase.layers, () => {
          for (const f of phase.fills) b.fill(f.slot.tensor, f.value);
          for (const l of phase.launches) {
            // The scan has left every item's absmax partial: only the fold is left to do.
            this.#launch(l, scanned && l.op === "absmax" ? "fold" : l.op);
          }
          if (this.#options.rejectNonFinite) {
            // What the check promises holds for what the model holds: a quantized layer is
            // checked in its kernel tensors too (an infinite scale from finite weights). Its
            // scales, that is: a multi-tensor kernel writes a NaN fp8 code only for a NaN
            // quotient, which needs a non-finite weight (refused above) or scale (checked
            // here), and int8 codes are never NaN; so reading the codes back, the bulk of
            // the kernel bytes, would add nothing (ARCHITECTURE.md, "Device source").
            rejectNonFiniteKernel(
              phase.layers.flatMap((layer, k) => {
                const { path, quantized } = phase.processed[k];
                if (!quantized) return [];
                const tensors = layer.ownSlots().map(([n, s]) => [n, s.tensor] as const)
                  .filter(([, t]) => t.dtype.size > 1);
                return [{ layer, path, tensors }];
              }),
            );
          }
        });
      }
      for (const i of phase.hostLoads) model.loadWeight(this.#descs[i].name, tensorAt(i));
    } catch (e) {
      this.abort(e);
    }
  }

  /** Queues planned launch `l` as `op`, over the plan's tables. */
  #launch(l: PlannedLaunch, op: MultiTensorLaunch["op"]): void {
    const { plan, table } = this.#cached;
    const o = plan.offsets;
    this.#backend.launchMultiTensor({
      ...l,
      op,
      table: table.storage!,
      targets: o.targets,
      pieces: o.pieces,
      items: o.items,
      bases: o.bases,
      partials: o.partials,
      counters: o.counters,
    });
  }

  /**
   * Refuses NaN and infinite source elements of phase `p` before anything is written: the
   * elements its launches read by one `scan` launch per item range (a pass that reads them and
   * writes only the partials) and one read of the partials, the sources it loads through the
   * lifecycle as any load. True when the scan left the absmax partials of every per-tensor fp8
   * target, so its `absmax` launches can be `fold`s. Sources whose dtype the scan does not read
   * (not f32, f16 or bf16) are counted whole as before. A failure names the tensor and its count,
   * from a count of the phase's sources (the rare path).
   */
  #rejectNonFinite(p: number, tensorAt: (i: number) => Tensor): boolean {
    const b = this.#backend;
    const { plan, table, skipped, phaseOf, modelDtype } = this.#cached;
    const phase = plan.phases[p];
    const incoming = (ids: readonly number[]) =>
      ids.map((i) => ({
        tensor: tensorAt(i),
        where: `device view ${quoteName(this.#descs[i].name)}`,
        as: modelDtype[i],
      }));
    const whole = () =>
      rejectNonFiniteEach(
        b,
        incoming(this.#descs.flatMap((_, i) => !skipped[i] && (phaseOf[i] ?? 0) === p ? [i] : [])),
      );
    const ranges = new Map<number, PlannedLaunch>();
    for (const l of phase.launches) {
      if (!l.srcDtype.floating) continue;
      if (INF_BITS.get(l.srcDtype) === undefined) {
        whole();
        return false;
      }
      ranges.set(l.first, l);
    }
    rejectNonFiniteEach(b, incoming(phase.hostLoads));
    if (ranges.size === 0) return false;
    let lo = Infinity, hi = 0;
    for (const l of ranges.values()) {
      this.#launch(l, "scan");
      lo = Math.min(lo, l.first);
      hi = Math.max(hi, l.first + l.count);
    }
    const bytes = b.download(
      new Tensor([(hi - lo) * 4], DTYPES.u8, table.storage!, plan.offsets.partials + 4 * lo),
    );
    const partials = new Uint32Array(bytes.buffer, bytes.byteOffset, hi - lo);
    for (const l of ranges.values()) {
      const inf = INF_BITS.get(l.srcDtype)!;
      for (let i = l.first; i < l.first + l.count; i++) {
        if (partials[i - lo] < inf) continue;
        whole();
        throw new ReloadError(
          "NON_FINITE",
          `device reload: work item ${i} of the plan reads a NaN or infinite source element (rejectNonFinite is set)`,
        );
      }
    }
    return true;
  }

  /** Waits for the device (a failed launch fails the reload here) and ends the reload. */
  finish(): DeviceReloadReport {
    const model = this.#model;
    const { plan, validation, skipped: skips } = this.#cached;
    try {
      if (this.#aborted) {
        throw new ReloadError("NOT_RELOADING", "device reload: it was aborted");
      }
      if (this.#next !== plan.phases.length) {
        throw new ReloadError(
          "BAD_PHASE",
          `device reload: finished after ${this.#next} of ${plan.phases.length} phases`,
        );
      }
      // The host waits here, once.
      this.#backend.synchronize();
    } catch (e) {
      this.abort(e);
    }
    const s = finalizeLayerwiseReload(model);
    let bytes = 0, skipped = 0;
    const loaded = new Set<string>();
    this.#descs.forEach((d, i) => {
      if (skips[i]) skipped++;
      else {
        loaded.add(d.name);
        bytes += d.shape.reduce((a, x) => a * x, 1) * d.dtype.size;
      }
    });
    return {
      ...s,
      layersProcessed: s.processed.length,
      tensorsLoaded: loaded.size,
      tensorsSkipped: skipped,
      bytesLoaded: bytes,
      seconds: (performance.now() - this.#t0) / 1000,
      inconsistent: s.inconsistentLayers.length > 0,
      validation,
      missing: validation.missing,
      unexpected: validation.unknown,
      plan: {
        reused: this.#reused,
        layers: plan.stats.layers,
        hostLoads: plan.stats.hostLoads,
        launches: plan.stats.launches,
        tableBytes: plan.table.byteLength,
      },
    };
  }

  /**
   * Aborts the reload (after an error outside it) and rethrows `e` as failReload does; once
   * aborted, rethrows `e` unchanged.
   */
  abort(e: unknown): never {
    if (this.#aborted) throw e;
    this.#aborted = true;
    failReload(this.#model, e);
  }
}

/**
 * Reloads `model` in place from checkpoint-format tensors in its backend's memory (see the
 * module doc). Everything is checked before anything is written: the views (names, dtypes,
 * shapes, addresses), the whole set against the model (as reloadWeights with `expected`), and,
 * with `rejectNonFinite`, every value. With `atomic`, a failure restores every kernel tensor
 * bit-exactly. The kernel bytes are those a reload of the same tensors from files gives, and no
 * kernel tensor moves.
 */
export function reloadFromDevice(
  model: Module,
  views: readonly DeviceTensorView[],
  options: DeviceReloadOptions = {},
): Promise<DeviceReloadReport> {
  // Synchronous inside (the host waits once, at the end); a promise for callers and for a
  // future that overlaps the wait.
  try {
    return Promise.resolve(reloadNow(model, views, options));
  } catch (e) {
    return Promise.reject(e);
  }
}

function reloadNow(
  model: Module,
  views: readonly DeviceTensorView[],
  options: DeviceReloadOptions,
): DeviceReloadReport {
  assertIdle(model, "reloadFromDevice");
  const backend = firstBackend(model);
  if (!Array.isArray(views)) {
    throw new CheckpointError("BAD_VIEW", "reloadFromDevice: views must be an array");
  }
  const { tensors, descs, borrowed } = viewTensors(backend, views);
  try {
    const r = DeviceReload.begin(
      model,
      descs,
      tensors.map((t) => t.numel === 0 ? 0 : t.ptr),
      options,
    );
    r.runPhase(0, (i) => tensors[i]);
    return r.finish();
  } finally {
    for (const s of borrowed) backend.free(s);
  }
}

function firstBackend(model: Module): Backend {
  for (const [, m] of model.namedModules()) if (m.backend) return m.backend;
  throw new LayerwiseError("NO_BACKEND", "reloadFromDevice: the model has no backend");
}

/** The strict/partial split of reloadWeights over a validation report. */
function checkCoverage(report: ValidationReport, options: DeviceReloadOptions): void {
  if (options.strict && report.unknown.length > 0) {
    throw new CheckpointError(
      "UNKNOWN_TENSOR",
      `device views: ${report.unknown.length} name(s) the model does not have: ${
        firstOf(report.unknown.map((n) => quoteName(n)), 5)
      }`,
    );
  }
  if (!options.partial && report.missing.length > 0) {
    throw new CheckpointError(
      "MISSING_TENSOR",
      `device views: ${report.missing.length} model tensor(s) not covered: ${
        firstOf(report.missing, 5)
      } (set partial to keep them)`,
    );
  }
}

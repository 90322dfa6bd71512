/**
 * The layerwise reload lifecycle (ARCHITECTURE.md, "Lifecycle"):
 * {@link recordMetadataForReloading} after building, {@link initializeLayerwiseReload} before
 * new weights arrive, loads in any order through the wrapped loaders, then
 * {@link finalizeLayerwiseReload}. At a layer's first load the layer gets its model-format
 * scratch and every load runs the original loader straight into it (fused shards land in their
 * rows as they arrive; nothing is buffered or replayed); as soon as the layer has every element
 * its quant method processes the scratch into the kept kernel tensors (whose storage never
 * moves) and the scratch is freed. Layers whose kernel format is their model format (norms,
 * embeddings, unquantized linears) need no scratch: loads go straight into the kept kernel
 * tensors. So a reload in layer order holds about one layer of extra memory.
 *
 * Beyond the reference: attention scales reload; loads that write nothing (experts of another
 * rank) start nothing; a load may carry only some rows of a checkpoint tensor (a row chunk, see
 * `rowWindow`: it counts and writes only its rows, and a layer is complete when every chunk came);
 * a duplicate load of the same shard (or the same rows) is ignored; the scratch held by
 * layers waiting for more tensors is bounded by `maxBufferedBytes` (a layer whose scratch would
 * go past it throws ReloadError `BUFFER_LIMIT`); a partially loaded layer is processed at
 * finalize only when what is missing is padding, otherwise the missing tensors are reported by
 * name (ReloadError `MISSING_WEIGHTS`); with `atomic`, a failed reload restores every kernel
 * tensor bit-exactly from host copies taken before the first write into each layer; without
 * it, the model is marked inconsistent ({@link isInconsistent}) until the layers the failed
 * reload wrote (a layer loaded straight into its kernel tensors counts as written from its
 * first load) are written again; `rejectNonFinite` scans incoming tensors (as they come and as
 * the model's dtype holds them) for NaN/Inf before anything is written, and kernel tensors after
 * processing; a second reload (or a first load) of a model while one runs is refused
 * (`RELOAD_ACTIVE`, `LOAD_ACTIVE`).
 *
 * Bookkeeping lives in WeakMaps keyed by module: it goes away with the model.
 * @module
 */

import type { Backend } from "../backend/backend.ts";
import { LayerwiseError, ReloadError, withMessage } from "../errors.ts";
import type { Module } from "../nn/module.ts";
import type { ShardId, WeightLoader } from "../nn/slots.ts";
import type { KernelDestination } from "../nn/quant_method.ts";
import { countWrites, placeholderTensor, recordWrites, TensorSlot } from "../nn/slots.ts";
import type { DType } from "../tensor/dtype.ts";
import { rowWindow, type Storage, Tensor } from "../tensor/tensor.ts";
import {
  captureLayerToMeta,
  getOriginalLoader,
  isWrapper,
  type LayerMeta,
  markWrapper,
  materializeLayer,
  restoreLayerOnMeta,
} from "./meta.ts";
import { loadLabel, RowLedger } from "./rows.ts";
import { firstOf, qualifiedName } from "../messages.ts";

/** Options of a layerwise reload. */
export interface ReloadOptions {
  /**
   * Upper bound on the model-format scratch bytes held at once by layers that received some of
   * their tensors and wait for the rest (default: no bound). The first load of a layer whose
   * scratch would exceed it throws ReloadError `BUFFER_LIMIT` naming the layer and the numbers;
   * loads in layer order need the largest layer's scratch (layers loaded straight into their
   * kernel tensors need none).
   */
  maxBufferedBytes?: number;
  /**
   * Copy each layer's kernel tensors to host memory (never device memory) right before the
   * first write into any of them, so that a failed reload restores every written layer
   * bit-exactly. Costs one device-to-host read of the kernel tensors and host memory up to the
   * model's kernel size, held until the reload ends. Default false: a failed reload then
   * leaves the written layers with new weights and marks the model inconsistent (see
   * {@link isInconsistent}).
   */
  atomic?: boolean;
  /**
   * Scan every incoming tensor on the backend (`countNonFinite`) before it is written, and
   * fail with ReloadError `NON_FINITE` naming the tensor and the count of NaN/Inf elements.
   * The check holds for what the model ends up holding: an incoming tensor of another dtype
   * than the model's is also counted after conversion to the model's dtype (finite f32 values
   * can overflow bf16 or f16), and a layer's kernel tensors are counted after its quant method
   * ran. Default false in the API (the CLI turns it on). Costs one extra read of every
   * incoming tensor on the device (about the checkpoint's size in memory bandwidth), a
   * converted temporary when the dtypes differ, one read of each quantized layer's kernel
   * tensors, and, for a non-contiguous tensor, a temporary contiguous copy.
   */
  rejectNonFinite?: boolean;
  /** Receives debug messages (ignored loads, delayed processing). */
  log?: (message: string) => void;
}

interface KernelTensor {
  readonly slot: TensorSlot;
  readonly tensor: Tensor;
}

interface KeptPointer {
  readonly slot: TensorSlot;
  readonly tensor: Tensor;
  readonly ptr: number;
}

/** State of one reload of one model. */
interface ReloadState {
  readonly maxBufferedBytes: number;
  readonly atomic: boolean;
  readonly rejectNonFinite: boolean;
  /** The caller scanned every incoming tensor already (see {@link incomingScannedByCaller}). */
  incomingScanned: boolean;
  readonly log: (message: string) => void;
  /**
   * Layers whose kernel tensors may hold new bytes but that are not processed yet (loaded
   * straight into their kernel tensors, or being processed into them), in the order they began.
   */
  readonly partial: Set<string>;
  /** Scratch bytes held by layers that began and are not processed yet. */
  bufferedBytes: number;
  peakBufferedBytes: number;
  ignoredLoads: number;
  readonly processed: string[];
  readonly delayed: string[];
  readonly untouched: string[];
  readonly kept: KeptPointer[];
  readonly backups: { path: string; backend: Backend; tensor: Tensor; bytes: Uint8Array }[];
  readonly waiting: Set<LayerInfo>;
}

/** Per-layer bookkeeping (the reference's LayerReloadingInfo). */
class LayerInfo {
  restoreMetadata: LayerMeta | null = null;
  path = "";
  state: ReloadState | null = null;
  kernelTensors: Map<string, KernelTensor> | null = null;
  /** Loads go straight into the kept kernel tensors (kernel format is model format). */
  direct = false;
  /**
   * The layer was put back in model format on meta for this reload; false for a layer that
   * writeLayersInPlace writes, which keeps its kernel tensors in its slots throughout.
   */
  onMeta = false;
  /** The first load came: scratch materialized, or (direct) kernel tensors in the slots. */
  started = false;
  /** The kernel tensors were (or need not be) copied to host for this reload. */
  snapshotTaken = false;
  scratchBytes = 0;
  loadNumel = 0;
  loadNumelTotal: number | null = null;
  progress = new Map<string, { elements: number; shards: string[] }>();
  seen = new RowLedger();

  canProcess(): boolean {
    return this.loadNumelTotal !== null;
  }

  reset(): void {
    this.state = null;
    this.kernelTensors = null;
    this.direct = false;
    this.onMeta = false;
    this.started = false;
    this.snapshotTaken = false;
    this.scratchBytes = 0;
    this.loadNumel = 0;
    this.loadNumelTotal = null;
    this.progress = new Map();
    this.seen = new RowLedger();
  }
}

const INFO = new WeakMap<Module, LayerInfo>();
const STATE = new WeakMap<Module, ReloadState>();
/** Models inside loadWeights (a first load), which holds them across awaits. */
const LOADING = new WeakSet<Module>();
/** Layers that hold weights of a failed, non-atomic reload, per model. */
const INCONSISTENT = new WeakMap<Module, Set<string>>();

function infoOf(layer: Module): LayerInfo {
  let info = INFO.get(layer);
  if (!info) INFO.set(layer, info = new LayerInfo());
  return info;
}

/** What the lifecycle knows about a layer (for tests and tools); undefined before recording. */
export interface LayerwiseInfo {
  /** The captured model format. */
  readonly restoreMetadata: LayerMeta | null;
  /** Elements received in the current reload. */
  readonly loadNumel: number;
  /** Elements the layer expects in the current reload; null when not reloading. */
  readonly loadNumelTotal: number | null;
  /**
   * Checkpoint tensors held as copies for the layer: always 0, loads go straight into the
   * layer's scratch or kernel tensors (kept for compatibility).
   */
  readonly bufferedLoads: number;
  /** Model-format scratch bytes the layer holds in the current reload (0 when loaded direct). */
  readonly scratchBytes: number;
}

/** The bookkeeping of `layer`, if any. */
export function getLayerwiseInfo(layer: Module): LayerwiseInfo | undefined {
  const i = INFO.get(layer);
  return i && {
    restoreMetadata: i.restoreMetadata,
    loadNumel: i.loadNumel,
    loadNumelTotal: i.loadNumelTotal,
    bufferedLoads: 0,
    scratchBytes: i.scratchBytes,
  };
}

/** Whether a layerwise reload of `model` is in progress. */
export function isReloading(model: Module): boolean {
  return STATE.has(model);
}

/**
 * Refuses to start a load or reload of `model` while another one runs: ReloadError
 * `RELOAD_ACTIVE` (a reload runs) or `LOAD_ACTIVE` (a first load runs). `what` names the
 * caller in the message.
 */
export function assertIdle(model: Module, what: string): void {
  if (STATE.has(model)) {
    throw new ReloadError(
      "RELOAD_ACTIVE",
      `${what}: a reload of this model is already in progress; concurrent loads and reloads of one model are refused, wait for the running reload to settle`,
    );
  }
  if (LOADING.has(model)) {
    throw new ReloadError(
      "LOAD_ACTIVE",
      `${what}: a first load (loadWeights) of this model is in progress; wait for it to settle`,
    );
  }
}

/**
 * Marks `model` as being loaded by loadWeights (true) or not (false), so that reloads and
 * other loads are refused meanwhile. For loadWeights only.
 */
export function setLoading(model: Module, loading: boolean): void {
  if (loading) LOADING.add(model);
  else LOADING.delete(model);
}

/**
 * Whether a failed reload without `atomic` left layers of `model` holding its new weights
 * while others hold the previous ones. Stays true until every such layer has been written
 * again by a reload that succeeded (a complete reload clears it).
 */
export function isInconsistent(model: Module): boolean {
  return (INCONSISTENT.get(model)?.size ?? 0) > 0;
}

/** Paths of the layers that hold weights of a failed reload (empty when consistent). */
export function inconsistentLayers(model: Module): string[] {
  return [...INCONSISTENT.get(model) ?? []];
}

/**
 * Tells the running reload of `model` that its caller scans every incoming tensor for NaN/Inf
 * itself before handing it to a loader (the device path scans each phase whole, before any
 * write), so the loaders do not scan it a second time. Kernel tensors are still checked after
 * processing.
 */
export function incomingScannedByCaller(model: Module): void {
  const state = STATE.get(model);
  if (!state) {
    throw new ReloadError(
      "NOT_RELOADING",
      "incomingScannedByCaller: no layerwise reload is in progress",
    );
  }
  state.incomingScanned = true;
}

/** One-line note on an inconsistent model for messages; empty when consistent. */
export function inconsistencyNote(model: Module): string {
  const layers = inconsistentLayers(model);
  if (layers.length === 0) return "";
  return `model inconsistent: ${layers.length} layer(s) hold weights of a failed reload: ${
    firstOf(layers, 5)
  }; a complete reload that succeeds fixes it`;
}

/**
 * Captures every layer's model-format tensors (meta: shape, dtype, loader). Call it right after
 * building the model, before loading (loadWeights does it when it was not done).
 */
export function recordMetadataForReloading(model: Module): void {
  const layers = [...model.namedModules()].filter(([, m]) => m.ownSlots().length > 0);
  for (const [path, layer] of layers) {
    for (const [name, slot] of layer.ownSlots()) {
      if (!slot.tensor.isMeta) {
        throw new ReloadError(
          "ALREADY_LOADED",
          `${
            qualifiedName(path, name)
          } already has storage: record metadata right after building the model, before loading`,
        );
      }
    }
  }
  for (const [path, layer] of layers) {
    const info = infoOf(layer);
    info.restoreMetadata = captureLayerToMeta(layer);
    info.path = path;
  }
}

/** Layers with recorded metadata, in model order, each once. */
function recordedLayers(model: Module): [Module, LayerInfo][] {
  const out: [Module, LayerInfo][] = [];
  const seen = new Set<Module>();
  for (const [, m] of model.namedModules()) {
    const info = INFO.get(m);
    if (info?.restoreMetadata && !seen.has(m)) {
      seen.add(m);
      out.push([m, info]);
    }
  }
  return out;
}

/**
 * Starts a layerwise reload: keeps each layer's kernel tensors aside, puts the layer back in
 * model format on meta, counts the elements it expects, and wraps its loaders. Layers in
 * `inPlace` are to be written by {@link writeLayersInPlace} only: they keep their kernel
 * tensors in their slots and their loaders unwrapped (no meta round trip for a reload that
 * loads nothing through them).
 */
export function initializeLayerwiseReload(
  model: Module,
  options: ReloadOptions = {},
  inPlace: ReadonlySet<Module> = new Set(),
): void {
  assertIdle(model, "initializeLayerwiseReload");
  const layers = recordedLayers(model);
  for (const [path, m] of model.namedModules()) {
    if (m.ownSlots().length > 0 && !INFO.get(m)?.restoreMetadata) {
      throw new ReloadError(
        "NOT_RECORDED",
        `${path || "the model"}: call recordMetadataForReloading before initializeLayerwiseReload`,
      );
    }
  }
  // Validate everything before changing anything.
  for (const [layer, info] of layers) {
    for (const [name, slot] of layer.ownSlots()) {
      if (slot.tensor.isMeta || slot.tensor.storage?.freed) {
        throw new ReloadError(
          "NOT_LOADED",
          `${qualifiedName(info.path, name)} has no storage: load the model before reloading it`,
        );
      }
    }
  }
  const max = options.maxBufferedBytes ?? Infinity;
  if (!(max >= 0)) {
    throw new LayerwiseError("BAD_OPTION", `maxBufferedBytes must be >= 0, got ${max}`);
  }
  const state: ReloadState = {
    maxBufferedBytes: max,
    atomic: options.atomic ?? false,
    rejectNonFinite: options.rejectNonFinite ?? false,
    incomingScanned: false,
    partial: new Set(),
    log: options.log ?? (() => {}),
    bufferedBytes: 0,
    peakBufferedBytes: 0,
    ignoredLoads: 0,
    processed: [],
    delayed: [],
    untouched: [],
    kept: [],
    backups: [],
    waiting: new Set(),
  };
  for (const [layer, info] of layers) {
    if (info.canProcess()) continue;
    info.kernelTensors = new Map(
      layer.ownSlots().map(([n, slot]) => [n, { slot, tensor: slot.tensor }]),
    );
    for (const k of info.kernelTensors.values()) {
      state.kept.push({
        slot: k.slot,
        tensor: k.tensor,
        ptr: k.tensor.ptr,
      });
    }
    const meta = info.restoreMetadata!;
    info.state = state;
    info.loadNumel = 0;
    info.loadNumelTotal = [...meta.values()].reduce((a, m) => a + m.meta.numel, 0);
    if (inPlace.has(layer)) continue;
    info.direct = keepsModelFormat(layer, meta, info.kernelTensors);
    restoreLayerOnMeta(layer, meta);
    info.onMeta = true;
    // A tied slot shared by two layers is wrapped once, by its owner.
    for (const [name, m] of meta) {
      if (!isWrapper(m.slot.weightLoader)) {
        m.slot.weightLoader = makeOnlineProcessLoader(layer, info, state, name, m.loader);
      }
    }
  }
  STATE.set(model, state);
}

/**
 * Whether the layer's kernel tensors are its model-format tensors (no processing, or a method
 * that keeps model format; same slots, shapes and dtypes; contiguous, separate storage), so
 * that loads can go straight into them.
 */
function keepsModelFormat(
  layer: Module,
  meta: LayerMeta,
  kernel: Map<string, KernelTensor>,
): boolean {
  const q = layer.quantMethod;
  if (q !== undefined && q.keepsModelFormat !== true) return false;
  if (kernel.size !== meta.size) return false;
  const storages = new Set<Storage>();
  for (const [name, m] of meta) {
    const k = kernel.get(name);
    if (
      !k || k.slot !== m.slot || k.tensor.dtype !== m.meta.dtype ||
      k.tensor.shape.join() !== m.meta.shape.join() || !k.tensor.isContiguous ||
      storages.has(k.tensor.storage!)
    ) {
      return false;
    }
    storages.add(k.tensor.storage!);
  }
  return true;
}

function makeOnlineProcessLoader(
  layer: Module,
  info: LayerInfo,
  state: ReloadState,
  param: string,
  original: WeightLoader,
): WeightLoader {
  const wrapper: WeightLoader = (slot, loaded, shardId, expertId) => {
    const where = qualifiedName(info.path, param);
    if (!info.canProcess() || info.state !== state) {
      // The layer was processed already: the reference's "excessive loading". Its elements
      // are in the kernel tensors; writing them again would be wrong.
      state.ignoredLoads++;
      state.log(`${where}: layer already processed, load ignored`);
      return;
    }
    // A row chunk has the rows it holds as its own part of the key (see RowLedger).
    const key = `${param}|${shardId ?? ""}|${expertId ?? ""}`;
    if (info.seen.seen(key, loaded, where)) {
      state.ignoredLoads++;
      const label = loadLabel(loaded, shardId, expertId);
      state.log(`${where}${label === null ? "" : ` (${label})`}: loaded twice, ignored`);
      return;
    }
    // Count (and check shapes) against the meta tensor first: nothing is written or
    // allocated for a load that fails or writes nothing.
    const real = slot.tensor;
    let n: number;
    slot.tensor = info.restoreMetadata!.get(param)!.meta;
    try {
      n = countWrites(() => original(slot, loaded, shardId, expertId));
    } finally {
      slot.tensor = real;
    }
    if (n === 0) {
      info.seen.add(key, loaded);
      state.log(`${where}: load writes nothing on this rank`);
      return;
    }
    if (state.rejectNonFinite && !state.incomingScanned) {
      rejectNonFinite(layer.backend!, loaded, where, info.restoreMetadata!.get(param)!.meta.dtype);
    }
    if (!info.started) startLayer(layer, info, where);
    // `loaded` is borrowed: it is written now and not referenced after this call.
    original(slot, loaded, shardId, expertId);
    info.seen.add(key, loaded);
    info.loadNumel += n;
    const p = info.progress.get(param) ?? { elements: 0, shards: [] };
    p.elements += n;
    const label = loadLabel(loaded, shardId, expertId);
    if (label !== null) p.shards.push(label);
    info.progress.set(param, p);
    state.log(`${info.path}: ${info.loadNumel} / ${info.loadNumelTotal}`);
    if (info.loadNumel >= info.loadNumelTotal! && !layer.processLast) processLayer(layer, info);
  };
  markWrapper(wrapper, original);
  return wrapper;
}

/**
 * Takes the layer's atomic snapshot (to host) if not taken yet, then counts the layer as
 * partly written: call it right before the first write into a kept kernel tensor.
 */
function beginWrite(layer: Module, info: LayerInfo): void {
  const state = info.state!;
  if (!info.snapshotTaken && state.atomic) {
    const b = layer.backend!;
    // download() returns host memory: the snapshot costs no device memory.
    for (const k of info.kernelTensors!.values()) {
      state.backups.push({
        path: info.path,
        backend: b,
        tensor: k.tensor,
        bytes: b.download(k.tensor),
      });
    }
  }
  info.snapshotTaken = true;
  state.partial.add(info.path);
}

/**
 * A layer's first load: a direct layer gets its kept kernel tensors back in its slots (after
 * the snapshot; slots with an `initValue` are filled with it, as scratch would be); any other
 * layer gets model-format scratch, within `maxBufferedBytes`.
 */
function startLayer(layer: Module, info: LayerInfo, where: string): void {
  const state = info.state!;
  const meta = info.restoreMetadata!;
  if (info.direct) {
    beginWrite(layer, info);
    for (const [name, m] of meta) {
      const k = info.kernelTensors!.get(name)!.tensor;
      m.slot.tensor = k;
      if (m.slot.initValue !== undefined) layer.backend!.fill(k, m.slot.initValue);
    }
    info.started = true;
    return;
  }
  const bytes = [...meta.values()].reduce((a, m) => a + m.meta.nbytes, 0);
  if (state.bufferedBytes + bytes > state.maxBufferedBytes) {
    throw new ReloadError(
      "BUFFER_LIMIT",
      `${where}: materializing ${bytes} bytes of model-format scratch would hold ${
        state.bufferedBytes + bytes
      } bytes, over maxBufferedBytes=${state.maxBufferedBytes} (${state.waiting.size} layers wait for more tensors); send tensors in layer order or raise the limit`,
    );
  }
  // On a failure part-way, what was allocated is in the slots: releaseScratch frees it.
  info.scratchBytes = materializeLayer(layer);
  info.started = true;
  state.bufferedBytes += info.scratchBytes;
  state.peakBufferedBytes = Math.max(state.peakBufferedBytes, state.bufferedBytes);
  state.waiting.add(info);
}

/** A place in a layer's scratch for the bytes of one load: see {@link scratchDestination}. */
export interface ScratchPlacement {
  /** The view of the scratch the bytes go into: the load's shape, contiguous. */
  readonly tensor: Tensor;
  /** Scratch bytes this call materialized (the layer began here), else 0. */
  readonly startedBytes: number;
}

/** What {@link scratchDestination} asks about: one load, before its bytes are read. */
export interface PlannedLoad {
  /** The layer the load goes to, and its parameter. */
  readonly layer: Module;
  /** The slot's name in the layer. */
  readonly param: string;
  /** Shape and dtype of the bytes read: the whole tensor, or its row chunk. */
  readonly shape: readonly number[];
  /** The checkpoint dtype. */
  readonly dtype: DType;
  /** The chunk's first row and the whole tensor's rows, for a row chunk. */
  readonly rows?: { readonly start: number; readonly total: number };
  /** Shard of a fused tensor. */
  readonly shardId?: ShardId;
  /** Expert of a mixture of experts. */
  readonly expertId?: number;
}

/**
 * Where the bytes of `load` would end up in its layer's model-format scratch when the layer's
 * loader writes them as one plain copy (same dtype, all of them, in order, into a contiguous
 * range): a reader can put them there, and the loader's copy then finds source and destination
 * at the same place and moves nothing (ARCHITECTURE.md, "Read paths"). Null for any other
 * load (a conversion, a narrowed, strided or split write, nothing on this rank, a load seen
 * already), for a layer loaded straight into its kernel tensors or not reloading, and for a
 * layer that has not begun when its scratch is more than `room` bytes or `maxBufferedBytes` is
 * set; otherwise such a layer begins here, as at its first load. The
 * loader is only recorded (`recordWrites`), with the layer's slots on meta meanwhile, so it
 * writes and notes nothing.
 */
export function scratchDestination(load: PlannedLoad, room: number): ScratchPlacement | null {
  const { layer, param, shape, dtype } = load;
  const info = INFO.get(layer);
  const state = info?.state;
  if (!info || !state || !info.canProcess() || info.direct || !info.onMeta) return null;
  const meta = info.restoreMetadata!;
  const m = meta.get(param);
  if (!m || m.meta.dtype !== dtype) return null;
  const src = placeholderTensor(shape, dtype);
  let loaded = src;
  try {
    if (load.rows) loaded = rowWindow(src, load.rows.start, load.rows.total);
    const key = `${param}|${load.shardId ?? ""}|${load.expertId ?? ""}`;
    if (info.seen.seen(key, loaded, "")) return null;
  } catch {
    return null;
  }
  const into = placeholderTensor(m.meta.shape, m.meta.dtype);
  const held = [...meta.values()].map((x) => [x.slot, x.slot.tensor] as const);
  let writes;
  try {
    for (const x of meta.values()) x.slot.tensor = x.meta;
    writes = recordWrites(() =>
      m.loader(new TensorSlot(into, m.loader), loaded, load.shardId, load.expertId)
    );
  } catch {
    return null; // the real load raises it, with its message
  } finally {
    for (const [slot, t] of held) slot.tensor = t;
  }
  if (writes.length !== 1) return null;
  const { dst, src: from } = writes[0];
  if (
    dst.storage !== into.storage || from.storage !== src.storage || from.offset !== 0 ||
    from.numel !== src.numel || !from.isContiguous || !dst.isContiguous || dst.dtype !== dtype
  ) {
    return null;
  }
  let startedBytes = 0;
  if (!info.started) {
    const bytes = [...meta.values()].reduce((a, x) => a + x.meta.nbytes, 0);
    // Under a bound, scratch begun ahead could leave a layer the consumer reaches first
    // without room (BUFFER_LIMIT where the reload would pass): only the consumer begins there.
    if (bytes > room || state.maxBufferedBytes !== Infinity) return null;
    startLayer(layer, info, qualifiedName(info.path, param));
    startedBytes = info.scratchBytes;
  }
  const scratch = m.slot.tensor;
  if (!scratch.storage || !scratch.isContiguous || scratch.dtype !== dtype) return null;
  return {
    tensor: new Tensor(shape, dtype, scratch.storage, scratch.offset + dst.offset),
    startedBytes,
  };
}

/**
 * Throws ReloadError `NON_FINITE` when `t` holds NaN or infinite elements (counted on the
 * backend; a non-contiguous view is compacted into a temporary first). With `as`, the dtype
 * the loader will write `t` into (the model format), finite values that become infinite in
 * that dtype are refused too (an f32 3.4e38 is +Inf in bf16; a bf16 1e5 is +Inf in f16): they
 * are converted into a temporary of that dtype and counted there. `where` names the tensor.
 */
export function rejectNonFinite(b: Backend, t: Tensor, where: string, as?: DType): void {
  rejectNonFiniteEach(b, [{ tensor: t, where, as }]);
}

/** One incoming tensor for {@link rejectNonFiniteEach}. */
export interface IncomingTensor {
  /** The tensor (a row window is scanned on the rows it holds). */
  readonly tensor: Tensor;
  /** Its name in messages. */
  readonly where: string;
  /** The model-format dtype it will be written as, when known. */
  readonly as?: DType;
}

/**
 * {@link rejectNonFinite} of many tensors, waiting for the device once for all the plain
 * counts (each wait is a round trip to the GPU, and a model has hundreds of tensors).
 */
export function rejectNonFiniteEach(b: Backend, incoming: readonly IncomingTensor[]): void {
  const views = incoming.map((x) => x.tensor.windowRows());
  const counts = countEach(b, views);
  views.forEach((t, i) => {
    if (counts[i] > 0) {
      throw new ReloadError(
        "NON_FINITE",
        `${incoming[i].where}: ${
          counts[i]
        } of ${t.numel} elements of the incoming ${t} are NaN or infinite (rejectNonFinite is set)`,
      );
    }
  });
  incoming.forEach(({ where, as }, i) => {
    const t = views[i];
    if (t.numel === 0 || as === undefined || !as.floating || as === t.dtype) return;
    const n = countNonFiniteOf(b, t, as);
    if (n > 0) {
      throw new ReloadError(
        "NON_FINITE",
        `${where}: ${n} of ${t.numel} elements of the incoming ${t} are finite but overflow to infinity in the model's dtype ${as.name} (rejectNonFinite is set)`,
      );
    }
  });
}

/** NaN/Inf counts of floating tensors (0 for others): contiguous ones with one device wait. */
function countEach(b: Backend, ts: readonly Tensor[]): number[] {
  const out = ts.map(() => 0);
  const counted = (t: Tensor) => !t.isMeta && t.numel > 0 && t.dtype.floating;
  const batch = ts.flatMap((t, i) => (counted(t) && t.isContiguous ? [i] : []));
  const n = b.countNonFiniteEach(batch.map((i) => ts[i]));
  batch.forEach((i, k) => out[i] = n[k]);
  ts.forEach((t, i) => {
    if (counted(t) && !t.isContiguous) out[i] = countNonFiniteOf(b, t);
  });
  return out;
}

/** NaN/Inf of `t` converted to `dtype` (a contiguous temporary of it). */
function countNonFiniteOf(b: Backend, t: Tensor, dtype: DType = t.dtype): number {
  const tmp = b.empty(t.shape, dtype);
  try {
    b.copy(tmp, t);
    return b.countNonFinite(tmp);
  } finally {
    b.free(tmp.storage!);
  }
}

/** A processed layer's kernel tensors for {@link rejectNonFiniteKernel}. */
export interface ProcessedLayer {
  /** The layer. */
  readonly layer: Module;
  /** Its path in the model, for messages. */
  readonly path: string;
  /** Its kernel tensors by name (default: every slot of the layer). */
  readonly tensors?: readonly (readonly [string, Tensor])[];
}

/**
 * Throws ReloadError `NON_FINITE` when processing left a NaN or infinite element in one of the
 * layers' kernel tensors (an fp8 code that is NaN, an infinite scale), though every value that
 * came in was finite in the model's dtype: what the check promises holds for what the model
 * ends up holding, whatever the path. Called after a quant method ran; costs one read of the
 * kernel tensors and one wait for the device.
 */
export function rejectNonFiniteKernel(layers: readonly ProcessedLayer[]): void {
  if (layers.length === 0) return;
  const entries = layers.flatMap(({ layer, path, tensors }) =>
    (tensors ?? layer.ownSlots().map(([n, s]) => [n, s.tensor] as const))
      .map(([name, t]) => ({ layer, path, name, t }))
  );
  const counts = countEach(layers[0].layer.backend!, entries.map((e) => e.t));
  entries.forEach(({ layer, path, name, t }, i) => {
    if (counts[i] > 0) {
      throw new ReloadError(
        "NON_FINITE",
        `${qualifiedName(path, name)}: processing (${layer.quantMethod?.name}) left ${
          counts[i]
        } of ${t.numel} elements of ${t} NaN or infinite from finite weights (rejectNonFinite is set)`,
      );
    }
  });
}

/** Frees what the layer's slots hold besides its kept kernel tensors (scratch, temporaries). */
function releaseScratch(layer: Module, info: LayerInfo, state: ReloadState): void {
  const kernel = new Set([...info.kernelTensors!.values()].map((k) => k.tensor.storage));
  const freed = new Set<Storage>();
  for (const [, slot] of layer.ownSlots()) {
    const s = slot.tensor.storage;
    if (s && !s.freed && !kernel.has(s) && !freed.has(s)) {
      freed.add(s);
      layer.backend!.free(s);
    }
  }
  state.bufferedBytes -= info.scratchBytes;
  info.scratchBytes = 0;
  state.waiting.delete(info);
}

function placeKernelTensors(layer: Module, info: LayerInfo): void {
  if (!info.onMeta) return; // they never left
  info.onMeta = false;
  for (const [name] of layer.ownSlots()) layer.deleteSlot(name);
  for (const [name, k] of info.kernelTensors!) {
    k.slot.tensor = k.tensor;
    layer.setSlot(name, k.slot);
  }
}

/**
 * Processes a layer that has all its elements: a direct layer's kernel tensors already hold
 * them (its method, if any, keeps model format); otherwise the quant method turns the scratch
 * into kernel format, writing into the kept kernel tensors where it can (results it allocated
 * anyway are copied into them). Then the scratch is freed and the kernel tensors put back.
 */
function processLayer(layer: Module, info: LayerInfo): void {
  const state = info.state!;
  const b = layer.backend!;
  const kernel = info.kernelTensors!;
  try {
    const into: KernelDestination = (name, shape, dtype) => {
      const k = kernel.get(name)?.tensor;
      if (
        info.direct || !k || k.dtype !== dtype || k.shape.join() !== shape.join() ||
        !k.isContiguous
      ) {
        return null;
      }
      beginWrite(layer, info);
      return k;
    };
    layer.quantMethod?.processWeightsAfterLoading(layer, into);
    const results = new Map(layer.ownSlots());
    for (const [name, k] of kernel) {
      const r = results.get(name)?.tensor;
      if (!r || r.dtype !== k.tensor.dtype || r.shape.join() !== k.tensor.shape.join()) {
        throw new ReloadError(
          "KERNEL_MISMATCH",
          `${qualifiedName(info.path, name)}: processing gave ${
            r ?? "nothing"
          }, the kept kernel tensor is ${k.tensor}`,
        );
      }
      if (info.direct && r !== k.tensor) {
        throw new ReloadError(
          "KERNEL_MISMATCH",
          `${
            qualifiedName(info.path, name)
          }: ${layer.quantMethod?.name} keeps model format but replaced the tensor`,
        );
      }
    }
    for (const name of results.keys()) {
      if (!kernel.has(name)) {
        throw new ReloadError(
          "KERNEL_MISMATCH",
          `${qualifiedName(info.path, name)}: processing made a tensor the model did not have`,
        );
      }
    }
    for (const [name, k] of kernel) {
      const r = results.get(name)!.tensor;
      if (r === k.tensor) continue;
      beginWrite(layer, info);
      b.copy(k.tensor, r);
    }
    if (state.rejectNonFinite && layer.quantMethod !== undefined && !info.direct) {
      // Checked in the kernel tensors, as the slots hold them again only after `finally`.
      rejectNonFiniteKernel([{
        layer,
        path: info.path,
        tensors: [...info.kernelTensors!].map(([n, k]) => [n, k.tensor] as const),
      }]);
    }
    state.partial.delete(info.path);
    state.processed.push(info.path);
  } finally {
    releaseScratch(layer, info, state);
    placeKernelTensors(layer, info);
    info.reset();
  }
  state.log(`${info.path}: processed`);
}

/**
 * The device path's write (see device.ts): `layers` of the running reload of `model`, none of
 * them begun, are written by `write` straight into their kept kernel tensors, with the same
 * bookkeeping as a processed layer: each layer's atomic snapshot is taken first, each counts as
 * partly written until `write` returns, then as processed. If `write` throws, the layers stay
 * partly written for the abort to restore.
 */
export function writeLayersInPlace(
  model: Module,
  layers: readonly Module[],
  write: () => void,
): void {
  const state = STATE.get(model);
  if (!state) {
    throw new ReloadError(
      "NOT_RELOADING",
      "writeLayersInPlace: no layerwise reload is in progress",
    );
  }
  const infos = layers.map((layer) => {
    const info = INFO.get(layer);
    if (!info || info.state !== state || info.started || !info.canProcess()) {
      throw new ReloadError(
        "NOT_RELOADING",
        `${info?.path ?? layer.typeName}: not a layer waiting in this reload`,
      );
    }
    return info;
  });
  layers.forEach((layer, i) => {
    const info = infos[i];
    beginWrite(layer, info);
    info.started = true;
    // The kernel tensors go back into the slots now: writes may fill them (initValue).
    placeKernelTensors(layer, info);
  });
  write();
  for (const info of infos) {
    state.partial.delete(info.path);
    state.processed.push(info.path);
    info.reset();
    state.log(`${info.path}: written in place from the device source`);
  }
}

function unwrapAll(model: Module): void {
  for (const [, info] of recordedLayers(model)) {
    for (const m of info.restoreMetadata!.values()) {
      m.slot.weightLoader = getOriginalLoader(m.slot.weightLoader);
    }
  }
}

/** Describes what a partially loaded layer misses beyond padding; empty when only padding. */
export function describeGaps(
  layer: Module,
  path: string,
  meta: LayerMeta,
  received: (name: string) => { elements: number; shards: readonly string[] },
): string[] {
  const gaps: string[] = [];
  // A load may cover tensors beside its own (a bf16 weight covers the block scales it will be
  // quantized with): the layer is complete when its elements are, as the reload counts them.
  let want = 0, have = 0;
  for (const [name, m] of meta) {
    want += m.meta.numel - layer.paddingElements(name);
    have += received(name).elements;
  }
  if (have >= want) return gaps;
  for (const [name, m] of meta) {
    const expected = m.meta.numel - layer.paddingElements(name);
    const got = received(name);
    if (got.elements >= expected) continue;
    const shards = got.shards.length === 0
      ? ""
      : ` (received ${got.shards.some((l) => l.includes("rows")) ? "" : "shards "}${
        firstOf(got.shards, 8)
      })`;
    gaps.push(
      `${qualifiedName(path, name)}: ${got.elements} of ${expected} elements loaded${shards}`,
    );
  }
  return gaps;
}

/** What a finished reload did (see reloadLayerwise for the full report). */
export interface FinalizeSummary {
  /** Paths of the layers written, in processing order. */
  readonly processed: readonly string[];
  /** Layers processed at finalize because only padding was missing. */
  readonly delayed: readonly string[];
  /** Layers that received nothing and kept their kernel tensors. */
  readonly untouched: readonly string[];
  /** Loads ignored (already processed layer, or the same shard twice). */
  readonly ignoredLoads: number;
  /**
   * Most model-format scratch bytes held at once by layers that had begun receiving tensors
   * (what `maxBufferedBytes` bounds); loads go straight into scratch, nothing else is held.
   */
  readonly peakBufferedBytes: number;
  /** The same figure as {@link FinalizeSummary.peakBufferedBytes} (kept for compatibility). */
  readonly peakScratchBytes: number;
  /** True when every kernel tensor is the same tensor at the same address as before. */
  readonly storageKept: boolean;
  /**
   * Layers that still hold weights of an earlier failed, non-atomic reload (not written by
   * this one); empty when the model is consistent.
   */
  readonly inconsistentLayers: readonly string[];
}

/**
 * Ends a layerwise reload: layers that received nothing get their kernel tensors back,
 * partially loaded layers missing only padding are processed, attention layers are processed
 * last, wrappers are removed and the bookkeeping reset. When a layer misses real tensors,
 * the reload is aborted and ReloadError `MISSING_WEIGHTS` names them.
 */
export function finalizeLayerwiseReload(model: Module): FinalizeSummary {
  const state = STATE.get(model);
  if (!state) {
    throw new ReloadError("NOT_RELOADING", "finalize: no layerwise reload is in progress");
  }
  const active = recordedLayers(model).filter(([, i]) => i.canProcess() && i.state === state);
  const missing: string[] = [];
  const delayed = new Set<LayerInfo>();
  for (const [layer, info] of active) {
    if (layer.processLast || info.loadNumel <= 0 || info.loadNumel >= info.loadNumelTotal!) {
      continue;
    }
    const gaps = describeGaps(layer, info.path, info.restoreMetadata!, (name) => {
      return info.progress.get(name) ?? { elements: 0, shards: [] };
    });
    if (gaps.length > 0) missing.push(...gaps);
    else delayed.add(info);
  }
  if (missing.length > 0) {
    failReload(
      model,
      new ReloadError(
        "MISSING_WEIGHTS",
        `${missing.length} tensor${missing.length > 1 ? "s were" : " was"} not fully loaded: ${
          missing.join("; ")
        }`,
      ),
    );
  }
  try {
    for (const last of [false, true]) {
      for (const [layer, info] of active) {
        if (layer.processLast !== last) continue;
        if (info.loadNumel <= 0) {
          // A reader may have begun it for a load that never came (scratchDestination).
          if (info.started && !info.direct) releaseScratch(layer, info, state);
          placeKernelTensors(layer, info);
          state.untouched.push(info.path);
          info.reset();
        } else {
          if (delayed.has(info)) {
            state.log(`${info.path}: delayed processing (padding not loaded)`);
            state.delayed.push(info.path);
          }
          processLayer(layer, info);
        }
      }
    }
  } catch (e) {
    failReload(model, e);
  }
  unwrapAll(model);
  STATE.delete(model);
  const stale = INCONSISTENT.get(model);
  if (stale) {
    for (const p of state.processed) stale.delete(p);
    if (stale.size === 0) INCONSISTENT.delete(model);
  }
  return {
    inconsistentLayers: inconsistentLayers(model),
    processed: state.processed,
    delayed: state.delayed,
    untouched: state.untouched,
    ignoredLoads: state.ignoredLoads,
    peakBufferedBytes: state.peakBufferedBytes,
    peakScratchBytes: state.peakBufferedBytes,
    storageKept: state.kept.every((k) =>
      k.slot.tensor === k.tensor && !k.tensor.storage!.freed && k.tensor.ptr === k.ptr
    ),
  };
}

/**
 * Abandons a layerwise reload: frees the scratch of waiting layers, puts every waiting layer's
 * kernel tensors back, restores written layers from their host copies with `atomic`, removes the
 * wrappers. Returns the paths of layers that hold new weights after the abort (empty with
 * atomic, unless a restore itself failed); without atomic they mark the model inconsistent.
 */
export function abortLayerwiseReload(model: Module): string[] {
  const state = STATE.get(model);
  if (!state) return [];
  for (const [layer, info] of recordedLayers(model)) {
    if (!info.canProcess() || info.state !== state) continue;
    if (layer.backend) releaseScratch(layer, info, state);
    placeKernelTensors(layer, info);
    info.reset();
  }
  let written = [...state.processed, ...state.partial];
  if (state.atomic) {
    const failed = new Set<string>();
    for (const bk of state.backups.reverse()) {
      try {
        bk.backend.upload(bk.tensor, bk.bytes);
      } catch (e) {
        state.log(`${bk.path}: restore failed: ${e instanceof Error ? e.message : e}`);
        failed.add(bk.path);
      }
    }
    state.backups.length = 0;
    written = written.filter((p) => failed.has(p));
  }
  if (written.length > 0) {
    const stale = INCONSISTENT.get(model) ?? new Set<string>();
    for (const p of written) stale.add(p);
    INCONSISTENT.set(model, stale);
  }
  unwrapAll(model);
  STATE.delete(model);
  return written;
}

/**
 * Aborts the reload and rethrows `e` as a one-line typed error saying what state the model is
 * in: with layers written (no atomic), which; when an earlier failed reload left it
 * inconsistent, that too. Errors that are not LayerwiseErrors become ReloadError
 * `RELOAD_FAILED` with the original as `cause`.
 */
export function failReload(model: Module, e: unknown): never {
  const wasInconsistent = isInconsistent(model);
  const atomic = STATE.get(model)?.atomic ?? false;
  const written = abortLayerwiseReload(model);
  let err: LayerwiseError;
  if (e instanceof LayerwiseError) err = e;
  else {
    const what = e instanceof Error ? `${e.name}: ${e.message}` : String(e);
    err = new ReloadError("RELOAD_FAILED", `reload failed: ${what.split("\n")[0]}`);
    Object.defineProperty(err, "cause", { value: e, configurable: true, writable: true });
  }
  let note = "";
  if (written.length > 0 && atomic) {
    note = `model inconsistent: ${written.length} layer(s) already hold new weights: ${
      firstOf(written, 5)
    }; restoring them from the atomic snapshot failed, reload completely`;
  } else if (written.length > 0) {
    note = `model inconsistent: ${written.length} layer(s) already hold new weights: ${
      firstOf(written, 5)
    }; use atomic to restore, or reload completely`;
  } else if (wasInconsistent) {
    note = inconsistencyNote(model);
  }
  if (note === "" && err === e) throw e;
  const out = withMessage(err, note === "" ? err.message : `${err.message} [${note}]`);
  const cause = err === e ? (e as { cause?: unknown }).cause : e;
  if (cause !== undefined) {
    Object.defineProperty(out, "cause", { value: cause, configurable: true, writable: true });
  }
  throw out;
}

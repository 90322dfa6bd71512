/**
 * The module tree: modules with ordered named children and tensor slots (parameters and
 * buffers). A slot holds a {@link Tensor} that can be swapped (meta, materialized model format,
 * processed kernel format) and the weight loader that writes checkpoint tensors into it.
 *
 * Loaders write only through {@link copyInto}: when the destination is a meta tensor it counts
 * the elements it would write instead of copying, which is how the reload learns how many
 * elements a load contributes by running the real loader against meta destinations.
 * @module
 */

import type { Backend } from "../backend/backend.ts";
import { CheckpointError, LayerwiseError, ReloadError } from "../errors.ts";
import { shapeString, Tensor } from "../tensor/tensor.ts";
import type { QuantMethod } from "../quant/method.ts";

/** Identifies a shard of a fused tensor: `"q"`, `"k"`, `"v"`, `0..n-1`, `"w1"`, `"w2"`, `"w3"`. */
export type ShardId = string | number;

/**
 * Writes one checkpoint tensor (`loaded`, on the backend, in checkpoint format) into the
 * slot's tensor, narrowing to the shard, expert and tensor-parallel rank it belongs to.
 */
export type WeightLoader = (
  slot: TensorSlot,
  loaded: Tensor,
  shardId?: ShardId,
  expertId?: number,
) => void;

/** Whether a slot is a learnable parameter or a buffer (both are reloaded alike). */
export type SlotKind = "param" | "buffer";

/** Options of a {@link TensorSlot}. */
export interface SlotOptions {
  /** `param` (default) or `buffer`. */
  kind?: SlotKind;
  /**
   * Value written into the tensor right after it is given storage, for elements no load
   * writes (vocabulary padding) or a "not loaded" sentinel (attention scales).
   */
  initValue?: number;
}

/** A named place for a tensor in a module; the same slot may be shared by two modules (tying). */
export class TensorSlot {
  /** The current tensor: meta, model format or kernel format. */
  tensor: Tensor;
  /** The loader that writes checkpoint tensors into {@link tensor}. */
  weightLoader: WeightLoader;
  /** `param` or `buffer`. */
  readonly kind: SlotKind;
  /** See {@link SlotOptions.initValue}. */
  readonly initValue: number | undefined;

  /** Creates a slot holding `tensor` with `weightLoader`. */
  constructor(tensor: Tensor, weightLoader: WeightLoader, options: SlotOptions = {}) {
    this.tensor = tensor;
    this.weightLoader = weightLoader;
    this.kind = options.kind ?? "param";
    this.initValue = options.initValue;
  }
}

// ------------------------------------------------------------------ writing and counting

interface Counter {
  elements: number;
}

// Loaders are synchronous, so one active counter at a time is enough; it is only set for the
// duration of countWrites and never holds a model.
let activeCounter: Counter | null = null;

/**
 * Runs `fn` (a loader call) and returns the number of elements it wrote into meta tensors.
 * Nested calls each get their own count.
 */
export function countWrites(fn: () => void): number {
  const outer = activeCounter;
  const counter: Counter = { elements: 0 };
  activeCounter = counter;
  try {
    fn();
  } finally {
    activeCounter = outer;
  }
  return counter.elements;
}

const CASTABLE = new Set(["f32", "f16", "bf16"]);

/**
 * The only way loaders write: `dst = src` (casting between f32/f16/bf16). Shapes must match;
 * quantized dtypes (fp8, int8) must match exactly. When `dst` is a meta tensor, its element
 * count is added to the active {@link countWrites} counter and nothing is copied.
 *
 * When `src` is a row window (a chunk of a checkpoint tensor, see `rowWindow`, narrowed by the
 * loader), only the rows of dimension 0 it holds are written (or counted), into the same rows
 * of `dst`; a window that misses the loader's rows writes nothing. The backend only ever sees
 * plain views.
 */
export function copyInto(backend: Backend, dst: Tensor, src: Tensor): void {
  if (dst.shape.length !== src.shape.length || dst.shape.some((d, i) => d !== src.shape[i])) {
    throw new CheckpointError(
      "SHAPE_MISMATCH",
      `expected ${shapeString(dst.shape)}, got ${shapeString(src.shape)}`,
    );
  }
  if (dst.dtype !== src.dtype && !(CASTABLE.has(dst.dtype.name) && CASTABLE.has(src.dtype.name))) {
    throw new CheckpointError(
      "DTYPE_MISMATCH",
      `expected ${dst.dtype.name}, got ${src.dtype.name}`,
    );
  }
  if (dst.window) {
    throw new ReloadError("WINDOWED", `a load into ${dst}: a destination holds every row`);
  }
  if (dst.isMeta && !activeCounter) {
    throw new ReloadError("META_WRITE", `a load into meta tensor ${dst} outside of counting`);
  }
  if (src.window) {
    const { start, end } = src.window;
    if (end === start) return;
    dst = dst.narrow(0, start, end - start);
    src = src.windowRows();
  }
  if (dst.isMeta) {
    activeCounter!.elements += dst.numel;
    return;
  }
  backend.copy(dst, src);
}

/**
 * Sets every element of `dst` (contiguous) to `value`, as a load: counted instead when `dst` is
 * a meta tensor. For loaders that mark what a load covered (block scales a bf16 weight will get
 * when it is quantized).
 */
export function fillInto(backend: Backend, dst: Tensor, value: number): void {
  if (dst.isMeta) {
    if (!activeCounter) {
      throw new ReloadError("META_WRITE", `a load into meta tensor ${dst} outside of counting`);
    }
    activeCounter.elements += dst.numel;
    return;
  }
  backend.fill(dst, value);
}

/** Throws CheckpointError SHAPE_MISMATCH unless `t` has exactly `shape`; `what` names the load. */
export function expectShape(t: Tensor, shape: readonly number[], what: string): void {
  if (t.shape.length !== shape.length || t.shape.some((d, i) => d !== shape[i])) {
    throw new CheckpointError(
      "SHAPE_MISMATCH",
      `${what}: expected ${shapeString(shape)}, got ${shapeString(t.shape)}`,
    );
  }
}

/** The loader of plain tensors: the whole tensor (a one-element tensor may have any shape). */
export function defaultWeightLoader(backend: Backend): WeightLoader {
  return (slot, loaded) => {
    const dst = slot.tensor;
    const src = dst.numel === 1 && loaded.numel === 1 ? loaded.reshape(dst.shape) : loaded;
    copyInto(backend, dst, src);
  };
}

/**
 * The sub-tensor at index `i` of dimension 0 (the dimension is dropped). Of a row window, only
 * a row it holds can be selected.
 */
export function select0(t: Tensor, i: number): Tensor {
  const v = t.narrow(0, i, 1);
  if (v.window) {
    throw new ReloadError("WINDOWED", `select0: row ${i} of ${t} is not held`);
  }
  if (!v.storage) return Tensor.meta(t.shape.slice(1), t.dtype);
  return new Tensor(t.shape.slice(1), t.dtype, v.storage, v.offset, v.strides.slice(1));
}

// ------------------------------------------------------------------ modules

/** Where a checkpoint tensor goes: a module path, a slot name, and its shard and expert. */
export interface WeightTarget {
  /** Dotted path of the module from the model root (`""` for the root). */
  readonly path: string;
  /** Slot name inside that module (`weight`, `w13_weight`, ...). */
  readonly param: string;
  /** Shard of a fused tensor. */
  readonly shardId?: ShardId;
  /** Expert index of a FusedMoE load. */
  readonly expertId?: number;
}

/** A resolved checkpoint name: the target plus the module and slot it names. */
export interface ResolvedWeight extends WeightTarget {
  /** The module at `path`. */
  readonly module: Module;
  /** The slot `param` of that module. */
  readonly slot: TensorSlot;
}

/** A node of the model tree. Layers subclass it; containers use it as is. */
export class Module {
  /** Short type name for messages (`QKVParallelLinear`). */
  readonly typeName: string;
  /** The backend the module's tensors live on (layers set it; containers need none). */
  backend: Backend | undefined;
  /** How the module's model-format tensors become kernel format; none means no processing. */
  quantMethod: QuantMethod | undefined;
  /** Processed after every other layer at the end of a (re)load (attention: its scales). */
  processLast = false;
  readonly #children = new Map<string, Module>();
  readonly #slots = new Map<string, TensorSlot>();
  readonly #tied = new Set<string>();

  /** Creates an empty module. */
  constructor(typeName = "Module", backend?: Backend) {
    this.typeName = typeName;
    this.backend = backend;
  }

  /** Adds a child under `name` and returns it. */
  addModule<T extends Module>(name: string, child: T): T {
    if (name === "" || name.includes(".")) {
      throw new LayerwiseError("BAD_NAME", `invalid module name "${name}"`);
    }
    this.#children.set(name, child);
    return child;
  }

  /** The direct child `name`. */
  child(name: string): Module | undefined {
    return this.#children.get(name);
  }

  /** The module at a dotted path (`""` is this module). */
  getModule(path: string): Module | undefined {
    if (path === "") return this;
    const dot = path.indexOf(".");
    const head = this.#children.get(dot < 0 ? path : path.slice(0, dot));
    return dot < 0 ? head : head?.getModule(path.slice(dot + 1));
  }

  /** Registers (or replaces) the slot `name`, owned by this module. */
  setSlot(name: string, slot: TensorSlot): TensorSlot {
    this.#slots.set(name, slot);
    this.#tied.delete(name);
    return slot;
  }

  /** Removes the slot `name`. */
  deleteSlot(name: string): void {
    this.#slots.delete(name);
    this.#tied.delete(name);
  }

  /**
   * Registers another module's slot under `name` (weight tying: `lm_head.weight` is
   * `embed_tokens.weight`). The owner loads, processes and reloads it; this module only sees it.
   */
  tie(name: string, slot: TensorSlot): void {
    this.#slots.set(name, slot);
    this.#tied.add(name);
  }

  /** The slot `name` (owned or tied). */
  getSlot(name: string): TensorSlot | undefined {
    return this.#slots.get(name);
  }

  /** The slot `name`, or an error naming the module. */
  slot(name: string): TensorSlot {
    const s = this.#slots.get(name);
    if (!s) throw new LayerwiseError("NO_SLOT", `${this.typeName} has no tensor "${name}"`);
    return s;
  }

  /** Whether `name` is a tied slot owned by another module. */
  isTied(name: string): boolean {
    return this.#tied.has(name);
  }

  /** Slots this module owns (not tied ones), in registration order. */
  ownSlots(): [string, TensorSlot][] {
    return [...this.#slots].filter(([n]) => !this.#tied.has(n));
  }

  /** Direct children in order. */
  children(): [string, Module][] {
    return [...this.#children];
  }

  /** This module and every descendant with its dotted path, depth first, in order. */
  *namedModules(prefix = ""): Generator<[string, Module]> {
    yield [prefix, this];
    for (const [name, child] of this.#children) {
      yield* child.namedModules(prefix === "" ? name : `${prefix}.${name}`);
    }
  }

  /** Every slot with its dotted name, tied names included (a shared slot appears twice). */
  namedTensors(): [string, TensorSlot][] {
    const out: [string, TensorSlot][] = [];
    for (const [path, m] of this.namedModules()) {
      for (const [name, slot] of m.#slots) out.push([path === "" ? name : `${path}.${name}`, slot]);
    }
    return out;
  }

  /**
   * Elements of slot `name` that no load writes (vocabulary padding). A layer that received
   * everything but these is complete.
   */
  paddingElements(_name: string): number {
    return 0;
  }

  /**
   * Maps a checkpoint name to its target, or null to skip it on purpose (e.g. rotary
   * `inv_freq`). Models override this; the default splits `a.b.param` into path and slot.
   */
  mapCheckpointName(name: string): WeightTarget | null {
    const dot = name.lastIndexOf(".");
    return dot < 0 ? { path: "", param: name } : {
      path: name.slice(0, dot),
      param: name.slice(dot + 1),
    };
  }

  /** Resolves a checkpoint name; null when the model skips it; CheckpointError when unknown. */
  resolveWeight(name: string): ResolvedWeight | null {
    const target = this.mapCheckpointName(name);
    if (!target) return null;
    const module = this.getModule(target.path);
    const slot = module?.getSlot(target.param);
    if (!module || !slot) {
      throw new CheckpointError(
        "UNKNOWN_TENSOR",
        `${name}: the model has no tensor ${
          target.path === "" ? target.param : `${target.path}.${target.param}`
        }`,
      );
    }
    return { ...target, module, slot };
  }

  /**
   * Loads one checkpoint tensor through its slot's loader; false when the model skips the
   * name. Errors are rethrown with the checkpoint name in front.
   */
  loadWeight(name: string, loaded: Tensor): boolean {
    const r = this.resolveWeight(name);
    if (!r) return false;
    try {
      r.slot.weightLoader(r.slot, loaded, r.shardId, r.expertId);
    } catch (e) {
      throw prefixError(e, name);
    }
    return true;
  }
}

/** Rethrows a LayerwiseError with `name: ` in front of its message; other errors unchanged. */
export function prefixError(e: unknown, name: string): unknown {
  if (!(e instanceof LayerwiseError) || e.message.startsWith(`${name}:`)) return e;
  const Ctor = e.constructor as new (code: string, message: string) => LayerwiseError;
  return new Ctor(e.code, `${name}: ${e.message}`);
}

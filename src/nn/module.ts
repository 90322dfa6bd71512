/**
 * The module tree: modules with ordered named children and tensor slots (parameters and
 * buffers, see ./slots.ts). A module resolves checkpoint names to its slots and runs their
 * loaders.
 * @module
 */

import type { Backend } from "../backend/backend.ts";
import { CheckpointError, LayerwiseError, withMessage } from "../errors.ts";
import type { Tensor } from "../tensor/tensor.ts";
import type { QuantMethod } from "./quant_method.ts";
import type { ShardId, TensorSlot } from "./slots.ts";
import { pathText, qualifiedName } from "../messages.ts";

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

// Raised by every addModule anywhere, so a module's cached walk of its subtree (namedModules)
// knows when the tree may have changed; trees are built once and then walked on every reload.
let treeVersion = 0;

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
  #walk: { version: number; prefix: string; list: [string, Module][] } | undefined;

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
    treeVersion++;
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
    if (this.#tied.size === 0) return [...this.#slots];
    return [...this.#slots].filter(([n]) => !this.#tied.has(n));
  }

  /** Direct children in order. */
  children(): [string, Module][] {
    return [...this.#children];
  }

  /** This module and every descendant with its dotted path, depth first, in order. */
  *namedModules(prefix = ""): Generator<[string, Module]> {
    const w = this.#walk;
    if (w !== undefined && w.version === treeVersion && w.prefix === prefix) {
      yield* w.list;
      return;
    }
    const list: [string, Module][] = [];
    const visit = (path: string, m: Module) => {
      list.push([path, m]);
      for (const [name, child] of m.#children) visit(qualifiedName(path, name), child);
    };
    visit(prefix, this);
    this.#walk = { version: treeVersion, prefix, list };
    yield* list;
  }

  /** Every slot with its dotted name, tied names included (a shared slot appears twice). */
  namedTensors(): [string, TensorSlot][] {
    const out: [string, TensorSlot][] = [];
    for (const [path, m] of this.namedModules()) {
      for (const [name, slot] of m.#slots) out.push([qualifiedName(path, name), slot]);
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
  // The name comes from a checkpoint: escaped and cut like any name from input.
  const shown = pathText(name);
  if (!(e instanceof LayerwiseError) || e.message.startsWith(`${shown}:`)) return e;
  return withMessage(e, `${shown}: ${e.message}`);
}

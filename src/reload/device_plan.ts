/**
 * The reload plan of the device path (ARCHITECTURE.md, Read paths: "Device source"): for a model and a
 * source layout (the names, dtypes and shapes of the device tensors, in order), where every
 * source tensor goes: which rows of which kept kernel tensor, with which scale, through which
 * multi-tensor kernel. Planning is pure: it runs each layer's own loader under `recordWrites`
 * against placeholder tensors (no backend call, no byte moved) and turns the recorded views into
 * the tables of cuda/layerwise.h ("multi-tensor kernels"). Source addresses are not part of the
 * plan (the kernels read them from `bases`), so one plan serves every reload whose tensors have
 * the same layout, wherever they are.
 *
 * A layer is planned when its kernel format is its model format (copies and casts), or when an
 * online quant method (fp8 per tensor / per row / per 128 block, int8 per row) turns model
 * format into kernel format of the same shape, every source tensor of a quantized weight has
 * the model dtype, and every row is written exactly once. Other layers (fp8-serialized
 * checkpoints, attention scales, padding, duplicate or partial loads) are left to the host
 * lifecycle, which handles every case, on the same device tensors.
 * @module
 */

import type { Granularity, MultiTensorKind } from "../backend/backend.ts";
import { MULTI_TENSOR_FIELDS, QUANT_BLOCK, scaleCount } from "../backend/abi.ts";
import type { Module, ResolvedWeight } from "../nn/module.ts";
import { placeholderTensor, recordWrites, TensorSlot } from "../nn/slots.ts";
import { Fp8BlockMethod } from "../quant/fp8_block.ts";
import { OnlineQuantMethod } from "../quant/online.ts";
import { type DType, DTYPES, isModelFloat } from "../tensor/dtype.ts";
import type { Storage, Tensor } from "../tensor/tensor.ts";
import { getLayerwiseInfo } from "./layerwise.ts";
import type { TensorDescriptor } from "./validate.ts";

/**
 * Elements one work item covers (rows are whole; a tile is 128 x 128). Large enough that an
 * item's table lookups and block-wide reduction are small beside its bytes: on an H200 the 8B
 * absmax launch took 3.9 ms with 32768, 3.3 ms with 131072 and 7.0 ms with 8192 (BENCHMARKS.md).
 */
const ITEM_ELEMENTS = 131072;

/** One launch of the plan. */
export interface PlannedLaunch {
  /** `absmax`, `quant` or `copy`. */
  readonly op: "absmax" | "quant" | "copy";
  /** With `quant`. */
  readonly kind?: MultiTensorKind;
  /** First item. */
  readonly first: number;
  /** Items. */
  readonly count: number;
  /** Source dtype of every piece. */
  readonly srcDtype: DType;
  /** Destination dtype (copies). */
  readonly dstDtype?: DType;
}

/**
 * What to do once the sources of one phase have arrived (all of them, for a reload from tensors
 * that are all resident; bucket by bucket, for a broadcast).
 */
export interface DevicePhase {
  /** Layers written by this phase's launches (all their tensors come from the source). */
  readonly layers: readonly Module[];
  /** Each layer's path and whether a quant method turns its model format into kernel format. */
  readonly processed: readonly { readonly path: string; readonly quantized: boolean }[];
  /** Slots of those layers filled with their initValue before the launches. */
  readonly fills: readonly { readonly slot: TensorSlot; readonly value: number }[];
  /** The launches, in order. */
  readonly launches: readonly PlannedLaunch[];
  /**
   * Indices of this phase's source tensors that the launches do not cover: they go through the
   * host lifecycle (which copies what it keeps), in index order.
   */
  readonly hostLoads: readonly number[];
}

/** How sources arrive: all at once (default), or in phases with a bounded residency. */
export interface PlanArrival {
  /** Source tensors to leave out (names the model skips or does not have). */
  readonly skip?: readonly boolean[];
  /** The phase in which each source tensor arrives (default 0 for all). */
  readonly phaseOf?: readonly number[];
  /**
   * How many consecutive phases stay resident (default: all): a layer is planned only when its
   * sources arrive within this many phases, and is written in the phase its last one arrives.
   */
  readonly window?: number;
}

/** A plan for one (model, source layout); see the module doc. */
export interface DevicePlan {
  /** The layout it was made for: names, dtypes and shapes in order, and their phases. */
  readonly layoutKey: string;
  /** The phases, in arrival order. */
  readonly phases: readonly DevicePhase[];
  /** The tables, as they go to backend memory; `bases` is rewritten by every reload. */
  readonly table: Uint8Array;
  /** Byte offsets of the tables inside {@link DevicePlan.table}. */
  readonly offsets: {
    readonly targets: number;
    readonly pieces: number;
    readonly items: number;
    readonly partials: number;
    readonly counters: number;
    readonly bases: number;
  };
  /** Number of source tensors (entries of `bases`). */
  readonly sources: number;
  /** Kernel tensors the tables point into, with their addresses when planned. */
  readonly kept: readonly { readonly tensor: Tensor; readonly ptr: number }[];
  /** Counts, for reports and benchmarks. */
  readonly stats: {
    readonly targets: number;
    readonly pieces: number;
    readonly items: number;
    readonly layers: number;
    readonly launches: number;
    readonly hostLoads: number;
  };
}

/** The layout key of a list of descriptors (pointer-free). */
export function layoutKey(descs: readonly TensorDescriptor[]): string {
  return descs.map((d) => `${d.name}\u0000${d.dtype.name}\u0000${d.shape.join(",")}`).join(
    "\u0001",
  );
}

interface Piece {
  source: number;
  offset: number;
  pitch: number;
  row0: number;
  rows: number;
}

interface Target {
  phase: number;
  op: "absmax+quant" | "quant" | "copy";
  kind?: MultiTensorKind;
  srcDtype: DType;
  dstDtype: DType;
  dst: number;
  scale: number;
  dstPitch: number;
  rows: number;
  cols: number;
  pieces: Piece[];
}

const KIND: Readonly<Record<Granularity, MultiTensorKind>> = {
  tensor: "fp8-tensor",
  row: "fp8-row",
  block128: "fp8-block128",
};

/** rows x cols with pitches for a (dst, src) pair of views of equal numel, or null. */
function pairRegions(
  dst: Tensor,
  src: Tensor,
): { rows: number; cols: number; dstPitch: number; srcPitch: number } | null {
  const flat = (t: Tensor) => {
    const cols = t.shape.length === 0 ? 1 : t.shape[t.shape.length - 1];
    return { rows: cols === 0 ? 0 : t.numel / cols, cols, pitch: cols };
  };
  const d = dst.isContiguous ? null : dst.layout2d();
  const s = src.isContiguous ? null : src.layout2d();
  if ((!dst.isContiguous && !d) || (!src.isContiguous && !s)) return null;
  if (!d && !s) {
    const f = flat(dst);
    return { rows: f.rows, cols: f.cols, dstPitch: f.cols, srcPitch: f.cols };
  }
  if (!d) return { rows: s!.rows, cols: s!.cols, dstPitch: s!.cols, srcPitch: s!.pitch };
  if (!s) return { rows: d.rows, cols: d.cols, dstPitch: d.pitch, srcPitch: d.cols };
  if (d.rows !== s.rows || d.cols !== s.cols) return null;
  return { rows: d.rows, cols: d.cols, dstPitch: d.pitch, srcPitch: s.pitch };
}

/** The layer that owns a slot (tied names resolve to the owner). */
function ownerOf(model: Module): Map<TensorSlot, [Module, string]> {
  const out = new Map<TensorSlot, [Module, string]>();
  for (const [, m] of model.namedModules()) {
    for (const [name, slot] of m.ownSlots()) out.set(slot, [m, name]);
  }
  return out;
}

/**
 * Plans a device reload of `model` (loaded, recorded, not reloading) from tensors described by
 * `descs` (in source order; index i is `bases[i]`), arriving as `arrival` says. Descriptors
 * must have passed validation.
 */
export function planDeviceReload(
  model: Module,
  descs: readonly TensorDescriptor[],
  arrival: PlanArrival = {},
): DevicePlan {
  const skip = arrival.skip ?? [];
  const phaseOf = (i: number) => arrival.phaseOf?.[i] ?? 0;
  const window = arrival.window ?? Infinity;
  const owners = ownerOf(model);
  const paths = new Map([...model.namedModules()].map(([p, m]) => [m, p]));
  const byLayer = new Map<Module, Omit<Load, "desc">[]>();
  const hostLoads: number[] = [];
  descs.forEach((d, index) => {
    if (skip[index]) return;
    const r = model.resolveWeight(d.name);
    if (!r) return;
    const own = owners.get(r.slot);
    if (!own) {
      hostLoads.push(index);
      return;
    }
    const list = byLayer.get(own[0]) ?? [];
    list.push({ index, slot: own[1], r });
    byLayer.set(own[0], list);
  });
  const nPhases = Math.max(1, ...descs.map((_, i) => phaseOf(i) + 1));
  const phases = Array.from({ length: nPhases }, () => ({
    layers: [] as Module[],
    processed: [] as { path: string; quantized: boolean }[],
    fills: [] as { slot: TensorSlot; value: number }[],
    hostLoads: [] as number[],
  }));
  const targets: Target[] = [];
  const kept: { tensor: Tensor; ptr: number }[] = [];
  for (const [layer, loads] of byLayer) {
    const ph = loads.map((l) => phaseOf(l.index));
    const last = Math.max(...ph), first = Math.min(...ph);
    const planned = last - first < window
      ? planLayer(layer, loads.map((l) => ({ ...l, desc: descs[l.index] })))
      : null;
    if (!planned) {
      hostLoads.push(...loads.map((l) => l.index));
      continue;
    }
    phases[last].layers.push(layer);
    phases[last].processed.push({
      path: paths.get(layer) ?? "",
      quantized: layer.quantMethod !== undefined && layer.quantMethod.keepsModelFormat !== true,
    });
    phases[last].fills.push(...planned.fills);
    for (const t of planned.targets) t.phase = last;
    targets.push(...planned.targets);
    kept.push(...planned.kept);
  }
  for (const i of hostLoads.sort((a, b) => a - b)) phases[phaseOf(i)].hostLoads.push(i);
  const key = `${layoutKey(descs)}\u0002${
    descs.map((_, i) => phaseOf(i)).join(",")
  }\u0002${window}`;
  return buildTables(key, phases, kept, targets, descs.length);
}

interface Load {
  index: number;
  slot: string;
  desc: TensorDescriptor;
  r: ResolvedWeight;
}

/** The targets of one layer, or null when the host lifecycle must take it. */
function planLayer(
  layer: Module,
  loads: Load[],
): {
  targets: Target[];
  fills: { slot: TensorSlot; value: number }[];
  kept: { tensor: Tensor; ptr: number }[];
} | null {
  const info = getLayerwiseInfo(layer);
  const meta = info?.restoreMetadata;
  if (!meta || layer.processLast || !layer.backend) return null;
  const q = layer.quantMethod;
  // fp8-block takes model-dtype sources as an online method would (block-fp8 sources, fp8, are
  // left to the lifecycle below); its block scales in model format are what processing computes.
  const online = q instanceof OnlineQuantMethod || q instanceof Fp8BlockMethod ? q : null;
  const computed = new Set(q instanceof Fp8BlockMethod ? q.computedSlots : []);
  if (q !== undefined && !online && q.keepsModelFormat !== true) return null;
  // Placeholders of the model-format tensors, and which slot each belongs to.
  const fake = new Map<string, Tensor>();
  const slotOf = new Map<Storage, string>();
  for (const [name, m] of meta) {
    const t = placeholderTensor(m.meta.shape, m.meta.dtype);
    fake.set(name, t);
    slotOf.set(t.storage!, name);
  }
  const specs = new Map((online?.specs ?? []).map((s) => [s.name, s]));
  const seen = new Set<string>();
  const writes: { slot: string; source: number; dst: Tensor; src: Tensor }[] = [];
  for (const l of loads) {
    const key = `${l.slot}|${l.r.shardId ?? ""}|${l.r.expertId ?? ""}`;
    if (seen.has(key)) return null; // a duplicate load: the host path ignores the second
    seen.add(key);
    const m = meta.get(l.slot);
    if (!m) return null;
    const src = placeholderTensor(l.desc.shape, l.desc.dtype);
    const slot = new TensorSlot(fake.get(l.slot)!, m.loader);
    let rec;
    try {
      rec = recordWrites(() => m.loader(slot, src, l.r.shardId, l.r.expertId));
    } catch {
      return null; // validation has the message; the host path raises it
    }
    for (const w of rec) {
      const name = w.dst.storage ? slotOf.get(w.dst.storage) : undefined;
      if (name === undefined || w.src.storage !== src.storage) return null;
      writes.push({ slot: name, source: l.index, dst: w.dst, src: w.src });
    }
  }
  const targets: Target[] = [];
  const fills: { slot: TensorSlot; value: number }[] = [];
  const kept: { tensor: Tensor; ptr: number }[] = [];
  const written = new Map<string, number>();
  for (const w of writes) written.set(w.slot, (written.get(w.slot) ?? 0) + w.dst.numel);
  const quantTargets = new Map<string, Target>();
  for (const [name, m] of meta) {
    const kernel = m.slot.tensor;
    if (kernel.isMeta || !kernel.storage || kernel.storage.freed || !kernel.isContiguous) {
      return null;
    }
    const spec = specs.get(name);
    const got = written.get(name) ?? 0;
    // Kept with its weight (below); a load into it (block-fp8 scales) is the lifecycle's.
    if (computed.has(name)) {
      if (got > 0) return null;
      continue;
    }
    if (spec) {
      if (got !== m.meta.numel) return null;
      const scaleSlot = layer.getSlot(spec.scaleName);
      const scale = scaleSlot?.tensor;
      if (
        !scale || scale.isMeta || !scale.isContiguous || scale.dtype !== DTYPES.f32 ||
        kernel.dtype !== online!.target || kernel.shape.join() !== m.meta.shape.join()
      ) {
        return null;
      }
      kept.push({ tensor: kernel, ptr: kernel.ptr }, { tensor: scale, ptr: scale.ptr });
      continue;
    }
    // Kept in model format: the kernel tensor is the model-format tensor.
    if (kernel.dtype !== m.meta.dtype || kernel.shape.join() !== m.meta.shape.join()) return null;
    if (got < m.meta.numel) {
      if (m.slot.initValue === undefined) return null; // padding kept from before: host path
      fills.push({ slot: m.slot, value: m.slot.initValue });
    } else if (got > m.meta.numel) return null;
    kept.push({ tensor: kernel, ptr: kernel.ptr });
  }
  for (const w of writes) {
    const m = meta.get(w.slot)!;
    const kernel = m.slot.tensor;
    const srcDtype = w.src.dtype;
    const spec = specs.get(w.slot);
    if (spec) {
      if (srcDtype !== m.meta.dtype || !isModelFloat(srcDtype) || !w.dst.isContiguous) {
        return null;
      }
      const n = spec.shape.length;
      const rows = spec.shape[n - 2], cols = spec.shape[n - 1];
      const per = rows * cols;
      const e = Math.floor(w.dst.offset / per);
      const within = w.dst.offset - e * per;
      if (within % cols !== 0 || w.dst.numel % cols !== 0 || within + w.dst.numel > per) {
        return null;
      }
      let pitch = cols;
      if (!w.src.isContiguous) {
        const l = w.src.layout2d();
        if (!l || l.cols !== cols || l.rows !== w.dst.numel / cols) return null;
        pitch = l.pitch;
      }
      const g = online!.granularity;
      const scale = layer.getSlot(spec.scaleName)!.tensor;
      const perScale = scaleCount(rows, cols, g);
      const key = `${w.slot}|${e}`;
      let t = quantTargets.get(key);
      if (!t) {
        const kind: MultiTensorKind = online!.target === DTYPES.i8 ? "int8-row" : KIND[g];
        t = {
          phase: 0,
          op: kind === "fp8-tensor" ? "absmax+quant" : "quant",
          kind,
          srcDtype,
          dstDtype: kernel.dtype,
          dst: kernel.ptr + e * per * kernel.dtype.size,
          scale: scale.ptr + e * perScale * 4,
          dstPitch: cols,
          rows,
          cols,
          pieces: [],
        };
        quantTargets.set(key, t);
        targets.push(t);
      }
      if (t.srcDtype !== srcDtype) return null;
      t.pieces.push({
        source: w.source,
        offset: w.src.offset * srcDtype.size,
        pitch,
        row0: within / cols,
        rows: w.dst.numel / cols,
      });
      continue;
    }
    if (w.dst.numel === 0) continue;
    if (
      srcDtype !== kernel.dtype && !(srcDtype.floating && kernel.dtype.floating)
    ) {
      return null;
    }
    const p = pairRegions(w.dst, w.src);
    if (!p) return null;
    targets.push({
      phase: 0,
      op: "copy",
      srcDtype,
      dstDtype: kernel.dtype,
      dst: kernel.ptr + w.dst.offset * kernel.dtype.size,
      scale: 0,
      dstPitch: p.dstPitch,
      rows: p.rows,
      cols: p.cols,
      pieces: [{
        source: w.source,
        offset: w.src.offset * srcDtype.size,
        pitch: p.srcPitch,
        row0: 0,
        rows: p.rows,
      }],
    });
  }
  // Every row of a quantized matrix exactly once.
  for (const t of quantTargets.values()) {
    t.pieces.sort((a, b) => a.row0 - b.row0);
    let next = 0;
    for (const p of t.pieces) {
      if (p.row0 !== next) return null;
      next += p.rows;
    }
    if (next !== t.rows) return null;
  }
  return { targets, fills, kept };
}

function buildTables(
  key: string,
  phases: Omit<DevicePhase, "launches">[],
  kept: { tensor: Tensor; ptr: number }[],
  targets: Target[],
  sources: number,
): DevicePlan {
  // Launch groups: per phase, one per (op, kind, dtypes); items of a group are contiguous.
  const groupKey = (t: Target) => `${t.op}|${t.kind ?? ""}|${t.srcDtype.name}|${t.dstDtype.name}`;
  const tRows: number[][] = [], pRows: number[][] = [], iRows: number[][] = [];
  const out: DevicePhase[] = [];
  let launchCount = 0;
  for (let phase = 0; phase < phases.length; phase++) {
    const groups = new Map<string, Target[]>();
    for (const t of targets) {
      if (t.phase !== phase) continue;
      const k = groupKey(t);
      const g = groups.get(k) ?? [];
      g.push(t);
      groups.set(k, g);
    }
    const order = [...groups.keys()].sort((a, b) => rank(a) - rank(b));
    const launches: PlannedLaunch[] = [];
    const absmax: PlannedLaunch[] = [];
    for (const k of order) {
      const group = groups.get(k)!;
      const first = iRows.length;
      for (const t of group) {
        const ti = tRows.length;
        const item0 = iRows.length;
        if (t.kind === "fp8-block128") {
          const B = QUANT_BLOCK;
          for (let r = 0; r < t.rows; r += B) {
            for (let c = 0; c < t.cols; c += B) {
              iRows.push([ti, r, Math.min(B, t.rows - r), c, Math.min(B, t.cols - c)]);
            }
          }
        } else {
          let per = Math.max(1, Math.floor(ITEM_ELEMENTS / Math.max(1, t.cols)));
          // Per-row kinds work a row per warp: at least a row for each of a block's 8 warps.
          if (t.kind === "fp8-row" || t.kind === "int8-row") per = Math.ceil(per / 8) * 8;
          for (let r = 0; r < t.rows; r += per) {
            iRows.push([ti, r, Math.min(per, t.rows - r), 0, t.cols]);
          }
        }
        const piece0 = pRows.length;
        for (const p of t.pieces) pRows.push([p.source, p.offset, p.pitch, p.row0, p.rows]);
        tRows.push([
          t.dst,
          t.scale,
          t.dstPitch,
          t.rows,
          t.cols,
          piece0,
          t.pieces.length,
          item0,
          iRows.length - item0,
          0,
        ]);
      }
      const t0 = group[0];
      const count = iRows.length - first;
      if (count === 0) continue;
      if (t0.op === "absmax+quant") {
        absmax.push({ op: "absmax", first, count, srcDtype: t0.srcDtype });
        launches.push({ op: "quant", kind: "fp8-tensor", first, count, srcDtype: t0.srcDtype });
      } else if (t0.op === "quant") {
        launches.push({ op: "quant", kind: t0.kind, first, count, srcDtype: t0.srcDtype });
      } else {
        launches.push({ op: "copy", first, count, srcDtype: t0.srcDtype, dstDtype: t0.dstDtype });
      }
    }
    const all = [...absmax, ...launches];
    launchCount += all.length;
    out.push({ ...phases[phase], launches: all });
  }
  const f = MULTI_TENSOR_FIELDS;
  const targetsAt = 0;
  const piecesAt = targetsAt + tRows.length * f.target * 8;
  const itemsAt = piecesAt + pRows.length * f.piece * 8;
  const partialsAt = itemsAt + iRows.length * f.item * 8;
  const countersAt = align8(partialsAt + iRows.length * 4);
  const basesAt = align8(countersAt + tRows.length * 4);
  const table = new Uint8Array(basesAt + sources * 8);
  const v = new DataView(table.buffer);
  const put = (at: number, rows: number[][]) => {
    let o = at;
    for (const row of rows) {
      for (const x of row) {
        v.setBigUint64(o, BigInt(x), true);
        o += 8;
      }
    }
  };
  put(targetsAt, tRows);
  put(piecesAt, pRows);
  put(itemsAt, iRows);
  return {
    layoutKey: key,
    phases: out,
    table,
    offsets: {
      targets: targetsAt,
      pieces: piecesAt,
      items: itemsAt,
      partials: partialsAt,
      counters: countersAt,
      bases: basesAt,
    },
    sources,
    kept,
    stats: {
      targets: tRows.length,
      pieces: pRows.length,
      items: iRows.length,
      layers: out.reduce((a, p) => a + p.layers.length, 0),
      launches: launchCount,
      hostLoads: out.reduce((a, p) => a + p.hostLoads.length, 0),
    },
  };
}

/** Launch order: per-tensor fp8 first (its absmax launches run before every quantize). */
function rank(groupKey: string): number {
  return groupKey.startsWith("absmax") ? 0 : groupKey.startsWith("quant") ? 1 : 2;
}

function align8(n: number): number {
  return Math.ceil(n / 8) * 8;
}

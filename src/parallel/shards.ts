/**
 * The tensor-parallel sharding rules written out on host tensors, independently of the layers'
 * own bookkeeping (src/nn/layers.ts): which part of each unsharded kernel tensor rank r of n
 * holds. Used to check TP ranks against a TP=1 model (tests/tp_test.ts, and
 * scripts/bench_broadcast.ts --verify on GPUs).
 * @module
 */

import type { HostTensor } from "../checkpoint/safetensors.ts";
import { LayerwiseError } from "../errors.ts";
import type { ModelConfig } from "../models/config.ts";

function numel(shape: readonly number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

/** Elements [start, start+len) of a host tensor along `dim`, as a new contiguous tensor. */
export function narrowHost(
  t: HostTensor,
  dim: number,
  start: number,
  len: number,
): HostTensor {
  if (start < 0 || start + len > t.shape[dim]) {
    throw new LayerwiseError("OUT_OF_RANGE", `narrow ${start}+${len} of [${t.shape}]`);
  }
  const inner = numel(t.shape.slice(dim + 1)) * t.dtype.size;
  const outer = numel(t.shape.slice(0, dim));
  const shape = [...t.shape];
  shape[dim] = len;
  const out = new Uint8Array(outer * len * inner);
  for (let o = 0; o < outer; o++) {
    const src = (o * t.shape[dim] + start) * inner;
    out.set(t.data.subarray(src, src + len * inner), o * len * inner);
  }
  return { dtype: t.dtype, shape, data: out };
}

/** Concatenation of host tensors along `dim`. */
export function catHost(dim: number, parts: readonly HostTensor[]): HostTensor {
  if (parts.length === 0) throw new LayerwiseError("BAD_SHAPE", "catHost of nothing");
  const t0 = parts[0];
  const inner = numel(t0.shape.slice(dim + 1)) * t0.dtype.size;
  const outer = numel(t0.shape.slice(0, dim));
  const total = parts.reduce((a, p) => a + p.shape[dim], 0);
  const out = new Uint8Array(outer * total * inner);
  let at = 0;
  for (let o = 0; o < outer; o++) {
    for (const p of parts) {
      const n = p.shape[dim] * inner;
      out.set(p.data.subarray(o * n, (o + 1) * n), at);
      at += n;
    }
  }
  const shape = [...t0.shape];
  shape[dim] = total;
  return { dtype: t0.dtype, shape, data: out };
}

/** One logical block along the split dim: full size, size per rank, the block rank r holds. */
export interface ShardPart {
  /** Size of the block in the unsharded tensor. */
  full: number;
  /** Size a rank holds. */
  per: number;
  /** Which of the `full / per` pieces rank r holds (KV heads: replicas share one). */
  source: (r: number) => number;
}

/** How a kernel tensor is split across ranks. */
export type ShardRule =
  | { kind: "replicated" }
  | { kind: "parts"; dim: number; parts: ShardPart[] } // column-parallel (fused) outputs
  | { kind: "cols"; dim: number } // row-parallel inputs
  | { kind: "vocab" };

/**
 * The sharding rule of a kernel tensor (by its export name, see kernelTensors) for `n` ranks:
 * column-parallel outputs (fused blocks each on their own), row-parallel inputs, vocabulary
 * rows, or replicated. Throws for a name it does not know.
 */
export function shardRule(name: string, c: ModelConfig, n: number): ShardRule {
  const even = (full: number): ShardPart => ({ full, per: full / n, source: (r) => r });
  if (name.endsWith("qkv_proj.weight") || name.endsWith("qkv_proj.bias")) {
    const d = c.headDim, kv = c.numKvHeads;
    const kvPart: ShardPart = n >= kv
      ? { full: kv * d, per: d, source: (r) => Math.floor(r / (n / kv)) }
      : even(kv * d);
    return { kind: "parts", dim: 0, parts: [even(c.numHeads * d), kvPart, kvPart] };
  }
  if (name.endsWith("gate_up_proj.weight") || name.endsWith("gate_up_proj.bias")) {
    return {
      kind: "parts",
      dim: 0,
      parts: [even(c.intermediateSize), even(c.intermediateSize)],
    };
  }
  if (name.endsWith("experts.w13_weight")) {
    return {
      kind: "parts",
      dim: 1,
      parts: [even(c.moeIntermediateSize), even(c.moeIntermediateSize)],
    };
  }
  if (name.endsWith("experts.w2_weight")) return { kind: "cols", dim: 2 };
  if (name.endsWith("o_proj.weight") || name.endsWith("down_proj.weight")) {
    return { kind: "cols", dim: 1 };
  }
  if (name === "model.embed_tokens.weight" || name === "lm_head.weight") return { kind: "vocab" };
  if (
    name.endsWith("norm.weight") || name.endsWith("o_proj.bias") ||
    name.endsWith("down_proj.bias") || name.endsWith("block_sparse_moe.gate.weight") ||
    name.endsWith("mlp.gate.weight")
  ) {
    return { kind: "replicated" };
  }
  throw new LayerwiseError("NO_SHARD_RULE", `no sharding rule for ${name}`);
}

/**
 * Rank r's shard of an unsharded kernel tensor as kernelTensors exports it (vocabulary padding
 * cut off): what a TP rank must hold when the processing is elementwise (quant `none`).
 */
export function expectedShard(
  full: HostTensor,
  s: ShardRule,
  c: ModelConfig,
  n: number,
  r: number,
): HostTensor {
  switch (s.kind) {
    case "replicated":
      return full;
    case "cols": {
      const per = full.shape[s.dim] / n;
      return narrowHost(full, s.dim, r * per, per);
    }
    case "vocab": {
      const rows = Math.ceil(c.vocabSize / 64) * 64 / n;
      const first = r * rows;
      const real = Math.max(0, Math.min(rows, c.vocabSize - first));
      return narrowHost(full, 0, Math.min(first, c.vocabSize), real);
    }
    case "parts": {
      let at = 0;
      const pieces: HostTensor[] = [];
      for (const p of s.parts) {
        pieces.push(narrowHost(full, s.dim, at + p.source(r) * p.per, p.per));
        at += p.full;
      }
      return catHost(s.dim, pieces);
    }
  }
}

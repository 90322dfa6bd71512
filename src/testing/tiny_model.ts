/**
 * A tiny model for tests of the engine: the backends to run on, a seeded PRNG, a small
 * Llama-like (optionally Mixtral-like) model built from the layers, and synthetic checkpoints
 * with Hugging Face names. Independent of src/models on purpose, so that engine tests do not
 * depend on the model builders.
 * @module
 */

import type { Backend } from "../backend/backend.ts";
import { openCudaBackend } from "../backend/cuda/device.ts";
import { openWasmBackend } from "../backend/wasm.ts";
import {
  Attention,
  type AttentionScale,
  FusedMoE,
  type LayerContext,
  MergedColumnParallelLinear,
  ParallelLMHead,
  QKVParallelLinear,
  RMSNorm,
  RowParallelLinear,
  VocabParallelEmbedding,
} from "../nn/layers.ts";
import { Module, type WeightTarget } from "../nn/module.ts";
import { bf16Bits, rng } from "./synth.ts";
import type { QuantScheme } from "../nn/quant_method.ts";
import { createQuantMethod } from "../quant/create.ts";
import {
  loadWeights,
  reloadLayerwise,
  type ReloadLayerwiseOptions,
  type ReloadReport,
} from "../reload/load.ts";
import { type DType, DTYPES } from "../tensor/dtype.ts";
import type { Tensor } from "../tensor/tensor.ts";

/** Backends to test on: WebAssembly always, CUDA when it opens. */
export async function testBackends(): Promise<[string, Backend][]> {
  const out: [string, Backend][] = [["wasm", await openWasmBackend()]];
  try {
    out.push(["cuda", openCudaBackend()]);
  } catch {
    // no GPU here
  }
  return out;
}

/** bf16 bytes (round to nearest even) of `n` values `center + spread * u`, u uniform in [-1, 1). */
export function randomBf16(rand: () => number, n: number, spread = 1, center = 0): Uint8Array {
  const out = new Uint16Array(n);
  for (let i = 0; i < n; i++) out[i] = bf16Bits(center + spread * (rand() * 2 - 1));
  return new Uint8Array(out.buffer);
}

/** Shuffles in place with a seeded PRNG (Fisher-Yates). */
export function shuffle<T>(items: T[], seed: number): T[] {
  const r = rng(seed);
  for (let i = items.length - 1; i > 0; i--) {
    const j = Math.floor(r() * (i + 1));
    [items[i], items[j]] = [items[j], items[i]];
  }
  return items;
}

/** Shape of the tiny model. */
export interface TinyConfig {
  /** Vocabulary size (padded to a multiple of 64 by the embedding). */
  vocab: number;
  /** Hidden size. */
  hidden: number;
  /** Attention heads. */
  heads: number;
  /** Key/value heads (GQA when fewer than `heads`). */
  kvHeads: number;
  /** Size of one head. */
  headDim: number;
  /** MLP intermediate size. */
  intermediate: number;
  /** Decoder layers. */
  layers: number;
  /** lm_head tied to the embedding. */
  tie?: boolean;
  /** Attention scales the checkpoint carries. */
  kvScales?: AttentionScale[];
  /** Mixtral-like experts instead of the MLP, optionally split over expert-parallel ranks. */
  moe?: { experts: number; intermediate: number; epRank?: number; epSize?: number };
  /** Tensor-parallel rank (default 0). */
  tpRank?: number;
  /** Tensor-parallel ranks (default 1). */
  tpSize?: number;
}

/** A Llama shape with padding (vocab 250 -> 256), GQA, and edges for 128-blocks. */
export const TINY: TinyConfig = {
  vocab: 250,
  hidden: 192,
  heads: 6,
  kvHeads: 2,
  headDim: 32,
  intermediate: 320,
  layers: 2,
};

/** The tiny model: vLLM module names, Hugging Face checkpoint names. */
export class TinyModel extends Module {
  /** Its configuration. */
  readonly config: TinyConfig;

  /** Builds the (meta) model. */
  constructor(
    backend: Backend,
    config: TinyConfig,
    quant: QuantScheme,
    dtype: DType = DTYPES.bf16,
  ) {
    super("TinyForCausalLM", undefined);
    this.config = config;
    const c = config;
    const ctx: LayerContext = {
      backend,
      dtype,
      tpRank: c.tpRank,
      tpSize: c.tpSize,
      createQuantMethod,
    };
    const model = this.addModule("model", new Module("Model"));
    const embed = model.addModule(
      "embed_tokens",
      new VocabParallelEmbedding(ctx, c.vocab, c.hidden),
    );
    const layers = model.addModule("layers", new Module("Layers"));
    for (let i = 0; i < c.layers; i++) {
      const l = layers.addModule(String(i), new Module("DecoderLayer"));
      l.addModule("input_layernorm", new RMSNorm(ctx, c.hidden));
      const attn = l.addModule("self_attn", new Module("Attention block"));
      attn.addModule(
        "qkv_proj",
        new QKVParallelLinear(ctx, {
          hiddenSize: c.hidden,
          headDim: c.headDim,
          numHeads: c.heads,
          numKvHeads: c.kvHeads,
        }, { quant }),
      );
      attn.addModule(
        "o_proj",
        new RowParallelLinear(ctx, c.heads * c.headDim, c.hidden, { quant }),
      );
      attn.addModule("attn", new Attention(ctx, c.kvScales ?? []));
      l.addModule("post_attention_layernorm", new RMSNorm(ctx, c.hidden));
      if (c.moe) {
        const moe = l.addModule("block_sparse_moe", new Module("MoE block"));
        moe.addModule(
          "experts",
          new FusedMoE(ctx, {
            numExperts: c.moe.experts,
            hiddenSize: c.hidden,
            intermediateSize: c.moe.intermediate,
            epRank: c.moe.epRank,
            epSize: c.moe.epSize,
            quant,
          }),
        );
      } else {
        const mlp = l.addModule("mlp", new Module("MLP"));
        mlp.addModule(
          "gate_up_proj",
          new MergedColumnParallelLinear(ctx, c.hidden, [c.intermediate, c.intermediate], {
            quant,
          }),
        );
        mlp.addModule("down_proj", new RowParallelLinear(ctx, c.intermediate, c.hidden, { quant }));
      }
    }
    model.addModule("norm", new RMSNorm(ctx, c.hidden));
    if (c.tie) {
      const head = this.addModule("lm_head", new Module("ParallelLMHead (tied)"));
      head.tie("weight", embed.slot("weight"));
    } else {
      this.addModule("lm_head", new ParallelLMHead(ctx, c.vocab, c.hidden));
    }
  }

  /** Hugging Face names to the fused modules (q/k/v, gate/up, experts). */
  override mapCheckpointName(name: string): WeightTarget | null {
    let m = name.match(/^(model\.layers\.\d+)\.self_attn\.([qkv])_proj\.(weight|weight_scale)$/);
    if (m) return { path: `${m[1]}.self_attn.qkv_proj`, param: m[3], shardId: m[2] };
    m = name.match(/^(model\.layers\.\d+)\.mlp\.(gate|up)_proj\.(weight|weight_scale)$/);
    if (m) {
      return { path: `${m[1]}.mlp.gate_up_proj`, param: m[3], shardId: m[2] === "gate" ? 0 : 1 };
    }
    m = name.match(/^(model\.layers\.\d+)\.self_attn\.([qkv]_scale)$/);
    if (m) return { path: `${m[1]}.self_attn.attn`, param: m[2] };
    m = name.match(
      /^(model\.layers\.\d+\.block_sparse_moe\.experts)\.(\d+)\.(w[123])\.(weight|weight_scale)$/,
    );
    if (m) {
      const param = `${m[3] === "w2" ? "w2" : "w13"}_${m[4]}`;
      return { path: m[1], param, shardId: m[3], expertId: Number(m[2]) };
    }
    if (name.endsWith(".rotary_emb.inv_freq")) return null;
    return super.mapCheckpointName(name);
  }
}

/** A checkpoint tensor on the host. */
export interface HostWeight {
  /** Checkpoint name. */
  name: string;
  /** Element type. */
  dtype: DType;
  /** Sizes of each dimension. */
  shape: number[];
  /** The elements, little-endian. */
  bytes: Uint8Array;
}

/** Checkpoint-format (bf16) weights of the tiny model, in layer order, from a seed. */
export function makeCheckpoint(c: TinyConfig, seed: number): HostWeight[] {
  const r = rng(seed);
  const out: HostWeight[] = [];
  const w = (name: string, shape: number[], spread = 0.05, center = 0) => {
    const n = shape.reduce((a, b) => a * b, 1);
    out.push({ name, dtype: DTYPES.bf16, shape, bytes: randomBf16(r, n, spread, center) });
  };
  const H = c.hidden, d = c.headDim;
  w("model.embed_tokens.weight", [c.vocab, H]);
  for (let i = 0; i < c.layers; i++) {
    const p = `model.layers.${i}`;
    w(`${p}.input_layernorm.weight`, [H], 0.1, 1);
    w(`${p}.self_attn.q_proj.weight`, [c.heads * d, H]);
    w(`${p}.self_attn.k_proj.weight`, [c.kvHeads * d, H], 0.2);
    w(`${p}.self_attn.v_proj.weight`, [c.kvHeads * d, H], 0.01);
    w(`${p}.self_attn.o_proj.weight`, [H, c.heads * d]);
    for (const s of c.kvScales ?? []) {
      const v = 0.5 + r();
      out.push({ name: `${p}.self_attn.${s}`, dtype: DTYPES.f32, shape: [], bytes: f32Bytes(v) });
    }
    w(`${p}.post_attention_layernorm.weight`, [H], 0.1, 1);
    if (c.moe) {
      const I = c.moe.intermediate;
      for (let e = 0; e < c.moe.experts; e++) {
        const q = `${p}.block_sparse_moe.experts.${e}`;
        w(`${q}.w1.weight`, [I, H], 0.05 * (e + 1));
        w(`${q}.w2.weight`, [H, I]);
        w(`${q}.w3.weight`, [I, H], 0.02);
      }
    } else {
      w(`${p}.mlp.gate_proj.weight`, [c.intermediate, H], 0.08);
      w(`${p}.mlp.up_proj.weight`, [c.intermediate, H], 0.03);
      w(`${p}.mlp.down_proj.weight`, [H, c.intermediate]);
    }
  }
  w("model.norm.weight", [H], 0.1, 1);
  if (!c.tie) w("lm_head.weight", [c.vocab, H]);
  return out;
}

/** Little-endian f32 bytes of one value. */
export function f32Bytes(v: number): Uint8Array {
  return new Uint8Array(Float32Array.of(v).buffer);
}

const LINEAR = /(_proj|\.w[123])\.weight$/;

/**
 * The fp8-serialized form of a bf16 checkpoint: each linear weight quantized per tensor (its
 * own dynamic scale, as an fp8 checkpoint holds them) plus a `weight_scale` scalar.
 */
export function serializeFp8(backend: Backend, ckpt: HostWeight[]): HostWeight[] {
  const out: HostWeight[] = [];
  for (const t of ckpt) {
    if (!LINEAR.test(t.name)) {
      out.push(t);
      continue;
    }
    const { q, scale } = quantizeFp8PerTensor(backend, t.shape, t.dtype, t.bytes);
    out.push({ name: t.name, dtype: DTYPES.f8_e4m3fn, shape: t.shape, bytes: q });
    out.push({
      name: t.name.replace(/weight$/, "weight_scale"),
      dtype: DTYPES.f32,
      shape: [],
      bytes: scale,
    });
  }
  return out;
}

/**
 * fp8 (e4m3fn) per-tensor quantization of host bytes on `backend`, with a dynamic scale: the
 * quantized bytes and the f32 scale's four bytes.
 */
export function quantizeFp8PerTensor(
  backend: Backend,
  shape: readonly number[],
  dtype: DType,
  bytes: Uint8Array,
): { q: Uint8Array; scale: Uint8Array } {
  const x = backend.empty(shape, dtype);
  const q = backend.empty(shape, DTYPES.f8_e4m3fn);
  const s = backend.empty([1], DTYPES.f32);
  try {
    backend.upload(x, bytes);
    backend.quantizeFp8(q, s, x, "tensor", true);
    return { q: backend.download(q), scale: backend.download(s) };
  } finally {
    for (const u of [x, q, s]) backend.free(u.storage!);
  }
}

/** The checkpoint a model with `quant` loads (fp8-serialized wants fp8 weights). */
export function checkpointFor(
  backend: Backend,
  c: TinyConfig,
  seed: number,
  quant: QuantScheme,
): HostWeight[] {
  const ckpt = makeCheckpoint(c, seed);
  return quant === "fp8-serialized" ? serializeFp8(backend, ckpt) : ckpt;
}

/** Uploads host weights; the caller frees them with {@link freeWeights}. */
export function uploadWeights(backend: Backend, host: HostWeight[]): [string, Tensor][] {
  return host.map((h) => {
    const t = backend.empty(h.shape, h.dtype);
    backend.upload(t, h.bytes);
    return [h.name, t];
  });
}

/** Frees uploaded weights. */
export function freeWeights(backend: Backend, ws: [string, Tensor][]): void {
  for (const [, t] of ws) backend.free(t.storage!);
}

/** Every tensor of a model (tied names included) downloaded, by name. */
export function kernelBytes(backend: Backend, model: Module): Map<string, Uint8Array> {
  return new Map(model.namedTensors().map(([n, s]) => [n, backend.download(s.tensor)]));
}

/** Address, shape and dtype of every tensor, by name. */
export function kernelLayout(model: Module): Map<string, string> {
  return new Map(
    model.namedTensors().map(([n, s]) => [n, `${s.tensor.ptr} ${s.tensor}`]),
  );
}

/** Frees every tensor of a loaded model (each storage once). */
export function freeModule(backend: Backend, model: Module): void {
  const seen = new Set<unknown>();
  for (const [, s] of model.namedTensors()) {
    const st = s.tensor.storage;
    if (st && !st.freed && !seen.has(st)) {
      seen.add(st);
      backend.free(st);
    }
  }
}

/** A model built on `b` and loaded from host weights `host`. */
export async function freshModel(
  b: Backend,
  c: TinyConfig,
  quant: QuantScheme,
  host: HostWeight[],
): Promise<TinyModel> {
  const model = new TinyModel(b, c, quant);
  const ws = uploadWeights(b, host);
  try {
    await loadWeights(model, ws);
  } finally {
    freeWeights(b, ws);
  }
  return model;
}

/** Reloads `model` from host weights (uploaded for the call, freed after). */
export async function reloadHost(
  b: Backend,
  model: Module,
  host: HostWeight[],
  options: ReloadLayerwiseOptions = {},
): Promise<ReloadReport> {
  const ws = uploadWeights(b, host);
  try {
    return await reloadLayerwise(model, ws, options);
  } finally {
    freeWeights(b, ws);
  }
}

/** Whether two byte arrays are equal. */
export function equalBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

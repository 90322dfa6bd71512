/**
 * Seeded synthetic Llama checkpoints for the demo (and for tests that need a checkpoint of given
 * shapes): bf16 tensors under Hugging Face names, written with the checkpoint writer.
 * @module
 */

import { writeSafetensors } from "../checkpoint/safetensors.ts";
import type { HostTensor } from "../checkpoint/safetensors.ts";
import { DTYPES } from "../tensor/dtype.ts";

/** Shapes of a synthetic Llama model. */
export interface SynthShape {
  /** Width of the residual stream. */
  hiddenSize: number;
  /** MLP width. */
  intermediateSize: number;
  /** Decoder layers. */
  numLayers: number;
  /** Query heads. */
  numHeads: number;
  /** Key/value heads. */
  numKvHeads: number;
  /** Vocabulary rows. */
  vocabSize: number;
  /** Whether lm_head shares the embedding. */
  tieWordEmbeddings: boolean;
}

/**
 * The demo model: ~52 M parameters, ~104 MB of bf16 (8 layers of 5.7 M, a tied 6.3 M
 * embedding). Small enough to generate, load and reload in seconds on WebAssembly, big enough
 * for the rate to mean something.
 */
export const DEMO_SHAPE: Readonly<SynthShape> = Object.freeze({
  hiddenSize: 768,
  intermediateSize: 1792,
  numLayers: 8,
  numHeads: 12,
  numKvHeads: 4,
  vocabSize: 8192,
  tieWordEmbeddings: true,
});

/** A Hugging Face `config.json` object for a synthetic Llama. */
export function synthConfig(s: SynthShape): Record<string, unknown> {
  return {
    architectures: ["LlamaForCausalLM"],
    model_type: "llama",
    dtype: "bfloat16",
    hidden_size: s.hiddenSize,
    intermediate_size: s.intermediateSize,
    num_hidden_layers: s.numLayers,
    num_attention_heads: s.numHeads,
    num_key_value_heads: s.numKvHeads,
    head_dim: s.hiddenSize / s.numHeads,
    vocab_size: s.vocabSize,
    tie_word_embeddings: s.tieWordEmbeddings,
    rms_norm_eps: 1e-6,
    hidden_act: "silu",
  };
}

/** Checkpoint-format names and shapes of a synthetic Llama, in model order. */
export function synthTensorShapes(s: SynthShape): [string, number[]][] {
  const h = s.hiddenSize;
  const d = h / s.numHeads;
  const out: [string, number[]][] = [["model.embed_tokens.weight", [s.vocabSize, h]]];
  for (let i = 0; i < s.numLayers; i++) {
    const p = `model.layers.${i}`;
    out.push(
      [`${p}.input_layernorm.weight`, [h]],
      [`${p}.self_attn.q_proj.weight`, [s.numHeads * d, h]],
      [`${p}.self_attn.k_proj.weight`, [s.numKvHeads * d, h]],
      [`${p}.self_attn.v_proj.weight`, [s.numKvHeads * d, h]],
      [`${p}.self_attn.o_proj.weight`, [h, s.numHeads * d]],
      [`${p}.post_attention_layernorm.weight`, [h]],
      [`${p}.mlp.gate_proj.weight`, [s.intermediateSize, h]],
      [`${p}.mlp.up_proj.weight`, [s.intermediateSize, h]],
      [`${p}.mlp.down_proj.weight`, [h, s.intermediateSize]],
    );
  }
  out.push(["model.norm.weight", [h]]);
  if (!s.tieWordEmbeddings) out.push(["lm_head.weight", [s.vocabSize, h]]);
  return out;
}

const F32 = new Float32Array(1);
const U32 = new Uint32Array(F32.buffer);

/** Rounds a number to bf16 (nearest, ties to even) and returns its bits. */
export function bf16Bits(x: number): number {
  F32[0] = x;
  const u = U32[0];
  if ((u & 0x7fffffff) > 0x7f800000) return (u >>> 16) | 0x40; // NaN stays NaN
  return ((u + 0x7fff + ((u >>> 16) & 1)) >>> 16) & 0xffff;
}

/** The number a bf16 bit pattern stands for. */
export function bf16Value(bits: number): number {
  U32[0] = bits << 16;
  return F32[0];
}

/** A small fast seeded generator (mulberry32) of numbers in [0, 1). */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/**
 * Seeded bf16 tensors: norms near 1, everything else a triangular distribution of spread about
 * `0.02` (a typical initializer), with a few larger values per tensor so that scales differ
 * between tensors and seeds.
 */
export function synthTensors(s: SynthShape, seed: number): Map<string, HostTensor> {
  const next = rng(seed);
  const out = new Map<string, HostTensor>();
  for (const [name, shape] of synthTensorShapes(s)) {
    const n = shape.reduce((a, b) => a * b, 1);
    const bits = new Uint16Array(n);
    if (name.endsWith("norm.weight")) {
      for (let i = 0; i < n; i++) bits[i] = bf16Bits(1 + 0.1 * (next() - 0.5));
    } else {
      const spread = 0.02 * (0.5 + next());
      for (let i = 0; i < n; i++) bits[i] = bf16Bits(spread * (next() + next() - 1));
      for (let k = 0; k < 8; k++) {
        bits[Math.floor(next() * n)] = bf16Bits(spread * 6 * (next() - 0.5));
      }
    }
    out.set(name, {
      dtype: DTYPES.bf16,
      shape,
      data: new Uint8Array(bits.buffer),
    });
  }
  return out;
}

/**
 * Writes a synthetic checkpoint into `dir` (which must exist): `config.json` and either one
 * `model.safetensors` or, with `shards > 1`, that many files plus the index.
 */
export async function writeSynthCheckpoint(
  dir: string,
  s: SynthShape,
  tensors: Map<string, HostTensor>,
  shards = 1,
): Promise<number> {
  await Deno.writeTextFile(`${dir}/config.json`, JSON.stringify(synthConfig(s), null, 2));
  const entries = [...tensors];
  const bytes = entries.reduce((a, [, t]) => a + t.data.byteLength, 0);
  if (shards <= 1) {
    await writeSafetensors(`${dir}/model.safetensors`, entries, { format: "pt" });
    return bytes;
  }
  const weightMap: Record<string, string> = {};
  const per = Math.ceil(entries.length / shards);
  for (let k = 0; k < shards; k++) {
    const file = `model-${String(k + 1).padStart(5, "0")}-of-${
      String(shards).padStart(5, "0")
    }.safetensors`;
    const part = entries.slice(k * per, (k + 1) * per);
    for (const [name] of part) weightMap[name] = file;
    await writeSafetensors(`${dir}/${file}`, part, { format: "pt" });
  }
  await Deno.writeTextFile(
    `${dir}/model.safetensors.index.json`,
    JSON.stringify({ metadata: { total_size: bytes }, weight_map: weightMap }, null, 2),
  );
  return bytes;
}

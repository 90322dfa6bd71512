/**
 * The block-fp8 reload bench: one synthetic Llama-shaped checkpoint written twice, as bf16 and
 * as block-fp8 (every decoder linear quantized per 128x128 block on the backend, with its
 * `weight_scale_inv`, as DeepSeek-V3 and Qwen3-FP8 ship), one file per decoder layer; one
 * `fp8-block` model reloaded N times from each. Prints the seconds and GB/s of checkpoint bytes
 * of each, and the ratio of the block-fp8 reload's best time to the bf16 one's from the same
 * run, against the limit 1: a block-fp8 checkpoint is half the bytes and needs no quantization
 * (its fp8 rows and scale rows are copied as stored), so it must not be slower.
 *
 *   deno run -A scripts/bench_block_fp8.ts [--backend auto|cuda|wasm] [--shape 8b|small]
 *       [--runs N] [--dir DIR] [--keep]
 *
 * Files go to /dev/shm when it has room, else to a temporary directory; both checkpoints are
 * read once before timing (page cache warm).
 * @module
 */

import { parseArgs } from "node:util";
import type { Backend } from "../src/backend/backend.ts";
import { openBackend } from "../src/backend/select.ts";
import { type HostTensor, writeSafetensors } from "../src/checkpoint/safetensors.ts";
import {
  bf16Bits,
  quantizeBlock128,
  rng,
  synthConfig,
  type SynthShape,
  synthTensorShapes,
} from "../testing.ts";
import { loadModel, reloadWeights } from "../src/models/load.ts";
import { freeModel } from "../src/parallel/tp.ts";
import { DTYPES } from "../src/tensor/dtype.ts";
import { availableBytes, SHAPE_8B, SHAPE_SMALL } from "./bench_reload.ts";

/** Options of {@link benchBlockFp8}. */
export interface BlockFp8BenchOptions {
  /** The checkpoint's shape (its shards must be whole 128-row blocks). */
  shape: SynthShape;
  /** Reloads from each checkpoint. */
  runs: number;
  /** Where to write the checkpoints (default /dev/shm or a temporary directory). */
  dir?: string;
  /** Keep the checkpoints. */
  keep?: boolean;
}

/** What {@link benchBlockFp8} measured. */
export interface BlockFp8BenchResult {
  /** Checkpoint bytes of the bf16 and the block-fp8 checkpoint. */
  bytes: { bf16: number; fp8: number };
  /** Seconds of every reload, per checkpoint. */
  seconds: { bf16: number[]; fp8: number[] };
  /** Best block-fp8 time over best bf16 time (limit: at most 1). */
  ratio: number;
}

const GB = 1e9;

/** One random block of bf16 values; tensors are rotations of it (cheap to make at 8B). */
function randomBlock(elements: number): Uint16Array {
  const next = rng(11);
  const bits = new Uint16Array(elements);
  for (let i = 0; i < elements; i++) bits[i] = bf16Bits(0.02 * (next() + next() - 1));
  return bits;
}

function bf16Tensor(shape: number[], block: Uint16Array, index: number): HostTensor {
  const n = shape.reduce((a, b) => a * b, 1);
  const bits = new Uint16Array(n);
  let pos = (index * 7919) % block.length;
  for (let done = 0; done < n;) {
    const k = Math.min(n - done, block.length - pos);
    bits.set(block.subarray(pos, pos + k), done);
    done += k;
    pos = 0;
  }
  bits[0] = bf16Bits(0.05 + 0.01 * (index % 17)); // per-tensor absmax, so scales differ
  return { dtype: DTYPES.bf16, shape, data: new Uint8Array(bits.buffer) };
}

/** Writes both checkpoints, one file per decoder layer (and one for the rest); returns bytes. */
async function writeBoth(
  b: Backend,
  shape: SynthShape,
  bf16Dir: string,
  fp8Dir: string,
): Promise<{ bf16: number; fp8: number }> {
  const block = randomBlock(1 << 22);
  const groups = new Map<string, [string, number[], number][]>();
  synthTensorShapes(shape).forEach(([name, dims], i) => {
    const m = /^model\.layers\.(\d+)\./.exec(name);
    const file = m ? `layer-${m[1].padStart(3, "0")}` : "rest";
    groups.set(file, [...(groups.get(file) ?? []), [name, dims, i]]);
  });
  const maps = { bf16: {} as Record<string, string>, fp8: {} as Record<string, string> };
  const bytes = { bf16: 0, fp8: 0 };
  for (const [file, list] of groups) {
    const bf: [string, HostTensor][] = [], fp: [string, HostTensor][] = [];
    for (const [name, dims, i] of list) {
      const t = bf16Tensor(dims, block, i);
      bf.push([name, t]);
      if (/_proj\.weight$/.test(name)) {
        const [q, s] = quantizeBlock128(b, t);
        fp.push([name, q], [`${name}_scale_inv`, s]);
      } else fp.push([name, t]);
    }
    for (const [kind, dir, entries] of [["bf16", bf16Dir, bf], ["fp8", fp8Dir, fp]] as const) {
      await writeSafetensors(`${dir}/${file}.safetensors`, entries, { format: "pt" });
      for (const [name, t] of entries) {
        maps[kind][name] = `${file}.safetensors`;
        bytes[kind] += t.data.byteLength;
      }
    }
  }
  const config = synthConfig(shape);
  for (const [kind, dir] of [["bf16", bf16Dir], ["fp8", fp8Dir]] as const) {
    await Deno.writeTextFile(
      `${dir}/model.safetensors.index.json`,
      JSON.stringify({ metadata: { total_size: bytes[kind] }, weight_map: maps[kind] }),
    );
    const c = kind === "bf16" ? config : {
      ...config,
      quantization_config: { quant_method: "fp8", fmt: "e4m3", weight_block_size: [128, 128] },
    };
    await Deno.writeTextFile(`${dir}/config.json`, JSON.stringify(c, null, 2));
  }
  return bytes;
}

async function warm(dir: string): Promise<void> {
  for await (const e of Deno.readDir(dir)) if (e.isFile) await Deno.readFile(`${dir}/${e.name}`);
}

async function workDir(dir: string | undefined, need: number): Promise<string> {
  const prefix = "layerwise-block-fp8-";
  if (dir !== undefined) {
    await Deno.mkdir(dir, { recursive: true });
    return await Deno.makeTempDir({ dir, prefix });
  }
  const shm = "/dev/shm";
  return availableBytes(shm) > 1.2 * need
    ? await Deno.makeTempDir({ dir: shm, prefix })
    : await Deno.makeTempDir({ prefix });
}

/** Runs the bench on `backend` and prints its table (see the module doc). */
export async function benchBlockFp8(
  backend: Backend,
  o: BlockFp8BenchOptions,
): Promise<BlockFp8BenchResult> {
  const estimate = 3 * synthTensorShapes(o.shape)
    .reduce((a, [, s]) => a + s.reduce((x, y) => x * y, 1), 0);
  const root = await workDir(o.dir, estimate);
  const bf16Dir = `${root}/bf16`, fp8Dir = `${root}/fp8`;
  await Deno.mkdir(bf16Dir);
  await Deno.mkdir(fp8Dir);
  try {
    const bytes = await writeBoth(backend, o.shape, bf16Dir, fp8Dir);
    await warm(bf16Dir);
    await warm(fp8Dir);
    const model = await loadModel(bf16Dir, { backend, quant: "fp8-block" });
    const seconds = { bf16: [] as number[], fp8: [] as number[] };
    try {
      for (let i = 0; i < o.runs; i++) {
        // Alternating, so that both see the same machine state.
        for (const kind of ["bf16", "fp8"] as const) {
          const r = await reloadWeights(model, kind === "bf16" ? bf16Dir : fp8Dir);
          if (!r.storageKept) throw new Error("a kernel tensor moved");
          seconds[kind].push(r.seconds);
        }
      }
    } finally {
      freeModel(model);
    }
    const best = (xs: number[]) => Math.min(...xs);
    const ratio = best(seconds.fp8) / best(seconds.bf16);
    console.log(`block-fp8 reload bench on ${backend.description} (${root})`);
    for (const kind of ["bf16", "fp8"] as const) {
      const t = best(seconds[kind]);
      console.log(
        `  ${kind === "bf16" ? "bf16      -> fp8-block" : "block-fp8 -> fp8-block"}: ${
          (bytes[kind] / GB).toFixed(2)
        } GB, best ${t.toFixed(3)} s (${(bytes[kind] / t / GB).toFixed(2)} GB/s), runs ${
          seconds[kind].map((s) => s.toFixed(3)).join(" ")
        }`,
      );
    }
    console.log(
      `  block-fp8 time / bf16 time: ${ratio.toFixed(2)} (limit <= 1: ${
        ratio <= 1 ? "met" : "NOT met"
      })`,
    );
    return { bytes, seconds, ratio };
  } finally {
    if (!o.keep) await Deno.remove(root, { recursive: true });
  }
}

if (import.meta.main) {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      backend: { type: "string", default: "auto" },
      shape: { type: "string" },
      runs: { type: "string", default: "3" },
      dir: { type: "string" },
      keep: { type: "boolean" },
    },
  });
  const backend = await openBackend({ backend: values.backend as "auto" | "cuda" | "wasm" });
  try {
    const shape = (values.shape ?? (backend.kind === "cuda" ? "8b" : "small")) === "8b"
      ? SHAPE_8B
      : SHAPE_SMALL;
    await benchBlockFp8(backend, {
      shape,
      runs: Number(values.runs),
      dir: values.dir,
      keep: values.keep,
    });
  } finally {
    backend.close();
  }
}

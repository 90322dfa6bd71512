/**
 * The serve bench (`deno task bench --only serve`): a streamed update (`PUT /v1/update/stream`)
 * of a synthetic Llama-shaped bf16 checkpoint against a plain loopback upload of the same bytes
 * to a server that discards them, both sent by the same outside client (curl when present,
 * else fetch), as a ratio (limit: at least 0.5). On CUDA with PyTorch, also the 8B shape pushed
 * by a PyTorch process over CUDA IPC (scripts/bench_serve_ipc.py), zero-copy (the server reads
 * the trainer's tensors in place) and, for comparison, packed into the client's reused buckets:
 * milliseconds per update from the client's call to its reply.
 * @module
 */

import type { BackendChoice } from "../src/backend/select.ts";
import { commandSucceeds, type SynthShape } from "../testing.ts";
import { READ_CHUNK_BYTES } from "../src/models/weights.ts";
import { startServer } from "../src/server/server.ts";
import type { UpdateSummary } from "../src/server/service.ts";
import { layerModelBytes, SHAPE_8B, SHAPE_SMALL, writeBenchCheckpoint } from "./bench_reload.ts";

/** Options of {@link benchServe}. */
export interface ServeBenchOptions {
  /** Backend of the server (default auto). */
  backend?: BackendChoice;
  /** Timed runs of each upload (default 3; one warm-up run each comes first). */
  runs?: number;
  /** `8b` or `small` for the streamed comparison (default small). */
  shape?: "8b" | "small";
  /** Where the checkpoints go (default a temporary folder, removed after). */
  dir?: string;
  /** Updates pushed over IPC (default 5, the first one maps the buckets and is not counted). */
  ipcUpdates?: number;
}

const GB = 1e9;
const MB = 1e6;
const LIMIT_RATIO = 0.5;
const IPC_LIMIT_MS = 25;

/** Uploads `file` with PUT to `url`; returns seconds from the first byte sent to the reply. */
async function upload(url: string, file: string, curl: boolean): Promise<number> {
  if (curl) {
    const out = await new Deno.Command("curl", {
      args: ["-sS", "-T", file, "-o", "/dev/null", "-w", "%{http_code} %{time_total}", url],
      stdout: "piped",
      stderr: "piped",
    }).output();
    const [code, seconds] = new TextDecoder().decode(out.stdout).trim().split(" ");
    if (!out.success || code !== "200") {
      throw new Error(`upload to ${url}: HTTP ${code} ${new TextDecoder().decode(out.stderr)}`);
    }
    return Number(seconds);
  }
  const f = await Deno.open(file, { read: true });
  const t0 = performance.now();
  const r = await fetch(url, {
    method: "PUT",
    body: f.readable,
    headers: { "content-length": String((await Deno.stat(file)).size) },
  });
  await r.arrayBuffer();
  if (r.status !== 200) throw new Error(`upload to ${url}: HTTP ${r.status}`);
  return (performance.now() - t0) / 1000;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}

function pythonWithTorch(): boolean {
  return commandSucceeds("python3", [
    "-c",
    "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)",
  ]);
}

/** Runs the serve bench and prints each figure beside its limit; returns the figures. */
export async function benchServe(
  options: ServeBenchOptions = {},
): Promise<Record<string, unknown>> {
  const runs = options.runs ?? 3;
  const shape: SynthShape = options.shape === "8b" ? SHAPE_8B : SHAPE_SMALL;
  const root = options.dir ?? await Deno.makeTempDir({ prefix: "layerwise-serve-bench-" });
  const result: Record<string, unknown> = { date: new Date().toISOString(), shape };
  const curl = commandSucceeds("curl", ["--version"]);
  const discard = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: () => {} },
    async (req) => {
      let n = 0;
      for await (const chunk of req.body ?? []) n += chunk.byteLength;
      return Response.json({ received: n });
    },
  );
  let server: Awaited<ReturnType<typeof startServer>> | null = null;
  try {
    const dir = `${root}/small`;
    const bytes = await writeBenchCheckpoint(dir, shape);
    const shards = [...Deno.readDirSync(dir)].filter((e) => e.name.endsWith(".safetensors"));
    if (shards.length !== 1) throw new Error(`serve bench: expected one shard in ${dir}`);
    const file = `${dir}/${shards[0].name}`;
    const fileBytes = (await Deno.stat(file)).size;
    server = await startServer({ model: dir, backend: options.backend, port: 0 });
    const model = await server.ready;
    console.log(
      `\nserve bench: ${model.device.description}, Llama-shaped bf16 ${
        (bytes / GB).toFixed(2)
      } GB (${shape.numLayers} layers, hidden ${shape.hiddenSize}) -> fp8 per tensor; client: ${
        curl ? "curl -T (a separate process)" : "fetch (in process)"
      }`,
    );
    const discardUrl = `http://127.0.0.1:${(discard.addr as Deno.NetAddr).port}/`;
    const streamUrl = `${server.url}/v1/update/stream`;
    const plain: number[] = [], streamed: number[] = [];
    for (let i = 0; i <= runs; i++) {
      const p = await upload(discardUrl, file, curl);
      const s = await upload(streamUrl, file, curl);
      if (i > 0) { // the first pair warms the page cache and the JIT
        plain.push(p);
        streamed.push(s);
      }
    }
    const last = server.service.lastUpdate as UpdateSummary;
    const tp = median(plain), ts = median(streamed);
    const ratio = tp / ts;
    const rate = (s: number) => `${(fileBytes / s / GB).toFixed(3)} GB/s`;
    console.log(
      `  plain loopback upload to a discarding server   ${tp.toFixed(3)} s  ${
        rate(tp)
      } (median of ${runs})`,
    );
    console.log(
      `  streamed update, PUT /v1/update/stream         ${ts.toFixed(3)} s  ${rate(ts)}  ` +
        `ratio ${ratio.toFixed(2)} (limit >= ${LIMIT_RATIO}) ${
          ratio >= LIMIT_RATIO ? "ok" : "BELOW LIMIT"
        }`,
    );
    const limitScratch = layerModelBytes(shape) + READ_CHUNK_BYTES;
    console.log(
      `  peak scratch of the streamed update: ${(last.peakScratchBytes / MB).toFixed(1)} MB ` +
        `(limit: one decoder layer in model format + one chunk = ${
          (limitScratch / MB).toFixed(1)
        } MB; ` +
        `ratio ${(last.peakScratchBytes / limitScratch).toFixed(2)})`,
    );
    result.stream = {
      fileBytes,
      plainSeconds: plain,
      streamSeconds: streamed,
      ratio,
      limit: LIMIT_RATIO,
      peakScratchBytes: last.peakScratchBytes,
      limitScratchBytes: limitScratch,
      client: curl ? "curl" : "fetch",
    };
    await server.stop();
    server = null;
    if (model.device.kind === "cuda" && pythonWithTorch()) {
      result.ipc = await benchIpc(root, options);
    } else {
      console.log("  ipc: needs the cuda backend and PyTorch with CUDA (skipped)");
    }
  } finally {
    await server?.stop();
    await discard.shutdown();
    if (options.dir === undefined) await Deno.remove(root, { recursive: true });
  }
  return result;
}

async function benchIpc(
  root: string,
  options: ServeBenchOptions,
): Promise<Record<string, unknown>> {
  const dir = `${root}/8b`;
  await writeBenchCheckpoint(dir, SHAPE_8B);
  const out: Record<string, unknown> = {};
  // The server scans every update for NaN/Inf by default; the second figure is what the scan
  // costs (--allow-non-finite).
  for (const scan of [true, false]) {
    out[scan ? "scanned" : "unscanned"] = await ipcUpdates(dir, scan, options);
  }
  return out;
}

/** One path's figures from scripts/bench_serve_ipc.py. */
interface IpcRun {
  path: string;
  zero_copy_tensors: number;
  packed_tensors: number;
  buckets: number;
  new_handles: number[];
  millis: number[];
  server_millis: number[];
  /** The client before the request goes out (stream sync, allocations, table, JSON). */
  table_millis: number[];
  /** Request out to reply read. */
  request_millis: number[];
  /** The server's Server-Timing figures of each reply (read, parse, update). */
  server_timing: Record<string, number>[];
}

/**
 * Where the updates' time went, from the client's and the server's own clocks, after the first
 * update: the median of each part over the updates, so the parts need not add up exactly.
 */
function ipcBreakdown(z: IpcRun): string {
  const at = (i: number, k: string) => z.server_timing[i]?.[k] ?? NaN;
  const parts = z.millis.slice(1).map((_, j) => {
    const i = j + 1;
    const server = at(i, "read") + at(i, "parse") + at(i, "update");
    return {
      table: z.table_millis[i],
      request: z.request_millis[i],
      read: at(i, "read"),
      parse: at(i, "parse"),
      update: at(i, "update"),
      http: z.request_millis[i] - server,
      after: z.millis[i] - z.table_millis[i] - z.request_millis[i],
    };
  });
  const m = (k: keyof (typeof parts)[number]) => median(parts.map((p) => p[k])).toFixed(2);
  return `    where it went (ms, medians over the same updates, beside the call's ${
    median(z.millis.slice(1)).toFixed(2)
  }): client before the request (stream sync, allocations, table, JSON) ${m("table")}; ` +
    `request out to reply read ${m("request")}, of which the server reads the body ${
      m("read")
    }, checks the table ${m("parse")}, updates ${m("update")} (lock to reply: its seconds ` +
    `${median(z.server_millis.slice(1)).toFixed(2)}), and the rest, the connection and the ` +
    `reply's way back, ${m("http")}; client after the reply ${m("after")}`;
}

async function ipcUpdates(
  dir: string,
  scan: boolean,
  options: ServeBenchOptions,
): Promise<Record<string, unknown>> {
  const server = await startServer({
    model: dir,
    backend: "cuda",
    port: 0,
    rejectNonFinite: scan,
  });
  try {
    await server.ready;
    const script = new URL("./bench_serve_ipc.py", import.meta.url).pathname;
    const out = await new Deno.Command("python3", {
      args: [script, server.url, String(options.ipcUpdates ?? 5)],
      stdout: "piped",
      stderr: "inherit",
    }).output();
    if (!out.success) throw new Error("serve bench: the PyTorch IPC client failed");
    const r = JSON.parse(new TextDecoder().decode(out.stdout)) as {
      bytes: number;
      tensors: number;
      zero_copy: IpcRun;
      copy: IpcRun;
    };
    const z = r.zero_copy, c = r.copy;
    const ms = median(z.millis.slice(1));
    const serverMs = median(z.server_millis.slice(1));
    const copyMs = median(c.millis.slice(1));
    console.log(
      `  ipc update, 8B shape from PyTorch (${(r.bytes / GB).toFixed(2)} GB, ${r.tensors} ` +
        `tensors, ${z.path}: ${z.zero_copy_tensors} read in place from ${z.buckets} allocations, ` +
        `${z.packed_tensors} packed; ${
          scan ? "NaN/Inf scan on (the default)" : "--allow-non-finite"
        }): ` +
        `${ms.toFixed(1)} ms per update, client call to reply (median of ${z.millis.length - 1}; ` +
        `limit ${IPC_LIMIT_MS} ms; ratio ${(ms / IPC_LIMIT_MS).toFixed(2)})`,
    );
    console.log(
      `    of which the server's own time for the update ${serverMs.toFixed(1)} ms (its reply's ` +
        `seconds: table check, mapping, reload, wait); the rest is the client's table, its ` +
        `stream sync, and HTTP. First update (the server opens ${z.new_handles[0]} handles): ` +
        `${z.millis[0].toFixed(1)} ms; handles new to the client after it: ` +
        `${z.new_handles.slice(1).reduce((a, b) => a + b, 0)}`,
    );
    console.log(ipcBreakdown(z));
    console.log(
      `    the same update with ipc_copy=True (${c.path}: packed into ${c.buckets} reused ` +
        `buckets first): ${copyMs.toFixed(1)} ms (server ${
          median(c.server_millis.slice(1)).toFixed(1)
        } ms); zero-copy / copy ${(ms / copyMs).toFixed(2)}`,
    );
    return {
      ...r,
      path: z.path,
      medianMs: ms,
      serverMedianMs: serverMs,
      copyMedianMs: copyMs,
      limitMs: IPC_LIMIT_MS,
    };
  } finally {
    await server.stop();
  }
}

/**
 * The HTTP endpoints: request parsing and validation, then the service. Every error answers
 * `{"error": {"code", "message"}}` with its status (http_errors.ts); the SGLang endpoint
 * answers `{"success", "message"}` as SGLang does.
 * @module
 */

import { quoteName } from "../messages.ts";
import { layoutSafetensors } from "../checkpoint/safetensors.ts";
import { kernelTensors } from "../models/export.ts";
import type { BearerAuth } from "./auth.ts";
import { type BodyLimits, BodyReader } from "./body.ts";
import { errorBody, errorLine, errorResponse, json, serverError, statusOf } from "./http_errors.ts";
import { parseIpcUpdate } from "./ipc.ts";
import { parseNcclInit, parseNcclUpdate } from "./nccl.ts";
import { checkFields, readJson } from "./json_body.ts";
import type { ReplayCache } from "./replay.ts";
import type { PathRoots } from "./roots.ts";
import type { UpdateOptions, WeightService } from "./service.ts";

/** What the routes need besides the service. */
export interface RouteContext {
  /** The model and its updates. */
  readonly service: WeightService;
  /** Roots disk updates may read. */
  readonly roots: PathRoots;
  /** The token check; null when no token is required. */
  readonly auth: BearerAuth | null;
  /** Limits of streamed bodies. */
  readonly body: BodyLimits;
  /** Limits of JSON bodies. */
  readonly jsonBody: BodyLimits;
  /** True once the server is stopping: new updates get 503. */
  readonly stopping: () => boolean;
  /** Answers of POSTs that carried an idempotency key, for a resent request. */
  readonly replay: ReplayCache;
}

type Handler = (req: Request, url: URL, ctx: RouteContext) => Promise<Response> | Response;

const DISK_FIELDS = {
  path: { type: "string", required: true },
  atomic: { type: "boolean" },
  strict: { type: "boolean" },
  partial: { type: "boolean" },
  tag: { type: "string", nullable: true },
} as const;

// SGLang's UpdateWeightFromDiskReqInput. Fields about its own scheduler (pausing, caches, CUDA
// graphs) are accepted and have nothing to act on here: the reload keeps every pointer.
const SGLANG_FIELDS = {
  model_path: { type: "string", required: true },
  load_format: { type: "string", nullable: true },
  abort_all_requests: { type: "boolean" },
  weight_version: { type: "string", nullable: true },
  is_async: { type: "boolean" },
  torch_empty_cache: { type: "boolean" },
  keep_pause: { type: "boolean" },
  recapture_cuda_graph: { type: "boolean" },
  flush_cache: { type: "boolean" },
  token_step: { type: "integer" },
} as const;

const RELEASE_FIELDS = { handles: { type: "array" } } as const;

const STREAM_QUERY = new Set(["atomic", "strict", "partial", "tag"]);

function queryFlag(url: URL, name: string): boolean {
  const v = url.searchParams.get(name);
  if (v === null) return false;
  if (v === "" || v === "1" || v === "true") return true;
  if (v === "0" || v === "false") return false;
  throw serverError(
    "BAD_QUERY",
    `query ${name}=${quoteName(v, 24)}: expected true, false, 1 or 0`,
  );
}

function health(_req: Request, _url: URL, ctx: RouteContext): Response {
  const s = ctx.service;
  if (s.model === null) {
    return s.loadError === null
      ? json({ status: "loading" }, 503)
      : json({ status: "load_failed", error: s.loadError }, 503);
  }
  const layers = s.inconsistentLayers();
  if (layers.length > 0) {
    return json({ status: "inconsistent", version: s.version, layers }, 503);
  }
  return json({ status: "ok", version: s.version, tag: s.tag });
}

function model(_req: Request, _url: URL, ctx: RouteContext): Response {
  const s = ctx.service;
  const m = s.requireModel();
  const c = m.config;
  return json({
    architecture: c.architecture,
    quantization: m.quant,
    backend: m.device.kind,
    device: m.device.description,
    ipc: s.ipcAvailable,
    nccl: s.ncclAvailable
      ? (s.nccl === null
        ? { joined: false }
        : { joined: true, rank: s.nccl.rank, world_size: s.nccl.worldSize })
      : false,
    version: s.version,
    tag: s.tag,
    consistent: s.inconsistentLayers().length === 0,
    update_running: s.lock.running?.id ?? null,
    last_update: s.lastUpdate,
    config: {
      hidden_size: c.hiddenSize,
      intermediate_size: c.intermediateSize,
      num_hidden_layers: c.numLayers,
      num_attention_heads: c.numHeads,
      num_key_value_heads: c.numKvHeads,
      vocab_size: c.vocabSize,
      tie_word_embeddings: c.tieWordEmbeddings,
      dtype: c.dtype.safetensors,
    },
    tensors: s.expected,
  });
}

async function disk(req: Request, _url: URL, ctx: RouteContext): Promise<Response> {
  const b = checkFields<UpdateOptions & { path: string }>(
    await readJson(req, ctx.jsonBody, "disk update"),
    DISK_FIELDS,
    "disk update",
  );
  ctx.service.requireModel();
  const path = await ctx.roots.resolve(b.path);
  return json(await ctx.service.updateFromDisk(path, b));
}

async function stream(req: Request, url: URL, ctx: RouteContext): Promise<Response> {
  for (const k of url.searchParams.keys()) {
    if (!STREAM_QUERY.has(k)) {
      throw serverError(
        "UNKNOWN_FIELD",
        `stream update: unknown query parameter ${quoteName(k)} (known: ${
          [...STREAM_QUERY].join(", ")
        })`,
      );
    }
  }
  const lengthHeader = req.headers.get("content-length");
  let contentLength: number | undefined;
  if (lengthHeader !== null) {
    contentLength = Number(lengthHeader);
    if (contentLength > ctx.body.maxBytes) {
      throw serverError(
        "BODY_TOO_LARGE",
        `Content-Length ${contentLength} passes the body limit of ${ctx.body.maxBytes} bytes (--max-body-bytes)`,
      );
    }
  }
  const options = {
    atomic: queryFlag(url, "atomic"),
    strict: queryFlag(url, "strict"),
    partial: queryFlag(url, "partial"),
    tag: url.searchParams.get("tag") ?? undefined,
    maxBytes: ctx.body.maxBytes,
    contentLength,
  };
  const body = new BodyReader(req.body, ctx.body);
  try {
    return json(await ctx.service.updateFromStream(body, options));
  } finally {
    body.cancel();
  }
}

async function ipc(req: Request, _url: URL, ctx: RouteContext): Promise<Response> {
  const t0 = performance.now();
  const body = await readJson(req, ctx.jsonBody, "ipc update");
  const t1 = performance.now();
  const update = parseIpcUpdate(body);
  const t2 = performance.now();
  const summary = await ctx.service.updateFromIpc(update);
  const t3 = performance.now();
  // Where the server's part of an update went, for a trainer (or the serve bench) to tell its
  // own time and the connection's apart from the server's: the body read and JSON parse, the
  // table's checks, the update itself (the reply's `seconds`: lock, validation, reload, wait),
  // in milliseconds (the Server-Timing header of the W3C spec).
  return json(summary, 200, {
    "server-timing": `read;dur=${ms(t1 - t0)}, parse;dur=${ms(t2 - t1)}, update;dur=${ms(t3 - t2)}`,
  });
}

function ms(x: number): string {
  return x.toFixed(3);
}

async function ipcRelease(req: Request, _url: URL, ctx: RouteContext): Promise<Response> {
  const b = checkFields<{ handles?: unknown[] }>(
    await readJson(req, ctx.jsonBody, "ipc release"),
    RELEASE_FIELDS,
    "ipc release",
  );
  if (b.handles !== undefined && !b.handles.every((h) => typeof h === "string")) {
    throw serverError("BAD_FIELD", "ipc release: handles must be an array of base64 strings");
  }
  return json({ released: ctx.service.releaseIpc(b.handles as string[] | undefined) });
}

async function ncclInit(req: Request, _url: URL, ctx: RouteContext): Promise<Response> {
  const init = parseNcclInit(await readJson(req, ctx.jsonBody, "nccl init"));
  const joined = await ctx.service.initNccl(init);
  return json({ rank: joined.rank, world_size: joined.worldSize });
}

async function ncclClose(req: Request, _url: URL, ctx: RouteContext): Promise<Response> {
  checkFields(await readJson(req, ctx.jsonBody, "nccl close"), {}, "nccl close");
  const held = ctx.service.lock.acquire("nccl-close");
  try {
    return json({ closed: ctx.service.closeNccl() });
  } finally {
    ctx.service.lock.release(held);
  }
}

async function nccl(req: Request, _url: URL, ctx: RouteContext): Promise<Response> {
  let update;
  try {
    update = parseNcclUpdate(await readJson(req, ctx.jsonBody, "nccl update"));
  } catch (e) {
    // The trainer's broadcasts are queued and never matched: it aborts its side, and so does
    // the server (unless another update holds the communicator).
    if (ctx.service.lock.running === null) ctx.service.closeNccl();
    throw e;
  }
  return json(await ctx.service.updateFromNccl(update));
}

function exportTensors(_req: Request, _url: URL, ctx: RouteContext): Response {
  const s = ctx.service;
  const m = s.requireModel();
  const held = s.lock.acquire("export");
  try {
    const tensors = new Map(kernelTensors(m));
    const layout = layoutSafetensors(
      [...tensors].map(([n, t]) => [n, { dtype: t.dtype, shape: t.shape, bytes: t.nbytes }]),
      { format: "layerwise-kernel" },
      "export",
    );
    let next = -1;
    // One tensor is copied to the host at a time, as the client reads.
    const body = new ReadableStream<Uint8Array>({
      pull(c) {
        try {
          if (next < 0) c.enqueue(layout.prefix);
          else if (next < layout.order.length) {
            c.enqueue(m.device.download(tensors.get(layout.order[next])!));
          } else {
            s.lock.release(held);
            c.close();
          }
          next++;
        } catch (e) {
          s.lock.release(held);
          c.error(e);
        }
      },
      cancel() {
        s.lock.release(held);
      },
    }, { highWaterMark: 0 });
    return new Response(body, {
      headers: {
        "content-type": "application/octet-stream",
        "content-length": String(layout.totalBytes),
      },
    });
  } catch (e) {
    s.lock.release(held);
    throw e;
  }
}

async function metrics(_req: Request, _url: URL, ctx: RouteContext): Promise<Response> {
  const { text, contentType } = await ctx.service.metrics.render();
  return new Response(text, { headers: { "content-type": contentType } });
}

async function sglangDisk(req: Request, _url: URL, ctx: RouteContext): Promise<Response> {
  try {
    const b = checkFields<{ model_path: string; load_format?: string; weight_version?: string }>(
      await readJson(req, ctx.jsonBody, "update_weights_from_disk"),
      SGLANG_FIELDS,
      "update_weights_from_disk",
    );
    if (b.load_format !== undefined && !["auto", "safetensors"].includes(b.load_format)) {
      throw serverError(
        "BAD_FIELD",
        `update_weights_from_disk: load_format ${
          quoteName(b.load_format, 24)
        } is not supported (auto or safetensors)`,
      );
    }
    ctx.service.requireModel();
    const path = await ctx.roots.resolve(b.model_path);
    const r = await ctx.service.updateFromDisk(path, { tag: b.weight_version, atomic: true });
    return json({
      success: true,
      message: `Succeeded to update model weights (version ${r.version}, ${r.bytes} bytes in ${
        r.seconds.toFixed(3)
      } s).`,
      num_paused_requests: 0,
    });
  } catch (e) {
    return json({ success: false, message: errorLine(e), error: errorBody(e).error }, statusOf(e));
  }
}

const ROUTES: Record<string, Record<string, Handler>> = {
  "/v1/health": { GET: health },
  "/v1/model": { GET: model },
  "/v1/update/disk": { POST: disk },
  "/v1/update/stream": { PUT: stream },
  "/v1/update/ipc": { POST: ipc },
  "/v1/update/ipc/release": { POST: ipcRelease },
  "/v1/update/nccl/init": { POST: ncclInit },
  "/v1/update/nccl/close": { POST: ncclClose },
  "/v1/update/nccl": { POST: nccl },
  "/v1/export": { GET: exportTensors },
  "/metrics": { GET: metrics },
  "/update_weights_from_disk": { POST: sglangDisk },
};

/** Paths answered without a token (liveness probes). */
const OPEN = new Set(["/v1/health"]);

/** Answers one request; never throws. */
export async function route(req: Request, ctx: RouteContext): Promise<Response> {
  try {
    const url = new URL(req.url);
    const methods = ROUTES[url.pathname];
    if (methods === undefined) {
      throw serverError("NOT_FOUND", `no endpoint ${quoteName(url.pathname, 80)}`);
    }
    if (!OPEN.has(url.pathname)) ctx.auth?.check(req);
    if (ctx.stopping()) throw serverError("SHUTTING_DOWN", "the server is stopping");
    const handler = Object.hasOwn(methods, req.method) ? methods[req.method] : undefined;
    if (handler === undefined) {
      throw serverError(
        "METHOD_NOT_ALLOWED",
        `${req.method} ${url.pathname}: allowed ${Object.keys(methods).join(", ")}`,
        405,
        {},
      );
    }
    if (req.method !== "POST") return await handler(req, url, ctx);
    // A failure is kept too: the same request sent again gets the same refusal.
    return await ctx.replay.answer(req, url.pathname, async () => {
      try {
        return await handler(req, url, ctx);
      } catch (e) {
        return errorResponse(e);
      }
    });
  } catch (e) {
    return errorResponse(e);
  }
}

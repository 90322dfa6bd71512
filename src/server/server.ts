/**
 * The weight-update server: `Deno.serve` on a loopback address by default (a non-loopback
 * address needs a token), the model loaded once in the background (health answers 503 until
 * it is), and a graceful stop: no new requests, a running update finishes or, past the
 * deadline, is abandoned (atomic updates restore), IPC handles and the NCCL communicator are
 * closed, the backend too.
 * @module
 */

import type { Backend } from "../backend/backend.ts";
import type { BackendChoice } from "../backend/select.ts";
import { cudaIpcMapper } from "../backend/cuda/ipc.ts";
import { cudaNcclJoiner } from "../backend/cuda/nccl_receiver.ts";
import type { CausalLM } from "../models/causal_lm.ts";
import type { QuantName } from "../models/quant_names.ts";
import { BearerAuth } from "./auth.ts";
import { serverError } from "./http_errors.ts";
import { PathRoots } from "./roots.ts";
import { ReplayCache } from "./replay.ts";
import { route, type RouteContext } from "./routes.ts";
import { type ServiceOptions, WeightService } from "./service.ts";

/** Defaults of {@link ServeOptions}. */
export const SERVE_DEFAULTS: Readonly<{
  host: string;
  port: number;
  maxBodyBytes: number;
  maxJsonBytes: number;
  idleTimeoutMs: number;
  stopDeadlineMs: number;
}> = Object.freeze({
  host: "127.0.0.1",
  port: 8471,
  maxBodyBytes: 64 * 1024 ** 3,
  maxJsonBytes: 16 * 1024 ** 2,
  idleTimeoutMs: 30_000,
  stopDeadlineMs: 30_000,
});

/**
 * How to serve: the service's options, plus where and how to listen. IPC and NCCL default to
 * CUDA's on a CUDA backend.
 */
export interface ServeOptions extends ServiceOptions {
  /** Hugging Face directory of the first load. */
  model: string;
  /** Quantization (default auto: the checkpoint's own, else fp8 per tensor). */
  quant?: QuantName;
  /** Backend, or which one to open (default auto); the server closes it when it stops. */
  backend?: Backend | BackendChoice;
  /** Address to bind (default 127.0.0.1). */
  host?: string;
  /** Port (default 8471; 0 picks a free one). */
  port?: number;
  /** Bearer token every request but `/v1/health` must carry; needed off loopback. */
  token?: string;
  /** Roots disk updates may read (default: the model directory). */
  allowPaths?: readonly string[];
  /** Largest streamed body (default 64 GiB). */
  maxBodyBytes?: number;
  /** Largest JSON body (default 16 MiB). */
  maxJsonBytes?: number;
  /** Longest wait for the next body chunk, ms (default 30 s). */
  idleTimeoutMs?: number;
  /** How long a stop lets a running update finish before abandoning it, ms (default 30 s). */
  stopDeadlineMs?: number;
}

/** A running server. */
export interface WeightServer {
  /** `http://host:port`. */
  readonly url: string;
  /** The bound port. */
  readonly port: number;
  /** The model and its updates. */
  readonly service: WeightService;
  /** Resolves once the first load is done; rejects with its error. */
  readonly ready: Promise<CausalLM>;
  /** Stops gracefully (see the module doc); resolves when everything is closed. */
  stop(): Promise<void>;
}

/** Whether `host` is a loopback address or name. */
export function isLoopback(host: string): boolean {
  const h = host.replace(/^\[|\]$/g, "").toLowerCase();
  return h === "localhost" || h === "::1" || /^127\.\d+\.\d+\.\d+$/.test(h);
}

/**
 * Starts serving: binds first (health answers 503 meanwhile), then loads the model. Throws
 * ServerError `INSECURE_BIND` for a non-loopback host without a token, before binding.
 */
export async function startServer(options: ServeOptions): Promise<WeightServer> {
  const o = { ...SERVE_DEFAULTS, ...options };
  if (!isLoopback(o.host) && o.token === undefined) {
    throw serverError(
      "INSECURE_BIND",
      `refusing to listen on ${o.host} without a token: give --token-file, or bind 127.0.0.1`,
    );
  }
  // NVLink multicast (NVLS) stays off for the communicators this process joins (NCCL updates):
  // NCCL reads it at its first communicator, so it is set before anything can load NCCL.
  try {
    Deno.env.set("NCCL_NVLS_ENABLE", "0");
  } catch {
    // No --allow-env: the environment stays as it is.
  }
  const roots = await PathRoots.of(o.allowPaths ?? [o.model]);
  const service = new WeightService({
    rejectNonFinite: o.rejectNonFinite,
    maxBufferedBytes: o.maxBufferedBytes,
    readChunkBytes: o.readChunkBytes,
    log: o.log,
    ipcMapper: o.ipcMapper ?? ((m) => cudaIpcMapper(m.device)),
    ipcKeepUpdates: o.ipcKeepUpdates,
    ncclJoiner: o.ncclJoiner ?? ((m) => cudaNcclJoiner(m.device)),
  });
  let stopping = false;
  const ctx: RouteContext = {
    service,
    roots,
    auth: o.token === undefined ? null : new BearerAuth(o.token),
    body: { maxBytes: o.maxBodyBytes, idleMs: o.idleTimeoutMs, signal: service.abort.signal },
    jsonBody: {
      maxBytes: Math.min(o.maxJsonBytes, o.maxBodyBytes),
      idleMs: o.idleTimeoutMs,
      signal: service.abort.signal,
    },
    stopping: () => stopping,
    replay: new ReplayCache(),
  };
  const http = Deno.serve(
    { hostname: o.host, port: o.port, onListen: () => {} },
    (req) => route(req, ctx),
  );
  const addr = http.addr as Deno.NetAddr;
  const host = addr.hostname.includes(":") ? `[${addr.hostname}]` : addr.hostname;
  const ready = service.load(o.model, { quant: o.quant, backend: o.backend });
  // The error stays in the service (health and every request report it); no unhandled rejection.
  ready.catch(() => {});
  let stopped: Promise<void> | null = null;
  const stop = (): Promise<void> => {
    stopped ??= (async () => {
      // New requests are refused at once; the HTTP server itself is shut down only after the
      // running update ended, because shutting it down ends the bodies still being read.
      stopping = true;
      const timer = setTimeout(() => service.abort.abort(), o.stopDeadlineMs);
      try {
        await ready.catch(() => {});
        await service.lock.idle();
        const drained = http.shutdown();
        // A client that never finishes its request would hold the stop forever: past one more
        // deadline, close anyway (the update it belonged to has already ended).
        let grace: ReturnType<typeof setTimeout> | undefined;
        await Promise.race([
          drained,
          new Promise((r) => grace = setTimeout(r, o.stopDeadlineMs)),
        ]);
        clearTimeout(grace);
      } finally {
        clearTimeout(timer);
        service.close();
      }
    })();
    return stopped;
  };
  return { url: `http://${host}:${addr.port}`, port: addr.port, service, ready, stop };
}

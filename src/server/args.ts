/**
 * Command-line arguments of `deno task serve`, parsed like those of `deno task reload`
 * (node:util parseArgs, strict). Parsing never exits: a bad command line is a ServerError
 * `USAGE` ({@link usageError}), which `deno task serve` turns into exit status 2.
 * @module
 */

import { parseArgs } from "node:util";
import type { BackendChoice } from "../backend/select.ts";
import { QUANT_NAMES, type QuantName } from "../models/quant_names.ts";
import { serverError } from "./http_errors.ts";
import { SERVE_DEFAULTS } from "./server.ts";

const BACKENDS: readonly BackendChoice[] = ["auto", "cuda", "wasm"];

/** A bad command line: ServerError `USAGE`. */
export function usageError(message: string): Error {
  return serverError("USAGE", message);
}

/** What the command line asks for. */
export interface ServeCliOptions {
  /** Hugging Face directory of the first load. */
  model?: string;
  /** Quantization (default auto: the checkpoint's own, else fp8 per tensor). */
  quant: QuantName;
  /** Backend (default auto). */
  backend: BackendChoice;
  /** Address to bind. */
  host: string;
  /** Port. */
  port: number;
  /** File holding the bearer token. */
  tokenFile?: string;
  /** Roots disk updates may read (default: the model directory). */
  allowPaths: string[];
  /** Largest streamed body in bytes. */
  maxBodyBytes: number;
  /** Bound on model-format scratch of layers waiting for tensors (default: the server's). */
  maxBufferedBytes?: number;
  /** Longest wait for the next body chunk, in seconds. */
  idleTimeoutSeconds: number;
  /** IPC handles stay open while one of the last this many updates sent them. */
  ipcKeepUpdates: number;
  /** Accept NaN/Inf in incoming weights. */
  allowNonFinite: boolean;
  /** No progress line per update. */
  quiet: boolean;
  /** Print the help and exit. */
  help: boolean;
}

/** The text of `--help`. */
export const SERVE_HELP: string = `deno task serve: a weight-update server over a loaded model

Usage:
  deno task serve --model DIR [options]

Options:
  --model DIR           Hugging Face directory (config.json + safetensors) for the first load
  --quant Q             auto | none | fp8 | fp8-channel | fp8-block | int8 (default auto: the
                        checkpoint's own quantization when its config.json has one, else fp8)
  --backend B           auto | cuda | wasm (default auto)
  --host H              address to bind (default ${SERVE_DEFAULTS.host}; others need --token-file)
  --port N              port (default ${SERVE_DEFAULTS.port}; 0 picks a free one)
  --token-file F        file holding the bearer token every request but /v1/health must carry
  --allow-path DIR      a root disk updates may read (repeatable; default: the --model directory)
  --max-body-bytes N    largest streamed body (default ${SERVE_DEFAULTS.maxBodyBytes})
  --max-buffered-bytes N  most model-format scratch a body out of layer order may hold (default
                        two decoder layers' checkpoint bytes, at least 64 MiB; past it: 422)
  --idle-timeout S      seconds a body may stall before the update is abandoned (default ${
  SERVE_DEFAULTS.idleTimeoutMs / 1000
})
  --ipc-keep-updates N  close an IPC handle that none of the last N updates sent (default 2)
  --allow-non-finite    accept NaN/Inf in incoming weights (default: refused)
  --quiet               no progress line per update on stderr
  --help                show this help

Endpoints: GET /v1/health, GET /v1/model, POST /v1/update/disk, PUT /v1/update/stream,
POST /v1/update/ipc, POST /v1/update/ipc/release, GET /v1/export, GET /metrics,
POST /update_weights_from_disk (SGLang). Stop with SIGINT or SIGTERM (exit 0).
`;

function whole(flag: string, v: string | undefined, fallback: number, min = 0): number {
  if (v === undefined) return fallback;
  if (!/^\d+$/.test(v) || !Number.isSafeInteger(Number(v)) || Number(v) < min) {
    throw usageError(`--${flag} ${v}: expected a whole number${min > 0 ? ` >= ${min}` : ""}`);
  }
  return Number(v);
}

function choice<T extends string>(flag: string, value: string, allowed: readonly string[]): T {
  if (!allowed.includes(value)) {
    throw usageError(`--${flag} ${value}: expected one of ${allowed.join(", ")}`);
  }
  return value as T;
}

/** Parses the arguments (without the program name). Throws {@link usageError}s. */
export function parseServeArgs(argv: readonly string[]): ServeCliOptions {
  let parsed;
  try {
    parsed = parseArgs({
      args: [...argv],
      strict: true,
      allowPositionals: false,
      options: {
        model: { type: "string" },
        quant: { type: "string" },
        backend: { type: "string" },
        host: { type: "string" },
        port: { type: "string" },
        "token-file": { type: "string" },
        "allow-path": { type: "string", multiple: true },
        "max-body-bytes": { type: "string" },
        "max-buffered-bytes": { type: "string" },
        "idle-timeout": { type: "string" },
        "ipc-keep-updates": { type: "string" },
        "allow-non-finite": { type: "boolean" },
        quiet: { type: "boolean" },
        help: { type: "boolean", short: "h" },
      },
    });
  } catch (e) {
    throw usageError(String((e as Error).message).split("\n")[0]);
  }
  const v = parsed.values;
  const help = v.help ?? false;
  if (!help && (v.model === undefined || v.model === "")) {
    throw usageError("--model DIR is required");
  }
  const port = whole("port", v.port, SERVE_DEFAULTS.port);
  if (port > 65535) throw usageError(`--port ${port}: expected 0-65535`);
  return {
    model: v.model,
    quant: choice<QuantName>("quant", v.quant ?? "auto", QUANT_NAMES),
    backend: choice<BackendChoice>("backend", v.backend ?? "auto", BACKENDS),
    host: v.host ?? SERVE_DEFAULTS.host,
    port,
    tokenFile: v["token-file"],
    allowPaths: v["allow-path"] ?? [],
    maxBodyBytes: whole("max-body-bytes", v["max-body-bytes"], SERVE_DEFAULTS.maxBodyBytes, 1),
    maxBufferedBytes: v["max-buffered-bytes"] === undefined
      ? undefined
      : whole("max-buffered-bytes", v["max-buffered-bytes"], 0, 1),
    idleTimeoutSeconds: whole(
      "idle-timeout",
      v["idle-timeout"],
      SERVE_DEFAULTS.idleTimeoutMs / 1000,
      1,
    ),
    ipcKeepUpdates: whole("ipc-keep-updates", v["ipc-keep-updates"], 2, 1),
    allowNonFinite: v["allow-non-finite"] ?? false,
    quiet: v.quiet ?? false,
    help,
  };
}

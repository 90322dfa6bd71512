/**
 * Errors of the weight-update server and how every error becomes an HTTP answer: a status and
 * the JSON body `{"error": {"code", "message"}}`, one line, never a stack trace.
 * @module
 */

import {
  BackendError,
  CheckpointError,
  type CheckpointErrorCode,
  LayerwiseError,
  ReloadError,
  type ServerErrorCode,
} from "../errors.ts";
import { oneLine } from "../messages.ts";

/** Statuses of the server's own error codes; codes not listed answer 400. */
const STATUS_BY_CODE: Readonly<Partial<Record<ServerErrorCode, number>>> = {
  UNAUTHORIZED: 401,
  FORBIDDEN_PATH: 403,
  NOT_FOUND: 404,
  PATH_NOT_FOUND: 404,
  METHOD_NOT_ALLOWED: 405,
  IDLE_TIMEOUT: 408,
  UPDATE_RUNNING: 409,
  BODY_TOO_LARGE: 413,
  NOT_READY: 503,
  SHUTTING_DOWN: 503,
  LOAD_FAILED: 503,
  IPC_OPEN_FAILED: 422,
  IPC_BUCKET_TOO_LARGE: 422,
};

/**
 * An error of the server (request, body, path, token, lock). Its status comes from its code
 * (see the table above) unless `status` is given. The constructor takes (code, message) like
 * every LayerwiseError, so that the reload engine can re-throw it with a note appended.
 */
export class ServerError extends LayerwiseError {
  /** What went wrong; see ServerErrorCode (CheckpointError codes for a malformed body). */
  declare readonly code: ServerErrorCode | CheckpointErrorCode;
  /** HTTP status to answer with; from the code when not set. */
  status?: number;
  /** Extra fields of the error object (e.g. the running update's id). */
  extra?: Record<string, unknown>;
  /** Creates an error with a code and a one-line message. */
  constructor(code: ServerErrorCode | CheckpointErrorCode, message: string) {
    super(code, message);
  }
}

/** A ServerError with an explicit status and extra fields. */
export function serverError(
  code: ServerErrorCode | CheckpointErrorCode,
  message: string,
  status?: number,
  extra?: Record<string, unknown>,
): ServerError {
  const e = new ServerError(code, message);
  if (status !== undefined) e.status = status;
  if (extra !== undefined) e.extra = extra;
  return e;
}

function causeOf(e: LayerwiseError): unknown {
  return (e as { cause?: unknown }).cause;
}

/** The HTTP status an error answers with. */
export function statusOf(e: unknown): number {
  if (e instanceof ServerError) {
    return e.status ?? STATUS_BY_CODE[e.code as ServerErrorCode] ?? 400;
  }
  if (e instanceof ReloadError) {
    if (e.code === "RELOAD_ACTIVE" || e.code === "LOAD_ACTIVE") return 409;
    if (e.code === "RELOAD_FAILED") {
      const cause = causeOf(e);
      return cause instanceof LayerwiseError ? statusOf(cause) : 500;
    }
    return 422;
  }
  if (e instanceof CheckpointError) return 422;
  if (e instanceof BackendError) return 500;
  if (e instanceof LayerwiseError) return 422;
  return 500;
}

/** An error as one line (see `oneLine`): its message, or its name when the message is empty. */
export function errorLine(e: unknown, max = 2000): string {
  const msg = e instanceof Error ? e.message : String(e);
  return oneLine(msg, max) || (e instanceof Error ? e.name : "unknown error");
}

/** The error object of the JSON body. */
export interface ErrorBody {
  /** `code`: stable, machine-readable; `message`: one line; more fields for some codes. */
  error: { code: string; message: string; [field: string]: unknown };
}

/** The JSON body of an error. */
export function errorBody(e: unknown): ErrorBody {
  const code = e instanceof LayerwiseError ? e.code : "INTERNAL";
  const extra = e instanceof ServerError ? e.extra ?? {} : {};
  return { error: { ...extra, code, message: errorLine(e) } };
}

/** A JSON response. */
export function json(body: unknown, status = 200, headers: HeadersInit = {}): Response {
  return new Response(JSON.stringify(body) + "\n", {
    status,
    headers: { "content-type": "application/json", ...headers },
  });
}

/** The response of an error: its status and {@link errorBody}. */
export function errorResponse(e: unknown): Response {
  const status = statusOf(e);
  const headers: Record<string, string> = status === 401 ? { "www-authenticate": "Bearer" } : {};
  return json(errorBody(e), status, headers);
}

/**
 * JSON request bodies: read under the body limits, parsed, and checked against a small field
 * table (type, required): a wrong type, a missing field or a field the endpoint does not know
 * is ServerError 400 naming the field. Strict at the edge, so handlers trust what they get.
 * @module
 */

import { quoteName } from "../messages.ts";
import { type BodyLimits, BodyReader } from "./body.ts";
import { serverError } from "./http_errors.ts";

/** The JSON types a field may have (`?` in {@link Field}: also null). */
export type FieldType = "string" | "boolean" | "integer" | "array" | "object";

/** One field of a body: its type, whether it must be there, whether null is accepted. */
export interface Field {
  /** The JSON type. */
  readonly type: FieldType;
  /** The body must have it. */
  readonly required?: boolean;
  /** null is accepted (and read as absent). */
  readonly nullable?: boolean;
}

function typeOf(v: unknown): string {
  if (v === null) return "null";
  if (Array.isArray(v)) return "array";
  if (typeof v === "number") return Number.isSafeInteger(v) ? "integer" : "number";
  return typeof v;
}

/**
 * Checks that `value` is an object whose fields all appear in `fields` with their type, and
 * that required ones are there; returns it typed. Null fields marked nullable are dropped.
 * `where` names the body in messages.
 */
export function checkFields<T>(
  value: unknown,
  fields: Readonly<Record<string, Field>>,
  where: string,
): T {
  if (typeOf(value) !== "object") {
    throw serverError("BAD_JSON", `${where}: expected a JSON object, got ${typeOf(value)}`);
  }
  const obj = value as Record<string, unknown>;
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(obj)) {
    const f = Object.hasOwn(fields, k) ? fields[k] : undefined;
    if (f === undefined) {
      throw serverError(
        "UNKNOWN_FIELD",
        `${where}: unknown field ${quoteName(k)} (known: ${Object.keys(fields).join(", ")})`,
      );
    }
    if (v === null && f.nullable) continue;
    if (typeOf(v) !== f.type) {
      throw serverError(
        "BAD_FIELD",
        `${where}: field ${quoteName(k)} must be ${f.type === "integer" ? "an" : "a"} ${f.type}${
          f.nullable ? " or null" : ""
        }, got ${typeOf(v)}`,
      );
    }
    out[k] = v;
  }
  for (const [k, f] of Object.entries(fields)) {
    if (f.required && !(k in out)) {
      throw serverError("MISSING_FIELD", `${where}: field ${quoteName(k)} is required`);
    }
  }
  return out as T;
}

/**
 * Reads a request's JSON body under `limits` (an empty body is `{}`), whatever its content
 * type says (`curl -d` sends a form type). Throws ServerError `BAD_JSON` (400) for bytes that
 * are not UTF-8 JSON, and the body errors of {@link BodyReader}.
 */
export async function readJson(req: Request, limits: BodyLimits, where: string): Promise<unknown> {
  const bytes = await new BodyReader(req.body, limits).readAll();
  if (bytes.byteLength === 0) return {};
  try {
    return JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes));
  } catch (e) {
    throw serverError("BAD_JSON", `${where}: body is not JSON (${(e as Error).message})`);
  }
}

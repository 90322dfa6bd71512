/**
 * What a running weight server holds, as tests compare it: its `/v1/export`, parsed.
 * @module
 */

import { type HostTensor, parseSafetensorsHeader } from "../checkpoint/safetensors.ts";

/**
 * Fetches `${url}/v1/export` and returns its tensors by name.
 *
 * @param url The server's `http://host:port`.
 * @param headers Request headers (a bearer token, say).
 * @returns The kernel tensors the server holds, as host bytes.
 * @throws Error when the server does not answer 200.
 */
export async function fetchExport(
  url: string,
  headers: HeadersInit = {},
): Promise<Map<string, HostTensor>> {
  const r = await fetch(`${url}/v1/export`, { headers });
  if (r.status !== 200) {
    throw new Error(`GET ${url}/v1/export answered ${r.status}: ${await r.text()}`);
  }
  const bytes = new Uint8Array(await r.arrayBuffer());
  const h = parseSafetensorsHeader(bytes, bytes.byteLength, "export");
  const out = new Map<string, HostTensor>();
  for (const [name, e] of h.tensors) {
    out.set(name, { dtype: e.dtype, shape: e.shape, data: bytes.slice(e.begin, e.end) });
  }
  return out;
}

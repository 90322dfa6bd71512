/**
 * The server's Prometheus metrics, in the text exposition format written by prom-client (a
 * registry of our own, no process-wide default metrics): updates by path and outcome, update
 * seconds (histogram), bytes received, the model version, updates in flight, inconsistency.
 * @module
 */

import client from "prom-client";

/** The metrics of one server. */
export class ServerMetrics {
  readonly #registry: client.Registry = new client.Registry();
  readonly #updates: client.Counter<"path" | "outcome">;
  readonly #seconds: client.Histogram<"path">;
  readonly #bytes: client.Counter<"path">;
  readonly #version: client.Gauge;
  readonly #inFlight: client.Gauge;
  readonly #inconsistent: client.Gauge;

  /** Registers every metric. */
  constructor() {
    const registers = [this.#registry];
    this.#updates = new client.Counter({
      name: "layerwise_updates_total",
      help: "Weight updates by path (disk, stream, ipc) and outcome (ok, error)",
      labelNames: ["path", "outcome"],
      registers,
    });
    this.#seconds = new client.Histogram({
      name: "layerwise_update_seconds",
      help: "Wall time of weight updates, from request to reply",
      labelNames: ["path"],
      buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120],
      registers,
    });
    this.#bytes = new client.Counter({
      name: "layerwise_update_bytes_total",
      help: "Checkpoint bytes loaded by successful weight updates",
      labelNames: ["path"],
      registers,
    });
    this.#version = new client.Gauge({
      name: "layerwise_model_version",
      help: "Successful weight updates since the server started",
      registers,
    });
    this.#inFlight = new client.Gauge({
      name: "layerwise_update_in_flight",
      help: "1 while a weight update runs",
      registers,
    });
    this.#inconsistent = new client.Gauge({
      name: "layerwise_model_inconsistent_layers",
      help: "Layers holding weights of a failed non-atomic update (0 when consistent)",
      registers,
    });
  }

  /** An update began. */
  begin(): void {
    this.#inFlight.set(1);
  }

  /** An update ended. */
  end(
    path: string,
    ok: boolean,
    seconds: number,
    bytes: number,
    version: number,
    inconsistent: number,
  ): void {
    this.#inFlight.set(0);
    this.#updates.inc({ path, outcome: ok ? "ok" : "error" });
    this.#seconds.observe({ path }, seconds);
    if (ok) this.#bytes.inc({ path }, bytes);
    this.#version.set(version);
    this.#inconsistent.set(inconsistent);
  }

  /** The text exposition and its content type. */
  async render(): Promise<{ text: string; contentType: string }> {
    return { text: await this.#registry.metrics(), contentType: this.#registry.contentType };
  }
}

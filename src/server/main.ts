/**
 * `deno task serve --model DIR`: load a model once, then take weight updates over HTTP (disk,
 * streamed safetensors, CUDA IPC) until SIGINT or SIGTERM.
 *
 * @example Serve a model and push a checkpoint from disk
 * ```sh
 * deno task serve --model ./Llama-3.1-8B --quant fp8 &
 * curl -s localhost:8471/v1/health
 * curl -s -X POST localhost:8471/v1/update/disk -d '{"path": "./Llama-3.1-8B", "atomic": true}'
 * ```
 * @module
 */

import { readTokenFile } from "./auth.ts";
import { parseServeArgs, SERVE_HELP, type ServeCliOptions } from "./args.ts";
import { errorLine, ServerError } from "./http_errors.ts";
import { startServer } from "./server.ts";

const ENCODER = new TextEncoder();

function say(line: string): void {
  Deno.stderr.writeSync(ENCODER.encode(`${line}\n`));
}

/** Runs the server until a signal; returns the exit status (0 after a graceful stop). */
export async function serveMain(argv: readonly string[]): Promise<number> {
  let o: ServeCliOptions;
  try {
    o = parseServeArgs(argv);
  } catch (e) {
    if (!(e instanceof ServerError && e.code === "USAGE")) throw e;
    say(`error: ${errorLine(e)} (see --help)`);
    return 2;
  }
  if (o.help) {
    console.log(SERVE_HELP);
    return 0;
  }
  let server;
  try {
    server = await startServer({
      model: o.model!,
      quant: o.quant,
      backend: o.backend,
      host: o.host,
      port: o.port,
      token: o.tokenFile === undefined ? undefined : await readTokenFile(o.tokenFile),
      allowPaths: o.allowPaths.length > 0 ? o.allowPaths : undefined,
      maxBodyBytes: o.maxBodyBytes,
      maxBufferedBytes: o.maxBufferedBytes,
      idleTimeoutMs: o.idleTimeoutSeconds * 1000,
      rejectNonFinite: !o.allowNonFinite,
      ipcKeepUpdates: o.ipcKeepUpdates,
      log: o.quiet ? undefined : say,
    });
  } catch (e) {
    say(`error: ${errorLine(e)}`);
    return 1;
  }
  say(`layerwise serve: listening on ${server.url} (loading ${o.model})`);
  const stopped = new Promise<void>((resolve) => {
    const onSignal = () => {
      say("layerwise serve: stopping");
      server.stop().then(resolve, (e) => {
        say(`error: ${errorLine(e)}`);
        resolve();
      });
    };
    Deno.addSignalListener("SIGINT", onSignal);
    Deno.addSignalListener("SIGTERM", onSignal);
  });
  try {
    const model = await server.ready;
    say(
      `layerwise serve: ready: ${model.config.architecture} (${o.quant}) on ${model.device.description}`,
    );
  } catch (e) {
    say(`error: ${errorLine(e)}`);
    await server.stop();
    return 1;
  }
  await stopped;
  return 0;
}

if (import.meta.main) {
  Deno.exit(await serveMain(Deno.args));
}

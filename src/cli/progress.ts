/**
 * A one-line progress bar on stderr: layers done and GB/s. It stays hidden for the first second
 * (short reloads print nothing) and entirely when stderr is not a terminal.
 * @module
 */

/** What a progress bar is told as work advances. */
export interface ProgressSink {
  /** Reports `layersDone` of `layersTotal` and the bytes read so far. */
  update(layersDone: number, layersTotal: number, bytes: number): void;
  /** Clears the line, if one was drawn. */
  finish(): void;
}

/** Options for {@link createProgressBar}. */
export interface ProgressOptions {
  /** Draw nothing. */
  quiet?: boolean;
  /** Whether stderr is a terminal (default: asked of Deno). */
  isTerminal?: boolean;
  /** Milliseconds before the first draw (default 1000). */
  delayMs?: number;
  /** Where the text goes (default stderr). */
  write?: (text: string) => void;
  /** Clock in milliseconds (default `performance.now`). */
  now?: () => number;
  /** Label before the bar. */
  label?: string;
}

const ENCODER = new TextEncoder();
const WIDTH = 28;

/** A sink that does nothing. */
export const NO_PROGRESS: ProgressSink = Object.freeze({ update() {}, finish() {} });

function stderrIsTerminal(): boolean {
  try {
    return Deno.stderr.isTerminal();
  } catch {
    return false;
  }
}

/** Formats a byte count in the largest decimal unit that keeps it at 1 or more (kB, MB, GB). */
export function formatBytes(bytes: number): string {
  const units: [number, string][] = [[1e9, "GB"], [1e6, "MB"], [1e3, "kB"]];
  for (const [size, unit] of units) {
    if (bytes >= size) return `${(bytes / size).toFixed(bytes >= 100 * size ? 0 : 2)} ${unit}`;
  }
  return `${bytes} B`;
}

/** Formats bytes per second like {@link formatBytes}, per second. */
export function formatRate(bytes: number, seconds: number): string {
  return `${formatBytes(seconds > 0 ? bytes / seconds : 0)}/s`;
}

/**
 * A progress bar that draws at most ten times a second, only after `delayMs` and only on a
 * terminal; otherwise {@link NO_PROGRESS}.
 */
export function createProgressBar(options: ProgressOptions = {}): ProgressSink {
  if (options.quiet || !(options.isTerminal ?? stderrIsTerminal())) return NO_PROGRESS;
  const write = options.write ?? ((t: string) => Deno.stderr.writeSync(ENCODER.encode(t)));
  const now = options.now ?? (() => performance.now());
  const delay = options.delayMs ?? 1000;
  const label = options.label ?? "reload";
  const start = now();
  let lastDraw = -Infinity;
  let drawn = false;
  return {
    update(done: number, total: number, bytes: number): void {
      const t = now();
      if (t - start < delay) return;
      if (t - lastDraw < 100 && done < total) return;
      lastDraw = t;
      const frac = total > 0 ? Math.min(1, done / total) : 0;
      const full = Math.round(frac * WIDTH);
      const bar = "#".repeat(full) + ".".repeat(WIDTH - full);
      const rate = formatRate(bytes, (t - start) / 1000);
      write(`\r\x1b[2K${label} [${bar}] ${done}/${total} layers  ${rate}`);
      drawn = true;
    },
    finish(): void {
      if (drawn) write("\r\x1b[2K");
      drawn = false;
    },
  };
}

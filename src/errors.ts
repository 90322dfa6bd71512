/**
 * Typed errors. Every error carries a stable `code` and a one-line message that names the
 * file, tensor and expectation where they apply; the CLI prints `error: <message>` and nothing
 * more.
 * @module
 */

/** Base class of every error this package throws on purpose. */
export class LayerwiseError extends Error {
  /** A stable, machine-readable code such as `DTYPE_MISMATCH`. */
  readonly code: string;
  /** Creates an error with a code and a one-line message. */
  constructor(code: string, message: string) {
    super(message);
    this.code = code;
    this.name = new.target.name;
  }
}

/** A kernel or memory call was wrong (dtype, size, range) or the device failed. */
export class BackendError extends LayerwiseError {}

/** A checkpoint file or weight source is malformed or does not fit the model. */
export class CheckpointError extends LayerwiseError {}

/** A reload could not complete; see the message for what was and was not written. */
export class ReloadError extends LayerwiseError {}

/**
 * `config.json` is missing, malformed, or does not fit the checkpoint beside it (a
 * CheckpointError: a config is part of a checkpoint).
 */
export class ConfigError extends CheckpointError {}

/**
 * Typed errors. Every error carries a stable `code` and a one-line message that names the
 * file, tensor and expectation where they apply; the CLI prints `error: <message>` and nothing
 * more. Each class has its own union of codes, so a caller can `switch (e.code)` with the
 * compiler's help (ARCHITECTURE.md, "Errors").
 * @module
 */

/**
 * Codes of {@link CheckpointError}: the checkpoint, its index or a weight source is malformed or
 * does not fit the model. Raised before anything is written unless the message says otherwise.
 *
 * - `BAD_CONFIG`: `config.json` has a field that is missing, of the wrong type or unsupported.
 * - `BAD_DATA`: an in-memory tensor is not a typed array or DataView, or pairs are malformed.
 * - `BAD_DESTINATION`: `readRowsInto` was given a destination of the wrong size.
 * - `BAD_DTYPE`: a header dtype is not a string, or an in-memory tensor names an unknown dtype.
 * - `BAD_ENTRY`: a header entry is not an object.
 * - `BAD_EXPERT`: an expert index outside the layer's experts.
 * - `BAD_INDEX`: `model.safetensors.index.json` is not valid JSON or not a name-to-file map.
 * - `BAD_METADATA`: `__metadata__` is not a string-to-string map.
 * - `BAD_NAME`: a tensor name cannot be written to a safetensors header.
 * - `BAD_OFFSETS`: `data_offsets` are not two ordered integers inside the file.
 * - `BAD_OUTPUT`: an output path (`--export`, `--json`) cannot be written, names one file twice, or
 *   is a file the run reads; checked before the run.
 * - `BAD_OPTION`: an option of a checkpoint reader is out of range.
 * - `BAD_ROWS`: `readRowsInto` was asked for rows outside the tensor.
 * - `BAD_SCALE`: a block-fp8 scale is not positive and finite (found when its layer is
 *   processed: with `atomic` the model is restored).
 * - `BAD_SHAPE`: a shape is not a list of non-negative integers, or its byte size overflows.
 * - `BAD_SHARD`: a shard id the fused layer does not have.
 * - `BAD_VIEW`: a device view without a name, not a whole contiguous tensor in the model's backend
 *   memory, or at an address that cannot be backend memory.
 * - `BLOCK_ALIGNMENT`: a block-fp8 tensor whose shards or tensor-parallel cuts do not start on
 *   128x128 blocks, so its bytes cannot be kept as stored.
 * - `CONFIG_CHECKPOINT_MISMATCH`: a `config.json` size is larger than the checkpoint can hold.
 * - `DTYPE_MISMATCH`: a tensor's dtype is not the one the model wants.
 * - `DUPLICATE`: a tensor name appears twice.
 * - `GAP`: bytes of the data area belong to no tensor.
 * - `HEADER_NOT_JSON`: the safetensors header is not valid JSON.
 * - `HEADER_NOT_OBJECT`: the safetensors header is not a JSON object.
 * - `HEADER_TOO_LARGE`: the header length is beyond the limit or the file.
 * - `INDEX_MISMATCH`: the index lists a tensor in another shard than the one holding it.
 * - `MISSING_SHARD`: a shard the index lists cannot be opened.
 * - `MISSING_TENSOR`: tensors the architecture needs are not in the checkpoint.
 * - `MISSING_WEIGHTS`: model tensors the checkpoint does not cover (or covers in part).
 * - `NO_CHECKPOINT`: the path is neither a safetensors file nor a directory holding one.
 * - `NO_CONFIG`: the model directory has no `config.json`.
 * - `NON_CANONICAL_NAME`: a tensor name holds an id with leading zeros (`experts.01`).
 * - `NOT_A_FILE`: an input path is a FIFO, a device, a directory or missing where a file belongs.
 * - `NOT_LOADABLE`: the tensor is computed by processing; a checkpoint cannot set it.
 * - `NOT_SAFETENSORS`: the file is not safetensors at all (its first bytes are shown).
 * - `OVERLAP`: two tensors share bytes of the data area.
 * - `OUT_OF_ORDER`: a streamed source was asked for bytes its stream has already passed.
 * - `OVERLAPPING_ROWS`: two row chunks of one tensor overlap.
 * - `QUANT_MISMATCH`: fp8 tensors (F8_E4M3 weights, block scales) that the model's
 *   quantization cannot take exactly (e.g. a block-fp8 checkpoint into an fp8 per-tensor model).
 * - `SHAPE_MISMATCH`: a tensor's shape is not the one the model wants.
 * - `SIZE_MISMATCH`: a tensor's byte length is not its shape times its dtype size.
 * - `TRUNCATED`: a file is shorter than its header says, or a read came short.
 * - `UNINDEXED_TENSOR`: a shard holds a tensor the index does not list.
 * - `UNKNOWN_TENSOR`: with `strict`, the checkpoint has tensors the model does not.
 * - `UNSUPPORTED_DTYPE`: a dtype this package does not read.
 * - `WRITE_FAILED`: an output file could not be written (the target is left as it was).
 */
export type CheckpointErrorCode =
  | "BAD_CONFIG"
  | "BAD_DATA"
  | "BAD_DESTINATION"
  | "BAD_DTYPE"
  | "BAD_ENTRY"
  | "BAD_EXPERT"
  | "BAD_INDEX"
  | "BAD_METADATA"
  | "BAD_NAME"
  | "BAD_OFFSETS"
  | "BAD_OPTION"
  | "BAD_OUTPUT"
  | "BAD_ROWS"
  | "BAD_SCALE"
  | "BAD_SHAPE"
  | "BAD_SHARD"
  | "BAD_VIEW"
  | "BLOCK_ALIGNMENT"
  | "CONFIG_CHECKPOINT_MISMATCH"
  | "DTYPE_MISMATCH"
  | "DUPLICATE"
  | "GAP"
  | "HEADER_NOT_JSON"
  | "HEADER_NOT_OBJECT"
  | "HEADER_TOO_LARGE"
  | "INDEX_MISMATCH"
  | "MISSING_SHARD"
  | "MISSING_TENSOR"
  | "MISSING_WEIGHTS"
  | "NO_CHECKPOINT"
  | "NO_CONFIG"
  | "NON_CANONICAL_NAME"
  | "NOT_A_FILE"
  | "NOT_LOADABLE"
  | "NOT_SAFETENSORS"
  | "OVERLAP"
  | "OUT_OF_ORDER"
  | "OVERLAPPING_ROWS"
  | "QUANT_MISMATCH"
  | "SHAPE_MISMATCH"
  | "SIZE_MISMATCH"
  | "TRUNCATED"
  | "UNINDEXED_TENSOR"
  | "UNKNOWN_TENSOR"
  | "UNSUPPORTED_DTYPE"
  | "WRITE_FAILED";

/**
 * Codes of {@link ReloadError}: a load or reload could not complete, or was called out of
 * order. The message says what was and was not written.
 *
 * - `ALREADY_LOADED`: `loadWeights` on a layer that holds weights: reload instead.
 * - `BAD_PHASE`: the phases of a device reload run out of order, or it finished before the last.
 * - `BUFFER_LIMIT`: the scratch of layers waiting for tensors would pass `maxBufferedBytes`.
 * - `DEMO_CHECK`: the CLI demo found kernel tensors other than expected.
 * - `KERNEL_MISMATCH`: processing gave a kernel tensor of another shape or dtype than the kept one.
 * - `LOAD_ACTIVE`: a first load of the model is still running.
 * - `META_WRITE`: a loader wrote into a meta tensor outside of counting (an engine bug).
 * - `MISSING_WEIGHTS`: at the end of a reload, layers still miss tensors (listed by name).
 * - `NON_FINITE`: with `rejectNonFinite`, an incoming tensor holds NaN or infinite values.
 * - `NOT_LOADED`: a reload of a model that was never loaded.
 * - `NOT_RECORDED`: a reload of a model whose metadata was not recorded.
 * - `NOT_RELOADING`: a lifecycle call that needs a reload in progress.
 * - `RELOAD_ACTIVE`: another reload of the model is running.
 * - `RELOAD_FAILED`: the weight source or a quantization method threw; the original is the `cause`.
 * - `WINDOWED`: a row window where whole rows are needed (an engine bug).
 */
export type ReloadErrorCode =
  | "ALREADY_LOADED"
  | "BAD_PHASE"
  | "BUFFER_LIMIT"
  | "DEMO_CHECK"
  | "KERNEL_MISMATCH"
  | "LOAD_ACTIVE"
  | "META_WRITE"
  | "MISSING_WEIGHTS"
  | "NON_FINITE"
  | "NOT_LOADED"
  | "NOT_RECORDED"
  | "NOT_RELOADING"
  | "RELOAD_ACTIVE"
  | "RELOAD_FAILED"
  | "WINDOWED";

/**
 * Codes of {@link BackendError}: a kernel or memory call was refused (nothing written) or the
 * device failed.
 *
 * - `BAD_BACKEND`: `LAYERWISE_BACKEND` names no backend.
 * - `BAD_DEVICE`: a device ordinal or device list the machine does not have.
 * - `BAD_DIM`: a dimension index out of range.
 * - `BAD_DTYPE`: a dtype the kernel does not take.
 * - `BAD_FREE`: a free of memory that is not a live allocation.
 * - `BAD_GRANULARITY`: an unknown quantization granularity.
 * - `BAD_OPTION`: an option (staging sizes, thread counts) out of range.
 * - `BAD_SHAPE`: shapes that do not fit the kernel.
 * - `BAD_SIZE`: an allocation size that is not a non-negative integer.
 * - `BAD_VALUE`: a fill value the dtype cannot hold.
 * - `CLOSED`: the backend was closed.
 * - `CUDA_UNAVAILABLE`: no NVIDIA driver, no device, or no kernel library; the message says which.
 * - `DEVICE`: a CUDA error.
 * - `FOREIGN`: memory or a tensor of another backend.
 * - `FREED`: memory that was already freed.
 * - `INVALID`: the kernel library refused the arguments (`LW_EINVAL`).
 * - `IO`: a staged file read failed or came short (`LW_EIO`).
 * - `META_TENSOR`: a meta tensor (no storage) where memory is needed.
 * - `NCCL`: an NCCL call failed.
 * - `NCCL_UNAVAILABLE`: the NCCL library cannot be loaded.
 * - `NOT_2D`: a view that is not a 2-D strided one.
 * - `NOT_CONTIGUOUS`: a view where a contiguous tensor is needed.
 * - `NOT_WASM`: a WebAssembly-only call on another backend.
 * - `OUT_OF_MEMORY`: device or WebAssembly memory is exhausted (`LW_ENOMEM`).
 * - `OUT_OF_RANGE`: an offset or view outside its memory or tensor.
 * - `OVERLAP`: a destination overlaps a source.
 * - `SHAPE_MISMATCH`: source and destination shapes differ.
 * - `SIZE_MISMATCH`: a host buffer of another length than the tensor.
 * - `WASM_IMPORT`: the WebAssembly module imports something the host does not provide.
 * - `WASM_THREADS`: the WebAssembly worker threads could not be started.
 * - `WASM_TRAP`: a WebAssembly kernel trapped on a worker thread.
 * - `WINDOWED`: a row window where a plain view is needed.
 */
export type BackendErrorCode =
  | "BAD_BACKEND"
  | "BAD_DEVICE"
  | "BAD_DIM"
  | "BAD_DTYPE"
  | "BAD_FREE"
  | "BAD_GRANULARITY"
  | "BAD_OPTION"
  | "BAD_SHAPE"
  | "BAD_SIZE"
  | "BAD_VALUE"
  | "CLOSED"
  | "CUDA_UNAVAILABLE"
  | "DEVICE"
  | "FOREIGN"
  | "FREED"
  | "INVALID"
  | "IO"
  | "META_TENSOR"
  | "NCCL"
  | "NCCL_UNAVAILABLE"
  | "NOT_2D"
  | "NOT_CONTIGUOUS"
  | "NOT_WASM"
  | "OUT_OF_MEMORY"
  | "OUT_OF_RANGE"
  | "OVERLAP"
  | "SHAPE_MISMATCH"
  | "SIZE_MISMATCH"
  | "WASM_IMPORT"
  | "WASM_THREADS"
  | "WASM_TRAP"
  | "WINDOWED";

/**
 * Codes of errors thrown as a plain {@link LayerwiseError}: arguments or a configuration the API
 * cannot use.
 *
 * - `BAD_CONFIG`: sizes that do not divide (heads by ranks, rows by shards) or an invalid rank.
 * - `BAD_NAME`: an invalid module name.
 * - `BAD_OPTION`: an option out of range.
 * - `BAD_QUANT`: an unknown quantization scheme.
 * - `BAD_SHAPE`: a shape that is not a list of non-negative integers.
 * - `BAD_SOURCE`: a broadcast source tensor that cannot be broadcast as it is.
 * - `NOT_RECORDED`: a call that needs recordMetadataForReloading first.
 * - `NO_BACKEND`: a module without a backend where tensors must be read.
 * - `NO_SHARD_RULE`: no tensor-parallel sharding rule for a checkpoint name.
 * - `NO_SLOT`: a slot name the module does not have.
 * - `OUT_OF_RANGE`: a narrow or a shard outside its tensor.
 */
export type ArgumentErrorCode =
  | "BAD_CONFIG"
  | "BAD_NAME"
  | "BAD_OPTION"
  | "BAD_QUANT"
  | "BAD_SHAPE"
  | "BAD_SOURCE"
  | "NOT_RECORDED"
  | "NO_BACKEND"
  | "NO_SHARD_RULE"
  | "NO_SLOT"
  | "OUT_OF_RANGE";

/**
 * Codes of the weight-update server's own errors (`deno task serve`; its `ServerError` also
 * carries CheckpointError codes for a malformed streamed body). Each answers with an HTTP status:
 *
 * - 400: `BAD_FIELD`, `BAD_JSON`, `BAD_QUERY`, `MISSING_FIELD`, `UNKNOWN_FIELD` (a JSON body or
 *   query that does not fit the endpoint), `BAD_IDEMPOTENCY_KEY` (an `Idempotency-Key` header
 *   that is not 8 to 128 token characters), `BAD_IPC_HANDLE`, `BAD_IPC_TABLE`, `IPC_UNAVAILABLE`
 *   (an IPC table that is not valid, or a server without CUDA IPC), `DISCONNECTED`,
 *   `LENGTH_MISMATCH`, `TRAILING_BYTES`, `TRUNCATED_BODY` (a body that broke off, ended early or
 *   went on past its header), `BAD_TOKEN_FILE`, `INSECURE_BIND`, `USAGE` (the server's own
 *   configuration, before it serves);
 * - 401 `UNAUTHORIZED`, 403 `FORBIDDEN_PATH`, 404 `NOT_FOUND` and `PATH_NOT_FOUND`, 405
 *   `METHOD_NOT_ALLOWED`, 408 `IDLE_TIMEOUT`, 409 `UPDATE_RUNNING`, 413 `BODY_TOO_LARGE`;
 * - 422 `IPC_OPEN_FAILED`, `IPC_BUCKET_TOO_LARGE` (a handle this GPU cannot open, a bucket
 *   larger than its allocation);
 * - 503 `NOT_READY`, `LOAD_FAILED`, `SHUTTING_DOWN`.
 */
export type ServerErrorCode =
  | "BAD_FIELD"
  | "BAD_IDEMPOTENCY_KEY"
  | "BAD_IPC_HANDLE"
  | "BAD_IPC_TABLE"
  | "BAD_JSON"
  | "BAD_NCCL_INIT"
  | "BAD_NCCL_TABLE"
  | "BAD_QUERY"
  | "BAD_TOKEN_FILE"
  | "BODY_TOO_LARGE"
  | "DISCONNECTED"
  | "FORBIDDEN_PATH"
  | "IDLE_TIMEOUT"
  | "INSECURE_BIND"
  | "IPC_BUCKET_TOO_LARGE"
  | "IPC_OPEN_FAILED"
  | "IPC_UNAVAILABLE"
  | "LENGTH_MISMATCH"
  | "LOAD_FAILED"
  | "METHOD_NOT_ALLOWED"
  | "MISSING_FIELD"
  | "NCCL_INIT_FAILED"
  | "NCCL_UNSUPPORTED"
  | "NO_COMMUNICATOR"
  | "NOT_FOUND"
  | "NOT_READY"
  | "PATH_NOT_FOUND"
  | "SHUTTING_DOWN"
  | "TRAILING_BYTES"
  | "TRUNCATED_BODY"
  | "UNAUTHORIZED"
  | "UNKNOWN_FIELD"
  | "UPDATE_RUNNING"
  | "USAGE";

/** Every code a {@link LayerwiseError} may carry. */
export type ErrorCode =
  | CheckpointErrorCode
  | ReloadErrorCode
  | BackendErrorCode
  | ArgumentErrorCode
  | ServerErrorCode;

/** Base class of every error this package throws on purpose. */
export class LayerwiseError extends Error {
  /** A stable, machine-readable code such as `DTYPE_MISMATCH`. */
  readonly code: ErrorCode;
  /** Creates an error with a code and a one-line message. */
  constructor(code: ErrorCode, message: string) {
    super(message);
    this.code = code;
    this.name = new.target.name;
  }
}

/**
 * The same error, of the same class and code, with another message (a name put in front, a note
 * appended). Errors other than LayerwiseErrors have no code to keep: they come back unchanged.
 */
export function withMessage<E>(e: E, message: string): E {
  if (!(e instanceof LayerwiseError)) return e;
  const Ctor = e.constructor as new (code: ErrorCode, message: string) => E;
  return new Ctor(e.code, message);
}

/** A kernel or memory call was wrong (dtype, size, range) or the device failed. */
export class BackendError extends LayerwiseError {
  /** What went wrong; see {@link BackendErrorCode}. */
  declare readonly code: BackendErrorCode;
  /** Creates an error with a code and a one-line message. */
  constructor(code: BackendErrorCode, message: string) {
    super(code, message);
  }
}

/** A checkpoint file or weight source is malformed or does not fit the model. */
export class CheckpointError extends LayerwiseError {
  /** What went wrong; see {@link CheckpointErrorCode}. */
  declare readonly code: CheckpointErrorCode;
  /** Creates an error with a code and a one-line message. */
  constructor(code: CheckpointErrorCode, message: string) {
    super(code, message);
  }
}

/** A reload could not complete; see the message for what was and was not written. */
export class ReloadError extends LayerwiseError {
  /** What went wrong; see {@link ReloadErrorCode}. */
  declare readonly code: ReloadErrorCode;
  /** Creates an error with a code and a one-line message. */
  constructor(code: ReloadErrorCode, message: string) {
    super(code, message);
  }
}

/**
 * Codes of {@link ConfigError}: `BAD_CONFIG` (a field missing, of the wrong type, out of its
 * limit or unsupported), `NO_CONFIG` (no readable regular file), `CONFIG_CHECKPOINT_MISMATCH`
 * (a size larger than the checkpoint beside it can hold).
 */
export type ConfigErrorCode = "BAD_CONFIG" | "NO_CONFIG" | "CONFIG_CHECKPOINT_MISMATCH";

/**
 * `config.json` is missing, malformed, or does not fit the checkpoint beside it (a
 * CheckpointError: a config is part of a checkpoint).
 */
export class ConfigError extends CheckpointError {
  /** What went wrong; see {@link ConfigErrorCode}. */
  declare readonly code: ConfigErrorCode;
  /** Creates an error with a code and a one-line message. */
  constructor(code: ConfigErrorCode, message: string) {
    super(code, message);
  }
}

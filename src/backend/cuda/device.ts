/**
 * The CUDA backend: the kernels of cuda/kernels.cu called through Deno FFI. {@link CudaDevice}
 * wraps one GPU (memory, pinned host buffers, streams, events, asynchronous copies, file reads
 * into pinned memory) for the fast reload path; {@link openCudaBackend} builds the validating
 * {@link Backend} on top of it, running every kernel on one stream of its own.
 * @module
 */

import { BackendError, type BackendErrorCode } from "../../errors.ts";
import type { Backend } from "../backend.ts";
import { statusError } from "../abi.ts";
import { type KernelAbi, KernelBackend, type MultiTensorAbi, type RawDevice } from "../kernels.ts";
import { type CudaLibrary, type CudaSymbols, DRIVER_SYMBOLS, loadCudaLibrary } from "./cuda_ffi.ts";
import { haveLibc } from "./libc.ts";
import { DevicePool } from "./pool.ts";
import { stagedFileReader } from "./staging.ts";

function unavailable(message: string): BackendError {
  return new BackendError("CUDA_UNAVAILABLE", `CUDA backend unavailable: ${message}`);
}

/**
 * Checks that the NVIDIA driver loads and sees a device, through libcuda.so.1 itself, so the
 * message can say which of the two is missing.
 */
function probeDriver(device: number): void {
  let lib: Deno.DynamicLibrary<typeof DRIVER_SYMBOLS>;
  try {
    lib = Deno.dlopen("libcuda.so.1", DRIVER_SYMBOLS);
  } catch (e) {
    if (e instanceof Deno.errors.NotCapable || e instanceof Deno.errors.PermissionDenied) {
      throw unavailable("it needs --allow-ffi");
    }
    const why = (e as Error).message.replace(/^(Could not open library: )+/, "");
    throw unavailable(`libcuda.so.1 not loadable (is the NVIDIA driver installed?): ${why}`);
  }
  try {
    const init = lib.symbols.cuInit(0);
    // CUDA_ERROR_NO_DEVICE
    if (init === 100) throw unavailable("no CUDA device (the driver sees no GPU)");
    if (init !== 0) {
      throw unavailable(`the CUDA driver failed to initialise (cuInit error ${init})`);
    }
    const n = new Int32Array(1);
    const rc = lib.symbols.cuDeviceGetCount(n);
    if (rc !== 0 || n[0] === 0) throw unavailable("no CUDA device (the driver sees no GPU)");
    if (device >= n[0]) {
      throw unavailable(`no CUDA device ${device} (${n[0]} present)`);
    }
  } finally {
    lib.close();
  }
}

/** Page-locked host memory: full-speed asynchronous copies, and reads straight from files. */
export interface PinnedBuffer {
  /** Host address. */
  readonly ptr: number;
  /** Size in bytes. */
  readonly bytes: number;
  /** The memory as bytes (valid until {@link CudaDevice.hostFree}). */
  readonly view: Uint8Array;
}

/**
 * A plan for the library's staging threads (cuda/layerwise.h, `lw_stager_start`): file
 * descriptors, reads `{file, offset, slotAt, bytes, block}` and pieces `{item, slotAt, bytes,
 * device dst, block, flags}` flattened, and per item how many items must be done first.
 */
export interface StagerPlan {
  /** Open file descriptors, indexed by the reads' `file`. */
  readonly fds: Int32Array;
  /** Five numbers per read. */
  readonly reads: BigUint64Array;
  /** Six numbers per piece (flags: 1 first piece of its item, 2 last). */
  readonly pieces: BigUint64Array;
  /** Per item: items `[0, n)` must be done before its first copy. */
  readonly waitFor: BigUint64Array;
  /** Host address of the pinned ring (`slots` x `slotBytes`). */
  readonly pinned: number;
  /** Bytes per slot. */
  readonly slotBytes: number;
  /** Slots in the ring. */
  readonly slots: number;
  /** Reader threads. */
  readonly readers: number;
}

/** Why a stager stopped (see {@link CudaDevice.stagerError}). */
export interface StagerFailure {
  /** BackendError code of the status: `IO` for a failed or short read. */
  readonly code: BackendErrorCode;
  /** File index of the failed read. */
  readonly file: number;
  /** Its file offset. */
  readonly offset: number;
  /** Its length. */
  readonly bytes: number;
  /** The library's text. */
  readonly text: string;
}

/** One GPU through liblayerwise_cuda.so. Contexts (`ctx`) are streams; 0 is device 0's default. */
export class CudaDevice {
  /** Device ordinal. */
  readonly device: number;
  /** Device name, e.g. `NVIDIA H200`. */
  readonly name: string;
  /** Total device memory in bytes. */
  readonly totalBytes: number;
  /** The library file in use. */
  readonly libraryPath: string;
  readonly #s: CudaSymbols;
  readonly #u64 = new BigUint64Array(1);

  private constructor(lib: CudaLibrary, device: number, name: string, total: number) {
    this.#s = lib.symbols;
    this.libraryPath = lib.path;
    this.device = device;
    this.name = name;
    this.totalBytes = total;
  }

  /**
   * Opens a device. Throws BackendError `CUDA_UNAVAILABLE` when the driver, a device or the
   * library is missing, saying which.
   */
  static open(device = 0): CudaDevice {
    if (!Number.isInteger(device) || device < 0) {
      throw new BackendError("BAD_DEVICE", `invalid CUDA device ordinal ${device}`);
    }
    probeDriver(device);
    const lib = loadCudaLibrary();
    const s = lib.symbols;
    const count = new Int32Array(1);
    let st = s.lw_device_count(count);
    if (st !== 0) throw unavailable(lastError(s) || `lw_device_count failed (${st})`);
    if (device >= count[0]) throw unavailable(`no CUDA device ${device} (${count[0]} present)`);
    const name = new Uint8Array(256);
    const total = new BigUint64Array(1), free = new BigUint64Array(1);
    st = s.lw_device_info(device, name, name.length, total, free);
    if (st !== 0) throw unavailable(lastError(s) || `lw_device_info failed (${st})`);
    const text = new TextDecoder().decode(name.subarray(0, name.indexOf(0)));
    return new CudaDevice(lib, device, text, Number(total[0]));
  }

  /** The raw symbols, for callers that batch their own calls. */
  get symbols(): CudaSymbols {
    return this.#s;
  }

  /** Text of the last error on this thread. */
  lastError(): string {
    return lastError(this.#s);
  }

  /** Throws a BackendError for a non-zero status. */
  check(op: string, status: number): void {
    if (status === 0) return;
    const [code, what] = statusError(status);
    const text = this.lastError() || what;
    throw new BackendError(code, `${op} on cuda:${this.device}: ${text}`);
  }

  /** Free and total device memory in bytes. */
  memInfo(): { free: number; total: number } {
    const total = new BigUint64Array(1), free = new BigUint64Array(1);
    this.check("memInfo", this.#s.lw_device_info(this.device, null, 0, total, free));
    return { free: Number(free[0]), total: Number(total[0]) };
  }

  #out(op: string, status: number): number {
    this.check(op, status);
    return Number(this.#u64[0]);
  }

  /** Allocates device memory. */
  malloc(bytes: number): number {
    return this.#out(`malloc(${bytes})`, this.#s.lw_malloc(this.device, this.#u64, bytes));
  }

  /** Frees device memory (waits for the device to finish using it). */
  free(ptr: number): void {
    this.check("free", this.#s.lw_free(this.device, BigInt(ptr)));
  }

  /** Allocates pinned host memory. */
  hostAlloc(bytes: number): PinnedBuffer {
    const ptr = this.#out(`hostAlloc(${bytes})`, this.#s.lw_host_alloc(this.#u64, bytes));
    const view = bytes === 0 ? new Uint8Array(0) : new Uint8Array(
      Deno.UnsafePointerView.getArrayBuffer(Deno.UnsafePointer.create(BigInt(ptr))!, bytes),
    );
    return { ptr, bytes, view };
  }

  /** Frees pinned host memory; its view must not be used afterwards. */
  hostFree(buf: PinnedBuffer): void {
    this.check("hostFree", this.#s.lw_host_free(BigInt(buf.ptr)));
  }

  /** A new context: a non-blocking stream on this device. */
  createContext(): number {
    return this.#out("createContext", this.#s.lw_ctx_create(this.device, this.#u64));
  }

  /** Waits for a context's work, then destroys it. */
  destroyContext(ctx: number): void {
    this.check("destroyContext", this.#s.lw_ctx_destroy(ctx));
  }

  /** Waits for all work queued on a context. */
  sync(ctx: number): void {
    this.check("sync", this.#s.lw_ctx_sync(ctx));
  }

  /** Like sync, without blocking the JS thread. */
  async syncAsync(ctx: number): Promise<void> {
    const st = await this.#s.lw_ctx_sync_nb(ctx);
    if (st !== 0) this.#asyncFail("sync", st);
  }

  /** Queues a host-to-device copy from pinned memory at `src`. */
  h2d(ctx: number, dst: number, src: number, n: number): void {
    this.check("h2d", this.#s.lw_memcpy_h2d(ctx, dst, src, n));
  }

  /** Queues a device-to-host copy into pinned memory at `dst`. */
  d2h(ctx: number, dst: number, src: number, n: number): void {
    this.check("d2h", this.#s.lw_memcpy_d2h(ctx, dst, src, n));
  }

  /** Host-to-device copy from a typed array, finished when this returns. */
  writeSync(ctx: number, dst: number, src: Uint8Array): void {
    if (src.byteLength === 0) return;
    this.check("write", this.#s.lw_memcpy_h2d_buf(ctx, dst, src, src.byteLength));
    this.sync(ctx);
  }

  /** Device-to-host copy into a typed array, finished when this returns. */
  readSync(ctx: number, dst: Uint8Array, src: number): void {
    if (dst.byteLength === 0) return;
    this.check("read", this.#s.lw_memcpy_d2h_buf(ctx, dst, src, dst.byteLength));
    this.sync(ctx);
  }

  /** A new event (timing enabled). */
  createEvent(): number {
    return this.#out("createEvent", this.#s.lw_event_create(this.device, this.#u64));
  }

  /** A new event whose host waits sleep rather than spin (no timing); for staged reads. */
  createSyncEvent(): number {
    return this.#out(
      "createSyncEvent",
      this.#s.lw_event_create_blocking(this.device, this.#u64),
    );
  }

  /** Destroys an event. */
  destroyEvent(event: number): void {
    this.check("destroyEvent", this.#s.lw_event_destroy(event));
  }

  /** Records an event on a context's stream. */
  record(event: number, ctx: number): void {
    this.check("record", this.#s.lw_event_record(event, ctx));
  }

  /** Makes a context's later work wait for an event. */
  wait(ctx: number, event: number): void {
    this.check("wait", this.#s.lw_event_wait(ctx, event));
  }

  /** Waits for an event on the host. */
  eventSync(event: number): void {
    this.check("eventSync", this.#s.lw_event_sync(event));
  }

  /** Like eventSync, without blocking the JS thread. */
  async eventSyncAsync(event: number): Promise<void> {
    const st = await this.#s.lw_event_sync_nb(event);
    if (st !== 0) this.#asyncFail("eventSync", st);
  }

  /** Milliseconds between two recorded, completed events. */
  elapsedMs(start: number, end: number): number {
    const out = new Float32Array(1);
    this.check("elapsedMs", this.#s.lw_event_elapsed(out, start, end));
    return out[0];
  }

  /** Reads `n` bytes at `offset` of file descriptor `fd` into host memory at `dst`. */
  pread(fd: number, dst: number, n: number, offset: number): void {
    this.check("pread", this.#s.lw_pread(fd, dst, n, BigInt(offset)));
  }

  // ------------------------------------------------ native staging (cuda/stager.cu)

  /**
   * Starts the library's staging threads on a plan (cuda/layerwise.h, `lw_stager_start`);
   * returns the stager handle. Copies go on `copyCtx`; the consumer is `consumerCtx`.
   */
  stagerStart(copyCtx: number, consumerCtx: number, plan: StagerPlan): number {
    const st = this.#s.lw_stager_start(
      copyCtx,
      consumerCtx,
      plan.fds,
      plan.fds.length,
      plan.reads,
      plan.reads.length / 5,
      plan.pieces,
      plan.pieces.length / 6,
      plan.waitFor,
      plan.waitFor.length,
      BigInt(plan.pinned),
      BigInt(plan.slotBytes),
      plan.slots,
      plan.readers,
      this.#u64,
    );
    return this.#out("stagerStart", st);
  }

  /** Whether {@link stagerNext} for `item` would return at once. */
  stagerReady(stager: number, item: number): boolean {
    return this.#s.lw_stager_ready(stager, BigInt(item)) !== 0;
  }

  /**
   * Waits until `item` is queued and makes the consumer stream wait for its copy. Returns the
   * status (LW_EIO after a failed read: see {@link stagerError}).
   */
  stagerNext(stager: number, item: number): number {
    return this.#s.lw_stager_next(stager, BigInt(item));
  }

  /** Like {@link stagerNext}, without blocking the JS thread. */
  stagerNextAsync(stager: number, item: number): Promise<number> {
    return this.#s.lw_stager_next_nb(stager, BigInt(item));
  }

  /** The consumer stream is done with `item` (its device bytes may be overwritten). */
  stagerDone(stager: number, item: number): void {
    this.check("stagerDone", this.#s.lw_stager_done(stager, BigInt(item)));
  }

  /**
   * The stager's first failure: its BackendError code (`IO` for a failed read), the failed
   * read's file index, offset and length, and the library's text; null when nothing failed.
   */
  stagerError(stager: number): StagerFailure | null {
    const where = new BigUint64Array(3);
    const buf = new Uint8Array(1024);
    const status = this.#s.lw_stager_error(stager, where, buf, buf.length);
    if (status === 0) return null;
    const text = new TextDecoder().decode(buf.subarray(0, buf.indexOf(0)));
    const [code, what] = statusError(status);
    return {
      code,
      file: Number(where[0]),
      offset: Number(where[1]),
      bytes: Number(where[2]),
      text: text || what,
    };
  }

  /** Seconds the stager's copy thread waited for reads and for the consumer. */
  stagerStats(stager: number): { readWaitSeconds: number; consumerWaitSeconds: number } {
    const out = new Float64Array(2);
    this.check("stagerStats", this.#s.lw_stager_stats(stager, out));
    return { readWaitSeconds: out[0], consumerWaitSeconds: out[1] };
  }

  /** Stops the stager's threads, waits for its queued copies and frees it. */
  stagerFinish(stager: number): void {
    this.check("stagerFinish", this.#s.lw_stager_finish(stager));
  }

  // ------------------------------------------------ graphs, streams, fp8 probe (cuda/graph.cu)

  /** The `cudaStream_t` of a context, for libraries that queue work on it (NCCL). */
  stream(ctx: number): number {
    return this.#out("stream", this.#s.lw_ctx_stream(ctx, this.#u64));
  }

  /** Starts capturing a context's stream into a CUDA graph (thread-local capture mode). */
  graphBegin(ctx: number): void {
    this.check("graphBegin", this.#s.lw_graph_begin(ctx));
  }

  /** Ends the capture begun by {@link graphBegin}; returns an executable graph. */
  graphEnd(ctx: number): number {
    return this.#out("graphEnd", this.#s.lw_graph_end(ctx, this.#u64));
  }

  /** Queues one replay of an executable graph on a context's stream. */
  graphLaunch(ctx: number, exec: number): void {
    this.check("graphLaunch", this.#s.lw_graph_launch(ctx, exec));
  }

  /** Destroys an executable graph. */
  graphDestroy(exec: number): void {
    this.check("graphDestroy", this.#s.lw_graph_destroy(exec));
  }

  /**
   * Queues the fp8 probe (cuda/layerwise.h `lw_fp8_tensor_sums`): for a device table of `n`
   * entries {q, numel, scale}, exact sums in units of 2^-9 into `sums` (i64) and the
   * dequantized sums into `dequant` (f64). Capturable.
   */
  fp8TensorSums(
    ctx: number,
    table: number,
    n: number,
    maxNumel: number,
    sums: number,
    dequant: number,
  ): void {
    this.check(
      "fp8TensorSums",
      this.#s.lw_fp8_tensor_sums(ctx, table, n, maxNumel, sums, dequant),
    );
  }

  // The library keeps error text per thread and nonblocking calls ran on another one.
  #asyncFail(op: string, status: number): never {
    const [code, what] = statusError(status);
    throw new BackendError(code, `${op} on cuda:${this.device}: ${what}`);
  }
}

function lastError(s: CudaSymbols): string {
  const buf = new Uint8Array(1024);
  const n = Number(s.lw_last_error(buf, buf.length));
  return new TextDecoder().decode(buf.subarray(0, Math.min(n, buf.length - 1)));
}

/** RawDevice over a CudaDevice and one context of its own. */
class CudaRaw implements RawDevice {
  readonly kind = "cuda" as const;
  readonly description: string;
  readonly #d: CudaDevice;
  readonly #s: CudaSymbols;
  readonly #ctx: number;
  readonly #live = new Set<number>();
  /** Sizes of live blocks and the reuse cache of the staged reload path. */
  readonly pool: DevicePool = new DevicePool();

  constructor(d: CudaDevice) {
    this.#d = d;
    this.#s = d.symbols;
    this.#ctx = d.createContext();
    this.description = `cuda:${d.device} ${d.name}`;
  }

  /** The stream every kernel of this backend runs on. */
  get ctx(): number {
    return this.#ctx;
  }

  /** The device. */
  get cudaDevice(): CudaDevice {
    return this.#d;
  }

  malloc(bytes: number): number {
    const p = this.pool.take(bytes, (q) => this.#d.free(q)) ?? this.#d.malloc(bytes);
    this.#live.add(p);
    this.pool.allocated(p, bytes);
    return p;
  }

  free(ptr: number): void {
    this.#live.delete(ptr);
    if (!this.pool.give(ptr)) this.#d.free(ptr);
  }

  write(ptr: number, src: Uint8Array): void {
    this.#d.writeSync(this.#ctx, ptr, src);
  }

  read(ptr: number, dst: Uint8Array): void {
    this.#d.readSync(this.#ctx, dst, ptr);
  }

  /** The library's kernel entry points, called with {@link CudaRaw.ctx}. */
  get kernels(): KernelAbi & MultiTensorAbi {
    return this.#s;
  }

  /** A device pointer cannot be checked from the host: any range is accepted. */
  checkRange(_op: string, _ptr: number, _n: number): void {}

  sync(): void {
    this.#d.sync(this.#ctx);
  }

  errorText(status: number): string {
    return this.#d.lastError() || statusError(status)[1];
  }

  close(): void {
    // KernelBackend forgets its storages on close: give their memory back here.
    try {
      this.#d.destroyContext(this.#ctx);
    } finally {
      for (const p of this.#live) this.#d.free(p);
      this.#live.clear();
      this.pool.trim((p) => this.#d.free(p));
    }
  }
}

/** Options for {@link openCudaBackend}. */
export interface CudaBackendOptions {
  /** CUDA device ordinal (default 0). */
  device?: number;
}

/**
 * Opens the CUDA backend on one device. Throws BackendError `CUDA_UNAVAILABLE` when the NVIDIA
 * driver (libcuda.so.1), a device or the kernel library is missing; the message says which.
 */
export function openCudaBackend(options: CudaBackendOptions = {}): Backend {
  const dev = CudaDevice.open(options.device ?? 0);
  const raw = new CudaRaw(dev);
  const handle: CudaHandle = { device: dev, ctx: raw.ctx, pool: raw.pool };
  const backend = new KernelBackend(
    raw,
    (self) => (haveLibc() ? { fileReader: stagedFileReader(self, handle) } : {}),
  );
  HANDLES.set(backend, handle);
  return backend;
}

/** What the staged reload path needs of a CUDA backend. */
export interface CudaHandle {
  /** The device. */
  readonly device: CudaDevice;
  /** The stream the backend's kernels run on. */
  readonly ctx: number;
  /** Its memory accounting and reuse cache. */
  readonly pool: DevicePool;
}

const HANDLES = new WeakMap<Backend, CudaHandle>();

/** The device, stream and pool behind a backend from {@link openCudaBackend}; else undefined. */
export function cudaHandle(backend: Backend): CudaHandle | undefined {
  return HANDLES.get(backend);
}

/**
 * Staged reads for the CUDA backend: checkpoint tensors read from files by threads of the CUDA
 * library into a ring of pinned host memory, copied to the device asynchronously on a stream of
 * their own, and handed out as backend tensors in read order, so that reading the next tensors
 * overlaps copying and processing the current ones.
 *
 * This module plans; the library moves the bytes (cuda/stager.cu). The read order is cut into
 * blocks of one pinned slot; each block is read with parallel `pread`s (reads of neighbouring
 * tensors of one file are merged, then split into chunks), then copied to the device piece by
 * piece by one thread of the library, so no copy ever waits for the JavaScript thread. Tensors
 * land in a device ring and are handed out as soon as their last piece is queued; a tensor
 * larger than half of the ring (or than `maxChunkBytes`) travels as consecutive row chunks,
 * each handed out as a `rowWindow` of the tensor, so no whole big tensor is ever held in device
 * memory (only a 1-D tensor or a single row larger than half the ring, which no language model
 * has, gets a block of its own, allocated before the stream starts). The backend's stream waits
 * for each copy through an event, and the copy stream waits, through another event recorded
 * after the consumer is done, before it overwrites a tensor's place in the ring. Every place is
 * planned up front, so the library needs from JavaScript only "tensor i is done".
 *
 * @module
 */

import type { Backend, StagedReader } from "../backend.ts";
import { BackendError, CheckpointError } from "../../errors.ts";
import type { DType } from "../../tensor/dtype.ts";
import { rowWindow, type Storage, Tensor } from "../../tensor/tensor.ts";
import type { CudaDevice, CudaHandle, PinnedBuffer } from "./device.ts";
import { closeFd, openFd } from "./libc.ts";
import {
  checkOptions,
  flattenPieces,
  flattenReads,
  planStaging,
  type StagedTensor,
  STAGING_DEFAULTS,
  type StagingOptions,
  type StagingStats,
} from "./staging_plan.ts";

interface HostRing {
  readonly slotBytes: number;
  readonly slots: number;
  /** `slots` x `slotBytes` of pinned memory. */
  readonly pinned: PinnedBuffer;
  /** The copy stream. */
  readonly ctx: number;
  busy: boolean;
}

const RINGS = new WeakMap<Backend, HostRing>();

function makeRing(d: CudaDevice, slotBytes: number, slots: number): HostRing {
  const pinned = d.hostAlloc(slotBytes * slots);
  try {
    return { slotBytes, slots, pinned, ctx: d.createContext(), busy: false };
  } catch (e) {
    d.hostFree(pinned);
    throw e;
  }
}

function freeRing(d: CudaDevice, ring: HostRing): void {
  d.destroyContext(ring.ctx); // waits for its copies first
  d.hostFree(ring.pinned);
}

/** The pinned ring kept for a backend (allocating pinned memory takes tens of ms). */
function ringFor(backend: Backend, h: CudaHandle, o: Required<StagingOptions>): HostRing {
  const kept = RINGS.get(backend);
  if (kept && !kept.busy && kept.slotBytes === o.slotBytes && kept.slots === o.slots) {
    return kept;
  }
  const ring = makeRing(h.device, o.slotBytes, o.slots);
  if (!kept || !kept.busy) {
    if (kept) freeRing(h.device, kept);
    RINGS.set(backend, ring);
  }
  return ring;
}

/**
 * The staged reads of a CUDA backend (its {@link Backend.fileReader}): `h` is the backend's
 * device, stream and memory pool.
 */
export function stagedFileReader(backend: Backend, h: CudaHandle): StagedReader {
  return {
    read: (files, located, infoOf, options, stats) =>
      stageFiles(backend, h, files, located, infoOf, options, stats),
    release: () => releaseRing(backend, h),
  };
}

/** Frees the pinned ring kept for `backend`, unless a read is using it. */
function releaseRing(backend: Backend, h: CudaHandle): void {
  const ring = RINGS.get(backend);
  if (!ring || ring.busy) return;
  RINGS.delete(backend);
  freeRing(h.device, ring);
}

/**
 * Reads the `located` tensors of `files` (in that order) through the pinned ring and yields
 * each as a contiguous tensor in `backend` memory, borrowed: it is valid until the consumer
 * asks for the next one. A tensor larger than half the device ring (or `maxChunkBytes`) comes
 * as consecutive row chunks under its name, each a `rowWindow` of it. Returns true after the
 * last tensor.
 * Errors: CheckpointError `TRUNCATED` when a file came short, `MISSING_SHARD` when one
 * vanished; BackendError from the device, `BAD_OPTION` for sizes that are not positive
 * integers.
 */
async function* stageFiles(
  backend: Backend,
  h: CudaHandle,
  files: readonly string[],
  located: readonly StagedTensor[],
  infoOf: (name: string) => { readonly shape: readonly number[]; readonly dtype: DType },
  options: StagingOptions = {},
  stats?: StagingStats,
): AsyncGenerator<[string, Tensor], boolean> {
  const o = { ...STAGING_DEFAULTS, ...options };
  checkOptions(o);
  const d = h.device;
  const ring = ringFor(backend, h, o);
  const kept = RINGS.get(backend) === ring;
  ring.busy = true;
  const fds: number[] = [];
  const dedicated = new Map<number, Storage>();
  let devRing: Storage | null = null;
  let stager = 0;
  let ok = false;
  if (o.reuseAllocations) h.pool.hold();
  try {
    for (const f of files) fds.push(openFd(f));
    const { tensors, blocks, ringBytes, ringOffsets, waitFor } = planStaging(
      located,
      (n) => infoOf(n).shape,
      o,
    );
    devRing = backend.alloc(ringBytes);
    if (stats) {
      stats.pinnedBytes = o.slotBytes * o.slots;
      stats.deviceRingBytes = ringBytes;
    }
    const base: [Storage, number][] = [];
    tensors.forEach((t, i) => {
      if (ringOffsets[i] >= 0) base.push([devRing!, ringOffsets[i]]);
      else {
        const s = backend.alloc(t.bytes);
        dedicated.set(i, s);
        base.push([s, 0]);
        if (stats) stats.dedicated++;
      }
    });
    stager = d.stagerStart(ring.ctx, h.ctx, {
      fds: Int32Array.from(fds),
      reads: flattenReads(blocks),
      pieces: flattenPieces(tensors, blocks, base.map(([s, off]) => s.ptr + off)),
      waitFor,
      pinned: ring.pinned.ptr,
      slotBytes: o.slotBytes,
      slots: o.slots,
      readers: o.readers,
    });

    for (let i = 0; i < tensors.length; i++) {
      const t = tensors[i];
      const t0 = performance.now();
      const st = d.stagerReady(stager, i)
        ? d.stagerNext(stager, i)
        : await d.stagerNextAsync(stager, i);
      if (stats) stats.readWaitSeconds += (performance.now() - t0) / 1000;
      if (st !== 0) throw stagingFailure(d, stager, files);
      const [storage, off] = base[i];
      const info = infoOf(t.name);
      let tensor: Tensor;
      if (t.rows) {
        const shape = [t.rows.end - t.rows.start, ...info.shape.slice(1)];
        const chunk = new Tensor(shape, info.dtype, storage, off / info.dtype.size);
        tensor = rowWindow(chunk, t.rows.start, info.shape[0]);
        if (stats) stats.chunks = (stats.chunks ?? 0) + 1;
      } else tensor = new Tensor(info.shape, info.dtype, storage, off / info.dtype.size);
      if (stats) stats.bytes += t.bytes;
      yield [t.name, tensor];
      d.stagerDone(stager, i);
      const own = dedicated.get(i);
      if (own) {
        dedicated.delete(i);
        backend.free(own);
      }
    }
    ok = true;
    return true;
  } finally {
    let err: unknown = null;
    const attempt = (f: () => void) => {
      try {
        f();
      } catch (e) {
        err ??= e;
      }
    };
    if (stager !== 0) {
      if (stats) {
        attempt(() => {
          const w = d.stagerStats(stager);
          stats.copyWaitReadsSeconds = w.readWaitSeconds;
          stats.copyWaitConsumerSeconds = w.consumerWaitSeconds;
        });
      }
      // Stops the threads and waits for copies out of the pinned ring before anything goes.
      attempt(() => d.stagerFinish(stager));
    }
    attempt(() => backend.synchronize());
    for (const s of dedicated.values()) attempt(() => backend.free(s));
    if (devRing) attempt(() => backend.free(devRing!));
    if (o.reuseAllocations) attempt(() => h.pool.release((p) => d.free(p)));
    for (const fd of fds) closeFd(fd);
    ring.busy = false;
    if (!kept) attempt(() => freeRing(d, ring));
    // A cleanup failure after success is the error; after a failure the first error wins.
    // deno-lint-ignore no-unsafe-finally -- only after success, where nothing else is thrown
    if (ok && err !== null) throw err;
  }
}

/** The error for a stager that stopped: a failed read names its file, offset and length. */
function stagingFailure(d: CudaDevice, stager: number, files: readonly string[]): Error {
  const f = d.stagerError(stager);
  if (f === null) return new BackendError("DEVICE", `staging on cuda:${d.device}: stopped`);
  if (f.code !== "IO") {
    return new BackendError(f.code, `staging on cuda:${d.device}: ${f.text}`);
  }
  return new CheckpointError(
    "TRUNCATED",
    `${files[f.file]}: reading ${f.bytes} bytes at ${f.offset} failed or came short (${f.text})`,
  );
}

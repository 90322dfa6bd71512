/**
 * A backend capability: joining an NCCL communicator with a process outside this one (a
 * trainer) and receiving its broadcasts into backend memory. The server's NCCL updates reach
 * NCCL only through this interface, so tests can fill the buckets from host bytes.
 * @module
 */

/** Bytes of an `ncclUniqueId`. */
export const NCCL_UNIQUE_ID_BYTES = 128;

/** Joins communicators on one backend (see the module doc). */
export interface NcclJoiner {
  /**
   * Joins the communicator of `uniqueId` ({@link NCCL_UNIQUE_ID_BYTES} bytes) as `rank` of
   * `worldSize`; resolves once every rank has joined.
   */
  join(uniqueId: Uint8Array, worldSize: number, rank: number): Promise<NcclReceiver>;
}

/** This process's rank in a communicator, receiving into backend memory. */
export interface NcclReceiver {
  /** This rank. */
  readonly rank: number;
  /** Ranks in the communicator. */
  readonly worldSize: number;
  /**
   * Queues the receive of a broadcast of `bytes` from rank `root` into backend address `dst`.
   * It starts once the backend's work queued before this call is done (the buffer may still be
   * read by it); returns an arrival id for {@link NcclReceiver.waitFor}.
   */
  receive(dst: number, bytes: number, root: number): number;
  /** Backend work queued after this call sees the bytes of arrival `id`. */
  waitFor(id: number): void;
  /** Waits for every queued receive; throws on a communicator error (e.g. a failed peer). */
  synchronize(): void;
  /** Leaves the communicator (after its work is done). Idempotent. */
  close(): void;
}

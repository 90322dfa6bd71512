/*
 * Native staging (ARCHITECTURE.md, "Read paths"; CUDA only; included at the end of kernels.cu, so it shares its
 * contexts, error text and ENTER/CK macros): checkpoint bytes go from files to device memory
 * through a pinned ring, moved by threads of this library, not by the JavaScript event loop.
 *
 * Why native: on a 16-core H200 host the same pipeline driven from JavaScript (preads on Deno's
 * blocking pool, copies queued by the JS thread) moved 38-43 GB/s, while these threads move
 * 47-51 GB/s (BENCHMARKS.md, 2026-11-30). The thread that queues the copies must never wait
 * behind dozens of readers for a core, nor behind the consumer's JavaScript; here it does
 * neither.
 *
 * The caller (src/checkpoint/staging.ts) plans everything: reads (file ranges into a slot of the
 * ring), pieces (slot ranges copied to device addresses), and for each item (a tensor or a row
 * chunk of one) how many items the consumer must have finished before its first copy may
 * overwrite their device bytes. Then:
 *   readers    take reads in order; a read into a slot whose previous block is still being
 *              copied waits for that copy's event; when a block's last read lands, the submitter
 *              is told.
 *   submitter  one thread: for each block in order, when its reads are done, queues its pieces'
 *              copies on the copy stream (after the consumer's release event of whatever they
 *              overwrite), records a ready event after each item's last piece and a slot event
 *              after the block.
 *   consumer   the caller's thread: lw_stager_next(i) waits until item i is queued and makes the
 *              consumer stream wait for its ready event; lw_stager_done(i) records its release.
 * Items are taken and finished in order, so each wait needs only counters and one event.
 */

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <thread>
#include <vector>

namespace {

struct StageRead {
  uint64_t file, offset, slot_at, bytes, block;
};
struct StagePiece {
  uint64_t item, slot_at, bytes, dst, block, flags;
};
constexpr uint64_t kPieceFirst = 1, kPieceLast = 2;
// Ready and release events are used round robin: an item's ready event is recorded again only
// after the consumer has taken the item kStageEvents earlier, and waiting on a release event
// recorded again later is only more cautious (the consumer stream runs in order).
constexpr size_t kStageEvents = 64;

double seconds_now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

struct Stager {
  int device = 0;
  cudaStream_t copy = nullptr, consumer = nullptr;
  std::vector<int32_t> fds;
  std::vector<StageRead> reads;
  std::vector<StagePiece> pieces;
  std::vector<uint64_t> wait_for;    // per item: items [0, n) finished before its first copy
  std::vector<size_t> block_pieces;  // first piece of each block; one more entry at the end
  uint8_t *pinned = nullptr;
  size_t slot_bytes = 0;
  uint32_t slots = 0;
  std::vector<cudaEvent_t> slot_ev, ready_ev, release_ev;
  std::vector<int64_t> slot_block;  // the last block whose copies out of each slot are queued
  std::unique_ptr<std::atomic<uint64_t>[]> left;  // reads not yet landed, per block
  std::atomic<size_t> next_read{0};
  std::atomic<bool> stop{false};

  std::mutex mu;
  std::condition_variable cv_slot, cv_submit, cv_consumer;
  uint64_t queued = 0, taken = 0, finished = 0;  // items, counted from the first

  // The first failure, kept for the consumer (error text is per thread elsewhere).
  lw_status err = LW_OK;
  std::string err_text;
  uint64_t err_file = 0, err_offset = 0, err_bytes = 0;

  double read_wait = 0, consumer_wait = 0;  // the submitter's waits, seconds
  std::vector<std::thread> threads;

  void failed(lw_status s, std::string text, const StageRead *r) {
    {
      std::lock_guard<std::mutex> lk(mu);
      if (err == LW_OK) {
        err = s;
        err_text = std::move(text);
        if (r != nullptr) {
          err_file = r->file;
          err_offset = r->offset;
          err_bytes = r->bytes;
        }
      }
      stop = true;
    }
    cv_slot.notify_all();
    cv_submit.notify_all();
    cv_consumer.notify_all();
  }

  void reader() {
    if (cudaSetDevice(device) != cudaSuccess) return failed(LW_ECUDA, "cudaSetDevice", nullptr);
    for (;;) {
      size_t k = next_read.fetch_add(1);
      if (k >= reads.size() || stop) return;
      const StageRead &r = reads[k];
      const uint32_t s = (uint32_t)(r.block % slots);
      if (r.block >= slots) {
        std::unique_lock<std::mutex> lk(mu);
        cv_slot.wait(lk, [&] { return stop || slot_block[s] >= (int64_t)(r.block - slots); });
        lk.unlock();
        if (stop) return;
        cudaError_t e = cudaEventSynchronize(slot_ev[s]);
        if (e != cudaSuccess) {
          return failed(LW_ECUDA, std::string("staging: waiting for a slot: ") +
                                      cudaGetErrorString(e), nullptr);
        }
      }
      // lw_pread keeps its error text in this thread's t_error.
      lw_status st = lw_pread(fds[r.file], pinned + (size_t)s * slot_bytes + r.slot_at, r.bytes,
                              r.offset);
      if (st != LW_OK) return failed(st, t_error, &r);
      if (left[r.block].fetch_sub(1) == 1) {
        std::lock_guard<std::mutex> lk(mu);
        cv_submit.notify_one();
      }
    }
  }

  // Waits under the lock until `ready` or stop; adds the time waited to `*acc`.
  template <class F>
  bool wait_submit(F ready, double *acc) {
    std::unique_lock<std::mutex> lk(mu);
    if (!ready() && !stop) {
      double t0 = seconds_now();
      cv_submit.wait(lk, [&] { return stop || ready(); });
      *acc += seconds_now() - t0;
    }
    return !stop;
  }

  void submitter() {
    if (cudaSetDevice(device) != cudaSuccess) return failed(LW_ECUDA, "cudaSetDevice", nullptr);
    const size_t blocks = block_pieces.size() - 1;
    for (size_t b = 0; b < blocks; b++) {
      if (!wait_submit([&] { return left[b].load() == 0; }, &read_wait)) return;
      const uint32_t s = (uint32_t)(b % slots);
      const uint8_t *slot = pinned + (size_t)s * slot_bytes;
      for (size_t k = block_pieces[b]; k < block_pieces[b + 1]; k++) {
        const StagePiece &p = pieces[k];
        cudaError_t e = cudaSuccess;
        const uint64_t w = wait_for[p.item];
        if ((p.flags & kPieceFirst) && w > 0) {
          if (!wait_submit([&] { return finished >= w; }, &consumer_wait)) return;
          e = cudaStreamWaitEvent(copy, release_ev[(w - 1) % kStageEvents], 0);
        }
        if (e == cudaSuccess && p.bytes > 0) {
          e = cudaMemcpyAsync(reinterpret_cast<void *>(p.dst), slot + p.slot_at, p.bytes,
                              cudaMemcpyHostToDevice, copy);
        }
        if (e == cudaSuccess && (p.flags & kPieceLast)) {
          if (!wait_submit([&] { return taken + kStageEvents > p.item; }, &consumer_wait)) return;
          e = cudaEventRecord(ready_ev[p.item % kStageEvents], copy);
          if (e == cudaSuccess) {
            std::lock_guard<std::mutex> lk(mu);
            queued = p.item + 1;
            cv_consumer.notify_all();
          }
        }
        if (e != cudaSuccess) {
          return failed(LW_ECUDA, std::string("staging: queueing a copy: ") +
                                      cudaGetErrorString(e), nullptr);
        }
      }
      cudaError_t e = cudaEventRecord(slot_ev[s], copy);
      if (e != cudaSuccess) {
        return failed(LW_ECUDA, std::string("staging: recording a slot event: ") +
                                    cudaGetErrorString(e), nullptr);
      }
      {
        std::lock_guard<std::mutex> lk(mu);
        slot_block[s] = (int64_t)b;
      }
      cv_slot.notify_all();
    }
  }

  // Stops the threads and waits for them and for the copies out of the pinned ring.
  void halt() {
    {
      std::lock_guard<std::mutex> lk(mu);
      stop = true;
    }
    cv_slot.notify_all();
    cv_submit.notify_all();
    cv_consumer.notify_all();
    for (auto &t : threads) t.join();
    threads.clear();
    if (copy != nullptr) cudaStreamSynchronize(copy);
  }

  ~Stager() {
    for (auto *v : {&slot_ev, &ready_ev, &release_ev})
      for (cudaEvent_t e : *v) cudaEventDestroy(e);
  }
};

lw_status stager_fail_einval(const std::string &text) {
  return fail(LW_EINVAL, "lw_stager_start: " + text);
}

}  // namespace

extern "C" {

LW_API lw_status lw_stager_start(void *copy_ctx, void *consumer_ctx, const int32_t *fds,
                                 uint32_t nfiles, const uint64_t *reads, size_t nreads,
                                 const uint64_t *pieces, size_t npieces,
                                 const uint64_t *wait_for, size_t nitems, uint64_t pinned,
                                 uint64_t slot_bytes, uint32_t slots, uint32_t readers,
                                 uint64_t *out_handle) {
  lw_ctx *consumer;
  lw_status st = enter(consumer_ctx, &consumer);
  if (st != LW_OK) return st;
  ENTER(copy_ctx);
  if (c_->device != consumer->device) return stager_fail_einval("contexts on two devices");
  if (slots == 0 || slot_bytes == 0 || pinned == 0) return stager_fail_einval("empty ring");
  if (readers == 0) return stager_fail_einval("no reader threads");
  auto g = std::make_unique<Stager>();
  g->device = c_->device;
  g->copy = c_->stream;
  g->consumer = consumer->stream;
  g->fds.assign(fds, fds + nfiles);
  g->pinned = reinterpret_cast<uint8_t *>(pinned);
  g->slot_bytes = slot_bytes;
  g->slots = slots;
  g->wait_for.assign(wait_for, wait_for + nitems);
  g->reads.resize(nreads);
  memcpy(g->reads.data(), reads, nreads * sizeof(StageRead));
  g->pieces.resize(npieces);
  memcpy(g->pieces.data(), pieces, npieces * sizeof(StagePiece));

  // Validate the plan: the threads trust it.
  uint64_t blocks = npieces == 0 ? 0 : g->pieces.back().block + 1;
  for (size_t k = 0; k < npieces; k++) {
    const StagePiece &p = g->pieces[k];
    if (p.item >= nitems || p.slot_at > slot_bytes || p.bytes > slot_bytes - p.slot_at ||
        (k > 0 && p.block < g->pieces[k - 1].block) || p.flags > 3) {
      return stager_fail_einval("piece " + std::to_string(k) + " out of range or order");
    }
    if (k > 0 && p.item < g->pieces[k - 1].item) {
      return stager_fail_einval("piece " + std::to_string(k) + ": items out of order");
    }
  }
  for (size_t i = 0; i < nitems; i++) {
    if (g->wait_for[i] > i) return stager_fail_einval("item " + std::to_string(i) + " waits ahead");
  }
  for (size_t k = 0; k < nreads; k++) {
    const StageRead &r = g->reads[k];
    if (r.file >= nfiles || r.block >= blocks || r.slot_at > slot_bytes ||
        r.bytes > slot_bytes - r.slot_at || (k > 0 && r.block < g->reads[k - 1].block)) {
      return stager_fail_einval("read " + std::to_string(k) + " out of range or order");
    }
  }
  g->block_pieces.assign(blocks + 1, npieces);
  for (size_t k = npieces; k-- > 0;) g->block_pieces[g->pieces[k].block] = k;
  for (size_t b = blocks; b-- > 0;) {
    // A block without pieces (the planner makes none) gets an empty range.
    if (g->block_pieces[b] > g->block_pieces[b + 1]) g->block_pieces[b] = g->block_pieces[b + 1];
  }
  g->left.reset(new std::atomic<uint64_t>[blocks]);
  for (uint64_t b = 0; b < blocks; b++) g->left[b] = 0;
  for (const StageRead &r : g->reads) g->left[r.block]++;
  g->slot_block.assign(slots, -1);

  for (auto [v, n] : {std::pair{&g->slot_ev, (size_t)slots}, std::pair{&g->ready_ev, kStageEvents},
                      std::pair{&g->release_ev, kStageEvents}}) {
    for (size_t i = 0; i < n; i++) {
      cudaEvent_t e;
      CK(cudaEventCreateWithFlags(&e, cudaEventBlockingSync | cudaEventDisableTiming));
      v->push_back(e);
    }
  }
  // Device memory the consumer stream used before (a block from the reuse cache) is written by
  // the copy stream only after that work.
  CK(cudaEventRecord(g->release_ev[kStageEvents - 1], g->consumer));
  CK(cudaStreamWaitEvent(g->copy, g->release_ev[kStageEvents - 1], 0));

  Stager *raw = g.get();
  try {
    raw->threads.emplace_back([raw] { raw->submitter(); });
    for (uint32_t i = 0; i < readers; i++) raw->threads.emplace_back([raw] { raw->reader(); });
  } catch (const std::exception &e) {
    raw->halt();
    return fail(LW_ENOMEM, std::string("lw_stager_start: starting threads: ") + e.what());
  }
  *out_handle = (uint64_t)(uintptr_t)g.release();
  return LW_OK;
}

LW_API int32_t lw_stager_ready(void *handle, uint64_t item) {
  Stager *g = static_cast<Stager *>(handle);
  std::lock_guard<std::mutex> lk(g->mu);
  return g->queued > item || g->stop ? 1 : 0;
}

LW_API lw_status lw_stager_next(void *handle, uint64_t item) {
  Stager *g = static_cast<Stager *>(handle);
  {
    std::unique_lock<std::mutex> lk(g->mu);
    g->cv_consumer.wait(lk, [&] { return g->stop || g->queued > item; });
    if (g->err != LW_OK) return fail(g->err, g->err_text);
    if (g->queued <= item) return fail(LW_EINVAL, "lw_stager_next: the stager was stopped");
  }
  CK(cudaSetDevice(g->device));
  CK(cudaStreamWaitEvent(g->consumer, g->ready_ev[item % kStageEvents], 0));
  {
    std::lock_guard<std::mutex> lk(g->mu);
    g->taken = item + 1;
  }
  g->cv_submit.notify_one();
  return LW_OK;
}

LW_API lw_status lw_stager_done(void *handle, uint64_t item) {
  Stager *g = static_cast<Stager *>(handle);
  CK(cudaSetDevice(g->device));
  CK(cudaEventRecord(g->release_ev[item % kStageEvents], g->consumer));
  {
    std::lock_guard<std::mutex> lk(g->mu);
    g->finished = item + 1;
  }
  g->cv_submit.notify_one();
  return LW_OK;
}

LW_API lw_status lw_stager_error(void *handle, uint64_t *out_where, char *text, size_t len) {
  Stager *g = static_cast<Stager *>(handle);
  std::lock_guard<std::mutex> lk(g->mu);
  out_where[0] = g->err_file;
  out_where[1] = g->err_offset;
  out_where[2] = g->err_bytes;
  if (len > 0) {
    size_t n = g->err_text.size() < len - 1 ? g->err_text.size() : len - 1;
    memcpy(text, g->err_text.data(), n);
    text[n] = 0;
  }
  return g->err;
}

LW_API lw_status lw_stager_stats(void *handle, double *out) {
  Stager *g = static_cast<Stager *>(handle);
  std::lock_guard<std::mutex> lk(g->mu);
  out[0] = g->read_wait;
  out[1] = g->consumer_wait;
  return LW_OK;
}

LW_API lw_status lw_stager_finish(void *handle) {
  Stager *g = static_cast<Stager *>(handle);
  g->halt();
  delete g;
  return LW_OK;
}

}  // extern "C"

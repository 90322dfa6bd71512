// Staging probe (ARCHITECTURE.md, "Read paths"): how fast can checkpoint bytes go from the page cache to the GPU on
// this host, with no JavaScript in the way? Native threads only. Measures, on `files` x `gib`
// GiB of random bytes in a tmpfs directory:
//   host memcpy bandwidth, pinned H2D, preads alone into a pinned ring, a native read + H2D
//   pipeline over a sweep of ring shapes, and H2D from registered mmaps of the files.
// Build: nvcc -O2 -std=c++17 -o stage_probe scripts/stage_probe.cu -lpthread
// Run:   ./stage_probe [dir=/dev/shm/probe] [files=4] [gib=4]
// A throwaway measuring tool, kept so that BENCHMARKS.md figures can be reproduced.
#include <cuda_runtime.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#define CK(x)                                                                       \
  do {                                                                              \
    cudaError_t e_ = (x);                                                           \
    if (e_ != cudaSuccess) {                                                        \
      fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      exit(1);                                                                      \
    }                                                                               \
  } while (0)

static const size_t MiB = 1 << 20;
static double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

struct Files {
  std::vector<int> fds;
  std::vector<size_t> sizes;
  size_t total = 0;
};

static void writeFiles(const std::string &dir, int n, size_t bytes, Files &f) {
  mkdir(dir.c_str(), 0755);
  std::vector<std::thread> th;
  for (int i = 0; i < n; i++) {
    std::string p = dir + "/f" + std::to_string(i);
    struct stat st;
    if (stat(p.c_str(), &st) != 0 || (size_t)st.st_size != bytes) {
      th.emplace_back([p, bytes, i] {
        int fd = open(p.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
        std::vector<uint64_t> buf(8 * MiB / 8);
        uint64_t x = 0x9E3779B97F4A7C15ull * (i + 1);
        for (size_t done = 0; done < bytes; done += 8 * MiB) {
          for (auto &v : buf) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; v = x; }
          if (write(fd, buf.data(), 8 * MiB) != (ssize_t)(8 * MiB)) { perror("write"); exit(1); }
        }
        close(fd);
      });
    }
  }
  for (auto &t : th) t.join();
  for (int i = 0; i < n; i++) {
    std::string p = dir + "/f" + std::to_string(i);
    f.fds.push_back(open(p.c_str(), O_RDONLY));
    f.sizes.push_back(bytes);
    f.total += bytes;
  }
}

static void preadAll(int fd, char *dst, size_t n, size_t off) {
  size_t done = 0;
  while (done < n) {
    ssize_t r = pread(fd, dst + done, n - done, off + done);
    if (r <= 0) { perror("pread"); exit(1); }
    done += r;
  }
}

// Chunks of all files in order: (file, offset, bytes).
struct Chunk { int file; size_t off, bytes; };
static std::vector<Chunk> chunks(const Files &f, size_t chunk) {
  std::vector<Chunk> c;
  for (size_t i = 0; i < f.fds.size(); i++)
    for (size_t o = 0; o < f.sizes[i]; o += chunk) c.push_back({(int)i, o, std::min(chunk, f.sizes[i] - o)});
  return c;
}

static double memcpyRate(int threads) {
  size_t per = 256 * MiB;
  std::vector<char *> a(threads), b(threads);
  for (int i = 0; i < threads; i++) {
    a[i] = (char *)aligned_alloc(4096, per); b[i] = (char *)aligned_alloc(4096, per);
    memset(a[i], 1, per); memset(b[i], 2, per);
  }
  double t0 = now();
  std::vector<std::thread> th;
  for (int i = 0; i < threads; i++)
    th.emplace_back([&, i] { for (int r = 0; r < 4; r++) memcpy(b[i], a[i], per); });
  for (auto &t : th) t.join();
  double s = now() - t0;
  for (int i = 0; i < threads; i++) { free(a[i]); free(b[i]); }
  return 4.0 * per * threads / s / 1e9;
}

static double h2dRate(size_t total, size_t piece, char *dev, size_t devBytes) {
  char *host; CK(cudaHostAlloc((void **)&host, 256 * MiB, cudaHostAllocPortable));
  memset(host, 3, 256 * MiB);
  cudaStream_t s; CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  CK(cudaMemcpyAsync(dev, host, 256 * MiB, cudaMemcpyHostToDevice, s));
  CK(cudaStreamSynchronize(s));
  double t0 = now();
  size_t at = 0;
  for (size_t done = 0; done < total; done += piece) {
    size_t n = std::min(piece, total - done);
    if (at + n > devBytes) at = 0;
    CK(cudaMemcpyAsync(dev + at, host + done % (256 * MiB), n, cudaMemcpyHostToDevice, s));
    at += n;
  }
  CK(cudaStreamSynchronize(s));
  double sec = now() - t0;
  CK(cudaStreamDestroy(s)); CK(cudaFreeHost(host));
  return total / sec / 1e9;
}

static double readRate(const Files &f, int threads, size_t chunk, size_t ringBytes, char *ring) {
  auto c = chunks(f, chunk);
  std::atomic<size_t> next{0};
  size_t perRing = ringBytes / chunk;
  double t0 = now();
  std::vector<std::thread> th;
  for (int i = 0; i < threads; i++)
    th.emplace_back([&] {
      for (size_t k; (k = next++) < c.size();)
        preadAll(f.fds[c[k].file], ring + (k % perRing) * chunk, c[k].bytes, c[k].off);
    });
  for (auto &t : th) t.join();
  return f.total / (now() - t0) / 1e9;
}

// The native pipeline: blocks of slotBytes (each cut into chunk preads) fill slots of a pinned
// ring; a submit thread copies each complete block to a device ring and records its slot's event;
// a reader that needs a slot back waits for that event.
static double pipeRate(const Files &f, int readers, int slots, size_t slotBytes, size_t chunk,
                       char *pinned, char *dev, size_t devBytes, double *readWait) {
  auto c = chunks(f, chunk);  // chunk divides slotBytes; files are multiples of slotBytes
  size_t perSlot = slotBytes / chunk;
  size_t nblocks = (c.size() + perSlot - 1) / perSlot;
  std::vector<std::atomic<int>> left(nblocks);
  for (size_t b = 0; b < nblocks; b++) left[b] = (int)std::min(perSlot, c.size() - b * perSlot);
  std::vector<cudaEvent_t> ev(slots);
  for (auto &e : ev) CK(cudaEventCreateWithFlags(&e, cudaEventBlockingSync | cudaEventDisableTiming));
  std::vector<long> submitted(slots, -1);  // block whose copy was last queued from each slot
  std::mutex mu;
  std::condition_variable cvSub, cvRead;
  cudaStream_t s; CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  std::atomic<size_t> next{0};
  std::atomic<long> waitedUs{0};
  double t0 = now();
  std::vector<std::thread> th;
  for (int i = 0; i < readers; i++)
    th.emplace_back([&] {
      CK(cudaSetDevice(0));
      for (size_t k; (k = next++) < c.size();) {
        size_t b = k / perSlot;
        int sl = b % slots;
        if (b >= (size_t)slots) {
          std::unique_lock<std::mutex> lk(mu);
          cvSub.wait(lk, [&] { return submitted[sl] >= (long)(b - slots); });
          lk.unlock();
          CK(cudaEventSynchronize(ev[sl]));
        }
        preadAll(f.fds[c[k].file], pinned + sl * slotBytes + (k % perSlot) * chunk, c[k].bytes, c[k].off);
        if (--left[b] == 0) { std::lock_guard<std::mutex> lk(mu); cvRead.notify_all(); }
      }
    });
  size_t at = 0;
  for (size_t b = 0; b < nblocks; b++) {
    double w0 = now();
    {
      std::unique_lock<std::mutex> lk(mu);
      cvRead.wait(lk, [&] { return left[b].load() == 0; });
    }
    waitedUs += (long)((now() - w0) * 1e6);
    int sl = b % slots;
    size_t n = std::min(perSlot, c.size() - b * perSlot) * chunk;
    if (at + n > devBytes) at = 0;
    CK(cudaMemcpyAsync(dev + at, pinned + sl * slotBytes, n, cudaMemcpyHostToDevice, s));
    at += n;
    CK(cudaEventRecord(ev[sl], s));
    { std::lock_guard<std::mutex> lk(mu); submitted[sl] = b; }
    cvSub.notify_all();
  }
  CK(cudaStreamSynchronize(s));
  double sec = now() - t0;
  for (auto &t : th) t.join();
  for (auto &e : ev) CK(cudaEventDestroy(e));
  CK(cudaStreamDestroy(s));
  *readWait = waitedUs / 1e6;
  return f.total / sec / 1e9;
}

// H2D straight from registered mmaps: `threads` workers each take `piece` bytes at a time,
// register them read-only, copy on their own stream, unregister. Files [first, last).
static double registerRate(const Files &f, int first, int last, int threads, size_t piece, char *dev,
                           size_t devBytes, double *bytesOut) {
  std::vector<char *> maps;
  for (int i = first; i < last; i++) {
    void *m = mmap(nullptr, f.sizes[i], PROT_READ, MAP_SHARED, f.fds[i], 0);
    if (m == MAP_FAILED) { perror("mmap"); exit(1); }
    maps.push_back((char *)m);
  }
  std::vector<Chunk> c;
  size_t total = 0;
  for (int i = first; i < last; i++)
    for (size_t o = 0; o < f.sizes[i]; o += piece) {
      c.push_back({i - first, o, std::min(piece, f.sizes[i] - o)});
      total += c.back().bytes;
    }
  std::atomic<size_t> next{0};
  double t0 = now();
  std::vector<std::thread> th;
  for (int t = 0; t < threads; t++)
    th.emplace_back([&, t] {
      CK(cudaSetDevice(0));
      cudaStream_t s; CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
      char *d = dev + (devBytes / threads) * t;
      for (size_t k; (k = next++) < c.size();) {
        char *p = maps[c[k].file] + c[k].off;
        CK(cudaHostRegister(p, c[k].bytes, cudaHostRegisterReadOnly | cudaHostRegisterPortable));
        CK(cudaMemcpyAsync(d, p, c[k].bytes, cudaMemcpyHostToDevice, s));
        CK(cudaStreamSynchronize(s));
        CK(cudaHostUnregister(p));
      }
      CK(cudaStreamDestroy(s));
    });
  for (auto &t : th) t.join();
  double sec = now() - t0;
  for (size_t i = 0; i < maps.size(); i++) munmap(maps[i], f.sizes[first + i]);
  *bytesOut = (double)total;
  return total / sec / 1e9;
}

int main(int argc, char **argv) {
  std::string dir = argc > 1 ? argv[1] : "/dev/shm/probe";
  int nf = argc > 2 ? atoi(argv[2]) : 4;
  size_t gib = argc > 3 ? atoi(argv[3]) : 4;
  printf("cores %u\n", std::thread::hardware_concurrency());
  Files f;
  double t0 = now();
  writeFiles(dir, nf, gib << 30, f);
  printf("files: %d x %zu GiB in %s (%.1f s)\n", nf, gib, dir.c_str(), now() - t0);
  CK(cudaSetDevice(0));
  size_t devBytes = 1024 * MiB;
  char *dev; CK(cudaMalloc(&dev, devBytes));
  for (int t : {1, 4, 8, 16}) printf("memcpy %2d threads: %.1f GB/s\n", t, memcpyRate(t));
  for (int r = 0; r < 2; r++) {
    printf("h2d 256 MiB pieces: %.1f GB/s; 4 MiB pieces: %.1f GB/s\n",
           h2dRate(f.total, 256 * MiB, dev, devBytes), h2dRate(f.total, 4 * MiB, dev, devBytes));
  }
  char *pinned; CK(cudaHostAlloc((void **)&pinned, 512 * MiB, cudaHostAllocPortable));
  memset(pinned, 0, 512 * MiB);
  for (int t : {8, 16, 32})
    for (size_t ch : {1 * MiB, 2 * MiB, 8 * MiB})
      printf("reads %2d threads, %zu MiB preads, 64 MiB ring: %.1f GB/s\n", t, ch / MiB,
             readRate(f, t, ch, 64 * MiB, pinned));
  struct P { int r, s; size_t slot, chunk; };
  std::vector<P> sweep = {{16, 16, 4 * MiB, 2 * MiB}, {24, 16, 4 * MiB, 2 * MiB}, {32, 16, 4 * MiB, 2 * MiB},
                          {48, 16, 4 * MiB, 2 * MiB}, {16, 8, 8 * MiB, 2 * MiB},  {16, 32, 2 * MiB, 1 * MiB},
                          {16, 64, 1 * MiB, 1 * MiB}, {32, 64, 1 * MiB, 512 * 1024}, {16, 8, 16 * MiB, 4 * MiB},
                          {16, 16, 16 * MiB, 4 * MiB}, {12, 16, 4 * MiB, 1 * MiB}, {16, 32, 4 * MiB, 1 * MiB}};
  for (int rep = 0; rep < 2; rep++)
    for (auto p : sweep) {
      double w;
      double g = pipeRate(f, p.r, p.s, p.slot, p.chunk, pinned, dev, devBytes, &w);
      printf("pipe %2d readers, %2d x %2zu MiB slots, %4zu KiB preads: %.1f GB/s (submit waited %.2f s)\n", p.r, p.s,
             p.slot / MiB, p.chunk / 1024, g, w);
    }
  for (int t : {1, 2, 4, 8})
    for (size_t pc : {16 * MiB, 64 * MiB}) {
      double b;
      double g = registerRate(f, 0, nf, t, pc, dev, devBytes, &b);
      printf("register+h2d+unregister %d threads, %zu MiB pieces: %.1f GB/s\n", t, pc / MiB, g);
    }
  // Both paths at once: registered pages for file 0, the pread pipeline for the rest.
  for (int t : {2, 4}) {
    Files rest;
    for (int i = 1; i < nf; i++) { rest.fds.push_back(f.fds[i]); rest.sizes.push_back(f.sizes[i]); rest.total += f.sizes[i]; }
    double b, w, regG = 0, pipeG = 0;
    double s0 = now();
    std::thread reg([&] { regG = registerRate(f, 0, 1, t, 64 * MiB, dev + 512 * MiB, 512 * MiB, &b); });
    pipeG = pipeRate(rest, 16, 16, 4 * MiB, 2 * MiB, pinned, dev, 512 * MiB, &w);
    reg.join();
    double sec = now() - s0;
    printf("hybrid: %d register threads on 1 file (%.1f GB/s) + pipe on %d files (%.1f GB/s): %.1f GB/s total\n", t,
           regG, nf - 1, pipeG, f.total / sec / 1e9);
  }
  return 0;
}

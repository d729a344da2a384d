// Fused CPU kernels for CD-Adam's Markov exchange with block-wise scaled signs (loaded by __init__.py).
//
// cdadam_markov_worker_step: for every block B of the given shards (blocks never straddle server shards), with d = g - h:
//   scale_B = (sum_{i in B} |d_i|) / |B|        summed in index order, in T (as torch.segment_reduce)
//   bit_i   = d_i >= 0                          (sign(0) := +1; NaN -> 0, as torch's x >= 0)
//   h_i     = h_i + (bit_i ? scale_B : -scale_B)
// and the wire message of each shard j is written to wire + j * width:
//   [ceil(capacity / 8) bytes of signs, LSB first | max_blocks scales of T], zero padded.
// Every operation is the one the eager torch path performs, in the same order, so the results are
// bit-identical (no -ffast-math, no FMA contraction: see CXXFLAGS in __init__.py).
// cdadam_decode_mean_add: out += the mean of scaled-sign messages (server average, worker gtil += ctil).
//
// Cost: one pass that reads g and h for the sums (8 blocks at a time, one vector of 8 add chains),
// then, while those blocks are still in cache, the sign/pack/update pass; memory traffic is about
// read g + read h + write h, i.e. ~1.5x a copy of the buffer.
//
// Threads: a persistent pool, created on first need and reused by every call (parallel_for below);
// nthreads is the caller's budget (the Python side shares the node's CPUs among its ranks). Work is
// split into ranges computed on the fly, so a call allocates nothing proportional to the buffer.
// Errors: no C++ exception crosses the C ABI (it would abort the Python process through ctypes):
// entry points return a nonzero code and cdadam_last_error() says why.

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

namespace {

constexpr int kLanes = 8;  // blocks summed together (independent dependency chains)
constexpr int64_t kMaxThreads = 256;  // the pool never grows past this (a runaway nthreads is clamped)

// ---------------------------------------------------------------------------------------------
// A persistent thread pool: threads are created on first need (growing to the largest count asked
// for) and reused by every later call. parallel_for(n, fn) runs fn(0..n-1): the calling thread claims
// task indices itself alongside the pool's threads, so a call always makes progress even when other
// callers (ranks as threads of one process) keep the pool busy. An exception thrown by a task is
// rethrown in the caller after all of its tasks are done.
// Fork: a child process inherits the pool object but none of its threads; a pool whose owner pid is
// not ours is abandoned (leaked, never joined) and a fresh one made. At exit the owner's pool is
// stopped and its threads joined.

std::atomic<int64_t> g_threads_created{0};

struct Job {
  const std::function<void(int64_t)>* fn;
  int64_t n;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex m;
  std::condition_variable cv;
  std::exception_ptr error;

  void work() {
    for (int64_t i; (i = next.fetch_add(1)) < n;) {
      try {
        (*fn)(i);
      } catch (...) {
        std::lock_guard<std::mutex> lk(m);
        if (!error) error = std::current_exception();
      }
      if (done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lk(m);
        cv.notify_all();
      }
    }
  }
};

class Pool {
 public:
  const pid_t owner = getpid();

  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(m_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }

  void parallel_for(int64_t n, const std::function<void(int64_t)>& fn) {
    ensure(static_cast<size_t>(std::min<int64_t>(n - 1, kMaxThreads)));
    auto job = std::make_shared<Job>();
    job->fn = &fn;
    job->n = n;
    {
      std::lock_guard<std::mutex> lk(m_);
      jobs_.push_back(job);
    }
    cv_.notify_all();
    job->work();
    {
      std::unique_lock<std::mutex> lk(job->m);
      job->cv.wait(lk, [&] { return job->done.load() == job->n; });
    }
    if (job->error) std::rethrow_exception(job->error);
  }

  size_t size() {
    std::lock_guard<std::mutex> lk(m_);
    return threads_.size();
  }

 private:
  void ensure(size_t count) {
    std::lock_guard<std::mutex> lk(m_);
    while (threads_.size() < count) {
      threads_.emplace_back([this] { loop(); });  // std::system_error if the thread cannot start
      g_threads_created.fetch_add(1);
    }
  }

  void loop() {
    std::unique_lock<std::mutex> lk(m_);
    for (;;) {
      cv_.wait(lk, [&] { return stop_ || !jobs_.empty(); });
      if (stop_) return;
      std::shared_ptr<Job> job = jobs_.front();
      if (job->next.load() >= job->n) {  // every task claimed: drop it from the queue
        jobs_.pop_front();
        continue;
      }
      lk.unlock();
      job->work();
      lk.lock();
    }
  }

  std::mutex m_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Job>> jobs_;
  std::vector<std::thread> threads_;
  bool stop_ = false;
};

std::mutex g_pool_mutex;
Pool* g_pool = nullptr;

struct PoolOwner {
  ~PoolOwner() {  // at exit (or dlclose): join the pool's threads, in the process that made them
    std::lock_guard<std::mutex> lk(g_pool_mutex);
    if (g_pool != nullptr && g_pool->owner == getpid()) delete g_pool;
    g_pool = nullptr;
  }
} g_pool_owner;

Pool& pool() {
  std::lock_guard<std::mutex> lk(g_pool_mutex);
  if (g_pool == nullptr || g_pool->owner != getpid()) g_pool = new Pool();  // a forked child's: abandoned
  return *g_pool;
}

void parallel_for(int64_t n, const std::function<void(int64_t)>& fn) {
  if (n <= 1) {
    if (n == 1) fn(0);
    return;
  }
  pool().parallel_for(n, fn);
}

// Entry points never let a C++ exception reach ctypes (that would abort the process): they return
// an error code, and the message is kept for cdadam_last_error (per calling thread).
enum Error : int { kOk = 0, kBadArgument = 1, kBadDtype = 2, kNoMemory = 3, kSystem = 4, kException = 5, kUnknown = 6 };
thread_local std::string g_last_error;

template <typename F>
int guarded(const char* name, F&& body) {
  try {
    g_last_error.clear();
    return body();
  } catch (const std::bad_alloc&) {
    g_last_error = std::string(name) + ": out of memory";
    return kNoMemory;
  } catch (const std::system_error& err) {
    g_last_error = std::string(name) + ": system error (thread creation?): " + err.what();
    return kSystem;
  } catch (const std::exception& err) {
    g_last_error = std::string(name) + ": " + err.what();
    return kException;
  } catch (...) {
    g_last_error = std::string(name) + ": unknown C++ exception";
    return kUnknown;
  }
}

int fail(int code, const char* message) {
  g_last_error = message;
  return code;
}

struct Layout {
  int64_t nshards;
  const int64_t* offsets;  // shard j starts at offsets[j] in the flat buffer
  const int64_t* sizes;    // and has sizes[j] coordinates
  int64_t block;           // coordinates per block (a multiple of 8); the last block of a shard may be shorter
  int64_t width;           // bytes per shard message on the wire
  int64_t packed_cap;      // bytes of signs per message (ceil(capacity / 8)); scales follow
};

template <typename T>
void sums(const T* g, const T* h, int64_t start, int64_t len, int64_t lanes, T* acc) {
  // lanes blocks of len coordinates each, consecutive from start; acc[l] = sum |g - h| in index order.
  T a[kLanes] = {};
  int64_t j = 0;
  if (lanes == kLanes) {
    // a fixed trip count over the 8 blocks: the compiler turns the inner loop into one vector
    // (a strided gather), so each block's sum stays in index order while 8 sums advance at once
    for (; j < len; ++j) {
      for (int64_t l = 0; l < kLanes; ++l) {
        const int64_t i = start + l * len + j;
        a[l] = a[l] + std::abs(g[i] - h[i]);
      }
    }
  }
  for (; j < len; ++j) {
    for (int64_t l = 0; l < lanes; ++l) {
      const int64_t i = start + l * len + j;
      a[l] = a[l] + std::abs(g[i] - h[i]);
    }
  }
  for (int64_t l = 0; l < lanes; ++l) acc[l] = a[l];
}

// Signs of count (<= 8) coordinates from i0 into one byte (LSB first), and h += +-scale unless !kUpdate.
template <typename T, bool kUpdate>
inline uint8_t pack_byte(const T* g, T* h, int64_t i0, int64_t count, T scale) {
  uint8_t byte = 0;
  for (int64_t k = 0; k < count; ++k) {
    const T d = g[i0 + k] - h[i0 + k];
    const bool pos = d >= T(0);
    byte |= static_cast<uint8_t>(pos) << k;
    if (kUpdate) h[i0 + k] = h[i0 + k] + (pos ? scale : -scale);
  }
  return byte;
}

template <typename T, bool kUpdate>
void sign_pack_update(const T* g, T* h, int64_t start, int64_t len, T scale, uint8_t* bytes) {
  // len coordinates from start; bytes[0] holds the first 8 signs. len % 8 != 0 only for a shard's last block.
  // kUpdate = false only packs (the server's message down: its state changes after the all_gather).
  const int64_t full = len / 8;
  for (int64_t q = 0; q < full; ++q) bytes[q] = pack_byte<T, kUpdate>(g, h, start + 8 * q, 8, scale);
  if (len % 8) bytes[full] = pack_byte<T, kUpdate>(g, h, start + 8 * full, len % 8, scale);
}

// Units of work: up to kLanes consecutive blocks of one shard, all of the same length. Shard j has
// ceil(full_j / kLanes) units of whole blocks, then one unit for its shorter last block if any. They
// are never materialised (block_size = 8 on 1e9 coordinates would be ~1.5e7 of them): each thread walks
// its contiguous range of unit indices, computing every unit on the fly. Which thread runs a unit does
// not change any result (units touch disjoint coordinates, bytes and scales).
inline int64_t shard_units(int64_t size, int64_t block) {
  const int64_t full = size / block;
  return (full + kLanes - 1) / kLanes + (size % block ? 1 : 0);
}

template <typename T>
void run_units(const T* g, T* h, const Layout& L, uint8_t* wire, bool update, int64_t begin, int64_t end) {
  T acc[kLanes];
  // find the shard holding unit `begin` (nshards is small: a linear walk)
  int64_t shard = 0, shard_first = 0;  // shard_first: global index of the shard's first unit
  while (shard < L.nshards && shard_first + shard_units(L.sizes[shard], L.block) <= begin) {
    shard_first += shard_units(L.sizes[shard], L.block);
    ++shard;
  }
  for (int64_t u = begin; u < end && shard < L.nshards;) {
    const int64_t size = L.sizes[shard];
    const int64_t full = size / L.block, rest = size % L.block;
    const int64_t count = shard_units(size, L.block);
    const int64_t shard_start = L.offsets[shard];
    uint8_t* msg = wire + shard * L.width;
    uint8_t* scales = msg + L.packed_cap;  // not necessarily aligned for T: stored with memcpy
    for (int64_t k = u - shard_first; k < count && u < end; ++k, ++u) {
      int64_t first_block, lanes, len;
      if (k * kLanes < full) {
        first_block = k * kLanes;
        lanes = std::min<int64_t>(kLanes, full - first_block);
        len = L.block;
      } else {  // the shard's shorter last block
        first_block = full;
        lanes = 1;
        len = rest;
      }
      const int64_t start = shard_start + first_block * L.block;
      sums(g, h, start, len, lanes, acc);
      for (int64_t l = 0; l < lanes; ++l) {
        const T scale = acc[l] / static_cast<T>(std::max<int64_t>(len, 1));
        std::memcpy(scales + (first_block + l) * sizeof(T), &scale, sizeof(T));
        const int64_t block_start = first_block * L.block + l * len;  // within the shard
        if (update) {
          sign_pack_update<T, true>(g, h, shard_start + block_start, len, scale, msg + block_start / 8);
        } else {
          sign_pack_update<T, false>(g, h, shard_start + block_start, len, scale, msg + block_start / 8);
        }
      }
    }
    shard_first += count;
    ++shard;
  }
}

template <typename T>
void markov_worker_step(const T* g, T* h, const Layout& L, uint8_t* wire, bool update, int nthreads) {
  int64_t n = 0;
  for (int64_t j = 0; j < L.nshards; ++j) n += shard_units(L.sizes[j], L.block);
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(nthreads, n));
  parallel_for(workers, [&](int64_t t) { run_units(g, h, L, wire, update, n * t / workers, n * (t + 1) / workers); });
}

// out[i] = out[i] + mean_k C_k[i] over nmsgs messages of one shard, the mean summed in message order
// ((d_0 + d_1) + d_2 ...) / nmsgs as mean_in_rank_order does; with nmsgs == 1 a plain out += C.
// Decoding is exact: C_k[i] is +scale or -scale of i's block.
template <typename T>
void decode_mean_add_range(const uint8_t* msgs, int64_t nmsgs, int64_t stride, int64_t block, int64_t packed_cap,
                           T* out, int64_t begin, int64_t end) {
  // begin is a multiple of 8, and so is every block start (block % 8 == 0, or one block): chunks of
  // whole bytes, each inside one block, decoded message by message into tmp.
  constexpr int64_t kChunk = 2048;
  T tmp[kChunk];
  for (int64_t c0 = begin; c0 < end;) {
    const int64_t b = c0 / block;
    const int64_t c1 = std::min({end, (b + 1) * block, c0 + kChunk});
    const int64_t len = c1 - c0;
    for (int64_t k = 0; k < nmsgs; ++k) {
      const uint8_t* msg = msgs + k * stride;
      T scale;
      std::memcpy(&scale, msg + packed_cap + b * sizeof(T), sizeof(T));
      const uint8_t* bytes = msg + c0 / 8;
      const int64_t full = len / 8;
      if (k == 0) {
        for (int64_t q = 0; q < full; ++q) {
          for (int e = 0; e < 8; ++e) tmp[8 * q + e] = ((bytes[q] >> e) & 1) ? scale : -scale;
        }
        for (int64_t j = 8 * full; j < len; ++j) tmp[j] = ((bytes[j >> 3] >> (j & 7)) & 1) ? scale : -scale;
      } else {
        for (int64_t q = 0; q < full; ++q) {
          for (int e = 0; e < 8; ++e) tmp[8 * q + e] = tmp[8 * q + e] + (((bytes[q] >> e) & 1) ? scale : -scale);
        }
        for (int64_t j = 8 * full; j < len; ++j) tmp[j] = tmp[j] + (((bytes[j >> 3] >> (j & 7)) & 1) ? scale : -scale);
      }
    }
    if (nmsgs == 1) {
      for (int64_t j = 0; j < len; ++j) out[c0 + j] = out[c0 + j] + tmp[j];
    } else {
      const T n = static_cast<T>(nmsgs);
      for (int64_t j = 0; j < len; ++j) out[c0 + j] = out[c0 + j] + tmp[j] / n;
    }
    c0 = c1;
  }
}

template <typename T>
void decode_mean_add(const uint8_t* msgs, int64_t nmsgs, int64_t stride, int64_t numel, int64_t block,
                     int64_t packed_cap, T* out, int nthreads) {
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(nthreads, numel / 65536 + 1));
  parallel_for(workers, [&](int64_t t) {
    const int64_t begin = numel * t / workers / 8 * 8, end = t + 1 == workers ? numel : numel * (t + 1) / workers / 8 * 8;
    decode_mean_add_range(msgs, nmsgs, stride, block, packed_cap, out, begin, end);
  });
}

}  // namespace

extern "C" {

// Every entry point returns 0 on success, else an Error code with its message in cdadam_last_error().

// dtype_code: 0 = float32, 1 = float64. wire must be zero-filled by the caller (padding stays zero).
// update = 0: only encode C(g - h) (h is read, not written).
int cdadam_markov_worker_step(int dtype_code, const void* g, void* h, int64_t nshards, const int64_t* offsets,
                              const int64_t* sizes, int64_t block, int64_t width, int64_t packed_cap, uint8_t* wire,
                              int update, int nthreads) {
  return guarded("cdadam_markov_worker_step", [&]() -> int {
    if (block <= 0 || block % 8 != 0) {
      return fail(kBadArgument, "cdadam_markov_worker_step: block must be a positive multiple of 8");
    }
    if (nshards < 0) return fail(kBadArgument, "cdadam_markov_worker_step: nshards must be >= 0");
    const Layout L{nshards, offsets, sizes, block, width, packed_cap};
    if (dtype_code == 0) {
      markov_worker_step(static_cast<const float*>(g), static_cast<float*>(h), L, wire, update != 0, nthreads);
    } else if (dtype_code == 1) {
      markov_worker_step(static_cast<const double*>(g), static_cast<double*>(h), L, wire, update != 0, nthreads);
    } else {
      return fail(kBadDtype, "cdadam_markov_worker_step: dtype_code must be 0 (float32) or 1 (float64)");
    }
    return kOk;
  });
}

// out (numel) += mean of the nmsgs scaled-sign messages at msgs, stride bytes apart (block: coordinates
// per scale; numel for one scale).
int cdadam_decode_mean_add(int dtype_code, const uint8_t* msgs, int64_t nmsgs, int64_t stride, int64_t numel,
                           int64_t block, int64_t packed_cap, void* out, int nthreads) {
  return guarded("cdadam_decode_mean_add", [&]() -> int {
    if (block <= 0 || nmsgs <= 0 || (block % 8 != 0 && block < numel)) {
      return fail(kBadArgument,
                  "cdadam_decode_mean_add: needs nmsgs > 0 and a block that is a positive multiple of 8 "
                  "(or the whole shard)");
    }
    if (dtype_code == 0) {
      decode_mean_add(msgs, nmsgs, stride, numel, block, packed_cap, static_cast<float*>(out), nthreads);
    } else if (dtype_code == 1) {
      decode_mean_add(msgs, nmsgs, stride, numel, block, packed_cap, static_cast<double*>(out), nthreads);
    } else {
      return fail(kBadDtype, "cdadam_decode_mean_add: dtype_code must be 0 (float32) or 1 (float64)");
    }
    return kOk;
  });
}

// The message of the last failed call on this thread ("" after a success).
const char* cdadam_last_error() { return g_last_error.c_str(); }

// Threads the pool has created since the library was loaded (constant once the pool is warm).
int64_t cdadam_threads_created() { return g_threads_created.load(); }

// For tests: run nthreads pool tasks, task `task` throwing (kind 1: std::bad_alloc, 2: std::system_error,
// 3: std::runtime_error, 4: a non-std exception); returns the error code as any entry point does.
int cdadam_test_throw(int kind, int nthreads, int task) {
  return guarded("cdadam_test_throw", [&]() -> int {
    parallel_for(std::max(nthreads, 1), [&](int64_t t) {
      if (t != task) return;
      switch (kind) {
        case 1: throw std::bad_alloc();
        case 2: throw std::system_error(std::make_error_code(std::errc::resource_unavailable_try_again), "test");
        case 3: throw std::runtime_error("test exception");
        case 4: throw 42;
        default: break;
      }
    });
    return kOk;
  });
}

}  // extern "C"

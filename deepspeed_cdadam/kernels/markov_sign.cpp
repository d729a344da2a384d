// Fused CPU kernels for the compressed exchanges with block-wise scaled signs (loaded by __init__.py):
// CD-Adam's Markov exchange and 1-bit Adam's error feedback.
//
// cdadam_markov_worker_step: for every block B of the given shards (blocks never straddle server shards), with d = g - h:
//   scale_B = (sum_{i in B} |d_i|) / |B|        summed in index order, in T (as torch.segment_reduce)
//   bit_i   = d_i >= 0                          (sign(0) := +1; NaN -> 0, as torch's x >= 0)
//   h_i     = h_i + (bit_i ? scale_B : -scale_B)
// and the wire message of each shard j is written to wire + j * width:
//   [ceil(capacity / 8) bytes of signs, LSB first | max_blocks scales of T], zero padded.
// cdadam_markov_server_step: the server's ghat += mean_i c_i, its message C(ghat - gtil) and its own
//   shard's gtil += C(ghat - gtil), block by block in one pass (the same bits as the three apart).
// cdadam_error_feedback_step: p = x + e (or q = mean_i c_i + ebar), its signs, e = p - C(p); the scales
//   summed here per block (L1 in one pass; L2 sums returned: torch takes the sqrt, see ErrorFeedbackOp)
//   or given by the caller (a whole-buffer or one-block-shard scale: torch's vectorised norm).
// cdadam_decode_mean_add / cdadam_decode_shards: out (+)= decoded messages (server average, gtil += ctil, ctil).
// Every operation is the one the eager torch path performs, in the same order, so the results are
// bit-identical (no -ffast-math, no FMA contraction: see CXXFLAGS in __init__.py).
//
// Cost: one pass that reads the inputs for the block sums (a vector of 8 or 16 blocks at a time, their
// coordinates transposed so that each block's sum stays in index order), then, while those blocks are
// still in cache, the sign/pack/update pass; memory traffic is about read g + read h + write h, i.e.
// ~1.5x a copy of the buffer. With AVX-512 the sign bits of a vector are its compare mask, stored as
// the packed bytes themselves; without it the same loops run as plain C++ (same bits, tested).
//
// Threads: a persistent pool, created on first need and reused by every call (parallel_for below);
// nthreads is the caller's budget (the Python side shares the node's CPUs among its ranks). Work is
// split into ranges computed on the fly, so a call allocates nothing proportional to the buffer.
// Errors: no C++ exception crosses the C ABI (it would abort the Python process through ctypes):
// entry points return a nonzero code and cdadam_last_error() says why.

#include <unistd.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <exception>
#include <limits>
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

constexpr int kMaxLanes = 16;  // blocks summed together (independent dependency chains), at most
constexpr int64_t kMaxThreads = 256;  // the pool never grows past this (a runaway nthreads is clamped)

#if defined(__AVX512F__)
// One AVX-512 vector of T and its sign mask: bit k of the mask is coordinate k's sign bit (v >= 0),
// which is the wire's bit order (LSB first), so a mask is stored as packed bytes as it is. Every
// operation is the scalar one lane by lane (IEEE add, sub, compare, select): the same bits.
template <typename T>
struct Simd;
template <>
struct Simd<float> {
  using V = __m512;
  using M = __mmask16;
  static constexpr int64_t kLanes = 16;
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V div(V a, V b) { return _mm512_div_ps(a, b); }
  static M load_mask(const uint8_t* bytes) {
    M m;
    std::memcpy(&m, bytes, sizeof(m));
    return m;
  }
  static V abs(V v) { return _mm512_abs_ps(v); }  // clears the sign bit, as std::abs
  static M nonneg(V v) { return _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GE_OQ); }  // NaN: 0
  static V select(M m, V pos, V neg) { return _mm512_mask_blend_ps(m, neg, pos); }
  static void store_mask(uint8_t* bytes, M m) { std::memcpy(bytes, &m, sizeof(m)); }
  // r[i] = row i of a 16 x 16 matrix -> r[k] = column k (element k of every row)
  static void transpose(V* r) {
    V t[16];
    for (int i = 0; i < 16; i += 2) {
      t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
      r[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
      r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
      r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
      r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int i = 0; i < 4; ++i) {
      t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
      t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
      t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
      t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int i = 0; i < 8; ++i) {
      r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
      r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
    }
  }
};
template <>
struct Simd<double> {
  using V = __m512d;
  using M = __mmask8;
  static constexpr int64_t kLanes = 8;
  static V load(const double* p) { return _mm512_loadu_pd(p); }
  static void store(double* p, V v) { _mm512_storeu_pd(p, v); }
  static V set1(double x) { return _mm512_set1_pd(x); }
  static V add(V a, V b) { return _mm512_add_pd(a, b); }
  static V sub(V a, V b) { return _mm512_sub_pd(a, b); }
  static V mul(V a, V b) { return _mm512_mul_pd(a, b); }
  static V div(V a, V b) { return _mm512_div_pd(a, b); }
  static M load_mask(const uint8_t* bytes) { return *bytes; }
  static V abs(V v) { return _mm512_abs_pd(v); }
  static M nonneg(V v) { return _mm512_cmp_pd_mask(v, _mm512_setzero_pd(), _CMP_GE_OQ); }
  static V select(M m, V pos, V neg) { return _mm512_mask_blend_pd(m, neg, pos); }
  static void store_mask(uint8_t* bytes, M m) { std::memcpy(bytes, &m, sizeof(m)); }
  // r[i] = row i of an 8 x 8 matrix -> r[k] = column k
  static void transpose(V* r) {
    V t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
      t[i] = _mm512_unpacklo_pd(r[i], r[i + 1]);
      t[i + 1] = _mm512_unpackhi_pd(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
      u[i] = _mm512_shuffle_f64x2(t[i], t[i + 2], 0x88);
      u[i + 1] = _mm512_shuffle_f64x2(t[i + 1], t[i + 3], 0x88);
      u[i + 2] = _mm512_shuffle_f64x2(t[i], t[i + 2], 0xdd);
      u[i + 3] = _mm512_shuffle_f64x2(t[i + 1], t[i + 3], 0xdd);
    }
    for (int i = 0; i < 4; ++i) {
      r[i] = _mm512_shuffle_f64x2(u[i], u[i + 4], 0x88);
      r[i + 4] = _mm512_shuffle_f64x2(u[i], u[i + 4], 0xdd);
    }
  }
};
#define CDADAM_SIMD 1
#endif

// Blocks whose sums advance together: one vector of them where there is one, else 8.
template <typename T>
constexpr int64_t lanes_of() {
#ifdef CDADAM_SIMD
  return Simd<T>::kLanes;
#else
  return 8;
#endif
}

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
  int64_t block;           // coordinates per block (a multiple of 8 where scales are computed here); 0: one per shard
  int64_t width;           // bytes per shard message on the wire
  int64_t packed_cap;      // bytes of signs per message (ceil(capacity / 8)); scales follow
};

// ---------------------------------------------------------------------------------------------
// What is compressed, and what the step updates: an "op" gives the value v_i that is compressed, the
// term a block's scale sums (|v| or v * v, in index order), the scale from that sum, and the update
// once v_i's sign is known. Each is exactly the eager torch operation (one IEEE rounding each).

// CD-Adam's Markov step: v = g - h; scale = sum |v| / |B| (ScaledSignL1); h += C(v) when kUpdate.
template <typename T, bool kUpdate>
struct MarkovOp {
  const T* g;
  T* h;
  T value(int64_t i) const { return g[i] - h[i]; }
  static T term(T v) { return std::abs(v); }
  static T scale(T sum, int64_t len) { return sum / static_cast<T>(std::max<int64_t>(len, 1)); }
  void update(int64_t i, T /*v*/, bool pos, T s) const {
    if constexpr (kUpdate) h[i] = h[i] + (pos ? s : -s);
  }
#ifdef CDADAM_SIMD
  using S = Simd<T>;
  typename S::V vvalue(int64_t i) const { return S::sub(S::load(g + i), S::load(h + i)); }
  static typename S::V vterm(typename S::V v) { return S::abs(v); }
  void vupdate(int64_t i, typename S::V /*v*/, typename S::M pos, typename S::V s, typename S::V ns) const {
    if constexpr (kUpdate) S::store(h + i, S::add(S::load(h + i), S::select(pos, s, ns)));
  }
#endif
};

// Error feedback (1-bit Adam): v = x + e (kHasX: the worker's p = x + e) or v = e (already p, or the
// server's q). kNorm 1: a block's scale is sum |v| / |B| (ScaledSignL1), and the update is e = v - C(v).
// kNorm 2 (ScaledSignL2): the kernel only sums v * v: the scale is sqrt(sum) / sqrt(|B|) taken by torch,
// whose float sqrt (MKL's vectorised one) is not always the correctly rounded std::sqrt; so this op
// stores v in e (kHasX) and packs the signs, and the update e = v - C(v) is a second call with the
// scales given (kStore false, any kNorm).
template <typename T, bool kHasX, int kNorm, bool kStore>
struct ErrorFeedbackOp {
  const T* x;
  T* e;
  T value(int64_t i) const {
    if constexpr (kHasX) {
      return x[i] + e[i];
    } else {
      return e[i];
    }
  }
  static T term(T v) {
    if constexpr (kNorm == 1) {
      return std::abs(v);
    } else {
      return v * v;
    }
  }
  static T scale(T sum, int64_t len) {
    if constexpr (kNorm == 1) {
      return sum / static_cast<T>(std::max<int64_t>(len, 1));
    } else {  // never used: the entry point refuses (L2 scales are taken by torch, see above)
      return std::numeric_limits<T>::quiet_NaN();
    }
  }
  void update(int64_t i, T v, bool pos, T s) const {
    if constexpr (!kStore) {
      e[i] = v - (pos ? s : -s);
    } else if constexpr (kHasX) {
      e[i] = v;
    }
  }
#ifdef CDADAM_SIMD
  using S = Simd<T>;
  typename S::V vvalue(int64_t i) const {
    if constexpr (kHasX) {
      return S::add(S::load(x + i), S::load(e + i));
    } else {
      return S::load(e + i);
    }
  }
  static typename S::V vterm(typename S::V v) {
    if constexpr (kNorm == 1) {
      return S::abs(v);
    } else {
      return S::mul(v, v);
    }
  }
  void vupdate(int64_t i, typename S::V v, typename S::M pos, typename S::V s, typename S::V ns) const {
    if constexpr (!kStore) {
      S::store(e + i, S::sub(v, S::select(pos, s, ns)));
    } else if constexpr (kHasX) {
      S::store(e + i, v);
    }
  }
#endif
};

template <typename T, typename Op>
void sums(const Op op, int64_t start, int64_t len, int64_t lanes, T* acc) {
  // lanes blocks of len coordinates each, consecutive from start; acc[l] = sum of term(v) in index order.
  constexpr int64_t kLanes = lanes_of<T>();
  T a[kMaxLanes] = {};
  int64_t j = 0;
  if (lanes == kLanes) {
#ifdef CDADAM_SIMD
    // kLanes coordinates of each of the kLanes blocks (one vector per block), transposed: vector k then
    // holds coordinate j + k of every block, and adding the vectors in k order keeps each block's sum
    // in index order while all kLanes sums advance in one vector.
    using S = Simd<T>;
    typename S::V sum = S::set1(T(0)), r[kLanes];
    for (; j + kLanes <= len; j += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) r[l] = Op::vterm(op.vvalue(start + l * len + j));
      S::transpose(r);
      for (int64_t k = 0; k < kLanes; ++k) sum = S::add(sum, r[k]);
    }
    std::memcpy(a, &sum, sizeof(sum));
#endif
    // a fixed trip count over the blocks: the compiler vectorises the inner loop across them
    for (; j < len; ++j) {
      for (int64_t l = 0; l < kLanes; ++l) a[l] = a[l] + Op::term(op.value(start + l * len + j));
    }
  }
  for (; j < len; ++j) {
    for (int64_t l = 0; l < lanes; ++l) a[l] = a[l] + Op::term(op.value(start + l * len + j));
  }
  for (int64_t l = 0; l < lanes; ++l) acc[l] = a[l];
}

// Signs of count (<= 8) coordinates from i0 into one byte (LSB first), each followed by the op's update.
template <typename T, typename Op>
inline uint8_t pack_byte(const Op op, int64_t i0, int64_t count, T scale) {
  uint8_t byte = 0;
  for (int64_t k = 0; k < count; ++k) {
    const T v = op.value(i0 + k);
    const bool pos = v >= T(0);  // sign(0) := +1, -0.0 too; NaN -> 0, as torch's x >= 0
    byte |= static_cast<uint8_t>(pos) << k;
    op.update(i0 + k, v, pos, scale);
  }
  return byte;
}

template <typename T, typename Op>
void sign_pack_update(const Op op, int64_t start, int64_t len, T scale, uint8_t* bytes) {
  // len coordinates from start; bytes[0] holds the first 8 signs. len % 8 != 0 only at a shard's end.
  int64_t q = 0;
#ifdef CDADAM_SIMD
  // a vector at a time: its sign mask is its packed bytes
  using S = Simd<T>;
  const typename S::V s = S::set1(scale), ns = S::set1(-scale);
  for (; q + S::kLanes <= len; q += S::kLanes) {
    const typename S::V v = op.vvalue(start + q);
    const typename S::M pos = S::nonneg(v);
    op.vupdate(start + q, v, pos, s, ns);
    S::store_mask(bytes + q / 8, pos);
  }
#else
  // 64 at a time: the elementwise loop vectorises (compare, update); 8 signs (0/1 bytes, one uint64)
  // gather into one byte by one multiply (byte k's bit lands in bit 56 + k, no carries)
  constexpr int64_t kStep = 64;
  uint8_t pos[kStep];
  for (; q + kStep <= len; q += kStep) {
    for (int64_t k = 0; k < kStep; ++k) {
      const T v = op.value(start + q + k);
      const bool p = v >= T(0);
      pos[k] = p;
      op.update(start + q + k, v, p, scale);
    }
    for (int64_t b = 0; b < kStep / 8; ++b) {
      uint64_t word;
      std::memcpy(&word, pos + 8 * b, 8);
      bytes[q / 8 + b] = static_cast<uint8_t>((word * 0x0102040810204080ull) >> 56);
    }
  }
#endif
  for (; q + 8 <= len; q += 8) bytes[q / 8] = pack_byte(op, start + q, 8, scale);
  if (q < len) bytes[q / 8] = pack_byte(op, start + q, len - q, scale);
}

// out[i] = out[i] + mean_k C_k[i] over nmsgs messages of one shard (kAccumulate; else out[i] = mean_k C_k[i]),
// the mean summed in message order ((d_0 + d_1) + d_2 ...) / nmsgs as mean_in_rank_order does; with
// nmsgs == 1 the decoded message itself. Decoding is exact: C_k[i] is +scale or -scale of i's block.
template <typename T, bool kAccumulate = true>
void decode_mean_add_range(const uint8_t* msgs, int64_t nmsgs, int64_t stride, int64_t block, int64_t packed_cap,
                           T* out, int64_t begin, int64_t end) {
  // begin is a multiple of 8, and so is every block start (block % 8 == 0, or one block): chunks of
  // whole bytes, each inside one block, decoded message by message into tmp.
  constexpr int64_t kChunk = 2048;
  alignas(64) T tmp[kChunk];
  for (int64_t c0 = begin; c0 < end;) {
    const int64_t b = c0 / block;
    const int64_t c1 = std::min({end, (b + 1) * block, c0 + kChunk});
    const int64_t len = c1 - c0;
    int64_t vlen = 0;  // coordinates done a vector at a time
    for (int64_t k = 0; k < nmsgs; ++k) {
      const uint8_t* msg = msgs + k * stride;
      T scale;
      std::memcpy(&scale, msg + packed_cap + b * sizeof(T), sizeof(T));
      const uint8_t* bytes = msg + c0 / 8;
      int64_t j = 0;
#ifdef CDADAM_SIMD
      using S = Simd<T>;
      const typename S::V s = S::set1(scale), ns = S::set1(-scale);
      for (; j + S::kLanes <= len; j += S::kLanes) {
        const typename S::V c = S::select(S::load_mask(bytes + j / 8), s, ns);
        S::store(tmp + j, k == 0 ? c : S::add(S::load(tmp + j), c));
      }
      vlen = j;
#endif
      const int64_t full = len / 8;
      if (k == 0) {
        for (int64_t q = j / 8; q < full; ++q) {
          for (int e = 0; e < 8; ++e) tmp[8 * q + e] = ((bytes[q] >> e) & 1) ? scale : -scale;
        }
        for (int64_t i = 8 * full; i < len; ++i) tmp[i] = ((bytes[i >> 3] >> (i & 7)) & 1) ? scale : -scale;
      } else {
        for (int64_t q = j / 8; q < full; ++q) {
          for (int e = 0; e < 8; ++e) tmp[8 * q + e] = tmp[8 * q + e] + (((bytes[q] >> e) & 1) ? scale : -scale);
        }
        for (int64_t i = 8 * full; i < len; ++i) tmp[i] = tmp[i] + (((bytes[i >> 3] >> (i & 7)) & 1) ? scale : -scale);
      }
    }
    int64_t j = 0;
    const T n = static_cast<T>(nmsgs);
#ifdef CDADAM_SIMD
    using S = Simd<T>;
    const typename S::V vn = S::set1(n);
    for (; j < vlen; j += S::kLanes) {
      typename S::V c = S::load(tmp + j);
      if (nmsgs > 1) c = S::div(c, vn);
      if constexpr (kAccumulate) c = S::add(S::load(out + c0 + j), c);
      S::store(out + c0 + j, c);
    }
#endif
    for (; j < len; ++j) {
      const T c = nmsgs > 1 ? tmp[j] / n : tmp[j];
      if constexpr (kAccumulate) {
        out[c0 + j] = out[c0 + j] + c;
      } else {
        out[c0 + j] = c;
      }
    }
    c0 = c1;
  }
}

// Units of work with computed block scales: up to kLanes consecutive blocks of one shard, all of the
// same length. Shard j has ceil(full_j / kLanes) units of whole blocks, then one unit for its shorter
// last block if any. They are never materialised (block_size = 8 on 1e9 coordinates would be ~1.5e7 of
// them): each thread walks its contiguous range of unit indices, computing every unit on the fly.
// Which thread runs a unit does not change any result (units touch disjoint coordinates, bytes, scales).
template <typename T>
int64_t shard_units(int64_t size, int64_t block) {
  constexpr int64_t kLanes = lanes_of<T>();
  const int64_t full = size / block;
  return (full + kLanes - 1) / kLanes + (size % block ? 1 : 0);
}

// Units with given scales (one per shard): chunks of kGivenChunk coordinates (at least one unit per
// shard: its first unit writes the shard's scales).
constexpr int64_t kGivenChunk = 16384;  // a multiple of 8: units never share a byte of signs
inline int64_t given_units(int64_t size) { return std::max<int64_t>(1, (size + kGivenChunk - 1) / kGivenChunk); }
inline int64_t scales_of_shard(int64_t size, int64_t block) {  // len(ShardLayout.shard_blocks(j))
  return (block <= 0 || size == 0) ? 1 : (size + block - 1) / block;
}

// The server's decode before compressing (nullptr: none): into[unit] += mean of the nmsgs messages
// of the (single) shard, just before the unit's scales are taken, while its blocks are in cache.
template <typename T>
struct Decode {
  const uint8_t* msgs = nullptr;
  int64_t nmsgs = 0;
  int64_t stride = 0;
  T* into = nullptr;
};

// sums_out (nullptr: none): each block's sum is stored there (blocks of all shards, in order) instead
// of a scale; the op's update then gets no scale (a kStore op).
template <typename T, typename Op>
void run_units(const Op op, const Layout& L, uint8_t* wire, const Decode<T>& dec, T* sums_out, int64_t begin,
               int64_t end) {
  constexpr int64_t kLanes = lanes_of<T>();
  T acc[kMaxLanes];
  // find the shard holding unit `begin` (nshards is small: a linear walk)
  int64_t shard = 0, shard_first = 0;  // shard_first: global index of the shard's first unit
  int64_t block_base = 0;              // global index of the shard's first block
  while (shard < L.nshards && shard_first + shard_units<T>(L.sizes[shard], L.block) <= begin) {
    shard_first += shard_units<T>(L.sizes[shard], L.block);
    block_base += scales_of_shard(L.sizes[shard], L.block);
    ++shard;
  }
  for (int64_t u = begin; u < end && shard < L.nshards;) {
    const int64_t size = L.sizes[shard];
    const int64_t full = size / L.block, rest = size % L.block;
    const int64_t count = shard_units<T>(size, L.block);
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
      if (dec.msgs != nullptr) {
        decode_mean_add_range(dec.msgs, dec.nmsgs, dec.stride, L.block, L.packed_cap, dec.into + shard_start,
                              first_block * L.block, first_block * L.block + lanes * len);
      }
      sums(op, start, len, lanes, acc);
      for (int64_t l = 0; l < lanes; ++l) {
        const int64_t block_start = first_block * L.block + l * len;  // within the shard
        if (sums_out != nullptr) {
          sums_out[block_base + first_block + l] = acc[l];
          sign_pack_update(op, shard_start + block_start, len, T(0), msg + block_start / 8);
        } else {
          const T scale = Op::scale(acc[l], len);
          std::memcpy(scales + (first_block + l) * sizeof(T), &scale, sizeof(T));
          sign_pack_update(op, shard_start + block_start, len, scale, msg + block_start / 8);
        }
      }
    }
    shard_first += count;
    block_base += scales_of_shard(size, L.block);
    ++shard;
  }
}

// given: one scale per block, the blocks of all shards in order (scales_of_shard(size_j) for shard j;
// L.block 0: one block per shard). Blocks inside a chunk start at multiples of 8 (L.block % 8 == 0).
template <typename T, typename Op>
void run_given(const Op op, const Layout& L, uint8_t* wire, const T* given, int64_t begin, int64_t end) {
  int64_t shard = 0, shard_first = 0, block_base = 0;
  while (shard < L.nshards && shard_first + given_units(L.sizes[shard]) <= begin) {
    shard_first += given_units(L.sizes[shard]);
    block_base += scales_of_shard(L.sizes[shard], L.block);
    ++shard;
  }
  for (int64_t u = begin; u < end && shard < L.nshards;) {
    const int64_t size = L.sizes[shard];
    const int64_t count = given_units(size), nblocks = scales_of_shard(size, L.block);
    const int64_t block = L.block > 0 ? L.block : std::max<int64_t>(size, 1);
    const int64_t shard_start = L.offsets[shard];
    uint8_t* msg = wire + shard * L.width;
    for (int64_t k = u - shard_first; k < count && u < end; ++k, ++u) {
      if (k == 0) std::memcpy(msg + L.packed_cap, given + block_base, nblocks * sizeof(T));
      const int64_t c1 = std::min(size, (k + 1) * kGivenChunk);
      for (int64_t c0 = k * kGivenChunk; c0 < c1;) {  // the chunk's pieces of blocks
        const int64_t b = c0 / block, stop = std::min(c1, (b + 1) * block);
        sign_pack_update(op, shard_start + c0, stop - c0, given[block_base + b], msg + c0 / 8);
        c0 = stop;
      }
    }
    shard_first += count;
    block_base += nblocks;
    ++shard;
  }
}

// Compress every shard of L with op into wire: scales given (one per block), or computed here per
// block (L.block a multiple of 8), or only summed into sums_out; dec: the server's decode, fused into the units.
template <typename T, typename Op>
void compress_shards(const Op& op, const Layout& L, uint8_t* wire, const T* given, const Decode<T>& dec, T* sums_out,
                     int nthreads) {
  int64_t n = 0;
  for (int64_t j = 0; j < L.nshards; ++j) n += given ? given_units(L.sizes[j]) : shard_units<T>(L.sizes[j], L.block);
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(nthreads, n));
  parallel_for(workers, [&](int64_t t) {
    const int64_t begin = n * t / workers, end = n * (t + 1) / workers;
    if (given) {
      run_given(op, L, wire, given, begin, end);
    } else {
      run_units(op, L, wire, dec, sums_out, begin, end);
    }
  });
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

// out (+)= C_j on every shard j but `skip`: message j (at msgs + j * stride) decoded into out + offsets[j].
template <typename T, bool kAccumulate>
void decode_shards(const uint8_t* msgs, int64_t stride, const Layout& L, int64_t skip, T* out, int nthreads) {
  auto units = [&](int64_t j) { return j == skip ? 0 : (L.sizes[j] + kGivenChunk - 1) / kGivenChunk; };
  int64_t n = 0;
  for (int64_t j = 0; j < L.nshards; ++j) n += units(j);
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(nthreads, n));
  parallel_for(workers, [&](int64_t t) {
    const int64_t begin = n * t / workers, end = n * (t + 1) / workers;
    int64_t shard = 0, first = 0;
    while (shard < L.nshards && first + units(shard) <= begin) first += units(shard++);
    for (int64_t u = begin; u < end && shard < L.nshards; first += units(shard++)) {
      const int64_t size = L.sizes[shard], block = L.block > 0 ? L.block : std::max<int64_t>(size, 1);
      for (int64_t k = u - first; k < units(shard) && u < end; ++k, ++u) {
        const int64_t c0 = k * kGivenChunk, c1 = std::min(size, c0 + kGivenChunk);
        decode_mean_add_range<T, kAccumulate>(msgs + shard * stride, 1, stride, block, L.packed_cap,
                                              out + L.offsets[shard], c0, c1);
      }
    }
  });
}

template <typename T, bool kHasX>
void error_feedback_step(const T* x, T* e, const Layout& L, uint8_t* wire, const T* given, const Decode<T>& dec,
                         T* sums_out, int norm, int nthreads) {
  if (given != nullptr) {
    compress_shards(ErrorFeedbackOp<T, kHasX, 1, false>{x, e}, L, wire, given, dec, sums_out, nthreads);
  } else if (sums_out != nullptr && norm == 1) {
    compress_shards(ErrorFeedbackOp<T, kHasX, 1, true>{x, e}, L, wire, given, dec, sums_out, nthreads);
  } else if (sums_out != nullptr) {
    compress_shards(ErrorFeedbackOp<T, kHasX, 2, true>{x, e}, L, wire, given, dec, sums_out, nthreads);
  } else {
    compress_shards(ErrorFeedbackOp<T, kHasX, 1, false>{x, e}, L, wire, given, dec, sums_out, nthreads);
  }
}

template <typename T>
void markov_worker_step(const T* g, T* h, const Layout& L, uint8_t* wire, bool update, int nthreads) {
  if (update) {
    compress_shards(MarkovOp<T, true>{g, h}, L, wire, static_cast<const T*>(nullptr), Decode<T>{}, static_cast<T*>(nullptr), nthreads);
  } else {
    compress_shards(MarkovOp<T, false>{g, h}, L, wire, static_cast<const T*>(nullptr), Decode<T>{}, static_cast<T*>(nullptr), nthreads);
  }
}

}  // namespace

extern "C" {

// Every entry point returns 0 on success, else an Error code with its message in cdadam_last_error().
// dtype_code: 0 = float32, 1 = float64. A wire written here must be zero-filled by the caller (padding stays zero).

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

// The server's steps (3)-(4) and its own shard's (5) in one pass over its shard (numel coordinates):
// ghat += mean of the nmsgs messages (stride bytes apart); wire = C(ghat - gtil); gtil += C(ghat - gtil).
int cdadam_markov_server_step(int dtype_code, const uint8_t* msgs, int64_t nmsgs, int64_t stride, int64_t numel,
                              int64_t block, int64_t width, int64_t packed_cap, void* ghat, void* gtil,
                              uint8_t* wire, int nthreads) {
  return guarded("cdadam_markov_server_step", [&]() -> int {
    if (block <= 0 || block % 8 != 0 || nmsgs <= 0) {
      return fail(kBadArgument, "cdadam_markov_server_step: needs nmsgs > 0 and a block that is a positive multiple of 8");
    }
    const int64_t offset = 0;
    const Layout L{1, &offset, &numel, block, width, packed_cap};
    if (dtype_code == 0) {
      auto* g = static_cast<float*>(ghat);
      compress_shards(MarkovOp<float, true>{g, static_cast<float*>(gtil)}, L, wire, static_cast<const float*>(nullptr),
                      Decode<float>{msgs, nmsgs, stride, g}, static_cast<float*>(nullptr), nthreads);
    } else if (dtype_code == 1) {
      auto* g = static_cast<double*>(ghat);
      compress_shards(MarkovOp<double, true>{g, static_cast<double*>(gtil)}, L, wire,
                      static_cast<const double*>(nullptr), Decode<double>{msgs, nmsgs, stride, g},
                      static_cast<double*>(nullptr), nthreads);
    } else {
      return fail(kBadDtype, "cdadam_markov_server_step: dtype_code must be 0 (float32) or 1 (float64)");
    }
    return kOk;
  });
}

// Error feedback, v = x + e (x given: the worker's p = x + e) or v = e; with msgs (the server: one
// shard, no x): first e += mean of the nmsgs messages, stride bytes apart (q = mean_i c_i + ebar).
// Then on every shard j: the signs of v into wire message j, and one of
//   scales given (one per block, the blocks of all shards in order; block 0: one block per shard):
//       e = v - C(v), the scales written into the messages;
//   sums_out given (block a multiple of 8): each block's sum of |v| (norm 1) or v * v (norm 2) into
//       sums_out, and e = v: the caller takes the scales (torch's sqrt for norm 2) and calls again with them;
//   neither (norm 1, block a multiple of 8): scale = sum |v| / |B| here, e = v - C(v), in one pass.
int cdadam_error_feedback_step(int dtype_code, const void* x, void* e, const uint8_t* msgs, int64_t nmsgs,
                               int64_t stride, int64_t nshards, const int64_t* offsets, const int64_t* sizes,
                               int64_t block, int64_t width, int64_t packed_cap, uint8_t* wire, const void* scales,
                               void* sums_out, int norm, int nthreads) {
  return guarded("cdadam_error_feedback_step", [&]() -> int {
    if (norm != 1 && norm != 2) return fail(kBadArgument, "cdadam_error_feedback_step: norm must be 1 or 2");
    if (nshards < 0) return fail(kBadArgument, "cdadam_error_feedback_step: nshards must be >= 0");
    if (scales != nullptr && sums_out != nullptr) {
      return fail(kBadArgument, "cdadam_error_feedback_step: scales and sums_out exclude each other");
    }
    if (scales == nullptr ? (block <= 0 || block % 8 != 0) : (block < 0 || block % 8 != 0)) {
      return fail(kBadArgument,
                  "cdadam_error_feedback_step: block must be a positive multiple of 8 (or, with given scales, 0)");
    }
    if (scales == nullptr && sums_out == nullptr && norm != 1) {
      return fail(kBadArgument, "cdadam_error_feedback_step: norm 2 scales are taken by the caller (pass sums_out)");
    }
    if (msgs != nullptr && (x != nullptr || scales != nullptr || nshards != 1 || nmsgs <= 0)) {
      return fail(kBadArgument, "cdadam_error_feedback_step: messages need one shard, no x, no given scales");
    }
    const Layout L{nshards, offsets, sizes, block, width, packed_cap};
    if (dtype_code == 0) {
      using T = float;
      auto* ef = static_cast<T*>(e);
      const Decode<T> dec{msgs, nmsgs, stride, ef};
      if (x != nullptr) {
        error_feedback_step<T, true>(static_cast<const T*>(x), ef, L, wire, static_cast<const T*>(scales), dec,
                                     static_cast<T*>(sums_out), norm, nthreads);
      } else {
        error_feedback_step<T, false>(nullptr, ef, L, wire, static_cast<const T*>(scales), dec,
                                      static_cast<T*>(sums_out), norm, nthreads);
      }
      return kOk;
    }
    if (dtype_code == 1) {
      using T = double;
      auto* ef = static_cast<T*>(e);
      const Decode<T> dec{msgs, nmsgs, stride, ef};
      if (x != nullptr) {
        error_feedback_step<T, true>(static_cast<const T*>(x), ef, L, wire, static_cast<const T*>(scales), dec,
                                     static_cast<T*>(sums_out), norm, nthreads);
      } else {
        error_feedback_step<T, false>(nullptr, ef, L, wire, static_cast<const T*>(scales), dec,
                                      static_cast<T*>(sums_out), norm, nthreads);
      }
      return kOk;
    }
    return fail(kBadDtype, "cdadam_error_feedback_step: dtype_code must be 0 (float32) or 1 (float64)");
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

// Every shard's message (message j at msgs + j * stride) decoded into out + offsets[j]: accumulate = 1:
// out += C_j (a worker's gtil += ctil), 0: out = C_j (error feedback's ctil). Shard `skip` (or -1) is left
// alone. block: coordinates per scale (a multiple of 8), or 0 for one scale per shard.
int cdadam_decode_shards(int dtype_code, const uint8_t* msgs, int64_t stride, int64_t nshards, const int64_t* offsets,
                         const int64_t* sizes, int64_t block, int64_t packed_cap, void* out, int accumulate,
                         int64_t skip, int nthreads) {
  return guarded("cdadam_decode_shards", [&]() -> int {
    if (block < 0 || block % 8 != 0 || nshards < 0) {
      return fail(kBadArgument, "cdadam_decode_shards: block must be 0 or a positive multiple of 8");
    }
    const Layout L{nshards, offsets, sizes, block, stride, packed_cap};
    if (dtype_code == 0 && accumulate) {
      decode_shards<float, true>(msgs, stride, L, skip, static_cast<float*>(out), nthreads);
    } else if (dtype_code == 0) {
      decode_shards<float, false>(msgs, stride, L, skip, static_cast<float*>(out), nthreads);
    } else if (dtype_code == 1 && accumulate) {
      decode_shards<double, true>(msgs, stride, L, skip, static_cast<double*>(out), nthreads);
    } else if (dtype_code == 1) {
      decode_shards<double, false>(msgs, stride, L, skip, static_cast<double*>(out), nthreads);
    } else {
      return fail(kBadDtype, "cdadam_decode_shards: dtype_code must be 0 (float32) or 1 (float64)");
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

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

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace {

constexpr int kLanes = 8;  // blocks summed together (independent dependency chains)

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

// One unit of work: up to kLanes consecutive blocks of one shard, all of the same length.
struct Unit {
  int64_t shard, first_block, lanes, len;
};

template <typename T>
void run_units(const T* g, T* h, const Layout& L, uint8_t* wire, bool update, const std::vector<Unit>& units,
               size_t begin, size_t end) {
  T acc[kLanes];
  for (size_t u = begin; u < end; ++u) {
    const Unit& w = units[u];
    const int64_t shard_start = L.offsets[w.shard];
    const int64_t start = shard_start + w.first_block * L.block;
    sums(g, h, start, w.len, w.lanes, acc);
    uint8_t* msg = wire + w.shard * L.width;
    uint8_t* scales = msg + L.packed_cap;  // not necessarily aligned for T: stored with memcpy
    for (int64_t l = 0; l < w.lanes; ++l) {
      const T scale = acc[l] / static_cast<T>(std::max<int64_t>(w.len, 1));
      std::memcpy(scales + (w.first_block + l) * sizeof(T), &scale, sizeof(T));
      const int64_t block_start = w.first_block * L.block + l * w.len;  // within the shard
      if (update) {
        sign_pack_update<T, true>(g, h, shard_start + block_start, w.len, scale, msg + block_start / 8);
      } else {
        sign_pack_update<T, false>(g, h, shard_start + block_start, w.len, scale, msg + block_start / 8);
      }
    }
  }
}

template <typename T>
void markov_worker_step(const T* g, T* h, const Layout& L, uint8_t* wire, bool update, int nthreads) {
  std::vector<Unit> units;
  for (int64_t j = 0; j < L.nshards; ++j) {
    const int64_t size = L.sizes[j];
    const int64_t full = size / L.block, rest = size % L.block;
    for (int64_t b = 0; b < full; b += kLanes) units.push_back({j, b, std::min<int64_t>(kLanes, full - b), L.block});
    if (rest) units.push_back({j, full, 1, rest});
  }
  const size_t n = units.size();
  const size_t workers = std::max<size_t>(1, std::min<size_t>(static_cast<size_t>(nthreads), n));
  if (workers == 1) {
    run_units(g, h, L, wire, update, units, 0, n);
    return;
  }
  std::vector<std::thread> pool;
  for (size_t t = 0; t < workers; ++t) {
    const size_t begin = n * t / workers, end = n * (t + 1) / workers;
    pool.emplace_back([&, begin, end] { run_units(g, h, L, wire, update, units, begin, end); });
  }
  for (auto& th : pool) th.join();
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
  if (workers == 1) {
    decode_mean_add_range(msgs, nmsgs, stride, block, packed_cap, out, 0, numel);
    return;
  }
  std::vector<std::thread> pool;
  for (int64_t t = 0; t < workers; ++t) {
    const int64_t begin = numel * t / workers / 8 * 8, end = t + 1 == workers ? numel : numel * (t + 1) / workers / 8 * 8;
    pool.emplace_back([=] { decode_mean_add_range(msgs, nmsgs, stride, block, packed_cap, out, begin, end); });
  }
  for (auto& th : pool) th.join();
}

}  // namespace

extern "C" {

// dtype_code: 0 = float32, 1 = float64. wire must be zero-filled by the caller (padding stays zero).
// update = 0: only encode C(g - h) (h is read, not written).
int cdadam_markov_worker_step(int dtype_code, const void* g, void* h, int64_t nshards, const int64_t* offsets,
                              const int64_t* sizes, int64_t block, int64_t width, int64_t packed_cap, uint8_t* wire,
                              int update, int nthreads) {
  if (block <= 0 || block % 8 != 0) return 1;
  const Layout L{nshards, offsets, sizes, block, width, packed_cap};
  if (dtype_code == 0) {
    markov_worker_step(static_cast<const float*>(g), static_cast<float*>(h), L, wire, update != 0, nthreads);
  } else if (dtype_code == 1) {
    markov_worker_step(static_cast<const double*>(g), static_cast<double*>(h), L, wire, update != 0, nthreads);
  } else {
    return 2;
  }
  return 0;
}

// out (numel) += mean of the nmsgs scaled-sign messages at msgs, stride bytes apart (block: coordinates
// per scale; numel for one scale).
int cdadam_decode_mean_add(int dtype_code, const uint8_t* msgs, int64_t nmsgs, int64_t stride, int64_t numel,
                           int64_t block, int64_t packed_cap, void* out, int nthreads) {
  if (block <= 0 || nmsgs <= 0 || (block % 8 != 0 && block < numel)) return 1;
  if (dtype_code == 0) {
    decode_mean_add(msgs, nmsgs, stride, numel, block, packed_cap, static_cast<float*>(out), nthreads);
  } else if (dtype_code == 1) {
    decode_mean_add(msgs, nmsgs, stride, numel, block, packed_cap, static_cast<double*>(out), nthreads);
  } else {
    return 2;
  }
  return 0;
}

}  // extern "C"

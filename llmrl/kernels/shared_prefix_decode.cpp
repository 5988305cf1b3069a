// Decode attention over a prompt cache shared by a group's samples, one call per layer.
//
// Row b's single new token has `groups` query heads per KV head. It attends its prompt's keys
// (prefix_keys[row_prompt[b]], with padding slots left out) followed by its own generated keys
// (suffix_keys[b]). One softmax runs over both parts in fp32, as if they were one cache, and the
// output is rounded to the query's dtype once.
//
// Why a kernel of our own: torch's fused CPU attention splits every (row, KV head) pair into
// tiles sized for long query blocks. A decode step has 3 queries per pair, so its per-tile
// set-up cost more than the arithmetic: 0.6 ms per layer at 64 rows x 64 keys in bf16, where
// reading those keys and values takes about 0.08 ms (docs/benchmarks.md). Here each pair is
// one pass: scores for all its queries, then one pass over the values. Each key and value row
// is loaded and widened to fp32 once and used by every query of the group.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "elementwise.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#include <limits>
#include <type_traits>
#include <vector>

namespace {

struct Rows {
  // a [N, H, L, D] tensor read through its strides; the last dimension must be contiguous
  const char* base;
  int64_t s0, s1, s2;  // in elements
};

template <typename T>
inline const T* row(const Rows& r, int64_t n, int64_t h, int64_t l) {
  return reinterpret_cast<const T*>(r.base) + n * r.s0 + h * r.s1 + l * r.s2;
}

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#define LLMRL_WIDE 1
// One key or value row is widened to fp32 into registers once and used by every query of the
// group. Head sizes that are a multiple of the vector width, up to 128, take this path; others
// the portable one. `V` is one vector register: AVX-512's 16 lanes where the CPU has them, else
// AVX2's 8, with the few operations the kernel needs.
namespace simd {
#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
using V = __m512;
inline V zero() { return _mm512_setzero_ps(); }
inline V set1(float x) { return _mm512_set1_ps(x); }
inline V load(const float* p) { return _mm512_loadu_ps(p); }
inline V load(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));  // bf16 is fp32's top half
}
inline void store(float* p, V x) { _mm512_storeu_ps(p, x); }
inline V add(V a, V b) { return _mm512_add_ps(a, b); }
inline V mul(V a, V b) { return _mm512_mul_ps(a, b); }
inline V maximum(V a, V b) { return _mm512_max_ps(a, b); }
inline V sub(V a, V b) { return _mm512_sub_ps(a, b); }
inline V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V fnmadd(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }
inline float sum(V x) { return _mm512_reduce_add_ps(x); }
inline V round(V x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// p * 2^n where x >= floor, else 0
inline V scale_live(V p, V n, V x, float floor) {
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(floor), _CMP_GE_OQ), _mm512_scalef_ps(p, n));
}
constexpr float kFloor = -104.f;  // exp(-104) is below fp32's smallest subnormal
#else
constexpr int64_t kLanes = 8;
using V = __m256;
inline V zero() { return _mm256_setzero_ps(); }
inline V set1(float x) { return _mm256_set1_ps(x); }
inline V load(const float* p) { return _mm256_loadu_ps(p); }
inline V load(const c10::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
inline void store(float* p, V x) { _mm256_storeu_ps(p, x); }
inline V add(V a, V b) { return _mm256_add_ps(a, b); }
inline V mul(V a, V b) { return _mm256_mul_ps(a, b); }
inline V maximum(V a, V b) { return _mm256_max_ps(a, b); }
inline V sub(V a, V b) { return _mm256_sub_ps(a, b); }
inline V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V fnmadd(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }
inline float sum(V x) {
  __m128 half = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  half = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(half, _mm_movehdup_ps(half)));
}
// sum(x[i]) for eight vectors at once, lane i of the result: the same additions as sum() makes
// (lane l with lane l + 4, then l with l + 2, then l with l + 1), so the same bits, in 21
// instructions where eight sum() calls take 48. x[i] pairs with x[i + 4] in the first step so
// that the lanes come out in order.
__attribute__((always_inline)) inline V sum8(const V* x) {
  V s[4];
  for (int i = 0; i < 4; ++i)
    s[i] = _mm256_add_ps(_mm256_permute2f128_ps(x[i], x[i + 4], 0x20), _mm256_permute2f128_ps(x[i], x[i + 4], 0x31));
  V t[2];
  for (int i = 0; i < 2; ++i)
    t[i] = _mm256_add_ps(_mm256_shuffle_ps(s[2 * i], s[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm256_shuffle_ps(s[2 * i], s[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm256_add_ps(_mm256_shuffle_ps(t[0], t[1], _MM_SHUFFLE(2, 0, 2, 0)), _mm256_shuffle_ps(t[0], t[1], _MM_SHUFFLE(3, 1, 3, 1)));
}
inline float max_lane(V x) {
  __m128 half = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  half = _mm_max_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_max_ss(half, _mm_movehdup_ps(half)));
}
inline V round(V x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// p * 2^n where x >= floor, else 0; 2^n is built in the exponent bits, so n must stay >= -126
inline V scale_live(V p, V n, V x, float floor) {
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_cmp_ps(x, _mm256_set1_ps(floor), _CMP_GE_OQ), _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
}
constexpr float kFloor = -87.f;  // exp(-87) is 1.6e-38 of the largest score's weight
#endif

// exp(x) for x <= 0, a vector at a time; -inf (a masked key) and anything below kFloor give 0.
// x = n ln2 + r with |r| <= ln2/2, exp(r) by its Taylor series to r^7 / 7! (truncation error
// below 2e-8 relative), times 2^n.
inline V exp_nonpositive(V x) {
  const V clamped = maximum(x, set1(kFloor));
  const V n = round(mul(clamped, set1(1.44269504088896341f)));
  V r = fnmadd(n, set1(0.693359375f), clamped);  // ln2 in two parts, so that n * ln2_hi is exact
  r = fnmadd(n, set1(-2.12194440e-4f), r);
  V p = set1(1.f / 5040.f);
  for (float c : {1.f / 720.f, 1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f}) p = fmadd(p, r, set1(c));
  return scale_live(p, n, x, kFloor);
}
}  // namespace simd

// softmax numerators in place and their sum; `peak` is the largest score
inline float exponentiate(float* scores, int64_t count, float peak) {
  using namespace simd;
  const V top = set1(peak);
  V total = zero();
  int64_t j = 0;
  for (; j + kLanes <= count; j += kLanes) {
    const V e = exp_nonpositive(sub(load(scores + j), top));
    store(scores + j, e);
    total = add(total, e);
  }
  float rest = 0.f;
  for (; j < count; ++j) {
    scores[j] = scores[j] == -std::numeric_limits<float>::infinity() ? 0.f : llmrl::exp_clamped(scores[j] - peak);
    rest += scores[j];
  }
  return sum(total) + rest;
}
#endif
#ifndef LLMRL_WIDE
#define LLMRL_WIDE 0
#endif

// The rows the next pair will read, asked for into L2 a few lines at a time while this pair
// computes (a hint; nothing waits on it). Between two calls of a layer a decode step streams every
// weight through the caches, so each call's cache comes from memory, in short runs per pair that
// the hardware prefetcher picks up late. Asked for all at once at the start of a pair, the rows
// gained nothing: the misses queued behind each other. Spread over the pair's scores, an fp32
// call at 64 generated keys took 0.77-0.87x the time with its cache cold (bench/
// decode_attention_cache.py; the decode step's attention 0.8x), though 1.2x with it warm. bf16
// rows are half the bytes, which the hardware keeps up with: no gain there, so only fp32 asks.
// Up to four runs of rows (the next pair's own keys and values, and its prompt's when it is the
// first of its prompt's rows here), each `count` rows `stride` bytes apart.
template <typename T>
constexpr bool kAskAhead = std::is_same_v<T, float>;

struct Ahead {
  struct Run {
    const char* start;
    int64_t stride, count;
  };
  Run runs[4];
  int64_t run_count = 0, row_bytes = 0, run = 0, at = 0, per_step = 0;

  void clear() { run_count = run = at = 0; }
  void add(const char* start, int64_t stride, int64_t count) {
    if (count > 0) runs[run_count++] = {start, stride, count};
  }
  // over `steps` calls of step(); each asks for whole rows, the same number each time
  void plan(int64_t steps) {
    int64_t total = 0;
    for (int64_t r = 0; r < run_count; ++r) total += runs[r].count;
    per_step = steps > 0 ? (total + steps - 1) / steps : 0;
  }
  void step() {
    for (int64_t left = per_step; left > 0 && run < run_count; --left) {
      const char* row = runs[run].start + at * runs[run].stride;
      for (int64_t byte = 0; byte < row_bytes; byte += 64) __builtin_prefetch(row + byte, 0, 2);  // 2: into L2
      if (++at == runs[run].count) at = 0, ++run;
    }
  }
};

#if LLMRL_WIDE && !defined(__AVX512F__)
// AVX2: up to three queries at once over a slice of kSlice vectors of the value rows, so that a
// pair reads each value row once, where one query at a time read it once per query (at 179 keys
// the rows, 46 KB, outgrow a 32 KB L1, so the second and third reads came from L2). 3 x 4
// accumulators and the slice fill the sixteen registers. Each output still sums over the keys in
// key order: the same bits.
template <int kQueries, int kSlice, typename T, typename ValueRow>
void weigh_values(const float* weights, int64_t keys, int64_t dim, ValueRow value_row, float* acc) {
  using namespace simd;
  for (int64_t d0 = 0; d0 < dim; d0 += kSlice * kLanes) {
    V a[kQueries][kSlice];
    for (int q = 0; q < kQueries; ++q)
      for (int i = 0; i < kSlice; ++i) a[q][i] = zero();
    for (int64_t j = 0; j < keys; ++j) {
      const T* v = value_row(j);
      if (v == nullptr) continue;
      V x[kSlice];
      for (int i = 0; i < kSlice; ++i) x[i] = load(v + d0 + i * kLanes);
      for (int q = 0; q < kQueries; ++q) {
        const V w = set1(weights[q * keys + j]);
        for (int i = 0; i < kSlice; ++i) a[q][i] = fmadd(w, x[i], a[q][i]);
      }
    }
    for (int q = 0; q < kQueries; ++q)
      for (int i = 0; i < kSlice; ++i) store(acc + q * dim + d0 + i * kLanes, a[q][i]);
  }
}
#endif

// One (row, KV head) pair: its `groups` queries over its keys. `key_row(j)` and `value_row(j)`
// give key j's rows, or nullptr for a masked one. kVectors > 0: the head size is kVectors
// vectors, known at compile time so that a row's vectors stay in registers (AVX-512 or AVX2
// only); 0: any size, in plain loops.
template <int kVectors, typename T, typename KeyRow, typename ValueRow>
void attend_pair(const T* query, int64_t query_stride, int64_t groups, int64_t dim, int64_t keys, float scale,
                 KeyRow key_row, ValueRow value_row, float* scores, float* work, T* out, Ahead& ahead) {
  const float minus_inf = -std::numeric_limits<float>::infinity();
  // one scratch block per thread, reused for every pair: no allocation on this path
  float* qf = work;                       // [groups, dim], scaled
  float* acc = work + groups * dim;       // [groups, dim]
  float* peak = work + 2 * groups * dim;  // [groups]
  float* total = peak + groups;           // [groups]
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t d = 0; d < dim; ++d) qf[g * dim + d] = static_cast<float>(query[g * query_stride + d]) * scale;
  std::fill(peak, peak + groups, minus_inf);
#if LLMRL_WIDE
  using namespace simd;
  constexpr int64_t vectors = kVectors;
  constexpr bool wide = kVectors > 0;
#else
  constexpr bool wide = false;
#endif
  // scores[g * keys + j]
  auto score_one = [&](int64_t j) {
    const T* k = key_row(j);
    if (k == nullptr) {
      for (int64_t g = 0; g < groups; ++g) scores[g * keys + j] = minus_inf;
      return;
    }
#if LLMRL_WIDE
    if constexpr (wide) {
      V kv[kVectors > 0 ? kVectors : 1];
      for (int64_t v = 0; v < vectors; ++v) kv[v] = load(k + v * kLanes);
      for (int64_t g = 0; g < groups; ++g) {
        V dot = zero();
        for (int64_t v = 0; v < vectors; ++v) dot = fmadd(load(qf + g * dim + v * kLanes), kv[v], dot);
        const float s = sum(dot);
        scores[g * keys + j] = s;
        peak[g] = std::max(peak[g], s);
      }
      return;
    }
#endif
    for (int64_t g = 0; g < groups; ++g) {
      // `omp simd` lets gcc reorder the sum into vector lanes, which plain -O3 may not
      float s = 0.f;
      const float* qg = qf + g * dim;
#pragma omp simd reduction(+ : s)
      for (int64_t d = 0; d < dim; ++d) s += qg[d] * llmrl::widen(k[d]);
      scores[g * keys + j] = s;
      peak[g] = std::max(peak[g], s);
    }
  };
  int64_t j = 0;
#if LLMRL_WIDE
  // kBlock keys from j, each a chain of kVectors dependent FMAs per query: kBlock chains in
  // flight keep the FMA units busy where one chain left them waiting on its previous result.
  // `finish(g, dot)` takes query g's kBlock dot products. A masked key among them (a prompt's
  // padding) sends the block through score_one one key at a time.
  auto dot_block = [&](auto block, int64_t j, auto finish) __attribute__((always_inline)) {
    constexpr int64_t kBlock = decltype(block)::value;
    const T* k[kBlock];
    bool all = true;
    for (int64_t b = 0; b < kBlock; ++b) all = (k[b] = key_row(j + b)) != nullptr && all;
    if (!all) {
      for (int64_t b = 0; b < kBlock; ++b) score_one(j + b);
      return;
    }
    for (int64_t g = 0; g < groups; ++g) {
      V dot[kBlock];
      for (int64_t b = 0; b < kBlock; ++b) dot[b] = zero();
      for (int64_t v = 0; v < vectors; ++v) {
        const V q = load(qf + g * dim + v * kLanes);
        for (int64_t b = 0; b < kBlock; ++b) dot[b] = fmadd(q, load(k[b] + v * kLanes), dot[b]);
      }
      finish(g, dot);
    }
  };
#endif
#if LLMRL_WIDE && !defined(__AVX512F__)
  if constexpr (wide) {
    // AVX2: eight keys at a time, a query's eight scores summed together (sum8) and stored as one
    // vector; the horizontal sums one at a time were about as many instructions as the FMAs.
    constexpr int64_t kBlock = 8, kMaxGroups = 8;
    if (groups <= kMaxGroups) {
      V best[kMaxGroups];
      for (int64_t g = 0; g < groups; ++g) best[g] = set1(minus_inf);
      if constexpr (kAskAhead<T>) ahead.plan(keys / kBlock);
      for (; j + kBlock <= keys; j += kBlock) {
        if constexpr (kAskAhead<T>) ahead.step();
        dot_block(std::integral_constant<int64_t, kBlock>{}, j, [&](int64_t g, const V* dot) {
          const V s = sum8(dot);
          store(scores + g * keys + j, s);
          best[g] = maximum(s, best[g]);  // max(s, best) keeps best where s is NaN, as std::max(peak, s)
        });
      }
      for (int64_t g = 0; g < groups; ++g) peak[g] = std::max(peak[g], max_lane(best[g]));
    }
  }
#endif
#if LLMRL_WIDE
  if constexpr (wide) {
    // Four keys at a time (the rest of them on AVX2). Each score is summed in the order
    // score_one sums it: the same bits.
    constexpr int64_t kBlock = 4;
    if constexpr (kAskAhead<T>) ahead.plan(keys / kBlock);
    for (; j + kBlock <= keys; j += kBlock) {
      if constexpr (kAskAhead<T>) ahead.step();
      dot_block(std::integral_constant<int64_t, kBlock>{}, j, [&](int64_t g, const V* dot) {
        for (int64_t b = 0; b < kBlock; ++b) {
          const float s = sum(dot[b]);
          scores[g * keys + j + b] = s;
          peak[g] = std::max(peak[g], s);
        }
      });
    }
  }
#endif
  for (; j < keys; ++j) score_one(j);
  for (int64_t g = 0; g < groups; ++g) {
#if LLMRL_WIDE
    total[g] = peak[g] == minus_inf ? 0.f : exponentiate(scores + g * keys, keys, peak[g]);
#else
    total[g] = peak[g] == minus_inf ? 0.f : exponentiate_portable(scores + g * keys, keys, peak[g]);
#endif
  }
  std::fill(acc, acc + groups * dim, 0.f);
#if LLMRL_WIDE && !defined(__AVX512F__)
  if constexpr (wide) {
    constexpr int kSlice = kVectors % 4 == 0 ? 4 : kVectors % 2 == 0 ? 2 : 1;
    int64_t g = 0;
    for (; g + 3 <= groups; g += 3) weigh_values<3, kSlice, T>(scores + g * keys, keys, dim, value_row, acc + g * dim);
    if (groups - g == 2) weigh_values<2, kSlice, T>(scores + g * keys, keys, dim, value_row, acc + g * dim);
    if (groups - g == 1) weigh_values<1, kSlice, T>(scores + g * keys, keys, dim, value_row, acc + g * dim);
  }
#elif LLMRL_WIDE
  if constexpr (wide) {
    // One query at a time, its output row held in registers over all the keys: updating it in
    // memory per key made every key wait on a store and a reload. The value rows are read once
    // per query, from L1 or L2 after the first. Each output sums over the keys in key order, as before.
    for (int64_t g = 0; g < groups; ++g) {
      V a[kVectors > 0 ? kVectors : 1];
      for (int64_t i = 0; i < vectors; ++i) a[i] = zero();
      const float* weights = scores + g * keys;
      for (int64_t j = 0; j < keys; ++j) {
        const T* v = value_row(j);
        if (v == nullptr) continue;
        const V w = set1(weights[j]);
        for (int64_t i = 0; i < vectors; ++i) a[i] = fmadd(w, load(v + i * kLanes), a[i]);
      }
      for (int64_t i = 0; i < vectors; ++i) store(acc + g * dim + i * kLanes, a[i]);
    }
  }
#endif
  for (int64_t j = 0; j < keys && !wide; ++j) {
    const T* v = value_row(j);
    if (v == nullptr) continue;
    for (int64_t g = 0; g < groups; ++g) {
      const float w = scores[g * keys + j];
      float* a = acc + g * dim;
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) a[d] += w * llmrl::widen(v[d]);
    }
  }
  for (int64_t g = 0; g < groups; ++g) {
    // a query that sees no key gets zeros, as torch's attention gives
    const float inv = total[g] > 0.f ? 1.f / total[g] : 0.f;
    for (int64_t d = 0; d < dim; ++d) out[g * dim + d] = static_cast<T>(acc[g * dim + d] * inv);
  }
}

template <typename T>
void attend_all(const at::Tensor& query, const at::Tensor& prefix_keys, const at::Tensor& prefix_values,
                const c10::optional<at::Tensor>& prefix_valid, const at::Tensor& row_prompt,
                const at::Tensor& suffix_keys, const at::Tensor& suffix_values, double scale, at::Tensor& out) {
  const int64_t batch = query.size(0), kv_heads = query.size(1), groups = query.size(2), dim = query.size(3);
  const int64_t width = prefix_keys.size(2), length = suffix_keys.size(2);
  const int64_t keys = width + length;
  auto rows_of = [](const at::Tensor& t) {
    return Rows{static_cast<const char*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
  };
  const Rows q = rows_of(query), pk = rows_of(prefix_keys), pv = rows_of(prefix_values);
  const Rows sk = rows_of(suffix_keys), sv = rows_of(suffix_values);
  const int64_t* prompt_of = row_prompt.data_ptr<int64_t>();
  const bool* valid = prefix_valid.has_value() ? prefix_valid->data_ptr<bool>() : nullptr;
  const int64_t valid_stride = prefix_valid.has_value() ? prefix_valid->stride(0) : 0;
  T* out_data = out.data_ptr<T>();
  const float scale_f = static_cast<float>(scale);

  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(groups * keys), work(2 * groups * dim + 2 * groups);
    Ahead ahead;
    ahead.row_bytes = dim * static_cast<int64_t>(sizeof(T));
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t b = pair / kv_heads, h = pair % kv_heads, p = prompt_of[b];
      const bool* seen = valid == nullptr ? nullptr : valid + p * valid_stride;
      ahead.clear();
      if (kAskAhead<T> && pair + 1 < end) {
        const int64_t nb = (pair + 1) / kv_heads, nh = (pair + 1) % kv_heads, np = prompt_of[nb];
        for (const Rows* r : {&sk, &sv})
          ahead.add(reinterpret_cast<const char*>(row<T>(*r, nb, nh, 0)), r->s2 * static_cast<int64_t>(sizeof(T)), length);
        // a prompt's rows stay in cache for its other samples: asked for before the first of them
        if (nb == begin / kv_heads || prompt_of[nb - 1] != np)
          for (const Rows* r : {&pk, &pv})
            ahead.add(reinterpret_cast<const char*>(row<T>(*r, np, nh, 0)), r->s2 * static_cast<int64_t>(sizeof(T)), width);
      }
      auto pick = [&](const Rows& prefix, const Rows& suffix) {
        // always inlined: called for every key, and as a call it was 4% of the kernel's time
        return [&, prefix, suffix](int64_t j) __attribute__((always_inline)) -> const T* {
          if (j < width) return seen != nullptr && !seen[j] ? nullptr : row<T>(prefix, p, h, j);
          return row<T>(suffix, b, h, j - width);
        };
      };
      auto attend = [&](auto vectors) {
        attend_pair<decltype(vectors)::value, T>(row<T>(q, b, h, 0), q.s2, groups, dim, keys, scale_f, pick(pk, sk),
                                                 pick(pv, sv), scores.data(), work.data(),
                                                 out_data + (b * kv_heads + h) * groups * dim, ahead);
      };
#if LLMRL_WIDE
      // head sizes 16 to 128 (AVX-512) or 8 to 128 (AVX2) that fill whole vectors
      switch (dim % simd::kLanes == 0 ? dim / simd::kLanes : 0) {
        case 1: attend(std::integral_constant<int, 1>{}); continue;
        case 2: attend(std::integral_constant<int, 2>{}); continue;
        case 3: attend(std::integral_constant<int, 3>{}); continue;
        case 4: attend(std::integral_constant<int, 4>{}); continue;
        case 6: attend(std::integral_constant<int, 6>{}); continue;
        case 8: attend(std::integral_constant<int, 8>{}); continue;
        case 12: attend(std::integral_constant<int, 12>{}); continue;
        case 16: attend(std::integral_constant<int, 16>{}); continue;
      }
#endif
      attend(std::integral_constant<int, 0>{});
    }
  });
}

void check_rows(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.dim() == 4, name, " must be 4-dimensional, got ", t.dim(), " dimensions");
  TORCH_CHECK(t.size(3) == dim, name, " has head size ", t.size(3), ", the query ", dim);
  TORCH_CHECK(t.stride(3) == 1, name, "'s last dimension must be contiguous");
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
}

at::Tensor shared_prefix_decode(const at::Tensor& query, const at::Tensor& prefix_keys, const at::Tensor& prefix_values,
                                const c10::optional<at::Tensor>& prefix_valid, const at::Tensor& row_prompt,
                                const at::Tensor& suffix_keys, const at::Tensor& suffix_values, double scale) {
  const int64_t dim = query.size(-1);
  for (auto [t, name] : {std::pair{&query, "query"}, {&prefix_keys, "prefix_keys"}, {&prefix_values, "prefix_values"},
                         {&suffix_keys, "suffix_keys"}, {&suffix_values, "suffix_values"}})
    check_rows(*t, name, dim);
  for (const at::Tensor* t : {&prefix_keys, &prefix_values, &suffix_keys, &suffix_values})
    TORCH_CHECK(t->scalar_type() == query.scalar_type(), "keys and values must have the query's dtype");
  TORCH_CHECK(prefix_keys.sizes() == prefix_values.sizes(), "prefix keys and values differ in shape");
  TORCH_CHECK(suffix_keys.sizes() == suffix_values.sizes(), "suffix keys and values differ in shape");
  TORCH_CHECK(suffix_keys.size(0) == query.size(0) && suffix_keys.size(1) == query.size(1), "suffix rows/heads differ from the query's");
  TORCH_CHECK(prefix_keys.size(1) == query.size(1), "prefix KV heads differ from the query's");
  TORCH_CHECK(row_prompt.scalar_type() == at::kLong && row_prompt.dim() == 1 && row_prompt.size(0) == query.size(0) &&
                  row_prompt.is_contiguous(), "row_prompt must be a contiguous int64 vector, one entry per row");
  if (prefix_valid.has_value()) {
    const at::Tensor& v = *prefix_valid;
    TORCH_CHECK(v.scalar_type() == at::kBool && v.dim() == 2 && v.size(0) == prefix_keys.size(0) &&
                    v.size(1) == prefix_keys.size(2) && v.stride(1) == 1, "prefix_valid must be bool [prompts, width], rows contiguous");
  }
  at::Tensor out = at::empty(query.sizes(), query.options().memory_format(c10::MemoryFormat::Contiguous));
  switch (query.scalar_type()) {
    case at::kFloat:
      attend_all<float>(query, prefix_keys, prefix_values, prefix_valid, row_prompt, suffix_keys, suffix_values, scale, out);
      break;
    case at::kBFloat16:
      attend_all<c10::BFloat16>(query, prefix_keys, prefix_values, prefix_valid, row_prompt, suffix_keys, suffix_values, scale, out);
      break;
    default:
      TORCH_CHECK(false, "shared_prefix_decode takes float32 or bfloat16, got ", query.scalar_type());
  }
  return out;
}

// rotary_attend_'s first half: q and k rotated in place, each row's new key and value into `slot`.
template <typename T>
void rotate_and_store(const at::Tensor& qkv, int64_t heads, int64_t kv_heads, const at::Tensor& cos, const at::Tensor& sin,
                      const at::Tensor& key_buffer, const at::Tensor& value_buffer, int64_t slot) {
  const int64_t rows = qkv.size(0), dim = cos.size(1), room = key_buffer.size(2);
  const size_t bytes = static_cast<size_t>(dim) * sizeof(T);
  T* keys = key_buffer.data_ptr<T>();
  T* values = value_buffer.data_ptr<T>();
  for (int64_t n = 0; n < rows; ++n) {
    T* row = qkv.data_ptr<T>() + n * qkv.stride(0);
    const T* c = cos.data_ptr<T>() + n * cos.stride(0);
    const T* s = sin.data_ptr<T>() + n * sin.stride(0);
    for (int64_t h = 0; h < heads + kv_heads; ++h) llmrl::rotate_head<T>(row + h * dim, c, s, dim);
    for (int64_t h = 0; h < kv_heads; ++h) {
      const int64_t at_slot = ((n * kv_heads + h) * room + slot) * dim;
      std::memcpy(keys + at_slot, row + (heads + h) * dim, bytes);
      std::memcpy(values + at_slot, row + (heads + kv_heads + h) * dim, bytes);
    }
  }
}

// One decode step's attention for a layer in one call, from the packed q|k|v product onwards:
// q and k rotated in place (as rotary_ does), the new key and value of every row written into
// slot `slot` of its cache (key_buffer, value_buffer: [rows, kv_heads, room, dim], contiguous),
// then shared_prefix_decode over the prompt and slots [0, slot]. Returns [rows, heads * dim].
// Why one call: at 32 rows the separate calls (rotary_, the views of q, k and v, the cache's two
// slot writes and slicing, attention's Python wrapper) cost 87.6 us a layer beyond the attention
// kernel itself, and this call 20.7 (AVX2 host, docs/benchmarks.md); a vs_trl rollout makes 3,810
// such calls.
at::Tensor rotary_attend_(const at::Tensor& qkv, int64_t heads, int64_t kv_heads, const at::Tensor& cos, const at::Tensor& sin,
                          const at::Tensor& key_buffer, const at::Tensor& value_buffer, int64_t slot,
                          const at::Tensor& prefix_keys, const at::Tensor& prefix_values,
                          const c10::optional<at::Tensor>& prefix_valid, const at::Tensor& row_prompt, double scale) {
  TORCH_CHECK(cos.dim() == 2 && sin.sizes() == cos.sizes() && cos.stride(1) == 1 && sin.stride(1) == 1,
              "cos and sin must be [rows, head size] with contiguous rows");
  const int64_t rows = qkv.size(0), dim = cos.size(1);
  TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0, "heads (", heads, ") must be a multiple of kv_heads (", kv_heads, ")");
  TORCH_CHECK(dim % 2 == 0, "the head size must be even, got ", dim);
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1 && qkv.size(1) == (heads + 2 * kv_heads) * dim && qkv.device().is_cpu(),
              "qkv must be a CPU [rows, (heads + 2 * kv_heads) * head size] tensor with contiguous rows");
  TORCH_CHECK(cos.size(0) == rows, "cos and sin have ", cos.size(0), " rows, qkv ", rows);
  for (auto [t, name] : {std::pair{&key_buffer, "key_buffer"}, {&value_buffer, "value_buffer"}})
    TORCH_CHECK(t->dim() == 4 && t->size(0) == rows && t->size(1) == kv_heads && t->size(3) == dim && t->is_contiguous(),
                name, " must be a contiguous [rows, kv_heads, room, head size] tensor");
  TORCH_CHECK(value_buffer.sizes() == key_buffer.sizes(), "key_buffer and value_buffer differ in shape");
  TORCH_CHECK(slot >= 0 && slot < key_buffer.size(2), "slot ", slot, " is outside the buffers' room of ", key_buffer.size(2));
  for (const at::Tensor* t : {&cos, &sin, &key_buffer, &value_buffer})
    TORCH_CHECK(t->scalar_type() == qkv.scalar_type(), "cos, sin and the buffers must have qkv's dtype");
  switch (qkv.scalar_type()) {
    case at::kFloat: rotate_and_store<float>(qkv, heads, kv_heads, cos, sin, key_buffer, value_buffer, slot); break;
    case at::kBFloat16: rotate_and_store<c10::BFloat16>(qkv, heads, kv_heads, cos, sin, key_buffer, value_buffer, slot); break;
    default: TORCH_CHECK(false, "rotary_attend_ takes float32 or bfloat16, got ", qkv.scalar_type());
  }
  const at::Tensor query = qkv.narrow(1, 0, heads * dim).view({rows, kv_heads, heads / kv_heads, dim});
  const at::Tensor out = shared_prefix_decode(query, prefix_keys, prefix_values, prefix_valid, row_prompt,
                                              key_buffer.narrow(2, 0, slot + 1), value_buffer.narrow(2, 0, slot + 1), scale);
  return out.view({rows, heads * dim});
}

}  // namespace

TORCH_LIBRARY(llmrl_kernels, m) {
  m.def("shared_prefix_decode(Tensor query, Tensor prefix_keys, Tensor prefix_values, Tensor? prefix_valid, "
        "Tensor row_prompt, Tensor suffix_keys, Tensor suffix_values, float scale) -> Tensor");
  m.def("rotary_attend_(Tensor(a!) qkv, int heads, int kv_heads, Tensor cos, Tensor sin, Tensor(b!) key_buffer, "
        "Tensor(c!) value_buffer, int slot, Tensor prefix_keys, Tensor prefix_values, Tensor? prefix_valid, Tensor row_prompt, "
        "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmrl_kernels, CPU, m) {
  m.impl("shared_prefix_decode", &shared_prefix_decode);
  m.impl("rotary_attend_", &rotary_attend_);
}

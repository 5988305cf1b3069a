// Training's attention for bf16 or fp32 operands (llmrl/materialized_attention.py), forward and
// backward, one (row, head) block at a time and, inside a block, one tile of query rows at a time:
//   forward   S = scale Q K^T, P = softmax(S, masked), O = P V
//   backward  dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(P * dP)), dQ = scale dS K, dK = scale dS^T Q
//
// Why tiles: a tile's rows attend only inside [lo, hi), the span of the keys they see between
// them, so the products and the softmax skip what a causal mask hides (the upper triangle of a
// row's own tokens) and keys no row of the tile sees (a prompt row's padding). Why one kernel:
// each tile's scores are made, turned into probabilities (or gradients) and multiplied again while
// they are in cache, where torch's ops ran a batched product, a masked fill, a softmax, the mask's
// bookkeeping, the softmax's backward and four more batched products as separate passes over
// [B, H, M, N] in memory (docs/benchmarks.md).
//
// The two products that feed a softmax's rounding (Q K^T and dO V^T) are fp32 whatever the
// operands. For bf16 operands every product is MKL's bf16 x bf16 -> fp32 GEMM (torch's CPU matmuls
// cannot write a bf16 product to an fp32 result); P and dS are rounded to bf16 once, as the bf16
// products that take them would, and dQ, dK and dV are summed in fp32 and rounded once. Each
// product of two bf16 values is exact in fp32, so it is the same arithmetic up to the order of the
// sums. For fp32 operands it is MKL's sgemm, the routine torch's own fp32 products reach.
//
// Both are found at run time in the torch library this process loaded, as mkl_packed_gemm.cpp
// finds MKL's packed GEMM; `softmax_products_available` says false for a dtype without its routine.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <dlfcn.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

// The products, found in torch's library: bf16 x bf16 -> fp32 is CBLAS's cblas_gemm_bf16bf16f32;
// for fp32 the library exports only the Fortran interface, sgemm_ (column-major, arguments by
// address).
using GemmBf16F32 = void (*)(int layout, int transa, int transb, int m, int n, int k, float alpha, const uint16_t* a, int lda,
                             const uint16_t* b, int ldb, float beta, float* c, int ldc);
using FortranSgemm = void (*)(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
                              const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
                              const int* ldc);

template <typename Function>
Function torch_symbol(const char* name) {
  void* torch_cpu = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
  return torch_cpu == nullptr ? nullptr : reinterpret_cast<Function>(dlsym(torch_cpu, name));
}

GemmBf16F32 gemm_bf16_f32() {
  static const GemmBf16F32 function = torch_symbol<GemmBf16F32>("cblas_gemm_bf16bf16f32");
  return function;
}

FortranSgemm sgemm() {
  static const FortranSgemm function = torch_symbol<FortranSgemm>("sgemm_");
  return function;
}

bool softmax_products_available(at::ScalarType dtype) {
  if (dtype == at::kBFloat16) return gemm_bf16_f32() != nullptr;
  if (dtype == at::kFloat) return sgemm() != nullptr;
  return false;
}

// kRowMajor, kNoTrans, kTrans: mkl_packed_gemm.cpp's CBLAS enumerators (the same compile unit, elementwise_ops.cpp)

// A row-major operand: `at` its first element, `ld` the distance between its rows, `trans` whether
// the product reads its transpose.
template <typename T>
struct Operand {
  const T* at;
  int64_t ld;
  bool trans;
};

// C [m, n] (row-major, fp32, leading dimension ldc) = alpha op(A) op(B) + beta C, op(A) [m, k] and
// op(B) [k, n], with MKL's product for the operands' dtype. One thread: callers run it inside
// their own parallel loop.
void gemm(int64_t m, int64_t n, int64_t k, float alpha, Operand<float> a, Operand<float> b, float beta, float* c, int64_t ldc) {
  // Fortran's sgemm is column-major: the row-major C is C^T there, and C^T = op(B)^T op(A)^T.
  const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
  const int lda = static_cast<int>(a.ld), ldb = static_cast<int>(b.ld), ldci = static_cast<int>(ldc);
  sgemm()(b.trans ? "T" : "N", a.trans ? "T" : "N", &ni, &mi, &ki, &alpha, b.at, &ldb, a.at, &lda, &beta, c, &ldci);
}

void gemm(int64_t m, int64_t n, int64_t k, float alpha, Operand<c10::BFloat16> a, Operand<c10::BFloat16> b, float beta, float* c,
          int64_t ldc) {
  gemm_bf16_f32()(kRowMajor, a.trans ? kTrans : kNoTrans, b.trans ? kTrans : kNoTrans, static_cast<int>(m), static_cast<int>(n),
                  static_cast<int>(k), alpha, reinterpret_cast<const uint16_t*>(a.at), static_cast<int>(a.ld),
                  reinterpret_cast<const uint16_t*>(b.at), static_cast<int>(b.ld), beta, c, static_cast<int>(ldc));
}

// A [B, H, M, N] boolean mask (True = attend) read through its strides; the key dimension must be
// contiguous. Broadcast dimensions have stride 0.
struct MaskRows {
  const bool* base = nullptr;
  int64_t s0 = 0, s1 = 0, s2 = 0;
  const bool* row(int64_t b, int64_t h, int64_t m) const { return base == nullptr ? nullptr : base + b * s0 + h * s1 + m * s2; }
};

MaskRows mask_rows(const std::optional<at::Tensor>& mask, int64_t batch, int64_t heads, int64_t m, int64_t n) {
  if (!mask.has_value() || !mask->defined()) return {};
  const at::Tensor& t = *mask;
  TORCH_CHECK(t.dim() == 4 && t.scalar_type() == at::kBool && t.size(0) == batch && t.size(1) == heads && t.size(2) == m && t.size(3) == n,
              "mask must be a boolean [B, H, M, N] (expanded) tensor");
  TORCH_CHECK(t.stride(3) == 1, "the mask's key dimension must be contiguous");
  return {t.data_ptr<bool>(), t.stride(0), t.stride(1), t.stride(2)};
}

// One row of scores in place -> its softmax over the keys `attend` lets it see (all when null);
// zero where masked, and all zero when it sees none (as torch's attention gives). Plain loops
// that gcc vectorises; callers flush subnormals around them (FlushDenormals in elementwise.h).
inline void softmax_row(float* x, const bool* attend, int64_t n) {
  const float minus_inf = -std::numeric_limits<float>::infinity();
  if (attend != nullptr) {
    const auto* seen = reinterpret_cast<const uint8_t*>(attend);  // bytes, which gcc widens lane-wise
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) x[j] = seen[j] != 0 ? x[j] : minus_inf;
  }
  float peak = minus_inf;
#pragma omp simd reduction(max : peak)
  for (int64_t j = 0; j < n; ++j) peak = std::max(peak, x[j]);
  if (peak == minus_inf) {
    std::fill(x, x + n, 0.f);
    return;
  }
  float total = 0.f;
#pragma omp simd reduction(+ : total)
  for (int64_t j = 0; j < n; ++j) {
    // exp_clamped takes -inf to exp(-87), not 0: a masked key's weight is set to 0 here
    const float e = x[j] == minus_inf ? 0.f : llmrl::exp_clamped(x[j] - peak);
    x[j] = e;
    total += e;
  }
  const float inverse = 1.f / total;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] *= inverse;
}

// Query rows per tile, at most: smaller tiles follow a causal edge closer, larger ones make larger
// products. At the vs_trl shape (runs of 129 query rows over about 240 keys, head size 64; fp32 on 2
// Zen 4 cores) a forward and backward took at best 24.6 ms at 64 and 96 rows, 26.0 at 32 and 26.7
// at 130, where each run is one tile (docs/benchmarks.md).
constexpr int64_t kTileRows = 96;

// The tiles' first rows: each run of `period` rows (the grouped layout stacks each query head's
// rows, and a tile across two heads would see both heads' keys) split into near-equal tiles of at
// most kTileRows. period <= 0: one run of all m rows.
std::vector<int64_t> tile_starts(int64_t m, int64_t period) {
  const int64_t run = period > 0 ? period : std::max<int64_t>(m, 1);
  std::vector<int64_t> starts;
  for (int64_t first = 0; first < m; first += run) {
    const int64_t rows = std::min(run, m - first), tiles = (rows + kTileRows - 1) / kTileRows;
    for (int64_t t = 0; t < tiles; ++t) starts.push_back(first + t * rows / tiles);
  }
  starts.push_back(m);
  return starts;
}

// [lo, hi): the keys the rows [r0, r1) of block (b, h) see between them; lo == hi when none does.
std::pair<int64_t, int64_t> tile_keys(const MaskRows& attend, int64_t b, int64_t h, int64_t r0, int64_t r1, int64_t n) {
  if (attend.base == nullptr) return {0, n};
  int64_t lo = n, hi = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const bool* row = attend.row(b, h, r);
    int64_t first = 0, last = n;
    while (first < std::min(lo, last) && !row[first]) ++first;  // keys before lo are already in
    while (last > std::max(hi, first) && !row[last - 1]) --last;
    if (first < last) lo = std::min(lo, first), hi = std::max(hi, last);
  }
  return lo < hi ? std::make_pair(lo, hi) : std::make_pair<int64_t, int64_t>(0, 0);
}

// [B, H, rows, depth] operand: element (b, h, r, 0) of `t` (rows contiguous)
template <typename T>
const T* row_at(const at::Tensor& t, int64_t b, int64_t h, int64_t r) {
  return t.data_ptr<T>() + b * t.stride(0) + h * t.stride(1) + r * t.stride(2);
}

template <typename T>
void narrow_rows(const float* from, int64_t ld_from, T* to, int64_t ld_to, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) to[r * ld_to + j] = llmrl::narrow<T>(from[r * ld_from + j]);
  }
}

// The forward for operand type T: probs (fp32, zero outside the tiles' keys), out and each tile's
// [lo, hi) in spans [B * H, tiles, 2].
template <typename T>
void forward_blocks(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const MaskRows& attend, float scale,
                    const std::vector<int64_t>& starts, float* probs, T* out, int64_t* spans) {
  const int64_t batch = q.size(0), heads = q.size(1), m = q.size(2), depth = q.size(3), n = k.size(2);
  const int64_t tiles = static_cast<int64_t>(starts.size()) - 1;
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> low(std::is_same_v<T, float> ? 0 : kTileRows * n);  // a tile's probabilities rounded for P V
    std::vector<float> sums(std::is_same_v<T, float> ? 0 : kTileRows * depth);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / heads, h = i % heads;
      float* block = probs + i * m * n;
      T* block_out = out + i * m * depth;
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t r0 = starts[t], rows = starts[t + 1] - r0;
        const auto [lo, hi] = tile_keys(attend, b, h, r0, r0 + rows, n);
        spans[(i * tiles + t) * 2] = lo, spans[(i * tiles + t) * 2 + 1] = hi;
        float* scores = block + r0 * n;
        if (lo == hi) {
          std::fill(scores, scores + rows * n, 0.f);
          std::fill(block_out + r0 * depth, block_out + (r0 + rows) * depth, T(0.f));
          continue;
        }
        const int64_t width = hi - lo;
        gemm(rows, width, depth, scale, Operand<T>{row_at<T>(q, b, h, r0), q.stride(2), false}, Operand<T>{row_at<T>(k, b, h, lo), k.stride(2), true},
             0.f, scores + lo, n);
        {
          const llmrl::FlushDenormals flushed;  // see elementwise.h; the products are left as MKL makes them
          for (int64_t r = 0; r < rows; ++r) {
            float* row = scores + r * n;
            std::fill(row, row + lo, 0.f);
            std::fill(row + hi, row + n, 0.f);
            const bool* seen = attend.row(b, h, r0 + r);
            softmax_row(row + lo, seen == nullptr ? nullptr : seen + lo, width);
          }
        }
        if constexpr (std::is_same_v<T, float>) {
          gemm(rows, depth, width, 1.f, Operand<float>{scores + lo, n, false}, Operand<float>{row_at<float>(v, b, h, lo), v.stride(2), false}, 0.f,
               block_out + r0 * depth, depth);
        } else {
          narrow_rows(scores + lo, n, low.data(), width, rows, width);
          gemm(rows, depth, width, 1.f, Operand<T>{low.data(), width, false}, Operand<T>{row_at<T>(v, b, h, lo), v.stride(2), false}, 0.f,
               sums.data(), depth);
          narrow_rows(sums.data(), depth, block_out + r0 * depth, depth, rows, depth);
        }
      }
    }
  });
}

// A [B, H, rows, depth] bf16 or fp32 operand whose rows are contiguous (as views of transposed heads are)
at::Tensor rows_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4 && (t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kFloat) && t.device().is_cpu(), name,
              " must be a bfloat16 or float32 [B, H, rows, depth] CPU tensor");
  TORCH_CHECK(softmax_products_available(t.scalar_type()), "this torch's MKL has no product for ", t.scalar_type(), " operands");
  const at::Tensor rows = t.stride(3) == 1 ? t : t.contiguous();
  TORCH_CHECK(rows.size(2) < INT32_MAX && rows.size(3) < INT32_MAX && rows.stride(2) < INT32_MAX, name, "'s sizes must fit int32");
  return rows;
}

// q [B, H, M, D], k and v [B, H, N, D], all bf16 or all fp32; mask [B, H, M, N] bool (expanded) or
// none -> (probs [B, H, M, N] fp32, out [B, H, M, D], spans [B * H, tiles, 2] int64), the last two
// for the backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_tiles_forward(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                                                      const std::optional<at::Tensor>& mask, double scale, int64_t row_period) {
  const at::Tensor q = rows_contiguous(q_in, "q"), k = rows_contiguous(k_in, "k"), v = rows_contiguous(v_in, "v");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(), "q, k and v must have one dtype");
  const int64_t batch = q.size(0), heads = q.size(1), m = q.size(2), depth = q.size(3), n = k.size(2);
  TORCH_CHECK(k.size(0) == batch && k.size(1) == heads && k.size(3) == depth && v.sizes() == k.sizes(), "q, k and v must agree in B, H and depth");
  const MaskRows attend = mask_rows(mask, batch, heads, m, n);
  const std::vector<int64_t> starts = tile_starts(m, row_period);
  const int64_t tiles = static_cast<int64_t>(starts.size()) - 1;
  at::Tensor probs = at::empty({batch, heads, m, n}, q.options().dtype(at::kFloat));
  at::Tensor out = at::empty({batch, heads, m, depth}, q.options());
  at::Tensor spans = at::empty({batch * heads, tiles, 2}, q.options().dtype(at::kLong));
  if (q.scalar_type() == at::kFloat) {
    forward_blocks<float>(q, k, v, attend, static_cast<float>(scale), starts, probs.data_ptr<float>(), out.data_ptr<float>(), spans.data_ptr<int64_t>());
  } else {
    forward_blocks<c10::BFloat16>(q, k, v, attend, static_cast<float>(scale), starts, probs.data_ptr<float>(), out.data_ptr<c10::BFloat16>(),
                                  spans.data_ptr<int64_t>());
  }
  return {probs, out, spans};
}

// The backward for operand type T, tile by tile over the forward's spans. dP and dS live in a
// per-thread tile; dK and dV are summed over a block's tiles in fp32.
template <typename T>
void backward_blocks(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const float* probs, const int64_t* spans,
                     float scale, const std::vector<int64_t>& starts, T* dq, T* dk, T* dv) {
  constexpr bool wide = std::is_same_v<T, float>;
  const int64_t batch = q.size(0), heads = q.size(1), m = q.size(2), depth = q.size(3), n = k.size(2);
  const int64_t tiles = static_cast<int64_t>(starts.size()) - 1;
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(kTileRows * n);  // dP, then dS, of a tile
    std::vector<T> low_p(wide ? 0 : kTileRows * n), low_s(wide ? 0 : kTileRows * n);
    std::vector<float> sum_q(wide ? 0 : kTileRows * depth), sum_k(wide ? 0 : n * depth), sum_v(wide ? 0 : n * depth);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / heads, h = i % heads;
      const float* block = probs + i * m * n;
      // fp32: dK and dV are summed straight into the outputs
      float* into_k = wide ? reinterpret_cast<float*>(dk + i * n * depth) : sum_k.data();
      float* into_v = wide ? reinterpret_cast<float*>(dv + i * n * depth) : sum_v.data();
      std::fill(into_k, into_k + n * depth, 0.f);
      std::fill(into_v, into_v + n * depth, 0.f);
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t r0 = starts[t], rows = starts[t + 1] - r0;
        const int64_t lo = spans[(i * tiles + t) * 2], hi = spans[(i * tiles + t) * 2 + 1], width = hi - lo;
        T* tile_dq = dq + (i * m + r0) * depth;
        if (width == 0) {
          std::fill(tile_dq, tile_dq + rows * depth, T(0.f));
          continue;
        }
        const float* p = block + r0 * n + lo;
        const Operand<T> grad_rows{row_at<T>(grad, b, h, r0), grad.stride(2), false};
        Operand<T> p_tile{nullptr, 0, false};
        if constexpr (wide) {
          p_tile = {p, n, false};
        } else {
          narrow_rows(p, n, low_p.data(), width, rows, width);
          p_tile = {low_p.data(), width, false};
        }
        // dV[lo:hi] += P^T dO
        gemm(width, depth, rows, 1.f, Operand<T>{p_tile.at, p_tile.ld, true}, grad_rows, 1.f, into_v + lo * depth, depth);
        // dP = dO V^T, then dS = P * (dP - rowsum(P * dP)) in place
        gemm(rows, width, depth, 1.f, grad_rows, Operand<T>{row_at<T>(v, b, h, lo), v.stride(2), true}, 0.f, scores.data(), width);
        {
          const llmrl::FlushDenormals flushed;
          for (int64_t r = 0; r < rows; ++r) {
            const float* pr = p + r * n;
            float* ds = scores.data() + r * width;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t j = 0; j < width; ++j) dot += pr[j] * ds[j];
#pragma omp simd
            for (int64_t j = 0; j < width; ++j) ds[j] = pr[j] * (ds[j] - dot);
          }
        }
        Operand<T> s_tile{nullptr, 0, false};
        if constexpr (wide) {
          s_tile = {scores.data(), width, false};
        } else {
          narrow_rows(scores.data(), width, low_s.data(), width, rows, width);
          s_tile = {low_s.data(), width, false};
        }
        // dQ = scale dS K[lo:hi]
        if constexpr (wide) {
          gemm(rows, depth, width, scale, s_tile, Operand<T>{row_at<T>(k, b, h, lo), k.stride(2), false}, 0.f, tile_dq, depth);
        } else {
          gemm(rows, depth, width, scale, s_tile, Operand<T>{row_at<T>(k, b, h, lo), k.stride(2), false}, 0.f, sum_q.data(), depth);
          narrow_rows(sum_q.data(), depth, tile_dq, depth, rows, depth);
        }
        // dK[lo:hi] += scale dS^T Q
        gemm(width, depth, rows, scale, Operand<T>{s_tile.at, s_tile.ld, true}, Operand<T>{row_at<T>(q, b, h, r0), q.stride(2), false}, 1.f,
             into_k + lo * depth, depth);
      }
      if constexpr (!wide) {
        narrow_rows(sum_k.data(), depth, dk + i * n * depth, depth, n, depth);
        narrow_rows(sum_v.data(), depth, dv + i * n * depth, depth, n, depth);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_tiles_backward(const at::Tensor& grad_in, const at::Tensor& q_in, const at::Tensor& k_in,
                                                                       const at::Tensor& v_in, const at::Tensor& probs, const at::Tensor& spans,
                                                                       double scale, int64_t row_period) {
  const at::Tensor grad = rows_contiguous(grad_in, "grad_out"), q = rows_contiguous(q_in, "q"), k = rows_contiguous(k_in, "k"),
                   v = rows_contiguous(v_in, "v");
  TORCH_CHECK(grad.scalar_type() == q.scalar_type() && q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(),
              "grad_out, q, k and v must have one dtype");
  const int64_t batch = q.size(0), heads = q.size(1), m = q.size(2), depth = q.size(3), n = k.size(2);
  TORCH_CHECK(grad.sizes() == q.sizes() && v.sizes() == k.sizes(), "grad_out must match q, and v k");
  TORCH_CHECK(probs.scalar_type() == at::kFloat && probs.is_contiguous() && probs.sizes() == at::IntArrayRef({batch, heads, m, n}),
              "probs must be a contiguous float32 [B, H, M, N]");
  const std::vector<int64_t> starts = tile_starts(m, row_period);
  const int64_t tiles = static_cast<int64_t>(starts.size()) - 1;
  TORCH_CHECK(spans.scalar_type() == at::kLong && spans.is_contiguous() && spans.sizes() == at::IntArrayRef({batch * heads, tiles, 2}),
              "spans must be the forward's, for the same row_period");
  at::Tensor dq = at::empty_like(q, at::MemoryFormat::Contiguous), dk = at::empty_like(k, at::MemoryFormat::Contiguous),
             dv = at::empty_like(v, at::MemoryFormat::Contiguous);
  if (q.scalar_type() == at::kFloat) {
    backward_blocks<float>(grad, q, k, v, probs.data_ptr<float>(), spans.data_ptr<int64_t>(), static_cast<float>(scale), starts, dq.data_ptr<float>(),
                           dk.data_ptr<float>(), dv.data_ptr<float>());
  } else {
    backward_blocks<c10::BFloat16>(grad, q, k, v, probs.data_ptr<float>(), spans.data_ptr<int64_t>(), static_cast<float>(scale), starts,
                                   dq.data_ptr<c10::BFloat16>(), dk.data_ptr<c10::BFloat16>(), dv.data_ptr<c10::BFloat16>());
  }
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmrl_kernels, m) {
  m.def("softmax_products_available(ScalarType dtype) -> bool", &softmax_products_available);
  m.def("attention_tiles_forward(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, int row_period) -> (Tensor, Tensor, Tensor)");
  m.def(
      "attention_tiles_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor probs, Tensor spans, float scale, int row_period) -> "
      "(Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(llmrl_kernels, CPU, m) {
  m.impl("attention_tiles_forward", &attention_tiles_forward);
  m.impl("attention_tiles_backward", &attention_tiles_backward);
}

// The softmax of training's attention scores and its gradient, for bf16 or fp32 operands
// (llmrl/materialized_attention.py): P = softmax(scale * Q K^T, masked) and dS = P * (dP -
// rowsum(P * dP)) with dP = dO V^T.
//
// Why: both products feed a softmax, which amplifies their rounding, so they run in fp32. Done with
// torch's ops, each is a batched product and then several passes over [B, H, M, N]: the scaling,
// the masked fill, the softmax (or its backward) and the mask's bookkeeping, each reading and
// writing the whole score tensor from memory. Here MKL makes one (row, head)'s block of scores and
// it is turned into probabilities (or gradients) while it is still in cache (docs/benchmarks.md).
//
// For bf16 operands the product is MKL's bf16 x bf16 -> fp32 GEMM: torch's CPU matmuls cannot write
// a bf16 product to an fp32 result, so the module cast Q, K, dO and V to fp32 copies first. Each
// product of two bf16 values is exact in fp32, so it is the same arithmetic up to the order of the
// sums. At the vs_trl shape (57 heads of 387 grouped queries over 240 keys, head size 64) one
// product took 1.9 ms against 4.3 ms with the copies, on 2 AMD Zen 4 cores. For fp32 operands it
// is MKL's sgemm, the routine torch's own fp32 products reach.
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

// A [B, H, rows, depth] bf16 or fp32 operand whose rows are contiguous (as views of transposed heads are)
at::Tensor rows_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4 && (t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kFloat) && t.device().is_cpu(), name,
              " must be a bfloat16 or float32 [B, H, rows, depth] CPU tensor");
  TORCH_CHECK(softmax_products_available(t.scalar_type()), "this torch's MKL has no product for ", t.scalar_type(), " operands");
  const at::Tensor rows = t.stride(3) == 1 ? t : t.contiguous();
  TORCH_CHECK(rows.size(2) < INT32_MAX && rows.size(3) < INT32_MAX && rows.stride(2) < INT32_MAX, name, "'s sizes must fit int32");
  return rows;
}

// kRowMajor, kNoTrans, kTrans: mkl_packed_gemm.cpp's CBLAS enumerators (the same compile unit, elementwise_ops.cpp)

// out [M, N] (row-major, fp32) = alpha * a[b, h] [M, K] @ b[b, h] [N, K]^T
void product_nt(const at::Tensor& a, const at::Tensor& b, int64_t row, int64_t head, float alpha, float* out) {
  const int m = static_cast<int>(a.size(2)), k = static_cast<int>(a.size(3)), n = static_cast<int>(b.size(2));
  const int lda = static_cast<int>(a.stride(2)), ldb = static_cast<int>(b.stride(2));
  const int64_t a_at = row * a.stride(0) + head * a.stride(1), b_at = row * b.stride(0) + head * b.stride(1);
  if (a.scalar_type() == at::kFloat) {
    // column-major: out^T [n, m] = b [n, k] (row-major, so transposed) times a^T [k, m]
    const float zero = 0.f;
    sgemm()("T", "N", &n, &m, &k, &alpha, b.data_ptr<float>() + b_at, &ldb, a.data_ptr<float>() + a_at, &lda, &zero, out, &n);
  } else {
    gemm_bf16_f32()(kRowMajor, kNoTrans, kTrans, m, n, k, alpha, reinterpret_cast<const uint16_t*>(a.data_ptr<at::BFloat16>()) + a_at,
                    lda, reinterpret_cast<const uint16_t*>(b.data_ptr<at::BFloat16>()) + b_at, ldb, 0.f, out, n);
  }
}


// A [B, H, M, N] boolean mask (True = attend) read through its strides; the key dimension must be
// contiguous. Broadcast dimensions have stride 0.
struct MaskRows {
  const bool* base = nullptr;
  int64_t s0 = 0, s1 = 0, s2 = 0;
  const bool* row(int64_t b, int64_t h, int64_t m) const { return base == nullptr ? nullptr : base + b * s0 + h * s1 + m * s2; }
};

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

MaskRows mask_rows(const std::optional<at::Tensor>& mask, int64_t batch, int64_t heads, int64_t m, int64_t n) {
  if (!mask.has_value() || !mask->defined()) return {};
  const at::Tensor& t = *mask;
  TORCH_CHECK(t.dim() == 4 && t.scalar_type() == at::kBool && t.size(0) == batch && t.size(1) == heads && t.size(2) == m && t.size(3) == n,
              "mask must be a boolean [B, H, M, N] (expanded) tensor");
  TORCH_CHECK(t.stride(3) == 1, "the mask's key dimension must be contiguous");
  return {t.data_ptr<bool>(), t.stride(0), t.stride(1), t.stride(2)};
}

// softmax(scale * q k^T, masked) over the keys, in fp32: q [B, H, M, K], k [B, H, N, K], both bf16 or both fp32.
// Each (row, head)'s scores are made by MKL straight into the result and turned into
// probabilities while they are still in cache, one pass, instead of a product, a masked fill,
// a softmax and the mask's bookkeeping as separate passes over [B, H, M, N].
at::Tensor masked_softmax_products(const at::Tensor& q_in, const at::Tensor& k_in, const std::optional<at::Tensor>& mask, double scale) {
  const at::Tensor q = rows_contiguous(q_in, "q"), k = rows_contiguous(k_in, "k");
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "q and k must have one dtype");
  const int64_t batch = q.size(0), heads = q.size(1), m = q.size(2), depth = q.size(3), n = k.size(2);
  TORCH_CHECK(k.size(0) == batch && k.size(1) == heads && k.size(3) == depth, "q and k must agree in B, H and depth");
  const MaskRows attend = mask_rows(mask, batch, heads, m, n);
  at::Tensor probs = at::empty({batch, heads, m, n}, q.options().dtype(at::kFloat));
  float* out = probs.data_ptr<float>();
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / heads, h = i % heads;
      float* scores = out + i * m * n;
      product_nt(q, k, b, h, static_cast<float>(scale), scores);
      const llmrl::FlushDenormals flushed;  // see elementwise.h; the product above is left as MKL makes it
      for (int64_t r = 0; r < m; ++r) softmax_row(scores + r * n, attend.row(b, h, r), n);
    }
  });
  return probs;
}

// The scores' gradient from the output's: dS = P * (dP - rowsum(P * dP)) with dP = dO v^T, for
// grad_out [B, H, M, K] and v [B, H, N, K] (both bf16 or both fp32) and probs P [B, H, M, N] fp32;
// rounded once to the operands' dtype, the one the products that take it (dQ, dK) run in. dP
// lives in a per-thread block while its rows are used: never a [B, H, M, N] tensor.
template <typename T>
void softmax_backward_rows(const at::Tensor& grad, const at::Tensor& v, const float* p_all, T* out) {
  const int64_t batch = grad.size(0), heads = grad.size(1), m = grad.size(2), n = v.size(2);
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> block(m * n);
    for (int64_t i = begin; i < end; ++i) {
      product_nt(grad, v, i / heads, i % heads, 1.f, block.data());
      const llmrl::FlushDenormals flushed;
      for (int64_t r = 0; r < m; ++r) {
        const float* p = p_all + (i * m + r) * n;
        const float* dp = block.data() + r * n;
        T* ds = out + (i * m + r) * n;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t j = 0; j < n; ++j) dot += p[j] * dp[j];
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) ds[j] = llmrl::narrow<T>(p[j] * (dp[j] - dot));
      }
    }
  });
}

at::Tensor softmax_backward_products(const at::Tensor& grad_in, const at::Tensor& v_in, const at::Tensor& probs) {
  const at::Tensor grad = rows_contiguous(grad_in, "grad_out"), v = rows_contiguous(v_in, "v");
  TORCH_CHECK(grad.scalar_type() == v.scalar_type(), "grad_out and v must have one dtype");
  const int64_t batch = grad.size(0), heads = grad.size(1), m = grad.size(2), n = v.size(2);
  TORCH_CHECK(probs.scalar_type() == at::kFloat && probs.is_contiguous() && probs.sizes() == at::IntArrayRef({batch, heads, m, n}),
              "probs must be a contiguous float32 [B, H, M, N]");
  at::Tensor grad_scores = at::empty({batch, heads, m, n}, grad.options());
  if (grad.scalar_type() == at::kFloat) {
    softmax_backward_rows<float>(grad, v, probs.data_ptr<float>(), grad_scores.data_ptr<float>());
  } else {
    softmax_backward_rows<c10::BFloat16>(grad, v, probs.data_ptr<float>(), grad_scores.data_ptr<c10::BFloat16>());
  }
  return grad_scores;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmrl_kernels, m) {
  m.def("softmax_products_available(ScalarType dtype) -> bool", &softmax_products_available);
  m.def("masked_softmax_products(Tensor q, Tensor k, Tensor? mask, float scale) -> Tensor");
  m.def("softmax_backward_products(Tensor grad_out, Tensor v, Tensor probs) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmrl_kernels, CPU, m) {
  m.impl("masked_softmax_products", &masked_softmax_products);
  m.impl("softmax_backward_products", &softmax_backward_products);
}

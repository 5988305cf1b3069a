// One categorical draw per row from softmax(logits / temperature), with the drawn token's
// logprob, in two passes over each row (llmrl/rollout/hf.py calls it for plain sampling: no
// top-k, no top-p).
//
// Why: torch's route, logits.float() -> log_softmax -> exp -> a float64 copy for the CDF, makes
// four passes over a [rows, vocabulary] tensor and writes three of its size. At 64 rows of
// SmolLM2's 49,152 tokens that was about 12 ms of an 84 ms bf16 decode step.
//
// The draw is the one `sample_from` makes: with one uniform u in (0, 1] per row, token k is
// chosen when cdf[k-1] < u * total <= cdf[k], over unnormalised weights exp((x - max) / T).
// The CDF is two-level: block sums first, then a running sum inside the chosen block only. A
// token of weight 0 (logit -inf) is never chosen. The logprob is (x_k - max) / T - log(total).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "elementwise.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace {

using llmrl::exp_clamped;
using llmrl::widen;

constexpr int64_t kBlock = 256;

// exp((x - peak) * inverse_t), and exactly 0 for x = -inf
template <typename T>
inline float weight(T x, float peak, float inverse_t) {
  const float f = widen(x);
  const float w = exp_clamped((f - peak) * inverse_t);
  return f == -std::numeric_limits<float>::infinity() ? 0.f : w;
}

template <typename T>
void sample_row(const T* logits, int64_t vocab, float inverse_t, double uniform, double* block_sums, int64_t* chosen,
                float* logprob) {
  float peak = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : peak)
  for (int64_t j = 0; j < vocab; ++j) peak = std::max(peak, widen(logits[j]));
  const int64_t blocks = (vocab + kBlock - 1) / kBlock;
  double total = 0.0;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t end = std::min(vocab, (b + 1) * kBlock);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = b * kBlock; j < end; ++j) sum += weight(logits[j], peak, inverse_t);
    block_sums[b] = sum;
    total += sum;
  }
  const double target = uniform * total;
  // The first block whose running total reaches the target. The running totals add the block
  // sums in the order `total` did, and u <= 1, so one always does while any token has weight.
  int64_t block = -1;
  double before = 0.0;
  for (int64_t b = 0; b < blocks; ++b) {
    if (block_sums[b] > 0.0 && before + block_sums[b] >= target) {
      block = b;
      break;
    }
    before += block_sums[b];
  }
  if (block < 0) {  // no token has weight (every logit -inf): the row's first token, logprob nan
    block = 0;
    before = 0.0;
  }
  const int64_t start = block * kBlock, end = std::min(vocab, start + kBlock);
  int64_t pick = -1, last_with_mass = start;
  double running = before;
  for (int64_t j = start; j < end; ++j) {
    const float w = weight(logits[j], peak, inverse_t);
    if (w <= 0.f) continue;
    last_with_mass = j;
    running += w;
    if (running >= target) {
      pick = j;
      break;
    }
  }
  if (pick < 0) pick = last_with_mass;  // the block's own sum rounded just below its total
  *chosen = pick;
  *logprob = static_cast<float>(static_cast<double>((widen(logits[pick]) - peak) * inverse_t) - std::log(total));
}

std::tuple<at::Tensor, at::Tensor> sample_rows(const at::Tensor& logits, double temperature, const at::Tensor& uniform) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "logits must be [rows, vocabulary] with contiguous rows");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16, "logits must be float32 or bfloat16, got ",
              logits.scalar_type());
  TORCH_CHECK(logits.size(1) > 0, "logits have no vocabulary");
  TORCH_CHECK(temperature > 0, "temperature must be positive, got ", temperature);
  TORCH_CHECK(uniform.dim() == 1 && uniform.size(0) == logits.size(0) && uniform.scalar_type() == at::kDouble && uniform.is_contiguous(),
              "uniform must be float64 [rows], contiguous");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  at::Tensor chosen = at::empty({rows}, logits.options().dtype(at::kLong));
  at::Tensor logprob = at::empty({rows}, logits.options().dtype(at::kFloat));
  const float inverse_t = static_cast<float>(1.0 / temperature);
  const double* u = uniform.data_ptr<double>();
  auto run = [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> block_sums((vocab + kBlock - 1) / kBlock);
      for (int64_t n = begin; n < end; ++n)
        sample_row<T>(logits.data_ptr<T>() + n * logits.stride(0), vocab, inverse_t, u[n], block_sums.data(),
                      chosen.data_ptr<int64_t>() + n, logprob.data_ptr<float>() + n);
    });
  };
  if (logits.scalar_type() == at::kFloat) run(float{});
  else run(c10::BFloat16{});
  return {chosen, logprob};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmrl_kernels, m) { m.def("sample_rows(Tensor logits, float temperature, Tensor uniform) -> (Tensor, Tensor)"); }

TORCH_LIBRARY_IMPL(llmrl_kernels, CPU, m) { m.impl("sample_rows", &sample_rows); }

// The head pass's work on fp32 logits besides its products (llmrl/train/logprobs.py), one token's
// row of logits at a time while it is in cache:
//   forward   m = max z, e = exp(z - m), s = sum e, lse = m + log s, logp = z_target - lse,
//             H = log s - sum e (z - m) / s
//   backward  in place, z -> dz = -p * ((log p + H) h + g), plus g at the target, with p = exp(z - lse),
//             g the logprob's gradient and h the entropy's (each over the temperature); without h,
//             dz = -p g, plus g at the target
//
// Why: with torch's ops each of these steps is a pass over the chunk's [tokens, vocabulary] logits
// (1,024 x 49,152 fp32, 200 MB, far beyond the caches), so the forward read or wrote that memory
// eight times and the backward about ten, at 4-10 ms a pass on 2 cores (docs/benchmarks.md). A row
// (196 KB for SmolLM2's vocabulary) stays in L2 between this kernel's two passes over it.
//
// exp is llmrl::exp_clamped's arithmetic with its steps as fused multiply-adds (elementwise.h)
// and the sums run in vector lanes, so results differ from torch's ops in the last bits. Compiled
// in one unit after decode_ops.cpp (elementwise_ops.cpp).
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

namespace {

constexpr int64_t kHeadRowsPerTask = 4;
constexpr int64_t kSumBlock = 1024;

// The exps bound this kernel (one per logit each way): they run as fused multiply-adds.
inline float head_exp(float x) { return llmrl::exp_clamped<true>(x); }

void check_logits(const at::Tensor& z, const at::Tensor& targets) {
  TORCH_CHECK(z.dim() == 2 && z.scalar_type() == at::kFloat && z.device().is_cpu() && z.is_contiguous(),
              "logits must be a contiguous float32 [tokens, vocabulary] CPU tensor");
  TORCH_CHECK(targets.dim() == 1 && targets.scalar_type() == at::kLong && targets.size(0) == z.size(0) && targets.is_contiguous(),
              "targets must be a contiguous int64 [tokens] tensor");
}

void check_per_token(const at::Tensor& t, int64_t tokens, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.scalar_type() == at::kFloat && t.size(0) == tokens && t.is_contiguous(), name,
              " must be a contiguous float32 [tokens] tensor");
}

int64_t target_of(const int64_t* targets, int64_t row, int64_t vocab) {
  const int64_t target = targets[row];
  TORCH_CHECK(target >= 0 && target < vocab, "target ", target, " of token ", row, " is outside the vocabulary of ", vocab);
  return target;
}

// (lse, logp, entropy) per token of z [tokens, vocab]; entropy is zero unless asked for
std::tuple<at::Tensor, at::Tensor, at::Tensor> head_logsumexp(const at::Tensor& z, const at::Tensor& targets, bool want_entropy) {
  check_logits(z, targets);
  const int64_t tokens = z.size(0), vocab = z.size(1);
  TORCH_CHECK(vocab > 0, "the vocabulary is empty");
  at::Tensor lse = at::empty({tokens}, z.options()), logp = at::empty({tokens}, z.options()), entropy = at::zeros({tokens}, z.options());
  const float* all = z.data_ptr<float>();
  const int64_t* target = targets.data_ptr<int64_t>();
  float *lse_out = lse.data_ptr<float>(), *logp_out = logp.data_ptr<float>(), *entropy_out = entropy.data_ptr<float>();
  at::parallel_for(0, tokens, kHeadRowsPerTask, [&](int64_t begin, int64_t end) {
    const llmrl::FlushDenormals flushed;  // see elementwise.h
    for (int64_t row = begin; row < end; ++row) {
      const float* x = all + row * vocab;
      float peak = -std::numeric_limits<float>::infinity();
      // the comparison, not std::max: gcc kept std::max's reduction scalar here (15-25 ms a chunk
      // against 8 for this form, and 6 for a pass that only reads it)
#pragma omp simd reduction(max : peak)
      for (int64_t j = 0; j < vocab; ++j) peak = x[j] > peak ? x[j] : peak;
      // Sums in blocks: each block's in fp32 vector lanes, the blocks' in double. One fp32 sum of
      // 49,152 terms in 16 lanes put the log-sum-exp 6e-6 from fp64's, against 1e-6 for torch's.
      double total = 0.0, weighted = 0.0;
      for (int64_t first = 0; first < vocab; first += kSumBlock) {
        const int64_t last = std::min(first + kSumBlock, vocab);
        float part = 0.f, part_weighted = 0.f;
        if (want_entropy) {
#pragma omp simd reduction(+ : part, part_weighted)
          for (int64_t j = first; j < last; ++j) {
            const float shifted = x[j] - peak, e = head_exp(shifted);
            part += e;
            part_weighted += e * shifted;
          }
        } else {
#pragma omp simd reduction(+ : part)
          for (int64_t j = first; j < last; ++j) part += head_exp(x[j] - peak);
        }
        total += part;
        weighted += part_weighted;
      }
      const double log_total = std::log(total);
      lse_out[row] = static_cast<float>(peak + log_total);
      logp_out[row] = x[target_of(target, row, vocab)] - lse_out[row];
      if (want_entropy) entropy_out[row] = static_cast<float>(log_total - weighted / total);
    }
  });
  return {lse, logp, entropy};
}

// z [tokens, vocab] -> its gradient, in place (see the top of this file)
void head_grad_(at::Tensor& z, const at::Tensor& lse, const at::Tensor& targets, const at::Tensor& logp_grad,
                const std::optional<at::Tensor>& entropy, const std::optional<at::Tensor>& entropy_grad) {
  check_logits(z, targets);
  const int64_t tokens = z.size(0), vocab = z.size(1);
  check_per_token(lse, tokens, "lse");
  check_per_token(logp_grad, tokens, "logp_grad");
  const bool with_entropy = entropy_grad.has_value() && entropy_grad->defined();
  TORCH_CHECK(with_entropy == (entropy.has_value() && entropy->defined()), "entropy and entropy_grad come together");
  if (with_entropy) {
    check_per_token(*entropy, tokens, "entropy");
    check_per_token(*entropy_grad, tokens, "entropy_grad");
  }
  float* all = z.data_ptr<float>();
  const int64_t* target = targets.data_ptr<int64_t>();
  const float *lse_in = lse.data_ptr<float>(), *g_in = logp_grad.data_ptr<float>();
  const float* entropy_in = with_entropy ? entropy->data_ptr<float>() : nullptr;
  const float* h_in = with_entropy ? entropy_grad->data_ptr<float>() : nullptr;
  at::parallel_for(0, tokens, kHeadRowsPerTask, [&](int64_t begin, int64_t end) {
    const llmrl::FlushDenormals flushed;
    for (int64_t row = begin; row < end; ++row) {
      float* x = all + row * vocab;
      const float top = lse_in[row], g = g_in[row];
      if (with_entropy) {
        const float h = h_in[row], entropy_row = entropy_in[row];
#pragma omp simd
        for (int64_t j = 0; j < vocab; ++j) {
          const float log_p = x[j] - top;
          x[j] = -(head_exp(log_p) * ((log_p + entropy_row) * h + g));
        }
      } else {
        const float minus_g = -g;
#pragma omp simd
        for (int64_t j = 0; j < vocab; ++j) x[j] = head_exp(x[j] - top) * minus_g;
      }
      x[target_of(target, row, vocab)] += g;
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmrl_kernels, m) {
  m.def("head_logsumexp(Tensor logits, Tensor targets, bool want_entropy) -> (Tensor, Tensor, Tensor)");
  m.def("head_grad_(Tensor(a!) logits, Tensor lse, Tensor targets, Tensor logp_grad, Tensor? entropy, Tensor? entropy_grad) -> ()");
}

TORCH_LIBRARY_IMPL(llmrl_kernels, CPU, m) {
  m.impl("head_logsumexp", &head_logsumexp);
  m.impl("head_grad_", &head_grad_);
}

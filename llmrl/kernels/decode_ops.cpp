// The elementwise steps of a Llama-family decoder layer for one decode step, fused so that each
// is one pass over a [rows, width] tensor (llmrl/rollout/fused_decode.py calls them).
//
// Why: at decode, a step of 32 rows spent about a third of its time in small torch ops and in
// the Python of transformers' modules around them: RMSNorm alone is seven ops, rotary eight.
// Each op here reproduces transformers' Llama arithmetic, including where it rounds to the
// model's dtype, so a bf16 model gives the same bits up to the order of one fp32 sum (the
// RMSNorm variance) and the last bits of exp (SiLU).
//
// Loops are plain C++ over fp32 values, written so that gcc vectorises them (-O3
// -march=native, `omp simd`); there is no intrinsic here, so any x86-64 or Arm CPU builds it.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "elementwise.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace {

using llmrl::as;
using llmrl::exp_clamped;
using llmrl::narrow;
using llmrl::widen;

template <typename T>
inline const T* row_ptr(const at::Tensor& t, int64_t n) { return t.data_ptr<T>() + n * t.stride(0); }
template <typename T>
inline T* row_mut(const at::Tensor& t, int64_t n) { return t.data_ptr<T>() + n * t.stride(0); }

// transformers' LlamaRMSNorm: x / sqrt(mean(x^2) + eps) in fp32, rounded to the dtype, times the
// weight, rounded again. Returns the row's 1 / sqrt(mean(x^2) + eps), which training's backward keeps.
template <typename T>
float rms_norm_row(const T* x, const T* weight, int64_t width, float eps, T* out) {
  float squares = 0.f;
#pragma omp simd reduction(+ : squares)
  for (int64_t i = 0; i < width; ++i) squares += widen(x[i]) * widen(x[i]);
  const float inverse = 1.f / std::sqrt(squares / static_cast<float>(width) + eps);
#pragma omp simd
  for (int64_t i = 0; i < width; ++i) out[i] = narrow<T>(widen(weight[i]) * as<T>(widen(x[i]) * inverse));
  return inverse;
}

// silu(gate) rounded to the dtype, times up, rounded: transformers' act_fn(gate) * up for "silu".
// Callers flush subnormals around their loops (FlushDenormals in elementwise.h).
template <typename T>
inline T silu_times(float gate, float up) {
  return narrow<T>(as<T>(gate / (1.f + exp_clamped(-gate))) * up);
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, " must be [rows, width], got ", t.dim(), " dimensions");
  TORCH_CHECK(t.stride(1) == 1, name, "'s rows must be contiguous");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name, " must be float32 or bfloat16, got ",
              t.scalar_type());
}

void check_weight(const at::Tensor& weight, const at::Tensor& x) {
  TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous() && weight.size(0) == x.size(1), "weight must be [", x.size(1), "], contiguous");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight must have the input's dtype");
}

template <typename F>
void by_dtype(const at::Tensor& t, F&& body) {
  if (t.scalar_type() == at::kFloat) body(float{});
  else body(c10::BFloat16{});
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  check_weight(weight, x);
  at::Tensor out = at::empty(x.sizes(), x.options());
  by_dtype(x, [&](auto tag) {
    using T = decltype(tag);
    for (int64_t n = 0; n < x.size(0); ++n)
      rms_norm_row<T>(row_ptr<T>(x, n), weight.data_ptr<T>(), x.size(1), static_cast<float>(eps), row_mut<T>(out, n));
  });
  return out;
}

// The residual connection and the next norm: residual += delta (rounded to the dtype, in place),
// then returns rms_norm(residual).
at::Tensor add_rms_norm(const at::Tensor& residual, const at::Tensor& delta, const at::Tensor& weight, double eps) {
  check_rows(residual, "residual");
  check_rows(delta, "delta");
  check_weight(weight, residual);
  TORCH_CHECK(delta.sizes() == residual.sizes() && delta.scalar_type() == residual.scalar_type(), "delta must match the residual");
  at::Tensor out = at::empty(residual.sizes(), residual.options());
  by_dtype(residual, [&](auto tag) {
    using T = decltype(tag);
    const int64_t width = residual.size(1);
    for (int64_t n = 0; n < residual.size(0); ++n) {
      T* sum = row_mut<T>(residual, n);
      const T* d = row_ptr<T>(delta, n);
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) sum[i] = narrow<T>(widen(sum[i]) + widen(d[i]));
      rms_norm_row<T>(sum, weight.data_ptr<T>(), width, static_cast<float>(eps), row_mut<T>(out, n));
    }
  });
  return out;
}

// Rotary position embedding in place on the first `heads` heads of each row of x [rows, >= heads
// * dim], as transformers' apply_rotary_pos_emb: x * cos + rotate_half(x) * sin, with each
// product and the sum rounded to the dtype. cos and sin are [rows, dim] in x's dtype.
void rotary_(const at::Tensor& x, int64_t heads, const at::Tensor& cos, const at::Tensor& sin) {
  check_rows(x, "x");
  check_rows(cos, "cos");
  check_rows(sin, "sin");
  const int64_t dim = cos.size(1);
  TORCH_CHECK(dim % 2 == 0 && x.size(1) >= heads * dim, "x has ", x.size(1), " columns, fewer than ", heads, " heads of ", dim);
  TORCH_CHECK(cos.size(0) == x.size(0) && sin.sizes() == cos.sizes(), "cos and sin must be [rows of x, head size]");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(), "cos and sin must have x's dtype");
  by_dtype(x, [&](auto tag) {
    using T = decltype(tag);
    for (int64_t n = 0; n < x.size(0); ++n) {
      const T* c = row_ptr<T>(cos, n);
      const T* s = row_ptr<T>(sin, n);
      for (int64_t h = 0; h < heads; ++h) llmrl::rotate_head<T>(row_mut<T>(x, n) + h * dim, c, s, dim);
    }
  });
}

// The MLP's activation: for gate_up [rows, 2 * width] (the gate's outputs, then the up
// projection's), silu(gate) rounded to the dtype, times up, rounded: transformers'
// act_fn(gate_proj(x)) * up_proj(x) for hidden_act "silu".
at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up must have an even width, got ", gate_up.size(1));
  const int64_t width = gate_up.size(1) / 2;
  at::Tensor out = at::empty({gate_up.size(0), width}, gate_up.options());
  by_dtype(gate_up, [&](auto tag) {
    using T = decltype(tag);
    // exp is the costly part: split rows over threads when there are enough of them
    at::parallel_for(0, gate_up.size(0), 8, [&](int64_t begin, int64_t end) {
      const llmrl::FlushDenormals flushed;  // see elementwise.h
      for (int64_t n = begin; n < end; ++n) {
        const T* gate = row_ptr<T>(gate_up, n);
        const T* up = gate + width;
        T* o = row_mut<T>(out, n);
#pragma omp simd
        for (int64_t i = 0; i < width; ++i) {
          const float g = widen(gate[i]);
          o[i] = silu_times<T>(g, widen(up[i]));
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmrl_kernels, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor(a!) residual, Tensor delta, Tensor weight, float eps) -> Tensor");
  m.def("rotary_(Tensor(a!) x, int heads, Tensor cos, Tensor sin) -> ()");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmrl_kernels, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rotary_", &rotary_);
  m.impl("silu_mul", &silu_mul);
}

// Forward and backward of a Llama-family layer's RMSNorm, SiLU-gated product and rotary embedding
// for training on a CPU, each one pass over its tensors (llmrl/train/fused_layers.py wraps them
// for autograd).
//
// Why: transformers' RMSNorm is seven small ops and its backward about ten more, each a full pass
// over [tokens, width]: at 1,900 tokens of SmolLM2-135M one norm's forward and backward took 16
// ms standalone against 0.9 ms here, and a GRPO update went from 22.61 to 21.99 s
// (docs/benchmarks.md, "Fused norms and SiLU in training"). The
// forward rounds where transformers' modules round (to the dtype after the normalisation and
// after the weight; after SiLU and after the product). The backward is the exact derivative of
// that arithmetic taken in fp32, with each gradient rounded once to its tensor's dtype.
//
// Compiled in one unit after decode_ops.cpp (elementwise_ops.cpp), whose row helpers it uses.
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <tuple>

namespace {

constexpr int64_t kRowsPerTask = 16;

void check_same_rows(const at::Tensor& a, const at::Tensor& b, const char* name) {
  check_rows(a, name);
  TORCH_CHECK(a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type(), name, " must match in shape and dtype");
}

// transformers' LlamaRMSNorm, returning also each row's 1 / sqrt(mean(x^2) + eps) for the backward
std::tuple<at::Tensor, at::Tensor> rms_norm_train(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  check_weight(weight, x);
  const int64_t rows = x.size(0), width = x.size(1);
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor inverse = at::empty({rows}, x.options().dtype(at::kFloat));
  float* inv = inverse.data_ptr<float>();
  by_dtype(x, [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n)
        inv[n] = rms_norm_row<T>(row_ptr<T>(x, n), weight.data_ptr<T>(), width, static_cast<float>(eps), row_mut<T>(out, n));
    });
  });
  return {out, inverse};
}

// For y = w * (x * r), r = (mean(x^2) + eps)^-1/2, and upstream gradient g:
//   dx = r * (g w - x r * mean(g w * x r)),   dw = sum over rows of g * (x r)
// dw sums per thread in fp32 and then across threads, in an order fixed by the thread count.
std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                                                     const at::Tensor& inverse, bool weight_grad) {
  check_same_rows(grad, x, "grad");
  check_weight(weight, x);
  const int64_t rows = x.size(0), width = x.size(1);
  TORCH_CHECK(inverse.dim() == 1 && inverse.size(0) == rows && inverse.scalar_type() == at::kFloat && inverse.is_contiguous(),
              "inverse must be float32 [rows]");
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  const int threads = at::get_num_threads();
  at::Tensor partial = at::zeros({weight_grad ? threads : 1, width}, x.options().dtype(at::kFloat));
  const float* inv = inverse.data_ptr<float>();
  by_dtype(x, [&](auto tag) {
    using T = decltype(tag);
    const T* w = weight.data_ptr<T>();
    at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
      float* dw = partial.data_ptr<float>() + (weight_grad ? at::get_thread_num() : 0) * width;
      for (int64_t n = begin; n < end; ++n) {
        const T* g = row_ptr<T>(grad, n);
        const T* row = row_ptr<T>(x, n);
        T* dx = row_mut<T>(grad_x, n);
        const float r = inv[n];
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t i = 0; i < width; ++i) dot += widen(g[i]) * widen(w[i]) * (widen(row[i]) * r);
        const float mean = dot / static_cast<float>(width);
#pragma omp simd
        for (int64_t i = 0; i < width; ++i) {
          const float normed = widen(row[i]) * r;
          dx[i] = narrow<T>(r * (widen(g[i]) * widen(w[i]) - normed * mean));
        }
        if (weight_grad) {
#pragma omp simd
          for (int64_t i = 0; i < width; ++i) dw[i] += widen(g[i]) * as<T>(widen(row[i]) * r);
        }
      }
    });
  });
  if (!weight_grad) return {grad_x, at::empty({0}, weight.options())};  // no weight gradient wanted
  return {grad_x, partial.sum(0).to(weight.scalar_type())};
}

void check_gate_up(const at::Tensor& gate, const at::Tensor& up) { check_same_rows(up, gate, "up"); }

// silu_times over gate and up as separate [rows, width] tensors, as training's linears give them
at::Tensor silu_mul_train(const at::Tensor& gate, const at::Tensor& up) {
  check_rows(gate, "gate");
  check_gate_up(gate, up);
  const int64_t width = gate.size(1);
  at::Tensor out = at::empty(gate.sizes(), gate.options());
  by_dtype(gate, [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, gate.size(0), kRowsPerTask, [&](int64_t begin, int64_t end) {
      const llmrl::FlushDenormals flushed;  // see elementwise.h
      for (int64_t n = begin; n < end; ++n) {
        const T* g = row_ptr<T>(gate, n);
        const T* u = row_ptr<T>(up, n);
        T* o = row_mut<T>(out, n);
#pragma omp simd
        for (int64_t i = 0; i < width; ++i) {
          o[i] = silu_times<T>(widen(g[i]), widen(u[i]));
        }
      }
    });
  });
  return out;
}

// With s = sigmoid(gate): d up = grad * silu(gate),  d gate = grad * up * s * (1 + gate * (1 - s))
std::tuple<at::Tensor, at::Tensor> silu_mul_backward(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up) {
  check_rows(gate, "gate");
  check_gate_up(gate, up);
  check_same_rows(grad, gate, "grad");
  const int64_t width = gate.size(1);
  at::Tensor grad_gate = at::empty(gate.sizes(), gate.options());
  at::Tensor grad_up = at::empty(gate.sizes(), gate.options());
  by_dtype(gate, [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, gate.size(0), kRowsPerTask, [&](int64_t begin, int64_t end) {
      const llmrl::FlushDenormals flushed;  // see elementwise.h
      for (int64_t n = begin; n < end; ++n) {
        const T* d = row_ptr<T>(grad, n);
        const T* g = row_ptr<T>(gate, n);
        const T* u = row_ptr<T>(up, n);
        T* dg = row_mut<T>(grad_gate, n);
        T* du = row_mut<T>(grad_up, n);
#pragma omp simd
        for (int64_t i = 0; i < width; ++i) {
          const float v = widen(g[i]), upstream = widen(d[i]);
          const float s = 1.f / (1.f + exp_clamped(-v));
          du[i] = narrow<T>(upstream * as<T>(v * s));
          dg[i] = narrow<T>(upstream * widen(u[i]) * s * (1.f + v * (1.f - s)));
        }
      }
    });
  });
  return {grad_gate, grad_up};
}

// transformers' apply_rotary_pos_emb for one of q or k, x [B, H, T, D] (any strides, unit along
// D) with cos and sin [B, T, D] in x's dtype, as one pass: x * cos + rotate_half(x) * sin with each
// product and the sum rounded to the dtype. `backward` applies the transpose instead, the gradient
// that autograd takes through transformers' ops with the same roundings: for halves (g1, g2) of
// the upstream gradient, (g1 c1 + g2 s2, g2 c2 - g1 s1). The result has x's layout (empty_like):
// the one torch's elementwise ops give, so what reads it next sees the strides it saw before.
at::Tensor rotary_train(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1, "x must be [batch, heads, tokens, head size] with unit stride along the head size");
  const int64_t batch = x.size(0), heads = x.size(1), tokens = x.size(2), dim = x.size(3), half = dim / 2;
  TORCH_CHECK(dim % 2 == 0, "the head size must be even, got ", dim);
  for (const at::Tensor* t : {&cos, &sin}) {
    TORCH_CHECK(t->dim() == 3 && t->size(0) == batch && t->size(1) == tokens && t->size(2) == dim && t->is_contiguous(),
                "cos and sin must be contiguous [batch, tokens, head size] matching x");
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "cos and sin must have x's dtype");
  }
  at::Tensor out = at::empty_like(x);
  const int64_t sb = x.stride(0), sh = x.stride(1), st = x.stride(2);
  const int64_t ob = out.stride(0), oh = out.stride(1), ot = out.stride(2);
  by_dtype(x, [&](auto tag) {
    using T = decltype(tag);
    const T* in = x.data_ptr<T>();
    T* o = out.data_ptr<T>();
    const T* cos_all = cos.data_ptr<T>();
    const T* sin_all = sin.data_ptr<T>();
    at::parallel_for(0, batch * tokens, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / tokens, t = row % tokens;
        const T* c = cos_all + row * dim;
        const T* s = sin_all + row * dim;
        for (int64_t h = 0; h < heads; ++h) {
          const T* v = in + b * sb + h * sh + t * st;
          T* w = o + b * ob + h * oh + t * ot;
          if (backward) {
#pragma omp simd
            for (int64_t i = 0; i < half; ++i) {
              const float first = widen(v[i]), second = widen(v[i + half]);
              w[i] = narrow<T>(as<T>(first * widen(c[i])) + as<T>(second * widen(s[i + half])));
              w[i + half] = narrow<T>(as<T>(second * widen(c[i + half])) + as<T>(-(first * widen(s[i]))));
            }
          } else {
#pragma omp simd
            for (int64_t i = 0; i < half; ++i) {
              const float first = widen(v[i]), second = widen(v[i + half]);
              w[i] = narrow<T>(as<T>(first * widen(c[i])) + as<T>(-(second * widen(s[i]))));
              w[i + half] = narrow<T>(as<T>(second * widen(c[i + half])) + as<T>(first * widen(s[i + half])));
            }
          }
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmrl_kernels, m) {
  m.def("rms_norm_train(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_backward(Tensor grad, Tensor x, Tensor weight, Tensor inverse, bool weight_grad) -> (Tensor, Tensor)");
  m.def("silu_mul_train(Tensor gate, Tensor up) -> Tensor");
  m.def("silu_mul_backward(Tensor grad, Tensor gate, Tensor up) -> (Tensor, Tensor)");
  m.def("rotary_train(Tensor x, Tensor cos, Tensor sin, bool backward) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmrl_kernels, CPU, m) {
  m.impl("rms_norm_train", &rms_norm_train);
  m.impl("rms_norm_backward", &rms_norm_backward);
  m.impl("silu_mul_train", &silu_mul_train);
  m.impl("silu_mul_backward", &silu_mul_backward);
  m.impl("rotary_train", &rotary_train);
}

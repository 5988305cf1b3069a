// Scalar helpers shared by llmrl's elementwise kernels: dtype conversions that round as torch
// does, and an exp that gcc vectorises. Plain C++, so any CPU builds it.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

namespace llmrl {

inline float widen(float x) { return x; }
inline float widen(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;  // bf16 is the top half of an fp32
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// fp32 -> T, rounding to nearest even as torch's casts do
template <typename T>
inline T narrow(float f) {
  if constexpr (std::is_same_v<T, float>) {
    return f;
  } else {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    T out;
    out.x = static_cast<uint16_t>(f != f ? 0x7FC0u : rounded);  // NaN stays a NaN
    return out;
  }
}

// the value as the model's dtype holds it: a no-op for fp32, a bf16 rounding otherwise
template <typename T>
inline float as(float f) { return widen(narrow<T>(f)); }

// Rotary position embedding on one head of `dim` values in place, as transformers'
// apply_rotary_pos_emb: x * cos + rotate_half(x) * sin, each product and the sum rounded to T.
// cos and sin are the row's [dim] values in T.
template <typename T>
inline void rotate_head(T* head, const T* c, const T* s, int64_t dim) {
  const int64_t half = dim / 2;
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float first = widen(head[i]), second = widen(head[i + half]);
    head[i] = narrow<T>(as<T>(first * widen(c[i])) + as<T>(-second * widen(s[i])));
    head[i + half] = narrow<T>(as<T>(second * widen(c[i + half])) + as<T>(first * widen(s[i + half])));
  }
}

// a * b + c, rounded once (a fused multiply-add) when Fused, else twice, as the expression reads
template <bool Fused>
inline float multiply_add(float a, float b, float c) {
  if constexpr (Fused) {
    return __builtin_fmaf(a, b, c);
  } else {
    return a * b + c;
  }
}

// exp(x) for x in [-87, 88] (clamped there), by x = n ln2 + r, |r| <= ln2/2, a degree-7 Taylor
// polynomial in r (relative error below 2e-8) and 2^n built in the exponent bits. Branch-free,
// so that gcc vectorises the loops that call it. Fused: the steps as fused multiply-adds (the
// library compiles with -ffp-contract=off, so that the decode ops round as torch's do), for loops
// bound by their exps (the head pass's: 15 against 17-20 ms a chunk).
template <bool Fused = false>
inline float exp_clamped(float x) {
  x = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
  const float shifter = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = multiply_add<Fused>(x, 1.44269504088896341f, shifter) - shifter;
  float r = multiply_add<Fused>(n, -0.693359375f, x);  // ln2 in two parts, so that n * ln2_hi is exact
  r = multiply_add<Fused>(n, 2.12194440e-4f, r);
  float p = 1.f / 5040.f;
  p = multiply_add<Fused>(p, r, 1.f / 720.f);
  p = multiply_add<Fused>(p, r, 1.f / 120.f);
  p = multiply_add<Fused>(p, r, 1.f / 24.f);
  p = multiply_add<Fused>(p, r, 1.f / 6.f);
  p = multiply_add<Fused>(p, r, 0.5f);
  p = multiply_add<Fused>(p, r, 1.f);
  p = multiply_add<Fused>(p, r, 1.f);
  const int32_t exponent = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &exponent, sizeof scale);
  return p * scale;
}

// Subnormal results flushed to zero, and subnormal inputs read as zero, on this thread while the
// object lives (x86's MXCSR FTZ and DAZ bits; nothing elsewhere). Where exp_clamped's clamp makes
// a loop's result constant, gcc computes that constant branch for every lane and blends: for SiLU
// it divides each input by 1 + e^88, a subnormal for every lane, and each such vector took a
// microcode assist: SiLU of [1900, 1536] took 8.9 ms on one Zen 2 core, 3.3 ms flushed. Results
// that are normal numbers keep their bits; ones below 1.2e-38 become 0.
class FlushDenormals {
 public:
#if defined(__SSE__)
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040u); }
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  unsigned saved_;
#endif
};

}  // namespace llmrl

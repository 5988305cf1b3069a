// bf16 decode products x [M, K] @ weight.T on CPUs with AVX512-BF16, the weight read from memory
// while it is multiplied: the bf16 counterpart of panel_gemm.cpp (whose top says why), called by
// llmrl/rollout/packed_copies.py.
//
// The instruction is VDPBF16PS: for each of 16 fp32 sums it adds the products of one pair of bf16
// weights (two consecutive k of one output column) with one pair of bf16 inputs. So the layout
// keeps pairs together: the weight [N, K] as panels of 16 output columns, each panel ceil(K/2)
// lines of 64 bytes, line i holding k = 2i and 2i+1 of the 16 columns, column by column. Odd K is
// padded with a zero k; the last panel with zero columns. A block is 192 lines (12 KiB) of a panel,
// kept in L1 while every row block of x passes over it; each pass prefetches its share of the
// next block. Sums are fp32 throughout and rounded to bf16 once, at the end (round to nearest
// even, as torch rounds), bias added before the rounding.
#include <ATen/ops/zeros.h>

#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define LLMRL_BF16_PANELS 1
#else
#define LLMRL_BF16_PANELS 0
#endif

namespace {

constexpr int64_t kBf16Depth = 192;       // k pairs per block: 12 KiB of a panel
constexpr int64_t kBf16MaxRowBlock = 16;  // 16 sums + the weight line + broadcasts: within 32 registers
constexpr int64_t kBf16RowChunk = 128;    // rows whose sums for one panel (8 KiB) are kept between blocks

int64_t bf16_pairs(int64_t in_features) { return (in_features + 1) / 2; }

// Bytes of the bf16 panel copy of a weight [out_features, in_features]; -1 where this build has no kernel.
int64_t panel_bf16_bytes(int64_t out_features, int64_t in_features) {
  TORCH_CHECK(out_features > 0 && in_features > 0, "panel_bf16_bytes needs a non-empty weight, got [", out_features, ", ",
              in_features, "]");
  if (!LLMRL_BF16_PANELS) return -1;
  return panel_count(out_features) * bf16_pairs(in_features) * 64;
}

void check_bf16_panel_buffer(const at::Tensor& packed, int64_t out_features, int64_t in_features) {
  TORCH_CHECK(LLMRL_BF16_PANELS, "this build of llmrl's kernels has no bf16 panel product (it needs AVX512-BF16)");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.device().is_cpu() &&
                  packed.numel() >= panel_bf16_bytes(out_features, in_features),
              "packed must be a contiguous uint8 CPU buffer of at least panel_bf16_bytes(", out_features, ", ", in_features, ")");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(packed.data_ptr()) % 64 == 0, "packed must start on a 64-byte boundary");
}

// Writes a bf16 weight [N, K] into `packed` as pair-interleaved panels (see the top of this file).
void pack_panels_bf16_(const at::Tensor& packed, const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16 && weight.device().is_cpu(),
              "weight must be a bfloat16 [out_features, in_features] CPU tensor");
  const int64_t n = weight.size(0), k = weight.size(1), pairs = bf16_pairs(k);
  check_bf16_panel_buffer(packed, n, k);
  const at::Tensor w = weight.contiguous();
  const uint16_t* src = reinterpret_cast<const uint16_t*>(w.data_ptr());
  uint16_t* dst = reinterpret_cast<uint16_t*>(packed.data_ptr());
  at::parallel_for(0, panel_count(n), 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      uint16_t* panel = dst + p * pairs * kPanel * 2;
      for (int64_t j = 0; j < kPanel; ++j) {
        const int64_t column = p * kPanel + j;
        const uint16_t* row = column < n ? src + column * k : nullptr;
        for (int64_t i = 0; i < 2 * pairs; ++i)
          panel[(i / 2) * kPanel * 2 + j * 2 + (i % 2)] = (row != nullptr && i < k) ? row[i] : 0;  // 0 is +0.0 in bf16
      }
    }
  });
}

#if LLMRL_BF16_PANELS
// Row r of the block: the broadcast pair x[r, 2i..2i+1] times the weight line, into its sums.
#define LLMRL_BF16_ROW(r)                                                              \
  if constexpr (R > r) {                                                               \
    int32_t pair;                                                                      \
    std::memcpy(&pair, x + r * lda + 2 * i, sizeof(pair));                             \
    s##r = _mm512_dpbf16_ps(s##r, line, (__m512bh)_mm512_set1_epi32(pair));            \
  }
#define LLMRL_BF16_LOAD(r) \
  if constexpr (R > r) s##r = first ? _mm512_setzero_ps() : _mm512_load_ps(sums + r * kPanel);
#define LLMRL_BF16_STORE(r) \
  if constexpr (R > r) _mm512_store_ps(sums + r * kPanel, s##r);
#define LLMRL_BF16_EACH(step) step(0) step(1) step(2) step(3) step(4) step(5) step(6) step(7) step(8) step(9) step(10) step(11) step(12) step(13) step(14) step(15)

// Rows [0, R) of x (bf16, stride lda elements) times one block of a panel (depth lines), added to
// their fp32 sums in `sums` (stride 16; started from zero when `first`). Meanwhile it prefetches
// `lines` cache lines from `ahead`, its share of the next block. Named sums, as in panel_gemm.cpp.
template <int R>
inline void bf16_row_block(const uint16_t* __restrict x, int64_t lda, const uint16_t* __restrict panel, int64_t depth,
                           float* __restrict sums, bool first, const char* ahead, int64_t lines) {
  static_assert(R >= 1 && R <= kBf16MaxRowBlock, "row blocks hold 1 to 16 rows");
  __m512 s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15;
  LLMRL_BF16_EACH(LLMRL_BF16_LOAD)
  int64_t i = 0;
  const int64_t fetched = std::min(lines, depth);
#pragma GCC unroll 2
  for (; i < fetched; ++i) {
    _mm_prefetch(ahead + i * 64, _MM_HINT_T0);
    const __m512bh line = (__m512bh)_mm512_load_si512(panel + i * kPanel * 2);
    LLMRL_BF16_EACH(LLMRL_BF16_ROW)
  }
#pragma GCC unroll 4
  for (; i < depth; ++i) {
    const __m512bh line = (__m512bh)_mm512_load_si512(panel + i * kPanel * 2);
    LLMRL_BF16_EACH(LLMRL_BF16_ROW)
  }
  LLMRL_BF16_EACH(LLMRL_BF16_STORE)
}
#undef LLMRL_BF16_EACH
#undef LLMRL_BF16_STORE
#undef LLMRL_BF16_LOAD
#undef LLMRL_BF16_ROW

using Bf16RowBlock = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, float*, bool, const char*, int64_t);
constexpr Bf16RowBlock kBf16RowBlocks[kBf16MaxRowBlock + 1] = {
    nullptr, bf16_row_block<1>, bf16_row_block<2>, bf16_row_block<3>, bf16_row_block<4>, bf16_row_block<5>, bf16_row_block<6>,
    bf16_row_block<7>, bf16_row_block<8>, bf16_row_block<9>, bf16_row_block<10>, bf16_row_block<11>, bf16_row_block<12>, bf16_row_block<13>, bf16_row_block<14>, bf16_row_block<15>, bf16_row_block<16>};

// Rows [row0, row0 + m) of x times panel p (all its blocks), written to out as bf16 (+ bias).
void bf16_panel_rows(const uint16_t* a, int64_t lda, const uint16_t* w, int64_t pairs, int64_t p, int64_t last_panel,
                     int64_t row0, int64_t m, int64_t n, const float* bias, uint16_t* c) {
  alignas(64) float sums[kBf16RowChunk * kPanel];
  const int64_t row_blocks = (m + kBf16MaxRowBlock - 1) / kBf16MaxRowBlock;
  const int64_t columns = std::min(kPanel, n - p * kPanel);
  for (int64_t k0 = 0; k0 < pairs; k0 += kBf16Depth) {
    const int64_t depth = std::min(kBf16Depth, pairs - k0);
    const uint16_t* block = w + (p * pairs + k0) * kPanel * 2;
    const PrefetchPlan plan(w, pairs, p, last_panel, k0, depth, kBf16Depth, row_blocks);
    int64_t row = 0;
    for (int64_t b = 0; b < row_blocks; ++b) {
      const int64_t count = rows_in_block(m, row_blocks, b);
      kBf16RowBlocks[count](a + (row0 + row) * lda + 2 * k0, lda, block, depth, sums + row * kPanel, k0 == 0, plan.ahead(b),
                            plan.lines(b));
      row += count;
    }
  }
  const __mmask16 keep = (__mmask16)((1u << columns) - 1);
  const __m512 b = bias == nullptr ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(keep, bias + p * kPanel);
  for (int64_t r = 0; r < m; ++r) {
    const __m512 total = _mm512_add_ps(_mm512_load_ps(sums + r * kPanel), b);
    _mm256_mask_storeu_epi16(c + (row0 + r) * n + p * kPanel, keep, (__m256i)_mm512_cvtneps_pbh(total));
  }
}
#endif

// x [M, K] @ weight.T (+ bias), all bf16, weight in panels by pack_panels_bf16_. Any M is right;
// it is fast for decode's few dozen rows, where the weight is read once per call.
at::Tensor panel_linear_bf16(const at::Tensor& x, const at::Tensor& packed, int64_t out_features, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.device().is_cpu(), "x must be a bfloat16 [rows, in_features] CPU tensor");
  const int64_t m = x.size(0), k = x.size(1), n = out_features;
  check_bf16_panel_buffer(packed, n, k);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->scalar_type() == at::kBFloat16, "bias must be bfloat16 [", n, "]");
  at::Tensor out = at::empty({m, n}, x.options());
  if (m == 0) return out;
#if LLMRL_BF16_PANELS
  // The kernel reads x in pairs of k: an odd K gets a zero column, so the last pair reads nothing past the row.
  at::Tensor rows = x.contiguous();
  if (k % 2 != 0) {
    rows = at::zeros({m, k + 1}, x.options());
    rows.narrow(1, 0, k).copy_(x);
  }
  const at::Tensor bias_fp32 = has_bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const uint16_t* a = reinterpret_cast<const uint16_t*>(rows.data_ptr());
  const uint16_t* w = reinterpret_cast<const uint16_t*>(packed.data_ptr());
  uint16_t* c = reinterpret_cast<uint16_t*>(out.data_ptr());
  const float* bias_data = has_bias ? bias_fp32.data_ptr<float>() : nullptr;
  const int64_t pairs = bf16_pairs(k), lda = rows.size(1);
  at::parallel_for(0, panel_count(n), 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p)
      for (int64_t row0 = 0; row0 < m; row0 += kBf16RowChunk)
        bf16_panel_rows(a, lda, w, pairs, p, end - 1, row0, std::min(kBf16RowChunk, m - row0), n, bias_data, c);
  });
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmrl_kernels, m) {
  m.def("panel_bf16_bytes(int out_features, int in_features) -> int", &panel_bf16_bytes);
  m.def("pack_panels_bf16_(Tensor(a!) packed, Tensor weight) -> ()");
  m.def("panel_linear_bf16(Tensor x, Tensor packed, int out_features, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmrl_kernels, CPU, m) {
  m.impl("pack_panels_bf16_", &pack_panels_bf16_);
  m.impl("panel_linear_bf16", &panel_linear_bf16);
}

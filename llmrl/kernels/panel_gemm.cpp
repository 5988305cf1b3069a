// fp32 decode products x [M, K] @ weight.T for a few dozen rows, with the weight read from memory
// while it is multiplied (llmrl/rollout/packed_copies.py calls these).
//
// Why a product of our own: at the hf engine's 32 rows a decode step reads every weight once from
// memory (540 MB of fp32 for SmolLM2-135M) and does 64 FLOPs per 4-byte weight. With a weight
// warm in cache MKL's packed product runs at 170-190 GFLOP/s on 2 Zen 2 cores; with the weights
// streamed, as in decode, at about 145, and between the decode step's other operators at 125-148
// (docs/benchmarks.md). The cost is the first pass over each block of the weight, which waits on
// memory while the rest of the block's passes hit cache. Here every pass over a block asks for a
// share of the next block (software prefetch), so by the time the product reaches it, it is in cache.
//
// Layout: the weight [N, K] as panels of 16 output columns, each panel K rows of 16 floats (64
// bytes, one cache line) in k order; the last panel padded with zero columns. Blocks are 128 k of
// one panel (8 KiB), which stay in L1 while every row block of x passes over them.
//
// Only AVX2 with FMA (the kernel is written in its intrinsics); elsewhere `panel_bytes` says -1
// and the caller keeps MKL or torch.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LLMRL_PANELS 1
#else
#define LLMRL_PANELS 0
#endif

namespace {

constexpr int64_t kPanel = 16;      // output columns per panel: two AVX2 registers (fp32), one AVX-512 register of sums (bf16)
constexpr int64_t kDepth = 128;     // k per block: 8 KiB of a panel, with x's rows, fits L1
constexpr int64_t kMaxRowBlock = 6;  // 12 accumulators + 2 weight vectors + 1 broadcast: 15 of 16 registers

int64_t panel_count(int64_t out_features) { return (out_features + kPanel - 1) / kPanel; }

// Bytes of the panel copy of a weight [out_features, in_features]; -1 where this build has no kernel.
int64_t panel_bytes(int64_t out_features, int64_t in_features) {
  TORCH_CHECK(out_features > 0 && in_features > 0, "panel_bytes needs a non-empty weight, got [", out_features, ", ", in_features, "]");
  if (!LLMRL_PANELS) return -1;
  return panel_count(out_features) * in_features * kPanel * static_cast<int64_t>(sizeof(float));
}

void check_panel_buffer(const at::Tensor& packed, int64_t out_features, int64_t in_features) {
  TORCH_CHECK(LLMRL_PANELS, "this build of llmrl's kernels has no panel product (it needs AVX2 and FMA)");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.device().is_cpu() &&
                  packed.numel() >= panel_bytes(out_features, in_features),
              "packed must be a contiguous uint8 CPU buffer of at least panel_bytes(", out_features, ", ", in_features, ")");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(packed.data_ptr()) % 64 == 0, "packed must start on a 64-byte boundary");
}

// Writes weight [N, K] into `packed` as panels (see the top of this file).
void pack_panels_(const at::Tensor& packed, const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.device().is_cpu(),
              "weight must be a float32 [out_features, in_features] CPU tensor");
  const int64_t n = weight.size(0), k = weight.size(1);
  check_panel_buffer(packed, n, k);
  const at::Tensor w = weight.contiguous();
  const float* src = w.data_ptr<float>();
  float* dst = reinterpret_cast<float*>(packed.data_ptr());
  at::parallel_for(0, panel_count(n), 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      float* panel = dst + p * k * kPanel;
      for (int64_t j = 0; j < kPanel; ++j) {
        const int64_t column = p * kPanel + j;
        if (column < n) {
          const float* row = src + column * k;
          for (int64_t i = 0; i < k; ++i) panel[i * kPanel + j] = row[i];
        } else {
          for (int64_t i = 0; i < k; ++i) panel[i * kPanel + j] = 0.f;
        }
      }
    }
  });
}

// Where the passes over one block of a panel prefetch: the block the same thread multiplies next
// (the panel's next `block_lines`, else the first of the next panel it owns), split into equal
// shares, one per row block. Both panel layouts (fp32 and bf16) are lines of 64 bytes, one line
// per k (fp32) or pair of k (bf16), `panel_lines` lines a panel.
struct PrefetchPlan {
  const char* next = nullptr;
  int64_t next_lines = 0, share = 0;

  PrefetchPlan(const void* panels, int64_t panel_lines, int64_t p, int64_t last_panel, int64_t line0, int64_t depth,
               int64_t block_lines, int64_t row_blocks) {
    const char* base = static_cast<const char*>(panels);
    if (line0 + depth < panel_lines) {
      next = base + (p * panel_lines + line0 + depth) * 64;
      next_lines = std::min(block_lines, panel_lines - line0 - depth);
    } else if (p < last_panel) {
      next = base + (p + 1) * panel_lines * 64;
      next_lines = std::min(block_lines, panel_lines);
    }
    share = (next_lines + row_blocks - 1) / row_blocks;
  }
  // The first line row block b asks for, and how many.
  const char* ahead(int64_t b) const { return next == nullptr ? nullptr : next + std::min(b * share, next_lines) * 64; }
  int64_t lines(int64_t b) const { return std::min(share, next_lines - std::min(b * share, next_lines)); }
};

// Rows in row blocks as even as they come: block b of `blocks` over m rows.
inline int64_t rows_in_block(int64_t m, int64_t blocks, int64_t b) { return m / blocks + (b < m % blocks ? 1 : 0); }

#if LLMRL_PANELS
// Rows [0, R) of x (stride lda) times one block of a panel (depth k rows of 16), into out (stride
// ldo, `columns` of the 16 kept), added to what is there when `accumulate`. Meanwhile it prefetches
// `lines` cache lines from `ahead`, its share of the next block.
// One row of the block: its broadcast x value times the two weight vectors, into its two sums.
#define LLMRL_PANEL_ROW(r)                                           \
  if constexpr (R > r) {                                             \
    const __m256 v = _mm256_broadcast_ss(x + r * lda + i);           \
    s##r##a = _mm256_fmadd_ps(v, w0, s##r##a);                       \
    s##r##b = _mm256_fmadd_ps(v, w1, s##r##b);                       \
  }

// Rows [0, R) of x (stride lda) times one block of a panel (depth k rows of 16), into out (stride
// ldo, `columns` of the 16 kept), added to what is there when `accumulate`. Meanwhile it prefetches
// `lines` cache lines from `ahead`, its share of the next block. The sums are named variables, not
// an array: with an array gcc kept them on the stack and stored all twelve every k (90 against 150
// GFLOP/s).
template <int R>
inline void row_block(const float* __restrict x, int64_t lda, const float* __restrict panel, int64_t depth, float* __restrict out,
                      int64_t ldo, int64_t columns, bool accumulate, const char* ahead, int64_t lines) {
  static_assert(R >= 1 && R <= kMaxRowBlock, "row blocks hold 1 to 6 rows");
  __m256 s0a = _mm256_setzero_ps(), s0b = s0a, s1a = s0a, s1b = s0a, s2a = s0a, s2b = s0a;
  __m256 s3a = s0a, s3b = s0a, s4a = s0a, s4b = s0a, s5a = s0a, s5b = s0a;
  int64_t i = 0;
  const int64_t fetched = std::min(lines, depth);
#pragma GCC unroll 2
  for (; i < fetched; ++i) {
    _mm_prefetch(ahead + i * 64, _MM_HINT_T0);
    const __m256 w0 = _mm256_load_ps(panel + i * kPanel), w1 = _mm256_load_ps(panel + i * kPanel + 8);
    LLMRL_PANEL_ROW(0) LLMRL_PANEL_ROW(1) LLMRL_PANEL_ROW(2) LLMRL_PANEL_ROW(3) LLMRL_PANEL_ROW(4) LLMRL_PANEL_ROW(5)
  }
#pragma GCC unroll 4
  for (; i < depth; ++i) {
    const __m256 w0 = _mm256_load_ps(panel + i * kPanel), w1 = _mm256_load_ps(panel + i * kPanel + 8);
    LLMRL_PANEL_ROW(0) LLMRL_PANEL_ROW(1) LLMRL_PANEL_ROW(2) LLMRL_PANEL_ROW(3) LLMRL_PANEL_ROW(4) LLMRL_PANEL_ROW(5)
  }
  const __m256 sums[kMaxRowBlock][2] = {{s0a, s0b}, {s1a, s1b}, {s2a, s2b}, {s3a, s3b}, {s4a, s4b}, {s5a, s5b}};
  for (int r = 0; r < R; ++r) {
    float* o = out + r * ldo;
    __m256 lo = sums[r][0], hi = sums[r][1];
    if (columns == kPanel) {
      if (accumulate) {
        lo = _mm256_add_ps(lo, _mm256_loadu_ps(o));
        hi = _mm256_add_ps(hi, _mm256_loadu_ps(o + 8));
      }
      _mm256_storeu_ps(o, lo);
      _mm256_storeu_ps(o + 8, hi);
    } else {
      alignas(32) float partial[kPanel];
      _mm256_store_ps(partial, lo);
      _mm256_store_ps(partial + 8, hi);
      for (int64_t j = 0; j < columns; ++j) o[j] = accumulate ? o[j] + partial[j] : partial[j];
    }
  }
}
#undef LLMRL_PANEL_ROW
#endif

// x [M, K] @ weight.T (+ bias), weight in panels by pack_panels_. Any M is right; it is fast for
// decode's few dozen rows, where the weight is read once per call.
at::Tensor panel_linear(const at::Tensor& x, const at::Tensor& packed, int64_t out_features, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(), "x must be a float32 [rows, in_features] CPU tensor");
  const at::Tensor rows = x.contiguous();
  const int64_t m = rows.size(0), k = rows.size(1), n = out_features;
  check_panel_buffer(packed, n, k);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->scalar_type() == at::kFloat, "bias must be float32 [", n, "]");
  at::Tensor out = at::empty({m, n}, rows.options());
  if (m == 0) return out;
#if LLMRL_PANELS
  const float* a = rows.data_ptr<float>();
  const float* w = reinterpret_cast<const float*>(packed.data_ptr());
  float* c = out.data_ptr<float>();
  // rows in blocks of 5 or 6 (fewer only when M is): 10 or more independent sums per k keep both FMA units busy
  const int64_t row_blocks = (m + kMaxRowBlock - 1) / kMaxRowBlock;
  at::parallel_for(0, panel_count(n), 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t columns = std::min(kPanel, n - p * kPanel);
      for (int64_t k0 = 0; k0 < k; k0 += kDepth) {
        const int64_t depth = std::min(kDepth, k - k0);
        const float* block = w + (p * k + k0) * kPanel;
        const PrefetchPlan plan(w, k, p, end - 1, k0, depth, kDepth, row_blocks);
        int64_t row = 0;
        for (int64_t b = 0; b < row_blocks; ++b) {
          const int64_t count = rows_in_block(m, row_blocks, b);
          const char* ahead = plan.ahead(b);
          const int64_t lines = plan.lines(b);
          const float* xr = a + row * k + k0;
          float* o = c + row * n + p * kPanel;
          const bool accumulate = k0 > 0;
          switch (count) {
            case 6: row_block<6>(xr, k, block, depth, o, n, columns, accumulate, ahead, lines); break;
            case 5: row_block<5>(xr, k, block, depth, o, n, columns, accumulate, ahead, lines); break;
            case 4: row_block<4>(xr, k, block, depth, o, n, columns, accumulate, ahead, lines); break;
            case 3: row_block<3>(xr, k, block, depth, o, n, columns, accumulate, ahead, lines); break;
            case 2: row_block<2>(xr, k, block, depth, o, n, columns, accumulate, ahead, lines); break;
            default: row_block<1>(xr, k, block, depth, o, n, columns, accumulate, ahead, lines); break;
          }
          row += count;
        }
      }
    }
  });
#endif
  if (has_bias) out.add_(bias->unsqueeze(0));
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmrl_kernels, m) {
  m.def("panel_bytes(int out_features, int in_features) -> int", &panel_bytes);
  m.def("pack_panels_(Tensor(a!) packed, Tensor weight) -> ()");
  m.def("panel_linear(Tensor x, Tensor packed, int out_features, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmrl_kernels, CPU, m) {
  m.impl("pack_panels_", &pack_panels_);
  m.impl("panel_linear", &panel_linear);
}

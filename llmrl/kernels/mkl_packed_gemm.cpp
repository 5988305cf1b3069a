// MKL's packed GEMM for the hf engine's fp32 decode weights, with each packed copy in a memory
// mapping of its own that is packed again in place after every weight sync
// (llmrl/rollout/packed_copies.py calls these; panel_gemm.cpp uses its mapped_buffer too).
//
// Why not torch's own ops (torch.ops.mkl._mkl_reorder_linear_weight / _mkl_linear): their packed
// copy comes from malloc. In a process that also trains, glibc serves it from free chunks of the
// heap that the trainer's short-lived buffers left, so every sync's new set of copies landed
// between them, and the quickstart's resident size settled 1.9 GiB above the unpacked run's
// (docs/benchmarks.md). A mapping of our own is never part of the heap, and packing into the same
// one again allocates nothing.
//
// The CBLAS functions are found at run time in the torch library this process loaded, so the
// kernels still build and load against a torch without MKL; `mkl_packed_bytes` then says -1.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include <dlfcn.h>
#include <sys/mman.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>

namespace {

// MKL's CBLAS enumerators (mkl_cblas.h); torch's MKL is the LP64 one, so MKL_INT is int.
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kBMatrix = 162;

struct MklPackedGemm {
  size_t (*get_size)(int identifier, int m, int n, int k) = nullptr;
  void (*pack)(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float* src, int ld,
               float* dest) = nullptr;
  void (*compute)(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda, const float* b,
                  int ldb, float beta, float* c, int ldc) = nullptr;
  bool found() const { return get_size != nullptr && pack != nullptr && compute != nullptr; }
};

const MklPackedGemm& mkl() {
  static const MklPackedGemm functions = [] {
    MklPackedGemm f;
    // RTLD_NOLOAD: the library torch already loaded (this one links against it), never a second
    void* torch_cpu = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
    if (torch_cpu == nullptr) return f;
    f.get_size = reinterpret_cast<decltype(f.get_size)>(dlsym(torch_cpu, "cblas_sgemm_pack_get_size"));
    f.pack = reinterpret_cast<decltype(f.pack)>(dlsym(torch_cpu, "cblas_sgemm_pack"));
    f.compute = reinterpret_cast<decltype(f.compute)>(dlsym(torch_cpu, "cblas_sgemm_compute"));
    return f.found() ? f : MklPackedGemm{};
  }();
  return functions;
}

int checked_int(int64_t value, const char* name) {
  TORCH_CHECK(value > 0 && value <= INT32_MAX, name, " must be in [1, 2^31), got ", value);
  return static_cast<int>(value);
}

// Bytes of MKL's packed copy of a weight [out_features, in_features] for products of about
// `rows_hint` rows; -1 where this torch's MKL has no packed GEMM.
int64_t mkl_packed_bytes(int64_t rows_hint, int64_t out_features, int64_t in_features) {
  if (!mkl().found()) return -1;
  return static_cast<int64_t>(mkl().get_size(kBMatrix, checked_int(rows_hint, "rows_hint"),
                                             checked_int(out_features, "out_features"), checked_int(in_features, "in_features")));
}

// A uint8 tensor of `bytes` in an anonymous mapping of its own, unmapped when the tensor goes.
// Pages are taken as they are first written, so untouched padding costs no memory.
at::Tensor mapped_buffer(int64_t bytes) {
  TORCH_CHECK(bytes > 0, "bytes must be positive, got ", bytes);
  const size_t size = static_cast<size_t>(bytes);
  void* memory = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TORCH_CHECK(memory != MAP_FAILED, "mmap of ", bytes, " bytes failed: ", std::strerror(errno));
  return at::from_blob(memory, {bytes}, [size](void* p) { munmap(p, size); }, at::TensorOptions().dtype(at::kByte));
}

void check_weight_for_packing(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.scalar_type() == at::kFloat && weight.device().is_cpu(),
              "weight must be a contiguous float32 [out_features, in_features] CPU tensor");
}

// Packs weight [N, K] into `packed` (from mapped_buffer, at least mkl_packed_bytes long) as the B
// of x [M, K] @ weight.T.
void mkl_pack_(const at::Tensor& packed, const at::Tensor& weight, int64_t rows_hint) {
  TORCH_CHECK(mkl().found(), "this torch's MKL has no packed GEMM");
  check_weight_for_packing(weight);
  const int n = checked_int(weight.size(0), "out_features"), k = checked_int(weight.size(1), "in_features");
  const int m = checked_int(rows_hint, "rows_hint");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.numel() >= mkl_packed_bytes(m, n, k),
              "packed must be a contiguous uint8 buffer of at least mkl_packed_bytes(rows_hint, ", n, ", ", k, ")");
  mkl().pack(kRowMajor, kBMatrix, kTrans, m, n, k, 1.f, weight.data_ptr<float>(), k, reinterpret_cast<float*>(packed.data_ptr()));
}

// x [M, K] @ weight.T (+ bias) with weight packed by mkl_pack_. MKL's packed B does not depend on
// the row count it was packed for, so any M is served (tests/test_packed_linears.py checks 1 to
// 100 rows against float64).
at::Tensor mkl_packed_linear(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                             const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(mkl().found(), "this torch's MKL has no packed GEMM");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(), "x must be a float32 [rows, in_features] CPU tensor");
  const at::Tensor rows = x.contiguous();
  const int m = checked_int(rows.size(0), "rows"), k = checked_int(rows.size(1), "in_features");
  const int n = checked_int(out_features, "out_features");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.numel() >= mkl_packed_bytes(1, n, k), "packed is too small for [", n, ", ", k, "]");
  at::Tensor out = at::empty({m, n}, rows.options());
  float beta = 0.f;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->scalar_type() == at::kFloat, "bias must be float32 [", n, "]");
    out.copy_(bias->unsqueeze(0).expand({m, n}));
    beta = 1.f;  // C = x @ B + C, C starting as the bias
  }
  mkl().compute(kRowMajor, kNoTrans, kPacked, m, n, k, rows.data_ptr<float>(), k, reinterpret_cast<const float*>(packed.data_ptr()), k,
                beta, out.data_ptr<float>(), n);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmrl_kernels, m) {
  // no tensor argument to dispatch on: one kernel for every backend
  m.def("mkl_packed_bytes(int rows_hint, int out_features, int in_features) -> int", &mkl_packed_bytes);
  m.def("mapped_buffer(int bytes) -> Tensor", &mapped_buffer);
  m.def("mkl_pack_(Tensor(a!) packed, Tensor weight, int rows_hint) -> ()");
  m.def("mkl_packed_linear(Tensor x, Tensor packed, int out_features, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmrl_kernels, CPU, m) {
  m.impl("mkl_pack_", &mkl_pack_);
  m.impl("mkl_packed_linear", &mkl_packed_linear);
}

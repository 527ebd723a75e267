// A half-precision GEMM with a float32 output, for the fused-linear driver's weight gradient on CPU:
//
//   torch.ops.varkernels.gemm_f32(Tensor a, Tensor b, Tensor(a!) c, float alpha, float beta) -> ()
//     c = alpha · a @ b + beta · c
//     a [M, K], b [K, N]: both bfloat16 or both float16, each row-contiguous or the transpose of a
//     row-contiguous tensor (stride 1 in one of its two dims); c [M, N] float32 with stride(1) == 1.
//
// torch 2.13 has this GEMM only on CUDA (torch.addmm(..., out_dtype=torch.float32)); on CPU the
// driver had to upcast both operands to fp32 copies first. PyTorch's x86-64 builds link Intel MKL into
// libtorch_cpu, and MKL has exactly this GEMM: cblas_gemm_bf16bf16f32 / cblas_gemm_f16f16f32 (bf16 or
// fp16 products, fp32 sums, fp32 output; AMX / AVX512-BF16 kernels where the CPU has them). They are
// declared weak here: a PyTorch build without MKL (aarch64, a source build with another BLAS) still
// loads this extension, has_f32_gemm() answers false and the driver keeps its fp32-copy path.
//
// MKL's LP64 interface takes 32-bit sizes: the caller (varkernels/core/linear.py) only calls this when
// every size and leading dimension is below 2^31, and the checks below repeat that.
#include <torch/extension.h>

#include <climits>
#include <cstdint>

extern "C" {
// MKL's CBLAS prototypes (mkl_cblas.h, LP64: MKL_INT = int; MKL_BF16 / MKL_F16 = uint16_t)
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha, const uint16_t* a,
                            int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
void cblas_gemm_f16f16f32(int layout, int transa, int transb, int m, int n, int k, float alpha, const uint16_t* a,
                          int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
}

namespace varkernels {

namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;  // CBLAS_LAYOUT / CBLAS_TRANSPOSE values

bool fits_int(int64_t v) { return v >= 0 && v <= INT_MAX; }

// (transpose flag, leading dimension) of a 2-D operand in row-major CBLAS terms.
std::pair<int, int64_t> operand_layout(const at::Tensor& t, const char* name) {
  const int64_t rows = t.size(0), cols = t.size(1);
  if (t.stride(1) == 1 && t.stride(0) >= std::max<int64_t>(cols, 1)) return {kNoTrans, t.stride(0)};
  if (t.stride(0) == 1 && t.stride(1) >= std::max<int64_t>(rows, 1)) return {kTrans, t.stride(1)};
  TORCH_CHECK(false, "gemm_f32: ", name, " must be row-contiguous or the transpose of a row-contiguous tensor, got ",
              "shape ", t.sizes(), " strides ", t.strides());
}

}  // namespace

bool has_f32_gemm() { return cblas_gemm_bf16bf16f32 != nullptr && cblas_gemm_f16f16f32 != nullptr; }

void gemm_f32(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, double alpha, double beta) {
  TORCH_CHECK(has_f32_gemm(), "gemm_f32: this PyTorch build does not link MKL's half-precision GEMMs");
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu() && c.device().is_cpu(), "gemm_f32: CPU tensors only");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && c.dim() == 2, "gemm_f32: 2-D tensors only, got ", a.sizes(), ", ",
              b.sizes(), ", ", c.sizes());
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type() &&
                       (a.scalar_type() == at::kBFloat16 || a.scalar_type() == at::kHalf),
                   "gemm_f32: a and b must both be bfloat16 or both float16, got ", a.scalar_type(), " and ",
                   b.scalar_type());
  TORCH_CHECK_TYPE(c.scalar_type() == at::kFloat, "gemm_f32: c must be float32, got ", c.scalar_type());
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  TORCH_CHECK(b.size(0) == K && c.size(0) == M && c.size(1) == N, "gemm_f32: shapes do not chain: a ", a.sizes(),
              ", b ", b.sizes(), ", c ", c.sizes());
  if (M == 0 || N == 0) return;
  TORCH_CHECK(c.stride(1) == 1 && c.stride(0) >= N, "gemm_f32: c must have contiguous rows, got strides ",
              c.strides());
  if (K == 0) {  // an empty sum: c = beta · c
    if (beta == 0.0) c.zero_(); else if (beta != 1.0) c.mul_(beta);
    return;
  }
  const auto [ta, lda] = operand_layout(a, "a");
  const auto [tb, ldb] = operand_layout(b, "b");
  const int64_t ldc = c.stride(0);
  TORCH_CHECK(fits_int(M) && fits_int(N) && fits_int(K) && fits_int(lda) && fits_int(ldb) && fits_int(ldc),
              "gemm_f32: sizes and leading dimensions must be below 2^31 (MKL LP64)");
  auto* fn = a.scalar_type() == at::kBFloat16 ? cblas_gemm_bf16bf16f32 : cblas_gemm_f16f16f32;
  fn(kRowMajor, ta, tb, static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), static_cast<float>(alpha),
     static_cast<const uint16_t*>(a.data_ptr()), static_cast<int>(lda), static_cast<const uint16_t*>(b.data_ptr()),
     static_cast<int>(ldb), static_cast<float>(beta), c.data_ptr<float>(), static_cast<int>(ldc));
}

}  // namespace varkernels

TORCH_LIBRARY_FRAGMENT(varkernels, m) {
  m.def("gemm_f32(Tensor a, Tensor b, Tensor(a!) c, float alpha, float beta) -> ()");
}

TORCH_LIBRARY_IMPL(varkernels, CPU, m) { m.impl("gemm_f32", &varkernels::gemm_f32); }

// The CPU token kernel as a PyTorch operator (see var_cpu_kernel.h for the maths):
//
//   torch.ops.varkernels.token_cpu(
//       x [B,T,V] f32/bf16/f16 any strides, labels [B·T] int64/int32 contiguous,
//       coef [B·T] f32 | None, grad [B,T,V] | None (written; may be x itself), lse_in [B·T] f32 | None,
//       softcap: float | None, inv_temperature: float, ignore_index: int,
//       entropy [B·T] f32 | None = None (written: −Σ p·log p per row, 0 where ignored; not with lse_in))
//     -> (lp [B·T] f32, lse [B·T] f32)
//
// Registered with TORCH_LIBRARY_FRAGMENT (schema + CPU kernel), so torch.compile, export and fake
// tensors see an operator with a schema (its fake implementation is registered in Python, in
// varkernels/core/token.py). The pybind module only carries the instruction-set controls and the
// source hash the loader checks.
//
// The kernel for the CPU's instruction set (AVX512 / AVX2 / baseline, compiled side by side in
// var_cpu_isa_*.cpp) is picked at run time from ATen's CPU capability, so it honours
// ATEN_CPU_CAPABILITY=avx2|default like PyTorch's own kernels.
#include <torch/extension.h>

#include <ATen/MemoryOverlap.h>
#include <ATen/Version.h>

#include <string>

#include "var_cpu_args.h"

// Hash of csrc/ passed by the build (csrc_loader.extra_cflags) so the loader can tell a stale
// prebuilt binary from a current one.
#ifndef VARKERNELS_SOURCE_HASH
#define VARKERNELS_SOURCE_HASH unknown
#endif
#define VARKERNELS_STR_(x) #x
#define VARKERNELS_STR(x) VARKERNELS_STR_(x)

namespace varkernels {

bool has_f32_gemm();  // var_cpu_gemm.cpp

namespace DEFAULT {
void token_kernel(TokenArgs& a);
}
#if VARKERNELS_X86_DISPATCH
namespace AVX2 {
void token_kernel(TokenArgs& a);
}
namespace AVX512 {
void token_kernel(TokenArgs& a);
}
#endif

using KernelFn = void (*)(TokenArgs&);

namespace {

int capability_rank(const std::string& c) {
  if (c == "AVX512") return 2;
  if (c == "AVX2") return 1;
  return 0;
}

// -1: follow ATen's capability; else the rank chosen by set_capability (tests)
int g_forced_rank = -1;

int max_rank() {  // ATen decides once per process (CPU features, ATEN_CPU_CAPABILITY)
#if VARKERNELS_X86_DISPATCH
  static const int rank = capability_rank(at::get_cpu_capability());
  return rank;
#else
  return 0;
#endif
}

int active_rank() { return g_forced_rank >= 0 ? g_forced_rank : max_rank(); }

KernelFn kernel_for(int rank) {
#if VARKERNELS_X86_DISPATCH
  if (rank == 2) return &AVX512::token_kernel;
  if (rank == 1) return &AVX2::token_kernel;
#endif
  return &DEFAULT::token_kernel;
}

const char* rank_name(int rank) { return rank == 2 ? "AVX512" : rank == 1 ? "AVX2" : "DEFAULT"; }

FloatKind float_kind(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return FloatKind::F32;
    case at::kBFloat16: return FloatKind::BF16;
    case at::kHalf: return FloatKind::F16;
    default: TORCH_CHECK_TYPE(false, "token_op: ", name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

void check_row_vector(const at::Tensor& t, const char* name, int64_t N, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), "token_op: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "token_op: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.numel() == N && t.is_contiguous(), "token_op: ", name,
              " must be a contiguous [B*T] = [", N, "] tensor, got shape ", t.sizes(), " strides ", t.strides());
}

// Do the byte ranges spanned by two strided tensors intersect? (Exact overlap tests of strided
// views are hard; this is conservative: interleaved but disjoint views also count as intersecting.)
bool ranges_intersect(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  auto span = [](const at::Tensor& t) {
    int64_t extent = 1;
    for (int64_t d = 0; d < t.dim(); ++d) extent += (t.size(d) - 1) * t.stride(d);
    const char* lo = static_cast<const char*>(t.data_ptr());
    return std::make_pair(lo, lo + extent * static_cast<int64_t>(t.element_size()));
  };
  const auto [a0, a1] = span(a);
  const auto [b0, b1] = span(b);
  return a0 < b1 && b0 < a1;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> token_op(const at::Tensor& x, const at::Tensor& labels,
                                            const c10::optional<at::Tensor>& coef,
                                            const c10::optional<at::Tensor>& grad,
                                            const c10::optional<at::Tensor>& lse_in, c10::optional<double> softcap,
                                            double inv_temperature, int64_t ignore_index,
                                            const c10::optional<at::Tensor>& entropy) {
  TORCH_CHECK(x.device().is_cpu(), "token_op: x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 3, "token_op: x must have shape [B, T, V], got ", x.sizes());
  const int64_t B = x.size(0), T = x.size(1), V = x.size(2), N = B * T;
  TORCH_CHECK(V > 0, "token_op: x must have V > 0, got shape ", x.sizes());
  TORCH_CHECK(labels.device().is_cpu(), "token_op: labels must be a CPU tensor, got ", labels.device());
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt,
                   "token_op: labels must be int64 or int32, got ", labels.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.numel() == N && labels.is_contiguous(),
              "token_op: labels must be a contiguous [B*T] = [", N, "] tensor, got shape ", labels.sizes());
  TORCH_CHECK(!softcap.has_value() || *softcap > 0, "token_op: softcap must be > 0, got ", *softcap);
  TORCH_CHECK(std::isfinite(inv_temperature) && inv_temperature > 0,
              "token_op: inv_temperature must be finite and > 0, got ", inv_temperature);

  TokenArgs a{};
  a.x = x.data_ptr();
  a.x_kind = float_kind(x, "x");
  a.sxb = x.stride(0);
  a.sxt = x.stride(1);
  a.sxv = x.stride(2);
  a.labels = labels.data_ptr();
  a.labels_i32 = labels.scalar_type() == at::kInt;
  a.B = B;
  a.T = T;
  a.V = V;
  a.has_softcap = softcap.has_value();
  a.softcap = softcap.has_value() ? static_cast<float>(*softcap) : 1.f;
  a.inv_temperature = static_cast<float>(inv_temperature);
  a.ignore_index = ignore_index;

  if (lse_in.has_value()) {
    check_row_vector(*lse_in, "lse_in", N, at::kFloat);
    a.lse_in = lse_in->data_ptr<float>();
  }
  if (grad.has_value()) {
    const at::Tensor& g = *grad;
    TORCH_CHECK(g.device().is_cpu(), "token_op: grad must be a CPU tensor, got ", g.device());
    TORCH_CHECK(g.sizes() == x.sizes(), "token_op: grad must have the shape of x ", x.sizes(), ", got ", g.sizes());
    TORCH_CHECK(coef.has_value(), "token_op: coef is required when grad is given");
    check_row_vector(*coef, "coef", N, at::kFloat);
    TORCH_CHECK(at::has_internal_overlap(g) != at::MemOverlap::Yes,
                "token_op: grad has overlapping elements (e.g. an expanded tensor); it must be writable row by row");
    const bool same_view = g.data_ptr() == x.data_ptr() && g.strides() == x.strides() && g.dtype() == x.dtype();
    if (!same_view) {
      TORCH_CHECK(!ranges_intersect(x, g), "token_op: grad must be x itself (the same view, inplace) or memory "
                                           "disjoint from x; their address ranges intersect");
    }
    a.grad = g.data_ptr();
    a.g_kind = float_kind(g, "grad");
    a.sgb = g.stride(0);
    a.sgt = g.stride(1);
    a.sgv = g.stride(2);
    a.coef = coef->data_ptr<float>();
  }

  if (entropy.has_value()) {
    TORCH_CHECK(!lse_in.has_value(), "token_op: entropy is computed in the logsumexp sweep, which lse_in skips; "
                                     "pass one of them");
    check_row_vector(*entropy, "entropy", N, at::kFloat);
    a.entropy = entropy->data_ptr<float>();
  }

  at::Tensor lp = at::empty({N}, x.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({N}, x.options().dtype(at::kFloat));
  a.lp = lp.data_ptr<float>();
  a.lse = lse.data_ptr<float>();
  if (N > 0) kernel_for(active_rank())(a);
  TORCH_CHECK_INDEX(a.bad_row < 0, "token_op: labels[", a.bad_row, "] = ", a.bad_label, " is outside [0, V) = [0, ", V,
                    ") and is not ignore_index = ", ignore_index);
  return {lp, lse};
}

}  // namespace varkernels

TORCH_LIBRARY_FRAGMENT(varkernels, m) {
  m.def(
      "token_cpu(Tensor x, Tensor labels, Tensor? coef, Tensor(a!)? grad, Tensor? lse_in, float? softcap, "
      "float inv_temperature, int ignore_index, Tensor(b!)? entropy=None) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(varkernels, CPU, m) { m.impl("token_cpu", &varkernels::token_op); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "varkernels C++ CPU kernels (csrc/): controls of the token operator torch.ops.varkernels.token_cpu";
  m.def(
      "capability", []() { return std::string(varkernels::rank_name(varkernels::active_rank())); },
      "Instruction set of the kernel in use: AVX512, AVX2 or DEFAULT.");
  m.def(
      "set_capability",
      [](const std::string& name) {
        const int rank = name.empty() ? -1 : varkernels::capability_rank(name);
        TORCH_CHECK(name.empty() || name == "DEFAULT" || rank > 0, "set_capability: unknown capability '", name,
                    "' (AVX512, AVX2, DEFAULT, or '' for ATen's choice)");
        TORCH_CHECK(rank <= varkernels::max_rank(), "set_capability: ", name, " is above this CPU's capability ",
                    varkernels::rank_name(varkernels::max_rank()));
        varkernels::g_forced_rank = rank;
      },
      pybind11::arg("name"),
      "Force the kernel of a lower instruction set (for tests); '' restores ATen's choice. Not thread-safe.");
  m.def("has_f32_gemm", &varkernels::has_f32_gemm,
        "Whether torch.ops.varkernels.gemm_f32 (bf16/fp16 inputs, fp32 output; MKL) runs in this PyTorch build.");
  m.attr("source_hash") = VARKERNELS_STR(VARKERNELS_SOURCE_HASH);
}

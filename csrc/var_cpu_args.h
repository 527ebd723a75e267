// Plain-data arguments of the CPU token kernel, shared by the binding (var_cpu.cpp) and the
// per-ISA kernel translation units (var_cpu_isa_*.cpp). No ATen types here: the ISA units stay
// light and nothing inline is shared between code compiled for different instruction sets.
#pragma once

#include <cstdint>

// AVX2 / AVX-512 kernels are compiled next to the baseline one with GCC target pragmas; other
// compilers (clang, MSVC) and other architectures build the baseline kernel only.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VARKERNELS_X86_DISPATCH 1
#else
#define VARKERNELS_X86_DISPATCH 0
#endif

namespace varkernels {

enum class FloatKind : int { F32 = 0, BF16 = 1, F16 = 2 };

struct TokenArgs {
  // x: [B, T, V] logits, any strides (in elements)
  const void* x;
  FloatKind x_kind;
  int64_t sxb, sxt, sxv;
  // grad: [B, T, V] output (nullptr: no gradient); may be x itself (same view)
  void* grad;
  FloatKind g_kind;
  int64_t sgb, sgt, sgv;
  // per-row inputs, [N = B·T] contiguous
  const void* labels;  // int64, or int32 when labels_i32
  bool labels_i32;
  const float* coef;    // required when grad != nullptr
  const float* lse_in;  // nullptr: compute the logsumexp
  // per-row outputs, [N] fp32
  float* lp;
  float* lse;
  float* entropy;  // nullptr: no entropy (never with lse_in)
  // shapes and scalars
  int64_t B, T, V;
  bool has_softcap;
  float softcap;
  float inv_temperature;
  int64_t ignore_index;
  // set by the kernel: first row whose label is outside [0, V) (and not ignore_index), or -1
  int64_t bad_row;
  int64_t bad_label;
};

}  // namespace varkernels

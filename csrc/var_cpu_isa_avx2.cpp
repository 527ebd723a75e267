// Token kernel for AVX2 + FMA (ATen CPU capability AVX2), chosen at run time by var_cpu.cpp.
// Compiled with a target pragma instead of -mavx2, so the extension builds with the same flags
// everywhere and a binary built on one x86-64 machine runs on any other.
#include "var_cpu_args.h"
#if VARKERNELS_X86_DISPATCH
#include "var_cpu_isa_prelude.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
// In C++, GCC applies a target pragma to the generated code but not to the predefined ISA
// macros; sleef.h (ATen's vectorised math) declares its AVX entry points only under them.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "var_cpu_kernel.h"

namespace varkernels {
namespace AVX2 {
void token_kernel(TokenArgs& a) { token_kernel_impl(a); }
}  // namespace AVX2
}  // namespace varkernels
#pragma GCC pop_options
#endif

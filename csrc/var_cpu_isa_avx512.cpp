// Token kernel for AVX-512 F/BW/VL/DQ (ATen CPU capability AVX512), chosen at run time by
// var_cpu.cpp. Compiled with a target pragma instead of -mavx512f: see var_cpu_isa_avx2.cpp.
#include "var_cpu_args.h"
#if VARKERNELS_X86_DISPATCH
#include "var_cpu_isa_prelude.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
// In C++, GCC applies a target pragma to the generated code but not to the predefined ISA
// macros; sleef.h (ATen's vectorised math) declares its AVX entry points only under them.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "var_cpu_kernel.h"

namespace varkernels {
namespace AVX512 {
void token_kernel(TokenArgs& a) { token_kernel_impl(a); }
}  // namespace AVX512
}  // namespace varkernels
#pragma GCC pop_options
#endif

// Token kernel for the baseline instruction set (ATen CPU capability DEFAULT). It is also the
// first kernel unit in the link order (see setup.py / csrc_loader.py): any inline function that
// several units share is then taken from this baseline copy, never from an AVX copy.
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "var_cpu_kernel.h"

namespace varkernels {
namespace DEFAULT {
void token_kernel(TokenArgs& a) { token_kernel_impl(a); }
}  // namespace DEFAULT
}  // namespace varkernels

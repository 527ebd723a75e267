// Included first by the AVX kernel units, before their `#pragma GCC target`: the headers with
// inline code shared across units are parsed for the baseline instruction set, so the AVX
// units only add code in their own namespace (varkernels::<ISA>, at::vec::<ISA>). Nothing in
// those units has static data with a dynamic initialiser (it would run, with AVX instructions,
// on every machine at load time), and the target pragma is popped before the end of the unit.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/complex.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <immintrin.h>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

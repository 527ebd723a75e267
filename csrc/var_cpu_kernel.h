// CPU token kernel of varkernels (docs/design.md §3), one row of the vocabulary at a time:
//
//     z      = transform(x[n, :])                  softcap c·tanh(x/c), then ·(1/τ)     (fp32)
//     lse[n] = logsumexp(z)                        (or lse_in[n]: the sweep is skipped)
//     lp[n]  = z[y] − lse[n]
//     g[n,:] = coef[n]·(softmax(z) − onehot(y))·dz/dx          written in grad's dtype
//     H[n]   = −Σ_v p_v·log p_v = log S − A/S                   only when entropy is given
//
// In PyTorch: lp = z.log_softmax(-1).gather(-1, y); g = coef·(−d lp / dx). Ignored rows
// (y == ignore_index) give lp = lse = 0 and a zero gradient row.
//
// One read of x per row. The row is cut into blocks of kBlock floats (8 KiB, resident in L1):
//   sweep 1, per block: m_b = max(z_b); e_b = exp(z_b − m_b) stored in a per-thread fp32 row
//            buffer, s_b = Σ e_b; the running (M, S) absorb (m_b, s_b) — an online logsumexp
//            at block granularity, so every logit goes through exp exactly once.
//   sweep 2, per block: g_b = e_b·coef·exp(m_b − lse)·dz/dx from the row buffer (L2-resident:
//            4·V bytes), target entry in fp32, cast and stored to grad.
// With entropy, sweep 1 also sums a_b = Σ e_b·(z_b − m_b) (same exponentials) into A, shifted by the
// running max like S: H = lse − Σ p·z = log S − A/S, no value of the size of the logits subtracted.
// Sweep 2 never reads x, so grad may be x itself (inplace). With lse_in, one sweep: g = coef·
// exp(z − lse_in)·dz/dx block by block (each block is read before it is overwritten).
//
// This header is included once per instruction set by var_cpu_isa_*.cpp after CPU_CAPABILITY
// (DEFAULT / AVX2 / AVX512) is defined: everything lands in varkernels::<ISA>, like ATen's
// own vectorised kernels, and var_cpu.cpp picks one at run time from at::get_cpu_capability().
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "var_cpu_args.h"

namespace varkernels {
namespace CPU_CAPABILITY {

using Vec = at::vec::Vectorized<float>;
using IVec = at::vec::Vectorized<int32_t>;
constexpr int64_t kW = Vec::size();
constexpr int64_t kBlock = 2048;  // floats per block: 8 KiB, stays in L1 between max and exp
constexpr int64_t kRowsPerGrab = 4;  // rows a thread takes from the shared counter at a time
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// exp(x) for fp32 vectors, ~1 ulp, 14 vector operations inlined into the sweeps (ATen's
// Vectorized::exp is an out-of-line Sleef call, exp_u20 is ~20 ulp). x = n·ln2 + r, |r| ≤ ln2/2:
//   t = x·log2(e) + (1.5·2^23 + 127) rounds to an integer whose low mantissa bits are n + 127,
//   so t − (1.5·2^23 + 127) is n and (bits of t) << 23 is the fp32 2^n;
//   r = x − n·ln2 with ln2 split in two (Cody–Waite), e^r by its degree-7 Taylor polynomial
//   (truncation < 6e-9 relative, below half an ulp).
// x is clamped to [−88, 88.7228]: at −88, n = −127 and 2^n has a zero exponent field, i.e. the
// result is exactly 0 (so −inf → 0; true values there are denormals < 1.2e-38); at the top, n =
// 128 gives +inf. NaN stays NaN (the clamps return their first argument when it is NaN).
inline Vec vexp(const Vec& x) {
  const Vec magic(12582912.f + 127.f);  // 1.5·2^23 + exponent bias
  const Vec ln2_hi(0.693359375f);       // ln 2 = ln2_hi + ln2_lo, ln2_hi exact in 9 bits
  const Vec ln2_lo(-2.12194440e-4f);
  const Vec xc = at::vec::clamp_max(at::vec::clamp_min(x, Vec(-88.f)), Vec(88.72283935f));
  const Vec t = at::vec::fmadd(xc, Vec(1.44269504088896341f), magic);
  const Vec n = t - magic;
  Vec r = at::vec::fnmadd(n, ln2_hi, xc);
  r = at::vec::fnmadd(n, ln2_lo, r);
  Vec p = at::vec::fmadd(Vec(1.f / 5040.f), r, Vec(1.f / 720.f));
  p = at::vec::fmadd(p, r, Vec(1.f / 120.f));
  p = at::vec::fmadd(p, r, Vec(1.f / 24.f));
  p = at::vec::fmadd(p, r, Vec(1.f / 6.f));
  p = at::vec::fmadd(p, r, Vec(0.5f));
  p = at::vec::fmadd(p, r, Vec(1.f));
  p = at::vec::fmadd(p, r, Vec(1.f));
  const IVec pow2n = at::vec::cast<int32_t>(t) << IVec(23);
  return p * at::vec::cast<float>(pow2n);
}

// ---------------------------------------------------------------- loads and stores

inline float to_f32(float v) { return v; }
inline float to_f32(c10::BFloat16 v) { return static_cast<float>(v); }
inline float to_f32(c10::Half v) { return static_cast<float>(v); }

// kW contiguous values of a row as fp32
inline Vec load_full(const float* p) { return Vec::loadu(p); }
template <typename T>
inline Vec load_full(const T* p) {
  Vec out;
  at::vec::load_to_float<T>(p, out);
  return out;
}

// n ≤ kW values starting at element v of a row with stride sv, as fp32 (lanes ≥ n are 0)
template <typename T>
inline Vec load_part(const T* row, int64_t sv, int64_t v, int64_t n) {
  if (sv == 1 && n == kW) return load_full(row + v);
  float tmp[kW] = {};
  for (int64_t j = 0; j < n; ++j) tmp[j] = to_f32(row[(v + j) * sv]);
  return Vec::loadu(tmp);
}

// store n fp32 values of `src` to element v0 of a row with stride sv, in the row's dtype
template <typename T>
inline void store_row(const float* src, T* row, int64_t sv, int64_t v0, int64_t n) {
  if (sv == 1) {
    at::vec::convert(src, row + v0, n);
  } else {
    for (int64_t j = 0; j < n; ++j) row[(v0 + j) * sv] = static_cast<T>(src[j]);
  }
}
inline void store_row(const float* src, float* row, int64_t sv, int64_t v0, int64_t n) {
  if (sv == 1) {
    std::memcpy(row + v0, src, n * sizeof(float));
  } else {
    for (int64_t j = 0; j < n; ++j) row[(v0 + j) * sv] = src[j];
  }
}

template <typename T>
inline void zero_row(T* row, int64_t sv, int64_t V) {
  if (sv == 1) {
    std::memset(static_cast<void*>(row), 0, V * sizeof(T));  // all-zero bits are +0 in every float dtype
  } else {
    for (int64_t v = 0; v < V; ++v) row[v * sv] = T(0.f);
  }
}

// ---------------------------------------------------------------- block primitives

struct Transform {
  bool has_softcap;
  float softcap, inv_softcap, inv_temperature;
  bool identity() const { return !has_softcap && inv_temperature == 1.f; }
  // z = transform(x); t = tanh(x/c) (for dz/dx = (1 − t²)/τ) when softcap is on
  Vec apply(const Vec& x, Vec& t) const {
    Vec z = x;
    if (has_softcap) {
      t = (x * Vec(inv_softcap)).tanh();
      z = t * Vec(softcap);
    }
    if (inv_temperature != 1.f) z = z * Vec(inv_temperature);
    return z;
  }
};

// z of elements [v0, v0 + n) of a row into zout (and tanh(x/c) into tout when non-null)
template <typename T>
inline void fill_z(const T* row, int64_t sv, int64_t v0, int64_t n, const Transform& f, float* zout, float* tout) {
  for (int64_t i = 0; i < n; i += kW) {
    const int64_t m = std::min(kW, n - i);
    Vec t;
    Vec z = f.apply(load_part(row, sv, v0 + i, m), t);
    z.store(zout + i, m);
    if (tout) t.store(tout + i, m);
  }
}

// max of n values. A NaN may be dropped here (1-op max), but it still reaches the sum of the
// exponentials, so lse and lp come out NaN as in PyTorch.
inline float block_max(const float* p, int64_t n) {
  Vec m0(kNegInf), m1(kNegInf), m2(kNegInf), m3(kNegInf);
  int64_t i = 0;
  for (; i + 4 * kW <= n; i += 4 * kW) {
    m0 = at::vec::clamp_min(Vec::loadu(p + i), m0);
    m1 = at::vec::clamp_min(Vec::loadu(p + i + kW), m1);
    m2 = at::vec::clamp_min(Vec::loadu(p + i + 2 * kW), m2);
    m3 = at::vec::clamp_min(Vec::loadu(p + i + 3 * kW), m3);
  }
  for (; i < n; i += kW) {
    const int64_t m = std::min(kW, n - i);
    m0 = at::vec::clamp_min(Vec::set(Vec(kNegInf), Vec::loadu(p + i, m), m), m0);
  }
  m0 = at::vec::clamp_min(at::vec::clamp_min(m0, m1), at::vec::clamp_min(m2, m3));
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::clamp_min(a, b); }, m0);
}

// Σ of fp32 vectors with double accumulators. The block maximum contributes exp(0) = 1 to one
// lane; adding thousands of small terms to it in fp32 would round at ulp(1) each time, an error
// of ~1e-7 on log S, i.e. on lp, which fp32 log_softmax beats when p_y → 1 (lp → 0).
struct DoubleSum {
#if defined(CPU_CAPABILITY_AVX512)
  __m512d lo, hi;
  DoubleSum() : lo(_mm512_setzero_pd()), hi(_mm512_setzero_pd()) {}  // explicit: gets the target pragma
  void add(const Vec& v) {
    const __m512 x = v;
    lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(x)));
    hi = _mm512_add_pd(hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1))));
  }
  double total() const { return _mm512_reduce_add_pd(_mm512_add_pd(lo, hi)); }
#elif defined(CPU_CAPABILITY_AVX2)
  __m256d lo, hi;
  DoubleSum() : lo(_mm256_setzero_pd()), hi(_mm256_setzero_pd()) {}
  void add(const Vec& v) {
    const __m256 x = v;
    lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(x)));
    hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)));
  }
  double total() const {
    double out[4];
    _mm256_storeu_pd(out, _mm256_add_pd(lo, hi));
    return (out[0] + out[1]) + (out[2] + out[3]);
  }
#else
  double acc[kW] = {};
  void add(const Vec& v) {
    float tmp[kW];
    v.store(tmp);
    for (int64_t j = 0; j < kW; ++j) acc[j] += tmp[j];
  }
  double total() const {
    double s = 0.0;
    for (int64_t j = 0; j < kW; ++j) s += acc[j];
    return s;
  }
#endif
};

// Σ exp(p − m) over n values; the exponentials go to out (which may be p) when non-null. kEntropy adds
// the entropy term *a = Σ exp(p − m)·(p − m) (in double), from the same loop, the same sums in the same
// order (lse and lp are bitwise the same). There d = p − m is clamped at −88, where vexp clamps it too
// (so e is bitwise the same) and e is exactly 0: a −inf logit adds 0, not 0·−inf.
template <bool kEntropy>
inline double block_exp_sum_impl(const float* p, float m, int64_t n, float* out, double* a) {
  const Vec vm(m), lo(-88.f);
  const auto diff = [&](const Vec& x) { return kEntropy ? at::vec::clamp_min(x - vm, lo) : x - vm; };
  DoubleSum s0, s1, a0;
  int64_t i = 0;
  for (; i + 4 * kW <= n; i += 4 * kW) {  // four independent exp chains in flight
    const Vec d0 = diff(Vec::loadu(p + i));
    const Vec d1 = diff(Vec::loadu(p + i + kW));
    const Vec d2 = diff(Vec::loadu(p + i + 2 * kW));
    const Vec d3 = diff(Vec::loadu(p + i + 3 * kW));
    Vec e0 = vexp(d0);
    Vec e1 = vexp(d1);
    Vec e2 = vexp(d2);
    Vec e3 = vexp(d3);
    if (out) {
      e0.store(out + i);
      e1.store(out + i + kW);
      e2.store(out + i + 2 * kW);
      e3.store(out + i + 3 * kW);
    }
    s0.add(e0 + e1);
    s1.add(e2 + e3);
    if constexpr (kEntropy) a0.add(at::vec::fmadd(e0, d0, e1 * d1) + at::vec::fmadd(e2, d2, e3 * d3));
  }
  for (; i < n; i += kW) {
    const int64_t r = std::min(kW, n - i);
    const Vec x = Vec::loadu(p + i, r);  // read before out, which may be p, is written
    Vec e = Vec::set(Vec(0.f), vexp(x - vm), r);
    if (out) e.store(out + i, r);
    s0.add(e);
    if constexpr (kEntropy) a0.add(e * Vec::set(Vec(0.f), diff(x), r));
  }
  if constexpr (kEntropy) *a = a0.total();
  return s0.total() + s1.total();
}

inline double block_exp_sum(const float* p, float m, int64_t n, float* out) {
  return block_exp_sum_impl<false>(p, m, n, out, nullptr);
}

inline double block_exp_sum_ent(const float* p, float m, int64_t n, float* out, double* a) {
  return block_exp_sum_impl<true>(p, m, n, out, a);
}

// out[i] = e[i]·scale (·(1 − t[i]²) when t is non-null), n values; out may be e
inline void block_scale(const float* e, const float* t, float scale, int64_t n, float* out) {
  const Vec vs(scale);
  for (int64_t i = 0; i < n; i += kW) {
    const int64_t r = std::min(kW, n - i);
    Vec g = Vec::loadu(e + i, r) * vs;
    if (t) {
      Vec tv = Vec::loadu(t + i, r);
      g = g * (Vec(1.f) - tv * tv);
    }
    g.store(out + i, r);
  }
}

// out[i] = exp(z[i] − lse)·scale (·(1 − t[i]²)), n values (the lse_in sweep); out may be z
inline void block_exp_scale(const float* z, const float* t, float lse, float scale, int64_t n, float* out) {
  const Vec vl(lse), vs(scale);
  for (int64_t i = 0; i < n; i += kW) {
    const int64_t r = std::min(kW, n - i);
    Vec g = vexp(Vec::loadu(z + i, r) - vl) * vs;
    if (t) {
      Vec tv = Vec::loadu(t + i, r);
      g = g * (Vec(1.f) - tv * tv);
    }
    g.store(out + i, r);
  }
}

// dst[0:n] = src[0:n] with non-temporal (streaming) stores: for a gradient buffer that is not x, whose
// lines are not in cache, a plain store first reads every line from memory (read for ownership), one
// extra DRAM read of the whole [B, T, V] gradient; streaming stores write it without reading it.
// AVX-512 writes whole 64-byte lines; SSE's 16-byte form is in every x86-64 instruction set. The caller
// issues the store fence.
inline void stream_row(const float* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX512)  // whole 64-byte lines per store
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 63) != 0; ++i) dst[i] = src[i];
  for (; i + 16 <= n; i += 16) _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
#elif defined(__SSE2__)
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 15) != 0; ++i) dst[i] = src[i];
  for (; i + 4 <= n; i += 4) _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
#endif
  for (; i < n; ++i) dst[i] = src[i];
}

inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// ---------------------------------------------------------------- one row

struct Scratch {
  std::vector<float> z, t, m;  // row buffer (z or e), tanh row (softcap), block maxima
  Scratch(int64_t V, bool need_t) : z(V + kW), t(need_t ? V + kW : 0), m((V + kBlock - 1) / kBlock) {}
};

template <typename T, typename G>
void token_row(const TokenArgs& a, const Transform& f, int64_t n, int64_t y, Scratch& s) {
  const int64_t V = a.V;
  const int64_t b = n / a.T, tt = n % a.T;
  const T* xrow = static_cast<const T*>(a.x) + b * a.sxb + tt * a.sxt;
  G* grow = a.grad ? static_cast<G*>(a.grad) + b * a.sgb + tt * a.sgt : nullptr;
  const bool has_grad = grow != nullptr;
  // fp32 logits with unit stride and no transform are read in place; otherwise z is built in s.z
  const bool direct = std::is_same<T, float>::value && a.sxv == 1 && f.identity();
  float* tbuf = (has_grad && f.has_softcap) ? s.t.data() : nullptr;
  float zy = 0.f;
  double lse = 0.0;  // kept in double for sweep 2: exp(m_b − lse) then carries no rounding of lse

  if (a.lse_in) {
    lse = a.lse_in[n];
    Vec t;
    float tmp[kW];
    f.apply(load_part(xrow, a.sxv, y, 1), t).store(tmp);
    zy = tmp[0];
    a.lp[n] = static_cast<float>(zy - lse);
  } else {
    // sweep 1: online logsumexp over blocks; e_b = exp(z_b − m_b) kept in s.z when has_grad
    double M = -std::numeric_limits<double>::infinity(), S = 0.0;
    double A = 0.0;  // entropy: Σ e^(z − M)·(z − M), rescaled with S
    for (int64_t v0 = 0, k = 0; v0 < V; v0 += kBlock, ++k) {
      const int64_t len = std::min(kBlock, V - v0);
      const float* zb;
      if (direct) {
        zb = reinterpret_cast<const float*>(xrow) + v0;
      } else {
        fill_z(xrow, a.sxv, v0, len, f, s.z.data() + v0, tbuf ? tbuf + v0 : nullptr);
        zb = s.z.data() + v0;
      }
      if (y >= v0 && y < v0 + len) zy = zb[y - v0];
      const float mb = block_max(zb, len);
      s.m[k] = mb;
      if (mb == kNegInf) {  // a block of −inf logits (e.g. masked vocabulary) adds nothing
        if (has_grad) std::fill(s.z.data() + v0, s.z.data() + v0 + len, 0.f);
        continue;
      }
      if (a.entropy) {
        double ab;
        const double sb = block_exp_sum_ent(zb, mb, len, has_grad ? s.z.data() + v0 : nullptr, &ab);
        if (mb > M) {  // shift A from M to mb: e^(M − mb)·(A + (M − mb)·S); nothing to shift while S = 0
          const double r = std::exp(M - mb);
          A = (S > 0.0 ? (A + (M - mb) * S) * r : 0.0) + ab;
          S = S * r + sb;
          M = mb;
        } else {
          const double r = std::exp(double(mb) - M);
          A += (ab + (double(mb) - M) * sb) * r;
          S += sb * r;
        }
        continue;
      }
      const double sb = block_exp_sum(zb, mb, len, has_grad ? s.z.data() + v0 : nullptr);
      if (mb > M) {
        S = S * std::exp(M - mb) + sb;
        M = mb;
      } else {
        S += sb * std::exp(double(mb) - M);
      }
    }
    const double log_s = std::log(S);
    lse = M + log_s;
    if (a.entropy) a.entropy[n] = static_cast<float>(log_s - A / S);
    // lp = (z_y − M) − log S, not z_y − lse: no cancellation between two rounded values of the
    // size of the logits when the target dominates (p_y → 1, lp → 0)
    a.lp[n] = static_cast<float>((double(zy) - M) - log_s);
  }
  a.lse[n] = static_cast<float>(lse);
  if (!has_grad) return;

  // sweep 2: g = coef·(softmax − onehot)·dz/dx; dz/dx = (1 − t²)/τ with softcap, else 1/τ.
  // fp32 grad with unit stride is written directly; otherwise the block is built in fp32 in the
  // row buffer and then cast / scattered.
  const bool direct_g = std::is_same<G, float>::value && a.sgv == 1;
  // fp32 unit-stride grad that is not x: built in the row buffer, then streamed (stream_row)
  const bool stream_g = direct_g && a.grad != a.x;
  const float coef = a.coef[n];
  const float dscale = coef * a.inv_temperature;
  for (int64_t v0 = 0, k = 0; v0 < V; v0 += kBlock, ++k) {
    const int64_t len = std::min(kBlock, V - v0);
    float* sb = s.z.data() + v0;  // row buffer block: e_b (sweep 1) or z_b (lse_in)
    float* gb = direct_g && !stream_g ? reinterpret_cast<float*>(grow) + v0 : sb;
    float* tb = tbuf ? tbuf + v0 : nullptr;
    const bool has_y = y >= v0 && y < v0 + len;
    // dz/dx at the target; tb holds this block's tanh(x/c) once sweep 1 or fill_z has run
    auto dzy = [&] { return tb ? (1.f - tb[y - v0] * tb[y - v0]) * a.inv_temperature : a.inv_temperature; };
    float gy = 0.f;  // target entry, in fp32: coef·(p_y − 1)·dz_y/dx
    if (a.lse_in) {
      const float* zb = sb;
      if (direct) {
        zb = reinterpret_cast<const float*>(xrow) + v0;  // may be gb itself (inplace): elementwise
      } else {
        fill_z(xrow, a.sxv, v0, len, f, sb, tb);
      }
      if (has_y) gy = coef * (static_cast<float>(std::exp(double(zy) - lse)) - 1.f) * dzy();
      block_exp_scale(zb, tb, static_cast<float>(lse), dscale, len, gb);
    } else {
      const float pk = static_cast<float>(std::exp(double(s.m[k]) - lse));  // softmax = e_b·pk (0 for a −inf block)
      if (has_y) gy = coef * (sb[y - v0] * pk - 1.f) * dzy();
      block_scale(sb, tb, pk * dscale, len, gb);
    }
    if (has_y) gb[y - v0] = gy;
    if (stream_g) {
      stream_row(gb, reinterpret_cast<float*>(grow) + v0, len);
    } else if (!direct_g) {
      store_row(gb, grow, a.sgv, v0, len);
    }
  }
}

template <typename T, typename G>
void token_rows(TokenArgs& a) {
  const int64_t N = a.B * a.T;
  Transform f{a.has_softcap, a.softcap, a.has_softcap ? 1.f / a.softcap : 1.f, a.inv_temperature};
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> bad{N};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (N + kRowsPerGrab - 1) / kRowsPerGrab));
  // Rows are handed out from a shared counter (ignored rows cost almost nothing, so a static
  // split would leave a thread idle); each row's result depends only on the row: deterministic.
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    Scratch s(a.V, a.grad != nullptr && a.has_softcap);
    for (;;) {
      const int64_t r0 = next.fetch_add(kRowsPerGrab);
      if (r0 >= N) break;
      for (int64_t n = r0; n < std::min(N, r0 + kRowsPerGrab); ++n) {
        const int64_t y = a.labels_i32 ? static_cast<const int32_t*>(a.labels)[n] : static_cast<const int64_t*>(a.labels)[n];
        if (y == a.ignore_index || y < 0 || y >= a.V) {
          if (y != a.ignore_index) {
            int64_t cur = bad.load();
            while (n < cur && !bad.compare_exchange_weak(cur, n)) {
            }
          }
          a.lp[n] = 0.f;
          a.lse[n] = 0.f;
          if (a.entropy) a.entropy[n] = 0.f;
          if (a.grad) {
            const int64_t b = n / a.T, tt = n % a.T;
            zero_row(static_cast<G*>(a.grad) + b * a.sgb + tt * a.sgt, a.sgv, a.V);
          }
          continue;
        }
        token_row<T, G>(a, f, n, y, s);
      }
    }
    stream_fence();  // this thread's streaming stores are visible before parallel_for returns
  });
  if (bad.load() < N) {
    a.bad_row = bad.load();
    a.bad_label = a.labels_i32 ? static_cast<const int32_t*>(a.labels)[a.bad_row]
                               : static_cast<const int64_t*>(a.labels)[a.bad_row];
  }
}

template <typename T>
void token_dispatch_grad(TokenArgs& a) {
  switch (a.g_kind) {
    case FloatKind::F32: return token_rows<T, float>(a);
    case FloatKind::BF16: return token_rows<T, c10::BFloat16>(a);
    case FloatKind::F16: return token_rows<T, c10::Half>(a);
  }
}

inline void token_kernel_impl(TokenArgs& a) {
  a.bad_row = -1;
  a.bad_label = 0;
  if (!a.grad) a.g_kind = a.x_kind;  // one instantiation per x dtype when no gradient is written
  switch (a.x_kind) {
    case FloatKind::F32: return token_dispatch_grad<float>(a);
    case FloatKind::BF16: return token_dispatch_grad<c10::BFloat16>(a);
    case FloatKind::F16: return token_dispatch_grad<c10::Half>(a);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace varkernels

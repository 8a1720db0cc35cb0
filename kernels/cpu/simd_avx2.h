// ntfast — hand-vectorized AVX2/FMA rows of the CPU fused CNN kernel (f32), included by
// fused_cnn_impl.h in the AVX2 translation unit only. Definition of every number:
// ntfast/ops/nonlin.py (the auto-vectorized fused_math.h formulas are the portable version).
//
// Why by hand. The ReLU-family (abrelu) expectation was most of the kernel's time (~60% of
// CNN-GAP-8, 1 thread, perf). Auto-vectorized from fused_math.h it costs 3 divisions and a
// square root per entry (Gram normalization 1/m, the atan2 quotient, Cephes' P/Q). Here:
//   * normalization by 2^-e, e the exponent of m = max(q11, q22): two integer ops, exact (no
//     rounding), skipped altogether (NORM = false) where the caller knows it changes no bit;
//   * det = a·b − c² by Kahan's 2×2 determinant (FMA error term): accurate for nearly parallel
//     inputs and exactly 0 for parallel ones (the diagonal: θ = 0, as in the portable formula);
//   * atan on [0, 1] without range reduction: a degree-8 polynomial in z = t² fitted to atan(t)/t
//     on z ∈ [0, 1] (least squares reweighted towards the minimax error, Lawson; max error
//     5.8e-9, f32 evaluation error ≤ 1.1e-7 absolute; tests/native check the rows against the
//     f64 formula), so one division (t = min/max) and one square root (√det) remain;
//   * the angle's quadrant from selects, π − θ via the sign bit of c (`vblendvps`).
// At the origin (sn = c = 0), `big` = sn ≥ |c| holds and t = 0, so θ = π/2 (NT's convention).
#pragma once

#include <immintrin.h>

#include <cfloat>

namespace ntf {
namespace cpu {
namespace simd {

// atan(t)/t ≈ Σ_k kAtanP[k] z^k, z = t², t ∈ [0, 1] (least-max-error fit, degree 8).
constexpr float kAtanP[9] = {0.9999998863930583f,  -0.3333259707110758f, 0.19985907351314375f,
                             -0.14161232894398024f, 0.10498958692638151f, -0.0723488196865263f,
                             0.03978149798801156f,  -0.014401520711669849f,
                             0.0024567643908803005f};

// abrelu expectation of U×8 entries: nngp = f·k1 + ab·q12, dot = f·k0 + ab (fused_math.h).
// The U vectors go through each stage together (independent dependency chains side by side:
// one chain is ~100 cycles of latency and fills the FP scheduler on its own).
// PLAIN: ReLU itself (a = 0, b = 1: f = 1, ab = 0), three multiplies fewer per vector.
// NORM: normalize by the exponent of m (below). Without (callers guarantee every nonzero q11,
// q22 in [2^-30, 2^30], fused_cnn_impl.h `map_safe`), the same formulas on the raw entries: the
// normalization is an exact power-of-two scaling, so with no intermediate under/overflow (products
// within 2^±60, det above 2^-107) the results are the same bits, for 8 operations fewer.
template <int U, bool PLAIN, bool NORM>
inline void abrelu8(const __m256* q12, const __m256* q11, const __m256* q22, __m256 f, __m256 ab,
                    __m256* nngp, __m256* dot) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 pi = _mm256_set1_ps(3.14159265358979323846f);
  const __m256 half_pi = _mm256_set1_ps(1.57079632679489661923f);
  const __m256 inv2pi = _mm256_set1_ps(0.15915494309189533577f);
  const __m256 tiny = _mm256_set1_ps(FLT_MIN);
  __m256 scale[U], c[U], sn[U], t[U], at[U];
  for (int u = 0; u < U && !NORM; ++u) {
    c[u] = q12[u];
    scale[u] = _mm256_set1_ps(1.0f);
    const __m256 cc = _mm256_mul_ps(c[u], c[u]);
    const __m256 e = _mm256_fmsub_ps(c[u], c[u], cc);
    const __m256 det =
        _mm256_max_ps(_mm256_sub_ps(_mm256_fmsub_ps(q11[u], q22[u], cc), e), _mm256_setzero_ps());
    sn[u] = _mm256_sqrt_ps(det);
  }
  for (int u = 0; u < U && NORM; ++u) {
    // m = max(q11, q22) ≥ |q12| (a covariance: |q12| ≤ √(q11 q22), up to rounding).
    const __m256 m = _mm256_max_ps(q11[u], q22[u]);
    // Normalize by 2^-e, e = the exponent of m: exact scaling by two integer ops, so the
    // normalized a, b, c ∈ [0, 2] carry no rounding and on the diagonal stay bit-equal.
    // scale = 2^e multiplies k1 back. e is capped at 126 (finite inv); m = 0 or subnormal gives
    // scale = 0, inv = 2^127: the angle stays right and k1 (≤ m < FLT_MIN) flushes to 0.
    __m256i eb = _mm256_and_si256(_mm256_castps_si256(m), _mm256_set1_epi32(0x7f800000));
    eb = _mm256_min_epi32(eb, _mm256_set1_epi32(0x7e800000));
    const __m256 inv = _mm256_castsi256_ps(_mm256_sub_epi32(_mm256_set1_epi32(0x7f000000), eb));
    scale[u] = _mm256_castsi256_ps(eb);
    const __m256 a = _mm256_mul_ps(q11[u], inv);
    const __m256 b = _mm256_mul_ps(q22[u], inv);
    c[u] = _mm256_mul_ps(q12[u], inv);
    // det = a·b − c² by Kahan's 2×2 determinant: cc = fl(c²) and its exact rounding error
    // e = c² − cc (an FMA), det = fl(a·b − cc) − e. Accurate to a few ulps of det itself even
    // when a·b ≈ c² (nearly parallel inputs, where the naive difference keeps ~1e-7·ab of
    // noise and the angle θ ~ √det inherits it), and exactly 0 when a·b = c² (parallel
    // inputs, the diagonal).
    const __m256 cc = _mm256_mul_ps(c[u], c[u]);
    const __m256 e = _mm256_fmsub_ps(c[u], c[u], cc);
    const __m256 det =
        _mm256_max_ps(_mm256_sub_ps(_mm256_fmsub_ps(a, b, cc), e), _mm256_setzero_ps());
    sn[u] = _mm256_sqrt_ps(det);
  }
  __m256 big[U];
  for (int u = 0; u < U; ++u) {
    const __m256 ax = _mm256_and_ps(c[u], absmask);
    big[u] = _mm256_cmp_ps(sn[u], ax, _CMP_GE_OQ);
    const __m256 num = _mm256_min_ps(sn[u], ax);
    const __m256 den = _mm256_max_ps(_mm256_max_ps(sn[u], ax), tiny);
    t[u] = _mm256_div_ps(num, den);
  }
  for (int u = 0; u < U; ++u) {
    // Estrin's scheme: depth 5 instead of Horner's 8 dependent FMAs.
    const __m256 z = _mm256_mul_ps(t[u], t[u]);
    const __m256 z2 = _mm256_mul_ps(z, z);
    const __m256 z4 = _mm256_mul_ps(z2, z2);
    const __m256 z8 = _mm256_mul_ps(z4, z4);
#define NTF_C(k) _mm256_set1_ps(kAtanP[k])
    const __m256 e01 = _mm256_fmadd_ps(NTF_C(1), z, NTF_C(0));
    const __m256 e23 = _mm256_fmadd_ps(NTF_C(3), z, NTF_C(2));
    const __m256 e45 = _mm256_fmadd_ps(NTF_C(5), z, NTF_C(4));
    const __m256 e67 = _mm256_fmadd_ps(NTF_C(7), z, NTF_C(6));
    const __m256 f03 = _mm256_fmadd_ps(e23, z2, e01);
    const __m256 f47 = _mm256_fmadd_ps(e67, z2, e45);
    const __m256 g = _mm256_fmadd_ps(f47, z4, f03);
    const __m256 p = _mm256_fmadd_ps(NTF_C(8), z8, g);
#undef NTF_C
    at[u] = _mm256_mul_ps(t[u], p);
  }
  for (int u = 0; u < U; ++u) {
    const __m256 a1 = _mm256_blendv_ps(at[u], _mm256_sub_ps(half_pi, at[u]), big[u]);
    // θ = π − a1 where c < 0 (blendv reads the sign bit of c).
    const __m256 theta = _mm256_blendv_ps(a1, _mm256_sub_ps(pi, a1), c[u]);
    const __m256 pm = _mm256_sub_ps(pi, theta);
    const __m256 k0 = _mm256_mul_ps(pm, inv2pi);
    const __m256 k1 =
        NORM ? _mm256_mul_ps(_mm256_mul_ps(scale[u], _mm256_fmadd_ps(pm, c[u], sn[u])), inv2pi)
             : _mm256_mul_ps(_mm256_fmadd_ps(pm, c[u], sn[u]), inv2pi);
    nngp[u] = PLAIN ? k1 : _mm256_fmadd_ps(f, k1, _mm256_mul_ps(ab, q12[u]));
    dot[u] = PLAIN ? k0 : _mm256_fmadd_ps(f, k0, ab);
  }
}

// One plane row of an abrelu step (fused_cnn_impl.h `nonlin_row`): dr ← nngp·mw,
// tr ← tr·dot·mw (TLIVE). ls is a multiple of 4: 16 entries per step (two independent 8-lane
// chains), then whole 8-lane vectors, then 4 entries in the low half of one (plain 128-bit
// loads/stores: masked vmaskmovps stores cost ~70 cycles per row tail). mw holds 0 or 1: the
// mask is applied as a bitwise AND (compare once, AND twice: off the multiply pipes, which the
// expectation itself saturates).
template <bool TLIVE, bool PLAIN, bool NORM>
inline void abrelu_row_t(float* __restrict__ dr, float* __restrict__ tr,
                         const float* __restrict__ q11, const float* __restrict__ q22,
                         const float* __restrict__ mw, int ls, float pa, float pb) {
  const __m256 f = _mm256_set1_ps((pa - pb) * (pa - pb));
  const __m256 ab = _mm256_set1_ps(pa * pb);
  const __m256 zero = _mm256_setzero_ps();
  int j = 0;
  constexpr int U = 2;
  for (; j + 8 * U <= ls; j += 8 * U) {
    __m256 x12[U], x11[U], x22[U], nn[U], dot[U];
    for (int u = 0; u < U; ++u) {
      x12[u] = _mm256_loadu_ps(dr + j + 8 * u);
      x11[u] = _mm256_loadu_ps(q11 + j + 8 * u);
      x22[u] = _mm256_loadu_ps(q22 + j + 8 * u);
    }
    abrelu8<U, PLAIN, NORM>(x12, x11, x22, f, ab, nn, dot);
    for (int u = 0; u < U; ++u) {
      const __m256 m = _mm256_cmp_ps(_mm256_loadu_ps(mw + j + 8 * u), zero, _CMP_NEQ_UQ);
      _mm256_storeu_ps(dr + j + 8 * u, _mm256_and_ps(nn[u], m));
      if (TLIVE)
        _mm256_storeu_ps(tr + j + 8 * u,
                         _mm256_and_ps(_mm256_mul_ps(_mm256_loadu_ps(tr + j + 8 * u), dot[u]), m));
    }
  }
  for (; j < ls; j += 8) {
    const bool half = j + 8 > ls;
    auto load = [&](const float* p) {
      return half ? _mm256_zextps128_ps256(_mm_loadu_ps(p)) : _mm256_loadu_ps(p);
    };
    auto store = [&](float* p, __m256 v) {
      if (half)
        _mm_storeu_ps(p, _mm256_castps256_ps128(v));
      else
        _mm256_storeu_ps(p, v);
    };
    __m256 x12 = load(dr + j), x11 = load(q11 + j), x22 = load(q22 + j), nn, dot;
    abrelu8<1, PLAIN, NORM>(&x12, &x11, &x22, f, ab, &nn, &dot);
    const __m256 m = _mm256_cmp_ps(load(mw + j), zero, _CMP_NEQ_UQ);
    store(dr + j, _mm256_and_ps(nn, m));
    if (TLIVE) store(tr + j, _mm256_and_ps(_mm256_mul_ps(load(tr + j), dot), m));
  }
}

// norm: false only where both variance maps are map_safe (see abrelu8).
template <bool TLIVE>
inline void abrelu_row(float* __restrict__ dr, float* __restrict__ tr,
                       const float* __restrict__ q11, const float* __restrict__ q22,
                       const float* __restrict__ mw, int ls, float pa, float pb, bool norm) {
  const bool plain = pa == 0.0f && pb == 1.0f;
  if (norm) {
    if (plain)
      abrelu_row_t<TLIVE, true, true>(dr, tr, q11, q22, mw, ls, pa, pb);
    else
      abrelu_row_t<TLIVE, false, true>(dr, tr, q11, q22, mw, ls, pa, pb);
  } else {
    if (plain)
      abrelu_row_t<TLIVE, true, false>(dr, tr, q11, q22, mw, ls, pa, pb);
    else
      abrelu_row_t<TLIVE, false, false>(dr, tr, q11, q22, mw, ls, pa, pb);
  }
}

// Σ x[e] in double for n a multiple of 4: 8 partial sums (two 4-lane double vectors).
inline double sum_f32(const float* x, long n) {
  __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
  long e = 0;
  for (; e + 8 <= n; e += 8) {
    s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm_loadu_ps(x + e)));
    s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm_loadu_ps(x + e + 4)));
  }
  if (e < n) s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm_loadu_ps(x + e)));
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, _mm256_add_pd(s0, s1));
  return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
}

}  // namespace simd
}  // namespace cpu
}  // namespace ntf

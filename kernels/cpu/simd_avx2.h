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
//   * the angle in turns (θ/2π: the polynomial carries the 1/2π), its quadrant from selects,
//     π − θ via the sign bit of c (`vblendvps`); comparisons and clamps of non-negative floats
//     as int32 ops (the FMA pipes are the bottleneck);
//   * after a conv step, the conv's horizontal pass and affine map run in the same loop
//     (conv_abrelu_plane), in place.
// At the origin (sn = c = 0), |c| > sn fails and t = 0, so θ = π/2 (NT's convention).
#pragma once

#include <immintrin.h>

#include <cfloat>

namespace ntf {
namespace cpu {
namespace simd {

// atan(t)/t ≈ Σ_k kAtanP[k] z^k, z = t², t ∈ [0, 1] (least-max-error fit, degree 8).
constexpr double kAtanP[9] = {0.9999998863930583,   -0.3333259707110758,  0.19985907351314375,
                              -0.14161232894398024, 0.10498958692638151,  -0.0723488196865263,
                              0.03978149798801156,  -0.014401520711669849, 0.0024567643908803005};

// The same polynomial divided by 2π: t·Σ kAtanQ[k] z^k ≈ atan(t)/(2π), so the angle comes out in
// turns (θ/2π) and k0 = (π − θ)/(2π) = 1/2 − θ/2π is a subtraction, not a multiply.
#define NTF_Q(k) float(kAtanP[k] * 0.15915494309189533577)
constexpr float kAtanQ[9] = {NTF_Q(0), NTF_Q(1), NTF_Q(2), NTF_Q(3), NTF_Q(4),
                             NTF_Q(5), NTF_Q(6), NTF_Q(7), NTF_Q(8)};
#undef NTF_Q

// abrelu expectation of U×8 entries: nngp = f·k1 + ab·q12, dot = f·k0 + ab (fused_math.h).
// The U vectors go through each stage together (independent dependency chains side by side:
// one chain is ~100 cycles of latency and fills the FP scheduler on its own).
// PLAIN: ReLU itself (a = 0, b = 1: f = 1, ab = 0), three multiplies fewer per vector.
// NORM: normalize by the exponent of m (below). Without (callers guarantee every nonzero q11,
// q22 in [2^-30, 2^30], fused_cnn_impl.h `map_safe`), the same formulas on the raw entries: the
// normalization is an exact power-of-two scaling, so with no intermediate under/overflow (products
// within 2^±60, det above 2^-107) the results are the same bits, for 8 operations fewer.
// Port balance (the multiply/FMA pipes are the bottleneck: llvm-mca, Zen 3/4 model): comparisons,
// min/max and clamps of non-negative floats run as int32 operations on their bit patterns (the
// same order, NaN aside), which execute on the vector ALU/add pipes; the angle is in turns (above).
template <int U, bool PLAIN, bool NORM>
__attribute__((always_inline)) inline void abrelu8(const __m256* q12, const __m256* q11, const __m256* q22, __m256 f, __m256 ab,
                    __m256* nngp, __m256* dot) {
  const __m256i absmask = _mm256_set1_epi32(0x7fffffff);
  const __m256i izero = _mm256_setzero_si256();
  const __m256i tiny = _mm256_set1_epi32(0x00800000);  // FLT_MIN
  const __m256 quarter = _mm256_set1_ps(0.25f);
  const __m256 half = _mm256_set1_ps(0.5f);
  const __m256 inv2pi = _mm256_set1_ps(0.15915494309189533577f);
  __m256 scale[U], c[U], sn[U], t[U], at[U];
  __m256i lt[U];
  for (int u = 0; u < U; ++u) {
    __m256 a = q11[u], b = q22[u];
    c[u] = q12[u];
    scale[u] = _mm256_set1_ps(1.0f);
    if (NORM) {
      // m = max(q11, q22) ≥ |q12| (a covariance: |q12| ≤ √(q11 q22), up to rounding).
      // Normalize by 2^-e, e = the exponent of m: exact scaling by two integer ops, so the
      // normalized a, b, c ∈ [0, 2] carry no rounding and on the diagonal stay bit-equal.
      // scale = 2^e multiplies k1 back. e is capped at 126 (finite inv); m = 0 or subnormal
      // gives scale = 0, inv = 2^127: the angle stays right and k1 (≤ m < FLT_MIN) flushes to 0.
      const __m256 m = _mm256_max_ps(a, b);
      __m256i eb = _mm256_and_si256(_mm256_castps_si256(m), _mm256_set1_epi32(0x7f800000));
      eb = _mm256_min_epi32(eb, _mm256_set1_epi32(0x7e800000));
      const __m256 inv = _mm256_castsi256_ps(_mm256_sub_epi32(_mm256_set1_epi32(0x7f000000), eb));
      scale[u] = _mm256_castsi256_ps(eb);
      a = _mm256_mul_ps(a, inv);
      b = _mm256_mul_ps(b, inv);
      c[u] = _mm256_mul_ps(c[u], inv);
    }
    // det = a·b − c² by Kahan's 2×2 determinant: cc = fl(c²) and its exact rounding error
    // e = c² − cc (an FMA), det = fl(a·b − cc) − e. Accurate to a few ulps of det itself even
    // when a·b ≈ c² (nearly parallel inputs, where the naive difference keeps ~1e-7·ab of
    // noise and the angle θ ~ √det inherits it), and exactly 0 when a·b = c² (parallel
    // inputs, the diagonal). Clamped at +0 as int32 (a negative float is a negative int).
    const __m256 cc = _mm256_mul_ps(c[u], c[u]);
    const __m256 e = _mm256_fmsub_ps(c[u], c[u], cc);
    const __m256 det = _mm256_sub_ps(_mm256_fmsub_ps(a, b, cc), e);
    sn[u] = _mm256_sqrt_ps(
        _mm256_castsi256_ps(_mm256_max_epi32(_mm256_castps_si256(det), izero)));
  }
  for (int u = 0; u < U; ++u) {
    // t = min(sn, |c|) / max(sn, |c|, FLT_MIN); lt: |c| > sn (the angle is below π/4).
    const __m256i ax = _mm256_and_si256(_mm256_castps_si256(c[u]), absmask);
    const __m256i si = _mm256_castps_si256(sn[u]);
    lt[u] = _mm256_cmpgt_epi32(ax, si);
    const __m256 num = _mm256_castsi256_ps(_mm256_min_epi32(si, ax));
    const __m256 den = _mm256_castsi256_ps(_mm256_max_epi32(_mm256_max_epi32(si, ax), tiny));
    t[u] = _mm256_div_ps(num, den);
  }
  for (int u = 0; u < U; ++u) {
    // Pairs (c_2k + c_2k+1 z) by Horner in z²: 10 multiplies/FMAs (Estrin: 12), depth 6.
    const __m256 z = _mm256_mul_ps(t[u], t[u]);
    const __m256 z2 = _mm256_mul_ps(z, z);
#define NTF_C(k) _mm256_set1_ps(kAtanQ[k])
    const __m256 e01 = _mm256_fmadd_ps(NTF_C(1), z, NTF_C(0));
    const __m256 e23 = _mm256_fmadd_ps(NTF_C(3), z, NTF_C(2));
    const __m256 e45 = _mm256_fmadd_ps(NTF_C(5), z, NTF_C(4));
    const __m256 e67 = _mm256_fmadd_ps(NTF_C(7), z, NTF_C(6));
    __m256 p = _mm256_fmadd_ps(NTF_C(8), z2, e67);
#undef NTF_C
    p = _mm256_fmadd_ps(p, z2, e45);
    p = _mm256_fmadd_ps(p, z2, e23);
    p = _mm256_fmadd_ps(p, z2, e01);
    at[u] = _mm256_mul_ps(t[u], p);  // atan(t) / 2π
  }
  for (int u = 0; u < U; ++u) {
    // θ/2π: at where |c| > sn, else 1/4 − at; then 1/2 − that where c < 0 (blendv reads the sign
    // bit of c).
    const __m256 a1 = _mm256_blendv_ps(_mm256_sub_ps(quarter, at[u]), at[u],
                                       _mm256_castsi256_ps(lt[u]));
    const __m256 theta = _mm256_blendv_ps(a1, _mm256_sub_ps(half, a1), c[u]);
    const __m256 k0 = _mm256_sub_ps(half, theta);  // (π − θ)/(2π)
    __m256 k1 = _mm256_fmadd_ps(k0, c[u], _mm256_mul_ps(sn[u], inv2pi));
    if (NORM) k1 = _mm256_mul_ps(scale[u], k1);
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

// A conv step followed by a ReLU-family step, over one plane, in place (fused_cnn_impl.h
// `run_plane`, after the conv's vertical pass `conv_vertical` into rd / rt). Per 8 entries: the
// horizontal sum of the vertical sums (order of `hsum`), the affine map (nngp: fma(wd, s, b),
// bit-equal to the unfused step's `(wd·s + b)·1`), the expectation on it, and one mask at the
// end (the conv's own mask is redundant: masked entries leave through the same AND). Saves the
// conv's stores, the ReLU's reloads and mask multiplies, and the ping-pong output planes (the
// vertical sums hold all of the input the step reads). The row loop is inside: the constants
// stay in registers. (Tried and dropped: the vertical sums in a ring of a few rows computed just
// ahead of use, to shrink the working set further: 15% slower in the kernel, measured.)
struct ConvAbrelu {
  float* d;         // out: the step's NNGP plane (row stride ls; the conv's input, consumed)
  float* t;         // the NTK's
  const float* rd;  // vertical sums of row i at rd + i·es: e[k] = column (k − lo_w) mod lw
  const float* rt;  // the NTK's (TLIVE)
  int es;
  // The register path (conv3_abrelu_rows; rd / rt unused): the conv's input planes (row stride
  // ls), the output going to d / t (other planes).
  const float* xd;
  const float* xt;
  const float* va;  // q11 rows: va + i·ms; q22 rows: vb + ((i + dh) mod lh)·ms + dw
  const float* vb;
  int ms, dh, dw;
  const int* mh;   // row mask
  const int* mwi;  // column mask: 0 or −1 (all bits)
  int lh, lw, ls, nw, fw;  // nw: columns computed (a multiple of 4), [nw, ls) set to 0
  float wd, b, td, tt, tc, pa, pb;
};

template <int FW>
inline __m256 hsum8(const float* e, int fw) {
  __m256 acc = _mm256_loadu_ps(e);
  if (FW == 3) return _mm256_add_ps(_mm256_add_ps(acc, _mm256_loadu_ps(e + 1)), _mm256_loadu_ps(e + 2));
  for (int k = 1; k < (FW ? FW : fw); ++k) acc = _mm256_add_ps(acc, _mm256_loadu_ps(e + k));
  return acc;
}

template <int FW>
inline __m256 hsum4(const float* e, int fw) {  // 4 entries, upper half 0
  __m128 acc = _mm_loadu_ps(e);
  if (FW == 3) {
    acc = _mm_add_ps(_mm_add_ps(acc, _mm_loadu_ps(e + 1)), _mm_loadu_ps(e + 2));
  } else {
    for (int k = 1; k < (FW ? FW : fw); ++k) acc = _mm_add_ps(acc, _mm_loadu_ps(e + k));
  }
  return _mm256_zextps128_ps256(acc);
}

struct ConvAbreluConst {
  __m256 f, ab, wd, b, td, tt, tc;
};

// The step on U×8 entries from column j of a row (HALF: 4 entries, U = 1), given the conv's box
// sums sdv (NNGP) and stv (NTK, TLIVE): affine map, expectation, mask, stores to dr / tr.
template <int U, bool HALF, bool NTK, bool TLIVE, bool PLAIN, bool NORM>
__attribute__((always_inline)) inline void conv_abrelu_core(
    const __m256* sdv, const __m256* stv, const float* __restrict__ q11,
    const float* __restrict__ q22, const int* __restrict__ mwi, float* __restrict__ dr,
    float* __restrict__ tr, int j, const ConvAbreluConst& C) {
  __m256 x12[U], x11[U], x22[U], xt[U], nn[U], dot[U];
  for (int u = 0; u < U; ++u) {
    const int jj = j + 8 * u;
    x12[u] = _mm256_fmadd_ps(C.wd, sdv[u], C.b);
    if (NTK) {
      if (TLIVE)
        xt[u] = _mm256_fmadd_ps(C.td, sdv[u], _mm256_fmadd_ps(C.tt, stv[u], C.tc));
      else
        xt[u] = _mm256_fmadd_ps(C.td, sdv[u], C.tc);
    }
    x11[u] = HALF ? _mm256_zextps128_ps256(_mm_loadu_ps(q11 + jj)) : _mm256_loadu_ps(q11 + jj);
    x22[u] = HALF ? _mm256_zextps128_ps256(_mm_loadu_ps(q22 + jj)) : _mm256_loadu_ps(q22 + jj);
  }
  abrelu8<U, PLAIN, NORM>(x12, x11, x22, C.f, C.ab, nn, dot);
  for (int u = 0; u < U; ++u) {
    const int jj = j + 8 * u;
    if (!HALF) {
      const __m256 m = _mm256_castsi256_ps(_mm256_loadu_si256((const __m256i*)(mwi + jj)));
      _mm256_storeu_ps(dr + jj, _mm256_and_ps(nn[u], m));
      if (NTK) _mm256_storeu_ps(tr + jj, _mm256_and_ps(_mm256_mul_ps(xt[u], dot[u]), m));
    } else {
      const __m128 m = _mm_castsi128_ps(_mm_loadu_si128((const __m128i*)(mwi + jj)));
      _mm_storeu_ps(dr + jj, _mm_and_ps(_mm256_castps256_ps128(nn[u]), m));
      if (NTK)
        _mm_storeu_ps(tr + jj,
                      _mm_and_ps(_mm256_castps256_ps128(_mm256_mul_ps(xt[u], dot[u])), m));
    }
  }
}

// U×8 entries from column j of a row, box sums from the precomputed vertical sums edr / etr.
template <int U, bool HALF, int FW, bool NTK, bool TLIVE, bool PLAIN, bool NORM>
__attribute__((always_inline)) inline void conv_abrelu_block(
    const float* __restrict__ edr, const float* __restrict__ etr, const float* __restrict__ q11,
    const float* __restrict__ q22, const int* __restrict__ mwi, float* __restrict__ dr,
    float* __restrict__ tr, int j, int fw, const ConvAbreluConst& C) {
  __m256 sdv[U], stv[U];
  for (int u = 0; u < U; ++u) {
    const int jj = j + 8 * u;
    sdv[u] = HALF ? hsum4<FW>(edr + jj, fw) : hsum8<FW>(edr + jj, fw);
    if (NTK && TLIVE) stv[u] = HALF ? hsum4<FW>(etr + jj, fw) : hsum8<FW>(etr + jj, fw);
  }
  conv_abrelu_core<U, HALF, NTK, TLIVE, PLAIN, NORM>(sdv, stv, q11, q22, mwi, dr, tr, j, C);
}

// Lanes (prev[7], cur[0..6]) and (cur[1..7], next[0]): the columns j − 1 and j + 1 of the 8
// columns from j, given the vertical sums of the blocks before (prev), at (cur) and after (next).
inline __m256 shift_in_left(__m256 prev, __m256 cur) {
#ifdef __AVX512VL__
  return _mm256_castsi256_ps(
      _mm256_alignr_epi32(_mm256_castps_si256(cur), _mm256_castps_si256(prev), 7));
#else
  const __m256 pc = _mm256_permute2f128_ps(prev, cur, 0x21);  // prev[4..7], cur[0..3]
  return _mm256_castsi256_ps(
      _mm256_alignr_epi8(_mm256_castps_si256(cur), _mm256_castps_si256(pc), 12));
#endif
}
inline __m256 shift_in_right(__m256 cur, __m256 next) {
#ifdef __AVX512VL__
  return _mm256_castsi256_ps(
      _mm256_alignr_epi32(_mm256_castps_si256(next), _mm256_castps_si256(cur), 1));
#else
  const __m256 cn = _mm256_permute2f128_ps(cur, next, 0x21);  // cur[4..7], next[0..3]
  return _mm256_castsi256_ps(
      _mm256_alignr_epi8(_mm256_castps_si256(cn), _mm256_castps_si256(cur), 4));
#endif
}

// The register path of a SAME 3×3 conv (fh = fw = 3, lo_h = lo_w = 1) followed by a ReLU-family
// step, for nw a multiple of 8 with nw < lw (the columns from nw masked: the usual zero guard
// column of SAME) or nw = lw (the row wraps at a block boundary): per row, the vertical sums of
// each 8-column block are computed in registers from the three input rows, and the horizontal
// neighbours come from the blocks on either side by lane shifts; so neither the vertical-sum planes
// nor their unaligned reloads exist (the conv reads each input row three times and writes only
// the step's output). Row-circular: the left neighbour of column 0 is column lw − 1 (the block
// after the last output block, or that block itself where nw = lw), the right one of column
// nw − 1 is column nw (column 0 where nw = lw). Same order of additions as the two-pass form
// ((r0 + r1) + r2, then (left + centre) + right): the same bits. Output to other planes (d / t):
// later rows still read the input.
template <bool NTK, bool TLIVE, bool PLAIN, bool NORM>
void conv3_abrelu_rows(const ConvAbrelu& A, const ConvAbreluConst& C) {
  const int lh = A.lh, ls = A.ls, lw = A.lw, nw = A.nw, nb = nw / 8;
  constexpr bool TV = NTK && TLIVE;
  for (int i = 0; i < lh; ++i) {
    float* __restrict__ dr = A.d + (long)i * ls;
    float* __restrict__ tr = A.t + (long)i * ls;
    int j0 = 0;
    if (A.mh[i]) {
      const long o0 = (long)(i == 0 ? lh - 1 : i - 1) * ls, o1 = (long)i * ls;
      const long o2 = (long)(i + 1 == lh ? 0 : i + 1) * ls;
      int ii = i + A.dh;
      ii = ii >= lh ? ii - lh : ii;
      const float* __restrict__ q11 = A.va + (long)i * A.ms;
      const float* __restrict__ q22 = A.vb + (long)ii * A.ms + A.dw;
      // Vertical sums of the 8 columns from j (HALF: 4, the upper lanes 0).
      auto vsum = [&](const float* x, int j, bool half) {
        const float* p = x + j;
        if (half)
          return _mm256_zextps128_ps256(
              _mm_add_ps(_mm_add_ps(_mm_loadu_ps(p + o0), _mm_loadu_ps(p + o1)),
                         _mm_loadu_ps(p + o2)));
        return _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(p + o0), _mm256_loadu_ps(p + o1)),
                             _mm256_loadu_ps(p + o2));
      };
      // first: block 0; last: block nb − 1; end: the block after it (lane 0 = column nw, or
      // column 0); prev0: lane 7 = column lw − 1 (the left neighbour of column 0).
      struct Edge {
        __m256 first, last, end, prev0;
      };
      auto edges = [&](const float* x) {
        Edge e;
        e.first = vsum(x, 0, false);
        e.last = nb > 1 ? vsum(x, nw - 8, false) : e.first;
        if (nw == lw) {
          e.end = e.first;
          e.prev0 = e.last;
        } else {
          const bool half = nw + 8 > ls;
          e.end = vsum(x, nw, half);
          const int l = lw - 1 - nw;
          e.prev0 = l < (half ? 4 : 8) ? _mm256_permutevar8x32_ps(e.end, _mm256_set1_epi32(l))
                                       : vsum(x, lw - 8, false);
        }
        return e;
      };
      auto vblock = [&](const float* x, const Edge& e, int blk) {  // blk ≤ nb
        return blk == nb ? e.end : blk == nb - 1 ? e.last : blk == 0 ? e.first
                                                                         : vsum(x, 8 * blk, false);
      };
      auto box = [](__m256 prev, __m256 cur, __m256 next) {
        return _mm256_add_ps(_mm256_add_ps(shift_in_left(prev, cur), cur),
                             shift_in_right(cur, next));
      };
      const Edge ed = edges(A.xd);
      Edge et = ed;
      if (TV) et = edges(A.xt);
      __m256 dp = ed.prev0, dc = ed.first, tp = et.prev0, tc = et.first;
      int k = 0;
      constexpr int U = 4;  // 4 chains where the row has them (measured 5% over 2)
      for (; k + U <= nb; k += U) {
        __m256 sdv[U], stv[U], dv[U + 1], tv[U + 1];
        dv[0] = dc;
        tv[0] = tc;
        for (int u = 1; u <= U; ++u) dv[u] = vblock(A.xd, ed, k + u);
        sdv[0] = box(dp, dv[0], dv[1]);
        for (int u = 1; u < U; ++u) sdv[u] = box(dv[u - 1], dv[u], dv[u + 1]);
        dp = dv[U - 1];
        dc = dv[U];
        if (TV) {
          for (int u = 1; u <= U; ++u) tv[u] = vblock(A.xt, et, k + u);
          stv[0] = box(tp, tv[0], tv[1]);
          for (int u = 1; u < U; ++u) stv[u] = box(tv[u - 1], tv[u], tv[u + 1]);
          tp = tv[U - 1];
          tc = tv[U];
        }
        conv_abrelu_core<U, false, NTK, TLIVE, PLAIN, NORM>(sdv, stv, q11, q22, A.mwi, dr, tr,
                                                           8 * k, C);
      }
      for (; k + 2 <= nb; k += 2) {
        __m256 sdv[2], stv[2];
        const __m256 d1 = vblock(A.xd, ed, k + 1), d2 = vblock(A.xd, ed, k + 2);
        sdv[0] = box(dp, dc, d1);
        sdv[1] = box(dc, d1, d2);
        dp = d1;
        dc = d2;
        if (TV) {
          const __m256 t1 = vblock(A.xt, et, k + 1), t2 = vblock(A.xt, et, k + 2);
          stv[0] = box(tp, tc, t1);
          stv[1] = box(tc, t1, t2);
          tp = t1;
          tc = t2;
        }
        conv_abrelu_core<2, false, NTK, TLIVE, PLAIN, NORM>(sdv, stv, q11, q22, A.mwi, dr, tr,
                                                           8 * k, C);
      }
      if (k < nb) {
        __m256 sdv = box(dp, dc, vblock(A.xd, ed, k + 1)), stv = sdv;
        if (TV) stv = box(tp, tc, vblock(A.xt, et, k + 1));
        conv_abrelu_core<1, false, NTK, TLIVE, PLAIN, NORM>(&sdv, &stv, q11, q22, A.mwi, dr, tr,
                                                           8 * k, C);
      }
      j0 = nw;
    }
    for (int j = j0; j < ls; ++j) dr[j] = 0.0f;
    if (NTK)
      for (int j = j0; j < ls; ++j) tr[j] = 0.0f;
  }
}

// The two-pass form: box sums from the conv's vertical sums rd / rt (conv_vertical), in place.
template <int FW, bool NTK, bool TLIVE, bool PLAIN, bool NORM>
void conv_abrelu_rows(const ConvAbrelu& A, const ConvAbreluConst& C) {
  const int fw = A.fw, lh = A.lh, ls = A.ls, es = A.es;
  for (int i = 0; i < lh; ++i) {
    float* __restrict__ dr = A.d + (long)i * ls;
    float* __restrict__ tr = A.t + (long)i * ls;
    int j0 = 0;
    if (A.mh[i]) {
      int ii = i + A.dh;
      ii = ii >= lh ? ii - lh : ii;
      const float* __restrict__ q11 = A.va + (long)i * A.ms;
      const float* __restrict__ q22 = A.vb + (long)ii * A.ms + A.dw;
      const float* __restrict__ edr = A.rd + (long)i * es;
      const float* __restrict__ etr = A.rt + (long)i * es;
      int j = 0;
      for (; j + 16 <= A.nw; j += 16)
        conv_abrelu_block<2, false, FW, NTK, TLIVE, PLAIN, NORM>(edr, etr, q11, q22, A.mwi, dr, tr,
                                                                 j, fw, C);
      if (j + 8 <= A.nw) {
        conv_abrelu_block<1, false, FW, NTK, TLIVE, PLAIN, NORM>(edr, etr, q11, q22, A.mwi, dr, tr,
                                                                 j, fw, C);
        j += 8;
      }
      if (j < A.nw)  // nw is a multiple of 4
        conv_abrelu_block<1, true, FW, NTK, TLIVE, PLAIN, NORM>(edr, etr, q11, q22, A.mwi, dr, tr,
                                                                j, fw, C);
      j0 = A.nw;
    }
    for (int j = j0; j < ls; ++j) dr[j] = 0.0f;
    if (NTK)
      for (int j = j0; j < ls; ++j) tr[j] = 0.0f;
  }
}


// FW: 3 or 0 (any width) for the two-pass form, kConv3Reg for the register path.
constexpr int kConv3Reg = -3;

template <int FW, bool NTK, bool TLIVE, bool PLAIN, bool NORM>
void conv_abrelu_plane_t(const ConvAbrelu& A) {
  ConvAbreluConst C;
  C.f = _mm256_set1_ps((A.pa - A.pb) * (A.pa - A.pb));
  C.ab = _mm256_set1_ps(A.pa * A.pb);
  C.wd = _mm256_set1_ps(A.wd);
  C.b = _mm256_set1_ps(A.b);
  C.td = _mm256_set1_ps(A.td);
  C.tt = _mm256_set1_ps(A.tt);
  C.tc = _mm256_set1_ps(A.tc);
  if constexpr (FW == kConv3Reg)
    conv3_abrelu_rows<NTK, TLIVE, PLAIN, NORM>(A, C);
  else
    conv_abrelu_rows<FW, NTK, TLIVE, PLAIN, NORM>(A, C);
}

template <int FW, bool NTK, bool TLIVE>
inline void conv_abrelu_plane_fw(const ConvAbrelu& A, bool norm) {
  const bool plain = A.pa == 0.0f && A.pb == 1.0f;
  if (norm) {
    if (plain)
      conv_abrelu_plane_t<FW, NTK, TLIVE, true, true>(A);
    else
      conv_abrelu_plane_t<FW, NTK, TLIVE, false, true>(A);
  } else {
    if (plain)
      conv_abrelu_plane_t<FW, NTK, TLIVE, true, false>(A);
    else
      conv_abrelu_plane_t<FW, NTK, TLIVE, false, false>(A);
  }
}

template <int FW>
inline void conv_abrelu_plane_nt(const ConvAbrelu& A, bool ntk, bool tlive, bool norm) {
  if (!ntk)
    conv_abrelu_plane_fw<FW, false, false>(A, norm);
  else if (tlive)
    conv_abrelu_plane_fw<FW, true, true>(A, norm);
  else
    conv_abrelu_plane_fw<FW, true, false>(A, norm);
}

// ntk: write the NTK plane; tlive: the NTK input is live (else 0); norm: as abrelu_row.
// The register path where A.xd is set (conv3_abrelu_rows).
inline void conv_abrelu_plane(const ConvAbrelu& A, bool ntk, bool tlive, bool norm) {
  if (A.xd)
    conv_abrelu_plane_nt<kConv3Reg>(A, ntk, tlive, norm);
  else if (A.fw == 3)
    conv_abrelu_plane_nt<3>(A, ntk, tlive, norm);
  else
    conv_abrelu_plane_nt<0>(A, ntk, tlive, norm);
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

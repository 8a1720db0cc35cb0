// ntfast — hand-vectorized rows of the CPU fused CNN kernel (f32), included by fused_cnn_impl.h in
// the AVX2 and the AVX-512 translation units (not the generic one), written once over vector
// traits (V8: AVX2, 8 lanes; V16: AVX-512, 16 lanes, the same operations lane by lane). Definition
// of every number: ntfast/ops/nonlin.py (the auto-vectorized fused_math.h formulas are the
// portable version).
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
//     (conv_abrelu_plane), in place; after a SAME 3×3 conv the vertical pass too, in registers
//     (conv3_abrelu_rows).
// At the origin (sn = c = 0), |c| > sn fails and t = 0, so θ = π/2 (NT's convention).
#pragma once

#include <immintrin.h>

#include <cfloat>

// In the including translation unit's own namespace (NTF_SIMD_NS: avx2 or avx512): the AVX2 and
// the AVX-512 units compile these templates with different instructions, and under one shared name
// the linker would keep one copy for both (the AVX-512 variant then ran AVX2-compiled rows, and a
// copy built with AVX-512 could land in the AVX2 variant).
namespace ntf {
namespace cpu {
namespace NTF_SIMD_NS {
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

// Vector traits: the hand-vectorized rows are written once over V = V8 (AVX2, 8 lanes) or, in the
// AVX-512 translation unit, V16 (512-bit, 16 lanes: the same operations lane by lane, so the same
// bits; on Zen 4 a 512-bit operation is one µop on the 256-bit pipes, which halves the µops of the
// expectation: measured 1.7× on its rows). I: the integer view; M: a lane mask (a vector on AVX2,
// a k-register on AVX-512).
struct V8 {
  using F = __m256;
  using I = __m256i;
  using M = __m256i;
  static constexpr int N = 8;
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F set1(float x) { return _mm256_set1_ps(x); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static F sqrt(F a) { return _mm256_sqrt_ps(a); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F fmsub(F a, F b, F c) { return _mm256_fmsub_ps(a, b, c); }
  static F and_(F a, F b) { return _mm256_and_ps(a, b); }
  static I ci(F a) { return _mm256_castps_si256(a); }
  static F cf(I a) { return _mm256_castsi256_ps(a); }
  static I set1i(int x) { return _mm256_set1_epi32(x); }
  static I andi(I a, I b) { return _mm256_and_si256(a, b); }
  static I maxi(I a, I b) { return _mm256_max_epi32(a, b); }
  static I mini(I a, I b) { return _mm256_min_epi32(a, b); }
  static I subi(I a, I b) { return _mm256_sub_epi32(a, b); }
  static M gti(I a, I b) { return _mm256_cmpgt_epi32(a, b); }
  static F blend(M m, F a, F b) { return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(m)); }
  // Lanes where s has its sign bit set take b.
  static F blend_sign(F s, F a, F b) { return _mm256_blendv_ps(a, b, s); }
  static F load_mask(const int* p) {  // an AND mask (0 / −1 lanes)
    return _mm256_castsi256_ps(_mm256_loadu_si256((const __m256i*)p));
  }
  // The lanes where x ≠ 0 (NaN counts as nonzero), and v kept on them, +0 elsewhere.
  using K = F;
  static K nonzero(F x) { return _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_NEQ_UQ); }
  static F keep(K k, F v) { return _mm256_and_ps(v, k); }
  // The first n < N lanes from p, the others 0 (n = 4: row lengths are multiples of 4).
  static F load_part(const float* p, int) { return _mm256_zextps128_ps256(_mm_loadu_ps(p)); }
  static F lane(F v, int l) { return _mm256_permutevar8x32_ps(v, _mm256_set1_epi32(l)); }
  // (prev[N−1], cur[0..N−2]) and (cur[1..N−1], next[0]).
  static F shift_in_left(F prev, F cur) {
#ifdef __AVX512VL__
    return _mm256_castsi256_ps(
        _mm256_alignr_epi32(_mm256_castps_si256(cur), _mm256_castps_si256(prev), 7));
#else
    const F pc = _mm256_permute2f128_ps(prev, cur, 0x21);  // prev[4..7], cur[0..3]
    return _mm256_castsi256_ps(
        _mm256_alignr_epi8(_mm256_castps_si256(cur), _mm256_castps_si256(pc), 12));
#endif
  }
  static F shift_in_right(F cur, F next) {
#ifdef __AVX512VL__
    return _mm256_castsi256_ps(
        _mm256_alignr_epi32(_mm256_castps_si256(next), _mm256_castps_si256(cur), 1));
#else
    const F cn = _mm256_permute2f128_ps(cur, next, 0x21);  // cur[4..7], next[0..3]
    return _mm256_castsi256_ps(
        _mm256_alignr_epi8(_mm256_castps_si256(cn), _mm256_castps_si256(cur), 4));
#endif
  }
};

#ifdef __AVX512F__
struct V16 {
  using F = __m512;
  using I = __m512i;
  using M = __mmask16;
  static constexpr int N = 16;
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F set1(float x) { return _mm512_set1_ps(x); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static F sqrt(F a) { return _mm512_sqrt_ps(a); }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F fmsub(F a, F b, F c) { return _mm512_fmsub_ps(a, b, c); }
  static F and_(F a, F b) {
    return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(a), _mm512_castps_si512(b)));
  }
  static I ci(F a) { return _mm512_castps_si512(a); }
  static F cf(I a) { return _mm512_castsi512_ps(a); }
  static I set1i(int x) { return _mm512_set1_epi32(x); }
  static I andi(I a, I b) { return _mm512_and_si512(a, b); }
  static I maxi(I a, I b) { return _mm512_max_epi32(a, b); }
  static I mini(I a, I b) { return _mm512_min_epi32(a, b); }
  static I subi(I a, I b) { return _mm512_sub_epi32(a, b); }
  static M gti(I a, I b) { return _mm512_cmpgt_epi32_mask(a, b); }
  static F blend(M m, F a, F b) { return _mm512_mask_blend_ps(m, a, b); }
  static F blend_sign(F s, F a, F b) {
    return _mm512_mask_blend_ps(_mm512_movepi32_mask(_mm512_castps_si512(s)), a, b);
  }
  static F load_mask(const int* p) { return _mm512_castsi512_ps(_mm512_loadu_si512(p)); }
  using K = __mmask16;
  static K nonzero(F x) { return _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_NEQ_UQ); }
  static F keep(K k, F v) { return _mm512_maskz_mov_ps(k, v); }
  static F load_part(const float* p, int n) {
    return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p);
  }
  static F lane(F v, int l) { return _mm512_permutexvar_ps(_mm512_set1_epi32(l), v); }
  static F shift_in_left(F prev, F cur) {
    return _mm512_castsi512_ps(
        _mm512_alignr_epi32(_mm512_castps_si512(cur), _mm512_castps_si512(prev), 15));
  }
  static F shift_in_right(F cur, F next) {
    return _mm512_castsi512_ps(
        _mm512_alignr_epi32(_mm512_castps_si512(next), _mm512_castps_si512(cur), 1));
  }
};
#endif

// A vector traits type as a value (for generic lambdas).
template <class V>
struct VecTag {
  using type = V;
};

// abrelu expectation of U vectors: nngp = f·k1 + ab·q12, dot = f·k0 + ab (fused_math.h).
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
template <class V, int U, bool PLAIN, bool NORM>
__attribute__((always_inline)) inline void abrelu(const typename V::F* q12,
                                                  const typename V::F* q11,
                                                  const typename V::F* q22, typename V::F f,
                                                  typename V::F ab, typename V::F* nngp,
                                                  typename V::F* dot) {
  using F = typename V::F;
  using I = typename V::I;
  const I absmask = V::set1i(0x7fffffff);
  const I izero = V::set1i(0);
  const I tiny = V::set1i(0x00800000);  // FLT_MIN
  const F quarter = V::set1(0.25f);
  const F half = V::set1(0.5f);
  const F inv2pi = V::set1(0.15915494309189533577f);
  F scale[U], c[U], sn[U], t[U], at[U];
  typename V::M lt[U];
  for (int u = 0; u < U; ++u) {
    F a = q11[u], b = q22[u];
    c[u] = q12[u];
    scale[u] = V::set1(1.0f);
    if (NORM) {
      // m = max(q11, q22) ≥ |q12| (a covariance: |q12| ≤ √(q11 q22), up to rounding).
      // Normalize by 2^-e, e = the exponent of m: exact scaling by two integer ops, so the
      // normalized a, b, c ∈ [0, 2] carry no rounding and on the diagonal stay bit-equal.
      // scale = 2^e multiplies k1 back. e is capped at 126 (finite inv); m = 0 or subnormal
      // gives scale = 0, inv = 2^127: the angle stays right and k1 (≤ m < FLT_MIN) flushes to 0.
      const F m = V::max(a, b);
      I eb = V::andi(V::ci(m), V::set1i(0x7f800000));
      eb = V::mini(eb, V::set1i(0x7e800000));
      const F inv = V::cf(V::subi(V::set1i(0x7f000000), eb));
      scale[u] = V::cf(eb);
      a = V::mul(a, inv);
      b = V::mul(b, inv);
      c[u] = V::mul(c[u], inv);
    }
    // det = a·b − c² by Kahan's 2×2 determinant: cc = fl(c²) and its exact rounding error
    // e = c² − cc (an FMA), det = fl(a·b − cc) − e. Accurate to a few ulps of det itself even
    // when a·b ≈ c² (nearly parallel inputs, where the naive difference keeps ~1e-7·ab of
    // noise and the angle θ ~ √det inherits it), and exactly 0 when a·b = c² (parallel
    // inputs, the diagonal). Clamped at +0 as int32 (a negative float is a negative int).
    const F cc = V::mul(c[u], c[u]);
    const F e = V::fmsub(c[u], c[u], cc);
    const F det = V::sub(V::fmsub(a, b, cc), e);
    sn[u] = V::sqrt(V::cf(V::maxi(V::ci(det), izero)));
  }
  for (int u = 0; u < U; ++u) {
    // t = min(sn, |c|) / max(sn, |c|, FLT_MIN); lt: |c| > sn (the angle is below π/4).
    const I ax = V::andi(V::ci(c[u]), absmask);
    const I si = V::ci(sn[u]);
    lt[u] = V::gti(ax, si);
    const F num = V::cf(V::mini(si, ax));
    const F den = V::cf(V::maxi(V::maxi(si, ax), tiny));
    t[u] = V::div(num, den);
  }
  for (int u = 0; u < U; ++u) {
    // Pairs (c_2k + c_2k+1 z) by Horner in z²: 10 multiplies/FMAs (Estrin: 12), depth 6.
    const F z = V::mul(t[u], t[u]);
    const F z2 = V::mul(z, z);
#define NTF_C(k) V::set1(kAtanQ[k])
    const F e01 = V::fmadd(NTF_C(1), z, NTF_C(0));
    const F e23 = V::fmadd(NTF_C(3), z, NTF_C(2));
    const F e45 = V::fmadd(NTF_C(5), z, NTF_C(4));
    const F e67 = V::fmadd(NTF_C(7), z, NTF_C(6));
    F p = V::fmadd(NTF_C(8), z2, e67);
#undef NTF_C
    p = V::fmadd(p, z2, e45);
    p = V::fmadd(p, z2, e23);
    p = V::fmadd(p, z2, e01);
    at[u] = V::mul(t[u], p);  // atan(t) / 2π
  }
  for (int u = 0; u < U; ++u) {
    // θ/2π: at where |c| > sn, else 1/4 − at; then 1/2 − that where c < 0 (the sign bit of c).
    const F a1 = V::blend(lt[u], V::sub(quarter, at[u]), at[u]);
    const F theta = V::blend_sign(c[u], a1, V::sub(half, a1));
    const F k0 = V::sub(half, theta);  // (π − θ)/(2π)
    F k1 = V::fmadd(k0, c[u], V::mul(sn[u], inv2pi));
    if (NORM) k1 = V::mul(scale[u], k1);
    nngp[u] = PLAIN ? k1 : V::fmadd(f, k1, V::mul(ab, q12[u]));
    dot[u] = PLAIN ? k0 : V::fmadd(f, k0, ab);
  }
}

// One plane row of an abrelu step (fused_cnn_impl.h `nonlin_row`): dr ← nngp·mw,
// tr ← tr·dot·mw (TLIVE). ls is a multiple of 4: 16 entries per step (two independent 8-lane
// chains), then whole 8-lane vectors, then 4 entries in the low half of one (plain 128-bit
// loads/stores: masked vmaskmovps stores cost ~70 cycles per row tail). mw holds 0 or 1: the
// mask is applied as a bitwise AND (compare once, AND twice: off the multiply pipes, which the
// expectation itself saturates).
// Whole U·V::N-entry blocks of an abrelu row from column j while they fit in ls; returns the
// next j.
template <class V, int U, bool TLIVE, bool PLAIN, bool NORM>
inline int abrelu_row_blocks(int j, float* __restrict__ dr, float* __restrict__ tr,
                             const float* __restrict__ q11, const float* __restrict__ q22,
                             const float* __restrict__ mw, int ls, float pa, float pb) {
  using F = typename V::F;
  const F f = V::set1((pa - pb) * (pa - pb));
  const F ab = V::set1(pa * pb);
  for (; j + V::N * U <= ls; j += V::N * U) {
    F x12[U], x11[U], x22[U], nn[U], dot[U];
    for (int u = 0; u < U; ++u) {
      x12[u] = V::load(dr + j + V::N * u);
      x11[u] = V::load(q11 + j + V::N * u);
      x22[u] = V::load(q22 + j + V::N * u);
    }
    abrelu<V, U, PLAIN, NORM>(x12, x11, x22, f, ab, nn, dot);
    for (int u = 0; u < U; ++u) {
      const typename V::K m = V::nonzero(V::load(mw + j + V::N * u));
      V::store(dr + j + V::N * u, V::keep(m, nn[u]));
      if (TLIVE)
        V::store(tr + j + V::N * u, V::keep(m, V::mul(V::load(tr + j + V::N * u), dot[u])));
    }
  }
  return j;
}

template <bool TLIVE, bool PLAIN, bool NORM>
inline void abrelu_row_t(float* __restrict__ dr, float* __restrict__ tr,
                         const float* __restrict__ q11, const float* __restrict__ q22,
                         const float* __restrict__ mw, int ls, float pa, float pb) {
  int j = 0;
#ifdef __AVX512F__
  j = abrelu_row_blocks<V16, 2, TLIVE, PLAIN, NORM>(j, dr, tr, q11, q22, mw, ls, pa, pb);
  j = abrelu_row_blocks<V16, 1, TLIVE, PLAIN, NORM>(j, dr, tr, q11, q22, mw, ls, pa, pb);
#endif
  j = abrelu_row_blocks<V8, 2, TLIVE, PLAIN, NORM>(j, dr, tr, q11, q22, mw, ls, pa, pb);
  const __m256 f = _mm256_set1_ps((pa - pb) * (pa - pb));
  const __m256 ab = _mm256_set1_ps(pa * pb);
  const __m256 zero = _mm256_setzero_ps();
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
    abrelu<V8, 1, PLAIN, NORM>(&x12, &x11, &x22, f, ab, &nn, &dot);
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
  int vec;  // the register path's block width: 8, or 16 (AVX-512: conv3_vec)
  const float* va;  // q11 rows: va + i·ms; q22 rows: vb + ((i + dh) mod lh)·ms + dw
  const float* vb;
  int ms, dh, dw;
  const int* mh;   // row mask
  const int* mwi;  // column mask: 0 or −1 (all bits)
  int lh, lw, ls, nw, fw;  // nw: columns computed (a multiple of 4), [nw, ls) set to 0
  float wd, b, td, tt, tc, pa, pb;
};

template <class V, int FW>
inline typename V::F hsum(const float* e, int fw) {
  typename V::F acc = V::load(e);
  if (FW == 3) return V::add(V::add(acc, V::load(e + 1)), V::load(e + 2));
  for (int k = 1; k < (FW ? FW : fw); ++k) acc = V::add(acc, V::load(e + k));
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

template <class V>
struct ConvAbreluConst {
  typename V::F f, ab, wd, b, td, tt, tc;
  explicit ConvAbreluConst(const ConvAbrelu& A)
      : f(V::set1((A.pa - A.pb) * (A.pa - A.pb))),
        ab(V::set1(A.pa * A.pb)),
        wd(V::set1(A.wd)),
        b(V::set1(A.b)),
        td(V::set1(A.td)),
        tt(V::set1(A.tt)),
        tc(V::set1(A.tc)) {}
};

// The step on U vectors from column j of a row (HALF, V8 only: 4 entries, U = 1), given the
// conv's box sums sdv (NNGP) and stv (NTK, TLIVE): affine map, expectation, mask, stores.
template <class V, int U, bool HALF, bool NTK, bool TLIVE, bool PLAIN, bool NORM>
__attribute__((always_inline)) inline void conv_abrelu_core(
    const typename V::F* sdv, const typename V::F* stv, const float* __restrict__ q11,
    const float* __restrict__ q22, const int* __restrict__ mwi, float* __restrict__ dr,
    float* __restrict__ tr, int j, const ConvAbreluConst<V>& C) {
  using F = typename V::F;
  static_assert(!HALF || V::N == 8, "4-entry tails: V8 only");
  F x12[U], x11[U], x22[U], xt[U], nn[U], dot[U];
  for (int u = 0; u < U; ++u) {
    const int jj = j + V::N * u;
    x12[u] = V::fmadd(C.wd, sdv[u], C.b);
    if (NTK) {
      if (TLIVE)
        xt[u] = V::fmadd(C.td, sdv[u], V::fmadd(C.tt, stv[u], C.tc));
      else
        xt[u] = V::fmadd(C.td, sdv[u], C.tc);
    }
    if constexpr (HALF) {
      x11[u] = _mm256_zextps128_ps256(_mm_loadu_ps(q11 + jj));
      x22[u] = _mm256_zextps128_ps256(_mm_loadu_ps(q22 + jj));
    } else {
      x11[u] = V::load(q11 + jj);
      x22[u] = V::load(q22 + jj);
    }
  }
  abrelu<V, U, PLAIN, NORM>(x12, x11, x22, C.f, C.ab, nn, dot);
  for (int u = 0; u < U; ++u) {
    const int jj = j + V::N * u;
    if constexpr (!HALF) {
      const F m = V::load_mask(mwi + jj);
      V::store(dr + jj, V::and_(nn[u], m));
      if (NTK) V::store(tr + jj, V::and_(V::mul(xt[u], dot[u]), m));
    } else {
      const __m128 m = _mm_castsi128_ps(_mm_loadu_si128((const __m128i*)(mwi + jj)));
      _mm_storeu_ps(dr + jj, _mm_and_ps(_mm256_castps256_ps128(nn[u]), m));
      if (NTK)
        _mm_storeu_ps(tr + jj,
                      _mm_and_ps(_mm256_castps256_ps128(_mm256_mul_ps(xt[u], dot[u])), m));
    }
  }
}

// U vectors of entries from column j of a row (HALF, V8 only: 4 entries), box sums from the
// precomputed vertical sums edr / etr.
template <class V, int U, bool HALF, int FW, bool NTK, bool TLIVE, bool PLAIN, bool NORM>
__attribute__((always_inline)) inline void conv_abrelu_block(
    const float* __restrict__ edr, const float* __restrict__ etr, const float* __restrict__ q11,
    const float* __restrict__ q22, const int* __restrict__ mwi, float* __restrict__ dr,
    float* __restrict__ tr, int j, int fw, const ConvAbreluConst<V>& C) {
  typename V::F sdv[U], stv[U];
  for (int u = 0; u < U; ++u) {
    const int jj = j + V::N * u;
    if constexpr (HALF) {
      sdv[u] = hsum4<FW>(edr + jj, fw);
      if (NTK && TLIVE) stv[u] = hsum4<FW>(etr + jj, fw);
    } else {
      sdv[u] = hsum<V, FW>(edr + jj, fw);
      if (NTK && TLIVE) stv[u] = hsum<V, FW>(etr + jj, fw);
    }
  }
  conv_abrelu_core<V, U, HALF, NTK, TLIVE, PLAIN, NORM>(sdv, stv, q11, q22, mwi, dr, tr, j, C);
}

// The register path of a SAME 3×3 conv (fh = fw = 3, lo_h = lo_w = 1) followed by a ReLU-family
// step, in blocks of V::N columns, for nw a multiple of V::N with nw < lw (the columns from nw
// masked: the usual zero guard column of SAME) or nw = lw (the row wraps at a block boundary):
// per row, the vertical sums of each block are computed in registers from the three input rows,
// and the horizontal neighbours come from the blocks on either side by lane shifts; so neither
// the vertical-sum planes nor their unaligned reloads exist (the conv reads each input row three
// times and writes only the step's output). Row-circular: the left neighbour of column 0 is
// column lw − 1 (in the block after the last output block, or that block itself where nw = lw),
// the right one of column nw − 1 is column nw (column 0 where nw = lw). Same order of additions
// as the two-pass form ((r0 + r1) + r2, then (left + centre) + right): the same bits. Output to
// other planes (d / t): later rows still read the input.
template <class V, bool NTK, bool TLIVE, bool PLAIN, bool NORM>
void conv3_abrelu_rows(const ConvAbrelu& A, const ConvAbreluConst<V>& C) {
  using F = typename V::F;
  constexpr int N = V::N;
  constexpr bool TV = NTK && TLIVE;
  const int lh = A.lh, ls = A.ls, lw = A.lw, nw = A.nw, nb = nw / N;
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
      // Vertical sums of the N columns from j (the first n < N only, the others 0, where n > 0).
      auto vsum = [&](const float* x, int j, int n) {
        const float* p = x + j;
        if (n) return V::add(V::add(V::load_part(p + o0, n), V::load_part(p + o1, n)),
                             V::load_part(p + o2, n));
        return V::add(V::add(V::load(p + o0), V::load(p + o1)), V::load(p + o2));
      };
      // first: block 0; last: block nb − 1; end: the block after it (lane 0 = column nw, or
      // column 0); prev0: lane N − 1 = column lw − 1 (the left neighbour of column 0).
      struct Edge {
        F first, last, end, prev0;
      };
      auto edges = [&](const float* x) {
        Edge e;
        e.first = vsum(x, 0, 0);
        e.last = nb > 1 ? vsum(x, nw - N, 0) : e.first;
        if (nw == lw) {
          e.end = e.first;
          e.prev0 = e.last;
        } else {
          const int n = ls - nw < N ? ls - nw : 0;  // lanes in the row (0: all)
          e.end = vsum(x, nw, n);
          const int l = lw - 1 - nw;
          e.prev0 = l < (n ? n : N) ? V::lane(e.end, l) : vsum(x, lw - N, 0);
        }
        return e;
      };
      auto vblock = [&](const float* x, const Edge& e, int blk) {  // 1 ≤ blk ≤ nb
        return blk == nb ? e.end : blk == nb - 1 ? e.last : vsum(x, N * blk, 0);
      };
      auto box = [](F prev, F cur, F next) {
        return V::add(V::add(V::shift_in_left(prev, cur), cur), V::shift_in_right(cur, next));
      };
      const Edge ed = edges(A.xd);
      Edge et = ed;
      if (TV) et = edges(A.xt);
      F dp = ed.prev0, dc = ed.first, tp = et.prev0, tc = et.first;
      // U blocks at a time (independent chains), then 1.
      auto blocks = [&](auto u_const, int k) {
        constexpr int U = decltype(u_const)::value;
        F sdv[U], stv[U], dv[U + 1], tv[U + 1];
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
        conv_abrelu_core<V, U, false, NTK, TLIVE, PLAIN, NORM>(sdv, stv, q11, q22, A.mwi, dr, tr,
                                                              N * k, C);
      };
      // 32 columns per step (4 chains of 8 or 2 of 16: measured 5% over 2 of 8).
      constexpr int U = 32 / N;
      int k = 0;
      for (; k + U <= nb; k += U) blocks(std::integral_constant<int, U>(), k);
      for (; k < nb; ++k) blocks(std::integral_constant<int, 1>(), k);
      j0 = nw;
    }
    for (int j = j0; j < ls; ++j) dr[j] = 0.0f;
    if (NTK)
      for (int j = j0; j < ls; ++j) tr[j] = 0.0f;
  }
}

// The two-pass form: box sums from the conv's vertical sums rd / rt (conv_vertical), in place;
// 32 and 16 columns at a time as 512-bit vectors where the unit has AVX-512 (the same bits).
template <int FW, bool NTK, bool TLIVE, bool PLAIN, bool NORM>
void conv_abrelu_rows(const ConvAbrelu& A) {
  const ConvAbreluConst<V8> C(A);
#ifdef __AVX512F__
  const ConvAbreluConst<V16> C16(A);
#endif
  const int fw = A.fw, lh = A.lh, ls = A.ls, es = A.es, nw = A.nw;
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
      // Whole blocks of U vectors of V while they fit, widest first, then a 4-entry tail.
      int j = 0;
      auto blocks = [&](auto v, auto u, const auto& c) {
        using V = typename decltype(v)::type;
        constexpr int U = decltype(u)::value;
        for (; j + V::N * U <= nw; j += V::N * U)
          conv_abrelu_block<V, U, false, FW, NTK, TLIVE, PLAIN, NORM>(edr, etr, q11, q22, A.mwi,
                                                                     dr, tr, j, fw, c);
      };
#ifdef __AVX512F__
      blocks(VecTag<V16>(), std::integral_constant<int, 2>(), C16);
      blocks(VecTag<V16>(), std::integral_constant<int, 1>(), C16);
#endif
      blocks(VecTag<V8>(), std::integral_constant<int, 2>(), C);
      blocks(VecTag<V8>(), std::integral_constant<int, 1>(), C);
      if (j < nw)  // nw is a multiple of 4
        conv_abrelu_block<V8, 1, true, FW, NTK, TLIVE, PLAIN, NORM>(edr, etr, q11, q22, A.mwi,
                                                                    dr, tr, j, fw, C);
      j0 = nw;
    }
    for (int j = j0; j < ls; ++j) dr[j] = 0.0f;
    if (NTK)
      for (int j = j0; j < ls; ++j) tr[j] = 0.0f;
  }
}

// The register path's block width for nw computed columns of lw (0: not applicable): 16 where
// this translation unit has AVX-512 and the row has whole 16-column blocks, else 8.
inline int conv3_vec(int nw, int lw) {
  if (nw > lw) return 0;
#ifdef __AVX512F__
  if (nw % 16 == 0 && nw >= 16) return 16;
#endif
  return nw % 8 == 0 && nw >= 8 ? 8 : 0;
}

// FW: 3 or 0 (any width) for the two-pass form, kConv3Reg for the register path (in blocks of
// A.vec columns).
constexpr int kConv3Reg = -3;

template <int FW, bool NTK, bool TLIVE, bool PLAIN, bool NORM>
void conv_abrelu_plane_t(const ConvAbrelu& A) {
  if constexpr (FW == kConv3Reg) {
#ifdef __AVX512F__
    if (A.vec == 16) {
      conv3_abrelu_rows<V16, NTK, TLIVE, PLAIN, NORM>(A, ConvAbreluConst<V16>(A));
      return;
    }
#endif
    conv3_abrelu_rows<V8, NTK, TLIVE, PLAIN, NORM>(A, ConvAbreluConst<V8>(A));
  } else {
    conv_abrelu_rows<FW, NTK, TLIVE, PLAIN, NORM>(A);
  }
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

// norm: false only where both variance maps are map_safe (see abrelu).
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
}  // namespace NTF_SIMD_NS
}  // namespace cpu
}  // namespace ntf

// ntfast — per-entry math of the fused CNN kernel, shared by the C++ CPU handler and the CUDA
// kernel (so the CPU numerics tests also check the GPU's per-entry math, DESIGN §3 proof 4).
// Definition: ntfast/ops/fused_cnn.py (`_affine`, `_run_steps`, `_variance_chain`) and
// ntfast/ops/nonlin.py (abrelu/erf/gelu expectations). Every formula keeps nonlin.py's f32-safe
// numerics: the Gram matrix is normalized by m = max(q11, q22, |q12|) (no q11·q22 overflow, NT
// #197), the determinant is clamped at 0, angles come from a branch-free atan2 (Cephes rational,
// the same coefficients as nonlin.atan2_nonneg) so loops over entries vectorize.
//
// API (stable; all `NTF_HD inline`, templated on T = float | double, compute in T):
//
//   T ntf::atan2_nonneg(T y, T x)          atan2 for y >= 0 (0 at the origin), in [0, π].
//   T ntf::atan2_signed(T y, T x)          atan2 for x > 0 or y >= 0 (sign of y restored).
//   void ntf::abrelu_expectation(T q12, T q11, T q22, T a, T b, T* nngp, T* dot)
//   void ntf::erf_expectation(T q12, T q11, T q22, T a, T b, T c, T* nngp, T* dot)
//   void ntf::gelu_expectation(T q12, T q11, T q22, T* nngp, T* dot)
//        nngp = E[f(u) f(v)] (output scales folded in), dot = Σ̇ = E[f'(u) f'(v)] (the NTK
//        factor: ntk' = ntk · dot) for (u, v) ~ N(0, [[q11, q12], [q12, q22]]).
//   T ntf::nonlin_expectation(int code, T p0, T p1, T p2, T q12, T q11, T q22, T* dot)
//        dispatch on the NONLIN_* code (per entry; hoist the switch out of hot loops).
//   struct ntf::AffineCoef<T> { T wd, b, td, tt, tc; }
//   AffineCoef<T> ntf::affine_coef<T>(const Step& s, double box_scale)
//        coefficients of a conv/dense step applied to UNNORMALIZED box sums (box_scale =
//        1/(fh·fw) for a conv, 1 for a dense step):
//          nngp' = (wd·Σd + b)·mask,  ntk' = (td·Σd + tt·Σt + tc)·mask
//        NTK param: wd = td = w/f, tt = w/f, tc = b.  Standard: wd = w/f, td = ntk_scale/f,
//        tt = w/f, tc = 1 if bias else 0   (fused_cnn.py `_affine`; NTK: nd + w·t·m).
//   void ntf::affine_apply(const AffineCoef<T>& c, T dsum, T tsum, T mask, T* d, T* t)
//   int ntf::packed_valid(int i, int delta, int L, int valid)
//        1 iff i < valid and (i + delta) mod L < valid (both positions of a packed entry).
//   T ntf::pool_divisor<T>(int size, int window, int stride, int padding, int normalize_edges,
//                          int out_index)
//        AvgPool normalizer d(i) of one axis (ntfast/ops/pool.py `window_divisors`).
#pragma once

#include <math.h>

#include "plan.h"

namespace ntf {

namespace detail {
NTF_HD inline float sqrt_(float x) { return sqrtf(x); }
NTF_HD inline double sqrt_(double x) { return sqrt(x); }
template <class T>
NTF_HD inline T abs_(T x) {
  return x < T(0) ? -x : x;
}
template <class T>
NTF_HD inline T max_(T a, T b) {
  return a > b ? a : b;
}
}  // namespace detail

constexpr double kPi = 3.141592653589793238462643383279502884;
constexpr double kTwoPi = 2.0 * kPi;

// atan2 for y >= 0: swap to t = num/den = min/max ∈ [0, 1], reduce t > 0.66 with
// atan t = π/4 + atan(u), u = (t − 1)/(t + 1) = (num − den)/(num + den), Cephes' rational
// atan(u) = u + u·z·P(z)/Q(z), undo the swap (π/2 − a) and the sign of x (π − a). Branch-free
// (selects only) so that it vectorizes, and one division for u whichever the range (divisions
// dominate the cost of a vectorized arc-cosine step).
template <class T>
NTF_HD inline T atan2_nonneg(T y, T x) {
  const T ax = detail::abs_(x);
  const bool big = y > ax;
  const T num = big ? ax : y;
  T den = big ? y : ax;
  den = den > T(0) ? den : T(1);
  const bool reduce = num > T(0.66) * den;
  const T u = (reduce ? num - den : num) / (reduce ? num + den : den);
  const T z = u * u;
  T p = T(-8.750608600031904122785e-1);
  p = p * z + T(-1.615753718733365076637e1);
  p = p * z + T(-7.500855792314704667340e1);
  p = p * z + T(-1.228866684490136173410e2);
  p = p * z + T(-6.485021904942025371773e1);
  T q = T(1.0);
  q = q * z + T(2.485846490142306297962e1);
  q = q * z + T(1.650270098316988542046e2);
  q = q * z + T(4.328810604912902668951e2);
  q = q * z + T(4.853903996359136964868e2);
  q = q * z + T(1.945506571482613964425e2);
  T a = u + u * z * (p / q);
  a = reduce ? a + T(kPi / 4) : a;
  a = big ? T(kPi / 2) - a : a;
  return x < T(0) ? T(kPi) - a : a;
}

// atan2 with the sign of y (callers here always have x > 0 or y >= 0).
template <class T>
NTF_HD inline T atan2_signed(T y, T x) {
  const T a = atan2_nonneg(detail::abs_(y), x);
  return y < T(0) ? -a : a;
}

// Normalized Gram matrix (nonlin.py `_gram`): m = max(q11, q22, |q12|) (1 if all vanish),
// c = q12/m, det = max(q11 q22 − q12², 0)/m² computed on the normalized entries.
template <class T>
NTF_HD inline void gram(T q12, T q11, T q22, T* m_out, T* c_out, T* det_out) {
  T m = detail::max_(detail::max_(q11, q22), detail::abs_(q12));
  m = m > T(0) ? m : T(1);
  // One reciprocal, three products (a division each would dominate the step). On the diagonal
  // (q11 = q22 = q12) a = b = c still holds exactly, so det stays ~ulp² (θ ~ ulp).
  const T inv = T(1) / m;
  const T a = q11 * inv, b = q22 * inv, c = q12 * inv;
  const T det = a * b - c * c;
  *m_out = m;
  *c_out = c;
  *det_out = detail::max_(det, T(0));
}

// sqrt(max(e + k·m²·det, 0)) without overflow of m² (nonlin.py `_sqrt_e_plus_kd`).
template <class T>
NTF_HD inline T sqrt_e_plus_kd(T e, T k, T m, T det) {
  const T mb = detail::max_(m, T(1));
  const T r = m / mb;
  return mb * detail::sqrt_(detail::max_(e / mb / mb + k * (r * r) * det, T(0)));
}

// f(x) = a·min(x, 0) + b·max(x, 0): q12' = (a−b)² k1 + ab·q12, Σ̇ = (a−b)² k0 + ab with the
// arc-cosine kernels k0 = (π − θ)/2π, k1 = m ((π − θ) c + sin)/2π, θ = atan2(√det, c)
// (π/2 at the origin, NT's convention).
template <class T>
NTF_HD inline void abrelu_expectation(T q12, T q11, T q22, T a, T b, T* nngp, T* dot) {
  T m, c, det;
  gram(q12, q11, q22, &m, &c, &det);
  const T sn = detail::sqrt_(det);
  // Both operands evaluated and a non-short-circuit `&`: a select, so the loop if-converts and
  // vectorizes (a `&&` leaves a branch that stops GCC's vectorizer).
  const T at = atan2_nonneg(sn, c);
  const bool origin = (sn == T(0)) & (c == T(0));
  const T theta = origin ? T(kPi / 2) : at;
  const T pm = T(kPi) - theta;
  const T k0 = pm * T(1 / kTwoPi);
  const T k1 = m * (pm * c + sn) * T(1 / kTwoPi);
  const T f = (a - b) * (a - b);
  *nngp = f * k1 + a * b * q12;
  *dot = f * k0 + a * b;
}

// f(x) = a·erf(b x) + c: with Q = b² q, δ = √((1+2Q11)(1+2Q22) − 4Q12²) ≥ 1,
// q12' = a² (2/π) atan2(2 Q12, δ) + c², Σ̇ = a² b² (4/π) / δ.
template <class T>
NTF_HD inline void erf_expectation(T q12, T q11, T q22, T a, T b, T c, T* nngp, T* dot) {
  const T b2 = b * b;
  q12 = b2 * q12;
  q11 = b2 * q11;
  q22 = b2 * q22;
  T m, cn, det;
  gram(q12, q11, q22, &m, &cn, &det);
  const T delta = sqrt_e_plus_kd(T(1) + T(2) * (q11 + q22), T(4), m, det);
  *nngp = a * a * T(2 / kPi) * atan2_signed(T(2) * q12, delta) + c * c;
  *dot = a * a * b2 * T(4 / kPi) / delta;
}

// f(x) = x Φ(x): δ² = (1+q11)(1+q22) − q12², r = q12/√((1+q11)(1+q22)),
// t = q11 q22/((1+q11)(1+q22)), φ = atan2(q12, δ):
// q12' = (r²/δ + t δ + q12 φ)/2π + q12/4,
// Σ̇ = (1/δ² + 1/((1+q11)(1+q22)) − t + 1) q12/(2π δ) + 1/4 + φ/2π.
template <class T>
NTF_HD inline void gelu_expectation(T q12, T q11, T q22, T* nngp, T* dot) {
  T m, cn, det;
  gram(q12, q11, q22, &m, &cn, &det);
  const T delta = sqrt_e_plus_kd(T(1) + q11 + q22, T(1), m, det);
  const T p1 = T(1) + q11, p2 = T(1) + q22;
  const T r = q12 / detail::sqrt_(p1) / detail::sqrt_(p2);
  const T t = (q11 / p1) * (q22 / p2);
  const T phi = atan2_signed(q12, delta);
  *nngp = (r * r / delta + t * delta + q12 * phi) / T(kTwoPi) + q12 / T(4);
  const T first = (T(1) / delta / delta + T(1) / p1 / p2 - t + T(1)) * q12 / (T(kTwoPi) * delta);
  *dot = first + T(0.25) + phi / T(kTwoPi);
}

template <class T>
NTF_HD inline T nonlin_expectation(int code, T p0, T p1, T p2, T q12, T q11, T q22, T* dot) {
  T out;
  switch (code) {
    case NONLIN_ABRELU: abrelu_expectation(q12, q11, q22, p0, p1, &out, dot); break;
    case NONLIN_ERF: erf_expectation(q12, q11, q22, p0, p1, p2, &out, dot); break;
    default: gelu_expectation(q12, q11, q22, &out, dot); break;
  }
  return out;
}

template <class T>
struct AffineCoef {
  T wd, b, td, tt, tc;
};

template <class T>
NTF_HD inline AffineCoef<T> affine_coef(const Step& s, double box_scale) {
  AffineCoef<T> c;
  const double b = s.has_b ? s.b_var : 0.0;
  c.wd = T(s.w_var * box_scale);
  c.b = T(b);
  c.tt = T(s.w_var * box_scale);
  if (s.standard) {
    c.td = T(s.ntk_scale * box_scale);
    c.tc = T(s.has_b ? 1.0 : 0.0);
  } else {
    c.td = c.wd;
    c.tc = c.b;
  }
  return c;
}

template <class T>
NTF_HD inline void affine_apply(const AffineCoef<T>& c, T dsum, T tsum, T mask, T* d, T* t) {
  *d = (c.wd * dsum + c.b) * mask;
  *t = (c.td * dsum + c.tt * tsum + c.tc) * mask;
}

NTF_HD inline int packed_valid(int i, int delta, int L, int valid) {
  int p = i + delta;
  p = p >= L ? p - L : p;
  return (i < valid) & (p < valid);
}

template <class T>
NTF_HD inline T pool_divisor(int size, int window, int stride, int padding, int normalize_edges,
                             int out_index) {
  if (padding != PAD_SAME || !normalize_edges) return T(window);
  const int lo = pool_lo(size, window, stride, padding);
  const int start = out_index * stride - lo;
  const int hi = start + window < size ? start + window : size;
  const int lo_in = start > 0 ? start : 0;
  const int inside = hi - lo_in;
  return T(inside > 0 ? inside : 0);
}

}  // namespace ntf

"""Portable, accurate math helpers for the Triton kernels (f32 and f64).

The Triton interpreter has no ``libdevice`` (``atan2``, ``acos``, ``erfc``, ``pow`` ... fail there),
and on the GPU the default f32 lowering of ``/``, ``sqrt`` and ``exp`` is approximate
(``div.full``, ``sqrt.approx``, ``ex2.approx``: a few ulp, ``exp``'s error growing with ``|x|``).
Each helper here is built only from primitives that run in both places and is correctly rounded
or within ~1-2 ulp over its whole input range in both dtypes (proved against numpy by
``tests/triton/test_math.py``):

- :func:`div`, :func:`sqrt`, :func:`recip`: IEEE round-to-nearest in f32 (``div_rn``,
  ``sqrt_rn``) and f64 (the f64 operators are already IEEE);
- :func:`atan2`: octant reduction ``a = min(|x|, |y|) / max(|x|, |y|) ∈ [0, 1]``, then
  ``a > tan(π/8)`` maps to ``π/4 + atan((a − 1)/(a + 1))`` so the odd polynomial
  ``atan t = t + t·z·P(z)``, ``z = t²``, runs on ``|t| ≤ tan(π/8)``; ``P`` is a weighted
  minimax fit (degree 4 for f32, 10 for f64; fit error 7e-10 resp. 1.3e-18 relative). The
  rounding errors of the reductions are carried along (error-free transformations) and the
  quadrant constant is added without error, so the result is within 1 ulp;
- :func:`exp`: f64 uses ``tl.exp`` (libdevice-accurate on the GPU); f32 uses Cody–Waite
  reduction ``x = k ln2 + r``, ``|r| ≤ ln2/2``, ``exp r = 1 + r + r² Q(r)`` (minimax degree 4,
  3e-9 relative), scaled by ``2^k`` built exactly from exponent bits (two factors, so that
  gradual underflow rounds once).

All helpers take tensors (not Python scalars) as the argument that fixes the dtype.
"""

import triton
import triton.language as tl


@triton.jit
def div(a, b):
    """``a / b`` correctly rounded in f32 and f64 (``a`` a tensor: it fixes the dtype)."""
    if a.dtype == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def recip(x):
    """``1 / x`` correctly rounded."""
    return div(tl.full(x.shape, 1.0, x.dtype), x)


@triton.jit
def sqrt(x):
    """``sqrt(x)`` correctly rounded (NaN for ``x < 0``)."""
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _signbit(x):
    if x.dtype == tl.float64:
        return x.to(tl.int64, bitcast=True) < 0
    else:
        return x.to(tl.int32, bitcast=True) < 0


@triton.jit
def _fast_two_sum(a, b):
    """``(s, e)`` with ``s = fl(a + b)`` and ``a + b = s + e`` exactly, for ``|a| >= |b|`` or a = 0."""
    s = a + b
    return s, b - (s - a)


@triton.jit
def atan2(y, x):
    """``atan2(y, x) ∈ [−π, π]`` within 1 ulp, numpy's conventions for signed zeros.

    ``atan(a)``, ``a = lo/hi``, is carried as ``head + tail``: ``head`` = ``a`` or, above
    tan(π/8), ``t = (a − 1)/(a + 1)`` (with ``π/4`` added); ``tail`` = the polynomial part plus
    the rounding errors of ``a`` and ``t`` (exact remainders by fma / Fast2Sum, propagated
    through ``d atan``). The quadrant constant ``k·π/4`` (``k ∈ 0..4``, ``π/4`` split so that
    ``k·C1`` is exact) is added to ``±head`` by an error-free Fast2Sum, so only the last rounding
    and the tail's tiny error remain. Both infinite gives NaN (numpy: odd multiples of π/4);
    NaN propagates.
    """
    ax = tl.abs(x)
    ay = tl.abs(y)
    hi = tl.maximum(ax, ay, propagate_nan=tl.PropagateNan.ALL)
    lo = tl.minimum(ax, ay, propagate_nan=tl.PropagateNan.ALL)
    # Constants live in tl.constexpr: a Python float assigned to a plain local becomes an f32
    # tensor (rounded) in both the compiler and the interpreter.
    if y.dtype == tl.float64:
        finite_max: tl.constexpr = 1.7976931348623157e308
    else:
        finite_max: tl.constexpr = 3.4028234663852886e38
    den0 = tl.where(hi > 0, hi, 1.0)
    a = div(lo, den0)
    # lo/hi = a + a_rem to second order (the fma remainder is exact; 0 for infinite hi).
    a_rem = tl.where(hi <= finite_max, tl.fma(-a, den0, lo) / den0, 0.0)
    big = a > 0.41421356237309503  # tan(π/8)
    num, num_err = _fast_two_sum(-1.0, a)
    den, den_err = _fast_two_sum(1.0, a)
    t_big = div(num, den)
    rem = tl.fma(-t_big, den, num) + num_err - t_big * den_err + a_rem * (1.0 - t_big)
    t = tl.where(big, t_big, a)
    t_rem = tl.where(big, rem / den, a_rem)
    z = t * t
    if y.dtype == tl.float64:
        p = tl.fma(z, -0.0179215847067446, 0.038077675667010286)
        p = tl.fma(p, z, -0.05039819691412403)
        p = tl.fma(p, z, 0.0584800309845075)
        p = tl.fma(p, z, -0.06663119573870771)
        p = tl.fma(p, z, 0.07692061565162032)
        p = tl.fma(p, z, -0.09090897832384587)
        p = tl.fma(p, z, 0.11111110785996801)
        p = tl.fma(p, z, -0.1428571428024572)
        p = tl.fma(p, z, 0.19999999999954055)
        p = tl.fma(p, z, -0.333333333333332)
        pi4_hi: tl.constexpr = 0.7853981633974483  # 3·pi4_hi is exact
        pi4_lo: tl.constexpr = 3.061616997868383e-17
    else:
        p = tl.fma(z, -0.060834355652332306, 0.1059599369764328)
        p = tl.fma(p, z, -0.14243847131729126)
        p = tl.fma(p, z, 0.19998489320278168)
        p = tl.fma(p, z, -0.33333316445350647)
        pi4_hi: tl.constexpr = 0.785398006439209  # 21 significant bits: 3·pi4_hi is exact
        pi4_lo: tl.constexpr = 1.5695823663008923e-07
    tail = tl.fma(t * z, p, t_rem / (1.0 + z))  # atan(t + t_rem) − t
    # atan2 = k·π/4 + sgn·atan(a): swap (|y| > |x|) reflects about π/2, x < 0 about π.
    k = big.to(t.dtype)
    sgn = tl.full(t.shape, 1.0, t.dtype)
    swap = ay > ax
    k = tl.where(swap, 2.0 - k, k)
    sgn = tl.where(swap, -sgn, sgn)
    neg_x = _signbit(x)
    k = tl.where(neg_x, 4.0 - k, k)
    sgn = tl.where(neg_x, -sgn, sgn)
    head, err = _fast_two_sum(k * pi4_hi, sgn * t)
    r = head + ((err + k * pi4_lo) + sgn * tail)
    return tl.where(_signbit(y), -r, r)


@triton.jit
def exp(x):
    """``e^x``: ``tl.exp`` in f64; in f32 a ≤ 1-ulp Cody–Waite + minimax version (see module doc)."""
    if x.dtype == tl.float64:
        return tl.exp(x)
    else:
        # Beyond [−104, 89] the result is 0 or inf in f32; the clamp keeps 2^k's exponents valid.
        nan: tl.constexpr = tl.PropagateNan.ALL
        xc = tl.minimum(tl.maximum(x, -104.0, propagate_nan=nan), 89.0, propagate_nan=nan)
        k = tl.floor(xc * 1.4426950408889634 + 0.5)
        r = tl.fma(k, -0.6931471824645996, xc)
        r = tl.fma(k, 1.904654299957768e-09, r)  # ln2 = 0.6931471824645996 − 1.9046543e-9
        q = tl.fma(r, 0.0013814608100801706, 0.008368710055947304)
        q = tl.fma(q, r, 0.04166838899254799)
        q = tl.fma(q, r, 0.1666652113199234)
        q = tl.fma(q, r, 0.4999999403953552)
        e = tl.fma(r * r, q, r) + 1.0
        ki = k.to(tl.int32)
        k1 = ki >> 1
        s1 = ((k1 + 127) << 23).to(tl.float32, bitcast=True)
        s2 = ((ki - k1 + 127) << 23).to(tl.float32, bitcast=True)
        return e * s1 * s2

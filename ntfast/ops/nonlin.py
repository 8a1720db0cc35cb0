"""Hot op family ``nonlin_<kind>``: Gaussian expectations of elementwise nonlinearities.

For ``(u, v) ~ N(0, [[q11, q12], [q12, q22]])`` and a nonlinearity ``f`` each op computes

    q12' = E[f(u) f(v)]          (the new covariance: nngp, or cov1/cov2 entries)
    Σ̇    = E[f'(u) f'(v)]        (the derivative kernel; NTK: Θ' = Θ · Σ̇)

elementwise over arrays. One op name per family, every backend implements exactly::

    nonlin_<kind>(q12, q11, q22, ntk=None, **params) -> (q12_new, ntk_new)

- ``q12``: covariances in any layout (``nngp`` ``(N1, N2, H, H', W, W')``, ``(N1, N2, H, W)``,
  ``cov1`` ``(N1, H, H', W, W')`` ...); ``q11``, ``q22``: the variances of the two sides, any
  shapes that broadcast to ``q12.shape`` without enlarging it (e.g. ``(N1, 1, H, 1, W, 1)`` and
  ``(1, N2, 1, H, 1, W)``: stride-0 views a kernel can exploit). Same float dtype.
- ``ntk``: ``None`` (NNGP only: ``ntk_new`` is ``None`` and Σ̇ is not computed) or an array
  broadcastable with ``q12``; ``ntk_new = ntk · Σ̇`` (zeros where the family's Σ̇ is defined as 0).
  Pass ``ntk=ones`` to get Σ̇ itself.
- ``params``: static Python scalars / tuples / callables, listed per kind in :data:`KINDS`.

The diagonal entries of a per-sample, per-location variance map (``cov1`` when the kernel is
both batch- and spatially-diagonal) use :func:`nonlin_variance` ``E[f(u)^2], u ~ N(0, q)``: the
formula at ``q12 = q11 = q22`` simplified (O(N·S) work, not dispatched).

============================  ==========================  ==================================
kind                          params                      layers (NT 0.6.5 names)
============================  ==========================  ==================================
``abrelu``                    ``a, b``                    ABRelu, Relu, LeakyRelu, Abs
``erf``                       ``a, b, c``                 Erf, Sigmoid_like
``gelu``                      --                          Gelu
``sin``                       ``a, b, c``                 Sin, Cos (``c + π/2``)
``rbf``                       ``gamma``                   Rbf
``exp``                       ``a, b``                    Exp
``gaussian``                  ``a, b``                    Gaussian
``gabor``                     --                          Gabor
``exp_normalized``            ``gamma, shift, do_clip``   ExpNormalized
``sign``                      --                          Sign
``hermite``                   ``degree``                  Hermite
``monomial``                  ``degree``                  Monomial
``rectified_monomial``        ``degree``                  RectifiedMonomial
``polynomial``                ``coef`` (tuple)            Polynomial
``elementwise``               ``nngp_fn, d_nngp_fn``      Elementwise
``numerical``                 ``fn, deg, df``             ElementwiseNumerical
============================  ==========================  ==================================

Output scales (``a`` of Erf/Exp/Gaussian, ``c`` of Erf) are folded in, so each op is the whole
layer's covariance map: e.g. ``erf`` returns ``a²·E[erf(bu) erf(bv)] + c²`` and Θ·a²b²·E[erf'erf'].

Numerics (why this is not a transcription of NT's formulas):

- The angle family (ABRelu, Sign, RectifiedMonomial) is built on the arc-cosine kernels
  ``k_d = (√q11 √q22)^d J_d(θ) / 2π`` (Cho & Saul 2009) evaluated from the *normalized* Gram matrix
  ``(q11, q22, q12) / m``, ``m = max(q11, q22, |q12|)``: no ``q11·q22`` product that overflows
  f32 (NT #197: deep/wide ReLU stacks turn NaN), the "cosine" is clipped by clamping the normalized
  determinant ``q11 q22 − q12² ≥ 0``, θ = atan2 (never an unclipped arccos: NT's RectifiedMonomial
  is NaN on the x1 == x2 diagonal), ``J_d`` is a closed-form polynomial in (cos θ, sin θ) for every
  degree, exact at θ = 0. Their derivatives are analytic (``custom_jvp``): ``∂k_d/∂q12 = d² k_{d-1}``
  (Price's theorem) and, by homogeneity, ``∂k_d/∂q11 = (d k_d − q12 ∂k_d/∂q12) / (2 q11)``. So
  gradients are finite on the diagonal and accurate near it (no cancelling 1/s terms).
- Smooth families use ``q11 q22 − q12²`` (clamped at 0, computed normalized) inside square
  roots of quantities ``≥ 1`` (Erf, Gelu, Gaussian with b < 0), with a scaled square root so that
  nothing overflows before the result does.
- Zero variances (all-zero inputs, padding) give finite values and gradients, with NT's
  conventions (θ = π/2 when q11 q22 = q12 = 0).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ntfast import backend as _backend

_PI = math.pi
_TWO_PI = 2 * math.pi


# ----------------------------------------------------------------------------------------------
# Safe primitives.


@jax.custom_jvp
def _safe_sqrt(x):
    """``sqrt(max(x, 0))`` whose derivative is 0 (not inf/NaN) where ``x <= 0``."""
    return jnp.sqrt(jnp.maximum(x, 0))


@_safe_sqrt.defjvp
def _safe_sqrt_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    y = _safe_sqrt(x)
    pos = x > 0
    return y, jnp.where(pos, dx / (2 * jnp.where(pos, y, 1)), 0)


# Cephes' rational approximation atan(u) = u + u·z·P(z)/Q(z), z = u², |u| ≤ 0.66 (double
# precision; also ~1 ulp in f32). Descending coefficients; Q is monic.
_ATAN_P = (
    -8.750608600031904122785e-1,
    -1.615753718733365076637e1,
    -7.500855792314704667340e1,
    -1.228866684490136173410e2,
    -6.485021904942025371773e1,
)
_ATAN_Q = (
    1.0,
    2.485846490142306297962e1,
    1.650270098316988542046e2,
    4.328810604912902668951e2,
    4.853903996359136964868e2,
    1.945506571482613964425e2,
)


def _horner(coef, z):
    out = jnp.full_like(z, coef[0])
    for c in coef[1:]:
        out = out * z + c
    return out


def atan2_nonneg(y, x):
    """``atan2(y, x)`` for ``y >= 0`` (an angle in ``[0, π]``) from arithmetic only.

    XLA's CPU ``atan2`` is a scalar libm call (~14 ns per f32 entry, the whole cost of a ReLU
    kernel step); this vectorizes: swap to ``t = min/max ∈ [0, 1]``, reduce ``t > 0.66`` by
    ``atan t = π/4 + atan((t−1)/(t+1))``, Cephes' rational function, then undo the swap
    (``π/2 − a``) and the sign of ``x`` (``π − a``). Accuracy: ≤ 2 ulp in f64 and f32
    (tests/ops/test_nonlin.py). ``(0, 0)`` gives 0 (callers fill it).
    """
    ax = jnp.abs(x)
    big = y > ax
    num = jnp.where(big, ax, y)
    den = jnp.where(big, y, ax)
    t = num / jnp.where(den > 0, den, 1)
    reduce = t > 0.66
    u = jnp.where(reduce, (t - 1) / (t + 1), t)
    z = u * u
    a = u + u * z * (_horner(_ATAN_P, z) / _horner(_ATAN_Q, z))
    a = jnp.where(reduce, a + _PI / 4, a)
    a = jnp.where(big, _PI / 2 - a, a)
    return jnp.where(x < 0, _PI - a, a)


def atan2(y, x):
    """``atan2(y, x)`` for any signs (``copysign`` of :func:`atan2_nonneg` of ``|y|``)."""
    return jnp.copysign(atan2_nonneg(jnp.abs(y), x), y)


@jax.custom_jvp
def _atan2_fill(y, x):
    """``atan2(y, x)`` for ``y >= 0``, π/2 at the origin (NT's ``fill_zero``); derivative 0 there."""
    return jnp.where((y == 0) & (x == 0), _PI / 2, atan2_nonneg(y, x))


@_atan2_fill.defjvp
def _atan2_fill_jvp(primals, tangents):
    (y, x), (dy, dx) = primals, tangents
    r2 = x * x + y * y
    pos = r2 > 0
    return _atan2_fill(y, x), jnp.where(pos, (x * dy - y * dx) / jnp.where(pos, r2, 1), 0)


def _gram(q12, q11, q22):
    """Normalized Gram matrix: ``(m, a, b, c, det)`` with ``(a, b, c) = (q11, q22, q12) / m``.

    ``m = max(q11, q22, |q12|)`` (1 if all vanish), ``det = max(a·b − c², 0)`` so that
    ``q11 q22 − q12² = m² det`` without forming the (overflowing) products. The clamp (|ρ| ≤ 1)
    is value-only: ``det`` keeps the gradient of ``a·b − c²``, which the smooth families need on
    the |ρ| = 1 boundary where rounding may push ``a·b − c²`` a hair below 0.
    """
    # m is a constant for differentiation: m² (a b − c²) = q11 q22 − q12² for any m, and
    # d(q/m)/dm = −q/m² would overflow f32 for tiny m.
    m = lax.stop_gradient(jnp.maximum(jnp.maximum(q11, q22), jnp.abs(q12)))
    m = jnp.where(m > 0, m, 1)
    a, b, c = q11 / m, q22 / m, q12 / m
    det = a * b - c * c
    return m, a, b, c, det + lax.stop_gradient(jnp.maximum(det, 0) - det)


def _sqrt_e_plus_kd(e, k, m, det):
    """``sqrt(max(e + k·m²·det, 0))`` without overflow of ``m²`` (m ≥ 1 is factored out)."""
    mb = jnp.maximum(m, 1)
    r = m / mb
    return mb * _safe_sqrt(e / mb / mb + k * (r * r) * det)


def _where_pos(cond, num, den):
    """``num / den`` where ``cond`` else 0, with a gradient-safe denominator."""
    return jnp.where(cond, num / jnp.where(cond, den, 1), 0)


# ----------------------------------------------------------------------------------------------
# Arc-cosine kernels k_d (Cho & Saul 2009): E[relu(u)^d relu(v)^d] = k_d.


@functools.cache
def _arccos_polys(degree: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Coefficients (ascending in cos θ) of ``A_d``, ``B_d`` with
    ``J_d(θ) = (−1)^d [(π − θ) A_d(cos θ) + sin θ · B_d(cos θ)]``.

    ``J_d = (−1)^d sin^{2d+1}θ · ((1/sin θ) d/dθ)^d ((π − θ)/sin θ)``; writing the iterate as
    ``(π−θ) A / sin^{2k+1} + B / sin^{2k}`` and differentiating gives, with ``c = cos θ``,
    ``A ← −[(1 − c²) A' + (2k+1) c A]``, ``B ← −A − (1 − c²) B' − 2k c B``, from ``A = 1, B = 0``.
    ``A_d`` has the parity of d and ``B_d`` that of d − 1 (used to homogenize below).
    """
    pa, pb = np.polynomial.Polynomial([1]), np.polynomial.Polynomial([0])
    one_minus_c2 = np.polynomial.Polynomial([1, 0, -1])
    c = np.polynomial.Polynomial([0, 1])
    for k in range(degree):
        pa, pb = (
            -(one_minus_c2 * pa.deriv() + (2 * k + 1) * c * pa),
            -pa - one_minus_c2 * pb.deriv() - 2 * k * c * pb,
        )
    coef = lambda p, n: tuple(float(v) for v in np.pad(p.coef, (0, n))[:n])
    return coef(pa, degree + 1), coef(pb, max(degree, 1))


def _homogeneous(coef, c, h2, degree):
    """``Σ_j coef[j] c^j h2^((degree − j)/2)`` over the j of the parity of ``degree``:
    ``hyp^degree · P(c / hyp)`` for ``h2 = hyp²`` without dividing by ``hyp``."""
    out = jnp.zeros_like(c)
    for j in range(degree, -1, -2):
        if j < len(coef) and coef[j] != 0:
            out = out + coef[j] * c**j * h2 ** ((degree - j) // 2)
    return out


def _arccos_parts(q12, q11, q22):
    m, _, _, c, det = _gram(q12, q11, q22)
    sn = _safe_sqrt(det)
    return m, c, sn, _atan2_fill(sn, c)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _arccos_kernels(q12, q11, q22, degree):
    """``(k_0, ..., k_degree)``, ``k_d = (√q11 √q22)^d J_d(θ) / 2π``, for pre-broadcast arrays.

    One angle evaluation serves every degree (ABRelu needs k_1 for nngp and k_0 for Σ̇).
    Normalized: ``(√q11 √q22)^d J_d = m^d (−1)^d [(π−θ) hyp^d A_d(c/hyp) + sn hyp^{d−1} B_d(c/hyp)]``
    with ``sn = √det``, ``hyp² = sn² + c²``; both terms are polynomials in ``(c, hyp²)``.
    """
    m, c, sn, theta = _arccos_parts(q12, q11, q22)
    out = [(_PI - theta) / _TWO_PI]
    h2 = sn * sn + c * c
    for d in range(1, degree + 1):
        pa, pb = _arccos_polys(d)
        j = (_PI - theta) * _homogeneous(pa, c, h2, d) + sn * _homogeneous(pb, c, h2, d - 1)
        out.append((-1) ** d * m**d * j / _TWO_PI)
    return tuple(out)


@_arccos_kernels.defjvp
def _arccos_kernels_jvp(degree, primals, tangents):
    (q12, q11, q22), (t12, t11, t22) = primals, tangents
    ks = _arccos_kernels(q12, q11, q22, degree)
    # ∂k_0/∂q12 = −(1/2π) ∂θ/∂q12 = 1/(2π s): infinite on the diagonal; 0 there, as NT's safe
    # sqrt gives. Price's theorem for d ≥ 1: ∂k_d/∂q12 = d² k_{d−1}.
    m, _, sn, _ = _arccos_parts(q12, q11, q22)
    s = m * sn
    out = []
    for d, k in enumerate(ks):
        d12 = d * d * ks[d - 1] if d >= 1 else _where_pos(s > 0, 1 / _TWO_PI, s)
        # Homogeneity k(t² q11, t q12, q22) = t^d k  =>  2 q11 ∂k/∂q11 + q12 ∂k/∂q12 = d k.
        d11 = _where_pos(q11 > 0, d * k - q12 * d12, 2 * q11)
        d22 = _where_pos(q22 > 0, d * k - q12 * d12, 2 * q22)
        out.append(d12 * t12 + d11 * t11 + d22 * t22)
    return ks, tuple(out)


def arccos_kernels(q12, q11, q22, degree: int) -> tuple:
    """Arc-cosine kernels ``(k_0, ..., k_degree)``: ``k_d = E[relu(u)^d relu(v)^d]``, k_0 the
    step-function kernel ``(π − θ)/2π``. Inputs broadcast; gradients analytic (see module doc)."""
    q12, q11, q22 = jnp.broadcast_arrays(q12, q11, q22)
    return _arccos_kernels(q12, q11, q22, int(degree))


def arccos_kernel(q12, q11, q22, degree: int):
    """Arc-cosine kernel of integer ``degree >= 0``: ``E[relu(u)^d relu(v)^d]`` (d = 0: step)."""
    return arccos_kernels(q12, q11, q22, degree)[-1]


def _double_factorial(n: int) -> int:
    return math.prod(range(n, 0, -2))


def _times(ntk, dot_sigma):
    return None if ntk is None else ntk * dot_sigma


def _zeros(ntk):
    return None if ntk is None else jnp.zeros_like(ntk)


# ----------------------------------------------------------------------------------------------
# XLA references: (q12, q11, q22, ntk=None, **params) -> (q12', ntk · Σ̇), and E[f(u)²].


def abrelu_expectation(q12, q11, q22, ntk=None, *, a, b):
    """``f(x) = a·min(x, 0) + b·max(x, 0)``: ``q12' = (a−b)² k_1 + ab·q12``,
    ``Σ̇ = (a−b)² k_0 + ab = (a² + b²)/2 − (a−b)² θ / 2π`` (Cho & Saul; arXiv:1711.09090)."""
    f = (a - b) ** 2
    k0, k1 = arccos_kernels(q12, q11, q22, 1)
    new = f * k1 + a * b * q12
    return new, _times(ntk, f * k0 + a * b)


def abrelu_variance(q, *, a, b):
    return (a * a + b * b) / 2 * q


def sign_expectation(q12, q11, q22, ntk=None):
    """``f = sign``: ``q12' = 1 − 2θ/π``; Σ̇ := 0 (NT's convention; the true one is a δ-term)."""
    return 4 * arccos_kernel(q12, q11, q22, 0) - 1, _zeros(ntk)


def sign_variance(q):
    return jnp.where(q == 0, 0, 1).astype(q.dtype)


def rectified_monomial_expectation(q12, q11, q22, ntk=None, *, degree):
    """``f(x) = (x ≥ 0) x^d``: ``q12' = k_d``, ``Σ̇ = d² k_{d−1}`` (d = 0: Σ̇ := 0, as NT)."""
    ks = arccos_kernels(q12, q11, q22, degree)
    if ntk is None or degree == 0:
        return ks[-1], _zeros(ntk)
    return ks[-1], ntk * degree**2 * ks[-2]


def rectified_monomial_variance(q, *, degree):
    return _double_factorial(2 * degree - 1) * q**degree / 2


def erf_expectation(q12, q11, q22, ntk=None, *, a=1.0, b=1.0, c=0.0):
    """``f(x) = a·erf(b x) + c``; with ``Q = b² q``, ``δ = √((1+2Q11)(1+2Q22) − 4Q12²)``:
    ``q12' = a² (2/π) atan2(2 Q12, δ) + c²``, ``Σ̇ = a² b² (4/π) / δ`` (Williams 1997)."""
    b2 = b * b
    q12, q11, q22 = b2 * q12, b2 * q11, b2 * q22
    m, _, _, _, det = _gram(q12, q11, q22)
    delta = _sqrt_e_plus_kd(1 + 2 * (q11 + q22), 4, m, det)  # >= 1
    new = a * a * (2 / _PI) * atan2(2 * q12, delta) + c * c
    return new, _times(ntk, a * a * b2 * (4 / _PI) / delta)


def erf_variance(q, *, a=1.0, b=1.0, c=0.0):
    q = b * b * q
    return a * a * (2 / _PI) * atan2(q, jnp.sqrt(q + 0.25)) + c * c


def gelu_expectation(q12, q11, q22, ntk=None):
    """``f(x) = x Φ(x)`` (arXiv:2002.08517). With ``δ² = (1+q11)(1+q22) − q12²``,
    ``r = q12 / √((1+q11)(1+q22))``, ``t = q11 q22 / ((1+q11)(1+q22))``, ``φ = atan2(q12, δ)``:
    ``q12' = (r²/δ + t δ + q12 φ) / 2π + q12/4``,
    ``Σ̇ = (1/δ² + 1/((1+q11)(1+q22)) − t + 1) q12 / (2π δ) + 1/4 + φ / 2π``."""
    m, _, _, _, det = _gram(q12, q11, q22)
    delta = _sqrt_e_plus_kd(1 + q11 + q22, 1, m, det)  # >= 1
    p1, p2 = 1 + q11, 1 + q22
    r = q12 / jnp.sqrt(p1) / jnp.sqrt(p2)
    t = (q11 / p1) * (q22 / p2)
    phi = atan2(q12, delta)
    new = (r * r / delta + t * delta + q12 * phi) / _TWO_PI + q12 / 4
    if ntk is None:
        return new, None
    first = (1 / delta / delta + 1 / p1 / p2 - t + 1) * q12 / (_TWO_PI * delta)
    return new, ntk * (first + 0.25 + phi / _TWO_PI)


def gelu_variance(q):
    root = jnp.sqrt(1 + 2 * q)
    return q * ((q / ((q + 1) * root) + atan2(q, root) / 2) / _PI + 0.25)


def sin_expectation(q12, q11, q22, ntk=None, *, a=1.0, b=1.0, c=0.0):
    """``f(x) = a sin(b x + c)``: with ``s± = exp(−b²(q11 + q22)/2 ± b² q12)``,
    ``q12' = a²/2 (s+ − s− cos 2c)``, ``Σ̇ = a² b²/2 (s+ + s− cos 2c)``."""
    b2, half = b * b, (q11 + q22) / 2
    s_plus = jnp.exp(b2 * (q12 - half))
    s_minus = jnp.exp(-b2 * (q12 + half)) * math.cos(2 * c)
    new = a * a / 2 * (s_plus - s_minus)
    return new, _times(ntk, a * a * b2 / 2 * (s_plus + s_minus))


def sin_variance(q, *, a=1.0, b=1.0, c=0.0):
    return a * a / 2 * (1 - jnp.exp(-2 * b * b * q) * math.cos(2 * c))


def rbf_expectation(q12, q11, q22, ntk=None, *, gamma=1.0):
    """``f(x) = √2 sin(√(2γ) x + π/4)``: ``q12' = exp(−γ (q11 + q22 − 2 q12))``, ``Σ̇ = 2γ q12'``."""
    new = jnp.exp(gamma * (2 * q12 - q11 - q22))
    return new, _times(ntk, 2 * gamma * new)


def rbf_variance(q, *, gamma=1.0):
    return jnp.ones_like(q)


def exp_expectation(q12, q11, q22, ntk=None, *, a=1.0, b=1.0):
    """``f(x) = a exp(b x)``: ``q12' = a² exp(b² ((q11 + q22)/2 + q12))``, ``Σ̇ = b² q12'``."""
    new = a * a * jnp.exp(b * b * ((q11 + q22) / 2 + q12))
    return new, _times(ntk, b * b * new)


def exp_variance(q, *, a=1.0, b=1.0):
    return a * a * jnp.exp(2 * b * b * q)


def gaussian_expectation(q12, q11, q22, ntk=None, *, a=1.0, b=-1.0):
    """``f(x) = a exp(b x²)``: ``δ = √((1 − 2b q11)(1 − 2b q22) − 4b² q12²)``,
    ``q12' = a²/δ``, ``Σ̇ = 4 a² b² q12 / δ³`` (∞ where the integral diverges, b > 0, as NT)."""
    m, _, _, _, det = _gram(q12, q11, q22)
    delta = _sqrt_e_plus_kd(1 - 2 * b * (q11 + q22), 4 * b * b, m, det)
    inv = 1 / delta
    return a * a * inv, _times(ntk, 4 * a * a * b * b * q12 * inv**3)


def gaussian_variance(q, *, a=1.0, b=-1.0):
    return a * a / _safe_sqrt(1 - 4 * b * q)


def gabor_expectation(q12, q11, q22, ntk=None):
    """``f(x) = exp(−x²) sin x``; with ``Δ = 4 (q11 q22 − q12²)``, ``S = q11 + q22``,
    ``D = 2S + Δ + 1``: ``q12' = e^{−(S + Δ + 2 q12)/2D} (e^{2 q12 / D} − 1) / (2 √D)`` and
    ``Σ̇ = e^{−(S+Δ+2q12)/2D} (L + e^{2q12/D} R) / (2 D^{5/2})`` with
    ``L, R = 1 + 2S + 4 (q12² + q11 q22) ∓ 4 q12 (Δ + 3S + 2)`` (arXiv:2209.04121)."""
    m, _, _, _, det = _gram(q12, q11, q22)
    diff = 4 * (m * m) * det
    s = q11 + q22
    denom = 2 * s + diff + 1
    exp_left = jnp.exp(-(s + diff + 2 * q12) / (2 * denom))
    exp_right = jnp.exp(2 * q12 / denom)
    new = exp_left * (exp_right - 1) / (2 * jnp.sqrt(denom))
    if ntk is None:
        return new, None
    shared = 1 + 2 * s + 4 * (q12 * q12 + q11 * q22)
    cross = 4 * q12 * (diff + 3 * s + 2)
    dot = exp_left * ((shared - cross) + exp_right * (shared + cross)) / denom**2.5 / 2
    return new, ntk * dot


def gabor_variance(q):
    denom = 1 + 4 * q
    return (1 - jnp.exp(-2 * q / denom)) / (2 * jnp.sqrt(denom))


_EXP_NORMALIZED_TOL = 1e-15  # NT: sqrt(max(q11 q22, 1e-30))


def exp_normalized_expectation(q12, q11, q22, ntk=None, *, gamma=1.0, shift=-1.0, do_clip=False):
    """ "Gaussian normalized kernel" (arXiv:2003.02237): ``n = max(√q11 √q22, 1e-15)``,
    ``ρ = q12 / n`` (clipped to [−1, 1] if ``do_clip``): ``q12' = n exp(γ (ρ + shift))``,
    ``Σ̇ = γ exp(γ (ρ + shift))``."""
    norm = _safe_sqrt(q11) * _safe_sqrt(q22)
    norm = jnp.where(norm > _EXP_NORMALIZED_TOL, norm, _EXP_NORMALIZED_TOL)
    rho = q12 / norm
    if do_clip:
        rho = jnp.clip(rho, -1, 1)
    e = jnp.exp(gamma * (rho + shift))
    return norm * e, _times(ntk, gamma * e)


def exp_normalized_variance(q, *, gamma=1.0, shift=-1.0, do_clip=False):
    return exp_normalized_expectation(q, q, q, gamma=gamma, shift=shift, do_clip=do_clip)[0]


def hermite_expectation(q12, q11, q22, ntk=None, *, degree):
    """Normalized Hermite ``He_d(x)/√d!`` for unit-variance inputs: ``q12' = q12^d``,
    ``Σ̇ = d q12^{d−1}`` (NT's convention; ``q11``, ``q22`` are assumed 1 and unused)."""
    if ntk is None or degree == 0:
        return q12**degree, _zeros(ntk)
    return q12**degree, ntk * degree * q12 ** (degree - 1)


def hermite_variance(q, *, degree):
    return q**degree


def _monomial_moment(q12, prod, degree):
    """``E[u^d v^d]`` in terms of ``q12`` and ``prod = q11 q22`` (Isserlis), ``d ≤ 5``."""
    if degree < 0:
        return jnp.zeros_like(q12)
    if degree == 0:
        return jnp.ones_like(q12)
    x2 = q12 * q12
    return {
        1: lambda: q12,
        2: lambda: 2 * x2 + prod,
        3: lambda: q12 * (6 * x2 + 9 * prod),
        4: lambda: 3 * (8 * x2 * x2 + 3 * prod * (8 * x2 + prod)),
        5: lambda: 15 * q12 * (8 * x2 * x2 + 5 * prod * (8 * x2 + 3 * prod)),
    }[degree]()


def monomial_expectation(q12, q11, q22, ntk=None, *, degree):
    """``f(x) = x^d``, ``0 ≤ d ≤ 5``: Isserlis moments; ``Σ̇ = d² E[u^{d−1} v^{d−1}]``."""
    q12 = jnp.broadcast_to(q12, jnp.broadcast_shapes(q12.shape, q11.shape, q22.shape))
    prod = q11 * q22
    new = _monomial_moment(q12, prod, degree)
    return new, _times(ntk, degree**2 * _monomial_moment(q12, prod, degree - 1))


def monomial_variance(q, *, degree):
    return _double_factorial(2 * degree - 1) * q**degree


@functools.cache
def _polynomial_hermite_coefs(coef: tuple[float, ...]) -> tuple[tuple[float, ...], ...]:
    """``R_l`` (ascending in n) with ``f(√n z) = Σ_l √n^l R_l(n) He_l(z)/√l!``:
    ``R_l(n) = Σ_i coef[2i+l] (2i+l)! / (2^i i! √l!) n^i``."""
    deg = len(coef)
    out = []
    for l in range(deg):
        out.append(
            tuple(
                coef[2 * i + l]
                * math.factorial(2 * i + l)
                / (2**i * math.factorial(i) * math.sqrt(math.factorial(l)))
                for i in range((deg - 1 - l) // 2 + 1)
            )
        )
    return tuple(out)


def _polyval(coefs, x):
    out = jnp.zeros_like(x)
    for v in reversed(coefs):
        out = out * x + v
    return out


def polynomial_expectation(q12, q11, q22, ntk=None, *, coef):
    """``f(x) = Σ_j coef[j] x^j``: Hermite expansion, ``q12' = Σ_l R_l(q11) R_l(q22) q12^l``,
    ``Σ̇ = Σ_l l R_l(q11) R_l(q22) q12^{l−1}``: polynomials, exact for zero variances (NT divides
    by ``√(q11 q22)``)."""
    q12 = jnp.broadcast_to(q12, jnp.broadcast_shapes(q12.shape, q11.shape, q22.shape))
    new, dot = jnp.zeros_like(q12), jnp.zeros_like(q12)
    for l, r in enumerate(_polynomial_hermite_coefs(tuple(float(v) for v in coef))):
        rr = _polyval(r, q11) * _polyval(r, q22)
        new = new + rr * q12**l
        if l >= 1:
            dot = dot + l * rr * q12 ** (l - 1)
    return new, _times(ntk, dot)


def polynomial_variance(q, *, coef):
    out = jnp.zeros_like(q)
    for l, r in enumerate(_polynomial_hermite_coefs(tuple(float(v) for v in coef))):
        out = out + _polyval(r, q) ** 2 * q**l
    return out


def elementwise_expectation(q12, q11, q22, ntk=None, *, nngp_fn, d_nngp_fn=None):
    """User-provided ``nngp_fn(q12, q11, q22) = E[f(u) f(v)]`` and ``d_nngp_fn`` (= Σ̇); if
    ``d_nngp_fn`` is None it is ``∂ nngp_fn / ∂ q12`` by autodiff (Price's theorem)."""
    shape = jnp.broadcast_shapes(q12.shape, q11.shape, q22.shape)
    q12, q11, q22 = (jnp.broadcast_to(x, shape) for x in (q12, q11, q22))
    new = jnp.vectorize(nngp_fn)(q12, q11, q22)
    if ntk is None:
        return new, None
    d_fn = jnp.vectorize(jax.grad(nngp_fn)) if d_nngp_fn is None else jnp.vectorize(d_nngp_fn)
    return new, ntk * d_fn(q12, q11, q22)


def elementwise_variance(q, *, nngp_fn, d_nngp_fn=None):
    return jnp.vectorize(nngp_fn)(q, q, q)


_QUAD_TOL = 1e-30  # NT's floor on q11 / 2 before dividing by its square root


@functools.partial(jax.jit, static_argnums=(0, 1))
def _gauss_hermite_2d(g, deg, q12, q11, q22):
    """``(1/π) Σ_ij w_i w_j g(√(2q11) x_i) g(β x_i + γ x_j)`` for broadcast-equal arrays.

    Jitted with ``g`` static so that eager layers reuse the compiled loop across calls.
    """
    nodes, weights = np.polynomial.hermite.hermgauss(deg)
    xs, ws = jnp.asarray(nodes, q12.dtype), jnp.asarray(weights, q12.dtype)
    half = jnp.maximum(q11 / 2, _QUAD_TOL)
    u_scale = _safe_sqrt(2 * q11)
    beta = q12 / jnp.sqrt(half)
    gamma = _safe_sqrt(2 * (q22 - q12 * (q12 / (2 * half))))
    ys = xs.reshape((-1,) + (1,) * q12.ndim)

    def body(i, acc):
        inner = jnp.tensordot(ws, g(beta * xs[i] + gamma * ys), axes=(0, 0))
        return acc + ws[i] * g(u_scale * xs[i]) * inner

    return lax.fori_loop(0, deg, body, jnp.zeros_like(q12)) / _PI


def numerical_expectation(q12, q11, q22, ntk=None, *, fn, deg, df=None):
    """Gauss–Hermite quadrature of order ``deg`` (``deg²`` nodes) for any ``fn``:
    ``E[g(u) g(v)] ≈ (1/π) Σ_ij w_i w_j g(√(2q11) x_i) g(β x_i + γ x_j)`` with
    ``β = q12 / √(q11/2)``, ``γ = √(2 (q22 − q12²/q11))``; ``g = fn`` and, for Σ̇, ``g = df``
    (``grad(fn)`` if None). Loops over ``i`` so memory is ``deg × size``, not ``deg² × size``."""
    shape = jnp.broadcast_shapes(q12.shape, q11.shape, q22.shape)
    q12, q11, q22 = (jnp.broadcast_to(x, shape) for x in (q12, q11, q22))
    new = _gauss_hermite_2d(fn, int(deg), q12, q11, q22)
    if ntk is None:
        return new, None
    dfn = jnp.vectorize(jax.grad(fn)) if df is None else df
    return new, ntk * _gauss_hermite_2d(dfn, int(deg), q12, q11, q22)


def numerical_variance(q, *, fn, deg, df=None):
    nodes, weights = np.polynomial.hermite.hermgauss(int(deg))
    xs = jnp.asarray(nodes, q.dtype).reshape((-1,) + (1,) * q.ndim)
    ws = jnp.asarray(weights, q.dtype)
    return jnp.tensordot(ws, fn(_safe_sqrt(2 * q) * xs) ** 2, axes=(0, 0)) / math.sqrt(_PI)


# ----------------------------------------------------------------------------------------------
# Registry, dispatch.

KINDS: dict[str, tuple[Callable, Callable, tuple[str, ...]]] = {
    "abrelu": (abrelu_expectation, abrelu_variance, ("a", "b")),
    "erf": (erf_expectation, erf_variance, ("a", "b", "c")),
    "gelu": (gelu_expectation, gelu_variance, ()),
    "sin": (sin_expectation, sin_variance, ("a", "b", "c")),
    "rbf": (rbf_expectation, rbf_variance, ("gamma",)),
    "exp": (exp_expectation, exp_variance, ("a", "b")),
    "gaussian": (gaussian_expectation, gaussian_variance, ("a", "b")),
    "gabor": (gabor_expectation, gabor_variance, ()),
    "exp_normalized": (
        exp_normalized_expectation,
        exp_normalized_variance,
        ("gamma", "shift", "do_clip"),
    ),
    "sign": (sign_expectation, sign_variance, ()),
    "hermite": (hermite_expectation, hermite_variance, ("degree",)),
    "monomial": (monomial_expectation, monomial_variance, ("degree",)),
    "rectified_monomial": (
        rectified_monomial_expectation,
        rectified_monomial_variance,
        ("degree",),
    ),
    "polynomial": (polynomial_expectation, polynomial_variance, ("coef",)),
    "elementwise": (elementwise_expectation, elementwise_variance, ("nngp_fn", "d_nngp_fn")),
    "numerical": (numerical_expectation, numerical_variance, ("fn", "deg", "df")),
}
"""kind -> (XLA reference of ``nonlin_<kind>``, variance map, allowed static parameter names)."""

for _kind, (_ref, _, _) in KINDS.items():
    _backend.register(f"nonlin_{_kind}", "xla", _ref)


def op_name(kind: str) -> str:
    """The dispatch name of a kind's op (``"nonlin_<kind>"``)."""
    if kind not in KINDS:
        raise ValueError(f"`kind` must be one of {sorted(KINDS)}, got {kind!r}.")
    return f"nonlin_{kind}"


def _check_params(kind: str, params: dict) -> None:
    unknown = set(params) - set(KINDS[kind][2])
    if unknown:
        raise TypeError(
            f"nonlin kind {kind!r} got unexpected parameters {sorted(unknown)}; "
            f"allowed: {list(KINDS[kind][2])}."
        )


def nonlin(kind: str, q12, q11, q22, ntk=None, *, backend: str | None = None, **params):
    """``(q12', ntk · Σ̇)`` of the nonlinearity ``kind`` (see the module docstring).

    Args:
      kind: one of :data:`KINDS`.
      q12: covariances, any layout; q11, q22: variances broadcastable to ``q12.shape``.
      ntk: None or an array broadcastable with ``q12`` (the NTK entries to scale by Σ̇).
      backend: ``"auto" | "xla" | "triton" | "native"`` or None (current flag).
      **params: the kind's static parameters (Python scalars, tuples or callables).

    Returns:
      ``(q12_new, ntk_new)``; ``q12_new`` has ``q12``'s shape, ``ntk_new`` is None iff ``ntk`` is.
    """
    name = op_name(kind)
    _check_params(kind, params)
    q12, q11, q22 = (jnp.asarray(x) for x in (q12, q11, q22))
    shape = jnp.broadcast_shapes(q12.shape, q11.shape, q22.shape)
    if shape != q12.shape:
        raise ValueError(
            f"`q11` {q11.shape} and `q22` {q22.shape} must broadcast to `q12.shape` {q12.shape} "
            f"without enlarging it (got {shape})."
        )
    return _backend.dispatch(name, backend)(q12, q11, q22, ntk, **params)


def nonlin_variance(kind: str, q, **params):
    """``E[f(u)²], u ~ N(0, q)`` elementwise (the op at ``q12 = q11 = q22 = q``, simplified),
    with the same output scales as :func:`nonlin`. Per-sample work; not dispatched."""
    op_name(kind)
    _check_params(kind, params)
    return KINDS[kind][1](jnp.asarray(q), **params)


# ----------------------------------------------------------------------------------------------
# A nonlinearity fused with the next Dense layer (ops ``nonlin_affine_<kind>``).


def affine_terms(w_var, b_var, parameterization: str = "ntk", input_width=None) -> tuple:
    """``(w, b, t_e, t_c)`` of the Dense map after a nonlinearity: ``nngp' = w·E + b`` and
    ``ntk' = (t_e·E + t_c) + w·ntkΣ̇`` (``ntfast.stax.Dense``: NTK parameterization ``t_e, t_c =
    w, b``; standard ``t_e = input_width = N_in / s0``, ``t_c = 1`` if there is a bias else 0)."""
    b = 0.0 if b_var is None else b_var
    if parameterization == "ntk":
        return (w_var, b, w_var, b)
    if parameterization == "standard":
        if input_width is None:
            raise ValueError("`input_width` (N_in / s0) is required for 'standard'.")
        return (w_var, b, input_width, 0.0 if b_var is None else 1.0)
    raise ValueError(f"`parameterization` must be 'ntk' or 'standard', got {parameterization!r}.")


def apply_affine(new, ntk_dot, terms: tuple):
    """The Dense map ``terms = (w, b, t_e, t_c)`` (:func:`affine_terms`) applied to a
    nonlinearity's ``(E, ntk·Σ̇)``: ``(w·E + b, (t_e·E + t_c) + w·ntk·Σ̇)``."""
    w, b, t_e, t_c = terms
    return w * new + b, None if ntk_dot is None else (t_e * new + t_c) + w * ntk_dot


def _affine_reference(kind):
    def reference(
        q12, q11, q22, ntk=None, *, w_var, b_var=None, parameterization="ntk", input_width=None,
        **params,
    ):  # fmt: skip
        """XLA definition: ``nonlin_<kind>`` then the Dense kernel map (:func:`affine_terms`)."""
        new, ntk_dot = KINDS[kind][0](q12, q11, q22, ntk, **params)
        return apply_affine(new, ntk_dot, affine_terms(w_var, b_var, parameterization, input_width))

    return reference


for _kind in KINDS:
    _backend.register(f"nonlin_affine_{_kind}", "xla", _affine_reference(_kind))


def nonlin_affine(
    kind: str,
    q12,
    q11,
    q22,
    ntk=None,
    *,
    w_var,
    b_var=None,
    parameterization: str = "ntk",
    input_width=None,
    backend: str | None = None,
    **params,
):
    """:func:`nonlin` followed by a ``Dense(W_std, b_std, parameterization, s)`` kernel map, in
    one op (one pass over the covariances for backends with a fused kernel): ``w_var = W_std²``,
    ``b_var = b_std²`` (None: no bias), ``input_width = N_in / s[0]`` for ``"standard"``.
    Returns ``(nngp', ntk' or None)`` (formulas in :func:`affine_terms`)."""
    op_name(kind)
    _check_params(kind, params)
    affine_terms(w_var, b_var, parameterization, input_width)
    return _backend.dispatch(f"nonlin_affine_{kind}", backend)(
        q12,
        q11,
        q22,
        ntk,
        w_var=w_var,
        b_var=b_var,
        parameterization=parameterization,
        input_width=input_width,
        **params,
    )

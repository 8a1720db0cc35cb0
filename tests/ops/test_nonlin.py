"""Tests of ``ntfast.ops.nonlin``: every kind against an independent f64 quadrature truth.

Truth: for ``(u, v) = L z`` (``L`` the Cholesky factor of ``[[q11, q12], [q12, q22]]``, also for
singular ones), smooth functions use 2-D Gauss–Hermite with 300² nodes; the kinked, positively
homogeneous ones (ReLU family, sign, rectified monomials and their derivatives) use polar
coordinates: the radial integral is exact (``∫ r^{p+1} e^{-r²/2} dr``), the angular one is
Gauss–Legendre on the arcs between the kinks (where ``u = 0`` or ``v = 0``), i.e. exact to
rounding. Grid: variances from 0 to 4, correlations ρ ∈ {−1, −0.6, 0, 0.4, 0.95, 1}.
"""

import itertools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf as np_erf
from scipy.special import gamma as gamma_fn

from ntfast import backend
from ntfast.ops import nonlin as N

# ------------------------------------------------------------------------------- truth


def _chol(q12, q11, q22):
    l11 = math.sqrt(q11)
    l21 = q12 / l11 if q11 > 0 else 0.0
    # From the determinant (exactly 0 for |ρ| = 1 inputs), not q22 − l21² (rounding ~1e-16,
    # whose square root would perturb the truth by ~1e-8).
    l22 = math.sqrt(max(q11 * q22 - q12 * q12, 0.0) / q11) if q11 > 0 else math.sqrt(q22)
    return l11, l21, l22


_GH_X, _GH_W = np.polynomial.hermite_e.hermegauss(300)
_GH_W = _GH_W / math.sqrt(2 * math.pi)


def truth_smooth(f, g, q12, q11, q22):
    """E[f(u) g(v)] by 2-D probabilists' Gauss–Hermite."""
    l11, l21, l22 = _chol(q12, q11, q22)
    z1, z2 = _GH_X[:, None], _GH_X[None, :]
    vals = f(l11 * z1) * g(l21 * z1 + l22 * z2)
    return float(np.sum(_GH_W[:, None] * _GH_W[None, :] * vals))


_GL_X, _GL_W = np.polynomial.legendre.leggauss(60)


def truth_homogeneous(f, g, p, q12, q11, q22):
    """E[f(u) g(v)] for f, g positively homogeneous of total degree p (polar coordinates)."""
    l11, l21, l22 = _chol(q12, q11, q22)
    radial = 2 ** (p / 2) * gamma_fn(p / 2 + 1)  # ∫_0^∞ r^{p+1} e^{-r²/2} dr
    psi = math.atan2(l22, l21)
    cuts = {0.0, 2 * math.pi, math.pi / 2, 3 * math.pi / 2}
    cuts |= {(psi + s * math.pi / 2) % (2 * math.pi) for s in (-1, 1)}
    cuts = sorted(cuts)
    total = 0.0
    for lo, hi in itertools.pairwise(cuts):
        if hi - lo < 1e-15:
            continue
        phi = (hi - lo) / 2 * _GL_X + (hi + lo) / 2
        c, s = np.cos(phi), np.sin(phi)
        vals = f(l11 * c) * g(l21 * c + l22 * s)
        total += (hi - lo) / 2 * np.sum(_GL_W * vals)
    return radial * total / (2 * math.pi)


# ------------------------------------------------------------------------------- kinds


def _relu_pow(d):
    return lambda x: np.where(x >= 0, np.abs(x) ** d, 0.0) if d else (x >= 0).astype(float)


def _abrelu(a, b):
    return lambda x: a * np.minimum(x, 0) + b * np.maximum(x, 0)


def _abrelu_d(a, b):
    return lambda x: np.where(x < 0, a, b) * 1.0


def _herm(d):
    he = np.polynomial.hermite_e.HermiteE.basis(d)
    return lambda x: he(x) / math.sqrt(math.factorial(d))


def _herm_d(d):
    he = np.polynomial.hermite_e.HermiteE.basis(d).deriv()
    return lambda x: he(x) / math.sqrt(math.factorial(d))


_NORM_CDF = lambda x: 0.5 * (1 + np_erf(x / math.sqrt(2)))
_NORM_PDF = lambda x: np.exp(-x * x / 2) / math.sqrt(2 * math.pi)

# (kind, params, f, f', homogeneity degree of f (None: smooth), Σ̇ by NT's convention is 0)
CASES = [
    ("abrelu", {"a": 0.0, "b": 1.0}, _abrelu(0, 1), _abrelu_d(0, 1), 1),
    ("abrelu", {"a": -0.3, "b": 1.7}, _abrelu(-0.3, 1.7), _abrelu_d(-0.3, 1.7), 1),
    ("abrelu", {"a": -1.0, "b": 1.0}, _abrelu(-1, 1), _abrelu_d(-1, 1), 1),
    ("sign", {}, np.sign, None, 0),
    ("rectified_monomial", {"degree": 0}, _relu_pow(0), None, 0),
    ("rectified_monomial", {"degree": 1}, _relu_pow(1), _relu_pow(0), 1),
    ("rectified_monomial", {"degree": 2}, _relu_pow(2), lambda x: 2 * _relu_pow(1)(x), 2),
    ("rectified_monomial", {"degree": 4}, _relu_pow(4), lambda x: 4 * _relu_pow(3)(x), 4),
    (
        "erf",
        {"a": 1.3, "b": 0.7, "c": 0.2},
        lambda x: 1.3 * np_erf(0.7 * x) + 0.2,
        lambda x: 1.3 * 0.7 * 2 / math.sqrt(math.pi) * np.exp(-0.49 * x * x),
        None,
    ),
    (
        "erf",
        {"a": 0.5, "b": 1 / 2.4020563531719796, "c": 0.5},
        lambda x: 0.5 * np_erf(x / 2.4020563531719796) + 0.5,
        lambda x: (
            0.5
            / 2.4020563531719796
            * 2
            / math.sqrt(math.pi)
            * np.exp(-((x / 2.4020563531719796) ** 2))
        ),
        None,
    ),
    (
        "gelu",
        {},
        lambda x: x * _NORM_CDF(x),
        lambda x: _NORM_CDF(x) + x * _NORM_PDF(x),
        None,
    ),
    (
        "sin",
        {"a": 1.2, "b": 0.8, "c": 0.3},
        lambda x: 1.2 * np.sin(0.8 * x + 0.3),
        lambda x: 1.2 * 0.8 * np.cos(0.8 * x + 0.3),
        None,
    ),
    (
        "sin",
        {"a": 1.0, "b": 1.0, "c": math.pi / 2},
        np.cos,
        lambda x: -np.sin(x),
        None,
    ),
    (
        "rbf",
        {"gamma": 0.6},
        lambda x: math.sqrt(2) * np.sin(math.sqrt(1.2) * x + math.pi / 4),
        lambda x: math.sqrt(2) * math.sqrt(1.2) * np.cos(math.sqrt(1.2) * x + math.pi / 4),
        None,
    ),
    (
        "exp",
        {"a": 0.7, "b": 0.6},
        lambda x: 0.7 * np.exp(0.6 * x),
        lambda x: 0.42 * np.exp(0.6 * x),
        None,
    ),
    (
        "gaussian",
        {"a": 1.1, "b": -0.8},
        lambda x: 1.1 * np.exp(-0.8 * x * x),
        lambda x: -2 * 0.8 * 1.1 * x * np.exp(-0.8 * x * x),
        None,
    ),
    (
        "gabor",
        {},
        lambda x: np.exp(-x * x) * np.sin(x),
        lambda x: np.exp(-x * x) * (np.cos(x) - 2 * x * np.sin(x)),
        None,
    ),
    ("monomial", {"degree": 0}, lambda x: np.ones_like(x), lambda x: 0 * x, None),
    ("monomial", {"degree": 3}, lambda x: x**3, lambda x: 3 * x**2, None),
    ("monomial", {"degree": 5}, lambda x: x**5, lambda x: 5 * x**4, None),
    (
        "polynomial",
        {"coef": (0.3, -1.0, 0.5, 0.25)},
        np.polynomial.Polynomial([0.3, -1.0, 0.5, 0.25]),
        np.polynomial.Polynomial([0.3, -1.0, 0.5, 0.25]).deriv(),
        None,
    ),
]

_VARS = (0.3, 1.0, 2.5)
_RHOS = (-1.0, -0.6, 0.0, 0.4, 0.95, 1.0)


def _grid(with_zero=True):
    rows = []
    for q11 in _VARS:
        for q22 in _VARS:
            for rho in _RHOS:
                rows.append((rho * math.sqrt(q11 * q22), q11, q22))
    if with_zero:
        rows += [(0.0, 0.0, 1.3), (0.0, 0.8, 0.0), (0.0, 0.0, 0.0)]
    return np.array(rows).T


def _truth(f, g, hom, q12, q11, q22, deg_shift=0):
    if hom is None:
        return truth_smooth(f, g, q12, q11, q22)
    return truth_homogeneous(f, g, 2 * (hom - deg_shift), q12, q11, q22)


def _case_id(case):
    kind, params = case[0], case[1]
    return kind + "-" + ",".join(f"{k}={v:.3g}" for k, v in params.items() if k != "coef")


def _atol(want, hom):
    # Degree-0 homogeneous functions (step, sign) have E = const ± θ/π with θ ~ √(2(1 − |ρ|)):
    # a rounding of 1e-16 in ρ = ±1 moves them by ~1e-8, in the truth as in the op.
    return (3e-8 if hom == 0 else 1e-9) * max(np.abs(want).max(), 1e-5)


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_expectation_matches_quadrature(case):
    kind, params, f, df, hom = case
    # Zero variances: kinked functions are evaluated at 0 where NT's conventions pick a side.
    q12, q11, q22 = _grid(with_zero=hom is None)
    new, ntk = N.nonlin(kind, jnp.asarray(q12), q11, q22, jnp.ones_like(q12), **params)
    want = np.array([_truth(f, f, hom, *row) for row in zip(q12, q11, q22)])
    np.testing.assert_allclose(new, want, rtol=1e-9, atol=_atol(want, hom))
    if df is None:  # Σ̇ := 0 (sign, step): NT's convention
        np.testing.assert_array_equal(ntk, 0)
        return
    want_dot = np.array([_truth(df, df, hom, *row, deg_shift=1) for row in zip(q12, q11, q22)])
    np.testing.assert_allclose(ntk, want_dot, rtol=1e-9, atol=_atol(want_dot, hom and hom - 1))


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_variance_map_matches_quadrature_and_diagonal(case):
    kind, params, f, _, hom = case
    q = np.array([0.0, 0.3, 1.0, 2.5]) if hom is None else np.array([0.3, 1.0, 2.5])
    got = N.nonlin_variance(kind, jnp.asarray(q), **params)
    want = np.array([_truth(f, f, hom, v, v, v) for v in q])
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    # The general op on the diagonal agrees (this is where NT's RectifiedMonomial is NaN).
    diag, _ = N.nonlin(kind, jnp.asarray(q), q, q, **params)
    np.testing.assert_allclose(diag, want, rtol=1e-9, atol=1e-12)


def test_hermite_unit_variance():
    q12 = jnp.array([-1.0, -0.5, 0.0, 0.3, 0.99, 1.0])
    ones = jnp.ones_like(q12)
    for d in range(5):
        new, ntk = N.nonlin("hermite", q12, ones, ones, ones, degree=d)
        want = [truth_smooth(_herm(d), _herm(d), float(r), 1.0, 1.0) for r in q12]
        np.testing.assert_allclose(new, want, rtol=1e-10, atol=1e-12)
        want_dot = [truth_smooth(_herm_d(d), _herm_d(d), float(r), 1.0, 1.0) for r in q12]
        np.testing.assert_allclose(ntk, want_dot, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(N.nonlin_variance("hermite", ones, degree=d), 1.0)


def test_exp_normalized_definition():
    q12, q11, q22 = (jnp.asarray(x) for x in _grid())
    new, ntk = N.nonlin("exp_normalized", q12, q11, q22, jnp.ones_like(q12), gamma=0.7, shift=-1.0)
    norm = np.maximum(np.sqrt(np.asarray(q11) * np.asarray(q22)), 1e-15)
    e = np.exp(0.7 * (np.asarray(q12) / norm - 1.0))
    np.testing.assert_allclose(new, norm * e, rtol=1e-12)
    np.testing.assert_allclose(ntk, 0.7 * e, rtol=1e-12)
    # do_clip: correlations slightly above 1 (rounding) are clipped.
    q = jnp.array([2.0])
    got, _ = N.nonlin("exp_normalized", q * (1 + 1e-6), q, q, gamma=3.0, shift=-1.0, do_clip=True)
    np.testing.assert_allclose(got, 2.0, rtol=1e-12)


def test_elementwise_and_numerical_reproduce_erf():
    q12, q11, q22 = (jnp.asarray(x) for x in _grid())
    ones = jnp.ones_like(q12)
    want, want_dot = N.nonlin("erf", q12, q11, q22, ones)

    def nngp_fn(c, v1, v2):
        return 2 / jnp.pi * jnp.arcsin(2 * c / jnp.sqrt((1 + 2 * v1) * (1 + 2 * v2)))

    def d_nngp_fn(c, v1, v2):
        return 4 / jnp.pi / jnp.sqrt((1 + 2 * v1) * (1 + 2 * v2) - 4 * c**2)

    got, got_dot = N.nonlin(
        "elementwise", q12, q11, q22, ones, nngp_fn=nngp_fn, d_nngp_fn=d_nngp_fn
    )
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(got_dot, want_dot, rtol=1e-10)
    # Without d_nngp_fn: autodiff (away from |rho| = 1, where arcsin's derivative is fine anyway).
    _, auto_dot = N.nonlin("elementwise", q12, q11, q22, ones, nngp_fn=nngp_fn)
    np.testing.assert_allclose(auto_dot, want_dot, rtol=1e-9)

    got, got_dot = N.nonlin(
        "numerical", q12, q11, q22, ones, fn=jax.scipy.special.erf, deg=120, df=None
    )
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(got_dot, want_dot, rtol=1e-7, atol=1e-9)
    v = jnp.array([0.0, 0.3, 2.0])
    np.testing.assert_allclose(
        N.nonlin_variance("numerical", v, fn=jax.scipy.special.erf, deg=60),
        N.nonlin_variance("erf", v),
        rtol=1e-7,
        atol=1e-10,
    )


# ------------------------------------------------------------------------------- gradients

_SMOOTH_DOT = [c for c in CASES if c[3] is not None and c[0] != "rectified_monomial"]


@pytest.mark.parametrize("case", _SMOOTH_DOT, ids=[_case_id(c) for c in _SMOOTH_DOT])
def test_price_theorem_dot_is_d_q12(case):
    """Σ̇ = ∂q12'/∂q12 (Price's theorem), with the autodiff of the reference, incl. |ρ| = 1."""
    kind, params = case[0], case[1]
    q12, q11, q22 = (jnp.asarray(x) for x in _grid())
    _, dot = N.nonlin(kind, q12, q11, q22, jnp.ones_like(q12), **params)
    grad = jax.grad(lambda x: N.nonlin(kind, x, q11, q22, **params)[0].sum())(q12)
    if kind == "abrelu":  # kinked: Σ̇ jumps at zero variance; compare where both are defined
        keep = (q11 > 0) & (q22 > 0)
        grad, dot = grad[keep], dot[keep]
    np.testing.assert_allclose(grad, dot, rtol=1e-9, atol=1e-12)


def test_arccos_kernel_gradients_match_finite_differences():
    q12, q11, q22 = (jnp.asarray(x) for x in _grid(with_zero=False))
    interior = np.abs(np.asarray(q12)) < 0.99 * np.sqrt(np.asarray(q11 * q22))
    for d in (0, 1, 2, 3):
        fn = lambda a, b, c, d=d: N.arccos_kernel(a, b, c, d)
        g12, g11, g22 = jax.grad(lambda *x, fn=fn: fn(*x).sum(), argnums=(0, 1, 2))(q12, q11, q22)
        for g, i in ((g12, 0), (g11, 1), (g22, 2)):
            h = 1e-6
            args_p = [q12, q11, q22]
            args_m = [q12, q11, q22]
            args_p[i] = args_p[i] + h
            args_m[i] = args_m[i] - h
            fd = (fn(*args_p) - fn(*args_m)) / (2 * h)
            np.testing.assert_allclose(g[interior], fd[interior], rtol=1e-6, atol=1e-8)
            assert np.all(np.isfinite(g))


_ALL_KINDS = [
    ("abrelu", {"a": 0.0, "b": 1.0}),
    ("abrelu", {"a": -0.5, "b": 2.0}),
    ("sign", {}),
    ("rectified_monomial", {"degree": 0}),
    ("rectified_monomial", {"degree": 2}),
    ("erf", {"a": 1.0, "b": 1.0, "c": 0.0}),
    ("gelu", {}),
    ("sin", {"a": 1.0, "b": 1.0, "c": 0.0}),
    ("rbf", {"gamma": 1.0}),
    ("exp", {"a": 1.0, "b": 0.1}),
    ("gaussian", {"a": 1.0, "b": -1.0}),
    ("gabor", {}),
    ("exp_normalized", {"gamma": 1.0, "shift": -1.0, "do_clip": False}),
    ("hermite", {"degree": 3}),
    ("monomial", {"degree": 2}),
    ("polynomial", {"coef": (0.1, 1.0, -0.5)}),
]


def _hard_inputs(dtype, scale):
    """Diagonal, near-diagonal, anti-diagonal, orthogonal, zero-variance entries at ``scale``."""
    q11 = np.array([1.0, 1.0, 2.0, 1.0, 3.0, 0.0, 0.0, 1e-3, 1.0, 5.0])
    q22 = np.array([1.0, 1.0, 0.5, 1.0, 3.0, 2.0, 0.0, 1e-3, 1.0, 1e-4])
    rho = np.array([1.0, 1 - 1e-7, 1 + 1e-7, -1.0, 0.0, 0.0, 0.0, 1 - 1e-6, 0.999999, 0.3])
    q12 = rho * np.sqrt(q11 * q22)
    q12[2] = 1.0 + 1e-7  # slightly non-PSD (rounding upstream): must be clipped
    cast = lambda x: jnp.asarray(x * scale, dtype)
    return cast(q12), cast(q11), cast(q22)


_WIDE = (1.0, 1e-20, 1e20)
# Scales of the variances at which the f32 result itself is representable (e.g. q^2 for
# degree-2 families, exp(b² q) for Exp) -- there everything must be finite.
_F32_SCALES = {
    "exp": (1.0, 1e-20),
    "gabor": (1.0, 1e-20),  # formulas in q11 q22 (arXiv:2209.04121): up to ~1e12 in f32
    "hermite": (1.0, 1e-12, 1e12),
    "monomial": (1.0, 1e-15, 1e15),
    "polynomial": (1.0, 1e-15, 1e15),
}


@pytest.mark.parametrize(
    "kind,params", _ALL_KINDS, ids=[k + str(i) for i, (k, _) in enumerate(_ALL_KINDS)]
)
def test_f32_near_singular_finite_values_and_gradients(kind, params):
    scales = _F32_SCALES.get(kind, _WIDE)
    if kind == "rectified_monomial" and params["degree"] == 2:
        scales = (1.0, 1e-15, 1e15)
    for scale in scales:
        q12, q11, q22 = _hard_inputs(jnp.float32, scale)
        ntk = jnp.ones_like(q12)
        new, dot = N.nonlin(kind, q12, q11, q22, ntk, **params)
        assert new.dtype == jnp.float32 and dot.dtype == jnp.float32
        assert np.all(np.isfinite(new)) and np.all(np.isfinite(dot)), (scale, new, dot)

        def loss(a, b, c, ntk=ntk):
            x, y = N.nonlin(kind, a, b, c, ntk, **params)
            return x.sum() + y.sum()

        grads = jax.grad(loss, argnums=(0, 1, 2))(q12, q11, q22)
        for g in grads:
            assert np.all(np.isfinite(g)), (scale, grads)


@pytest.mark.parametrize("degree", [1, 2, 3])
def test_f32_arccos_accuracy_vs_f64(degree):
    """f32 error is at the level of f32 rounding (≤ 50 ulp of the scale), at any scale."""
    rng = np.random.default_rng(0)
    q11 = rng.uniform(0.1, 3, 200)
    q22 = rng.uniform(0.1, 3, 200)
    rho = np.concatenate([rng.uniform(-1, 1, 150), 1 - 10.0 ** -rng.uniform(3, 9, 50)])
    q12 = rho * np.sqrt(q11 * q22)
    for scale in (10.0 ** (-30 / degree), 1.0, 10.0 ** (30 / degree)):  # result ~ scale^d
        args = [x * scale for x in (q12, q11, q22)]
        want = np.asarray(N.arccos_kernel(*args, degree))
        got = np.asarray(N.arccos_kernel(*[jnp.asarray(x, jnp.float32) for x in args], degree))
        err = np.abs(got - want) / np.abs(want).max()
        assert err.max() < 50 * np.finfo(np.float32).eps, (scale, err.max())


def test_rectified_monomial_diagonal_is_finite_and_correct_with_gradients():
    q = jnp.array([0.5, 1.0, 4.0])
    for d in range(5):
        val = N.nonlin("rectified_monomial", q, q, q, degree=d)[0]
        want = math.prod(range(2 * d - 1, 0, -2)) * np.asarray(q) ** d / 2
        np.testing.assert_allclose(val, want, rtol=1e-12)
        g = jax.grad(lambda x, d=d: N.nonlin("rectified_monomial", x, x, x, degree=d)[0].sum())(q)
        # d/dq of (2d-1)!! q^d / 2 along the diagonal.
        want_g = math.prod(range(2 * d - 1, 0, -2)) * d * np.asarray(q) ** max(d - 1, 0) / 2
        np.testing.assert_allclose(g, want_g, rtol=1e-9)


# ------------------------------------------------------------------------------- API


def test_api_errors_and_dispatch():
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="kind"):
        N.nonlin("nope", x, x, x)
    with pytest.raises(TypeError, match="unexpected parameters"):
        N.nonlin("abrelu", x, x, x, a=1.0, b=0.0, gamma=1.0)
    with pytest.raises(ValueError, match="broadcast"):
        N.nonlin("gelu", jnp.ones((2, 1)), x, x)
    # Broadcast variances (the layout the layers use): (N1, 1) and (1, N2).
    q11, q22 = jnp.array([[1.0], [2.0]]), jnp.array([[1.0, 3.0, 0.5]])
    q12 = 0.3 * jnp.sqrt(q11 * q22)
    full, _ = N.nonlin("gelu", q12, *jnp.broadcast_arrays(q11, q22), backend="xla")
    part, none = N.nonlin("gelu", q12, q11, q22)
    np.testing.assert_array_equal(full, part)
    assert none is None
    assert backend.resolve("nonlin_abrelu", "xla") == "xla"
    if "triton" not in backend.registered_ops()["nonlin_gabor"]:
        with pytest.raises(backend.BackendError):
            N.nonlin("gabor", q12, q11, q22, backend="triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jax.jit(lambda a: N.nonlin("abrelu", a, q11, q22, a, a=0.0, b=1.0))(q12)

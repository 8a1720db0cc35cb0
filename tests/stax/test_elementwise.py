"""Parity of ``ntfast.stax`` elementwise layers with Neural Tangents 0.6.5 (in-process oracle).

Every layer and parameter set inside ``serial(affine, nonlinearity, affine)`` in f64, with
``x2 = None`` and ``N1 != N2``, for three layouts: dense, conv with full spatial covariances
(``is_reversed`` flips through the convs), and per-location (``diagonal_spatial=True``), also
with ``diagonal_batch=False``. Target: max|ntfast − NT| / max|NT| ≤ 1e-6 for every field.
Known NT defects that ntfast fixes are checked against the math instead (see the module
docstring of ``ntfast.stax.elementwise``).
"""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from nt_oracle import load_nt_stax

import ntfast
import ntfast.stax as st

nt = load_nt_stax()

RTOL = 1e-6


def _erf_nngp_fn(cov12, var1, var2):
    prod = (1 + 2 * var1) * (1 + 2 * var2)
    return jnp.arcsin(2 * cov12 / jnp.sqrt(prod)) * 2 / jnp.pi


def _erf_d_nngp_fn(cov12, var1, var2):
    prod = (1 + 2 * var1) * (1 + 2 * var2)
    return 4 / jnp.pi / jnp.sqrt(prod - 4 * cov12**2)


def _tanh_like(x):
    return jnp.tanh(0.7 * x) + 0.1 * x


# (id, constructor taking a stax module). Fixed constructor args so both libraries agree.
SPECS = [
    ("Relu", lambda s: s.Relu()),
    ("Relu-stabilize", lambda s: s.Relu(do_stabilize=True)),
    ("LeakyRelu", lambda s: s.LeakyRelu(0.1)),
    ("Abs", lambda s: s.Abs()),
    ("ABRelu", lambda s: s.ABRelu(-0.4, 1.3)),
    ("Erf", lambda s: s.Erf()),
    ("Erf-abc", lambda s: s.Erf(1.3, 0.7, 0.2)),
    ("Sigmoid_like", lambda s: s.Sigmoid_like()),
    ("Gelu", lambda s: s.Gelu()),
    ("Gelu-approx", lambda s: s.Gelu(approximate=True)),
    ("Sin", lambda s: s.Sin()),
    ("Sin-abc", lambda s: s.Sin(1.2, 0.8, 0.3)),
    ("Cos", lambda s: s.Cos(0.9, 1.1, 0.2)),
    ("Rbf", lambda s: s.Rbf(0.6)),
    ("Exp", lambda s: s.Exp()),
    ("Exp-ab", lambda s: s.Exp(0.7, 0.6)),
    ("Gaussian", lambda s: s.Gaussian()),
    ("Gaussian-ab", lambda s: s.Gaussian(1.3, -0.4)),
    ("Gabor", lambda s: s.Gabor()),
    ("ExpNormalized", lambda s: s.ExpNormalized()),
    ("ExpNormalized-clip", lambda s: s.ExpNormalized(0.7, -0.5, True)),
    ("Sign", lambda s: s.Sign()),
    ("Hermite0", lambda s: s.Hermite(0)),
    ("Hermite3", lambda s: s.Hermite(3)),
    ("Monomial0", lambda s: s.Monomial(0)),
    ("Monomial2", lambda s: s.Monomial(2)),
    ("Monomial5", lambda s: s.Monomial(5)),
    ("RectifiedMonomial0", lambda s: s.RectifiedMonomial(0)),
    ("RectifiedMonomial1", lambda s: s.RectifiedMonomial(1)),
    ("RectifiedMonomial3", lambda s: s.RectifiedMonomial(3)),
    ("Polynomial", lambda s: s.Polynomial([0.3, -1.0, 0.5, 0.25])),
    ("Polynomial-odd", lambda s: s.Polynomial([0.0, 1.0, 0.0, -0.2, 0.0, 0.01])),
    ("Elementwise", lambda s: s.Elementwise(jax.scipy.special.erf, _erf_nngp_fn, _erf_d_nngp_fn)),
    ("Elementwise-autodiff", lambda s: s.Elementwise(jax.scipy.special.erf, _erf_nngp_fn)),
    ("ElementwiseNumerical", lambda s: s.ElementwiseNumerical(_tanh_like, 8, None)),
    (
        "ElementwiseNumerical-df",
        lambda s: s.ElementwiseNumerical(jnp.sin, 6, jnp.cos),
    ),
]
_IDS = [i for i, _ in SPECS]

FIELDS = ("nngp", "ntk", "cov1", "cov2")


def _make(spec, s):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return spec(s)


def _dense(s, nonlin):
    return s.serial(s.Dense(4, W_std=1.5, b_std=0.3), nonlin, s.Dense(3, W_std=1.2, b_std=0.1))


def _conv(s, nonlin):
    return s.serial(
        s.Conv(3, (2, 3), padding="SAME", W_std=1.3, b_std=0.2),
        nonlin,
        s.Conv(2, (3, 2), padding="VALID", W_std=0.9, b_std=0.1),
    )


ARCHS = {
    # name: (network, input shape per sample, kernel_fn kwargs)
    "dense": (_dense, (7,), {}),
    "conv": (_conv, (5, 6, 2), {"diagonal_spatial": False}),
    "per-location": (_dense, (5, 6, 2), {"diagonal_spatial": True}),
    "per-location-full-batch": (
        _dense,
        (5, 6, 2),
        {"diagonal_spatial": True, "diagonal_batch": False},
    ),
}


def _inputs(shape):
    rng = np.random.default_rng(0)
    x1 = rng.normal(size=(3,) + shape) * 0.8
    x2 = rng.normal(size=(2,) + shape) * 1.1
    return x1, x2


def _rel_err(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-300)


def _assert_parity(got, want, name, fields=FIELDS, where_nt_finite=False):
    for f in fields:
        g, w = getattr(got, f), getattr(want, f)
        if w is None:
            assert g is None, (name, f)
            continue
        assert np.shape(g) == np.shape(w), (name, f, np.shape(g), np.shape(w))
        assert np.all(np.isfinite(g)), (name, f)
        if where_nt_finite:
            keep = np.isfinite(np.asarray(w))
            assert keep.any(), (name, f)
            g, w = np.asarray(g)[keep], np.asarray(w)[keep]
        assert _rel_err(g, w) <= RTOL, (name, f, _rel_err(g, w))
    for f in ("is_gaussian", "is_reversed", "diagonal_batch", "diagonal_spatial", "x1_is_x2"):
        assert bool(getattr(got, f)) == bool(getattr(want, f)), (name, f)


# (arch, x2 given?) pairs run per layer: every layout, both x2 = None and N1 != N2 somewhere.
_RUNS = [
    ("dense", True),
    ("dense", False),
    ("conv", True),
    ("conv", False),
    ("per-location", True),
    ("per-location-full-batch", False),
]


@pytest.mark.parametrize("spec_id", _IDS)
def test_parity_with_nt(spec_id):
    spec = dict(SPECS)[spec_id]
    for arch, with_x2 in _RUNS:
        net, shape, kwargs = ARCHS[arch]
        kf_ours = net(st, _make(spec, st))[2]
        kf_nt = net(nt, _make(spec, nt))[2]
        x1, x2 = _inputs(shape)
        b = x2 if with_x2 else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = kf_ours(x1, b, **kwargs)
            want = kf_nt(x1, b, **kwargs)
        fields = FIELDS
        if spec_id == "Sign" and not (got.diagonal_batch and got.diagonal_spatial):
            # NT sets every nonzero cov entry to 1; only the variances are right (see below).
            fields = ("nngp", "ntk")
        # NT's RectifiedMonomial is NaN where x1 == x2 (unclipped arccos): compare elsewhere,
        # ours is finite everywhere; the diagonal is checked against the math below.
        nan_in_nt = spec_id.startswith("RectifiedMonomial")
        if nan_in_nt:
            fields = ("nngp", "ntk")
        name = f"{spec_id}/{arch}/x2={'N2' if with_x2 else 'None'}"
        _assert_parity(got, want, name, fields, where_nt_finite=nan_in_nt)
        if arch == "conv":  # get=('nngp', 'ntk') returns the same numbers.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                nngp, ntk = kf_ours(x1, b, ("nngp", "ntk"), **kwargs)
            np.testing.assert_allclose(nngp, got.nngp, rtol=1e-12, atol=0)
            np.testing.assert_allclose(ntk, got.ntk, rtol=1e-12, atol=0)


@pytest.mark.parametrize("spec_id", ["Relu", "Erf", "Exp-ab"])
def test_masked_inputs_parity(spec_id):
    """``mask_constant``: remask_kernel=False (Relu) and True (Erf, Exp) through conv + GAP."""
    spec = dict(SPECS)[spec_id]
    x1, x2 = _inputs((5, 6, 2))
    x1[0, 1, 2, :] = -7.0
    x2[1, 3, :, :] = -7.0

    def net(s):
        return s.serial(_conv(s, spec(s)), spec(s), s.GlobalAvgPool(), s.Dense(1))[2]

    got = net(st)(x1, x2, ("nngp", "ntk"), mask_constant=-7.0)
    want = net(nt)(x1, x2, ("nngp", "ntk"), mask_constant=-7.0)
    for g, w in zip(got, want):
        assert _rel_err(g, w) <= RTOL


@pytest.mark.parametrize("spec_id", ["Relu", "Abs", "Erf-abc", "Gelu", "RectifiedMonomial1"])
def test_f32_error_at_most_twice_nt(spec_id):
    """f32 error vs the f64 result is ≤ 2× NT's f32 error (+ a few ulp of the scale)."""
    spec = dict(SPECS)[spec_id]
    x1, x2 = _inputs((5, 6, 2))
    x1[1] = x1[0] * (1 + 1e-4)  # nearly collinear samples: ρ ≈ 1 off the diagonal

    def run(lib, x, y):
        kf = lib.serial(_conv(lib, spec(lib)), spec(lib), lib.Flatten(), lib.Dense(1))[2]
        return kf(x, y, ("nngp", "ntk"))

    truth = run(st, x1, x2)
    jax.config.update("jax_enable_x64", False)
    try:
        ours = run(st, x1.astype(np.float32), x2.astype(np.float32))
        theirs = run(nt, x1.astype(np.float32), x2.astype(np.float32))
    finally:
        jax.config.update("jax_enable_x64", True)
    for o, t, w in zip(ours, theirs, truth):
        assert o.dtype == jnp.float32
        eps = 8 * np.finfo(np.float32).eps
        assert _rel_err(o, w) <= 2 * _rel_err(t, w) + eps, (_rel_err(o, w), _rel_err(t, w))


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_rectified_monomial_cov_on_diagonal(degree):
    """cov1 of a batch with itself: finite (NT: NaN), and equal to nngp(x1, x1), whose diagonal
    is E[relu(u)^{2d}] = (2d−1)!! q^d / 2."""
    x1, _ = _inputs((5, 6, 2))
    kf = _conv(st, st.RectifiedMonomial(degree))[2]
    full = kf(x1, None, diagonal_batch=False)  # cov1 (N1, N1, ...) == nngp(x1, x1)
    assert np.all(np.isfinite(full.cov1))
    np.testing.assert_allclose(full.cov1, full.nngp, rtol=1e-12)
    diag = kf(x1, None)  # diagonal_batch=True: cov1 (N1, H, H', W, W')
    np.testing.assert_allclose(diag.cov1, np.einsum("iiabcd->iabcd", full.nngp), rtol=1e-12)
    # Against the closed-form diagonal: an elementwise layer followed by a 1x1 Dense layer.
    pre = st.Conv(3, (2, 3), padding="SAME", W_std=1.3, b_std=0.2)[2](x1, None)
    post = st.serial(st.Conv(3, (2, 3), padding="SAME", W_std=1.3, b_std=0.2),
                     st.RectifiedMonomial(degree))[2](x1, None, diagonal_spatial=True)  # fmt: skip
    var = np.einsum("naabb->nab", pre.cov1)
    if pre.is_reversed:  # spatial pairs stored (W, W', H, H')
        var = var.transpose(0, 2, 1)
    want = math.prod(range(2 * degree - 1, 0, -2)) * var**degree / 2
    np.testing.assert_allclose(post.cov1, want, rtol=1e-12)
    nt_cov1 = _conv(nt, nt.RectifiedMonomial(degree))[2](x1, None).cov1
    if degree >= 1:
        assert not np.all(np.isfinite(nt_cov1)), "NT fixed its diagonal NaN: relax this check"


def test_sign_cov_matches_nngp_of_same_batch():
    """Sign's cov1 with full batch equals nngp(x1, x1) (NT: every nonzero entry is 1)."""
    x1, _ = _inputs((5, 6, 2))
    k = _conv(st, st.Sign())[2](x1, None, diagonal_batch=False)
    np.testing.assert_allclose(k.cov1, k.nngp, rtol=1e-12)
    k_nt = _conv(nt, nt.Sign())[2](x1, None, diagonal_batch=False)
    np.testing.assert_allclose(k.nngp, k_nt.nngp, rtol=RTOL)


@pytest.mark.parametrize("spec_id", _IDS)
def test_apply_fn_matches_nt(spec_id):
    spec = dict(SPECS)[spec_id]
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 5)) * 1.5)
    init_ours, apply_ours, _ = _make(spec, st)
    init_nt, apply_nt, _ = _make(spec, nt)
    key = jax.random.PRNGKey(0)
    shape_ours, params = init_ours(key, x.shape)
    assert shape_ours == init_nt(key, x.shape)[0] == x.shape
    if spec_id.startswith("ExpNormalized"):
        with pytest.raises(NotImplementedError):
            apply_ours(params, x)
        return
    np.testing.assert_allclose(apply_ours(params, x), apply_nt((), x), rtol=1e-12, atol=1e-14)


def test_errors_as_nt():
    x = np.ones((2, 3))
    with pytest.raises(ValueError, match="must be Gaussian"):
        st.Relu()[2](x)
    with pytest.raises(ValueError, match="must be Gaussian"):
        st.serial(st.Dense(2), st.Erf(), st.Gelu())[2](x)
    with pytest.raises(NotImplementedError):
        st.Monomial(6)
    with pytest.raises(NotImplementedError):
        st.Hermite(-1)
    with pytest.raises(NotImplementedError):
        st.RectifiedMonomial(-1)
    with pytest.raises(ValueError, match="No finite"):
        st.Elementwise()
    with pytest.raises(NotImplementedError):
        st.serial(st.Dense(2), st.Elementwise(fn=jnp.tanh))[2](x)
    with pytest.raises(NotImplementedError):
        st.Elementwise(nngp_fn=_erf_nngp_fn, d_nngp_fn=_erf_d_nngp_fn)[1]((), x)
    with pytest.warns(UserWarning, match="autodiff"):
        st.Elementwise(jnp.tanh, _erf_nngp_fn)
    with pytest.warns(UserWarning, match="Numerical Activation"):
        st.ElementwiseNumerical(jnp.tanh, 5, jnp.cos)
    with pytest.warns(UserWarning, match="unit norm"):
        st.serial(st.Dense(2), st.Hermite(2))[2](x)


def test_backend_flag_reaches_the_op():
    x1, x2 = _inputs((7,))
    kf = _dense(st, st.Relu())[2]
    ref = kf(x1, x2, "ntk", backend="xla")
    np.testing.assert_allclose(kf(x1, x2, "ntk"), ref, rtol=1e-14)
    # "native" has no nonlinearity kernels: its nonlinearities are the XLA definition
    # (backend.XLA_FILLED), exactly; unbuilt, it is unavailable and says so.
    if ntfast.backend.unavailable_reason("native") is None:
        np.testing.assert_array_equal(kf(x1, x2, "ntk", backend="native"), ref)
    else:
        with pytest.raises(ntfast.BackendError, match="unavailable"):
            kf(x1, x2, "ntk", backend="native")


def _deep_relu_reference(x, depth, w_std, b_std):
    """f64 numpy recursion (independent of the library): Dense -> [ReLU -> Dense] * depth.

    Dense: ``K <- σw² K + σb²``, ``Θ <- σw² Θ + K``; ReLU: ``K <- (s + (π − θ) K) / 2π``,
    ``Θ <- Θ (π − θ) / 2π`` with ``cos θ = K / √(k_ii k_jj)`` (f64 holds these scales)."""
    k = x @ x.T / x.shape[1]
    k = w_std**2 * k + b_std**2
    t = k.copy()
    for _ in range(depth):
        d = np.sqrt(np.diag(k))
        norm = np.outer(d, d)
        cos = np.clip(np.divide(k, norm, out=np.zeros_like(k), where=norm > 0), -1, 1)
        theta = np.where(norm > 0, np.arccos(cos), np.pi / 2)
        s = norm * np.sin(theta)
        k, t = (s + (np.pi - theta) * k) / (2 * np.pi), t * (np.pi - theta) / (2 * np.pi)
        k = w_std**2 * k + b_std**2
        t = w_std**2 * t + k
    return k, t


@pytest.mark.parametrize("w_std", [1.0, 2.0])
def test_deep_relu_f32_is_finite_and_accurate(w_std):
    """100 ReLU layers in f32: finite, and close to an f64 reference. Variances scale by
    (σw²/2)^depth: 1e-30 (σw = 1) or 1e30 (σw = 2), where NT's q11·q22 under/overflows f32
    (NT #197). Eager (an XLA compile of 200 layers takes minutes: compile time grows ~depth²)."""
    depth, b_std = 100, 0.0
    x = np.random.default_rng(2).normal(size=(4, 6))
    x[3] = 0.0  # a zero-variance sample
    layers = [st.Dense(8, W_std=w_std, b_std=b_std)]
    for _ in range(depth):
        layers += [st.Relu(), st.Dense(8, W_std=w_std, b_std=b_std)]
    kf = st.serial(*layers)[2]
    jax.config.update("jax_enable_x64", False)
    try:
        nngp, ntk = kf(x.astype(np.float32), None, ("nngp", "ntk"))
    finally:
        jax.config.update("jax_enable_x64", True)
    assert nngp.dtype == jnp.float32 and ntk.dtype == jnp.float32
    want_nngp, want_ntk = _deep_relu_reference(x, depth, w_std, b_std)
    for got, want in ((nngp, want_nngp), (ntk, want_ntk)):
        assert np.all(np.isfinite(got))
        # f32 rounding accumulates over 200 layers: 1e-4 of the scale.
        assert _rel_err(got, want) < 1e-4, _rel_err(got, want)


_GRAD_SPECS = ["Relu", "ABRelu", "Erf-abc", "Gelu", "Sign", "RectifiedMonomial2", "Gabor"]


@pytest.mark.parametrize("spec_id", _GRAD_SPECS)
def test_input_gradients_finite_and_match_nt(spec_id):
    """d ntk / d x1 with x2 = None (the diagonal ρ = 1 is hit) and a zero-variance sample."""
    spec = dict(SPECS + [("RectifiedMonomial2", lambda s: s.RectifiedMonomial(2))])[spec_id]
    x1, _ = _inputs((7,))
    x1[2] = 0.0

    def loss(lib, x):
        kf = lib.serial(lib.Dense(4, W_std=1.5), _make(spec, lib), lib.Dense(3, W_std=1.2),
                        _make(spec, lib), lib.Dense(1))[2]  # fmt: skip
        nngp, ntk = kf(x, None, ("nngp", "ntk"))
        return jnp.sum(jnp.sin(nngp)) + jnp.sum(jnp.cos(ntk))

    g = jax.grad(lambda x: loss(st, x))(x1)
    assert np.all(np.isfinite(g)), g
    g_nt = np.asarray(jax.grad(lambda x: loss(nt, x))(x1))
    ok = np.all(np.isfinite(g_nt), axis=1)
    if spec_id != "RectifiedMonomial2":
        assert ok[:2].all(), "NT's gradient is finite on nonzero samples"
    if ok.any():
        assert _rel_err(np.asarray(g)[ok], g_nt[ok]) <= RTOL, _rel_err(np.asarray(g)[ok], g_nt[ok])

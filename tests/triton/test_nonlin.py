"""Triton ``nonlin_<kind>`` kernels (run in the interpreter) against the XLA reference.

Truth = the XLA reference in f64. f64: the kernels match it to ~1e-12 relative. f32: the kernel's
error is at most twice the reference's own f32 error (+ one ulp of the largest entry), both
measured against the f64 truth on the same f32-rounded inputs. Layouts: the layers' full-spatial
``nngp`` (N1 != N2, odd sizes, two programs so the block boundary is crossed, x1 == x2 pairs
on the diagonal), batch-diagonal ``cov1``, unbroadcast 1-D hard entries (|ρ| = 1 and slightly
above, ρ = −1, zero variances), general broadcasting. Every launch of the numerics tests runs
inside ``runtime.canary_guard`` (NaN-filled margins around inputs, 0xA5 around outputs).
"""

import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntfast import backend
from ntfast._triton import nonlin as TN
from ntfast._triton import runtime
from ntfast.ops import nonlin as N

CASES = [
    ("abrelu", {"a": 0.0, "b": 1.0}),  # Relu
    ("abrelu", {"a": 0.1, "b": 1.0}),  # LeakyRelu
    ("abrelu", {"a": -1.0, "b": 1.0}),  # Abs
    ("sign", {}),
    ("erf", {"a": 1.3, "b": 0.7, "c": 0.2}),
    ("gelu", {}),
    ("sin", {"a": 1.2, "b": 0.8, "c": 0.3}),
    ("sin", {"a": 1.0, "b": 1.0, "c": 0.3 + math.pi / 2}),  # Cos
    ("rbf", {"gamma": 0.6}),
    ("exp", {"a": 0.7, "b": 0.6}),
    ("gaussian", {"a": 1.1, "b": -0.8}),
]
IDS = [k + "-" + ",".join(f"{v:.3g}" for v in p.values()) for k, p in CASES]
EPS32 = float(np.finfo(np.float32).eps)


def _features(rng, n, h=3, w=5, c=4):
    return rng.normal(size=(n, h, w, c))


def _layouts():
    """``{name: (q12, q11, q22, ntk or None)}`` in f64 (numpy)."""
    rng = np.random.default_rng(0)
    x1 = _features(rng, 3)
    x2 = np.concatenate([x1[:1], _features(rng, 1)])  # N2 = 2; pairs (0, 0) are x1 == x2
    c = x1.shape[-1]
    v1 = np.einsum("nhwc,nhwc->nhw", x1, x1) / c
    v2 = np.einsum("nhwc,nhwc->nhw", x2, x2) / c
    n1, h, w = v1.shape
    n2 = v2.shape[0]
    nngp = np.einsum("nhwc,mHWc->nmhHwW", x1, x2) / c  # (3, 2, 3, 3, 5, 5): 1350 entries
    full = (
        nngp,
        v1.reshape(n1, 1, h, 1, w, 1),
        v2.reshape(1, n2, 1, h, 1, w),
        rng.uniform(0.5, 2.0, nngp.shape),
    )
    cov1 = np.einsum("nhwc,nHWc->nhHwW", x1, x1) / c
    cov = (cov1, v1.reshape(n1, h, 1, w, 1), v1.reshape(n1, 1, h, 1, w), None)
    # Hard entries, no broadcasting: the diagonal, |ρ| slightly above 1 (upstream rounding),
    # ρ = −1, orthogonal, zero variances, tiny and large variances.
    q11 = np.array([1.0, 1.0, 2.0, 1.0, 3.0, 0.0, 0.0, 1e-3, 1.0, 5.0, 2.5, 0.7])
    q22 = np.array([1.0, 1.0, 0.5, 1.0, 3.0, 2.0, 0.0, 1e-3, 1.0, 1e-4, 0.4, 0.7])
    rho = np.array([1.0, 1 - 1e-7, 1.0, -1.0, 0.0, 0.0, 0.0, 1 - 1e-6, 0.999999, 0.3, -0.6, 1.0])
    q12 = rho * np.sqrt(q11 * q22)
    q12[2] = 1.0 + 1e-7  # slightly non-PSD: must be clipped
    hard = (q12, q11, q22, rng.uniform(0.5, 2.0, q12.shape))
    return {"full": full, "cov1": cov, "hard": hard}


LAYOUTS = _layouts()


def _fc():
    """A small broadcast layout for the transformation tests: FC ``nngp (N1, N2)``."""
    q12, q11, q22, ntk = LAYOUTS["full"]
    return (
        q12[:, :, 0, 0, 0, 0],
        q11[:, :, 0, 0, 0, 0],
        q22[:, :, 0, 0, 0, 0],
        ntk[:, :, 0, 0, 0, 0],
    )


FC = _fc()


def _run(kind, params, arrays, dtype, backend_name):
    args = [None if a is None else jnp.asarray(a, dtype) for a in arrays]
    new, ntk = N.nonlin(kind, *args, backend=backend_name, **params)
    return np.asarray(new), None if ntk is None else np.asarray(ntk)


def _triton_guarded(kind, params, arrays, dtype):
    with runtime.canary_guard(pad=64) as violations:
        out = _run(kind, params, arrays, dtype, "triton")
        jax.block_until_ready(out)
    assert not violations
    return out


def _max_err(got, want):
    finite = np.isfinite(want)
    np.testing.assert_array_equal(got[~finite], want[~finite])
    return float(np.max(np.abs(got[finite] - want[finite]), initial=0.0))


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_matches_reference(case, dtype):
    kind, params = case
    for name, arrays in LAYOUTS.items():
        # Inputs rounded to the tested dtype first; the truth is the f64 reference on them.
        arrays = tuple(None if a is None else np.asarray(a, dtype) for a in arrays)
        got = _triton_guarded(kind, params, arrays, dtype)
        truth = _run(kind, params, arrays, np.float64, "xla")
        ref = _run(kind, params, arrays, dtype, "xla")
        for what, g, t, r in zip(("new", "ntk"), got, truth, ref):
            if t is None:
                assert g is None
                continue
            assert g.dtype == dtype and g.shape == t.shape, (what, g.dtype, g.shape, t.shape)
            scale = max(float(np.max(np.abs(t[np.isfinite(t)]), initial=0.0)), 1e-300)
            err = _max_err(g.astype(np.float64), t)
            if dtype == np.float64:
                assert err <= 1e-12 * scale, (name, what, err / scale)
            else:
                ref_err = _max_err(r.astype(np.float64), t)
                assert err <= 2 * ref_err + EPS32 * scale, (name, what, err, ref_err, scale)


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_deep_relu_f32_stays_finite_and_accurate(scale):
    """f32 covariances at extreme scales (deep/wide ReLU stacks, NT #197; ``q11·q22`` would
    overflow or underflow f32): finite, and within the 2x rule of the f64 truth."""
    q12, q11, q22, ntk = LAYOUTS["hard"]
    arrays = tuple(
        np.float32(a * s) for a, s in ((q12, scale), (q11, scale), (q22, scale), (ntk, 1))
    )
    relu = {"a": 0.0, "b": 1.0}
    got = _triton_guarded("abrelu", relu, arrays, np.float32)
    truth = _run("abrelu", relu, arrays, np.float64, "xla")
    ref = _run("abrelu", relu, arrays, np.float32, "xla")
    for g, t, r in zip(got, truth, ref):
        assert np.isfinite(g).all()
        err, ref_err = _max_err(g.astype(np.float64), t), _max_err(r.astype(np.float64), t)
        assert err <= 2 * ref_err + EPS32 * np.abs(t).max(), (err, ref_err)


def test_diagonal_is_exact_variance_map():
    """On x1 == x2 (q12 = q11 = q22 = q) the kernels give the closed-form E[f(u)²]."""
    q = np.array([0.3, 1.0, 2.5, 4.0])
    for kind, params in CASES:
        got, _ = _triton_guarded(kind, params, (q, q, q, None), np.float64)
        want = np.asarray(N.nonlin_variance(kind, jnp.asarray(q), **params))
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14, err_msg=kind)


# ------------------------------------------------------------------------------ broadcasting


def test_general_broadcasting_and_dtypes():
    rng = np.random.default_rng(3)
    params = {"a": -0.3, "b": 1.7}
    q11 = rng.uniform(0.5, 2.0, (3, 1))
    q22 = rng.uniform(0.5, 2.0, (1, 4))
    # q12 itself broadcast (a column), ntk with an extra leading axis and its own broadcast.
    q12 = 0.3 * np.sqrt(q11 * q22[:, :1])
    ntk = rng.uniform(0.5, 2.0, (2, 1, 4))
    cases = [
        (q12, q11, q22, ntk),
        (q12[:, 0], 1.5, 2.0, None),  # rank-1 q12, Python-float variances
        (np.ones((2, 3)), np.ones((2, 3), np.int32), 1, np.ones((2, 3), np.float32)),
        (q12.astype(np.float32), q11.astype(np.float32), q22.astype(np.float32), ntk),  # mixed
        (q12, q11, q22, ntk.astype(np.float32)),  # ntk narrower than the data
        (np.zeros((0, 4)), np.zeros((0, 1)), q22, np.zeros((0, 4))),  # empty
    ]
    for i, arrays in enumerate(cases):
        kinds = (("abrelu", params), ("sign", {}), ("rbf", {"gamma": 0.5}))
        for kind, p in kinds if i == 0 else kinds[:1]:
            args = [None if a is None else jnp.asarray(a) for a in arrays]
            f32 = any(a is not None and a.dtype == jnp.float32 for a in args)
            got = backend.dispatch(f"nonlin_{kind}", "triton")(*args, **p)
            want = N.KINDS[kind][0](*args, **p)
            for g, w in zip(got, want):
                if w is None:
                    assert g is None
                    continue
                assert g.shape == w.shape and g.dtype == w.dtype, (kind, g.shape, w.shape)
                np.testing.assert_allclose(g, w, rtol=1e-6 if f32 else 1e-13)


def test_layout_merges_axes_and_checks_limits():
    lay = TN.layout((3, 2, 3, 3, 5, 5), (3, 1, 3, 1, 5, 1), (1, 2, 1, 3, 1, 5))
    assert lay[0] == 6 and list(lay[1:4]) == [3, 15, 0]
    # Diagonal-spatial nngp: (N1, N2, H, W) against (N1, 1, H, W), (1, N2, H, W): H, W merge.
    lay = TN.layout((3, 2, 4, 5), (3, 1, 4, 5), (1, 2, 4, 5))
    assert list(lay) == [3, 3, 20, 0, 2, 0, 20, 20, 1, 1]
    assert list(TN.layout((), (), ())) == [1, 1, 0, 0]
    with pytest.raises(backend.BackendError, match="int32"):
        TN.layout((2**31,), (2**31,), (1,))


# ------------------------------------------------------------------------------ transformations


@pytest.mark.parametrize("kind,params", [CASES[1], CASES[4]], ids=["leaky_relu", "erf"])
def test_jit_grad_vmap(kind, params):
    q12, q11, q22, ntk = (jnp.asarray(a) for a in FC)

    def op(name):
        return lambda a, b, c, d: N.nonlin(kind, a, b, c, d, backend=name, **params)

    tri, xla = op("triton"), op("xla")
    want = xla(q12, q11, q22, ntk)
    for g, w in zip(jax.jit(tri)(q12, q11, q22, ntk), want):
        np.testing.assert_allclose(g, w, rtol=1e-12)

    def loss(f):
        return lambda *a: sum(jnp.sum(jnp.sin(o)) for o in f(*a))

    grads = jax.jit(jax.grad(loss(tri), argnums=(0, 1, 2, 3)))(q12, q11, q22, ntk)
    for g, w in zip(grads, jax.grad(loss(xla), argnums=(0, 1, 2, 3))(q12, q11, q22, ntk)):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-14)
    if kind != "abrelu":
        return  # batching is kind-independent

    stack = lambda x: jnp.stack([x, 0.9 * x])
    for in_axes, args in (
        ((0, None, None, None), (stack(q12), q11, q22, ntk)),
        ((None, 0, 1, None), (q12, stack(q11), jnp.moveaxis(stack(q22), 0, 1), ntk)),
        ((None, None, None, 0), (q12, q11, q22, stack(ntk))),
    ):
        got = jax.vmap(tri, in_axes=in_axes)(*args)
        for g, w in zip(got, jax.vmap(xla, in_axes=in_axes)(*args)):
            np.testing.assert_allclose(g, w, rtol=1e-12)
    # Nested vmaps fold into one launch (no lax.map / scan in the program).
    nested = jax.vmap(jax.vmap(tri, in_axes=(0, None, None, 0)), in_axes=(0, 0, None, None))
    args = (stack(stack(q12)), stack(q11), q22, stack(ntk))
    assert "scan" not in str(jax.make_jaxpr(nested)(*args))
    got = nested(*args)
    want = jax.vmap(jax.vmap(xla, in_axes=(0, None, None, 0)), in_axes=(0, 0, None, None))(*args)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-12)


# ------------------------------------------------------------------------------ affine epilogue


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_nonlin_affine_matches_reference(case):
    kind, params = case
    q12, q11, q22, ntk = LAYOUTS["full"]
    settings = [
        {"w_var": 1.7, "b_var": 0.1},  # NTK parameterization with bias
        {"w_var": 2.0, "b_var": None, "parameterization": "standard", "input_width": 3.0},
        {"w_var": 0.5, "b_var": 0.05, "parameterization": "standard", "input_width": 7.0},
    ]
    if kind not in ("abrelu", "sign"):
        settings = settings[:1]  # the epilogue is kind-independent
    for i, kw in enumerate(settings):
        for dtype in (np.float64,) if params != CASES[0][1] else (np.float64, np.float32):
            arrays = (q12, q11, q22, ntk) if i < 2 else FC[:3] + (None,)
            args = [None if a is None else jnp.asarray(a, dtype) for a in arrays]
            with runtime.canary_guard(pad=64) as violations:
                got = jax.block_until_ready(TN.nonlin_affine(kind, *args, **kw, **params))
            assert not violations
            want = TN.nonlin_affine_reference(kind, *args, **kw, **params)
            rtol = 1e-12 if dtype == np.float64 else 8 * EPS32
            for g, w in zip(got, want):
                if w is None:
                    assert g is None
                    continue
                assert g.dtype == w.dtype and g.shape == w.shape
                np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * np.abs(w).max())


def test_nonlin_affine_reference_is_dense_after_nonlin():
    q12, q11, q22, ntk = (jnp.asarray(a) for a in LAYOUTS["hard"])
    new, dot = N.nonlin("gelu", q12, q11, q22, ntk)
    got = TN.nonlin_affine_reference("gelu", q12, q11, q22, ntk, w_var=2.0, b_var=0.3)
    np.testing.assert_allclose(got[0], 2.0 * new + 0.3, rtol=1e-15)
    np.testing.assert_allclose(got[1], got[0] + 2.0 * dot, rtol=1e-15)
    got = TN.nonlin_affine_reference(
        "gelu", q12, q11, q22, ntk, w_var=2.0, parameterization="standard", input_width=5.0
    )
    np.testing.assert_allclose(got[0], 2.0 * new, rtol=1e-15)
    np.testing.assert_allclose(got[1], 5.0 * new + 2.0 * dot, rtol=1e-15)


def test_nonlin_affine_grad_and_vmap():
    q12, q11, q22, ntk = (jnp.asarray(a) for a in LAYOUTS["hard"])
    kw = {"w_var": 1.5, "b_var": 0.2, "a": 0.0, "b": 1.0}
    loss = lambda f: lambda x, t: sum(jnp.sum(o**2) for o in f("abrelu", x, q11, q22, t, **kw))
    g = jax.grad(loss(TN.nonlin_affine), argnums=(0, 1))(q12, ntk)
    w = jax.grad(loss(TN.nonlin_affine_reference), argnums=(0, 1))(q12, ntk)
    for a, b in zip(g, w):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    batch = jnp.stack([q12, 0.5 * q12])
    got = jax.vmap(lambda x: TN.nonlin_affine("abrelu", x, q11, q22, ntk, **kw))(batch)
    want = jax.vmap(lambda x: TN.nonlin_affine_reference("abrelu", x, q11, q22, ntk, **kw))(batch)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-12)


# ------------------------------------------------------------------------------ API, errors


def test_registered_with_reference_signatures_and_kind_codes():
    kernels = runtime.kernels("nonlin", interpret=True)
    assert dict(kernels.KINDS) == {k: i for i, k in enumerate(TN.SUPPORTED)}
    assert kernels.N_PARAMS == TN.N_PARAMS
    for kind in TN.SUPPORTED:
        assert "triton" in backend.registered_ops()[f"nonlin_{kind}"]
        impl = backend.dispatch(f"nonlin_{kind}", "triton")
        assert inspect.signature(impl) == inspect.signature(N.KINDS[kind][0]), kind
        assert len(kernels.KIND_PARAMS[kind]) == len(TN._kind_constants(kind, _defaults(kind)))
    for kind in set(N.KINDS) - set(TN.SUPPORTED):
        with pytest.raises(backend.BackendError):
            backend.dispatch(f"nonlin_{kind}", "triton")


def _defaults(kind):
    sig = inspect.signature(N.KINDS[kind][0])
    return {k: 0.5 for k, p in sig.parameters.items() if k in N.KINDS[kind][2]}


def test_specializations_cover_every_launch():
    specs = TN.SPECIALIZATIONS
    kernels = runtime.kernels("nonlin", interpret=False)
    assert len(specs) == len(
        {(s["kernel"], s["dtype"], tuple(s["constexprs"].items())) for s in specs}
    )
    seen = set()
    for s in specs:
        assert hasattr(kernels, s["kernel"])
        params = inspect.signature(getattr(kernels, s["kernel"]).fn).parameters
        assert list(s["signature"]) == list(params)
        assert all(n.startswith("ntfast_nonlin_") for n in s["names"])
        seen.add((s["kernel"], s["dtype"], s["constexprs"]["KIND"], s["constexprs"]["HAS_AFFINE"]))
    # 8 kinds x 2 dtypes x {nngp, ntk} x {plain, affine}, minus sign's plain ntk pass (Σ̇ := 0).
    assert len(seen) == 8 * 2 * 2 * 2 - 2


def test_unsupported_requests_raise_backend_error():
    q = jnp.ones((2, 3))
    with pytest.raises(backend.BackendError, match="float32 and float64"):
        h = q.astype(jnp.float16)
        N.nonlin("gelu", h, h, h, backend="triton")
    with pytest.raises(backend.BackendError, match="static"):
        jax.jit(lambda a: N.nonlin("abrelu", q, q, q, a=a, b=1.0, backend="triton"))(0.5)
    with pytest.raises(backend.BackendError, match="w_var"):
        jax.jit(lambda w: TN.nonlin_affine("gelu", q, q, q, w_var=w))(2.0)
    traced = jax.jit(lambda w: TN.nonlin_affine_reference("gelu", q, q, q, w_var=w)[0])(2.0)
    np.testing.assert_allclose(traced, TN.nonlin_affine_reference("gelu", q, q, q, w_var=2.0)[0])
    with pytest.raises(backend.BackendError, match="no kernel"):
        TN.nonlin_affine("gabor", q, q, q, w_var=1.0)
    with pytest.raises(ValueError, match="parameterization"):
        TN.nonlin_affine("gelu", q, q, q, w_var=1.0, parameterization="nope")
    with pytest.raises(ValueError, match="input_width"):
        TN.nonlin_affine("gelu", q, q, q, w_var=1.0, parameterization="standard")
    with pytest.raises(TypeError, match="unexpected parameters"):
        TN.nonlin_affine("gelu", q, q, q, w_var=1.0, gamma=2.0)
    with pytest.raises(TypeError):
        TN.nonlin_affine("abrelu", q, q, q, w_var=1.0, a=0.0)  # `b` missing, as the reference

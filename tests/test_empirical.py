"""ntfast.empirical against a direct computation written here.

Truth: ``jax.jacobian`` of the network with respect to its raveled parameters (one flat vector),
full kernels ``J1 · J2ᵀ`` / ``f1 ⊗ f2`` in the unzipped layout ``(out1 axes, out2 axes)``, and
traces / diagonals / the zipped NT layout applied entry by entry with Python loops, so that no
contraction code is shared with the module under test. Networks are Neural Tangents' own stax
``(init_fn, apply_fn)`` (the oracle, ``tests/nt_oracle.py``) plus small hand-written functions.
"""

import functools
import itertools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from nt_oracle import load_nt_stax

import ntfast
from ntfast import empirical

nt_stax = load_nt_stax()

RTOL = 1e-10  # f64 throughout; both sides sum the same products in a different order.


def _key(i):
    return jax.random.PRNGKey(i)


def _layout(full, ndim, trace_axes, diagonal_axes):
    """NT layout of a full kernel ``full[a_0..a_{d-1}, b_0..b_{d-1}]``, one entry at a time.

    Traced axes: ``mean_t full[..t.., ..t..]``; diagonal axes: ``a_i = b_i`` kept once; other axes
    as the pair ``(a_i, b_i)``, in output-axis order.
    """
    full = np.asarray(full)
    shape1, shape2 = full.shape[:ndim], full.shape[ndim:]
    trace = sorted({a % ndim for a in trace_axes})
    diag = sorted({a % ndim for a in diagonal_axes})
    out_shape = []
    for i in range(ndim):
        if i in trace:
            continue
        out_shape += [shape1[i]] if i in diag else [shape1[i], shape2[i]]
    trace_sizes = [shape1[i] for i in trace]
    out = np.zeros(out_shape)
    for idx in np.ndindex(*out_shape):
        total = 0.0
        for t in itertools.product(*(range(s) for s in trace_sizes)):
            a, b, pos = [0] * ndim, [0] * ndim, 0
            for i in range(ndim):
                if i in trace:
                    a[i] = b[i] = t[trace.index(i)]
                elif i in diag:
                    a[i] = b[i] = idx[pos]
                    pos += 1
                else:
                    a[i], b[i] = idx[pos], idx[pos + 1]
                    pos += 2
            total += full[tuple(a) + tuple(b)]
        out[idx] = total / math.prod(trace_sizes)
    return out


def _full_kernels(apply_fn, params, x1, x2, kw1=None, kw2=None, leaf=None):
    """Full ``(nngp, ntk)`` in the unzipped layout ``(out1 axes, out2 axes)``, by explicit
    Jacobians w.r.t. the raveled parameters. ``x2=None`` means ``x1``; ``kw2=None`` means ``kw1``.

    Jitted as a whole: eager mode would compile every primitive separately (slow on CPU).
    """
    kw1 = kw1 or {}
    kw2 = kw1 if kw2 is None else kw2
    x2 = x1 if x2 is None else x2
    flat, unravel = ravel_pytree(params)

    def f(q, x, kw):
        out = apply_fn(unravel(q), x, **kw)
        return out if leaf is None else out[leaf]

    def full(p, x1, x2, kw1, kw2):
        nngp = jnp.tensordot(f(p, x1, kw1), f(p, x2, kw2), axes=0)
        j1, j2 = jax.jacobian(f)(p, x1, kw1), jax.jacobian(f)(p, x2, kw2)
        return nngp, jnp.tensordot(j1, j2, axes=([-1], [-1]))

    nngp, ntk = jax.jit(full)(flat, x1, x2, kw1, kw2)
    return np.asarray(nngp), np.asarray(ntk), nngp.ndim // 2


def _direct(apply_fn, params, x1, x2, trace_axes, diagonal_axes, kw1=None, kw2=None, leaf=None):
    """``(nngp, ntk)`` of output leaf ``leaf`` (None: the single output), NT layout."""
    nngp, ntk, d = _full_kernels(apply_fn, params, x1, x2, kw1, kw2, leaf)
    return (
        _layout(nngp, d, trace_axes, diagonal_axes),
        _layout(ntk, d, trace_axes, diagonal_axes),
    )


def _assert_close(actual, expected, rtol=RTOL):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(np.max(np.abs(expected)), 1e-300)
    err = np.max(np.abs(actual - expected)) / scale
    assert err <= rtol, f"relative error {err:.3e} > {rtol:.1e}"


# ------------------------------------------------------------------------------------------------
# Networks (NT stax) and inputs.


def _mlp():
    return nt_stax.serial(
        nt_stax.Dense(7, W_std=1.3, b_std=0.2), nt_stax.Erf(), nt_stax.Dense(3, b_std=0.1)
    )


def _cnn():
    # No readout: outputs (N, H, W, C) so trace/diagonal can act on spatial and channel axes.
    return nt_stax.serial(
        nt_stax.Conv(4, (2, 2), padding="SAME", W_std=1.2, b_std=0.1),
        nt_stax.Relu(),
        nt_stax.Conv(3, (2, 3), padding="VALID", b_std=0.3),
    )


def _mlp_inputs():
    return jax.random.normal(_key(1), (4, 5)), jax.random.normal(_key(2), (3, 5))


def _cnn_inputs():
    return jax.random.normal(_key(3), (2, 3, 5, 2)), jax.random.normal(_key(4), (3, 3, 5, 2))


def _params(init_fn, x):
    return init_fn(_key(0), jax.tree_util.tree_map(jnp.shape, x))[1]


# (trace_axes, diagonal_axes, uses_batch_axis): kernels touching axis 0 need N1 == N2 (x2=None).
MLP_AXES = [
    ((-1,), (), False),
    ((), (), False),
    ((), (0,), True),
    ((-1,), (0,), True),
    ((0,), (), True),
    ((0, 1), (), True),
]
CNN_AXES = [
    ((-1,), (), False),
    ((), (), False),
    ((-1,), (1, 2), False),
    ((1,), (-1,), False),
    ((2, 3), (1,), False),
    ((-1,), (0, 1, 2), True),
    ((0, 3), (), True),
]


NETS = {"mlp": (_mlp, _mlp_inputs), "cnn": (_cnn, _cnn_inputs)}


@functools.cache
def _net_case(name, x2_is_none):
    """``(apply_fn, params, x1, x2, full_nngp, full_ntk, ndim)`` for a named net, computed once."""
    net, inputs = NETS[name]
    init_fn, apply_fn, _ = net()
    x1, x2 = inputs()
    x2 = None if x2_is_none else x2
    params = _params(init_fn, x1)
    return (apply_fn, params, x1, x2, *_full_kernels(apply_fn, params, x1, x2))


CASES = [("mlp", a) for a in MLP_AXES] + [("cnn", a) for a in CNN_AXES]


@pytest.mark.parametrize("vmap_axes", [None, 0])
@pytest.mark.parametrize("name, axes", CASES, ids=[f"{n}-{a[0]}-{a[1]}" for n, a in CASES])
def test_kernels_match_direct_jacobians(name, axes, vmap_axes):
    trace_axes, diagonal_axes, uses_batch_axis = axes
    apply_fn, params, x1, x2, nngp, ntk, ndim = _net_case(name, uses_batch_axis)
    want_nngp = _layout(nngp, ndim, trace_axes, diagonal_axes)
    want_ntk = _layout(ntk, ndim, trace_axes, diagonal_axes)

    kernel_fn = ntfast.empirical_kernel_fn(apply_fn, trace_axes, diagonal_axes, vmap_axes)
    got = jax.jit(kernel_fn, static_argnames="get")(x1, x2, None, params)
    assert type(got).__name__ == "EmpiricalKernel" and got._fields == ("nngp", "ntk")
    _assert_close(got.nngp, want_nngp)
    _assert_close(got.ntk, want_ntk)


def test_single_kernel_fns_match_joint():
    apply_fn, params, x1, x2, *_ = _net_case("cnn", False)
    args = ((-1,), (1,))
    both = jax.jit(ntfast.empirical_kernel_fn(apply_fn, *args), static_argnums=2)(
        x1, x2, None, params
    )
    ntk = jax.jit(ntfast.empirical_ntk_fn(apply_fn, *args, vmap_axes=0))(x1, x2, params)
    nngp = jax.jit(ntfast.empirical_nngp_fn(apply_fn, *args))(x1, x2, params)
    _assert_close(ntk, both.ntk)
    _assert_close(nngp, both.nngp)


def test_default_shapes_follow_nt_conventions():
    init_fn, apply_fn, _ = _mlp()
    x1, x2 = _mlp_inputs()
    params = _params(init_fn, x1)
    assert ntfast.empirical_ntk_fn(apply_fn)(x1, x2, params).shape == (4, 3)
    assert ntfast.empirical_ntk_fn(apply_fn, trace_axes=())(x1, x2, params).shape == (4, 3, 3, 3)
    assert ntfast.empirical_nngp_fn(apply_fn, diagonal_axes=(0,))(x1, None, params).shape == (4,)
    # x2=None is x1: the same kernel as passing x1 twice, and symmetric.
    k_none = ntfast.empirical_ntk_fn(apply_fn)(x1, None, params)
    _assert_close(k_none, ntfast.empirical_ntk_fn(apply_fn)(x1, x1, params))
    _assert_close(k_none, k_none.T)


def test_get_variants():
    init_fn, apply_fn, _ = _mlp()
    x1, x2 = _mlp_inputs()
    params = _params(init_fn, x1)
    kernel_fn = ntfast.empirical_kernel_fn(apply_fn)
    both = kernel_fn(x1, x2, None, params)

    ntk = kernel_fn(x1, x2, "ntk", params)
    assert isinstance(ntk, jax.Array)
    _assert_close(ntk, both.ntk)
    _assert_close(kernel_fn(x1, x2, "NNGP", params), both.nngp)  # case-insensitive, as NT

    pair = kernel_fn(x1, x2, ("ntk", "nngp"), params)
    assert type(pair).__name__ == "EmpiricalKernel" and pair._fields == ("ntk", "nngp")
    _assert_close(pair.ntk, both.ntk)
    _assert_close(pair.nngp, both.nngp)

    # `get` may be passed by keyword too.
    _assert_close(kernel_fn(x1, x2, get="ntk", params=params), both.ntk)

    with pytest.raises(ValueError, match="get"):
        kernel_fn(x1, x2, "cov1", params)
    with pytest.raises(ValueError, match="non-empty"):
        kernel_fn(x1, x2, (), params)
    with pytest.raises(ValueError, match="unique"):
        kernel_fn(x1, x2, ("ntk", "ntk"), params)


@pytest.mark.parametrize("implementation", [0, 1, 2, 3, *empirical.NtkImplementation])
def test_every_implementation_value_gives_the_same_kernel(implementation):
    init_fn, apply_fn, _ = _mlp()
    x1, x2 = _mlp_inputs()
    params = _params(init_fn, x1)
    want = _direct(apply_fn, params, x1, x2, (-1,), ())[1]
    got = ntfast.empirical_ntk_fn(apply_fn, implementation=implementation)(x1, x2, params)
    _assert_close(got, want)


def test_bad_arguments_raise_clear_errors():
    init_fn, apply_fn, _ = _mlp()
    x1, x2 = _mlp_inputs()
    params = _params(init_fn, x1)
    with pytest.raises(ValueError, match="implementation"):
        ntfast.empirical_ntk_fn(apply_fn, implementation=7)
    with pytest.raises(ValueError, match="trace_axes"):
        ntfast.empirical_ntk_fn(apply_fn, trace_axes=(5,))(x1, x2, params)
    # Traced / diagonal axes must have equal sizes for x1 and x2 (here the batch axis: 4 vs 3).
    with pytest.raises(ValueError, match="diagonal_axes"):
        ntfast.empirical_nngp_fn(apply_fn, diagonal_axes=(0,))(x1, x2, params)
    with pytest.raises(ValueError, match="trace_axes"):
        ntfast.empirical_ntk_fn(apply_fn, trace_axes=(0,))(x1, x2, params)


def test_jit_of_kernel_fn():
    init_fn, apply_fn, _ = _cnn()
    x1, x2 = _cnn_inputs()
    params = _params(init_fn, x1)
    kernel_fn = ntfast.empirical_kernel_fn(apply_fn, trace_axes=(-1,), diagonal_axes=(1,))
    eager = kernel_fn(x1, x2, ("nngp", "ntk"), params)
    jitted = jax.jit(kernel_fn, static_argnames="get")(x1, x2, get=("nngp", "ntk"), params=params)
    _assert_close(jitted.nngp, eager.nngp)
    _assert_close(jitted.ntk, eager.ntk)


# ------------------------------------------------------------------------------------------------
# PyTrees, keyword arguments, rng.


def test_pytree_outputs_give_a_kernel_per_output():
    init_fn, apply_fn, _ = nt_stax.serial(
        nt_stax.Dense(5),
        nt_stax.Relu(),
        nt_stax.FanOut(2),
        nt_stax.parallel(nt_stax.Dense(3), nt_stax.serial(nt_stax.Dense(2), nt_stax.Erf())),
    )
    x1, x2 = _mlp_inputs()
    params = _params(init_fn, x1)
    for vmap_axes in (None, 0):
        got = ntfast.empirical_kernel_fn(apply_fn, trace_axes=(), vmap_axes=vmap_axes)(
            x1, x2, None, params
        )
        assert isinstance(got, list) and len(got) == 2
        for leaf in range(2):
            want_nngp, want_ntk = _direct(apply_fn, params, x1, x2, (), (), leaf=leaf)
            assert type(got[leaf]).__name__ == "EmpiricalKernel"
            _assert_close(got[leaf].nngp, want_nngp)
            _assert_close(got[leaf].ntk, want_ntk)
        ntk_only = ntfast.empirical_kernel_fn(apply_fn, trace_axes=())(x1, x2, "ntk", params)
        assert isinstance(ntk_only, list)
        _assert_close(ntk_only[1], got[1].ntk)


def test_pytree_inputs():
    init_fn, apply_fn, _ = nt_stax.serial(
        nt_stax.parallel(nt_stax.Dense(4), nt_stax.Dense(4)),
        nt_stax.FanInSum(),
        nt_stax.Relu(),
        nt_stax.Dense(2),
    )
    k = jax.random.split(_key(5), 4)
    x1 = [jax.random.normal(k[0], (3, 2)), jax.random.normal(k[1], (3, 6))]
    x2 = [jax.random.normal(k[2], (2, 2)), jax.random.normal(k[3], (2, 6))]
    params = _params(init_fn, x1)
    want_nngp, want_ntk = _direct(apply_fn, params, x1, x2, (-1,), ())
    for vmap_axes in (None, 0):
        got = ntfast.empirical_kernel_fn(apply_fn, vmap_axes=vmap_axes)(x1, x2, None, params)
        _assert_close(got.nngp, want_nngp)
        _assert_close(got.ntk, want_ntk)


def _shifted_fn(params, x, scale=1.0, shift=None):
    """A 2-layer net with a static ``scale`` and an optional per-example ``shift`` (N, 6)."""
    w1, b1, w2 = params
    h = x @ w1 + b1
    if shift is not None:
        h = h + shift
    return scale * jnp.tanh(h) @ w2


def _shifted_params():
    k = jax.random.split(_key(6), 3)
    return (
        jax.random.normal(k[0], (5, 6)),
        jax.random.normal(k[1], (6,)),
        jax.random.normal(k[2], (6, 2)),
    )


def test_apply_fn_kwargs_static_and_split():
    x1, x2 = _mlp_inputs()
    params = _shifted_params()
    s1 = jax.random.normal(_key(7), (4, 6))
    s2 = jax.random.normal(_key(8), (3, 6))
    kw1, kw2 = {"scale": 0.7, "shift": s1}, {"scale": 0.7, "shift": s2}
    want_nngp, want_ntk = _direct(_shifted_fn, params, x1, x2, (-1,), (), kw1, kw2)
    # A 2-tuple kwarg is (value for x1, value for x2); vmap_axes may batch it along its axis 0.
    for vmap_axes in (None, 0, (0, 0, {"shift": 0})):
        kernel_fn = ntfast.empirical_kernel_fn(_shifted_fn, vmap_axes=vmap_axes)
        if vmap_axes == 0:
            # Without kwargs axes, `shift` is not sliced: only valid for a shared kwarg.
            s = jax.random.normal(_key(9), (6,))
            got = kernel_fn(x1, x2, None, params, scale=0.7, shift=s)
            want = _direct(_shifted_fn, params, x1, x2, (-1,), (), {"scale": 0.7, "shift": s})
            _assert_close(got.nngp, want[0])
            _assert_close(got.ntk, want[1])
            continue
        got = kernel_fn(x1, x2, None, params, scale=0.7, shift=(s1, s2))
        _assert_close(got.nngp, want_nngp)
        _assert_close(got.ntk, want_ntk)


def test_vmap_axes_on_other_axes():
    """in_axes 1 / out_axes 1: the batch axis is second for inputs and outputs."""

    def f(params, x):  # x: (features, N) -> (k, N)
        return _shifted_fn(params, x.T).T

    x1, x2 = _mlp_inputs()
    x1, x2 = x1.T, x2.T
    params = _shifted_params()
    want = _direct(f, params, x1, x2, (0,), ())
    for vmap_axes in (None, 1, (1, 1, {})):
        got = ntfast.empirical_kernel_fn(f, trace_axes=(0,), vmap_axes=vmap_axes)(
            x1, x2, None, params
        )
        _assert_close(got.nngp, want[0])
        _assert_close(got.ntk, want[1])
    with pytest.raises(ValueError, match="vmap_axes"):
        ntfast.empirical_ntk_fn(f, vmap_axes=(1, 1, {"missing": 0}))(x1, x2, params)


def test_rng_kwarg_is_split_like_nt():
    """Dropout keys: the same key when x1 is x2, ``fold_in(key, 1)`` for x2 otherwise."""
    init_fn, apply_fn, _ = nt_stax.serial(
        nt_stax.Dense(6), nt_stax.Dropout(0.6, mode="train"), nt_stax.Relu(), nt_stax.Dense(2)
    )
    x1, x2 = _mlp_inputs()
    params = _params(init_fn, x1)
    rng = _key(10)
    kernel_fn = ntfast.empirical_kernel_fn(apply_fn)

    got = kernel_fn(x1, x2, None, params, rng=rng)
    kw1, kw2 = {"rng": rng}, {"rng": jax.random.fold_in(rng, 1)}
    want_nngp, want_ntk = _direct(apply_fn, params, x1, x2, (-1,), (), kw1, kw2)
    _assert_close(got.nngp, want_nngp)
    _assert_close(got.ntk, want_ntk)

    same = kernel_fn(x1, None, None, params, rng=rng)
    want_nngp, want_ntk = _direct(apply_fn, params, x1, None, (-1,), (), kw1)
    _assert_close(same.nngp, want_nngp)
    _assert_close(same.ntk, want_ntk)
    # x2 equal to x1 (a copy) gets the same key as x2=None.
    _assert_close(kernel_fn(x1, x1 + 0.0, "ntk", params, rng=rng), same.ntk)


# ------------------------------------------------------------------------------------------------
# Taylor expansions and NTK-vector products.


def test_linearize():
    init_fn, apply_fn, _ = _mlp()
    x1, _ = _mlp_inputs()
    params = _params(init_fn, x1)
    delta = jax.tree_util.tree_map(lambda p: 1e-2 * jnp.ones_like(p), params)
    moved = jax.tree_util.tree_map(jnp.add, params, delta)
    f_lin = empirical.linearize(apply_fn, params)
    _assert_close(f_lin(params, x1), apply_fn(params, x1))

    flat, unravel = ravel_pytree(params)
    jac = jax.jacobian(lambda p: apply_fn(unravel(p), x1))(flat)
    want = apply_fn(params, x1) + jac @ ravel_pytree(delta)[0]
    _assert_close(f_lin(moved, x1), want)
    _assert_close(empirical.taylor_expand(apply_fn, params, 1)(moved, x1), want)
    _assert_close(empirical.taylor_expand(apply_fn, params, 0)(moved, x1), apply_fn(params, x1))


def test_taylor_expand_is_exact_for_polynomials():
    def cubic(p, x):
        return (x @ p["w"]) ** 3 + p["c"]

    params = {"w": jnp.array([0.3, -0.2]), "c": jnp.array(0.5)}
    moved = {"w": jnp.array([0.9, 0.4]), "c": jnp.array(-1.0)}
    x = jnp.array([[1.0, 2.0], [-0.5, 1.5]])
    _assert_close(empirical.taylor_expand(cubic, params, 3)(moved, x), cubic(moved, x))
    # Degree 2 misses exactly the cubic term ((x·δw)^3, δ = moved - params).
    dw = moved["w"] - params["w"]
    want2 = cubic(moved, x) - (x @ dw) ** 3
    _assert_close(empirical.taylor_expand(cubic, params, 2)(moved, x), want2)
    with pytest.raises(ValueError, match="degree"):
        empirical.taylor_expand(cubic, params, -1)


def test_ntk_vector_product():
    init_fn, apply_fn, _ = _mlp()
    x1, x2 = _mlp_inputs()
    params = _params(init_fn, x1)
    full = ntfast.empirical_ntk_fn(apply_fn, trace_axes=())(x1, x2, params)  # (N1, N2, k, k)
    v = jax.random.normal(_key(11), (3, 3))  # shape of f(x2)
    want = jnp.einsum("abij,bj->ai", full, v)
    got = jax.jit(empirical.empirical_ntk_vp_fn(apply_fn, x1, x2, params))(v)
    _assert_close(got, want)
    sym = empirical.empirical_ntk_vp_fn(apply_fn, x1, None, params)
    full11 = ntfast.empirical_ntk_fn(apply_fn, trace_axes=())(x1, None, params)
    u = jax.random.normal(_key(12), (4, 3))
    _assert_close(sym(u), jnp.einsum("abij,bj->ai", full11, u))


def test_no_output_by_default(capsys):
    init_fn, apply_fn, _ = _mlp()
    x1, x2 = _mlp_inputs()
    params = _params(init_fn, x1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ntfast.empirical_kernel_fn(apply_fn)(x1, x2, get=None, params=params)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""

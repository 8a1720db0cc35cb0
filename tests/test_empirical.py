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


# Compilation dominates this suite's run time on CPU (~0.3-1 s per XLA program), so inputs come
# from numpy, every computation under test is jitted as a whole, and the truth is built once per
# network.


def _key(i):
    return jax.random.PRNGKey(i)


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


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
    return _normal(1, (4, 5)), _normal(2, (3, 5))


def _cnn_inputs():
    return _normal(3, (2, 3, 5, 2)), _normal(4, (3, 3, 5, 2))


def _params(init_fn, x, seed=0):
    """Parameters of ``init_fn``'s structure and shapes, drawn by numpy (no XLA compile: threefry
    programs take seconds to compile here). The tests hold for any parameter values."""
    shapes = jax.tree_util.tree_map(jnp.shape, x)
    structs = jax.eval_shape(lambda: init_fn(_key(0), shapes)[1])
    leaves, treedef = jax.tree_util.tree_flatten(structs)
    rng = np.random.default_rng(seed)
    return treedef.unflatten([jnp.asarray(rng.standard_normal(leaf.shape)) for leaf in leaves])


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


@pytest.mark.parametrize("vmap_axes", [None, 0])
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_kernels_match_direct_jacobians(name, vmap_axes):
    """Every (trace_axes, diagonal_axes) case of the net, computed in one jitted program."""
    cases = MLP_AXES if name == "mlp" else CNN_AXES
    apply_fn, params, x1, x2, *_ = _net_case(name, False)

    @jax.jit
    def all_cases(x1, x2, params):
        out = []
        for trace_axes, diagonal_axes, uses_batch_axis in cases:
            kernel_fn = ntfast.empirical_kernel_fn(apply_fn, trace_axes, diagonal_axes, vmap_axes)
            out.append(kernel_fn(x1, None if uses_batch_axis else x2, None, params))
        return out

    for (trace_axes, diagonal_axes, uses_batch_axis), got in zip(
        cases, all_cases(x1, x2, params), strict=True
    ):
        *_, nngp, ntk, ndim = _net_case(name, uses_batch_axis)
        assert type(got).__name__ == "EmpiricalKernel" and got._fields == ("nngp", "ntk")
        for kind, actual, full in (("nngp", got.nngp, nngp), ("ntk", got.ntk, ntk)):
            want = _layout(full, ndim, trace_axes, diagonal_axes)
            try:
                _assert_close(actual, want)
            except AssertionError as e:
                raise AssertionError(f"{kind} trace={trace_axes} diag={diagonal_axes}: {e}") from e


def _jit_kernel_fn(kernel_fn):
    """Jits an ``EmpiricalGetKernelFn`` (``get`` static); eager use is tested once, separately."""
    return jax.jit(kernel_fn, static_argnames="get")


def test_single_kernel_fns_match_joint():
    apply_fn, params, x1, x2, *_ = _net_case("cnn", False)
    args = ((-1,), (1,))
    both = _jit_kernel_fn(ntfast.empirical_kernel_fn(apply_fn, *args))(x1, x2, None, params)
    ntk = jax.jit(ntfast.empirical_ntk_fn(apply_fn, *args, vmap_axes=0))(x1, x2, params)
    nngp = jax.jit(ntfast.empirical_nngp_fn(apply_fn, *args))(x1, x2, params)
    _assert_close(ntk, both.ntk)
    _assert_close(nngp, both.nngp)


def test_eager_call_matches_jit_and_default_shapes():
    """Outside ``jit`` (no warning); NT's documented shapes; ``x2=None`` is ``x1``."""
    apply_fn, params, x1, x2, *_ = _net_case("mlp", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eager = ntfast.empirical_kernel_fn(apply_fn)(x1, x2, None, params)

    @jax.jit
    def jitted(x1, x2, params):
        return (
            ntfast.empirical_kernel_fn(apply_fn)(x1, x2, None, params),
            ntfast.empirical_ntk_fn(apply_fn)(x1, None, params),
            ntfast.empirical_ntk_fn(apply_fn)(x1, x1, params),
            ntfast.empirical_ntk_fn(apply_fn, trace_axes=())(x1, x2, params),
            ntfast.empirical_nngp_fn(apply_fn, diagonal_axes=(0,))(x1, None, params),
        )

    both, k_none, k_same, full, var = jitted(x1, x2, params)
    _assert_close(eager.nngp, both.nngp)
    _assert_close(eager.ntk, both.ntk)
    assert both.ntk.shape == (4, 3) and full.shape == (4, 3, 3, 3) and var.shape == (4,)
    _assert_close(k_none, k_same)
    _assert_close(k_none, k_none.T)


def test_no_output_by_default(capfd):
    apply_fn, params, x1, x2, *_ = _net_case("mlp", False)
    jax.block_until_ready(ntfast.empirical_kernel_fn(apply_fn)(x1, x2, None, params))
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""


def test_get_variants():
    apply_fn, params, x1, x2, *_ = _net_case("mlp", False)
    kernel_fn = _jit_kernel_fn(ntfast.empirical_kernel_fn(apply_fn))
    both = kernel_fn(x1, x2, None, params)

    ntk = kernel_fn(x1, x2, "ntk", params)
    assert isinstance(ntk, jax.Array)
    _assert_close(ntk, both.ntk)
    _assert_close(kernel_fn(x1, x2, "NNGP", params), both.nngp)  # case-insensitive, as NT

    pair = kernel_fn(x1, x2, ("ntk", "nngp"), params)
    assert type(pair).__name__ == "EmpiricalKernel" and pair._fields == ("ntk", "nngp")
    _assert_close(pair.ntk, both.ntk)
    _assert_close(pair.nngp, both.nngp)

    # `get` and `params` by keyword.
    _assert_close(kernel_fn(x1, x2, get="ntk", params=params), both.ntk)

    eager_fn = ntfast.empirical_kernel_fn(apply_fn)
    with pytest.raises(ValueError, match="get"):
        eager_fn(x1, x2, "cov1", params)
    with pytest.raises(ValueError, match="non-empty"):
        eager_fn(x1, x2, (), params)
    with pytest.raises(ValueError, match="unique"):
        eager_fn(x1, x2, ("ntk", "ntk"), params)


def test_every_implementation_value_gives_the_same_kernel():
    apply_fn, params, x1, x2, _, ntk, ndim = _net_case("mlp", False)
    want = _layout(ntk, ndim, (-1,), ())
    values = [0, 1, 2, 3, *empirical.NtkImplementation]

    @jax.jit
    def every(x1, x2, params):
        return [
            empirical.empirical_ntk_fn(apply_fn, implementation=v)(x1, x2, params) for v in values
        ]

    for got in every(x1, x2, params):
        _assert_close(got, want)
    assert empirical.DEFAULT_NTK_IMPLEMENTATION == empirical.NtkImplementation.JACOBIAN_CONTRACTION


def test_bad_arguments_raise_clear_errors():
    apply_fn, params, x1, x2, *_ = _net_case("mlp", False)
    with pytest.raises(ValueError, match="implementation"):
        ntfast.empirical_ntk_fn(apply_fn, implementation=7)
    with pytest.raises(ValueError, match="trace_axes"):
        jax.eval_shape(ntfast.empirical_ntk_fn(apply_fn, trace_axes=(5,)), x1, x2, params)
    with pytest.raises(ValueError, match="both"):
        jax.eval_shape(ntfast.empirical_nngp_fn(apply_fn, (-1,), (1,)), x1, x2, params)
    # Traced / diagonal axes must have equal sizes for x1 and x2 (here the batch axis: 4 vs 3).
    with pytest.raises(ValueError, match="diagonal_axes"):
        jax.eval_shape(ntfast.empirical_nngp_fn(apply_fn, diagonal_axes=(0,)), x1, x2, params)
    with pytest.raises(ValueError, match="trace_axes"):
        jax.eval_shape(ntfast.empirical_ntk_fn(apply_fn, trace_axes=(0,)), x1, x2, params)


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
    want = [_direct(apply_fn, params, x1, x2, (), (), leaf=leaf) for leaf in range(2)]
    for vmap_axes in (None, 0):
        kernel_fn = _jit_kernel_fn(
            ntfast.empirical_kernel_fn(apply_fn, trace_axes=(), vmap_axes=vmap_axes)
        )
        got = kernel_fn(x1, x2, None, params)
        assert isinstance(got, list) and len(got) == 2
        for leaf in range(2):
            assert type(got[leaf]).__name__ == "EmpiricalKernel"
            _assert_close(got[leaf].nngp, want[leaf][0])
            _assert_close(got[leaf].ntk, want[leaf][1])
    ntk_only = kernel_fn(x1, x2, "ntk", params)
    assert isinstance(ntk_only, list) and len(ntk_only) == 2
    _assert_close(ntk_only[1], want[1][1])


def test_pytree_inputs():
    init_fn, apply_fn, _ = nt_stax.serial(
        nt_stax.parallel(nt_stax.Dense(4), nt_stax.Dense(4)),
        nt_stax.FanInSum(),
        nt_stax.Relu(),
        nt_stax.Dense(2),
    )
    x1 = [_normal(50, (3, 2)), _normal(51, (3, 6))]
    x2 = [_normal(52, (2, 2)), _normal(53, (2, 6))]
    params = _params(init_fn, x1)
    want_nngp, want_ntk = _direct(apply_fn, params, x1, x2, (-1,), ())
    for vmap_axes in (None, 0):
        kernel_fn = _jit_kernel_fn(ntfast.empirical_kernel_fn(apply_fn, vmap_axes=vmap_axes))
        got = kernel_fn(x1, x2, None, params)
        _assert_close(got.nngp, want_nngp)
        _assert_close(got.ntk, want_ntk)


def _shifted_fn(params, x, scale=1.0, shift=None):
    """A 2-layer net with a ``scale`` and an optional ``shift`` added to the hidden layer."""
    w1, b1, w2 = params
    h = x @ w1 + b1
    if shift is not None:
        h = h + shift
    return scale * jnp.tanh(h) @ w2


def _shifted_params():
    return (_normal(60, (5, 6)), _normal(61, (6,)), _normal(62, (6, 2)))


def test_apply_fn_kwargs_split_pairs_and_batched_kwargs():
    """A 2-tuple kwarg is ``(value for x1, value for x2)``; ``vmap_axes`` can batch it."""
    x1, x2 = _mlp_inputs()
    params = _shifted_params()
    s1 = _normal(7, (4, 6))  # per example of x1
    s2 = _normal(8, (3, 6))
    want_nngp, want_ntk = _direct(
        _shifted_fn,
        params,
        x1,
        x2,
        (-1,),
        (),
        {"scale": 0.7, "shift": s1},
        {"scale": 0.7, "shift": s2},
    )
    for vmap_axes in (None, (0, 0, {"shift": 0})):
        kernel_fn = ntfast.empirical_kernel_fn(_shifted_fn, vmap_axes=vmap_axes)
        got = jax.jit(
            lambda x1, x2, p, s1, s2, k=kernel_fn: k(x1, x2, None, p, scale=0.7, shift=(s1, s2))
        )(x1, x2, params, s1, s2)
        _assert_close(got.nngp, want_nngp)
        _assert_close(got.ntk, want_ntk)


def test_apply_fn_kwargs_shared_with_vmap():
    """A kwarg not named in ``vmap_axes`` is passed whole to every slice (shared, static)."""
    x1, x2 = _mlp_inputs()
    params = _shifted_params()
    s = _normal(9, (6,))
    want_nngp, want_ntk = _direct(
        _shifted_fn, params, x1, x2, (-1,), (), {"scale": 0.7, "shift": s}
    )
    kernel_fn = ntfast.empirical_kernel_fn(_shifted_fn, vmap_axes=0)
    got = jax.jit(lambda x1, x2, p, s: kernel_fn(x1, x2, None, p, scale=0.7, shift=s))(
        x1, x2, params, s
    )
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
        kernel_fn = ntfast.empirical_kernel_fn(f, trace_axes=(0,), vmap_axes=vmap_axes)
        got = _jit_kernel_fn(kernel_fn)(x1, x2, None, params)
        _assert_close(got.nngp, want[0])
        _assert_close(got.ntk, want[1])
    with pytest.raises(ValueError, match="vmap_axes"):
        jax.eval_shape(ntfast.empirical_ntk_fn(f, vmap_axes=(1, 1, {"missing": 0})), x1, x2, params)


def test_rng_kwarg_is_split_like_nt():
    """Dropout keys: the same key when x1 is x2, ``fold_in(key, 1)`` for x2 otherwise."""
    init_fn, apply_fn, _ = nt_stax.serial(
        nt_stax.Dense(6), nt_stax.Dropout(0.6, mode="train"), nt_stax.Relu(), nt_stax.Dense(2)
    )
    x1, x2 = _mlp_inputs()
    params = _params(init_fn, x1)
    rng = _key(10)
    kernel_fn = ntfast.empirical_kernel_fn(apply_fn)
    run = jax.jit(lambda x1, x2, p, rng: kernel_fn(x1, x2, None, p, rng=rng))

    got = run(x1, x2, params, rng)
    kw1, kw2 = {"rng": rng}, {"rng": jax.random.fold_in(rng, 1)}
    want_nngp, want_ntk = _direct(apply_fn, params, x1, x2, (-1,), (), kw1, kw2)
    _assert_close(got.nngp, want_nngp)
    _assert_close(got.ntk, want_ntk)

    same = run(x1, None, params, rng)
    want_nngp, want_ntk = _direct(apply_fn, params, x1, None, (-1,), (), kw1)
    _assert_close(same.nngp, want_nngp)
    _assert_close(same.ntk, want_ntk)
    # x2 equal to x1 (a copy) gets the same key as x2=None.
    _assert_close(run(x1, x1 + 0.0, params, rng).ntk, same.ntk)


# ------------------------------------------------------------------------------------------------
# Taylor expansions and NTK-vector products.


def test_linearize():
    apply_fn, params, x1, *_ = _net_case("mlp", False)
    delta = jax.tree_util.tree_map(lambda p: 1e-2 * jnp.ones_like(p), params)
    moved = jax.tree_util.tree_map(jnp.add, params, delta)
    flat, unravel = ravel_pytree(params)

    @jax.jit
    def check(params, moved, x1):
        f_lin = empirical.linearize(apply_fn, params)
        jac = jax.jacobian(lambda p: apply_fn(unravel(p), x1))(flat)
        want = apply_fn(params, x1) + jac @ ravel_pytree(delta)[0]
        return (
            f_lin(params, x1),
            apply_fn(params, x1),
            f_lin(moved, x1),
            want,
            empirical.taylor_expand(apply_fn, params, 1)(moved, x1),
            empirical.taylor_expand(apply_fn, params, 0)(moved, x1),
        )

    at_params, f0, lin, want, tay1, tay0 = check(params, moved, x1)
    _assert_close(at_params, f0)
    _assert_close(lin, want)
    _assert_close(tay1, want)
    _assert_close(tay0, f0)


def test_taylor_expand_is_exact_for_polynomials():
    def cubic(p, x):
        return (x @ p["w"]) ** 3 + p["c"]

    params = {"w": jnp.array([0.3, -0.2]), "c": jnp.array(0.5)}
    moved = {"w": jnp.array([0.9, 0.4]), "c": jnp.array(-1.0)}
    x = jnp.array([[1.0, 2.0], [-0.5, 1.5]])
    _assert_close(jax.jit(empirical.taylor_expand(cubic, params, 3))(moved, x), cubic(moved, x))
    # Degree 2 misses exactly the cubic term (x·δw)^3, δw = moved - params.
    dw = moved["w"] - params["w"]
    want2 = cubic(moved, x) - (x @ dw) ** 3
    _assert_close(jax.jit(empirical.taylor_expand(cubic, params, 2))(moved, x), want2)
    with pytest.raises(ValueError, match="degree"):
        empirical.taylor_expand(cubic, params, -1)


def test_ntk_vector_product():
    apply_fn, params, x1, x2, *_ = _net_case("mlp", False)
    ntk_fn = jax.jit(ntfast.empirical_ntk_fn(apply_fn, trace_axes=()))
    v = _normal(11, (3, 3))  # shape of f(x2)
    want = jnp.einsum("abij,bj->ai", ntk_fn(x1, x2, params), v)  # full NTK (N1, N2, k, k)
    _assert_close(jax.jit(empirical.empirical_ntk_vp_fn(apply_fn, x1, x2, params))(v), want)
    u = _normal(12, (4, 3))
    want = jnp.einsum("abij,bj->ai", ntk_fn(x1, None, params), u)
    _assert_close(jax.jit(empirical.empirical_ntk_vp_fn(apply_fn, x1, None, params))(u), want)

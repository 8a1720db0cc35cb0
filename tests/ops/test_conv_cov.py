"""Ops ``conv_cov`` and ``pool_cov`` against direct-sum references written here.

The references follow the formulas literally: pad each spatial axis (zeros for SAME, wrap for
CIRCULAR, by ``lax.padtype_to_pads``' SAME amounts), then sum over *every* filter tap combination
(``Π f`` terms):

    conv, full spatial: K'[i,i',j,j'] = Σ_{a,b} Kp[s·i+a, s·i'+a, s·j+b, s·j'+b] / (fh·fw)
    conv, diagonal:     K'[i,j]       = Σ_{a,b} Kp[s·i+a, s·j+b] / (fh·fw)
    pool, full spatial: K'[i,i',...]  = Σ_{a,a',...} Kp[s·i+a, s·i'+a', ...] / (counts)

Plus parity with NT's private kernels, an op-count check that the cost is O(f) per spatial axis,
dispatch, and argument errors.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ntfast.backend import BackendError
from ntfast.backend import unavailable_reason as backend_unavailable
from ntfast.ops.conv import conv_cov, conv_cov_reference
from ntfast.ops.pool import pool_cov, pool_cov_reference

PADDINGS = ("VALID", "SAME", "CIRCULAR")


# ------------------------------------------------------------------------------------------------
# References.


def _pads(shape, window, strides, padding):
    if padding == "VALID":
        return [(0, 0)] * len(shape)
    return lax.padtype_to_pads(shape, window, strides, "SAME")


def _pad(x, axes, window, strides, padding):
    """numpy padding of ``axes`` (zeros for SAME, wrap for CIRCULAR)."""
    pads = [(0, 0)] * x.ndim
    for ax, pd in zip(axes, _pads([x.shape[a] for a in axes], window, strides, padding)):
        pads[ax] = tuple(pd)
    return np.pad(x, pads, mode="wrap" if padding == "CIRCULAR" else "constant")


def _window_sum(xp, axes, taps_per_axis, strides, out_sizes):
    """``Σ_{taps} xp[.., s·i + tap, ..]`` over all combinations of per-axis taps (direct sum)."""
    acc = 0.0
    for taps in itertools.product(*taps_per_axis):
        idx = [slice(None)] * xp.ndim
        for ax, t, s, o in zip(axes, taps, strides, out_sizes):
            idx[ax] = slice(t, t + s * (o - 1) + 1, s)
        acc = acc + xp[tuple(idx)]
    return acc


def _logical_order(n, is_reversed):
    return list(range(n))[::-1] if is_reversed else list(range(n))


def ref_conv_full(x, filter_shape, strides, padding, batch_ndim, is_reversed):
    n = len(filter_shape)
    order = _logical_order(n, is_reversed)  # logical axis of each stored pair
    axes = [batch_ndim + k for k in range(2 * n)]
    window = [filter_shape[order[k // 2]] for k in range(2 * n)]
    stride = [strides[order[k // 2]] for k in range(2 * n)]
    xp = _pad(x, axes, window, stride, padding)
    out = [(xp.shape[a] - f) // s + 1 for a, f, s in zip(axes, window, stride)]
    # The same tap `a` on both axes of a pair: taps enumerated per pair, duplicated per axis.
    acc = 0.0
    for taps in itertools.product(*[range(filter_shape[order[p]]) for p in range(n)]):
        idx = [slice(None)] * xp.ndim
        for k, ax in enumerate(axes):
            t, s, o = taps[k // 2], stride[k], out[k]
            idx[ax] = slice(t, t + s * (o - 1) + 1, s)
        acc = acc + xp[tuple(idx)]
    acc = acc / np.prod(filter_shape)
    # Output pairs in reverse stored order (the op flips `is_reversed`).
    perm = list(range(batch_ndim)) + [
        batch_ndim + 2 * p + j for p in range(n)[::-1] for j in (0, 1)
    ]
    return np.transpose(acc, perm)


def ref_conv_diag(x, filter_shape, strides, padding, batch_ndim):
    n = len(filter_shape)
    axes = list(range(batch_ndim, batch_ndim + n))
    xp = _pad(x, axes, filter_shape, strides, padding)
    out = [(xp.shape[a] - f) // s + 1 for a, f, s in zip(axes, filter_shape, strides)]
    acc = _window_sum(xp, axes, [range(f) for f in filter_shape], strides, out)
    return acc / np.prod(filter_shape)


def ref_pool(x, window_shape, strides, padding, batch_ndim, diagonal, is_reversed, pool_type, ne):
    n = len(window_shape)
    if diagonal:
        axes = list(range(batch_ndim, batch_ndim + n))
        window, stride = list(window_shape), list(strides)
    else:
        order = _logical_order(n, is_reversed)
        axes = list(range(batch_ndim, batch_ndim + 2 * n))
        window = [window_shape[order[k // 2]] for k in range(2 * n)]
        stride = [strides[order[k // 2]] for k in range(2 * n)]
    xp = _pad(x, axes, window, stride, padding)
    out = [(xp.shape[a] - f) // s + 1 for a, f, s in zip(axes, window, stride)]
    acc = _window_sum(xp, axes, [range(f) for f in window], stride, out)
    if pool_type == "SUM":
        return acc
    if padding == "SAME" and ne:
        # Count in-image taps by pooling an indicator of the unpadded image the same way.
        ones = _pad(np.ones([x.shape[a] for a in axes]), range(len(axes)), window, stride, padding)
        counts = _window_sum(ones, range(len(axes)), [range(f) for f in window], stride, out)
    else:
        counts = np.prod(window)
    counts = np.broadcast_to(counts, acc.shape[batch_ndim:])
    # NT divides a diagonal-spatial AVG kernel twice (variance of a mean of independent entries).
    return acc / (counts**2 if diagonal else counts)


def _rand(shape, dtype, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


def _spatial_sizes(n):
    return {1: (7,), 2: (5, 6), 3: (4, 3, 5)}[n]


def _close(out, ref, dtype):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    tol = 1e-12 if dtype == np.float64 else 2e-6
    err = np.max(np.abs(out - ref), initial=0.0) / max(np.max(np.abs(ref), initial=0.0), 1e-30)
    assert err <= tol, err


# ------------------------------------------------------------------------------------------------
# conv_cov.

# (filter_shape, strides) per number of spatial axes; odd/even filters, strides 1-3, 1x1 filters.
CONV_CASES = {
    1: [((3,), (1,)), ((4,), (2,)), ((1,), (3,))],
    2: [((3, 3), (1, 1)), ((2, 3), (2, 1)), ((5, 1), (1, 3)), ((1, 4), (3, 2))],
    3: [((3, 2, 3), (1, 1, 2)), ((2, 3, 1), (2, 1, 1))],
}
CONV_PARAMS = [(n, fs, st) for n, cases in CONV_CASES.items() for fs, st in cases]


def _full_shape(batch_ndim, sizes, is_reversed):
    stored = sizes[::-1] if is_reversed else sizes
    return (3, 2)[:batch_ndim] + tuple(d for d in stored for _ in (0, 1))


# Batch ndim (cov with diagonal_batch: 1; nngp/ntk/full cov: 2) alternates with the layout so that
# each combination is covered without a full product (tests compile one program per case).
@pytest.mark.parametrize("is_reversed,batch_ndim", [(False, 2), (True, 1)])
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("n,filter_shape,strides", CONV_PARAMS)
def test_conv_full_spatial(n, filter_shape, strides, padding, batch_ndim, is_reversed):
    x = _rand(_full_shape(batch_ndim, _spatial_sizes(n), is_reversed), np.float64)
    out = conv_cov(
        jnp.asarray(x),
        filter_shape=filter_shape,
        strides=strides,
        padding=padding,
        is_reversed=is_reversed,
    )
    ref = ref_conv_full(x, filter_shape, strides, padding, batch_ndim, is_reversed)
    _close(out, ref, np.float64)


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("n,filter_shape,strides", CONV_PARAMS)
def test_conv_diagonal_spatial(n, filter_shape, strides, padding):
    batch_ndim = CONV_PARAMS.index((n, filter_shape, strides)) % 3
    x = _rand((3, 2)[:batch_ndim] + _spatial_sizes(n), np.float64)
    out = conv_cov(
        jnp.asarray(x),
        filter_shape=filter_shape,
        strides=strides,
        padding=padding,
        diagonal_spatial=True,
        is_reversed=True,  # ignored for the diagonal layout
    )
    _close(out, ref_conv_diag(x, filter_shape, strides, padding, batch_ndim), np.float64)


@pytest.mark.parametrize("diagonal_spatial", [False, True])
@pytest.mark.parametrize("padding", PADDINGS)
def test_conv_float32(padding, diagonal_spatial):
    """f32 in, f32 out, within f32 rounding of the f64 reference."""
    n, filter_shape, strides = 2, (3, 2), (2, 1)
    sizes = _spatial_sizes(n)
    shape = (3, 2) + (sizes if diagonal_spatial else _full_shape(0, sizes, True))
    x = _rand(shape, np.float32)
    out = conv_cov(
        jnp.asarray(x),
        filter_shape=filter_shape,
        strides=strides,
        padding=padding,
        diagonal_spatial=diagonal_spatial,
        is_reversed=True,
    )
    assert out.dtype == np.float32
    x64 = x.astype(np.float64)
    if diagonal_spatial:
        ref = ref_conv_diag(x64, filter_shape, strides, padding, 2)
    else:
        ref = ref_conv_full(x64, filter_shape, strides, padding, 2, True)
    _close(out, ref, np.float32)


def test_conv_full_spatial_elementwise_loop():
    """One case against a loop over every output index and tap (no slicing in the reference)."""
    h, w, (fh, fw), (sh, sw) = 5, 4, (3, 2), (2, 1)
    x = _rand((2, 1, h, h, w, w), np.float64, seed=3)
    ph, pw = lax.padtype_to_pads((h, w), (fh, fw), (sh, sw), "SAME")
    xp = np.pad(x, [(0, 0), (0, 0), ph, ph, pw, pw])
    oh, ow = -(-h // sh), -(-w // sw)
    ref = np.zeros((2, 1, oh, oh, ow, ow))
    for i, i2, j, j2, a, b in itertools.product(
        range(oh), range(oh), range(ow), range(ow), range(fh), range(fw)
    ):
        ref[:, :, i, i2, j, j2] += xp[:, :, sh * i + a, sh * i2 + a, sw * j + b, sw * j2 + b]
    ref /= fh * fw
    out = conv_cov(jnp.asarray(x), filter_shape=(fh, fw), strides=(sh, sw), padding="SAME")
    # Output stored W-first (pair order flips).
    np.testing.assert_allclose(out, np.transpose(ref, (0, 1, 4, 5, 2, 3)), rtol=1e-13, atol=1e-13)


def test_conv_filter_larger_than_input_valid_raises():
    """NT returns an empty kernel here; an empty output is never meant, so we raise."""
    x = jnp.ones((2, 2, 2, 2, 5, 5))
    with pytest.raises(ValueError, match="does not fit"):
        conv_cov(x, filter_shape=(3, 1), strides=(1, 1), padding="VALID")


def test_conv_circular_pads_longer_than_axis():
    """Wrap padding larger than the axis wraps several times (numpy 'wrap' semantics)."""
    x = _rand((2, 3, 3), np.float64)
    out = conv_cov(jnp.asarray(x), filter_shape=(7,), strides=(1,), padding="CIRCULAR")
    _close(out, ref_conv_full(x, (7,), (1,), "CIRCULAR", 1, False), np.float64)


# ------------------------------------------------------------------------------------------------
# pool_cov.

POOL_CASES = {
    1: [((3,), (1,)), ((2,), (2,))],
    2: [((2, 2), (2, 2)), ((3, 2), (1, 2)), ((3, 3), (2, 3))],
    3: [((2, 3, 2), (2, 1, 1))],
}
POOL_PARAMS = [(n, ws, st) for n, cases in POOL_CASES.items() for ws, st in cases]


POOL_KINDS = [("AVG", False), ("AVG", True), ("SUM", False)]


@pytest.mark.parametrize("pool_type,ne", POOL_KINDS)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("n,window_shape,strides", POOL_PARAMS)
def test_pool_full_spatial(n, window_shape, strides, padding, pool_type, ne):
    i = POOL_PARAMS.index((n, window_shape, strides)) + POOL_KINDS.index((pool_type, ne))
    is_reversed, batch_ndim = bool(i % 2), 1 + (i // 2) % 2
    x = _rand(_full_shape(batch_ndim, _spatial_sizes(n), is_reversed), np.float64)
    out = pool_cov(
        jnp.asarray(x),
        window_shape=window_shape,
        strides=strides,
        padding=padding,
        pool_type=pool_type,
        normalize_edges=ne,
        is_reversed=is_reversed,
    )
    ref = ref_pool(x, window_shape, strides, padding, batch_ndim, False, is_reversed, pool_type, ne)
    _close(out, ref, np.float64)


@pytest.mark.parametrize("pool_type,ne", POOL_KINDS)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("n,window_shape,strides", POOL_PARAMS)
def test_pool_diagonal_spatial(n, window_shape, strides, padding, pool_type, ne):
    x = _rand((3, 2) + _spatial_sizes(n), np.float64)
    out = pool_cov(
        jnp.asarray(x),
        window_shape=window_shape,
        strides=strides,
        padding=padding,
        pool_type=pool_type,
        normalize_edges=ne,
        diagonal_spatial=True,
    )
    ref = ref_pool(x, window_shape, strides, padding, 2, True, False, pool_type, ne)
    _close(out, ref, np.float64)


@pytest.mark.parametrize("diagonal_spatial", [False, True])
def test_pool_float32(diagonal_spatial):
    window_shape, strides, padding = (3, 2), (2, 2), "SAME"
    sizes = _spatial_sizes(2)
    x = _rand((3, 2) + (sizes if diagonal_spatial else _full_shape(0, sizes, False)), np.float32)
    out = pool_cov(
        jnp.asarray(x),
        window_shape=window_shape,
        strides=strides,
        padding=padding,
        normalize_edges=True,
        diagonal_spatial=diagonal_spatial,
    )
    assert out.dtype == np.float32
    ref = ref_pool(
        x.astype(np.float64),
        window_shape,
        strides,
        padding,
        2,
        diagonal_spatial,
        False,
        "AVG",
        True,
    )
    _close(out, ref, np.float32)


# ------------------------------------------------------------------------------------------------
# Parity with NT's private kernels (the functions its layers call).


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("filter_shape,strides", [((3, 2), (1, 2)), ((2, 4), (2, 1))])
def test_matches_nt_private_kernels(padding, filter_shape, strides):
    from nt_oracle import load_nt_stax

    load_nt_stax()
    from neural_tangents._src.stax import linear as nt_linear

    nt_pad = nt_linear.Padding(padding)
    x = jnp.asarray(_rand((2, 3, 6, 6, 5, 5), np.float64))
    # NT's kernels run op by op when eager (one compilation per op): jit them whole.
    ref = jax.jit(
        lambda v: nt_linear._conv_kernel_full_spatial_shared(v, filter_shape, strides, nt_pad, 2)
    )(x)
    out = conv_cov(x, filter_shape=filter_shape, strides=strides, padding=padding)
    _close(out, ref, np.float64)

    xd = jnp.asarray(_rand((2, 6, 5), np.float64))
    ref = jax.jit(
        lambda v: nt_linear._conv_kernel_diagonal_spatial(v, filter_shape, strides, nt_pad, 1)
    )(xd)
    out = conv_cov(
        xd, filter_shape=filter_shape, strides=strides, padding=padding, diagonal_spatial=True
    )
    _close(out, ref, np.float64)

    double = lambda t: tuple(v for v in t for _ in (0, 1))
    for ne in (False, True):
        ref = jax.jit(
            lambda v, ne=ne: nt_linear._pool_kernel(
                v, nt_linear._Pooling.AVG, double(filter_shape), double(strides), nt_pad, ne, 2
            )
        )(x)
        out = pool_cov(
            x, window_shape=filter_shape, strides=strides, padding=padding, normalize_edges=ne
        )
        _close(out, ref, np.float64)


# ------------------------------------------------------------------------------------------------
# Cost: O(f) per spatial axis.


def _eqn_counts(fn, x):
    counts = {}
    for eqn in jax.make_jaxpr(fn)(x).jaxpr.eqns:
        counts[eqn.primitive.name] = counts.get(eqn.primitive.name, 0) + 1
    return counts


# Array-building primitives a tap may use: strided slices of the input, zero pads (SAME) and
# concatenations of wrapped pieces (CIRCULAR); none of them does arithmetic.
_TAP_PRIMS = ("slice", "pad", "concatenate")


@pytest.mark.parametrize("padding", ["SAME", "CIRCULAR"])
@pytest.mark.parametrize("diagonal_spatial", [False, True])
def test_conv_op_count_is_linear_in_filter_size(diagonal_spatial, padding):
    """Per spatial axis (pair): f taps summed with f - 1 adds: Σ f in all, not Π f nor f².

    Each tap is built from at most 3 pieces per array axis (wrap splits an axis in 3), so the
    number of primitives is O(Σ f) as well; no convolution, window reduction or contraction.
    """
    for filter_shape in [(3, 3), (9, 9), (5, 2, 7)]:
        n = len(filter_shape)
        axes_per_tap = 1 if diagonal_spatial else 2
        shape = (2, 2) + (12,) * (n * axes_per_tap)
        fn = functools.partial(
            conv_cov_reference,
            filter_shape=filter_shape,
            strides=(1,) * n,
            padding=padding,
            diagonal_spatial=diagonal_spatial,
        )
        counts = _eqn_counts(fn, jnp.zeros(shape, jnp.float32))
        assert counts.get("add", 0) == sum(f - 1 for f in filter_shape)
        n_tap_ops = sum(counts.get(p, 0) for p in _TAP_PRIMS)
        assert sum(filter_shape) <= n_tap_ops <= 4 * axes_per_tap * sum(filter_shape)
        for banned in ("conv_general_dilated", "reduce_window_sum", "reduce_window", "dot_general"):
            assert banned not in counts


def test_conv_compiled_flops_scale_linearly():
    """XLA's own cost analysis of the compiled op matches the O(f) model, far below NT's f².

    Model (SAME, stride 1, 2-D, ``B`` batch entries, image ``n``, padded ``m = n + f - 1``):
    the first pair's taps cost ``(f - 1)·B·n²·m²`` adds (the other pair is still padded), the
    second ``(f - 1)·B·n⁴``, the ``1/f²`` scale ``B·n⁴`` multiplies. A ``diag(1/f)`` conv per
    pair (NT) costs ``2·f²`` flops per entry per pair.
    """
    b, n = 4, 12
    for f in (3, 9):
        fn = functools.partial(
            conv_cov_reference, filter_shape=(f, f), strides=(1, 1), padding="SAME"
        )
        x = jnp.zeros((2, 2) + (n,) * 4, jnp.float32)
        flops = jax.jit(fn).lower(x).compile().cost_analysis()["flops"]
        m = n + f - 1
        model = (f - 1) * b * n**2 * m**2 + (f - 1) * b * n**4 + b * n**4
        quadratic = 2 * f**2 * b * (n**2 * m**2 + n**4)
        assert 0.8 * model <= flops <= 1.25 * model, (f, flops, model)
        if f > 3:
            assert flops < 0.3 * quadratic, (f, flops, quadratic)


def test_pool_op_count_is_linear_in_window_size():
    """Full-spatial pooling: two separable 1-D box sums per pair (2f slices), not f²."""
    fn = functools.partial(
        pool_cov_reference,
        window_shape=(4, 3),
        strides=(2, 2),
        padding="SAME",
        normalize_edges=True,
    )
    counts = _eqn_counts(fn, jnp.zeros((2, 2, 8, 8, 6, 6), jnp.float32))
    assert counts.get("add", 0) == 2 * (3 + 2)
    assert counts.get("slice", 0) == 2 * (4 + 3)
    assert "reduce_window_sum" not in counts and "reduce_window" not in counts


# ------------------------------------------------------------------------------------------------
# Dispatch and errors.


def test_dispatch_explicit_backends():
    x = jnp.asarray(_rand((2, 2, 5, 5), np.float64))
    kw = {"filter_shape": (3,), "strides": (1,), "padding": "SAME"}
    np.testing.assert_array_equal(conv_cov(x, backend="xla", **kw), conv_cov(x, **kw))
    # "native" has whole-network fused kernels only: its per-layer ops are the XLA definition
    # (backend.XLA_FILLED) — or, where its modules are not built, it is unavailable.
    if backend_unavailable("native") is None:
        np.testing.assert_array_equal(conv_cov(x, backend="native", **kw), conv_cov(x, **kw))
        pw = {"window_shape": (2,), "strides": (1,), "padding": "VALID"}
        np.testing.assert_array_equal(pool_cov(x, backend="native", **pw), pool_cov(x, **pw))
    else:
        with pytest.raises(BackendError, match="unavailable"):
            conv_cov(x, backend="native", **kw)


def test_jit_and_grad():
    x = jnp.asarray(_rand((2, 2, 5, 5, 4, 4), np.float64))
    kw = {"filter_shape": (3, 2), "strides": (1, 2), "padding": "CIRCULAR"}
    f = jax.jit(lambda v: conv_cov(v, **kw))
    np.testing.assert_allclose(f(x), conv_cov(x, **kw), rtol=1e-14)
    # The op is linear, so grad of <conv(x), r> is the adjoint applied to r: <x, g> = <conv(x), r>.
    r = jnp.asarray(_rand(f(x).shape, np.float64, seed=1))
    g = jax.grad(lambda v: jnp.vdot(conv_cov(v, **kw), r))(x)
    np.testing.assert_allclose(jnp.vdot(x, g), jnp.vdot(f(x), r), rtol=1e-12)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"filter_shape": (3,), "strides": (1,), "padding": "FULL"}, "`padding`"),
        ({"filter_shape": (3,), "strides": (1, 1), "padding": "SAME"}, "`strides`"),
        ({"filter_shape": (0,), "strides": (1,), "padding": "SAME"}, "positive"),
        ({"filter_shape": (2, 2, 2), "strides": (1, 1, 1), "padding": "SAME"}, "dimensions"),
    ],
)
def test_conv_argument_errors(kwargs, match):
    x = jnp.ones((2, 2, 5, 5))
    with pytest.raises(ValueError, match=match):
        conv_cov(x, **kwargs)


def test_pool_type_error():
    with pytest.raises(ValueError, match="`pool_type`"):
        pool_cov(
            jnp.ones((2, 5, 5)), window_shape=(2,), strides=(1,), padding="SAME", pool_type="MAX"
        )

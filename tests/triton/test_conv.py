"""Triton ``conv_cov`` / ``pool_cov`` kernels (run in the interpreter) against the XLA reference.

Truth = the XLA reference (``ntfast/ops/conv.py``, ``ntfast/ops/pool.py``) in f64. f64: the
kernels match it to 1e-12 relative. f32: the kernel's error is at most twice the reference's own
f32 error (+ one ulp of the largest entry), both against the f64 truth on the same f32 inputs.
Coverage: VALID / SAME / CIRCULAR, strides 1 and 2, filters 1, 2, 3, 5, odd sizes, 0-2 batch
axes, 1-3 spatial axes, both stored pair orders, diagonal spatial, every pooling normalization.
Every numerics launch runs inside ``runtime.canary_guard`` (NaN margins around inputs, so an
unmasked out-of-bounds read poisons the result; 0xA5 margins around outputs, so a stray write
fails the launch). Also: the launches of a configuration sweep are exactly the listed
``SPECIALIZATIONS``, one launch per spatial axis (pair) with our custom-call names, jit / vmap
(folded into the batch axes) / grad under ``backend="triton"``, and the BackendError cases.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntfast._triton import conv as TC
from ntfast._triton import runtime
from ntfast.backend import BackendError
from ntfast.ops.conv import conv_cov
from ntfast.ops.pool import pool_cov

PADDINGS = ("VALID", "SAME", "CIRCULAR")
EPS32 = float(np.finfo(np.float32).eps)


@pytest.fixture(autouse=True)
def _guarded():
    """Every interpreter launch of a test runs with canary margins; none may be touched."""
    with runtime.canary_guard(pad=256) as violations:
        yield
    assert not violations, violations


def _rand(shape, dtype=np.float64, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


def _full_shape(batch, sizes, is_reversed):
    stored = sizes[::-1] if is_reversed else sizes
    return tuple(batch) + tuple(d for d in stored for _ in (0, 1))


def _both(op, x, **kw):
    """(triton, xla) results of ``op`` on ``x`` (the triton one computed eagerly)."""
    out = op(jnp.asarray(x), backend="triton", **kw).block_until_ready()
    return np.asarray(out), np.asarray(op(jnp.asarray(x), backend="xla", **kw))


def _assert_f64(out, ref):
    assert out.shape == ref.shape and out.dtype == ref.dtype == np.float64
    err = np.max(np.abs(out - ref)) / np.max(np.abs(ref))
    assert err <= 1e-12, err


def _assert_f32(op, x32, **kw):
    """Kernel error <= 2x the XLA f32 error (+ 1 ulp of the largest entry) vs the f64 truth."""
    out = np.asarray(op(jnp.asarray(x32), backend="triton", **kw).block_until_ready())
    xla32 = np.asarray(op(jnp.asarray(x32), backend="xla", **kw))
    truth = np.asarray(op(jnp.asarray(x32.astype(np.float64)), backend="xla", **kw))
    assert out.dtype == np.float32 and out.shape == truth.shape
    err, ref_err = np.max(np.abs(out - truth)), np.max(np.abs(xla32 - truth))
    assert err <= 2 * ref_err + EPS32 * np.max(np.abs(truth)), (err, ref_err)


# ------------------------------------------------------------------------------------------------
# conv_cov numerics

# (spatial sizes, filter_shape, strides, batch shape, is_reversed): filters 1, 2, 3, 5; strides
# 1 and 2; 0-2 batch axes; 1-3 spatial axes; both pair orders.
FULL_CASES = [
    ((7,), (3,), (1,), (2,), False),
    ((7,), (5,), (2,), (3, 2), True),
    ((5,), (2,), (2,), (), False),
    ((5, 6), (3, 2), (2, 1), (3, 2), False),
    ((5, 6), (1, 5), (1, 2), (2,), True),
    ((4, 3, 5), (3, 2, 3), (1, 1, 2), (), True),
]


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("sizes,filter_shape,strides,batch,is_reversed", FULL_CASES)
def test_conv_full_spatial(sizes, filter_shape, strides, batch, is_reversed, padding):
    x = _rand(_full_shape(batch, sizes, is_reversed))
    kw = {
        "filter_shape": filter_shape,
        "strides": strides,
        "padding": padding,
        "is_reversed": is_reversed,
    }
    _assert_f64(*_both(conv_cov, x, **kw))


DIAG_CASES = [
    ((7,), (5,), (2,), (2,)),
    ((5, 6), (3, 2), (2, 1), (3, 2)),
    ((4, 3, 5), (2, 1, 3), (1, 2, 1), ()),
]


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("sizes,filter_shape,strides,batch", DIAG_CASES)
def test_conv_diagonal_spatial(sizes, filter_shape, strides, batch, padding):
    x = _rand(tuple(batch) + sizes, seed=1)
    kw = {
        "filter_shape": filter_shape,
        "strides": strides,
        "padding": padding,
        "diagonal_spatial": True,
    }
    _assert_f64(*_both(conv_cov, x, **kw))


@pytest.mark.parametrize("diagonal_spatial", [False, True])
@pytest.mark.parametrize("padding", PADDINGS)
def test_conv_float32(padding, diagonal_spatial):
    sizes, batch = (5, 6), (3, 2)
    shape = batch + sizes if diagonal_spatial else _full_shape(batch, sizes, True)
    kw = {"filter_shape": (3, 5), "strides": (2, 1), "padding": padding}
    _assert_f32(conv_cov, _rand(shape, np.float32), diagonal_spatial=diagonal_spatial, **kw)


def test_conv_pads_longer_than_axis_and_unequal_pair_sizes():
    """CIRCULAR pads that wrap more than once; a pair whose two axes differ in size."""
    x = _rand((2, 3, 3))
    _assert_f64(*_both(conv_cov, x, filter_shape=(7,), strides=(1,), padding="CIRCULAR"))
    x = _rand((2, 5, 4, 3, 3))
    for padding in PADDINGS:
        _assert_f64(*_both(conv_cov, x, filter_shape=(3, 2), strides=(2, 1), padding=padding))


# ------------------------------------------------------------------------------------------------
# pool_cov numerics

POOL_KINDS = [("AVG", False), ("AVG", True), ("SUM", False)]


@pytest.mark.parametrize("pool_type,normalize_edges", POOL_KINDS)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("diagonal_spatial", [False, True])
def test_pool(diagonal_spatial, padding, pool_type, normalize_edges):
    sizes = (5, 6)
    if diagonal_spatial:
        x = _rand((3, 2) + sizes, seed=2)
    else:
        x = _rand(_full_shape((2,), sizes, True), seed=3)
    kw = {
        "window_shape": (3, 2),
        "strides": (2, 1),
        "padding": padding,
        "pool_type": pool_type,
        "normalize_edges": normalize_edges,
        "diagonal_spatial": diagonal_spatial,
        "is_reversed": True,
    }
    _assert_f64(*_both(pool_cov, x, **kw))


@pytest.mark.parametrize("diagonal_spatial", [False, True])
def test_pool_float32(diagonal_spatial):
    sizes = (5, 6)
    shape = (3, 2) + sizes if diagonal_spatial else _full_shape((2,), sizes, False)
    kw = {"window_shape": (3, 2), "strides": (2, 2), "padding": "SAME", "normalize_edges": True}
    _assert_f32(pool_cov, _rand(shape, np.float32), diagonal_spatial=diagonal_spatial, **kw)


# ------------------------------------------------------------------------------------------------
# Launch structure: specializations, names, one pass per spatial axis


def _launches(fn, x):
    with runtime.record_launches() as log:
        jax.make_jaxpr(fn)(x)
    return log


def _spec_key(rec):
    """(kernel, dtype, constexprs) of a recorded launch (constexprs are the UPPER_CASE args)."""
    constexprs = tuple(sorted((k, v) for k, v in rec["metaparams"].items() if k.isupper()))
    return rec["kernel"], str(rec["in_dtypes"][0]), constexprs


def _spec_key_of(spec):
    """The same key for a SPECIALIZATIONS entry."""
    dtype = {"fp32": "float32", "fp64": "float64"}[spec["dtype"]]
    return spec["kernel"], dtype, tuple(sorted(spec["constexprs"].items()))


def _sweep():
    """Configurations reaching every kernel path: (op, shape, kwargs)."""
    for dtype, padding, diag in itertools.product(("float32", "float64"), PADDINGS, (0, 1)):
        shape = (2, 5, 6) if diag else (2, 5, 5, 6, 6)
        yield dtype, conv_cov, shape, {"padding": padding, "diagonal_spatial": bool(diag)}
        for ne in (False, True):
            kw = {"padding": padding, "diagonal_spatial": bool(diag), "normalize_edges": ne}
            yield dtype, pool_cov, shape, kw


def test_specializations_are_exactly_the_launched_variants():
    """Every launch of the sweep is a SPECIALIZATIONS entry, and every entry is launched."""
    listed = {_spec_key_of(s): s for s in TC.SPECIALIZATIONS}
    assert len(listed) == len(TC.SPECIALIZATIONS), "duplicate entries"
    seen = set()
    for dtype, op, shape, kw in _sweep():
        window = "filter_shape" if op is conv_cov else "window_shape"
        kw = {window: (3, 2), "strides": (1, 2), **kw}
        x = jax.ShapeDtypeStruct(shape, dtype)
        for rec in _launches(lambda v, op=op, kw=kw: op(v, backend="triton", **kw), x):
            key = _spec_key(rec)
            assert key in listed, key
            names = {conv_cov: (TC.FULL_CALL, TC.DIAG_CALL), pool_cov: (TC.POOL_CALL,)}[op]
            assert rec["name"] in names and rec["name"] in listed[key]["names"]
            seen.add(key)
    assert seen == set(listed), set(listed) - seen


def test_one_launch_per_spatial_axis_with_our_names():
    """Σ f work: n launches for n spatial pairs (conv), one per axis (pooling: 2n full)."""
    x = jax.ShapeDtypeStruct((2, 3, 4, 4, 5, 5, 3, 3), jnp.float64)
    kw = {"filter_shape": (3, 3, 2), "strides": (1, 2, 1), "padding": "SAME"}
    log = _launches(lambda v: conv_cov(v, backend="triton", **kw), x)
    assert [r["name"] for r in log] == [TC.FULL_CALL] * 3
    assert [r["metaparams"]["taps"] for r in log] == [2, 3, 3]  # last stored pair first
    assert [r["metaparams"]["den"] for r in log] == [1, 1, 18]
    xd = jax.ShapeDtypeStruct((2, 3, 4, 5, 3), jnp.float64)
    log = _launches(lambda v: conv_cov(v, backend="triton", diagonal_spatial=True, **kw), xd)
    assert [r["name"] for r in log] == [TC.DIAG_CALL] * 3
    pk = {"window_shape": (2, 3, 2), "strides": (2, 1, 1), "padding": "VALID"}
    log = _launches(lambda v: pool_cov(v, backend="triton", **pk), x)
    assert [r["name"] for r in log] == [TC.POOL_CALL] * 6


# ------------------------------------------------------------------------------------------------
# Transformations under backend="triton"

KW = {"filter_shape": (3, 2), "strides": (1, 2), "padding": "CIRCULAR", "is_reversed": True}


def test_jit_and_grad():
    x = jnp.asarray(_rand((2, 4, 4, 5, 5)))
    f = jax.jit(lambda v: conv_cov(v, backend="triton", **KW))
    _assert_f64(np.asarray(f(x)), np.asarray(conv_cov(x, backend="xla", **KW)))
    r = jnp.asarray(_rand(f(x).shape, seed=1))

    def loss(backend):
        return lambda v: jnp.vdot(conv_cov(v, backend=backend, **KW), r)

    g = jax.jit(jax.grad(loss("triton")))(x)
    _assert_f64(np.asarray(g), np.asarray(jax.grad(loss("xla"))(x)))
    # The op is linear: <x, grad> = <conv(x), r>.
    np.testing.assert_allclose(jnp.vdot(x, g), jnp.vdot(f(x), r), rtol=1e-12)


@pytest.mark.parametrize("in_axes", [0, 2])
def test_vmap_folds_into_batch_axes(in_axes):
    """vmap over any axis matches the reference, with one launch per pass (no loop)."""
    x = _rand((2, 3, 5, 5, 4, 4))  # the mapped axis of size 3 at position `in_axes`
    x = jnp.asarray(np.moveaxis(x, 1, in_axes))

    def f(backend):
        return jax.vmap(lambda v: conv_cov(v, backend=backend, **KW), in_axes=in_axes)

    _assert_f64(np.asarray(f("triton")(x)), np.asarray(f("xla")(x)))
    with runtime.record_launches() as log:
        jaxpr = jax.make_jaxpr(f("triton"))(x)
    # The unbatched op is traced first (custom_vmap), then the rule: both batch axes in 2 launches.
    assert [r["metaparams"]["n_lead"] for r in log[-2:]] == [6 * 5 * 5, 6]
    assert "while" not in str(jaxpr) and "scan" not in str(jaxpr)


def test_vmap_and_grad_of_pooling():
    x = jnp.asarray(_rand((3, 2, 5, 6), seed=4))
    kw = {"window_shape": (2, 3), "strides": (2, 1), "padding": "SAME", "diagonal_spatial": True}
    f = jax.vmap(lambda v, b: pool_cov(v, backend=b, normalize_edges=True, **kw), (0, None))
    _assert_f64(np.asarray(f(x, "triton")), np.asarray(f(x, "xla")))
    g = jax.grad(lambda v, b: jnp.sum(pool_cov(v, backend=b, **kw) ** 2))
    _assert_f64(np.asarray(g(x, "triton")), np.asarray(g(x, "xla")))


# ------------------------------------------------------------------------------------------------
# What the backend refuses, and errors


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.int32])
def test_unsupported_dtype_raises_backend_error(dtype):
    x = jnp.zeros((2, 5, 5), dtype)
    with pytest.raises(BackendError, match="triton.*float32 and float64"):
        conv_cov(x, filter_shape=(3,), strides=(1,), padding="SAME", backend="triton")
    with pytest.raises(BackendError, match="triton"):
        pool_cov(x, window_shape=(2,), strides=(1,), padding="SAME", backend="triton")


def test_slabs_beyond_int32_offsets_raise_backend_error():
    """Traced only: a 2^40-entry covariance (one pair of 1024x1024 images)."""
    x = jax.ShapeDtypeStruct((1, 1024, 1024, 1024, 1024), jnp.float32)
    kw = {"filter_shape": (3, 3), "strides": (1, 1), "padding": "SAME"}
    with pytest.raises(BackendError, match="int32"):
        jax.eval_shape(lambda v: conv_cov(v, backend="triton", **kw), x)


def test_argument_errors_match_the_reference():
    x = jnp.ones((2, 2, 2, 2, 5, 5))
    with pytest.raises(ValueError, match="does not fit"):
        conv_cov(x, filter_shape=(3, 1), strides=(1, 1), padding="VALID", backend="triton")
    with pytest.raises(ValueError, match="`strides`"):
        conv_cov(x, filter_shape=(3, 1), strides=(1,), padding="SAME", backend="triton")
    with pytest.raises(ValueError, match="`padding`"):
        conv_cov(x, filter_shape=(3, 1), strides=(1, 1), padding="FULL", backend="triton")


def test_empty_batch():
    x = jnp.zeros((0, 3, 5, 5))
    out, ref = _both(conv_cov, x, filter_shape=(3,), strides=(2,), padding="SAME")
    assert out.shape == ref.shape == (0, 3, 3, 3)


def test_canary_catches_a_launch_writing_past_its_output():
    """The guard around these tests is live for this kernel: a launch told its output is larger
    than the buffer it got (P = 3 slabs into a 2-slab output) fails with CanaryError."""
    x = jnp.asarray(_rand((3, 4, 4, 1)))
    args = {
        "n_trail": 1,
        "a1": 4,
        "a2": 4,
        "o1": 4,
        "o2": 4,
        "lo1": 1,
        "lo2": 1,
        "taps": 3,
        "stride": 1,
        "den": 3,
    }
    tiles = {"BLOCK_M": TC.ROWS_TILE[0], "BLOCK_Q": 1, "CIRCULAR": False}
    out = jax.ShapeDtypeStruct((2, 1, 4, 4), x.dtype)
    launch = lambda p: runtime.launch(
        "conv",
        "conv_pair_kernel",
        x,
        out_shape=out,
        grid=(1, 1),
        name=TC.FULL_CALL,
        n_lead=p,
        **args,
        **tiles,
    )
    with runtime.canary_guard(pad=64) as violations:
        jax.block_until_ready(launch(2))
        assert not violations
        with pytest.raises(Exception, match="out of bounds"):
            jax.block_until_ready(launch(3))
    assert violations and "output 0" in violations[0]

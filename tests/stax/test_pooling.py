"""``AvgPool``, ``SumPool``, ``GlobalAvgPool``, ``GlobalSumPool``, ``Flatten``: parity with NT 0.6.5.

Kernels are compared with NT's in f64 (arrays to 1e-6 relative, static fields and masks exactly;
``archs.compare``) over windows, strides, paddings, ``normalize_edges``, ``batch_axis`` /
``channel_axis``, ``diagonal_spatial``/``diagonal_batch``, reversed kernels (after a conv),
``x2=None`` and ``N1 != N2``, masks, 1-3 spatial axes, odd sizes; ``init_fn``/``apply_fn`` give
NT's shapes and outputs; errors match NT's (or name the argument where NT's message is unclear).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from parity import LIBS, assert_parity, assert_same_init_apply

import ntfast.stax as ours


def _x(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape))


POOLS = [
    ("AvgPool", False),
    ("AvgPool", True),
    ("SumPool", None),
]
# (window_shape, strides, padding) for 2 spatial axes.
WINDOWS = [
    ((2, 2), None, "VALID"),
    ((3, 2), (2, 2), "SAME"),
    ((2, 3), (1, 2), "CIRCULAR"),
    ((3, 3), (3, 1), "SAME"),
    ((1, 2), (1, 3), "VALID"),
]


def _pool(s_, kind, normalize_edges, *args, **kw):
    if kind == "AvgPool":
        return s_.AvgPool(*args, normalize_edges=normalize_edges, **kw)
    return s_.SumPool(*args, **kw)


# ------------------------------------------------------------------------------------------------
# Windowed pooling.


@pytest.mark.parametrize("kind,ne", POOLS)
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("diagonal_spatial", [False, True])
def test_pool_on_inputs(kind, ne, window, diagonal_spatial):
    """Pooling the input kernel (not reversed), full or diagonal spatial."""
    x1, x2 = _x((3, 5, 7, 2)), _x((2, 5, 7, 2), seed=1)

    def make(s_):
        return _pool(s_, kind, ne, *window)

    k = assert_parity(make, x1, x2, diagonal_spatial=diagonal_spatial)
    assert k.diagonal_spatial is diagonal_spatial


@pytest.mark.parametrize("case", range(len(WINDOWS)))
def test_pool_after_conv_reversed(case):
    """After a conv the kernel is stored reversed: the window must follow the stored order."""
    window, (kind, ne) = WINDOWS[case], POOLS[case % len(POOLS)]
    x1, x2 = _x((2, 6, 5, 2)), _x((3, 6, 5, 2), seed=1)

    def make(s_):
        return s_.serial(
            s_.Conv(3, (2, 1), padding="SAME", b_std=0.1),
            s_.Relu(),
            _pool(s_, kind, ne, *window),
            s_.Conv(2, (2, 2), padding="CIRCULAR"),
        )

    if case % 2:
        assert_parity(make, x1, None, diagonal_batch=False)
    else:
        assert_parity(make, x1, x2)


@pytest.mark.parametrize(
    "shape,window,strides,padding,kind,ne",
    [
        ((2, 7, 3), (3,), (2,), "SAME", "AvgPool", True),
        ((2, 4, 3, 5, 2), (2, 2, 3), (1, 2, 1), "CIRCULAR", "AvgPool", False),
        ((2, 4, 3, 5, 2), (2, 1, 2), (2, 1, 2), "VALID", "SumPool", None),
    ],
)
def test_pool_1d_3d(shape, window, strides, padding, kind, ne):
    x1 = _x(shape)
    n = len(window)

    def make(s_):
        return s_.serial(
            s_.Conv(2, (2,) * n, padding="SAME"),
            _pool(s_, kind, ne, window, strides, padding),
        )

    assert_parity(make, x1, None)
    assert_parity(lambda s_: _pool(s_, kind, ne, window, strides, padding), x1, None)


@pytest.mark.parametrize(
    "axes,kind,ne",
    [((0, 1), *POOLS[0]), ((1, 0), *POOLS[1]), ((3, 2), *POOLS[2]), ((2, -1), *POOLS[1])],
)
def test_pool_batch_channel_axes(kind, ne, axes):
    batch_axis, channel_axis = axes
    shape = [5, 6, 4, 4]
    shape[batch_axis], shape[channel_axis % 4] = 3, 2
    x1 = _x(tuple(shape))
    s2 = list(shape)
    s2[batch_axis] = 2
    x2 = _x(tuple(s2), seed=1)

    def make(s_):
        return _pool(
            s_, kind, ne, (2, 3), (1, 2), "SAME", batch_axis=batch_axis, channel_axis=channel_axis
        )

    assert_parity(make, x1, x2)
    assert_same_init_apply(make, x1)


@pytest.mark.parametrize("kind,ne", POOLS)
@pytest.mark.parametrize("padding", ["VALID", "SAME", "CIRCULAR"])
def test_pool_init_apply(kind, ne, padding):
    x = _x((2, 7, 6, 3))

    def make(s_):
        return _pool(s_, kind, ne, (3, 2), (2, 2), padding)

    assert_same_init_apply(make, x)


@pytest.mark.parametrize(
    "kind,ne,padding", [(*POOLS[0], "VALID"), (*POOLS[1], "SAME"), (*POOLS[2], "SAME")]
)
def test_pool_masks(kind, ne, padding):
    x1 = np.array(_x((3, 6, 7, 2)))
    x2 = np.array(_x((2, 6, 7, 2), seed=1))
    x1[0, 1, 2, :] = 9.0
    x2[1, 2, 0:4, :] = 9.0  # row 2 survives every (VALID or SAME) stride below

    def make(s_):
        return s_.serial(
            s_.Conv(3, (2, 2), padding="SAME"),
            _pool(s_, kind, ne, (2, 3), (2, 1), padding),
            s_.Relu(),
            _pool(s_, kind, ne, (2, 2), None, padding),
        )

    k = assert_parity(make, jnp.asarray(x1), jnp.asarray(x2), mask_constant=9.0)
    assert k.mask1 is not None and bool(jnp.any(k.mask2))


def test_pool_masks_channel_size_one_on_inputs():
    x1 = np.array(_x((3, 5, 6, 1)))
    x1[1, 2, 3, 0] = 4.0

    def make(s_):
        return s_.AvgPool((2, 2), (1, 2), "SAME")

    k = assert_parity(make, jnp.asarray(x1), None, mask_constant=4.0)
    assert k.mask1.shape == (3, 5, 3, 1)


def test_pool_circular_mask():
    """NT's `_pool_mask` rejects CIRCULAR (lax has no such padding); ours strides like SAME."""
    x = np.array(_x((2, 5, 6, 1)))
    x[0, 1, 1, 0] = 4.0
    _, apply_fn, kernel_fn = ours.AvgPool((2, 3), (2, 2), "CIRCULAR")
    out = apply_fn((), jnp.asarray(x), mask_constant=4.0)
    assert out.mask.shape == out.masked_value.shape == (2, 3, 3, 1)
    same = ours.AvgPool((2, 3), (2, 2), "SAME")[1]((), jnp.asarray(x), mask_constant=4.0)
    np.testing.assert_array_equal(out.mask, same.mask)
    k = kernel_fn(jnp.asarray(x), None, mask_constant=4.0)
    assert k.mask1.shape == (2, 3, 3, 1)


def test_pool_channelwise_mask_not_implemented():
    x = np.array(_x((2, 4, 4, 2)))
    x[0, 1, 1, 0] = 3.0  # one channel only
    for s_ in LIBS:
        with pytest.raises(NotImplementedError):
            s_.AvgPool((2, 2))[2](jnp.asarray(x), None, mask_constant=3.0)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: ours.AvgPool((2, 2), padding="FULL"), "`padding`"),
        (lambda: ours.SumPool((2, 2), padding=3), "`padding`"),
        (lambda: ours.AvgPool((2, 2), strides=(1, 1, 1)), "`strides`"),
        (lambda: ours.AvgPool((2, 0)), "`window_shape`"),
        (lambda: ours.AvgPool((2, 2), batch_axis=1, channel_axis=1), "`batch_axis`"),
    ],
)
def test_pool_argument_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ------------------------------------------------------------------------------------------------
# Global pooling.


@pytest.mark.parametrize("kind", ["GlobalAvgPool", "GlobalSumPool"])
@pytest.mark.parametrize("diagonal_spatial", [False, True])
@pytest.mark.parametrize("diagonal_batch", [True, False])
def test_global_pool_on_inputs(kind, diagonal_spatial, diagonal_batch):
    x1, x2 = _x((3, 5, 6, 2)), _x((2, 5, 6, 2), seed=1)

    def make(s_):
        return getattr(s_, kind)()

    kw = {"diagonal_spatial": diagonal_spatial, "diagonal_batch": diagonal_batch}
    if diagonal_spatial:
        # NT sums only the diagonal here (wrong: inputs have location-location covariances);
        # ntfast refuses a global pool of a diagonal_spatial kernel.
        with pytest.raises(ValueError, match="diagonal_spatial"):
            make(ours)[2](x1, x2, **kw)
        return
    k = assert_parity(make, x1, x2, **kw)
    assert k.nngp.shape == (3, 2)
    assert_parity(make, x1, None, **kw)


@pytest.mark.parametrize(
    "kind,axes",
    [
        ("GlobalAvgPool", (0, -1)),
        ("GlobalSumPool", (1, 0)),
        ("GlobalAvgPool", (3, 1)),
        ("GlobalSumPool", (2, 0)),
    ],
)
def test_global_pool_after_conv(kind, axes):
    batch_axis, channel_axis = axes
    lhs = ["H", "W", "D", "E"]
    lhs[batch_axis], lhs[channel_axis % 4] = "N", "C"
    lhs = "".join(lhs)
    spatial = "".join(c for c in lhs if c not in "NC")
    dn = (lhs, spatial + "IO", lhs)
    sizes = {"N": 3, "C": 2, spatial[0]: 5, spatial[1]: 4}
    x1 = _x(tuple(sizes[c] for c in lhs))

    def make(s_):
        return s_.serial(
            s_.Conv(3, (2, 3), (1, 1), "SAME", b_std=0.2, dimension_numbers=dn),
            s_.Relu(),
            getattr(s_, kind)(batch_axis=batch_axis, channel_axis=channel_axis),
        )

    k = assert_parity(make, x1, None)
    assert k.is_reversed is False
    assert_same_init_apply(make, x1)


@pytest.mark.parametrize("kind", ["GlobalAvgPool", "GlobalSumPool"])
@pytest.mark.parametrize("diagonal_batch", [True, False])
def test_global_pool_masks(kind, diagonal_batch):
    x1 = np.array(_x((3, 5, 6, 2)))
    x2 = np.array(_x((2, 5, 6, 2), seed=1))
    x1[0, 1:3, 2, :] = 6.0
    x2[1, 4, :, :] = 6.0

    def make(s_):
        return s_.serial(s_.Conv(3, (2, 2), padding="SAME"), s_.Relu(), getattr(s_, kind)())

    k = assert_parity(
        make, jnp.asarray(x1), jnp.asarray(x2), mask_constant=6.0, diagonal_batch=diagonal_batch
    )
    assert k.mask1.shape == (3, 1)


def test_global_pool_apply_mask():
    x = np.array(_x((2, 4, 5, 1)))  # masks must be constant along channels (NT)
    x[0, 1, 1, :] = 6.0
    x[1, 0:2, :, :] = 6.0
    for kind in ("GlobalAvgPool", "GlobalSumPool"):
        outs = [getattr(s_, kind)()[1]((), jnp.asarray(x), mask_constant=6.0) for s_ in LIBS]
        np.testing.assert_allclose(outs[0].masked_value, outs[1].masked_value, rtol=1e-12)
        np.testing.assert_array_equal(outs[0].mask, outs[1].mask)


# ------------------------------------------------------------------------------------------------
# Flatten.


@pytest.mark.parametrize("batch_axis_out", [0, 1, -1])
@pytest.mark.parametrize("diagonal_spatial", [False, True])
def test_flatten_on_inputs(batch_axis_out, diagonal_spatial):
    x1, x2 = _x((3, 5, 6, 2)), _x((2, 5, 6, 2), seed=1)

    def make(s_):
        return s_.Flatten(batch_axis_out=batch_axis_out)

    k = assert_parity(make, x1, x2, diagonal_spatial=diagonal_spatial)
    assert k.channel_axis == 1 - k.batch_axis
    assert_same_init_apply(make, x1)


@pytest.mark.parametrize(
    "batch_axis,batch_axis_out,diagonal_batch",
    [(0, 0, True), (0, 1, False), (2, 0, False), (2, 1, True)],
)
def test_flatten_after_conv(batch_axis, batch_axis_out, diagonal_batch):
    lhs = "NHWC" if batch_axis == 0 else "HWNC"
    dn = (lhs, "HWIO", lhs)
    x1 = _x((3, 5, 4, 2) if batch_axis == 0 else (5, 4, 3, 2))

    def make(s_):
        return s_.serial(
            s_.Conv(3, (3, 2), (1, 2), "CIRCULAR", b_std=0.1, dimension_numbers=dn),
            s_.Relu(),
            s_.Conv(2, (2, 2), None, "SAME", dimension_numbers=dn),
            s_.Flatten(batch_axis=batch_axis, batch_axis_out=batch_axis_out),
            s_.Dense(3, batch_axis=batch_axis_out, channel_axis=1 - batch_axis_out),
        )

    assert_parity(make, x1, None, diagonal_batch=diagonal_batch)


def test_flatten_masks():
    x1 = np.array(_x((3, 5, 4, 2)))
    x1[2, 0, 1, :] = 8.0

    def make(s_):
        return s_.serial(s_.Conv(3, (2, 2), padding="SAME"), s_.Relu(), s_.Flatten())

    k = assert_parity(make, jnp.asarray(x1), None, mask_constant=8.0)
    # The per-position mask broadcast over the 3 channels, flattened: 5 * 4 * 3 features.
    assert k.mask1.shape == (3, 60) and int(k.mask1[2].sum()) == 3 and not bool(k.mask1[:2].any())


def test_flatten_bad_batch_axis_out():
    for s_ in LIBS:
        with pytest.raises(ValueError, match="batch_axis_out"):
            s_.Flatten(batch_axis_out=2)

"""``Conv``: parity with Neural Tangents 0.6.5.

Kernels are compared with NT's in f64 (arrays to 1e-6 relative, static fields and masks exactly;
see ``archs.compare``) over paddings, strides, filter shapes, ``dimension_numbers`` (including
spatial permutations between the lhs, rhs and out specs), parameterizations, ``b_std=None``,
``diagonal_spatial``/``diagonal_batch``, ``x2=None`` and ``N1 != N2``, masks, reversed inputs
(conv after conv) and odd image sizes; ``init_fn``/``apply_fn`` give NT's shapes, parameters
and outputs for the same key; bad arguments raise ValueError naming the argument.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from parity import LIBS, assert_parity, assert_same_init_apply

import ntfast.stax as ours


def _x(dn_lhs, sizes, n, c=2, seed=0):
    """Random input laid out by ``dn_lhs`` (e.g. ``"NCHW"``); ``sizes`` maps spatial letters."""
    dims = {"N": n, "C": c, **sizes}
    shape = tuple(dims[ch] for ch in dn_lhs)
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape))


# (dimension_numbers, spatial sizes). Odd sizes; permutations of spatial axes between specs.
LAYOUTS = [
    (None, {"A": 5, "B": 6}),
    (("NHWC", "HWIO", "NHWC"), {"H": 5, "W": 6}),
    (("NCHW", "OIHW", "NCHW"), {"H": 6, "W": 5}),
    (("HWCN", "HWIO", "HWCN"), {"H": 5, "W": 4}),
    (("NHWC", "HWIO", "NWHC"), {"H": 5, "W": 6}),
    (("NHWC", "WHIO", "NHWC"), {"H": 5, "W": 6}),
    (("CHWN", "IOWH", "NCWH"), {"H": 4, "W": 5}),
    (("NWC", "WIO", "NWC"), {"W": 7}),
    (("NDHWC", "HWDIO", "NWDHC"), {"D": 3, "H": 4, "W": 5}),
]
# (filter_shape, strides, padding): every padding, strides > 1, 1-wide and even filters.
WINDOWS = [
    ((3, 2), None, "VALID"),
    ((3, 3), (2, 1), "SAME"),
    ((2, 3), (1, 2), "CIRCULAR"),
    ((1, 4), (2, 2), "SAME"),
    ((4, 1), (3, 1), "CIRCULAR"),
]


def _fit(window, n):
    """Window tuples cut or extended to ``n`` spatial axes."""
    fs, st, pad = window
    fs = (fs * 2)[:n]
    st = None if st is None else (st * 2)[:n]
    return fs, st, pad


# Every layout meets two windows and every window meets every padding (no full product: each
# case compiles two networks).
LAYOUT_WINDOW = [(i, WINDOWS[(i + j) % len(WINDOWS)]) for i in range(len(LAYOUTS)) for j in (0, 2)]


@pytest.mark.parametrize("layout,window", LAYOUT_WINDOW)
def test_conv_layouts_and_windows(layout, window):
    dn, sizes = LAYOUTS[layout]
    fs, st, pad = _fit(window, len(sizes))
    lhs = dn[0] if dn else "NABC"
    x1, x2 = _x(lhs, sizes, 3), _x(lhs, sizes, 2, seed=1)

    def make(s_):
        return s_.Conv(4, fs, st, pad, W_std=1.3, b_std=0.4, dimension_numbers=dn)

    assert_parity(make, x1, x2)


@pytest.mark.parametrize(
    "parameterization,b_std,x2_none",
    [("ntk", None, False), ("ntk", 0.3, True), ("standard", None, True), ("standard", 0.3, False)],
)
def test_conv_parameterization_bias_x2(parameterization, b_std, x2_none):
    sizes = {"H": 5, "W": 4}
    x1 = _x("NHWC", sizes, 3, c=3)
    x2 = None if x2_none else _x("NHWC", sizes, 2, c=3, seed=1)

    def make(s_):
        return s_.serial(
            s_.Conv(
                3, (3, 2), (1, 2), "SAME", 1.5, b_std, parameterization=parameterization, s=(2, 3)
            ),
            s_.Relu(),
            s_.Conv(
                5, (2, 2), None, "CIRCULAR", 0.8, b_std, parameterization=parameterization, s=(3, 1)
            ),
        )

    assert_parity(make, x1, x2)


@pytest.mark.parametrize("padding", ["VALID", "SAME", "CIRCULAR"])
def test_conv_stacks_flip_is_reversed(padding):
    """Conv after conv reads a reversed kernel; pooling in between keeps the order."""
    sizes = {"H": 7, "W": 6}
    x1, x2 = _x("NHWC", sizes, 2), _x("NHWC", sizes, 3, seed=2)

    def make(s_):
        return s_.serial(
            s_.Conv(3, (3, 2), (2, 1), padding, b_std=0.1),
            s_.Erf(),
            s_.Conv(3, (2, 3), (1, 1), padding, W_std=1.2),
            s_.AvgPool((2, 1), (1, 1), padding),
            s_.Conv(3, (1, 2), (1, 2), padding, b_std=0.2),
        )

    k = assert_parity(make, x1, x2)
    assert k.is_reversed is True


def test_conv_3d_permuted_reversed_chain():
    dn = ("NDHWC", "WDHIO", "NHDWC")
    sizes = {"D": 3, "H": 4, "W": 5}
    x1 = _x("NDHWC", sizes, 2)

    def make(s_):
        return s_.serial(
            s_.Conv(2, (2, 1, 2), (1, 2, 1), "SAME", b_std=0.1, dimension_numbers=dn),
            s_.Relu(),
            s_.Conv(2, (2, 2, 1), None, "CIRCULAR", dimension_numbers=("NHDWC", "HDWIO", "NWHDC")),
        )

    assert_parity(make, x1, None)


@pytest.mark.parametrize("diagonal_batch", [True, False])
@pytest.mark.parametrize("diagonal_spatial", [True, False])
def test_conv_diagonal_layouts(diagonal_batch, diagonal_spatial):
    sizes = {"H": 5, "W": 6}
    x1, x2 = _x("NHWC", sizes, 3), _x("NHWC", sizes, 2, seed=1)

    def make(s_):
        return s_.serial(
            s_.Conv(3, (3, 2), (2, 1), "SAME", 1.1, 0.2),
            s_.Relu(),
            s_.Conv(3, (2, 2), None, "CIRCULAR", 0.9, 0.1),
            s_.Flatten(),
        )

    def single(s_):
        return s_.Conv(3, (3, 2), (2, 1), "SAME", 1.1, 0.2)

    kw = {"diagonal_batch": diagonal_batch, "diagonal_spatial": diagonal_spatial}
    assert_parity(make, x1, x2, **kw)
    k = assert_parity(single, x1, x2, **kw)
    assert k.diagonal_spatial is diagonal_spatial and k.diagonal_batch is diagonal_batch


@pytest.mark.parametrize(
    "padding,dn",
    [
        ("VALID", None),
        ("SAME", ("NCHW", "OIHW", "NCHW")),
        ("CIRCULAR", ("NHWC", "HWIO", "NWHC")),
    ],
)
def test_conv_masks(padding, dn):
    lhs = dn[0] if dn else "NABC"
    letters = [c for c in lhs if c not in "NC"]
    sizes = dict(zip(letters, (5, 6)))
    x1 = np.array(_x(lhs, sizes, 3, c=2))
    x2 = np.array(_x(lhs, sizes, 2, c=2, seed=1))
    # Mask whole positions (every channel) so that the kernel's per-position masks are defined.
    c_axis = lhs.index("C")
    idx1 = [slice(None)] * 4
    idx1[lhs.index("N")], idx1[lhs.index(letters[0])], idx1[lhs.index(letters[1])] = 0, 1, 2
    x1[tuple(idx1)] = 7.0
    idx2 = list(idx1)
    idx2[lhs.index("N")], idx2[lhs.index(letters[1])] = 1, slice(3, 6)
    x2[tuple(idx2)] = 7.0
    assert (x1 == 7.0).any(axis=c_axis).sum() == 1

    def make(s_):
        return s_.serial(
            s_.Conv(3, (3, 2), (2, 1), padding, b_std=0.2, dimension_numbers=dn),
            s_.Relu(),
            s_.Conv(3, (2, 3), (1, 1), padding, dimension_numbers=dn),
        )

    k = assert_parity(make, jnp.asarray(x1), jnp.asarray(x2), mask_constant=7.0)
    assert k.mask1 is not None and k.mask2 is not None


def test_conv_apply_mask_parity():
    x = np.array(_x("NHWC", {"H": 5, "W": 6}, 2, c=3))
    x[0, 2, 3, :] = -5.0
    outs = []
    for s_ in LIBS:
        init_fn, apply_fn, _ = s_.Conv(4, (3, 3), (2, 1), "SAME", b_std=0.1)
        _, params = init_fn(jax.random.PRNGKey(0), x.shape)
        outs.append(apply_fn(params, jnp.asarray(x), mask_constant=-5.0))
    np.testing.assert_allclose(outs[0].masked_value, outs[1].masked_value, rtol=1e-12)
    np.testing.assert_array_equal(outs[0].mask, outs[1].mask)
    assert outs[0].mask.shape == (2, 3, 6, 1)


INIT_CASES = [
    (layout, padding, param)
    for k, layout in enumerate(range(len(LAYOUTS)))
    for padding, param in [
        (
            ("VALID", "SAME", "CIRCULAR")[k % 3],
            (("ntk", None), ("ntk", 0.5), ("standard", 0.5))[k % 3],
        ),
        (
            ("CIRCULAR", "VALID", "SAME")[k % 3],
            (("standard", None), ("ntk", 0.5), ("ntk", None))[k % 3],
        ),
    ]
]


@pytest.mark.parametrize("layout,padding,param", INIT_CASES)
def test_conv_init_apply_parity(layout, padding, param):
    parameterization, b_std = param
    dn, sizes = LAYOUTS[layout]
    n = len(sizes)
    fs, st = ((3, 2, 2)[:n], (2, 1, 1)[:n])
    x = _x(dn[0] if dn else "NABC", sizes, 2, c=3)

    def make(s_):
        return s_.Conv(
            4, fs, st, padding, 1.7, b_std, dn, parameterization=parameterization, s=(2, 3)
        )

    params, _ = assert_same_init_apply(make, x)
    assert (params[1] is None) == (b_std is None)


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((3, (3, 3)), {"padding": "FULL"}, "`padding`"),
        ((3, (3, 3)), {"parameterization": "mup"}, "`parameterization`"),
        ((3, (3, 3)), {"strides": (1, 1, 1)}, "`strides`"),
        ((3, (3, 0)), {}, "`filter_shape`"),
        ((3, (3, 3)), {"dimension_numbers": ("NHWC", "HWIO")}, "`dimension_numbers`"),
        ((3, (3, 3)), {"dimension_numbers": ("NHWC", "HWIO", "NHDC")}, "`dimension_numbers`"),
        ((3, (3,)), {"dimension_numbers": ("NHWC", "HWIO", "NHWC")}, "`dimension_numbers`"),
    ],
)
def test_conv_argument_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ours.Conv(*args, **kwargs)


def test_conv_requires_matching_batch_axis():
    """A kernel laid out with another batch axis cannot feed the layer (NT raises too)."""
    x = _x("NHWC", {"H": 4, "W": 4}, 2)
    for s_ in LIBS:
        k = s_.Conv(2, (2, 2))[2](x)
        with pytest.raises(ValueError):
            s_.Conv(2, (2, 2), dimension_numbers=("HWCN", "HWIO", "HWCN"))[2](k)


@pytest.mark.parametrize("tail", ["GlobalAvgPool", "AvgPool"])
def test_conv_then_pool_rejects_diagonal_spatial(tail):
    """Pooling after a conv needs off-diagonal spatial entries: both libraries refuse."""
    x = _x("NHWC", {"H": 4, "W": 5}, 2)
    for s_ in LIBS:
        pool = s_.GlobalAvgPool() if tail == "GlobalAvgPool" else s_.AvgPool((2, 2))
        net = s_.serial(s_.Conv(2, (2, 2)), s_.Relu(), pool)
        with pytest.raises(ValueError, match="diagonal_spatial"):
            net[2](x, None, diagonal_spatial=True)

"""``Dense``, ``DotGeneral``, ``Identity``, ``Index``, ``Slice``: parity with Neural Tangents 0.6.5.

Every kernel is compared with NT's in f64 (arrays to 1e-6 relative, static fields and masks
exactly; see ``archs.compare``), over parameters, layouts (``batch_axis``/``channel_axis``),
``diagonal_spatial``, ``x2=None`` and ``N1 != N2``, masks and 2-4-D inputs; ``init_fn`` /
``apply_fn`` give NT's shapes, parameters and outputs for the same key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from archs import compare
from parity import LIBS, assert_parity, assert_same_init_apply

import ntfast.stax as ours


def _x(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape))


def _x2_of(shape, batch_axis, n2, seed=1):
    if n2 is None:
        return None
    s = list(shape)
    s[batch_axis] = n2
    return _x(tuple(s), seed)


# ----------------------------------------------------------------------------------------------
# Dense

DENSE_PARAMS = [
    {"W_std": 1.0},
    {"W_std": 1.7, "b_std": 0.3},
    {"W_std": 0.8, "b_std": 0.5, "parameterization": "standard"},
    {"W_std": 1.3, "parameterization": "STANDARD", "s": (2, 3)},
    {"W_std": 1.2, "b_std": 0.0, "parameterization": "standard", "s": (1, 2)},
]
# (input shape, batch_axis, channel_axis)
DENSE_LAYOUTS = [((3, 5), 0, -1), ((4, 3), 1, 0), ((3, 4, 5, 2), 0, -1), ((2, 4, 3), -1, 1)]


def _dense_net(params, b, c):
    def make(s):
        return s.serial(
            s.Dense(3, batch_axis=b, channel_axis=c, **params),
            s.Dense(2, W_std=1.1, b_std=0.2, batch_axis=b, channel_axis=c, **_param_only(params)),
        )

    return make


def _param_only(params):
    return {k: v for k, v in params.items() if k in ("parameterization",)}


# Each parameter set on two layouts (the full product costs compile time, not coverage).
DENSE_GRID = [
    (p, lay)
    for i, p in enumerate(DENSE_PARAMS)
    for j, lay in enumerate(DENSE_LAYOUTS)
    if (i + j) % 2 == 0
]


@pytest.mark.filterwarnings("ignore:!!! Non-leading")
@pytest.mark.parametrize("params,layout", DENSE_GRID)
def test_dense_kernel_parity(params, layout):
    shape, b, c = layout
    make = _dense_net(params, b, c)
    x1 = _x(shape)
    n2 = 2 if len(shape) > 2 else None  # x2=None on 2-D, N2 != N1 otherwise
    assert_parity(make, x1, _x2_of(shape, b % len(shape), n2))


@pytest.mark.parametrize("diagonal_spatial", [True, False])
@pytest.mark.parametrize("diagonal_batch", [True, False])
def test_dense_layouts_forced(diagonal_batch, diagonal_spatial):
    def make(s):
        return s.Dense(4, W_std=1.4, b_std=0.1)

    k = assert_parity(
        make,
        _x((3, 4, 2)),
        _x((2, 4, 2), 1),
        diagonal_batch=diagonal_batch,
        diagonal_spatial=diagonal_spatial,
    )
    assert k.is_gaussian and k.diagonal_spatial == diagonal_spatial


def test_dense_get_and_masks():
    x1 = _x((3, 4, 2)).at[0, 1, :].set(7.0)
    x2 = _x((2, 4, 2), 1).at[1, 3, :].set(7.0)

    def make(s):
        return s.serial(s.Dense(3, W_std=1.5, b_std=0.4), s.Dense(2, W_std=0.9, b_std=0.1))

    k = assert_parity(make, x1, x2, mask_constant=7.0)
    assert k.mask1.shape == (3, 4, 1) and bool(k.mask1[0, 1, 0])
    # Masked positions have zero covariance with everything (remask_kernel=True).
    assert float(jnp.abs(k.nngp[0, :, 1]).max()) == 0.0
    mine, theirs = (make(s)[2](x1, x2, get=("nngp", "ntk")) for s in LIBS)
    assert not compare(mine, theirs)


@pytest.mark.parametrize("params", DENSE_PARAMS)
@pytest.mark.parametrize("layout", [((3, 5), 0, -1), ((2, 4, 3), 2, 0)])
def test_dense_init_apply_parity(params, layout):
    shape, b, c = layout

    def make(s):
        return s.Dense(4, batch_axis=b, channel_axis=c, **params)

    assert_same_init_apply(make, _x(shape))


def test_dense_apply_mask_parity():
    x = _x((3, 4, 2)).at[1, 2, :].set(-9.0)

    def make(s):
        return s.Dense(3, W_std=1.5, b_std=0.2)

    outs = []
    for s in LIBS:
        init_fn, apply_fn, _ = make(s)
        _, params = init_fn(jax.random.PRNGKey(0), x.shape)
        outs.append(apply_fn(params, x, mask_constant=-9.0))
    np.testing.assert_allclose(outs[0].masked_value, outs[1].masked_value, rtol=1e-12)
    np.testing.assert_array_equal(outs[0].mask, outs[1].mask)


def test_dense_errors():
    with pytest.raises(ValueError, match="Parameterization not supported"):
        ours.Dense(3, parameterization="mup")
    with pytest.raises(TypeError, match="parameterization"):
        ours.Dense(3, parameterization=None)
    # The kernel's channel axis must match the layer's.
    k = ours.Dense(3)[2](_x((3, 4, 2)))
    with pytest.raises(ValueError, match="channel_axis"):
        ours.Dense(3, channel_axis=1)[2](k)


# ----------------------------------------------------------------------------------------------
# DotGeneral

# (input shape, "lhs" | "rhs", constant (shape or a float), dimension_numbers, layer axes)
DOT_CASES = [
    ((3, 4, 5, 2), "rhs", (5, 3), (((2,), (0,)), ((), ())), {}),
    ((3, 4, 5, 2), "lhs", (3, 4), (((1,), (1,)), ((), ())), {}),
    ((3, 4, 5, 2), "rhs", (4, 5, 3), (((2,), (1,)), ((1,), (0,))), {}),
    ((3, 4, 5, 2), "rhs", (4, 5), (((1, 2), (0, 1)), ((), ())), {}),
    ((3, 4, 2), "rhs", (4,), (((), ()), ((1,), (0,))), {}),
    ((3, 4, 2), "lhs", (5,), (((), ()), ((), ())), {}),
    ((3, 4, 2), "rhs", 2.0, (((), ()), ((), ())), {}),
    ((4, 2, 3), "rhs", (4, 3), (((0,), (0,)), ((), ())), {"batch_axis": 2, "channel_axis": 1}),
    ((3, 2), "lhs", (4, 3), (((1,), (0,)), ((), ())), {}),  # contracts the batch axis
]


def _const(spec, seed):
    return spec if isinstance(spec, float) else _x(spec, seed)


def _dot_net(case):
    """``Dense -> DotGeneral`` (the constant acts on Gaussian, finite-width-free activations)."""
    shape, side, ospec, dn, axes = DOT_CASES[case]
    other = _const(ospec, 11)

    def make(s):
        return s.serial(
            s.Dense(3, W_std=1.2, b_std=0.1, **axes),
            s.DotGeneral(**{side: other}, dimension_numbers=dn, **axes),
        )

    return make, shape, axes.get("batch_axis", 0)


@pytest.mark.filterwarnings("ignore:!!! Non-leading")
@pytest.mark.parametrize("case", range(len(DOT_CASES)))
def test_dot_general_kernel_parity(case):
    make, shape, b = _dot_net(case)
    x1 = _x(shape)
    contracts_batch = case == len(DOT_CASES) - 1
    n2 = None if (case % 2 or contracts_batch) else shape[b] + 1
    assert_parity(make, x1, _x2_of(shape, b, n2))


@pytest.mark.parametrize("case", [0, 4, 5])
def test_dot_general_diagonal_spatial_parity(case):
    make, shape, b = _dot_net(case)
    if case == 0:
        # Contracting a spatial axis needs full spatial covariances: both libraries refuse.
        for s in LIBS:
            with pytest.raises(ValueError):
                make(s)[2](_x(shape), diagonal_spatial=True)
        return
    k = assert_parity(make, _x(shape), _x2_of(shape, b, 2), diagonal_spatial=True)
    assert k.diagonal_spatial


def test_dot_general_then_dense_parity():
    dn = (((1,), (0,)), ((), ()))
    o = _x((4, 3), 5)

    def make(s):
        return s.serial(
            s.Dense(3, W_std=1.2),
            s.DotGeneral(rhs=o, dimension_numbers=dn),  # (N, 4, C) -> (N, C, 3)
            s.Dense(2, W_std=0.7, b_std=0.3, channel_axis=1),
        )

    assert_parity(make, _x((3, 4, 2)), _x((2, 4, 2), 1))


def test_dot_general_masks_parity():
    x1 = _x((3, 4, 2)).at[0, 1, :].set(5.0)
    o = _x((4, 3), 5)

    def make(s):
        return s.serial(
            s.Dense(3, W_std=1.2), s.DotGeneral(lhs=o.T, dimension_numbers=(((1,), (1,)), ((), ())))
        )

    k = assert_parity(make, x1, None, mask_constant=5.0)
    assert k.mask1 is not None


@pytest.mark.parametrize("case", [0, 1, 2, 6])
def test_dot_general_init_apply_parity(case):
    shape, side, ospec, dn, _ = DOT_CASES[case]
    other = _const(ospec, 11)

    def make(s):
        return s.DotGeneral(**{side: other}, dimension_numbers=dn)

    assert_same_init_apply(make, _x(shape))


def test_dot_general_errors():
    with pytest.raises(ValueError, match="At most one of constant"):
        ours.DotGeneral(lhs=1.0, rhs=2.0)
    # The channel axis has infinite size: it cannot be contracted.
    layer = ours.DotGeneral(rhs=_x((2, 3)), dimension_numbers=(((2,), (0,)), ((), ())))
    with pytest.raises(ValueError, match="channel_axis"):
        layer[2](_x((3, 4, 2)))


def test_dot_general_backend_per_call():
    from ntfast import backend

    make, shape, _ = _dot_net(2)
    x = _x(shape)
    k_default = make(ours)[2](x)
    k_xla = make(ours)[2](x, backend="xla")
    assert not compare(k_xla, k_default, rtol=0)
    # "native" has no dot_general kernel: it runs the XLA definition (backend.XLA_FILLED).
    if backend.unavailable_reason("native") is None:
        assert not compare(k_xla, make(ours)[2](x, backend="native"), rtol=0)


def test_dot_general_without_constants_is_identity():
    # NT documents this as the identity (its own constructor raises on jnp.array(None)).
    x1, x2 = _x((3, 4, 2)), _x((2, 4, 2), 1)
    k_dot = ours.DotGeneral()[2](x1, x2)
    k_id = ours.Identity()[2](x1, x2)
    assert not compare(k_dot, k_id, rtol=0)
    init_fn, apply_fn, _ = ours.DotGeneral()
    assert init_fn(None, x1.shape)[0] == x1.shape
    np.testing.assert_array_equal(apply_fn((), x1), x1)


# ----------------------------------------------------------------------------------------------
# Identity


@pytest.mark.parametrize("n2", [None, 2])
def test_identity_parity(n2):
    def make(s):
        return s.serial(s.Dense(3, W_std=1.3), s.Identity())

    x1 = _x((3, 4, 2)).at[1, 0, :].set(4.0)
    assert_parity(make, x1, _x2_of((3, 4, 2), 0, n2), mask_constant=4.0)
    assert_parity(make, x1, _x2_of((3, 4, 2), 0, n2), diagonal_spatial=True)
    assert_same_init_apply(lambda s: s.Identity(), x1)


# ----------------------------------------------------------------------------------------------
# Index and Slice

INDEX_CASES = [
    (ours.Slice[::2, :3], (4, 5, 2), 0, -1),
    (ours.Slice[:, 1, ...], (3, 4, 5, 2), 0, -1),
    (ours.Slice[..., ::-1, :], (3, 4, 5, 2), 0, -1),
    (ours.Slice[1:, 2:, :, :], (3, 4, 5, 2), 0, -1),
    (ours.Slice[1, :, 1:], (4, 2, 3), 2, 1),
    (ours.Slice[:, 1:3], (3, 4), 1, 0),
]


@pytest.mark.filterwarnings("ignore:!!! Non-leading")
@pytest.mark.parametrize("case", range(len(INDEX_CASES)))
@pytest.mark.parametrize("diagonal_spatial", [False, True])
def test_index_parity(case, diagonal_spatial):
    idx, shape, b, c = INDEX_CASES[case]

    def make(s):
        return s.serial(
            s.Dense(3, W_std=1.4, b_std=0.2, batch_axis=b, channel_axis=c),
            s.Index(idx, batch_axis=b, channel_axis=c),
        )

    x1 = _x(shape)
    x2 = _x2_of(shape, b % len(shape), shape[b] + 1) if case % 2 else None
    assert_parity(make, x1, x2, diagonal_spatial=diagonal_spatial)


def test_index_masks_and_init_apply_parity():
    x1 = _x((3, 4, 5, 2)).at[0, 1, 2, :].set(3.0)

    def make(s):
        return s.serial(s.Dense(3), s.Index(s.Slice[:, 1:, ::2]))

    k = assert_parity(make, x1, None, mask_constant=3.0)
    assert k.mask1.shape == (3, 3, 3, 1)
    assert_same_init_apply(lambda s: s.Index(s.Slice[:2, ::-1, 1]), x1)


def test_index_errors():
    x = _x((3, 4, 2))
    with pytest.raises(NotImplementedError, match="channel axis"):
        ours.Index(ours.Slice[..., :1])[2](x)
    with pytest.raises(NotImplementedError, match="batch axis"):
        ours.Index(ours.Slice[0])[2](x)


def test_slice_helper():
    assert ours.Slice[1:10, :, ::-1] == (slice(1, 10), slice(None), slice(None, None, -1))
    assert ours.Slice[2] == 2
    assert ours.Slice[..., 0] == (Ellipsis, 0)
    assert ours.Slice[1:10, :, ::-1] == LIBS[1].Slice[1:10, :, ::-1]

"""``LayerNorm`` and ``Dropout``: parity with Neural Tangents 0.6.5 and their own semantics.

Kernels are compared with NT in f64 (arrays to 1e-6 relative, static fields and masks exactly;
``archs.compare``) over normalized axes, layouts, ``diagonal_spatial``/``diagonal_batch``,
``x2=None`` / ``N1 != N2``, masks and ``is_reversed`` kernels (after a ``Conv``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from archs import compare
from nt_oracle import load_nt_stax

import ntfast.stax as ours
from ntfast.stax.normalization import _scale_diagonal

nts = load_nt_stax()
LIBS = (ours, nts)


def _x(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape))


def assert_parity(make, x1, x2=None, **kw):
    mine, theirs = (make(s)[2](x1, x2, **kw) for s in LIBS)
    problems = compare(mine, theirs, rtol=1e-6)
    assert not problems, problems
    return mine


# ----------------------------------------------------------------------------------------------
# LayerNorm

# (input shape, batch_axis, channel_axis, LayerNorm axis)
LN_CASES = [
    ((3, 5), 0, -1, -1),
    ((3, 4, 2), 0, -1, -1),
    ((3, 4, 2), 0, -1, (1, 2)),
    ((3, 4, 5, 2), 0, -1, (1, 3)),
    ((3, 4, 5, 2), 0, -1, (1, 2, 3)),
    ((3, 4, 5, 2), 0, -1, (0, 1, 2, 3)),  # batch axis normalized too
    ((2, 4, 3), 1, 0, (0, 2)),
    ((4, 2, 3), 2, 1, (0, 1)),
]


def _ln_net(shape, b, c, axis, eps=1e-12):
    def make(s):
        return s.serial(
            s.Dense(3, W_std=1.3, b_std=0.4, batch_axis=b, channel_axis=c),
            s.LayerNorm(axis=axis, eps=eps, batch_axis=b, channel_axis=c),
            s.Dense(2, W_std=0.9, batch_axis=b, channel_axis=c),
        )

    return make


@pytest.mark.filterwarnings("ignore:!!! Non-leading")
@pytest.mark.parametrize("case", range(len(LN_CASES)))
def test_layernorm_parity(case):
    shape, b, c, axis = LN_CASES[case]
    x1 = _x(shape)
    s2 = list(shape)
    s2[b] += 1
    x2 = None if case % 2 else _x(tuple(s2), 1)
    # diagonal_spatial only where no spatial axis is normalized (else NT and we refuse it).
    ds = len(shape) > 2 and case % 3 == 1
    kw = {"diagonal_spatial": True} if ds else {}
    assert_parity(_ln_net(shape, b, c, axis, eps=1e-3 if case == 2 else 1e-12), x1, x2, **kw)


@pytest.mark.parametrize("diagonal_batch", [True, False])
def test_layernorm_full_batch_and_diagonal_spatial(diagonal_batch):
    make = _ln_net((3, 4, 2), 0, -1, -1)
    assert_parity(
        make, _x((3, 4, 2)), _x((2, 4, 2), 1), diagonal_batch=diagonal_batch, diagonal_spatial=True
    )


@pytest.mark.parametrize("axis", [-1, (1, 2, 3)])
def test_layernorm_after_conv_is_reversed(axis):
    def make(s):
        return s.serial(s.Conv(3, (2, 2), W_std=1.2, b_std=0.1), s.LayerNorm(axis=axis))

    x1 = _x((2, 4, 5, 2))
    k_nt = make(nts)[2](x1, None)
    assert k_nt.is_reversed  # the reversed layout is what this test exercises
    assert_parity(make, x1, _x((3, 4, 5, 2), 1))


@pytest.mark.parametrize("axis", [(1, 2), (1, 2, 3)])
def test_layernorm_masks(axis):
    x1 = _x((3, 4, 5, 2)).at[0, 1, :, :].set(6.0).at[2, :, 3, :].set(6.0)
    x2 = _x((2, 4, 5, 2), 1).at[1, 0, 0, :].set(6.0)

    def make(s):
        return s.serial(s.Dense(3, W_std=1.1, b_std=0.2), s.LayerNorm(axis=axis))

    if axis == (1, 2):
        # The channel axis is not normalized: the infinite limit is undefined.
        for s in LIBS:
            with pytest.raises(ValueError, match="Normalisation over channels"):
                make(s)[2](x1, x2, mask_constant=6.0)
        return
    k = assert_parity(make, x1, x2, mask_constant=6.0)
    assert k.mask1 is not None and k.mask1.shape == (3, 4, 5, 1)


@pytest.mark.filterwarnings("ignore:!!! Non-leading")
@pytest.mark.parametrize("batch_axis", [1, -3])
def test_layernorm_masks_non_leading_batch(batch_axis):
    """Batch axis not first: the kernel must equal the one of the batch-first transposed inputs
    (NT 0.6.5 misaligns the masks here and fails; the batch-first case is NT-checked above)."""
    x = _x((3, 4, 5, 2)).at[0, 1, :, :].set(6.0).at[2, :, 3, :].set(6.0)
    k0 = ours.serial(ours.Dense(3), ours.LayerNorm(axis=(1, 2, 3)))[2](x, None, mask_constant=6.0)
    net = ours.serial(
        ours.Dense(3, batch_axis=batch_axis),
        ours.LayerNorm(axis=(0, 2, 3), batch_axis=batch_axis),
    )
    k1 = net[2](jnp.moveaxis(x, 0, 1), None, mask_constant=6.0)
    for f in ("nngp", "ntk", "cov1"):
        np.testing.assert_allclose(getattr(k1, f), getattr(k0, f), rtol=1e-12)
    assert k1.batch_axis == 1


def test_layernorm_apply_parity():
    x = _x((3, 4, 5, 2)).at[1, 2, :, :].set(6.0)
    for axis in (-1, (1, 3), (1, 2, 3)):
        outs = []
        for s in LIBS:
            init_fn, apply_fn, _ = s.LayerNorm(axis=axis, eps=1e-5)
            shape, params = init_fn(jax.random.PRNGKey(0), x.shape)
            assert tuple(shape) == x.shape and params == ()
            outs.append((apply_fn(params, x), apply_fn(params, x, mask_constant=6.0)))
        np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-12)
        np.testing.assert_allclose(outs[0][1].masked_value, outs[1][1].masked_value, rtol=1e-12)
        np.testing.assert_array_equal(outs[0][1].mask, outs[1][1].mask)
    # Normalized over the last axis: zero mean, unit variance.
    x = _x((3, 4, 5, 2), 1)
    y = ours.LayerNorm()[1]((), x)
    np.testing.assert_allclose(jnp.mean(y, -1), 0, atol=1e-12)
    v = jnp.var(x, -1)
    np.testing.assert_allclose(jnp.var(y, -1), v / (v + 1e-12), rtol=1e-10)


def test_layernorm_errors():
    x = _x((3, 4, 2))
    with pytest.raises(NotImplementedError, match="Gaussian"):
        ours.serial(ours.Dense(2), ours.Relu(), ours.LayerNorm())[2](x)
    with pytest.raises(ValueError, match="Normalisation over channels"):
        ours.serial(ours.Dense(2), ours.LayerNorm(axis=1))[2](x)


# ----------------------------------------------------------------------------------------------
# Dropout


def _drop_net(rate, mode="train"):
    def make(s):
        return s.serial(s.Dense(3, W_std=1.2, b_std=0.3), s.Dropout(rate, mode), s.Dense(2))

    return make


@pytest.mark.parametrize("rate", [0.5, 0.9, 1.0])
@pytest.mark.parametrize("x2", ["none", "n2", "same_n"])
def test_dropout_kernel_parity(rate, x2):
    shape = (3, 4, 2)
    x1 = _x(shape)
    x2 = {"none": None, "n2": _x((2, 4, 2), 1), "same_n": _x(shape, 2)}[x2]
    k = assert_parity(_drop_net(rate), x1, x2)
    assert k.is_gaussian  # the Dense after the dropout makes it Gaussian again
    if x2 is None and rate < 1:
        # Self-pairs carry the 1/rate variance boost, off-diagonal pairs do not.
        k0 = _drop_net(1.0)(ours)[2](x1, None)
        ratio = np.asarray(k.nngp / k0.nngp)
        assert np.isclose(ratio[0, 1, 1, 2], 1.0)
        assert ratio[0, 0, 1, 1] > 1.0


@pytest.mark.parametrize("diagonal_batch", [True, False])
@pytest.mark.parametrize("diagonal_spatial", [True, False])
def test_dropout_layouts(diagonal_batch, diagonal_spatial):
    def make(s):
        return s.serial(s.Dense(3, W_std=1.2), s.Dropout(0.6))

    assert_parity(
        make,
        _x((3, 4, 2)),
        None,
        diagonal_batch=diagonal_batch,
        diagonal_spatial=diagonal_spatial,
    )


def test_dropout_test_mode_is_identity_and_apply_parity():
    x = _x((3, 4, 2))
    k = assert_parity(_drop_net(0.5, "test"), x, _x((2, 4, 2), 1))
    k_id = ours.serial(ours.Dense(3, W_std=1.2, b_std=0.3), ours.Dense(2))[2](x, _x((2, 4, 2), 1))
    assert not compare(k, k_id, rtol=0)
    key = jax.random.PRNGKey(5)
    for mode in ("train", "test"):
        outs = []
        for s in LIBS:
            init_fn, apply_fn, _ = s.Dropout(0.7, mode)
            shape, params = init_fn(key, x.shape)
            assert tuple(shape) == x.shape
            outs.append(apply_fn(params, x, rng=key))
        np.testing.assert_array_equal(outs[0], outs[1])


def test_dropout_on_input_kernel():
    # Dropout of fixed inputs is no infinite-width random layer (NT meant to refuse it but its
    # check is dead code, and it crashes with an IndexError on the 0-d NTK placeholder). With the
    # NTK requested (the default), the input layer is recognized and refused clearly; with only
    # the NNGP requested the input kernel carries no marker (NT's `is_input` is always False, kept
    # for parity), and the NNGP equals NT's.
    x1 = _x((3, 4, 2))
    with pytest.raises(ValueError, match="input layer"):
        ours.Dropout(0.5)[2](x1, None)
    mine, theirs = (s.Dropout(0.5)[2](x1, None, get=("nngp", "cov1")) for s in LIBS)
    assert not compare(mine, theirs)


def test_dropout_errors():
    with pytest.raises(ValueError, match="mode"):
        ours.Dropout(0.5, mode="eval")
    for rate in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="rate"):
            ours.Dropout(rate)
    _, apply_fn, _ = ours.Dropout(0.5)
    with pytest.raises(ValueError, match="PRNG key"):
        apply_fn((), _x((2, 3)))


@pytest.mark.parametrize("diagonal_batch", [True, False])
@pytest.mark.parametrize("diagonal_spatial", [True, False])
def test_scale_diagonal_truth(diagonal_batch, diagonal_spatial):
    """Only entries pairing an (image, position) with itself are scaled."""
    n, h, w = 3, 2, 4
    shape = (n,) if diagonal_batch else (n, n)
    shape += (h, w) if diagonal_spatial else (h, h, w, w)
    x = _x(shape)
    got = np.asarray(_scale_diagonal(x, 5.0, diagonal_batch, diagonal_spatial))
    want = np.array(x)
    for idx in np.ndindex(*shape):
        batch_same = diagonal_batch or idx[0] == idx[1]
        sp = idx[1:] if diagonal_batch else idx[2:]
        sp_same = diagonal_spatial or all(sp[i] == sp[i + 1] for i in range(0, len(sp), 2))
        if batch_same and sp_same:
            want[idx] *= 5.0
    np.testing.assert_allclose(got, want, rtol=1e-15)
    # Different batches on the two sides: nothing pairs with itself.
    if not diagonal_batch:
        y = _x((3, 2) + shape[2:])
        np.testing.assert_array_equal(_scale_diagonal(y, 5.0, False, diagonal_spatial), y)

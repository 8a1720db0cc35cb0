"""The fused per-offset conv path (ntfast.ops.fused_cnn via ntfast.stax.fused).

Every qualifying network must give the same Kernel as the layer-by-layer path and as Neural
Tangents (f64, ≤ 1e-6 relative), whichever tile / pair block runs; networks that do not qualify
must silently take the layer path. A spy on ``fused_cnn`` proves which path ran.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntfast
from ntfast.ops import fused_cnn as fc
from ntfast.stax import fused

RTOL = 1e-6


@pytest.fixture
def spy(monkeypatch):
    """Counts fused_cnn calls made by the stax path."""
    calls = []
    real = fc.fused_cnn

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(fc, "fused_cnn", counting)
    return calls


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = max(np.max(np.abs(b)), 1e-300)
    return float(np.max(np.abs(a - b)) / scale)


def _build(stax, spec):
    return stax.serial(*(getattr(stax, name)(*args, **kw) for name, args, kw in spec))


def _images(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


SQ2 = 2.0**0.5


def _conv(pad, f=(3, 3), w=SQ2, b=0.1, **kw):
    return ("Conv", (4, f), {"padding": pad, "W_std": w, "b_std": b, **kw})


NETWORKS = {
    "cnn-gap-same": [
        _conv("SAME"),
        ("Relu", (), {}),
        _conv("SAME"),
        ("Relu", (), {}),
        ("GlobalAvgPool", (), {}),
        ("Dense", (3,), {"W_std": 1.2, "b_std": 0.2}),
    ],
    "valid-erf-gsp": [
        _conv("VALID", (2, 3)),
        ("Erf", (), {}),
        _conv("VALID", (3, 1), b=None),
        ("Gelu", (), {}),
        ("GlobalSumPool", (), {}),
    ],
    "circular-flatten": [
        _conv("CIRCULAR", (3, 2)),
        ("LeakyRelu", (0.1,), {}),
        _conv("CIRCULAR", (5, 3)),
        ("Abs", (), {}),
        ("Flatten", (), {}),
        ("Dense", (2,), {"W_std": 0.7}),
    ],
    "standard-param": [
        _conv("SAME", parameterization="standard"),
        ("Relu", (), {}),
        ("Dense", (5,), {"W_std": 1.1, "b_std": 0.3, "parameterization": "standard"}),
        ("Sin", (), {}),
        _conv("SAME", (1, 1), parameterization="standard", b=None),
        ("GlobalAvgPool", (), {}),
    ],
    "myrtle-like": [
        _conv("SAME", b=0.0),
        ("Relu", (), {}),
        ("AvgPool", ((2, 2), (2, 2)), {}),
        _conv("SAME", b=0.0),
        ("Relu", (), {}),
        ("AvgPool", ((2, 2), (2, 2)), {}),
        ("Flatten", (), {}),
        ("Dense", (10,), {"W_std": SQ2}),
    ],
    "pools-mixed": [
        _conv("SAME", (2, 2)),
        ("Rbf", (), {}),
        ("AvgPool", ((3, 2), (1, 2)), {"padding": "SAME"}),
        ("Identity", (), {}),
        _conv("VALID", (2, 2)),
        ("Exp", (), {}),
        ("SumPool", ((2, 1),), {}),
        ("Dense", (3,), {"W_std": 0.8, "b_std": 0.1}),
        ("Relu", (), {}),
        ("GlobalAvgPool", (), {}),
        ("Dense", (4,), {}),
        ("Relu", (), {}),
        ("Dense", (1,), {}),
    ],
    "nested-serial": [("serial", (), {}), ("GlobalAvgPool", (), {})],
    # A segment without steps first (pooling the input images), edge-normalized SAME and
    # CIRCULAR pooling windows larger than their strides, consecutive pools.
    "pools-first-circular": [
        ("AvgPool", ((2, 2), (1, 1)), {"padding": "SAME", "normalize_edges": True}),
        _conv("CIRCULAR", (3, 2)),
        ("Gelu", (), {}),
        ("AvgPool", ((3, 3), (2, 2)), {"padding": "CIRCULAR"}),
        ("SumPool", ((2, 2), (1, 1)), {"padding": "SAME"}),
        _conv("SAME", (2, 2), b=None),
        ("Relu", (), {}),
        ("GlobalSumPool", (), {}),
    ],
}


def _make(stax, name):
    if name == "nested-serial":
        block = stax.serial(
            stax.Conv(3, (3, 3), padding="SAME", W_std=1.5, b_std=0.05), stax.Relu()
        )
        return stax.serial(block, block, stax.GlobalAvgPool(), stax.Dense(1))
    return _build(stax, NETWORKS[name])


@pytest.mark.parametrize("name", sorted(NETWORKS))
@pytest.mark.parametrize("n2", [None, 2])
def test_matches_layer_path_and_nt(name, n2, spy, nt_stax, nf_stax):
    x1 = _images((3, 9, 8, 2), 0)
    x2 = None if n2 is None else _images((n2, 9, 8, 2), 1)
    _, _, kf = _make(nf_stax, name)
    out = kf(x1, x2)
    assert spy, "the fused path did not run for a qualifying network"
    with fused.fused_options(enabled=False):
        ref = kf(x1, x2)
    _, _, nt_kf = _make(nt_stax, name)
    nt = nt_kf(x1, x2)
    for field in ("nngp", "ntk", "cov1", "cov2"):
        a, b, c = getattr(out, field), getattr(ref, field), getattr(nt, field)
        if c is None:
            assert a is None and b is None
            continue
        assert _rel(a, c) <= RTOL, (field, _rel(a, c))
        assert _rel(a, b) <= RTOL, (field, _rel(a, b))
    static = {"nngp": 0, "ntk": 0, "cov1": 0, "cov2": 0, "x1_is_x2": 0}
    assert out.replace(**static) == ref.replace(**static)
    assert out.shape1 == nt.shape1 and out.shape2 == nt.shape2
    assert bool(out.x1_is_x2) == bool(nt.x1_is_x2)


@pytest.mark.parametrize("get", ["nngp", ("ntk",), ("nngp", "ntk"), ("cov1", "nngp")])
@pytest.mark.parametrize("name", ["cnn-gap-same", "myrtle-like"])
def test_get_variants_and_jit(get, name, spy, nf_stax):
    # Without cov1/cov2 and with a Dense-only head, each image's self pair runs only on the
    # offsets the later segments' variance maps read (myrtle-like: two poolings).
    x1, x2 = _images((2, 7, 6, 3), 2), _images((3, 7, 6, 3), 3)
    _, _, kf = _make(nf_stax, name)
    out = jax.jit(kf, static_argnames="get")(x1, x2, get)
    assert spy
    with fused.fused_options(enabled=False):
        ref = kf(x1, x2, get)
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(ref)):
        assert _rel(a, b) <= RTOL


@pytest.mark.parametrize("tile, pair_block", [(1, 1), (2, 3), (5, None), (None, 2)])
def test_tiles_do_not_change_results(tile, pair_block):
    # Also the variance-only self pairs (compute_cov=False) must give the same cross values.
    x1, x2 = _images((3, 8, 7, 2), 4), _images((2, 8, 7, 2), 5)
    relu = fc.NonlinStep("abrelu", (("a", 0.0), ("b", 1.0)))
    plan = (
        fc.ConvStep((3, 3), "SAME", 2.0, 0.01),
        relu,
        fc.PoolStep((2, 2), (2, 2), "VALID", "AVG", False),
        fc.ConvStep((2, 2), "SAME", 1.5, None),
        relu,
        fc.Readout("GAP"),
    )
    ref = fc.fused_cnn(x1, x2, plan=plan, tile=8, pair_block=1)
    out = fc.fused_cnn(x1, x2, plan=plan, tile=tile, pair_block=pair_block)
    for a, b in zip(out, ref):
        assert _rel(a, b) <= 1e-12
    lean = fc.fused_cnn(x1, x2, plan=plan, tile=tile, pair_block=pair_block, compute_cov=False)
    assert lean[2] is None and lean[3] is None
    assert _rel(lean[0], ref[0]) <= 1e-12 and _rel(lean[1], ref[1]) <= 1e-12


def test_symmetric_uses_one_triangle_and_is_symmetric():
    x = _images((4, 6, 6, 2), 6)
    plan = (fc.ConvStep((3, 3), "SAME", 2.0, 0.1), fc.NonlinStep("erf", ()), fc.Readout("GAP"))
    nngp, ntk, cov1, cov2 = fc.fused_cnn(x, None, plan=plan)
    np.testing.assert_array_equal(nngp, nngp.T)
    np.testing.assert_array_equal(ntk, ntk.T)
    np.testing.assert_allclose(cov1, jnp.diag(nngp), rtol=0, atol=0)
    assert cov2 is None
    full = fc.fused_cnn(x, x, plan=plan)
    assert _rel(nngp, full[0]) <= 1e-12 and _rel(ntk, full[1]) <= 1e-12


NOT_FUSED = {
    "strided conv": lambda s: s.serial(
        s.Conv(3, (3, 3), strides=(2, 2), padding="SAME"), s.Relu(), s.GlobalAvgPool()
    ),
    "no readout": lambda s: s.serial(s.Conv(3, (3, 3), padding="SAME"), s.Relu()),
    "NCHW conv": lambda s: s.serial(
        s.Conv(3, (3, 3), padding="SAME", dimension_numbers=("NCHW", "OIHW", "NCHW")),
        s.Relu(),
        s.GlobalAvgPool(batch_axis=0, channel_axis=1),
    ),
    "mixed circular": lambda s: s.serial(
        s.Conv(3, (3, 3), padding="CIRCULAR"), s.Conv(3, (3, 3), padding="SAME"), s.GlobalAvgPool()
    ),
    "layer norm": lambda s: s.serial(
        s.Conv(3, (3, 3), padding="SAME"), s.LayerNorm(), s.GlobalAvgPool()
    ),
}


@pytest.mark.parametrize("name", sorted(NOT_FUSED))
def test_non_qualifying_networks_take_the_layer_path(name, spy, nt_stax, nf_stax):
    x = _images((2, 6, 6, 3), 7)
    out = NOT_FUSED[name](nf_stax)[2](x, None, ("nngp", "ntk"))
    assert not spy
    nt = NOT_FUSED[name](nt_stax)[2](x, None, ("nngp", "ntk"))
    assert _rel(out.nngp, nt.nngp) <= RTOL and _rel(out.ntk, nt.ntk) <= RTOL


def test_masks_and_forced_layouts_take_the_layer_path(spy, nf_stax):
    x = _images((2, 6, 6, 3), 8)
    _, _, kf = _make(nf_stax, "cnn-gap-same")
    kf(x, None, "nngp", diagonal_batch=False)
    kf(x.at[0, 0, 0, 0].set(-1.0), None, "nngp", mask_constant=-1.0)
    assert not spy


def test_disabled_by_option_and_env(spy, nf_stax, monkeypatch):
    x = _images((2, 6, 6, 3), 9)
    _, _, kf = _make(nf_stax, "cnn-gap-same")
    with fused.fused_options(enabled=False):
        kf(x, None, "nngp")
    monkeypatch.setenv("NTFAST_FUSED", "0")
    kf(x, None, "nngp")
    assert not spy
    monkeypatch.setenv("NTFAST_FUSED", "maybe")
    with pytest.raises(ValueError, match="NTFAST_FUSED"):
        kf(x, None, "nngp")


def test_grad_matches_layer_path(nf_stax):
    x1, x2 = _images((2, 5, 5, 2), 10), _images((1, 5, 5, 2), 11)
    _, _, kf = _make(nf_stax, "cnn-gap-same")

    def loss(a):
        return jnp.sum(kf(a, x2, ("nngp", "ntk")).ntk)

    g = jax.grad(loss)(x1)
    with fused.fused_options(enabled=False):
        g_ref = jax.grad(loss)(x1)
    assert _rel(g, g_ref) <= 1e-8


def test_options_and_arguments_are_checked(monkeypatch):
    with pytest.raises(ValueError, match="tile"), fused.fused_options(tile=0):
        pass
    with pytest.raises(TypeError, match="enabled"):
        fused.set_fused_options(enabled="yes")
    plan = (fc.ConvStep((3, 3), "SAME", 1.0, None), fc.Readout("GAP"))
    x = _images((1, 4, 4, 1), 12)
    with pytest.raises(ValueError, match="x1"):
        fc.fused_cnn(x[0], plan=plan)
    with pytest.raises(ValueError, match="same image shape"):
        fc.fused_cnn(x, _images((1, 5, 4, 1), 0), plan=plan)
    with pytest.raises(TypeError, match="x1"):
        fc.fused_cnn(x.astype(jnp.int32), plan=plan)
    with pytest.raises(ValueError, match="tile"):
        fc.fused_cnn(x, plan=plan, tile=-1)
    with pytest.raises(ValueError, match="Readout"):
        fc.fused_cnn(x, plan=plan[:1])
    with pytest.raises(ValueError, match="VALID"):
        fc.fused_cnn(x, plan=(fc.ConvStep((5, 5), "VALID", 1.0, None), fc.Readout("GAP")))
    monkeypatch.setenv("NTFAST_FUSED_MEMORY", "lots")
    with pytest.raises(ValueError, match="NTFAST_FUSED_MEMORY"):
        fc.auto_tile((33, 33))


def test_auto_tile_respects_the_memory_budget():
    assert fc.auto_tile((33, 33), 4, memory_bytes=1 << 40) == 7  # cache-sized tile
    # 257³ entries per row, ~40 live arrays: a 1 GB budget still gets one row (the minimum)
    assert fc.auto_tile((257, 257), 4, memory_bytes=1 << 30) == 1
    assert fc.auto_tile((65, 65), 4, memory_bytes=64 * 65**3 * 4) == 1
    assert ntfast.stax.serial  # package import sanity for the fused hook

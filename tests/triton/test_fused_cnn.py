"""Triton ``fused_cnn`` kernel (run in the interpreter) against the XLA reference, the definition.

Proof 1 of DESIGN.md §3 for ``kernels/triton/fused_cnn.py``: truth = the XLA reference
``ntfast.ops.fused_cnn.fused_cnn_reference`` in f64. f32: the kernel's error is at most twice the
reference's own f32 error (+ two ulp of the largest entry), both against the f64 truth on the same
f32 inputs, for ``x2`` given and ``x2=None``. f64: 1e-12 relative, except the NTK of an image with
itself (the diagonal for ``x2=None``): 1e-9. There ``q12 = q11 = q22`` and the arc-cosine angle
``θ = atan2(√det, ·)`` turns a one-ulp difference between the offset-0 plane and the variance map
into ``√eps``. The kernel takes the map for that plane (f32 NTK diagonal error 1e-5 → 1e-7); the
reference gets the same exactness from bit-identical computations for most plans but not all
(on "circular-standard-gelu-flatten" its f32 diagonal error is 6e-6 where the kernel's is 2e-7,
and in f64 the two differ by 2e-10).

Coverage: SAME / VALID / CIRCULAR convs, filters 1, 2, 3 (and larger than a CIRCULAR grid), NTK
and standard parameterizations with and without biases, Dense inside the stack, ReLU / LeakyRelu /
Abs (abrelu), Erf, Gelu, AvgPool / SumPool segments (VALID, SAME with normalize_edges, strides ≠
window, a pooling straight after the images), GAP / GSP / Flatten, ``x2=None`` (triangle) and
N1 ≠ N2, compute_ntk / compute_cov off, pair blocks (padded ``lax.map``). Every interpreter launch
runs inside ``runtime.canary_guard``. Also: whole networks under ``backend="triton"`` equal Neural
Tangents and launch ``ntfast_fused_cnn_*``; the specialization list covers every launch; the
requests the kernel does not serve raise BackendError (and the layer path takes them in stax).
Tiny shapes: the interpreter costs ~0.1 s per program here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("triton", reason="needs triton: pip install 'triton>=3.7,<3.10'")

from ntfast import stax
from ntfast._triton import fused_cnn as TF
from ntfast._triton import runtime
from ntfast.backend import BackendError
from ntfast.ops import fused_cnn as fc
from ntfast.ops import fused_table as ft

EPS32 = float(np.finfo(np.float32).eps)
RELU = fc.NonlinStep("abrelu", (("a", 0.0), ("b", 1.0)))
LEAKY = fc.NonlinStep("abrelu", (("a", 0.1), ("b", 1.0)))
ABS = fc.NonlinStep("abrelu", (("a", -1.0), ("b", 1.0)))
ERF = fc.NonlinStep("erf", (("a", 1.3), ("b", 0.7), ("c", 0.2)))
GELU = fc.NonlinStep("gelu")


def _conv(f, padding, w=2.0, b=0.05, scale=None):
    return fc.ConvStep(f, padding, w, b, scale)


def _pool(window, strides, padding="VALID", kind="AVG", edges=False):
    return fc.PoolStep(window, strides, padding, kind, edges)


# name -> (plan, image shape (H, W, C)). "pool-first": a segment without steps (the images pooled
# straight away, so the NTK reaching the pooling is the input layer's zero).
PLANS = {
    "same-valid-relu-erf-gap": (
        (_conv((3, 3), "SAME"), RELU, _conv((2, 3), "VALID", 1.5, 0.1), ERF, fc.Readout("GAP")),
        (5, 6, 2),
    ),
    "circular-standard-gelu-flatten": (
        (
            _conv((3, 2), "CIRCULAR", 1.7, 0.2, scale=2.0),
            GELU,
            fc.DenseStep(1.3, 0.1, 3.0),
            LEAKY,
            _conv((1, 1), "CIRCULAR", 0.9, None, scale=1.5),
            _conv((7, 3), "CIRCULAR", 1.1, 0.3),  # wider than the 5-row grid: wraps twice
            fc.Readout("FLATTEN"),
        ),
        (5, 6, 3),
    ),
    "pools-sum-abs-gsp": (
        (
            _conv((2, 2), "SAME", 1.8, None),
            RELU,
            _pool((2, 2), (2, 2)),
            _conv((3, 3), "SAME", 1.4, 0.2, scale=4.0),
            ABS,
            fc.DenseStep(1.2, None),
            _pool((2, 1), (1, 1), kind="SUM"),
            fc.Readout("GSP"),
        ),
        (6, 7, 2),
    ),
    "pool-first-same-edges-gap": (
        (
            _pool((2, 2), (1, 2), "SAME", edges=True),
            _conv((1, 1), "VALID", 1.6, 0.1),
            ERF,
            fc.Readout("GAP"),
        ),
        (5, 6, 1),
    ),
}


def _images(shape, seed, dtype=np.float64):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


def _run(x1, x2, plan, backend, **kw):
    # Jitted: one compilation of the XLA glue instead of op-by-op dispatch (2x faster here).
    f = jax.jit(lambda a, b: fc.fused_cnn(a, b, plan=plan, backend=backend, **kw))
    return jax.block_until_ready(f(x1, x2))


def _triton_guarded(x1, x2, plan, **kw):
    with runtime.canary_guard(pad=512) as violations, runtime.record_launches() as launches:
        out = _run(x1, x2, plan, "triton", **kw)
    assert not violations, violations
    assert launches and all(r["name"].startswith("ntfast_fused_cnn_") for r in launches)
    return out


def _rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-300))


def _check_f64(got, want, sym):
    for name, g, w in zip(("nngp", "ntk", "cov1", "cov2"), got, want):
        if w is None:
            assert g is None, name
            continue
        assert g.dtype == w.dtype and g.shape == w.shape, (name, g.dtype, g.shape, w.shape)
        if name == "ntk" and sym:
            off = ~np.eye(w.shape[0], dtype=bool)
            assert _rel(np.where(off, g, 0), np.where(off, w, 0)) <= 1e-12, name
            assert _rel(g, w) <= 1e-9, (name, _rel(g, w))  # self pairs: see the module doc
        else:
            assert _rel(g, w) <= 1e-12, (name, _rel(g, w))


# ------------------------------------------------------------------------------------------------
# Numerics


@pytest.mark.parametrize("name", sorted(PLANS))
def test_matches_reference_f64(name):
    plan, shape = PLANS[name]
    x1, x2 = _images((2, *shape), 0), _images((3, *shape), 1)
    for b in (x2, None):
        got = _triton_guarded(x1, b, plan)
        _check_f64(got, _run(x1, b, plan, "xla"), sym=b is None)


def test_options_and_pair_blocks_f64():
    """compute_ntk off with pairs (and self pairs) split into padded blocks of a lax.map;
    compute_cov off, where a single-segment plan needs no self pairs at all."""
    x1, x2 = _images((3, 6, 7, 2), 2), _images((2, 6, 7, 2), 3)
    plan = PLANS["pools-sum-abs-gsp"][0]
    kw = {"compute_ntk": False, "pair_block": 2}
    _check_f64(_triton_guarded(x1, x2, plan, **kw), _run(x1, x2, plan, "xla", **kw), sym=False)
    plan = PLANS["same-valid-relu-erf-gap"][0]
    kw = {"compute_cov": False}
    _check_f64(_triton_guarded(x1, x2, plan, **kw), _run(x1, x2, plan, "xla", **kw), sym=False)


@pytest.mark.parametrize("name", ["same-valid-relu-erf-gap", "circular-standard-gelu-flatten"])
def test_float32_within_twice_the_reference_error(name):
    plan, shape = PLANS[name]
    x1 = _images((2, *shape), 4, np.float32)
    for x2 in (_images((3, *shape), 5, np.float32), None):
        got = _triton_guarded(x1, x2, plan)
        ref = _run(x1, x2, plan, "xla")
        wide = None if x2 is None else x2.astype(np.float64)
        truth = _run(x1.astype(np.float64), wide, plan, "xla")
        for name_, g, r, t in zip(("nngp", "ntk", "cov1", "cov2"), got, ref, truth):
            if t is None:
                assert g is None, name_
                continue
            assert g.dtype == np.float32 and g.shape == t.shape, name_
            t = np.asarray(t)
            err = np.max(np.abs(np.asarray(g, np.float64) - t))
            ref_err = np.max(np.abs(np.asarray(r, np.float64) - t))
            assert err <= 2 * ref_err + 2 * EPS32 * np.max(np.abs(t)), (name_, err, ref_err)


# ------------------------------------------------------------------------------------------------
# Whole networks


def _cnn_pool_flatten(s):
    return s.serial(
        s.Conv(4, (3, 3), W_std=1.4, b_std=0.1, padding="SAME", parameterization="standard"),
        s.Gelu(),
        s.AvgPool((2, 2), strides=(2, 2)),
        s.Conv(4, (2, 2), W_std=1.2, b_std=None, padding="CIRCULAR"),
        s.Erf(),
        s.Flatten(),
        s.Dense(3, W_std=1.1, b_std=0.2),
        s.Relu(),
        s.Dense(1),
    )


def test_network_under_triton_matches_nt_and_runs_fused(nf_stax, nt_stax):
    from archs import compare

    x1, x2 = _images((2, 4, 6, 2), 6), _images((3, 4, 6, 2), 7)
    ours_fn, theirs_fn = _cnn_pool_flatten(nf_stax)[2], _cnn_pool_flatten(nt_stax)[2]
    for b in (x2, None):
        with runtime.canary_guard(pad=256) as violations, runtime.record_launches() as launches:
            ours = jax.block_until_ready(ours_fn(x1, b, backend="triton"))
        assert not violations, violations
        names = {r["name"] for r in launches}
        assert {"ntfast_fused_cnn_images_planes", "ntfast_fused_cnn_packed_readout"} <= names
        problems = compare(ours, theirs_fn(x1, b), rtol=1e-6)
        assert not problems, problems


def test_unsupported_network_takes_the_layer_path_under_triton():
    """Sin has no compiled fused kernel: serial runs the per-layer Triton kernels instead."""
    net = stax.serial(stax.Conv(2, (2, 2), padding="SAME"), stax.Sin(), stax.GlobalAvgPool())
    x = _images((2, 4, 4, 1), 8)
    with runtime.record_launches() as launches:
        jax.jit(lambda a: net[2](a, None, "ntk", backend="triton")).trace(x)
    names = {r["name"] for r in launches}
    assert names and not any(n.startswith("ntfast_fused_cnn") for n in names), names


def test_grad_and_vmap():
    """Derivatives are the reference's; vmap maps the launch over the batch (lax.map)."""
    plan = (_conv((2, 2), "SAME"), RELU, fc.Readout("GAP"))
    x1, x2 = _images((1, 3, 3, 1), 9), _images((1, 3, 3, 1), 10)

    def loss(backend):
        return lambda a: jnp.sum(fc.fused_cnn(a, x2, plan=plan, backend=backend)[1] ** 2)

    got = jax.jit(jax.grad(loss("triton")))(x1)
    want = jax.jit(jax.grad(loss("xla")))(x1)
    assert _rel(got, want) <= 1e-12

    batch = _images((2, 1, 3, 3, 1), 11)

    def ntk(backend):
        return jax.jit(jax.vmap(lambda a: fc.fused_cnn(a, x2, plan=plan, backend=backend)[1]))

    assert _rel(ntk("triton")(batch), ntk("xla")(batch)) <= 1e-12


# ------------------------------------------------------------------------------------------------
# Structure: specializations, tables, refusals (tracing only)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_specializations_cover_every_launch(dtype):
    listed = {
        (s["dtype"], tuple(sorted(s["constexprs"].items())), n)
        for s in TF.SPECIALIZATIONS
        for n in s["names"]
    }
    seen = set()
    for plan, shape in PLANS.values():
        for size in (shape[:2], (16, 17), (40, 33)):
            x = jnp.zeros((2, *size, shape[2]), dtype)
            with runtime.record_launches() as log:
                jax.jit(lambda a, p=plan: fc.fused_cnn(a, None, plan=p, backend="triton")).trace(x)
            for r in log:
                key = (
                    TF._DTYPES[np.dtype(dtype)],
                    tuple(sorted(r["metaparams"].items())),
                    r["name"],
                )
                assert key in listed, key
                seen.add(key[1])
    assert len(seen) == len(TF.BLOCKS)  # every block shape is reachable


def test_block_shapes_and_size_limit():
    assert TF.block_shape((6, 7)) == (16, 16, 16)
    assert TF.block_shape((17, 3)) == (32, 4, 32)
    assert TF.block_shape((33, 33)) == (64, 1, 64)
    assert TF.block_shape((65, 10)) is None
    plan = PLANS["same-valid-relu-erf-gap"][0]
    assert TF.unsupported_reason(plan, "float32", (63, 63)) is None
    assert "block" in TF.unsupported_reason(plan, "float32", (64, 64))
    x = jnp.zeros((1, 64, 64, 1))
    with pytest.raises(BackendError, match="triton.*on-chip block"):
        jax.jit(lambda a: fc.fused_cnn(a, None, plan=plan, backend="triton")).trace(x)


def test_unsupported_requests():
    plan = PLANS["same-valid-relu-erf-gap"][0]
    assert TF.unsupported_reason(plan, "float64") is None
    assert "float32 and float64" in TF.unsupported_reason(plan, "float16")
    sin = (_conv((2, 2), "SAME"), fc.NonlinStep("sin", (("a", 1.0),)), fc.Readout("GAP"))
    assert "sin" in TF.unsupported_reason(sin, "float32")
    with pytest.raises(BackendError, match="triton.*sin"):
        fc.fused_cnn(jnp.zeros((1, 4, 4, 1)), plan=sin, backend="triton")


def test_tables_follow_the_plan_encoding():
    k = runtime.kernels("fused_cnn", interpret=False)
    assert (k.STEP_CONV, k.STEP_DENSE, k.STEP_NONLIN) == (
        ft.STEP_CONV,
        ft.STEP_DENSE,
        ft.STEP_NONLIN,
    )
    nonlin_kernels = runtime.kernels("nonlin", interpret=False)
    for kind, (code, _) in ft.NONLIN_CODES.items():
        assert k.EXPECTATION_KIND[code] == nonlin_kernels.KINDS[kind]
    plan, shape = PLANS["pools-sum-abs-gsp"]
    tabs = TF.segment_tables(plan, shape[:2], np.float32)
    segs = fc.segments(plan, shape[:2])
    assert len(tabs) == len(segs) == 3
    for (tab, flt), seg in zip(tabs, segs):
        n = len(seg.steps)
        assert tab.dtype == np.int32 and flt.dtype == np.float32
        assert tab.size == k.HEADER + n * k.STEP_INTS and flt.size == n * k.STEP_FLOATS
        assert tuple(tab[:2]) == seg.grid and tab[6] == n
        steps = tab[k.HEADER :].reshape(n, k.STEP_INTS)
        assert [tuple(r[1:3]) for r in steps] == list(seg.sizes)
    # Second segment: Conv 3x3 SAME (lo 1), standard, bias; ABS (map 0); Dense without bias.
    steps = tabs[1][0][k.HEADER :].reshape(-1, k.STEP_INTS)
    assert list(steps[0][:9]) == [k.STEP_CONV, 3, 3, 1, 3, 1, 3, 1, 1]
    assert list(steps[1][[0, 9, 10]]) == [k.STEP_NONLIN, ft.NONLIN_ABRELU, 0]
    assert list(steps[2][[0, 7, 8]]) == [k.STEP_DENSE, 0, 0]
    flt = tabs[1][1].reshape(-1, k.STEP_FLOATS)
    np.testing.assert_allclose(flt[0][:5], [1.4, 0.2, 4.0, 1 / 3, 1 / 3], rtol=1e-7)
    np.testing.assert_allclose(flt[1][5:7], [4.0, -1.0])  # (a−b)², a·b of Abs

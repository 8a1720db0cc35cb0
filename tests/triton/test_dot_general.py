"""Triton ``input_cov`` and ``dot_general`` (``ntfast/_triton/dot_general.py``) in the interpreter.

Truth: the XLA reference (``ntfast/ops/dot_general.py``) in f64. f64 kernels must match it to
~1e-12; f32 kernels must err at most twice as much as the reference computed in f32 (plus a few
ulps of the scale), both measured against the f64 truth. Every numerics test runs inside the
runtime's canary guard (NaN-filled margins around inputs, byte canaries around outputs), so an
out-of-bounds read or write fails the test. Shapes are small and odd (3, 5, N1 ≠ N2, x2=None,
K > BLOCK_K, rows/columns over one 64-tile) because the interpreter costs ~ms per program.
"""

from __future__ import annotations

import functools
import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

triton = pytest.importorskip("triton", reason="needs triton: pip install 'triton>=3.7,<3.10'")

from ntfast import backend, stax
from ntfast._triton import dot_general as tdg
from ntfast._triton import runtime
from ntfast.backend import BackendError
from ntfast.ops import dot_general as dg

F32_TINY = 4 * np.finfo(np.float32).eps


def _xla(op):
    return backend.dispatch(op, "xla")


def _triton(op):
    return backend.dispatch(op, "triton")


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    if not want.size:
        return 0.0
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-300))


def _check(f64, f32, ref32, truth, what=""):
    """f64 ≈ truth to 1e-12; |f32 − truth| ≤ 2·|ref32 − truth| + a few ulps of the scale."""
    for got, t, r in zip(f64, truth, ref32):
        assert (got is None) == (t is None), what
        if t is None:
            continue
        assert _rel(got, t) <= 1e-12, (what, _rel(got, t))
    for got, t, r in zip(f32, truth, ref32):
        if t is None:
            continue
        assert got.dtype == np.float32
        t64 = np.asarray(t, np.float64)
        scale = max(float(np.max(np.abs(t64))), 1e-30) if t64.size else 1.0
        err = float(np.max(np.abs(np.asarray(got, np.float64) - t64))) if t64.size else 0.0
        err_ref = float(np.max(np.abs(np.asarray(r, np.float64) - t64))) if t64.size else 0.0
        assert err <= 2 * err_ref + F32_TINY * scale, (what, err, err_ref, scale)


@pytest.fixture
def guard():
    with runtime.canary_guard() as violations:
        yield violations
    assert violations == []


# ------------------------------------------------------------------------------------------------
# input_cov

# (x1 shape, batch_axis, channel_axis): 2-D, 3-D, 4-D inputs, channel first/last/middle.
LAYOUTS = [
    ((3, 4), 0, 1),
    ((4, 3), 1, 0),
    ((5, 3, 4), 1, 2),
    ((3, 4, 5, 2), 0, 3),
    ((4, 3, 5, 2), 1, 2),
]
FLAGS = list(itertools.product([True, False], repeat=2))  # (diagonal_batch, diagonal_spatial)


def _inputs(shape, b, seed, *, same=False):
    rng = np.random.default_rng(seed)
    x1 = rng.normal(size=shape)
    s2 = list(shape)
    s2[b] += 1  # N2 != N1
    return x1, (None if same else rng.normal(size=s2))


def _input_cov_all(x1, x2, **kw):
    """(f64 triton, f32 triton, f32 xla, f64 xla) outputs, one jit (one compile) per case."""

    def f(x1, x2):
        c = lambda x, d: None if x is None else x.astype(d)
        tri, ref = _triton("input_cov"), _xla("input_cov")
        return (
            tri(x1, x2, **kw),
            tri(c(x1, jnp.float32), c(x2, jnp.float32), **kw),
            ref(c(x1, jnp.float32), c(x2, jnp.float32), **kw),
            ref(x1, x2, **kw),
        )

    return jax.block_until_ready(jax.jit(f)(x1, x2))


@pytest.mark.parametrize("layout", range(len(LAYOUTS)))
@pytest.mark.parametrize("db,ds", FLAGS)
def test_input_cov_matches_reference(guard, layout, db, ds):
    shape, b, c = LAYOUTS[layout]
    same = (layout + db + ds) % 2 == 1  # x2=None on half the cases, N2 != N1 on the others
    x1, x2 = _inputs(shape, b, layout, same=same)
    kw = {"diagonal_batch": db, "diagonal_spatial": ds, "batch_axis": b, "channel_axis": c}
    f64, f32, ref32, truth = _input_cov_all(x1, x2, **kw)
    assert (f64[2] is None) == same
    _check(f64, f32, ref32, truth, (layout, db, ds))


@pytest.mark.parametrize(
    "shape1,n2,db,ds",
    # Rows 3·5·5 = 75 > 64 (two row tiles), columns 2·25 = 50, K = 37 channels: two BLOCK_K=32
    # steps, the second masked; every layout.
    [((3, 5, 5, 37), 2, db, ds) for db, ds in FLAGS]
    # 77 pixels > 64 and N1, N2 > 8: several pixel_cov_kernel boxes along every axis.
    + [((9, 7, 11, 2), 10, db, True) for db in (True, False)],
)
def test_input_cov_odd_sizes_span_tiles_and_k_loop(guard, db, ds, shape1, n2):
    rng = np.random.default_rng(7)
    x1, x2 = rng.normal(size=shape1), rng.normal(size=(n2, *shape1[1:]))
    kw = {"diagonal_batch": db, "diagonal_spatial": ds, "batch_axis": 0, "channel_axis": 3}
    f64, f32, ref32, truth = _input_cov_all(x1, x2, **kw)
    _check(f64, f32, ref32, truth, (db, ds))


def test_input_cov_public_op_and_flattened_channels(guard):
    """Through ``ntfast.ops.dot_general.input_cov`` (casts, negative axes, channel_axis=None)."""
    rng = np.random.default_rng(3)
    x1, x2 = rng.normal(size=(2, 3, 5)), rng.normal(size=(3, 3, 5))
    for kw in (
        {"diagonal_batch": False, "diagonal_spatial": False, "batch_axis": 0, "channel_axis": -1},
        {"diagonal_batch": True, "diagonal_spatial": True, "batch_axis": 0, "channel_axis": None},
    ):
        got = dg.input_cov(x1, x2, backend="triton", **kw)
        want = dg.input_cov(x1, x2, backend="xla", **kw)
        for g, w in zip(got, want):
            assert _rel(g, w) <= 1e-12


# ------------------------------------------------------------------------------------------------
# dot_general: the bilinear form

BILINEAR_CASES = [
    # (mat shape, labels), (o1 shape, labels), (o2 shape, labels), out labels
    # O1 K O2ᵀ, K as one matrix.
    (((4, 5), (0, 1)), ((3, 4), (10, 0)), ((2, 5), (11, 1)), (10, 11)),
    # A shared (diagonal-batch) label, free labels on both sides: batch g1.
    (((3, 4, 4), (0, 1, 2)), ((3, 2, 4), (0, 10, 1)), ((3, 2, 4), (0, 11, 2)), (0, 10, 11)),
    # Diagonal free label shared by O1 and O2.
    (((3, 2, 5), (0, 1, 2)), ((5, 4), (2, 7)), ((5, 4), (2, 7)), (0, 1, 7)),
    # Two contracted labels per side, everything else summed.
    (((2, 3, 3, 4, 4), (0, 1, 2, 3, 4)), ((3, 4), (1, 3)), ((3, 4), (2, 4)), (0,)),
    # One-sided (other2 None; other1 None); the leftover right labels are summed.
    (((2, 4, 4), (0, 1, 2)), ((4,), (1,)), None, (0,)),
    (((2, 4, 4), (0, 1, 2)), None, ((4, 3), (2, 9)), (0, 1, 9)),
    # Scalar factors (K = 1, M = 1 products) and an output transpose.
    (((2, 3), (0, 1)), ((), ()), ((), ()), (1, 0)),
    # NT's zipped nngp (N1, N2, H, H', W, W') with a constant on H: K's batch axes become the
    # broadcast batch g2, the right product writes through a row table; odd sizes, 70 > 64 rows.
    (((3, 2, 5, 5, 7, 7), (0, 1, 2, 3, 4, 5)), ((5, 3), (2, 8)), ((5, 3), (3, 9)),
     (0, 1, 8, 9, 4, 5)),
    # Contraction length 37 > BLOCK_K: the K loop with a masked tail.
    (((2, 37, 37), (0, 1, 2)), ((37, 3), (1, 5)), ((37, 4), (2, 6)), (0, 5, 6)),
]  # fmt: skip


def _bilinear_all(case, seed):
    (ms, ml), o1c, o2c, out = BILINEAR_CASES[case]
    rng = np.random.default_rng(seed)
    arrays = [rng.normal(size=ms)] + [
        None if c is None else rng.normal(size=c[0]) for c in (o1c, o2c)
    ]
    kw = {
        "mat_labels": ml,
        "other1_labels": None if o1c is None else o1c[1],
        "other2_labels": None if o2c is None else o2c[1],
        "out_labels": out,
    }

    def f(mat, o1, o2):
        c = lambda x: None if x is None else x.astype(jnp.float32)
        tri, ref = _triton("dot_general"), _xla("dot_general")
        return (
            (tri(mat, o1, o2, **kw),),
            (tri(c(mat), c(o1), c(o2), **kw),),
            (ref(c(mat), c(o1), c(o2), **kw),),
            (ref(mat, o1, o2, **kw),),
        )

    return arrays, kw, jax.block_until_ready(jax.jit(f)(*arrays))


@pytest.mark.parametrize("case", range(len(BILINEAR_CASES)))
def test_bilinear_matches_reference(guard, case):
    _, _, (f64, f32, ref32, truth) = _bilinear_all(case, case)
    _check(f64, f32, ref32, truth, case)


def test_mixed_dtypes_promote_like_the_reference(guard):
    """An f32 constant with an f64 covariance (a layer built before x64 was enabled) computes in
    f64, as the reference's einsum promotes."""
    (arrays, kw, _) = _bilinear_all(0, 3)
    mat, o1, o2 = arrays[0], *(jnp.asarray(o, jnp.float32) for o in arrays[1:])
    got = _triton("dot_general")(mat, o1, o2, **kw)
    want = _xla("dot_general")(mat, o1, o2, **kw)
    assert got.dtype == want.dtype == jnp.float64
    assert _rel(got, want) <= 1e-12
    x1, x2 = _inputs((3, 4, 2), 0, 4)
    kw = {"diagonal_batch": True, "diagonal_spatial": False, "batch_axis": 0, "channel_axis": 2}
    got = _triton("input_cov")(jnp.asarray(x1, jnp.float32), x2, **kw)
    want = _xla("input_cov")(jnp.asarray(x1, jnp.float32), x2, **kw)
    assert [g.dtype for g in got] == [w.dtype for w in want] == [jnp.float32] + 2 * [jnp.float64]
    for g, w in zip(got, want):
        assert _rel(g, w) <= (1e-6 if g.dtype == jnp.float32 else 1e-12)


# kernel_dot_general on NT layouts: (input shape, batch_axis, channel_axis, constant shape,
# dimension_numbers, is_lhs) — covering the planner's paths: g2 promotion, output tables,
# transposed constants, lax batch dimensions, a reordered output.
DG_CASES = [
    ((3, 4, 5, 2), 0, 3, (5, 3), (((2,), (0,)), ((), ())), False),
    ((3, 4, 5, 2), 0, 3, (3, 4), (((1,), (1,)), ((), ())), True),
    ((3, 4, 5, 2), 0, 3, (4, 5, 2), (((2,), (1,)), ((1,), (0,))), False),
    ((3, 4, 5, 2), 0, 3, (4, 5), (((1, 2), (0, 1)), ((), ())), False),
    ((3, 4, 5, 2), 0, 3, (3, 4, 2), (((1,), (1,)), ((0,), (0,))), False),
    ((4, 2, 3), 2, 1, (4, 3), (((0,), (0,)), ((), ())), False),
]


@pytest.mark.parametrize("i", range(len(DG_CASES)))
def test_kernel_dot_general_matches_reference(guard, i):
    from ntfast.kernel import Kernel

    shape, b, c, oshape, dn, is_lhs = DG_CASES[i]
    rng = np.random.default_rng(20 + i)
    x1 = rng.normal(size=shape)
    o = jnp.asarray(rng.normal(size=oshape))
    n = len(shape)
    input_cs = [a % n for a in dn[0][1 if is_lhs else 0]]
    db = b not in input_cs and i % 2 == 0
    ds = False
    cov1, nngp, _ = dg.input_cov(
        x1, None, diagonal_batch=db, diagonal_spatial=ds, batch_axis=b, channel_axis=c
    )
    k = Kernel(
        nngp=nngp, ntk=2 * nngp, cov1=cov1, cov2=None, x1_is_x2=True, is_gaussian=True,
        is_reversed=False, is_input=False, diagonal_batch=db, diagonal_spatial=ds,
        shape1=x1.shape, shape2=x1.shape, batch_axis=b, channel_axis=c,
    )  # fmt: skip
    f = jax.jit(
        lambda k, o, name: dg.kernel_dot_general(k, o, o, is_lhs, dn, backend=name),
        static_argnums=2,
    )
    got, want = f(k, o, "triton"), f(k, o, "xla")
    for field in ("cov1", "nngp", "ntk"):
        assert _rel(getattr(got, field), getattr(want, field)) <= 1e-12, field
    assert (got.batch_axis, got.channel_axis) == (want.batch_axis, want.channel_axis)


def test_dot_general_layer_kernel_fn_under_triton(guard):
    """A DotGeneral layer (constant on a spatial axis) after the input layer, whole kernel_fn."""
    rng = np.random.default_rng(5)
    x1, x2 = rng.normal(size=(2, 5, 3, 2)), rng.normal(size=(3, 5, 3, 2))
    rhs = rng.normal(size=(5, 4))
    _, _, kernel_fn = stax.DotGeneral(rhs=rhs, dimension_numbers=(((1,), (0,)), ((), ())))
    get = ("nngp", "cov1", "cov2")
    got = jax.jit(lambda a, b: kernel_fn(a, b, get, backend="triton"))(x1, x2)
    want = kernel_fn(x1, x2, get, backend="xla")
    for g, w in zip(got, want):
        assert _rel(g, w) <= 1e-12


@pytest.mark.parametrize("case", ["input_cov", "dot_general"])
def test_benchmarked_calls_on_the_smoke_shape(guard, case):
    """The op calls that bench/bench_ops.py times, on its shared ``op-smoke`` shape."""
    bench_ops = pytest.importorskip(
        "bench.bench_ops", reason="bench/ is importable from the repository root (python -m pytest)"
    )
    from bench.shapes import OP_SHAPES, OP_SMOKE_SHAPE

    shape = OP_SHAPES[OP_SMOKE_SHAPE]
    got, want = (
        jax.tree.leaves(jax.jit(fn)(*args))
        for fn, args in (bench_ops.op_call(case, impl, shape) for impl in ("triton", "xla"))
    )
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert _rel(g, w) <= 1e-12


# ------------------------------------------------------------------------------------------------
# Transformations: vmap (folded into the product), grad (reference VJP)


def test_input_cov_vmap_folds_and_nests(guard):
    rng = np.random.default_rng(11)
    xs1 = rng.normal(size=(2, 3, 4, 2))  # vmapped axis 0: 2 × (3, 4, 2)
    x2 = rng.normal(size=(2, 4, 2))
    kw = {"diagonal_batch": False, "diagonal_spatial": False, "batch_axis": 0, "channel_axis": 2}

    def op(name):
        return lambda a, b: (
            _triton("input_cov")(a, b, **kw) if name == "triton" else _xla("input_cov")(a, b, **kw)
        )

    # x2 unbatched: cov2 stays unbatched; nngp broadcasts x2 with stride 0.
    got = jax.jit(jax.vmap(op("triton"), (0, None)))(xs1, x2)
    want = jax.vmap(op("xla"), (0, None))(xs1, x2)
    for g, w in zip(got, want):
        assert _rel(g, w) <= 1e-12
    # Nested vmaps over both inputs (the inner rule runs under the outer one).
    xss1 = np.stack([xs1, -xs1])
    xs2 = np.stack([x2, 2 * x2])
    got = jax.jit(jax.vmap(jax.vmap(op("triton"), (0, 0)), (0, None)))(xss1, xs2)
    want = jax.vmap(jax.vmap(op("xla"), (0, 0)), (0, None))(xss1, xs2)
    for g, w in zip(got, want):
        assert _rel(g, w) <= 1e-12


def test_input_cov_vmap_diagonal_layouts(guard):
    rng = np.random.default_rng(12)
    xs1, xs2 = rng.normal(size=(2, 3, 5, 2)), rng.normal(size=(2, 2, 5, 2))
    for db, ds in ((True, True), (True, False), (False, True)):
        kw = {"diagonal_batch": db, "diagonal_spatial": ds, "batch_axis": 0, "channel_axis": 2}
        got = jax.vmap(functools.partial(_triton("input_cov"), **kw))(xs1, xs2)
        want = jax.vmap(functools.partial(_xla("input_cov"), **kw))(xs1, xs2)
        for g, w in zip(got, want):
            assert _rel(g, w) <= 1e-12, (db, ds)


def test_bilinear_vmap_adds_a_label(guard):
    (arrays, kw, _) = _bilinear_all(7, 0)
    mat, o1, o2 = arrays
    mats = np.stack([mat, 2 * mat])
    o1s = np.stack([o1, -o1])
    tri = lambda m, a, b: _triton("dot_general")(m, a, b, **kw)
    ref = lambda m, a, b: _xla("dot_general")(m, a, b, **kw)
    for axes, args in (((0, None, None), (mats, o1, o2)), ((0, 0, None), (mats, o1s, o2))):
        got = jax.jit(jax.vmap(tri, axes))(*args)
        assert _rel(got, jax.vmap(ref, axes)(*args)) <= 1e-12


def test_grads_follow_the_reference(guard):
    rng = np.random.default_rng(13)
    x1, x2 = rng.normal(size=(2, 3, 2)), rng.normal(size=(3, 3, 2))
    w = rng.normal(size=(2, 3, 3, 3))

    def loss(name, x1, x2):
        _, nngp, cov2 = dg.input_cov(
            x1, x2, diagonal_batch=True, diagonal_spatial=False, batch_axis=0, channel_axis=2,
            backend=name,
        )  # fmt: skip
        return jnp.sum(jnp.sin(nngp) * w) + jnp.sum(cov2**2)

    got = jax.jit(jax.grad(lambda a, b: loss("triton", a, b), (0, 1)))(x1, x2)
    want = jax.grad(lambda a, b: loss("xla", a, b), (0, 1))(x1, x2)
    for g, ww in zip(got, want):
        assert _rel(g, ww) <= 1e-12

    (arrays, kw, _) = _bilinear_all(0, 1)

    def bl(name, *xs):
        return jnp.sum(jnp.cos(dg.bilinear(*xs, **kw, backend=name)))

    got = jax.grad(lambda *xs: bl("triton", *xs), (0, 1, 2))(*arrays)
    want = jax.grad(lambda *xs: bl("xla", *xs), (0, 1, 2))(*arrays)
    for g, ww in zip(got, want):
        assert _rel(g, ww) <= 1e-12


# ------------------------------------------------------------------------------------------------
# Guards, precision, errors, specializations


def test_canary_guard_catches_a_bad_plan():
    """The guard sees this kernel's writes: a plan one row too long writes past the output."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)))
    plan = tdg._Matmul(m=6, n=5, k=3, a=(0, 0, 3, 1), b=(0, 0, 3, 1), o=(0, 0, 5, 1))

    def f(x):
        return tdg._run_matmul("input_cov", tdg.CALL_FULL, x, x, plan, (5, 5), "ieee")

    with (
        runtime.canary_guard(pad=64) as violations,
        pytest.raises(Exception, match="wrote out of bounds"),
    ):
        jax.jit(f)(x).block_until_ready()
    assert len(violations) == 1


@pytest.mark.parametrize(
    "precision,dtype,want",
    [
        (None, np.float32, "ieee"),
        (jax.lax.Precision.HIGHEST, np.float32, "ieee"),
        ("highest", np.float32, "ieee"),
        (jax.lax.Precision.HIGH, np.float32, "ieee"),
        (jax.lax.Precision.DEFAULT, np.float32, "tf32"),
        ((jax.lax.Precision.DEFAULT, jax.lax.Precision.HIGHEST), np.float32, "ieee"),
        (jax.lax.Precision.DEFAULT, np.float64, "ieee"),
    ],
)
def test_input_precision_never_silently_tf32(precision, dtype, want):
    assert tdg.input_precision("input_cov", precision, dtype) == want


def _record_launches(monkeypatch) -> list[dict]:
    seen = []
    real = runtime.launch

    def spy(op, kernel, *arrays, out_shape, grid, name, num_warps=4, num_stages=1, **meta):
        seen.append(
            {"op": op, "kernel": kernel, "name": name, "dtype": str(jnp.dtype(arrays[0].dtype)),
                 "num_warps": num_warps, "num_stages": num_stages, "meta": meta}
        )  # fmt: skip
        return real(
            op, kernel, *arrays, out_shape=out_shape, grid=grid, name=name,
            num_warps=num_warps, num_stages=num_stages, **meta,
        )  # fmt: skip

    monkeypatch.setattr(runtime, "launch", spy)
    return seen


def test_every_launch_is_a_listed_specialization(monkeypatch):
    """Traces each variant (f32 and f64, short and long K) and finds every launch's kernel,
    dtype and constexprs in SPECIALIZATIONS, i.e. in the compile proof."""
    seen = _record_launches(monkeypatch)
    # Fresh launchers: jax (0.12) reuses traces of functions it has seen with these shapes.
    for factory in (tdg._pair_cov_fn, tdg._self_cov_fn, tdg._bilinear_fn):
        factory.cache_clear()
    for dtype, c in itertools.product((jnp.float32, jnp.float64), (3, 37)):
        for pixels in ((3, 1), (4, 5)):  # below / above PIXEL_MIN
            x = jax.ShapeDtypeStruct((2, *pixels, c), dtype)
            for db, ds in FLAGS:
                kw = {"diagonal_batch": db, "diagonal_spatial": ds}
                kw.update(batch_axis=0, channel_axis=3)
                jax.eval_shape(functools.partial(_triton("input_cov"), **kw), x, x)
        for case in (0, 7, 8):
            (ms, ml), o1c, o2c, out = BILINEAR_CASES[case]
            kw = {
                "mat_labels": ml,
                "other1_labels": o1c[1],
                "other2_labels": o2c[1],
                "out_labels": out,
            }
            args = [jax.ShapeDtypeStruct(s, dtype) for s in (ms, o1c[0], o2c[0])]
            jax.eval_shape(functools.partial(_triton("dot_general"), **kw), *args)
    names = {s["name"] for s in seen}
    assert names == {
        tdg.CALL_FULL, tdg.CALL_DIAG_SPATIAL, tdg.CALL_DIAG_BATCH, tdg.CALL_DIAG,
        tdg.CALL_LEFT, tdg.CALL_RIGHT,
    }  # fmt: skip
    dtypes = {"float32": "fp32", "float64": "fp64"}
    for s in seen:
        spec_keys = [
            (sp["op"], sp["kernel"], sp["dtype"], tuple(sorted(sp["constexprs"].items())),
             sp["num_warps"], sp["num_stages"])
            for sp in tdg.SPECIALIZATIONS
            if s["name"] in sp["names"]
        ]  # fmt: skip
        constexprs = tuple(sorted((k, v) for k, v in s["meta"].items() if k.isupper() and (
            k.startswith("BLOCK") or k == "INPUT_PRECISION")))  # fmt: skip
        key = (s["op"], s["kernel"], dtypes[s["dtype"]], constexprs)
        key += (s["num_warps"], s["num_stages"])
        assert key in spec_keys, key
        if s["kernel"] == tdg.MATMUL and s["dtype"] == "float32":
            assert s["meta"]["INPUT_PRECISION"] == "ieee"  # precision=None: never tf32


def test_unsupported_requests_raise_backend_error():
    x16 = jnp.ones((2, 3), jnp.float16)
    kw = {"diagonal_batch": True, "diagonal_spatial": True, "batch_axis": 0, "channel_axis": 1}
    with pytest.raises(BackendError, match="triton.*float32 or float64"):
        _triton("input_cov")(x16, None, **kw)
    with pytest.raises(BackendError, match="triton.*float32 or float64"):
        _triton("dot_general")(
            x16, x16, None, mat_labels=(0, 1), other1_labels=(0, 2), other2_labels=None,
            out_labels=(2, 1),
        )  # fmt: skip
    with pytest.raises(BackendError, match="precision"):
        _triton("input_cov")(jnp.ones((2, 3)), None, **kw, precision="bogus")
    with pytest.raises(BackendError, match="repeats a label"):
        _triton("dot_general")(
            jnp.ones((3, 3)), jnp.ones((3, 3)), None, mat_labels=(0, 1), other1_labels=(0, 0),
            other2_labels=None, out_labels=(1,),
        )  # fmt: skip


def test_launch_names_in_cuda_lowering():
    """With jax-triton (jax >= 0.11) the cuda lowering carries our named custom calls."""
    reason = runtime.jax_triton_unavailable_reason()
    if reason is not None:
        pytest.skip(f"needs jax-triton for the cuda lowering ({reason})")
    x = jax.ShapeDtypeStruct((2, 3, 4, 3), jnp.float32)
    kw = {"diagonal_batch": True, "diagonal_spatial": False, "batch_axis": 0, "channel_axis": 3}

    def f(a, b):
        return _triton("input_cov")(a, b, **kw)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowered = jax.jit(f).trace(x, x).lower(lowering_platforms=("cuda",))
    names = runtime.kernel_call_names(lowered)
    assert sorted(names) == sorted([tdg.CALL_DIAG_BATCH, tdg.CALL_DIAG_BATCH, tdg.CALL_FULL])

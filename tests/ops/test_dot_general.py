"""Tests of ``ntfast.ops.dot_general``: ``input_cov``, ``bilinear`` and ``kernel_dot_general``.

Truths: explicit f64 ``numpy.einsum`` formulas; the exact identity ``Cov(dot(x, O)) =
bilinear(O, Cov(x), O)`` for finite-width empirical covariances (``input_cov`` of the mapped
inputs); and Neural Tangents 0.6.5 (``_inputs_to_kernel``, ``Kernel.dot_general``) in-process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from nt_oracle import load_nt_stax

from ntfast import backend
from ntfast.kernel import Kernel
from ntfast.ops import dot_general as dg

load_nt_stax()
from neural_tangents._src.stax.requirements import _inputs_to_kernel as nt_inputs_to_kernel

RTOL = 1e-10


def assert_close(a, b, rtol=RTOL):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = max(np.max(np.abs(b)), 1e-300)
    err = np.max(np.abs(a - b)) / scale if a.size else 0.0
    assert err <= rtol, f"relative error {err:.3g} > {rtol}"


def rand(rng, shape):
    return rng.normal(size=shape)


# ----------------------------------------------------------------------------------------------
# input_cov

# (shape of x1, batch_axis, channel_axis): 2-D, 3-D and 4-D inputs in several layouts.
LAYOUTS = [
    ((3, 4), 0, -1),
    ((4, 3), 1, 0),
    ((5, 3, 4), 1, 2),
    ((3, 4, 5, 2), 0, 3),
    ((4, 3, 5, 2), 1, -2),
]
FLAGS = list(itertools.product([True, False], repeat=2))  # (diagonal_batch, diagonal_spatial)


def _x2_shape(shape, batch_axis):
    s = list(shape)
    s[batch_axis] += 1  # N2 != N1
    return tuple(s)


def _nsc(x, b, c):
    return np.moveaxis(x, (b % x.ndim, c % x.ndim), (0, -1))


def _truth_input_cov(x1, x2, db, ds, b, c):
    """``Σ_c x1 x2 / C`` by explicit einsums over ``(N, P, C)`` views, then NT's layout."""
    a1 = _nsc(x1, b, c)
    a2 = a1 if x2 is None else _nsc(x2, b, c)
    sp = a1.shape[1:-1]
    n_c = a1.shape[-1]
    f1 = a1.reshape(a1.shape[0], -1, n_c)
    f2 = a2.reshape(a2.shape[0], -1, n_c)

    def zipped(t, start):
        k = len(sp)
        perm = list(range(start)) + [start + i + s * k for i in range(k) for s in (0, 1)]
        return np.transpose(t, perm)

    def pair(u, v):
        if ds:
            return np.einsum("npc,mpc->nmp", u, v).reshape((u.shape[0], v.shape[0]) + sp) / n_c
        t = np.einsum("npc,mqc->nmpq", u, v).reshape((u.shape[0], v.shape[0]) + sp + sp)
        return zipped(t, 2) / n_c

    def self_cov(u):
        if not db:
            return pair(u, u)
        if ds:
            return np.einsum("npc,npc->np", u, u).reshape((u.shape[0],) + sp) / n_c
        t = np.einsum("npc,nqc->npq", u, u).reshape((u.shape[0],) + sp + sp)
        return zipped(t, 1) / n_c

    return self_cov(f1), pair(f1, f2), (None if x2 is None else self_cov(f2))


def _nt_input_kernel(x1, x2, db, ds, b, c, compute_ntk=True):
    with pytest.warns(UserWarning) if b % x1.ndim else contextlib.nullcontext():
        return nt_inputs_to_kernel(
            x1,
            x2,
            diagonal_batch=db,
            diagonal_spatial=ds,
            compute_ntk=compute_ntk,
            batch_axis=b,
            channel_axis=c,
            mask_constant=None,
        )


@pytest.mark.parametrize("shape,b,c", LAYOUTS)
@pytest.mark.parametrize("db,ds", FLAGS)
def test_input_cov_matches_einsum(shape, b, c, db, ds):
    rng = np.random.default_rng(0)
    x1 = rand(rng, shape)
    x2 = rand(rng, _x2_shape(shape, b))
    cov1, nngp, cov2 = dg.input_cov(
        x1, x2, diagonal_batch=db, diagonal_spatial=ds, batch_axis=b, channel_axis=c
    )
    t1, t12, t2 = _truth_input_cov(x1, x2, db, ds, b, c)
    assert_close(cov1, t1)
    assert_close(nngp, t12)
    assert_close(cov2, t2)


@pytest.mark.parametrize("db,ds", FLAGS)
def test_input_cov_x2_none(db, ds):
    rng = np.random.default_rng(1)
    x1 = rand(rng, (3, 4, 5, 2))
    cov1, nngp, cov2 = dg.input_cov(
        x1, None, diagonal_batch=db, diagonal_spatial=ds, batch_axis=0, channel_axis=-1
    )
    t1, t12, _ = _truth_input_cov(x1, None, db, ds, 0, -1)
    assert cov2 is None
    assert_close(cov1, t1)
    assert_close(nngp, t12)


# NT's `_inputs_to_kernel` on a subset spanning every flag pair, x2=None and every axis placement.
NT_INPUT_CASES = [
    (LAYOUTS[0], True, True, False),
    (LAYOUTS[1], False, False, True),
    (LAYOUTS[2], True, False, False),
    (LAYOUTS[2], False, True, True),
    (LAYOUTS[3], False, False, False),
    (LAYOUTS[3], True, False, True),
    (LAYOUTS[4], True, True, False),
    (LAYOUTS[4], False, False, False),
]


@pytest.mark.parametrize("layout,db,ds,same", NT_INPUT_CASES)
def test_input_cov_matches_nt(layout, db, ds, same):
    shape, b, c = layout
    rng = np.random.default_rng(2)
    x1 = rand(rng, shape)
    x2 = None if same else rand(rng, _x2_shape(shape, b))
    cov1, nngp, cov2 = dg.input_cov(
        x1, x2, diagonal_batch=db, diagonal_spatial=ds, batch_axis=b, channel_axis=c
    )
    k = _nt_input_kernel(x1, x2, db, ds, b, c)
    assert_close(cov1, k.cov1)
    assert_close(nngp, k.nngp)
    assert (cov2 is None) == (k.cov2 is None)
    if cov2 is not None:
        assert_close(cov2, k.cov2)


def test_input_cov_channel_axis_none_flattens_like_nt():
    rng = np.random.default_rng(1)
    x1, x2 = rand(rng, (3, 4, 2)), rand(rng, (2, 4, 2))
    cov1, nngp, cov2 = dg.input_cov(
        x1, x2, diagonal_batch=True, diagonal_spatial=True, batch_axis=0, channel_axis=None
    )
    k = _nt_input_kernel(x1, x2, True, True, 0, None, compute_ntk=False)
    assert nngp.shape == (3, 2)
    for a, t in ((cov1, k.cov1), (nngp, k.nngp), (cov2, k.cov2)):
        assert_close(a, t)


def test_input_cov_casts_like_nt_and_runs_under_jit():
    x = np.arange(24, dtype=np.int32).reshape(2, 3, 4)
    cov1, nngp, _ = jax.jit(
        lambda a: dg.input_cov(
            a, diagonal_batch=True, diagonal_spatial=False, batch_axis=0, channel_axis=-1
        )
    )(x)
    assert nngp.dtype == jnp.float64 and cov1.dtype == jnp.float64
    t1, t12, _ = _truth_input_cov(x.astype(np.float64), None, True, False, 0, -1)
    assert_close(cov1, t1)
    assert_close(nngp, t12)


@pytest.mark.parametrize(
    "x1,x2,kw,err,match",
    [
        (np.ones(3), None, {}, ValueError, "at least 2-D"),
        (np.ones((2, 3)), np.ones((2, 4)), {}, ValueError, "same shape apart from the batch"),
        (np.ones((2, 3)), np.ones((2, 3, 1)), {}, ValueError, "same number of axes"),
        (np.ones((2, 3)), None, {"batch_axis": 1, "channel_axis": -1}, ValueError, "must differ"),
        (np.ones((2, 3)), None, {"channel_axis": 2}, ValueError, "channel_axis"),
        ([[1.0, 2.0]], None, {}, TypeError, "`x1` must be an array"),
    ],
)
def test_input_cov_errors(x1, x2, kw, err, match):
    args = {"diagonal_batch": True, "diagonal_spatial": False, "batch_axis": 0, "channel_axis": -1}
    args.update(kw)
    with pytest.raises(err, match=match):
        dg.input_cov(x1, x2, **args)


# ----------------------------------------------------------------------------------------------
# bilinear (the array-level op)


def _einsum_truth(mat, o1, o2, ml, l1, l2, out):
    ops = []
    if o1 is not None:
        ops += [o1, list(l1)]
    ops += [mat, list(ml)]
    if o2 is not None:
        ops += [o2, list(l2)]
    return np.einsum(*ops, list(out))


BILINEAR_CASES = [
    # (mat shape/labels, o1 shape/labels, o2 shape/labels, out labels)
    # plain matrix sandwich: O1 K O2ᵀ
    (((4, 5), (0, 1)), ((3, 4), (10, 0)), ((2, 5), (11, 1)), (10, 11)),
    # batched over a shared diagonal label (diagonal batch), free dims on both sides
    (((3, 4, 4), (0, 1, 2)), ((3, 2, 4), (0, 10, 1)), ((3, 2, 4), (0, 11, 2)), (0, 10, 11)),
    # diagonal free label shared by O1 and O2 (diagonal_spatial outputs)
    (((3, 2, 5), (0, 1, 2)), ((5, 4), (2, 7)), ((5, 4), (2, 7)), (0, 1, 7)),
    # contraction over two axes and output permutation
    (((2, 3, 3, 4, 4), (0, 1, 2, 3, 4)), ((3, 4), (1, 3)), ((3, 4), (2, 4)), (0,)),
    # one-sided: other2 None, other1 contracts; leftover right labels are summed
    (((2, 4, 4), (0, 1, 2)), ((4,), (1,)), None, (0,)),
    # one-sided: other1 None
    (((2, 4, 4), (0, 1, 2)), None, ((4, 3), (2, 9)), (0, 1, 9)),
    # scalar factors
    (((2, 3), (0, 1)), ((), ()), ((), ()), (1, 0)),
]


@pytest.mark.parametrize("case", range(len(BILINEAR_CASES)))
@pytest.mark.parametrize("jit", [False, True])
def test_bilinear_matches_einsum(case, jit):
    (ms, ml), o1c, o2c, out = BILINEAR_CASES[case]
    rng = np.random.default_rng(case)
    mat = rand(rng, ms)
    o1 = None if o1c is None else rand(rng, o1c[0])
    o2 = None if o2c is None else rand(rng, o2c[0])
    l1 = None if o1c is None else o1c[1]
    l2 = None if o2c is None else o2c[1]

    def f(mat, o1, o2):
        return dg.bilinear(
            mat,
            o1,
            o2,
            mat_labels=ml,
            other1_labels=l1,
            other2_labels=l2,
            out_labels=out,
            backend="xla",
        )

    got = jax.jit(f)(mat, o1, o2) if jit else f(mat, o1, o2)
    assert_close(got, _einsum_truth(mat, o1, o2, ml, l1, l2, out))


def test_bilinear_never_forms_outer_product_of_factors():
    # With large free dims on both factors, O1 ⊗ O2 would be (P, Q, A, B); the two pairwise
    # contractions only ever hold (P, B) and (P, Q) intermediates.
    mat = jnp.ones((6, 7))
    o1, o2 = jnp.ones((50, 6)), jnp.ones((60, 7))
    hlo = (
        jax.jit(
            lambda m, a, b: dg.bilinear(
                m,
                a,
                b,
                mat_labels=(0, 1),
                other1_labels=(2, 0),
                other2_labels=(3, 1),
                out_labels=(2, 3),
            )
        )
        .lower(mat, o1, o2)
        .as_text()
    )
    assert "50x60x6x7" not in hlo and "50x6x60x7" not in hlo
    assert hlo.count("dot_general") == 2


def test_bilinear_f32_error_within_twice_reference():
    rng = np.random.default_rng(3)
    mat, o1, o2 = rand(rng, (3, 16, 16)), rand(rng, (16, 8)), rand(rng, (16, 8))
    kw = {"mat_labels": (0, 1, 2), "other1_labels": (1, 5), "other2_labels": (2, 6)}
    kw["out_labels"] = (0, 5, 6)
    truth = np.einsum("nab,ap,bq->npq", mat, o1, o2)
    ours = dg.bilinear(*(jnp.asarray(a, jnp.float32) for a in (mat, o1, o2)), **kw)
    ref = jnp.einsum(
        "nab,ap,bq->npq",
        *(jnp.asarray(a, jnp.float32) for a in (mat, o1, o2)),
        precision=lax.Precision.HIGHEST,
    )
    assert ours.dtype == jnp.float32
    err_ours = np.max(np.abs(np.asarray(ours, np.float64) - truth))
    err_ref = np.max(np.abs(np.asarray(ref, np.float64) - truth))
    assert err_ours <= 2 * err_ref + 1e-6 * np.max(np.abs(truth))


def test_bilinear_label_errors():
    mat = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="appear in no operand"):
        dg.bilinear(
            mat, None, None, mat_labels=(0, 1), other1_labels=None, other2_labels=None,
            out_labels=(0, 5),
        )  # fmt: skip
    with pytest.raises(ValueError, match="one label per axis of `mat`"):
        dg.bilinear(
            mat, None, None, mat_labels=(0,), other1_labels=None, other2_labels=None,
            out_labels=(0,),
        )  # fmt: skip
    with pytest.raises(ValueError, match="`other1_labels`"):
        dg.bilinear(
            mat, jnp.ones((2,)), None, mat_labels=(0, 1), other1_labels=(0, 1),
            other2_labels=None, out_labels=(1,),
        )  # fmt: skip


def test_ops_registered_and_dispatch():
    ops = backend.registered_ops()
    assert "xla" in ops["dot_general"] and "xla" in ops["input_cov"]
    x = np.ones((2, 3))
    kw = {"diagonal_batch": True, "diagonal_spatial": True, "batch_axis": 0, "channel_axis": 1}
    with backend.use_backend("xla"):
        _, nngp, _ = dg.input_cov(x, **kw)
    assert_close(nngp, np.ones((2, 2)))
    # "native" has whole-network fused kernels only: its other ops are the XLA definition
    # (backend.XLA_FILLED); where its modules are not built it is unavailable.
    if backend.unavailable_reason("native") is None:
        assert_close(dg.input_cov(x, backend="native", **kw)[1], nngp)
    else:
        with pytest.raises(backend.BackendError, match="unavailable"):
            dg.input_cov(x, backend="native", **kw)


# ----------------------------------------------------------------------------------------------
# kernel_dot_general: NT's Kernel.dot_general


def _nt_kernel(x1, x2, db, ds, b, c, rng):
    k = _nt_input_kernel(x1, x2, db, ds, b, c)
    # A non-trivial NTK of the nngp's layout exercises the ntk path.
    return k.replace(ntk=jnp.asarray(rng.normal(size=k.nngp.shape)))


def _to_ntfast(k) -> Kernel:
    return Kernel(**{f.name: getattr(k, f.name) for f in dataclasses.fields(Kernel)})


# (input shape, batch_axis, channel_axis, constant's shape, dimension_numbers, is_lhs)
DG_CASES = [
    ((3, 4, 5, 2), 0, 3, (5, 3), (((2,), (0,)), ((), ())), False),
    ((3, 4, 5, 2), 0, 3, (3, 4), (((1,), (1,)), ((), ())), True),
    ((3, 4, 5, 2), 0, 3, (4, 5, 2), (((2,), (1,)), ((1,), (0,))), False),
    ((3, 4, 5, 2), 0, 3, (4, 5), (((1, 2), (0, 1)), ((), ())), False),
    ((3, 4, 5, 2), 0, 3, (), (((), ()), ((), ())), False),
    ((3, 4, 5, 2), 0, 3, (4,), (((), ()), ((1,), (0,))), False),
    ((3, 4, 5, 2), 0, 3, (6,), (((), ()), ((), ())), True),
    ((3, 4, 5, 2), 0, 3, (3, 4, 2), (((1,), (1,)), ((0,), (0,))), False),
    ((3, 4, 5, 2), 0, 3, (5, 4, 3), (((1,), (1,)), ((0,), (2,))), True),
    ((3, 4, 5, 2), 0, -1, (5, 3), (((-2,), (-2,)), ((), ())), False),
    ((4, 2, 3), 2, 1, (4, 3), (((0,), (0,)), ((), ())), False),
    ((4, 2, 3), -1, 1, (2, 4), (((1,), (0,)), ((), ())), True),
    ((5, 3, 4), 1, 2, (5,), (((), ()), ((0,), (0,))), False),
    ((3, 4), 0, 1, (5,), (((), ()), ((), ())), True),
    ((3, 4), 0, 1, (), (((), ()), ((), ())), True),
    ((2, 3, 4, 3, 2), 0, 4, (4, 2), (((2,), (0,)), ((), ())), False),
]
# Contracting the batch axis (requires full batch covariances): compared with NT only.
DG_BATCH_CONTRACTED = [
    ((3, 4, 2), 0, 2, (2, 3), (((1,), (0,)), ((), ())), True),
    ((3, 4, 2), 0, 2, (3, 2), (((0,), (0,)), ((), ())), False),
]


def _case(i):
    return DG_CASES[i]


def _allowed_layouts(shape, b, c, dn, is_lhs, half):
    """(diagonal_batch, diagonal_spatial) pairs that carry enough information (DotGeneral's
    requirements): contracted spatial axes need full spatial, a contracted batch full batch.

    ``half=0`` gives the pairs with ``db == ds`` (NT comparison), ``half=1`` the mixed ones (the
    exactness test), so that each case sees every allowed layout once (compile time is the cost).
    """
    n = len(shape)
    input_cs = [a % n for a in dn[0][1 if is_lhs else 0]]
    db_ok = (True, False) if b % n not in input_cs else (False,)
    ds_ok = (True, False) if set(input_cs) <= {b % n} else (False,)
    pairs = list(itertools.product(db_ok, ds_ok))
    chosen = [p for p in pairs if (p[0] == p[1]) == (half == 0)]
    return chosen or pairs[:1]


def _compare_with_nt(k_nt, o1, o2, is_lhs, dn):
    want = k_nt.dot_general(
        None if o1 is None else jnp.asarray(o1),
        None if o2 is None else jnp.asarray(o2),
        is_lhs,
        dn,
    )
    got = dg.kernel_dot_general(
        _to_ntfast(k_nt),
        None if o1 is None else jnp.asarray(o1),
        None if o2 is None else jnp.asarray(o2),
        is_lhs,
        dn,
        backend="xla",
    )
    for f in ("cov1", "cov2", "nngp", "ntk"):
        a, t = getattr(got, f), getattr(want, f)
        assert (a is None) == (t is None), f
        if t is not None:
            assert_close(a, t)
    for f in ("batch_axis", "channel_axis", "is_reversed", "diagonal_batch", "diagonal_spatial"):
        assert getattr(got, f) == getattr(want, f), f
    return got


def _batch_sized(oshape, dn, is_lhs, b, n):
    """Index of the constant's axis that is lax-batched with the input batch axis, or None."""
    _, (lb, rb) = dn
    other_bs, input_bs = (lb, rb) if is_lhs else (rb, lb)
    for ob, ib in zip(other_bs, input_bs):
        if ib % n == b % n:
            return ob % len(oshape)
    return None


@pytest.mark.parametrize("i", range(len(DG_CASES)))
def test_kernel_dot_general_matches_nt(i):
    shape, b, c, oshape, dn, is_lhs = _case(i)
    n = len(shape)
    rng = np.random.default_rng(i)
    x1 = rand(rng, shape)
    bo = _batch_sized(oshape, dn, is_lhs, b, n)
    # A constant batched with the input batch must have N1 == N2 rows for both sides.
    # x2=None on odd cases, N2 != N1 on even ones.
    x2 = None if (i % 2 or bo is not None) else rand(rng, _x2_shape(shape, b % n))
    o1, o2 = rand(rng, oshape), rand(rng, oshape)
    if x2 is None:
        o2 = o1
    for db, ds in _allowed_layouts(shape, b, c, dn, is_lhs, 0):
        k = _nt_kernel(x1, x2, db, ds, b, c, rng)
        _compare_with_nt(k, o1, o2, is_lhs, dn)


@pytest.mark.parametrize("i", range(len(DG_BATCH_CONTRACTED)))
def test_kernel_dot_general_batch_contraction_matches_nt(i):
    shape, b, c, oshape, dn, is_lhs = DG_BATCH_CONTRACTED[i]
    rng = np.random.default_rng(10 + i)
    x1 = rand(rng, shape)
    o = rand(rng, oshape)
    for ds in (True, False):
        k = _nt_kernel(x1, None, False, ds, b, c, rng)
        _compare_with_nt(k, o, o, is_lhs, dn)


@pytest.mark.parametrize("i", range(len(DG_CASES)))
def test_kernel_dot_general_is_exact_for_empirical_covariances(i):
    """``Cov(dot(x1, O1), dot(x2, O2))`` computed from the mapped inputs equals the bilinear
    form of ``Cov(x1, x2)``: the infinite-width rule is exact for finite channel counts too."""
    shape, b, c, oshape, dn, is_lhs = _case(i)
    n = len(shape)
    rng = np.random.default_rng(100 + i)
    bo = _batch_sized(oshape, dn, is_lhs, b, n)
    x1 = rand(rng, shape)
    x2 = rand(rng, shape if bo is not None else _x2_shape(shape, b % n))
    o1, o2 = rand(rng, oshape), rand(rng, oshape)

    (lc, rc), (lb, rb) = dn
    (lc, lb), (rc, rb) = (
        (
            ([a % len(oshape) for a in lc], [a % len(oshape) for a in lb]),
            ([a % n for a in rc], [a % n for a in rb]),
        )
        if is_lhs
        else (
            ([a % n for a in lc], [a % n for a in lb]),
            ([a % len(oshape) for a in rc], [a % len(oshape) for a in rb]),
        )
    )
    dn_pos = ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))  # lax wants non-negative dims

    def apply(x, o):
        o = jnp.asarray(o)
        return lax.dot_general(o, x, dn_pos) if is_lhs else lax.dot_general(x, o, dn_pos)

    y1, y2 = apply(x1, o1), apply(x2, o2)
    for db, ds in _allowed_layouts(shape, b, c, dn, is_lhs, 1):
        c1, nn, c2 = dg.input_cov(
            x1, x2, diagonal_batch=db, diagonal_spatial=ds, batch_axis=b, channel_axis=c
        )
        k = Kernel(
            nngp=nn, ntk=nn, cov1=c1, cov2=c2, x1_is_x2=False, is_gaussian=True,
            is_reversed=False, is_input=False, diagonal_batch=db, diagonal_spatial=ds,
            shape1=x1.shape, shape2=x2.shape, batch_axis=b % n, channel_axis=c % n,
        )  # fmt: skip
        out = dg.kernel_dot_general(k, jnp.asarray(o1), jnp.asarray(o2), is_lhs, dn)
        t1, t12, t2 = dg.input_cov(
            y1,
            y2,
            diagonal_batch=db,
            diagonal_spatial=ds,
            batch_axis=out.batch_axis,
            channel_axis=out.channel_axis,
        )
        assert_close(out.cov1, t1)
        assert_close(out.nngp, t12)
        assert_close(out.ntk, t12)
        assert_close(out.cov2, t2)


@pytest.mark.parametrize("i", [0, 1, 2, 3, 8, 15])
def test_kernel_dot_general_is_reversed(i):
    """A kernel stored with reversed spatial pairs gives the same (non-reversed) result."""
    shape, b, c, oshape, dn, is_lhs = _case(i)
    rng = np.random.default_rng(200 + i)
    x1 = rand(rng, shape)
    o = rand(rng, oshape)
    for db in (True, False):
        k = _to_ntfast(_nt_kernel(x1, None, db, False, b, c, rng))
        cb = 1 if db else 2

        def rev(m, start):
            return None if m is None else jnp.asarray(_reverse_pairs(np.asarray(m), start))

        kr = k.replace(
            cov1=rev(k.cov1, cb), nngp=rev(k.nngp, 2), ntk=rev(k.ntk, 2), is_reversed=True
        )
        want = dg.kernel_dot_general(k, o, o, is_lhs, dn)
        got = dg.kernel_dot_general(kr, o, o, is_lhs, dn)
        for f in ("cov1", "nngp", "ntk"):
            assert_close(getattr(got, f), getattr(want, f))
        assert got.is_reversed is False
        # And NT agrees on the reversed kernel.
        k_nt = _nt_kernel(x1, None, db, False, b, c, rng)
        k_nt = k_nt.replace(
            cov1=rev(k_nt.cov1, cb), nngp=rev(k_nt.nngp, 2), ntk=rev(k_nt.ntk, 2), is_reversed=True
        )
        _compare_with_nt(k_nt, o, o, is_lhs, dn)


def _reverse_pairs(m, start):
    pairs = [(a, a + 1) for a in range(start, m.ndim, 2)][::-1]
    return np.transpose(m, list(range(start)) + [a for p in pairs for a in p])


def test_kernel_dot_general_one_sided_matches_nt():
    # A constant without free axes on one side only: NT sums the other side's contracted axes.
    rng = np.random.default_rng(7)
    x1, x2 = rand(rng, (3, 4, 2)), rand(rng, (2, 4, 2))
    dn = (((1,), (0,)), ((), ()))
    o = rand(rng, (4,))
    k = _nt_kernel(x1, x2, True, False, 0, 2, rng)
    _compare_with_nt(k, o, None, False, dn)
    _compare_with_nt(k, None, o, False, dn)
    kk = _to_ntfast(k)
    assert dg.kernel_dot_general(kk, None, None, False, dn) is kk


def test_kernel_dot_general_errors():
    rng = np.random.default_rng(8)
    k = _to_ntfast(_nt_kernel(rand(rng, (3, 4, 2)), None, True, False, 0, 2, rng))
    with pytest.raises(ValueError, match="channel_axis"):
        dg.kernel_dot_general(
            k, jnp.ones((2, 5)), jnp.ones((2, 5)), False, (((2,), (0,)), ((), ()))
        )
    with pytest.raises(ValueError, match="channel_axis"):
        dg.kernel_dot_general(k, jnp.ones((2,)), jnp.ones((2,)), False, (((), ()), ((2,), (0,))))
    with pytest.raises(NotImplementedError, match="different dimensionality"):
        dg.kernel_dot_general(k, jnp.ones((4,)), jnp.ones((4, 1)), False, (((1,), (0,)), ((), ())))
    with pytest.raises(ValueError, match="appear in no operand"):
        # A one-sided constant with a free axis has no second-side output axis.
        dg.kernel_dot_general(k, jnp.ones((4, 3)), None, False, (((1,), (0,)), ((), ())))


def test_kernel_dot_general_under_jit():
    rng = np.random.default_rng(9)
    k = _to_ntfast(_nt_kernel(rand(rng, (3, 4, 2)), None, False, False, 0, 2, rng))
    o = jnp.asarray(rand(rng, (4, 5)))
    dn = (((1,), (0,)), ((), ()))
    f = jax.jit(lambda k, o: dg.kernel_dot_general(k, o, o, False, dn))
    got, want = f(k, o), dg.kernel_dot_general(k, o, o, False, dn)
    assert_close(got.nngp, want.nngp)
    assert got.channel_axis == want.channel_axis == 1

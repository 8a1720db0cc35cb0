"""``ntfast._utils`` against NT 0.6.5's ``_src/utils/utils.py``: same names, same results."""

import inspect
import operator
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from nt_oracle import load_nt_stax

from ntfast import _utils as ours

load_nt_stax()
from neural_tangents._src.utils import utils as nt

RNG = np.random.default_rng(0)
X = RNG.normal(size=(2, 3, 4, 3, 4, 5))  # (N, A, B, A', B', C): an unzipped block on axes 1:5


def test_every_nt_helper_used_by_layers_exists():
    names = [
        "zip_axes", "unzip_axes", "zip_flat", "double_tuple", "interleave_ones", "reverse_zipped",
        "size_at", "canonicalize_axis", "mod", "axis_after_dot", "slice_shape", "canonicalize_idx",
        "outer_prod", "diagonal_between", "mask", "is_list_or_tuple", "is_nt_tree_of",
        "nt_tree_fn", "make_2d", "x1_is_x2", "split_kwargs", "get_namedtuple", "all_none",
        "wraps", "canonicalize_get", "SliceType", "Axes", "PyTree",
    ]  # fmt: skip
    missing = [n for n in names if not hasattr(ours, n)]
    assert not missing
    assert all(hasattr(nt, n) for n in names)


@pytest.mark.parametrize(("start", "end"), [(0, None), (1, 5), (2, 4), (1, 1), (2, 6)])
def test_zip_unzip_axes(start, end):
    a = ours.zip_axes(X, start, end)
    np.testing.assert_array_equal(a, nt.zip_axes(X, start, end))
    np.testing.assert_array_equal(ours.unzip_axes(X, start, end), nt.unzip_axes(X, start, end))
    np.testing.assert_array_equal(ours.unzip_axes(a, start, end), X)  # inverse


def test_zip_axes_odd_raises():
    with pytest.raises(ValueError, match="even"):
        ours.zip_axes(X, 1, 4)


@pytest.mark.parametrize(("start", "end"), [(1, 5), (3, 3), (2, 2)])
def test_diagonal_between_and_make_2d(start, end):
    np.testing.assert_array_equal(
        ours.diagonal_between(X, start, end), nt.diagonal_between(X, start, end)
    )
    np.testing.assert_array_equal(ours.make_2d(X, start, end), nt.make_2d(X, start, end))
    assert ours.make_2d(None) is None
    # diagonal_between reads the diagonal of the (A·B) x (A·B) matrix: x[.., a, b, a, b, ..].
    d = ours.diagonal_between(X, 1, 5)
    assert d[1, 2, 3, 4] == X[1, 2, 3, 2, 3, 4]


@pytest.mark.parametrize("x_first", [True, False])
def test_interleave_ones_and_outer_prod(x_first):
    a, b = RNG.normal(size=(2, 3, 4)), RNG.normal(size=(2, 3, 4))
    np.testing.assert_array_equal(
        ours.interleave_ones(a, 1, 3, x_first), nt.interleave_ones(a, 1, 3, x_first)
    )
    for y in (b, None):
        for op in (operator.mul, operator.add):
            np.testing.assert_array_equal(
                ours.outer_prod(a, y, 0, 3, op), nt.outer_prod(a, y, 0, 3, op)
            )
    out = ours.outer_prod(a, b, 1, 3, operator.mul)
    assert out.shape == (2, 3, 3, 4, 4)
    assert out[1, 0, 2, 3, 1] == a[1, 0, 3] * b[1, 2, 1]


@pytest.mark.parametrize("start", [0, 2, 4])
def test_reverse_zipped(start):
    x = RNG.normal(size=(2, 2, 3, 3, 4, 4))
    np.testing.assert_array_equal(ours.reverse_zipped(x, start), nt.reverse_zipped(x, start))
    np.testing.assert_array_equal(
        ours.reverse_zipped(jnp.asarray(x), start), nt.reverse_zipped(jnp.asarray(x), start)
    )
    for seq in ((0, 1, 2, 3, 4, 5), [0, 1, 2, 3, 4, 5]):
        got = ours.reverse_zipped(seq, start)
        assert got == nt.reverse_zipped(seq, start)
        assert type(got) is type(seq)
    assert ours.reverse_zipped(None) is None
    with pytest.raises(ValueError):  # an odd number of axes after start has no pairs
        ours.reverse_zipped(x, 1)


def test_mask():
    x = jnp.arange(6.0).reshape(2, 3)
    m = jnp.array([[True, False, False], [False, False, True]])
    np.testing.assert_array_equal(ours.mask(x, m), nt.mask(x, m))
    np.testing.assert_array_equal(ours.mask(x, m), [[0, 1, 2], [3, 4, 0]])
    assert ours.mask(None, m) is None
    assert ours.mask(x, None) is x


def test_size_at_mod_canonicalize_axis():
    shape = (2, 3, 4, 5)
    for axes in (None, [1, 3], (0,)):
        assert ours.size_at(shape, axes) == nt.size_at(shape, axes)
        assert ours.size_at(np.empty(shape), axes) == nt.size_at(np.empty(shape), axes)
    for axis, x in [(-1, 4), ([0, -1, -2, 1], shape), ((3, -4), np.empty(shape)), (5, 0)]:
        assert ours.mod(axis, x) == nt.mod(axis, x)
    for axis, x in [(-1, 4), ([2, -1, -2, 2], shape), ((3, 0), np.empty(shape)), ([], 3)]:
        assert ours.canonicalize_axis(axis, x) == sorted(nt.canonicalize_axis(axis, x))
    with pytest.raises(IndexError):
        nt.canonicalize_axis(4, shape)
    with pytest.raises((ValueError, IndexError), match="out of bounds"):
        ours.canonicalize_axis(4, shape)
    with pytest.raises(TypeError):
        ours.mod(0, 1.5)


@pytest.mark.parametrize(
    ("axis", "contracting", "batch", "lhs_ndim"),
    [(0, (2,), (), None), (3, (1,), (0,), None), (2, (1,), (2, 0), None), (3, (0,), (), 3)],
)
def test_axis_after_dot(axis, contracting, batch, lhs_ndim):
    got = ours.axis_after_dot(axis, contracting, batch, lhs_ndim)
    assert got == nt.axis_after_dot(axis, contracting, batch, lhs_ndim)


def test_axis_after_dot_matches_lax():
    # Track an axis of size 7 through a real dot_general.
    x = np.zeros((2, 7, 3, 5))
    o = np.zeros((3, 6, 2))
    dn = (((2,), (0,)), ((0,), (2,)))
    y = jax.lax.dot_general(x, o, dn)
    assert y.shape[ours.axis_after_dot(1, (2,), (0,))] == 7
    yl = jax.lax.dot_general(o, x, (((0,), (2,)), ((2,), (0,))))
    assert yl.shape[ours.axis_after_dot(1, (2,), (0,), lhs_ndim=3)] == 7


def test_zip_flat_double_tuple():
    assert ours.zip_flat((1, 2, 3), "ab") == nt.zip_flat((1, 2, 3), "ab") == (1, "a", 2, "b")
    assert ours.double_tuple([1, 2]) == nt.double_tuple([1, 2]) == (1, 1, 2, 2)


@pytest.mark.parametrize(
    "idx",
    [
        Ellipsis,
        3,
        slice(1, None),
        (Ellipsis,),
        (1, Ellipsis),
        (Ellipsis, slice(0, 2)),
        (slice(None), Ellipsis, 0, slice(None)),
        (0, slice(None, None, 2)),
        (),
    ],
)
def test_canonicalize_idx_and_slice_shape(idx):
    assert ours.canonicalize_idx(idx, 4) == nt.canonicalize_idx(idx, 4)
    shape = (4, 5, 6, 7)
    assert ours.slice_shape(shape, idx) == nt.slice_shape(shape, idx)


def test_slice_shape_unknown_sizes():
    shape = (-1, 5, -1, 7)
    idx = (slice(None), 2, slice(None), slice(1, 3))
    assert ours.slice_shape(shape, idx) == nt.slice_shape(shape, idx) == (-1, -1, 2)
    with pytest.raises(ValueError, match="unknown size"):
        ours.slice_shape(shape, (0,))
    # None (unknown) sizes too, where NT's check compares None < 0 and raises TypeError.
    assert ours.slice_shape((None, 5), (slice(None), 1)) == (None,)


def test_nt_tree_helpers():
    tree = [np.ones(2), (np.zeros(1), np.ones(3))]
    assert ours.is_list_or_tuple(tree) and not ours.is_list_or_tuple(
        ours._namedtuple_type("P", ("a",))(1)
    )
    assert ours.is_nt_tree_of(tree, np.ndarray) == nt.is_nt_tree_of(tree, np.ndarray) is True
    assert ours.is_nt_tree_of([tree, 1], np.ndarray) is False

    @ours.nt_tree_fn(nargs=2, reduce=sum)
    def f(a, b, scale=1.0):
        return float(np.sum(a) + np.sum(b)) * scale

    @nt.nt_tree_fn(nargs=2, reduce=sum)
    def g(a, b, scale=1.0):
        return float(np.sum(a) + np.sum(b)) * scale

    assert f(tree, tree, scale=2.0) == g(tree, tree, scale=2.0) == 20.0
    with pytest.raises(TypeError, match="Inconsistent"):
        f(tree, (np.ones(2), (np.zeros(1), np.ones(3))))
    # tree_structure_argnum: follow arg 0, broadcast nothing else.
    h = ours.nt_tree_fn(nargs=1, tree_structure_argnum=0)(lambda a, b: np.sum(a) * b)
    assert h((np.ones(2), np.ones(3)), 2.0) == (4.0, 6.0)

    assert ours.all_none(None) and ours.all_none([None, (None,)])
    assert not ours.all_none([None, 1])
    assert ours.all_none([None, None]) == nt.all_none([None, None])


def test_wraps_keeps_signature():
    def f(x1, x2=None, *, get="ntk"):
        """Doc."""

    @ours.wraps(f)
    def g(*args, **kwargs):
        return args, kwargs

    assert inspect.signature(g) == inspect.signature(f)
    assert g.__name__ == "f" and g.__doc__ == "Doc."
    assert g(1, get="nngp") == ((1,), {"get": "nngp"})


def test_canonicalize_get():
    for get in (None, "NTK", ("nngp", "ntk"), ["cov1"]):
        assert ours.canonicalize_get(get) == nt.canonicalize_get(get)
    for bad in ((), ("ntk", "NTK")):
        with pytest.raises(ValueError):
            ours.canonicalize_get(bad)


def test_get_namedtuple():
    def fn(x, get=("nngp", "ntk")):
        return {"nngp": x, "ntk": 2 * x, "cov1": 3 * x}

    def gen(x, get=None):
        return ({"nngp": x + i, "ntk": x - i} for i in range(2))

    for deco in (ours.get_namedtuple("K"), nt.get_namedtuple("K")):
        f = deco(fn)
        assert f(1) == (1, 2)
        assert f(1).ntk == 2
        assert f(1, "NTK") == 2
        assert f(1, get=("cov1",)).cov1 == 3
        assert f([1, (2,)], get="ntk") == {"nngp": [1, (2,)], "ntk": [1, (2,)] * 2}["ntk"]
        assert f(1, get=None)._fields == ("nngp", "ntk", "cov1")
        g = deco(gen)
        assert [tuple(o) for o in g(0, get=("ntk",))] == [(0,), (-1,)]
        assert list(g(0, get="nngp")) == [0, 1]
    assert type(ours.get_namedtuple("K")(fn)(1)) is type(ours.get_namedtuple("K")(fn)(5))
    with pytest.raises(ValueError, match="get"):
        ours.get_namedtuple("K")(lambda x: x)
    with pytest.raises(ValueError, match="get"):
        ours.get_namedtuple("K")(lambda x, get: x)(1)


def test_x1_is_x2():
    a = jnp.arange(4.0)
    for x2 in (None, a, a + 1e-14, a + 1.0, jnp.arange(3.0)):
        assert bool(ours.x1_is_x2(a, x2)) == bool(nt.x1_is_x2(a, x2))
    assert bool(ours.x1_is_x2([a, a], [a, a + 1])) is False
    assert bool(ours.x1_is_x2((a, a), (a, a))) is True
    with pytest.raises(TypeError, match="x1"):
        ours.x1_is_x2(1.0, None)


def test_split_kwargs():
    key = jax.random.PRNGKey(0)
    x1 = jnp.ones((2, 3))
    kwargs = {"pattern": (1, 2), "other": 3, "rng": key}
    a1, a2 = ours.split_kwargs(kwargs, x1, x1 + 1)
    b1, b2 = nt.split_kwargs(kwargs, x1, x1 + 1)
    assert (a1["pattern"], a2["pattern"], a1["other"], a2["other"]) == (1, 2, 3, 3)
    for a, b in ((a1, b1), (a2, b2)):
        np.testing.assert_array_equal(a["rng"], b["rng"])
    assert not np.array_equal(a1["rng"], a2["rng"])  # different inputs: different keys
    same1, same2 = ours.split_kwargs(kwargs, x1, x1)
    np.testing.assert_array_equal(same1["rng"], same2["rng"])  # same inputs: same key
    k1, k2 = ours.split_kwargs({"rng": key}, x1, None)
    assert k1["rng"] is k2["rng"] is key
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pair = ours.split_kwargs({"rng": (key, key)}, x1, x1 + 1)
        pair_nt = nt.split_kwargs({"rng": (key, key)}, x1, x1 + 1)
    for a, b in zip(pair, pair_nt, strict=True):
        np.testing.assert_array_equal(a["rng"], b["rng"])
    with pytest.raises(TypeError, match="rng"):
        ours.split_kwargs({"rng": "not a key"}, x1, x1 + 1)

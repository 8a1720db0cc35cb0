"""``ntfast.Kernel`` against NT 0.6.5's ``Kernel``: the same random arrays go into both, every method
runs on both, arrays and static fields must agree (exactly for layout ops, to 1e-12 for einsums).
"""

import dataclasses
import operator

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from nt_oracle import load_nt_stax

from ntfast import _utils
from ntfast.kernel import Kernel, dot_general_plan

load_nt_stax()
from neural_tangents._src.utils.kernel import Kernel as NTKernel

FIELDS = [f.name for f in dataclasses.fields(NTKernel)]
STATIC = [f.name for f in dataclasses.fields(NTKernel) if not f.metadata.get("pytree_node", True)]
SIZES = {"N": None, "H": 4, "W": 5, "C": 3}
N1, N2 = 2, 3


@dataclasses.dataclass(frozen=True)
class Layout:
    spec: str  # activation axes, e.g. "NHWC"
    diagonal_batch: bool
    diagonal_spatial: bool
    is_reversed: bool

    def __str__(self):
        flags = "".join(
            c
            for c, on in zip("bsr", (self.diagonal_batch, self.diagonal_spatial, self.is_reversed))
            if on
        )
        return f"{self.spec}-{flags or '_'}"

    @property
    def spatial(self):
        return [c for c in self.spec if c not in "NC"]

    def shape(self, n):
        return tuple(n if c == "N" else SIZES[c] for c in self.spec)


def _layout(name):
    """``"NHWC-bsr"``: spec, then flags b (diagonal_batch), s (diagonal_spatial), r (is_reversed)."""
    spec, flags = name.split("-")
    return Layout(spec, "b" in flags, "s" in flags, "r" in flags)


# Every eager op compiles once per shape on CPU (~0.1-0.3 s for an einsum), so instead of the full
# product (4 specs x 8 flag sets) the layouts cover every flag combination on NHWC and each flag value
# with the other axis placements (channel-first, batch-in-the-middle, one spatial axis).
# `is_reversed` is only meaningful with a full spatial layout (NT's layers never combine it with
# `diagonal_spatial`); that combination is checked on its own below.
LAYOUTS = [
    _layout(name)
    for name in (
        "NHWC-_",
        "NHWC-b",
        "NHWC-s",
        "NHWC-bs",
        "NHWC-r",
        "NHWC-br",
        "NCHW-b",
        "NCHW-r",
        "NWC-s",
        "NWC-br",
        "HNWC-bs",
        "HNWC-r",
    )
]
# dot_general compiles three einsums per call and implementation: a smaller covering set.
DOT_LAYOUTS = [_layout(name) for name in ("NHWC-b", "NHWC-s", "NCHW-r", "NWC-br", "HNWC-bs")]


def _cov_shape(layout, n_batch_axes):
    spatial = [SIZES[c] for c in layout.spatial]
    if layout.is_reversed and not layout.diagonal_spatial:
        spatial = spatial[::-1]
    if not layout.diagonal_spatial:
        spatial = list(_utils.double_tuple(spatial))
    return tuple(n_batch_axes) + tuple(spatial)


def make_pair(layout, seed=0, ntk="array", x2=True, masks=False, numpy=False):
    """The same random kernel as (ntfast Kernel, NT Kernel).

    ``x2=False`` is the ``kernel_fn(x1, None)`` state: ``N2 == N1``, no ``cov2``/``mask2``.
    ``ntk`` is "array", "scalar" (a 0-d constant) or None. ``numpy=True`` stores numpy arrays:
    for pure-indexing methods this skips one XLA compilation per eager op and shape.
    """
    rng = np.random.default_rng(seed)
    n2 = N2 if x2 else N1
    cov_batch = (lambda n: (n,)) if layout.diagonal_batch else (lambda n: (n, n))
    arrays = {
        "nngp": rng.normal(size=_cov_shape(layout, (N1, n2))),
        "ntk": {
            "array": rng.normal(size=_cov_shape(layout, (N1, n2))),
            "scalar": np.array(0.5),
            None: None,
        }[ntk],
        "cov1": rng.normal(size=_cov_shape(layout, cov_batch(N1))),
        "cov2": rng.normal(size=_cov_shape(layout, cov_batch(N2))) if x2 else None,
        "x1_is_x2": np.array(not x2),
    }
    if masks:
        c = layout.spec.index("C")
        m1 = [s if i != c else 1 for i, s in enumerate(layout.shape(N1))]
        m2 = [s if i != c else 1 for i, s in enumerate(layout.shape(N2))]
        arrays["mask1"] = rng.random(m1) < 0.3
        arrays["mask2"] = rng.random(m2) < 0.3 if x2 else None
    to_array = np.asarray if numpy else jnp.asarray
    arrays = {k: None if v is None else to_array(v) for k, v in arrays.items()}
    static = {
        "is_gaussian": True,
        "is_reversed": layout.is_reversed,
        "is_input": False,
        "diagonal_batch": layout.diagonal_batch,
        "diagonal_spatial": layout.diagonal_spatial,
        "shape1": layout.shape(N1),
        "shape2": layout.shape(n2),
        "batch_axis": layout.spec.index("N"),
        "channel_axis": layout.spec.index("C"),
    }
    return Kernel(**arrays, **static), NTKernel(**arrays, **static)


def assert_same(ours, theirs, rtol=0.0):
    assert type(ours) is Kernel
    for name in FIELDS:
        a, b = getattr(ours, name), getattr(theirs, name)
        if name in STATIC:
            assert a == b, (name, a, b)
            assert type(a) is type(b) or name in ("batch_axis", "channel_axis"), (name, a, b)
        elif b is None:
            assert a is None, name
        else:
            a, b = np.asarray(a), np.asarray(b)
            assert a.shape == b.shape, (name, a.shape, b.shape)
            assert a.dtype == b.dtype, (name, a.dtype, b.dtype)
            if rtol and a.dtype != bool:
                scale = max(np.abs(b).max(), 1e-300)
                assert np.abs(a - b).max() <= rtol * scale, name
            else:
                np.testing.assert_array_equal(a, b, err_msg=name)


# What NT raises on invalid layouts / dimension numbers (the exact type is not mirrored).
_ERRORS = (ValueError, TypeError, IndexError, NotImplementedError, AttributeError)


def assert_same_outcome(ours_fn, theirs_fn, rtol=0.0):
    """Both succeed with the same kernel, or both raise (any exception)."""
    try:
        theirs = theirs_fn()
    except _ERRORS:
        with pytest.raises(_ERRORS):
            ours_fn()
        return None
    assert_same(ours_fn(), theirs, rtol)
    return theirs


# ----------------------------------------------------------------------------------------------
# Dataclass and pytree structure.


def test_fields_order_defaults_and_static_match_nt():
    ours = dataclasses.fields(Kernel)
    theirs = dataclasses.fields(NTKernel)
    assert [f.name for f in ours] == [f.name for f in theirs]
    assert [f.default for f in ours] == [f.default for f in theirs]
    assert [f.name for f in ours if f.metadata.get("static", False)] == STATIC


def test_pytree_leaves_and_roundtrip():
    ours, theirs = make_pair(LAYOUTS[0], masks=True)
    leaves, treedef = jax.tree_util.tree_flatten(ours)
    nt_leaves = jax.tree_util.tree_leaves(theirs)
    assert len(leaves) == len(nt_leaves) == 7
    for a, b in zip(leaves, nt_leaves):
        np.testing.assert_array_equal(a, b)
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert_same(back, theirs)
    # Static fields are in the treedef: changing one changes the structure.
    assert jax.tree_util.tree_structure(ours.replace(is_gaussian=False)) != treedef
    # None fields are empty subtrees, as in NT.
    k, _ = make_pair(LAYOUTS[0], ntk=None, x2=False)
    assert len(jax.tree_util.tree_leaves(k)) == 3


def test_tree_map_keeps_static_fields():
    ours, theirs = make_pair(LAYOUTS[3])
    doubled = jax.tree_util.tree_map(lambda x: 2 * x, ours)
    assert_same(doubled, jax.tree_util.tree_map(lambda x: 2 * x, theirs))


def test_jit_takes_and_returns_kernel():
    ours, theirs = make_pair(LAYOUTS[5])
    traces = []

    @jax.jit
    def f(k):
        traces.append(None)
        # Static fields are Python values under jit.
        scale = 3.0 if k.diagonal_spatial else 2.0
        return (k * scale).replace(nngp=k.nngp + 1.0, is_input=True)

    out = f(ours)
    scale = 3.0 if theirs.diagonal_spatial else 2.0
    expected = (theirs * scale).replace(nngp=theirs.nngp + 1.0, is_input=True)
    assert_same(out, expected, rtol=1e-15)
    f(ours.replace(nngp=ours.nngp * 0.5))
    assert len(traces) == 1  # same static fields: no retrace
    f(ours.replace(is_gaussian=False))
    assert len(traces) == 2


def test_vmap_and_grad_through_kernel():
    ours, _ = make_pair(LAYOUTS[0])
    g = jax.grad(lambda k: jnp.sum((k * 2.0).nngp), allow_int=True)(ours)
    assert isinstance(g, Kernel)
    np.testing.assert_allclose(g.nngp, 4.0 * np.ones(ours.nngp.shape))
    stacked = jax.tree_util.tree_map(lambda x: jnp.stack([x, 2 * x]), ours)
    out = jax.vmap(lambda k: k.nngp.sum())(stacked)
    np.testing.assert_allclose(out, [ours.nngp.sum(), 2 * ours.nngp.sum()])


def test_replace_asdict_astuple_are_shallow():
    ours, theirs = make_pair(LAYOUTS[0])
    d = ours.asdict()
    assert list(d) == FIELDS
    assert all(d[name] is getattr(ours, name) for name in FIELDS)
    assert list(d) == list(theirs.asdict())
    t = ours.astuple()
    assert len(t) == len(FIELDS)
    assert all(a is b for a, b in zip(t, d.values()))
    new = ours.replace(is_gaussian=False, nngp=ours.nngp + 1)
    assert new is not ours and ours.is_gaussian and not new.is_gaussian
    assert new.cov1 is ours.cov1
    with pytest.raises(TypeError):
        ours.replace(not_a_field=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ours.nngp = None


# ----------------------------------------------------------------------------------------------
# Layout operations, per layout.


# `Kernel.slice` assumes batch axis 0 (it rewrites `shape[0]`), as NT does.
@pytest.mark.parametrize("layout", [la for la in LAYOUTS if la.spec[0] == "N"], ids=str)
def test_slice(layout):
    for kw in ({"masks": True}, {"x2": False, "ntk": None}, {"ntk": "scalar"}):
        ours, theirs = make_pair(layout, numpy=True, **kw)
        for s1, s2 in [(slice(0, 1), slice(1, 3)), (slice(None), slice(None, None, 2))]:
            assert_same(ours.slice(s1, s2), theirs.slice(s1, s2))


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_reverse_and_double_reverse(layout):
    ours, theirs = make_pair(layout, masks=True)
    if layout.diagonal_spatial and len(layout.spatial) % 2:
        # Pairwise reversal does not exist for an odd number of diagonal axes.
        with pytest.raises(ValueError):
            theirs.reverse()
        with pytest.raises(ValueError):
            ours.reverse()
        return
    assert_same(ours.reverse(), theirs.reverse())
    assert_same(ours.reverse().reverse(), theirs)


def test_reversed_diagonal_spatial_follows_nt():
    # NT's layers never produce this state; NT's pairwise reversal treats the two diagonal
    # spatial axes (H, W) as one pair, so `reverse()` leaves arrays as they are. Same here.
    ours, theirs = make_pair(_layout("NHWC-sr"), masks=True)
    assert_same(ours.reverse(), theirs.reverse())
    o = jnp.ones((5, 2))
    dn = (((2,), (0,)), ((), ()))
    assert_same(ours.dot_general(o, o, False, dn), theirs.dot_general(o, o, False, dn), 1e-12)


def test_reverse_rejects_diagonal_odd_spatial_like_nt():
    ours, theirs = make_pair(Layout("NWC", True, True, True))
    with pytest.raises(ValueError):
        theirs.reverse()
    with pytest.raises(ValueError):
        ours.reverse()


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_transpose(layout):
    ours, theirs = make_pair(layout, x2=layout.diagonal_batch)
    n = len(layout.spatial)
    for axes in [None, tuple(range(n)), tuple(range(n))[::-1]]:
        assert_same(ours.transpose(axes), theirs.transpose(axes))
    # A constant (0-d) ntk stays as it is (NT raises on it).
    constant, constant_nt = make_pair(layout, ntk="scalar")
    axes = tuple(range(n))[::-1]
    out = constant.transpose(axes)
    assert out.ntk is constant.ntk
    assert_same(out.replace(ntk=None), constant_nt.replace(ntk=None).transpose(axes))


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_mask_and_mask_prods(layout):
    ours, theirs = make_pair(layout, masks=True)
    m1, m2 = ours.mask1, ours.mask2
    single, single_nt = make_pair(layout, masks=True, x2=False)  # mask2 None means x2 = x1
    for k, k_nt, a, b in [
        (ours, theirs, m1, m2),
        (ours, theirs, None, None),
        (single, single_nt, single.mask1, None),
    ]:
        assert_same(k.mask(a, b), k_nt.mask(a, b))
        for x, y in zip(k._get_mask_prods(a, b), k_nt._get_mask_prods(a, b), strict=True):
            if y is None:
                assert x is None
            else:
                np.testing.assert_array_equal(x, y)
    # Masking zeroes entries, it never changes shapes or unmasked values.
    masked = ours.mask(m1, m2)
    kept = masked.nngp != 0
    np.testing.assert_array_equal(masked.nngp[kept], ours.nngp[kept])


def test_mask_without_mask1_means_x1_fully_visible():
    # NT raises AttributeError here; ntfast reads a None mask1 as "nothing masked in x1".
    layout = Layout("NHWC", False, False, False)
    ours, _ = make_pair(layout, masks=True)
    visible = jnp.zeros_like(ours.mask1)
    expected = ours.mask(visible, ours.mask2)
    got = ours.mask(None, ours.mask2)
    np.testing.assert_array_equal(got.nngp, expected.nngp)
    np.testing.assert_array_equal(got.cov2, expected.cov2)
    np.testing.assert_array_equal(got.cov1, ours.cov1)


def test_mask_rejects_channelwise_masks():
    ours, theirs = make_pair(Layout("NHWC", True, False, False))
    bad = jnp.zeros(ours.shape1, bool)  # channel size 3, not 1
    with pytest.raises(NotImplementedError):
        theirs.mask(bad, None)
    with pytest.raises(NotImplementedError, match="channel"):
        ours.mask(bad, None)


# ----------------------------------------------------------------------------------------------
# Arithmetic.


@pytest.mark.parametrize("layout", LAYOUTS[:4], ids=str)
@pytest.mark.parametrize("ntk", ["array", None])
def test_arithmetic(layout, ntk):
    ours, theirs = make_pair(layout, ntk=ntk, x2=ntk is not None)
    for op in [
        lambda k: k * 1.5,
        lambda k: 1.5 * k,
        lambda k: k + 0.5,
        lambda k: k - 0.5,
        lambda k: k / 4.0,
        lambda k: -k,
        lambda k: +k,
    ]:
        assert_same(op(ours), op(theirs))
    np.testing.assert_allclose((ours - 2.0).nngp, ours.nngp + 4.0)  # a bias adds its variance
    assert (-ours) is ours


# ----------------------------------------------------------------------------------------------
# Indexing.


def _indices(layout):
    """Index expressions valid for ``layout`` (none touches the channel axis or ints the batch)."""

    def by_letter(**kw):
        return tuple(kw.get(c, slice(None)) for c in layout.spec)

    first, last = layout.spatial[0], layout.spatial[-1]
    out = [
        Ellipsis,
        slice(None),
        (Ellipsis,),
        by_letter(N=slice(1, None)),
        by_letter(**{first: 1}),
        by_letter(**{last: -2}),
        by_letter(N=slice(0, 2), **{last: slice(1, None, 2)}),
        by_letter(**{first: slice(None, None, -1)}),
        by_letter(**{c: 0 for c in layout.spatial}),
        by_letter(N=slice(1, 2))[: layout.spec.index("N") + 1],  # a short tuple
    ]
    if layout.spec[0] != "C":
        out.append(slice(0, 2))  # a bare slice on axis 0
    if layout.spec[-1] == "C":
        out.append((Ellipsis, slice(None)))
        out.append((slice(None), Ellipsis, slice(None)))
    return out


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_getitem(layout):
    for kw in ({"masks": True}, {"ntk": "scalar", "x2": False}):
        ours, theirs = make_pair(layout, numpy=True, **kw)
        for idx in _indices(layout):
            assert_same(ours[idx], theirs[idx])


def test_getitem_errors():
    layout = Layout("NHWC", True, False, False)
    ours, theirs = make_pair(layout)
    for idx in [(slice(None),) * 3 + (0,), (Ellipsis, slice(0, 1))]:  # channel axis
        with pytest.raises(NotImplementedError):
            theirs[idx]
        with pytest.raises(NotImplementedError, match="channel"):
            ours[idx]
    for idx in [0, (1, slice(None))]:  # integer on the batch axis
        with pytest.raises(NotImplementedError):
            theirs[idx]
        with pytest.raises(NotImplementedError, match="batch"):
            ours[idx]


# ----------------------------------------------------------------------------------------------
# dot_general.


def _dot_case(name, layout, rng):
    """``(other1, other2, is_lhs, dimension_numbers)`` of case ``name`` for ``layout``."""
    spec = layout.spec
    n = spec.index("N")
    first, last = layout.spatial[0], layout.spatial[-1]
    i_f, i_l = spec.index(first), spec.index(last)
    s_f, s_l = SIZES[first], SIZES[last]

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape))

    def same(o):
        return o, o

    no_batch = ((), ())
    if name == "rhs_contract_last":
        return (*same(normal(s_l, 6)), False, (((i_l,), (0,)), no_batch))
    if name == "rhs_contract_negative_axes":
        return (*same(normal(s_l, 6)), False, (((i_l - len(spec),), (-2,)), no_batch))
    if name == "lhs_contract_first":
        return (*same(normal(6, s_f)), True, (((1,), (i_f,)), no_batch))
    if name == "distinct_factors":
        return normal(s_l, 6), normal(s_l, 6), False, (((i_l,), (0,)), no_batch)
    if name == "outer_product":
        return normal(2), normal(2), False, (no_batch, no_batch)
    if name == "lhs_outer_product":
        return normal(2), normal(2), True, (no_batch, no_batch)
    if name == "batch_over_samples":
        return normal(N1, s_l, 2), normal(N2, s_l, 2), False, (((i_l,), (1,)), ((n,), (0,)))
    if name == "lhs_batch_over_samples":
        return normal(N1, 2, s_l), normal(N2, 2, s_l), True, (((2,), (i_l,)), ((0,), (n,)))
    if name == "rhs_contract_two":
        return (*same(normal(s_f, s_l, 3)), False, (((i_f, i_l), (0, 1)), no_batch))
    if name == "lhs_batch_spatial":
        return (*same(normal(s_f, 2, s_l)), True, (((2,), (i_l,)), ((0,), (i_f,))))
    if name == "rhs_batch_spatial_and_samples":
        return normal(s_l, N1, 2), normal(s_l, N2, 2), False, (no_batch, ((i_l, n), (0, 1)))
    raise ValueError(name)


DOT_CASES = [
    "rhs_contract_last",
    "rhs_contract_negative_axes",
    "lhs_contract_first",
    "distinct_factors",
    "outer_product",
    "lhs_outer_product",
    "batch_over_samples",
    "lhs_batch_over_samples",
    "rhs_contract_two",
    "lhs_batch_spatial",
    "rhs_batch_spatial_and_samples",
]
_TWO_SPATIAL = {"rhs_contract_two", "lhs_batch_spatial", "rhs_batch_spatial_and_samples"}
# Each case on two layouts, rotating, so that every layout meets lhs/rhs, batch and contraction.
DOT_PARAMS = [
    pytest.param(layout, case, id=f"{case}-{layout}")
    for i, case in enumerate(DOT_CASES)
    for layout in (DOT_LAYOUTS[i % 5], DOT_LAYOUTS[(i + 2) % 5])
    if case not in _TWO_SPATIAL or len(layout.spatial) == 2
]


@pytest.mark.parametrize(("layout", "case"), DOT_PARAMS)
def test_dot_general(layout, case):
    rng = np.random.default_rng(DOT_CASES.index(case))
    o1, o2, is_lhs, dn = _dot_case(case, layout, rng)
    ours, theirs = make_pair(layout)
    assert_same(
        ours.dot_general(o1, o2, is_lhs, dn), theirs.dot_general(o1, o2, is_lhs, dn), rtol=1e-12
    )


@pytest.mark.parametrize("case", ["rhs_contract_last", "lhs_batch_over_samples"])
def test_dot_general_without_x2(case):
    # kernel_fn(x1, None): no cov2, one factor for both sides, a constant ntk.
    layout = _layout("NHWC-b")
    o1, _, is_lhs, dn = _dot_case(case, layout, np.random.default_rng(0))
    ours, theirs = make_pair(layout, ntk="scalar", x2=False)
    assert_same(
        ours.dot_general(o1, o1, is_lhs, dn), theirs.dot_general(o1, o1, is_lhs, dn), rtol=1e-12
    )


def test_dot_general_matches_lax_dot_general_on_inputs():
    """End to end: the input kernel of x transformed = the input kernel of dot_general(x, O)."""
    rng = np.random.default_rng(2)
    x1 = rng.normal(size=(2, 4, 5, 7))  # NHWC, C = 7
    x2 = rng.normal(size=(3, 4, 5, 7))
    o = rng.normal(size=(5, 6))
    dn = (((2,), (0,)), ((), ()))

    def input_kernel(a, b):
        # Full-spatial input covariance (N1, N2, H, H, W, W) = Σ_c a[n,h,w,c] b[m,h',w',c] / C.
        return jnp.einsum("nhwc,mHWc->nmhHwW", a, b) / a.shape[-1]

    k = Kernel(
        nngp=input_kernel(x1, x2),
        ntk=None,
        cov1=input_kernel(x1, x1),
        cov2=input_kernel(x2, x2),
        x1_is_x2=False,
        is_gaussian=True,
        is_reversed=False,
        is_input=True,
        diagonal_batch=False,
        diagonal_spatial=False,
        shape1=x1.shape,
        shape2=x2.shape,
        batch_axis=0,
        channel_axis=3,
    )
    out = k.dot_general(o, o, False, dn)
    y1, y2 = (jax.lax.dot_general(x, o, dn) for x in (x1, x2))  # (N, H, C, W')
    y1, y2 = (jnp.moveaxis(y, 2, 3) for y in (y1, y2))  # back to NHWC
    np.testing.assert_allclose(out.nngp, input_kernel(y1, y2), rtol=1e-12)
    np.testing.assert_allclose(out.cov1, input_kernel(y1, y1), rtol=1e-12)
    assert (out.batch_axis, out.channel_axis) == (0, 2)


def test_dot_general_errors():
    layout = Layout("NHWC", True, False, False)
    ours, theirs = make_pair(layout)
    o = jnp.ones((3, 6))
    dn = (((3,), (0,)), ((), ()))  # contracts the channel axis
    with pytest.raises(ValueError):
        theirs.dot_general(o, o, False, dn)
    with pytest.raises(ValueError, match="channel_axis"):
        ours.dot_general(o, o, False, dn)
    ok = (((2,), (0,)), ((), ()))
    with pytest.raises(NotImplementedError):
        theirs.dot_general(jnp.ones((5, 6)), jnp.ones((5, 6, 1)), False, ok)
    with pytest.raises(NotImplementedError, match="dimensionality"):
        ours.dot_general(jnp.ones((5, 6)), jnp.ones((5, 6, 1)), False, ok)
    assert ours.dot_general(None, None, False, ok) is ours


def test_dot_general_plan_is_static():
    ours, _ = make_pair(LAYOUTS[1])
    plan = dot_general_plan(ours, 2, False, (((2,), (0,)), ((), ())))
    # Specs are strings: a backend may run them with any einsum engine.
    assert all(isinstance(t, str) for t in plan.nngp.inputs + (plan.nngp.output,))
    assert (plan.batch_axis, plan.channel_axis) == (0, 2)


def test_mask_prod_uses_or():
    # The zipped outer product of masks is a logical or: one masked side masks the pair.
    m = jnp.array([[True, False]])
    out = _utils.outer_prod(m, m, 1, 2, operator.or_)
    np.testing.assert_array_equal(out, [[[True, True], [True, False]]])

"""Bad networks and bad inputs raise clear errors, like NT 0.6.5 where NT raises.

Each case builds a network from a ``stax`` module and calls its ``kernel_fn`` (construction and
call are both inside ``pytest.raises``: where a check happens is an implementation detail). The
table records NT's behaviour too, and ``test_nt_behaviour`` checks that record against the oracle:

- NT raises a clear error -> ntfast raises the same exception type, with a message naming the
  problem (regex ``match``).
- NT raises something cryptic (an XLA / dot_general / IndexError message) or nothing at all (it
  silently computes garbage or casts) -> ntfast raises a ``ValueError`` / ``TypeError`` whose
  message names the argument and what was expected.
"""

import warnings

import numpy as np
import pytest

X_IMG = np.random.RandomState(0).standard_normal((2, 5, 6, 3))
X_VEC = np.random.RandomState(1).standard_normal((2, 3))

CLEAR = (ValueError, TypeError)


def _call(net, x1, x2=None, get=None, **kwargs):
    def run(stax):
        _, _, kernel_fn = net(stax)
        out = kernel_fn(x1, x2, get, **kwargs)
        # Force evaluation so that deferred (async) errors surface inside pytest.raises.
        import jax

        jax.block_until_ready(jax.tree_util.tree_leaves(out))
        return out

    return run


def _construct(make):
    def run(stax):
        return make(stax)

    return run


# (id, run(stax), exceptions ntfast may raise, message regex, NT's behaviour)
# NT's behaviour: an exception type (NT raises it with a clear message), "cryptic" (NT raises an
# unrelated low-level error), or "silent" (NT returns a value).
CASES = [
    (
        "nonlin_without_affine",
        _call(lambda s: s.Relu(), X_VEC),
        (ValueError,),
        r"(?i)gaussian|affine",
        ValueError,
    ),
    (
        "nonlin_without_affine_in_serial",
        _call(lambda s: s.serial(s.Erf(), s.Dense(1)), X_IMG),
        (ValueError,),
        r"(?i)gaussian|affine",
        ValueError,
    ),
    (
        "nonlin_after_nonlin",
        _call(lambda s: s.serial(s.Dense(1), s.Relu(), s.Gelu()), X_VEC),
        (ValueError,),
        r"(?i)gaussian|affine",
        ValueError,
    ),
    (
        "gap_with_diagonal_spatial_request",
        _call(
            lambda s: s.serial(s.Conv(2, (2, 2)), s.Relu(), s.GlobalAvgPool()),
            X_IMG,
            diagonal_spatial=True,
        ),
        (ValueError,),
        r"diagonal_spatial",
        ValueError,
    ),
    (
        "x1_x2_channel_mismatch",
        _call(lambda s: s.Dense(1), X_IMG, X_IMG[..., :2]),
        CLEAR,
        r"(?i)(x1|x2).*shape|shape.*(x1|x2)",
        "cryptic",
    ),
    (
        "x1_x2_spatial_mismatch",
        _call(lambda s: s.serial(s.Conv(1, (2, 2)), s.Relu()), X_IMG, X_IMG[:, :4]),
        CLEAR,
        r"(?i)(x1|x2).*shape|shape.*(x1|x2)",
        "silent",
    ),
    (
        "x1_x2_ndim_mismatch",
        _call(lambda s: s.Dense(1), X_IMG, X_VEC),
        CLEAR,
        r"(?i)(x1|x2).*(shape|dim)|(shape|dim).*(x1|x2)",
        "cryptic",
    ),
    (
        "x1_x2_tree_mismatch",
        _call(lambda s: s.parallel(s.Dense(1), s.Dense(1)), [X_VEC, X_VEC], X_VEC),
        CLEAR,
        r"(?i)x2|tree|structure",
        ValueError,
    ),
    (
        "integer_inputs",
        _call(lambda s: s.Dense(1), np.ones((2, 3), np.int32), get="nngp"),
        CLEAR,
        r"(?i)float|dtype",
        "silent",
    ),
    (
        "bool_inputs",
        _call(lambda s: s.Dense(1), np.ones((2, 3), bool), get="nngp"),
        CLEAR,
        r"(?i)float|dtype",
        "silent",
    ),
    (
        "complex_inputs",
        _call(lambda s: s.Dense(1), np.ones((2, 3), np.complex128), get="nngp"),
        CLEAR,
        r"(?i)float|dtype|complex",
        "silent",
    ),
    (
        "list_inputs",
        _call(lambda s: s.Dense(1), [[1.0, 2.0], [3.0, 4.0]], get="nngp"),
        (TypeError,),
        r"(?i)x1|array|type",
        TypeError,
    ),
    (
        "1d_inputs",
        _call(lambda s: s.Dense(1), np.ones(3), get="nngp"),
        (ValueError,),
        r"(?i)2D|at least|dim",
        ValueError,
    ),
    (
        "unknown_get",
        _call(lambda s: s.Dense(1), X_VEC, get="nngq"),
        (KeyError, ValueError),
        r"nngq",
        KeyError,
    ),
    (
        "conv_bad_padding",
        _construct(lambda s: s.Conv(1, (2, 2), padding="FULL")),
        (ValueError,),
        r"FULL",
        ValueError,
    ),
    (
        "pool_bad_padding",
        _construct(lambda s: s.AvgPool((2, 2), padding="same")),
        (ValueError,),
        r"same",
        ValueError,
    ),
    (
        "dense_bad_parameterization",
        _construct(lambda s: s.Dense(1, parameterization="mup")),
        (ValueError,),
        r"mup",
        ValueError,
    ),
    (
        "conv_bad_parameterization",
        _call(lambda s: s.Conv(1, (2, 2), parameterization="mup"), X_IMG),
        (ValueError,),
        r"mup",
        ValueError,
    ),
    (
        "dropout_rate_zero",
        _construct(lambda s: s.Dropout(0.0)),
        (ValueError,),
        r"rate",
        ValueError,
    ),
    (
        "dropout_bad_mode",
        _construct(lambda s: s.Dropout(0.5, mode="eval")),
        (ValueError,),
        r"mode",
        ValueError,
    ),
    (
        "dropout_on_inputs",
        _call(lambda s: s.Dropout(0.5), X_VEC),
        (ValueError,),
        r"(?i)dropout|input",
        "cryptic",
    ),
    (
        "monomial_degree_6",
        _construct(lambda s: s.Monomial(6)),
        (NotImplementedError, ValueError),
        r"degree",
        NotImplementedError,
    ),
    (
        "hermite_negative_degree",
        _construct(lambda s: s.Hermite(-1)),
        (NotImplementedError, ValueError),
        r"degree",
        NotImplementedError,
    ),
    (
        "rectified_monomial_negative_degree",
        _construct(lambda s: s.RectifiedMonomial(-1)),
        (NotImplementedError, ValueError),
        r"degree",
        NotImplementedError,
    ),
    (
        "elementwise_without_functions",
        _construct(lambda s: s.Elementwise()),
        (ValueError,),
        r"fn",
        ValueError,
    ),
    (
        "dotgeneral_lhs_and_rhs",
        _construct(lambda s: s.DotGeneral(lhs=1.0, rhs=1.0)),
        (ValueError,),
        r"lhs|rhs",
        ValueError,
    ),
    (
        "layernorm_without_channel_axis",
        _call(lambda s: s.serial(s.Conv(1, (2, 2)), s.LayerNorm(axis=1)), X_IMG),
        (ValueError,),
        r"(?i)channel",
        ValueError,
    ),
    (
        "layernorm_non_gaussian",
        _call(lambda s: s.serial(s.Conv(1, (2, 2)), s.Relu(), s.LayerNorm()), X_IMG),
        (NotImplementedError, ValueError),
        r"(?i)gaussian",
        NotImplementedError,
    ),
    (
        "fanin_sum_shape_mismatch",
        _call(
            lambda s: s.serial(
                s.FanOut(2), s.parallel(s.Dense(1), s.Conv(1, (2, 2))), s.FanInSum()
            ),
            X_IMG,
        ),
        (ValueError,),
        r"(?i)shape",
        ValueError,
    ),
    (
        "fanin_sum_non_gaussian",
        _call(
            lambda s: s.serial(
                s.Dense(1), s.FanOut(2), s.parallel(s.Relu(), s.Identity()), s.FanInSum()
            ),
            X_VEC,
        ),
        (NotImplementedError, ValueError),
        r"(?i)gaussian",
        NotImplementedError,
    ),
    (
        "index_channel_axis",
        _call(lambda s: s.serial(s.Dense(2), s.Index(s.Slice[..., 0:1])), X_IMG),
        (NotImplementedError, ValueError),
        r"(?i)channel",
        NotImplementedError,
    ),
    (
        "index_batch_with_integer",
        _call(lambda s: s.serial(s.Dense(2), s.Index(s.Slice[0])), X_IMG),
        (NotImplementedError, ValueError),
        r"(?i)batch",
        NotImplementedError,
    ),
    (
        "conv_channel_axis_mismatch",
        _call(
            lambda s: s.serial(
                s.Conv(1, (2, 2)),
                s.Relu(),
                s.Conv(1, (2, 2), dimension_numbers=("NCHW", "OIHW", "NCHW")),
            ),
            X_IMG,
        ),
        (ValueError,),
        r"channel_axis",
        ValueError,
    ),
    (
        "conv_filter_larger_than_input_valid",
        _call(lambda s: s.Conv(1, (7, 7)), X_IMG),
        CLEAR,
        r"(?i)filter|window|size|shape",
        "silent",
    ),
    (
        "avgpool_window_larger_than_input_valid",
        _call(lambda s: s.serial(s.Conv(1, (1, 1)), s.AvgPool((7, 7))), X_IMG),
        CLEAR,
        r"(?i)window|size|shape",
        "silent",
    ),
    (
        "conv_filter_rank_mismatch",
        _call(lambda s: s.Conv(1, (2,)), X_IMG),
        CLEAR,
        r"(?i)filter|spatial|dimension|rank",
        "cryptic",
    ),
    (
        "conv_zero_stride",
        _call(lambda s: s.Conv(1, (2, 2), strides=(0, 1)), X_IMG),
        CLEAR,
        r"(?i)stride",
        "cryptic",
    ),
    (
        "conv_after_flatten",
        _call(lambda s: s.serial(s.Flatten(), s.Conv(1, (2, 2))), X_IMG),
        CLEAR,
        r"(?i)spatial|dimension|rank|filter|ndim",
        "cryptic",
    ),
]

IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_ntfast_raises_clearly(case, nf_stax):
    _, run, errors, match, _ = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(errors, match=match):
            run(nf_stax)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_nt_behaviour(case, nt_stax):
    """Pins down what the oracle does, so the table above stays honest about NT."""
    _, run, _, _, nt = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if nt == "silent":
            run(nt_stax)
        elif nt == "cryptic":
            with pytest.raises((TypeError, ValueError, IndexError)):
                run(nt_stax)
        else:
            with pytest.raises(nt):
                run(nt_stax)


def test_gap_on_diagonal_kernel_is_refused(nf_stax):
    """A Kernel computed with diagonal_spatial=True has lost the off-diagonal (location-location)
    covariances that GlobalAvgPool sums; NT silently sums the diagonal only."""
    _, _, kernel_fn = nf_stax.serial(nf_stax.Dense(2), nf_stax.Relu())
    k = kernel_fn(X_IMG, None, diagonal_spatial=True)
    assert k.diagonal_spatial
    _, _, gap = nf_stax.GlobalAvgPool()
    with pytest.raises(ValueError, match="diagonal_spatial"):
        gap(k)


def test_flatten_on_diagonal_kernel_is_fine(nf_stax, nt_stax):
    """Counterpart of the case above: Flatten needs only the diagonal, so no error there."""
    outs = []
    for stax in (nf_stax, nt_stax):
        _, _, kernel_fn = stax.serial(stax.Dense(2), stax.Relu())
        k = kernel_fn(X_IMG, None, diagonal_spatial=True)
        outs.append(np.asarray(stax.Flatten()[2](k).nngp))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6)

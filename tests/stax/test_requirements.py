"""The requirement algebra (Diagonal / Bool) and the public kernel_fn plumbing."""

import itertools

import jax
import numpy as np
import pytest
from nt_oracle import load_nt_stax

import ntfast as nt
from ntfast.stax.requirements import Bool, Diagonal

_ALL = [Diagonal(i, o) for i, o in itertools.product(Bool, Bool)]


def _nt_req():
    load_nt_stax()
    from neural_tangents._src.stax import requirements

    return requirements


@pytest.mark.parametrize("a", _ALL, ids=str)
def test_diagonal_algebra_matches_nt(a):
    R = _nt_req()
    conv = lambda d: R.Diagonal(R.Bool(int(d.input)), R.Bool(int(d.output)))
    for b in _ALL:
        for ours, theirs in ((a >> b, conv(a) >> conv(b)), (a & b, conv(a) & conv(b))):
            assert (int(ours.input), int(ours.output)) == (int(theirs.input), int(theirs.output))
        assert bool(a) == bool(conv(a))
        assert (b << a) == (a >> b)


def test_diagonal_associative():
    for a, b, c in itertools.product(_ALL, repeat=3):
        assert (a >> b) >> c == a >> (b >> c)
        assert (a & b) & c == a & (b & c)
        assert a & b == b & a


def test_get_variants_and_kernel_input():
    stax = nt.stax
    _, _, kernel_fn = stax.serial(stax.Dense(3, W_std=1.5, b_std=0.3), stax.Erf(), stax.Dense(2))
    x1 = jax.random.normal(jax.random.PRNGKey(0), (3, 4))
    x2 = jax.random.normal(jax.random.PRNGKey(1), (2, 4))
    k = kernel_fn(x1, x2)
    assert isinstance(k, nt.Kernel)
    assert k.nngp.shape == (3, 2) and k.ntk.shape == (3, 2)
    np.testing.assert_array_equal(kernel_fn(x1, x2, "nngp"), k.nngp)
    both = kernel_fn(x1, x2, ("ntk", "cov1"))
    assert type(both).__name__ == "AnalyticKernel" and both._fields == ("ntk", "cov1")
    np.testing.assert_array_equal(both.cov1, k.cov1)
    # A Kernel as input: composing kernel_fns equals the whole network.
    _, _, f1 = stax.serial(stax.Dense(3, W_std=1.5, b_std=0.3), stax.Erf())
    _, _, f2 = stax.Dense(2)
    np.testing.assert_allclose(f2(f1(x1, x2)).ntk, k.ntk, rtol=1e-12)
    # No NTK computed when only the NNGP is asked for.
    assert kernel_fn(x1, x2, ("nngp",)).nngp.shape == (3, 2)


def test_bad_get_raises():
    _, _, kernel_fn = nt.stax.Dense(1)
    x = np.ones((2, 3))
    with pytest.raises((ValueError, TypeError), match="get"):
        kernel_fn(x, None, "ntkk")
    with pytest.raises((ValueError, TypeError), match="get"):
        kernel_fn(x, None, 3)


def test_forced_layout_that_network_cannot_use_raises():
    stax = nt.stax
    _, _, kernel_fn = stax.serial(stax.Conv(2, (2, 2)), stax.Relu(), stax.GlobalAvgPool())
    x = np.ones((2, 4, 4, 1))
    with pytest.raises(ValueError, match="diagonal_spatial"):
        kernel_fn(x, None, "nngp", diagonal_spatial=True)

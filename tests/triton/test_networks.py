"""Proof 4 (DESIGN.md §3): whole networks under ``backend="triton"`` — every hot op in the Triton
interpreter on this CPU — match Neural Tangents 0.6.5 (f64, 1e-6 relative, equal static fields)
and ntfast's own XLA backend (to rounding: 1e-9 relative). f32 accuracy is proven per op
(tests/triton/test_<op>.py).

Networks (tests/triton/conftest.py): FC with Relu/Erf, CNN with global average pooling, Myrtle-5
on 4×4 images, and an "elementwise zoo" reaching every nonlinearity kernel. Tiny shapes: the
interpreter costs milliseconds per program.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("triton", reason="needs triton: pip install 'triton>=3.7,<3.10'")

from archs import compare

NETWORKS = ("fc", "cnn_gap", "myrtle5", "elementwise_zoo")


def _inputs(networks, network, dtype, x2_none):
    _, s1, s2 = networks[network]
    k1, k2 = jax.random.split(jax.random.PRNGKey(7))
    x1 = jax.random.normal(k1, s1, dtype)
    return x1, (None if x2_none else jax.random.normal(k2, s2, dtype))


def _kernel(kernel_fn, x1, x2, **kw):
    if x2 is None:
        return jax.jit(lambda a: kernel_fn(a, None, **kw))(x1)
    return jax.jit(lambda a, b: kernel_fn(a, b, **kw))(x1, x2)


@pytest.mark.parametrize("x2_none", [False, True], ids=["x1x2", "x2None"])
@pytest.mark.parametrize("network", NETWORKS)
def test_triton_network_matches_nt_and_xla_f64(networks, nf_stax, nt_stax, network, x2_none):
    make = networks[network][0]
    x1, x2 = _inputs(networks, network, jnp.float64, x2_none)
    ours = _kernel(make(nf_stax)[2], x1, x2, backend="triton")
    theirs = _kernel(make(nt_stax)[2], x1, x2)
    problems = compare(ours, theirs, rtol=1e-6)
    assert not problems, problems
    xla = _kernel(make(nf_stax)[2], x1, x2, backend="xla")
    # Same math, other summation orders (tiles, FMA) through a dozen layers: rounding only.
    problems = compare(ours, xla, rtol=1e-9)
    assert not problems, problems
    assert np.all(np.isfinite(ours.ntk)) and np.abs(ours.ntk).max() > 0

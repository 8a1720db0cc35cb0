"""Shared helpers of the per-layer parity tests: the same network built from ntfast and from NT."""

import jax
import numpy as np
from archs import compare
from nt_oracle import load_nt_stax

import ntfast.stax as ours

LIBS = (ours, load_nt_stax())


def jit_kernel(kernel_fn, x1, x2=None, **kw):
    """``kernel_fn(x1, x2, **kw)`` under one ``jax.jit``: one compilation per network instead of
    one per eager op (both libraries), which keeps these tests fast."""
    if x2 is None:
        return jax.jit(lambda a: kernel_fn(a, None, **kw))(x1)
    return jax.jit(lambda a, b: kernel_fn(a, b, **kw))(x1, x2)


def assert_parity(make, x1, x2=None, *, jit=True, **kw):
    """ntfast's and NT's kernels of ``make(stax)`` agree (f64, 1e-6 rel, equal static fields)."""
    call = jit_kernel if jit else (lambda f, a, b, **k: f(a, b, **k))
    mine, theirs = (call(make(s)[2], x1, x2, **kw) for s in LIBS)
    problems = compare(mine, theirs, rtol=1e-6)
    assert not problems, problems
    return mine


def assert_same_init_apply(make, x, *, jit=True, **apply_kw):
    """Same key -> same output shape, parameters and outputs as NT's layer."""
    outs = []
    for s in LIBS:
        init_fn, apply_fn, _ = make(s)[:3]
        shape, params = init_fn(jax.random.PRNGKey(3), x.shape)
        f = lambda p, v, fn=apply_fn: fn(p, v, **apply_kw)
        y = (jax.jit(f) if jit else f)(params, x)
        outs.append((tuple(shape), params, y))
    (s1, p1, y1), (s2, p2, y2) = outs
    assert s1 == s2
    assert jax.tree.structure(p1) == jax.tree.structure(p2)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=1e-12)
    for a, b in zip(jax.tree.leaves(y1), jax.tree.leaves(y2)):
        assert np.shape(a) == np.shape(b)
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    return p1, y1

"""A nonlinearity followed by Dense runs as one ``nonlin_affine_<kind>`` op where fused.

``serial`` pairs a nonlinearity layer with the next ``Dense`` layer when the backend in force has
a fused kernel (Triton: ``ntfast_nonlin_<kind>_affine``); under XLA the layers stay separate.
Either way the Kernel must equal the unfused layers' and NT's (f64).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("triton", reason="needs Triton (the 'test' extra installs it on Linux)")

from ntfast._triton import runtime
from ntfast.ops import nonlin as N
from ntfast.stax import elementwise

ACTS = [("Relu", ()), ("Erf", ()), ("Gelu", ()), ("LeakyRelu", (0.2,)), ("Sin", ())]


def _net(stax, act, param):
    a = getattr(stax, act[0])
    return stax.serial(
        stax.Dense(5, W_std=1.5, b_std=0.1, parameterization=param),
        a(*act[1]),
        stax.Dense(4, W_std=1.2, b_std=0.3, parameterization=param),
        a(*act[1]),
        stax.Dense(1, W_std=0.9, b_std=None, parameterization=param),
    )


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("param", ["ntk", "standard"])
@pytest.mark.parametrize("act", ACTS, ids=[a[0] for a in ACTS])
def test_fused_pair_matches_unfused_and_nt(act, param, nf_stax, nt_stax):
    rng = np.random.default_rng(0)
    x1, x2 = jnp.asarray(rng.standard_normal((3, 6))), jnp.asarray(rng.standard_normal((2, 6)))
    kf = _net(nf_stax, act, param)[2]
    for xb in (None, x2):
        ref = kf(x1, xb, backend="xla")
        with runtime.record_launches() as launches:
            out = kf(x1, xb, backend="triton")
        names = {r["name"] for r in launches}
        assert any(n.endswith("_affine") for n in names), names
        nt = _net(nt_stax, act, param)[2](x1, xb)
        for field in ("nngp", "ntk", "cov1", "cov2"):
            a, b, c = getattr(out, field), getattr(ref, field), getattr(nt, field)
            if c is None:
                assert a is None and b is None
                continue
            assert _rel(a, b) <= 1e-10, field
            assert _rel(a, c) <= 1e-6, field
        zero = {"nngp": 0, "ntk": 0, "cov1": 0, "cov2": 0, "x1_is_x2": 0}
        assert out.replace(**zero) == ref.replace(**zero)


def test_xla_keeps_the_layers_separate(nf_stax, monkeypatch):
    calls = []
    real = elementwise.nonlin_affine
    monkeypatch.setattr(
        elementwise, "nonlin_affine", lambda *a, **k: calls.append(a[0]) or real(*a, **k)
    )
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 4)))
    kf = _net(nf_stax, ("Relu", ()), "ntk")[2]
    kf(x, None, backend="xla")
    assert not calls
    kf(x, None, backend="triton")
    assert calls == ["abrelu", "abrelu"]


@pytest.mark.parametrize(
    "kind, params", [("abrelu", {"a": 0.3, "b": 1.0}), ("erf", {}), ("rbf", {})]
)
@pytest.mark.parametrize("param", ["ntk", "standard"])
def test_op_reference_is_nonlin_then_dense(kind, params, param):
    rng = np.random.default_rng(2)
    q11 = jnp.asarray(rng.uniform(0.5, 2.0, (3, 1)))
    q22 = jnp.asarray(rng.uniform(0.5, 2.0, (1, 4)))
    q12 = jnp.sqrt(q11 * q22) * jnp.asarray(rng.uniform(-0.9, 0.9, (3, 4)))
    ntk = jnp.asarray(rng.uniform(0.0, 3.0, (3, 4)))
    kw = {"w_var": 1.7, "b_var": 0.2, "parameterization": param, "input_width": 5.0}
    e, ntk_dot = N.nonlin(kind, q12, q11, q22, ntk, backend="xla", **params)
    w, b, t_e, t_c = N.affine_terms(**kw)
    want = (w * e + b, t_e * e + t_c + w * ntk_dot)
    for backend in ("xla", "triton"):
        got = N.nonlin_affine(kind, q12, q11, q22, ntk, backend=backend, **kw, **params)
        assert _rel(got[0], want[0]) <= 1e-12 and _rel(got[1], want[1]) <= 1e-12, backend
    with pytest.raises(ValueError, match="input_width"):
        N.nonlin_affine(kind, q12, q11, q22, w_var=1.0, parameterization="standard", **params)

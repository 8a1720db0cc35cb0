"""serial / parallel / repeat / FanOut / FanIn*: parity with NT and NT-equal parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from nt_oracle import load_nt_stax

import ntfast as nt

_FIELDS = ("nngp", "ntk", "cov1", "cov2")
_STATIC = ("is_gaussian", "is_reversed", "is_input", "diagonal_batch", "diagonal_spatial",
           "shape1", "shape2", "batch_axis", "channel_axis")  # fmt: skip


def _assert_parity(a, b):
    for f in _FIELDS:
        va, vb = getattr(a, f), getattr(b, f)
        assert (va is None) == (vb is None), f
        if va is not None:
            scale = max(float(jnp.max(jnp.abs(vb))), 1e-30)
            assert float(jnp.max(jnp.abs(va - vb))) / scale <= 1e-6, f
    for f in _STATIC:
        assert getattr(a, f) == getattr(b, f), (f, getattr(a, f), getattr(b, f))


def _residual(s, fan):
    block = s.serial(s.Dense(4, W_std=1.2, b_std=0.1), s.Relu(), s.Dense(4, W_std=1.1))
    return s.serial(
        s.Dense(4, W_std=1.3, b_std=0.2),
        s.FanOut(2),
        s.parallel(block, s.Dense(4, W_std=0.9)),
        getattr(s, fan)(),
        s.Dense(2, W_std=0.7),
    )


@pytest.mark.filterwarnings("ignore:`FanIn` layers assume")
@pytest.mark.parametrize("fan", ["FanInSum", "FanInProd", "FanInConcat"])
@pytest.mark.parametrize("n2", [None, 2])
def test_fan_in_parity(fan, n2):
    x1 = jax.random.normal(jax.random.PRNGKey(0), (3, 5))
    x2 = None if n2 is None else jax.random.normal(jax.random.PRNGKey(1), (n2, 5))
    ours = _residual(nt.stax, fan)[2](x1, x2)
    theirs = _residual(load_nt_stax(), fan)[2](x1, x2)
    _assert_parity(ours, theirs)


def test_same_key_same_params_and_outputs_as_nt():
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 5))
    outs = []
    for s in (nt.stax, load_nt_stax()):
        init_fn, apply_fn, _ = _residual(s, "FanInSum")
        shape, params = init_fn(jax.random.PRNGKey(7), x.shape)
        outs.append((shape, apply_fn(params, x)))
    assert outs[0][0] == outs[1][0]
    np.testing.assert_array_equal(outs[0][1], outs[1][1])


def test_repeat_equals_serial_and_nt():
    s, S = nt.stax, load_nt_stax()
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 4))
    layer = lambda m: m.serial(m.Dense(4, W_std=1.4, b_std=0.1), m.Relu())
    rep = s.repeat(layer(s), 3)[2](x, None)
    ser = s.serial(*[layer(s)] * 3)[2](x, None)
    _assert_parity(rep, ser)
    _assert_parity(rep, S.repeat(layer(S), 3)[2](x, None))
    init_fn, apply_fn, _ = s.repeat(layer(s), 3)
    _, params = init_fn(jax.random.PRNGKey(1), x.shape)
    assert apply_fn(params, x).shape == (3, 4)


def test_repeat_shape_changing_layer_raises():
    init_fn, _, _ = nt.stax.repeat(nt.stax.Dense(7), 2)
    with pytest.raises(ValueError, match="different output shape"):
        init_fn(jax.random.PRNGKey(0), (3, 4))


def test_bad_layers_raise_clear_errors():
    with pytest.raises(TypeError, match="Relu\\(\\)"):
        nt.stax.serial(nt.stax.Dense(3), nt.stax.Relu)
    with pytest.raises(ValueError, match="`n`"):
        nt.stax.repeat(nt.stax.Dense(3), -1)
    with pytest.raises(ValueError, match="`num`"):
        nt.stax.FanOut(0)

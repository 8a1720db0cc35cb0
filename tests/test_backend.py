"""The backend flag: precedence (per call > context > global > NTFAST_BACKEND > auto) and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntfast as nt
from ntfast import backend as B

_OP = "test_backend_probe"


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv("NTFAST_BACKEND", raising=False)
    B.set_backend(None)
    B.register(_OP, "xla", lambda: "xla")
    yield
    B.set_backend(None)
    B._registry.pop(_OP, None)
    B._availability.pop("native", None)


def test_default_is_auto_and_auto_resolves_to_xla_here():
    assert B.get_backend() == "auto"
    assert B.resolve(_OP) == "xla"
    assert B.dispatch(_OP)() == "xla"


def test_precedence_env_global_context(monkeypatch):
    monkeypatch.setenv("NTFAST_BACKEND", "xla")
    assert B.get_backend() == "xla"
    B.set_backend("auto")
    assert B.get_backend() == "auto"
    with B.use_backend("xla"):
        assert B.get_backend() == "xla"
        with B.use_backend("auto"):
            assert B.get_backend() == "auto"
        assert B.get_backend() == "xla"
    assert B.get_backend() == "auto"


def test_bad_names_raise_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="backend"):
        B.set_backend("cuda")
    with pytest.raises(ValueError, match="backend"), B.use_backend("tpu"):
        pass
    monkeypatch.setenv("NTFAST_BACKEND", "fast")
    with pytest.raises(ValueError, match="NTFAST_BACKEND"):
        B.get_backend()


def test_explicit_unavailable_backend_raises_but_auto_falls_back():
    B.register_availability("native", lambda: "not built in this test")
    B.register(_OP, "native", lambda: "native")
    with pytest.raises(B.BackendError, match="not built in this test"):
        B.dispatch(_OP, "native")
    assert B.dispatch(_OP, "auto")() == "xla"
    with pytest.raises(B.BackendError, match="does not implement"):
        B.dispatch(_OP, "triton")


def test_auto_prefers_available_fast_backend():
    B.register_availability("native", lambda: None)
    B.register(_OP, "native", lambda: "native")
    assert B.dispatch(_OP)() == "native"
    assert B.dispatch(_OP, "xla")() == "xla"


def test_kernel_fn_per_call_backend_same_numbers():
    _, _, kernel_fn = nt.stax.serial(nt.stax.Dense(3, b_std=0.1), nt.stax.Relu(), nt.stax.Dense(1))
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 4))
    ref = kernel_fn(x, None, "ntk", backend="xla")
    auto = kernel_fn(x, None, "ntk", backend="auto")
    np.testing.assert_array_equal(np.asarray(ref), np.asarray(auto))
    with pytest.raises(ValueError, match="backend"):
        kernel_fn(x, None, "ntk", backend="gpu")
    assert jnp.all(jnp.isfinite(ref))


def test_available_backends_reports_reasons():
    av = nt.available_backends()
    assert av["xla"] is None
    for name in ("triton", "native"):
        assert name in av

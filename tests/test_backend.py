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
    # Tests below replace the native backend's probes with stand-ins; the real ones come back.
    monkeypatch.setitem(B._availability, "native", B._availability["native"])
    monkeypatch.setitem(B._auto_eligible, "native", B._auto_eligible["native"])
    yield
    B.set_backend(None)
    B._registry.pop(_OP, None)


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
    # Triton lacks the op (or, where it is not installed, is unavailable): an error either way.
    with pytest.raises(B.BackendError, match="does not implement|unavailable"):
        B.dispatch(_OP, "triton")


def test_auto_prefers_available_fast_backend():
    B.register_availability("native", lambda: None)
    B._auto_eligible["native"] = lambda: True
    B.register(_OP, "native", lambda: "native")
    assert B.dispatch(_OP)() == "native"
    assert B.dispatch(_OP, "xla")() == "xla"


def test_auto_skips_a_backend_that_cannot_serve_the_request():
    B.register_availability("native", lambda: None)
    B._auto_eligible["native"] = lambda: True

    def native():
        return "native"

    native.unsupported_reason = lambda kind: None if kind == "relu" else f"no {kind} kernel"
    B.register(_OP, "native", native)
    assert B.dispatch(_OP, query={"kind": "relu"})() == "native"
    assert B.dispatch(_OP, query={"kind": "sin"})() == "xla"
    assert B.dispatch(_OP)() == "native"  # no query: no limits apply
    with pytest.raises(B.BackendError, match="no sin kernel"):
        B.dispatch(_OP, "native", query={"kind": "sin"})


def test_explicit_native_runs_the_xla_definition_of_ops_it_has_no_kernel_for():
    B.register_availability("native", lambda: None)
    assert B.resolve(_OP, "native") == "xla"  # native registered nothing for this op
    B.register(_OP, "native", lambda: "native")
    assert B.dispatch(_OP, "native")() == "native"
    B.register_availability("native", lambda: "not built in this test")
    with pytest.raises(B.BackendError, match="not built in this test"):
        B.dispatch(_OP, "native")  # an unavailable native backend still raises


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


# -- the Triton backend's place in the flag --------------------------------------------------------


def test_triton_is_available_here_but_auto_stays_on_xla_off_cuda():
    pytest.importorskip("triton", reason="needs triton: pip install 'triton>=3.7,<3.10'")
    assert not B.default_device_is_cuda()  # this suite runs on CPU
    assert B.unavailable_reason("triton") is None  # the interpreter serves explicit requests
    B.register(_OP, "triton", lambda: "triton")
    try:
        assert B.dispatch(_OP)() == "xla"
        assert B.dispatch(_OP, "triton")() == "triton"
    finally:
        B._registry[_OP].pop("triton")


def test_auto_picks_triton_on_cuda_when_jax_triton_is_there(monkeypatch):
    pytest.importorskip("triton", reason="needs triton: pip install 'triton>=3.7,<3.10'")
    from ntfast._triton import runtime

    monkeypatch.setattr(B, "default_device_is_cuda", lambda: True)
    B.register(_OP, "triton", lambda: "triton")
    try:
        reason = runtime.jax_triton_unavailable_reason()
        if reason is None:
            assert B.dispatch(_OP)() == "triton"
        else:
            # jax 0.10: no jax-triton, so compiled kernels cannot be launched on the GPU.
            assert "jax-triton" in B.unavailable_reason("triton")
            assert B.dispatch(_OP)() == "xla"
            with pytest.raises(B.BackendError, match="jax-triton"):
                B.dispatch(_OP, "triton")
    finally:
        B._registry[_OP].pop("triton")


def test_triton_missing_is_a_reason_not_a_crash(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    monkeypatch.setattr(B, "_lazy_outcome", {})
    reason = B.unavailable_reason("triton")
    assert reason is not None and "Triton is not installed" in reason
    with pytest.raises(B.BackendError, match="Triton is not installed"):
        B.dispatch(_OP, "triton")
    assert B.dispatch(_OP, "auto")() == "xla"


def test_import_ntfast_without_triton_in_a_fresh_process():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['jax_triton'] = None\n"
        "import jax, ntfast as nt\n"
        "_, _, kernel_fn = nt.stax.serial(nt.stax.Dense(2), nt.stax.Relu(), nt.stax.Dense(1))\n"
        "k = kernel_fn(jax.numpy.ones((2, 3)), None, 'ntk')\n"
        "assert k.shape == (2, 2), k.shape\n"
        "print(nt.available_backends()['triton'])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "Triton is not installed" in out.stdout


def test_triton_backend_registers_the_hot_ops_when_first_considered():
    pytest.importorskip("triton", reason="needs triton: pip install 'triton>=3.7,<3.10'")
    import ntfast.ops

    assert B.unavailable_reason("triton") is None
    import ntfast._triton

    triton_ops = {op for op, backends in B.registered_ops().items() if "triton" in backends}
    launchers = [m for m in ntfast._triton.LAUNCHERS if hasattr(ntfast._triton, m)]
    assert launchers, "no Triton launcher module was imported"
    assert triton_ops, "ntfast._triton registered no op"

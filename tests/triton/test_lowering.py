"""Proof 3 (DESIGN.md §3): whole networks under ``backend="triton"``, lowered for CUDA on this
GPU-less machine, contain our named Triton custom calls (``ntfast_<op>_<variant>``), one per launch
the network traced; under ``backend="xla"`` they contain none.

Needs jax-triton (jax >= 0.11, Python >= 3.12) and the CUDA plugin matching jaxlib, installed
with ``--no-deps`` (no GPU needed). Where they are missing (jax 0.10) the tests skip with the
reason; ``NTFAST_REQUIRE_LOWERING=1`` (set by CI's Python 3.12 run) turns that skip into a failure.
"""

import os

import jax
import numpy as np
import pytest

pytest.importorskip("triton", reason="needs triton: pip install 'triton>=3.7,<3.10'")

from ntfast import stax
from ntfast._triton import runtime
from ntfast.stax.fused import fused_options


# The hot ops each network must reach through Triton (a subset of what it launches).
def _base(names):
    """Names with the nonlinearity+Dense epilogue folded into the nonlinearity's own name: serial
    fuses a nonlinearity with a following Dense (``ntfast_nonlin_<kind>_affine``)."""
    return {n.removesuffix("_affine") for n in names}


EXPECTED = {
    "fc": {"ntfast_input_cov_full", "ntfast_nonlin_abrelu", "ntfast_nonlin_erf"},
    "cnn_gap": {"ntfast_conv_cov_full", "ntfast_nonlin_abrelu", "ntfast_nonlin_erf"},
    "myrtle5": {"ntfast_conv_cov_full", "ntfast_conv_pool_cov", "ntfast_nonlin_abrelu"},
    "elementwise_zoo": {"ntfast_conv_cov_diag", "ntfast_nonlin_gelu", "ntfast_nonlin_sign"},
}


@pytest.fixture(scope="module", autouse=True)
def _needs_cuda_lowering():
    reason = runtime.cuda_lowering_unavailable_reason()
    if reason is None:
        return
    if os.environ.get("NTFAST_REQUIRE_LOWERING") == "1":
        pytest.fail(f"NTFAST_REQUIRE_LOWERING=1 but CUDA lowering is unavailable: {reason}")
    pytest.skip(f"CUDA lowering proof needs jax-triton and jax-cuda13-plugin: {reason}")


def _lower(network, networks, backend, dtype, x2_none=False, fused=False):
    """``fused=False``: the per-layer kernels these tests are about (CNN networks would otherwise
    take the fused path, ``ntfast_fused_cnn_*``; see the fused tests at the end)."""
    make, s1, s2 = networks[network]
    x1 = np.random.RandomState(0).randn(*s1).astype(dtype)
    x2 = None if x2_none else np.random.RandomState(1).randn(*s2).astype(dtype)
    kernel_fn = make(stax)[2]
    f = jax.jit(lambda a, b: kernel_fn(a, b, ("nngp", "ntk"), backend=backend))
    with runtime.record_launches() as log, fused_options(enabled=fused):
        lowered = f.trace(x1, x2).lower(lowering_platforms=("cuda",))
    return lowered, log


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("network", sorted(EXPECTED))
def test_triton_network_lowers_to_our_named_custom_calls(networks, network, dtype):
    lowered, log = _lower(network, networks, "triton", dtype)
    names = runtime.kernel_call_names(lowered)
    assert EXPECTED[network] <= _base(names), (network, sorted(set(names)))
    assert all(n.startswith("ntfast_") for n in names), names  # none unnamed
    # Every launch traced for this call made it into the module. (Counts may differ: a jitted
    # helper traced once can be lowered at two call sites, or once for two calls.)
    assert {rec["name"] for rec in log} <= set(names)
    text = lowered.as_text()
    assert text.count("triton_kernel_call_ffi") == len(names)
    assert "callback" not in text  # the interpreter branch is not lowered for cuda


@pytest.mark.parametrize("network", sorted(EXPECTED))
def test_xla_network_lowers_without_triton_calls(networks, network):
    lowered, log = _lower(network, networks, "xla", np.float32)
    assert log == []
    assert runtime.kernel_call_names(lowered) == []
    assert "triton_kernel_call" not in lowered.as_text()


def test_symmetric_kernel_x2_none_and_grad_lower_with_named_calls(networks):
    lowered, log = _lower("cnn_gap", networks, "triton", np.float32, x2_none=True)
    assert {r["name"] for r in log} <= set(runtime.kernel_call_names(lowered))
    assert EXPECTED["cnn_gap"] <= _base(runtime.kernel_call_names(lowered))
    # Gradients w.r.t. the inputs keep the forward launches (backward: the XLA reference).
    make, s1, _ = networks["fc"]
    kernel_fn = make(stax)[2]
    x = np.random.RandomState(0).randn(*s1).astype(np.float32)
    g = jax.jit(jax.grad(lambda a: kernel_fn(a, None, "ntk", backend="triton").sum() ** 2))
    names = runtime.kernel_call_names(g.trace(x).lower(lowering_platforms=("cuda",)))
    assert {"ntfast_input_cov_full", "ntfast_nonlin_abrelu"} <= _base(names)


# -- the fused conv path: CNN networks run as ntfast_fused_cnn_* launches -------------------------

EXPECTED_FUSED = {
    "cnn_gap": {"ntfast_fused_cnn_images_readout"},
    "myrtle5": {
        "ntfast_fused_cnn_images_planes",
        "ntfast_fused_cnn_packed_planes",
        "ntfast_fused_cnn_packed_readout",
    },
}


@pytest.mark.parametrize("x2_none", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("network", sorted(EXPECTED_FUSED))
def test_cnn_networks_lower_to_fused_cnn_calls(networks, network, dtype, x2_none):
    lowered, log = _lower(network, networks, "triton", dtype, x2_none=x2_none, fused=True)
    names = runtime.kernel_call_names(lowered)
    assert EXPECTED_FUSED[network] <= set(names), (network, sorted(set(names)))
    # The whole conv stack is one kernel per segment: no per-layer conv/nonlinearity launches.
    assert all(n.startswith("ntfast_fused_cnn_") for n in names), names
    # (The log also holds the per-layer launches that serial traces abstractly, with
    # jax.eval_shape, for the Kernel's structure; none of them is lowered.)
    assert {r["name"] for r in log if r["op"] == "fused_cnn"} <= set(names)
    text = lowered.as_text()
    assert text.count("triton_kernel_call_ffi") == len(names)
    assert "callback" not in text

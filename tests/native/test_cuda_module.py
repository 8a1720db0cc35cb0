"""The CUDA native module ``ntfast._native._cuda`` on a machine without a GPU (DESIGN §3 proofs 3-4).

- nvcc compiles kernels/cuda/fused_cnn.cu for sm_80 and sm_90 (no spills, parameters fit);
- the built module (installed wheel, or ``NTFAST_NATIVE_DIR``) imports without a driver (static
  cudart), says how it was built, exposes the handler as a PyCapsule, and its target registers
  with XLA for platform CUDA;
- lowering for ``cuda`` (jax-cuda13-plugin, no GPU needed) of the op and of a CNN-GAP network's
  kernel_fn contains the custom call ``ntfast_fused_cnn`` once under the native backend, and none
  under ``xla``.

Skips name what would un-skip them. ``NTFAST_REQUIRE_LOWERING=1`` (CI's Python 3.12 stage) turns
every skip here into a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntfast import backend as _backend
from ntfast.ops import fused_cnn as fc

ROOT = Path(__file__).resolve().parents[2]
CUDA_DIR = ROOT / "kernels" / "cuda"
TARGET = "ntfast_fused_cnn"


def _skip(reason: str):
    """Skip, or fail where CI requires these proofs (``NTFAST_REQUIRE_LOWERING=1``)."""
    if os.environ.get("NTFAST_REQUIRE_LOWERING", "") not in ("", "0"):
        pytest.fail(f"NTFAST_REQUIRE_LOWERING is set but: {reason}")
    pytest.skip(reason)


def _cuda_module():
    from ntfast import _native

    module = _native.load_module("_cuda")
    if module is None:
        _skip(
            "ntfast._native._cuda is not built here: `pip install .` with nvcc (CUDA >= 12.1) on "
            "PATH, or a CMake build of the repository with NTFAST_NATIVE_DIR=<build>/native "
            f"({_native.module_error('_cuda')})"
        )
    return module


# ---------------------------------------------------------------------------------------------
# nvcc


def _nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        _skip("nvcc is not on PATH (install the CUDA toolkit >= 12.1)")
    return nvcc


def test_nvcc_compiles_the_kernels_without_spills(tmp_path):
    """fused_cnn.cu for sm_80 and sm_90: every kernel of both dtypes, no local-memory spills,
    the decoded plan (a kernel parameter) within the 32 KB parameter space."""
    nvcc = _nvcc()
    cmd = [
        nvcc, "-std=c++17", "-O3", "-cubin", "--expt-relaxed-constexpr", "-Xptxas", "-v",
        "-gencode", "arch=compute_80,code=sm_80", "-isystem", jax.ffi.include_dir(),
        f"-I{ROOT / 'kernels' / 'common'}", str(CUDA_DIR / "fused_cnn.cu"),
        "-o", str(tmp_path / "fused_cnn.cubin"),
    ]  # fmt: skip
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    log = res.stderr
    for kernel in ("plane_kernel", "pool_kernel", "finalize_kernel"):
        for dtype in ("If", "Id"):  # mangled float / double instantiations
            assert f"{kernel}{dtype}" in log, f"{kernel}<{dtype}> was not compiled"
    spills = [ln for ln in log.splitlines() if "spill" in ln and not ln.strip().startswith("0 ")]
    assert not [ln for ln in spills if " 0 bytes spill stores, 0 bytes spill loads" not in ln]
    cmem = [int(t.split()[0]) for ln in log.splitlines() for t in ln.split(",") if "cmem[0]" in t]
    assert cmem and max(cmem) < 32 * 1024


# ---------------------------------------------------------------------------------------------
# The module


def test_module_imports_without_a_driver_and_reports_its_build():
    module = _cuda_module()
    info = module.build_info()
    assert info["platform"] == "CUDA" and info["cudart"] == "static"
    archs = info["cuda_archs"].split(",")
    assert "80-real" in archs and any(a.startswith("90") for a in archs), archs
    assert info["cuda_compiler"].startswith("nvcc")


def test_handler_capsule_registers_for_cuda():
    module = _cuda_module()
    handlers = module.handlers()
    assert set(handlers) == {TARGET}
    assert type(handlers[TARGET]).__name__ == "PyCapsule"
    # ntfast._native registered it on load; registering again under another name must succeed.
    jax.ffi.register_ffi_target(TARGET + "_cuda_test", handlers[TARGET], platform="CUDA")


# ---------------------------------------------------------------------------------------------
# Lowering for cuda


def _lower_for_cuda(f, *args) -> str:
    try:
        return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    except Exception as e:  # any failure to lower here: is it the missing cuda plugin?
        if "cuda" in str(e).lower() or "platform" in str(e).lower():
            _skip(
                "lowering for cuda needs jax >= 0.11 with jax-cuda13-plugin installed "
                f"(pip install jax-cuda13-plugin --no-deps; CI's Python 3.12 stage): {e}"
            )
        raise


@pytest.fixture
def native_backend():
    reason = _backend.unavailable_reason("native")
    if reason is not None:
        _skip(f"the native backend is unavailable here: {reason}")


PLAN = (
    fc.ConvStep((3, 3), "SAME", 2.0, 0.1),
    fc.NonlinStep("abrelu", (("a", 0.0), ("b", 1.0))),
    fc.PoolStep((2, 2), (2, 2), "VALID", "AVG", False),
    fc.ConvStep((3, 3), "SAME", 2.0, 0.1),
    fc.NonlinStep("erf", (("a", 1.0), ("b", 1.0), ("c", 0.0))),
    fc.Readout("GAP"),
)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("with_x2", [False, True])
def test_op_lowers_to_the_custom_call(native_backend, dtype, with_x2):
    x1 = jnp.asarray(np.random.default_rng(0).standard_normal((3, 6, 5, 2)), dtype)
    x2 = jnp.asarray(np.random.default_rng(1).standard_normal((2, 6, 5, 2)), dtype)

    def f(backend):
        return lambda a, b: fc.fused_cnn(a, b if with_x2 else None, plan=PLAN, backend=backend)

    native = _lower_for_cuda(f("native"), x1, x2)
    assert native.count(f"stablehlo.custom_call @{TARGET}(") == 1
    assert "api_version = 4" in native or "mhlo.backend_config" in native  # typed FFI call
    assert TARGET not in _lower_for_cuda(f("xla"), x1, x2)


def _cnn_gap():
    from ntfast import stax

    return stax.serial(
        stax.Conv(4, (3, 3), padding="SAME", W_std=1.5, b_std=0.1),
        stax.Relu(),
        stax.Conv(4, (3, 3), padding="SAME", W_std=1.5, b_std=0.1),
        stax.Relu(),
        stax.GlobalAvgPool(),
        stax.Dense(1),
    )[2]


def test_network_kernel_fn_lowers_to_the_custom_call(native_backend):
    """A CNN-GAP kernel_fn: one fused custom call (NNGP and NTK together); none under xla.

    Traced under ``"auto"``, which picks native for ``fused_cnn`` when the module for the tracing
    device loaded (on a GPU: _cuda, ahead of triton in AUTO_ORDER) and xla for the other ops. An
    explicit ``backend="native"`` on a kernel_fn also applies to the layers outside the fused
    prefix (``input_cov``, ...), which have no native implementation, and raises BackendError.
    """
    kernel_fn = _cnn_gap()
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 6, 5, 3)), jnp.float32)

    def f(name):
        return lambda a: kernel_fn(a, None, ("nngp", "ntk"), backend=name)

    text = _lower_for_cuda(f("auto"), x)
    assert text.count(f"stablehlo.custom_call @{TARGET}(") == 1
    assert TARGET not in _lower_for_cuda(f("xla"), x)

"""The CUDA fused CNN path run on the CPU: kernels/cuda/fused_cnn.cuh under host emulation.

No GPU is lent to this project, so the CUDA kernels' per-entry math is proven by the CPU handler
(the two share kernels/common/fused_math.h), and everything CUDA-specific — which thread computes
which entry, shared-memory tiles of offset planes, the box filters' shifted reads across threads
and their ``__syncthreads``, pooling between segments in the packed layout, the variance-map
pass, deterministic readout reductions, pair chunking under a scratch budget, the sym triangle,
the global-memory workspace for planes too large for shared memory — is proven here: the same
source is compiled by the host compiler with ``kernels/cuda/host_emulation.h`` (one std::thread
per CUDA thread, a std::barrier per ``__syncthreads``) and compared with the XLA reference
(:func:`ntfast.ops.fused_cnn.fused_cnn_reference`, the definition).

What this cannot prove: warp-level behaviour, occupancy and launch limits, the real shared-memory
capacity, and the XLA FFI glue of ``kernels/cuda/fused_cnn.cu`` (compiled by nvcc in
test_cuda_module.py; run only on a GPU).
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntfast.ops import fused_cnn as fc
from ntfast.ops import fused_table as ft

ROOT = Path(__file__).resolve().parents[2]
CUDA_DIR = ROOT / "kernels" / "cuda"
COMMON_DIR = ROOT / "kernels" / "common"

RELU = fc.NonlinStep("abrelu", (("a", 0.0), ("b", 1.0)))
LEAKY = fc.NonlinStep("abrelu", (("a", 0.1), ("b", 1.0)))
ERF = fc.NonlinStep("erf", (("a", 1.0), ("b", 0.5), ("c", 0.1)))
GELU = fc.NonlinStep("gelu", ())


def _conv(f, pad, w=2.0, b=0.1, scale=None):
    return fc.ConvStep(f, pad, w, b, scale)


def _pool(win, stride, pad="VALID", kind="AVG", edges=False):
    return fc.PoolStep(win, stride, pad, kind, edges)


# Named plans: every segment end, padding, nonlinearity, parameterization and pooling variant
# the encoding allows, on odd sizes (images are 7 x 6).
PLANS = {
    "cnn-gap": (_conv((3, 3), "SAME"), RELU, _conv((3, 3), "SAME"), RELU, fc.Readout("GAP")),
    "valid-erf-gelu-gsp": (
        _conv((2, 3), "VALID"),
        ERF,
        _conv((3, 1), "VALID", 1.5, None),
        GELU,
        fc.Readout("GSP"),
    ),
    "circular-flatten": (
        _conv((3, 2), "CIRCULAR"),
        LEAKY,
        _conv((9, 3), "CIRCULAR", 1.3, 0.2),  # wider than the image: wraps more than once
        fc.Readout("FLATTEN"),
    ),
    "standard-dense": (
        _conv((2, 2), "SAME", 2.0, 0.1, 3.0),
        RELU,
        fc.DenseStep(1.1, 0.3, 5.0),
        GELU,
        _conv((1, 1), "SAME", 1.0, None, 4.0),
        fc.Readout("GAP"),
    ),
    "myrtle-like": (
        _conv((3, 3), "SAME", 2.0, 0.0),
        RELU,
        _pool((2, 2), (2, 2)),
        _conv((3, 3), "SAME", 2.0, 0.0),
        RELU,
        _pool((2, 2), (2, 2), "SAME"),
        fc.Readout("FLATTEN"),
    ),
    "pools-mixed": (
        _conv((2, 2), "SAME"),
        RELU,
        _pool((3, 2), (1, 2), "SAME", "AVG", True),
        _pool((2, 1), (2, 1), "CIRCULAR", "SUM"),  # consecutive pools: a segment of no steps
        fc.DenseStep(0.8, 0.1),
        ERF,
        _conv((2, 2), "VALID", 1.1, None),
        fc.Readout("GAP"),
    ),
}
# A first segment with no steps that ends in a pooling. The XLA reference cannot run it with
# compute_ntk=True (its 0-d zero NTK of the input reaches pool_cov unbroadcast), so it is
# compared without the NTK.
POOL_FIRST = (
    _pool((2, 3), (1, 2), "SAME", "SUM"),
    _conv((3, 3), "CIRCULAR"),
    GELU,
    fc.Readout("GSP"),
)


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """The emulation library (ctypes), built from kernels/cuda with the host C++ compiler."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("needs a C++20 host compiler (g++ >= 11) to build the CUDA host emulation")
    out = tmp_path_factory.mktemp("cuda_emu") / "libntf_cuda_emu.so"
    cmd = [
        cxx, "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-DNTF_CUDA_EMULATION",
        f"-I{COMMON_DIR}", f"-I{CUDA_DIR}", str(CUDA_DIR / "host_emulation_driver.cc"),
        "-o", str(out),
    ]  # fmt: skip
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    lib = ctypes.CDLL(str(out))
    p, i = ctypes.c_void_p, ctypes.c_int64
    for name in ("ntf_emu_fused_cnn_f32", "ntf_emu_fused_cnn_f64"):
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
        fn.argtypes = [p, p, i, i, i, i, i, p, i, p, i, i, i, i, p, p, p, p, i, i]
    lib.ntf_emu_set_limits.argtypes = [i, i, i]
    lib.ntf_emu_counters.argtypes = [ctypes.POINTER(ctypes.c_int64)] * 2
    yield lib
    lib.ntf_emu_set_limits(48 << 10, 100 << 10, 2)


def _run(lib, x1, x2, plan, *, ntk=True, cov=True, threads=16, budget=1 << 30):
    """The CUDA path under emulation: ``(nngp, ntk, cov1, cov2)`` as the FFI results (never None)."""
    sym = x2 is None
    x1 = np.ascontiguousarray(x1)
    x2 = x1 if sym else np.ascontiguousarray(x2, x1.dtype)
    (n1, h, w, c), n2 = x1.shape, x2.shape[0]
    ints, floats = ft.encode(plan, (h, w))
    # Results start as 7s: the kernels must write (or zero) every entry.
    outs = [np.full(s, 7.0, x1.dtype) for s in ((n1, n2), (n1, n2), (n1,), (n2,))]
    fn = lib.ntf_emu_fused_cnn_f64 if x1.dtype == np.float64 else lib.ntf_emu_fused_cnn_f32
    ptr = lambda a: a.ctypes.data
    rc = fn(
        ptr(x1), ptr(x2), n1, n2, h, w, c, ptr(ints), ints.size, ptr(floats), floats.size,
        int(sym), int(ntk), int(cov), *map(ptr, outs), threads, budget,
    )  # fmt: skip
    assert rc == 0, f"emulated run failed with code {rc}"
    return outs


_REF_CACHE: dict = {}
_reference_jit = jax.jit(
    fc.fused_cnn_reference, static_argnames=("plan", "compute_ntk", "compute_cov")
)


def _reference(x1, x2, plan, ntk=True, cov=True):
    """The XLA reference (the definition), jitted and memoized per input (tests share inputs)."""
    key = (plan, x1.dtype.str, x1.tobytes(), None if x2 is None else x2.tobytes(), ntk, cov)
    if key not in _REF_CACHE:
        out = _reference_jit(
            jnp.asarray(x1),
            None if x2 is None else jnp.asarray(x2),
            plan=plan,
            compute_ntk=ntk,
            compute_cov=cov,
        )
        _REF_CACHE[key] = [None if o is None else np.asarray(o) for o in out]
    return _REF_CACHE[key]


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / max(np.max(np.abs(b)), 1e-300))


def _images(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape)


# Shared inputs (the reference's results are memoized per input): N1 = 3, N2 = 2, odd 7 x 6.
X1 = _images((3, 7, 6, 2), 0)
X2 = _images((2, 7, 6, 2), 1)


@pytest.mark.parametrize("name", sorted(PLANS))
@pytest.mark.parametrize("n2", [None, 2])
def test_matches_reference_f64(emu, name, n2):
    plan = PLANS[name]
    x1, x2 = X1, None if n2 is None else X2
    nngp, ntk, cov1, cov2 = _run(emu, x1, x2, plan)
    r_nngp, r_ntk, r_cov1, r_cov2 = _reference(x1, x2, plan)
    # ≤ 1e-8: the NTK's self-pair diagonal sits at the arc-cosine's θ = 0 cusp, where the
    # reference's own rounding (det ≈ 1e-16 → θ ≈ 1e-8) moves it by ~1e-10.
    assert _rel(nngp, r_nngp) < 1e-8
    assert _rel(ntk, r_ntk) < 1e-8
    assert _rel(cov1, r_cov1) < 1e-8
    if n2 is None:
        np.testing.assert_array_equal(nngp, nngp.T)
        np.testing.assert_array_equal(ntk, ntk.T)
        np.testing.assert_array_equal(cov2, cov1)  # sym: cov2 = cov1
        np.testing.assert_allclose(np.diag(nngp), cov1, rtol=0, atol=0)
    else:
        assert _rel(cov2, r_cov2) < 1e-8


@pytest.mark.parametrize("name", ["myrtle-like", "valid-erf-gelu-gsp"])
def test_f32_error_within_twice_the_reference_f32_error(emu, name):
    plan = PLANS[name]
    x1, x2 = X1, X2
    truth = _reference(x1, x2, plan)
    ref32 = _reference(x1.astype(np.float32), x2.astype(np.float32), plan)
    got = _run(emu, x1.astype(np.float32), x2.astype(np.float32), plan)
    assert got[0].dtype == np.float32
    for g, r, t in zip(got, ref32, truth):
        assert _rel(g, t) <= 2 * _rel(r, t) + 1e-6


def test_flags_leave_untouched_results_zero(emu):
    plan = PLANS["myrtle-like"]
    x1, x2 = X1, X2
    nngp, ntk, cov1, cov2 = _run(emu, x1, x2, plan, ntk=False, cov=False)
    r_nngp = _reference(x1, x2, plan)[0]
    assert _rel(nngp, r_nngp) < 1e-8
    assert not ntk.any() and not cov1.any() and not cov2.any()
    # sym without NTK: both triangles and the diagonal still come out.
    nngp, ntk, cov1, _ = _run(emu, x1, None, plan, ntk=False, cov=True)
    r = _reference(x1, None, plan)
    assert _rel(nngp, r[0]) < 1e-8 and _rel(cov1, r[2]) < 1e-8 and not ntk.any()


@pytest.mark.parametrize("name", ["pools-mixed", "cnn-gap"])
def test_chunking_and_block_size_do_not_change_results(emu, name):
    """Chunks of one pair (a one-byte scratch budget) give bit-identical results: the readout
    sums run in a fixed order whatever the launch geometry. Another block size changes only the
    order of the per-thread partial sums (the GPU build fixes it at 256 threads)."""
    plan = PLANS[name]
    x1, x2 = X1, X2
    for xb in (None, x2):
        base = _run(emu, x1, xb, plan, threads=16)
        for a, b in zip(base, _run(emu, x1, xb, plan, threads=16, budget=1)):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(base, _run(emu, x1, xb, plan, threads=5, budget=1)):
            np.testing.assert_allclose(a, b, rtol=1e-13, atol=0)


def test_global_workspace_path(emu):
    """Planes too large for (the emulated) shared memory run from the global workspace."""
    plan = PLANS["myrtle-like"]
    x1 = X1
    want = _run(emu, x1, None, plan)
    emu.ntf_emu_counters(ctypes.byref(ctypes.c_int64()), ctypes.byref(ctypes.c_int64()))
    emu.ntf_emu_set_limits(256, 256, 3)
    try:
        got = _run(emu, x1, None, plan)
    finally:
        emu.ntf_emu_set_limits(48 << 10, 100 << 10, 2)
    launches, global_launches = ctypes.c_int64(), ctypes.c_int64()
    emu.ntf_emu_counters(ctypes.byref(launches), ctypes.byref(global_launches))
    assert global_launches.value > 0
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("n2", [None, 2])
def test_pool_first_without_ntk(emu, n2):
    x1, x2 = X1, None if n2 is None else X2
    nngp, ntk, cov1, cov2 = _run(emu, x1, x2, POOL_FIRST, ntk=False)
    r = _reference(x1, x2, POOL_FIRST, ntk=False)
    assert _rel(nngp, r[0]) < 1e-8 and _rel(cov1, r[2]) < 1e-8 and not ntk.any()
    if n2 is not None:
        assert _rel(cov2, r[3]) < 1e-8
    # The NTK pass leaves the NNGP bit-identical (same planes, same order).
    np.testing.assert_array_equal(_run(emu, x1, x2, POOL_FIRST)[0], nngp)


def test_one_image_and_n2_one(emu):
    plan = PLANS["circular-flatten"]
    x1 = _images((1, 7, 6, 1), 9)
    nngp, ntk, cov1, _ = _run(emu, x1, None, plan)
    r = _reference(x1, None, plan)
    assert _rel(nngp, r[0]) < 1e-8 and _rel(ntk, r[1]) < 1e-8 and _rel(cov1, r[2]) < 1e-8
    x2 = _images((1, 7, 6, 1), 10)
    got = _run(emu, _images((4, 7, 6, 1), 11), x2, plan)
    r = _reference(_images((4, 7, 6, 1), 11), x2, plan)
    for g, t in zip(got, r):
        assert _rel(g, t) < 1e-8

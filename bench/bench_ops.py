"""Time per call of each hot op, per backend: ``xla``, ``triton`` and Neural Tangents (``nt``).

One test per (op case, implementation) on a named op shape (``bench/shapes.py``):

=============  ==========================================================  ====================
op case        call (arrays derived from the shape's images)               ``nt`` counterpart
=============  ==========================================================  ====================
input_cov      ``input_cov(x1, x2)``, diagonal batch, full spatial         ``_inputs_to_kernel``
conv_cov       ``conv_cov(nngp)``, 3×3, stride 1, SAME, zipped layout       ``_conv_kernel_full_
                                                                            spatial_shared``
nonlin_relu    ``nonlin("abrelu", nngp, var1, var2, ntk, a=0, b=1)``       none of equal work
nonlin_erf     ``nonlin("erf", nngp, var1, var2, ntk)``                    none of equal work
dot_general    ``bilinear(nngp, O, O)``, dense ``O (H, H)`` on both H axes  none (no array op)
=============  ==========================================================  ====================

Each call is jitted and compiled ahead of time, and called once before timing (outside the timed
rounds); a round is one call + ``block_until_ready``. Every implementation's result must agree with
the first one measured for the same case and shape (f32: relative error ≤ 1e-4), so the timings
compare equal work. ``extra_info`` carries the analytic bytes and flops of the call
(``bench/roofline.py``), its H100 roofline bound, the backend and the device; ``bench/report.py``
prints ratios and roofline figures.

``triton`` is timed on a CUDA GPU. On a CPU it would time the Triton interpreter, so it runs only on
the ``op-smoke`` shape (a correctness check of the benchmark itself, marked ``interpreter`` in
``extra_info``) and is skipped with the reason on every other shape.
"""

from __future__ import annotations

import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import roofline
from bench.shapes import DEFAULT_OP_SHAPE, OP_SHAPES, OP_SMOKE_SHAPE

# The interpreter's once-per-process warning: runs on a CPU are marked in extra_info instead.
pytestmark = pytest.mark.filterwarnings("ignore:ntfast. backend 'triton' is running")

IMPLS = ("nt", "xla", "triton")
CASES = ("input_cov", "conv_cov", "nonlin_relu", "nonlin_erf", "dot_general")
# Each timed test aims at this many seconds of rounds (at least MIN_ROUNDS, at most MAX_ROUNDS).
TARGET_S, MIN_ROUNDS, MAX_ROUNDS = 2.0, 3, 1000
RTOL = 1e-4
TRITON_ON_CPU = "triton interpreter on CPU: timing meaningless; runs on a CUDA GPU"
NO_NT = {
    "nonlin_relu": "NT has no standalone op of equal work (its Relu layer also maps cov1/cov2)",
    "nonlin_erf": "NT has no standalone op of equal work (its Erf layer also maps cov1/cov2)",
    "dot_general": "NT has no array-level bilinear op (Kernel.dot_general maps every array)",
}
_first_result: dict = {}


def _shape(request, benchmark):
    name = request.config.getoption("--op-shape") or (
        OP_SMOKE_SHAPE if benchmark.disabled else DEFAULT_OP_SHAPE
    )
    return name, OP_SHAPES[name]


def _covariances(shape):
    """``x1, x2`` images, and ``cov1 (N1, H, H, W, W)``, ``nngp (N1, N2, H, H, W, W)`` and the
    per-image variance maps ``(N1, H, W)``, ``(N2, H, W)`` of the input layer (XLA reference)."""
    from ntfast.ops import dot_general as dg

    x1, x2 = (jnp.asarray(x) for x in shape.inputs())
    cov1, nngp, cov2 = dg.input_cov(
        x1, x2, diagonal_batch=True, diagonal_spatial=False, batch_axis=0, channel_axis=-1,
        backend="xla",
    )  # fmt: skip

    def variances(cov):  # (N, H, H, W, W) -> (N, H, W)
        return jnp.diagonal(jnp.diagonal(cov, axis1=1, axis2=2), axis1=1, axis2=2)

    return x1, x2, cov1, nngp, variances(cov1), variances(cov2)


def op_call(case: str, impl: str, shape):
    """``(fn, args)`` of one op case for implementation ``impl`` (``nt`` or an ntfast backend)."""
    x1, x2, _, nngp, v1, v2 = _covariances(shape)
    if impl == "nt":
        return _nt_case(case, x1, x2, nngp)
    from ntfast.ops import conv, nonlin
    from ntfast.ops import dot_general as dg

    if case == "input_cov":

        def fn(a, b):
            return dg.input_cov(
                a, b, diagonal_batch=True, diagonal_spatial=False, batch_axis=0, channel_axis=-1,
                backend=impl,
            )  # fmt: skip

        return fn, (x1, x2)
    if case == "conv_cov":

        def fn(k):
            return conv.conv_cov(k, filter_shape=(3, 3), strides=(1, 1), padding="SAME",
                                 backend=impl)  # fmt: skip

        return fn, (nngp,)
    if case in ("nonlin_relu", "nonlin_erf"):
        kind, params = ("abrelu", {"a": 0.0, "b": 1.0}) if case == "nonlin_relu" else ("erf", {})
        n1, n2 = v1.shape[0], v2.shape[0]
        h, w = v1.shape[1:]
        q11 = v1.reshape(n1, 1, h, 1, w, 1)
        q22 = v2.reshape(1, n2, 1, h, 1, w)

        def fn(q12, q11, q22, ntk):
            return nonlin.nonlin(kind, q12, q11, q22, ntk, backend=impl, **params)

        return fn, (nngp, q11, q22, 2 * nngp)
    if case == "dot_general":
        o = jnp.asarray(np.random.default_rng(1).standard_normal((shape.height,) * 2), nngp.dtype)

        def fn(k, o):
            return dg.bilinear(
                k, o, o, mat_labels=(0, 1, 2, 3, 4, 5), other1_labels=(2, 6),
                other2_labels=(3, 7), out_labels=(0, 1, 6, 7, 4, 5), backend=impl,
            )  # fmt: skip

        return fn, (nngp, o)
    raise ValueError(f"unknown op case {case!r}")


def _nt_case(case: str, x1, x2, nngp):
    from nt_oracle import load_nt_stax

    try:
        load_nt_stax()
    except ImportError as e:
        pytest.skip(f"Neural Tangents oracle unavailable: {e}")
    if case in NO_NT:
        pytest.skip(NO_NT[case])
    if case == "input_cov":
        from neural_tangents._src.stax.requirements import _inputs_to_kernel

        def fn(a, b):
            k = _inputs_to_kernel(
                a, b, diagonal_batch=True, diagonal_spatial=False, compute_ntk=True,
                batch_axis=0, channel_axis=-1, mask_constant=None,
            )  # fmt: skip
            return k.cov1, k.nngp, k.cov2

        return fn, (x1, x2)
    from neural_tangents._src.stax.linear import Padding, _conv_kernel_full_spatial_shared

    def fn(k):
        return _conv_kernel_full_spatial_shared(k, (3, 3), (1, 1), Padding.SAME, 2)

    return fn, (nngp,)


def _skip_unavailable(case: str, impl: str, shape_name: str) -> bool:
    """Skips (with the reason) what cannot run here; returns whether Triton runs interpreted."""
    if impl == "nt":
        return False
    from ntfast import backend
    from ntfast.ops import nonlin

    op = {"nonlin_relu": nonlin.op_name("abrelu"), "nonlin_erf": nonlin.op_name("erf")}.get(
        case, case
    )
    reason = backend.unavailable_reason(impl)
    if reason is not None:
        pytest.skip(f"backend {impl!r} unavailable here: {reason}")
    if impl not in backend.registered_ops().get(op, ()):
        pytest.skip(f"backend {impl!r} does not implement op {op!r} yet")
    if impl == "triton" and not backend.default_device_is_cuda():
        if shape_name != OP_SMOKE_SHAPE:
            pytest.skip(TRITON_ON_CPU)
        return True
    return False


def _compile(fn, impl: str, args):
    """AOT-compiled ``fn``; the backend flag is in force while tracing."""
    jitted = jax.jit(fn)
    if impl == "nt":
        return jitted.lower(*args).compile()
    from ntfast import use_backend

    with use_backend(impl):
        return jitted.lower(*args).compile()


def _check_agreement(key, out) -> None:
    """Same case and shape must give the same arrays whichever implementation runs."""
    leaves = [np.asarray(o, np.float64) for o in jax.tree.leaves(out)]
    for o in leaves:
        assert np.all(np.isfinite(o)), "result not finite"
    first = _first_result.setdefault(key, leaves)
    assert len(leaves) == len(first)
    for got, want in zip(leaves, first):
        assert got.shape == want.shape, (got.shape, want.shape)
        err = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), np.finfo(np.float32).tiny)
        assert err <= RTOL, f"relative difference {err:.2e} to the first implementation"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_op(benchmark, request, case, impl):
    shape_name, shape = _shape(request, benchmark)
    interpreted = _skip_unavailable(case, impl, shape_name)
    fn, args = op_call(case, impl, shape)

    t0 = time.perf_counter()
    compiled = _compile(fn, impl, args)
    compile_s = time.perf_counter() - t0
    warm_s = 0.0
    if not benchmark.disabled:
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        warm_s = time.perf_counter() - t0

    dtype = str(jnp.dtype(args[0].dtype))
    cost = roofline.COSTS[case](
        shape.n1, shape.n2, shape.height, shape.width, shape.channels, dtype=dtype
    )
    bound_s, limiter = roofline.bound(cost, dtype)
    device = jax.devices()[0]
    benchmark.group = f"{case} @ {shape_name}"
    benchmark.extra_info.update(
        op_case=case,
        impl=impl,
        implementation="neural-tangents 0.6.5" if impl == "nt" else f"ntfast[{impl}]",
        backend=impl if impl != "nt" else "n/a",
        interpreter=interpreted,
        shape=shape_name,
        n1=shape.n1,
        n2=shape.n2,
        image=[shape.height, shape.width, shape.channels],
        dtype=dtype,
        device=device.device_kind if device.platform != "cpu" else f"cpu×{os.cpu_count()}",
        platform=device.platform,
        jax_version=jax.__version__,
        compile_s=compile_s,
        warmup_s=warm_s,
        bytes=cost.bytes,
        flops=cost.flops,
        launches=cost.launches,
        roofline_device=roofline.H100["name"],
        roofline_bandwidth=roofline.H100["bandwidth"],
        roofline_peak_flops=roofline.H100[dtype],
        roofline_bound_s=bound_s,
        roofline_limiter=limiter,
    )
    rounds = min(MAX_ROUNDS, max(MIN_ROUNDS, math.ceil(TARGET_S / max(warm_s, 1e-6))))
    result = benchmark.pedantic(
        lambda: jax.block_until_ready(compiled(*args)), rounds=rounds, iterations=1
    )
    _check_agreement((case, shape_name), result)

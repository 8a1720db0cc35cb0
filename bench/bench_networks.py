"""Time per kernel entry, ntfast vs Neural Tangents 0.6.5, on FC-3, CNN-GAP-4 and Myrtle-5.

One test per (network, implementation): ``nt`` (Neural Tangents' ``stax`` on the same JAX, the
oracle of ``tests/nt_oracle.py``) and ``xla`` / ``triton`` / ``native`` (ntfast with that backend
forced). Each is one jitted ``kernel_fn(x1, x2, get=("nngp", "ntk"))`` call on the named shape:
compiled ahead of time and called once before timing, so the timed rounds hold only the
computation (``block_until_ready``). Every implementation's result must agree with the first one
measured for the same network and shape (f32: relative error ≤ 1e-4), so the timings compare
equal work. ``bench/report.py`` turns the JSON into per-entry times and NT/ntfast ratios.
"""

from __future__ import annotations

import math
import os
import time

import jax
import numpy as np
import pytest

from bench import networks
from bench.shapes import DEFAULT_SHAPE, SHAPES, SMOKE_SHAPE

# "xla-layer": ntfast's XLA ops layer by layer (the fused per-offset conv path switched off), to
# show what the fusion itself gains; "xla" lets serial pick the fused path where it applies.
IMPLS = ("nt", "xla", "xla-layer", "triton", "native")
GET = ("nngp", "ntk")
# Each timed test aims at this many seconds of rounds (at least MIN_ROUNDS, at most MAX_ROUNDS).
TARGET_S, MIN_ROUNDS, MAX_ROUNDS = 3.0, 3, 1000
RTOL = 1e-4
_first_result: dict = {}


def _stax_and_backend(impl: str):
    """The stax module for ``impl`` and the ntfast backend to force, or ``pytest.skip``."""
    if impl == "nt":
        from nt_oracle import load_nt_stax

        try:
            return load_nt_stax(), None
        except ImportError as e:
            pytest.skip(f"Neural Tangents oracle unavailable: {e}")
    try:
        import ntfast.stax as ntstax
        from ntfast import backend
    except ImportError as e:
        pytest.skip(f"ntfast.stax does not import yet: {e!r}")
    if impl == "xla-layer":
        return ntstax, impl
    reason = backend.unavailable_reason(impl)
    if reason is not None:
        pytest.skip(f"backend {impl!r} unavailable here: {reason}")
    ops = sorted(op for op, impls in backend.registered_ops().items() if impl in impls)
    if not ops:
        pytest.skip(f"backend {impl!r} registers no ops yet (nothing to benchmark)")
    if impl == "native" and backend.resolve("fused_cnn", "auto") != "native":
        pytest.skip("'auto' does not pick the native fused kernel on this device")
    if impl == "triton" and jax.default_backend() != "gpu":
        pytest.skip(
            f"backend 'triton' times only on a CUDA GPU (JAX platform here: "
            f"{jax.default_backend()}); on CPU it would time the Triton interpreter"
        )
    return ntstax, impl


def _compile(kernel_fn, backend: str | None, x1, x2):
    """AOT-compiled ``(x1, x2) -> (nngp, ntk)``; the backend flag is in force while tracing."""
    fn = jax.jit(lambda a, b: tuple(kernel_fn(a, b, get=GET)))
    if backend is None:
        return fn.lower(x1, x2).compile()
    from ntfast import use_backend
    from ntfast.stax.fused import fused_options

    fused = backend != "xla-layer"
    # "native" implements only the fused conv op (a forced backend never falls back, so the layers
    # outside the fused prefix would raise): it runs under "auto", which picks native for
    # fused_cnn on this device (checked in _stax_and_backend) and XLA for the rest.
    flag = {"xla-layer": "xla", "native": "auto"}.get(backend, backend)
    with use_backend(flag), fused_options(enabled=fused):
        return fn.lower(x1, x2).compile()


def _check_agreement(key, out) -> None:
    """Same network and shape must give the same kernels whichever implementation runs."""
    out = [np.asarray(o, np.float64) for o in out]
    for o, name in zip(out, GET):
        assert np.all(np.isfinite(o)), f"{name} not finite"
    first = _first_result.setdefault(key, out)
    for got, want, name in zip(out, first, GET):
        err = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), np.finfo(np.float32).tiny)
        assert err <= RTOL, f"{name}: relative difference {err:.2e} to the first implementation"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("network", tuple(networks.NETWORKS))
def test_kernel_entry(benchmark, request, network, impl):
    shape_name = request.config.getoption("--bench-shape") or (
        SMOKE_SHAPE if benchmark.disabled else DEFAULT_SHAPE
    )
    shape = SHAPES[shape_name]
    stax, backend = _stax_and_backend(impl)
    x1, x2 = (None if x is None else jax.device_put(x) for x in shape.inputs())
    kernel_fn = networks.build(network, stax)[2]

    t0 = time.perf_counter()
    compiled = _compile(kernel_fn, backend, x1, x2)
    compile_s = time.perf_counter() - t0
    # Warm-up outside the timed rounds (with benchmarks disabled, the single call below is all).
    warm_s = 0.0
    if not benchmark.disabled:
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(x1, x2))
        warm_s = time.perf_counter() - t0
    device = jax.devices()[0]
    benchmark.group = f"{network} @ {shape_name}"
    benchmark.extra_info.update(
        network=network,
        layers=networks.describe(network),
        impl=impl,
        implementation="neural-tangents 0.6.5" if impl == "nt" else f"ntfast[{impl}]",
        backend=backend or "n/a",
        shape=shape_name,
        n1=shape.n1,
        n2=shape.n2,
        image=[shape.height, shape.width, shape.channels],
        dtype=str(compiled.out_info[0].dtype),
        get=list(GET),
        n_entries=shape.n_entries,
        device=device.device_kind if device.platform != "cpu" else f"cpu×{os.cpu_count()}",
        cpu_count=os.cpu_count(),
        jax_version=jax.__version__,
        compile_s=compile_s,
        warmup_s=warm_s,
        **{
            f"{k}_per_entry_est": v
            for k, v in networks.cost(network, shape.height, shape.width, shape.channels).items()
        },
    )
    rounds = min(MAX_ROUNDS, max(MIN_ROUNDS, math.ceil(TARGET_S / max(warm_s, 1e-6))))
    result = benchmark.pedantic(
        lambda: jax.block_until_ready(compiled(x1, x2)), rounds=rounds, iterations=1
    )
    assert all(r.shape == (shape.n1, shape.n1 if x2 is None else shape.n2) for r in result)
    _check_agreement((network, shape_name), result)
